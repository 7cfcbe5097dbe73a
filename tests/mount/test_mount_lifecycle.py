"""Mounting and unmounting through the CLI: background and foreground servers, umount(8), the mount.fuse3 helper
form, ``mount -t fuse.unionfs``, and the help texts."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from mounthelp import (
    PY,
    UNIONFS_EXE,
    Layers,
    Mounts,
    cli,
    env_with_bin,
    is_mounted,
    mount_of,
    needs_root,
    open_pidfd,
    pid_alive,
    run,
    server_pid,
    wait_pid_exit,
    wait_pidfd,
    wait_until,
)

from unionfs.fuse.server import pid_file

pytestmark = pytest.mark.mount


def test_round_trip(layers: Layers, mounts: Mounts) -> None:
    r = mounts.mount(layers.opts(), layers.mnt)
    assert r.stdout == "" and r.stderr == ""
    m = mount_of(layers.mnt)
    assert m is not None and m.fstype == "fuse.unionfs"
    mnt = layers.mnt
    assert sorted(os.listdir(mnt)) == ["bottom.txt", "dir", "shared.txt", "top.txt"]
    assert (mnt / "shared.txt").read_text() == "l1 version\n"
    assert (mnt / "dir" / "deep.txt").read_text() == "deep\n"
    (mnt / "new.txt").write_text("new\n")
    with open(mnt / "bottom.txt", "a") as f:
        f.write("more\n")
    (mnt / "top.txt").unlink()

    mounts.umount(mnt)
    assert os.listdir(mnt) == []
    assert (layers.upper / "new.txt").read_text() == "new\n"
    assert (layers.upper / "bottom.txt").read_text() == "from l2\nmore\n"
    assert (layers.l2 / "bottom.txt").read_text() == "from l2\n"
    assert (layers.l1 / "top.txt").read_text() == "from l1\n"
    assert os.path.lexists(layers.upper / "top.txt")  # the whiteout
    assert not os.path.exists(pid_file(str(mnt)))

    # the changes are there after a remount
    mounts.mount(layers.opts(), mnt)
    assert sorted(os.listdir(mnt)) == ["bottom.txt", "dir", "new.txt", "shared.txt"]
    assert (mnt / "bottom.txt").read_text() == "from l2\nmore\n"
    mounts.umount(mnt)


def test_relative_layer_paths(layers: Layers, mounts: Mounts) -> None:
    """Layer paths relative to the working directory of the command."""
    mounts.points.append(layers.mnt)
    r = cli("mount", "-o", "lowerdir=l1:l2,upperdir=upper,workdir=work", layers.mnt, cwd=layers.base)
    assert r.returncode == 0, r.stderr
    mounts.track(layers.mnt)
    assert is_mounted(layers.mnt)
    (layers.mnt / "x").write_text("x")
    assert (layers.upper / "x").read_text() == "x"
    mounts.umount(layers.mnt)


def test_awkward_paths(layers: Layers, mounts: Mounts) -> None:
    """A colon and a comma in lowerdirs (escaped as ``\\:`` and ``\\,``) and a space in the mountpoint (which
    /proc/self/mountinfo shows as ``\\040``)."""
    colon = layers.base / "low:colon"
    comma = layers.base / "low,comma"
    mnt = layers.base / "mount point"
    for d in (colon, comma, mnt):
        d.mkdir()
    (colon / "c1").write_text("colon")
    (comma / "c2").write_text("comma")
    esc = f"{colon}".replace(":", "\\:") + ":" + f"{comma}".replace(",", "\\,")
    mounts.mount(f"lowerdir={esc},upperdir={layers.upper},workdir={layers.work}", mnt)
    assert sorted(os.listdir(mnt)) == ["c1", "c2"]
    assert (mnt / "c2").read_text() == "comma"
    pid = server_pid(mnt)
    assert pid is not None
    mounts.umount(mnt)
    assert not pid_alive(pid)


def test_relative_mountpoint_foreground(layers: Layers, mounts: Mounts) -> None:
    mounts.points.append(layers.mnt)
    p = subprocess.Popen([PY, "-m", "unionfs", "mount", "-f", "-o", layers.opts(), "mnt"], cwd=layers.base,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    mounts.procs.append(p)
    wait_until(lambda: is_mounted(layers.mnt) or p.poll() is not None, "the foreground mount")
    assert is_mounted(layers.mnt)
    assert server_pid(layers.mnt) == p.pid
    r = cli("umount", "mnt", cwd=layers.base)
    assert r.returncode == 0, r.stderr
    assert p.wait(10) == 0


def test_regression_relative_mountpoint(layers: Layers, mounts: Mounts) -> None:
    # Run from the parent of the test directory, so that the same relative path taken from / names nothing
    # (the bug then makes the mount fail instead of landing somewhere outside the test directory).
    cwd = layers.base.parent.parent
    rel = os.path.relpath(layers.mnt, cwd)
    assert not os.path.exists(os.path.join("/", rel))
    mounts.points.append(layers.mnt)
    r = cli("mount", "-o", layers.opts(), rel, cwd=cwd)
    mounts.track(layers.mnt)
    assert r.returncode == 0, r.stderr
    assert is_mounted(layers.mnt)
    assert server_pid(layers.mnt) is not None
    r = cli("umount", rel, cwd=cwd)
    assert r.returncode == 0, r.stderr


def test_umount_waits_for_the_server(layers: Layers, mounts: Mounts) -> None:
    mounts.mount(layers.opts(), layers.mnt)
    pid = server_pid(layers.mnt)
    assert pid is not None and pid_alive(pid), "the server writes its pid file"
    with open(layers.mnt / "big", "wb") as f:
        f.write(os.urandom(1 << 20))
    mounts.umount(layers.mnt)
    assert not pid_alive(pid), "`unionfs umount` returned before the server exited"
    # The workdir lock is free again: a new mount with the same workdir succeeds straight away.
    mounts.mount(layers.opts(), layers.mnt)
    assert (layers.mnt / "big").stat().st_size == 1 << 20
    mounts.umount(layers.mnt)


def test_umount_not_mounted(layers: Layers) -> None:
    r = cli("umount", layers.mnt)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unionfs: error: ")
    assert str(layers.mnt) in lines[0]


def test_plain_umount_stops_the_server(layers: Layers, mounts: Mounts) -> None:
    mounts.mount(layers.opts(), layers.mnt)
    pid = server_pid(layers.mnt)
    assert pid is not None
    pidfd = open_pidfd(pid)
    assert pidfd is not None
    try:
        (layers.mnt / "f").write_text("data")
        r = run(["umount", str(layers.mnt)])
        assert r.returncode == 0, r.stderr
        assert not is_mounted(layers.mnt)
        assert wait_pidfd(pidfd, 10), "the server kept running after umount(8)"
    finally:
        os.close(pidfd)
    assert not os.path.exists(pid_file(str(layers.mnt))), "the server left its pid file behind"
    assert (layers.upper / "f").read_text() == "data"
    # and the workdir is free again
    mounts.mount(layers.opts(), layers.mnt)
    mounts.umount(layers.mnt)


def test_fusermount_stops_the_server(layers: Layers, mounts: Mounts) -> None:
    mounts.mount(layers.opts(), layers.mnt)
    pid = server_pid(layers.mnt)
    assert pid is not None
    assert run(["fusermount3", "-u", str(layers.mnt)]).returncode == 0
    assert wait_pid_exit(pid, 10)


def test_foreground_sigterm(layers: Layers, mounts: Mounts) -> None:
    p = mounts.foreground(layers.opts(), layers.mnt)
    assert p.poll() is None, "-f must keep serving in the foreground"
    assert server_pid(layers.mnt) == p.pid
    (layers.mnt / "fg.txt").write_text("foreground\n")
    assert (layers.mnt / "top.txt").read_text() == "from l1\n"
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0
    assert not is_mounted(layers.mnt), "SIGTERM must unmount"
    assert not os.path.exists(pid_file(str(layers.mnt)))
    assert (layers.upper / "fg.txt").read_text() == "foreground\n"
    err = p.stderr.read() if p.stderr else ""
    assert "Traceback" not in err, err


def test_regression_foreground_sigint_right_after_mount(layers: Layers, mounts: Mounts) -> None:
    # A signal sent the moment the mount appeared used to kill the server before its handler was installed,
    # leaving the mount behind: signals are now held from the mount until the handler is in place.
    p = mounts.foreground(layers.opts(), layers.mnt)
    p.send_signal(signal.SIGINT)  # at once: the mount has only just appeared
    rc = p.wait(10)
    assert rc == 0
    assert not is_mounted(layers.mnt)


def test_foreground_ends_on_umount(layers: Layers, mounts: Mounts) -> None:
    p = mounts.foreground(layers.opts(), layers.mnt)
    r = cli("umount", layers.mnt)
    assert r.returncode == 0, r.stderr
    assert p.poll() is not None, "`unionfs umount` returned before the foreground server exited"
    assert p.returncode == 0


def test_help() -> None:
    r = cli("--help")
    assert r.returncode == 0
    assert "mount" in r.stdout and "umount" in r.stdout
    r = cli("mount", "--help")
    assert r.returncode == 0
    for word in ("lowerdir=", "upperdir=", "workdir=", "ro", "-f", "allow_other", "MOUNTPOINT"):
        assert word in r.stdout, word
    r = run([str(UNIONFS_EXE), "mount", "--help"])
    assert r.returncode == 0 and "lowerdir=" in r.stdout
    r = cli("umount", "--help")
    assert r.returncode == 0 and "mountpoint" in r.stdout


def test_no_arguments_is_a_usage_error() -> None:
    r = cli()
    assert r.returncode == 2
    assert "usage" in r.stdout + r.stderr


# -- the mount.fuse3 helper form ----------------------------------------------------------------------------


def test_helper_form(layers: Layers, mounts: Mounts) -> None:
    """What mount.fuse3 runs: ``unionfs SOURCE MOUNTPOINT -o OPTIONS`` with generic options mixed in."""
    mounts.points.append(layers.mnt)
    r = run([str(UNIONFS_EXE), "unionfs", str(layers.mnt), "-o", "rw," + layers.opts("dev", "suid", "noatime")])
    assert r.returncode == 0, r.stderr
    mounts.track(layers.mnt)
    assert is_mounted(layers.mnt)
    (layers.mnt / "h").write_text("helper")
    assert (layers.upper / "h").read_text() == "helper"
    mounts.umount(layers.mnt)


def test_helper_form_python_m(layers: Layers, mounts: Mounts) -> None:
    mounts.points.append(layers.mnt)
    r = cli("somesource", layers.mnt, "-o", "rw,nodev,nosuid,exec," + layers.opts())
    assert r.returncode == 0, r.stderr
    mounts.track(layers.mnt)
    assert (layers.mnt / "top.txt").read_text() == "from l1\n"
    mounts.umount(layers.mnt)


def _mount_t(layers: Layers, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (sh) where ``unionfs`` is on the command search path of mount(8)'s helper.

    mount(8) drops PATH from the environment of the helpers it runs, so mount.fuse3's ``/bin/sh -c unionfs ...``
    searches only the shell's default path; the script therefore runs in a private mount namespace where
    /usr/local/sbin is a directory holding a ``unionfs`` link to the venv's executable (PATH is set too)."""
    bindir = layers.base / "helper-bin"
    bindir.mkdir()
    (bindir / "unionfs").symlink_to(UNIONFS_EXE)
    prologue = (f"set -e\nmount --bind '{bindir}' /usr/local/sbin\n"
                f"trap 'fusermount3 -u -z {layers.mnt} 2>/dev/null || true' EXIT\n")
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", prologue + script],
                          capture_output=True, text=True, env=env_with_bin(), timeout=60)


MOUNT_T = "mount(8) -t fuse.unionfs in a private mount namespace, with a bind mount over /usr/local/sbin"


@needs_root(MOUNT_T)
def test_mount_t_fuse_unionfs(layers: Layers, mounts: Mounts) -> None:
    mounts.points.append(layers.mnt)
    mnt = layers.mnt
    r = _mount_t(layers, f"""
mount -t fuse.unionfs unionfs {mnt} -o {layers.opts()}
grep -F ' {mnt} ' /proc/self/mountinfo
cat {mnt}/dir/deep.txt
echo viamount > {mnt}/new
umount {mnt}
""")
    assert r.returncode == 0, r.stderr
    assert "fuse.unionfs" in r.stdout and "deep\n" in r.stdout
    assert (layers.upper / "new").read_text() == "viamount\n"
    assert not (layers.upper / "dir").exists()
    # (umount(8) does not wait for the server, which removes its pid file once it has seen the unmount: a CI run
    # found the file still there when checked at once)
    wait_until(lambda: not os.path.exists(pid_file(str(mnt))), "the server to exit after umount(8)", 30)


@needs_root(MOUNT_T)
def test_mount_t_fuse_unionfs_read_only(layers: Layers, mounts: Mounts) -> None:
    mounts.points.append(layers.mnt)
    mnt = layers.mnt
    r = _mount_t(layers, f"""
mount -t fuse.unionfs -o ro,noatime,lowerdir={layers.l1}:{layers.l2} unionfs {mnt}
grep -F ' {mnt} ' /proc/self/mountinfo
cat {mnt}/bottom.txt
if touch {mnt}/new 2>/dev/null; then echo WRITABLE; fi
{PY} -m unionfs umount {mnt}
""")
    assert r.returncode == 0, r.stderr
    assert " ro," in r.stdout and "from l2\n" in r.stdout
    assert "WRITABLE" not in r.stdout


@needs_root(MOUNT_T)
def test_mount_t_error_is_reported(layers: Layers, mounts: Mounts) -> None:
    mounts.points.append(layers.mnt)
    r = _mount_t(layers, f"mount -t fuse.unionfs unionfs {layers.mnt} -o lowerdir={layers.base / 'missing'}\n")
    assert r.returncode != 0
    assert "unionfs: error:" in r.stderr and str(layers.base / "missing") in r.stderr, r.stderr


@needs_root("mount(8) -t fuse of a path that no fstab entry names")
def test_mount_t_fuse_legacy_source(layers: Layers, mounts: Mounts) -> None:
    """The fstab form ``PROGRAM#SOURCE`` with type ``fuse`` names the executable by path."""
    mounts.points.append(layers.mnt)
    r = run(["mount", "-t", "fuse", f"{UNIONFS_EXE}#unionfs", str(layers.mnt), "-o", layers.opts("noatime")])
    assert r.returncode == 0, r.stderr
    mounts.track(layers.mnt)
    m = mount_of(layers.mnt)
    assert m is not None and m.fstype == "fuse.unionfs"
    (layers.mnt / "legacy").write_text("ok")
    assert (layers.upper / "legacy").read_text() == "ok"
    pid = server_pid(layers.mnt)
    assert pid is not None
    r = run(["umount", str(layers.mnt)])
    assert r.returncode == 0, r.stderr
    assert wait_pid_exit(pid, 10)

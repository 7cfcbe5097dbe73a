"""The command line of ``unionfs``: its subcommands, the mount helper form, and the regressions of their
parsing and of ``unionfs umount``."""

from __future__ import annotations

import errno
import os
import pty
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mounthelp import (
    PY,
    Layers,
    Mounts,
    cli,
    is_mounted,
    mount_of,
    needs_root,
    server_pid,
    wait_mounted,
    wait_pid_exit,
    wait_unmounted,
)

import unionfs

pytestmark = pytest.mark.mount


def test_regression_mount_too_many_arguments(layers: Layers, mounts: Mounts, base: Path) -> None:
    """``unionfs mount -o ... L mnt`` (or ``mnt mnt2``) is a usage error, not a mount on the last one."""
    other = base / "mnt2"
    other.mkdir()
    for args in ([layers.l1, layers.mnt], [layers.mnt, other]):
        r = mounts.try_mount("-o", layers.opts(), *args, mnt=args[-1])
        mounts.track(layers.mnt)
        assert r.returncode == 2, r.stderr
        assert "too many arguments" in r.stderr
        assert not is_mounted(layers.mnt) and not is_mounted(other)


@pytest.mark.parametrize(("argv", "suggestion"), [
    (["mout", "-o", "{opts}", "{mnt}"], "mount"),
    (["snap", "ls"], "snapshot"),
    (["umout", "{mnt}"], "umount"),
    (["frobnicate"], None),
])
def test_regression_unknown_command(layers: Layers, mounts: Mounts, argv: list[str], suggestion: str | None) -> None:
    """A mistyped subcommand is named (with the closest command) and exits 2; it is not taken for the mount
    helper form, which is recognised by its shape only."""
    mounts.points.append(layers.mnt)
    r = cli(*(a.format(opts=layers.opts(), mnt=layers.mnt) for a in argv))
    mounts.track(layers.mnt)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert f"unknown command '{argv[0]}'" in lines[0]
    if suggestion is not None:
        assert f"did you mean '{suggestion}'?" in lines[0]
    else:
        assert "did you mean" not in lines[0]
    assert "lowerdir" not in lines[0]
    assert not is_mounted(layers.mnt)


def test_helper_form_by_shape(layers: Layers, mounts: Mounts) -> None:
    """``SOURCE MOUNTPOINT -o OPTIONS`` with an existing MOUNTPOINT is still the mount helper form."""
    mounts.points.append(layers.mnt)
    r = cli("mount.src", layers.mnt, "-o", layers.opts())
    assert r.returncode == 0, r.stderr
    mounts.track(layers.mnt)
    mounts.umount(layers.mnt)


@pytest.mark.parametrize("argv", [["--version"], ["-V"], ["mount", "--version"], ["mount", "-V"],
                                  ["umount", "--version"], ["umount", "-V"]])
def test_regression_version(argv: list[str]) -> None:
    """``--version`` / ``-V`` print ``unionfs VERSION`` on the command and on its mount and umount; the command's
    own adds a second line saying whether the native part is available."""
    r = cli(*argv)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"unionfs {unionfs.__version__}"
    if argv[0] in ("mount", "umount"):
        assert len(lines) == 1, r.stdout
    else:
        assert len(lines) == 2 and lines[1].startswith("native part: "), r.stdout


def test_regression_snapshots_alias(tmp_path: Path) -> None:
    """``unionfs snapshots`` is ``unionfs snapshot`` (as ``ctr snapshots``), and the usage text lists it."""
    r = cli("snapshots", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout == cli("snapshot", "--help").stdout
    r = cli("snapshots", "--root", tmp_path / "store", "prepare", "build")  # (only prepare and view make a store)
    assert r.returncode == 0, r.stderr
    r = cli("snapshots", "--root", tmp_path / "store", "ls")
    assert r.returncode == 0, r.stderr
    assert "build" in r.stdout
    assert "snapshots" in cli("--help").stdout


@needs_root("mounting a tmpfs")
def test_regression_umount_only_unionfs(mounts: Mounts, base: Path) -> None:
    """``unionfs umount`` of another filesystem leaves it mounted and says what it found."""
    t = base / "t"
    mounts.mount_tmpfs(t)
    r = cli("umount", t)
    assert r.returncode == 1
    assert r.stderr == f"unionfs: error: {t} is a tmpfs mount, not unionfs\n"
    assert is_mounted(t)


def test_regression_umount_through_symlink(layers: Layers, mounts: Mounts, base: Path) -> None:
    """``unionfs umount LINK`` where LINK is a symbolic link to the mountpoint unmounts it."""
    mounts.mount(layers.opts(), layers.mnt)
    link = base / "link"
    link.symlink_to(layers.mnt)
    r = cli("umount", link)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(layers.mnt)


def test_regression_umount_timeout_holds_for_a_stopped_server(layers: Layers, mounts: Mounts) -> None:
    """``unionfs umount --timeout 2`` of a mount whose server is stopped (SIGSTOP) returns in about 2 s, with
    one line; then ``--lazy`` detaches the mount. (timeout=0: the kernel caches nothing, so any look at the
    mountpoint waits for the server.)"""
    mounts.mount(layers.opts("timeout=0"), layers.mnt)
    pid = server_pid(layers.mnt)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        r = cli("umount", "--timeout", "2", layers.mnt, timeout=30)
        took = time.monotonic() - started
        assert r.returncode == 1, r.stderr
        assert len(r.stderr.splitlines()) == 1, r.stderr
        assert took < 10, f"umount --timeout 2 took {took:.1f} s"
        if is_mounted(layers.mnt):  # (as root the kernel unmounts without asking the server)
            assert "--lazy" in r.stderr, r.stderr
            r = cli("umount", "--lazy", "--timeout", "2", layers.mnt, timeout=30)
            assert r.returncode == 0, r.stderr
        assert not is_mounted(layers.mnt)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_pid_exit(pid, 10)


def test_regression_umount_lazy_detaches_a_busy_mount(layers: Layers, mounts: Mounts) -> None:
    """``unionfs umount -l`` detaches a mount in use (as ``umount -l``); the server exits once it is let go."""
    mounts.mount(layers.opts(), layers.mnt)
    pid = server_pid(layers.mnt)
    assert pid is not None
    with open(layers.mnt / "top.txt") as f:
        r = cli("umount", layers.mnt)
        assert r.returncode == 1 and is_mounted(layers.mnt), r.stderr
        r = cli("umount", "-l", layers.mnt)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(layers.mnt)
        assert f.read() == "from l1\n"
    assert wait_pid_exit(pid, 10)


def test_regression_log_file_relative_and_private(layers: Layers, mounts: Mounts, base: Path) -> None:
    """``--log relative.log`` writes relative.log in the caller's directory (the server changes to / first),
    created 0600; an existing log file keeps its mode."""
    name = f"unionfs-test-{os.getpid()}.log"
    mounts.points.append(layers.mnt)
    r = cli("mount", "--log", name, "-o", layers.opts(), layers.mnt, cwd=base)
    mounts.track(layers.mnt)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists("/" + name)
    log = base / name
    assert log.stat().st_mode & 0o777 == 0o600
    mounts.umount(layers.mnt)
    assert "mounted" in log.read_text()
    log.chmod(0o640)
    mounts.mount(layers.opts(), layers.mnt, "--log", str(log))
    mounts.umount(layers.mnt)
    assert log.stat().st_mode & 0o777 == 0o640


@pytest.mark.skipif(os.geteuid() == 0, reason="needs an ordinary user: root may mount on any directory")
@pytest.mark.parametrize("foreground", [False, True])
def test_regression_fusermount_explanation_shown(layers: Layers, mounts: Mounts, base: Path,
                                                 foreground: bool) -> None:
    """When fusermount3 refuses the mount (here: a mountpoint the user may not write), its own explanation is
    the message, in the background as in the foreground (not only "fuse_session_mount failed")."""
    mnt = base / "readonly-mnt"
    mnt.mkdir()
    mnt.chmod(0o555)
    try:
        r = mounts.try_mount(*(["-f"] if foreground else []), "-o", layers.opts(), mnt, mnt=mnt)
    finally:
        mnt.chmod(0o755)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "fusermount3" in lines[0] and "mountpoint" in lines[0], lines[0]


def _xattr_errno(path: Path, name: str) -> int | None:
    try:
        os.getxattr(path, name)
    except OSError as exc:
        return exc.errno
    return None


@pytest.mark.parametrize("how", ["-d", "-o debug"])
def test_regression_debug_logs_every_request(layers: Layers, mounts: Mounts, how: str) -> None:
    """``-d`` and ``-o debug`` log each request and its result, one line each: names as they are, data by its
    length, attributes by inode, errors by errno name; a getxattr answered from the cache of missing names too."""
    extra = how.split()
    opts = layers.opts()
    if extra[0] == "-o":
        opts, extra = layers.opts(extra[1]), ["-f"]
    p = mounts.foreground(opts, layers.mnt, *extra)
    assert (layers.mnt / "top.txt").read_text() == "from l1\n"
    for _ in range(2):
        assert _xattr_errno(layers.mnt / "top.txt", "user.nothing") == errno.ENODATA
    assert cli("umount", layers.mnt).returncode == 0
    _, err = p.communicate(timeout=30)
    requests = [line.split(" DEBUG ", 1)[1] for line in err.splitlines() if " DEBUG " in line]
    assert any(r.startswith("lookup(1, b'top.txt') -> inode ") for r in requests), err
    assert any(r.startswith("read(") and r.endswith(" -> 8 bytes") for r in requests), err
    assert sum(r.endswith("b'user.nothing') -> ENODATA") and r.startswith("getxattr(")
               for r in requests) == 2, err
    assert "WARNING" not in err, err


def _many_lower_paths(layers: Layers, n: int = 12000) -> None:
    """Enough lower paths for -o prescan to report progress (every 10,000)."""
    many = layers.l2 / "many"
    many.mkdir()
    for i in range(n):
        (many / f"f{i}").touch()


def test_regression_prescan_progress_is_info(layers: Layers, mounts: Mounts, base: Path) -> None:
    """-o prescan's progress is logged at INFO (in the log file), not as WARNING lines on the caller's stderr."""
    _many_lower_paths(layers)
    log = base / "prescan.log"
    r = mounts.mount(layers.opts("prescan"), layers.mnt, "--log", str(log))
    assert r.stderr == "", r.stderr
    mounts.umount(layers.mnt)
    text = log.read_text()
    assert re.search(r" INFO prescan: \d+ lower paths so far", text), text
    assert "WARNING" not in text, text
    p = mounts.foreground(layers.opts("prescan"), layers.mnt)  # (stderr not a terminal: log lines at INFO)
    assert cli("umount", layers.mnt).returncode == 0
    _, err = p.communicate(timeout=30)
    assert re.search(r" INFO prescan: \d+ lower paths so far", err) and "WARNING" not in err, err


def test_regression_prescan_progress_display_on_a_terminal(layers: Layers, mounts: Mounts) -> None:
    """In the foreground on a terminal, -o prescan shows a progress display (rich) instead of log lines."""
    _many_lower_paths(layers)
    mounts.points.append(layers.mnt)
    master, slave = pty.openpty()
    p = subprocess.Popen([PY, "-m", "unionfs", "mount", "-f", "-o", layers.opts("prescan"), str(layers.mnt)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, env={
                             **os.environ, "TERM": "xterm", "COLUMNS": "100"})
    mounts.procs.append(p)
    mounts.pids.add(p.pid)
    os.close(slave)
    try:
        wait_mounted(layers.mnt, timeout=60)
        assert cli("umount", layers.mnt).returncode == 0
        assert p.wait(30) == 0
        out = b""
        while select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # (EIO: the terminal's other side is closed)
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    text = out.decode(errors="replace")
    assert re.search(r"prescan: \d\d,\d\d\d lower paths", text), text
    assert "INFO prescan" not in text and "WARNING" not in text, text


def test_regression_fuse_and_fuse_overlayfs_options(layers: Layers, mounts: Mounts) -> None:
    """FUSE's and fuse-overlayfs's options mount: lowerdir+= stacks layers, and the ones without effect here are
    accepted."""
    opts = (f"lowerdir+={layers.l1},lowerdir+={layers.l2},upperdir={layers.upper},workdir={layers.work},"
            "auto_unmount,noacl,nonempty,static_nlink,threaded=1,subtype=unionfs")
    mounts.mount(opts, layers.mnt)
    m = mount_of(layers.mnt)
    assert m is not None and m.fstype == "fuse.unionfs"
    assert (layers.mnt / "shared.txt").read_text() == "l1 version\n"
    assert (layers.mnt / "bottom.txt").read_text() == "from l2\n"
    mounts.umount(layers.mnt)


@needs_root("fusermount3 -o auto_unmount of an ordinary user leaves the mount of a killed server here")
def test_regression_auto_unmount(layers: Layers, mounts: Mounts) -> None:
    """With auto_unmount the mount goes when the server is killed."""
    mounts.mount(layers.opts("auto_unmount"), layers.mnt)
    pid = server_pid(layers.mnt)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_pid_exit(pid, 10)
    wait_unmounted(layers.mnt)


@needs_root("allow_root needs user_allow_other in /etc/fuse.conf for an ordinary user")
def test_regression_allow_root(layers: Layers, mounts: Mounts) -> None:
    mounts.mount(layers.opts("allow_root"), layers.mnt)
    assert (layers.mnt / "top.txt").read_text() == "from l1\n"
    mounts.umount(layers.mnt)


def test_regression_mount_help_documents_every_option() -> None:
    """`unionfs mount --help` names every option parse accepts, and the escapes."""
    from unionfs.options import KERNEL_FIXED, NO_EFFECT

    text = cli("mount", "--help").stdout
    names = ["lowerdir=", "lowerdir+=", "upperdir=", "workdir=", "allow_other", "allow_root", "auto_unmount",
             "max_read=", "noacl", "userxattr", "nouserxattr", "timeout=", "prescan", "fsname=", "debug",
             "datadir+=", "\\:", "\\\\", "\\,", *NO_EFFECT]
    for key, values in KERNEL_FIXED.items():  # (key=V1|V2..., the values in any order)
        shown = re.search(rf"\b{key}=(\S+)", text)
        assert shown is not None and set(shown.group(1).split("|")) == set(values), key
    missing = [n for n in names if n not in text]
    assert not missing, missing

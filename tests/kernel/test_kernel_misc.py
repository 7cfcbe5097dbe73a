"""xattr namespaces, statfs, permissions of unprivileged callers, and the command line."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kernel_diff import (
    IMPL,
    OLD_NS,
    REPO_ROOT,
    Side,
    StackPair,
    build_template,
    format_op,
    is_mounted,
    run_ops_as,
    unionfs_env,
)

pytestmark = pytest.mark.kernel


def test_escaped_and_private_overlay_xattrs_of_lower_files(pair: StackPair) -> None:
    pair.expect(("getxattr", "xattrs.txt", "trusted.overlay.esc"),
                ("ok", b"escaped: shown as trusted.overlay.esc"))
    pair.expect(("getxattr", "xattrs.txt", "trusted.overlay.private"), "ENODATA")
    pair.expect(("getxattr", "xattrs.txt", "trusted.overlay.overlay.esc"), "ENODATA")
    pair.assert_ops([("listxattr", "xattrs.txt"), ("getxattr", "xattrs.txt", "user.overlay.u"),
                     ("listxattr", "opq"), ("getxattr", "opq", "trusted.overlay.opaque")])


def test_setting_overlay_namespace_xattrs_through_the_mount(pair: StackPair) -> None:
    pair.assert_ops([
        ("setxattr", "top.txt", "trusted.overlay.mine", b"m"), ("getxattr", "top.txt", "trusted.overlay.mine"),
        ("listxattr", "top.txt"),
        ("setxattr", "mid.txt", "user.overlay.mine", b"u"), ("listxattr", "mid.txt"),
        ("setxattr", "dir", "trusted.overlay.opaque", b"y"), ("listdir", "dir"),  # escaped: stays merged
        ("setxattr", "xattrs.txt", "trusted.overlay.esc", b"changed"), ("listxattr", "xattrs.txt"),
        ("removexattr", "top.txt", "trusted.overlay.mine"), ("listxattr", "top.txt"),
        ("removexattr", "xattrs.txt", "trusted.overlay.private"),
        ("setxattr", "bottom.txt", "trusted.overlay.overlay.double", b"d"), ("listxattr", "bottom.txt"),
    ])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_user_and_trusted_xattrs_on_new_and_copied_up_objects(pair: StackPair) -> None:
    pair.assert_ops([
        ("create", "n", b""), ("setxattr", "n", "user.a", b"1"), ("setxattr", "n", "trusted.b", b"2"),
        ("setxattr", "n", "user.big", b"x" * 4000), ("getxattr", "n", "user.big"), ("listxattr", "n"),
        ("mkdir", "nd"), ("setxattr", "nd", "user.d", b"d"),
        ("setxattr", "dir/sub", "user.s", b"s"), ("removexattr", "owned", "trusted.t"),
        ("setxattr", "owned", "user.k", b"v2", 2), ("setxattr", "owned", "user.new", b"c", 1),
    ])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_statfs(pair: StackPair) -> None:
    k = os.statvfs(pair.kernel.root)
    u = os.statvfs(pair.unionfs.root)
    exact = ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax")
    diffs = [f"{f}: kernel={getattr(k, f)} {pair.impl}={getattr(u, f)}" for f in exact
             if getattr(k, f) != getattr(u, f)]
    # Free counts move with everything else using the file system: compare loosely.
    for f, total in (("f_bfree", "f_blocks"), ("f_bavail", "f_blocks"), ("f_ffree", "f_files")):
        tolerance = max(getattr(k, total) // 100, 1024)
        if abs(getattr(k, f) * k.f_frsize // max(u.f_frsize, 1) - getattr(u, f)) > tolerance:
            diffs.append(f"{f}: kernel={getattr(k, f)} {pair.impl}={getattr(u, f)}")
    if (k.f_flag & os.ST_RDONLY) != (u.f_flag & os.ST_RDONLY):
        diffs.append(f"ST_RDONLY: kernel={k.f_flag:#x} {pair.impl}={u.f_flag:#x}")
    assert not diffs, "statvfs differs:\n" + "\n".join(diffs)


def test_truncate_extend_and_holes_read_back_as_zeros(pair: StackPair) -> None:
    pair.assert_ops([
        ("truncate", "mid.txt", 4096 * 3), ("write", "mid.txt", 8000, b"Z"), ("read", "mid.txt"),
        ("stat", "mid.txt"), ("truncate", "sparse", 64 << 20), ("write", "sparse", (48 << 20), b"far"),
        ("read", "sparse"), ("stat", "sparse"),
    ])
    pair.assert_same_tree()


def test_utime_with_nanoseconds_and_special_values(pair: StackPair) -> None:
    pair.assert_ops([
        ("utime", "top.txt", OLD_NS + 1, OLD_NS + 999_999_999), ("stat", "top.txt"),
        ("utime", "dir", OLD_NS, OLD_NS + 3), ("stat", "dir"),
        ("utime", "link_to_top", OLD_NS, OLD_NS + 4), ("lstat", "link_to_top"), ("stat", "link_to_top"),
        ("create", "n", b"n"), ("utime", "n", OLD_NS, OLD_NS), ("stat", "n"),
    ])
    pair.assert_same_tree()
    pair.assert_same_upper()


# -- unprivileged callers ----------------------------------------------------------------------------------------

NOBODY = 65534
R_OK, W_OK, X_OK = os.R_OK, os.W_OK, os.X_OK

AS_NOBODY = [
    ("read", "top.txt"),
    ("read", "secret"),
    ("open", "top.txt", "O_WRONLY"),
    ("create", "newfile", b"x"),
    ("create", "pub/new", b"x"),
    ("unlink", "pub/f"),
    ("unlink", "sticky/f"),
    ("rename", "sticky/f", "sticky/g"),
    ("create", "sticky/mine", b"m"),
    ("rename", "sticky/mine", "sticky/mine2"),
    ("chmod", "top.txt", 0o777),
    ("chown", "mine", 0, 0),
    ("utime", "top.txt", OLD_NS, OLD_NS),
    ("touch", "top.txt"),
    ("setxattr", "top.txt", "user.x", b"1"),
    ("setxattr", "top.txt", "trusted.x", b"1"),
    ("listxattr", "owned"),
    ("listxattr", "xattrs.txt"),
    ("getxattr", "owned", "trusted.t"),
    ("getxattr", "owned", "user.k"),
    ("listdir", "private"),
    ("stat", "private/x"),
    ("read", "xdir/f"),
    ("write", "mine", 0, b"M"),
    ("chmod", "mine", 0o600),
    ("setxattr", "mine", "user.m", b"1"),
    ("utime", "mine", OLD_NS, OLD_NS),
    ("mkdir", "pub/d"),
    ("mkdir", "dir/d"),
    ("rmdir", "emptydir"),
    ("access", "secret", R_OK),
    ("access", "top.txt", W_OK),
    ("access", "exe", X_OK),
    ("exec", "exe"),
    ("exec", "noexec"),
    ("symlink", "top.txt", "pub/s"),
    ("link", "top.txt", "pub/hl"),
    ("link", "secret", "pub/hl2"),
    ("truncate", "mine", 2),
    ("truncate", "top.txt", 2),
]


@pytest.fixture
def traversable_tmp(tmp_path: Path) -> Path:
    """Let other users reach ``tmp_path`` (pytest makes its ancestors 0700); restored afterwards."""
    changed = []
    for d in [tmp_path, *tmp_path.parents]:
        if d == Path("/tmp") or d == d.parent:
            break
        mode = stat.S_IMODE(d.stat().st_mode)
        if mode & 0o001 == 0:
            os.chmod(d, mode | 0o001)
            changed.append((d, mode))
    yield tmp_path
    for d, mode in changed:
        os.chmod(d, mode)


def test_unprivileged_caller_gets_the_same_permission_errors(traversable_tmp: Path, make_pair) -> None:  # type: ignore[no-untyped-def]
    pair = make_pair()
    k = run_ops_as(NOBODY, NOBODY, pair.kernel.root, AS_NOBODY)
    u = run_ops_as(NOBODY, NOBODY, pair.unionfs.root, AS_NOBODY)
    assert ("err", "EACCES") in k and ("err", "EPERM") in k, k  # premise: the table does exercise both
    mismatches = [f"  #{i} {format_op(op)}: kernel={a!r} {pair.impl}={b!r}"
                  for i, (op, a, b) in enumerate(zip(AS_NOBODY, k, u, strict=True)) if a != b]
    if mismatches:
        raise AssertionError(f"as uid {NOBODY}, {len(mismatches)} of {len(AS_NOBODY)} operation(s) differ:\n"
                             + "\n".join(mismatches) + pair.context())
    pair.assert_same_tree()
    pair.assert_same_upper()


# -- command line ------------------------------------------------------------------------------------------------


def _servers_for(mnt: Path) -> list[int]:
    """Processes whose command line names ``mnt`` (our own servers: the path is unique to this test)."""
    pids = []
    needle = os.fsencode(str(mnt))
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline.split(b"\0"):
            pids.append(int(entry))
    return pids


def test_cli_mount_returns_when_ready_and_umount_waits_for_the_server(tmp_path: Path, overlay_ready: None) -> None:
    if IMPL == "kernel":
        pytest.skip("UNIONFS_DIFF_IMPL=kernel: no FUSE command line to test")
    template = build_template(tmp_path / "template", [{"a": "lower a\n"}, {"b": "lower b\n"}, {"c": "c\n"}])
    side = Side.from_template(template, tmp_path / "side")
    if IMPL == "unionfs":
        mount_cmd = [sys.executable, "-m", "unionfs", "mount", "-o", side.options(), str(side.mnt)]
        umount_cmd = [sys.executable, "-m", "unionfs", "umount", str(side.mnt)]
    else:
        mount_cmd = ["fuse-overlayfs", "-o", side.options(), str(side.mnt)]
        umount_cmd = ["fusermount3", "-u", str(side.mnt)]
    try:
        res = subprocess.run(mount_cmd, capture_output=True, text=True, timeout=60, env=unionfs_env(),
                             cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL)
        assert res.returncode == 0, f"mount failed ({res.returncode}): {res.stderr}"
        assert is_mounted(side.mnt, "fuse"), "the mount command returned before the mount was ready"
        assert (side.mnt / "a").read_bytes() == b"lower a\n"
        (side.mnt / "new").write_bytes(b"new")
        res = subprocess.run(umount_cmd, capture_output=True, text=True, timeout=60, env=unionfs_env(),
                             cwd=str(REPO_ROOT))
        assert res.returncode == 0, f"umount failed ({res.returncode}): {res.stderr}"
        assert not is_mounted(side.mnt), "still mounted after umount returned"
        if IMPL == "unionfs":
            assert not _servers_for(side.mnt), "umount returned before the server exited"
        assert (side.upper / "new").read_bytes() == b"new"
    finally:
        if is_mounted(side.mnt, "fuse"):
            subprocess.run(["fusermount3", "-u", "-z", str(side.mnt)], capture_output=True, timeout=30)
        deadline = time.monotonic() + 5
        while _servers_for(side.mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in _servers_for(side.mnt):
            os.kill(pid, 9)

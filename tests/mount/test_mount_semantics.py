"""File-system semantics through a real mount: ioctl, name and path limits, unlinked open files, shared writable
mmap, statfs, fsync, inode numbers, and forgetting inodes when the kernel drops its caches."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounthelp import Layers, Mounts, errno_of, is_mounted, needs_root, pid_alive, server_pid

pytestmark = pytest.mark.mount

TCGETS = 0x5401


@pytest.fixture
def mnt(layers: Layers, mounts: Mounts) -> Iterator[Path]:
    """The standard stack mounted writable; unmounted cleanly (and checked) at the end."""
    mounts.mount(layers.opts(), layers.mnt)
    yield layers.mnt
    if is_mounted(layers.mnt):
        mounts.umount(layers.mnt)


def test_unknown_ioctl_is_enotty(mnt: Path) -> None:
    for name in ("top.txt", "bottom.txt"):
        fd = os.open(mnt / name, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as exc:
                fcntl.ioctl(fd, TCGETS, bytes(64))
            assert exc.value.errno == errno.ENOTTY, exc.value
        finally:
            os.close(fd)
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as exc:
            fcntl.ioctl(fd, TCGETS, bytes(64))
        assert exc.value.errno == errno.ENOTTY
    finally:
        os.close(fd)


def test_name_too_long(mnt: Path, layers: Layers) -> None:
    long = "n" * 256
    ok = "o" * 255
    j = os.path.join
    m = str(mnt)
    attempts = {
        "stat": lambda: os.stat(j(m, long)),
        "stat in lower dir": lambda: os.stat(j(m, "dir", long)),
        "create": lambda: os.close(os.open(j(m, long), os.O_CREAT | os.O_WRONLY, 0o644)),
        "mkdir": lambda: os.mkdir(j(m, long)),
        "symlink": lambda: os.symlink("target", j(m, long)),
        "mkfifo": lambda: os.mkfifo(j(m, long)),
        "link": lambda: os.link(j(m, "top.txt"), j(m, long)),
        "rename to": lambda: os.rename(j(m, "top.txt"), j(m, long)),
        "unlink": lambda: os.unlink(j(m, long)),
        "rmdir": lambda: os.rmdir(j(m, long)),
    }
    wrong = {what: errno.errorcode.get(e, e) if e else "succeeded"
             for what, fn in attempts.items() if (e := errno_of(fn)) != errno.ENAMETOOLONG}
    assert not wrong, f"expected ENAMETOOLONG, got {wrong}"
    assert os.listdir(layers.upper) == [], "a refused name left something in the upper layer"
    # 255 bytes is fine
    (mnt / ok).write_text("max")
    assert (mnt / ok).read_text() == "max"
    assert ok in os.listdir(mnt)
    (mnt / "dir" / ok).mkdir()
    os.rename(mnt / ok, mnt / "dir" / ok / ok)
    assert (layers.upper / "dir" / ok / ok).read_text() == "max"


def test_deep_path_near_path_max(mnt: Path, layers: Layers) -> None:
    components = [f"{i:02d}" + "d" * 198 for i in range(19)]  # 19 * 201 = 3819 bytes with the slashes
    rel = "/".join(components)
    fname = "f" * 150
    frel = rel + "/" + fname
    assert 3900 < len(frel) < 4096
    r = subprocess.run(["mkdir", "-p", rel], cwd=mnt, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    root = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    up = os.open(layers.upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = os.open(frel, os.O_CREAT | os.O_RDWR, 0o644, dir_fd=root)
        try:
            os.write(fd, b"at the bottom\n")
        finally:
            os.close(fd)
        fd = os.open(frel, os.O_RDONLY, dir_fd=root)
        try:
            assert os.read(fd, 100) == b"at the bottom\n"
        finally:
            os.close(fd)
        assert os.stat(frel, dir_fd=root).st_size == 14
        fd = os.open(frel, os.O_RDONLY, dir_fd=up)
        try:
            assert os.read(fd, 100) == b"at the bottom\n"
        finally:
            os.close(fd)
        # renaming the top of the tree keeps the bottom reachable
        os.rename(components[0], "top", src_dir_fd=root, dst_dir_fd=root)
        moved = "top/" + frel.split("/", 1)[1]
        assert os.stat(moved, dir_fd=root).st_size == 14
        r = subprocess.run(["rm", "-r", "top"], cwd=mnt, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(mnt)) == ["bottom.txt", "dir", "shared.txt", "top.txt"]
    finally:
        os.close(root)
        os.close(up)


def test_path_longer_than_path_max(mnt: Path) -> None:
    """Regression: a merged path longer than PATH_MAX was refused (ENAMETOOLONG) although each call's own
    path was short; the kernel allows any depth, and so does unionfs now."""
    root = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = root
        depth = 0
        name = "p" * 250
        try:
            while depth * 251 < 8200:  # build one level at a time, each path short
                os.mkdir(name, dir_fd=fd)
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                if fd != root:
                    os.close(fd)
                fd = nfd
                depth += 1
            wfd = os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(wfd, b"at 8,000 bytes\n")
            os.close(wfd)
            assert os.listdir(fd) == ["bottom"]
            assert os.stat("bottom", dir_fd=fd).st_size == 15
        finally:
            if fd != root:
                os.close(fd)
        assert depth == 33
    finally:
        os.close(root)
    r = subprocess.run(["rm", "-r", "p" * 250], cwd=mnt, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "p" * 250 not in os.listdir(mnt)


def test_unlinked_open_file(mnt: Path, layers: Layers) -> None:
    path = mnt / "tmp.bin"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"hello ")
        os.unlink(path)
        assert not path.exists()
        assert not (layers.upper / "tmp.bin").exists()
        os.write(fd, b"world")
        st = os.fstat(fd)
        assert st.st_nlink == 0
        assert st.st_size == 11
        assert os.pread(fd, 100, 0) == b"hello world"
        os.ftruncate(fd, 5)
        assert os.fstat(fd).st_size == 5
        assert os.pread(fd, 100, 0) == b"hello"
        # a new file with the same name is a different file
        path.write_text("new")
        assert os.pread(fd, 100, 0) == b"hello"
        assert os.fstat(fd).st_ino != path.stat().st_ino
    finally:
        os.close(fd)
    assert path.read_text() == "new"


def test_regression_unlinked_open_file_attributes(mnt: Path) -> None:
    path = mnt / "gone"
    # root gives the file away; an ordinary user may only "change" it to its own ids (the call still goes through)
    uid, gid = (1000, 1000) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.unlink(path)
        failed = {}
        for what, fn in {"fchmod": lambda: os.fchmod(fd, 0o640), "fchown": lambda: os.fchown(fd, uid, gid),
                         "futimens": lambda: os.utime(fd, ns=(10**9, 2 * 10**9))}.items():
            if (e := errno_of(fn)) is not None:
                failed[what] = errno.errorcode.get(e, e)
        assert not failed, f"failed on an unlinked open file: {failed}"
        st = os.fstat(fd)
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid, st.st_mtime_ns) == (0o640, uid, gid, 2 * 10**9)
    finally:
        os.close(fd)


def test_regression_unlinked_open_file_xattrs(mnt: Path) -> None:
    path = mnt / "gone"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.setxattr(fd, "user.before", b"1")
        os.unlink(path)
        assert os.getxattr(fd, "user.before") == b"1"
        os.setxattr(fd, "user.after", b"2")
        assert os.getxattr(fd, "user.after") == b"2"
    finally:
        os.close(fd)


def test_missing_xattr_remembered_until_set(mnt: Path, layers: Layers) -> None:
    """The server remembers names a getxattr found missing; a setxattr (on a lower file: after copy-up), a
    second name of the same file, and removing the name again must all show through."""

    def missing(path: Path, name: str) -> bool:
        try:
            os.getxattr(path, name)
        except OSError as e:
            assert e.errno == errno.ENODATA, e
            return True
        return False

    (layers.l2 / "dir" / "deep.txt").chmod(0o644)
    os.setxattr(layers.l2 / "dir" / "deep.txt", "user.lower", b"low")
    for path in (mnt / "bottom.txt", mnt / "dir" / "deep.txt"):  # lower files: the setxattr copies them up
        assert missing(path, "user.x") and missing(path, "user.x")
        os.setxattr(path, "user.x", b"1")
        assert os.getxattr(path, "user.x") == b"1"
        os.removexattr(path, "user.x")
        assert missing(path, "user.x")
    assert os.getxattr(mnt / "dir" / "deep.txt", "user.lower") == b"low"

    new = mnt / "new.txt"
    new.write_text("new\n")
    os.link(new, mnt / "alias.txt")
    assert missing(new, "user.y") and missing(mnt / "alias.txt", "user.y")
    os.setxattr(mnt / "alias.txt", "user.y", b"2")
    assert os.getxattr(new, "user.y") == b"2"

    # A copy-up by something else than setxattr (a write) reaches the copy, which keeps the lower xattrs.
    top = mnt / "top.txt"
    os.setxattr(layers.l1 / "top.txt", "user.kept", b"k")  # before the mount first sees it
    assert missing(top, "user.z")
    with open(top, "a") as f:
        f.write("more\n")
    assert missing(top, "user.z")
    assert os.getxattr(top, "user.kept") == b"k"
    os.setxattr(top, "user.z", b"3")
    assert os.getxattr(top, "user.z") == b"3"
    assert os.getxattr(layers.upper / "top.txt", "user.z") == b"3"


def test_regression_missing_xattr_memory_follows_the_file_not_the_node(layers: Layers, mounts: Mounts) -> None:
    """Two names of one upper file can be two nodes (the kernel's node of an unlinked open name, and a fresh
    one for the other name): an xattr set through one must show through the other (regression: the memory of
    missing names was kept per node, and the second name kept answering ENODATA)."""
    (layers.upper / "a").write_bytes(b"linked\n")
    os.link(layers.upper / "a", layers.upper / "b")
    mounts.mount(layers.opts(), layers.mnt)
    mnt = layers.mnt
    fd = os.open(mnt / "a", os.O_RDWR)
    try:
        os.unlink(mnt / "a")
        with pytest.raises(OSError) as exc:
            os.getxattr(mnt / "b", "user.q")
        assert exc.value.errno == errno.ENODATA
        os.setxattr(fd, "user.q", b"v")
        assert os.getxattr(mnt / "b", "user.q") == b"v"
        os.removexattr(mnt / "b", "user.q")
        os.setxattr(mnt / "b", "user.r", b"w")
        assert os.getxattr(fd, "user.r") == b"w"
    finally:
        os.close(fd)
    mounts.umount(mnt)


def test_unlinked_open_lower_file(mnt: Path, layers: Layers) -> None:
    path = mnt / "bottom.txt"
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        assert not path.exists()
        assert os.pread(fd, 100, 0) == b"from l2\n"
        os.pwrite(fd, b"FROM", 0)
        assert os.pread(fd, 100, 0) == b"FROM l2\n"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert (layers.l2 / "bottom.txt").read_text() == "from l2\n"
    assert not path.exists()


def test_unlinked_read_only_open_file(mnt: Path) -> None:
    path = mnt / "dir" / "deep.txt"
    with open(path, "rb") as f:
        os.unlink(path)
        assert f.read() == b"deep\n"
        # The lower file itself still exists beneath the whiteout: the kernel reports its link count (1) here,
        # and 0 only for an unlinked upper file (test_unlinked_open_file).
        assert os.fstat(f.fileno()).st_nlink == 1


def test_shared_writable_mmap_of_lower_file(mnt: Path, layers: Layers) -> None:
    size = 3 * mmap.PAGESIZE
    data = bytes(range(256)) * (size // 256)
    (layers.l2 / "mapped").write_bytes(data)
    fd = os.open(mnt / "mapped", os.O_RDWR)
    try:
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            assert m[:256] == data[:256]
            m[0:5] = b"HELLO"
            m[size - 5 : size] = b"WORLD"
            m.flush()
    finally:
        os.close(fd)
    expect = b"HELLO" + data[5 : size - 5] + b"WORLD"
    assert (mnt / "mapped").read_bytes() == expect
    assert (layers.upper / "mapped").read_bytes() == expect
    assert (layers.l2 / "mapped").read_bytes() == data


def test_shared_mmap_sees_writes(mnt: Path) -> None:
    path = mnt / "new-mapped"
    path.write_bytes(b"\0" * mmap.PAGESIZE)
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED) as m:
            os.pwrite(fd, b"through write", 0)
            assert m[:13] == b"through write"
            m[:8] = b"THROUGH "
            m.flush()
            assert os.pread(fd, 13, 0) == b"THROUGH write"
    finally:
        os.close(fd)


@pytest.mark.parametrize("forced", [False, True], ids=["chosen", "userxattr"])
def test_on_disk_markers(layers: Layers, mounts: Mounts, forced: bool) -> None:
    """A deletion leaves a character device 0/0 (which any user may make), and a directory made where one was
    deleted is opaque: ``trusted.overlay.opaque`` when the server may write trusted.* xattrs (root), else
    ``user.overlay.opaque`` (rootless), which ``-o userxattr`` forces."""
    mounts.mount(layers.opts(*(["userxattr"] if forced else [])), layers.mnt)
    (layers.mnt / "top.txt").unlink()
    (layers.mnt / "dir" / "deep.txt").unlink()
    (layers.mnt / "dir").rmdir()
    (layers.mnt / "dir").mkdir()
    assert os.listdir(layers.mnt / "dir") == []
    mounts.umount(layers.mnt)
    st = os.lstat(layers.upper / "top.txt")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, f"top.txt in the upper layer: {st}"
    ns = "user" if forced or os.geteuid() != 0 else "trusted"
    assert os.getxattr(layers.upper / "dir", f"{ns}.overlay.opaque") == b"y"
    markers = [n for n in os.listxattr(layers.upper / "dir") if n.endswith(".overlay.opaque")]
    assert markers == [f"{ns}.overlay.opaque"], markers


def test_statfs(mnt: Path, layers: Layers) -> None:
    sv = os.statvfs(mnt)
    up = os.statvfs(layers.upper)
    assert sv.f_bsize > 0 and sv.f_frsize > 0
    assert sv.f_blocks == up.f_blocks
    assert sv.f_namemax == 255
    assert sv.f_bavail <= sv.f_bfree <= sv.f_blocks
    r = subprocess.run(["df", "-P", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0 and str(mnt) in r.stdout, r.stderr


def test_statfs_read_only_stack(layers: Layers, mounts: Mounts) -> None:
    mounts.mount(f"lowerdir={layers.l1}:{layers.l2}", layers.mnt)
    assert os.statvfs(layers.mnt).f_blocks == os.statvfs(layers.l1).f_blocks
    mounts.umount(layers.mnt)


def test_fsync(mnt: Path, layers: Layers) -> None:
    fd = os.open(mnt / "synced", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
        assert (layers.upper / "synced").read_bytes() == b"durable"
    finally:
        os.close(fd)
    # fsync of a file only read (still in a lower layer) and of directories
    with open(mnt / "bottom.txt", "rb") as f:
        os.fsync(f.fileno())
    for d in (mnt, mnt / "dir"):
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    assert not (layers.upper / "bottom.txt").exists(), "fsync of a read-only open copied the file up"
    r = subprocess.run(["sync", "-f", str(mnt / "synced")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_inode_stable_across_copy_up(mnt: Path, layers: Layers) -> None:
    path = mnt / "bottom.txt"
    before = path.stat()
    with open(path, "a") as f:
        f.write("appended\n")
    assert (layers.upper / "bottom.txt").exists()
    after = path.stat()
    assert after.st_ino == before.st_ino
    assert after.st_dev == before.st_dev
    # also when the kernel looks the name up again
    os.rename(path, mnt / "renamed.txt")
    assert (mnt / "renamed.txt").stat().st_ino == before.st_ino
    # metadata-only copy-up of a directory
    d_before = (mnt / "dir").stat().st_ino
    os.chmod(mnt / "dir", 0o700)
    assert (layers.upper / "dir").is_dir()
    assert (mnt / "dir").stat().st_ino == d_before


def test_readdir_inode_matches_stat(mnt: Path) -> None:
    with open(mnt / "shared.txt", "a") as f:  # copied up
        f.write("x")
    (mnt / "fresh").write_text("new")
    with os.scandir(mnt) as it:
        got = {e.name: e.inode() for e in it}
    want = {name: os.lstat(mnt / name).st_ino for name in got}
    assert got == want


def test_inode_stable_across_remount(layers: Layers, mounts: Mounts) -> None:
    names = ["top.txt", "bottom.txt", "shared.txt", "dir", "dir/deep.txt"]
    mounts.mount(layers.opts(), layers.mnt)
    first = {n: (layers.mnt / n).stat().st_ino for n in names}
    root = layers.mnt.stat().st_ino
    mounts.umount(layers.mnt)
    mounts.mount(layers.opts(), layers.mnt)
    # look them up in another order this time
    second = {n: (layers.mnt / n).stat().st_ino for n in reversed(names)}
    assert second == first
    assert layers.mnt.stat().st_ino == root
    assert len(set(first.values())) == len(names)
    mounts.umount(layers.mnt)


def _drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def _walk(mnt: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, mnt)] = (st.st_ino, st.st_size)
    return out


@needs_root("writes /proc/sys/vm/drop_caches to make the kernel forget inodes")
def test_forget_after_drop_caches(mnt: Path, layers: Layers) -> None:
    # 2000 files in a lower layer, 1000 created through the mount
    lower_tree = layers.l2 / "many"
    lower_tree.mkdir()
    for i in range(20):
        d = lower_tree / f"d{i:02d}"
        d.mkdir()
        for k in range(100):
            (d / f"f{k:03d}").write_bytes(b"x" * (k % 7))
    for i in range(10):
        d = mnt / "many" / f"n{i:02d}"
        d.mkdir()
        for k in range(100):
            (d / f"g{k:03d}").write_bytes(b"y" * (k % 5))
    first = _walk(mnt)
    assert len(first) >= 3000
    pid = server_pid(mnt)
    assert pid is not None
    _drop_caches()
    second = _walk(mnt)
    assert second == first, "lookups after the kernel forgot its inodes give other answers"
    # change things after a forget: unlink, rename and re-create some names, then forget again
    for i in range(0, 100, 3):
        os.unlink(mnt / "many" / "d00" / f"f{i:03d}")
        os.rename(mnt / "many" / "n00" / f"g{i:03d}", mnt / "many" / "d01" / f"moved{i:03d}")
    _drop_caches()
    third = _walk(mnt)
    assert len(third) == len(first) - 34
    assert third[os.path.join("many", "d01", "moved003")] == first[os.path.join("many", "n00", "g003")]
    for rel, (ino, size) in third.items():
        if rel in first:
            assert first[rel] == (ino, size), rel
    assert pid_alive(pid)
    # reading contents after the forgets
    assert (mnt / "many" / "d05" / "f006").read_bytes() == b"x" * 6
    assert (mnt / "many" / "n09" / "g004").read_bytes() == b"y" * 4


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@needs_root("writes /proc/sys/vm/drop_caches to make the kernel forget inodes")
def test_memory_bounded_after_forget(mnt: Path, layers: Layers) -> None:
    """Looking up ever new names and letting the kernel forget them must not grow the server without bound."""
    pid = server_pid(mnt)
    assert pid is not None

    def cycle(n: int) -> None:
        d = layers.l2 / f"batch{n}"
        d.mkdir()
        for k in range(3000):
            (d / f"file-with-a-longish-name-{k:05d}").touch()
        assert len(os.listdir(mnt / f"batch{n}")) == 3000
        for name in os.listdir(mnt / f"batch{n}"):
            os.lstat(mnt / f"batch{n}" / name)
        _drop_caches()

    cycle(0)
    cycle(1)
    base = _rss_kib(pid)
    for n in range(2, 6):
        cycle(n)
    grown = _rss_kib(pid) - base
    # 12000 lookups of new objects that were all forgotten; a leak of a node per object would be several MiB
    assert grown < 4096, f"server grew by {grown} KiB over 12000 forgotten lookups"

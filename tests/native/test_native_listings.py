"""Cached listings are never stale: against kernel overlayfs, a directory is listed, changed through another name
(a symbolic link to it, its parent renamed, a hard link's other name) by another process, and listed again.

Runs in the mode the environment gives (``UNIONFS_DIFF_OPTIONS=nonative`` or ``UNIONFS_NATIVE=off``: pure); in
the native mode each test also checks, from the shim's counters, that the kernel did cache listings (else the
test would prove nothing about them).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "kernel"))

from kernel_diff import (  # noqa: E402
    EXTRA_OPTIONS,
    HARDLINK_LOWERS,
    IMPL,
    STD_LOWERS,
    Dir,
    File,
    Hardlink,
    Layer,
    StackPair,
    build_template,
    fuse_unavailable,
    kernel_overlay_unavailable,
    raw_readdir,
)

pytestmark = pytest.mark.kernel

NATIVE = (IMPL == "unionfs" and "nonative" not in EXTRA_OPTIONS.split(",")
          and os.environ.get("UNIONFS_NATIVE", "").lower() not in ("off", "0", "no", "pure"))

#: a stack with a merged directory (names in two lowers, a whiteout, an opaque subdirectory) and a subtree
LOWERS: tuple[Layer, ...] = (
    {**STD_LOWERS[0], "m/a": "a from l1\n", "m/sub": Dir(), "m/sub/x": "x\n"},
    {**STD_LOWERS[1], "m/b": "b from l2\n", "m/gone": "removed through the mount\n", "m/lowdir": Dir(),
     "m/lowdir/y": "y\n"},
    STD_LOWERS[2],
)


@pytest.fixture(scope="module")
def ready(tmp_path_factory: pytest.TempPathFactory) -> None:
    why = kernel_overlay_unavailable(tmp_path_factory.mktemp("probe")) or fuse_unavailable()
    if why is not None:
        pytest.skip(why)
    if NATIVE and not (Path(__file__).resolve().parent.parent.parent / "unionfs" / "_native").glob("_shim*.so"):
        pytest.skip("the native part is not built (python setup.py build_ext --inplace)")


@pytest.fixture
def make(tmp_path: Path, ready: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., StackPair]]:
    """``make(lowers)``: a mounted pair whose unionfs server writes the shim's counters to ``pair.stats``."""
    pairs: list[StackPair] = []

    def _make(lowers: tuple[Layer, ...] = LOWERS) -> StackPair:
        base = tmp_path / f"pair{len(pairs)}"
        base.mkdir()
        stats = base / "native.stats"
        monkeypatch.setenv("UNIONFS_NATIVE_STATS", str(stats))  # (read by the shim in the server)
        pair = StackPair(base, build_template(base / "template", lowers))
        pairs.append(pair)
        pair.mount()
        pair.stats = stats  # type: ignore[attr-defined]
        return pair

    yield _make
    problems = [p for pair in reversed(pairs) for p in pair.close()]
    assert not problems, problems


def listing(path: Path) -> list[tuple[str, str, bool]]:
    """(name, d_type, whether d_ino is the inode number lstat gives) of every entry but the dots."""
    out = []
    for name, kind, ino in raw_readdir(path):
        if name in (".", ".."):
            continue
        try:
            same = os.lstat(path / name).st_ino == ino
        except FileNotFoundError:
            same = False
        out.append((name, kind, same))
    return sorted(out)


def elsewhere(script: str, *args: str | Path) -> None:
    """Run ``script`` (Python, with ``sys.argv[1:]`` = ``args``) in another process."""
    r = subprocess.run([sys.executable, "-c", "import os, sys\n" + script, *map(str, args)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def check(pair: StackPair, rel: str, what: str) -> None:
    k, u = (listing(root / rel) for root in pair.roots)
    assert k == u, f"{what}: listing of {rel}: kernel={k!r} unionfs={u!r}" + pair.context()


def native_stats(pair: StackPair) -> dict[str, int]:
    """The shim's counters (after the unmount)."""
    pair.unmount_all()
    lines = pair.stats.read_text().splitlines()  # type: ignore[attr-defined]
    return {k: int(v) for k, v in (line.split(" ", 1) for line in lines)}


def cached_listings(pair: StackPair) -> int:
    """How many directory opens let the kernel cache the listing (after the unmount): replies to OPENDIR with
    cache_readdir, or, with open-less directories, READDIR requests of directories the kernel opened itself
    (with cache_readdir, its default then)."""
    stats = native_stats(pair)
    return stats["dir_cached"] + (stats["dir_openless"] if stats["opendir_enosys"] else 0)


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_GETDENTS64 = 217  # (x86_64)


def getdents(fd: int, size: int = 1024) -> list[str]:
    """One getdents64(2) call on ``fd`` with a ``size``-byte buffer: the names it returned ([] at the end)."""
    buf = ctypes.create_string_buffer(size)
    n = _libc.syscall(_SYS_GETDENTS64, fd, buf, size)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    names, at, raw = [], 0, buf.raw[:n]
    while at < n:
        reclen = struct.unpack_from("<H", raw, at + 16)[0]
        names.append(os.fsdecode(raw[at + 19:at + reclen].split(b"\0", 1)[0]))
        at += reclen
    return names


CHANGES = [
    ("create", "open(os.path.join(sys.argv[1], 'new'), 'w').write('n')"),
    ("unlink a lower file (whiteout)", "os.unlink(os.path.join(sys.argv[1], 'gone'))"),
    ("mkdir", "os.mkdir(os.path.join(sys.argv[1], 'newdir'))"),
    ("rmdir of a lower directory emptied first",
     "os.unlink(os.path.join(sys.argv[1], 'lowdir', 'y')); os.rmdir(os.path.join(sys.argv[1], 'lowdir'))"),
    ("rename inside", "os.rename(os.path.join(sys.argv[1], 'a'), os.path.join(sys.argv[1], 'a2'))"),
    ("rename out", "os.rename(os.path.join(sys.argv[1], 'b'), os.path.join(sys.argv[1], '..', 'b-out'))"),
    ("rename in", "os.rename(os.path.join(sys.argv[1], '..', 'top.txt'), os.path.join(sys.argv[1], 'top'))"),
    ("symlink", "os.symlink('a2', os.path.join(sys.argv[1], 'ln'))"),
    ("link", "os.link(os.path.join(sys.argv[1], 'top'), os.path.join(sys.argv[1], 'hard'))"),
    ("mknod", "os.mkfifo(os.path.join(sys.argv[1], 'fifo'))"),
    ("copy-up of a file", "open(os.path.join(sys.argv[1], 'hard'), 'a').write('more')"),
    ("copy-up of a subdirectory", "os.chmod(os.path.join(sys.argv[1], 'sub'), 0o700)"),
    ("rmdir then mkdir (opaque)",
     "os.unlink(os.path.join(sys.argv[1], 'sub', 'x')); os.rmdir(os.path.join(sys.argv[1], 'sub'));"
     "os.mkdir(os.path.join(sys.argv[1], 'sub'))"),
]


def test_listing_follows_changes_through_a_symlink_by_another_process(make: Callable[..., StackPair]) -> None:
    pair = make()
    for root in pair.roots:
        os.symlink("m", root / "alias")
    check(pair, "m", "before")
    check(pair, "m", "listed again")
    for what, script in CHANGES:
        for root in pair.roots:
            elsewhere(script, root / "alias")
        check(pair, "m", what)
        check(pair, "m/sub", what) if what.startswith("rmdir then") else None
    if NATIVE:
        assert cached_listings(pair) > 0


def test_listing_kept_open_follows_changes_by_another_process(make: Callable[..., StackPair]) -> None:
    """A directory held open across the changes and read again from its start (rewinddir), as ``ls`` in a
    loop or a file manager does."""
    pair = make()
    fds = [os.open(root / "m", os.O_RDONLY | os.O_DIRECTORY) for root in pair.roots]
    try:
        for what, script in CHANGES[:6]:
            for root in pair.roots:
                elsewhere(script, root / "m")
            k, u = (sorted(os.listdir(fd)) for fd in fds)  # (os.listdir(fd) reads from the start)
            assert k == u, f"{what}: kernel={k!r} unionfs={u!r}" + pair.context()
    finally:
        for fd in fds:
            os.close(fd)
    if NATIVE:
        assert cached_listings(pair) > 0


def test_listing_follows_changes_under_a_renamed_parent(make: Callable[..., StackPair]) -> None:
    """The directory listed as n/q is changed, by another process, as r/q after its parent was renamed (a
    directory made through the mount: a merged one is not renamed, EXDEV)."""
    pair = make()
    for root in pair.roots:
        (root / "n" / "q").mkdir(parents=True)
        for name in ("one", "two"):
            (root / "n" / "q" / name).write_text(name)
    check(pair, "n/q", "before")
    for root in pair.roots:
        elsewhere("os.rename(sys.argv[1], sys.argv[2])", root / "n", root / "r")
        elsewhere("open(os.path.join(sys.argv[1], 'later'), 'w').close(); os.unlink(os.path.join(sys.argv[1], "
                  "'one'))", root / "r" / "q")
    check(pair, "r/q", "after the parent's rename and changes inside")
    if NATIVE:
        assert cached_listings(pair) > 0


def test_listing_follows_a_copy_up_that_breaks_a_lower_hard_link(make: Callable[..., StackPair]) -> None:
    """dir/hl3 and hl1 are one lower inode; a write to hl1 copies it up and breaks the link: dir/hl3 now names the
    lower file, another inode, and dir's listing (never changed itself) must give it that inode's number."""
    pair = make(HARDLINK_LOWERS)
    check(pair, "dir", "before")
    check(pair, "", "before")
    for root in pair.roots:
        elsewhere("open(sys.argv[1], 'a').write('through hl1')", root / "hl1")
    check(pair, "dir", "after the copy-up")
    check(pair, "", "after the copy-up")
    if NATIVE:
        assert cached_listings(pair) > 0


def test_listing_follows_a_second_link_breaking_copy_up(make: Callable[..., StackPair]) -> None:
    """Two lower hard links with a name in dir each, broken one after the other, dir listed between: the second
    copy-up must drop dir's listing too (each listing served is remembered as one the kernel may keep)."""
    l1, l2, l3 = HARDLINK_LOWERS
    l2 = {**l2, "k1": File(b"second link in l2\n"), "dir/k3": Hardlink("k1")}
    pair = make((l1, l2, l3))
    check(pair, "dir", "before")
    for n, name in enumerate(("hl1", "k1")):
        for root in pair.roots:
            elsewhere("open(sys.argv[1], 'a').write('through it')", root / name)
        check(pair, "dir", f"after copy-up {n + 1} (of {name})")
    if NATIVE:
        assert cached_listings(pair) > 0


def test_listing_follows_a_link_breaking_copy_up_when_the_kernel_forgot_the_names(
        make: Callable[..., StackPair]) -> None:
    """As above, with the kernel's dentries of dir's names dropped before the copy-up (memory pressure; here
    drop_caches) while dir stays open: the server's invalidation of the name then finds nothing to drop, and only
    the invalidation of dir's listing keeps it right."""
    pair = make(HARDLINK_LOWERS)
    fds = [os.open(root / "dir", os.O_RDONLY | os.O_DIRECTORY) for root in pair.roots]
    try:
        check(pair, "dir", "before")
        names = [name for name, _kind, _ino in raw_readdir(pair.unionfs.root / "dir")]
        assert "hl3" in names
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("2")
        for root in pair.roots:
            elsewhere("open(sys.argv[1], 'a').write('through hl1')", root / "hl1")
        check(pair, "dir", "after the copy-up")
    finally:
        for fd in fds:
            os.close(fd)
    if NATIVE:
        assert cached_listings(pair) > 0


@pytest.mark.skipif(platform.machine() != "x86_64", reason="getdents64's number is x86_64's")
def test_listings_in_progress_list_each_name_once(make: Callable[..., StackPair]) -> None:
    """Two listings of one directory read a little at a time, a name created between their reads: each lists
    every name that was there exactly once, as on the kernel (a directory opened without OPENDIR has no handle:
    where a listing in progress stands is the position of the last name it had); one read from the start again
    sees the new name."""
    names = {f"m/n{i:03d}-{'x' * 40}": "" for i in range(200)}
    pair = make(({**LOWERS[0], **names}, *LOWERS[1:]))
    for root in pair.roots:
        d = root / "m"
        held = set(os.listdir(d)) | {".", ".."}
        assert {os.path.basename(n) for n in names} <= held
        a = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        b = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            got_a, got_b = getdents(a), getdents(b)
            assert got_a and got_b
            elsewhere("open(os.path.join(sys.argv[1], 'created'), 'w').close()", d)
            got_a += getdents(a)
            c = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                got_c = [n for chunk in iter(lambda: getdents(c), []) for n in chunk]  # noqa: B023
            finally:
                os.close(c)
            for fd, got in ((a, got_a), (b, got_b)):
                while chunk := getdents(fd):
                    got += chunk
        finally:
            os.close(a)
            os.close(b)
        for what, got in (("first", got_a), ("second", got_b)):
            assert len(got) == len(set(got)), f"{root}: the {what} listing repeats names"
            assert set(got) - {"created"} == held, (
                f"{root}: the {what} listing is not what the directory held: {sorted(set(got) ^ held)}")
        assert "created" in got_c, root
    if NATIVE:
        assert cached_listings(pair) > 0

"""unionfs.image._diff: an upper directory written as an OCI layer tar, checked by applying it back, against
the kernel's overlayfs, and for byte-identical output."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from layers import MTIME, Entry, blkdev, build, chrdev, dir_, fifo, hard, reg, sym, tree  # noqa: E402

from unionfs.image import LayerError, apply_layer  # noqa: E402
from unionfs.image._diff import DiffError, DiffResult, compression_for, write_diff, write_diff_file  # noqa: E402
from unionfs.ownership import OVERRIDE_XATTR  # noqa: E402
from unionfs.whiteout import XattrFormat, make_whiteout, set_opaque  # noqa: E402

T = XattrFormat.TRUSTED
U = XattrFormat.USER
COMPS = ["none", "gzip", "zstd"]
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (devices, trusted xattrs, kernel mounts)")
CAP = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)


@pytest.fixture
def top() -> Iterator[Path]:
    t = Path(tempfile.mkdtemp(prefix="unionfs-diff-test-"))
    yield t
    shutil.rmtree(t)


def fresh(top: Path, name: str) -> Path:
    p = top / name
    p.mkdir()
    return p


def diff(upper: Path, **kw: Any) -> tuple[bytes, DiffResult]:
    kw.setdefault("fmt", T)
    buf = io.BytesIO()
    res = write_diff(bytes(upper), buf, **kw)
    return buf.getvalue(), res


def plain(data: bytes) -> bytes:
    if data.startswith(b"\x1f\x8b"):
        return zlib.decompress(data, wbits=31)
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        return zstandard.ZstdDecompressor().decompress(data)
    return data


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(plain(data)), mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
        return tf.getmembers()


def apply(data: bytes, root: Path, fmt: XattrFormat = T, rootless: bool = False) -> None:
    apply_layer(io.BytesIO(data), bytes(root), fmt=fmt, rootless=rootless)


def every_kind(devices: bool = True) -> list[Entry]:
    """A layer with every entry kind, each directory listed (so that every mtime comes from the layer)."""
    odd = b"caf\xe9".decode("utf-8", "surrogateescape")
    long = "d/" + "n" * 120
    entries = [
        dir_("d", mode=0o755),
        reg("d/f", b"data" * 1000, mode=0o644, uid=1000, gid=1000, xattrs={"user.comment": b"hi"}),
        reg("d/su", b"\x7fELF", mode=0o4755),
        reg("d/sg", b"", mode=0o2711, gid=50),
        reg("d/ping", b"x", mode=0o755, xattrs={"security.capability": CAP}),
        reg("d/private", b"p", mode=0o000),
        hard("d/f-link", "d/f"),
        reg(long, b"long"),
        reg("d/" + odd, b"latin-1"),
        sym("d/abs", "/etc/passwd"),
        sym("d/rel", "../d/f"),
        sym("d/odd-target", odd),
        fifo("d/fifo", mode=0o644),
        dir_("tmp", mode=0o1777),
        dir_("home", mode=0o755),
        dir_("home/u", mode=0o500, uid=7, gid=8),
        reg("home/u/.profile", b"x" * 70_000, mode=0o600, uid=7, gid=8),
        reg(".wh.gone"),
        reg("d/.wh.also-gone"),
        dir_("o", mode=0o750),
        reg("o/.wh..wh..opq"),
        reg("o/kept", b"k"),
        reg("big-ids", b"", uid=3_000_000, gid=4_000_000),
    ]
    if devices:
        entries += [chrdev("d/null", 1, 3), blkdev("d/loop", 7, 0)]
    return entries


def normal(m: tarfile.TarInfo) -> tuple[object, ...]:
    """What an entry says, markers reduced to their names."""
    name = m.name.rstrip("/")
    if os.path.basename(name).startswith(".wh."):
        return (name, "marker")
    if m.islnk():
        return (name, m.type, m.linkname)
    xattrs = sorted((k, v) for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr."))
    dev = (m.devmajor, m.devminor) if m.ischr() or m.isblk() else None
    return (name, m.type, m.mode, m.uid, m.gid, m.size, int(m.mtime), m.linkname, dev, xattrs)


# -- round trips --------------------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("comp", COMPS)
def test_round_trip_trusted(top: Path, comp: str) -> None:
    layer = build(every_kind())
    a, b = fresh(top, "a"), fresh(top, "b")
    applied = apply_layer(io.BytesIO(layer), bytes(a), fmt=T, rootless=False)
    d1, r1 = diff(a, compression=comp)
    apply(d1, b)
    assert tree(b) == tree(a)
    d2, r2 = diff(b, compression=comp)
    assert d2 == d1
    assert r1 == r2
    tar = plain(d1)
    assert r1.digest == "sha256:" + hashlib.sha256(d1).hexdigest() and r1.size == len(d1)
    assert r1.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest() and r1.uncompressed_size == len(tar)
    assert r1.compression == comp
    assert (r1.whiteouts, r1.opaque_dirs) == (applied.whiteouts, applied.opaque_dirs) == (2, 1)
    assert r1.entries == len(members(d1)) == applied.entries
    assert r1.bytes == applied.bytes
    assert {normal(m)[0]: normal(m) for m in members(d1)} == {normal(ti)[0]: normal(ti) for ti, _ in every_kind()}
    assert f"{r1.whiteouts} whiteouts" in r1.summary() and r1.digest in r1.summary()


@pytest.mark.parametrize("comp", COMPS)
def test_round_trip_rootless_overrides(top: Path, comp: str) -> None:
    """apply(rootless) then diff(overrides) gives the layer's entries back, devices included."""
    entries = every_kind(devices=ROOT) if ROOT else [e for e in every_kind(False) if e[0].uid == os.geteuid()]
    layer = build(entries)
    a, b = fresh(top, "a"), fresh(top, "b")
    apply(layer, a, U, rootless=True)
    d1, r1 = diff(a, fmt=U, compression=comp, overrides=True)
    want = {normal(ti)[0]: normal(ti) for ti, _ in entries}
    got = {normal(m)[0]: normal(m) for m in members(d1)}
    assert got == want
    apply(d1, b, U, rootless=True)
    assert tree(b) == tree(a)
    d2, _ = diff(b, fmt=U, compression=comp, overrides=True)
    assert d2 == d1


@needs_root
def test_without_overrides_the_disk_is_written(top: Path) -> None:
    a = fresh(top, "a")
    apply(build([reg("f", b"1", mode=0o4750, uid=1000, gid=5), chrdev("null", 1, 3)]), a, U, rootless=True)
    data, _ = diff(a, fmt=U, compression="none")
    by = {m.name: m for m in members(data)}
    assert (by["f"].uid, by["f"].gid, by["f"].mode) == (0, 0, 0o4750 | 0o600)
    assert by["null"].isreg() and by["null"].size == 0
    assert not any(OVERRIDE_XATTR.decode() in k for m in by.values() for k in m.pax_headers)


def test_malformed_override_refused(top: Path) -> None:
    a = fresh(top, "a")
    (a / "f").write_bytes(b"")
    os.setxattr(a / "f", OVERRIDE_XATTR, b"0:0:0644:pipe-1-2")
    with pytest.raises(DiffError, match="/f.*malformed"):
        diff(a, fmt=U, overrides=True)
    data, _ = diff(a, fmt=U, overrides=False)
    assert [m.name for m in members(data)] == ["f"]


# -- the entries written ------------------------------------------------------------------------------


@needs_root
def test_entry_format_and_order(top: Path) -> None:
    a = fresh(top, "a")
    apply(build([dir_("b"), reg("b/x"), dir_("a-"), reg("a-/y"), dir_("a"), reg("a/-z"), reg("a/.wh..wh..opq")]), a)
    (a / "a" / "sub").mkdir()
    os.utime(a / "a" / "sub", ns=(0, MTIME * 10**9 + 999_999_999))
    fd = os.open(a / "b", os.O_PATH)
    try:
        make_whiteout(b"gone", fd)
    finally:
        os.close(fd)
    os.setxattr(a / "a", "user.z", b"2")
    os.setxattr(a / "a", "user.a", b"1")
    os.setxattr(a / "a", "trusted.overlay.origin", b"whatever")
    os.setxattr(a / "b" / "x", "user.overlay.redirect", b"/elsewhere")  # another format's marker: dropped
    ms = members(diff(a, compression="none", source_date_epoch=5)[0])
    assert [m.name for m in ms] == ["a", "a/.wh..wh..opq", "a/-z", "a/sub", "a-", "a-/y", "b", "b/.wh.gone", "b/x"]
    by = {m.name: m for m in ms}
    assert by["a"].isdir() and by["a"].pax_headers == {"SCHILY.xattr.user.a": "1", "SCHILY.xattr.user.z": "2"}
    assert list(by["a"].pax_headers) == sorted(by["a"].pax_headers)
    for marker in ("a/.wh..wh..opq", "b/.wh.gone"):
        m = by[marker]
        assert (m.type, m.mode, m.uid, m.gid, m.size, m.mtime, m.uname, m.gname) == (
            tarfile.REGTYPE,
            0,
            0,
            0,
            0,
            5,
            "",
            "",
        )
    assert by["a/sub"].mtime == 5  # clamped
    assert by["b/x"].mtime == 5 and by["b/x"].pax_headers == {}
    raw = plain(diff(a, compression="none")[0])
    assert raw.endswith(bytes(1024)) and len(raw) % 512 == 0
    headers = [raw[i : i + 512] for i in range(0, len(raw), 512) if raw[i + 257 : i + 262] == b"ustar"]
    names = [h[:100].rstrip(b"\0") for h in headers if h[156:157] != tarfile.XHDTYPE]
    assert names[:4] == [b"a/", b"a/.wh..wh..opq", b"a/-z", b"a/sub/"] and b"b/x" in names
    assert not any(n.startswith((b"./", b"/")) for n in names)
    assert all(h[265:297] == bytes(32) and h[297:329] == bytes(32) for h in headers)  # empty uname, gname
    sub = {m.name: m for m in members(diff(a, compression="none")[0])}["a/sub"]
    assert sub.mtime == MTIME and sub.pax_headers == {}  # whole seconds, no PAX record


def test_source_date_epoch(top: Path) -> None:
    a = fresh(top, "a")
    for name, t in (("old", 1000), ("new", 3000), ("same", 2000)):
        (a / name).write_bytes(b"")
        os.utime(a / name, (t, t))
    got = {m.name: m.mtime for m in members(diff(a, compression="none", source_date_epoch=2000)[0])}
    assert got == {"old": 1000, "new": 2000, "same": 2000}
    data = diff(a, compression="none")[0]
    assert {m.name: m.mtime for m in members(data)} == {"old": 1000, "new": 3000, "same": 2000}
    os.symlink(a, top / "link")
    assert diff(top / "link", compression="none")[0] == data  # the upper itself may be reached through a symlink


@needs_root
def test_hard_links(top: Path) -> None:
    a, outside = fresh(top, "a"), fresh(top, "outside")
    (a / "z").write_bytes(b"one inode")
    os.link(a / "z", a / "b")
    os.link(a / "z", a / "m")
    (a / "lonely").write_bytes(b"x")
    os.link(a / "lonely", outside / "other-name")  # its other name is not in the upper
    os.symlink("t", a / "s1")
    os.link(a / "s1", a / "s2", follow_symlinks=False)
    fd = os.open(a, os.O_PATH)
    try:
        make_whiteout(b"w1", fd)
    finally:
        os.close(fd)
    os.link(a / "w1", a / "w2")  # the kernel shares one whiteout inode
    ms = {m.name: m for m in members(diff(a, compression="none")[0])}
    assert ms["b"].isreg() and ms["b"].size == 9
    assert ms["m"].islnk() and ms["m"].linkname == "b" and ms["z"].islnk() and ms["z"].linkname == "b"
    assert ms["lonely"].isreg() and ms["lonely"].size == 1
    assert ms["s1"].issym() and ms["s2"].islnk() and ms["s2"].linkname == "s1"
    assert ms[".wh.w1"].isreg() and ms[".wh.w2"].isreg()
    b = fresh(top, "b")
    apply(diff(a)[0], b)
    assert os.stat(b / "b").st_ino == os.stat(b / "z").st_ino == os.stat(b / "m").st_ino
    assert os.stat(b / "b").st_nlink == 3


def test_sockets_skipped(top: Path) -> None:
    a = fresh(top, "a")
    (a / "f").write_bytes(b"1")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(a / "sock"))
        data, res = diff(a, compression="none")
    assert [m.name for m in members(data)] == ["f"]
    assert res.skipped == 1 and res.entries == 1 and "1 sockets skipped" in res.summary()


@needs_root
def test_xattr_whiteouts_in_own_format_only(top: Path) -> None:
    for fmt, other in ((U, T), (T, U)):
        a = fresh(top, f"a-{fmt.value}")
        d = a / "d"
        d.mkdir()
        (d / "gone").write_bytes(b"")
        (d / "real").write_bytes(b"")
        os.setxattr(d, fmt.opaque, b"x")
        os.setxattr(d / "gone", fmt.whiteout, b"")
        (a / "e").mkdir()
        (a / "e" / "plain-empty").write_bytes(b"")
        os.setxattr(a / "e" / "plain-empty", fmt.whiteout, b"")  # its directory is not marked: a file
        names = [m.name for m in members(diff(a, fmt=fmt, compression="none")[0])]
        assert names == ["d", "d/.wh.gone", "d/real", "e", "e/plain-empty"]
        res = diff(a, fmt=other, compression="none")[1]
        names = [m.name for m in members(diff(a, fmt=other, compression="none")[0])]
        assert names == ["d", "d/gone", "d/real", "e", "e/plain-empty"] and res.whiteouts == 0


@needs_root
def test_opaque_root(top: Path) -> None:
    a = fresh(top, "a")
    apply(build([reg(".wh..wh..opq"), reg("f", b"1")]), a)
    data, res = diff(a, compression="none")
    assert [m.name for m in members(data)] == [".wh..wh..opq", "f"] and res.opaque_dirs == 1
    b = fresh(top, "b")
    apply(data, b)
    assert os.getxattr(b, T.opaque) == b"y"


@needs_root
@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda a: (os.mkdir(a / "d"), os.setxattr(a / "d", T.prefix + b"redirect", b"/x")), "/d.*redirect"),
        (lambda a: ((a / "f").write_bytes(b""), os.setxattr(a / "f", T.prefix + b"metacopy", b"")), "/f.*metacopy"),
        (lambda a: (os.mkdir(a / "d"), (a / "d" / ".wh.x").write_bytes(b"")), "/d/.wh.x.*whiteout"),
    ],
)
def test_refused(top: Path, make: Any, what: str) -> None:
    a = fresh(top, "a")
    make(a)
    with pytest.raises(DiffError, match=what):
        diff(a)
    assert issubclass(DiffError, LayerError)


# -- reproducibility ----------------------------------------------------------------------------------


def make_copy(root: Path, order: list[int]) -> None:
    """The same tree, created in the order ``order`` (different inodes, ctimes, atimes, directory order)."""
    items: list[tuple[str, bytes | None]] = [
        ("d", None),
        ("d/e", None),
        ("d/e/f", b"f" * 3000),
        ("d/g", b"g"),
        ("h", b"h" * 200_000),
        ("i", None),
        ("i/j", b""),
    ]
    for k in order:
        for name, data in items[k:] + items[:k]:
            p = root / name
            if p.exists():
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            if data is None:
                p.mkdir()
            else:
                p.write_bytes(data)
    for name in ["i/j", "d/g", "h"]:
        (root / name).read_bytes()  # an atime
    for name, _ in sorted(items, key=lambda x: -x[0].count("/")):
        os.utime(root / name, (12345, MTIME + len(name)))


@pytest.mark.parametrize("comp", COMPS)
def test_same_tree_same_bytes(top: Path, comp: str) -> None:
    a, b = fresh(top, "a"), fresh(top, "b")
    make_copy(a, [0, 3, 5])
    make_copy(b, [6, 2, 1, 4])
    assert {os.stat(a / n).st_ino for n in ("h", "d")} != {os.stat(b / n).st_ino for n in ("h", "d")}
    da, ra = diff(a, compression=comp)
    db, rb = diff(b, compression=comp)
    assert da == db and ra == rb
    os.utime(b / "h", (99999, MTIME + 100))
    assert diff(b, compression=comp)[0] != da


def test_gzip_and_zstd_headers(top: Path) -> None:
    a = fresh(top, "a")
    (a / "f").write_bytes(b"x" * 100_000)
    gz_data, _ = diff(a, compression="gzip")
    assert gz_data[3] == 0 and gz_data[4:8] == bytes(4)  # no name, no comment; mtime 0
    zst_data, res = diff(a, compression="zstd")
    params = zstandard.get_frame_parameters(zst_data)
    assert params.content_size == res.uncompressed_size


def test_same_bytes_in_another_process(top: Path) -> None:
    a = fresh(top, "a")
    make_copy(a, [0])
    here = diff(a, compression="gzip")[0]
    code = (
        "import sys, io; from unionfs.image._diff import write_diff; from unionfs.whiteout import XattrFormat;"
        "b = io.BytesIO(); write_diff(sys.argv[1].encode(), b, fmt=XattrFormat.TRUSTED);"
        "sys.stdout.buffer.write(b.getvalue())"
    )
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": repo, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, str(a)], capture_output=True, env=env, check=True).stdout
    assert out == here


# -- write_diff_file, errors --------------------------------------------------------------------------


def test_write_diff_file(top: Path) -> None:
    a = fresh(top, "a")
    (a / "f").write_bytes(b"content")
    for name, comp in (("l.tar", "none"), ("l.tar.gz", "gzip"), ("l.tgz", "gzip"), ("l.tar.zst", "zstd")):
        assert compression_for(top / name) == comp
        res = write_diff_file(bytes(a), top / name, fmt=T)
        data = (top / name).read_bytes()
        assert res.compression == comp and res.digest == "sha256:" + hashlib.sha256(data).hexdigest()
        assert [m.name for m in members(data)] == ["f"]
    with pytest.raises(ValueError, match="suffix"):
        write_diff_file(bytes(a), top / "l.bin", fmt=T)
    write_diff_file(bytes(a), top / "l.bin", fmt=T, compression="zstd")
    assert (top / "l.bin").read_bytes().startswith(b"\x28\xb5\x2f\xfd")
    before = (top / "l.tar").read_bytes()
    (a / ".wh.bad").write_bytes(b"")
    with pytest.raises(DiffError):
        write_diff_file(bytes(a), top / "l.tar", fmt=T)
    with pytest.raises(DiffError):
        write_diff_file(bytes(a), top / "new.tar", fmt=T)
    assert (top / "l.tar").read_bytes() == before and not (top / "new.tar").exists()
    assert not [p for p in os.listdir(top) if "partial" in p]


def test_vanished_file(top: Path) -> None:
    a = fresh(top, "a")
    for n in "abc":
        (a / n).write_bytes(n.encode() * 10)

    def remove(entries: int, _: int) -> None:
        if entries == 1:
            (a / "b").unlink()

    with pytest.raises(DiffError, match="/b.*vanished"):
        write_diff(bytes(a), io.BytesIO(), fmt=T, compression="none", progress=remove)


def test_tree_changed_between_zstd_walks(top: Path) -> None:
    a = fresh(top, "a")
    for n in "abc":
        (a / n).write_bytes(n.encode() * 10)

    def grow(entries: int, _: int) -> None:
        if entries == 1:
            (a / "c").write_bytes(b"c" * 5000)

    with pytest.raises(DiffError, match="changed"):
        write_diff(bytes(a), io.BytesIO(), fmt=T, compression="zstd", progress=grow)


def test_file_changed_while_read(top: Path) -> None:
    from unionfs.image._diff import _Copier, _Sink

    a = fresh(top, "a")
    (a / "f").write_bytes(b"12345")
    st = os.lstat(a / "f")
    (a / "f").write_bytes(b"123")
    os.utime(a / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
    fd = os.open(a, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(DiffError, match="/f.*changed"):
            _Copier().copy(_Sink(io.BytesIO(), "none", None), b"f", fd, b"f", st)
    finally:
        os.close(fd)


def test_progress_and_bad_compression(top: Path) -> None:
    a = fresh(top, "a")
    for n in "abc":
        (a / n).write_bytes(os.urandom(300_000))
    seen: list[tuple[int, int]] = []
    out = io.BytesIO()
    res = write_diff(bytes(a), out, fmt=T, progress=lambda n, b: seen.append((n, b)))
    assert [n for n, _ in seen] == [1, 2, 3]
    assert 300_000 < seen[0][1] < seen[1][1] < seen[2][1] == res.uncompressed_size - 1024
    with pytest.raises(ValueError, match="compression"):
        write_diff(bytes(a), io.BytesIO(), fmt=T, compression="xz")


# -- against the kernel -------------------------------------------------------------------------------


def merged(top: Path) -> dict[str, tuple[object, ...]]:
    """What a mount shows, with mtimes in whole seconds (a layer holds no more)."""
    out = {}
    for name, row in tree(top).items():
        mtime = row[4]
        out[name] = (*row[:4], mtime // 10**9 if isinstance(mtime, int) else None, *row[5:])
    return out


class Overlay:
    def __init__(self, top: Path) -> None:
        self.top = top
        self.mounted: list[Path] = []

    def mount(self, lowers: list[Path], name: str, upper: Path | None = None, fmt: XattrFormat = T) -> Path:
        target = fresh(self.top, name)
        opts = "lowerdir=" + ":".join(map(str, lowers)) + (",userxattr" if fmt is U else "")
        if upper is not None:
            work = fresh(self.top, name + "-work")
            opts += f",upperdir={upper},workdir={work},index=off"
            if fmt is T:  # userxattr turns both off by itself (and refuses redirect_dir=off)
                opts += ",redirect_dir=off,metacopy=off"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(target)], check=True)
        self.mounted.append(target)
        return target

    def umount(self, target: Path) -> None:
        subprocess.run(["umount", str(target)], check=True)
        self.mounted.remove(target)


@pytest.fixture
def overlay(top: Path) -> Iterator[Overlay]:
    ov = Overlay(top)
    yield ov
    for target in reversed(ov.mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


@needs_root
@pytest.mark.kernel
@pytest.mark.parametrize("fmt", [T, U])
def test_kernel_upper_to_layer_and_back(top: Path, overlay: Overlay, fmt: XattrFormat) -> None:
    base = [
        dir_("etc"),
        reg("etc/keep", b"k"),
        reg("etc/remove-me", b"r"),
        reg("etc/modify", b"old"),
        reg("etc/chmod", b"c", mode=0o644),
        dir_("tree"),
        dir_("tree/sub"),
        reg("tree/sub/f", b"f"),
        dir_("opq"),
        reg("opq/old", b"o"),
    ]
    lower = fresh(top, "lower")
    apply(build(base), lower, fmt)
    upper = fresh(top, "upper")
    m = overlay.mount([lower], "m1", upper, fmt)
    (m / "etc" / "remove-me").unlink()
    shutil.rmtree(m / "tree")
    shutil.rmtree(m / "opq")
    (m / "opq").mkdir()
    (m / "opq" / "new").write_bytes(b"n")
    (m / "etc" / "created").write_bytes(b"fresh")
    with open(m / "etc" / "modify", "ab") as f:
        f.write(b"+new")
    os.chmod(m / "etc" / "chmod", 0o600)
    seen = merged(m)
    overlay.umount(m)

    assert os.getxattr(upper / "opq", fmt.opaque) == b"y"
    data, res = diff(upper, fmt=fmt, compression="gzip")
    got = {x.name: x for x in members(data)}
    assert set(got) == {
        "etc",
        "etc/.wh.remove-me",
        "etc/chmod",
        "etc/created",
        "etc/modify",
        ".wh.tree",
        "opq",
        "opq/.wh..wh..opq",
        "opq/new",
    }
    order = [x.name for x in members(data)]
    assert order.index("opq/.wh..wh..opq") == order.index("opq") + 1
    assert got["etc/chmod"].mode == 0o600 and got["etc/modify"].size == len(b"old+new")
    assert (res.whiteouts, res.opaque_dirs) == (2, 1)
    assert not any("overlay" in k for x in got.values() for k in x.pax_headers)

    layer2 = fresh(top, "layer2")
    apply(data, layer2, fmt)
    m2 = overlay.mount([layer2, lower], "m2", fmt=fmt)
    assert merged(m2) == seen
    assert (m2 / "etc" / "modify").read_bytes() == b"old+new"
    overlay.umount(m2)


# -- random trees -------------------------------------------------------------------------------------

NAMES = ["a", "b", "c"]
node_st = st.recursive(
    st.one_of(
        st.tuples(st.just("F"), st.binary(max_size=20)),
        st.tuples(st.just("L"), st.sampled_from(["a", "../b", "/x"])),
        st.tuples(st.just("W"), st.none()),
    ),
    lambda kids: st.tuples(st.sampled_from(["D", "O"]), st.dictionaries(st.sampled_from(NAMES), kids, max_size=3)),
    max_leaves=10,
)
tree_st = st.dictionaries(st.sampled_from(NAMES), node_st, max_size=3)


def make_upper(root: Path, kids: dict[str, Any], fmt: XattrFormat, stamp: list[int]) -> None:
    fd = os.open(root, os.O_PATH)
    try:
        for name, (kind, body) in kids.items():
            p = root / name
            stamp[0] += 1
            if kind == "F":
                p.write_bytes(body)
                os.utime(p, (0, MTIME + stamp[0]))
            elif kind == "L":
                os.symlink(body, p)
                os.utime(p, (0, MTIME + stamp[0]), follow_symlinks=False)
            elif kind == "W":
                make_whiteout(name.encode(), fd)
            else:
                p.mkdir()
                make_upper(p, body, fmt, stamp)
                if kind == "O":
                    set_opaque(bytes(p), fmt)
                os.utime(p, (0, MTIME + stamp[0]))
    finally:
        os.close(fd)


@needs_root
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kids=tree_st, fmt=st.sampled_from([T, U]), comp=st.sampled_from(COMPS))
def test_random_trees(top: Path, kids: dict[str, Any], fmt: XattrFormat, comp: str) -> None:
    upper, back = top / "upper", top / "back"
    for p in (upper, back):
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir()
    make_upper(upper, kids, fmt, [0])
    data, res = diff(upper, fmt=fmt, compression=comp)
    apply(data, back, fmt)
    assert tree(back) == tree(upper)
    assert diff(back, fmt=fmt, compression=comp)[0] == data
    assert res.entries == len(members(data))


class Full(io.RawIOBase):
    """An output that fails once it holds ``room`` bytes."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.got = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = len(memoryview(b))
        if self.got + n > self.room:
            raise OSError(28, "No space left on device")
        self.got += n
        return n


@pytest.mark.parametrize("comp", COMPS)
def test_output_error_raised(top: Path, comp: str) -> None:
    a = fresh(top, "a")
    for i in range(12):
        (a / f"f{i}").write_bytes(os.urandom(1 << 20))
    with pytest.raises(OSError, match="No space"):
        write_diff(bytes(a), Full(3 << 20), fmt=T, compression=comp)  # type: ignore[arg-type]
    out = io.BytesIO()
    assert write_diff(bytes(a), out, fmt=T, compression=comp).size == len(out.getvalue())


def test_output_chunking_does_not_change_bytes(top: Path) -> None:
    """Reads of other sizes (short reads) give the same compressed bytes."""
    from unionfs.image import _diff

    a = fresh(top, "a")
    (a / "f").write_bytes(os.urandom(200_000) + b"abc" * 500_000)
    first = {c: diff(a, compression=c)[0] for c in COMPS}
    old = _diff._COPY
    try:
        _diff._COPY = 3000
        assert {c: diff(a, compression=c)[0] for c in COMPS} == first
    finally:
        _diff._COPY = old


@needs_root
@pytest.mark.kernel
def test_kernel_xattr_whiteouts(top: Path, overlay: Overlay) -> None:
    """A layer holding xattr whiteouts (kernel 6.7+ reads them in lower layers), diffed and applied back,
    shows the same through the kernel."""
    lower = fresh(top, "lower")
    apply(build([dir_("d"), reg("d/gone", b"g"), reg("d/kept", b"k"), reg("top-gone", b"t")]), lower)
    layer = fresh(top, "layer")
    (layer / "d").mkdir()
    os.setxattr(layer / "d", T.opaque, b"x")
    (layer / "d" / "gone").write_bytes(b"")
    os.setxattr(layer / "d" / "gone", T.whiteout, b"")
    (layer / "d" / "new").write_bytes(b"n")
    os.setxattr(layer, T.opaque, b"x")
    (layer / "top-gone").write_bytes(b"")
    os.setxattr(layer / "top-gone", T.whiteout, b"")
    m = overlay.mount([layer, lower], "m1")
    seen = merged(m)
    overlay.umount(m)
    if "gone" in str(seen):
        pytest.skip("this kernel does not read xattr whiteouts")
    data, res = diff(layer)
    assert {x.name for x in members(data)} == {"d", "d/.wh.gone", "d/new", ".wh.top-gone"} and res.whiteouts == 2
    back = fresh(top, "back")
    apply(data, back)
    m2 = overlay.mount([back, lower], "m2")
    assert merged(m2) == seen
    overlay.umount(m2)


text_st = st.text(st.sampled_from("ab/-\u00e9\udce9"), min_size=1, max_size=130)


@settings(max_examples=300, deadline=None)
@given(
    name=text_st,
    link=st.one_of(st.just(""), text_st),
    kind=st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]),
    ids=st.tuples(st.integers(0, 2**32 - 2), st.integers(0, 2**32 - 2)),
    size=st.sampled_from([0, 1, 8**11 - 1, 8**11, 2**40]),
    mtime=st.integers(-(2**40), 2**40),
    xattrs=st.dictionaries(st.sampled_from(["user.a", "security.capability"]), st.text(max_size=3), max_size=2),
)
def test_header_length_without_building(
    name: str, link: str, kind: bytes, ids: tuple[int, int], size: int, mtime: int, xattrs: dict[str, str]
) -> None:
    """The sizing walk's header lengths (zstd's content size) are those of the headers written."""
    from unionfs.image._diff import _header, _header_length

    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, (ti.uid, ti.gid), ti.size, ti.mtime = kind, link, ids, size, mtime
    ti.uname = ti.gname = ""
    ti.pax_headers = {"SCHILY.xattr." + k: v for k, v in xattrs.items()}
    assert _header_length(ti) == len(_header(ti))


@needs_root
@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_gnu_tar_reads_it(top: Path) -> None:
    a = fresh(top, "a")
    apply(build(every_kind()), a)
    (top / "l.tar").write_bytes(diff(a, compression="none")[0])
    proc = subprocess.run(["tar", "--xattrs", "-tvf", str(top / "l.tar")], capture_output=True, text=True)
    # tarfile marks records holding non-UTF-8 bytes (a name, a capability) hdrcharset=BINARY (POSIX): GNU tar
    # notes that it ignores the keyword, and takes the bytes as they are
    noise = [line for line in proc.stderr.splitlines() if "hdrcharset" not in line]
    assert proc.returncode == 0 and noise == []
    names = [line.split(" ", 5)[-1].split(" -> ")[0].split(" link to ")[0] for line in proc.stdout.splitlines()]
    assert len(names) == len(members((top / "l.tar").read_bytes()))
    x = fresh(top, "x")
    proc = subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "-xpf", str(top / "l.tar"), "-C", str(x)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert os.getxattr(x / "d" / "ping", "security.capability") == CAP
    assert os.path.exists(bytes(x / "d") + b"/caf\xe9") and (x / "d" / ("n" * 120)).read_bytes() == b"long"
    assert (x / "d" / "f").read_bytes() == (a / "d" / "f").read_bytes() and (x / "d" / "f").stat().st_nlink == 2

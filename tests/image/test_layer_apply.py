"""unionfs.image.apply_layer: entry types, whiteouts, opaque directories, confinement, hostile archives."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from layers import build, chrdev, dir_, fifo, gz, hard, listing, reg, shape, sym, zst  # noqa: E402

from unionfs.image import LayerError, apply_into_new, apply_layer  # noqa: E402
from unionfs.ownership import OVERRIDE_XATTR, decode_override  # noqa: E402
from unionfs.whiteout import XattrFormat, is_whiteout_stat  # noqa: E402

T = XattrFormat.TRUSTED


class Box:
    """/tmp/<dir>/root (the layer's directory) beside /tmp/<dir>/canary (what must never change)."""

    def __init__(self) -> None:
        self.top = Path(tempfile.mkdtemp(prefix="unionfs-layer-test-"))
        self.root = self.top / "root"
        self.root.mkdir()
        canary = self.top / "canary"
        (canary / "sub").mkdir(parents=True)
        (canary / "file").write_bytes(b"keep")
        os.symlink("file", canary / "link")
        self.before = listing(self.top, skip=self.root)

    def apply(self, data: bytes, **kw: object) -> object:
        kw.setdefault("fmt", T)
        kw.setdefault("rootless", False)
        return apply_layer(io.BytesIO(data), bytes(self.root), **kw)  # type: ignore[arg-type]

    def outside_unchanged(self) -> None:
        assert listing(self.top, skip=self.root) == self.before


@pytest.fixture
def box() -> Iterator[Box]:
    b = Box()
    yield b
    b.outside_unchanged()
    shutil.rmtree(b.top)


def every_type() -> list:
    return [
        dir_("etc/", mode=0o755),
        reg("etc/passwd", b"root:x:0:0\n", mode=0o644),
        reg("etc/shadow", b"secret", mode=0o640, uid=0, gid=42),
        reg("usr/bin/su", b"\x7fELF", mode=0o4755),
        dir_("usr/bin", mode=0o755),
        sym("usr/bin/sh", "/bin/busybox"),
        sym("rel", "etc/passwd"),
        hard("etc/passwd-", "etc/passwd"),
        fifo("run/fifo", mode=0o600),
        chrdev("dev/null", 1, 3),
        dir_("home/user", mode=0o700, uid=1000, gid=1000),
        reg("home/user/.profile", b"x" * 5000, mode=0o600, uid=1000, gid=1000),
        reg(
            "x-attr",
            b"",
            xattrs={"user.comment": b"hi", "trusted.overlay.opaque": b"y", "user.overlay.redirect": b"/x"},
        ),
        dir_("tmp", mode=0o1777),
    ]


@pytest.mark.parametrize("comp", ["none", "gzip", "zstd"])
def test_every_entry_type(box: Box, comp: str) -> None:
    tar = build(every_type())
    data = {"none": tar, "gzip": gz(tar), "zstd": zst(tar)}[comp]
    res = box.apply(data)
    r = box.root
    assert res.entries == len(every_type())
    assert res.compression == comp
    assert res.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert res.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert (r / "etc/passwd").read_bytes() == b"root:x:0:0\n"
    st = (r / "etc/shadow").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, 42)
    assert stat.S_IMODE((r / "usr/bin/su").stat().st_mode) == 0o4755
    assert os.readlink(r / "usr/bin/sh") == "/bin/busybox"
    assert os.readlink(r / "rel") == "etc/passwd"
    assert (r / "etc/passwd-").stat().st_ino == (r / "etc/passwd").stat().st_ino
    assert stat.S_ISFIFO((r / "run/fifo").lstat().st_mode)
    dev = (r / "dev/null").lstat()
    assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)
    home = (r / "home/user").stat()
    assert (stat.S_IMODE(home.st_mode), home.st_uid, home.st_gid) == (0o700, 1000, 1000)
    assert home.st_mtime_ns == 1_600_000_000 * 10**9  # set after its contents
    assert stat.S_IMODE((r / "tmp").stat().st_mode) == 0o1777
    assert os.getxattr(r / "x-attr", "user.comment") == b"hi"
    names = os.listxattr(r / "x-attr")
    assert not [n for n in names if ".overlay." in n]
    assert res.dropped_xattrs == 2
    assert res.bytes == len(b"root:x:0:0\n") + 6 + 4 + 5000


def test_same_tree_as_tar_x(box: Box) -> None:
    entries = [e for e in every_type() if e[0].name != "x-attr"]
    tar = build(entries)
    box.apply(tar)
    other = box.top / "tar-x"
    other.mkdir()
    subprocess.run(["tar", "-x", "-C", str(other), "--same-owner", "-p", "--numeric-owner"], input=tar, check=True)
    assert shape(box.root) == shape(other)
    shutil.rmtree(other)


def test_gnu_and_ustar_formats(box: Box) -> None:
    long = "d/" + "n" * 200
    box.apply(build([reg(long, b"1"), sym("d/s", "t" * 150)], fmt=tarfile.GNU_FORMAT))
    assert (box.root / long).read_bytes() == b"1"
    assert os.readlink(box.root / "d/s") == "t" * 150


def test_multi_member_gzip_and_multi_frame_zstd(box: Box) -> None:
    tar = build([reg(f"f{i}", b"%d" % i) for i in range(50)])
    res = box.apply(gz(tar[:7000]) + gz(tar[7000:]))
    assert res.entries == 50 and res.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    shutil.rmtree(box.root)
    box.root.mkdir()
    res = box.apply(zst(tar[:5000]) + zst(tar[5000:]))
    assert res.entries == 50 and (box.root / "f49").read_bytes() == b"49"


def test_whiteouts(box: Box) -> None:
    res = box.apply(build([reg("a/keep"), reg("a/gone"), reg("a/.wh.gone"), reg(".wh.lowerdir"), reg("b/.wh.x")]))
    assert res.whiteouts == 3
    for p in ("a/gone", "lowerdir", "b/x"):
        assert is_whiteout_stat((box.root / p).lstat()), p
    assert (box.root / "a/keep").exists()


def test_whiteout_of_directory_this_layer_made(box: Box) -> None:
    box.apply(build([dir_("d/sub"), reg("d/sub/f", b"x"), reg("d/.wh.sub")]))
    assert is_whiteout_stat((box.root / "d/sub").lstat())


def test_entry_after_its_whiteout_replaces_it(box: Box) -> None:
    box.apply(build([reg(".wh.f"), reg("f", b"new")]))
    assert (box.root / "f").read_bytes() == b"new"


@pytest.mark.parametrize("fmt", [XattrFormat.TRUSTED, XattrFormat.USER])
def test_opaque_keeps_siblings_before_and_after(box: Box, fmt: XattrFormat) -> None:
    res = box.apply(build([dir_("d"), reg("d/before"), reg("d/.wh..wh..opq"), reg("d/after")]), fmt=fmt)
    assert res.opaque_dirs == 1
    assert os.getxattr(box.root / "d", fmt.opaque) == b"y"
    assert sorted(os.listdir(box.root / "d")) == ["after", "before"]
    other = XattrFormat.USER if fmt is XattrFormat.TRUSTED else XattrFormat.TRUSTED
    assert fmt.opaque.decode() in os.listxattr(box.root / "d")
    assert other.opaque.decode() not in os.listxattr(box.root / "d")


def test_aufs_metadata_skipped(box: Box) -> None:
    box.apply(build([dir_(".wh..wh.plnk"), reg(".wh..wh.plnk/123.456"), reg("f")]))
    assert os.listdir(box.root) == ["f"]


def test_refuses_whiteout_as_directory(box: Box) -> None:
    refused(box, build([reg(".wh.a/b")]), "whiteout name as a directory")


def test_refuses_unsupported_type(box: Box) -> None:
    ti, _ = reg("vol")
    ti.type = b"V"
    refused(box, build([(ti, None)], fmt=tarfile.GNU_FORMAT), "unsupported entry type")


def test_symlink_followed_inside_root(box: Box) -> None:
    box.apply(
        build([dir_("usr/lib"), sym("lib", "/usr/lib"), reg("lib/x", b"1"), sym("up", "../../../.."), reg("up/y")])
    )
    assert (box.root / "usr/lib/x").read_bytes() == b"1"
    assert (box.root / "y").exists()


def test_symlink_replaced_by_directory_no_longer_followed(box: Box) -> None:
    box.apply(build([dir_("usr/lib"), sym("lib", "/usr/lib"), reg("lib/x"), dir_("lib"), reg("lib/y")]))
    assert (box.root / "usr/lib/x").exists() and (box.root / "lib/y").exists()
    assert not (box.root / "usr/lib/y").exists()


def test_symlink_already_in_root_followed_inside(box: Box) -> None:
    os.symlink(str(box.top / "canary"), box.root / "evil")
    box.apply(build([reg("evil/file", b"pwned"), reg("evil/sub/new")]))
    inside = box.root / str(box.top / "canary").lstrip("/")
    assert (inside / "file").read_bytes() == b"pwned"
    assert (inside / "sub/new").exists()


def test_absolute_and_dotted_names_relative_to_root(box: Box) -> None:
    box.apply(build([reg("/abs", b"1"), reg("./a/./b/../c", b"2")]))
    assert (box.root / "abs").read_bytes() == b"1"
    assert (box.root / "a/c").read_bytes() == b"2"


def test_directory_replaces_file_and_back(box: Box) -> None:
    box.apply(build([reg("x"), dir_("x"), reg("x/f"), sym("y", "/nowhere"), dir_("y")]))
    assert (box.root / "x/f").exists() and (box.root / "y").is_dir()


def test_read_only_dir_written_into(box: Box) -> None:
    box.apply(build([dir_("ro", mode=0o555), reg("ro/f", b"1"), dir_("none", mode=0o000), reg("none/g")]))
    assert stat.S_IMODE((box.root / "ro").stat().st_mode) == 0o555
    assert stat.S_IMODE((box.root / "none").stat().st_mode) == 0o000


def test_progress_called(box: Box) -> None:
    seen: list[tuple[int, int]] = []
    box.apply(build([reg("a"), reg("b")]), progress=lambda n, b: seen.append((n, b)))
    assert [n for n, _ in seen] == [1, 2]


# -- hostile archives ---------------------------------------------------------------------------------


def refused(box: Box, data: bytes, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        box.apply(data)


def test_refuses_dotdot_escape(box: Box) -> None:
    refused(box, build([reg("../../canary/file", b"pwned")]), "escapes the root")
    refused(box, build([reg("a/../../x")]), "escapes the root")


def test_refuses_hardlink_outside_or_missing(box: Box) -> None:
    refused(box, build([hard("l", "../canary/file")]), "escapes the root")
    refused(box, build([hard("l", str(box.top / "canary/file"))]), "does not exist|not an earlier entry")
    refused(box, build([hard("l", "nothere")]), "not an earlier entry")
    refused(box, build([sym("c", str(box.top / "canary")), hard("l", "c/file")]), "does not exist|not an earlier")


def test_refuses_hardlink_to_lower_content(box: Box) -> None:
    (box.root / "lowerfile").write_bytes(b"")
    refused(box, build([hard("l", "lowerfile")]), "not an earlier entry")


def test_refuses_hardlink_to_removed_entry(box: Box) -> None:
    refused(box, build([reg("f"), reg(".wh.f"), hard("l", "f")]), "no longer there|not an earlier")


@pytest.mark.parametrize("name", [".wh..", ".wh...", "d/.wh.", "d/.wh.."])
def test_refuses_whiteout_of_dot_dotdot_root(box: Box, name: str) -> None:
    refused(box, build([dir_("d"), reg(name)]), "whiteout")


def test_refuses_whiteout_through_symlink(box: Box) -> None:
    refused(box, build([sym("c", str(box.top / "canary")), reg("c/.wh.file")]), "symlink")
    refused(box, build([sym("d", "."), reg("d/.wh..wh..opq")]), "symlink")
    assert (box.top / "canary/file").read_bytes() == b"keep"


def test_refuses_non_directory_root_entry(box: Box) -> None:
    refused(box, build([reg("./")]), "names the root")


def test_refuses_truncated_tar(box: Box) -> None:
    tar = build([reg("a", b"x" * 3000), reg("b", b"y" * 100)])
    refused(box, tar[:1200], "truncated")  # inside a's data
    refused(box, tar[: 512 * 7 + 100], "truncated")  # inside b's header
    refused(box, tar[: 512 * 8 + 50], "truncated")  # inside b's data
    refused(box, tar[: 512 * 9], "truncated")  # no end-of-archive marker


def test_one_zero_block_at_the_end_accepted(box: Box) -> None:
    tar = build([reg("a", b"x")])
    box.apply(tar[: 3 * 512])
    assert (box.root / "a").read_bytes() == b"x"


def test_refuses_symlink_loop(box: Box) -> None:
    refused(box, build([sym("a", "b"), sym("b", "a"), reg("a/x")]), "too many levels of symlinks")


def test_refuses_entry_below_a_file(box: Box) -> None:
    refused(box, build([reg("f"), sym("l", "f"), reg("l/x")]), "not a directory")


def test_directory_over_directory_keeps_contents(box: Box) -> None:
    box.apply(build([dir_("d", mode=0o700), reg("d/f"), dir_("d", mode=0o750)]))
    assert (box.root / "d/f").exists() and stat.S_IMODE((box.root / "d").stat().st_mode) == 0o750


def test_refuses_out_of_range_fields(box: Box) -> None:
    ti, data = reg("big-uid")
    ti.pax_headers = {"uid": str(2**40)}
    refused(box, build([(ti, data)]), "out of range")
    ti, data = reg("nul")
    ti.pax_headers = {"path": "a\0b"}
    refused(box, build([(ti, data)]), "NUL")


def test_huge_mtime_clamped(box: Box) -> None:
    ti, data = reg("f")
    ti.pax_headers = {"mtime": "1e30"}
    box.apply(build([(ti, data)]))
    assert (box.root / "f").exists()


def test_refuses_corrupt_header(box: Box) -> None:
    tar = bytearray(build([reg("a", b"x"), reg("b", b"y")]))
    tar[1024 + 148] ^= 0xFF  # b's header checksum
    refused(box, bytes(tar), "corrupt tar")


def test_refuses_entry_larger_than_declared(box: Box) -> None:
    ti, _ = reg("a", b"")
    ti.size = 10
    raw = bytearray(build([(ti, b"0123456789")]))
    raw[512 : 512 + 600] = b"Z" * 600  # 600 bytes of data where 10 are declared
    refused(box, bytes(raw), "corrupt tar")


@pytest.mark.parametrize("comp", [gz, zst])
def test_refuses_truncated_compressed(box: Box, comp: object) -> None:
    data = comp(build([reg("a", os.urandom(50000))]))  # type: ignore[operator]
    refused(box, data[: len(data) - 20], "truncated")


def test_refuses_corrupt_gzip(box: Box) -> None:
    data = bytearray(gz(build([reg("a", os.urandom(5000))])))
    data[100:120] = b"\0" * 20
    refused(box, bytes(data), "corrupt gzip|truncated")


def test_refuses_garbage_and_empty(box: Box) -> None:
    refused(box, b"", "not a tar")
    refused(box, os.urandom(3000) + b"\0" * 10, "not a tar|corrupt")


def test_apply_into_new_renames_when_complete(box: Box) -> None:
    res = apply_into_new(io.BytesIO(build([reg("a", b"1")])), bytes(box.root), b"layer", fmt=T, rootless=False)
    assert (box.root / "layer/a").read_bytes() == b"1" and res.entries == 1
    assert os.listdir(box.root) == ["layer"]
    with pytest.raises(LayerError):
        apply_into_new(io.BytesIO(build([reg("b"), reg("../../x")])), bytes(box.root), b"bad", fmt=T, rootless=False)
    assert os.listdir(box.root) == ["layer"]
    with pytest.raises(FileExistsError):
        apply_into_new(io.BytesIO(build([reg("b")])), bytes(box.root), b"layer", fmt=T, rootless=False)
    assert os.listdir(box.root) == ["layer"]


# -- rootless -----------------------------------------------------------------------------------------


def override(p: Path) -> tuple[int, int, int] | None:
    try:
        return decode_override(os.getxattr(p, OVERRIDE_XATTR, follow_symlinks=False))
    except OSError:
        return None


def test_rootless_records_owners_and_devices(box: Box) -> None:
    res = box.apply(
        build(
            [
                reg("mine", b"1", mode=0o644),
                reg("other", b"2", mode=0o4750, uid=1000, gid=5),
                reg("private", b"", mode=0o000),
                dir_("d", mode=0o500, uid=7, gid=7),
                reg("d/f"),
                chrdev("null", 1, 3),
                sym("s", "x", uid=3),
            ]
        ),
        rootless=True,
        fmt=XattrFormat.USER,
    )
    r = box.root
    uid = os.geteuid()
    assert (r / "mine").stat().st_uid == uid and override(r / "mine") is None
    assert override(r / "other") == (1000, 5, 0o4750)
    assert (r / "other").stat().st_uid == uid
    assert override(r / "private") == (0, 0, 0o000)
    assert stat.S_IMODE((r / "private").stat().st_mode) == 0o600
    assert override(r / "d") == (7, 7, 0o500)
    assert stat.S_IMODE((r / "d").stat().st_mode) == 0o700
    assert stat.S_ISREG((r / "null").lstat().st_mode)
    assert os.getxattr(r / "null", OVERRIDE_XATTR) == b"0:0:0666:char-1-3"
    assert res.overrides == 4 and res.unrecorded == 1
    assert "4 owners/modes recorded" in res.summary()


def test_regression_rootless_directories_a_layer_implies_are_recorded_as_roots(
        box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ordinary user's apply of ``a/b/f`` with no entries for ``a`` and ``a/b`` makes them root's, 0755, as
    any extraction does, and records that (regression: they carried no override, so a mount reading overrides
    showed them as the user's own on-disk id, which an image mount maps to a subordinate id: the user could
    not create files in them)."""
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    box.apply(build([reg("a/b/f", b"x", uid=5, gid=5)]), rootless=True, fmt=XattrFormat.USER)
    assert override(box.root / "a") == (0, 0, 0o755) and override(box.root / "a/b") == (0, 0, 0o755)
    assert override(box.root / "a/b/f") == (5, 5, 0o644)


UNPRIV = """
import io, os, sys
sys.path[:0] = sys.argv[1].split(os.pathsep)
from unionfs.image import apply_layer
from unionfs.whiteout import XattrFormat
res = apply_layer(open(sys.argv[2], "rb"), os.fsencode(sys.argv[3]), fmt=XattrFormat.USER, rootless=True)
print(res.summary())
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_real_unprivileged_run(box: Box, others_python: tuple[str, str]) -> None:
    os.chmod(box.top, 0o755)
    os.chown(box.root, 65534, 65534)
    tar = box.top / "layer.tar"
    tar.write_bytes(
        build([reg("f", b"1", uid=1000), dir_("d", mode=0o555), reg("d/g"), chrdev("null", 1, 3), reg(".wh.gone")])
    )
    python, path = others_python
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            python,
            "-c",
            UNPRIV,
            path,
            str(tar),
            str(box.root),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert override(box.root / "f") == (1000, 0, 0o644)
    assert os.getxattr(box.root / "null", OVERRIDE_XATTR) == b"0:0:0666:char-1-3"
    assert is_whiteout_stat((box.root / "gone").lstat())
    assert "1 whiteouts" in proc.stdout
    tar.unlink()


def test_file_capability_survives_owner(box: Box) -> None:
    cap = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)
    box.apply(build([reg("ping", b"x", mode=0o755, uid=1000, gid=1000, xattrs={"security.capability": cap})]))
    assert os.getxattr(box.root / "ping", "security.capability") == cap
    assert (box.root / "ping").stat().st_uid == 1000


def test_non_utf8_names(box: Box) -> None:
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    box.apply(build([reg(name, b"1"), sym("l", name)]))
    assert os.listdir(bytes(box.root)) == [b"caf\xe9", b"l"] or sorted(os.listdir(bytes(box.root))) == [
        b"caf\xe9",
        b"l",
    ]
    assert os.readlink(bytes(box.root / "l")) == b"caf\xe9"


@pytest.mark.parametrize("comp", ["gzip", "zstd"])
def test_large_compressed_layer(box: Box, comp: str) -> None:
    big = os.urandom(300_000) + b"z" * 3_000_000
    tar = build([reg("big", big), reg("small", b"s"), reg("big2", big[::-1])])
    data = gz(tar) if comp == "gzip" else zst(tar)
    res = box.apply(data)
    assert (box.root / "big").read_bytes() == big and (box.root / "big2").read_bytes() == big[::-1]
    assert res.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert res.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert res.uncompressed_size == len(tar) and res.compressed_size == len(data)
    shutil.rmtree(box.root)
    box.root.mkdir()
    refused(box, data[: len(data) // 2], "truncated")


def test_removed_directory_mode_not_given_to_the_one_made_again(box: Box) -> None:
    box.apply(build([dir_("a/b", mode=0o700), reg("a"), dir_("a"), reg("a/b/y")]))
    assert stat.S_IMODE((box.root / "a/b").lstat().st_mode) == 0o755

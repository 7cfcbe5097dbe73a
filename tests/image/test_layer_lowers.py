"""unionfs.image.apply_layer over lower layers: names resolved in the merged view of the root over its lowers,
as if chrooted (lower symlinks followed inside the root, lower directories copied up, hard links to lower
files copied up), checked against fixed cases, the kernel's overlayfs with GNU tar, and a model."""

from __future__ import annotations

import io
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from layers import Entry, build, dir_, hard, listing, reg, sym  # noqa: E402

from unionfs.image import ApplyResult, LayerError, apply_into_new, apply_layer  # noqa: E402
from unionfs.ownership import OVERRIDE_XATTR, decode_override  # noqa: E402
from unionfs.whiteout import XattrFormat, is_whiteout_stat  # noqa: E402

T = XattrFormat.TRUSTED
U = XattrFormat.USER


class Stack:
    """Lower layers and an empty root in TOP/a/b, beside sentinel trees (TOP/usr/lib, TOP/a/usr/lib, TOP/etc)
    where an escaping resolution would land. Each lower is applied over the ones already made."""

    def __init__(self, fmt: XattrFormat = T, rootless: bool = False) -> None:
        self.fmt, self.rootless = fmt, rootless
        self.top = Path(tempfile.mkdtemp(prefix="unionfs-lowers-test-"))
        self.base = self.top / "a" / "b"
        self.root = self.base / "root"
        self.root.mkdir(parents=True)
        for sentinel in ("usr/lib", "a/usr/lib", "etc"):
            (self.top / sentinel).mkdir(parents=True)
        (self.top / "etc" / "passwd").write_bytes(b"outside")
        #: uppermost first
        self.lowers: list[Path] = []

    def lower(self, entries: list[Entry]) -> Path:
        path = self.base / f"L{len(self.lowers)}"
        path.mkdir()
        apply_layer(
            io.BytesIO(build(entries)), bytes(path), fmt=self.fmt, rootless=self.rootless, lowers=self.lower_args()
        )
        self.lowers.insert(0, path)
        return path

    def lower_args(self) -> list[bytes]:
        return [bytes(p) for p in self.lowers]

    def apply(self, entries: list[Entry]) -> ApplyResult:
        """Apply into the root; nothing else under TOP (the lowers, the sentinels) may change."""
        before = listing(self.top, skip=self.root)
        try:
            return apply_layer(
                io.BytesIO(build(entries)),
                bytes(self.root),
                fmt=self.fmt,
                rootless=self.rootless,
                lowers=self.lower_args(),
            )
        finally:
            assert listing(self.top, skip=self.root) == before

    def refused(self, entries: list[Entry], match: str) -> LayerError:
        with pytest.raises(LayerError, match=match) as info:
            self.apply(entries)
        return info.value

    def tree(self) -> set[str]:
        return set(listing(self.root))


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack()
    yield s
    shutil.rmtree(s.top)


# -- lower symlinks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/usr/lib", "usr/lib", "../../../usr/lib", "/../../usr/./lib/", "usr//lib/."])
def test_lower_symlink_followed_inside_the_root(stack: Stack, target: str) -> None:
    stack.lower([dir_("usr", mode=0o750, uid=5, gid=6, mtime=1_400_000_000), dir_("usr/lib", mode=0o711, uid=7)])
    stack.lower([sym("lib", target)])
    stack.apply([reg("lib/x", b"data", uid=9)])
    assert stack.tree() == {"usr", "usr/lib", "usr/lib/x"}
    assert (stack.root / "usr/lib/x").read_bytes() == b"data"
    usr, lib = (stack.root / "usr").lstat(), (stack.root / "usr/lib").lstat()
    assert (stat.S_IMODE(usr.st_mode), usr.st_uid, usr.st_gid, usr.st_mtime_ns) == (0o750, 5, 6, 1_400_000_000 * 10**9)
    lower_lib = (stack.lowers[1] / "usr/lib").lstat()
    assert (stat.S_IMODE(lib.st_mode), lib.st_uid, lib.st_mtime_ns) == (0o711, 7, lower_lib.st_mtime_ns)
    assert not (stack.root / "lib").exists()


@pytest.mark.parametrize("target", ["/../../etc", "../../../../etc", "/etc/../../../etc"])
def test_escaping_lower_symlink_stays_inside(stack: Stack, target: str) -> None:
    stack.lower([sym("conf", target)])
    stack.apply([reg("conf/passwd", b"inside")])
    assert stack.tree() == {"etc", "etc/passwd"}
    assert (stack.root / "etc/passwd").read_bytes() == b"inside"
    assert stat.S_IMODE((stack.root / "etc").lstat().st_mode) == 0o755


def test_symlink_chain_across_layers(stack: Stack) -> None:
    stack.lower([dir_("c", mode=0o701), sym("b", "c/")])
    stack.lower([sym("a", "b")])
    stack.apply([reg("a/x"), reg("a/y/z")])
    assert stack.tree() == {"c", "c/x", "c/y", "c/y/z"}
    assert stat.S_IMODE((stack.root / "c").lstat().st_mode) == 0o701


def test_layer_symlink_through_lower_symlink(stack: Stack) -> None:
    stack.lower([dir_("opt/real"), sym("opt/link", "real")])
    stack.apply([sym("here", "opt/link"), reg("here/f", b"1")])
    assert stack.tree() == {"here", "opt", "opt/real", "opt/real/f"}


@pytest.mark.parametrize("links", [[("p", "q"), ("q", "p")], [("p", "p/x")], [("p", "/p")]])
def test_symlink_loop_across_layers(stack: Stack, links: list[tuple[str, str]]) -> None:
    for name, target in links:
        stack.lower([sym(name, target)])
    err = stack.refused([reg("p/f")], "too many levels of symlinks")
    assert "p/f" in str(err)


def test_forty_links_followed_not_more(stack: Stack) -> None:
    stack.lower([dir_("d")] + [sym(f"l{i}", f"l{i + 1}") for i in range(40)] + [sym("l40", "d")])
    stack.apply([reg("l1/ok")])  # 40 links: l1 .. l40
    assert (stack.root / "d/ok").exists()
    stack.refused([reg("l0/f")], "too many levels of symlinks")


def test_whited_out_lower_symlink_not_followed(stack: Stack) -> None:
    stack.lower([dir_("d"), sym("s", "d")])
    stack.lower([reg(".wh.s")])
    stack.apply([reg("s/x")])
    assert stack.tree() == {"s", "s/x"}
    assert stat.S_ISDIR((stack.root / "s").lstat().st_mode)


def test_symlink_beneath_an_opaque_directory_not_seen(stack: Stack) -> None:
    stack.lower([dir_("t"), sym("o/link", "/t"), sym("o/other", "/t")])
    stack.lower([dir_("o"), reg("o/.wh..wh..opq"), sym("o/other", "/elsewhere")])
    stack.apply([reg("o/link/x"), reg("o/other/y")])
    assert stack.tree() == {"o", "o/link", "o/link/x", "elsewhere", "elsewhere/y"}
    # the copy of the opaque lower directory is not opaque itself
    assert T.opaque.decode() not in os.listxattr(stack.root / "o")


def test_xattr_whiteout_hides_a_lower_symlink(stack: Stack) -> None:
    stack.lower([dir_("t"), sym("z/w", "/t")])
    upper = stack.lower([dir_("z")])
    os.setxattr(upper / "z", T.opaque, b"x")
    (upper / "z/w").write_bytes(b"")
    os.setxattr(upper / "z/w", T.whiteout, b"")
    stack.apply([reg("z/w/x")])
    assert stack.tree() == {"z", "z/w", "z/w/x"}


def test_lower_file_is_not_a_directory(stack: Stack) -> None:
    stack.lower([reg("f"), sym("l", "f")])
    stack.refused([reg("f/x")], "'/f' is not a directory")
    stack.refused([reg("l/x")], "'/f' is not a directory")


def test_non_directory_hides_lower_directories(stack: Stack) -> None:
    stack.lower([dir_("d", mode=0o700), reg("d/old")])
    stack.lower([sym("d", "e")])
    stack.apply([reg("d/x")])
    assert stack.tree() == {"e", "e/x"}


def test_lower_symlink_read_once_per_directory(stack: Stack) -> None:
    """Many entries below a lower symlink: all land below its target, each parent made once."""
    stack.lower([dir_("usr/lib"), sym("lib", "usr/lib")])
    stack.apply([reg(f"lib/m{i}/f{j}") for i in range(20) for j in range(5)])
    assert len([p for p in stack.tree() if p.startswith("usr/lib/m")]) == 20 * 6
    assert not (stack.root / "lib").exists()


# -- the caches, when this layer hides a lower name ---------------------------------------------------


def test_layer_directory_replaces_lower_symlink(stack: Stack) -> None:
    stack.lower([dir_("usr/lib"), sym("lib", "usr/lib")])
    stack.apply([reg("lib/a"), dir_("lib"), reg("lib/b"), reg("lib/sub/c")])
    assert stack.tree() == {"usr", "usr/lib", "usr/lib/a", "lib", "lib/b", "lib/sub", "lib/sub/c"}


def test_layer_symlink_replaces_lower_symlink(stack: Stack) -> None:
    stack.lower([dir_("usr/lib"), dir_("opt"), sym("lib", "usr/lib")])
    stack.apply([reg("lib/a"), sym("lib", "opt"), reg("lib/b")])
    assert stack.tree() == {"usr", "usr/lib", "usr/lib/a", "lib", "opt", "opt/b"}


def test_layer_opaque_marker_hides_lower_symlink(stack: Stack) -> None:
    stack.lower([dir_("t"), sym("o/l", "/t")])
    stack.apply([reg("o/l/x"), reg("o/.wh..wh..opq"), reg("o/l/y")])
    assert stack.tree() == {"t", "t/x", "o", "o/l", "o/l/y"}


def test_layer_whiteout_of_lower_symlink_then_directory(stack: Stack) -> None:
    stack.lower([dir_("t"), sym("l", "t")])
    stack.apply([reg("l/x"), reg(".wh.l"), dir_("l"), reg("l/y")])
    assert stack.tree() == {"t", "t/x", "l", "l/y"}


def test_directory_over_own_whiteout_of_lower_directory_is_opaque(stack: Stack) -> None:
    stack.lower([dir_("d"), reg("d/old"), dir_("e"), reg("e/old")])
    stack.apply([reg(".wh.d"), dir_("d"), reg("d/new"), reg("e"), dir_("e"), reg("f"), dir_("f")])
    assert os.getxattr(stack.root / "d", T.opaque) == b"y"
    assert os.getxattr(stack.root / "e", T.opaque) == b"y"
    assert T.opaque.decode() not in os.listxattr(stack.root / "f")  # no lower f: nothing to hide


# -- copy-up of lower directories -----------------------------------------------------------------------


def test_lower_directory_metadata_copied(stack: Stack) -> None:
    lower = stack.lower([dir_("d", mode=0o700, uid=1234, gid=55, mtime=1_500_000_000), reg("d/old")])
    os.setxattr(lower / "d", "user.note", b"kept")
    os.setxattr(lower / "d", T.opaque, b"y")
    os.setxattr(lower / "d", "trusted.overlay.redirect", b"/x")
    stack.apply([reg("d/new", b"n")])
    st = (stack.root / "d").lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o700, 1234, 55, 1_500 * 10**15)
    assert os.getxattr(stack.root / "d", "user.note") == b"kept"
    assert not [n for n in os.listxattr(stack.root / "d") if n.startswith("trusted.overlay.")]
    assert stack.tree() == {"d", "d/new"}


def test_lower_directory_entry_keeps_the_layers_metadata(stack: Stack) -> None:
    stack.lower([dir_("d", mode=0o700, uid=1234), reg("d/old")])
    stack.apply([dir_("d", mode=0o755, uid=1), reg("d/new")])
    st = (stack.root / "d").lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 1)
    assert T.opaque.decode() not in os.listxattr(stack.root / "d")


def test_rootless_override_copied() -> None:
    s = Stack(U, rootless=True)
    try:
        lower = s.lower([dir_("d", mode=0o500, uid=1000, gid=1000), reg("d/old")])
        want = os.getxattr(lower / "d", OVERRIDE_XATTR)
        assert decode_override(want) == (1000, 1000, 0o500)
        res = s.apply([reg("d/new", uid=1000, gid=1000)])
        assert os.getxattr(s.root / "d", OVERRIDE_XATTR) == want
        assert stat.S_IMODE((s.root / "d").lstat().st_mode) == stat.S_IMODE((lower / "d").lstat().st_mode)
        assert res.overrides == 1  # d/new's owner; d's override is copied, not recorded anew
    finally:
        shutil.rmtree(s.top)


def test_lower_directory_copied_for_whiteout_and_opaque_marker(stack: Stack) -> None:
    stack.lower([dir_("d", mode=0o710, uid=3), reg("d/f"), dir_("d/sub", mode=0o705), reg("d/sub/g")])
    stack.apply([reg("d/.wh.f"), reg("d/sub/.wh..wh..opq")])
    assert is_whiteout_stat((stack.root / "d/f").lstat())
    assert os.getxattr(stack.root / "d/sub", T.opaque) == b"y"
    assert stat.S_IMODE((stack.root / "d").lstat().st_mode) == 0o710
    assert stat.S_IMODE((stack.root / "d/sub").lstat().st_mode) == 0o705


def test_whiteout_of_a_name_no_layer_holds(stack: Stack) -> None:
    stack.lower([reg("other")])
    res = stack.apply([reg("nothing/.wh.here"), reg(".wh.gone")])
    assert res.whiteouts == 2
    assert is_whiteout_stat((stack.root / "nothing/here").lstat())
    assert is_whiteout_stat((stack.root / "gone").lstat())


# -- whiteouts and opaque markers through symlinks -------------------------------------------------------


@pytest.mark.parametrize("name", ["c/.wh.f", "c/.wh..wh..opq", "c/deeper/.wh.f", "x/c/.wh.f"])
def test_whiteout_through_lower_symlink_refused(stack: Stack, name: str) -> None:
    stack.lower([dir_("d/deeper"), reg("d/f"), dir_("x"), sym("x/c", "../d"), sym("c", "d")])
    err = stack.refused([reg(name)], "symlink")
    assert repr(name.encode()) in str(err)


# -- hard links -------------------------------------------------------------------------------------------


def test_hard_link_to_lower_file_copied_up(stack: Stack) -> None:
    lower = stack.lower(
        [reg("bin/busybox", b"\x7fELF" * 1000, mode=0o4755, uid=3, gid=4, xattrs={"user.tag": b"v"}), dir_("bin")]
    )
    res = stack.apply([hard("bin/sh", "bin/busybox"), hard("ls", "/bin/./busybox")])
    busybox, sh, ls = (stack.root / n for n in ("bin/busybox", "bin/sh", "ls"))
    assert busybox.lstat().st_ino == sh.lstat().st_ino == ls.lstat().st_ino
    assert busybox.lstat().st_nlink == 3
    assert busybox.lstat().st_ino != (lower / "bin/busybox").lstat().st_ino
    assert sh.read_bytes() == (lower / "bin/busybox").read_bytes()
    src, st = (lower / "bin/busybox").lstat(), busybox.lstat()
    assert (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns) == (src.st_mode, 3, 4, src.st_mtime_ns)
    assert os.getxattr(busybox, "user.tag") == b"v"
    assert res.bytes == 0
    assert stack.tree() == {"bin", "bin/busybox", "bin/sh", "ls"}


def test_hard_link_to_lower_file_through_lower_symlink(stack: Stack) -> None:
    stack.lower([reg("usr/lib/libc.so", b"libc"), sym("lib", "/usr/lib")])
    stack.apply([hard("libc2", "lib/libc.so")])
    assert (stack.root / "usr/lib/libc.so").lstat().st_ino == (stack.root / "libc2").lstat().st_ino
    assert (stack.root / "libc2").read_bytes() == b"libc"


def test_hard_link_to_lower_symlink_copied_up(stack: Stack) -> None:
    stack.lower([sym("s", "/nowhere", uid=8)])
    stack.apply([hard("t", "s")])
    assert os.readlink(stack.root / "t") == "/nowhere"
    assert (stack.root / "t").lstat().st_ino == (stack.root / "s").lstat().st_ino
    assert (stack.root / "s").lstat().st_uid == 8


@pytest.mark.parametrize(
    ("lowers", "link", "match"),
    [
        ([[dir_("d")]], "d", "a directory"),
        ([[reg("f")]], "missing", "not an earlier entry"),
        ([[reg("f")], [reg(".wh.f")]], "f", "not an earlier entry"),
        ([[dir_("o"), reg("o/f")], [dir_("o"), reg("o/.wh..wh..opq")]], "o/f", "not an earlier entry"),
        ([[reg("f")]], "../f", "escapes the root"),
        ([[reg("f")], [sym("l", "f")]], "l/f", "not a directory"),
    ],
)
def test_hard_link_refused(stack: Stack, lowers: list[list[Entry]], link: str, match: str) -> None:
    for entries in lowers:
        stack.lower(entries)
    err = stack.refused([hard("new", link)], match)
    assert "'new'" in str(err)


def test_apply_into_new_with_lowers(stack: Stack) -> None:
    stack.lower([dir_("usr/lib"), sym("lib", "usr/lib")])
    apply_into_new(
        io.BytesIO(build([reg("lib/x")])), bytes(stack.base), b"new", fmt=T, rootless=False, lowers=stack.lower_args()
    )
    assert set(listing(stack.base / "new")) == {"usr", "usr/lib", "usr/lib/x"}

"""unionfs.image.apply_layer over lower layers: names resolved in the merged view of the root over its lowers,
as if chrooted (lower symlinks followed inside the root, lower directories copied up, hard links to lower
files copied up), checked against fixed cases, the kernel's overlayfs with GNU tar, and a model."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from layers import MTIME, Entry, build, dir_, hard, listing, reg, sym  # noqa: E402

from unionfs.image import ApplyResult, LayerError, apply_into_new, apply_layer  # noqa: E402
from unionfs.ownership import OVERRIDE_XATTR, decode_override  # noqa: E402
from unionfs.whiteout import XattrFormat, is_whiteout_stat  # noqa: E402

T = XattrFormat.TRUSTED
U = XattrFormat.USER
MTIME_NS = MTIME * 10**9


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
    res = stack.apply([reg("lib/x", b"data", uid=9)])
    assert stack.tree() == {"usr", "usr/lib", "usr/lib/x"}
    assert res.copied_up == 2
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
    assert res.copied_up == 2  # bin and bin/busybox
    assert "2 copied up from lower layers" in res.summary()
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


def test_opaque_marker_on_the_top_directory_hides_nothing(stack: Stack) -> None:
    """The kernel ignores an opaque marker on an overlay's top directory: lower names there stay visible."""
    stack.lower([dir_("usr/lib"), sym("lib", "usr/lib")])
    res = stack.apply([reg(".wh..wh..opq"), reg("lib/x")])
    assert res.opaque_dirs == 1
    assert stack.tree() == {"usr", "usr/lib", "usr/lib/x"}


# -- random stacks: a model, and the kernel with GNU tar ---------------------------------------------------

NAMES = ["a", "b", "c"]
#: symlink targets: absolute, climbing, looping, dangling
TARGETS = ["a", "b", "a/b", "c/", "/a", "/b/c", "../a", "/../../c", ".", "a/..", "..", "b/../c", "a/b/c/a"]
#: targets that neither climb nor start at the root, which GNU tar on a mounted tree would resolve alike
TAR_TARGETS = ["a", "b", "a/b", "c/", ".", "b/c", "c/a"]
MODES = [0o755, 0o700, 0o750]
UIDS = [0, 1000]

Op = tuple[str, tuple[str, ...], object, int, int]
Node = tuple[object, ...]
Tree = dict[tuple[str, ...], Node]


class Refused(Exception):
    pass


def op_strategy(kinds: str, targets: list[str]) -> st.SearchStrategy[Op]:
    path = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(tuple)
    payload = {
        "F": st.binary(max_size=4),
        "D": st.just(None),
        "L": st.sampled_from(targets),
        "W": st.just(None),
        "O": st.just(None),
    }
    return st.sampled_from(list(kinds)).flatmap(
        lambda k: st.tuples(st.just(k), path, payload[k], st.sampled_from(MODES), st.sampled_from(UIDS))
    )


def to_entries(ops: list[Op]) -> list[Entry]:
    out: list[Entry] = []
    for kind, path, payload, mode, uid in ops:
        name = "/".join(path)
        if kind == "F":
            assert isinstance(payload, bytes)
            out.append(reg(name, payload, mode=mode & 0o666, uid=uid, gid=uid))
        elif kind == "D":
            out.append(dir_(name, mode=mode, uid=uid, gid=uid))
        elif kind == "L":
            out.append(sym(name, str(payload)))
        elif kind == "W":
            out.append(reg("/".join((*path[:-1], ".wh." + path[-1]))))
        else:
            out.append(reg(name + "/.wh..wh..opq"))
    return out


def model_apply(tree: Tree, ops: list[Op]) -> bool:
    """Apply ``ops`` to ``tree`` (the merged view, updated in place) as a chrooted extraction onto the merged
    tree would: path -> ("D", mode, uid) | ("F", data, mode, uid) | ("L", target). Raises Refused where the
    layer is refused; answers whether an entry landed on something GNU tar would not replace alike (a
    non-directory on a directory, a directory on a symlink, a directory made through a symlink, an entry
    replacing a symlink its own name goes through)."""
    inroot: set[tuple[str, ...]] = set()  # what the layer's own directory holds
    whited: set[tuple[str, ...]] = set()  # whiteouts it made (and holds as character devices)
    awkward = False
    followed: list[tuple[str, ...]] = []  # the symlinks the last resolution went through

    def under(p: tuple[str, ...], q: tuple[str, ...]) -> bool:
        return len(q) > len(p) and q[: len(p)] == p

    def remove(p: tuple[str, ...]) -> None:
        for q in [q for q in tree if q == p or under(p, q)]:
            del tree[q]
        inroot.difference_update([q for q in inroot if under(p, q)])
        whited.difference_update([q for q in whited if under(p, q)])

    def resolve(comps: tuple[str, ...], follow: bool) -> tuple[str, ...]:
        names: list[str] = []
        todo = list(reversed(comps))
        links = 0
        followed.clear()
        while todo:
            c = todo.pop()
            if c in ("", "."):
                continue
            if c == "..":
                if names:
                    names.pop()
                continue
            p = (*names, c)
            if p in whited:
                raise Refused
            node = tree.get(p)
            if node is None:
                nonlocal awkward
                awkward |= links > 0  # GNU tar makes no directory through a dangling symlink
                tree[p] = ("D", 0o755, 0)
            elif node[0] == "L":
                links += 1
                if not follow or links > 40:
                    raise Refused
                followed.append(p)
                target = str(node[1])
                if target.startswith("/"):
                    names.clear()
                todo.extend(reversed(target.split("/")))
                continue
            elif node[0] == "F":
                raise Refused
            inroot.add(p)
            names.append(c)
        return tuple(names)

    for kind, path, payload, mode, uid in ops:
        if kind == "O":
            d = resolve(path, follow=False)
            if d:  # on the top directory the marker hides nothing
                for q in [q for q in tree if under(d, q) and q not in inroot]:
                    del tree[q]
            continue
        parent = resolve(path[:-1], follow=kind != "W")
        p = (*parent, path[-1])
        if kind == "W":
            remove(p)
            whited.add(p)
            inroot.add(p)
            continue
        whited.discard(p)
        old = tree.get(p)
        # GNU tar removes what is there through the path it was given, then makes the parents again
        awkward |= any(q == p or under(p, q) for q in followed) and not (kind == "D" and old and old[0] == "D")
        if kind == "D":
            if old is not None and old[0] == "D":
                tree[p] = ("D", mode, uid)
            else:
                awkward |= old is not None and old[0] == "L"
                remove(p)
                tree[p] = ("D", mode, uid)
        else:
            if old is not None and old[0] == "D":
                awkward = True
            remove(p)
            tree[p] = ("F", payload, mode & 0o666, uid) if kind == "F" else ("L", payload)
        inroot.add(p)
    return awkward


def merged(top: Path) -> dict[str, tuple[object, ...]]:
    """Every object of a mounted tree: type, mode, owner, size, content or link target, mtime of files."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            try:
                s = p.lstat()
            except FileNotFoundError:
                # a whiteout in a lower directory no layer beneath merges with: listed, never found
                continue
            extra: object = None
            if stat.S_ISREG(s.st_mode):
                extra = (p.read_bytes(), s.st_mtime_ns, s.st_nlink)
            elif stat.S_ISLNK(s.st_mode):
                extra = os.readlink(p)
            out[str(p.relative_to(top))] = (s.st_mode, s.st_uid, s.st_gid, s.st_size, extra)
    return out


def model_view(tree: Tree) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for path, node in tree.items():
        if not path:
            continue
        if node[0] == "D":
            out["/".join(path)] = (stat.S_IFDIR | int(str(node[1])), node[2])
        elif node[0] == "F":
            out["/".join(path)] = (stat.S_IFREG | int(str(node[2])), node[3], node[1])
        else:
            out["/".join(path)] = (stat.S_IFLNK | 0o777, node[1])
    return out


def shown(view: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    """What the model knows of a mounted tree's objects."""
    out: dict[str, tuple[object, ...]] = {}
    for name, (mode, uid, _gid, _size, extra) in view.items():
        m = int(str(mode))
        if stat.S_ISDIR(m):
            out[name] = (m, uid)
        elif stat.S_ISREG(m):
            assert isinstance(extra, tuple)
            out[name] = (m, uid, extra[0])
        else:
            out[name] = (m, extra)
    return out


class Mounts:
    """Overlay mounts made by a test, all lazily unmounted at the end."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.made: list[Path] = []

    def mount(self, name: str, lowers: list[Path], upper: Path | None = None) -> Path:
        point = self.top / name
        point.mkdir()
        opts = "lowerdir=" + ":".join(str(p) for p in lowers)
        if upper is None:
            opts = "ro," + opts
        else:
            work = self.top / (name + ".work")
            work.mkdir()
            opts += f",upperdir={upper},workdir={work}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(point)], check=True)
        self.made.append(point)
        return point

    def close(self) -> None:
        for point in reversed(self.made):
            subprocess.run(["umount", "-l", str(point)], check=False)


def model_lowers(lowers: list[list[Op]]) -> tuple[Tree, list[bool]]:
    """The model's merged tree of the lower layers, each applied over those before it, and which of them are
    refused (a refused one is left out of the stack)."""
    tree: Tree = {(): ("D", 0o755, 0)}
    refused = []
    for ops in lowers:
        attempt = dict(tree)
        try:
            model_apply(attempt, ops)
        except Refused:
            refused.append(True)
            continue
        refused.append(False)
        tree = attempt
    return tree, refused


def build_lowers(s: Stack, lowers: list[list[Op]], refused: list[bool]) -> None:
    """Apply each lower over the ones before it; one the model refuses must be refused, and is dropped."""
    for ops, no in zip(lowers, refused, strict=True):
        if no:
            with pytest.raises(LayerError):
                s.lower(to_entries(ops))
            shutil.rmtree(s.base / f"L{len(s.lowers)}")
        else:
            s.lower(to_entries(ops))


needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root")


@needs_root
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lowers=st.lists(st.lists(op_strategy("FDLWO", TARGETS), min_size=1, max_size=6), min_size=1, max_size=3),
    layer=st.lists(op_strategy("FDLWO", TARGETS), min_size=1, max_size=8),
)
def test_random_stack_matches_model(lowers: list[list[Op]], layer: list[Op]) -> None:
    """Where each entry lands, through random lower stacks of directories, symlinks, whiteouts and opaque
    directories: the kernel's merged view of the root over its lowers equals a model of chrooted extraction
    onto the merged tree."""
    tree, refused = model_lowers(lowers)
    s = Stack()
    mounts = Mounts(s.top)
    try:
        build_lowers(s, lowers, refused)
        try:
            model_apply(tree, layer)
        except Refused:
            with pytest.raises(LayerError):
                s.apply(to_entries(layer))
            return
        s.apply(to_entries(layer))
        empty = s.top / "empty"
        empty.mkdir()
        view = mounts.mount("merged", [s.root, *s.lowers, empty])
        assert shown(merged(view)) == model_view(tree)
    finally:
        mounts.close()
        shutil.rmtree(s.top)


@needs_root
@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lowers=st.lists(st.lists(op_strategy("FDLWO", TAR_TARGETS), min_size=1, max_size=6), min_size=1, max_size=3),
    layer=st.lists(op_strategy("FDL", TAR_TARGETS), min_size=1, max_size=8),
)
def test_random_stack_matches_gnu_tar_on_the_kernel(lowers: list[list[Op]], layer: list[Op]) -> None:
    """The layer applied over its lowers, mounted with them by the kernel, against GNU tar extracting the same
    layer into a kernel mount of the same lowers over an empty upper directory (tar follows the symlinks it
    meets on the way, and the kernel copies the directories up): names, types, modes, owners, sizes,
    contents, link targets and mtimes of files agree."""
    tree, refused = model_lowers(lowers)
    try:
        awkward = model_apply(tree, layer)
    except Refused:
        awkward = True
    assume(not awkward)
    lowers = [ops for ops, no in zip(lowers, refused, strict=True) if not no]
    s = Stack()
    mounts = Mounts(s.top)
    try:
        build_lowers(s, lowers, [False] * len(lowers))
        data = build(to_entries(layer))
        s.apply(to_entries(layer))
        empty = s.top / "empty"
        empty.mkdir()
        ours = mounts.mount("ours", [s.root, *s.lowers, empty])
        upper = s.top / "upper"
        upper.mkdir()
        ref = mounts.mount("ref", [*s.lowers, empty], upper=upper)
        subprocess.run(
            ["tar", "-x", "--numeric-owner", "-p", "-f", "-", "-C", str(ref)],
            input=data,
            check=True,
            capture_output=True,
            preexec_fn=lambda: os.umask(0o022),
        )
        got, want = merged(ours), merged(ref)
        assert got == want
        assert shown(got) == model_view(tree)
    finally:
        mounts.close()
        shutil.rmtree(s.top)


@needs_root
@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_usr_merged_image_matches_gnu_tar_on_the_kernel() -> None:
    """A usr-merged base, a middle layer with whiteouts and an opaque directory, and a layer adding through the
    lower symlinks, linking lower files and re-typing lower names: the kernel's view of the stack equals GNU
    tar's extraction into a mount of the lowers."""
    s = Stack()
    mounts = Mounts(s.top)
    try:
        s.lower(
            [
                dir_("usr", mode=0o755),
                dir_("usr/bin", mode=0o751, uid=2),
                dir_("usr/lib", mode=0o750, gid=3, mtime=1_300_000_000),
                dir_("usr/share/doc", mode=0o700, uid=1000, gid=1000),
                reg("usr/bin/busybox", b"\x7fELF busybox", mode=0o755),
                reg("usr/lib/libc.so.6", b"libc", mode=0o644),
                reg("usr/share/doc/README", b"docs", uid=1000),
                sym("bin", "usr/bin"),
                sym("lib", "usr/lib"),
                sym("lib64", "lib"),
                sym("usr/lib/libc.so", "libc.so.6"),
                dir_("etc/conf.d", mode=0o700),
                reg("etc/conf.d/old", b"old"),
                reg("etc/hosts", b"127.0.0.1 localhost\n"),
            ]
        )
        s.lower(
            [
                reg("etc/.wh.hosts"),
                reg("etc/conf.d/.wh..wh..opq"),
                reg("etc/conf.d/new", b"new"),
                sym("usr/share/doc/link", "../../bin/busybox"),
                dir_("var/lib/apt", mode=0o755),
                sym("var/run", "../run"),
            ]
        )
        layer = [
            reg("bin/sh-static", b"sh", mode=0o755, uid=5),
            hard("bin/sh", "usr/bin/busybox"),
            hard("usr/lib/libc-hard", "lib64/libc.so.6"),
            reg("lib64/ld.so", b"ld", mode=0o755),
            reg("lib/x86_64/libm.so", b"libm"),
            dir_("usr/share/doc", mode=0o755, uid=0, gid=0),
            reg("usr/share/doc/more", b"more", mtime=1_234_567_890),
            reg("etc/conf.d/third", b"3"),
            reg("etc/hosts", b"::1 localhost\n", mode=0o600),
            dir_("run", mode=0o755),
            reg("var/run/pid", b"1"),
            sym("var/lib/apt/lists", "../../cache"),
            reg("var/lib/apt/extended", b"e"),
        ]
        s.apply(layer)
        empty = s.top / "empty"
        empty.mkdir()
        ours = mounts.mount("ours", [s.root, *s.lowers, empty])
        upper = s.top / "upper"
        upper.mkdir()
        ref = mounts.mount("ref", [*s.lowers, empty], upper=upper)
        subprocess.run(
            ["tar", "-x", "--numeric-owner", "-p", "-f", "-", "-C", str(ref)],
            input=build(layer),
            check=True,
            capture_output=True,
            preexec_fn=lambda: os.umask(0o022),
        )
        got = merged(ours)
        assert got == merged(ref)
        assert got["usr/bin/sh"][4] == (b"\x7fELF busybox", (s.lowers[1] / "usr/bin/busybox").stat().st_mtime_ns, 2)
        assert got["usr/lib/x86_64/libm.so"][4] == (b"libm", MTIME_NS, 1)
        assert got["usr/lib"][:3] == (stat.S_IFDIR | 0o750, 0, 3)
        assert not (s.root / "lib").exists() and not (s.root / "bin").exists()
        assert sorted(p for p in got if p.startswith("etc/")) == [
            "etc/conf.d",
            "etc/conf.d/new",
            "etc/conf.d/third",
            "etc/hosts",
        ]
    finally:
        mounts.close()
        shutil.rmtree(s.top)


def test_removed_directory_metadata_not_applied_to_its_successor(stack: Stack) -> None:
    stack.lower([dir_("a/b", mode=0o700), reg("a/b/old")])
    stack.apply([reg("a/b/x"), dir_("a/c", mode=0o711), reg("a"), dir_("a"), reg("a/b/y"), reg("a/c/z")])
    assert stack.tree() == {"a", "a/b", "a/b/y", "a/c", "a/c/z"}
    assert os.getxattr(stack.root / "a", T.opaque) == b"y"
    assert stat.S_IMODE((stack.root / "a/b").lstat().st_mode) == 0o755
    assert stat.S_IMODE((stack.root / "a/c").lstat().st_mode) == 0o755


def test_layer_symlink_replaces_copied_up_lower_directory(stack: Stack) -> None:
    stack.lower([dir_("d", mode=0o700), reg("d/x"), dir_("e")])
    stack.apply([reg("d/a"), sym("d", "e"), reg("d/b"), reg("d/c/f")])
    assert stack.tree() == {"d", "e", "e/b", "e/c", "e/c/f"}
    assert os.readlink(stack.root / "d") == "e"


def test_rootless_hard_link_to_lower_file_keeps_its_override() -> None:
    s = Stack(U, rootless=True)
    try:
        lower = s.lower([reg("f", b"secret", mode=0o640, uid=1000, gid=1000)])
        want = os.getxattr(lower / "f", OVERRIDE_XATTR)
        assert decode_override(want) == (1000, 1000, 0o640)
        s.apply([hard("g", "f")])
        assert os.getxattr(s.root / "g", OVERRIDE_XATTR) == want
        assert (s.root / "g").lstat().st_ino == (s.root / "f").lstat().st_ino
        assert (s.root / "g").read_bytes() == b"secret"
    finally:
        shutil.rmtree(s.top)

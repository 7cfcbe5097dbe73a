"""The snapshotter conformance suite: one function per behaviour, each given a fresh store (a Harness).

The behaviours are those of containerd's snapshotter test suite, adapted to a store whose mounts unionfs
serves. Where a check changes files it applies each change both through a mount and to one plain directory
(the oracle), and then compares a mounted view of the result with that directory.

Run one check directly (as whatever user runs it): ``python conformance.py CHECK BASE_DIR``. Exit status 0:
passed, 77: skipped (reason on stdout), anything else: failed (traceback on stderr).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from harness import (
    AppendFile,
    Change,
    Chmod,
    Chown,
    CreateDir,
    CreateFile,
    Harness,
    Link,
    Remove,
    RemoveAll,
    Rename,
    SetXattr,
    Symlink,
    apply,
    assert_same_tree,
    is_mounted,
    read_pid,
    wait_until,
)

from unionfs.snapshots import (
    AlreadyExists,
    FailedPrecondition,
    Info,
    InvalidArgument,
    Kind,
    Mount,
    NotFound,
    SnapshotError,
    Snapshotter,
    Usage,
    option_string,
)

CHECKS: dict[str, Callable[[Harness], None]] = {}
SKIPPED = 77


class Skip(Exception):
    """The check does not apply here (the message says why)."""


def check(fn: Callable[[Harness], None]) -> Callable[[Harness], None]:
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def raises(kind: type[SnapshotError], fn: Callable[..., object], *args: object, **kw: object) -> SnapshotError:
    try:
        fn(*args, **kw)
    except kind as exc:
        assert str(exc), "errors carry a message"
        return exc
    except SnapshotError as exc:
        raise AssertionError(
            f"{fn.__name__}{args}: expected {kind.__name__}, got {type(exc).__name__}: {exc}"
        ) from None
    raise AssertionError(f"{fn.__name__}{args}: expected {kind.__name__}, but it succeeded")


def errno_of(fn: Callable[[], object]) -> int | None:
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


def layer_dir(h: Harness, key: str) -> Path:
    """The layer directory (``fs``) of an active snapshot, from its bind mount spec or its upperdir."""
    (m,) = h.sn.mounts(key)
    if m.type == "bind":
        return Path(m.source)
    return Path(next(o for o in m.options if o.startswith("upperdir=")).removeprefix("upperdir="))


def store_entries(h: Harness) -> list[str]:
    return sorted(os.listdir(h.root / "snapshots"))


def assert_store_consistent(h: Harness) -> None:
    """fsck finds nothing, and the directories are exactly those of the snapshots."""
    findings = h.sn.fsck()
    assert not findings, [str(f) for f in findings]
    assert len(store_entries(h)) == len(h.sn.walk()), (store_entries(h), [i.name for i in h.sn.walk()])


INITIAL: list[Change] = [
    CreateFile("/foo", b"foo\n", 0o777),
    CreateDir("/a"),
    CreateDir("/a/b"),
    CreateDir("/a/b/c"),
    CreateFile("/a/b/c/bar", b"bar\n", 0o600),
    Symlink("../foo", "/a/to-foo"),
]


# -- lifecycle -------------------------------------------------------------------------------------------------


@check
def check_basic(h: Harness) -> None:
    """prepare, write through a mount, commit, prepare on it, change, commit, view: each stage compared with
    a plain directory that received the same changes."""
    sn = h.sn
    flat = h.flat()
    (m,) = sn.prepare("preparing")
    assert m.type == "bind" and m.options == ("rw", "rbind"), m
    h.change("preparing", INITIAL, flat)
    sn.commit("committed", "preparing")
    raises(NotFound, sn.stat, "preparing")
    info = sn.stat("committed")
    assert (info.kind, info.name, info.parent) == (Kind.COMMITTED, "committed", None), info

    (m,) = sn.prepare("next", "committed")
    assert m.type == "fuse.unionfs" and m.source == "unionfs", m
    assert m.options[0] == f"lowerdir={h.root}/snapshots/1/fs", m.options
    assert any(o.startswith("upperdir=") for o in m.options) and any(o.startswith("workdir=") for o in m.options)
    diff: list[Change] = [
        CreateFile("/bar", b"bar\n", 0o644),
        Remove("/foo"),
        CreateFile("/a/b/c/bar", b"changed\n", 0o600),
        CreateDir("/baz"),
        Link("/bar", "/baz/bar-link"),
    ]
    with h.mounted_at("next") as mp:
        assert_same_tree(flat, mp)
        apply(mp, diff)
        apply(flat, diff)
        assert_same_tree(flat, mp)
    sn.commit("nextCommitted", "next")
    assert sn.stat("nextCommitted").parent == "committed"

    (m,) = sn.view("view", "nextCommitted")
    assert m.type == "fuse.unionfs" and not any(o.startswith("upperdir=") for o in m.options), m
    with h.mounted_at("view") as mp:
        assert_same_tree(flat, mp)
    walked = {i.name: (i.kind, i.parent) for i in sn.walk()}
    assert walked == {
        "committed": (Kind.COMMITTED, None),
        "nextCommitted": (Kind.COMMITTED, "committed"),
        "view": (Kind.VIEW, "nextCommitted"),
    }, walked
    assert_store_consistent(h)


@check
def check_stat_active(h: Harness) -> None:
    sn = h.sn
    sn.prepare("base-active")
    sn.commit("base", "base-active")
    sn.prepare("active", "base", labels={"purpose": "test"})
    info = sn.stat("active")
    assert info.kind is Kind.ACTIVE and info.name == "active" and info.parent == "base", info
    assert info.labels == {"purpose": "test"}, info.labels
    assert info.created is not None and info.created == info.updated
    assert info.created.tzinfo is not None


@check
def check_stat_committed(h: Harness) -> None:
    sn = h.sn
    sn.prepare("base-active")
    sn.commit("base", "base-active")
    sn.prepare("active", "base")
    before = time.time()
    sn.commit("committed", "active")
    info = sn.stat("committed")
    assert info.kind is Kind.COMMITTED and info.name == "committed" and info.parent == "base", info
    assert info.created is not None and abs(info.created.timestamp() - before) < 60
    raises(NotFound, sn.stat, "active")


@check
def check_transitivity(h: Harness) -> None:
    """Each layer sees everything below it; mounts list the parents nearest first."""
    sn = h.sn
    flat = h.flat()
    h.layer("l1", None, [CreateFile("/one", b"1\n")], flat)
    h.layer("l2", "l1", [CreateFile("/two", b"2\n")], flat)
    h.layer("l3", "l2", [CreateFile("/one", b"one again\n")], flat)
    assert [sn.stat(n).parent for n in ("l1", "l2", "l3")] == [None, "l1", "l2"]
    sn.prepare("top", "l3")
    (m,) = sn.mounts("top")
    lowers = m.options[0].removeprefix("lowerdir=").split(":")
    assert [Path(p).parent.name for p in lowers] == ["3", "2", "1"], lowers
    with h.mounted_at("top") as mp:
        assert_same_tree(flat, mp)


@check
def check_prepare_view_rules(h: Harness) -> None:
    """Parents must exist and be committed; views and committed snapshots cannot be committed or written."""
    sn = h.sn
    sn.prepare("active")
    raises(FailedPrecondition, sn.prepare, "x", "active")
    raises(FailedPrecondition, sn.view, "x", "active")
    raises(NotFound, sn.prepare, "x", "missing")
    raises(NotFound, sn.view, "x", "missing")
    sn.commit("committed", "active")
    sn.view("view", "committed")
    raises(FailedPrecondition, sn.prepare, "x", "view")
    raises(FailedPrecondition, sn.view, "x", "view")
    raises(FailedPrecondition, sn.commit, "x", "view")
    raises(FailedPrecondition, sn.commit, "x", "committed")
    raises(FailedPrecondition, sn.mounts, "committed")
    raises(NotFound, sn.commit, "x", "missing")
    raises(NotFound, sn.mounts, "missing")
    # nothing half-made remains from the refused operations
    assert sorted(i.name for i in sn.walk()) == ["committed", "view"]
    assert_store_consistent(h)


@check
def check_key_space(h: Harness) -> None:
    """Keys and names share one space; a committed snapshot cannot be prepared twice."""
    sn = h.sn
    sn.prepare("k")
    raises(AlreadyExists, sn.prepare, "k")
    raises(AlreadyExists, sn.view, "k")
    raises(AlreadyExists, sn.commit, "k", "k")
    sn.commit("c", "k")
    raises(AlreadyExists, sn.prepare, "c")
    raises(AlreadyExists, sn.view, "c", "c")
    sn.prepare("k")  # the key was freed by the commit
    raises(AlreadyExists, sn.commit, "c", "k")
    sn.prepare("k2", "c")
    raises(AlreadyExists, sn.commit, "k", "k2")
    for bad in ("", "a\0b"):
        raises(InvalidArgument, sn.prepare, bad)
    raises(InvalidArgument, sn.prepare, "ok", labels={"": "v"})
    assert sorted(i.name for i in sn.walk()) == ["c", "k", "k2"]
    assert_store_consistent(h)


@check
def check_view_readonly(h: Harness) -> None:
    sn = h.sn
    h.layer("base", None, INITIAL)
    sn.view("view", "base")
    sn.view("empty-view")
    for key in ("view", "empty-view"):
        with h.mounted_at(key) as mp:
            assert read_only(mp), key
            if key == "view":
                assert (mp / "foo").read_bytes() == b"foo\n"


def read_only(mp: Path) -> bool:
    """Every kind of write under ``mp`` fails with EROFS."""

    def append() -> None:
        with open(mp / "foo", "ab"):
            pass

    attempts: list[Callable[[], object]] = [
        lambda: (mp / "new").write_bytes(b"x"),
        lambda: os.mkdir(mp / "newdir"),
        lambda: os.symlink("x", mp / "link"),
    ]
    if (mp / "foo").exists():
        attempts += [lambda: os.unlink(mp / "foo"), append, lambda: os.chmod(mp / "foo", 0o600)]
    return all(errno_of(a) == errno.EROFS for a in attempts)


# -- labels, stat and walk -------------------------------------------------------------------------------------


@check
def check_update(h: Harness) -> None:
    sn = h.sn
    sn.prepare("a", labels={"l1": "v1", "l2": "v2"})
    first = sn.stat("a")

    def upd(labels: dict[str, str], *paths: str) -> Info:
        info = sn.update(Info(kind=Kind.ACTIVE, name="a", labels=labels), paths)
        assert info == sn.stat("a"), (info, sn.stat("a"))
        return info

    time.sleep(0.002)
    i = upd({"l1": "v1-new", "ignored": "x"}, "labels.l1")
    assert i.labels == {"l1": "v1-new", "l2": "v2"}, i.labels
    assert i.created == first.created and i.updated is not None and first.updated is not None
    assert i.updated > first.updated
    i2 = upd({"l3": "v3"})
    assert i2.labels == {"l3": "v3"} and i2.updated is not None and i2.updated >= i.updated
    assert upd({}, "labels.l3").labels == {}
    assert upd({"x": "y", "z": "w"}, "labels").labels == {"x": "y", "z": "w"}
    assert upd({"x": ""}, "labels.x").labels == {"z": "w"}
    for field in ("name", "kind", "parent", "created", "labels."):
        raises(InvalidArgument, sn.update, Info(kind=Kind.ACTIVE, name="a"), [field])
    raises(NotFound, sn.update, Info(kind=Kind.ACTIVE, name="missing", labels={"a": "b"}))
    raises(InvalidArgument, sn.update, Info(kind=Kind.ACTIVE, name="a", labels={"k": "v" * 5000}))
    assert sn.stat("a").labels == {"z": "w"}
    # committed snapshots keep their labels through commit and can still be relabelled
    sn.commit("c", "a")
    assert sn.stat("c").labels == {"z": "w"}
    sn.update(Info(kind=Kind.COMMITTED, name="c", labels={"gc": "keep"}), ["labels.gc"])
    assert sn.stat("c").labels == {"z": "w", "gc": "keep"}
    sn.prepare("b")
    sn.commit("c2", "b", labels={"only": "this"})
    assert sn.stat("c2").labels == {"only": "this"}


@check
def check_walk_filters(h: Harness) -> None:
    sn = h.sn
    sn.prepare("base-a", labels={"unionfs.io/role": "base", "tier": "1"})
    sn.commit("base", "base-a")
    sn.prepare("mid-a", "base", labels={"tier": "2"})
    sn.commit("mid", "mid-a")
    sn.prepare("work", "mid", labels={"tier": "2", "x.y": "z"})
    sn.view("look", "mid")
    sn.prepare("scratch")

    def names(*filters: str) -> list[str]:
        return [i.name for i in sn.walk(filters)]

    assert names() == ["base", "look", "mid", "scratch", "work"]
    assert names("kind==committed") == ["base", "mid"]
    assert names("kind==Committed") == ["base", "mid"]
    assert names("kind!=committed") == ["look", "scratch", "work"]
    assert names("parent==mid") == ["look", "work"]
    assert names('parent==""') == ["base", "scratch"]
    assert names('labels."unionfs.io/role"==base') == ["base"]
    assert names("labels.tier==2") == ["mid", "work"]
    assert names('labels."x.y"') == ["work"]
    assert names("labels.tier") == ["base", "mid", "work"]
    assert names("name~=^(ba|mi)") == ["base", "mid"]
    assert names("parent!=mid,kind!=view") == ["base", "mid", "scratch"]
    assert names("kind==view", "name==scratch") == ["look", "scratch"]
    assert names('name=="scratch"') == ["scratch"]
    assert [i.name for i in sn.walk("kind==active")] == ["scratch", "work"]
    for bad in ("bogus==1", "labels.a~=(", "", "name==a,", 'name=="open', "name=a", "labels==x"):
        raises(InvalidArgument, sn.walk, [bad])


@check
def check_stat_in_walk(h: Harness) -> None:
    sn = h.sn
    sn.prepare("a", labels={"k": "v"})
    sn.commit("b", "a")
    sn.prepare("c", "b")
    sn.view("d", "b", labels={"w": "x"})
    infos = sn.walk()
    assert len(infos) == 3
    for info in infos:
        assert info == sn.stat(info.name), (info, sn.stat(info.name))


# -- usage -----------------------------------------------------------------------------------------------------


def expected_usage(top: Path) -> Usage:
    """Independently: bytes allocated and inodes, each inode once, the top directory included."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [".", *dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return Usage(size=sum(seen.values()), inodes=len(seen))


@check
def check_usage(h: Harness) -> None:
    sn = h.sn
    sn.prepare("a")
    fs = layer_dir(h, "a")
    empty = sn.usage("a")
    assert empty == expected_usage(fs) and empty.inodes == 1, empty
    with h.mounted_at("a") as mp:
        (mp / "f").write_bytes(os.urandom(10000))
        os.link(mp / "f", mp / "g")
        (mp / "d").mkdir()
        (mp / "d" / "x").write_bytes(b"1")
        with open(mp / "sparse", "wb") as f:
            f.seek(64 << 20)
            f.write(b"end")
    u = sn.usage("a")
    assert u == expected_usage(fs), (u, expected_usage(fs))
    assert u.inodes == 5, u  # the layer root, f (= g), d, d/x, sparse
    assert 10000 <= u.size < (1 << 20), u  # the hole takes no space
    sn.commit("c", "a")
    assert sn.usage("c") == u
    (fs / "later").write_bytes(b"x" * 100000)  # not through any mount: usage stays as frozen at commit
    assert sn.usage("c") == u
    sn.view("v", "c")
    assert sn.usage("v") == Usage(0, 0)
    sn.prepare("child", "c")
    assert sn.usage("child").inodes == 1
    raises(NotFound, sn.usage, "missing")


# -- file system behaviour across a chain ----------------------------------------------------------------------


@check
def check_commit_empty(h: Harness) -> None:
    """An active snapshot committed without changes is an empty layer, on nothing and on a parent."""
    sn = h.sn
    sn.prepare("e-a")
    sn.commit("empty", "e-a")
    assert sn.usage("empty").inodes == 1
    flat = h.flat()
    h.check_view("empty", flat)
    sn.prepare("on-empty", "empty")
    with h.mounted_at("on-empty") as mp:
        assert_same_tree(flat, mp)
    h.layer("base", None, INITIAL, flat)
    sn.prepare("nothing", "base")
    sn.commit("base-again", "nothing")
    h.check_view("base-again", flat)
    sn.prepare("on-top", "base-again")
    with h.mounted_at("on-top") as mp:
        assert_same_tree(flat, mp)


@check
def check_file_from_lower_layer(h: Harness) -> None:
    """A file changed in a child is copied up; the parent layer and its views keep the old content."""
    flat = h.flat()
    h.layer("base", None, [CreateDir("/layer"), CreateFile("/layer/a", b"content1\n"),
                           CreateFile("/layer/b", b"b\n", 0o640)], flat)
    base_flat = h.copy_of(flat)
    h.layer("l2", "base", [AppendFile("/layer/a", b"more\n"), Chmod("/layer/b", 0o600)], flat)
    h.layer("l3", "l2", [CreateFile("/layer/a", b"content3\n")], flat)
    h.check_view("l3", flat)
    h.check_view("base", base_flat)


@check
def check_deleted_files_in_child(h: Harness) -> None:
    sn = h.sn
    flat = h.flat()
    h.layer("base", None, [CreateFile("/foo", b"foo\n"), CreateFile("/bar", b"bar\n"), CreateDir("/d"),
                           CreateFile("/d/x", b"x\n")], flat)
    h.layer("child", "base", [Remove("/foo"), RemoveAll("/d")], flat)
    h.check_view("child", flat)
    sn.prepare("grand", "child")
    with h.mounted_at("grand") as mp:
        assert_same_tree(flat, mp)
        assert not os.path.lexists(mp / "foo") and not os.path.lexists(mp / "d")
        changes: list[Change] = [CreateFile("/foo", b"back\n"), CreateDir("/d")]
        apply(mp, changes)
        apply(flat, changes)
        assert_same_tree(flat, mp)


@check
def check_rename_and_delete_in_chain(h: Harness) -> None:
    """Renames (files across directories, over existing names, directories) and deletions in a chain of
    layers, compared after every layer with a plain directory that received the same changes."""
    sn = h.sn
    flat = h.flat()
    h.layer("base", None, [
        CreateDir("/d1"), CreateFile("/d1/a", b"a\n"), CreateFile("/d1/b", b"b\n"), CreateDir("/d1/sub"),
        CreateFile("/d1/sub/c", b"c\n"), CreateDir("/d2"), CreateFile("/d2/x", b"x\n"),
        CreateFile("/f1", b"f1\n"), CreateFile("/f2", b"f2\n"), CreateFile("/f3", b"f3\n"),
        Symlink("f1", "/l"), SetXattr("/f3", "user.tag", b"three"),
    ], flat)
    h.layer("rename", "base", [
        Rename("/f1", "/f1-renamed"),            # a lower file, renamed in place
        Rename("/d1/a", "/d2/a"),                # across directories
        Rename("/f3", "/d1/b"),                  # over an existing lower file (keeps its xattr)
        Rename("/d2", "/d3"),                    # a merged directory (EXDEV, moved like mv does)
        Remove("/f2"),
        RemoveAll("/d1/sub"),
        CreateFile("/f2", b"f2 again\n"),        # a name deleted in this layer, created again
        CreateDir("/d1/sub"),                    # a directory where a deleted one stood: opaque
        CreateFile("/d1/sub/new", b"new\n"),
        Chmod("/d1", 0o700),
    ], flat)
    h.check_view("rename", flat)
    h.layer("delete", "rename", [
        RemoveAll("/d1"),
        Rename("/d3/x", "/x"),
        Remove("/l"),
        Symlink("x", "/l"),
        CreateDir("/d1"),
        Rename("/f1-renamed", "/d1/f1"),
        Link("/d1/f1", "/d1/f1-link"),
    ], flat)
    h.check_view("delete", flat)
    sn.prepare("top", "delete")
    with h.mounted_at("top") as mp:
        assert_same_tree(flat, mp)
        changes: list[Change] = [Rename("/d3", "/d4"), RemoveAll("/d1"), Rename("/x", "/d4/x")]
        apply(mp, changes)
        apply(flat, changes)
        assert_same_tree(flat, mp)


@check
def check_root_permission(h: Harness) -> None:
    sn = h.sn
    sn.prepare("a")
    fs = layer_dir(h, "a")
    assert os.stat(fs).st_mode & 0o7777 == 0o755
    with h.mounted_at("a") as mp:
        st = os.stat(mp)
        assert st.st_mode & 0o7777 == 0o755 and st.st_uid == os.geteuid(), st


@check
def check_directory_permission_on_commit(h: Harness) -> None:
    """Owners and modes of directories (the layer root included) survive commits; a new layer's root takes
    its parent's owner and mode."""
    sn = h.sn
    flat = h.flat()
    owned: list[Change] = (
        [Chown("/", 1000, 1000), Chown("/dir-a", 1001, 1001), Chown("/dir-a/file", 1002, 1002)]
        if h.rootful else []
    )
    h.layer("base", None, [CreateDir("/dir-a", 0o750), CreateFile("/dir-a/file", b"x\n", 0o640),
                           Chmod("/", 0o751), *owned], flat)
    more: list[Change] = [CreateDir("/dir-b", 0o711), CreateFile("/dir-a/more", b"y\n")]
    h.layer("next", "base", more + ([Chown("/dir-b", 1003, 1003)] if h.rootful else []), flat)
    sn.prepare("top", "next")
    st = os.stat(layer_dir(h, "top"))
    assert st.st_mode & 0o7777 == 0o751, oct(st.st_mode)
    if h.rootful:
        assert (st.st_uid, st.st_gid) == (1000, 1000), (st.st_uid, st.st_gid)
    with h.mounted_at("top") as mp:
        assert_same_tree(flat, mp)
    h.check_view("next", flat)


@check
def check_chown(h: Harness) -> None:
    """chown of lower objects in a child (copy-up keeps content); as an ordinary user, chown to oneself."""
    flat = h.flat()
    h.layer("base", None, [CreateDir("/d"), CreateFile("/d/f", b"data\n"), Symlink("f", "/d/l")], flat)
    uid, gid = (1234, 1234) if h.rootful else (os.geteuid(), os.getegid())
    h.layer("owned", "base", [Chown("/d/f", uid, gid), Chown("/d", uid, gid), Chown("/d/l", uid, gid)], flat)
    h.check_view("owned", flat)


@check
def check_remove(h: Harness) -> None:
    sn = h.sn
    raises(NotFound, sn.remove, "missing")
    sn.prepare("a")
    sn.view("v")
    sn.remove("a")
    sn.remove("v")
    raises(NotFound, sn.stat, "a")
    assert store_entries(h) == []
    h.layer("base", None, INITIAL)
    sn.view("look", "base")
    raises(FailedPrecondition, sn.remove, "base")  # a view is a child too
    sn.remove("look")
    sn.prepare("work", "base")
    raises(FailedPrecondition, sn.remove, "base")
    sn.remove("work")
    sn.remove("base")
    assert store_entries(h) == [] and sn.walk() == []
    sn.prepare("a")  # a removed key can be used again
    assert_store_consistent(h)


@check
def check_remove_intermediate(h: Harness) -> None:
    sn = h.sn
    flat = h.flat()
    h.layer("base", None, INITIAL, flat)
    h.layer("mid", "base", [CreateFile("/mid", b"mid\n")], flat)
    h.layer("top", "mid", [Remove("/foo")], flat)
    raises(FailedPrecondition, sn.remove, "base")
    raises(FailedPrecondition, sn.remove, "mid")
    h.check_view("top", flat)
    for name in ("top", "mid", "base"):
        sn.remove(name)
        assert_store_consistent(h)
    assert store_entries(h) == []


# -- mounting --------------------------------------------------------------------------------------------------


@check
def check_mount_specs(h: Harness) -> None:
    """Every shape of mount spec is served by `unionfs snapshot mount`, writes land in the right layer, and an
    active snapshot is mounted once at a time."""
    sn = h.sn
    xattr = ("userxattr",) if sn.xattr == "user" else ()
    assert sn.xattr == ("trusted" if h.rootful else "user")
    (m,) = sn.prepare("solo")
    assert m == Mount("bind", str(h.root / "snapshots/1/fs"), ("rw", "rbind")), m
    with h.mounted_at("solo") as mp:
        (mp / "hello").write_bytes(b"hi\n")
        assert os.listdir(mp) == ["hello"]
        again = h.cli("mount", "solo", h.fresh_dir("mnt"))
        assert again.returncode == 5 and f'"solo" is already mounted on {mp}' in again.stderr, (again.returncode,
                                                                                                again.stderr)
    assert (layer_dir(h, "solo") / "hello").read_bytes() == b"hi\n"
    sn.commit("one", "solo")
    (m,) = sn.view("v-none")
    assert m == Mount("bind", str(h.root / "snapshots/2/fs"), ("ro", "rbind")), m
    (m,) = sn.view("v-one", "one")
    assert m == Mount("bind", str(h.root / "snapshots/1/fs"), ("ro", "rbind")), m
    (m,) = sn.prepare("on-one", "one")
    fs1, fs4 = h.root / "snapshots/1/fs", h.root / "snapshots/4"
    assert m == Mount("fuse.unionfs", "unionfs", (f"lowerdir={fs1}", f"upperdir={fs4}/fs", f"workdir={fs4}/work",
                                                  *xattr)), m
    with h.mounted_at("on-one") as mp:
        (mp / "second").write_bytes(b"2\n")
    sn.commit("two", "on-one")
    (m,) = sn.view("v-two", "two")
    assert m == Mount("fuse.unionfs", "unionfs", (f"lowerdir={fs4}/fs:{fs1}", *xattr)), m
    assert sn.mounts("v-two") == [m]
    for key, names in (("v-none", []), ("v-one", ["hello"]), ("v-two", ["hello", "second"])):
        with h.mounted_at(key) as mp:
            assert sorted(os.listdir(mp)) == names, (key, os.listdir(mp))
            assert read_only(mp), key
    r = h.cli("mount", "two", h.fresh_dir("mnt"))
    assert r.returncode == 5 and r.stderr.count("\n") == 1 and "committed" in r.stderr, r.stderr


@check
def check_mounted_active_is_busy(h: Harness) -> None:
    """A mounted active snapshot can be neither committed nor removed (its layer would change under the
    server); once unmounted it can."""
    sn = h.sn
    sn.prepare("a")
    with h.mounted_at("a") as mp:
        (mp / "f").write_bytes(b"data\n")
        raises(FailedPrecondition, sn.commit, "c", "a")
        raises(FailedPrecondition, sn.remove, "a")
        assert sn.usage("a").inodes == 2
    sn.commit("c", "a")
    sn.prepare("b", "c")
    with h.mounted_at("b"):
        raises(FailedPrecondition, sn.remove, "b")
    sn.remove("b")
    assert_store_consistent(h)


def _applier_128(i: int) -> list[Change]:
    if i == 0:
        return [CreateFile("/bottom", b"way at the bottom\n", 0o777), CreateFile("/overwriteme", b"FIRST!\n", 0o777),
                CreateDir("/ADDHERE"), CreateDir("/ONLYME"), CreateFile("/ONLYME/bottom", b"bye!\n", 0o777)]
    return [CreateFile("/overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
            CreateFile(f"/ADDHERE/file-{i}", b"same\n", 0o755),
            RemoveAll("/ONLYME"),
            CreateDir("/ONLYME"),
            CreateFile(f"/ONLYME/file-{i}", b"only me!\n", 0o777)]


def write_layer_directly(h: Harness, key: str, changes: list[Change], flat: Path) -> None:
    """Apply changes to an active snapshot's layer directory the way an unpacked diff lands there: the
    overlay format written by hand (parent directories copied up with their mode; a directory that replaces
    a deleted one is opaque). ``flat`` holds the merged tree before the changes."""
    fs = layer_dir(h, key)
    for c in changes:
        if isinstance(c, RemoveAll):
            continue  # replaced by the opaque directory below
        parents = Path(getattr(c, "path", "/").lstrip("/")).parents
        for rel in reversed([p for p in parents if str(p) != "."]):
            if not (fs / rel).exists():
                os.mkdir(fs / rel)
                os.chmod(fs / rel, os.stat(flat / rel).st_mode & 0o7777)
        c(fs)
        if isinstance(c, CreateDir) and c.path == "/ONLYME" and any(isinstance(x, RemoveAll) for x in changes):
            os.setxattr(fs / "ONLYME", f"{h.sn.xattr}.overlay.opaque", b"y")


LAYERS = 128
#: how many of the 128 layers are written through a mount (the others are written into the layer directory
#: directly, as an unpacked diff would be); the whole chain is always mounted and read through unionfs
THROUGH_MOUNTS = int(os.environ.get("UNIONFS_TEST_128_THROUGH_MOUNTS", "32"))


@check
def check_128_layers(h: Harness) -> None:
    """A chain of 128 committed layers mounts (active and view) and reads like a flat directory that got the
    same changes; the store path is long and holds ':' and ',' so that the lowerdir option is well over
    10 KB and escaped."""
    h.use_root(h.base / ("deep-" + "x" * 80 + ":colon,comma") / "store")
    sn = h.sn
    flat = h.flat()
    parent = None
    stride = max(1, LAYERS // max(1, THROUGH_MOUNTS))
    for i in range(LAYERS):
        changes = _applier_128(i)
        key, name = f"layer-{i}-active", f"layer-{i}"
        sn.prepare(key, parent)
        if i % stride == 0:
            h.change(key, changes)
        else:
            write_layer_directly(h, key, changes, flat)
        apply(flat, changes)
        sn.commit(name, key)
        parent = name
    sn.prepare("top", parent)
    opts = option_string(sn.mount_options("top"))
    assert len(opts) > 10_000 and "\\:" in opts and "\\," in opts, len(opts)
    with h.mounted_at("top") as mp:
        assert_same_tree(flat, mp)
        assert (mp / "overwriteme").read_bytes() == b"127 WAS HERE!\n"
        assert os.listdir(mp / "ONLYME") == ["file-127"]
        assert len(os.listdir(mp / "ADDHERE")) == 127
        changes = [RemoveAll("/ADDHERE"), CreateFile("/bottom", b"rewritten\n"), Rename("/ONLYME", "/ONLY-YOU")]
        apply(mp, changes)
        apply(flat, changes)
        assert_same_tree(flat, mp)
    sn.commit("layer-128", "top")
    h.check_view("layer-128", flat)
    # the same chain through `unionfs mount -o` with the long option string on the command line
    sn.view("long-argv", "layer-128")
    mp = h.fresh_dir("mnt")
    h.mounted.append(mp)
    opts = option_string(sn.mount_options("long-argv"))
    r = subprocess.run([sys.executable, "-m", "unionfs", "mount", "-o", opts, str(mp)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and len(opts) > 10_000, r.stderr
    wait_until(lambda: is_mounted(mp), f"{mp} to be mounted")
    pid = read_pid(mp)
    if pid is not None:
        h.servers[mp] = pid
    assert_same_tree(flat, mp)
    h.umount(mp)
    assert len(sn.walk()) == LAYERS + 2  # and the view


@check
def check_close_twice(h: Harness) -> None:
    sn = h.sn
    sn.prepare("a")
    sn.close()
    sn.close()
    raises(FailedPrecondition, sn.stat, "a")
    raises(FailedPrecondition, sn.prepare, "b")
    with Snapshotter(h.root) as again:
        assert again.stat("a").kind is Kind.ACTIVE
        again.close()
    h.sn = Snapshotter(h.root)  # for the teardown
    assert h.sn.stat("a").kind is Kind.ACTIVE


# -- several processes -----------------------------------------------------------------------------------------

_RACER = textwrap.dedent("""\
    import sys
    from unionfs.snapshots import Snapshotter, SnapshotError
    root, key, parent = sys.argv[1], sys.argv[2], sys.argv[3] or None
    sys.stdin.read()  # start together
    try:
        with Snapshotter(root) as sn:
            sn.prepare(key, parent)
        print("ok")
    except SnapshotError as exc:
        print(type(exc).__name__)
""")


def race(root: Path, jobs: list[tuple[str, str]]) -> list[str]:
    """Start one process per (key, parent), release them at once, return what each printed."""
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(root), key, parent], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for key, parent in jobs]
    try:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
            p.stdin = None
        out = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=120)
            assert p.returncode == 0, stderr
            out.append(stdout.strip())
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@check
def check_concurrent_prepare(h: Harness) -> None:
    """Processes racing to prepare one key: one wins, the others get AlreadyExists, nothing half-made remains;
    racing on distinct keys (and on a store nobody has created yet) all succeed."""
    fresh = h.base / "fresh-store"
    results = race(fresh, [(f"k{i}", "") for i in range(6)])
    assert results == ["ok"] * 6, results
    h.sn.prepare("base-a")
    h.sn.commit("base", "base-a")
    results = race(h.root, [("same", "base")] * 8)
    assert sorted(results) == ["AlreadyExists"] * 7 + ["ok"], results
    assert h.sn.stat("same").parent == "base"
    assert_store_consistent(h)
    with Snapshotter(fresh) as other:
        assert sorted(i.name for i in other.walk()) == [f"k{i}" for i in range(6)]
        assert not other.fsck()
        assert len(os.listdir(fresh / "snapshots")) == 6


# -- running one check -----------------------------------------------------------------------------------------


def run(name: str, base: str | os.PathLike[str]) -> None:
    h = Harness(base)
    try:
        CHECKS[name](h)
    finally:
        h.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in CHECKS:
        print(f"usage: conformance.py CHECK BASE_DIR\nchecks: {' '.join(sorted(CHECKS))}", file=sys.stderr)
        return 2
    try:
        run(argv[0], argv[1])
    except Skip as exc:
        print(exc)
        return SKIPPED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

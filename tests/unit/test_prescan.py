"""``-o prescan``: lookups answered from a table of the lower layers made at mount must resolve exactly as the
probing lookups do, over random stacks with whiteouts (both kinds, and AUFS markers with ``aufs``), opaque
directories and type conflicts, before and after changes in the upper layer."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from unit_tree import WHITEOUT, XWHITEOUT, Dir, Env, Symlink, as_nobody, readable_layers

from unionfs.layers import ROOT, Entry, Stack, join
from unionfs.prescan import Prescanned
from unionfs.whiteout import XattrFormat

NAMES = ["a", "b"]
#: AUFS markers: whiteouts of the names above, the opaque marker, and AUFS metadata (only a name, to hide)
AUFS_NAMES = [".wh.a", ".wh.b", ".wh..wh..opq", ".wh..wh.plnk"]


def _node(depth: int, xw_ok: bool, names: list[str]) -> st.SearchStrategy[Any]:
    leaves: list[st.SearchStrategy[Any]] = [st.sampled_from(["f1", "f2"]), st.just(WHITEOUT),
                                            st.just(Symlink("t"))]
    if xw_ok:
        leaves.append(st.just(XWHITEOUT))
    leaf = st.one_of(*leaves)
    if depth == 0:
        return leaf
    # directories twice as often: they make the cases
    return st.one_of(_dir(depth - 1, names), _dir(depth - 1, names), leaf)


def _dir(depth: int, names: list[str] = NAMES) -> st.SearchStrategy[Dir]:
    """A directory, plain, opaque, or holding xattr whiteouts (the two markers share one xattr)."""
    size = 2 if names is NAMES else 4
    return st.sampled_from(["plain", "opaque", "xw"]).flatmap(
        lambda kind: st.dictionaries(st.sampled_from(names), _node(depth, kind == "xw", names), max_size=size).map(
            lambda ch: Dir(ch, opaque=kind == "opaque", xwhiteouts=kind == "xw")))


LAYER = st.dictionaries(st.sampled_from(NAMES), _node(2, False, NAMES), min_size=1, max_size=2)
#: a layer whose directories may hold AUFS markers (and, in an upper layer, ordinary files of those names)
AUFS_LAYER = st.dictionaries(st.sampled_from(NAMES + AUFS_NAMES), _node(2, False, NAMES + AUFS_NAMES),
                             min_size=1, max_size=4)


def _describe(entry: Entry | None) -> Any:
    if entry is None:
        return None
    return (entry.layer, stat.S_IFMT(entry.st.st_mode), entry.st.st_ino, entry.dirs, sorted(entry.xattr_whiteouts),
            entry.opaque)


def _all_resolutions(stack: Stack, names: list[str] = NAMES) -> dict[bytes, Any]:
    """Every path a walk over the given stack reaches by lookup of every candidate name, with its Entry; the
    merged listing of each directory reached must name exactly the candidates that resolve, with their types."""
    out: dict[bytes, Any] = {ROOT: _describe(stack.root())}
    todo = [stack.root()]
    while todo:
        parent = todo.pop()
        resolved: dict[bytes, int] = {}
        for name in (n.encode() for n in names):
            child = stack.lookup(parent, name)
            out[join(parent.path, name)] = _describe(child)
            below = stack.below_upper(parent, name)
            out[join(parent.path, name) + b" (below upper)"] = _describe(below)
            if child is not None:
                resolved[name] = stat.S_IFMT(child.st.st_mode)
                if child.is_dir:
                    todo.append(child)
        listed = {name: ftype for name, (_layer, ftype) in stack.listdir(parent).items()}
        assert listed == resolved, (parent.path, listed, resolved)
    return out


def _compare(env: Env, aufs: bool = False) -> None:
    names = NAMES + AUFS_NAMES if aufs else NAMES
    probing = Stack(env.layer_dirs, env.stack.writable, env.stack.fmt, aufs=True) if aufs else env.stack
    table = Stack(env.layer_dirs, env.stack.writable, env.stack.fmt, lowers=Prescanned, aufs=aufs)
    try:
        assert probing.lowers is probing.probing
        probed = _all_resolutions(probing, names)
        assert isinstance(table.lowers, Prescanned) and len(table.lowers) >= 1
        assert _all_resolutions(table, names) == probed
    finally:
        table.close()
        if probing is not env.stack:
            probing.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(upper=LAYER, lowers=st.lists(LAYER, min_size=1, max_size=3), writable=st.booleans())
def test_prescanned_lookups_resolve_as_probing_ones(upper: dict[str, Any], lowers: list[dict[str, Any]],
                                                    writable: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="unionfs-prescan-") as tmp:
        env = Env(Path(tmp) / "env", upper, lowers, writable=writable)
        try:
            _compare(env)
        finally:
            env.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(upper=AUFS_LAYER, lowers=st.lists(AUFS_LAYER, min_size=1, max_size=3), writable=st.booleans())
@example(upper={".wh.a": "f1"}, lowers=[{".wh.a": "f1"}, {"a": "f2"}], writable=True)  # an upper name like a marker
@example(upper={"a": {}}, lowers=[{"a": {".wh..wh..opq": "f1", ".wh.b": WHITEOUT}}, {"a": {"b": "f1", "a": "f1"}}],
         writable=True)
def test_prescanned_lookups_resolve_as_probing_ones_with_aufs_markers(
        upper: dict[str, Any], lowers: list[dict[str, Any]], writable: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="unionfs-prescan-aufs-") as tmp:
        env = Env(Path(tmp) / "env", upper, lowers, writable=writable)
        try:
            _compare(env, aufs=True)
        finally:
            env.close()


def test_prescan_sees_upper_changes_and_copy_up(make_env: Any) -> None:
    env = make_env(upper={}, lowers=[{"d": Dir({"x": "1"}, xwhiteouts=True), "f": "1"},
                                     {"d": {"x": "2", "y": "2"}, "o": {"z": "z"}}], prescan=True)
    assert isinstance(env.stack.lowers, Prescanned)
    assert env.names("d") == {"x", "y"}
    env.union.copy_up(env.entry("d/x"))
    env.union.unlink(*env.parent("d/y"))
    env.union.mkdir(env.entry(""), b"new", stat.S_IFDIR | 0o755, 0, 0)
    assert env.entry("d/x").layer == 0
    assert env.resolve("d/y") is None
    assert env.entry("new").dirs == (0,)
    assert env.entry("d").dirs == (0, 1, 2)
    with_table = env.tree()
    probing = Stack(env.layer_dirs, True, env.stack.fmt)
    try:
        assert env.tree() == with_table
        env.stack = probing  # the same layers, every lookup probing them
        assert env.tree() == with_table
    finally:
        probing.close()


def test_prescan_counts_lower_paths(make_env: Any) -> None:
    env = make_env(upper={"u": "u"}, lowers=[{"a": {"b": "1"}, "w": WHITEOUT}, {"w": "hidden", "c": "2"}],
                   prescan=True)
    table = env.stack.lowers
    assert isinstance(table, Prescanned)
    assert len(table) == 4  # ".", "a", "a/b", "c"
    assert set(table.paths) == {ROOT, b"a", b"a/b", b"c"}


def test_prescan_missing_lower_object_counts_as_absent(make_env: Any) -> None:
    """A lower layer changed under the mount (not allowed, as for overlayfs): the name vanishes, no error."""
    env = make_env(lowers=[{"f": "1"}, {}], prescan=True)
    assert env.resolve("f") is not None
    os.unlink(env.lowers[0] / "f")
    assert env.resolve("f") is None


def _resolve_all(stack: Stack, paths: list[bytes]) -> list[Any]:
    out: list[Any] = []
    for path in paths:
        try:
            out.append(_describe(stack.resolve(path)))
        except OSError as exc:
            out.append(("error", exc.errno))
    return out


def test_regression_prescan_of_a_directory_the_server_may_not_read(tmp_path: Path) -> None:
    """A lower directory the server may not read or search (a rootless mount over a system tree): the mount
    works, and lookups in it fail as they do without the table (regression: the prescan raised EACCES and the
    mount failed)."""
    lowers = [{"open": {"f": "1"}, "closed": Dir({"secret": "s", "sub": {"g": "2"}}, mode=0o700),
               "noexec": Dir({"x": "3"}, mode=0o744)},
              {"closed": {"lower": "4"}, "open": {"h": "5"}}]
    paths = [b"open", b"open/f", b"open/h", b"closed", b"closed/secret", b"closed/sub/g", b"closed/lower",
             b"noexec", b"noexec/x", b"nothing"]
    with readable_layers({}, lowers) as layer_dirs:

        def compare() -> None:
            probing = Stack(layer_dirs, writable=False, fmt=XattrFormat.TRUSTED)
            table = Stack(layer_dirs, writable=False, fmt=XattrFormat.TRUSTED, lowers=Prescanned)
            assert isinstance(table.lowers, Prescanned) and table.lowers.closed == {b"closed"}, table.lowers
            want, got = _resolve_all(probing, paths), _resolve_all(table, paths)
            assert ("error", 13) in want, want  # premise: the directories do refuse this user
            assert got == want, (got, want)

        as_nobody(compare, "the unprivileged prescan differed")

"""The model of ``unionfs explore`` (:mod:`unionfs.explore_model`): the merged view as of each layer of a
hand-built stack and the marks of that layer (whiteouts of both kinds, an opaque directory, a directory
replaced by a file), the "changes only" filter, the inspect facts as of a layer; and random stacks whose
views are checked against the overlay resolver of :func:`unionfs.explain.explain` and whose marks are
counted against :func:`unionfs.analysis.analyze_dirs`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from unit_tree import WHITEOUT, XWHITEOUT, Dir, Symlink, build

from unionfs.analysis import analyze_dirs
from unionfs.explain import explain
from unionfs.explore_model import ROOT, ExploreModel, LayerView, Mark
from unionfs.layers import Stack
from unionfs.targets import from_layers
from unionfs.whiteout import XattrFormat

FMT = XattrFormat.TRUSTED
A, M, R, U = Mark.ADDED, Mark.MODIFIED, Mark.REMOVED, Mark.UNCHANGED

BASE = {"etc": {"passwd": b"root", "hosts": b"h" * 5}, "bin": {"sh": b"s" * 7, "ls": b"l"},
        "d": {"x": b"x", "e": {"z": b"z" * 3}}, "f": {"in": b"i"}}
LAYERS: list[dict[str, Any]] = [
    BASE,
    # etc/passwd changed, etc/new added, d whited out (all beneath it removed), f replaced by a link
    {"etc": {"passwd": b"root:2", "new": b"n"}, "d": WHITEOUT, "f": Symlink("etc")},
    # etc opaque (etc/hosts again, the rest hidden), an xattr whiteout of bin/sh
    {"etc": Dir({"hosts": b"H"}, opaque=True), "bin": Dir({"sh": XWHITEOUT}, xwhiteouts=True)},
]


def _model(tmp: Path, layers: list[dict[str, Any]]) -> ExploreModel:
    dirs = [os.fsencode(build(tmp / f"l{i}", tree)) for i, tree in enumerate(layers)]
    return ExploreModel(dirs, FMT)


def _marks(view: LayerView) -> dict[bytes, Mark]:
    """Every entry of the tree of ``view`` (shown or removed) and its mark, read through children()."""
    out: dict[bytes, Mark] = {}
    todo = [ROOT]
    while todo:
        for node in view.children(todo.pop()):
            out[node.path] = node.mark
            todo.append(node.path)
    return out


def test_the_view_and_marks_as_of_each_layer(tmp_path: Path) -> None:
    model = _model(tmp_path, LAYERS)
    assert len(model) == 3
    v0 = model.view(0)
    every = {b"etc", b"etc/passwd", b"etc/hosts", b"bin", b"bin/sh", b"bin/ls", b"d", b"d/x", b"d/e", b"d/e/z",
             b"f", b"f/in"}
    assert _marks(v0) == dict.fromkeys(every, A)

    v1 = model.view(1)
    assert _marks(v1) == {
        b"etc": U, b"etc/passwd": M, b"etc/hosts": U, b"etc/new": A, b"bin": U, b"bin/sh": U, b"bin/ls": U,
        b"d": R, b"d/x": R, b"d/e": R, b"d/e/z": R, b"f": M, b"f/in": R}
    assert [n.name for n in v1.children(ROOT)] == [b"bin", b"d", b"etc", b"f"]
    passwd = v1.node(b"etc/passwd")
    assert passwd is not None and (passwd.kind, passwd.size, passwd.layer) == ("file", 6, 1)
    hosts = v1.node(b"etc/hosts")
    assert hosts is not None and (hosts.size, hosts.layer, hosts.mark) == (5, 0, U)
    gone = v1.node(b"d/e/z")  # a removed entry keeps the copy it had
    assert gone is not None and (gone.kind, gone.size, gone.layer, gone.mark) == ("file", 3, 0, R)
    link = v1.node(b"f")
    assert link is not None and (link.kind, link.is_dir) == ("other", False)
    assert v1.counts() == {A: 1, M: 2, R: 5}

    v2 = model.view(2)
    assert _marks(v2) == {
        b"etc": M, b"etc/hosts": M, b"etc/passwd": R, b"etc/new": R, b"bin": U, b"bin/sh": R, b"bin/ls": U,
        b"f": U}
    assert v2.node(b"d") is None  # removed by the layer beneath: no longer in the view
    etc = v2.node(b"etc")
    assert etc is not None and etc.is_dir and etc.layer == 2


def test_the_marks_count_what_unionfs_layers_counts(tmp_path: Path) -> None:
    model = _model(tmp_path, LAYERS)
    for k in range(len(model)):
        counts = model.view(k).counts()
        f = model.figures(k)
        assert (counts[A], counts[M], counts[R]) == (f.added.count, f.modified.count, f.removed.count)


def test_changes_only_keeps_the_changes_and_the_directories_holding_them(tmp_path: Path) -> None:
    model = _model(tmp_path, LAYERS)
    v1 = model.view(1)
    assert [n.name for n in v1.children(ROOT, True)] == [b"d", b"etc", b"f"]  # bin holds no change
    assert [(n.name, n.mark) for n in v1.children(b"etc", True)] == [(b"new", A), (b"passwd", M)]
    assert [n.name for n in v1.children(b"d", True)] == [b"e", b"x"]
    assert not v1.has_children(b"bin", True) and v1.has_children(b"bin")
    assert v1.has_children(b"etc", True)
    v2 = model.view(2)
    assert [(n.name, n.mark) for n in v2.children(ROOT, True)] == [(b"bin", U), (b"etc", M)]
    assert [(n.name, n.mark) for n in v2.children(b"bin", True)] == [(b"sh", R)]
    assert [n.name for n in v2.children(b"etc")] == [b"hosts", b"new", b"passwd"]


def test_inspect_facts_are_those_of_the_stack_as_of_the_layer(tmp_path: Path) -> None:
    model = _model(tmp_path, LAYERS)
    d = model.explain(0, b"etc/passwd")
    assert d["layer_count"] == 1 and d["found"]["label"] == "layer 1" and d["found"]["size"] == 4
    d = model.explain(1, b"etc/passwd")
    assert d["layer_count"] == 2 and d["found"]["label"] == "layer 2" and d["found"]["size"] == 6
    assert [(h["layer"], h["reason"]["kind"]) for h in d["shadowed"]] == [(1, "shadowed")]
    d = model.explain(2, b"etc/passwd")
    assert d["found"] is None and d["absent"]["kind"] == "opaque"
    d = model.explain(1, b"d/e")
    assert d["found"] is None and d["absent"]["kind"] == "whiteout"
    assert model.explain(2, ROOT)["found"]["type"] == "directory"
    assert d["next_write"]["action"] == "erofs"


def test_a_writable_target_is_writable_only_as_of_its_top_layer(tmp_path: Path) -> None:
    low = build(tmp_path / "low", {"a": b"1"})
    up = build(tmp_path / "up", {"b": b"2"})
    model = ExploreModel.from_target(from_layers([str(low)], str(up)))
    assert [i.label for i in model.infos] == ["lower 1", "upper"] and model.writable
    assert model.explain(1, b"a")["next_write"]["action"] == "copy-up"
    assert model.explain(0, b"a")["next_write"]["action"] == "erofs"
    assert [(n.name, n.mark) for n in model.view(1).children(ROOT)] == [(b"a", U), (b"b", A)]


def test_views_are_kept_and_rebuilt(tmp_path: Path) -> None:
    model = _model(tmp_path, [{"a": {str(i): b"" for i in range(3)}}] * 6)
    first = model.view(5)
    assert model.view(5) is first
    for k in range(5):
        model.view(k)
    again = model.view(5)  # (dropped meanwhile: stacked again)
    assert again is not first and _marks(again) == _marks(first)
    with pytest.raises(IndexError):
        model.view(6)
    with pytest.raises(ValueError, match="no layers"):
        ExploreModel([], FMT)


# -- random stacks against the overlay resolver ------------------------------------------------------------------

NAMES = ["a", "b", "c"]
CONTENTS = [b"", b"x" * 3, b"y" * 5]


def _node(depth: int, xw_ok: bool) -> st.SearchStrategy[Any]:
    leaves: list[st.SearchStrategy[Any]] = [st.sampled_from(CONTENTS), st.just(WHITEOUT), st.just(Symlink("t"))]
    if xw_ok:
        leaves.append(st.just(XWHITEOUT))
    leaf = st.one_of(*leaves)
    if depth == 0:
        return leaf
    return st.one_of(_dir(depth - 1), _dir(depth - 1), leaf)


def _dir(depth: int) -> st.SearchStrategy[Dir]:
    return st.sampled_from(["plain", "plain", "opaque", "xw"]).flatmap(
        lambda kind: st.dictionaries(st.sampled_from(NAMES), _node(depth, kind == "xw"), max_size=3).map(
            lambda ch: Dir(ch, opaque=kind == "opaque", xwhiteouts=kind == "xw")))


LAYER = st.dictionaries(st.sampled_from(NAMES), _node(2, False), max_size=3)
_TYPES = {"directory": "dir", "regular file": "file"}


def _resolved(dirs: list[bytes], k: int) -> dict[bytes, tuple[str, int]]:
    """What the overlay resolver shows of the stack of layers 0..k: path -> (kind, layer of its copy)."""
    names: set[bytes] = set()
    for top in dirs[: k + 1]:
        for where, subdirs, files in os.walk(top):
            rel = os.path.relpath(where, top)
            for name in subdirs + files:
                names.add(name if rel == b"." else rel + b"/" + name)
    stack = Stack(list(reversed(dirs[: k + 1])), False, FMT)
    try:
        out = {}
        for path in names:
            found = explain(stack, path).found
            if found is not None:
                out[path] = (_TYPES.get(found.type, "other"), k - found.layer)
        return out
    finally:
        stack.close()


def _check(tmp: Path, layers: list[dict[str, Any]]) -> None:
    dirs = [os.fsencode(build(tmp / f"l{i}", tree)) for i, tree in enumerate(layers)]
    model = ExploreModel(dirs, FMT)
    analysis = analyze_dirs(dirs, FMT)
    before: dict[bytes, tuple[str, int]] = {}
    for k in range(len(dirs)):
        view = model.view(k)
        now = _resolved(dirs, k)
        assert {p: (v.kind, v.layer) for p, v in view.entries.items()} == now
        marks = _marks(view)
        shown = {p for p, m in marks.items() if m != R}
        assert shown == set(now)
        # added: new in the view; removed: what the view beneath showed and this one does not
        assert {p for p, m in marks.items() if m == A} == set(now) - set(before)
        assert {p for p, m in marks.items() if m == R} == set(before) - set(now)
        # modified: shown before and now, and this layer holds the path
        for p, m in marks.items():
            if m == M:
                assert p in before and p in now and os.path.lexists(os.path.join(dirs[k], p))
            elif m == U:
                assert now[p][1] < k or now[p][0] == "dir"
        f = analysis.layers[k]
        counts = view.counts()
        assert (counts[A], counts[M], counts[R]) == (f.added.count, f.modified.count, f.removed.count)
        # changes only: exactly the changed paths and their ancestors
        seen: set[bytes] = set()
        todo = [ROOT]
        while todo:
            for node in view.children(todo.pop(), True):
                seen.add(node.path)
                todo.append(node.path)
        changed = {p for p, m in marks.items() if m != U}
        ancestors = {p.rsplit(b"/", i)[0] for p in changed for i in range(1, p.count(b"/") + 1)}
        assert seen == changed | ancestors
        before = now


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(LAYER, min_size=1, max_size=4))
@example(layers=[{"a": {"b": b"x" * 3}}, {"a": Dir({"c": b"y" * 5}, opaque=True)}, {"a": {"b": b"x" * 3}}])
@example(layers=[{"a": {"b": {"c": b""}}}, {"a": b"y" * 5}, {"a": {"b": WHITEOUT}}])
def test_random_stacks_agree_with_the_resolver(layers: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory(prefix="unionfs-explore-") as tmp:
        _check(Path(tmp), layers)

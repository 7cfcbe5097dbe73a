"""Layer analysis (:mod:`unionfs.analysis`) on layer directories: small stacks whose figures are worked out by
hand (whiteouts of both kinds, opaque directories, a directory replaced by a file and back, hard links), and
random stacks whose every figure is recomputed from the merged views the overlay resolver
(:class:`unionfs.layers.Stack`) gives of each prefix of the stack; dive's CI rules and its byte sizes."""

from __future__ import annotations

import hashlib
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from unit_tree import WHITEOUT, XWHITEOUT, Dir, Symlink, build

from unionfs.analysis import Analysis, analyze_dirs, evaluate, parse_bytes
from unionfs.layers import Stack, join
from unionfs.whiteout import XattrFormat

FMT = XattrFormat.TRUSTED


def _analyze(tmp: Path, layers: list[dict[str, Any]]) -> Analysis:
    """``layers`` lowest first."""
    dirs = [os.fsencode(build(tmp / f"l{i}", tree)) for i, tree in enumerate(layers)]
    return analyze_dirs(dirs, FMT)


def _figs(a: Analysis) -> list[dict[str, Any]]:
    return [{"size": f.size, "added": (f.added.count, f.added.bytes), "modified": (f.modified.count, f.modified.bytes),
             "replaced": f.replaced_bytes, "removed": (f.removed.count, f.removed.bytes),
             "unchanged": (f.unchanged.count, f.unchanged.bytes)} for f in a.layers]


def _fig(size: int, added: tuple[int, int] = (0, 0), modified: tuple[int, int] = (0, 0), replaced: int = 0,
         removed: tuple[int, int] = (0, 0), unchanged: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    return {"size": size, "added": added, "modified": modified, "replaced": replaced, "removed": removed,
            "unchanged": unchanged}


def test_xattr_whiteouts_and_a_directory_removed_whole(tmp_path: Path) -> None:
    a = _analyze(tmp_path, [
        {"d": {"x": b"1" * 10, "y": b"2" * 20, "e": {"z": b"3" * 30}}, "k": b"k" * 7},
        # an xattr whiteout of d/x; d/e whited out (e and e/z removed)
        {"d": Dir({"x": XWHITEOUT, "e": WHITEOUT}, xwhiteouts=True)},
        # d whited out: d and d/y removed
        {"d": WHITEOUT},
    ])
    assert _figs(a) == [
        _fig(67, added=(6, 67)),  # d, d/x, d/y, d/e, d/e/z, k
        _fig(0, removed=(3, 40)),  # d/x (10), d/e (0), d/e/z (30)
        _fig(0, removed=(2, 20)),  # d, d/y
    ]
    # every file but k has a copy and a removal: wasted 10 + 20 + 30; smallest copies: 0, 0, 0 and k's 7
    assert (a.wasted_bytes, a.reclaimable_bytes, a.final_size) == (60, 60, 7)
    assert a.efficiency == pytest.approx(7 / 67)
    # the user layers hold no bytes: the wasted share is infinite (dive divides by zero too)
    assert a.user_size == 0 and math.isinf(a.wasted_percent)
    assert a.to_json()["summary"]["wasted_percent"] is None


def test_a_directory_replaced_by_a_file_and_back(tmp_path: Path) -> None:
    a = _analyze(tmp_path, [
        {"d": {"x": b"x" * 10}, "s": Symlink("target")},
        {"d": b"f" * 5, "s": {"in": b"i" * 3}},  # d now a file (d/x removed), s a directory
        {"d": {"y": b"y" * 2}},  # d a directory again (the file's 5 B gone)
    ])
    assert _figs(a) == [
        _fig(10, added=(3, 10)),  # d, d/x, s (a symbolic link: 0 B)
        # d (5 B replacing a directory: 0 B), s (a directory replacing the link); s/in added; d/x removed
        _fig(8, added=(1, 3), modified=(2, 5), replaced=0, removed=(1, 10)),
        _fig(2, added=(1, 2), modified=(1, 0), replaced=5),  # d (replacing the 5 B file), d/y added
    ]
    # copies: d/x 10, 0; s 0, 0 (a link, then a directory); d 5, 0 (replaced by a directory); s/in 3; d/y 2
    assert a.wasted_bytes == 15 and a.reclaimable_bytes == 15 and a.final_size == 5
    assert a.efficiency == pytest.approx(5 / 20)
    assert [(w.path, w.copies, w.wasted_bytes, w.removed) for w in a.wasted_files] == [
        (b"d/x", 2, 10, True), (b"d", 2, 5, True)]


def test_hard_links_count_once(tmp_path: Path) -> None:
    base = build(tmp_path / "l0", {"a": b"h" * 100})
    os.link(base / "a", base / "b")
    top = build(tmp_path / "l1", {"c": b"h" * 100})
    a = analyze_dirs([os.fsencode(base), os.fsencode(top)], FMT)
    # a carries the 100 B, b (its other name) none, as in a layer tar
    assert _figs(a) == [_fig(100, added=(2, 100)), _fig(100, added=(1, 100))]
    # the content is stored in both layers: one copy too many
    assert (a.duplicated.count, a.duplicated.bytes) == (1, 100)
    assert [sorted(d.copies) for d in a.duplicates] == [[(1, b"a"), (2, b"c")]]
    assert a.wasted_bytes == 0 and a.efficiency == 1.0


def test_unchanged_copies(tmp_path: Path) -> None:
    a = _analyze(tmp_path, [{"e": {"c": b"same" * 10, "o": b"old!" * 10}},
                            {"e": {"c": b"same" * 10, "o": b"new!" * 10}}])
    # both modified (40 B each); c holds the bytes it replaces
    assert _figs(a)[1] == _fig(80, modified=(2, 80), replaced=80, unchanged=(1, 40))
    assert (a.duplicated.count, a.duplicated.bytes) == (1, 40)
    assert a.wasted_bytes == 160 and a.wasted_percent == 2.0 and a.efficiency == 0.5


def test_empty_stack_and_layers(tmp_path: Path) -> None:
    a = _analyze(tmp_path, [{}, {"d": {}}])
    assert a.efficiency == 1.0 and a.wasted_bytes == 0 and a.wasted_percent == 0.0 and a.total_size == 0
    assert _figs(a)[1] == _fig(0, added=(1, 0))


# -- dive's CI rules and byte sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("20MB", 20_000_000), ("20mb", 20_000_000), ("20M", 20_000_000), ("20MiB", 20 * 2**20), ("20 mi", 20 * 2**20),
    ("1.5k", 1500), ("1.5KiB", 1536), ("100", 100), ("100B", 100), ("2GB", 2 * 10**9), ("1,000", 1000),
    ("3TiB", 3 * 2**40), (".5kb", 500),
])
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "MB", "20 XB", "-1", "1e3", "twenty"])
def test_parse_bytes_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="no number of bytes"):
        parse_bytes(text)


def test_rules(tmp_path: Path) -> None:
    a = _analyze(tmp_path, [{"f": b"x" * 100}, {"f": b"y" * 100}])  # wasted 200 of 100 user bytes, efficiency 0.5
    got = {r.name: r.status for r in evaluate(a)}
    assert got == {"lowest-efficiency": "FAIL", "highest-wasted-bytes": "SKIP", "highest-wasted-percent": "FAIL"}
    got = {r.name: r.status for r in evaluate(a, 0.5, 200, 2.0)}  # the limits themselves are allowed
    assert got == {"lowest-efficiency": "PASS", "highest-wasted-bytes": "PASS", "highest-wasted-percent": "PASS"}
    got = {r.name: r.status for r in evaluate(a, 0.51, 199, 1.99)}
    assert got == {"lowest-efficiency": "FAIL", "highest-wasted-bytes": "FAIL", "highest-wasted-percent": "FAIL"}
    got = {r.name: r.status for r in evaluate(a, None, None, None)}
    assert set(got.values()) == {"SKIP"}


# -- random stacks against the overlay resolver ------------------------------------------------------------------

NAMES = ["a", "b", "c"]
CONTENTS = [b"", b"x" * 3, b"y" * 3, b"z" * 8, b"w" * 13]


def _node(depth: int, xw_ok: bool) -> st.SearchStrategy[Any]:
    leaves: list[st.SearchStrategy[Any]] = [st.sampled_from(CONTENTS), st.sampled_from(CONTENTS), st.just(WHITEOUT),
                                            st.just(Symlink("t"))]
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


def _view(dirs_top_first: list[bytes]) -> dict[bytes, tuple[bool, int, int, tuple[int, ...]]]:
    """The merged view of the layers ``dirs_top_first`` by the overlay resolver: path -> (a directory, size,
    the layer providing it, the layers merged into a directory), layers counted from the lowest at 0."""
    n = len(dirs_top_first)
    if not n:
        return {}
    stack = Stack(dirs_top_first, False, FMT)
    try:
        out: dict[bytes, tuple[bool, int, int, tuple[int, ...]]] = {}
        root = stack.root()
        assert root is not None
        todo = [root]
        while todo:
            parent = todo.pop()
            for name in stack.listdir(parent):
                child = stack.lookup(parent, name)
                assert child is not None
                size = child.st.st_size if stat.S_ISREG(child.st.st_mode) else 0
                out[join(parent.path, name)] = (child.is_dir, size, n - 1 - child.layer,
                                                tuple(n - 1 - i for i in child.dirs))
                if child.is_dir:
                    todo.append(child)
        return out
    finally:
        stack.close()


def _stored(top: Path) -> dict[bytes, tuple[str, int]]:
    """A layer's entries: path -> ("dir" | "file" | "other" | "whiteout", size)."""
    out: dict[bytes, tuple[str, int]] = {}
    for where, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(where) / name
            rel = os.fsencode(p.relative_to(top))
            st_ = p.lstat()
            if stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", 0)
            elif stat.S_ISCHR(st_.st_mode) and st_.st_rdev == 0:
                out[rel] = ("whiteout", 0)
            elif stat.S_ISREG(st_.st_mode):
                try:
                    os.getxattr(p, FMT.whiteout, follow_symlinks=False)
                    xw = os.getxattr(p.parent, FMT.opaque) == b"x"
                except OSError:
                    xw = False
                out[rel] = ("whiteout", 0) if xw else ("file", st_.st_size)
            else:
                out[rel] = ("other", 0)
    return out


def _content(top: Path, path: bytes) -> bytes:
    return (top / os.fsdecode(path)).read_bytes()


def _check(tmp: Path, layers: list[dict[str, Any]]) -> None:
    tops = [build(tmp / f"l{i}", tree) for i, tree in enumerate(layers)]
    dirs = [os.fsencode(t) for t in tops]
    a = analyze_dirs(dirs, FMT)
    views = [_view(dirs[: k + 1][::-1]) for k in range(len(dirs))]
    copies: dict[bytes, list[int]] = {}
    contents: dict[bytes, list[int]] = {}
    for k, top in enumerate(tops):
        before = views[k - 1] if k else {}
        after = views[k]
        stored = _stored(top)
        fig = a.layers[k]
        assert fig.size == sum(size for _, size in stored.values())
        assert fig.entries == len(stored)
        added = [p for p in after if p not in before]
        assert all(after[p][2] == k for p in added)
        assert (fig.added.count, fig.added.bytes) == (len(added), sum(after[p][1] for p in added))
        removed = [p for p in before if p not in after]
        assert (fig.removed.count, fig.removed.bytes) == (len(removed), sum(before[p][1] for p in removed))
        # modified: a new copy from this layer, but for a directory merged with the one beneath
        modified = [p for p in after if p in before and after[p][2] == k
                    and not (after[p][0] and before[p][0] and before[p][2] in after[p][3])]
        assert (fig.modified.count, fig.modified.bytes) == (len(modified), sum(after[p][1] for p in modified))
        assert fig.replaced_bytes == sum(before[p][1] for p in modified)
        unchanged = [p for p in modified if not after[p][0] and not before[p][0] and after[p][1]
                     and stored[p][0] == "file" and _stored(tops[before[p][2]])[p][0] == "file"
                     and _content(top, p) == _content(tops[before[p][2]], p)]
        assert (fig.unchanged.count, fig.unchanged.bytes) == (len(unchanged), sum(after[p][1] for p in unchanged))
        # copies: what the layer stores, and a copy of 0 B where a file of the view beneath goes away
        for p, (kind, size) in stored.items():
            if kind in ("file", "other"):
                copies.setdefault(p, []).append(size)
            if kind == "file" and size:
                contents.setdefault(hashlib.sha256(_content(top, p)).digest() + size.to_bytes(8), []).append(k)
        for p, (is_dir, _size, _, _) in before.items():
            if not is_dir and stored.get(p, ("whiteout", 0))[0] not in ("file", "other") and (
                    p not in after or after[p][0]):
                copies.setdefault(p, []).append(0)
        # the merged size follows from the layer's figures
        assert sum(s for d, s, _, _ in after.values() if not d) == sum(s for d, s, _, _ in before.values() if not d) \
            + fig.added.bytes + fig.modified.bytes - fig.replaced_bytes - fig.removed.bytes
    final = views[-1]
    assert a.final_size == sum(s for d, s, _, _ in final.values() if not d)
    assert a.total_size == sum(f.size for f in a.layers) and a.user_size == sum(f.size for f in a.layers[1:])
    visible = {p: s for p, (d, s, _, _) in final.items() if not d}
    assert a.wasted_bytes == sum(sum(c) for c in copies.values() if len(c) > 1)
    assert a.reclaimable_bytes == sum(sum(c) - visible.get(p, 0) for p, c in copies.items())
    assert a.reclaimable_bytes == a.total_size - a.final_size <= a.wasted_bytes
    cumulative = sum(sum(c) for c in copies.values())
    assert a.efficiency == pytest.approx(sum(min(c) for c in copies.values()) / cumulative if cumulative else 1.0)
    assert 0.0 <= a.efficiency <= 1.0
    # duplicated: every copy of a content stored in several layers, less one
    dup = [(len(ks), key) for key, ks in contents.items() if len(set(ks)) > 1]
    assert a.duplicated.count == sum(n - 1 for n, _ in dup)
    assert a.duplicated.bytes == sum((n - 1) * int.from_bytes(key[32:]) for n, key in dup)
    assert {d.digest for d in a.duplicates} == {"sha256:" + key[:32].hex() for _, key in dup}
    assert sorted((w.path, w.copies, w.wasted_bytes) for w in a.wasted_files) == sorted(
        (p, len(c), sum(c)) for p, c in copies.items() if len(c) > 1 and sum(c))
    if len(layers) == 1:
        assert a.wasted_bytes == 0 == a.reclaimable_bytes and a.efficiency == 1.0 and a.wasted_percent == 0.0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(LAYER, min_size=1, max_size=4))
@example(layers=[{"a": {"b": b"x" * 3}}, {"a": Dir({"c": b"y" * 3}, opaque=True)}, {"a": {"b": b"x" * 3}}])
@example(layers=[{"a": {"b": {"c": b"z" * 8}}}, {"a": b"w" * 13}, {"a": {"b": WHITEOUT}}])
def test_random_stacks_agree_with_the_merged_views(layers: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory(prefix="unionfs-analysis-") as tmp:
        _check(Path(tmp), layers)

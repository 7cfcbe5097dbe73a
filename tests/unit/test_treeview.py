"""The model of `unionfs tree` (unionfs.treeview) on hand-built stacks, every reason a name or copy is hidden, a
randomised check against Stack.resolve and the layer directories, and the command's pictures: plain text with no
escape codes, SVG parsed as XML, JSON."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unit_tree import WHITEOUT, XWHITEOUT, Dir, Symlink, build

from unionfs import tree_cli, treeview
from unionfs.layers import ROOT, Stack
from unionfs.treeview import Node, NotInView, Tree, escape
from unionfs.whiteout import XattrFormat

SVG = "{http://www.w3.org/2000/svg}"


@contextlib.contextmanager
def stack_of(trees: list[dict[str, Any]], writable: bool = True) -> Iterator[tuple[Stack, list[str]]]:
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [str(build(Path(tmp) / f"layer{i}", t)) for i, t in enumerate(trees)]
        stack = Stack([os.fsencode(d) for d in dirs], writable, XattrFormat.TRUSTED)
        try:
            yield stack, dirs
        finally:
            stack.close()


def by_path(tree: Tree) -> dict[bytes, Node]:
    return {n.path: n for n in tree.root.walk()}


# -- the model, by hand ---------------------------------------------------------------------------------------


def test_visible_entries_their_layers_and_what_they_are() -> None:
    trees = [{"new": "upper data"}, {"f": "l1 copy", "d": {"a": "1"}, "link": Symlink("f"), "op": Dir({}, opaque=True)},
             {"f": "l2", "d": {"b": "22"}, "op": {"x": "gone"}}]
    with stack_of(trees) as (stack, _dirs):
        tree = treeview.build(stack)
        nodes = by_path(tree)
        assert sorted(nodes) == [b".", b"d", b"d/a", b"d/b", b"f", b"link", b"new", b"op"]
        assert all(n.visible and not n.shadowed for n in nodes.values())  # (no --all: nothing hidden)
        assert (nodes[b"new"].layer, nodes[b"new"].type, nodes[b"new"].size) == (0, "regular file", 10)
        assert (nodes[b"f"].layer, nodes[b"f"].size) == (1, 7)
        assert nodes[b"d"].merged == (1, 2) and not nodes[b"d"].opaque
        assert (nodes[b"d/a"].layer, nodes[b"d/b"].layer) == (1, 2)
        assert nodes[b"link"].type == "symlink" and nodes[b"link"].target == b"f"
        assert nodes[b"op"].opaque and nodes[b"op"].merged == (1,) and nodes[b"op"].children == ()
        assert [c.name for c in tree.root.children] == sorted(c.name for c in tree.root.children)
        assert [la.label for la in tree.layers] == ["upper", "lower 1", "lower 2"]


def test_every_reason_with_all() -> None:
    trees = [
        {"wh": WHITEOUT, "op": Dir({"kept": "k"}, opaque=True)},
        {"f": "top", "nd": {}, "xd": Dir({"xw": XWHITEOUT}, xwhiteouts=True)},
        {"f": "bottom!", "wh": "whited", "op": {"under": "u"}, "nd": "a file", "xd": {"xw": "x"}},
        {"nd": {"deep": "d"}},
    ]
    with stack_of(trees) as (stack, _dirs):
        nodes = by_path(treeview.build(stack, show_all=True))
        # a file shadowed by the same name in a layer above
        [c] = nodes[b"f"].shadowed
        assert (c.layer, c.type, c.size, c.reason.kind, c.reason.by) == (2, "regular file", 7, "shadowed", 1)
        assert c.text == "shadowed by layer #1"
        # a whiteout: the name is hidden, its copy named with the whiteout's layer
        wh = nodes[b"wh"]
        assert not wh.visible and wh.layer == 2 and wh.reason is not None
        assert (wh.reason.kind, wh.reason.by) == ("whiteout", 0) and wh.reason_text == "whited out by layer #0"
        # an xattr whiteout in a directory marked as holding some
        xw = nodes[b"xd/xw"]
        assert not xw.visible and xw.reason is not None and (xw.reason.kind, xw.reason.by) == ("whiteout", 1)
        # an opaque directory: the lower directory is a shadowed copy, its names hidden
        op = nodes[b"op"]
        assert op.visible and op.opaque and [(c.layer, c.reason.kind) for c in op.shadowed] == [(2, "opaque")]
        under = nodes[b"op/under"]
        assert not under.visible and under.reason is not None and (under.reason.kind, under.reason.by,
                                                                   under.reason.at) == ("opaque", 0, b"op")
        assert under.reason_text == "below the opaque directory op of layer #0"
        assert nodes[b"op/kept"].visible
        # a non-directory between two directories: the lowest is not merged, its names are hidden
        nd = nodes[b"nd"]
        assert nd.merged == (1,)
        assert {c.layer: c.reason.kind for c in nd.shadowed} == {2: "shadowed", 3: "non-directory"}
        deep = nodes[b"nd/deep"]
        assert not deep.visible and deep.reason is not None
        assert (deep.reason.kind, deep.reason.by, deep.reason_text) == ("non-directory", 2,
                                                                         "nd is not a directory in layer #2")
        # a lone whiteout of nothing is no name
        assert b"gone" not in nodes
        text = treeview.plain(treeview.build(stack, show_all=True))
        assert "wh  #2 lower 2  6 B  hidden: whited out by layer #0" in text
        assert "#2 lower 2: regular file, 7 B  shadowed by layer #1" in text


def test_depth_and_a_path_inside() -> None:
    trees = [{}, {"a": {"b": {"c": {"d": "x"}}}}, {"a": {"z": ""}}]
    with stack_of(trees) as (stack, _dirs):
        top = treeview.build(stack, depth=0)
        assert top.root.children == () and top.root.truncated
        one = treeview.build(stack, depth=1)
        assert [n.path for n in one.root.walk()] == [b".", b"a"] and one.root.children[0].truncated
        inner = treeview.build(stack, b"/a/b/", depth=1)
        assert inner.root.path == b"a/b" and [n.path for n in inner.root.walk()] == [b"a/b", b"a/b/c"]
        full = treeview.build(stack, b"a")
        assert not any(n.truncated for n in full.root.walk())
        assert [n.path for n in full.root.walk()] == [b"a", b"a/b", b"a/b/c", b"a/b/c/d", b"a/z"]
        leaf = treeview.build(stack, b"a/b/c/d")
        assert leaf.root.type == "regular file" and leaf.root.children == ()
        with pytest.raises(ValueError, match="depth"):
            treeview.build(stack, depth=-1)
        with pytest.raises(ValueError, match=r"\.\."):
            treeview.build(stack, b"a/../a")


def test_a_path_not_in_the_view_is_one_line() -> None:
    with stack_of([{"f": WHITEOUT}, {"f": "x"}]) as (stack, _dirs):
        with pytest.raises(NotInView, match=r"^/f: not in the merged view \(whited out by layer #0\)$"):
            treeview.build(stack, b"f")
        with pytest.raises(NotInView, match=r"^/nope: not in the merged view \(not in any layer\)$"):
            treeview.build(stack, b"nope")


def test_names_are_shown_escaped() -> None:
    assert escape(b"plain name") == "plain name"
    assert escape("é ü".encode()) == "é ü"
    assert escape(b"bad\xff") == "bad\\xff"
    assert escape(b"esc\x1b[31m\n\t") == "esc\\x1b[31m\\x0a\\x09"
    assert escape(b"back\\slash") == "back\\\\slash"
    assert escape("\u202e".encode()) == "\\u202e"  # (a right-to-left override is not printed as is)
    # every name maps to a distinct printable string
    names = [b"a\\x41", b"a\x41", b"a\\\x41", b"\xc3", b"\\xc3"]
    shown = [escape(n) for n in names]
    assert len(set(shown)) == len(names) and all(s.isprintable() for s in shown)


# -- a randomised check ---------------------------------------------------------------------------------------

_PATHS = ["a", "b", "a/a", "a/b", "b/a", "a/a/a"]
_KINDS = ["none", "none", "file", "dir", "dir", "dir", "opaque", "xdir", "link", "whiteout", "xwhiteout"]


def _node(kind: str, children: dict[str, Any]) -> Any:
    if kind in ("dir", "opaque", "xdir"):
        return Dir(children, opaque=kind == "opaque", xwhiteouts=kind == "xdir")
    return {"file": "hello", "link": Symlink("a"), "whiteout": WHITEOUT, "xwhiteout": XWHITEOUT}[kind]


def _to_tree(kinds: dict[str, str], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, kind in kinds.items():
        head, _, name = path.rpartition("/")
        if head == prefix and kind != "none":
            out[name] = _node(kind, _to_tree(kinds, path) if kind in ("dir", "opaque", "xdir") else {})
    return out


_layer = st.fixed_dictionaries({p: st.sampled_from(_KINDS) for p in _PATHS}).map(_to_tree)


def _is_marker(p: str, parent_marked: bool) -> bool:
    s = os.lstat(p)
    if stat.S_ISCHR(s.st_mode) and s.st_rdev == 0:
        return True
    return parent_marked and stat.S_ISREG(s.st_mode) and s.st_size == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees=st.lists(_layer, min_size=3, max_size=3), writable=st.booleans())
def test_the_tree_agrees_with_the_stack(trees: list[dict[str, Any]], writable: bool) -> None:
    with stack_of(trees, writable) as (stack, dirs):
        tree = treeview.build(stack, show_all=True)
        assert treeview.build(stack, show_all=True) == tree  # deterministic
        json.dumps(tree.to_json())
        plain = treeview.build(stack)
        assert [n.path for n in plain.root.walk()] == [n.path for n in tree.root.walk() if n.visible]
        for node in tree.root.walk():
            entry = stack.resolve(node.path)
            parent = stack.resolve(node.path.rpartition(b"/")[0] or ROOT) if node.path != ROOT else None
            if node.visible:
                # every visible entry comes from the layer Stack.resolve finds, as the type it has there
                assert entry is not None and entry.layer == node.layer, node.path
                assert entry.is_dir == node.is_dir
                if entry.is_dir:
                    assert node.merged == entry.dirs
                    listed = stack.listdir(entry)
                    assert {c.name for c in node.children if c.visible} == set(listed), node.path
                    # every name of a merging layer's directory shows, or is listed hidden, or is a marker
                    names = {c.name for c in node.children}
                    for i in entry.dirs:
                        where = os.path.join(dirs[i], os.fsdecode(node.path))
                        marked = i in entry.xattr_whiteouts
                        for name in os.listdir(where):
                            assert os.fsencode(name) in names or _is_marker(os.path.join(where, name), marked), (
                                node.path, i, name)
                for c in node.shadowed:
                    assert c.layer > node.layer and c.reason.by is not None and c.reason.by < c.layer
            else:
                # every hidden name is absent from the merged view, yet its layer holds it
                assert entry is None, node.path
                assert parent is not None and node.path.rpartition(b"/")[2] not in stack.listdir(parent)
                assert node.shadowed and node.layer == node.shadowed[0].layer
                for c in node.shadowed:
                    assert os.path.lexists(os.path.join(dirs[c.layer], os.fsdecode(node.path)))
                assert node.reason is not None and node.reason_text


# -- the command's pictures -------------------------------------------------------------------------------------

MARKUP = b"[bold red]not markup[link=x]"


def _layers(tmp_path: Path) -> list[Path]:
    trees = [{"new": "u"}, {"f": "l1", "gone": WHITEOUT, MARKUP.decode(): "m", "op": Dir({}, opaque=True)},
             {"f": "l2 longer", "gone": "was here", "op": {"h": "hidden"}}]
    return [build(tmp_path / name, t) for name, t in zip(("up", "l1", "l2"), trees, strict=True)]


def _run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    status = tree_cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_plain_output_and_svg(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    up, l1, l2 = _layers(tmp_path)
    (l1 / os.fsdecode(b"raw\xff\x1b[2J")).write_text("x")
    svg = tmp_path / "tree.svg"
    status, out, err = _run(capsys, "--layers", f"{l1}:{l2}", "--upper", up, "--all", "--svg", svg)
    assert status == 0, err
    assert "\x1b" not in out  # piped: no escape codes, even for a name holding one
    lines = out.splitlines()
    assert lines[0] == "layers, top first:"
    assert lines[1:4] == [f"  #0 upper  {up}  (writable)", f"  #1 lower 1  {l1}", f"  #2 lower 2  {l2}"]
    assert f"{MARKUP.decode()}  #1 lower 1  1 B" in out
    assert "raw\\xff\\x1b[2J  #1 lower 1  1 B" in out
    assert "gone  #2 lower 2  8 B  hidden: whited out by layer #1" in out
    assert "h  #2 lower 2  6 B  hidden: below the opaque directory op of layer #1" in out

    root = ET.parse(svg).getroot()
    assert root.tag == f"{SVG}svg"
    texts = [(el.get("class") or "", "".join(el.itertext()).replace("\xa0", " ")) for el in root.iter(f"{SVG}text")]
    joined = "\n".join(t for _, t in texts)
    for name in ("new", "f", "gone", "op/", "h", MARKUP.decode(), "raw\\xff\\x1b[2J"):
        assert any(t.strip() == name or t.strip() == name.rstrip("/") + "/" for _, t in texts), name
    for i, (label, path) in enumerate((("upper", up), ("lower 1", l1), ("lower 2", l2))):
        assert f"#{i} {label}" in joined and str(path) in joined
    # hidden names are struck through; the layers have colours of their own
    style = "".join(el.text or "" for el in root.iter(f"{SVG}style"))
    rules = dict(re.findall(r"\.(terminal-\d+-r\d+) \{([^}]*)\}", style))
    struck = {cls for cls, css in rules.items() if "line-through" in css}
    by_text = {t.strip(): cls for cls, t in texts}
    assert by_text["gone"] in struck and by_text["h"] in struck and by_text["new"] not in struck
    fills = {re.search(r"fill: (#[0-9a-f]+)", rules[by_text[f"#{i} {label}"]]).group(1)  # type: ignore[union-attr]
             for i, label in enumerate(("upper", "lower 1", "lower 2"))}
    assert len(fills) == 3


def test_json_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    up, l1, l2 = _layers(tmp_path)
    status, out, err = _run(capsys, "--layers", f"{l1}:{l2}", "--upper", up, "--json", "--depth", "1", "op")
    assert status == 0, err
    data = json.loads(out)
    assert [la["label"] for la in data["layers"]] == ["upper", "lower 1", "lower 2"]
    assert data["root"]["path"] == "op" and data["root"]["opaque"] and data["root"]["children"] == []
    status, out, err = _run(capsys, "--layers", f"{l1}:{l2}", "gone")
    assert status == 1 and err == "unionfs tree: error: /gone: not in the merged view (whited out by layer #0)\n"
    status, _, err = _run(capsys, "--layers", f"{tmp_path / 'missing'}")
    assert status == 3 and err.count("\n") == 1 and "missing" in err
    status, _, err = _run(capsys, "--layers", f"{l1}", "a/../b")
    assert status == 2 and err.count("\n") == 1
    status, _, err = _run(capsys, str(tmp_path))
    assert status == 3 and "not inside a unionfs mount" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        tree_cli.main(["--depth", "-1", "--layers", str(l1)])
    assert exc.value.code == 2
    capsys.readouterr()


def test_a_terminal_gets_colours_and_the_same_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    up, l1, l2 = _layers(tmp_path)
    args = ["--layers", f"{l1}:{l2}", "--upper", str(up), "--all"]
    _, piped, _ = _run(capsys, *args)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.delenv("NO_COLOR", raising=False)
    _, coloured, _ = _run(capsys, *args)
    assert "\x1b[" in coloured
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == piped


def test_an_image_names_its_layers_by_digest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unionfs.image import _images
    from unionfs.snapshots import Snapshotter

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "image"))
    import images
    import layers as tars

    base = tars.build([tars.dir_("etc"), tars.reg("etc/os-release", b"base"), tars.reg("etc/gone", b"x")])
    app = tars.build([tars.dir_("etc"), tars.reg("etc/os-release", b"app v2"), tars.reg("etc/.wh.gone")])
    built = images.image([base, app])
    layout = images.write_oci_layout(tmp_path / "layout", [("img:1", built)])
    with Snapshotter(tmp_path / "store") as sn:
        _images.import_image(sn, layout, name="img:1")
    status, out, err = _run(capsys, "--image", "img:1", "--root", tmp_path / "store", "--all", "etc")
    assert status == 0, err
    top, bottom = built.layer_digests[1][7:19], built.layer_digests[0][7:19]
    lines = out.splitlines()
    assert lines[1].startswith(f"  #0 layer 2/2 {top}  ") and lines[2].startswith(f"  #1 layer 1/2 {bottom}  ")
    assert f"├── gone  #1 layer 1/2 {bottom}  1 B  hidden: whited out by layer #0" in lines
    assert f"└── os-release  #0 layer 2/2 {top}  6 B" in lines
    status, _, err = _run(capsys, "--image", "nothing", "--root", tmp_path / "store")
    assert status == 3 and err.count("\n") == 1 and "nothing" in err

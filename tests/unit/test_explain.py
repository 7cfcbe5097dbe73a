"""explain(): the layer an entry comes from, what it shadows and why, copy-ups and the next write.

The randomised tests build 3-layer stacks (files, directories, symlinks, kernel and xattr whiteouts, opaque
directories, AUFS markers, then copy-ups and removals through the Union) and check every path against a
resolution written here from the layer directories alone, and against Stack.resolve.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unit_tree import WHITEOUT, XWHITEOUT, Dir, Symlink, build

from unionfs.copyup import Workdir
from unionfs.explain import (
    EXPLAIN_XATTR,
    LAYER_XATTR,
    STACK_XATTR,
    Explanation,
    VirtualXattrs,
    explain,
    lines_of,
    normalize,
)
from unionfs.layers import ROOT, Stack, split
from unionfs.targets import stack_json
from unionfs.union import Union
from unionfs.whiteout import XattrFormat

OPAQUE = "trusted.overlay.opaque"
XW_MARK = "trusted.overlay.whiteout"


# -- an independent resolution, from the layer directories ------------------------------------------------


def _lexists(p: str) -> bool:
    return os.path.lexists(p)


def _classify(layer: str, rel: str, parent_x: bool, aufs: bool) -> tuple[str, bool, bool] | None:
    """What ``layer`` holds at ``rel`` (its parent there being a real directory): (kind, opaque, x-marked),
    kind one of wh, dir, other; None for nothing."""
    p = os.path.join(layer, rel) if rel != "." else layer
    head, name = os.path.split(rel) if rel != "." else ("", "")
    parent = os.path.join(layer, head) if head else layer
    try:
        s = os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        if aufs and rel != "." and _lexists(os.path.join(parent, ".wh." + name)):
            return ("wh", False, False)
        return None
    if stat.S_ISCHR(s.st_mode) and s.st_rdev == 0:
        return ("wh", False, False)
    if parent_x and stat.S_ISREG(s.st_mode) and s.st_size == 0:
        with contextlib.suppress(OSError):
            os.getxattr(p, XW_MARK, follow_symlinks=False)
            return ("wh", False, False)
    if stat.S_ISDIR(s.st_mode):
        try:
            mark = os.getxattr(p, OPAQUE)
        except OSError:
            mark = b""
        opaque = mark == b"y"
        if aufs and not opaque:
            opaque = _lexists(os.path.join(p, ".wh..wh..opq")) or (
                rel != "." and _lexists(os.path.join(parent, ".wh." + name)))
        return ("dir", opaque, mark == b"x")
    return ("other", False, False)


def model(layers: list[str], path: str, first_lower: int, aufs: bool) -> tuple[int | None, list[int]]:
    """(the layer the merged view takes ``path`` from or None, the layers a directory merges), by the rules of
    overlayfs, read from the layer directories."""
    merged: list[int] = []
    xmark: dict[int, bool] = {}
    for i, layer in enumerate(layers):  # every root merges: the kernel honours no opaque marker on a root
        c = _classify(layer, ".", False, aufs and i >= first_lower)
        assert c is not None and c[0] == "dir"
        merged.append(i)
        xmark[i] = c[2]
    if path == ".":
        return 0, merged
    parts = path.split("/")
    prefix = ""
    for depth, name in enumerate(parts):
        prefix = name if not prefix else prefix + "/" + name
        top: int | None = None
        nxt: list[int] = []
        nxt_x: dict[int, bool] = {}
        for i in merged:
            lower_aufs = aufs and i >= first_lower
            if lower_aufs and name.startswith(".wh."):
                continue
            c = _classify(layers[i], prefix, xmark[i], lower_aufs)
            if c is None:
                continue
            kind, opaque, xm = c
            if top is None:
                if kind == "wh":
                    return None, []
                if kind != "dir":
                    return (i, []) if depth == len(parts) - 1 else (None, [])
                top = i
                nxt, nxt_x = [i], {i: xm}
                if opaque:
                    break
                continue
            if kind != "dir":
                break
            nxt.append(i)
            nxt_x[i] = xm
            if opaque:
                break
        if top is None:
            return None, []
        merged, xmark = nxt, nxt_x
    return merged[0], merged


def holders(layers: list[str], path: str, first_lower: int, aufs: bool) -> set[int]:
    """The layers holding an object (not a whiteout) at ``path`` below real directories of their own."""
    out = set()
    parts = path.split("/")
    for i, layer in enumerate(layers):
        lower_aufs = aufs and i >= first_lower
        if lower_aufs and any(p.startswith(".wh.") for p in parts):
            continue
        ok = True
        x = False
        for depth in range(len(parts) - 1):
            rel = "/".join(parts[: depth + 1])
            c = _classify(layer, rel, x, lower_aufs)
            if c is None or c[0] != "dir":
                ok = False
                break
            x = c[2]
        if not ok:
            continue
        c = _classify(layer, path, x, lower_aufs)
        if c is not None and c[0] != "wh":
            out.add(i)
    return out


# -- randomised stacks ----------------------------------------------------------------------------------------

#: the paths a layer may hold (each layer picks a kind for each; a child exists where its parent is a directory)
_PATHS = ["a", "b", "a/a", "a/b", "b/a", "a/a/a", "a/a/b"]
_AUFS_PATHS = [*_PATHS, ".wh.a", "a/.wh.a", "a/.wh.b", "a/.wh..wh..opq", "a/a/.wh..wh..opq", ".wh..wh..opq"]
_KINDS = ["none", "none", "file", "empty", "dir", "dir", "dir", "opaque", "xdir", "link", "whiteout", "xwhiteout"]


def _node(kind: str, children: dict[str, Any]) -> Any:
    if kind in ("dir", "opaque", "xdir"):
        return Dir(children, opaque=kind == "opaque", xwhiteouts=kind == "xdir")
    return {"file": "hello", "empty": "", "link": Symlink("a"), "whiteout": WHITEOUT, "xwhiteout": XWHITEOUT}[kind]


def _to_tree(kinds: dict[str, str], prefix: str = "") -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, kind in kinds.items():
        head, _, name = path.rpartition("/")
        if head != prefix.rstrip("/") or kind == "none":
            continue
        tree[name] = _node(kind, _to_tree(kinds, path + "/") if kind in ("dir", "opaque", "xdir") else {})
    return tree


def _tree(paths: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({p: st.sampled_from(_KINDS) for p in paths}).map(_to_tree)


@contextlib.contextmanager
def stack_of(trees: list[dict[str, Any]], writable: bool, aufs: bool = False) -> Iterator[tuple[Stack, Union,
                                                                                                  list[str]]]:
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [str(build(Path(tmp) / f"layer{i}", t)) for i, t in enumerate(trees)]
        (Path(tmp) / "work").mkdir()
        stack = Stack([os.fsencode(d) for d in dirs], writable, XattrFormat.TRUSTED, aufs=aufs)
        work = Workdir(os.fsencode(Path(tmp) / "work")) if writable else None
        try:
            yield stack, Union(stack, work), dirs
        finally:
            stack.close()
            if work is not None:
                work.close()


def all_paths(dirs: list[str]) -> list[str]:
    """Every path any layer holds, its name without an AUFS prefix too, and a missing child of each."""
    found = {"."}
    for d in dirs:
        for top, subdirs, files in os.walk(d):
            rel = os.path.relpath(top, d)
            for name in subdirs + files:
                p = name if rel == "." else rel + "/" + name
                found.add(p)
                found.add(p + "/zz")
                if name.startswith(".wh."):
                    found.add(p[: len(p) - len(name)] + name[4:])
    return sorted(found)


def check_path(stack: Stack, dirs: list[str], path: str, first_lower: int, aufs: bool) -> Explanation:
    ex = explain(stack, os.fsencode(path))
    layer, merged = model(dirs, path, first_lower, aufs)
    entry = stack.resolve(os.fsencode(path) if path != "." else ROOT)
    # the layer reported, the independent resolution and Stack.resolve agree
    assert (ex.found.layer if ex.found else None) == layer == (entry.layer if entry else None), path
    if ex.found is None:
        assert ex.absent is not None
    else:
        assert ex.absent is None
        assert entry is not None
        assert ex.found.type == ("directory" if entry.is_dir else ex.found.type)
        assert stat.S_ISDIR(entry.st.st_mode) == (ex.found.type == "directory")
        if entry.is_dir:
            assert list(ex.merged_dir) == merged == list(entry.dirs), path
    # every other layer holding an object there is listed, with a reason, and nothing else is
    expected = holders(dirs, path, first_lower, aufs) if path != "." else set(range(len(dirs)))
    if ex.found is not None:
        expected -= {ex.found.layer, *ex.merged_dir}
    assert {h.copy.layer for h in ex.shadowed} == expected, path
    for h in ex.shadowed:
        assert h.reason.by is not None and h.reason.by < h.copy.layer
    # copied_up: what the lower layers would show without the upper object
    if stack.writable and ex.found is not None and ex.found.layer == 0 and path != ".":
        parent_path, name = split(os.fsencode(path))
        parent = stack.resolve(parent_path)
        assert parent is not None
        below = stack.below_upper(parent, name)
        assert (ex.copied_up.layer if ex.copied_up else None) == (below.layer if below else None), path
    else:
        assert ex.copied_up is None
    # the next write
    action = ex.next_write.action
    if not stack.writable:
        assert action == "erofs"
    elif ex.found is None:
        assert action in ("create", "enoent", "enotdir")
    elif ex.found.layer == 0:
        assert action == "none"
        assert ex.next_write.rename_exdev == (entry is not None and entry.is_dir and entry.merged and path != ".")
    else:
        assert action == ("copy-up-dir" if ex.found.type == "directory" else "copy-up")
        assert ex.next_write.layer == ex.found.layer
        if ex.found.type == "regular file":
            assert ex.next_write.size == os.lstat(os.path.join(dirs[ex.found.layer], path)).st_size
    # the JSON is JSON, and people get lines
    data = json.loads(ex.json_bytes())
    assert data["path"] == os.fsdecode(normalize(os.fsencode(path)))
    assert {la["index"] for la in data["layers"]} == ex.referenced() and data["layer_count"] == len(dirs)
    for la in data["layers"]:
        assert la["path"] == dirs[la["index"]]
    assert lines_of(data) == ex.lines()
    return ex


def check_all(stack: Stack, dirs: list[str], aufs: bool) -> None:
    first_lower = 1 if stack.writable else 0
    for path in all_paths(dirs):
        check_path(stack, dirs, path, first_lower, aufs)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees=st.lists(_tree(_PATHS), min_size=3, max_size=3), writable=st.booleans(),
       changes=st.lists(st.tuples(st.sampled_from(["copy-up", "write", "unlink", "rmdir"]), st.integers(0, 50)),
                        max_size=4))
def test_explain_agrees_with_an_independent_resolution(trees: list[dict[str, Any]], writable: bool,
                                                      changes: list[tuple[str, int]]) -> None:
    with stack_of(trees, writable) as (stack, union, dirs):
        check_all(stack, dirs, False)
        if not writable:
            return
        for op, pick in changes:
            paths = [p for p in all_paths(dirs) if p != "." and stack.resolve(os.fsencode(p)) is not None]
            if not paths:
                break
            path = paths[pick % len(paths)]
            entry = stack.resolve(os.fsencode(path))
            assert entry is not None
            parent_path, name = split(os.fsencode(path))
            parent = stack.resolve(parent_path)
            assert parent is not None
            with contextlib.suppress(OSError):
                if op == "copy-up":
                    union.copy_up(entry)
                elif op == "write" and stat.S_ISREG(entry.st.st_mode):
                    os.close(union.open(entry, os.O_WRONLY))
                elif op == "unlink" and not entry.is_dir:
                    union.unlink(parent, name)
                elif op == "rmdir" and entry.is_dir:
                    union.rmdir(parent, name)
            check_all(stack, dirs, False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees=st.lists(_tree(_AUFS_PATHS), min_size=3, max_size=3), writable=st.booleans())
def test_explain_with_aufs_markers(trees: list[dict[str, Any]], writable: bool) -> None:
    with stack_of(trees, writable, aufs=True) as (stack, _union, dirs):
        check_all(stack, dirs, True)


# -- each reason, by hand ------------------------------------------------------------------------------------


def test_a_lower_file_shadowing_another(tmp_path: Path) -> None:
    with stack_of([{}, {"f": "l1 copy"}, {"f": "l2"}], True) as (stack, _u, dirs):
        ex = explain(stack, b"f")
        assert ex.found is not None and (ex.found.layer, ex.found.type, ex.found.size) == (1, "regular file", 7)
        [h] = ex.shadowed
        assert (h.copy.layer, h.copy.size, h.reason.kind, h.reason.by) == (2, 2, "shadowed", 1)
        assert ex.copied_up is None
        assert ex.next_write.text == "copy-up of 7 bytes from layer #1 into the upper layer"
        assert ex.to_json()["found"]["path"] == dirs[1]


def test_a_whiteout_hides_the_lower_copy() -> None:
    with stack_of([{"f": WHITEOUT}, {"f": "x"}, {}], True) as (stack, _u, _d):
        ex = explain(stack, b"f")
        assert ex.found is None
        assert ex.absent is not None and (ex.absent.kind, ex.absent.by, ex.absent.at) == ("whiteout", 0, b"f")
        assert [(w.layer, w.type) for w in ex.whiteouts] == [(0, "whiteout")]
        [h] = ex.shadowed
        assert (h.copy.layer, h.reason.kind, h.reason.by) == (1, "whiteout", 0)
        assert ex.next_write.action == "create" and ex.next_write.replaces_whiteout


def test_an_xattr_whiteout_counts_only_in_a_marked_directory() -> None:
    trees = [{}, {"d": Dir({"f": XWHITEOUT}, xwhiteouts=True), "e": {"f": XWHITEOUT}},
             {"d": {"f": "x"}, "e": {"f": "y"}}]
    with stack_of(trees, False) as (stack, _u, _d):
        ex = explain(stack, b"d/f")
        assert ex.found is None and [w.type for w in ex.whiteouts] == ["xattr whiteout"]
        ex = explain(stack, b"e/f")  # an ordinary empty file: the parent is not marked
        assert ex.found is not None and ex.found.layer == 1
        assert ex.next_write.action == "erofs" and ex.next_write.text.startswith("EROFS")


def test_an_opaque_directory_hides_the_lower_directory_and_its_children() -> None:
    with stack_of([{"d": Dir({"a": "new"}, opaque=True)}, {"d": {"a": "old", "b": "gone"}}, {}], True) as (
            stack, _u, _d):
        ex = explain(stack, b"d")
        assert ex.opaque and ex.merged_dir == (0,)
        assert ex.next_write.action == "none" and not ex.next_write.rename_exdev
        assert ex.copied_up is not None and ex.copied_up.layer == 1  # replaced, not merged
        ex = explain(stack, b"d/b")
        assert ex.found is None and ex.absent is not None
        assert (ex.absent.kind, ex.absent.by, ex.absent.at) == ("opaque", 0, b"d")
        assert [h.reason.kind for h in ex.shadowed] == ["opaque"]
        ex = explain(stack, b"d/a")
        assert ex.found is not None and ex.found.layer == 0
        [h] = ex.shadowed
        assert (h.copy.layer, h.reason.kind, h.reason.at) == (1, "opaque", b"d")


def test_a_non_directory_hides_the_directories_beneath() -> None:
    with stack_of([{}, {"d": "a file"}, {"d": {"x": "1"}}], True) as (stack, _u, _d):
        ex = explain(stack, b"d")
        assert ex.found is not None and ex.found.type == "regular file"
        assert [(h.copy.layer, h.copy.type, h.reason.kind) for h in ex.shadowed] == [(2, "directory", "shadowed")]
        ex = explain(stack, b"d/x")
        assert ex.absent is not None and (ex.absent.kind, ex.absent.by, ex.absent.at) == ("non-directory", 1, b"d")
        assert ex.next_write.action == "enotdir"
        assert [h.copy.layer for h in ex.shadowed] == [2]
    # a non-directory between two directories: the lower one is not merged
    with stack_of([{"d": {}}, {"d": "file"}, {"d": {"x": "1"}}], True) as (stack, _u, _d):
        ex = explain(stack, b"d")
        assert ex.merged_dir == (0,)
        assert {h.copy.layer: h.reason.kind for h in ex.shadowed} == {1: "shadowed", 2: "non-directory"}
        absent = explain(stack, b"d/x").absent
        assert absent is not None and absent.kind == "non-directory"


def test_a_merged_directory_and_its_next_write() -> None:
    with stack_of([{"d": {}}, {"d": {"x": ""}}, {"d": {}}], True) as (stack, _u, _d):
        ex = explain(stack, b"d")
        assert ex.merged_dir == (0, 1, 2) and not ex.opaque
        assert ex.next_write.rename_exdev and "EXDEV on rename" in ex.next_write.text
        assert ex.copied_up is not None and ex.copied_up.layer == 1
    with stack_of([{}, {"d": {"e": {"f": "abc"}}}, {}], True) as (stack, _u, _d):
        ex = explain(stack, b"d/e")
        assert ex.next_write.action == "copy-up-dir" and ex.next_write.parents == 1
        assert ex.next_write.rename_exdev
        ex = explain(stack, b"d/e/f")
        assert (ex.next_write.size, ex.next_write.parents) == (3, 2)


def test_missing_everywhere_and_bad_paths() -> None:
    with stack_of([{}, {"a": "x"}, {}], True) as (stack, _u, _d):
        ex = explain(stack, b"nope")
        assert ex.absent is not None and (ex.absent.kind, ex.absent.by) == ("missing", None)
        assert ex.next_write.action == "create" and not ex.shadowed
        assert explain(stack, b"nope/deeper").next_write.action == "enoent"
        assert explain(stack, b"/a/").path == b"a"
        assert explain(stack, b"./a//").path == b"a"
        assert explain(stack, b"/").path == ROOT
        with pytest.raises(ValueError, match=r"\.\."):
            explain(stack, b"a/../b")


def test_a_copy_up_changes_the_explanation() -> None:
    with stack_of([{}, {"f": "lower data"}, {}], True) as (stack, union, dirs):
        before = explain(stack, b"f")
        assert before.found is not None and before.found.layer == 1 and before.copied_up is None
        entry = stack.resolve(b"f")
        assert entry is not None
        os.close(union.open(entry, os.O_WRONLY))
        after = explain(stack, b"f")
        assert after.found is not None and after.found.layer == 0
        assert after.copied_up is not None and (after.copied_up.layer, after.copied_up.size) == (1, 10)
        assert after.next_write.text == "none (upper)"
        assert [h.reason.kind for h in after.shadowed] == ["shadowed"]


def test_labels_and_digests() -> None:
    with stack_of([{"f": "x"}, {}], False) as (stack, _u, _d):
        ex = explain(stack, b"f", labels=["layer 2/2 abc", "layer 1/2 def"], digests=["sha256:abc", None])
        data = ex.to_json()
        assert data["found"]["label"] == "layer 2/2 abc" and data["found"]["digest"] == "sha256:abc"
        assert "#0 layer 2/2 abc" in ex.lines()[1]
        with pytest.raises(ValueError):
            explain(stack, b"f", labels=["one"])


def test_virtual_xattrs_of_the_core() -> None:
    with stack_of([{}, {"f": "x"}, {}], True) as (stack, union, dirs):
        entry = stack.resolve(b"f")
        assert entry is not None
        assert union.getxattr(entry, LAYER_XATTR) == os.fsencode(dirs[1])
        assert json.loads(union.getxattr(entry, EXPLAIN_XATTR)) == explain(stack, b"f").to_json()
        expected = stack_json([os.fsencode(d) for d in dirs[1:]], os.fsencode(dirs[0]), XattrFormat.TRUSTED)
        assert union.getxattr(entry, STACK_XATTR) == expected
        with pytest.raises(OSError) as ei:
            union.getxattr(entry, b"user.unionfs.other")
        assert ei.value.errno == errno.ENODATA
        for name in (LAYER_XATTR, b"user.unionfs.new"):
            with pytest.raises(OSError) as ei:
                union.setxattr(entry, name, b"v")
            assert ei.value.errno == errno.EPERM
            with pytest.raises(OSError) as ei:
                union.removexattr(entry, name)
            assert ei.value.errno == errno.EPERM
        assert not any(n.startswith(b"user.unionfs.") for n in union.listxattr(entry))
        assert union.lstat(entry).st_ino == os.lstat(os.path.join(dirs[1], "f")).st_ino
        assert os.listdir(dirs[0]) == []  # nothing was copied up
        # an on-disk name of the namespace never shows
        os.setxattr(os.path.join(dirs[1], "f"), "user.unionfs.layer", b"forged")
        assert union.getxattr(entry, LAYER_XATTR) == os.fsencode(dirs[1])
        assert union.listxattr(entry) == []
        # xattrs turned off: the virtual ones are still served
        union.xattrs = False
        try:
            assert union.getxattr(entry, LAYER_XATTR) == os.fsencode(dirs[1])
            with pytest.raises(OSError) as ei:
                union.getxattr(entry, b"user.other")
            assert ei.value.errno == errno.ENOTSUP
        finally:
            union.xattrs = True
        # an object reached through a descriptor only
        assert VirtualXattrs(stack).get(None, 0, LAYER_XATTR) == os.fsencode(dirs[0])
        with pytest.raises(OSError):
            VirtualXattrs(stack).get(None, 0, EXPLAIN_XATTR)


# -- the command on a snapshot store ------------------------------------------------------------------------------


def _image_helpers() -> tuple[Any, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "image"))
    import images
    import layers as tars

    return images, tars


def test_inspect_an_image_names_the_layer_by_its_digest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unionfs import inspect_cli
    from unionfs.image import _images
    from unionfs.snapshots import Snapshotter

    im, tars = _image_helpers()
    base = tars.build([tars.dir_("etc"), tars.reg("etc/os-release", b"base"), tars.reg("etc/gone", b"x")])
    app = tars.build([tars.dir_("etc"), tars.reg("etc/os-release", b"app v2"), tars.reg("etc/.wh.gone")])
    built = im.image([base, app])
    layout = im.write_oci_layout(tmp_path / "layout", [("img:1", built)])
    with Snapshotter(tmp_path / "store") as sn:
        _images.import_image(sn, layout, name="img:1")
    root = str(tmp_path / "store")
    assert inspect_cli.main(["--image", "img:1", "--root", root, "--json", "/etc/os-release"]) == 0
    data = json.loads(capsys.readouterr().out)
    top = built.layer_digests[1]
    assert data["found"]["digest"] == top and data["found"]["label"].startswith("layer 2/2 " + top[7:19])
    assert data["found"]["size"] == 6 and data["next_write"]["action"] == "erofs"
    assert [(h["layer"], h["size"], h["reason"]["kind"]) for h in data["shadowed"]] == [(1, 4, "shadowed")]
    assert {la["index"]: la["digest"] for la in data["layers"]} == {0: top, 1: built.layer_digests[0]}
    assert data["layer_count"] == 2
    assert inspect_cli.main(["--image", "img:1", "--root", root, "etc/gone"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("etc/gone  absent: whited out by layer #0")
    assert inspect_cli.main(["--image", "nothing", "--root", root, "etc"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing" in err
    assert inspect_cli.main(["--layers", str(tmp_path), "../x"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_regression_a_name_below_a_file_cannot_be_made_enotdir(tmp_path: Path) -> None:
    """Making f/x/y where f is a file fails with ENOTDIR, as path resolution gives (regression: ENOENT)."""
    from unionfs.explain import explain
    from unionfs.layers import Stack
    from unionfs.whiteout import XattrFormat

    (tmp_path / "u").mkdir()
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "f").write_bytes(b"x")
    stack = Stack([os.fsencode(tmp_path / "u"), os.fsencode(tmp_path / "l")], True, XattrFormat.TRUSTED)
    try:
        assert explain(stack, b"f/x/y").next_write.action == "enotdir"
        assert explain(stack, b"f/x").next_write.action == "enotdir"
        assert explain(stack, b"g/x").next_write.action == "enoent"
    finally:
        stack.close()


def test_regression_a_layer_path_that_is_not_utf8_is_served_in_the_stack_json(tmp_path: Path) -> None:
    """(regression: the JSON of user.unionfs.stack could not be encoded, and every user.unionfs.* read was EIO)"""
    import json

    from unionfs.targets import stack_json
    from unionfs.whiteout import XattrFormat

    odd = os.fsencode(tmp_path) + b"/L\xff"
    data = json.loads(stack_json([odd], None, XattrFormat.USER))
    assert os.fsencode(data["layers"][0]["path"]) == odd

"""Random layers applied over a random lower: the merged view of [upper, lower] (unionfs.layers.Stack, no
mount) equals a model of OCI layer semantics."""

from __future__ import annotations

import io
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from layers import Entry, build, dir_, reg, sym  # noqa: E402

from unionfs.image import apply_layer  # noqa: E402
from unionfs.layers import ROOT, Stack, join  # noqa: E402
from unionfs.whiteout import XattrFormat  # noqa: E402

NAMES = ["a", "b", "c"]
path_st = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
kind_st = st.sampled_from(["F", "D", "L"])
op_st = st.tuples(path_st, st.sampled_from(["F", "D", "L", "W", "O"]), st.binary(max_size=3))


def ancestors(p: str) -> list[str]:
    parts = p.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts))]  # "" is the root


def consistent(items: list[tuple[str, str, bytes]], leaf_kinds: str) -> list[tuple[str, str, bytes]]:
    """Each path once; nothing below a path of a kind in ``leaf_kinds``; no leaf above another path."""
    kept: dict[str, str] = {}
    out = []
    for p, kind, data in items:
        if p in kept:
            continue
        if any(a in kept and kept[a] in leaf_kinds for a in ancestors(p)[1:]):
            continue
        if kind in leaf_kinds and any(q.startswith(p + "/") for q in kept):
            continue
        kept[p] = kind
        out.append((p, kind, data))
    return out


def make_lower(top: Path, items: list[tuple[str, str, bytes]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for p, kind, data in items:
        for a in ancestors(p)[1:]:
            if a not in tree:
                (top / a).mkdir(exist_ok=True)
                tree[a] = "D"
        if kind == "D":
            (top / p).mkdir(exist_ok=True)
            tree[p] = "D"
        elif kind == "F":
            (top / p).write_bytes(data)
            tree[p] = data
        else:
            os.symlink("t" + data.hex(), top / p)
            tree[p] = ("L", "t" + data.hex())
    return tree


def model(lower: dict[str, Any], ops: list[tuple[str, str, bytes]]) -> dict[str, Any]:
    upper: dict[str, Any] = {}
    opaque: set[str] = set()
    for p, kind, data in ops:
        for a in ancestors(p)[1:]:
            upper.setdefault(a, "D")
        if kind == "D":
            upper[p] = "D"
        elif kind == "O":
            upper[p] = "D"
            opaque.add(p)
        elif kind == "F":
            upper[p] = data
        elif kind == "L":
            upper[p] = ("L", "t" + data.hex())
        else:
            upper[p] = "W"
    merged = {p: v for p, v in upper.items() if v != "W"}
    for p, v in lower.items():
        if p in upper and not (upper[p] == "D" and v == "D"):
            continue  # replaced, whited out, or merged (shown once)
        if any(a in opaque for a in ancestors(p)):
            continue
        if any(a in upper and upper[a] != "D" for a in ancestors(p)[1:]):
            continue
        merged.setdefault(p, v)
    return merged


def tar_of(ops: list[tuple[str, str, bytes]]) -> bytes:
    entries: list[Entry] = []
    for p, kind, data in ops:
        head, _, name = p.rpartition("/")
        prefix = head + "/" if head else ""
        if kind == "D":
            entries.append(dir_(p))
        elif kind == "F":
            entries.append(reg(p, data))
        elif kind == "L":
            entries.append(sym(p, "t" + data.hex()))
        elif kind == "W":
            entries.append(reg(prefix + ".wh." + name))
        else:
            entries.append(reg(p + "/.wh..wh..opq"))
    return build(entries)


def merged_tree(stack: Stack) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(entry: Any) -> None:
        for name in stack.listdir(entry):
            child = stack.lookup(entry, name)
            assert child is not None
            key = os.fsdecode(join(entry.path, name))
            if child.is_dir:
                out[key] = "D"
                walk(child)
            elif stat.S_ISREG(child.st.st_mode):
                with stack.layers[child.layer].proc_at(child.path) as full, open(full, "rb") as f:
                    out[key] = f.read()
            elif stat.S_ISLNK(child.st.st_mode):
                with stack.layers[child.layer].proc_at(child.path) as full:
                    out[key] = ("L", os.readlink(full).decode())
            else:
                out[key] = ("OTHER", stat.S_IFMT(child.st.st_mode))

    walk(stack.resolve(ROOT))
    return out


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(path_st, kind_st, st.binary(max_size=3)), max_size=12),
    st.lists(op_st, max_size=12),
    st.booleans(),
)
def test_applied_layer_merges_as_oci_says(
    lower_items: list[tuple[str, str, bytes]], op_items: list[tuple[str, str, bytes]], rootless: bool
) -> None:
    """``rootless``: applied as an ordinary user would (user.* markers, no chown), read in the user format."""
    fmt = XattrFormat.USER if rootless else XattrFormat.TRUSTED
    lower_items = consistent(lower_items, "FL")
    ops = consistent(op_items, "FLW")
    top = Path(tempfile.mkdtemp(prefix="unionfs-layer-model-"))
    try:
        (top / "lower").mkdir()
        (top / "upper").mkdir()
        lower = make_lower(top / "lower", lower_items)
        apply_layer(io.BytesIO(tar_of(ops)), os.fsencode(top / "upper"), fmt=fmt, rootless=rootless)
        stack = Stack([os.fsencode(top / "upper"), os.fsencode(top / "lower")], writable=False, fmt=fmt)
        try:
            assert merged_tree(stack) == model(lower, ops)
        finally:
            stack.close()
    finally:
        shutil.rmtree(top)

"""The merged tree of a stack, each entry with the layer it comes from, and (on request) what the merged view
hides: the names some layer holds that do not show, and the lower copies of the entries that do.

:func:`build` walks the merged view (:meth:`unionfs.layers.Stack.listdir` and lookups) from a path down to a
depth. Every reason a copy does not show is :func:`unionfs.explain.explain`'s: the union rules are not written
again here. :func:`lines` lays the model out as lines of tree guides, each a list of segments tagged with what
they show (a layer, a hidden entry, a reason), for :mod:`unionfs.tree_cli` to print plain or in colour.

Nothing here imports pyfuse3, trio or rich.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Sequence
from typing import Any

from . import explain as _explain
from .explain import Reason, type_name
from .layers import ROOT, Entry, Stack, join

#: the segment kinds of :func:`lines` (``layer`` segments also carry the layer index)
GUIDE, NAME, LAYER, INFO, HIDDEN, REASON = "guide", "name", "layer", "info", "hidden", "reason"


def escape(name: bytes) -> str:
    """``name`` for people, safe on any terminal: UTF-8 as is; a byte that is not UTF-8 as ``\\xNN``, a control
    or other unprintable character as ``\\xNN``/``\\uNNNN``, a backslash as ``\\\\`` (so the text is unambiguous)."""
    out = []
    for ch in name.decode("utf-8", "surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif not ch.isprintable():
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def shown_path(path: bytes) -> str:
    """A merged path for people: ``/`` for the root, else ``/`` and its escaped components."""
    return "/" if path == ROOT else "/" + "/".join(escape(p) for p in path.split(b"/"))


@dataclasses.dataclass(frozen=True)
class LayerDesc:
    """One layer of the stack: index (0 is the top), label, directory, whether it is the writable one."""

    index: int
    label: str
    path: str
    writable: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "path": self.path, "writable": self.writable}


@dataclasses.dataclass(frozen=True)
class Copy:
    """A layer's copy of a name that does not show: its layer, type, size and why (explain's reason, with its
    text for the path)."""

    layer: int
    type: str
    size: int
    reason: Reason
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "type": self.type, "size": self.size, "reason": self.reason.to_json(),
                "text": self.text}


@dataclasses.dataclass(frozen=True)
class Node:
    """One name of the tree.

    A visible entry: ``layer`` is the layer the merged view takes it from, ``type``/``size``/``target`` (a
    symlink's) those of that copy, ``merged`` the layers a directory is merged from (top first), ``opaque``
    whether that directory is opaque, ``shadowed`` the lower copies that do not show (with ``--all``), and
    ``children`` its entries (a directory within the depth). A hidden name (``visible`` False): ``layer`` is
    the top-most layer holding a copy, ``type``/``size`` that copy's, ``reason`` why the name is absent from
    the merged view, ``shadowed`` every copy held, each with its own reason.
    """

    name: bytes
    path: bytes
    visible: bool
    layer: int
    type: str
    size: int
    target: bytes | None = None
    merged: tuple[int, ...] = ()
    opaque: bool = False
    reason: Reason | None = None
    reason_text: str = ""
    shadowed: tuple[Copy, ...] = ()
    children: tuple[Node, ...] = ()
    #: a directory whose entries are beyond the depth asked for
    truncated: bool = False

    @property
    def is_dir(self) -> bool:
        return self.type == "directory"

    def walk(self) -> list[Node]:
        """This node and every node under it, depth first."""
        out = [self]
        for child in self.children:
            out += child.walk()
        return out

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": os.fsdecode(self.name), "path": os.fsdecode(self.path), "visible": self.visible,
            "layer": self.layer, "type": self.type, "size": self.size,
            "target": None if self.target is None else os.fsdecode(self.target),
        }
        if self.is_dir and self.visible:
            data["merged"] = list(self.merged)
            data["opaque"] = self.opaque
            data["truncated"] = self.truncated
            data["children"] = [c.to_json() for c in self.children]
        if not self.visible:
            data["reason"] = None if self.reason is None else self.reason.to_json()
            data["reason_text"] = self.reason_text
        data["shadowed"] = [c.to_json() for c in self.shadowed]
        return data


@dataclasses.dataclass(frozen=True)
class Tree:
    """The tree of a stack from ``root``: its layers, and whether hidden names and copies are included."""

    layers: tuple[LayerDesc, ...]
    root: Node
    all: bool
    depth: int | None

    def to_json(self) -> dict[str, Any]:
        return {"layers": [la.to_json() for la in self.layers], "all": self.all, "depth": self.depth,
                "root": self.root.to_json()}


class NotInView(ValueError):
    """The path asked for is not in the merged view; the message is one line naming it and why."""


def _size(st: os.stat_result) -> int:
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _copies(ex: _explain.Explanation) -> tuple[Copy, ...]:
    return tuple(Copy(h.copy.layer, h.copy.type, h.copy.size if h.copy.type == "regular file" else 0, h.reason,
                      h.reason.text(ex.path)) for h in ex.shadowed)


class _Walker:
    def __init__(self, stack: Stack, show_all: bool, depth: int | None) -> None:
        self.stack = stack
        self.show_all = show_all
        self.depth = depth

    def _target(self, entry: Entry) -> bytes | None:
        if not stat.S_ISLNK(entry.st.st_mode):
            return None
        return os.readlink(entry.path, dir_fd=self.stack.layers[entry.layer].fd)

    def node(self, name: bytes, entry: Entry, level: int) -> Node:
        shadowed: tuple[Copy, ...] = ()
        held_dirs: list[int] = list(entry.dirs)
        if self.show_all:
            ex = _explain.explain(self.stack, entry.path)
            shadowed = _copies(ex)
            held_dirs += [c.layer for c in shadowed if c.type == "directory"]
        children: tuple[Node, ...] = ()
        truncated = False
        if entry.is_dir:
            if self.depth is not None and level >= self.depth:
                truncated = bool(self.stack.listdir(entry)) or (self.show_all and bool(
                    self._hidden_names(entry, held_dirs)))
            else:
                children = self._children(entry, held_dirs, level + 1)
        return Node(name, entry.path, True, entry.layer, type_name(entry.st.st_mode), _size(entry.st),
                    self._target(entry), tuple(entry.dirs) if entry.is_dir else (), entry.opaque and entry.is_dir,
                    shadowed=shadowed, children=children, truncated=truncated)

    def _hidden_names(self, entry: Entry, held_dirs: Sequence[int]) -> set[bytes]:
        """The names any layer holding a directory at ``entry``'s path lists there that the merged view does
        not show."""
        shown = self.stack.listdir(entry)
        names: set[bytes] = set()
        for i in sorted(set(held_dirs)):
            layer = self.stack.layers[i]
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=layer.fd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue
                raise
            try:
                names.update(os.fsencode(n) for n in os.listdir(fd))
            finally:
                os.close(fd)
        return {n for n in names if n not in shown}

    def _children(self, entry: Entry, held_dirs: Sequence[int], level: int) -> tuple[Node, ...]:
        listed = self.stack.listdir(entry)
        out: list[Node] = []
        hidden = self._hidden_names(entry, held_dirs) if self.show_all else set()
        for name in sorted(set(listed) | hidden):
            path = join(entry.path, name)
            if name in listed:
                child = self.stack.lookup(entry, name)
                if child is not None:
                    out.append(self.node(name, child, level))
                    continue
            ex = _explain.explain(self.stack, path)
            copies = _copies(ex)
            if ex.found is not None or not copies or not self.show_all:
                continue  # (a lone whiteout, an AUFS marker: nothing of a name to show)
            top = copies[0]
            reason = ex.absent
            out.append(Node(name, path, False, top.layer, top.type, top.size, reason=reason,
                            reason_text="" if reason is None else reason.text(path), shadowed=copies))
        return tuple(out)


def build(stack: Stack, path: bytes = ROOT, *, show_all: bool = False, depth: int | None = None,
          labels: Sequence[str] | None = None) -> Tree:
    """The merged tree of ``stack`` from ``path`` (a merged path, see :func:`unionfs.explain.normalize`) down to
    ``depth`` levels below it (None: all); ``show_all``: also the hidden names and the shadowed copies.
    ``labels``: a name for each layer, top first (default ``upper``, ``lower 1``, ...). NotInView when the path
    is not in the merged view; ValueError for a bad path or depth."""
    if depth is not None and depth < 0:
        raise ValueError(f"--depth {depth}: must be 0 or more")
    path = _explain.normalize(path)
    n = len(stack.layers)
    first_lower = 1 if stack.writable else 0
    if labels is None:
        labels = [("upper" if stack.writable and i == 0 else f"lower {i + 1 - first_lower}") for i in range(n)]
    if len(labels) != n:
        raise ValueError(f"{n} layers but {len(labels)} labels")
    descs = tuple(LayerDesc(i, labels[i], os.fsdecode(la.path), la.writable) for i, la in enumerate(stack.layers))
    entry = stack.resolve(path)
    if entry is None:
        ex = _explain.explain(stack, path)
        why = ex.absent.text(path) if ex.absent is not None else "not in any layer"
        raise NotInView(f"{shown_path(path)}: not in the merged view ({why})")
    name = path.rpartition(b"/")[2] if path != ROOT else ROOT
    return Tree(descs, _Walker(stack, show_all, depth).node(name, entry, 0), show_all, depth)


# -- lines for people -----------------------------------------------------------------------------------------

#: one piece of a line: (text, kind, layer index or None)
Segment = tuple[str, str, int | None]


def _human(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _what(type_: str, size: int, target: bytes | None) -> str:
    if type_ == "regular file":
        return _human(size)
    if type_ == "symlink":
        return "-> " + ("?" if target is None else escape(target))
    if type_ == "directory":
        return ""
    return type_


def legend(tree: Tree) -> list[list[Segment]]:
    """The legend: one line per layer (its index, label, directory), top first."""
    out: list[list[Segment]] = [[("layers, top first:", INFO, None)]]
    for la in tree.layers:
        out.append([("  ", GUIDE, None), (f"#{la.index} {escape(os.fsencode(la.label))}", LAYER, la.index),
                    ("  " + escape(os.fsencode(la.path)) + ("  (writable)" if la.writable else ""), INFO, None)])
    return out


def _entry_line(node: Node, layers: Sequence[LayerDesc], root: bool) -> list[Segment]:
    label = layers[node.layer].label
    shown = shown_path(node.path) if root else escape(node.name)
    if not node.visible:
        what = _what(node.type, node.size, None)
        seg: list[Segment] = [(shown + ("/" if node.is_dir else ""), HIDDEN, node.layer),
                              (f"  #{node.layer} {escape(os.fsencode(label))}", LAYER, node.layer)]
        if what:
            seg.append(("  " + what, INFO, None))
        seg.append((f"  hidden: {node.reason_text}", REASON, None))
        return seg
    seg = [(shown + ("/" if node.is_dir and not root else ""), NAME, node.layer),
           (f"  #{node.layer} {escape(os.fsencode(label))}", LAYER, node.layer)]
    extra = []
    what = _what(node.type, node.size, node.target)
    if what:
        extra.append(what)
    if len(node.merged) > 1:
        extra.append("merged from " + ", ".join(f"#{i}" for i in node.merged))
    if node.opaque:
        extra.append("opaque")
    if node.truncated:
        extra.append("...")
    if extra:
        seg.append(("  " + ", ".join(extra), INFO, None))
    return seg


def _copy_line(copy: Copy, layers: Sequence[LayerDesc]) -> list[Segment]:
    what = _what(copy.type, copy.size, None)
    desc = copy.type + (f", {what}" if what and copy.type == "regular file" else "")
    return [(f"#{copy.layer} {escape(os.fsencode(layers[copy.layer].label))}: {desc}", HIDDEN, copy.layer),
            (f"  {copy.text}", REASON, None)]


def lines(tree: Tree) -> list[list[Segment]]:
    """The legend, then the tree: one line per entry with tree guides (``├── ``, ``└── ``), its name, its
    layer, and its size, symlink target, merged layers or opaqueness; with ``--all``, hidden names struck
    through with why, and under each entry (after ``╌ ``) the lower copies it shadows and why."""
    out = legend(tree)
    out.append([])

    def emit(node: Node, prefix: str) -> None:
        kids: list[Node | Copy] = []
        if node.visible:
            kids += [*node.shadowed, *node.children]
        else:  # (the line of a hidden name shows its top copy)
            kids += node.shadowed[1:]
        for k, item in enumerate(kids):
            last = k == len(kids) - 1
            guide = prefix + ("└── " if last else "├── ")
            deeper = prefix + ("    " if last else "│   ")
            if isinstance(item, Copy):
                out.append([(prefix + ("└╌╌ " if last else "├╌╌ "), GUIDE, None), *_copy_line(item, tree.layers)])
            else:
                out.append([(guide, GUIDE, None), *_entry_line(item, tree.layers, False)])
                emit(item, deeper)

    out.append(_entry_line(tree.root, tree.layers, True))
    emit(tree.root, "")
    return out


def plain(tree: Tree) -> str:
    """:func:`lines` as plain text."""
    return "".join("".join(s[0] for s in line) + "\n" for line in lines(tree))

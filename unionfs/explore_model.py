"""What ``unionfs explore`` shows, without the terminal: the merged view of a stack as of one of its layers
(that layer and those beneath it), each entry marked as that layer changed it.

Layers are numbered from 0 at the lowest here (the interface shows them from 1, as ``unionfs layers``). The
layers are read as :mod:`unionfs.analysis` reads them (its walk of a layer directory and its merged view), and
marked by the same rules as its figures, so that the marks of a layer count what ``unionfs layers`` counts:

* ``added``: a path the layers beneath do not show, that this layer provides;
* ``modified``: a path the layers beneath show, of which this layer has a new copy (a non-directory, a
  directory over a non-directory, an opaque directory, a directory under an opaque one); a directory that
  merely merges with the one beneath is unchanged;
* ``removed``: a path the layers beneath show that this layer hides and does not provide again (a whiteout's
  path and all beneath it, what an opaque directory hides, what lies beneath a directory this layer replaces
  by a non-directory). A removed entry is not in the view; it is kept beside it, as its copy beneath was.

The view of a layer is built on demand by stacking the layers up to it (a few views are kept); the children
of a directory are sorted only when asked for, so that a big layer costs its walk and nothing more until the
tree is opened. Nothing here imports textual, pyfuse3 or trio.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from .analysis import (
    _DIR,
    _WHITEOUT,
    Analysis,
    LayerFigures,
    LayerInfo,
    _Entry,
    _View,
    _Visible,
    _walk,
    changes,
    hidden_by,
    stack_onto,
)
from .analysis import analyze_dirs as _analyze_dirs
from .layers import ROOT as _STACK_ROOT
from .layers import Stack
from .targets import Target
from .whiteout import XattrFormat

#: the root of the view (as :mod:`unionfs.analysis` names it)
ROOT = b""
#: how many views are kept (each one as big as the merged view it is)
_KEPT_VIEWS = 4


class Mark(enum.Enum):
    """How the selected layer changed an entry of the view."""

    UNCHANGED = "unchanged"
    ADDED = "added"
    MODIFIED = "modified"
    REMOVED = "removed"


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    """An entry of the view as of a layer: its path (relative to the root, ``b""`` for the root), kind
    (``dir``, ``file`` or ``other``: a symbolic link, device, fifo or socket), size (a regular file's length;
    0 else), the layer its copy comes from (for a removed entry: the copy that was removed) and its mark."""

    path: bytes
    kind: str
    size: int
    layer: int
    mark: Mark

    @property
    def name(self) -> bytes:
        return self.path.rpartition(b"/")[2]

    @property
    def is_dir(self) -> bool:
        return self.kind == _DIR


@dataclasses.dataclass
class LayerView:
    """The merged view as of layer ``layer``: every path it shows, the paths that layer removed, and the
    marks of the paths that layer changed."""

    layer: int
    entries: dict[bytes, _Visible]
    children_of: dict[bytes, set[bytes]]
    removed: dict[bytes, _Visible]
    marks: dict[bytes, Mark]
    _removed_children: dict[bytes, set[bytes]] = dataclasses.field(default_factory=dict)
    _changed_dirs: set[bytes] | None = None

    def __post_init__(self) -> None:
        for path in self.removed:
            self._removed_children.setdefault(path.rpartition(b"/")[0], set()).add(path)

    def node(self, path: bytes) -> Node | None:
        """The entry at ``path`` (shown, or removed by this layer), or None."""
        vis = self.entries.get(path)
        if vis is not None:
            return Node(path, vis.kind, vis.size, vis.layer, self.marks.get(path, Mark.UNCHANGED))
        vis = self.removed.get(path)
        if vis is not None:
            return Node(path, vis.kind, vis.size, vis.layer, Mark.REMOVED)
        return None

    def has_children(self, path: bytes, changes_only: bool = False) -> bool:
        """Whether :meth:`children` of ``path`` would give anything (without sorting them)."""
        shown = self.children_of.get(path, set()) | self._removed_children.get(path, set())
        if not changes_only:
            return bool(shown)
        changed = self._changed()
        return any(p in self.marks or p in changed for p in shown)

    def children(self, path: bytes, changes_only: bool = False) -> list[Node]:
        """The entries in directory ``path``, by name: those the view shows and those this layer removed there.
        ``changes_only``: only the entries this layer changed and the directories holding such entries."""
        names = self.children_of.get(path, set()) | self._removed_children.get(path, set())
        if changes_only:
            changed = self._changed()
            names = {p for p in names if p in self.marks or p in changed}
        out = []
        for p in sorted(names):
            node = self.node(p)
            assert node is not None
            out.append(node)
        return out

    def _changed(self) -> set[bytes]:
        """The directories holding (at any depth) an entry this layer changed."""
        if self._changed_dirs is None:
            found: set[bytes] = set()
            for path in self.marks:
                while path:
                    path = path.rpartition(b"/")[0]
                    if path in found:
                        break
                    found.add(path)
            self._changed_dirs = found
        return self._changed_dirs

    def counts(self) -> dict[Mark, int]:
        """How many entries this layer added, modified and removed."""
        out = dict.fromkeys((Mark.ADDED, Mark.MODIFIED, Mark.REMOVED), 0)
        for mark in self.marks.values():
            out[mark] += 1
        return out


def _stack_layer(view: _View, entries: dict[bytes, _Entry], k: int) -> tuple[dict[bytes, _Visible], dict[bytes, Mark]]:
    """Put layer ``k`` (its walk ``entries``) on ``view``: what it removed of the view (path -> the copy
    removed) and the marks of what it changed (the rules of :func:`unionfs.analysis.analyze_dirs`)."""
    gone = hidden_by(view, entries)
    hidden = set(gone)
    marks: dict[bytes, Mark] = {}
    for path, e in entries.items():
        if e.kind == _WHITEOUT:
            continue
        vis = view.entries.get(path)
        if vis is None:
            marks[path] = Mark.ADDED
        elif changes(path, e, vis, gone):
            gone.pop(path, None)
            marks[path] = Mark.MODIFIED
    for path in gone:
        marks[path] = Mark.REMOVED
    stack_onto(view, entries, hidden, k)
    return gone, marks


class ExploreModel:
    """A stack of layer directories ``dirs``, lowest first, their markers in namespace ``fmt``, as
    ``unionfs explore`` shows it. ``infos``: how to show each layer (default ``layer 1``, ...); ``writable``:
    the top layer is the writable layer of the stack (it matters to :meth:`explain`)."""

    def __init__(self, dirs: Sequence[bytes], fmt: XattrFormat, infos: Sequence[LayerInfo] | None = None,
                 *, writable: bool = False) -> None:
        if not dirs:
            raise ValueError("a stack of no layers")
        self.dirs = list(dirs)
        self.fmt = fmt
        self.infos = list(infos) if infos is not None else [LayerInfo(f"layer {i + 1}") for i in range(len(dirs))]
        if len(self.infos) != len(self.dirs):
            raise ValueError(f"{len(self.dirs)} layers but {len(self.infos)} infos")
        self.writable = writable
        self._walks: dict[int, dict[bytes, _Entry]] = {}
        self._views: OrderedDict[int, LayerView] = OrderedDict()
        self._analysis: Analysis | None = None

    @classmethod
    def from_target(cls, target: Target) -> ExploreModel:
        """The stack of ``target`` (its layers are uppermost first; here lowest first)."""
        layers = list(reversed(target.layers))
        return cls([os.fsencode(la.path) for la in layers], target.xattr,
                   [LayerInfo(la.label, la.writable, la.digest) for la in layers], writable=target.writable)

    def __len__(self) -> int:
        return len(self.dirs)

    @property
    def analysis(self) -> Analysis:
        """The figures of every layer, as ``unionfs layers`` computes them (read once)."""
        if self._analysis is None:
            self._analysis = _analyze_dirs(self.dirs, self.fmt, self.infos)
        return self._analysis

    def reload(self) -> None:
        """Forget what was read of the layers (a live mount's writable layer changes as it is used)."""
        self._walks.clear()
        self._views.clear()
        self._analysis = None

    def figures(self, k: int) -> LayerFigures:
        return self.analysis.layers[k]

    def _walk(self, k: int) -> dict[bytes, _Entry]:
        if k not in self._walks:
            self._walks[k] = _walk(self.dirs[k], self.fmt)
        return self._walks[k]

    def view(self, k: int) -> LayerView:
        """The view as of layer ``k`` (0: the lowest), marked as layer ``k`` changed it."""
        if not 0 <= k < len(self.dirs):
            raise IndexError(f"layer {k} of a stack of {len(self.dirs)}")
        if k in self._views:
            self._views.move_to_end(k)
            return self._views[k]
        view = _View()
        removed: dict[bytes, _Visible] = {}
        marks: dict[bytes, Mark] = {}
        for i in range(k + 1):
            removed, marks = _stack_layer(view, self._walk(i), i)
        del view.entries[ROOT]  # (the root is no entry of a layer)
        out = LayerView(k, view.entries, view.children, removed, marks)
        self._views[k] = out
        while len(self._views) > _KEPT_VIEWS:
            self._views.popitem(last=False)
        return out

    def explain(self, k: int, path: bytes) -> dict[str, Any]:
        """The facts of ``unionfs inspect`` (:meth:`unionfs.explain.Explanation.to_json`) for ``path`` in the
        stack of the layers up to ``k``: its layers are numbered from the top of that stack, #0 being layer
        ``k``."""
        from . import explain

        dirs = list(reversed(self.dirs[: k + 1]))
        infos = list(reversed(self.infos[: k + 1]))
        writable = self.writable and k == len(self.dirs) - 1
        stack = Stack(dirs, writable, self.fmt)
        try:
            return explain.explain(stack, path or _STACK_ROOT, labels=[i.label for i in infos],
                                   digests=[i.digest for i in infos]).to_json()
        finally:
            stack.close()

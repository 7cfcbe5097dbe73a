"""Layer analysis as dive does it, from layer directories in the kernel's overlay format: what each layer adds,
modifies and removes, the space the stack wastes, and dive's efficiency score.

The layers are read bottom first (``analyze_dirs``); each is walked on disk: whiteouts (character devices
0/0, and empty files carrying ``overlay.whiteout`` in a directory marked ``overlay.opaque=x``) and opaque
directories (``overlay.opaque=y``) are read in the stack's xattr namespace. AUFS-style ``.wh.`` markers (which a
mount honours with ``-o aufs_markers`` only) are not read: they count as files. Nothing here imports pyfuse3 or
trio.

Sizes. An entry's size is what a layer tar records for it: a regular file's length, 0 for directories,
symbolic links, devices, fifos and whiteouts; a regular file linked several times in one layer counts once
(its first name in path order; a tar stores the other names as hard links of size 0). A layer's *size* is
the sum over its entries (dive's layer size).

Per layer, against the merged view of the layers beneath it:

* *added*: paths not in that view that this layer provides;
* *modified*: paths in that view of which this layer has a new copy: every non-directory, a directory over
  a non-directory, an opaque directory, and a directory under an opaque one (its bytes: the new copies';
  ``replaced_bytes``: those of the copies they hide); a directory merged with the one beneath is no change;
  *unchanged* counts the modified regular files whose content (sha256) equals the copy beneath, as a
  copy-up leaves them;
* *removed*: paths of that view the layer hides and does not provide again: a whiteout's path and all
  beneath it, what an opaque directory hides, what lies beneath a directory this layer replaces by a
  non-directory (bytes: those of the hidden copies).

So ``size == added.bytes + modified.bytes`` for every layer, and the final view's size is the sum over the
layers of ``added.bytes + modified.bytes - replaced_bytes - removed.bytes``.

The figures of the stack, as dive defines them (``filetree.Efficiency`` and ``image.Analyze`` of dive):

* every path of a non-directory gets one *copy* per layer holding it, of its size, and one copy of size 0 in
  each layer that removes it (a whiteout in dive's trees; here also when it is hidden by an opaque directory
  or by what replaces a directory above it, or replaced by a directory); a path's *cumulative size* is the
  sum of its copies;
* *wasted bytes* (dive's ``wastedBytes``): the sum of the cumulative sizes of the paths with two copies or
  more. As in dive this includes the copy still visible: it is the space of the files touched more than once;
* *wasted percent* (dive's ``userWastedPercent``): wasted bytes over the size of all layers but the lowest
  (the "user" layers); 0 when both are 0, infinite (``null`` in JSON) when only the user layers hold none;
* *efficiency*: the sum over paths of their smallest copy over the sum of their cumulative sizes (1 when
  there are no bytes); here the latter sum is the total size of the layers;
* *reclaimable bytes* (not a figure of dive): cumulative size minus the size of the copy visible in the
  final view, summed over paths; what squashing the stack into one layer would save;
* *duplicated bytes* (not a figure of dive): for each content (sha256) stored in more than one layer, at the
  same or different paths, its size times its copies less one.

Where this differs from dive, and why: dive ignores opaque directories (its stacked trees keep what they
hide), and sizes a whiteout of a directory by everything beneath it but records that at the directory's own
path, where, as a single copy, it raises the efficiency and counts as no waste; here what an opaque
directory hides is removed as the kernel removes it, and every file beneath a removed directory gets its own
copy of size 0, so that all the bytes of a removed file are waste, as for a removed file in dive. Directories
are no copies at all (dive counts an empty directory, of size 0, as one, which changes no figure in bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import stat
from collections.abc import Iterator, Sequence
from typing import Any

from . import xattrs
from .targets import Target
from .whiteout import XattrFormat, is_whiteout_stat, read_dir_marks

#: dive's default thresholds of its CI mode (``highestWastedBytes`` is off by default)
DEFAULT_LOWEST_EFFICIENCY = 0.9
DEFAULT_HIGHEST_WASTED_PERCENT = 0.1

_DIR = "dir"
_REG = "file"
_OTHER = "other"
_WHITEOUT = "whiteout"


@dataclasses.dataclass(frozen=True)
class Figure:
    """A number of entries and their bytes."""

    count: int = 0
    bytes: int = 0

    def plus(self, size: int) -> Figure:
        return Figure(self.count + 1, self.bytes + size)

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "bytes": self.bytes}


@dataclasses.dataclass
class LayerFigures:
    """What one layer holds and changes. ``index`` counts from 1 at the lowest layer."""

    index: int
    label: str
    path: str
    writable: bool
    digest: str | None
    size: int = 0
    entries: int = 0
    added: Figure = Figure()
    modified: Figure = Figure()
    replaced_bytes: int = 0
    unchanged: Figure = Figure()
    removed: Figure = Figure()

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "path": self.path, "writable": self.writable,
                "digest": self.digest, "size": self.size, "entries": self.entries, "added": self.added.to_json(),
                "modified": {**self.modified.to_json(), "replaced_bytes": self.replaced_bytes},
                "unchanged": self.unchanged.to_json(), "removed": self.removed.to_json()}


@dataclasses.dataclass(frozen=True)
class WastedFile:
    """A path with several copies: how many, their cumulative size (dive's waste), and what squashing would
    drop of it; ``removed``: not in the final view."""

    path: bytes
    copies: int
    wasted_bytes: int
    reclaimable_bytes: int
    removed: bool

    def to_json(self) -> dict[str, Any]:
        return {"path": _show(self.path), "copies": self.copies, "wasted_bytes": self.wasted_bytes,
                "reclaimable_bytes": self.reclaimable_bytes, "removed": self.removed}


@dataclasses.dataclass(frozen=True)
class Duplicate:
    """One content stored in several layers: its digest, size and copies (layer index, path)."""

    digest: str
    size: int
    copies: tuple[tuple[int, bytes], ...]

    @property
    def bytes(self) -> int:
        return self.size * (len(self.copies) - 1)

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size, "bytes": self.bytes,
                "copies": [{"layer": i, "path": _show(p)} for i, p in self.copies]}


@dataclasses.dataclass
class Analysis:
    """The figures of a stack (see the module's docstring for their definitions); ``layers`` lowest first,
    ``wasted_files`` and ``duplicates`` largest first."""

    layers: list[LayerFigures]
    total_size: int
    user_size: int
    final_size: int
    wasted_bytes: int
    wasted_percent: float
    reclaimable_bytes: int
    efficiency: float
    duplicated: Figure
    wasted_files: list[WastedFile]
    duplicates: list[Duplicate]

    def to_json(self, top: int | None = None) -> dict[str, Any]:
        """Everything; ``top``: at most this many wasted files and duplicates (None: all)."""
        return {
            "layers": [layer.to_json() for layer in self.layers],
            "summary": {
                "total_size": self.total_size, "user_size": self.user_size, "final_size": self.final_size,
                "wasted_bytes": self.wasted_bytes,
                "wasted_percent": self.wasted_percent if math.isfinite(self.wasted_percent) else None,
                "reclaimable_bytes": self.reclaimable_bytes, "efficiency": self.efficiency,
                "duplicated": {"files": len(self.duplicates), "copies": self.duplicated.count,
                               "bytes": self.duplicated.bytes},
            },
            "wasted_files": [w.to_json() for w in self.wasted_files[:top]],
            "duplicates": [d.to_json() for d in self.duplicates[:top]],
        }


def _show(path: bytes) -> str:
    return "/" + os.fsdecode(path)


# -- reading a layer ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    kind: str
    size: int
    opaque: bool = False


def _walk(top: bytes, fmt: XattrFormat) -> dict[bytes, _Entry]:
    """The entries of layer directory ``top``, by path relative to it (parents before their children)."""
    out: dict[bytes, _Entry] = {}
    formats = (fmt,)
    seen_inodes: set[tuple[int, int]] = set()
    stack: list[tuple[bytes, bytes, bool]] = [(top, b"", False)]
    while stack:
        where, rel, xwhiteouts = stack.pop()
        try:
            with os.scandir(where) as it:
                items = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            if not rel:
                raise
            continue  # (removed meanwhile: a live mount's writable layer changes as it is read)
        subdirs: list[tuple[bytes, bytes, bool]] = []
        for item in items:
            path = rel + b"/" + item.name if rel else item.name
            try:
                st = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                marks = read_dir_marks(item.path, formats)
                out[path] = _Entry(_DIR, 0, marks.opaque)
                subdirs.append((item.path, path, marks.xwhiteouts))
            elif is_whiteout_stat(st):
                out[path] = _Entry(_WHITEOUT, 0)
            elif stat.S_ISREG(st.st_mode):
                if xwhiteouts and st.st_size == 0 and xattrs.get(item.path, fmt.whiteout) is not None:
                    out[path] = _Entry(_WHITEOUT, 0)
                    continue
                size = st.st_size
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen_inodes:
                        size = 0
                    seen_inodes.add(key)
                out[path] = _Entry(_REG, size)
            else:
                out[path] = _Entry(_OTHER, 0)
        stack.extend(reversed(subdirs))
    return out


# -- the merged view as the layers are stacked -------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Visible:
    kind: str
    size: int
    layer: int  # 0-based, lowest first


def _parent(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


class _View:
    """The merged view of the layers stacked so far: path -> the visible copy, and each directory's children."""

    def __init__(self) -> None:
        self.entries: dict[bytes, _Visible] = {b"": _Visible(_DIR, 0, -1)}
        self.children: dict[bytes, set[bytes]] = {b"": set()}

    def beneath(self, path: bytes, itself: bool) -> Iterator[bytes]:
        """``path`` (when ``itself``) and every path below it."""
        if itself:
            yield path
        todo = list(self.children.get(path, ()))
        while todo:
            p = todo.pop()
            yield p
            todo.extend(self.children.get(p, ()))

    def drop(self, path: bytes) -> None:
        del self.entries[path]
        self.children.pop(path, None)
        self.children[_parent(path)].discard(path)

    def put(self, path: bytes, vis: _Visible) -> None:
        if path in self.entries and vis.kind != _DIR:
            self.children.pop(path, None)
        self.entries[path] = vis
        self.children[_parent(path)].add(path)
        if vis.kind == _DIR:
            self.children.setdefault(path, set())


# -- hashing -----------------------------------------------------------------------------------------------------


class _Hashes:
    def __init__(self, dirs: Sequence[bytes]) -> None:
        self.dirs = dirs
        self.cache: dict[tuple[int, bytes], str | None] = {}

    def of(self, layer: int, path: bytes) -> str | None:
        """The digest of the regular file ``path`` of layer ``layer`` (None when it went away meanwhile, or
        is no regular file now)."""
        key = (layer, path)
        if key not in self.cache:
            found = None
            try:
                fd = os.open(os.path.join(self.dirs[layer], path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                pass
            else:
                with os.fdopen(fd, "rb") as f:
                    if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                        found = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
            self.cache[key] = found
        return self.cache[key]


# -- the analysis ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """How to show a layer: its label, whether it is writable, the digest of the image layer it holds."""

    label: str
    writable: bool = False
    digest: str | None = None


def analyze(target: Target) -> Analysis:
    """The analysis of ``target``'s stack (a live mount's writable layer included)."""
    layers = list(reversed(target.layers))
    return analyze_dirs([os.fsencode(layer.path) for layer in layers], target.xattr,
                        [LayerInfo(layer.label, layer.writable, layer.digest) for layer in layers])


def analyze_dirs(dirs: Sequence[bytes], fmt: XattrFormat, infos: Sequence[LayerInfo] | None = None) -> Analysis:
    """The analysis of the layer directories ``dirs``, lowest first, their markers in namespace ``fmt``."""
    if infos is None:
        infos = [LayerInfo(f"layer {i + 1}") for i in range(len(dirs))]
    view = _View()
    hashes = _Hashes(dirs)
    copies: dict[bytes, list[int]] = {}
    stored: list[tuple[int, bytes, int]] = []  # regular files of size > 0: layer, path, size
    same_candidates: list[tuple[int, int, bytes, int]] = []  # (layer, lower layer, path, size)
    figures: list[LayerFigures] = []
    for k, top in enumerate(dirs):
        info = infos[k]
        fig = LayerFigures(k + 1, info.label, os.fsdecode(top), info.writable, info.digest)
        entries = _walk(top, fmt)
        fig.entries = len(entries)
        gone = hidden_by(view, entries)
        hidden = set(gone)
        for path, e in entries.items():
            if e.kind == _WHITEOUT:
                continue
            fig.size += e.size
            if e.kind != _DIR:
                copies.setdefault(path, []).append(e.size)
                if e.kind == _REG and e.size:
                    stored.append((k, path, e.size))
            vis = view.entries.get(path)
            if vis is None:
                fig.added = fig.added.plus(e.size)
            elif changes(path, e, vis, gone):
                gone.pop(path, None)
                fig.modified = fig.modified.plus(e.size)
                fig.replaced_bytes += vis.size
                if vis.kind != _DIR and e.kind == _DIR:
                    copies.setdefault(path, []).append(0)
                if vis.kind == _REG and e.kind == _REG and vis.size == e.size and e.size:
                    same_candidates.append((k, vis.layer, path, e.size))
        for path, vis in gone.items():
            fig.removed = fig.removed.plus(vis.size)
            if vis.kind != _DIR:
                copies.setdefault(path, []).append(0)
        stack_onto(view, entries, hidden, k)
        figures.append(fig)

    for k, lower, path, size in same_candidates:
        digest = hashes.of(k, path)
        if digest is not None and digest == hashes.of(lower, path):
            figures[k].unchanged = figures[k].unchanged.plus(size)

    return _summarize(figures, view, copies, _duplicates(stored, hashes))


def hidden_by(view: _View, entries: dict[bytes, _Entry]) -> dict[bytes, _Visible]:
    """What a layer (its walk ``entries``) hides of ``view``, the merged view beneath it (path -> the copy
    hidden): a whiteout's path and all beneath it, and what lies beneath a directory it replaces by a
    non-directory or by an opaque directory. The one place these rules are written."""
    gone: dict[bytes, _Visible] = {}
    for path, e in entries.items():
        vis = view.entries.get(path)
        if vis is None:
            continue
        if e.kind == _WHITEOUT:
            for p in view.beneath(path, True):
                gone[p] = view.entries[p]
        elif vis.kind == _DIR and (e.kind != _DIR or e.opaque):
            for p in view.beneath(path, False):
                gone[p] = view.entries[p]
    return gone


def changes(path: bytes, e: _Entry, vis: _Visible, gone: dict[bytes, _Visible]) -> bool:
    """Whether the layer's entry ``e`` at ``path``, over ``vis`` of the view beneath, is a change of it (a
    directory merged with the one beneath is none; see the module's *modified*)."""
    return path in gone or e.kind != _DIR or vis.kind != _DIR or e.opaque


def stack_onto(view: _View, entries: dict[bytes, _Entry], hidden: set[bytes], k: int) -> None:
    """Put layer ``k`` (its walk ``entries``, hiding ``hidden``) on ``view``."""
    for path in sorted(hidden, key=len, reverse=True):
        view.drop(path)
    for path, e in entries.items():
        if e.kind != _WHITEOUT:
            view.put(path, _Visible(e.kind, e.size, k))


def _duplicates(stored: list[tuple[int, bytes, int]], hashes: _Hashes) -> list[Duplicate]:
    by_size: dict[int, list[tuple[int, bytes]]] = {}
    for k, path, size in stored:
        by_size.setdefault(size, []).append((k, path))
    groups: dict[tuple[str, int], list[tuple[int, bytes]]] = {}
    for size, where in by_size.items():
        if len({k for k, _ in where}) < 2:
            continue
        for k, path in where:
            digest = hashes.of(k, path)
            if digest is not None:
                groups.setdefault((digest, size), []).append((k, path))
    out = [Duplicate(digest, size, tuple((k + 1, p) for k, p in where))
           for (digest, size), where in groups.items() if len({k for k, _ in where}) > 1]
    out.sort(key=lambda d: (-d.bytes, d.digest))
    return out


def _summarize(figures: list[LayerFigures], view: _View, copies: dict[bytes, list[int]],
               duplicates: list[Duplicate]) -> Analysis:
    total = sum(f.size for f in figures)
    user = sum(f.size for f in figures[1:])
    final = sum(v.size for v in view.entries.values() if v.kind != _DIR)
    cumulative_all = smallest_all = wasted = reclaimable = 0
    wasted_files = []
    for path, sizes in copies.items():
        cumulative = sum(sizes)
        cumulative_all += cumulative
        smallest_all += min(sizes)
        vis = view.entries.get(path)
        visible = vis.size if vis is not None and vis.kind != _DIR else 0
        reclaimable += cumulative - visible
        if len(sizes) > 1:
            wasted += cumulative
            if cumulative:
                wasted_files.append(WastedFile(path, len(sizes), cumulative, cumulative - visible,
                                               vis is None or vis.kind == _DIR))
    wasted_files.sort(key=lambda w: (-w.wasted_bytes, -w.reclaimable_bytes, w.path))
    percent = wasted / user if user else (0.0 if wasted == 0 else math.inf)
    efficiency = smallest_all / cumulative_all if cumulative_all else 1.0
    duplicated = Figure(sum(len(d.copies) - 1 for d in duplicates), sum(d.bytes for d in duplicates))
    return Analysis(figures, total, user, final, wasted, percent, reclaimable, efficiency, duplicated,
                    wasted_files, duplicates)


# -- dive's CI rules ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RuleResult:
    """One CI rule: its name, threshold (None: disabled), the value it looked at, and whether it passed."""

    name: str
    threshold: float | None
    value: float
    passed: bool

    @property
    def status(self) -> str:
        return "SKIP" if self.threshold is None else "PASS" if self.passed else "FAIL"

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.name, "threshold": self.threshold, "status": self.status,
                "value": self.value if math.isfinite(self.value) else None}


def evaluate(analysis: Analysis, lowest_efficiency: float | None = DEFAULT_LOWEST_EFFICIENCY,
             highest_wasted_bytes: int | None = None,
             highest_wasted_percent: float | None = DEFAULT_HIGHEST_WASTED_PERCENT) -> list[RuleResult]:
    """dive's three CI rules (a threshold of None disables its rule): the efficiency may not be below its
    threshold, the wasted bytes and the wasted percent not above theirs."""
    eff, wb, wp = analysis.efficiency, analysis.wasted_bytes, analysis.wasted_percent
    return [
        RuleResult("lowest-efficiency", lowest_efficiency, eff, lowest_efficiency is None or eff >= lowest_efficiency),
        RuleResult("highest-wasted-bytes", highest_wasted_bytes, wb,
                   highest_wasted_bytes is None or wb <= highest_wasted_bytes),
        RuleResult("highest-wasted-percent", highest_wasted_percent, wp,
                   highest_wasted_percent is None or wp <= highest_wasted_percent),
    ]


_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtpe", start=1):
    _UNITS[_p] = _UNITS[_p + "b"] = 1000**_i
    _UNITS[_p + "i"] = _UNITS[_p + "ib"] = 1024**_i
_BYTES = re.compile(r"\s*([0-9][0-9,]*(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*")


def parse_bytes(text: str) -> int:
    """A number of bytes as dive reads its thresholds: ``20MB`` is 20 000 000, ``20MiB`` 20 971 520, ``1.5k``
    1500; a unit is case-blind, ``B`` or none means bytes."""
    m = _BYTES.fullmatch(text.lower())
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"{text!r} is no number of bytes (say 20MB, 1.5GiB, 1000)")
    return int(float(m.group(1).replace(",", "")) * _UNITS[m.group(2)])

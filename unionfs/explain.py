"""Why a merged path shows what it shows: which layer an entry comes from, what it shadows, what hides the
copies of the layers beneath, and what the next write would do.

:func:`explain` walks each layer's copy of each component of the path, as overlayfs resolves it (upper layer
first; a whiteout hides everything beneath; a non-directory stands alone; a directory merges with the
directories beneath it down to an opaque one), asking the layers through :class:`unionfs.layers.Probing`, so
the markers count exactly as in lookups (kernel whiteouts, xattr whiteouts, opaque directories, AUFS markers
when the stack honours them). It keeps, for every layer, why its copy is not the one shown.

:class:`VirtualXattrs` serves the same facts on a mount, as the virtual xattrs ``user.unionfs.*``.

Nothing here imports pyfuse3 or trio.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
from collections.abc import Sequence
from typing import Any

from . import targets, whiteout
from .layers import ROOT, Found, Stack, join
from .whiteout import NO_MARKS, DirMarks

#: the reserved namespace of the virtual xattrs; every name in it is refused for writing and never listed
VIRTUAL_PREFIX = b"user.unionfs."
#: the path of the layer the entry comes from (bytes, as the mount was given it)
LAYER_XATTR = b"user.unionfs.layer"
#: the JSON of :meth:`Explanation.to_json` for the entry
EXPLAIN_XATTR = b"user.unionfs.explain"
#: the stack of the mount (:func:`unionfs.targets.stack_json`), on every entry
STACK_XATTR = targets.STACK_XATTR

_TYPES = {
    stat.S_IFREG: "regular file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def type_name(mode: int) -> str:
    """A file type for people (``regular file``, ``directory``, ...)."""
    return _TYPES.get(stat.S_IFMT(mode), "unknown type")


def normalize(path: bytes) -> bytes:
    """A merged path relative to the root: no leading, trailing or doubled ``/``, no ``.`` components
    (``b"."`` for the root); ValueError naming the path for a ``..`` component."""
    parts = [p for p in path.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise ValueError(f"{os.fsdecode(path)}: '..' is not allowed in a path inside the stack")
    return b"/".join(parts) if parts else ROOT


def _shown(path: bytes) -> str:
    return "/" if path == ROOT else os.fsdecode(path)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One layer of the stack: its index (0 is the top), directory, label and image layer digest."""

    index: int
    path: str
    label: str
    writable: bool
    digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "path": self.path, "label": self.label, "writable": self.writable,
                "digest": self.digest}


@dataclasses.dataclass(frozen=True)
class Copy:
    """What one layer holds at the path: an object (``type``, ``size``) or a whiteout (``type`` says which
    encoding: ``whiteout``, ``xattr whiteout``, ``AUFS whiteout``; size 0)."""

    layer: int
    type: str
    size: int

    @property
    def is_whiteout(self) -> bool:
        return self.type.endswith("whiteout")

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "type": self.type, "size": self.size}


@dataclasses.dataclass(frozen=True)
class Reason:
    """Why a layer's copy does not show, or why the path is absent.

    ``kind``: ``shadowed`` (by the object of layer ``by`` at ``at``), ``whiteout`` (a whiteout of layer
    ``by`` at ``at``), ``opaque`` (beneath the opaque directory ``at`` of layer ``by``), ``non-directory``
    (``at`` is a non-directory in layer ``by``: nothing beneath it merges, and it has no children), or
    ``missing`` (no layer holds ``at``; ``by`` is None).
    """

    kind: str
    by: int | None
    at: bytes

    def text(self, path: bytes) -> str:
        where = "" if self.at == path else f" at {_shown(self.at)}"
        if self.kind == "shadowed":
            return f"shadowed by layer #{self.by}{where}"
        if self.kind == "whiteout":
            return f"whited out by layer #{self.by}{where}"
        if self.kind == "opaque":
            return f"below the opaque directory {_shown(self.at)} of layer #{self.by}"
        if self.kind == "non-directory":
            return f"{_shown(self.at)} is not a directory in layer #{self.by}"
        return f"not in any layer{where}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "layer": self.by, "at": os.fsdecode(self.at)}


@dataclasses.dataclass(frozen=True)
class Hidden:
    """A copy held by a layer that does not show, and why."""

    copy: Copy
    reason: Reason

    def to_json(self) -> dict[str, Any]:
        return {**self.copy.to_json(), "reason": self.reason.to_json()}


@dataclasses.dataclass(frozen=True)
class NextWrite:
    """What the next change of the entry does. ``action``: ``none`` (it is in the upper layer), ``copy-up``
    (``size`` bytes of a non-directory from layer ``layer``, ``parents`` ancestors copied up before it),
    ``copy-up-dir`` (a directory: metadata only), ``create`` (absent: a new object in the upper layer,
    replacing the upper layer's whiteout there when ``replaces_whiteout``), ``enoent`` or ``enotdir`` (absent,
    and so is its parent directory) or ``erofs`` (read-only stack). ``rename_exdev``: renaming this directory
    fails with EXDEV (a directory with a lower copy; redirect_dir is off)."""

    action: str
    layer: int | None = None
    size: int = 0
    type: str = ""
    parents: int = 0
    rename_exdev: bool = False
    replaces_whiteout: bool = False

    @property
    def text(self) -> str:
        if self.action == "erofs":
            return "EROFS (read-only stack)"
        if self.action == "none":
            out = "none (upper)"
        elif self.action == "create":
            out = "creates it in the upper layer" + (", over its whiteout" if self.replaces_whiteout else "")
        elif self.action == "enoent":
            return "ENOENT (a parent directory is missing)"
        elif self.action == "enotdir":
            return "ENOTDIR (its parent is not a directory)"
        elif self.action == "copy-up-dir":
            out = f"copy-up of the directory (metadata only) from layer #{self.layer}"
        elif self.type == "regular file":
            out = f"copy-up of {self.size} bytes from layer #{self.layer} into the upper layer"
        else:
            out = f"copy-up of the {self.type} from layer #{self.layer} into the upper layer"
        if self.parents:
            out += f", after {self.parents} parent director{'y' if self.parents == 1 else 'ies'}"
        if self.rename_exdev:
            what = "merged directory" if self.action == "none" else "directory of a lower layer"
            out += f"; EXDEV on rename ({what}; redirect_dir is off)"
        return out

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "layer": self.layer, "bytes": self.size, "type": self.type or None,
                "parents": self.parents, "rename": "EXDEV" if self.rename_exdev else None, "text": self.text}


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What the merged view shows at ``path`` and why.

    ``found``: the copy shown (None: absent, for ``absent``'s reason). ``shadowed``: every other layer holding
    an object at the path that does not show, with why. ``whiteouts``: the whiteouts at the path, by layer.
    ``merged_dir``: the layers a directory is merged from (top first; one for a plain directory). ``opaque``: the
    directory shown is opaque. ``copied_up``: the entry is in the upper layer and the lower layers hold a copy
    it replaces (copied up, or replaced by a new object): what they would show without it.
    """

    path: bytes
    writable: bool
    layers: tuple[LayerInfo, ...]
    found: Copy | None
    absent: Reason | None
    shadowed: tuple[Hidden, ...]
    whiteouts: tuple[Copy, ...]
    merged_dir: tuple[int, ...]
    opaque: bool
    copied_up: Copy | None
    next_write: NextWrite

    def to_json(self) -> dict[str, Any]:
        found = None
        if self.found is not None:
            info = self.layers[self.found.layer]
            found = {**self.found.to_json(), "path": info.path, "label": info.label, "digest": info.digest}
        return {
            "path": os.fsdecode(self.path),
            "writable": self.writable,
            "layer_count": len(self.layers),
            "layers": [self.layers[i].to_json() for i in sorted(self.referenced())],
            "found": found,
            "absent": None if self.absent is None else self.absent.to_json(),
            "shadowed": [h.to_json() for h in self.shadowed],
            "whiteouts": [w.to_json() for w in self.whiteouts],
            "merged_dir": list(self.merged_dir) if len(self.merged_dir) > 1 else [],
            "opaque": self.opaque,
            "copied_up": None if self.copied_up is None else self.copied_up.to_json(),
            "next_write": self.next_write.to_json(),
        }

    def referenced(self) -> set[int]:
        """The layers the explanation names (the only ones its JSON describes: a stack may have hundreds)."""
        out = {c.layer for c in (self.found, self.copied_up) if c is not None}
        out.update(h.copy.layer for h in self.shadowed)
        out.update(h.reason.by for h in self.shadowed if h.reason.by is not None)
        out.update(w.layer for w in self.whiteouts)
        out.update(self.merged_dir)
        if self.absent is not None and self.absent.by is not None:
            out.add(self.absent.by)
        if self.next_write.layer is not None:
            out.add(self.next_write.layer)
        return out

    def json_bytes(self) -> bytes:
        """:meth:`to_json` as one line of JSON (ASCII: any byte of a name survives, as a surrogate escape)."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    def lines(self) -> list[str]:
        """A few lines for people."""
        return lines_of(self.to_json())


def _copy_text(layers: dict[int, dict[str, Any]], copy: dict[str, Any]) -> str:
    info = layers[copy["layer"]]
    size = f", {copy['size']} bytes" if copy["type"] == "regular file" else ""
    return f"#{copy['layer']} {info['label']} ({info['path']}): {copy['type']}{size}"


def _reason_text(data: dict[str, Any], path: str) -> str:
    at = data["at"].encode("utf-8", "surrogateescape")
    return Reason(data["kind"], data["layer"], at).text(path.encode("utf-8", "surrogateescape"))


_WHITEOUTS = {
    "whiteout": "a whiteout (character device 0/0)",
    "xattr whiteout": "an xattr whiteout (empty file with overlay.whiteout)",
    "AUFS whiteout": "an AUFS whiteout (.wh.NAME)",
}


def lines_of(data: dict[str, Any]) -> list[str]:
    """The lines for people of an explanation's JSON (:meth:`Explanation.to_json`, or what a mount served)."""
    layers = {info["index"]: info for info in data["layers"]}
    path = data["path"]
    shown = "/" if path == "." else path
    out: list[str] = []

    def layer(i: int) -> str:
        info = layers[i]
        digest = info.get("digest")
        extra = f" {digest}" if digest and digest.partition(":")[2][:12] not in info["label"] else ""
        return f"#{i} {info['label']}{extra} ({info['path']})"

    found = data["found"]
    if found is None:
        out.append(f"{shown}  absent: {_reason_text(data['absent'], path)}")
    else:
        size = f", {found['size']} bytes" if found["type"] == "regular file" else ""
        out.append(f"{shown}  {found['type']}{size}")
        place = f"{found['layer'] + 1} of {data['layer_count']} from the top"
        out.append(f"  from      layer {layer(found['layer'])}, {place}")
    if len(data["merged_dir"]) > 1:
        out.append("  merged    from layers " + ", ".join(f"#{i}" for i in data["merged_dir"]))
    if data["opaque"]:
        out.append("  opaque    the directories of the layers beneath are not merged into it")
    for w in data["whiteouts"]:
        out.append(f"  whiteout  {_WHITEOUTS.get(w['type'], w['type'])} in layer {layer(w['layer'])}")
    for h in data["shadowed"]:
        verb = "hidden   " if found is None else "shadows  "
        out.append(f"  {verb} {_copy_text(layers, h)}; {_reason_text(h['reason'], path)}")
    copied = data["copied_up"]
    if copied is not None:
        out.append(f"  copied up yes: replaces {_copy_text(layers, copied)}")
    elif found is not None and data["writable"] and found["layer"] == 0 and path != ".":
        out.append("  copied up no: only the upper layer holds it")
    out.append(f"  write     {data['next_write']['text']}")
    return out


# -- the walk ----------------------------------------------------------------------------------------------


def _copy(f: Found) -> Copy:
    if f.is_whiteout:
        if f.st is whiteout.AUFS_WHITEOUT_STAT:
            kind = "AUFS whiteout"
        elif stat.S_ISREG(f.st.st_mode):
            kind = "xattr whiteout"
        else:
            kind = "whiteout"
        return Copy(f.layer, kind, 0)
    return Copy(f.layer, type_name(f.st.st_mode), f.st.st_size)


@dataclasses.dataclass
class _Level:
    """One component of the walk: what each layer whose copy of the parent is a directory holds there."""

    path: bytes
    held: dict[int, Found]
    #: the layers whose copy shows or merges (top first)
    shown: list[int]
    #: why each other layer holding something here does not show (and, for a directory, none of its children)
    why: dict[int, Reason]
    #: the entry shown: its top layer, or None (absent)
    top: int | None


def _probe(stack: Stack, path: bytes, layer: int, marks: DirMarks) -> Found | None:
    """What ``layer`` holds at ``path``, its parent being a directory with ``marks`` there."""
    name = path.rpartition(b"/")[2]
    if stack.aufs and path != ROOT and layer >= stack.probing.first and whiteout.is_aufs_marker(name):
        return None  # a marker of a lower layer is never an entry
    marked = frozenset((layer,)) if marks.xwhiteouts else frozenset()
    return next(stack.probing.found(path, (layer,), marked), None)


def _resolve_level(path: bytes, order: Sequence[int], held: dict[int, Found]) -> tuple[int | None, list[int],
                                                                                       dict[int, Reason], bool]:
    """The rule of the stack over the layers ``order`` (those whose copies of the parent merge, top first):
    (top layer or None, the layers shown, why each other holding layer's copy does not show, whited out)."""
    holding = [i for i in order if i in held]
    why: dict[int, Reason] = {}
    if not holding:
        return None, [], why, False
    top = holding[0]
    first = held[top]
    if first.is_whiteout:
        for i in holding[1:]:
            why[i] = Reason("whiteout", top, path)
        return None, [], why, True
    if not stat.S_ISDIR(first.st.st_mode):
        for i in holding[1:]:
            why[i] = Reason("shadowed", top, path)
        return top, [top], why, False
    shown = [top]
    cut: Reason | None = Reason("opaque", top, path) if first.marks.opaque else None
    for i in holding[1:]:
        if cut is not None:
            why[i] = cut
            continue
        f = held[i]
        if f.is_whiteout:
            cut = Reason("whiteout", i, path)
        elif not stat.S_ISDIR(f.st.st_mode):
            why[i] = Reason("shadowed", top, path)
            cut = Reason("non-directory", i, path)
        else:
            shown.append(i)
            if f.marks.opaque:
                cut = Reason("opaque", i, path)
    return top, shown, why, False


def explain(stack: Stack, path: bytes, *, labels: Sequence[str] | None = None,
            digests: Sequence[str | None] | None = None) -> Explanation:
    """Explain the merged path ``path`` (relative to the root, see :func:`normalize`) of ``stack``.

    ``labels``: a name for each layer, top first (default ``upper``, ``lower 1``, ...); ``digests``: the digest
    of the image layer each holds, where there is one.
    """
    path = normalize(path)
    n = len(stack.layers)
    first_lower = 1 if stack.writable else 0
    if labels is None:
        labels = [("upper" if stack.writable and i == 0 else f"lower {i + 1 - first_lower}") for i in range(n)]
    if len(labels) != n or (digests is not None and len(digests) != n):
        raise ValueError(f"{n} layers but {len(labels)} labels")
    infos = tuple(LayerInfo(i, os.fsdecode(layer.path), labels[i], layer.writable,
                            digests[i] if digests is not None else None) for i, layer in enumerate(stack.layers))

    # the root: the upper layer's, merged with the lower layers' as a lookup merges them
    held: dict[int, Found] = {}
    for i in range(n):
        f = _probe(stack, ROOT, i, NO_MARKS)
        if f is not None:
            held[i] = f
    top, shown, why, _ = _resolve_level(ROOT, range(n), held)
    level = _Level(ROOT, held, shown, why, top)
    levels = [level]
    #: why each layer's copy of the current prefix does not show (for layers whose copy is a directory)
    hidden: dict[int, Reason] = dict(why)
    absent: Reason | None = None
    parts = [] if path == ROOT else path.split(b"/")
    prefix = ROOT
    for name in parts:
        prefix = join(prefix, name)
        parent = levels[-1]
        # the layers whose copy of the parent is a directory, in stack order
        alive = [i for i in range(n) if i in parent.held and not parent.held[i].is_whiteout
                 and stat.S_ISDIR(parent.held[i].st.st_mode)]
        held = {}
        for i in alive:
            f = _probe(stack, prefix, i, parent.held[i].marks)
            if f is not None:
                held[i] = f
        parent_dir = parent.top is not None and stat.S_ISDIR(parent.held[parent.top].st.st_mode)
        order = parent.shown if parent_dir else []
        top, shown, why, whited = _resolve_level(prefix, order, held)
        # layers that do not merge into the parent keep the reason their copy of the parent had
        for i in held:
            if i not in order:
                why[i] = hidden[i]
        if absent is None and top is None:
            if not parent_dir:
                assert parent.top is not None
                absent = Reason("non-directory", parent.top, parent.path)
            elif whited:
                first = next(i for i in order if i in held)
                absent = Reason("whiteout", first, prefix)
            else:
                below = [i for i in held if not held[i].is_whiteout]
                absent = why[below[0]] if below else Reason("missing", None, prefix)
        hidden = why
        level = _Level(prefix, held, shown, why, top)
        levels.append(level)

    last = levels[-1]
    found = None if last.top is None or absent is not None else _copy(last.held[last.top])
    if found is None and absent is None:
        absent = Reason("missing", None, path)
    shadowed = tuple(Hidden(_copy(f), last.why[i]) for i, f in sorted(last.held.items())
                     if not f.is_whiteout and i in last.why and (found is None or i != found.layer))
    whiteouts = tuple(_copy(f) for _, f in sorted(last.held.items()) if f.is_whiteout)
    is_dir = found is not None and found.type == "directory"
    merged = tuple(last.shown) if is_dir else ()
    opaque = is_dir and last.top is not None and last.held[last.top].marks.opaque

    copied_up: Copy | None = None
    if found is not None and stack.writable and found.layer == 0 and len(levels) > 1:
        # what the lower layers would show without the upper object (Stack.below_upper)
        below_order = [i for i in levels[-2].shown if i != 0]
        btop, _, _, _ = _resolve_level(path, below_order, last.held)
        if btop is not None:
            copied_up = _copy(last.held[btop])

    if not stack.writable:
        write = NextWrite("erofs")
    else:
        # the ancestors not yet in the upper layer are copied up first (metadata only)
        parents = sum(1 for lv in levels[:-1] if lv.top is not None and lv.top != 0)
        if found is None:
            # the way to it, as path resolution walks it: a missing component is ENOENT, a non-directory ENOTDIR
            blocked: str | None = "enoent" if len(levels) < 2 else None
            for lv in levels[:-1]:
                if lv.top is None:
                    blocked = "enoent"
                    break
                if not stat.S_ISDIR(lv.held[lv.top].st.st_mode):
                    blocked = "enotdir"
                    break
            if blocked is not None:
                write = NextWrite(blocked)
            else:
                write = NextWrite("create", parents=parents, replaces_whiteout=any(w.layer == 0 for w in whiteouts))
        elif found.layer == 0:
            write = NextWrite("none", rename_exdev=is_dir and len(merged) > 1 and path != ROOT)
        elif is_dir:
            write = NextWrite("copy-up-dir", found.layer, parents=parents, rename_exdev=True)
        else:
            write = NextWrite("copy-up", found.layer, found.size if found.type == "regular file" else 0,
                              found.type, parents)
    return Explanation(path, stack.writable, infos, found, absent, shadowed, whiteouts, merged, bool(opaque),
                       copied_up, write)


# -- the virtual xattrs of a mount --------------------------------------------------------------------------


def is_virtual(name: bytes) -> bool:
    """Whether ``name`` lies in the reserved namespace ``user.unionfs.*``."""
    return name.startswith(VIRTUAL_PREFIX)


class VirtualXattrs:
    """The virtual xattrs of a mount over ``stack``: ``user.unionfs.layer`` (the directory of the layer an
    entry comes from), ``user.unionfs.explain`` (:meth:`Explanation.to_json` of it, as JSON) and
    ``user.unionfs.stack`` (:func:`unionfs.targets.stack_json` of the mount). Computed on every read, never
    stored; another name of the namespace is absent (ENODATA)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        first = 1 if stack.writable else 0
        upper = stack.layers[0].path if stack.writable else None
        self.stack_value = targets.stack_json([la.path for la in stack.layers[first:]], upper, stack.fmt)

    def get(self, path: bytes | None, layer: int, name: bytes) -> bytes:
        """The value of ``name`` for the entry at merged path ``path`` served from ``layer`` (``path`` None: an
        object whose names are all removed, reached through an open descriptor)."""
        if name == STACK_XATTR:
            return self.stack_value
        if name == LAYER_XATTR:
            return self.stack.layers[layer].path
        if name == EXPLAIN_XATTR and path is not None:
            return explain(self.stack, path).json_bytes()
        raise OSError(errno.ENODATA, "No data available")

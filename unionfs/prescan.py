"""``-o prescan``: the lower layers resolved once, at mount, so that a lookup costs the same through 500 layers
as through one.

Without it a lookup probes every lower layer that holds the parent directory (one ``lstat``, and for a
directory one xattr read, per layer; with ``-o aufs_markers`` also one ``access`` per layer missing the name
and per lower directory), as the kernel does: its cost grows with the number of layers.  With it the merged
view of the lower layers is walked once at mount, through the probing source itself
(:meth:`~unionfs.layers.Probing.lookup` and :meth:`~unionfs.layers.Probing.listdir`, AUFS markers read as
there), and kept as a table: merged path -> where the object lives (the layer of a non-directory, or a
directory's contributing layers and markers).  A lookup then consults the upper layer (one ``lstat``), the
table, and stats the one lower object it names.

Lower layers must not change while mounted (overlayfs requires the same); with this option a name added to a
lower layer after the mount stays unseen until the next mount.  Memory: about 100 bytes per lower path.
"""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import Callable

from .layers import ROOT, Entry, Probing, join


@dataclasses.dataclass(frozen=True, slots=True)
class DirInfo:
    """A merged lower directory: its contributing layers (top first), those with xattr whiteouts, and
    whether the top one is opaque."""

    dirs: tuple[int, ...]
    xattr_whiteouts: frozenset[int]
    opaque: bool


_NONE: frozenset[int] = frozenset()

#: how many lower paths between two progress reports
PROGRESS_EVERY = 10000


class Prescanned:
    """A :class:`~unionfs.layers.LowerSource` answering from a table made at construction: merged path ->
    layer index (a non-directory) or :class:`DirInfo` (a directory), for the lower layers only."""

    def __init__(self, probing: Probing, progress: Callable[[int], None] | None = None) -> None:
        self.probing = probing
        self.paths: dict[bytes, int | DirInfo] = {}
        #: directories this process may not read or search (EACCES/EPERM): lookups in them probe the layers
        #: at lookup time, and fail there as they would without the table
        self.closed: set[bytes] = set()
        root = probing.root()
        if root is None:
            return
        self.paths[ROOT] = DirInfo(root.dirs, root.xattr_whiteouts or _NONE, root.opaque)
        todo = [root]
        report = PROGRESS_EVERY
        while todo:
            parent = todo.pop()
            try:
                self._scan(parent, todo)
            except PermissionError:
                self.closed.add(parent.path)
            if progress is not None and len(self.paths) >= report:
                progress(len(self.paths))
                report = len(self.paths) + PROGRESS_EVERY

    def _scan(self, parent: Entry, todo: list[Entry]) -> None:
        probing = self.probing
        for name, (layer, ftype) in probing.listdir(parent).items():
            path = join(parent.path, name)
            if ftype != stat.S_IFDIR:
                self.paths[path] = layer
                continue
            child = probing.lookup(parent, name)
            if child is None:
                continue
            if not child.is_dir:
                self.paths[path] = child.layer
                continue
            self.paths[path] = DirInfo(child.dirs, child.xattr_whiteouts or _NONE, child.opaque)
            todo.append(child)

    def __len__(self) -> int:
        return len(self.paths)

    def covers(self, path: bytes) -> bool:
        """Whether lookups in directory ``path`` can be answered from the table (it was scanned whole)."""
        return isinstance(self.paths.get(path), DirInfo) and path not in self.closed

    def root(self) -> Entry | None:
        return self.entry(ROOT) if ROOT in self.paths else self.probing.root()

    def lookup(self, parent: Entry, name: bytes) -> Entry | None:
        if not self.covers(parent.path):
            return self.probing.lookup(parent, name)
        return self.entry(join(parent.path, name))

    def entry(self, path: bytes) -> Entry | None:
        """The lower object at ``path`` (None: no lower layer shows anything there)."""
        found = self.paths.get(path)
        if found is None:
            return None
        top = found if isinstance(found, int) else found.dirs[0]
        try:
            st = self.probing.layers[top].lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if isinstance(found, int):
            return Entry(path, top, st)
        if not stat.S_ISDIR(st.st_mode):  # the layer changed under the mount
            return None
        return Entry(path, top, st, found.dirs, found.xattr_whiteouts, found.opaque)


def scanner(progress: Callable[[int], None] | None = None) -> Callable[[Probing], Prescanned]:
    """What :class:`~unionfs.layers.Stack` takes as ``lowers=`` to answer lookups from a table, reporting the
    number of lower paths scanned so far every :data:`PROGRESS_EVERY` paths."""
    return lambda probing: Prescanned(probing, progress)


__all__ = ["DirInfo", "Prescanned", "scanner"]

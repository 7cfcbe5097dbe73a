"""``-o prescan``: the lower layers resolved once, at mount, so that a lookup costs the same through 500 layers
as through one.

Without it a lookup probes every lower layer that holds the parent directory (one ``lstat``, and for a
directory one xattr read, per layer), as the kernel does: its cost grows with the number of layers.  With it
the merged view of the lower layers is walked once at mount, through the same resolution code
(:meth:`Stack.lookup`, :meth:`Stack.listdir`), and kept as a table: merged path -> where the object lives
(the layer of a non-directory, or a directory's contributing layers and markers).  A lookup then consults the
upper layer (one ``lstat``), the table, and stats the one lower object it names.

Lower layers must not change while mounted (overlayfs requires the same); with this option a name added to a
lower layer after the mount stays unseen until the next mount.  Memory: about 100 bytes per lower path.
"""

from __future__ import annotations

import stat
from collections.abc import Callable

from .layers import ROOT, Entry, Stack, join


class DirInfo:
    """A merged lower directory: its contributing layers (top first), those with xattr whiteouts, and
    whether the top one is opaque."""

    __slots__ = ("dirs", "xw", "opaque")

    def __init__(self, dirs: tuple[int, ...], xw: frozenset[int], opaque: bool) -> None:
        self.dirs = dirs
        self.xw = xw
        self.opaque = opaque


_NO_XW: frozenset[int] = frozenset()


class LowerTable:
    """Merged path -> layer index (a non-directory) or DirInfo (a directory), for the lower layers only."""

    def __init__(self, stack: Stack, progress: Callable[[int], None] | None = None) -> None:
        self.paths: dict[bytes, int | DirInfo] = {}
        #: directories this process may not read or search (EACCES/EPERM): lookups in them probe the layers
        #: at lookup time, and fail there as they would without the table
        self.closed: set[bytes] = set()
        root = stack.lower_root()
        if root is None:
            return
        self.paths[ROOT] = DirInfo(root.dirs, root.xw or _NO_XW, root.opaque)
        todo = [root]
        report = 10000
        while todo:
            parent = todo.pop()
            try:
                self._scan(stack, parent, todo)
            except PermissionError:
                self.closed.add(parent.path)
            if progress is not None and len(self.paths) >= report:
                progress(len(self.paths))
                report = len(self.paths) + 10000

    def _scan(self, stack: Stack, parent: Entry, todo: list[Entry]) -> None:
        for name, (layer, fmt) in stack.listdir(parent).items():
            path = join(parent.path, name)
            if fmt != stat.S_IFDIR:
                self.paths[path] = layer
                continue
            child = stack.lookup(parent, name)
            if child is None:
                continue
            if not child.is_dir:
                self.paths[path] = child.layer
                continue
            self.paths[path] = DirInfo(child.dirs, child.xw or _NO_XW, child.opaque)
            todo.append(child)

    def covers(self, path: bytes) -> bool:
        """Whether lookups in directory ``path`` can be answered from the table (it was scanned whole)."""
        return isinstance(self.paths.get(path), DirInfo) and path not in self.closed

    def __len__(self) -> int:
        return len(self.paths)

    def entry(self, stack: Stack, path: bytes) -> Entry | None:
        """The lower object at ``path`` (None: no lower layer shows anything there)."""
        found = self.paths.get(path)
        if found is None:
            return None
        top = found if isinstance(found, int) else found.dirs[0]
        try:
            st = stack.layers[top].lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if isinstance(found, int):
            return Entry(path, top, st)
        if not stat.S_ISDIR(st.st_mode):  # the layer changed under the mount
            return None
        return Entry(path, top, st, found.dirs, found.xw, found.opaque)


__all__ = ["DirInfo", "LowerTable"]

"""Inode table: our own inode numbers, exact lookup counts, forget, and merged path <-> node maps.

Numbers are derived from the real (device, inode) of the object where it was first seen, so they are the
same after a remount over unchanged layers, and a copied-up object keeps the number of its origin for the
life of the mount.

The names of a hard-linked upper file are one node. Each name of a hard-linked lower file is a node of its own,
as on the kernel's overlay: FUSE requests name the inode only, and a change through one name must copy up that
name alone (the others keep naming the lower file). Those names show one inode number all the same, as on the
kernel, where a reply can show another number than the node's (:meth:`InodeTable.shown`; the native part).

Memory follows what the kernel holds: a node lives exactly as long as the kernel references its inode (or a
file of it is open), costs about 500 bytes with everything it holds (bench/memory.py: 492 B per inode over
1,000,000 files, where a node keeping its Entry and os.stat_result cost 1,246 B), and once the kernel has
forgotten most of them the memory goes back to the system (:meth:`InodeTable.trim`).
"""

from __future__ import annotations

import gc
import os
import stat
import struct
from typing import Any

import pyfuse3

from ..copyup import CopiedUp
from ..layers import ROOT, Entry, join, split

_DEV_SHIFT = 48
_SPARE_BASE = 1 << 62


class Node:
    """What the kernel knows as one inode.

    Kept small: the kernel may hold millions of them (one per inode it has in its cache). A node's entry is
    kept whole only while it is among the most recently used (:data:`RECENT` nodes); the others keep its parts
    (path, layer and directory shape, and the stat packed in 92 bytes) and make it again when asked for it.
    A node with one name keeps it as that one bytes object, shared with its entry's path and the table's key.
    """

    __slots__ = ("ino", "_entry", "_path", "_shape", "_st", "_names", "lookups", "opens", "unlinked", "listing")

    def __init__(self, ino: int, entry: Entry) -> None:
        self.ino = ino
        self._entry: Entry | None = None
        self._path = entry.path
        self._shape: _Shape = _NO_SHAPE
        self._st: bytes | os.stat_result = b""
        #: every merged path known to lead here (more than one for hard links): None, one, or a list of them
        self._names: bytes | list[bytes] | None = entry.path
        self.lookups = 0
        self.opens = 0
        self.unlinked = False
        #: merged listing of a directory (name -> (layer, file type)), kept until something changes in it
        self.listing: dict[bytes, tuple[int, int]] | None = None
        self.entry = entry

    @property
    def entry(self) -> Entry:
        """What the node stands for now."""
        entry = self._entry
        if entry is None:
            layer, dirs, xattr_whiteouts, opaque = self._shape
            entry = tuple.__new__(Entry, (self._path, layer, _unpack(self._st), dirs, xattr_whiteouts, opaque))
            self._entry = entry
            _recent.add(self)
        return entry

    @entry.setter
    def entry(self, entry: Entry) -> None:
        if self._entry is None:
            _recent.add(self)
        self._entry = entry
        self._path = entry.path

    def _compact(self) -> None:
        """Keep the parts of the entry only (it is no longer among the recently used)."""
        entry = self._entry
        if entry is not None:
            self._shape = _shared_shape(entry)
            self._st = _pack(entry.st)
            self._entry = None

    @property
    def path(self) -> bytes:
        return self._path

    @property
    def paths(self) -> list[bytes]:
        """Every merged path known to lead here (a new list; assign one to change them)."""
        names = self._names
        if names is None:
            return []
        if isinstance(names, bytes):
            return [names]
        return list(names)

    @paths.setter
    def paths(self, paths: list[bytes]) -> None:
        self._names = None if not paths else paths[0] if len(paths) == 1 else list(paths)

    def add_name(self, path: bytes) -> None:
        """One more name (in place: a file may have many)."""
        names = self._names
        if isinstance(names, list):
            names.append(path)
        else:
            self._names = [names, path] if names is not None else path

    def identity(self) -> tuple[int, int, int]:
        """(file type and mode, st_dev, st_ino) of the object, without making the whole entry again."""
        entry = self._entry
        st = entry.st if entry is not None else self._st
        if isinstance(st, bytes):
            mode, ino, dev = _IDENTITY.unpack_from(st)
            return mode, dev, ino
        return st.st_mode, st.st_dev, st.st_ino

    def __repr__(self) -> str:
        return f"Node({self.ino}, {self.paths!r}, lookups={self.lookups}, opens={self.opens})"


#: (layer, dirs, xattr_whiteouts, opaque) of an entry: the same few values for nearly every node, shared
_Shape = tuple[int, tuple[int, ...], frozenset[int], bool]
_NO_SHAPE: _Shape = (0, (), frozenset(), False)
_SHAPES_MAX = 1 << 12
_shapes: dict[_Shape, _Shape] = {}


def _shared_shape(entry: Entry) -> _Shape:
    shape: _Shape = (entry.layer, entry.dirs, entry.xattr_whiteouts, entry.opaque)
    found = _shapes.get(shape)
    if found is None:
        if len(_shapes) >= _SHAPES_MAX:
            _shapes.clear()
        found = _shapes[shape] = shape
    return found


#: the fields of a stat packed: mode, ino, dev, nlink, uid, gid, size, atime_ns, mtime_ns, ctime_ns, blksize,
#: blocks, rdev (os.stat_result's other fields derive from these)
_STAT = struct.Struct("=IQQQIIqqqqqqQ")
_IDENTITY = struct.Struct("=IQQ")
_BILLION = 10**9
#: os.stat_result as this interpreter builds it (ten sequence fields, then the float times, the ns times,
#: st_blksize, st_blocks, st_rdev): else stats are kept whole
_PACKABLE = (os.stat_result.n_sequence_fields, os.stat_result.n_fields) == (10, 19)


def _pack(st: os.stat_result) -> bytes | os.stat_result:
    """``st`` in 92 bytes, or ``st`` itself where its fields do not fit (times beyond 1677-2262, a stat made of
    ten fields only...)."""
    if not _PACKABLE:
        return st
    try:
        return _STAT.pack(st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
                          st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_blksize, st.st_blocks, st.st_rdev)
    except (struct.error, TypeError):
        return st


def _unpack(packed: bytes | os.stat_result) -> os.stat_result:
    """The os.stat_result ``_pack`` kept: equal to the original in every field (the float times are computed
    from the nanoseconds as os.stat computes them)."""
    if not isinstance(packed, bytes):
        return packed
    mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime, blksize, blocks, rdev = _STAT.unpack(packed)
    a_s, a_ns = divmod(atime, _BILLION)
    m_s, m_ns = divmod(mtime, _BILLION)
    c_s, c_ns = divmod(ctime, _BILLION)
    return os.stat_result((mode, ino, dev, nlink, uid, gid, size, a_s, m_s, c_s,
                           a_s + a_ns * 1e-9, m_s + m_ns * 1e-9, c_s + c_ns * 1e-9, atime, mtime, ctime,
                           blksize, blocks, rdev))


#: how many nodes keep their whole entry (the most recently used)
RECENT = 1024


class _Recent:
    """The nodes that keep their whole entry: a ring of the last :data:`RECENT` made whole (each node is in it
    at most once: exactly while it keeps its entry)."""

    def __init__(self, size: int) -> None:
        self.ring: list[Node | None] = [None] * size
        self.at = 0

    def add(self, node: Node) -> None:
        old = self.ring[self.at]
        if old is not None:
            old._compact()
        self.ring[self.at] = node
        self.at = (self.at + 1) % len(self.ring)

    def clear(self) -> None:
        for node in self.ring:
            if node is not None:
                node._compact()
        self.ring = [None] * len(self.ring)
        self.at = 0


_recent = _Recent(RECENT)


def shared_listing(names: dict[bytes, tuple[int, int]]) -> dict[bytes, tuple[int, int]]:
    """``names`` (a merged listing, name -> (layer, file type)) with its values shared: a few distinct pairs
    among thousands of names, each otherwise a tuple of its own."""
    shared: dict[tuple[int, int], tuple[int, int]] = {}
    for name, value in names.items():
        names[name] = shared.setdefault(value, value)
    return names


#: memory is given back (see InodeTable.trim) once the table holds a quarter of the nodes it held at most,
#: and at least this many fewer
TRIM_MIN = 1 << 14


def _malloc_trim() -> None:
    """Return the C library's free memory to the system (glibc's malloc_trim: free pages inside the heap too)."""
    global _trim
    if _trim is None:
        import ctypes

        try:
            _trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim: Any = None


class InodeTable:
    """Every node the kernel holds: its number, its names, its current entry and its lookup count. Only this
    table changes a node's names and entry."""

    def __init__(self, layer_devs: list[int], root: Entry, *, writable: bool = True) -> None:
        #: whether objects may be copied up: else the names of a hard-linked lower file are one node too
        self._writable = writable
        #: the nodes of the second (third...) names of hard-linked lower files: number -> the lower object's
        #: (st_dev, st_ino), whose number they show (InodeTable.shown)
        self._names_of: dict[int, tuple[int, int]] = {}
        #: the other way: (st_dev, st_ino) of such a lower object -> the numbers of those nodes
        self._other_names: dict[tuple[int, int], set[int]] = {}
        #: numbers of such nodes freed since the last take_dropped_names
        self._dropped_names: list[int] = []
        self._dev_index: dict[int, int] = {}
        for dev in layer_devs:
            self._dev_index.setdefault(dev, len(self._dev_index))
        #: (dev, ino) -> our number, where the formula does not give it (copy-ups, collisions)
        self._remap: dict[tuple[int, int], int] = {}
        self._spare = _SPARE_BASE
        self.nodes: dict[int, Node] = {}
        self.by_path: dict[bytes, Node] = {}
        #: the most nodes held since memory was last given back
        self._peak = 0
        self.root = Node(pyfuse3.ROOT_INODE, root)
        self.root.lookups = 1 << 62  # never forgotten
        self.nodes[self.root.ino] = self.root
        self.by_path[ROOT] = self.root
        self._remap[(root.st.st_dev, root.st.st_ino)] = pyfuse3.ROOT_INODE

    def number(self, st: os.stat_result) -> int:
        """Our inode number for a real object."""
        return self._number((st.st_dev, st.st_ino))

    def _number(self, key: tuple[int, int]) -> int:
        n = self._remap.get(key)
        if n is not None:
            return n
        dev, ino = key
        idx = self._dev_index.get(dev)
        if idx is not None and ino < (1 << _DEV_SHIFT) and idx < (1 << 13):
            n = (idx << _DEV_SHIFT) | ino
            if n > pyfuse3.ROOT_INODE:
                return n
        return self._allocate(key)

    def shown(self, node: Node) -> int | None:
        """The inode number replies show for ``node`` where it is not the node's own: the second (third...)
        name of a hard-linked lower file shows the number of the lower file, as its first name does."""
        key = self._names_of.get(node.ino)
        return None if key is None else self._number(key)

    def take_dropped_names(self) -> list[int]:
        """Numbers of the nodes freed since the last call that showed another number (:meth:`shown`)."""
        dropped, self._dropped_names = self._dropped_names, []
        return dropped

    def _allocate(self, key: tuple[int, int]) -> int:
        self._spare += 1
        self._remap[key] = self._spare
        return self._spare

    def stats(self) -> dict[str, int]:
        """Sizes of the table: nodes, names (paths) leading to them, directory listings kept and their names."""
        listings = [n.listing for n in self.nodes.values() if n.listing is not None]
        return {"nodes": len(self.nodes), "names": len(self.by_path), "listings": len(listings),
                "listed_names": sum(map(len, listings))}

    def get(self, ino: int) -> Node:
        return self.nodes[ino]

    def update(self, node: Node, entry: Entry) -> None:
        """What ``node`` stands for now (a fresher stat, or its copy in the upper layer)."""
        node.entry = entry

    def reference(self, entry: Entry) -> Node:
        """The node for ``entry``, with one more lookup the kernel holds (a lookup, create, mkdir, link...)."""
        node = self.node_for(entry)
        node.lookups += 1
        return node

    def child(self, parent: Node, name: bytes) -> Node | None:
        """The node known under ``name`` in directory ``parent``, if any."""
        return self.by_path.get(join(parent.path, name))

    def parent_of(self, node: Node) -> Node | None:
        """The node of the directory ``node`` is in (the root's is the root), if the kernel still holds it."""
        if node.ino == pyfuse3.ROOT_INODE:
            return node
        return self.by_path.get(split(node.path)[0])

    def listing_changed(self, *dir_paths: bytes) -> None:
        """Directories whose merged listing may differ now: drop what was kept of it."""
        for path in dir_paths:
            node = self.by_path.get(path)
            if node is not None:
                node.listing = None

    def node_for(self, entry: Entry) -> Node:
        """The node for a freshly resolved entry (existing, or new with no lookups yet)."""
        node = self.by_path.get(entry.path)
        if node is not None and node.ino != pyfuse3.ROOT_INODE:
            same = stat.S_IFMT(node.identity()[0]) == stat.S_IFMT(entry.st.st_mode)
            if same and not node.unlinked:
                if node.path == entry.path:
                    node.entry = entry
                return node
            self._drop_path(node, entry.path)
        elif node is not None:
            node.entry = entry
            return node
        ino = self.number(entry.st)
        node = self.nodes.get(ino)
        key = (entry.st.st_dev, entry.st.st_ino)
        same = node is not None and not stat.S_ISDIR(entry.st.st_mode) and node.identity()[1:] == key
        shared = entry.layer == 0 or not self._writable  # (no copy-up can break this file's links)
        if same and shared and node is not None and not node.unlinked:
            # Another name of a hard-linked file: one inode.
            self.add_path(node, entry.path)
            return node
        if same and not shared:
            # Another name of a hard-linked lower file (the node may be a name of it removed since, still
            # held): a node of its own, which shows the file's number.
            self._spare += 1
            node = self._new_node(self._spare, entry)
            self._names_of[node.ino] = key
            self._other_names.setdefault(key, set()).add(node.ino)
            return node
        if node is not None:
            # The real inode number was reused by a new object while the old node is still referenced.
            ino = self._allocate(key)
        return self._new_node(ino, entry)

    def _new_node(self, ino: int, entry: Entry) -> Node:
        node = Node(ino, entry)
        self.nodes[ino] = node
        self.by_path[entry.path] = node
        if len(self.nodes) > self._peak:
            self._peak = len(self.nodes)
        return node

    def add_path(self, node: Node, path: bytes) -> None:
        """``path`` is one more name of ``node`` (a hard link)."""
        node.add_name(path)
        self.by_path[path] = node

    def linked(self, node: Node, entry: Entry) -> None:
        """A hard link made ``entry`` one more name of ``node``, and the kernel holds one more reference."""
        self.listing_changed(split(entry.path)[0])
        self.add_path(node, entry.path)
        node.lookups += 1

    def listed(self, node: Node) -> None:
        """A directory listing handed ``node`` to the kernel (READDIRPLUS): one more reference it holds."""
        node.lookups += 1

    def opened(self, node: Node) -> None:
        node.opens += 1

    def copied_up(self, copied: CopiedUp) -> list[Node]:
        """An object moved to the upper layer: it keeps its number, now reached through the copy. Returns the
        nodes that show another number from now on (:meth:`shown`): where the copy broke a lower hard link,
        the copy no longer shows the lower file's number, nor the other names the copy's own."""
        old, new = copied.old, copied.new
        old_key, new_key = (old.st.st_dev, old.st.st_ino), (new.st.st_dev, new.st.st_ino)
        self.listing_changed(split(new.path)[0])
        node = self.by_path.get(new.path)
        if node is None:
            if not copied.breaks_hard_link:  # (else the lower file's number stays its other names')
                self._remap[new_key] = self._number(old_key)
            return []
        self._remap[new_key] = node.ino
        node.entry = new
        if not copied.breaks_hard_link:
            return []
        key = self._names_of.pop(node.ino, None)
        if key is not None:
            # Another name than the first: the copy shows its own number.
            self._forget_other_name(key, node.ino)
            return [node]
        if self._number(old_key) != node.ino:
            return []
        # The first name, whose number the lower file had: the names still naming it show a new one.
        self._allocate(old_key)
        return [self.nodes[ino] for ino in sorted(self._other_names.get(old_key, ()))]

    def _forget_other_name(self, key: tuple[int, int], ino: int) -> None:
        others = self._other_names.get(key)
        if others is not None:
            others.discard(ino)
            if not others:
                del self._other_names[key]

    def _drop_path(self, node: Node, path: bytes) -> None:
        if self.by_path.get(path) is node:
            del self.by_path[path]
        paths = node.paths
        if path in paths:
            paths.remove(path)
            node.paths = paths

    def removed(self, parent: Node, name: bytes, last_link: bool) -> None:
        """``name`` in ``parent`` was removed; ``last_link``: no other name leads to its object."""
        path = join(parent.path, name)
        node = self.by_path.get(path)
        if node is not None:
            self.unlinked(node, path, last_link)

    def unlinked(self, node: Node, path: bytes, last_link: bool) -> None:
        """``path`` no longer leads to ``node``."""
        self._drop_path(node, path)
        paths = node.paths
        if paths and node.path == path:
            node.entry = node.entry.at(paths[0])
        if last_link or not paths:
            node.unlinked = True
            for p in paths:
                if self.by_path.get(p) is node:
                    del self.by_path[p]
            node.paths = []
            _mode, dev, ino = node.identity()
            # (a lower file stays, with the number its other names show: only an upper one's may be reused)
            if self._remap.get((dev, ino)) == node.ino and node.entry.layer == 0:
                del self._remap[(dev, ino)]
        self._maybe_free(node)

    def renamed(self, old_parent: Node, old_name: bytes, moved: Entry, replaced: Entry | None,
                replaced_last_link: bool) -> None:
        """``old_name`` in ``old_parent`` is now ``moved`` (at its new path), over ``replaced`` (None: nothing
        was there)."""
        old_path, new_path = join(old_parent.path, old_name), moved.path
        self.listing_changed(old_parent.path, split(new_path)[0])
        if old_path == new_path:  # nothing moved
            return
        target = self.by_path.get(new_path)
        if target is not None and replaced is not None:
            self.unlinked(target, new_path, replaced_last_link)
        self._move(old_path, new_path, moved)

    def exchanged(self, a: Entry, b: Entry) -> None:
        """The objects at the paths of ``a`` and ``b`` swapped places (RENAME_EXCHANGE): ``a`` and ``b`` are what
        stands at each path now."""
        self.listing_changed(split(a.path)[0], split(b.path)[0])
        node_a, node_b = self.by_path.pop(b.path, None), self.by_path.pop(a.path, None)  # the nodes before
        for node, now in ((node_a, a), (node_b, b)):
            if node is not None:
                old = b.path if now is a else a.path
                node.paths = [now.path if p == old else p for p in node.paths]
                node.entry = now
                self.by_path[now.path] = node
        moved_a = self._take_below(b.path) if a.is_dir else []
        moved_b = self._take_below(a.path) if b.is_dir else []
        self._put_below(b.path, a.path, moved_a)
        self._put_below(a.path, b.path, moved_b)

    def _move(self, old_path: bytes, new_path: bytes, entry: Entry) -> None:
        """Everything at or below ``old_path`` now lives at ``new_path`` (``entry``: what is there now)."""
        node = self.by_path.pop(old_path, None)
        if node is not None:
            node.paths = [new_path if p == old_path else p for p in node.paths]
            node.entry = entry
            self.by_path[new_path] = node
        if entry.is_dir:
            self._put_below(old_path, new_path, self._take_below(old_path))

    def _take_below(self, path: bytes) -> list[tuple[bytes, Node]]:
        prefix = path + b"/"
        below = [(p, n) for p, n in self.by_path.items() if p.startswith(prefix)]
        for p, _n in below:
            del self.by_path[p]
        return below

    def _put_below(self, old: bytes, new: bytes, below: list[tuple[bytes, Node]]) -> None:
        for p, n in below:
            q = new + p[len(old):]
            n.paths = [q if x == p else x for x in n.paths]
            if n.path == p:
                n.entry = n.entry.at(q)
            self.by_path[q] = n

    def forget(self, ino: int, nlookup: int) -> None:
        node = self.nodes.get(ino)
        if node is None or ino == pyfuse3.ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - nlookup)
        self._maybe_free(node)

    def trim(self) -> bool:
        """Give memory back to the system once the table has shrunk to a quarter of its peak (the kernel forgot
        most of what it held, say after ``echo 2 > /proc/sys/vm/drop_caches``); True when it did.

        Freed nodes alone do not make the process smaller: the two maps keep tables sized for the peak (a dict
        never shrinks when keys are deleted), Python's free lists keep some of the freed objects, each pinning
        the 1 MiB arena of its small-object allocator it is in, and the C library keeps its freed heap pages.
        So the maps are copied (to tables sized for what is left), a full collection empties the free lists
        (and lets those arenas go), and malloc_trim(3) hands the free pages back. Measured after a find over
        1,000,000 files and a drop_caches (bench/memory.py): none of the growth came back without this; 87% with
        the maps copied, 89% with the collection too, 96% with malloc_trim. Its cost is in proportion to what
        is left, a quarter at most of the nodes freed since the last time."""
        held = len(self.nodes)
        if self._peak - held < TRIM_MIN or held > self._peak // 4:
            return False
        self.nodes = dict(self.nodes)
        self.by_path = dict(self.by_path)
        self._remap = dict(self._remap)
        _recent.clear()
        gc.collect()
        _malloc_trim()
        self._peak = held
        return True

    def _maybe_free(self, node: Node) -> None:
        if node.lookups > 0 or node.opens > 0 or node.ino == pyfuse3.ROOT_INODE:
            return
        if self.nodes.get(node.ino) is node:
            del self.nodes[node.ino]
            key = self._names_of.pop(node.ino, None)
            if key is not None:
                self._forget_other_name(key, node.ino)
                self._dropped_names.append(node.ino)
        for p in node.paths:
            if self.by_path.get(p) is node:
                del self.by_path[p]
        node.listing = None  # (the node may linger a while among the recently used)

    def release_open(self, node: Node) -> None:
        node.opens -= 1
        self._maybe_free(node)

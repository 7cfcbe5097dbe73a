"""Inode table: our own inode numbers, exact lookup counts, forget, and merged path <-> node maps.

Numbers are derived from the real (device, inode) of the object where it was first seen, so they are the
same after a remount over unchanged layers, and a copied-up object keeps the number of its origin for the
life of the mount.
"""

from __future__ import annotations

import os
import stat

import pyfuse3

from ..copyup import CopiedUp
from ..layers import ROOT, Entry, join, split

_DEV_SHIFT = 48
_SPARE_BASE = 1 << 62


class Node:
    """What the kernel knows as one inode."""

    __slots__ = ("ino", "entry", "paths", "lookups", "opens", "unlinked", "listing")

    def __init__(self, ino: int, entry: Entry) -> None:
        self.ino = ino
        self.entry = entry
        #: every merged path known to lead here (more than one for hard links); entry.path is paths[0]
        self.paths: list[bytes] = [entry.path]
        self.lookups = 0
        self.opens = 0
        self.unlinked = False
        #: merged listing of a directory (name -> (layer, file type)), kept until something changes in it
        self.listing: dict[bytes, tuple[int, int]] | None = None

    @property
    def path(self) -> bytes:
        return self.entry.path

    def __repr__(self) -> str:
        return f"Node({self.ino}, {self.paths!r}, lookups={self.lookups}, opens={self.opens})"


class InodeTable:
    """Every node the kernel holds: its number, its names, its current entry and its lookup count. Only this
    table changes a node's names and entry."""

    def __init__(self, layer_devs: list[int], root: Entry) -> None:
        self._dev_index: dict[int, int] = {}
        for dev in layer_devs:
            self._dev_index.setdefault(dev, len(self._dev_index))
        #: (dev, ino) -> our number, where the formula does not give it (copy-ups, collisions)
        self._remap: dict[tuple[int, int], int] = {}
        self._spare = _SPARE_BASE
        self.nodes: dict[int, Node] = {}
        self.by_path: dict[bytes, Node] = {}
        self.root = Node(pyfuse3.ROOT_INODE, root)
        self.root.lookups = 1 << 62  # never forgotten
        self.nodes[self.root.ino] = self.root
        self.by_path[ROOT] = self.root
        self._remap[(root.st.st_dev, root.st.st_ino)] = pyfuse3.ROOT_INODE

    def number(self, st: os.stat_result) -> int:
        """Our inode number for a real object."""
        key = (st.st_dev, st.st_ino)
        n = self._remap.get(key)
        if n is not None:
            return n
        idx = self._dev_index.get(st.st_dev)
        if idx is not None and st.st_ino < (1 << _DEV_SHIFT) and idx < (1 << 13):
            n = (idx << _DEV_SHIFT) | st.st_ino
            if n > pyfuse3.ROOT_INODE:
                return n
        return self._allocate(key)

    def _allocate(self, key: tuple[int, int]) -> int:
        self._spare += 1
        self._remap[key] = self._spare
        return self._spare

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
            same = stat.S_IFMT(node.entry.st.st_mode) == stat.S_IFMT(entry.st.st_mode)
            if same and not node.unlinked:
                if node.entry.path == entry.path:
                    node.entry = entry
                return node
            self._drop_path(node, entry.path)
        elif node is not None:
            node.entry = entry
            return node
        ino = self.number(entry.st)
        node = self.nodes.get(ino)
        if (node is not None and not node.unlinked and not stat.S_ISDIR(entry.st.st_mode)
                and (node.entry.st.st_dev, node.entry.st.st_ino) == (entry.st.st_dev, entry.st.st_ino)):
            # Another name of a hard-linked file: one inode.
            self.add_path(node, entry.path)
            return node
        if node is not None:
            # The real inode number was reused by a new object while the old node is still referenced.
            ino = self._allocate((entry.st.st_dev, entry.st.st_ino))
        node = Node(ino, entry)
        self.nodes[ino] = node
        self.by_path[entry.path] = node
        return node

    def add_path(self, node: Node, path: bytes) -> None:
        """``path`` is one more name of ``node`` (a hard link)."""
        node.paths.append(path)
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

    def copied_up(self, copied: CopiedUp) -> list[tuple[int, bytes]]:
        """An object moved to the upper layer: it keeps its number, now reached through the copy. Returns the
        (directory inode, name) of every other name that must be looked up again: those of a lower hard link
        the copy-up broke, which still name the lower file."""
        old, new = copied.old, copied.new
        self.listing_changed(split(new.path)[0])
        node = self.by_path.get(new.path)
        ino = node.ino if node is not None else self.number(old.st)
        self._remap[(new.st.st_dev, new.st.st_ino)] = ino
        if node is None:
            return []
        node.entry = new
        if not copied.breaks_hard_link:
            return []
        stale = []
        for path in [p for p in node.paths if p != new.path]:
            self.unlinked(node, path, last_link=False)
            parent_path, name = split(path)
            parent = self.by_path.get(parent_path)
            if parent is not None:
                stale.append((parent.ino, name))
        return stale

    def _drop_path(self, node: Node, path: bytes) -> None:
        if self.by_path.get(path) is node:
            del self.by_path[path]
        if path in node.paths:
            node.paths.remove(path)

    def removed(self, parent: Node, name: bytes, last_link: bool) -> None:
        """``name`` in ``parent`` was removed; ``last_link``: no other name leads to its object."""
        path = join(parent.path, name)
        node = self.by_path.get(path)
        if node is not None:
            self.unlinked(node, path, last_link)

    def unlinked(self, node: Node, path: bytes, last_link: bool) -> None:
        """``path`` no longer leads to ``node``."""
        self._drop_path(node, path)
        if node.paths and node.entry.path == path:
            node.entry = node.entry.at(node.paths[0])
        if last_link or not node.paths:
            node.unlinked = True
            for p in node.paths:
                if self.by_path.get(p) is node:
                    del self.by_path[p]
            node.paths = []
            st = node.entry.st
            if self._remap.get((st.st_dev, st.st_ino)) == node.ino:
                del self._remap[(st.st_dev, st.st_ino)]
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
            if n.entry.path == p:
                n.entry = n.entry.at(q)
            self.by_path[q] = n

    def forget(self, ino: int, nlookup: int) -> None:
        node = self.nodes.get(ino)
        if node is None or ino == pyfuse3.ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - nlookup)
        self._maybe_free(node)

    def _maybe_free(self, node: Node) -> None:
        if node.lookups > 0 or node.opens > 0 or node.ino == pyfuse3.ROOT_INODE:
            return
        if self.nodes.get(node.ino) is node:
            del self.nodes[node.ino]
        for p in node.paths:
            if self.by_path.get(p) is node:
                del self.by_path[p]

    def release_open(self, node: Node) -> None:
        node.opens -= 1
        self._maybe_free(node)

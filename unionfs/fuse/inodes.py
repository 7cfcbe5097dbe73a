"""Inode table: our own inode numbers, exact lookup counts, forget, and merged path <-> node maps.

Numbers are derived from the real (device, inode) of the object where it was first seen, so they are the
same after a remount over unchanged layers, and a copied-up object keeps the number of its origin for the
life of the mount.
"""

from __future__ import annotations

import os
import stat

import pyfuse3

from ..layers import ROOT, Entry

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

    def copied_up(self, old: Entry, new: Entry) -> None:
        """An object moved to the upper layer: it keeps its number, now reached through the copy."""
        node = self.by_path.get(new.path)
        ino = node.ino if node is not None else self.number(old.st)
        self._remap[(new.st.st_dev, new.st.st_ino)] = ino
        if node is not None:
            node.entry = new

    def _drop_path(self, node: Node, path: bytes) -> None:
        if self.by_path.get(path) is node:
            del self.by_path[path]
        if path in node.paths:
            node.paths.remove(path)

    def unlinked(self, node: Node, path: bytes, last_link: bool) -> None:
        """``path`` no longer leads to ``node``."""
        self._drop_path(node, path)
        if node.paths and node.entry.path == path:
            node.entry.path = node.paths[0]
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

    def renamed(self, old_path: bytes, new_path: bytes, entry: Entry | None, is_dir: bool) -> None:
        """Everything at or below ``old_path`` now lives at ``new_path`` (``entry``: what is there now)."""
        node = self.by_path.pop(old_path, None)
        if node is not None:
            node.paths = [new_path if p == old_path else p for p in node.paths]
            if entry is not None:
                node.entry = entry
            elif node.entry.path == old_path:
                node.entry.path = new_path
            self.by_path[new_path] = node
        if is_dir:
            prefix = old_path + b"/"
            moved = [(p, n) for p, n in self.by_path.items() if p.startswith(prefix)]
            for p, _n in moved:
                del self.by_path[p]
            for p, n in moved:
                q = new_path + p[len(old_path):]
                n.paths = [q if x == p else x for x in n.paths]
                if n.entry.path == p:
                    n.entry.path = q
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

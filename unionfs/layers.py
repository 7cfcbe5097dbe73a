"""The layer stack and name resolution through it: found in layer N, whited out, or missing.

Paths here are *merged* paths relative to the mount root, as bytes: ``b"."`` is the root, ``b"a/b"`` a child.
Every system call addresses a layer through a directory file descriptor (``dir_fd=``), so a merged path of up
to PATH_MAX bytes works whatever the length of the layer's own path.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from . import whiteout
from .whiteout import XattrFormat

if TYPE_CHECKING:
    from .prescan import LowerTable

ROOT = b"."

#: Largest merged path we accept (the kernel's PATH_MAX minus the terminating NUL).
PATH_MAX = 4095
NAME_MAX = 255


def join(parent: bytes, name: bytes) -> bytes:
    """Merged path of ``name`` inside ``parent``."""
    return name if parent == ROOT else parent + b"/" + name


def split(path: bytes) -> tuple[bytes, bytes]:
    """(parent, name) of a non-root merged path."""
    head, sep, tail = path.rpartition(b"/")
    return (head if sep else ROOT), tail


class Layer:
    """One directory of the stack, held open for the life of the mount."""

    __slots__ = ("index", "path", "fd", "dev", "proc", "prefix", "writable")

    def __init__(self, index: int, path: bytes, writable: bool) -> None:
        self.index = index
        self.path = path
        self.writable = writable
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dev = os.fstat(self.fd).st_dev
        self.proc = b"/proc/self/fd/%d/" % self.fd
        self.prefix = os.path.abspath(path).rstrip(b"/") + b"/"

    def xpath(self, rel: bytes) -> bytes:
        """A path usable by calls without ``dir_fd`` support (xattrs): the layer's own path, or through
        /proc/self/fd where that would be longer than PATH_MAX."""
        if len(self.prefix) + len(rel) < PATH_MAX:
            return self.prefix + rel
        return self.proc + rel

    def lstat(self, rel: bytes) -> os.stat_result:
        return os.stat(rel, dir_fd=self.fd, follow_symlinks=False)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"Layer({self.index}, {self.path!r})"


class Entry:
    """What one merged name resolves to.

    ``layer`` is the top-most layer holding the object and ``st`` its stat.  For a directory, ``dirs`` lists
    every layer contributing to the merged directory, top first, stopping after an opaque one or above a
    non-directory; ``xw`` is the subset whose directory holds xattr-encoded whiteouts.
    """

    __slots__ = ("path", "layer", "st", "dirs", "xw", "opaque")

    def __init__(
        self,
        path: bytes,
        layer: int,
        st: os.stat_result,
        dirs: tuple[int, ...] = (),
        xw: frozenset[int] = frozenset(),
        opaque: bool = False,
    ) -> None:
        self.path = path
        self.layer = layer
        self.st = st
        self.dirs = dirs
        self.xw = xw
        self.opaque = opaque

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def merged(self) -> bool:
        """A directory with more than one contributing layer."""
        return len(self.dirs) > 1

    def __repr__(self) -> str:
        return f"Entry({self.path!r}, layer={self.layer}, dirs={self.dirs})"


_MISSING = (errno.ENOENT, errno.ENOTDIR)


class Stack:
    """The ordered layers (upper first when writable) and lookups through them."""

    def __init__(self, layer_dirs: Sequence[bytes], writable: bool, fmt: XattrFormat) -> None:
        self.layers: list[Layer] = []
        try:
            for i, d in enumerate(layer_dirs):
                self.layers.append(Layer(i, d, writable and i == 0))
        except BaseException:
            self.close()
            raise
        self.writable = writable
        self.fmt = fmt
        #: formats whose markers we honour when reading (the active one first)
        self.read_formats: tuple[XattrFormat, ...] = (
            (XattrFormat.USER, XattrFormat.TRUSTED) if fmt is XattrFormat.USER else (XattrFormat.TRUSTED,)
        )
        #: xattr prefixes hidden (escaped) in the merged view
        self.private_prefixes: tuple[bytes, ...] = tuple(f.prefix for f in self.read_formats)
        #: the lower layers resolved at mount (``-o prescan``), or None: probe them at each lookup
        self.table: LowerTable | None = None

    @property
    def upper(self) -> Layer | None:
        return self.layers[0] if self.writable else None

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    # -- resolution ---------------------------------------------------------------------------------------

    def root(self) -> Entry:
        if self.table is not None and self.table.covers(ROOT):
            lower = self.table.entry(self, ROOT)
            if self.writable:
                return self._over_lower(ROOT, self.layers[0].lstat(ROOT), lower)
            assert lower is not None
            return lower
        entry = self._probed_root(0)
        assert entry is not None
        return entry

    def lower_root(self) -> Entry | None:
        """The root of the lower layers' merged view (None for a writable stack with no lower layer)."""
        return self._probed_root(1 if self.writable else 0)

    def _probed_root(self, first: int) -> Entry | None:
        """The merged root of layers ``first`` and below, asking each of them."""
        return self._dir_entry(ROOT, [(i, self.layers[i].lstat(ROOT)) for i in range(first, len(self.layers))])

    def prescan(self, progress: Callable[[int], None] | None = None) -> int:
        """Resolve the lower layers once and answer later lookups from that (see unionfs.prescan); returns the
        number of lower paths."""
        from .prescan import LowerTable

        self.table = None
        self.table = LowerTable(self, progress)
        return len(self.table)

    def _dir_entry(self, path: bytes, found: Iterable[tuple[int, os.stat_result]]) -> Entry | None:
        """Build a directory entry from directories found top-down, honouring opaque markers."""
        dirs: list[int] = []
        xw: set[int] = set()
        top: tuple[int, os.stat_result] | None = None
        opaque = False
        for i, st in found:
            if top is None:
                top = (i, st)
            dirs.append(i)
            marks = whiteout.read_dir_marks(self.layers[i].xpath(path), self.read_formats)
            if marks.xwhiteouts:
                xw.add(i)
            if marks.opaque:
                opaque = len(dirs) == 1
                break
        if top is None:
            return None
        return Entry(path, top[0], top[1], tuple(dirs), frozenset(xw), opaque)

    def lookup(self, parent: Entry, name: bytes, skip_upper: bool = False) -> Entry | None:
        """Resolve ``name`` inside directory ``parent``; None when missing or whited out.

        With ``skip_upper`` the upper layer is ignored: the answer says what lies beneath it (used to decide
        whether a removal must leave a whiteout).
        """
        if self.table is not None and self.table.covers(parent.path):
            return self._lookup_prescanned(parent, name, skip_upper)
        path = join(parent.path, name)
        found: list[tuple[int, os.stat_result]] = []
        for i in parent.dirs:
            if skip_upper and i == 0 and self.writable:
                continue
            layer = self.layers[i]
            try:
                st = layer.lstat(path)
            except OSError as exc:
                if exc.errno in _MISSING:
                    continue
                raise
            if whiteout.is_whiteout_stat(st) or (
                i in parent.xw and whiteout.is_xattr_whiteout(layer.xpath(path), st, self.read_formats)
            ):
                break
            if stat.S_ISDIR(st.st_mode):
                found.append((i, st))
                continue
            if not found:
                return Entry(path, i, st)
            break
        if not found:
            return None
        return self._dir_entry(path, found)

    def _lookup_prescanned(self, parent: Entry, name: bytes, skip_upper: bool) -> Entry | None:
        """:meth:`lookup` with the lower layers answered by the prescanned table: the same rules, applied to
        the upper layer here and to the lower ones at mount."""
        assert self.table is not None
        path = join(parent.path, name)
        dirs = parent.dirs
        upper_st: os.stat_result | None = None
        if self.writable and dirs and dirs[0] == 0:
            has_lower = len(dirs) > 1
            if not skip_upper:
                upper = self.layers[0]
                try:
                    st = upper.lstat(path)
                except OSError as exc:
                    if exc.errno not in _MISSING:
                        raise
                else:
                    if whiteout.is_whiteout_stat(st) or (
                        0 in parent.xw and whiteout.is_xattr_whiteout(upper.xpath(path), st, self.read_formats)
                    ):
                        return None
                    if not stat.S_ISDIR(st.st_mode):
                        return Entry(path, 0, st)
                    upper_st = st
        else:
            has_lower = bool(dirs)
        lower = self.table.entry(self, path) if has_lower else None
        if upper_st is None:
            return lower
        return self._over_lower(path, upper_st, lower)

    def _over_lower(self, path: bytes, upper_st: os.stat_result, lower: Entry | None) -> Entry:
        """The Entry of upper directory ``path`` above what the lower layers show there (prescanned)."""
        marks = whiteout.read_dir_marks(self.layers[0].xpath(path), self.read_formats)
        xw = frozenset({0}) if marks.xwhiteouts else frozenset()
        if marks.opaque or lower is None or not lower.is_dir:
            return Entry(path, 0, upper_st, (0,), xw, marks.opaque)
        return Entry(path, 0, upper_st, (0, *lower.dirs), xw | lower.xw, False)

    def lookup_listed(self, parent: Entry, name: bytes, listed: tuple[int, int] | None) -> Entry | None:
        """Resolve ``name`` knowing what a current merged listing of ``parent`` says of it: absent names are
        missing, and a non-directory needs a single stat in the layer the listing found it in."""
        if listed is None:
            return None
        layer, fmt = listed
        if fmt == stat.S_IFDIR:
            return self.lookup(parent, name)
        path = join(parent.path, name)
        try:
            st = self.layers[layer].lstat(path)
        except OSError as exc:
            if exc.errno in _MISSING:
                return None
            raise
        if stat.S_IFMT(st.st_mode) != fmt and fmt:
            return self.lookup(parent, name)
        return Entry(path, layer, st)

    def resolve(self, path: bytes) -> Entry | None:
        """Resolve a whole merged path from the root."""
        entry = self.root()
        if path == ROOT:
            return entry
        for name in path.split(b"/"):
            if not entry.is_dir:
                return None
            nxt = self.lookup(entry, name)
            if nxt is None:
                return None
            entry = nxt
        return entry

    def lower_positive(self, parent: Entry, name: bytes) -> bool:
        """Whether something visible lies below the upper layer at ``name``: removing the upper object
        must then leave a whiteout."""
        if self.upper is None:
            return False
        return self.lookup(parent, name, skip_upper=True) is not None

    # -- listing ------------------------------------------------------------------------------------------

    def listdir(self, entry: Entry) -> dict[bytes, tuple[int, int]]:
        """Merged listing of a directory: name -> (layer index, d_type as stat S_IFMT bits or 0).

        Names are deduplicated top-down; whiteouts hide names below them; the order is upper first, then
        each lower in turn, each in the order its directory returned them.
        """
        out: dict[bytes, tuple[int, int]] = {}
        hidden: set[bytes] = set()
        for i in entry.dirs:
            layer = self.layers[i]
            check_x = i in entry.xw
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=layer.fd)
            except OSError as exc:
                if exc.errno in _MISSING:
                    continue
                raise
            try:
                with os.scandir(fd) as it:
                    for de in it:
                        name = os.fsencode(de.name)
                        if name in out or name in hidden:
                            continue
                        if de.is_dir(follow_symlinks=False):
                            out[name] = (i, stat.S_IFDIR)
                            continue
                        if de.is_symlink():
                            out[name] = (i, stat.S_IFLNK)
                            continue
                        is_reg = de.is_file(follow_symlinks=False)
                        if is_reg and not check_x:
                            out[name] = (i, stat.S_IFREG)
                            continue
                        st = de.stat(follow_symlinks=False)
                        if whiteout.is_whiteout_stat(st) or (
                            check_x
                            and whiteout.is_xattr_whiteout(
                                layer.xpath(join(entry.path, name)), st, self.read_formats
                            )
                        ):
                            hidden.add(name)
                            continue
                        out[name] = (i, stat.S_IFMT(st.st_mode))
            finally:
                os.close(fd)
        return out


def check_name(name: bytes) -> None:
    """Reject names the kernel would reject before asking any layer."""
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "File name too long")

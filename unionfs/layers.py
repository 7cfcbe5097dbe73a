"""The layer stack and name resolution through it: found in layer N, whited out, or missing.

Paths here are *merged* paths relative to the mount root, as bytes: ``b"."`` is the root, ``b"a/b"`` a child.
Every system call addresses a layer through a directory file descriptor (``dir_fd=``), so a merged path works
whatever the length of the layer's own path; one longer than a system call takes is reached in steps
(:mod:`unionfs._at`), so merged paths have no length limit, as on the kernel.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple, Protocol

from . import whiteout
from ._at import PATH_MAX, PROC_ROOM, At, ProcAt
from .whiteout import AUFS_PREFIX, NO_MARKS, DirMarks, XattrFormat

ROOT = b"."

#: The longest name.
NAME_MAX = whiteout.NAME_MAX


def join(parent: bytes, name: bytes) -> bytes:
    """Merged path of ``name`` inside ``parent``."""
    return name if parent == ROOT else parent + b"/" + name


def split(path: bytes) -> tuple[bytes, bytes]:
    """(parent, name) of a non-root merged path."""
    head, sep, tail = path.rpartition(b"/")
    return (head if sep else ROOT), tail


class Layer:
    """One directory of the stack, held open for the life of the mount."""

    __slots__ = ("index", "path", "fd", "dev", "proc", "writable")

    def __init__(self, index: int, path: bytes, writable: bool) -> None:
        self.index = index
        self.path = path
        self.writable = writable
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dev = os.fstat(self.fd).st_dev
        self.proc = b"/proc/self/fd/%d/" % self.fd

    def at(self, rel: bytes) -> At:
        """``with layer.at(rel) as (fd, name)``: ``name`` under ``fd`` is the layer's object at ``rel``, at any
        depth (see :mod:`unionfs._at`)."""
        return At(self.fd, rel)

    def proc_at(self, rel: bytes) -> ProcAt:
        """``with layer.proc_at(rel) as full``: a path of the layer's object at ``rel`` usable by calls without
        ``dir_fd`` support (xattrs, scandir, statvfs), through a descriptor (/proc/self/fd/N/...), never through
        the path the layer was given: that path may stop leading to it while it is mounted (containers/storage
        detaches the id-mapped mounts of the lower layers it hands to its mount program once the mount is
        made), and it could be long."""
        return ProcAt(self.fd, rel, self.proc)

    def lstat(self, rel: bytes) -> os.stat_result:
        if len(rel) <= PATH_MAX:
            return os.stat(rel, dir_fd=self.fd, follow_symlinks=False)
        with At(self.fd, rel) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"Layer({self.index}, {self.path!r})"


class Entry(NamedTuple):
    """What one merged name resolves to: a value, never changed once made (whoever learns more makes a new one).

    ``layer`` is the top-most layer holding the object and ``st`` its stat.  For a directory, ``dirs`` lists
    every layer contributing to the merged directory, top first, stopping after an opaque one or above a
    non-directory; ``xattr_whiteouts`` is the subset whose directory holds xattr-encoded whiteouts, and
    ``opaque`` says that the top one is marked opaque.
    """

    path: bytes
    layer: int
    st: os.stat_result
    dirs: tuple[int, ...] = ()
    xattr_whiteouts: frozenset[int] = frozenset()
    opaque: bool = False

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def merged(self) -> bool:
        """A directory with more than one contributing layer."""
        return len(self.dirs) > 1

    def at(self, path: bytes) -> Entry:
        """The same object reached under another merged path (after a rename)."""
        return Entry(path, self.layer, self.st, self.dirs, self.xattr_whiteouts, self.opaque)

    def with_stat(self, st: os.stat_result) -> Entry:
        """The same object with a fresher stat."""
        return Entry(self.path, self.layer, st, self.dirs, self.xattr_whiteouts, self.opaque)


_NONE: frozenset[int] = frozenset()
_MISSING = (errno.ENOENT, errno.ENOTDIR)


class Found(NamedTuple):
    """What one layer holds at a merged path: a whiteout, or an object with its stat (and, for a directory,
    its markers)."""

    layer: int
    st: os.stat_result
    is_whiteout: bool = False
    marks: DirMarks = NO_MARKS


#: makes a Found from a tuple without the keyword handling of its constructor (one per layer of a lookup)
_found = tuple.__new__


def _nothing() -> Entry | None:
    return None


def stack(path: bytes, found: Iterable[Found], beneath: Callable[[], Entry | None] = _nothing) -> Entry | None:
    """The rule of the stack, the one place it is written: what ``path`` resolves to, given what the layers
    hold there top-down (``found``: the layers holding nothing are left out), above what the layers beneath
    those resolve it to (``beneath()``). Each is consulted only as far as something of it can still show.

    A whiteout hides everything beneath it; a non-directory stands alone and hides everything beneath; a
    directory merges with the directories beneath it down to an opaque one, and hides a non-directory.
    """
    layers = iter(found)
    top = next(layers, None)
    if top is None:
        return beneath()
    if top.is_whiteout:
        return None
    if not stat.S_ISDIR(top.st.st_mode):
        return Entry(path, top.layer, top.st)
    dirs = [top.layer]
    marked = [top.layer] if top.marks.xwhiteouts else []
    if not top.marks.opaque:
        for layer, st, is_whiteout, marks in layers:
            if is_whiteout or not stat.S_ISDIR(st.st_mode):
                break
            dirs.append(layer)
            if marks.xwhiteouts:
                marked.append(layer)
            if marks.opaque:
                break
        else:
            lower = beneath()
            if lower is not None and lower.is_dir:
                dirs.extend(lower.dirs)
                marked.extend(lower.xattr_whiteouts)
    return Entry(path, top.layer, top.st, tuple(dirs), frozenset(marked) if marked else _NONE, top.marks.opaque)


class LowerSource(Protocol):
    """What the lower layers (those beneath the upper one) resolve a name to."""

    def root(self) -> Entry | None:
        """The merged root of the lower layers (None for a stack without lower layers)."""

    def lookup(self, parent: Entry, name: bytes) -> Entry | None:
        """What the lower layers show at ``name`` inside ``parent`` (a merged directory with at least one
        lower layer among its ``dirs``); None when missing or whited out."""


class Probing:
    """A :class:`LowerSource` that asks each lower layer at every lookup, as the kernel does.

    With ``aufs``, AUFS markers count in the lower layers (see :mod:`unionfs.whiteout`): a layer missing a name
    is asked for ``.wh.NAME`` (a whiteout there), a lower directory for ``.wh..wh..opq`` (opaque), and names
    starting with ``.wh.`` resolve to nothing."""

    def __init__(self, layers: Sequence[Layer], first: int, formats: tuple[XattrFormat, ...],
                 aufs: bool = False) -> None:
        self.layers = layers
        #: index of the top-most lower layer (1 above an upper layer, else 0)
        self.first = first
        self.formats = formats
        self.aufs = aufs
        #: index of the first layer whose AUFS markers count (past the last layer without ``aufs``)
        self.markers_from = first if aufs else len(layers)

    def found(self, path: bytes, dirs: Iterable[int], marked: frozenset[int]) -> Iterator[Found]:
        """What each of the layers ``dirs`` holds at ``path``, top-down, those holding nothing left out; each is
        asked only when the next is wanted. xattr whiteouts are looked for in the layers ``marked`` only (where
        the parent directory says it holds some)."""
        layers, formats, markers_from = self.layers, self.formats, self.markers_from
        marker: bytes | None = None  # the path of the AUFS whiteout of ``path``, once wanted
        short = len(path) <= PROC_ROOM  # (reached in one call, in every layer: see Layer.lstat, Layer.proc_at)
        for index in dirs:
            layer = layers[index]
            try:
                st = os.stat(path, dir_fd=layer.fd, follow_symlinks=False) if short else layer.lstat(path)
            except OSError as exc:
                if exc.errno not in _MISSING:
                    raise
                if index >= markers_from:
                    if marker is None:
                        marker = whiteout.aufs_whiteout_path(path)
                    if whiteout.has_aufs_marker(layer.fd, marker):
                        yield _found(Found, (index, whiteout.AUFS_WHITEOUT_STAT, True, NO_MARKS))
                continue
            if whiteout.is_whiteout_stat(st) or (index in marked and _xattr_whiteout(layer, path, st, formats)):
                yield _found(Found, (index, st, True, NO_MARKS))
            elif stat.S_ISDIR(st.st_mode):
                if short:
                    marks = whiteout.read_dir_marks(layer.proc + path, formats)
                else:
                    with layer.proc_at(path) as full:
                        marks = whiteout.read_dir_marks(full, formats)
                if index >= markers_from and not marks.opaque:
                    # Opaque by ``.wh..wh..opq`` inside, or by its own ``.wh.NAME`` beside it: that marker deletes
                    # what the layers beneath hold at NAME, and the layer's NAME is new (OCI's rule for a
                    # whiteout and its name in one layer): only its own entries show.
                    if marker is None and path != ROOT:
                        marker = whiteout.aufs_whiteout_path(path)
                    if whiteout.has_aufs_opaque(layer.fd, path) or (
                            marker is not None and whiteout.has_aufs_marker(layer.fd, marker)):
                        marks = whiteout.with_opaque(marks)
                if path == ROOT and marks.opaque:
                    # The kernel honours no opaque marker on a layer's root: every layer's root merges.
                    marks = whiteout.DirMarks(False, marks.xwhiteouts)
                yield _found(Found, (index, st, False, marks))
            else:
                yield _found(Found, (index, st, False, NO_MARKS))

    def root(self) -> Entry | None:
        return stack(ROOT, self.found(ROOT, range(self.first, len(self.layers)), _NONE))

    def lookup(self, parent: Entry, name: bytes) -> Entry | None:
        if self.aufs and whiteout.is_aufs_marker(name):
            return None
        dirs = parent.dirs
        if dirs and dirs[0] < self.first:  # the upper layer is not ours to ask
            dirs = dirs[1:]
        path = join(parent.path, name)
        return stack(path, self.found(path, dirs, parent.xattr_whiteouts))

    def listdir(self, entry: Entry) -> dict[bytes, tuple[int, int]]:
        """Merged listing of directory ``entry`` (see :func:`merged_listing`), markers read as in lookups."""
        return merged_listing(self.layers, self.formats, entry, self.markers_from)


def open_dir(layer: Layer, path: bytes) -> int:
    """A descriptor of directory ``path`` of ``layer``, open for listing."""
    with layer.at(path) as (dfd, name):
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)


def _xattr_whiteout(layer: Layer, path: bytes, st: os.stat_result, formats: tuple[XattrFormat, ...]) -> bool:
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        return False
    with layer.proc_at(path) as full:
        return whiteout.is_xattr_whiteout(full, st, formats)


def merged_listing(layers: Sequence[Layer], formats: tuple[XattrFormat, ...], entry: Entry,
                   markers_from: int | None = None) -> dict[bytes, tuple[int, int]]:
    """Merged listing of directory ``entry``: name -> (layer index, d_type as stat S_IFMT bits).

    Names are deduplicated top-down; whiteouts hide names below them; the order is the top layer first, then
    each one beneath in turn, each in the order its directory returned them. In the layers from index
    ``markers_from`` on (none when None), AUFS markers are never listed, and ``.wh.NAME`` hides NAME in the
    layers beneath its own.
    """
    out: dict[bytes, tuple[int, int]] = {}
    hidden: set[bytes] = set()
    if markers_from is None:
        markers_from = len(layers)
    for i in entry.dirs:
        layer = layers[i]
        check_xattr = i in entry.xattr_whiteouts
        aufs = i >= markers_from
        deleted: list[bytes] = []  # by this layer's markers: hidden beneath it, not in it
        try:
            fd = open_dir(layer, entry.path)
        except OSError as exc:
            if exc.errno in _MISSING:
                continue
            raise
        try:
            with os.scandir(fd) as it:
                for de in it:
                    name = os.fsencode(de.name)
                    if aufs and name.startswith(AUFS_PREFIX):
                        target = whiteout.aufs_hidden_name(name)
                        if target is not None:
                            deleted.append(target)
                        continue
                    if name in out or name in hidden:
                        continue
                    if de.is_dir(follow_symlinks=False):
                        out[name] = (i, stat.S_IFDIR)
                        continue
                    if de.is_symlink():
                        out[name] = (i, stat.S_IFLNK)
                        continue
                    is_reg = de.is_file(follow_symlinks=False)
                    if is_reg and not check_xattr:
                        out[name] = (i, stat.S_IFREG)
                        continue
                    st = de.stat(follow_symlinks=False)
                    if whiteout.is_whiteout_stat(st) or (
                        check_xattr and _xattr_whiteout(layer, join(entry.path, name), st, formats)
                    ):
                        hidden.add(name)
                        continue
                    out[name] = (i, stat.S_IFMT(st.st_mode))
        finally:
            os.close(fd)
        hidden.update(deleted)
    return out


def subdirectory_dirs(entry: Entry, listing: Mapping[bytes, tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
    """(layer, path) of each layer directory the subdirectories in ``listing`` (:func:`merged_listing` of
    directory ``entry``) may be made of: the layer a subdirectory was found in and each layer merged beneath it
    in ``entry`` (an opaque marker or a non-directory there may stop it sooner). What listing them will read."""
    for name, (layer, ftype) in listing.items():
        if ftype == stat.S_IFDIR:
            path = join(entry.path, name)
            for i in entry.dirs:
                if i >= layer:
                    yield i, path


class Stack:
    """The ordered layers (upper first when writable) and lookups through them.

    The upper layer is asked here; what the lower layers hold comes from ``lowers``, made at construction from
    the probing source (``lowers=None``: the probing source itself; ``unionfs.prescan.Prescanned``: a table
    built once).
    """

    def __init__(self, layer_dirs: Sequence[bytes], writable: bool, fmt: XattrFormat,
                 lowers: Callable[[Probing], LowerSource] | None = None, *, aufs: bool = False) -> None:
        """``aufs``: also honour AUFS-style markers (``.wh.NAME`` files, ``.wh..wh..opq``) in lower layers."""
        self.layers: list[Layer] = []
        self.aufs = aufs
        try:
            for i, d in enumerate(layer_dirs):
                self.layers.append(Layer(i, d, writable and i == 0))
            self.writable = writable
            self.fmt = fmt
            #: formats whose markers we honour when reading (the active one first)
            self.read_formats: tuple[XattrFormat, ...] = (
                (XattrFormat.USER, XattrFormat.TRUSTED) if fmt is XattrFormat.USER else (XattrFormat.TRUSTED,)
            )
            #: xattr prefixes hidden (escaped) in the merged view
            self.private_prefixes: tuple[bytes, ...] = tuple(f.prefix for f in self.read_formats)
            self._first_lower = 1 if writable else 0
            self.probing = Probing(self.layers, self._first_lower, self.read_formats, aufs)
            self.lowers: LowerSource = self.probing if lowers is None else lowers(self.probing)
        except BaseException:
            self.close()
            raise

    @property
    def upper(self) -> Layer | None:
        return self.layers[0] if self.writable else None

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    # -- resolution ---------------------------------------------------------------------------------------

    def root(self) -> Entry:
        entry = stack(ROOT, self.probing.found(ROOT, (0,) if self.writable else (), _NONE), self.lowers.root)
        assert entry is not None
        return entry

    def lookup(self, parent: Entry, name: bytes) -> Entry | None:
        """Resolve ``name`` inside directory ``parent``; None when missing or whited out."""
        path = join(parent.path, name)
        upper = (0,) if self.writable and parent.dirs and parent.dirs[0] == 0 else ()
        found = self.probing.found(path, upper, parent.xattr_whiteouts)
        return stack(path, found, lambda: self._in_lowers(parent, name))

    def _in_lowers(self, parent: Entry, name: bytes) -> Entry | None:
        if not parent.dirs or parent.dirs[-1] < self._first_lower:
            return None
        return self.lowers.lookup(parent, name)

    def below_upper(self, parent: Entry, name: bytes) -> Entry | None:
        """What the lower layers show at ``name`` in ``parent`` beneath the upper layer, whatever that holds
        there (None without an upper layer): removing the upper object must leave a whiteout when this is not
        None."""
        return self._in_lowers(parent, name) if self.writable else None

    def lookup_listed(self, parent: Entry, name: bytes, listed: tuple[int, int] | None) -> Entry | None:
        """Resolve ``name`` knowing what a current merged listing of ``parent`` says of it: absent names are
        missing, and a non-directory needs a single stat in the layer the listing found it in."""
        if listed is None:
            return None
        layer, ftype = listed
        if ftype == stat.S_IFDIR:
            return self.lookup(parent, name)
        path = join(parent.path, name)
        try:
            st = self.layers[layer].lstat(path)
        except OSError as exc:
            if exc.errno in _MISSING:
                return None
            raise
        if stat.S_IFMT(st.st_mode) != ftype and ftype:
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

    # -- explaining (for the trace only: the layers are asked again) ----------------------------------------

    def whited_out(self, parent: Entry, name: bytes) -> int | None:
        """The layer whose whiteout hides ``name`` in ``parent``, where a lookup found nothing; None when no
        layer holds the name."""
        top = next(self.probing.found(join(parent.path, name), parent.dirs, parent.xattr_whiteouts), None)
        return top.layer if top is not None and top.is_whiteout else None

    def hidden_by_opaque(self, entry: Entry) -> tuple[int, list[int]] | None:
        """(the layer whose opaque directory ends merged directory ``entry``, the layers beneath it that hold
        something at its path); None when no opaque directory hides anything there."""
        if not entry.dirs:
            return None
        last = entry.dirs[-1]
        found = list(self.probing.found(entry.path, range(last, len(self.layers)), _NONE))
        if not found or found[0].layer != last or not found[0].marks.opaque or len(found) == 1:
            return None
        return last, [f.layer for f in found[1:]]

    def held_in(self, path: bytes, layers: Sequence[int]) -> bool:
        """Whether any of ``layers`` holds something (a whiteout included) at ``path``."""
        return next(self.probing.found(path, layers, _NONE), None) is not None

    # -- listing ------------------------------------------------------------------------------------------

    def listdir(self, entry: Entry) -> dict[bytes, tuple[int, int]]:
        """Merged listing of a directory (see :func:`merged_listing`)."""
        return self.probing.listdir(entry)


def check_name(name: bytes) -> None:
    """Reject names the kernel would reject before asking any layer."""
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "File name too long")

"""The native part beneath pyfuse3: finds the shim library (``shim.c``, built with the package), loads it into the
global symbol scope before pyfuse3 is imported, and reads and sets what it does.

The shim defines a few of libfuse's functions (``fuse_session_new``, ``fuse_reply_open``, ...) so that pyfuse3's
calls reach it first; it passes every request to pyfuse3's handlers and changes only what it is asked to:
connection flags at init (on by default), cached directory listings and the kernel's adaptive readdirplus (both
off until the FUSE shell turns them on, see :meth:`Native.set_cached_listings`).

When the library is missing or cannot take effect, :func:`load` returns None and :func:`reason` says why in one
line; nothing else changes. ``UNIONFS_NATIVE_LIB`` names the library file to use instead of the built one.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import struct
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["Connection", "Counters", "Native", "available", "library_path", "load", "loaded", "reason", "version"]

LIBRARY_ENV = "UNIONFS_NATIVE_LIB"

# Options of unionfs_native_set (shim.c).
_OPT_TUNE_CONN = 1
_OPT_CACHE_DIRS = 2
_OPT_READDIRPLUS_AUTO = 3
_OPT_OWN_READER = 4
_OPT_DATA_OPS = 5
_OPT_OPENLESS_DIRS = 6
_OPT_DIR_ATTRS = 7
_OPT_FSYNC = 8
_OPT_OPENS = 9
_OPT_PREFETCH = 10

# The FUSE_CAP_* bits of fuse_common.h that the connection record names.
CAPS = {
    "async_read": 1 << 0, "posix_locks": 1 << 1, "atomic_o_trunc": 1 << 3, "export_support": 1 << 4,
    "dont_mask": 1 << 6, "splice_write": 1 << 7, "splice_move": 1 << 8, "splice_read": 1 << 9,
    "flock_locks": 1 << 10, "ioctl_dir": 1 << 11, "auto_inval_data": 1 << 12, "readdirplus": 1 << 13,
    "readdirplus_auto": 1 << 14, "async_dio": 1 << 15, "writeback_cache": 1 << 16, "no_open_support": 1 << 17,
    "parallel_dirops": 1 << 18, "posix_acl": 1 << 19, "handle_killpriv": 1 << 20, "cache_symlinks": 1 << 23,
    "no_opendir_support": 1 << 24, "explicit_inval_data": 1 << 25, "expire_only": 1 << 26,
}


# The fields of struct unionfs_native_counters and struct unionfs_native_conn (shim.c), in order.
_COUNTER_FIELDS = (
    "session_new", "session_wrapped", "init", "opendir", "dir_cached", "dir_untracked", "reply_open", "reply_err",
    "readdir_plain", "entries_plain", "read", "read_max", "write", "write_max", "write_bytes", "readdirplus",
    "read_native", "xattr_absent", "reader_forwarded", "reader_served", "write_native", "fallocate", "lseek",
    "copy_file_range", "copy_bytes", "data_unregistered", "opendir_enosys", "dir_openless", "attr_kept",
    "attr_served", "attr_untracked", "fsync_native", "open_native", "open_missed", "release_native", "adopted",
    "recipes_kept", "xattr_checked", "read_pooled", "listing_ends", "dirs_prefetched",
    "handoffs", "handoff_served", "read_spins")
_CONN_FIELDS = (
    "valid", "proto_major", "proto_minor", "capable", "offered_max_write", "offered_max_readahead",
    "offered_max_read", "want_libfuse", "want_pyfuse3", "want", "max_write", "max_readahead", "max_background",
    "congestion_threshold", "time_gran")


class _Counters(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in _COUNTER_FIELDS]


class _Connection(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in _CONN_FIELDS]


@dataclasses.dataclass(frozen=True)
class Counters:
    """What the shim has seen in this process (see ``struct unionfs_native_counters`` in shim.c)."""

    session_new: int
    session_wrapped: int
    init: int
    opendir: int
    dir_cached: int
    dir_untracked: int
    reply_open: int
    reply_err: int
    readdir_plain: int
    entries_plain: int
    read: int
    read_max: int
    write: int
    write_max: int
    write_bytes: int
    readdirplus: int
    read_native: int
    xattr_absent: int
    reader_forwarded: int
    reader_served: int
    write_native: int
    fallocate: int
    lseek: int
    copy_file_range: int
    copy_bytes: int
    data_unregistered: int
    opendir_enosys: int
    dir_openless: int
    attr_kept: int
    attr_served: int
    attr_untracked: int
    fsync_native: int
    open_native: int
    open_missed: int
    release_native: int
    adopted: int
    recipes_kept: int
    xattr_checked: int
    read_pooled: int
    listing_ends: int
    dirs_prefetched: int
    handoffs: int
    handoff_served: int
    read_spins: int


@dataclasses.dataclass(frozen=True)
class Connection:
    """What the kernel offered at init and what the shim set (``struct unionfs_native_conn``)."""

    proto_major: int
    proto_minor: int
    capable: int
    offered_max_write: int
    offered_max_readahead: int
    offered_max_read: int
    want_libfuse: int
    want_pyfuse3: int
    want: int
    max_write: int
    max_readahead: int
    max_background: int
    congestion_threshold: int
    time_gran: int

    def flags(self, mask: int) -> list[str]:
        """The names of the capability bits set in ``mask`` (e.g. ``conn.flags(conn.want)``)."""
        return [name for name, bit in CAPS.items() if mask & bit]

    def describe(self) -> str:
        """One line for ``--version`` and debug output."""
        added = self.flags(self.want & ~self.want_pyfuse3)
        return (f"FUSE {self.proto_major}.{self.proto_minor}; max_write {self.max_write} "
                f"(libfuse's limit {self.offered_max_write}); max_readahead {self.max_readahead} "
                f"(kernel offered {self.offered_max_readahead}); added {','.join(added) or 'nothing'}")


class Native:
    """The loaded shim."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self._lib = lib
        self.path = path
        lib.unionfs_native_version.restype = ctypes.c_char_p
        lib.unionfs_native_reason.restype = ctypes.c_char_p
        lib.unionfs_native_counters.restype = ctypes.c_size_t
        lib.unionfs_native_counters.argtypes = [ctypes.POINTER(_Counters), ctypes.c_size_t]
        lib.unionfs_native_connection.restype = ctypes.c_size_t
        lib.unionfs_native_connection.argtypes = [ctypes.POINTER(_Connection), ctypes.c_size_t]
        lib.unionfs_native_set.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.unionfs_native_get.argtypes = [ctypes.c_int]
        lib.unionfs_native_plain_readdir_bit.restype = ctypes.c_uint64
        lib.unionfs_native_dump.argtypes = [ctypes.c_char_p]
        lib.unionfs_native_set_fd.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
        lib.unionfs_native_absent_xattr.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.unionfs_native_absent_at.argtypes = [ctypes.c_uint64, ctypes.c_char_p]
        lib.unionfs_native_absent_clear.restype = None
        lib.unionfs_native_checkable_xattr.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p),
                                                       ctypes.c_uint]
        lib.unionfs_native_attr_gen.restype = ctypes.c_uint64
        lib.unionfs_native_listing_end.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64]
        lib.unionfs_native_prefetch.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        lib.unionfs_native_dir_attr.argtypes = [
            ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
            ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_double]
        lib.unionfs_native_layers.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_uint]
        lib.unionfs_native_openable.argtypes = [ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t]
        lib.unionfs_native_adopt.argtypes = [ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64),
                                             ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_uint), ctypes.c_int]
        lib.unionfs_native_show.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_uint]
        lib.unionfs_native_shown.argtypes = [ctypes.c_uint64]
        lib.unionfs_native_shown.restype = ctypes.c_uint64
        self._openable = lib.unionfs_native_openable
        self._plain_bit: int = lib.unionfs_native_plain_readdir_bit()

    def version(self) -> str:
        return str(self._lib.unionfs_native_version().decode())

    def counters(self) -> Counters:
        raw = _Counters()
        self._lib.unionfs_native_counters(ctypes.byref(raw), ctypes.sizeof(raw))
        return Counters(**{name: getattr(raw, name) for name in _COUNTER_FIELDS})

    def dump(self, path: str | os.PathLike[str]) -> None:
        """Write the counters and the connection record to ``path`` as ``name value`` lines (the format of
        ``UNIONFS_NATIVE_STATS``)."""
        err = self._lib.unionfs_native_dump(os.fsencode(path))
        if err != 0:
            raise OSError(-err, os.strerror(-err), os.fspath(path))

    def connection(self) -> Connection | None:
        """The last init's record, None before the first init of a session."""
        raw = _Connection()
        self._lib.unionfs_native_connection(ctypes.byref(raw), ctypes.sizeof(raw))
        if not raw.valid:
            return None
        return Connection(**{name: getattr(raw, name) for name in _CONN_FIELDS[1:]})

    def _set(self, option: int, on: bool) -> None:
        if self._lib.unionfs_native_set(option, int(on)) != 0:
            raise ValueError(f"the shim has no option {option}")

    def _get(self, option: int) -> bool:
        return bool(self._lib.unionfs_native_get(option) > 0)

    def set_connection_tuning(self, on: bool) -> None:
        """max_write 1 MiB and the kernel's largest max_readahead at the next init (on by default)."""
        self._set(_OPT_TUNE_CONN, on)

    def set_cached_listings(self, on: bool) -> None:
        """Directory opens replied from now on carry cache_readdir and keep_cache: the kernel keeps a listing
        until the directory's mtime changes, it changes through this mount, or the server invalidates it
        (``pyfuse3.invalidate_inode(ino)``, which drops the cached pages). Turn on only with a shell that
        invalidates a directory whenever its merged listing changes other than through the kernel."""
        self._set(_OPT_CACHE_DIRS, on)

    def set_readdirplus_auto(self, on: bool) -> None:
        """The kernel's adaptive readdirplus at the next session: some listings then come as plain READDIR,
        served through the readdir handler with a handle for which :meth:`readdir_handle` says ``plain``; the
        kernel takes no lookup reference for plain entries, so the handler must not count one."""
        self._set(_OPT_READDIRPLUS_AUTO, on)

    def set_own_reader(self, on: bool) -> None:
        """From the next mount, a thread of the shim reads the device: it answers READ on registered descriptors
        and GETXATTR of absent names itself, without the GIL, and hands every other request to pyfuse3, whose
        session descriptor becomes an eventfd."""
        self._set(_OPT_OWN_READER, on)

    def set_data_ops(self, on: bool) -> None:
        """From the next session, FALLOCATE, LSEEK (SEEK_DATA, SEEK_HOLE) and COPY_FILE_RANGE are answered by the
        shim on the descriptors registered with :meth:`serve` (fallocate on a write descriptor, copy_file_range
        from a read descriptor to a write descriptor), and EOPNOTSUPP for a handle with none: pyfuse3 has no
        handlers for them. Turn it on only when every open handle is registered."""
        self._set(_OPT_DATA_OPS, on)

    def set_openless_dirs(self, on: bool) -> None:
        """From the next session, the first OPENDIR is answered ENOSYS by the shim, so the kernel opens every
        directory itself from then on (no OPENDIR, no RELEASEDIR; listings cached with keep_cache and
        cache_readdir, its defaults then); READDIR(PLUS) and FSYNCDIR of such a directory come with its inode
        number as the handle (:meth:`dir_inode`; the kernel sends none). Python's opendir is
        never called: the kernel checks access itself (default_permissions)."""
        self._set(_OPT_OPENLESS_DIRS, on)

    def set_dir_attrs(self, on: bool) -> None:
        """From the next session, GETATTR of a directory is answered by the shim from the attributes the last
        LOOKUP or GETATTR reply (or :meth:`dir_attr`) gave, for as long as they were given for, while no request
        that may change anything has been asked since (the kernel asks again after every READDIR it did not
        serve from its cached listing)."""
        self._set(_OPT_DIR_ATTRS, on)

    @property
    def dir_attrs(self) -> bool:
        return self._get(_OPT_DIR_ATTRS)

    def set_fsync(self, on: bool) -> None:
        """FSYNC of a handle with a descriptor registered (:meth:`serve`) is made by the shim on that descriptor,
        in a thread of its own, from now on; turn it on only for a mount whose fsync is to reach the disk."""
        self._set(_OPT_FSYNC, on)

    @property
    def fsync(self) -> bool:
        return self._get(_OPT_FSYNC)

    def set_opens(self, on: bool) -> None:
        """From the next session (one with directory attributes), a read-only OPEN of an inode that
        :meth:`openable` named, while nothing may have changed since, is answered by the shim's reader: it opens
        the file named, serves its data requests and closes it at RELEASE, without Python, unless the shell takes
        the handle over (:meth:`adopt`). Turn on only with the data path and the shim's fsync (Python never sees
        such a handle otherwise), and :meth:`layers` given."""
        self._set(_OPT_OPENS, on)

    @property
    def opens(self) -> bool:
        return self._get(_OPT_OPENS)

    def set_prefetch(self, on: bool) -> None:
        """Read ahead the directories :meth:`prefetch` names (at once; :meth:`layers` given)."""
        self._set(_OPT_PREFETCH, on)

    @property
    def prefetch(self) -> bool:
        return self._get(_OPT_PREFETCH)

    def prefetch_dirs(self, dirs: Iterable[tuple[int, bytes]]) -> int:
        """Have the shim's threads read the directories ``dirs`` (layer index, path beneath the layer's
        directory) into the kernel's caches, without changing their atime, because they may be listed soon
        (advisory: nothing else is done with them). How many were queued."""
        records = b"".join(_PREFETCH_RECORD.pack(layer, len(path)) + path for layer, path in dirs)
        return int(self._lib.unionfs_native_prefetch(records, len(records))) if records else 0

    def layers(self, fds: list[int]) -> None:
        """The directories of the layers, by index (0: the upper layer), that :meth:`openable` names paths
        beneath (the shim keeps duplicates)."""
        array = (ctypes.c_int * len(fds))(*fds)
        err = self._lib.unionfs_native_layers(array, len(fds))
        if err != 0:
            raise OSError(-err, os.strerror(-err))

    def openable(self, generation: int, recipes: bytes) -> int:
        """Each of ``recipes`` (:func:`recipe`, joined) says that an inode is a regular file beneath a layer, as
        read since ``generation`` (:meth:`attr_generation`), and that opening it read-only needs no other
        decision: the shim may answer its read-only opens itself while nothing may have changed (see
        :meth:`set_opens`). How many were kept."""
        return int(self._openable(generation, recipes, len(recipes)))

    def show_numbers(self, numbers: list[tuple[int, int]]) -> None:
        """Replies show the second number of each pair as the st_ino of the inode the first names (0: its own
        number again), in place of the inode's own number, which pyfuse3 puts there."""
        flat = [n for pair in numbers for n in pair]
        err = self._lib.unionfs_native_show((ctypes.c_uint64 * len(flat))(*flat), len(numbers))
        if err != 0:
            raise OSError(-err, os.strerror(-err))

    def shown_number(self, ino: int) -> int:
        """The number replies show as the st_ino of inode ``ino`` (:meth:`show_numbers`)."""
        return int(self._lib.unionfs_native_shown(ino))

    def open_count(self) -> int:
        """How many handles the shim opened (:meth:`set_opens`) and still owns."""
        return int(self._lib.unionfs_native_open_count())

    def adopt(self, ino: int) -> list[tuple[int, int, int]]:
        """Take over the handles the shim opened for inode ``ino`` (:meth:`set_opens`): (handle, descriptor,
        layer) of each; their RELEASE reaches Python from now on, whose handler closes the descriptor (still
        registered for the data requests, as :meth:`serve` would have it)."""
        out: list[tuple[int, int, int]] = []
        while True:
            fhs, fds, layers = (ctypes.c_uint64 * 64)(), (ctypes.c_int * 64)(), (ctypes.c_uint * 64)()
            n = self._lib.unionfs_native_adopt(ino, fhs, fds, layers, 64)
            out += [(fhs[i], fds[i], layers[i]) for i in range(n)]
            if n < 64:
                return out

    def attr_generation(self) -> int:
        """The generation :meth:`dir_attr` is to be given: taken before the attributes are read."""
        return int(self._lib.unionfs_native_attr_gen())

    def listing_end(self, generation: int, ino: int, offset: int) -> bool:
        """Open-less directory ``ino``'s listing, read since ``generation`` (:meth:`attr_generation`), was served
        to its end, the last entry at ``offset``: the shim answers a READDIR(PLUS) there with an empty reply
        while nothing may change (kept with the directory's attributes, :meth:`dir_attr`). Whether kept."""
        return bool(self._lib.unionfs_native_listing_end(generation, ino, offset))

    def dir_attr(self, generation: int, ino: int, mode: int, nlink: int, uid: int, gid: int, rdev: int,
                 size: int, blksize: int, blocks: int, atime_ns: int, mtime_ns: int, ctime_ns: int,
                 timeout: float) -> bool:
        """Directory ``ino``'s attributes, read since ``generation`` (:meth:`attr_generation`): the shim answers
        GETATTR with them for ``timeout`` seconds unless something may change first. Whether they were kept."""
        return bool(self._lib.unionfs_native_dir_attr(generation, ino, mode, nlink, uid, gid, rdev, size, blksize,
                                                      blocks, atime_ns, mtime_ns, ctime_ns, timeout))

    @property
    def openless_dirs(self) -> bool:
        return self._get(_OPT_OPENLESS_DIRS)

    @property
    def data_ops(self) -> bool:
        return self._get(_OPT_DATA_OPS)

    @property
    def own_reader(self) -> bool:
        return self._get(_OPT_OWN_READER)

    @property
    def cached_listings(self) -> bool:
        return self._get(_OPT_CACHE_DIRS)

    @property
    def readdirplus_auto(self) -> bool:
        return self._get(_OPT_READDIRPLUS_AUTO)

    def serve(self, fh: int, fd: int, reads: bool = True, writes: bool = False, direct: bool = False) -> None:
        """READ (and with ``writes`` WRITE) requests on file handle ``fh`` are answered on descriptor ``fd``
        without Python (pread, pwrite in the shim) until :meth:`stop`; ``fd`` must stay open until then. Register
        again when the handle must use another descriptor (a read-only handle after a copy-up); register a
        descriptor for writes only once it is the upper file's. ``direct``: the handle was opened with
        ``direct_io``, so the kernel leaves to each WRITE the dropping of the set-user-ID and set-group-ID bits it
        does itself before a cached one; the shim does it (the pwrite drops a security.capability stored as
        such)."""
        err = self._lib.unionfs_native_set_fd(fh, fd, (1 if reads else 0) | (2 if writes else 0)
                                              | (8 if direct and writes else 0))
        if err != 0:
            raise OSError(-err, os.strerror(-err))

    def serve_reads(self, fh: int, fd: int) -> None:
        """:meth:`serve` for reads only."""
        self.serve(fh, fd)

    def stop(self, fh: int) -> None:
        """Requests on ``fh`` go to Python again (call before closing the descriptor: it waits for a read or
        write of it under way in the shim)."""
        self._lib.unionfs_native_set_fd(fh, -1, 0)

    def stop_reads(self, fh: int) -> None:
        """The same as :meth:`stop`."""
        self.stop(fh)

    def set_absent_xattr(self, name: bytes, absent: bool) -> None:
        """Declare that no file of the mount has the extended attribute ``name`` (GETXATTR of it is then answered
        ENODATA by the shim, e.g. ``security.selinux`` that ``ls -l`` asks of every file), or withdraw it. A
        SETXATTR of the name through the mount withdraws it by itself; the shell must withdraw it when a layer
        may gain it otherwise (a copy-up of a file that has it, a labelling upper file system)."""
        err = self._lib.unionfs_native_absent_xattr(name, int(absent))
        if err != 0:
            raise OSError(-err, os.strerror(-err), os.fsdecode(name))

    def absent_at(self, ino: int, name: bytes) -> None:
        """Inode ``ino`` has no extended attribute ``name`` (found missing): the shim answers GETXATTR of it
        ENODATA until :meth:`absent_clear` or a SETXATTR through the mount. OSError ENOSPC: the shim holds 8
        names."""
        err = self._lib.unionfs_native_absent_at(ino, name)
        if err != 0:
            raise OSError(-err, os.strerror(-err), os.fsdecode(name))

    def checkable_xattr(self, name: bytes, disk: Sequence[bytes]) -> None:
        """A regular file lacks the extended attribute ``name`` when the file its recipe names (:meth:`openable`)
        has none of the names ``disk`` (one or two): the reader checks that file at the first GETXATTR of ``name``
        of an inode with a live recipe, answers ENODATA when it has none, and sends the request on otherwise.
        OSError EINVAL (a name too long), ENOSPC (the shim holds 8 names)."""
        names = (ctypes.c_char_p * len(disk))(*disk)
        err = self._lib.unionfs_native_checkable_xattr(name, names, len(disk))
        if err != 0:
            raise OSError(-err, os.strerror(-err), os.fsdecode(name))

    def absent_clear(self) -> None:
        """Forget what :meth:`absent_at` said of every inode."""
        self._lib.unionfs_native_absent_clear()

    def readdir_handle(self, fh: int) -> tuple[int, bool]:
        """(the handle opendir returned, whether this is a plain READDIR) for the ``fh`` a readdir got."""
        return fh & ~self._plain_bit, bool(fh & self._plain_bit)

    def dir_inode(self, fh: int) -> int | None:
        """The inode number of an open-less directory's handle (:meth:`set_openless_dirs`; after
        :meth:`readdir_handle`), None for a handle opendir returned."""
        return fh if self._lib.unionfs_native_session_openless() else None


_loaded: Native | None = None
_reason = "not loaded yet"


#: the head of a record of :meth:`Native.openable` (unionfs_native_openable in shim.c), the path's bytes after it
_RECIPE = struct.Struct("=QQQII")
#: a directory to read ahead (unionfs_native_prefetch): layer, length of the path that follows
_PREFETCH_RECORD = struct.Struct("=II")


def recipe(ino: int, layer: int, path: bytes, dev: int, st_ino: int) -> bytes:
    """Inode ``ino`` is the regular file ``path`` beneath layer ``layer``, whose device and inode number are
    ``dev`` and ``st_ino``: a record of :meth:`Native.openable`."""
    return _RECIPE.pack(ino, dev, st_ino, layer, len(path)) + path


def reason() -> str:
    """Why the last :func:`load` returned None (empty after a successful one)."""
    return _reason


def library_path() -> Path | None:
    """The shim library: ``$UNIONFS_NATIVE_LIB``, else the one built beside this file, else None."""
    env = os.environ.get(LIBRARY_ENV)
    if env:
        return Path(env)
    here = Path(__file__).parent
    for candidate in sorted(here.glob("_shim*.so")):
        return candidate
    return None


def _global_handle() -> ctypes.CDLL | None:
    """The shim when it is already in the global scope (preloaded, or loaded before), else None."""
    main = ctypes.CDLL(None)
    try:
        main.unionfs_native_version  # noqa: B018 (the look-up is the test)
    except AttributeError:
        return None
    return main


def _address(lib: ctypes.CDLL, name: str) -> int | None:
    try:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    except AttributeError:
        return None


def _probe(path: Path) -> tuple[ctypes.CDLL | None, str]:
    """Open the library without putting it in the global scope (its constructor checks libfuse)."""
    try:
        lib = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL | os.RTLD_NOW)
    except OSError as e:
        return None, f"cannot open {path}: {e}"
    lib.unionfs_native_reason.restype = ctypes.c_char_p
    if not lib.unionfs_native_active():
        return None, f"{path}: {lib.unionfs_native_reason().decode()}"
    return lib, ""


def load(path: str | os.PathLike[str] | None = None) -> Native | None:
    """Put the shim in front of libfuse for this process (and the processes it forks) and return it; None, with
    :func:`reason` set, when there is no library, it does not fit this libfuse, or pyfuse3 was imported first
    (its references to libfuse are already bound). Calling it again returns the same object."""
    global _loaded, _reason
    if _loaded is not None:
        return _loaded
    preloaded = _global_handle()
    if preloaded is not None:
        preloaded.unionfs_native_reason.restype = ctypes.c_char_p
        if not preloaded.unionfs_native_active():
            _reason = f"the preloaded shim is inactive: {preloaded.unionfs_native_reason().decode()}"
            return None
        _loaded = Native(preloaded, "(preloaded)")
        _reason = ""
        return _loaded
    if "pyfuse3" in sys.modules:
        _reason = "pyfuse3 was imported before the native part"
        return None
    found = Path(path) if path is not None else library_path()
    if found is None:
        _reason = "no native library was built"
        return None
    if not found.exists():
        _reason = f"{found} does not exist"
        return None
    probed, why = _probe(found)
    if probed is None:
        _reason = why
        return None
    lib = ctypes.CDLL(str(found), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    # Whoever asks the global scope for fuse_session_new must now get the shim's.
    first = _address(ctypes.CDLL(None), "fuse_session_new")
    if first != _address(lib, "fuse_session_new"):
        _reason = "another library defining fuse_session_new comes first in the global scope"
        return None
    _loaded = Native(lib, str(found))
    _reason = ""
    return _loaded


def loaded() -> Native | None:
    """The shim if :func:`load` succeeded in this process."""
    return _loaded


def available() -> bool:
    """Whether a shim library is there that fits this libfuse (it is not put in front of libfuse)."""
    if _loaded is not None or _global_handle() is not None:
        return True
    found = library_path()
    return found is not None and found.exists() and _probe(found)[0] is not None


def version() -> str | None:
    """The shim's version line (with the libfuse it runs with), None when no usable library is there."""
    if _loaded is not None:
        return _loaded.version()
    found = library_path()
    if found is None or not found.exists():
        return None
    lib, _ = _probe(found)
    if lib is None:
        return None
    lib.unionfs_native_version.restype = ctypes.c_char_p
    return str(lib.unionfs_native_version().decode())

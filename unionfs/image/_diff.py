"""Write an upper directory in the kernel's overlay on-disk format as an OCI layer tar (the inverse of
:func:`apply_layer`).

* Every object below ``upper`` (not ``upper`` itself) becomes one entry, in the order of its path's
  components (a directory right before what it holds, names compared as bytes): PAX format, names relative
  (directories with a trailing ``/``), numeric owners with empty user and group names, the permission bits
  with setuid/setgid/sticky, the mtime in whole seconds (a PAX record only where the ustar field cannot hold
  it), xattrs as sorted ``SCHILY.xattr.NAME`` records. Overlay-private xattrs (``trusted.overlay.*``,
  ``user.overlay.*``) and ``user.containers.override_stat`` are never written. Symlink targets are kept
  verbatim. Objects with more than one link that share an inode are written once, in full, where the first
  of their names comes; the later names are hard links to it. Sockets cannot be held by a tar: they are
  left out and counted in ``skipped``.
* Overlay markers (read in the namespace of ``fmt`` only) become OCI whiteouts: a character device 0/0, or
  an empty regular file carrying ``overlay.whiteout`` in a directory marked ``overlay.opaque=x``, becomes an
  empty regular file ``.wh.NAME`` (mode 0, owner 0:0); a directory marked ``overlay.opaque=y`` is followed
  by ``DIR/.wh..wh..opq`` (the same), before what it holds. Both are dated ``source_date_epoch``, or 0.
  A directory carrying ``overlay.redirect`` or a file carrying ``overlay.metacopy`` has no expression in a
  layer tar, nor has a real name starting with ``.wh.``: :class:`DiffError` names it.
* ``overrides=True``: an entry's ``user.containers.override_stat`` (``UID:GID:0MODE``, with
  ``:char-MAJ-MIN`` or ``:block-MAJ-MIN`` for a device stored as a regular file, as ``apply_layer`` with
  ``rootless=True`` writes it) gives the entry's owner and permission bits, and makes it a device again.
* The output depends on the tree only: not on inode numbers, directory order, atimes or ctimes. With
  ``source_date_epoch`` later mtimes are clamped to it. gzip is written by zlib at a fixed level with an
  empty gzip header (no name, mtime 0); zstd at level 3 without zstd's worker threads, in one frame that
  states its content size (for that the tree is walked twice: once to size the tar, once to write it).
  The compressed bytes do not depend on how the tar is cut into pieces (checked for zlib and zstandard).
* The tar's sha256 (the diff-id) and the output's (the digest) are computed as it is written. File data is
  streamed in 1 MiB pieces; compression, the digest and the writes run in a second thread, fed in order
  through a queue of a few MiB; the output is written in pieces of about 1 MiB.
* The root of ``upper`` is no entry; when it is marked ``overlay.opaque=y`` (what ``apply_layer`` makes of
  a ``.wh..wh..opq`` at the top of a layer) the layer starts with ``.wh..wh..opq``, although the kernel
  ignores that marker on the root of a layer.
* A file that vanishes, or changes type, size or mtime while it is read, raises :class:`DiffError`; so does
  a tree whose tar, in zstd, is not the size the first walk found;
  :func:`write_diff` has then written part of a layer to ``out`` (the caller discards it);
  :func:`write_diff_file` never leaves a partial file at its destination.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import queue
import secrets
import stat
import tarfile
import threading
import zlib
from collections.abc import Callable, Generator, Iterator
from typing import Any, BinaryIO, Protocol

from ..ownership import OVERRIDE_XATTR, decode_override, kept_original
from ..whiteout import AUFS_OPAQUE, AUFS_PREFIX, TRUSTED_PREFIX, USER_PREFIX, XattrFormat, is_whiteout_stat
from ._stream import LayerError, digest_hex

__all__ = ["COMPRESSIONS", "DiffError", "DiffResult", "compression_for", "write_diff", "write_diff_file"]

COMPRESSIONS = ("none", "gzip", "zstd")
GZIP_LEVEL = 6
ZSTD_LEVEL = 3

#: file data read at a time; the output is written when this much has gathered; smaller pieces of the tar
#: (headers) are gathered to this size before they are compressed
_COPY = 1 << 20
_OUT = 1 << 20
_SMALL = 1 << 16
#: pieces of the tar waiting for the compressing thread (at most about this many MiB held)
_QUEUED = 8
_BLOCK = tarfile.BLOCKSIZE
_END = bytes(2 * _BLOCK)
_XATTR_PAX = "SCHILY.xattr."
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
#: errnos meaning the object is no longer where the walk saw it
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)

Progress = Callable[[int, int], None]
"""Called after each entry with (entries written, bytes of the uncompressed tar so far)."""


class DiffError(LayerError):
    """An upper directory that cannot be written as a layer: a marker with no OCI expression, or a tree that
    changed while it was read. The message names the path."""


@dataclasses.dataclass
class DiffResult:
    """What one written layer holds, its size and its two digests."""

    #: tar entries written (whiteouts and opaque markers included)
    entries: int = 0
    #: bytes of regular file data
    bytes: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    #: objects a tar cannot hold (sockets), left out
    skipped: int = 0
    #: ``sha256:...`` of the uncompressed tar, and of the bytes written
    diff_id: str = ""
    digest: str = ""
    #: bytes written, and the length of the uncompressed tar
    size: int = 0
    uncompressed_size: int = 0
    compression: str = ""

    def summary(self) -> str:
        """One line for a command's output."""
        line = (
            f"{self.entries} entries, {self.bytes} bytes, {self.whiteouts} whiteouts, "
            f"{self.opaque_dirs} opaque directories"
        )
        if self.skipped:
            line += f", {self.skipped} sockets skipped"
        line += f"; {self.size} bytes {self.compression}"
        if self.compression != "none":
            line += f" ({self.uncompressed_size} uncompressed)"
        return line + f", {self.digest}"


def compression_for(dest: str | os.PathLike[str]) -> str:
    """The compression a file name's suffix says: ``.tar`` none, ``.tar.gz``/``.tgz`` gzip,
    ``.tar.zst``/``.tar.zstd`` zstd (ValueError for anything else)."""
    name = os.fspath(dest).lower()
    for suffixes, comp in (((".tar.gz", ".tgz"), "gzip"), ((".tar.zst", ".tar.zstd"), "zstd"), ((".tar",), "none")):
        if name.endswith(suffixes):
            return comp
    raise ValueError(f"cannot tell the compression of {os.fspath(dest)!r} from its suffix (.tar, .tar.gz, .tar.zst)")


# -- the output ---------------------------------------------------------------------------------------------


class _Compressor(Protocol):
    def compress(self, data: Any) -> bytes: ...
    def flush(self) -> bytes: ...


class _Sink:
    """The tar stream: hashed and counted, compressed, then hashed, counted and written to ``out``.

    Compression, the output's hash and the writes run in a second thread (zlib, zstandard and hashlib let go
    of the GIL), fed in order through a short queue: the walk, reads and the tar's hash go on meanwhile. The
    bytes are the same as with one thread. :meth:`finish` ends the stream; :meth:`close` stops the thread
    (after an error, dropping what is still queued).
    """

    def __init__(self, out: BinaryIO, compression: str, size: int | None) -> None:
        self._out = out
        self.tar_sha = hashlib.sha256()
        self.tar_count = 0
        #: for "none" the output is the tar: one hash serves both
        self.out_sha = self.tar_sha if compression == "none" else hashlib.sha256()
        self.out_count = 0
        self._small = bytearray()
        self._pending = bytearray()
        self._comp: _Compressor | None
        if compression == "gzip":
            self._comp = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31, 9, zlib.Z_DEFAULT_STRATEGY)
        elif compression == "zstd":
            import zstandard

            cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0, write_content_size=True, write_checksum=True)
            self._comp = cctx.compressobj(size=-1 if size is None else size)
        elif compression == "none":
            self._comp = None
        else:
            raise ValueError(f"unknown compression {compression!r} (one of {', '.join(COMPRESSIONS)})")
        self._queue: queue.Queue[bytes | bytearray | None] = queue.Queue(_QUEUED)
        self._error: BaseException | None = None
        self._dropping = False
        self._thread: threading.Thread | None = None
        if self._comp is not None:
            self._thread = threading.Thread(target=self._run, name="layer-compress", daemon=True)
            self._thread.start()

    @property
    def tar_length(self) -> int:
        """Bytes of the tar taken so far."""
        return self.tar_count + len(self._small)

    def write(self, data: bytes | memoryview) -> None:
        """Take ``data`` (not kept: a buffer may be reused once this returns)."""
        if len(data) < _SMALL:
            self._small += data
            if len(self._small) >= _SMALL:
                self._push(self._small)
                self._small = bytearray()
            return
        if self._small:
            self._push(self._small)
            self._small = bytearray()
        self._push(data)

    def _push(self, data: bytes | bytearray | memoryview) -> None:
        self.tar_sha.update(data)
        self.tar_count += len(data)
        if self._comp is None:
            self._emit(data)
            return
        self._put(bytes(data) if isinstance(data, memoryview) else data)

    def _put(self, item: bytes | bytearray | None) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        assert self._comp is not None
        ended = False
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    ended = True
                    break
                if self._dropping:
                    continue
                out = self._comp.compress(item)
                if out:
                    self._emit(out)
            if not self._dropping:
                self._emit(self._comp.flush(), last=True)
        except BaseException as exc:
            self._error = exc
            while not ended and self._queue.get() is not None:  # what is still queued, up to the end marker
                pass

    def _emit(self, data: bytes | bytearray | memoryview, last: bool = False) -> None:
        if len(data) >= _OUT and not self._pending:
            self._write(data)
            return
        self._pending += data
        if len(self._pending) >= _OUT or last:
            self._write(self._pending)
            self._pending = bytearray()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if self._comp is not None:
            self.out_sha.update(data)
        self.out_count += len(data)
        view = memoryview(data)
        while view:
            n = self._out.write(view)
            if n is None:  # a raw stream that could not take anything (non-blocking): not supported
                raise OSError(errno.EAGAIN, "the output took no bytes")
            view = view[n:]

    def finish(self) -> None:
        """End the stream: everything compressed and written (raises what the output raised)."""
        if self._small:
            self._push(self._small)
            self._small = bytearray()
        if self._thread is None:
            self._emit(b"", last=True)
            return
        self._put(None)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the thread, when :meth:`finish` was not reached (an error): what is queued is dropped."""
        if self._thread is None:
            return
        self._dropping = True
        self._queue.put(None)  # the thread takes items until this one, error or not
        self._thread.join()
        self._thread = None


# -- the walk -----------------------------------------------------------------------------------------------


def _show(path: bytes) -> str:
    return repr(b"/" + path)


@dataclasses.dataclass
class _Item:
    """One tar entry; ``data`` names the regular file whose content follows (parent fd, name, stat)."""

    info: tarfile.TarInfo
    data: tuple[int, bytes, os.stat_result] | None = None


_DEVICE_KINDS = {b"char": tarfile.CHRTYPE, b"block": tarfile.BLKTYPE}
#: a device recorded in an override: (tar type, major, minor)
Device = tuple[bytes, int, int]


def _parse_override(value: bytes) -> tuple[int, int, int, Device | None] | None:
    """(uid, gid, permission bits, device or None) from ``UID:GID:0MODE[:char-MAJ-MIN|:block-MAJ-MIN]``."""
    fields = decode_override(value)
    extra = value.split(b":")[3:]
    if fields is None or len(extra) > 1:
        return None
    if not extra:
        return (*fields, None)
    kind, _, nums = extra[0].partition(b"-")
    major, _, minor = nums.partition(b"-")
    if kind not in _DEVICE_KINDS or not major.isdigit() or not minor.isdigit():
        return None
    return (*fields, (_DEVICE_KINDS[kind], int(major), int(minor)))


#: a directory being walked: its descriptor, its path, whether it holds xattr whiteouts, its names still to walk
_Frame = tuple[int, bytes, bool, Iterator[bytes]]


class _Walker:
    def __init__(self, upper: bytes, fmt: XattrFormat, overrides: bool, sde: int | None, res: DiffResult) -> None:
        self.upper = upper
        self.fmt = fmt
        self.overrides = overrides
        self.sde = sde
        self.marker_time = sde if sde is not None else 0
        self.res = res
        self.links: dict[tuple[int, int], str] = {}

    # -- reading one object

    def _xattrs(self, target: bytes | int, path: bytes) -> dict[bytes, bytes]:
        follow = isinstance(target, int)
        try:
            names = os.listxattr(target, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return {}
            raise self._error(exc, path) from None
        found: dict[bytes, bytes] = {}
        for text in names:
            name = os.fsencode(text)
            try:
                found[name] = os.getxattr(target, name, follow_symlinks=follow)
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    continue  # removed since it was listed
                raise self._error(exc, path) from None
        return found

    @staticmethod
    def _error(exc: OSError, path: bytes) -> Exception:
        if exc.errno in _GONE:
            return DiffError(f"{_show(path)} vanished or changed while the upper directory was read")
        return OSError(exc.errno, f"{_show(path)}: {exc.strerror}")

    def _info(
        self, path: bytes, st: os.stat_result, xattrs: dict[bytes, bytes]
    ) -> tuple[tarfile.TarInfo, Device | None]:
        """The entry for ``path`` (its type still to be set), with its owner, mode, mtime and xattrs; and the
        device an override names (``overrides=True``)."""
        ti = tarfile.TarInfo(path.decode("utf-8", "surrogateescape"))
        ti.uid, ti.gid, ti.mode = st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)
        ti.uname = ti.gname = ""
        mtime = st.st_mtime_ns // 1_000_000_000
        ti.mtime = min(mtime, self.sde) if self.sde is not None else mtime
        pax: dict[str, str] = {}
        shown = dict(xattrs)
        for disk in xattrs:
            original = kept_original(disk)
            if original is not None:  # (an xattr an ordinary user's store keeps for what it may not set)
                del shown[disk]
                if self.overrides:
                    shown.setdefault(original, xattrs[disk])
        for name in sorted(shown):
            if name.startswith((TRUSTED_PREFIX, USER_PREFIX)) or name == OVERRIDE_XATTR:
                continue
            pax[_XATTR_PAX + name.decode("utf-8", "surrogateescape")] = shown[name].decode("utf-8", "surrogateescape")
        ti.pax_headers = pax
        value = xattrs.get(OVERRIDE_XATTR) if self.overrides else None
        if value is None:
            return ti, None
        parsed = _parse_override(value)
        if parsed is None:
            raise DiffError(f"{_show(path)}: malformed {OVERRIDE_XATTR.decode()} {value!r}")
        ti.uid, ti.gid, ti.mode, device = parsed
        if device is not None and not stat.S_ISREG(st.st_mode):
            raise DiffError(f"{_show(path)}: {OVERRIDE_XATTR.decode()} names a device, on what is no regular file")
        return ti, device

    def _marker(self, path: bytes) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(path.decode("utf-8", "surrogateescape"))
        ti.type = tarfile.REGTYPE
        ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
        ti.mtime = self.marker_time
        return ti

    def _private(self, xattrs: dict[bytes, bytes], key: bytes) -> bytes | None:
        return xattrs.get(self.fmt.prefix + key)

    # -- the tree

    def items(self) -> Generator[_Item, None, None]:
        """Every entry of the layer, in order (a generator: the directories' descriptors stay open while it
        runs, and are closed when it is closed)."""
        try:
            root = os.open(self.upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the caller's path: followed
        except OSError as exc:
            raise OSError(exc.errno, f"upper directory {self.upper!r}: {exc.strerror}") from None
        stack: list[_Frame] = []
        try:
            marks = self._xattrs(root, b"")
            stack.append((root, b"", marks.get(self.fmt.opaque) == b"x", self._names(root, b"")))
            if marks.get(self.fmt.opaque) == b"y":
                self.res.opaque_dirs += 1
                yield _Item(self._marker(AUFS_OPAQUE))
            while stack:
                dfd, dpath, xwhiteouts, names = stack[-1]
                name = next(names, None)
                if name is None:
                    stack.pop()
                    if dfd != root:
                        os.close(dfd)
                    continue
                path = dpath + b"/" + name if dpath else name
                if name.startswith(AUFS_PREFIX):
                    raise DiffError(f"{_show(path)}: a name starting with .wh. is a whiteout in a layer tar")
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except OSError as exc:
                    raise self._error(exc, path) from None
                mode = st.st_mode
                if stat.S_ISDIR(mode):
                    yield from self._directory(dfd, name, path, st, stack)
                elif is_whiteout_stat(st):
                    yield self._whiteout(dpath, name)
                elif stat.S_ISREG(mode):
                    yield from self._file(dfd, name, path, st, xwhiteouts, dpath)
                elif stat.S_ISLNK(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                    yield self._special(dfd, name, path, st)
                else:
                    self.res.skipped += 1
        finally:
            for dfd, *_ in stack:
                if dfd != root:
                    os.close(dfd)
            os.close(root)

    def _names(self, dfd: int, path: bytes) -> Iterator[bytes]:
        try:
            found = sorted(os.fsencode(n) for n in os.listdir(dfd))
        except OSError as exc:
            raise self._error(exc, path) from None
        return iter(found)

    def _whiteout(self, dpath: bytes, name: bytes) -> _Item:
        self.res.whiteouts += 1
        return _Item(self._marker((dpath + b"/" if dpath else b"") + AUFS_PREFIX + name))

    def _directory(
        self, pfd: int, name: bytes, path: bytes, st: os.stat_result, stack: list[_Frame]
    ) -> Iterator[_Item]:
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except OSError as exc:
            raise self._error(exc, path) from None
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise DiffError(f"{_show(path)} vanished or changed while the upper directory was read")
            xattrs = self._xattrs(fd, path)
            if self._private(xattrs, b"redirect") is not None:
                raise DiffError(f"{_show(path)}: a renamed directory (overlay.redirect) cannot be written as a layer")
            ti, _ = self._info(path, st, xattrs)
            ti.type = tarfile.DIRTYPE
            names = self._names(fd, path)
        except BaseException:
            os.close(fd)
            raise
        opaque = xattrs.get(self.fmt.opaque)
        stack.append((fd, path, opaque == b"x", names))
        yield _Item(ti)
        if opaque == b"y":
            self.res.opaque_dirs += 1
            yield _Item(self._marker(path + b"/" + AUFS_OPAQUE))

    def _file(
        self, pfd: int, name: bytes, path: bytes, st: os.stat_result, xwhiteouts: bool, dpath: bytes
    ) -> Iterator[_Item]:
        via_proc = b"/proc/self/fd/%d/%s" % (pfd, name)
        xattrs = self._xattrs(via_proc, path)
        if xwhiteouts and st.st_size == 0 and self._private(xattrs, b"whiteout") is not None:
            yield self._whiteout(dpath, name)
            return
        if self._private(xattrs, b"metacopy") is not None:
            raise DiffError(f"{_show(path)}: a metadata-only copy-up (overlay.metacopy) cannot be written as a layer")
        ti, device = self._info(path, st, xattrs)
        if self._link(ti, st):
            yield _Item(ti)
            return
        if device is not None:
            ti.type, ti.devmajor, ti.devminor = device
            yield _Item(ti)
            return
        ti.type = tarfile.REGTYPE
        ti.size = st.st_size
        yield _Item(ti, (pfd, name, st))

    def _special(self, pfd: int, name: bytes, path: bytes, st: os.stat_result) -> _Item:
        via_proc = b"/proc/self/fd/%d/%s" % (pfd, name)
        xattrs = self._xattrs(via_proc, path)
        ti, _ = self._info(path, st, xattrs)
        if self._link(ti, st):
            return _Item(ti)
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            try:
                target = os.readlink(name, dir_fd=pfd)
            except OSError as exc:
                raise self._error(exc, path) from None
            ti.type = tarfile.SYMTYPE
            ti.linkname = target.decode("utf-8", "surrogateescape")
        elif stat.S_ISFIFO(mode):
            ti.type = tarfile.FIFOTYPE
        else:
            ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        return _Item(ti)

    def _link(self, ti: tarfile.TarInfo, st: os.stat_result) -> bool:
        """Make ``ti`` a hard link when an earlier entry is the same inode (and remember the first)."""
        if st.st_nlink <= 1:
            return False
        key = (st.st_dev, st.st_ino)
        first = self.links.get(key)
        if first is None:
            self.links[key] = ti.name
            return False
        ti.type = tarfile.LNKTYPE
        ti.linkname = first
        ti.size = 0
        ti.devmajor = ti.devminor = 0
        return True


def _header(ti: tarfile.TarInfo) -> bytes:
    try:
        return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    except (UnicodeError, ValueError) as exc:
        raise DiffError(f"{ti.name!r}: cannot be written as a tar entry: {exc}") from None


def _padding(size: int) -> int:
    return -size % _BLOCK


class _Copier:
    """Copies one regular file's content into the tar, checking that it is what the walk saw."""

    def __init__(self) -> None:
        self.buf = bytearray(_COPY)
        self.view = memoryview(self.buf)
        self.noatime = hasattr(os, "O_NOATIME")

    def _open(self, pfd: int, name: bytes) -> int:
        if self.noatime:
            try:
                return os.open(name, _FILE_FLAGS | os.O_NOATIME, dir_fd=pfd)
            except PermissionError:
                self.noatime = False  # O_NOATIME is for the file's owner (or CAP_FOWNER) only
        return os.open(name, _FILE_FLAGS, dir_fd=pfd)

    def copy(self, sink: _Sink, path: bytes, pfd: int, name: bytes, st: os.stat_result) -> None:
        changed = f"{_show(path)} vanished or changed while it was read"
        try:
            fd = self._open(pfd, name)
        except OSError as exc:
            if exc.errno in _GONE:
                raise DiffError(changed) from None
            raise OSError(exc.errno, f"{_show(path)}: {exc.strerror}") from None
        try:
            before = os.fstat(fd)
            if not _same(before, st):
                raise DiffError(changed)
            left = st.st_size
            while left > 0:
                n = os.readv(fd, [self.view[: min(_COPY, left)]])
                if n == 0:
                    raise DiffError(changed)
                sink.write(self.view[:n])
                left -= n
            if os.read(fd, 1) or not _same(os.fstat(fd), st):
                raise DiffError(changed)
        except OSError as exc:
            raise OSError(exc.errno, f"{_show(path)}: {exc.strerror}") from None
        finally:
            os.close(fd)
        pad = _padding(st.st_size)
        if pad:
            sink.write(bytes(pad))


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_mode, a.st_size, a.st_mtime_ns) == (
        b.st_dev,
        b.st_ino,
        b.st_mode,
        b.st_size,
        b.st_mtime_ns,
    )


def _tar_size(upper: bytes, fmt: XattrFormat, overrides: bool, sde: int | None) -> int:
    """The length of the tar the walk of ``upper`` gives (headers and padded data, no file read)."""
    total = len(_END)
    walker = _Walker(upper, fmt, overrides, sde, DiffResult())
    items = walker.items()
    try:
        for item in items:
            total += _header_length(item.info)
            if item.data is not None:
                size = item.data[2].st_size
                total += size + _padding(size)
    finally:
        items.close()
    return total


_USTAR_NUM = 8**7
_USTAR_BIG = 8**11


def _header_length(ti: tarfile.TarInfo) -> int:
    """``len(_header(ti))``, without building the header where it is one ustar block (no PAX records)."""
    name = ti.name + "/" if ti.type == tarfile.DIRTYPE else ti.name
    if (
        ti.pax_headers
        or len(name) > tarfile.LENGTH_NAME
        or len(ti.linkname) > tarfile.LENGTH_LINK
        or not name.isascii()
        or not ti.linkname.isascii()
        or not (0 <= ti.uid < _USTAR_NUM and 0 <= ti.gid < _USTAR_NUM)
        or not (0 <= ti.size < _USTAR_BIG and 0 <= ti.mtime < _USTAR_BIG)
    ):
        return len(_header(ti))
    return _BLOCK


def _write_entries(
    sink: _Sink,
    upper: bytes,
    fmt: XattrFormat,
    overrides: bool,
    sde: int | None,
    progress: Progress | None,
    result: DiffResult,
) -> None:
    copier = _Copier()
    items = _Walker(upper, fmt, overrides, sde, result).items()
    try:
        for item in items:
            sink.write(_header(item.info))
            if item.data is not None:
                pfd, name, st = item.data
                copier.copy(sink, item.info.name.encode("utf-8", "surrogateescape"), pfd, name, st)
                result.bytes += st.st_size
            result.entries += 1
            if progress is not None:
                progress(result.entries, sink.tar_length)
    finally:
        items.close()


def write_diff(
    upper: bytes,
    out: BinaryIO,
    *,
    fmt: XattrFormat,
    compression: str = "gzip",
    source_date_epoch: int | None = None,
    overrides: bool = False,
    progress: Progress | None = None,
) -> DiffResult:
    """Write the upper directory ``upper`` (overlay on-disk format, markers in ``fmt``) to ``out`` as an OCI
    layer tar, compressed with ``compression`` ("none", "gzip" or "zstd"). Raises :class:`DiffError` for a
    tree that has no layer expression or changed while read, OSError for the file system's errors (``out``
    then holds part of a layer)."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r} (one of {', '.join(COMPRESSIONS)})")
    size = _tar_size(upper, fmt, overrides, source_date_epoch) if compression == "zstd" else None
    result = DiffResult(compression=compression)
    sink = _Sink(out, compression, size)
    try:
        _write_entries(sink, upper, fmt, overrides, source_date_epoch, progress, result)
        sink.write(_END)
        if size is not None and sink.tar_length != size:
            raise DiffError(
                f"upper directory {upper!r} changed while it was read (a tar of {sink.tar_length} bytes, not {size})"
            )
        sink.finish()
    finally:
        sink.close()
    result.diff_id = digest_hex(sink.tar_sha)
    result.digest = digest_hex(sink.out_sha)
    result.size = sink.out_count
    result.uncompressed_size = sink.tar_count
    return result


def write_diff_file(
    upper: bytes,
    dest: str | os.PathLike[str],
    *,
    fmt: XattrFormat,
    compression: str | None = None,
    source_date_epoch: int | None = None,
    overrides: bool = False,
    progress: Progress | None = None,
) -> DiffResult:
    """:func:`write_diff` into the file ``dest``: written to a temporary file beside it (mode 0666 less the
    umask), flushed to disk and renamed into place when complete (replacing ``dest``), removed on any error.
    ``compression`` defaults to what the suffix of ``dest`` says (see :func:`compression_for`)."""
    comp = compression if compression is not None else compression_for(dest)
    if comp not in COMPRESSIONS:
        raise ValueError(f"unknown compression {comp!r} (one of {', '.join(COMPRESSIONS)})")
    target = os.fspath(dest)
    head, base = os.path.split(target)
    while True:
        tmp = os.path.join(head, f".{base}.partial-{secrets.token_hex(6)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        break
    try:
        with open(fd, "wb", buffering=0, closefd=True) as f:
            result = write_diff(
                upper,
                f,
                fmt=fmt,
                compression=comp,
                source_date_epoch=source_date_epoch,
                overrides=overrides,
                progress=progress,
            )
            os.fsync(f.fileno())
        os.rename(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return result

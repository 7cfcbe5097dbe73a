"""Thin wrappers for the Linux system calls the standard library lacks (renameat2, mount, umount2)."""

from __future__ import annotations

import ctypes
import errno
import os

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

AT_FDCWD = -100

#: mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOATIME = 1024
#: umount2(2) flag: detach the mount now, the file system goes once it is no longer busy
MNT_DETACH = 2


def _load_libc() -> ctypes.CDLL:
    # The C library by its usual name first: ctypes.util.find_library runs ldconfig (a process) to find it.
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes import util

        return ctypes.CDLL(util.find_library("c") or "libc.so", use_errno=True)


_libc = _load_libc()
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int
_syncfs = _libc.syncfs
_syncfs.argtypes = [ctypes.c_int]
_syncfs.restype = ctypes.c_int
_mount = _libc.mount
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_mount.restype = ctypes.c_int
_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_umount2.restype = ctypes.c_int


def _raise_errno(filename: object = None) -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), filename)


def renameat2(src: bytes, dst: bytes, flags: int, src_dir_fd: int = AT_FDCWD, dst_dir_fd: int = AT_FDCWD) -> None:
    """rename(2) with flags (RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT); raises OSError."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available in this C library")
    if _renameat2(src_dir_fd, src, dst_dir_fd, dst, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)


def syncfs(path: bytes | str) -> None:
    """Write out everything cached of the file system holding ``path`` (syncfs(2)); raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _syncfs(fd) != 0:
            _raise_errno(path)
    finally:
        os.close(fd)


def mount(source: bytes, target: bytes, fstype: bytes, flags: int, data: bytes) -> None:
    """mount(2); raises OSError (its filename the target)."""
    if _mount(source, target, fstype, flags, data) != 0:
        _raise_errno(target)


def umount2(target: bytes, flags: int = 0) -> None:
    """umount2(2) (``flags``: MNT_DETACH); raises OSError (its filename the target)."""
    if _umount2(target, flags) != 0:
        _raise_errno(target)


_PR_SET_NAME = 15


def set_process_name(name: bytes) -> None:
    """The name ``ps -o comm`` and ``/proc/PID/comm`` show for this process (at most 15 bytes are kept)."""
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)


def short_digest(data: bytes) -> str:
    """The first 24 hex digits of ``data``'s SHA-256, a name for a file (pid files, spare sockets). The built-in
    module first: hashlib loads OpenSSL, which takes longer than a mount command's own start-up work."""
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - (every CPython has it)
        from hashlib import sha256
    return str(sha256(data).hexdigest()[:24])

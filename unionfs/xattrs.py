"""Extended attributes of real files: read, list, write and remove without following a final symlink, and
the probe that tells whether a file system lets this process store ``trusted.*`` names.

A path is never followed through a final symlink; a descriptor is used as it is.
"""

from __future__ import annotations

import errno
import os
import tempfile

#: errnos meaning "this xattr is absent or unsupported here"; :func:`get` answers None for them.
ABSENT = (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES)


def get(target: bytes | int, name: bytes) -> bytes | None:
    """Value of one xattr of ``target``, or None when it is absent (or xattrs are unsupported there)."""
    try:
        value: bytes = os.getxattr(target, name, follow_symlinks=isinstance(target, int))
    except OSError as exc:
        if exc.errno in ABSENT:
            return None
        raise
    return value


def names(target: bytes | int) -> list[bytes]:
    """Every on-disk xattr name of ``target``; [] where xattrs are unsupported."""
    try:
        found = [os.fsencode(n) for n in os.listxattr(target, follow_symlinks=isinstance(target, int))]
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise
    return found


def write(target: bytes | int, name: bytes, value: bytes, flags: int = 0) -> None:
    os.setxattr(target, name, value, flags, follow_symlinks=isinstance(target, int))


def remove(target: bytes | int, name: bytes) -> None:
    os.removexattr(target, name, follow_symlinks=isinstance(target, int))


def can_store_trusted(directory: bytes | str) -> bool:
    """Whether ``trusted.*`` xattrs can be written in ``directory`` (CAP_SYS_ADMIN in the initial user
    namespace, on a file system that supports them). A temporary file is made there and removed."""
    fd, path = tempfile.mkstemp(prefix=b".unionfs-xattr-probe-", dir=os.fsencode(directory))
    try:
        os.setxattr(fd, b"trusted.overlay.probe", b"y")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)

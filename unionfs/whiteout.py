"""Every on-disk encoding of whiteouts and opaque directories, read and written as the kernel does.

Whiteouts: a character device 0/0 (what the kernel writes), or (kernel 6.7+) an empty regular file carrying
the ``overlay.whiteout`` xattr inside a directory marked ``overlay.opaque=x``.  Opaque directories carry
``overlay.opaque=y``.  The xattr namespace is ``trusted.`` normally and ``user.`` with ``-o userxattr``.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import stat

from . import xattrs

TRUSTED_PREFIX = b"trusted.overlay."
USER_PREFIX = b"user.overlay."


class XattrFormat(enum.Enum):
    """Which xattr namespace carries our markers."""

    TRUSTED = "trusted"
    USER = "user"

    def __init__(self, value: str) -> None:
        #: the prefix of our markers' names, and the names of the opaque and the whiteout marker
        self.prefix: bytes = value.encode() + b".overlay."
        self.opaque: bytes = self.prefix + b"opaque"
        self.whiteout: bytes = self.prefix + b"whiteout"


def xattr_to_disk(name: bytes, prefixes: tuple[bytes, ...]) -> bytes:
    """The on-disk name of a merged-view xattr: names in an honoured overlay namespace are escaped as the
    kernel (6.7+) does, ``trusted.overlay.X`` being stored as ``trusted.overlay.overlay.X``."""
    for prefix in prefixes:
        if name.startswith(prefix):
            return prefix + b"overlay." + name[len(prefix) :]
    return name


def xattr_from_disk(name: bytes, prefixes: tuple[bytes, ...]) -> bytes | None:
    """The merged-view name of an on-disk xattr, or None for overlay-private ones that never show."""
    for prefix in prefixes:
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            if rest.startswith(b"overlay."):
                return prefix + rest[len(b"overlay.") :]
            return None
    return name


def is_whiteout_stat(st: os.stat_result) -> bool:
    """A character device with device number 0/0 is a whiteout."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@dataclasses.dataclass(frozen=True, slots=True)
class DirMarks:
    """What a directory's overlay xattrs say: opaque, or holding xattr-encoded whiteouts."""

    opaque: bool
    xwhiteouts: bool


#: the markers of a directory that carries none, of an opaque one, and of one holding xattr whiteouts
NO_MARKS = DirMarks(False, False)
OPAQUE = DirMarks(True, False)
HOLDS_XWHITEOUTS = DirMarks(False, True)


def read_dir_marks(path: bytes, formats: tuple[XattrFormat, ...]) -> DirMarks:
    """Read the opaque marker of directory ``path`` in each format we honour (first found wins)."""
    for fmt in formats:
        value = xattrs.get(path, fmt.opaque)
        if value is None:
            continue
        if value == b"y":
            return OPAQUE
        if value == b"x":
            return HOLDS_XWHITEOUTS
    return NO_MARKS


def is_xattr_whiteout(path: bytes, st: os.stat_result, formats: tuple[XattrFormat, ...]) -> bool:
    """An empty regular file carrying ``overlay.whiteout`` (only looked for where the parent says ``x``)."""
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        return False
    return any(xattrs.get(path, fmt.whiteout) is not None for fmt in formats)


def make_whiteout(name: bytes, dir_fd: int) -> None:
    """Create a kernel-format whiteout (char device 0/0, mode 0) named ``name`` in ``dir_fd``."""
    os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)


def set_opaque(path: bytes, fmt: XattrFormat) -> None:
    """Mark directory ``path`` opaque: lower directories of the same name are not merged into it."""
    os.setxattr(path, fmt.opaque, b"y", 0, follow_symlinks=False)

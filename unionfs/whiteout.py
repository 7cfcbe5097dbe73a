"""Every on-disk encoding of whiteouts and opaque directories, read and written as the kernel does.

Whiteouts: a character device 0/0 (what the kernel writes), or (kernel 6.7+) an empty regular file carrying
the ``overlay.whiteout`` xattr inside a directory marked ``overlay.opaque=x``.  Opaque directories carry
``overlay.opaque=y``.  The xattr namespace is ``trusted.`` normally and ``user.`` with ``-o userxattr``.

AUFS-style markers, honoured in lower layers only when asked (``-o aufs_markers``; never written): a name
``.wh.NAME`` deletes NAME from the layers beneath its own, and ``.wh..wh..opq`` makes its directory opaque.
Every name starting with ``.wh.`` in such a layer is a marker (``.wh..wh.*`` ones are AUFS's own metadata),
never an entry of the merged view.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import os
import stat

from . import xattrs
from ._at import PATH_MAX, At

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


#: the longest file name
NAME_MAX = 255

#: the prefix of every AUFS marker, and of the markers that are AUFS's own metadata (not whiteouts)
AUFS_PREFIX = b".wh."
AUFS_META_PREFIX = b".wh..wh."
#: the marker making its directory opaque
AUFS_OPAQUE = b".wh..wh..opq"

#: what a failed lookup of a marker's parent may say when it is simply not there
_ABSENT = (errno.ENOENT, errno.ENOTDIR)


def is_aufs_marker(name: bytes) -> bool:
    """Whether ``name`` is an AUFS marker (never an entry, in a layer whose markers are read)."""
    return name.startswith(AUFS_PREFIX)


def aufs_hidden_name(marker: bytes) -> bytes | None:
    """The name an AUFS marker deletes from the layers beneath its own (None for AUFS metadata such as
    ``.wh..wh..opq`` or ``.wh..wh.plnk``)."""
    if marker.startswith(AUFS_META_PREFIX):
        return None
    return marker[len(AUFS_PREFIX) :]


def aufs_whiteout_path(path: bytes) -> bytes:
    """The path of the marker ``.wh.NAME`` that deletes ``path`` (``parent/NAME``, or ``NAME`` in the root)."""
    head, sep, name = path.rpartition(b"/")
    return head + sep + AUFS_PREFIX + name


#: what a lookup shows of an AUFS whiteout: the stat of a kernel whiteout (character device 0/0, mode 0), as
#: whose equal it counts
AUFS_WHITEOUT_STAT = os.stat_result((stat.S_IFCHR, 0, 0, 1, 0, 0, 0, 0, 0, 0))


def has_aufs_marker(dir_fd: int, marker: bytes) -> bool:
    """Whether marker ``marker`` (a path relative to the layer ``dir_fd``, at any depth; any type, not
    followed) exists. One system call, and no exception when it does not (the common answer); an error asking
    counts as no marker, as access(2) tells no more."""
    if len(marker) <= PATH_MAX:
        return os.access(marker, os.F_OK, dir_fd=dir_fd, effective_ids=True, follow_symlinks=False)
    if len(marker.rpartition(b"/")[2]) > NAME_MAX:
        return False
    try:
        reach = At(dir_fd, marker)
    except OSError as exc:
        if exc.errno in _ABSENT:
            return False
        raise
    with reach as (fd, rel):
        return os.access(rel, os.F_OK, dir_fd=fd, effective_ids=True, follow_symlinks=False)


def has_aufs_opaque(dir_fd: int, path: bytes) -> bool:
    """Whether directory ``path`` of the layer ``dir_fd`` holds ``.wh..wh..opq`` (it is opaque)."""
    return has_aufs_marker(dir_fd, AUFS_OPAQUE if path == b"." else path + b"/" + AUFS_OPAQUE)


def with_opaque(marks: DirMarks) -> DirMarks:
    """``marks`` of a directory that is also opaque."""
    return OPAQUE if marks is NO_MARKS else DirMarks(True, marks.xwhiteouts)


def make_whiteout(name: bytes, dir_fd: int) -> None:
    """Create a kernel-format whiteout (char device 0/0, mode 0) named ``name`` in ``dir_fd``."""
    os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)


def set_opaque(path: bytes, fmt: XattrFormat) -> None:
    """Mark directory ``path`` opaque: lower directories of the same name are not merged into it."""
    os.setxattr(path, fmt.opaque, b"y", 0, follow_symlinks=False)

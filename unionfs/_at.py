"""Reaching an object at any depth below a directory descriptor.

A merged path has no length limit: a process working deep inside the mount builds a tree whose paths, counted
from the mount root, are far longer than PATH_MAX, as the kernel lets it (each call's own path is limited,
not the depth).  One system call takes at most PATH_MAX-1 bytes of path, so a longer path is reached in steps:
the directories on its way are opened (``O_PATH``) a PATH_MAX-sized piece at a time, and the call is made
relative to the last one with what remains.  A path that fits is used as it is, at no extra cost.

:class:`At` gives ``(descriptor, rest)`` for the ``*at`` calls; :class:`ProcAt` a ``/proc/self/fd/N/rest`` path
for calls that take none (xattrs, ``scandir``, ``statvfs``).
"""

from __future__ import annotations

import errno
import os
from types import TracebackType

#: the longest path one system call takes (the kernel's PATH_MAX minus the terminating NUL)
PATH_MAX = 4095
#: the longest path that goes after ``/proc/self/fd/N/`` (at most 25 bytes) in one call
PROC_ROOM = PATH_MAX - 32
_OPEN_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


def descend(dir_fd: int, path: bytes, room: int = PATH_MAX) -> tuple[int, bytes]:
    """``(fd, rest)`` with ``rest`` at most ``room`` bytes and ``fd`` a new ``O_PATH`` descriptor of the
    directory of ``path`` (under ``dir_fd``) that ``rest`` is relative to; the caller closes ``fd``. Only for a
    ``path`` longer than ``room``, relative and without empty names (a merged path)."""
    fd = dir_fd
    start = 0
    try:
        while len(path) - start > room:
            # the longest run of whole names that one call can open, then the rest from there
            cut = path.rfind(b"/", start, start + PATH_MAX + 1)
            if cut <= start:
                raise OSError(errno.ENAMETOOLONG, "File name too long")
            inner = os.open(path[start:cut], _OPEN_DIR, dir_fd=fd)
            if fd != dir_fd:
                os.close(fd)
            fd = inner
            start = cut + 1
    except BaseException:
        if fd != dir_fd:
            os.close(fd)
        raise
    return fd, path[start:]


class At:
    """``with At(dir_fd, path) as (fd, rel)``: ``rel`` relative to ``fd`` names what ``path`` names under
    ``dir_fd``, and fits in one system call; a descriptor opened on the way is closed on leaving."""

    __slots__ = ("fd", "rel", "_opened")

    def __init__(self, dir_fd: int, path: bytes, room: int = PATH_MAX) -> None:
        if len(path) <= room:
            self.fd, self.rel, self._opened = dir_fd, path, False
        else:
            self.fd, self.rel = descend(dir_fd, path, room)
            self._opened = True

    def __enter__(self) -> tuple[int, bytes]:
        return self.fd, self.rel

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._opened:
            self._opened = False
            os.close(self.fd)


class ProcAt:
    """``with ProcAt(dir_fd, path) as full``: a path naming what ``path`` names under ``dir_fd``, through
    ``/proc/self/fd``, for calls that take no directory descriptor; ``prefix``: ``/proc/self/fd/<dir_fd>/``
    when the caller keeps it made."""

    __slots__ = ("_at", "full")

    def __init__(self, dir_fd: int, path: bytes, prefix: bytes | None = None) -> None:
        if len(path) <= PROC_ROOM:  # (the common case: no descriptor to open or close)
            self._at: At | None = None
            self.full = (b"/proc/self/fd/%d/" % dir_fd if prefix is None else prefix) + path
            return
        self._at = at = At(dir_fd, path, PROC_ROOM)
        self.full = b"/proc/self/fd/%d/%s" % (at.fd, at.rel)

    def __enter__(self) -> bytes:
        return self.full

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._at is not None:
            self._at.__exit__(et, ev, tb)


__all__ = ["PATH_MAX", "PROC_ROOM", "At", "ProcAt", "descend"]

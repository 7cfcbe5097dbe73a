"""File-system helpers of the snapshotter: disk usage and robust tree removal."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable

from ._types import Usage


def disk_usage(top: str, progress: Callable[[], None] | None = None) -> Usage:
    """Bytes allocated (``st_blocks * 512``) and inodes under ``top``, ``top`` included, without following
    symbolic links; an inode reached through several hard links counts once. ``progress`` is called after
    each entry below ``top``."""
    seen: set[tuple[int, int]] = set()
    size = 0
    st = os.lstat(top)
    seen.add((st.st_dev, st.st_ino))
    size += st.st_blocks * 512
    stack = [top] if stat.S_ISDIR(st.st_mode) else []
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                est = entry.stat(follow_symlinks=False)
                if progress is not None:
                    progress()
                ident = (est.st_dev, est.st_ino)
                if ident in seen:
                    continue
                seen.add(ident)
                size += est.st_blocks * 512
                if stat.S_ISDIR(est.st_mode):
                    stack.append(entry.path)
    return Usage(size=size, inodes=len(seen))


def _ensure_removable(path: str) -> None:
    """Give the owner rwx on a directory it cannot list or change (a layer may hold ``chmod 0555`` dirs)."""
    if os.access(path, os.R_OK | os.W_OK | os.X_OK, follow_symlinks=False):
        return
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)


def remove_tree(top: str, progress: Callable[[], None] | None = None) -> None:
    """Remove ``top`` and everything below it, never following symbolic links.

    Tolerates entries vanishing meanwhile (another process may be reclaiming the same tree) and directories
    without write permission; ``progress`` is called after each removed non-directory."""
    try:
        st = os.lstat(top)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(top)
        return
    stack: list[tuple[str, bool]] = [(top, False)]
    while stack:
        path, emptied = stack.pop()
        if emptied:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(path)
            continue
        _ensure_removable(path)
        stack.append((path, True))
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, False))
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            if progress is not None:
                progress()

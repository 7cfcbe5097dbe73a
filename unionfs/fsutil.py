"""Small file-system helpers shared by the union core and the snapshot store."""

from __future__ import annotations

import os


def fsync_dir(path: bytes | str, dir_fd: int | None = None) -> None:
    """Make the entries of directory ``path`` durable (a rename into it, a name created or removed)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

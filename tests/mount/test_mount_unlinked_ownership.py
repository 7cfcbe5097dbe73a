"""Attributes changed through an unlinked open file follow the mount's ownership options, as through a name."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mounthelp import Layers, Mounts, needs_root, server_pid


def _server_fd_stat(mnt: Path, name: str) -> os.stat_result:
    """The stat of the deleted upper file the server still holds open (how the disk is reached once the
    file has no name)."""
    pid = server_pid(mnt)
    assert pid is not None, "the server's pid file is missing"
    fd_dir = Path(f"/proc/{pid}/fd")
    for link in fd_dir.iterdir():
        try:
            target = os.readlink(link)
        except OSError:
            continue
        if target.endswith(f"/upper/{name} (deleted)"):
            return os.stat(link)
    raise AssertionError(f"the server holds no descriptor of the deleted {name}")


@needs_root("reads the server's descriptors and gives files to other ids")
def test_regression_chown_through_an_unlinked_file_under_a_uid_mapping(layers: Layers, mounts: Mounts) -> None:
    """fchown of an unlinked open file under uidmapping/gidmapping stores the mapped ids on disk and shows the
    asked-for ones (regression: the server chowned its descriptor directly and stored the shown ids)."""
    mounts.mount(layers.opts("uidmapping=100000:0:65536", "gidmapping=200000:0:65536"), layers.mnt)
    fd = os.open(layers.mnt / "gone", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.unlink(layers.mnt / "gone")
        os.fchown(fd, 1000, 1001)
        os.fchmod(fd, 0o640)
        st = os.fstat(fd)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1001, 0o640)
        disk = _server_fd_stat(layers.mnt, "gone")
        assert (disk.st_uid, disk.st_gid) == (101000, 201001), "the upper layer holds the mapped ids"
    finally:
        os.close(fd)

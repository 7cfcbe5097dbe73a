"""unionfs.mountinfo: the mount table parser (no mount needed), checked on a sample and against the tests' own
independent parser (mounthelp) on this process's table."""

from __future__ import annotations

import os

import pytest
from mounthelp import mounts as oracle_mounts

from unionfs import mountinfo
from unionfs.mountinfo import MountEntry

SAMPLE = (
    b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n"
    b"36 22 0:45 /sub\\040dir /mnt/with\\040space\\011tab\\134back rw,nosuid,nodev master:7 propagate_from:2 - "
    b"fuse.unionfs un\\040ion rw,user_id=0,group_id=0,allow_other\n"
    b"37 22 0:46 / /mnt/plain ro - tmpfs tmpfs rw,size=1024k,note=a\\054b\n"
    b"38 22 0:47 / /mnt/\\342\\202\\254\\012nl rw unbindable - overlay overlay rw,lowerdir=/a\\072b\n"
)


def test_sample_is_parsed_and_unescaped() -> None:
    root, fuse, tmpfs, overlay = mountinfo.parse(SAMPLE)
    assert root == MountEntry(
        mount_id=22, parent_id=1, major=8, minor=1, root=b"/", mount_point=b"/", options=(b"rw", b"relatime"),
        optional_fields=(b"shared:1",), fstype=b"ext4", source=b"/dev/sda1",
        super_options=(b"rw", b"errors=remount-ro"))
    assert fuse.root == b"/sub dir"
    assert fuse.mount_point == b"/mnt/with space\ttab\\back"
    assert fuse.optional_fields == (b"master:7", b"propagate_from:2")
    assert (fuse.fstype, fuse.source) == (b"fuse.unionfs", b"un ion")
    assert fuse.options == (b"rw", b"nosuid", b"nodev")
    assert fuse.super_options == (b"rw", b"user_id=0", b"group_id=0", b"allow_other")
    assert tmpfs.optional_fields == () and tmpfs.options == (b"ro",)
    assert tmpfs.super_options == (b"rw", b"size=1024k", b"note=a,b")
    assert overlay.mount_point == "/mnt/€\nnl".encode()
    assert overlay.optional_fields == (b"unbindable",)
    assert overlay.super_options == (b"rw", b"lowerdir=/a:b")


def test_unescape_leaves_everything_else_alone() -> None:
    assert mountinfo.unescape(b"plain") == b"plain"
    assert mountinfo.unescape(b"a\\040b\\134\\0401") == b"a b\\ 1"
    # not an escape the kernel writes: kept as it is
    assert mountinfo.unescape(b"x\\9y\\04\\400\\") == b"x\\9y\\04\\400\\"


@pytest.mark.parametrize("line", [b"", b"22 1 8:1 / / rw shared:1 ext4 /dev/sda1 rw",
                                  b"22 1 8:1 / / rw - ext4 /dev/sda1", b"22 1 81 / / rw - ext4 /dev/sda1 rw"])
def test_malformed_lines_are_refused(line: bytes) -> None:
    with pytest.raises(ValueError, match="not a mountinfo line"):
        mountinfo.parse_line(line)


def test_this_process_table_agrees_with_the_tests_parser() -> None:
    ours = mountinfo.read()
    oracle = oracle_mounts()
    assert len(ours) == len(oracle) > 0
    for mine, theirs in zip(ours, oracle, strict=True):
        assert os.fsdecode(mine.mount_point) == theirs.target
        assert os.fsdecode(mine.fstype) == theirs.fstype
        assert os.fsdecode(mine.source) == theirs.source
        assert frozenset(map(os.fsdecode, mine.options)) == theirs.mount_opts
    assert any(m.mount_point == b"/" for m in ours)

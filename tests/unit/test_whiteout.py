"""On-disk encodings: whiteout devices, xattr escaping of the overlay namespace, directory markers."""

from __future__ import annotations

import os
import stat

import pytest
from unit_tree import OPAQUE, XW_MARK, make_whiteout

from unionfs import whiteout, xattrs
from unionfs.whiteout import TRUSTED_PREFIX, USER_PREFIX, XattrFormat

PRIVATE = (TRUSTED_PREFIX,)


def test_is_whiteout_stat_true_for_char_device_0_0(tmp_path):
    p = tmp_path / "wh"
    make_whiteout(p)
    assert whiteout.is_whiteout_stat(os.lstat(p))


def test_is_whiteout_stat_false_for_other_char_device(tmp_path):
    p = tmp_path / "null"
    os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert not whiteout.is_whiteout_stat(os.lstat(p))


def test_is_whiteout_stat_false_for_regular_file_and_block_device_0_0(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"")
    b = tmp_path / "b"
    os.mknod(b, stat.S_IFBLK | 0o600, os.makedev(0, 0))
    assert not whiteout.is_whiteout_stat(os.lstat(f))
    assert not whiteout.is_whiteout_stat(os.lstat(b))


def test_make_whiteout_creates_kernel_format(tmp_path):
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        whiteout.make_whiteout(b"gone", fd)
    finally:
        os.close(fd)
    st = os.lstat(tmp_path / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert stat.S_IMODE(st.st_mode) == 0


@pytest.mark.parametrize(
    "name",
    [b"user.foo", b"security.selinux", b"trusted.other", b"trusted.overlay.opaque", b"trusted.overlay.x.y"],
)
def test_xattr_escaping_round_trip(name):
    disk = whiteout.xattr_to_disk(name, PRIVATE)
    assert whiteout.xattr_from_disk(disk, PRIVATE) == name


def test_xattr_to_disk_escapes_overlay_namespace_only():
    assert whiteout.xattr_to_disk(b"trusted.overlay.opaque", PRIVATE) == b"trusted.overlay.overlay.opaque"
    assert whiteout.xattr_to_disk(b"user.overlay.opaque", PRIVATE) == b"user.overlay.opaque"
    assert whiteout.xattr_to_disk(b"trusted.foo", PRIVATE) == b"trusted.foo"


def test_xattr_from_disk_hides_private_names():
    assert whiteout.xattr_from_disk(b"trusted.overlay.opaque", PRIVATE) is None
    assert whiteout.xattr_from_disk(b"trusted.overlay.whiteout", PRIVATE) is None
    assert whiteout.xattr_from_disk(b"trusted.overlay.overlay.opaque", PRIVATE) == b"trusted.overlay.opaque"
    assert whiteout.xattr_from_disk(b"user.foo", PRIVATE) == b"user.foo"


def test_xattr_escaping_with_both_prefixes():
    both = (USER_PREFIX, TRUSTED_PREFIX)
    assert whiteout.xattr_to_disk(b"user.overlay.a", both) == b"user.overlay.overlay.a"
    assert whiteout.xattr_from_disk(b"user.overlay.opaque", both) is None
    assert whiteout.xattr_from_disk(b"trusted.overlay.opaque", both) is None


def test_xattr_format_names():
    assert XattrFormat.TRUSTED.opaque == b"trusted.overlay.opaque"
    assert XattrFormat.TRUSTED.whiteout == b"trusted.overlay.whiteout"
    assert XattrFormat.USER.opaque == b"user.overlay.opaque"


def test_read_dir_marks_opaque_y(tmp_path):
    os.setxattr(tmp_path, OPAQUE, b"y")
    marks = whiteout.read_dir_marks(os.fsencode(tmp_path), (XattrFormat.TRUSTED,))
    assert marks.opaque and not marks.xwhiteouts


def test_read_dir_marks_x_means_xwhiteouts_not_opaque(tmp_path):
    os.setxattr(tmp_path, OPAQUE, b"x")
    marks = whiteout.read_dir_marks(os.fsencode(tmp_path), (XattrFormat.TRUSTED,))
    assert marks.xwhiteouts and not marks.opaque


def test_read_dir_marks_plain_and_other_values(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    odd = tmp_path / "odd"
    odd.mkdir()
    os.setxattr(odd, OPAQUE, b"n")
    for d in (plain, odd):
        marks = whiteout.read_dir_marks(os.fsencode(d), (XattrFormat.TRUSTED,))
        assert not marks.opaque and not marks.xwhiteouts


def test_read_dir_marks_ignores_unhonoured_format(tmp_path):
    os.setxattr(tmp_path, b"user.overlay.opaque", b"y")
    assert not whiteout.read_dir_marks(os.fsencode(tmp_path), (XattrFormat.TRUSTED,)).opaque
    assert whiteout.read_dir_marks(os.fsencode(tmp_path), (XattrFormat.USER, XattrFormat.TRUSTED)).opaque


def test_is_xattr_whiteout_requires_empty_regular_file_with_mark(tmp_path):
    fmts = (XattrFormat.TRUSTED,)
    xw = tmp_path / "xw"
    xw.write_bytes(b"")
    os.setxattr(xw, XW_MARK, b"")
    full = tmp_path / "full"
    full.write_bytes(b"data")
    os.setxattr(full, XW_MARK, b"")
    bare = tmp_path / "bare"
    bare.write_bytes(b"")
    assert whiteout.is_xattr_whiteout(os.fsencode(xw), os.lstat(xw), fmts)
    assert not whiteout.is_xattr_whiteout(os.fsencode(full), os.lstat(full), fmts)
    assert not whiteout.is_xattr_whiteout(os.fsencode(bare), os.lstat(bare), fmts)


def test_set_opaque(tmp_path):
    whiteout.set_opaque(os.fsencode(tmp_path), XattrFormat.TRUSTED)
    assert os.getxattr(tmp_path, OPAQUE) == b"y"


def test_getxattr_absent_is_none(tmp_path):
    assert xattrs.get(os.fsencode(tmp_path), b"user.nothing") is None


def test_probe_trusted_as_root(tmp_path):
    assert xattrs.can_store_trusted(os.fsencode(tmp_path)) is True
    assert os.listdir(tmp_path) == []


def test_xattr_helpers_accept_descriptors(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"")
    fd = os.open(p, os.O_RDWR)
    try:
        xattrs.write(fd, b"user.k", b"v")
        assert xattrs.get(fd, b"user.k") == b"v"
        assert xattrs.get(fd, b"user.none") is None
        assert xattrs.names(fd) == [b"user.k"]
        xattrs.remove(fd, b"user.k")
        assert xattrs.names(fd) == []
    finally:
        os.close(fd)


def test_xattr_helpers_do_not_follow_symlinks(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"")
    os.setxattr(target, b"user.k", b"v")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert xattrs.get(os.fsencode(link), b"user.k") is None
    assert xattrs.names(os.fsencode(link)) == []

"""Ownership policy: id mappings, squashing, and owners/modes stored in the override xattr."""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

import pytest
from unit_tree import File

from unionfs.layers import Entry
from unionfs.options import OptionError, parse
from unionfs.ownership import (
    OVERFLOW_ID,
    OVERRIDE_XATTR,
    IdMapError,
    Ownership,
    decode_override,
    encode_override,
    parse_idmap,
)
from unionfs.union import AttrChanges, Union


def test_idmap_maps_ranges_both_ways() -> None:
    m = parse_idmap("0:1000:1:1:100000:65536", "uidmapping")
    assert m.shown(0) == 1000
    assert m.shown(1) == 100000
    assert m.shown(42) == 100041
    assert m.stored(1000) == 0
    assert m.stored(100041) == 42


def test_regression_uidmapping_shows_the_stored_id_as_the_second_one_as_fuse_overlayfs() -> None:
    """``uidmapping=A:B:N`` shows a file stored as A as B, as fuse-overlayfs does (regression: unionfs showed
    stored B as A, so ``uidmapping=0:100000:65536`` showed stored 0 as 65534 and stored 100005 as 5)."""
    own = parse(["lowerdir=/a,uidmapping=0:100000:65536,gidmapping=0:100000:65536"]).ownership
    assert own.show(0, 0) == (100000, 100000), "stored 0 is shown as 100000"
    assert own.show(100005, 5) == (OVERFLOW_ID, 100005), "stored 100005 is outside the range"
    assert own.to_disk(100007, 100000) == (7, 0), "a chown to shown 100007 stores 7"


def test_idmap_takes_the_leading_colon_and_triples_of_containers_storage() -> None:
    """containers/storage writes ``:STORED:SHOWN:COUNT...``; --userns=keep-id gives several triples."""
    m = parse(["lowerdir=/a,uidmapping=:0:1:1003:1003:0:1:1004:1004:64533"]).ownership.uidmap
    assert m is not None
    assert (m.shown(0), m.shown(1003), m.shown(1002), m.shown(1004), m.shown(65536)) == (1, 0, 1003, 1004, 65536)
    assert m.stored(0) == 1003 and m.stored(1) == 0


def test_idmap_unmapped_ids() -> None:
    m = parse_idmap("0:1000:1", "uidmapping")
    assert m.shown(5) == OVERFLOW_ID
    with pytest.raises(OSError) as exc:
        m.stored(7)
    assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize("text", ["", ":", "0:1000", "0:a:1", "0:1000:0", "-1:5:1", "::0:1:1"])
def test_idmap_rejects_malformed(text: str) -> None:
    with pytest.raises(IdMapError):
        parse_idmap(text, "uidmapping")


def test_options_build_the_policy() -> None:
    spec = parse(["lowerdir=/a,uidmapping=0:1000:1,gidmapping=0:1000:1,squash_to_gid=5,xattr_permissions"])
    own = spec.ownership
    assert own.uidmap is not None and own.uidmap.shown(0) == 1000
    assert own.squash_gid == 5 and own.squash_uid is None
    assert own.xattr_permissions
    assert not own.identity
    assert parse(["lowerdir=/a"]).ownership.identity
    assert parse(["lowerdir=/a,squash_to_root"]).ownership.show(1234, 99) == (0, 0)


@pytest.mark.parametrize("opt", ["uidmapping=1:2", "squash_to_uid=x", "xattr_permissions=yes"])
def test_options_reject_bad_ownership_values(opt: str) -> None:
    with pytest.raises(OptionError):
        parse([f"lowerdir=/a,{opt}"])


def test_show_and_to_disk_round_trip() -> None:
    own = Ownership(uidmap=parse_idmap("0:1000:10", "u"), gidmap=parse_idmap("0:2000:10", "g"))
    assert own.show(3, 4) == (1003, 2004)
    assert own.to_disk(1003, 2004) == (3, 4)
    assert own.to_disk(-1, 2004) == (-1, 4)


def test_override_encoding() -> None:
    assert encode_override(0, 5, stat.S_IFREG | 0o4755) == b"0:5:04755"
    assert decode_override(b"0:5:04755") == (0, 5, 0o4755)
    assert decode_override(b"garbage") is None


def _union(env: Any, ownership: Ownership) -> Union:
    return Union(env.stack, env.work, ownership=ownership)


def test_xattr_permissions_chown_and_chmod_are_stored_not_applied(make_env: Any) -> None:
    env = make_env(lowers=[{"f": File(b"x", mode=0o644, uid=0, gid=0)}, {}])
    union = _union(env, Ownership(xattr_permissions=True))
    entry = union.chown(env.entry("f"), 1234, 4321)
    entry = union.chmod(entry, 0o600)
    st = os.lstat(env.upper / "f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644), "the file itself is unchanged"
    assert os.getxattr(env.upper / "f", OVERRIDE_XATTR) == b"1234:4321:0600"
    assert union.shown(entry, st) == (1234, 4321, stat.S_IFREG | 0o600, 1)
    assert OVERRIDE_XATTR not in union.listxattr(entry), "the stored owner is private"
    with pytest.raises(OSError) as exc:
        union.setxattr(entry, OVERRIDE_XATTR, b"0:0:0777")
    assert exc.value.errno == errno.EPERM


def test_rootless_copy_up_records_the_owner_it_cannot_keep(make_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_env(lowers=[{"f": File(b"data", mode=0o640, uid=0, gid=0)}, {}])
    union = _union(env, Ownership(xattr_permissions=True))

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "chown", refuse)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    entry = union.copy_up(env.entry("f"))
    assert os.getxattr(env.upper / "f", OVERRIDE_XATTR) == b"0:0:0640"
    assert union.shown(entry, os.lstat(env.upper / "f"))[:2] == (0, 0)


def test_identity_policy_shows_disk_owners(make_env: Any) -> None:
    env = make_env(lowers=[{"f": File(b"x", uid=77, gid=88)}, {}])
    union = _union(env, Ownership())
    entry = env.entry("f")
    assert union.shown(entry, entry.st)[:2] == (77, 88)


def _unlinked_upper_file(env: Any) -> int:
    """An upper file open for writing with its only name removed (an unlinked open file)."""
    fd = os.open(env.upper / "gone", os.O_CREAT | os.O_RDWR, 0o600)
    os.unlink(env.upper / "gone")
    return fd


def test_regression_setattr_through_an_unlinked_file_under_a_uid_mapping(make_env: Any) -> None:
    """chown through an unlinked open file stores the mapped ids on disk and shows the asked-for ones, as
    through a name (regression: it stored the shown ids, skipping the mapping)."""
    env = make_env(upper={}, lowers=[{}])
    union = _union(env, Ownership(uidmap=parse_idmap("100000:0:65536", "uidmapping"),
                                  gidmap=parse_idmap("200000:0:65536", "gidmapping")))
    fd = _unlinked_upper_file(env)
    try:
        st = union.setattr_open(fd, AttrChanges(uid=1000, gid=1001, mode=0o640, mtime_ns=2 * 10**9))
        assert (st.st_uid, st.st_gid) == (101000, 201001), "the disk holds the mapped ids"
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == 2 * 10**9
        assert union.shown_open(fd, st)[:3] == (1000, 1001, stat.S_IFREG | 0o640)
        # the same change through a name gives the same result
        entry = union.setattr(_create(union, b"named"), AttrChanges(uid=1000, gid=1001))
        named = os.lstat(env.upper / "named")
        assert (named.st_uid, named.st_gid) == (101000, 201001)
        assert union.shown(entry, named)[:2] == (1000, 1001)
    finally:
        os.close(fd)


def test_regression_setattr_through_an_unlinked_file_with_xattr_permissions(make_env: Any) -> None:
    """With xattr_permissions, chown and chmod through an unlinked open file are stored in the override xattr
    (regression: they were applied to the file itself)."""
    env = make_env(upper={}, lowers=[{}])
    union = _union(env, Ownership(xattr_permissions=True))
    fd = _unlinked_upper_file(env)
    try:
        st = union.setattr_open(fd, AttrChanges(uid=1234, gid=4321, mode=0o604))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600), "the file itself is unchanged"
        assert os.getxattr(fd, OVERRIDE_XATTR) == b"1234:4321:0604"
        assert union.shown_open(fd, st)[:3] == (1234, 4321, stat.S_IFREG | 0o604)
        union.setattr_open(fd, AttrChanges(gid=7))
        assert os.getxattr(fd, OVERRIDE_XATTR) == b"1234:7:0604", "-1 keeps the stored owner"
    finally:
        os.close(fd)


def _create(union: Union, name: bytes) -> Entry:
    fd, entry = union.create(union.root(), name, stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    os.close(fd)
    return entry


def test_regression_objects_created_under_a_mapping_store_the_mapped_owner(make_env: Any) -> None:
    """A file created by shown uid/gid 100003 under uidmapping=0:100000:65536 is stored as 3 (regression: the
    creator's ids were stored as they are, unmapped); a creator no range shows is stored as the overflow id,
    as fuse-overlayfs does, and a chown to an id no range shows fails with EINVAL."""
    env = make_env(upper={}, lowers=[{}])
    union = _union(env, Ownership(uidmap=parse_idmap("0:100000:65536", "uidmapping"),
                                  gidmap=parse_idmap("0:100000:65536", "gidmapping")))
    fd, entry = union.create(union.root(), b"new", stat.S_IFREG | 0o644, os.O_WRONLY, 100003, 100004)
    os.close(fd)
    disk = os.lstat(env.upper / "new")
    assert (disk.st_uid, disk.st_gid) == (3, 4)
    assert union.shown(entry, disk)[:2] == (100003, 100004)
    union.mkdir(union.root(), b"by-root", stat.S_IFDIR | 0o755, 0, 0)
    disk = os.lstat(env.upper / "by-root")
    assert (disk.st_uid, disk.st_gid) == (OVERFLOW_ID, OVERFLOW_ID)
    with pytest.raises(OSError) as exc:
        union.chown(entry, 5, -1)
    assert exc.value.errno == errno.EINVAL


def test_regression_xattr_permissions_under_a_mapping_store_ids_of_the_disk(make_env: Any) -> None:
    """With xattr_permissions and uidmapping/gidmapping, the override xattr holds ids of the disk, as the file's
    own owner does (regression: chmod stored the shown owner, which then showed mapped twice, as 65534)."""
    env = make_env(lowers=[{"f": File(b"x", mode=0o644, uid=0, gid=0)}, {}])
    union = _union(env, Ownership(uidmap=parse_idmap("0:100000:65536", "uidmapping"),
                                  gidmap=parse_idmap("0:100000:65536", "gidmapping"), xattr_permissions=True))
    entry = union.chmod(env.entry("f"), 0o600)
    assert os.getxattr(env.upper / "f", OVERRIDE_XATTR) == b"0:0:0600"
    assert union.shown(entry, os.lstat(env.upper / "f"))[:3] == (100000, 100000, stat.S_IFREG | 0o600)
    entry = union.chown(entry, 100005, -1)
    assert os.getxattr(env.upper / "f", OVERRIDE_XATTR) == b"5:0:0600"
    assert union.shown(entry, os.lstat(env.upper / "f"))[:2] == (100005, 100000)
    with pytest.raises(OSError) as exc:
        union.chown(entry, 7, -1)
    assert exc.value.errno == errno.EINVAL


def test_regression_new_objects_record_their_owner_in_the_override_xattr_with_xattr_permissions(
        make_env: Any) -> None:
    """With ``xattr_permissions``, a new object's owner goes to ``user.containers.override_stat`` as a chown of
    the merged view does, and the object on disk stays the server's (regression: it was chown-ed on disk,
    which an unprivileged server may not do: creating files in a rootless image mount failed with EPERM)."""
    from unionfs.ownership import OVERRIDE_XATTR
    from unionfs.union import Union

    env = make_env(lowers=[{}])
    own = parse(["lowerdir=/a,xattr_permissions=2,uidmapping=0:1000:1:1:100000:65536,"
                 "gidmapping=0:1000:1:1:100000:65536"]).ownership
    union = Union(env.stack, env.work, own)
    root = env.entry("")
    union.mkdir(root, b"d", 0o40750, 100005, 100002)
    fd, _ = union.create(root, b"f", 0o100640, os.O_WRONLY, 100007, 100003)
    os.close(fd)
    for name, stored in (("d", b"6:3:0750"), ("f", b"8:4:0640")):
        st = os.lstat(env.upper / name)
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
        assert os.getxattr(env.upper / name, OVERRIDE_XATTR.decode()) == stored


def test_regression_fifos_and_sockets_made_with_xattr_permissions_are_chowned_not_recorded(
        make_env: Any) -> None:
    """A FIFO or socket takes no ``user.*`` xattr: with ``xattr_permissions`` its owner is given by a chown (when
    the server may), as before (regression: recording it in the override xattr failed with EPERM and left the
    object behind)."""
    from unionfs.union import Union

    env = make_env(lowers=[{}])
    own = parse(["lowerdir=/a,xattr_permissions=2,uidmapping=0:1000:1:1:100000:65536,"
                 "gidmapping=0:1000:1:1:100000:65536"]).ownership
    union = Union(env.stack, env.work, own)
    root = env.entry("")
    union.mknod(root, b"p", stat.S_IFIFO | 0o640, 0, 100005, 100002)
    union.mknod(root, b"s", stat.S_IFSOCK | 0o755, 0, 100005, 100002)
    for name in ("p", "s"):
        st = os.lstat(env.upper / name)
        assert (st.st_uid, st.st_gid) == (6, 3)

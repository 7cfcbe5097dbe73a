"""Owners outside the user namespace: how they are told, the permission rules without capabilities, and no
copy-up of them (the rootless kernel pass compares all of it with kernel overlayfs in a real namespace)."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from unit_tree import File

from unionfs.copyup import CopyUp
from unionfs.userns import (
    R_OK,
    W_OK,
    X_OK,
    Caller,
    UserNamespace,
    permitted,
    require,
    require_link_source,
    require_owner,
    require_sticky,
    require_times,
)

FULL = ((0, 0, 4294967295),)
#: a rootless namespace: its root is host uid 1000, ids 1-65536 are subordinate ids (65534 mapped)
ROOTLESS = ((0, 1000, 1), (1, 100000, 65536))
#: a namespace that maps only its root (``unshare -r``): 65534 is not mapped
ROOT_ONLY = ((0, 1000, 1),)


def fake_st(mode: int, uid: int = 65534, gid: int = 65534) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, gid, 0, 0, 0, 0))


NOBODY = (True, True)
ROOT = Caller(0, 0, 0, groups=[0])


def test_initial_namespace_maps_every_owner() -> None:
    ns = UserNamespace(FULL, FULL, fowner=True)
    assert ns.initial
    assert ns.unmapped(-1, b"x", fake_st(stat.S_IFREG | 0o644)) is None


def test_overflow_id_not_mapped_means_unmapped_owner() -> None:
    ns = UserNamespace(ROOT_ONLY, ROOT_ONLY)
    assert ns.unmapped(-1, b"x", fake_st(stat.S_IFREG | 0o644)) == (True, True)
    assert ns.unmapped(-1, b"x", fake_st(stat.S_IFREG | 0o644, uid=0)) == (False, True)
    assert ns.unmapped(-1, b"x", fake_st(stat.S_IFREG | 0o644, uid=0, gid=0)) is None


def test_mapped_overflow_id_without_cap_fowner_counts_as_mapped() -> None:
    """Without CAP_FOWNER the probe cannot tell the namespace's own 65534 from an unmapped owner."""
    ns = UserNamespace(ROOTLESS, ROOTLESS, fowner=False)
    assert ns.unmapped(-1, b"x", fake_st(stat.S_IFREG | 0o644)) is None


def test_probe_finds_a_mapped_owner(tmp_path: Any) -> None:
    """Here (the initial namespace, as root or as the file's owner) O_NOATIME opens: the owner is mapped."""
    (tmp_path / "f").write_text("x")
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        st = os.lstat(tmp_path / "f")
        ns = UserNamespace(ROOTLESS, ROOTLESS, overflow_uid=st.st_uid, overflow_gid=st.st_gid, fowner=True)
        assert ns.unmapped(fd, b"f", st) is None
    finally:
        os.close(fd)


def test_unprobeable_types_with_the_overflow_owner_count_as_unmapped() -> None:
    """Symlinks, devices and sockets cannot be opened with O_NOATIME without side effects: with the overflow
    id as owner they are taken for unmapped (no copy-up with another owner); -1 as the directory: an fd any
    probe would fail on, so nothing is opened."""
    ns = UserNamespace(ROOTLESS, ROOTLESS, fowner=True)
    for kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFLNK, stat.S_IFSOCK):
        assert ns.unmapped(-1, b"no-such-file", fake_st(kind | 0o666)) == (True, True)
        assert ns.unmapped(-1, b"no-such-file", fake_st(kind | 0o666, uid=0)) == (False, True)
    assert ns.unmapped(-1, b"no-such-file", fake_st(stat.S_IFIFO | 0o666)) is None  # probed (and it failed)


@pytest.mark.parametrize(("mode", "mask", "ok"), [
    (0o644, R_OK, True), (0o644, W_OK, False), (0o600, R_OK, False), (0o755, X_OK, True),
    (0o750, X_OK, False), (0o777, W_OK | X_OK, True), (0o000, R_OK, False),
])
def test_no_capability_applies_to_an_unmapped_owner(mode: int, mask: int, ok: bool) -> None:
    st = fake_st(stat.S_IFREG | mode)
    assert permitted(ROOT, st, NOBODY, mask) is ok
    if not ok:
        with pytest.raises(OSError) as exc:
            require(ROOT, st, NOBODY, mask)
        assert exc.value.errno == errno.EACCES


def test_group_bits_apply_when_the_group_is_mapped_and_the_caller_in_it() -> None:
    st = fake_st(stat.S_IFREG | 0o060, gid=50)
    assert permitted(Caller(7, 7, 0, groups=[7, 50]), st, (True, False), R_OK | W_OK)
    assert not permitted(Caller(7, 7, 0, groups=[7]), st, (True, False), R_OK)
    assert not permitted(Caller(7, 50, 0, groups=[50]), fake_st(stat.S_IFREG | 0o060), NOBODY, R_OK)


def test_caller_groups_come_from_the_process() -> None:
    caller = Caller(os.getuid(), os.getgid(), os.getpid())
    assert set(os.getgroups()) | {os.getgid()} == caller.groups


def test_only_a_mapped_owner_owns() -> None:
    with pytest.raises(OSError) as exc:
        require_owner(Caller(65534, 65534, 0, groups=[]), fake_st(stat.S_IFREG | 0o644), NOBODY)
    assert exc.value.errno == errno.EPERM
    require_owner(Caller(65534, 0, 0, groups=[]), fake_st(stat.S_IFREG | 0o644), (False, True))


def test_times_now_need_write_access_other_times_ownership() -> None:
    now = time.time_ns()
    writable = fake_st(stat.S_IFREG | 0o666)
    require_times(ROOT, writable, NOBODY, (now, now))
    with pytest.raises(OSError) as exc:
        require_times(ROOT, writable, NOBODY, (now - 10**12, now - 10**12))
    assert exc.value.errno == errno.EPERM
    with pytest.raises(OSError) as exc:
        require_times(ROOT, fake_st(stat.S_IFREG | 0o644), NOBODY, (now, None))
    assert exc.value.errno == errno.EACCES


@pytest.mark.skipif(Path("/proc/sys/fs/protected_hardlinks").read_text().strip() != "1",
                    reason="fs.protected_hardlinks is off on this machine")
@pytest.mark.parametrize(("mode", "ok"), [(0o644, False), (0o666, True), (0o4666, False), (0o2676, False),
                                          (0o2666, True)])
def test_protected_hardlinks(mode: int, ok: bool) -> None:
    st = fake_st(stat.S_IFREG | mode)
    if ok:
        require_link_source(ROOT, st, NOBODY)
    else:
        with pytest.raises(OSError) as exc:
            require_link_source(ROOT, st, NOBODY)
        assert exc.value.errno == errno.EPERM


def test_sticky_directory_needs_the_object_or_the_directory() -> None:
    victim = fake_st(stat.S_IFREG | 0o666)
    with pytest.raises(OSError) as exc:
        require_sticky(ROOT, fake_st(stat.S_IFDIR | 0o1777), NOBODY, victim, NOBODY)
    assert exc.value.errno == errno.EPERM
    require_sticky(ROOT, fake_st(stat.S_IFDIR | 0o777), NOBODY, victim, NOBODY)  # not sticky
    require_sticky(ROOT, fake_st(stat.S_IFDIR | 0o1777, uid=0, gid=0), None, victim, NOBODY)  # caller's directory


def test_regression_no_copy_up_of_an_object_whose_owner_is_unmapped(make_env: Any) -> None:
    """The copy could not be given its owner: EOVERFLOW, as the kernel, and nothing half-made is left; the
    parents it needed are copied up first (as on the kernel)."""
    env = make_env(lowers=[{"d": {"f": File("x", uid=4242)}}, {}])
    copier = CopyUp(env.stack, env.work, unmapped=lambda entry: entry.st.st_uid == 4242)
    with pytest.raises(OSError) as exc:
        copier.copy_up(env.entry("d/f"))
    assert exc.value.errno == errno.EOVERFLOW
    assert (env.upper / "d").is_dir()
    assert not (env.upper / "d" / "f").exists()
    assert env.work_entries() == []

"""Copy-up: data (holes kept), mode, owner, ns times, xattrs, symlinks, specials, parents; atomic via the workdir."""

from __future__ import annotations

import errno
import os
import stat
import struct

import pytest
from unit_tree import WHITEOUT, Dir, Fifo, File, Symlink, is_whiteout

from unionfs import copyup
from unionfs.copyup import Workdir, copy_data, copy_xattrs, move_to_work, replace_with_whiteout
from unionfs.whiteout import TRUSTED_PREFIX

T_ATIME = 1_111_111_111_123_456_789
T_MTIME = 1_222_222_222_987_654_321


def upper_st(env, path):
    return os.lstat(env.upper / path)


def test_copy_up_data(make_env):
    env = make_env(lowers=[{"f": "hello lower"}, {}])
    new = env.union.copy_up(env.entry("f"))
    assert new.layer == 0
    assert (env.upper / "f").read_bytes() == b"hello lower"
    assert (env.lowers[0] / "f").read_bytes() == b"hello lower"
    assert env.entry("f").layer == 0


def test_copy_up_from_bottom_layer(make_env):
    env = make_env(lowers=[{}, {"f": "from l2"}])
    env.union.copy_up(env.entry("f"))
    assert (env.upper / "f").read_bytes() == b"from l2"


@pytest.mark.parametrize("mode", [0o4755, 0o2750, 0o1777, 0o600, 0o000])
def test_copy_up_mode_including_special_bits(make_env, mode):
    env = make_env(lowers=[{"f": File("x", mode=mode)}, {}])
    env.union.copy_up(env.entry("f"))
    assert stat.S_IMODE(upper_st(env, "f").st_mode) == mode


def test_copy_up_owner(make_env):
    env = make_env(lowers=[{"f": File("x", uid=1234, gid=4321, mode=0o4755)}, {}])
    env.union.copy_up(env.entry("f"))
    st = upper_st(env, "f")
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    assert stat.S_IMODE(st.st_mode) == 0o4755  # the chown did not strip set-user-ID


def test_copy_up_times_ns(make_env):
    env = make_env(lowers=[{"f": File("x", times_ns=(T_ATIME, T_MTIME))}, {}])
    env.union.copy_up(env.entry("f"))
    st = upper_st(env, "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (T_ATIME, T_MTIME)


def test_copy_up_xattrs_user_and_trusted_but_not_private(make_env):
    xattrs = {
        b"user.color": b"blue",
        b"trusted.note": b"t",
        b"trusted.overlay.origin": b"private",
        b"trusted.overlay.overlay.escaped": b"visible",
    }
    env = make_env(lowers=[{"f": File("x", xattrs=xattrs)}, {}])
    env.union.copy_up(env.entry("f"))
    p = env.upper / "f"
    names = set(os.listxattr(p))
    assert os.getxattr(p, b"user.color") == b"blue"
    assert os.getxattr(p, b"trusted.note") == b"t"
    assert os.getxattr(p, b"trusted.overlay.overlay.escaped") == b"visible"
    assert "trusted.overlay.origin" not in names


def _cap_blob() -> bytes:
    # VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE, permitted = CAP_NET_RAW
    return struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def test_regression_copy_up_keeps_security_capability(make_env):
    env = make_env(lowers=[{"ping": File("elf", mode=0o755)}, {}])
    os.setxattr(env.lowers[0] / "ping", b"security.capability", _cap_blob())
    env.union.copy_up(env.entry("ping"))
    assert os.getxattr(env.upper / "ping", b"security.capability") == _cap_blob()


def test_copy_up_symlink_target_owner_and_times(make_env):
    env = make_env(lowers=[{"ln": Symlink("../some/where")}, {}])
    p = env.lowers[0] / "ln"
    os.chown(p, 1234, 1234, follow_symlinks=False)
    os.utime(p, ns=(T_ATIME, T_MTIME), follow_symlinks=False)
    env.union.copy_up(env.entry("ln"))
    st = upper_st(env, "ln")
    assert stat.S_ISLNK(st.st_mode)
    assert os.readlink(env.upper / "ln") == "../some/where"
    assert (st.st_uid, st.st_mtime_ns) == (1234, T_MTIME)


def test_copy_up_fifo(make_env):
    env = make_env(lowers=[{"fifo": Fifo(mode=0o620)}, {}])
    env.union.copy_up(env.entry("fifo"))
    st = upper_st(env, "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620


def test_copy_up_char_device(make_env):
    env = make_env(lowers=[{}, {}])
    os.mknod(env.lowers[0] / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    env.union.copy_up(env.entry("null"))
    st = upper_st(env, "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666


def _make_sparse(path, size, data_at):
    with open(path, "wb") as f:
        f.truncate(size)
        for off in data_at:
            f.seek(off)
            f.write(b"D" * 4096)


def test_copy_up_sparse_file_keeps_holes(make_env):
    env = make_env(lowers=[{}, {}])
    src = env.lowers[0] / "sparse"
    size = 64 << 20
    _make_sparse(src, size, [0, 32 << 20])
    lower = os.lstat(src)
    assert lower.st_blocks * 512 < 1 << 20, "the test file system must support holes"
    env.union.copy_up(env.entry("sparse"))
    up = upper_st(env, "sparse")
    assert up.st_size == size
    assert up.st_blocks <= lower.st_blocks
    with open(env.upper / "sparse", "rb") as f:
        assert f.read(4096) == b"D" * 4096
        f.seek(32 << 20)
        assert f.read(4096) == b"D" * 4096
        f.seek(16 << 20)
        assert f.read(4096) == bytes(4096)


def test_copy_up_file_ending_in_hole(make_env):
    env = make_env(lowers=[{}, {}])
    src = env.lowers[0] / "tailhole"
    _make_sparse(src, 8 << 20, [4096])
    env.union.copy_up(env.entry("tailhole"))
    assert upper_st(env, "tailhole").st_size == 8 << 20
    assert (env.upper / "tailhole").read_bytes() == src.read_bytes()


def test_copy_up_parents_first_with_metadata(make_env):
    env = make_env(lowers=[{"a": Dir({"b": Dir({"f": "x"}, mode=0o750, uid=77, gid=88,
                                               xattrs={b"user.dir": b"b"})}, mode=0o711)}, {}])
    new = env.union.copy_up(env.entry("a/b/f"))
    assert new.layer == 0
    a = upper_st(env, "a")
    b = upper_st(env, "a/b")
    assert stat.S_ISDIR(a.st_mode) and stat.S_IMODE(a.st_mode) == 0o711
    assert stat.S_IMODE(b.st_mode) == 0o750 and (b.st_uid, b.st_gid) == (77, 88)
    assert os.getxattr(env.upper / "a" / "b", b"user.dir") == b"b"
    assert env.entry("a/b").dirs == (0, 1)


def test_regression_copy_up_parent_keeps_its_times(make_env):
    times = (T_ATIME, T_MTIME)
    env = make_env(lowers=[{"a": Dir({"b": Dir({"f": "x"}, times_ns=times)}, times_ns=times)}, {}])
    env.union.copy_up(env.entry("a/b/f"))
    for d in ("a", "a/b"):
        st = upper_st(env, d)
        assert (st.st_atime_ns, st.st_mtime_ns) == times, d


def test_copy_up_directory_copies_only_the_directory(make_env):
    env = make_env(lowers=[{"d": Dir({"child": "c"}, mode=0o701)}, {"d": {}}])
    new = env.union.copy_up(env.entry("d"))
    assert new.layer == 0 and new.dirs == (0, 1, 2)
    assert os.listdir(env.upper / "d") == []
    assert stat.S_IMODE(upper_st(env, "d").st_mode) == 0o701
    assert env.read("d/child") == b"c"


def test_copy_up_leaves_workdir_empty(make_env):
    env = make_env(lowers=[{"a": {"b": {"f": "x", "ln": Symlink("f")}}}, {}])
    env.union.copy_up(env.entry("a/b/f"))
    env.union.copy_up(env.entry("a/b/ln"))
    assert env.work_entries() == []


def test_copy_up_of_upper_object_is_noop(make_env):
    env = make_env(upper={"f": "u"}, lowers=[{"f": "l"}, {}])
    e = env.entry("f")
    assert env.union.copy_up(e) is e
    assert (env.upper / "f").read_bytes() == b"u"


def test_copy_up_with_stale_entry_returns_existing_copy(make_env):
    env = make_env(lowers=[{"f": "lower"}, {}])
    stale = env.entry("f")
    env.union.copy_up(stale)
    (env.upper / "f").write_bytes(b"changed")
    again = env.union.copy_up(stale)
    assert again.layer == 0
    assert (env.upper / "f").read_bytes() == b"changed"


def test_copy_up_metadata_only(make_env):
    env = make_env(lowers=[{"f": File("lots of data", mode=0o640, uid=5)}, {}])
    env.union.copy_up(env.entry("f"), data=False)
    st = upper_st(env, "f")
    assert st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 5


def test_copy_up_reports_on_copied(make_env):
    env = make_env(lowers=[{"d": {"f": "x"}}, {}])
    assert env.union.take_copied() == []
    env.union.copy_up(env.entry("d/f"))
    seen = [(c.old.path, c.old.layer, c.new.layer) for c in env.union.take_copied()]
    assert seen == [(b"d", 1, 0), (b"d/f", 1, 0)]
    assert env.union.take_copied() == []


def test_copy_up_of_a_lower_hard_link_says_it_breaks_it(make_env):
    env = make_env(lowers=[{"f": "x", "d": {}}, {}])
    os.link(env.lowers[0] / "f", env.lowers[0] / "g")
    env.union.copy_up(env.entry("d"))
    env.union.copy_up(env.entry("f"))
    breaks = [(c.new.path, c.breaks_hard_link) for c in env.union.take_copied()]
    assert breaks == [(b"d", False), (b"f", True)]


def test_copy_up_failure_in_fsync_leaves_nothing(make_env, monkeypatch):
    env = make_env(lowers=[{"f": "data"}, {}])

    def boom(fd):
        raise OSError(errno.EIO, "simulated fsync failure")

    monkeypatch.setattr(copyup.os, "fsync", boom)
    with pytest.raises(OSError) as ei:
        env.union.copy_up(env.entry("f"))
    assert ei.value.errno == errno.EIO
    assert os.listdir(env.upper) == []
    assert env.work_entries() == []
    assert env.entry("f").layer == 1


def test_copy_up_failure_in_copy_data_leaves_nothing(make_env, monkeypatch):
    env = make_env(lowers=[{"d": {"f": "data"}}, {}])

    def boom(src, dst, size):
        os.write(dst, b"partial")
        raise OSError(errno.ENOSPC, "simulated full disk")

    monkeypatch.setattr(copyup, "copy_data", boom)
    with pytest.raises(OSError) as ei:
        env.union.copy_up(env.entry("d/f"))
    assert ei.value.errno == errno.ENOSPC
    assert not (env.upper / "d" / "f").exists()
    assert env.work_entries() == []
    assert env.read("d/f") == b"data"


def test_copy_up_without_fsync(make_env, monkeypatch):
    env = make_env(lowers=[{"f": "data"}, {}])
    copier = copyup.CopyUp(env.stack, env.work, fsync=False)

    def boom(fd):
        raise AssertionError("fsync called although the copier was made with fsync=False")

    monkeypatch.setattr(copyup.os, "fsync", boom)
    copier.copy_up(env.entry("f"))
    assert (env.upper / "f").read_bytes() == b"data"


# -- helpers ---------------------------------------------------------------------------------------------


def test_copy_data_partial_size(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"0123456789")
    dst = tmp_path / "dst"
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        copy_data(sfd, dfd, 4)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert dst.read_bytes() == b"0123"


def test_copy_data_empty_file(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"")
    dst = tmp_path / "dst"
    dst.write_bytes(b"garbage")
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_WRONLY)
    try:
        copy_data(sfd, dfd, 0)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert dst.read_bytes() == b""


def test_copy_xattrs_skips_private(tmp_path):
    src = tmp_path / "src"
    dst = tmp_path / "dst"
    src.write_bytes(b"")
    dst.write_bytes(b"")
    os.setxattr(src, b"user.a", b"1")
    os.setxattr(src, b"trusted.overlay.opaque", b"y")
    copy_xattrs(os.fsencode(src), os.fsencode(dst), (TRUSTED_PREFIX,))
    assert os.listxattr(dst) == ["user.a"]


def test_workdir_creates_work_subdir(tmp_path):
    w = Workdir(os.fsencode(tmp_path))
    try:
        st = os.lstat(tmp_path / "work")
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert w.tempname() != w.tempname()
    finally:
        w.close()


def test_workdir_work_not_a_directory(tmp_path):
    (tmp_path / "work").write_bytes(b"")
    with pytest.raises(OSError) as ei:
        Workdir(os.fsencode(tmp_path))
    assert ei.value.errno == errno.ENOTDIR


def test_workdir_clean_removes_stale_entries(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "file").write_bytes(b"x")
    (work / "tree" / "sub").mkdir(parents=True)
    (work / "tree" / "sub" / "f").write_bytes(b"x")
    os.mknod(work / "wh", stat.S_IFCHR, os.makedev(0, 0))
    os.symlink("/nonexistent", work / "dangling")
    w = Workdir(os.fsencode(tmp_path))
    try:
        assert w.clean() == 4
        assert os.listdir(work) == []
        assert w.clean() == 0
    finally:
        w.close()


def test_replace_with_whiteout_file_and_dir(make_env):
    env = make_env(upper={"f": "x", "d": {"wh": WHITEOUT, "sub": {"g": "y"}}})
    upper = env.stack.upper
    replace_with_whiteout(upper, env.work, b"f")
    replace_with_whiteout(upper, env.work, b"d")
    assert is_whiteout(env.upper / "f")
    assert is_whiteout(env.upper / "d")
    assert env.work_entries() == []


def test_move_to_work(make_env):
    env = make_env(upper={"d": {"x": "1"}})
    tmp = move_to_work(env.stack.upper, env.work, b"d")
    assert not (env.upper / "d").exists()
    assert env.work_entries() == [os.fsdecode(tmp)]
    env.work.discard(tmp)
    assert env.work_entries() == []

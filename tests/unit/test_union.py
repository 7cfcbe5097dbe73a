"""Union operations with Linux overlayfs semantics: creation, removal, rename, open, attributes, xattrs."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st
from unit_tree import WHITEOUT, XWHITEOUT, Dir, File, Symlink, as_nobody, is_whiteout, opaque_value, readable_layers

from unionfs import _sys, copyup
from unionfs.layers import Stack
from unionfs.union import DirListing, Union
from unionfs.whiteout import XattrFormat

LONG = b"n" * 256


def errno_of(excinfo) -> int:
    return excinfo.value.errno


def create(env, path, data=b"", mode=0o644, uid=0, gid=0):
    parent, name = env.parent(path)
    fd, entry = env.union.create(parent, name, stat.S_IFREG | mode, os.O_WRONLY | os.O_CREAT, uid, gid)
    try:
        if data:
            os.write(fd, data)
    finally:
        os.close(fd)
    return entry


def mkdir(env, path, mode=0o755, uid=0, gid=0):
    parent, name = env.parent(path)
    return env.union.mkdir(parent, name, stat.S_IFDIR | mode, uid, gid)


def unlink(env, path):
    parent, name = env.parent(path)
    return env.union.unlink(parent, name)


def rmdir(env, path):
    parent, name = env.parent(path)
    return env.union.rmdir(parent, name)


def rename(env, old, new, flags=0):
    op, on = env.parent(old)
    np, nn = env.parent(new)
    return env.union.rename(op, on, np, nn, flags)


def write_via_open(env, path, data, flags=os.O_WRONLY):
    fd = env.union.open(env.entry(path), flags)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


@pytest.fixture
def no_data_copy(monkeypatch):
    """Records copy_data calls (to prove a copy-up was metadata only)."""
    calls = []
    real = copyup.copy_data

    def spy(src, dst, size):
        calls.append(size)
        real(src, dst, size)

    monkeypatch.setattr(copyup, "copy_data", spy)
    return calls


# -- creating --------------------------------------------------------------------------------------------


def test_create_new_file_in_upper(make_env):
    env = make_env(lowers=[{"other": "o"}, {}])
    e = create(env, "f", b"new data", mode=0o640)
    assert e.layer == 0
    assert (env.upper / "f").read_bytes() == b"new data"
    assert stat.S_IMODE(os.lstat(env.upper / "f").st_mode) == 0o640
    assert env.names() == {"f", "other"}


def test_create_in_lower_directory_copies_parent_up(make_env):
    env = make_env(lowers=[{"d": Dir({"old": "o"}, mode=0o750)}, {}])
    create(env, "d/f", b"x")
    assert (env.upper / "d" / "f").read_bytes() == b"x"
    assert stat.S_IMODE(os.lstat(env.upper / "d").st_mode) == 0o750
    assert env.names("d") == {"old", "f"}


def test_create_over_whiteout_replaces_it(make_env):
    env = make_env(upper={"f": WHITEOUT}, lowers=[{"f": "old lower"}, {}])
    create(env, "f", b"fresh")
    assert not is_whiteout(env.upper / "f")
    assert env.read("f") == b"fresh"
    assert (env.lowers[0] / "f").read_bytes() == b"old lower"
    assert env.work_entries() == []


def test_create_over_xattr_whiteout_in_upper(make_env):
    env = make_env(upper={"d": Dir({"f": XWHITEOUT}, xwhiteouts=True)}, lowers=[{"d": {"f": "old"}}, {}])
    assert env.resolve("d/f") is None
    create(env, "d/f", b"fresh")
    assert env.read("d/f") == b"fresh"


def test_create_existing_name_is_eexist(make_env):
    env = make_env(lowers=[{"f": "lower"}, {}])
    parent, name = env.parent("f")
    with pytest.raises(OSError) as ei:
        env.union.create(parent, name, stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    assert errno_of(ei) == errno.EEXIST
    assert os.listdir(env.upper) == []


def test_create_name_too_long(make_env):
    env = make_env()
    with pytest.raises(OSError) as ei:
        env.union.create(env.stack.root(), LONG, stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    assert errno_of(ei) == errno.ENAMETOOLONG


def test_create_with_caller_owner(make_env):
    env = make_env()
    create(env, "f", b"x", mode=0o4755, uid=1234, gid=4321)
    st = os.lstat(env.upper / "f")
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    assert stat.S_IMODE(st.st_mode) == 0o4755


def test_create_in_setgid_directory_inherits_group(make_env):
    env = make_env(upper={"d": Dir({}, mode=0o2775, gid=1234)})
    create(env, "d/f", b"x", uid=0, gid=0)
    e = mkdir(env, "d/sub")
    assert os.lstat(env.upper / "d" / "f").st_gid == 1234
    st = os.lstat(env.upper / "d" / "sub")
    assert st.st_gid == 1234 and st.st_mode & stat.S_ISGID
    assert e.is_dir


def test_regression_mkdir_over_whiteout_in_setgid_directory_inherits_group(make_env):
    env = make_env(upper={"d": Dir({"x": WHITEOUT}, mode=0o2775, gid=1234)}, lowers=[{"d": {"x": {}}}, {}])
    mkdir(env, "d/x", mode=0o755)
    st = os.lstat(env.upper / "d" / "x")
    assert st.st_gid == 1234
    assert st.st_mode & stat.S_ISGID


def test_mkdir_plain_is_not_opaque(make_env):
    env = make_env(lowers=[{}, {}])
    e = mkdir(env, "d", mode=0o711)
    assert e.dirs == (0,) and not e.opaque
    assert opaque_value(env.upper / "d") is None
    assert stat.S_IMODE(os.lstat(env.upper / "d").st_mode) == 0o711


def test_mkdir_over_whiteout_makes_opaque_dir(make_env):
    env = make_env(upper={"d": WHITEOUT}, lowers=[{"d": {"old": "o"}}, {"d": {"older": "o"}}])
    e = mkdir(env, "d")
    assert e.opaque
    assert opaque_value(env.upper / "d") == b"y"
    assert env.entry("d").dirs == (0,)
    assert env.names("d") == set()
    assert env.work_entries() == []


def test_mkdir_existing_is_eexist(make_env):
    env = make_env(lowers=[{"d": {}}, {}])
    with pytest.raises(OSError) as ei:
        mkdir(env, "d")
    assert errno_of(ei) == errno.EEXIST


def test_mkdir_name_too_long(make_env):
    env = make_env()
    with pytest.raises(OSError) as ei:
        env.union.mkdir(env.stack.root(), LONG, 0o755, 0, 0)
    assert errno_of(ei) == errno.ENAMETOOLONG


def test_mknod_fifo_and_device(make_env):
    env = make_env()
    root = env.stack.root()
    env.union.mknod(root, b"fifo", stat.S_IFIFO | 0o600, 0, 0, 0)
    env.union.mknod(env.stack.root(), b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3), 0, 0)
    assert stat.S_ISFIFO(os.lstat(env.upper / "fifo").st_mode)
    st = os.lstat(env.upper / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def test_mknod_over_whiteout(make_env):
    env = make_env(upper={"p": WHITEOUT}, lowers=[{"p": "file"}, {}])
    env.union.mknod(env.stack.root(), b"p", stat.S_IFIFO | 0o600, 0, 0, 0)
    assert stat.S_ISFIFO(env.entry("p").st.st_mode)
    assert env.work_entries() == []


def test_mknod_existing_is_eexist(make_env):
    env = make_env(lowers=[{"p": "file"}, {}])
    with pytest.raises(OSError) as ei:
        env.union.mknod(env.stack.root(), b"p", stat.S_IFIFO | 0o600, 0, 0, 0)
    assert errno_of(ei) == errno.EEXIST


def test_symlink_new_and_over_whiteout(make_env):
    env = make_env(upper={"old": WHITEOUT}, lowers=[{"old": "was a file"}, {}])
    env.union.symlink(env.stack.root(), b"new", b"target/one", 0, 0)
    env.union.symlink(env.stack.root(), b"old", b"target/two", 0, 0)
    assert os.readlink(env.upper / "new") == "target/one"
    assert env.union.readlink(env.entry("old")) == b"target/two"


def test_symlink_existing_is_eexist_and_long_name(make_env):
    env = make_env(lowers=[{"ln": Symlink("x")}, {}])
    with pytest.raises(OSError) as ei:
        env.union.symlink(env.stack.root(), b"ln", b"y", 0, 0)
    assert errno_of(ei) == errno.EEXIST
    with pytest.raises(OSError) as ei:
        env.union.symlink(env.stack.root(), LONG, b"y", 0, 0)
    assert errno_of(ei) == errno.ENAMETOOLONG


def test_link_lower_file_copies_up_and_links(make_env):
    env = make_env(lowers=[{"f": "data"}, {}])
    e = env.union.link(env.entry("f"), env.stack.root(), b"g")
    assert e.layer == 0
    assert os.lstat(env.upper / "f").st_ino == os.lstat(env.upper / "g").st_ino
    assert env.read("g") == b"data"


def test_link_over_whiteout(make_env):
    env = make_env(upper={"f": "data", "g": WHITEOUT}, lowers=[{"g": "old"}, {}])
    env.union.link(env.entry("f"), env.stack.root(), b"g")
    assert env.read("g") == b"data"
    assert env.work_entries() == []


def test_link_errors(make_env):
    env = make_env(upper={"f": "x", "d": {}}, lowers=[{"g": "y"}, {}])
    with pytest.raises(OSError) as ei:
        env.union.link(env.entry("d"), env.stack.root(), b"d2")
    assert errno_of(ei) == errno.EPERM
    with pytest.raises(OSError) as ei:
        env.union.link(env.entry("f"), env.stack.root(), b"g")
    assert errno_of(ei) == errno.EEXIST


def test_lookup_errors(make_env):
    env = make_env(upper={"f": "x"})
    with pytest.raises(OSError) as ei:
        env.union.lookup(env.stack.root(), LONG)
    assert errno_of(ei) == errno.ENAMETOOLONG
    with pytest.raises(OSError) as ei:
        env.union.lookup(env.entry("f"), b"x")
    assert errno_of(ei) == errno.ENOTDIR


# -- removing --------------------------------------------------------------------------------------------


def test_unlink_pure_upper_leaves_no_whiteout(make_env):
    env = make_env(upper={"f": "x"}, lowers=[{}, {}])
    unlink(env, "f")
    assert not os.path.lexists(env.upper / "f")
    assert env.resolve("f") is None


def test_unlink_lower_leaves_whiteout(make_env):
    env = make_env(lowers=[{"f": "x"}, {}])
    unlink(env, "f")
    assert is_whiteout(env.upper / "f")
    assert (env.lowers[0] / "f").exists()
    assert env.resolve("f") is None and env.names() == set()


def test_unlink_upper_over_lower_leaves_whiteout(make_env):
    env = make_env(upper={"f": "u"}, lowers=[{}, {"f": "l"}])
    unlink(env, "f")
    assert is_whiteout(env.upper / "f")
    assert env.resolve("f") is None
    assert env.work_entries() == []


def test_unlink_upper_over_whited_out_lower_leaves_no_whiteout(make_env):
    env = make_env(upper={"f": "u"}, lowers=[{"f": WHITEOUT}, {"f": "l"}])
    unlink(env, "f")
    assert not os.path.lexists(env.upper / "f")
    assert env.resolve("f") is None


def test_unlink_in_lower_directory_copies_parent(make_env):
    env = make_env(lowers=[{"d": {"f": "x", "g": "y"}}, {}])
    unlink(env, "d/f")
    assert is_whiteout(env.upper / "d" / "f")
    assert env.names("d") == {"g"}


def test_unlink_errors(make_env):
    env = make_env(lowers=[{"d": {}}, {}])
    with pytest.raises(OSError) as ei:
        unlink(env, "d")
    assert errno_of(ei) == errno.EISDIR
    with pytest.raises(OSError) as ei:
        unlink(env, "missing")
    assert errno_of(ei) == errno.ENOENT


def test_rmdir_merged_nonempty_is_enotempty(make_env):
    env = make_env(upper={"d": {}}, lowers=[{"d": {"f": "x"}}, {}])
    with pytest.raises(OSError) as ei:
        rmdir(env, "d")
    assert errno_of(ei) == errno.ENOTEMPTY
    assert env.read("d/f") == b"x"


def test_rmdir_merged_empty_dir_with_upper_whiteouts(make_env):
    env = make_env(upper={"d": {"f": WHITEOUT, "g": WHITEOUT}}, lowers=[{"d": {"f": "x"}}, {"d": {"g": "y"}}])
    assert env.names("d") == set()
    rmdir(env, "d")
    assert is_whiteout(env.upper / "d")
    assert env.resolve("d") is None
    assert env.work_entries() == []


def test_rmdir_lower_empty_dir_leaves_whiteout(make_env):
    env = make_env(lowers=[{"d": {}}, {}])
    rmdir(env, "d")
    assert is_whiteout(env.upper / "d")


def test_rmdir_pure_upper_dir(make_env):
    env = make_env(upper={"d": {}}, lowers=[{}, {}])
    rmdir(env, "d")
    assert not os.path.lexists(env.upper / "d")


def test_rmdir_pure_upper_dir_holding_only_whiteouts(make_env):
    env = make_env(upper={"d": {"stale": WHITEOUT}}, lowers=[{}, {}])
    rmdir(env, "d")
    assert not os.path.lexists(env.upper / "d")
    assert env.work_entries() == []


def test_rmdir_opaque_upper_over_lower_leaves_whiteout(make_env):
    env = make_env(upper={"d": Dir({}, opaque=True)}, lowers=[{"d": {"hidden": "x"}}, {}])
    rmdir(env, "d")
    assert is_whiteout(env.upper / "d")
    assert env.resolve("d") is None


def test_rmdir_errors(make_env):
    env = make_env(upper={"f": "x"})
    with pytest.raises(OSError) as ei:
        rmdir(env, "f")
    assert errno_of(ei) == errno.ENOTDIR
    with pytest.raises(OSError) as ei:
        rmdir(env, "missing")
    assert errno_of(ei) == errno.ENOENT


# -- renaming --------------------------------------------------------------------------------------------


def test_rename_file_over_file(make_env):
    env = make_env(upper={"a": "A", "b": "B"}, lowers=[{}, {}])
    moved, replaced = rename(env, "a", "b")
    assert moved.path == b"b" and replaced is not None and replaced.path == b"b"
    assert env.read("b") == b"A"
    assert not os.path.lexists(env.upper / "a")
    assert env.names() == {"b"}


def test_rename_lower_file_copies_up_and_whites_out_old(make_env):
    env = make_env(lowers=[{"d": {"a": File("A", mode=0o600)}}, {}])
    rename(env, "d/a", "b")
    assert (env.upper / "b").read_bytes() == b"A"
    assert stat.S_IMODE(os.lstat(env.upper / "b").st_mode) == 0o600
    assert is_whiteout(env.upper / "d" / "a")
    assert env.resolve("d/a") is None
    assert env.names() == {"d", "b"}
    assert env.work_entries() == []


def test_rename_upper_over_lower_file_whites_out_old(make_env):
    env = make_env(upper={"a": "new"}, lowers=[{"a": "old"}, {}])
    rename(env, "a", "z")
    assert is_whiteout(env.upper / "a")
    assert env.read("z") == b"new"


def test_rename_pure_upper_file_leaves_no_whiteout(make_env):
    env = make_env(upper={"a": "x"}, lowers=[{}, {}])
    rename(env, "a", "z")
    assert not os.path.lexists(env.upper / "a")


def test_rename_onto_whited_out_name(make_env):
    env = make_env(upper={"a": "x", "b": WHITEOUT}, lowers=[{"b": {"child": "c"}}, {}])
    rename(env, "a", "b")
    assert env.read("b") == b"x"
    assert env.names() == {"b"}


def test_rename_lower_dir_is_exdev(make_env):
    env = make_env(lowers=[{"d": {"f": "x"}}, {}])
    with pytest.raises(OSError) as ei:
        rename(env, "d", "e")
    assert errno_of(ei) == errno.EXDEV
    assert os.listdir(env.upper) == []


def test_rename_merged_dir_is_exdev(make_env):
    env = make_env(upper={"d": {"u": "1"}}, lowers=[{"d": {}}, {}])
    with pytest.raises(OSError) as ei:
        rename(env, "d", "e")
    assert errno_of(ei) == errno.EXDEV


def test_rename_pure_upper_dir_into_merged_parent_sets_opaque(make_env):
    env = make_env(upper={"src": {"f": "x"}, "m": {}}, lowers=[{"m": {"other": "o"}}, {}])
    moved, _ = rename(env, "src", "m/dst")
    assert moved.opaque
    assert opaque_value(env.upper / "m" / "dst") == b"y"
    assert env.read("m/dst/f") == b"x"
    assert env.names("m") == {"dst", "other"}


def test_rename_pure_upper_dir_over_empty_lower_dir(make_env):
    env = make_env(upper={"src": {"f": "x"}, "t": {"gone": WHITEOUT}}, lowers=[{"t": {"gone": "old"}}, {}])
    rename(env, "src", "t")
    assert opaque_value(env.upper / "t") == b"y"
    assert env.names("t") == {"f"}
    assert env.entry("t").dirs == (0,)
    assert env.work_entries() == []


def test_rename_dir_over_a_whiteout_exchanges_them(make_env, monkeypatch):
    """(Regression, crash safety: the whiteout was unlinked before the rename.) One exchange puts the directory
    where the whiteout was; the whiteout, now at the old name, goes where nothing beneath needs hiding and
    stays where something does."""
    env = make_env(upper={"src": {"f": "x"}, "w": WHITEOUT}, lowers=[{"w": "hidden"}, {}])
    calls = []
    real = _sys.renameat2
    monkeypatch.setattr(_sys, "renameat2", lambda *a: (calls.append(a[2]), real(*a))[1])
    rename(env, "src", "w")
    assert calls == [_sys.RENAME_EXCHANGE]
    assert env.names("w") == {"f"} and opaque_value(env.upper / "w") == b"y"
    assert not os.path.lexists(env.upper / "src")  # (nothing beneath it: no whiteout kept)
    assert env.work_entries() == []


def test_rename_dir_over_an_xattr_whiteout_removes_it_first(make_env):
    """An xattr whiteout moved to the old name would hide nothing there (its directory is not marked for them)
    and show as an empty file: it is removed, the directory renamed, and a kernel whiteout left at the old name,
    which hides the lower file beneath it."""
    env = make_env(upper={"p": {"src": Dir({"f": "x"})}, "d": Dir({"w": XWHITEOUT}, xwhiteouts=True)},
                   lowers=[{"p": {"src": "lower file"}, "d": {"w": "hidden"}}, {}])
    assert env.resolve("d/w") is None and env.entry("p/src").is_dir
    rename(env, "p/src", "d/w")
    assert env.names("d") == {"w"} and env.names("d/w") == {"f"}
    assert env.resolve("p/src") is None and env.names("p") == set()
    assert is_whiteout(env.upper / "p" / "src")


def test_rename_dir_over_an_emptied_merged_dir_swaps_in_an_empty_one_first(make_env, monkeypatch):
    """(Regression, crash safety: the target's upper copy, holding the whiteouts of its lower entries, was moved
    to the workdir before the rename.) The target is first exchanged with an empty opaque directory of its
    attributes, which the rename then replaces in one step."""
    env = make_env(upper={"src": {"f": "x"}, "t": Dir({"gone": WHITEOUT}, mode=0o751, xattrs={b"user.k": b"v"})},
                   lowers=[{"t": {"gone": "old"}}, {}])
    seen = []
    real = _sys.renameat2

    def spy(src, dst, flags, sfd, dfd):
        if flags == _sys.RENAME_EXCHANGE:  # what the merged view shows right after the exchange
            real(src, dst, flags, sfd, dfd)
            seen.append((sorted(os.listdir(env.upper / "t")), stat.S_IMODE(os.lstat(env.upper / "t").st_mode),
                         os.getxattr(env.upper / "t", "user.k"), opaque_value(env.upper / "t")))
            return
        real(src, dst, flags, sfd, dfd)

    monkeypatch.setattr(_sys, "renameat2", spy)
    rename(env, "src", "t")
    assert seen == [([], 0o751, b"v", b"y")]
    assert env.names("t") == {"f"}
    assert env.work_entries() == []


def test_rename_pure_upper_dir_in_pure_upper_parent_stays_transparent(make_env):
    env = make_env(upper={"p": {"src": {}}}, lowers=[{}, {}])
    moved, _ = rename(env, "p/src", "p/dst")
    assert not moved.opaque
    assert opaque_value(env.upper / "p" / "dst") is None


def test_rename_dir_into_own_subdir_is_einval(make_env):
    env = make_env(upper={"d": {"sub": {}}})
    with pytest.raises(OSError) as ei:
        rename(env, "d", "d/sub/d")
    assert errno_of(ei) == errno.EINVAL


def test_rename_to_own_ancestor_is_enotempty(make_env):
    env = make_env(upper={"d": {"sub": {}}})
    with pytest.raises(OSError) as ei:
        rename(env, "d/sub", "d")
    assert errno_of(ei) == errno.ENOTEMPTY


def test_rename_file_over_dir_is_eisdir(make_env):
    env = make_env(upper={"f": "x"}, lowers=[{"d": {}}, {}])
    with pytest.raises(OSError) as ei:
        rename(env, "f", "d")
    assert errno_of(ei) == errno.EISDIR


def test_rename_dir_over_file_is_enotdir(make_env):
    env = make_env(upper={"d": {}}, lowers=[{"f": "x"}, {}])
    with pytest.raises(OSError) as ei:
        rename(env, "d", "f")
    assert errno_of(ei) == errno.ENOTDIR


def test_rename_dir_over_nonempty_dir_is_enotempty(make_env):
    env = make_env(upper={"d": {}}, lowers=[{"t": {"x": "1"}}, {}])
    with pytest.raises(OSError) as ei:
        rename(env, "d", "t")
    assert errno_of(ei) == errno.ENOTEMPTY


def test_rename_noreplace_existing_is_eexist(make_env):
    env = make_env(upper={"a": "A"}, lowers=[{"b": "B"}, {}])
    with pytest.raises(OSError) as ei:
        rename(env, "a", "b", _sys.RENAME_NOREPLACE)
    assert errno_of(ei) == errno.EEXIST
    assert env.read("b") == b"B"
    rename(env, "a", "c", _sys.RENAME_NOREPLACE)
    assert env.read("c") == b"A"


def test_rename_same_name_is_noop(make_env):
    env = make_env(upper={"a": "A"})
    moved, replaced = rename(env, "a", "a")
    assert replaced is None and env.read("a") == b"A"


def test_rename_missing_source_and_bad_flags(make_env):
    env = make_env(upper={"a": "A"})
    with pytest.raises(OSError) as ei:
        rename(env, "missing", "x")
    assert errno_of(ei) == errno.ENOENT
    with pytest.raises(OSError) as ei:
        rename(env, "a", "x", _sys.RENAME_WHITEOUT)
    assert errno_of(ei) == errno.EINVAL
    with pytest.raises(OSError) as ei:
        rename(env, "a", "x", _sys.RENAME_EXCHANGE)
    assert errno_of(ei) == errno.ENOENT


def test_rename_exchange_files(make_env):
    env = make_env(upper={"a": "A"}, lowers=[{"b": "B"}, {}])
    rename(env, "a", "b", _sys.RENAME_EXCHANGE)
    assert env.read("a") == b"B" and env.read("b") == b"A"


def test_rename_name_too_long(make_env):
    env = make_env(upper={"a": "A"})
    with pytest.raises(OSError) as ei:
        env.union.rename(env.stack.root(), b"a", env.stack.root(), LONG)
    assert errno_of(ei) == errno.ENAMETOOLONG


# -- opening ---------------------------------------------------------------------------------------------


def test_open_read_only_does_not_copy_up(make_env):
    env = make_env(lowers=[{"f": "x"}, {}])
    assert env.read("f") == b"x"
    assert os.listdir(env.upper) == []


def test_open_for_write_copies_up(make_env, no_data_copy):
    env = make_env(lowers=[{"f": "lower data"}, {}])
    write_via_open(env, "f", b"UPPER", os.O_RDWR)
    assert (env.upper / "f").read_bytes() == b"UPPER data"
    assert (env.lowers[0] / "f").read_bytes() == b"lower data"
    assert no_data_copy == [10]


def test_open_trunc_copies_metadata_only(make_env, no_data_copy):
    env = make_env(lowers=[{"f": File("lower data", mode=0o604, uid=42)}, {}])
    fd = env.union.open(env.entry("f"), os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    st = os.lstat(env.upper / "f")
    assert st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0o604 and st.st_uid == 42
    assert no_data_copy == []


def test_regression_open_read_only_append_does_not_copy_up(make_env):
    env = make_env(lowers=[{"f": "x"}, {}])
    fd = env.union.open(env.entry("f"), os.O_RDONLY | os.O_APPEND)
    os.close(fd)
    assert os.listdir(env.upper) == []


def test_open_on_read_only_union_for_write_is_erofs(make_env):
    env = make_env(lowers=[{"f": "x"}, {}], writable=False)
    with pytest.raises(OSError) as ei:
        env.union.open(env.entry("f"), os.O_WRONLY)
    assert errno_of(ei) == errno.EROFS
    with pytest.raises(OSError) as ei:
        env.union.mkdir(env.stack.root(), b"d", 0o755, 0, 0)
    assert errno_of(ei) == errno.EROFS


# -- attributes ------------------------------------------------------------------------------------------


def test_truncate_copies_up(make_env):
    env = make_env(lowers=[{"f": "0123456789"}, {}])
    e = env.union.truncate(env.entry("f"), 4)
    assert e.layer == 0
    assert (env.upper / "f").read_bytes() == b"0123"
    assert (env.lowers[0] / "f").read_bytes() == b"0123456789"


def test_truncate_to_zero_copies_metadata_only(make_env, no_data_copy):
    env = make_env(lowers=[{"f": File("0123456789", mode=0o611)}, {}])
    env.union.truncate(env.entry("f"), 0)
    st = os.lstat(env.upper / "f")
    assert st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0o611
    assert no_data_copy == []


def test_truncate_extends(make_env):
    env = make_env(lowers=[{"f": "ab"}, {}])
    env.union.truncate(env.entry("f"), 5)
    assert env.read("f") == b"ab\0\0\0"


def test_chmod_copies_up(make_env):
    env = make_env(lowers=[{"f": File("x", mode=0o644)}, {}])
    env.union.chmod(env.entry("f"), stat.S_IFREG | 0o4700)
    assert stat.S_IMODE(os.lstat(env.upper / "f").st_mode) == 0o4700
    assert stat.S_IMODE(os.lstat(env.lowers[0] / "f").st_mode) == 0o644


def test_chmod_symlink_is_eopnotsupp(make_env):
    env = make_env(lowers=[{"ln": Symlink("x")}, {}])
    with pytest.raises(OSError) as ei:
        env.union.chmod(env.entry("ln"), 0o777)
    assert errno_of(ei) == errno.EOPNOTSUPP
    assert os.listdir(env.upper) == []


def test_chown_copies_up(make_env):
    env = make_env(lowers=[{"f": "x"}, {}])
    env.union.chown(env.entry("f"), 1234, 5678)
    st = os.lstat(env.upper / "f")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert os.lstat(env.lowers[0] / "f").st_uid == 0


def test_chown_lower_symlink(make_env):
    env = make_env(lowers=[{"ln": Symlink("target")}, {}])
    env.union.chown(env.entry("ln"), 99, -1)
    st = os.lstat(env.upper / "ln")
    assert stat.S_ISLNK(st.st_mode) and st.st_uid == 99
    assert os.readlink(env.upper / "ln") == "target"


def test_utimens_copies_up(make_env):
    env = make_env(lowers=[{"f": File("x", times_ns=(1_000, 2_000))}, {}])
    env.union.utimens(env.entry("f"), 5_000_000_001, 6_000_000_002)
    st = os.lstat(env.upper / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (5_000_000_001, 6_000_000_002)
    assert os.lstat(env.lowers[0] / "f").st_mtime_ns == 2_000


def test_utimens_omit_keeps_other_time(make_env):
    env = make_env(lowers=[{"f": File("x", times_ns=(1_000, 2_000))}, {}])
    env.union.utimens(env.entry("f"), None, 7_000)
    st = os.lstat(env.upper / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000, 7_000)


# -- xattrs ----------------------------------------------------------------------------------------------


def test_setxattr_copies_up(make_env):
    env = make_env(lowers=[{"f": "x"}, {}])
    e = env.union.setxattr(env.entry("f"), b"user.k", b"v")
    assert e.layer == 0
    assert os.getxattr(env.upper / "f", b"user.k") == b"v"
    assert "user.k" not in os.listxattr(env.lowers[0] / "f")
    assert env.union.getxattr(env.entry("f"), b"user.k") == b"v"


def test_setxattr_overlay_name_is_escaped(make_env):
    env = make_env(upper={"f": "x"})
    env.union.setxattr(env.entry("f"), b"trusted.overlay.opaque", b"y")
    assert os.getxattr(env.upper / "f", b"trusted.overlay.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(env.upper / "f")
    assert env.union.getxattr(env.entry("f"), b"trusted.overlay.opaque") == b"y"
    assert env.union.listxattr(env.entry("f")) == [b"trusted.overlay.opaque"]


def test_removexattr_copies_up(make_env):
    env = make_env(lowers=[{"f": File("x", xattrs={b"user.a": b"1", b"user.b": b"2"})}, {}])
    env.union.removexattr(env.entry("f"), b"user.a")
    assert os.listxattr(env.upper / "f") == ["user.b"]
    assert sorted(os.listxattr(env.lowers[0] / "f")) == ["user.a", "user.b"]


def test_removexattr_missing_on_lower_is_enodata_without_copy_up(make_env):
    env = make_env(lowers=[{"f": "x"}, {}])
    with pytest.raises(OSError) as ei:
        env.union.removexattr(env.entry("f"), b"user.nothing")
    assert errno_of(ei) == errno.ENODATA
    assert os.listdir(env.upper) == []


def test_removexattr_missing_on_upper_is_enodata(make_env):
    env = make_env(upper={"f": "x"})
    with pytest.raises(OSError) as ei:
        env.union.removexattr(env.entry("f"), b"user.nothing")
    assert errno_of(ei) == errno.ENODATA


def test_listxattr_hides_private_names(make_env):
    env = make_env(upper={"d": Dir({}, opaque=True, xattrs={b"user.x": b"1"})},
                   lowers=[{"d": {}, "f": File("x", xattrs={b"trusted.overlay.overlay.esc": b"e"})}, {}])
    assert env.union.listxattr(env.entry("d")) == [b"user.x"]
    assert env.union.listxattr(env.entry("f")) == [b"trusted.overlay.esc"]
    with pytest.raises(OSError) as ei:
        env.union.getxattr(env.entry("d"), b"trusted.overlay.opaque")
    assert errno_of(ei) == errno.ENODATA


def test_getxattr_missing_is_enodata(make_env):
    env = make_env(lowers=[{"f": "x"}, {}])
    with pytest.raises(OSError) as ei:
        env.union.getxattr(env.entry("f"), b"user.none")
    assert errno_of(ei) == errno.ENODATA


# -- misc ------------------------------------------------------------------------------------------------


def test_lstat_and_statvfs(make_env):
    env = make_env(lowers=[{"f": "abc"}, {}])
    e = env.entry("f")
    assert env.union.lstat(e).st_size == 3
    (env.lowers[0] / "f").write_bytes(b"abcdef")
    assert env.union.lstat(e).st_size == 6, "lstat reads the object afresh"
    assert env.union.statvfs().f_bsize > 0


def test_default_format():
    from unionfs.union import default_format
    from unionfs.whiteout import XattrFormat

    assert default_format(None, True) is XattrFormat.USER
    assert default_format(None, False) is XattrFormat.TRUSTED
    assert default_format(None, None) is XattrFormat.TRUSTED  # root


def test_default_format_probes_upper(tmp_path):
    from unionfs.union import default_format
    from unionfs.whiteout import XattrFormat

    assert default_format(os.fsencode(tmp_path), None) is XattrFormat.TRUSTED
    assert os.listdir(tmp_path) == []


# -- xattrs through an open descriptor (unlinked files) ---------------------------------------------------
# Regression: the xattr library refuses XATTR_NOFOLLOW on descriptors (returns -1 with errno 0), so the
# descriptor forms must not pass nofollow.

@pytest.fixture
def unlinked_fd(make_env):
    env = make_env(upper={"f": File("x", xattrs={b"user.a": b"1", b"trusted.overlay.overlay.esc": b"e"})})
    fd = os.open(env.upper / "f", os.O_RDWR)
    os.unlink(env.upper / "f")
    yield env, fd
    os.close(fd)


def test_getxattr_fd_on_unlinked_file(unlinked_fd):
    env, fd = unlinked_fd
    assert env.union.getxattr(fd, b"user.a") == b"1"


def test_listxattr_fd_hides_private_names(unlinked_fd):
    env, fd = unlinked_fd
    assert sorted(env.union.listxattr(fd)) == [b"trusted.overlay.esc", b"user.a"]


def test_setxattr_fd_escapes_overlay_names(unlinked_fd):
    env, fd = unlinked_fd
    env.union.setxattr(fd, b"trusted.overlay.opaque", b"y")
    assert os.getxattr(fd, b"trusted.overlay.overlay.opaque") == b"y"


def test_removexattr_fd(unlinked_fd):
    env, fd = unlinked_fd
    env.union.removexattr(fd, b"user.a")
    assert "user.a" not in os.listxattr(fd)


# -- rules the FUSE shell asks the core for --------------------------------------------------------------------


def test_listxattr_shows_trusted_names_to_the_superuser_only(make_env):
    from unionfs.userns import Caller

    env = make_env(upper={"f": File("x", xattrs={b"trusted.t": b"1", b"user.u": b"2"})})
    entry = env.entry("f")
    assert sorted(env.union.listxattr(entry, Caller(0, 0, os.getpid()))) == [b"trusted.t", b"user.u"]
    assert env.union.listxattr(entry, Caller(1000, 1000, os.getpid())) == [b"user.u"]


def test_may_copy_up_is_true_for_lower_objects_only(make_env):
    env = make_env(upper={"u": "u", "d": {}}, lowers=[{"l": "l", "d": {"x": "x"}}, {}])
    assert not env.union.may_copy_up(env.entry("u"))
    assert not env.union.may_copy_up(env.entry("d")), "a merged directory present in the upper layer"
    assert env.union.may_copy_up(env.entry("l"))
    assert env.union.may_copy_up(env.entry("d/x"))


def test_last_name_of_removed_objects(make_env):
    env = make_env(upper={"one": "1", "two": "2", "d": {}}, lowers=[{"low": "l"}, {}])
    os.link(env.upper / "two", env.upper / "two-b")
    assert env.union.last_name(env.entry("one"))
    assert not env.union.last_name(env.entry("two")), "another upper name still leads to it"
    assert env.union.last_name(env.entry("d"))
    assert env.union.last_name(env.entry("low"))


def test_listing_child_resolves_each_listed_name_once(make_env):
    env = make_env(upper={"a": "1"}, lowers=[{"b": "2", "d": {}}, {}])
    root = env.entry("")
    listing = env.union.listing(env.union.listdir(root))
    names = [name for name, _listed in listing.names]
    assert sorted(names) == [b"a", b"b", b"d"]
    for index, name in enumerate(names):
        child = listing.child(root, index)
        assert child is not None and child[1] is True
        assert child[0] == env.entry(os.fsdecode(name))
        assert listing.child(root, index) is child, "kept until sent"
        listing.sent(index)
    os.unlink(env.upper / "a")
    assert listing.child(root, names.index(b"a")) is None, "a name gone since the listing was taken"


def test_regression_listing_positions_do_not_depend_on_the_order_layers_list_names(make_env):
    """A directory the kernel caches is filled by several readers at once, each from its own listing: a reader
    resuming at another's offset must go on with the names after that one. The merged listing's order changes
    when the upper layer gains names in another order (copy-ups): positions must not (a cached root listing once
    showed one worker directory twice and another not at all)."""
    names = [f"w{i}" for i in range(12)]
    env = make_env(upper={}, lowers=[{n: {} for n in names}, {}])
    root = env.entry("")
    order_before = list(env.union.listdir(root))
    before = env.union.listing(env.union.listdir(root))
    for n in reversed(names[:7]):  # copied up in another order: the upper directory lists them first
        os.mkdir(env.upper / n)
    order_after = list(env.union.listdir(root))
    assert order_after != order_before and sorted(order_after) == sorted(order_before)
    after = env.union.listing(env.union.listdir(root))
    assert [n for n, _ in after.names] == [n for n, _ in before.names] and after.positions == before.positions
    assert sorted(before.positions) == before.positions and len(set(before.positions)) == len(names)
    assert min(before.positions) >= 3, "past . and .."
    for cut in range(len(names) + 1):
        resumed_at = before.positions[cut - 1] if cut else 2
        rest = [name for name, _ in after.names[after.index_after(resumed_at):]]
        assert rest == [name for name, _ in before.names[cut:]]


@given(st.lists(st.binary(min_size=1, max_size=12).filter(lambda n: b"/" not in n and n not in (b".", b"..")),
                unique=True, max_size=40), st.randoms(use_true_random=False))
def test_listing_positions_are_a_function_of_the_names(names, rnd):
    """Whatever order a listing comes in, each name gets the same position, increasing, past . and ..;
    resuming after any position gives exactly the names after it."""
    stack = Stack.__new__(Stack)
    shuffled = list(names)
    rnd.shuffle(shuffled)
    a = DirListing(stack, {n: (0, stat.S_IFREG) for n in names})
    b = DirListing(stack, {n: (1, stat.S_IFDIR) for n in shuffled})
    assert [n for n, _ in a.names] == [n for n, _ in b.names] and a.positions == b.positions
    assert all(p >= 3 for p in a.positions) and a.positions == sorted(set(a.positions))
    for i, p in enumerate(a.positions):
        assert b.index_after(p) == i + 1 and b.index_after(p - 1) == i


def test_listing_of_a_directory_the_server_may_read_but_not_search():
    """The names are listed with the inode number and type the directory gives, marked unreachable (the kernel
    lists them too); every other use of them meets EACCES."""
    with readable_layers({}, [{"noexec": Dir({"x": "3", "sub": {}}, mode=0o744)}, {}]) as layer_dirs:
        inos = {e.name: e.inode() for e in os.scandir(os.path.join(layer_dirs[0], b"noexec"))}

        def check() -> None:
            union = Union(Stack(layer_dirs, False, XattrFormat.TRUSTED), None)
            noexec = union.stack.resolve(b"noexec")
            assert noexec is not None
            listing = union.listing(union.listdir(noexec))
            got = {}
            for index, (name, _listed) in enumerate(listing.names):
                child = listing.child(noexec, index)
                assert child is not None
                got[name] = (child[0].st.st_ino, stat.S_IFMT(child[0].st.st_mode), child[1])
            assert got == {b"x": (inos[b"x"], stat.S_IFREG, False), b"sub": (inos[b"sub"], stat.S_IFDIR, False)}, got
            with pytest.raises(PermissionError):
                union.lookup(noexec, b"x")

        as_nobody(check, "the unprivileged listing differed")

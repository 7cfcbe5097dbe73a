"""Name resolution through the stack (Stack.lookup / resolve / below_upper) and merged listings."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from unit_tree import WHITEOUT, XWHITEOUT, Dir, Symlink

from unionfs.layers import NAME_MAX, ROOT, Stack, check_name, join, split, subdirectory_dirs
from unionfs.whiteout import XattrFormat

# -- paths ------------------------------------------------------------------------------------------------


def test_join_and_split():
    assert join(ROOT, b"a") == b"a"
    assert join(b"a", b"b") == b"a/b"
    assert split(b"a") == (ROOT, b"a")
    assert split(b"a/b/c") == (b"a/b", b"c")


def test_check_name_rejects_256_bytes():
    check_name(b"n" * NAME_MAX)
    with pytest.raises(OSError) as ei:
        check_name(b"n" * (NAME_MAX + 1))
    assert ei.value.errno == errno.ENAMETOOLONG


# -- resolution -------------------------------------------------------------------------------------------


def test_lookup_is_top_down(make_env):
    env = make_env(upper={"f": "upper"}, lowers=[{"f": "l1", "g": "l1g"}, {"f": "l2", "g": "l2g", "h": "l2h"}])
    assert env.entry("f").layer == 0
    assert env.entry("g").layer == 1
    assert env.entry("h").layer == 2
    assert env.read("f") == b"upper"
    assert env.read("g") == b"l1g"


def test_whiteout_hides_lower_names(make_env):
    env = make_env(upper={"f": WHITEOUT}, lowers=[{"g": WHITEOUT}, {"f": "l2", "g": "l2"}])
    assert env.resolve("f") is None
    assert env.resolve("g") is None


def test_whiteout_hides_lower_directory_and_its_children(make_env):
    env = make_env(upper={"d": WHITEOUT}, lowers=[{"d": {"x": "1"}}, {}])
    assert env.resolve("d") is None
    assert env.resolve("d/x") is None


def test_merged_directory_lists_contributing_layers(make_env):
    env = make_env(upper={"d": {}}, lowers=[{"d": {}}, {"d": {}}])
    e = env.entry("d")
    assert e.dirs == (0, 1, 2)
    assert e.merged and not e.opaque


def test_opaque_directory_stops_descent(make_env):
    env = make_env(upper={}, lowers=[{"d": Dir({"a": "1"}, opaque=True)}, {"d": {"a": "old", "b": "2"}}])
    e = env.entry("d")
    assert e.dirs == (1,)
    assert env.resolve("d/b") is None
    assert env.read("d/a") == b"1"


def test_opaque_upper_directory_is_marked_opaque(make_env):
    env = make_env(upper={"d": Dir({}, opaque=True)}, lowers=[{"d": {"a": "1"}}, {}])
    e = env.entry("d")
    assert e.dirs == (0,) and e.opaque and not e.merged
    assert env.resolve("d/a") is None


def test_non_directory_below_directory_stops_merge(make_env):
    env = make_env(upper={"d": {"u": "1"}}, lowers=[{"d": "a file"}, {"d": {"deep": "2"}}])
    e = env.entry("d")
    assert e.is_dir and e.dirs == (0,)
    assert env.resolve("d/deep") is None
    assert env.names("d") == {"u"}


def test_directory_below_non_directory_is_hidden(make_env):
    env = make_env(upper={"d": "top file"}, lowers=[{"d": {"x": "1"}}, {}])
    e = env.entry("d")
    assert stat.S_ISREG(e.st.st_mode) and e.layer == 0
    assert env.resolve("d/x") is None


def test_symlink_is_not_followed_when_resolving(make_env):
    env = make_env(upper={"ln": Symlink("d")}, lowers=[{"d": {"x": "1"}}, {}])
    e = env.entry("ln")
    assert stat.S_ISLNK(e.st.st_mode)
    assert env.resolve("ln/x") is None
    assert env.union.readlink(e) == b"d"


def test_resolve_deep_path_through_layers(make_env):
    env = make_env(upper={"a": {}}, lowers=[{"a": {"b": {}}}, {"a": {"b": {"c": {"d": "deep"}}}}])
    e = env.entry("a/b/c/d")
    assert e.layer == 2 and e.path == b"a/b/c/d"
    assert env.read("a/b/c/d") == b"deep"
    assert env.entry("a/b").dirs == (1, 2)
    assert env.resolve("a/b/c/missing") is None
    assert env.resolve("a/b/c/d/under-a-file") is None


def test_resolve_root(make_env):
    env = make_env(upper={}, lowers=[{}, {}])
    root = env.stack.resolve(ROOT)
    assert root is not None and root.path == ROOT and root.dirs == (0, 1, 2)


def test_below_upper(make_env):
    env = make_env(
        upper={"both": "u", "up": "u", "hidden": WHITEOUT},
        lowers=[{"both": "l", "low": "l"}, {"hidden": "l"}],
    )
    root = env.stack.root()
    assert env.stack.below_upper(root, b"both") is not None
    assert env.stack.below_upper(root, b"low") is not None
    assert env.stack.below_upper(root, b"up") is None
    assert env.stack.below_upper(root, b"nothing") is None
    # The upper whiteout is skipped: something does lie beneath it.
    assert env.stack.below_upper(root, b"hidden") is not None


def test_below_upper_none_when_lower_whited_out(make_env):
    env = make_env(upper={"f": "new"}, lowers=[{"f": WHITEOUT}, {"f": "old"}])
    assert env.stack.below_upper(env.stack.root(), b"f") is None


def test_below_upper_without_upper(make_env):
    env = make_env(lowers=[{"f": "x"}, {}], writable=False)
    assert env.stack.upper is None
    assert env.stack.below_upper(env.stack.root(), b"f") is None


def test_xattr_whiteout_hides_in_x_marked_dir(make_env):
    env = make_env(upper={}, lowers=[{"d": Dir({"gone": XWHITEOUT, "kept": "k"}, xwhiteouts=True)},
                                     {"d": {"gone": "old", "other": "o"}}])
    d = env.entry("d")
    assert 1 in d.xattr_whiteouts
    assert not d.opaque and d.dirs == (1, 2)
    assert env.resolve("d/gone") is None
    assert env.names("d") == {"kept", "other"}


def test_xattr_whiteout_ignored_without_x_mark(make_env):
    env = make_env(upper={}, lowers=[{"d": {"gone": XWHITEOUT}}, {"d": {"gone": "old"}}])
    e = env.entry("d/gone")
    assert e.layer == 1 and e.st.st_size == 0
    assert env.names("d") == {"gone"}


def test_user_format_honours_both_namespaces(tmp_path):
    top = tmp_path / "top"
    low = tmp_path / "low"
    (top / "u").mkdir(parents=True)
    (top / "t").mkdir()
    (low / "u").mkdir(parents=True)
    (low / "t").mkdir()
    (low / "u" / "x").write_bytes(b"")
    (low / "t" / "x").write_bytes(b"")
    os.setxattr(top / "u", b"user.overlay.opaque", b"y")
    os.setxattr(top / "t", b"trusted.overlay.opaque", b"y")
    stack = Stack([os.fsencode(top), os.fsencode(low)], writable=False, fmt=XattrFormat.USER)
    try:
        assert stack.private_prefixes == (b"user.overlay.", b"trusted.overlay.")
        assert stack.resolve(b"u/x") is None
        assert stack.resolve(b"t/x") is None
    finally:
        stack.close()


def test_trusted_format_ignores_user_namespace(tmp_path):
    top = tmp_path / "top"
    low = tmp_path / "low"
    (top / "u").mkdir(parents=True)
    (low / "u").mkdir(parents=True)
    (low / "u" / "x").write_bytes(b"1")
    os.setxattr(top / "u", b"user.overlay.opaque", b"y")
    stack = Stack([os.fsencode(top), os.fsencode(low)], writable=False, fmt=XattrFormat.TRUSTED)
    try:
        assert stack.resolve(b"u/x") is not None
    finally:
        stack.close()


def test_stack_close_closes_layer_fds(tmp_path):
    (tmp_path / "a").mkdir()
    stack = Stack([os.fsencode(tmp_path / "a")], writable=False, fmt=XattrFormat.TRUSTED)
    fd = stack.layers[0].fd
    stack.close()
    assert stack.layers[0].fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)


def test_stack_with_missing_layer_raises_and_closes(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError):
        Stack([os.fsencode(tmp_path / "a"), os.fsencode(tmp_path / "missing")], writable=True,
              fmt=XattrFormat.TRUSTED)


# -- listing ----------------------------------------------------------------------------------------------


def test_listdir_merges_all_layers(make_env):
    env = make_env(upper={"u": "1"}, lowers=[{"l1": "2"}, {"l2": "3", "sub": {}}])
    listing = env.union.listdir(env.stack.root())
    assert listing == {
        b"u": (0, stat.S_IFREG),
        b"l1": (1, stat.S_IFREG),
        b"l2": (2, stat.S_IFREG),
        b"sub": (2, stat.S_IFDIR),
    }


def test_listdir_deduplicates_top_down(make_env):
    env = make_env(upper={"x": "u"}, lowers=[{"x": {}, "y": "l1"}, {"x": "l2", "y": Symlink("t")}])
    listing = env.union.listdir(env.stack.root())
    assert listing == {b"x": (0, stat.S_IFREG), b"y": (1, stat.S_IFREG)}


def test_listdir_hides_whiteouts_and_what_they_hide(make_env):
    env = make_env(upper={"a": WHITEOUT, "keep": "k"}, lowers=[{"b": WHITEOUT, "a": "1"}, {"a": "2", "b": "3"}])
    assert env.names() == {"keep"}


def test_listdir_of_opaque_directory(make_env):
    env = make_env(upper={"d": Dir({"new": "n"}, opaque=True)}, lowers=[{"d": {"old": "o"}}, {"d": {"older": "o"}}])
    assert env.names("d") == {"new"}


def test_listdir_opaque_in_middle_layer(make_env):
    env = make_env(upper={"d": {"u": "1"}}, lowers=[{"d": Dir({"m": "2"}, opaque=True)}, {"d": {"l": "3"}}])
    assert env.names("d") == {"u", "m"}


def test_subdirectory_dirs_name_each_layer_a_subdirectory_may_merge(make_env):
    """What a walk lists next: each subdirectory in the layer it was found in and in every layer beneath it
    that the parent merges; files, and layers above where it was found, are not named."""
    env = make_env(upper={"d": {"top": {}, "f": "1"}},
                   lowers=[{"d": {"mid": {}, "top": {}}}, {"d": {"mid": "a file", "low": {}}}])
    d = env.entry("d")
    got = sorted(subdirectory_dirs(d, env.union.listdir(d)))
    assert got == [(0, b"d/top"), (1, b"d/mid"), (1, b"d/top"), (2, b"d/low"), (2, b"d/mid"), (2, b"d/top")]
    for layer, path in got:  # (each is a place the union itself could look: beneath one of the parent's dirs)
        assert layer in d.dirs and path.startswith(b"d/")


def test_subdirectory_dirs_stop_at_an_opaque_parent(make_env):
    env = make_env(upper={"d": Dir({"s": {}}, opaque=True)}, lowers=[{"d": {"s": {}, "t": {}}}, {}])
    d = env.entry("d")
    assert list(subdirectory_dirs(d, env.union.listdir(d))) == [(0, b"d/s")]


def test_listdir_reports_symlink_and_special_types(make_env):
    env = make_env(upper={"ln": Symlink("x")}, lowers=[{}, {}])
    os.mkfifo(env.lowers[0] / "fifo")
    listing = env.union.listdir(env.stack.root())
    assert listing[b"ln"] == (0, stat.S_IFLNK)
    assert listing[b"fifo"] == (1, stat.S_IFIFO)


def test_listdir_upper_names_come_first(make_env):
    env = make_env(upper={"z": "1"}, lowers=[{"a": "2"}, {}])
    assert list(env.union.listdir(env.stack.root()))[0] == b"z"

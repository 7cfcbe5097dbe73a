"""Changes to the namespace: unlink, rmdir, mkdir, rename, link, symlink, mknod, and what they leave in the
upper layer (whiteouts, opaque directories)."""

from __future__ import annotations

import stat

import pytest
from kernel_diff import KERNEL_KEEPS_ORIGIN, StackPair, snapshot_upper

pytestmark = pytest.mark.kernel


def _uppers(pair: StackPair) -> dict[str, dict]:  # type: ignore[type-arg]
    return {"kernel": snapshot_upper(pair.kside.upper), pair.impl: snapshot_upper(pair.uside.upper)}


@pytest.mark.parametrize("path", ["top.txt", "dir/b", "dir/sub/c", "link_to_top", "pipe", "owned"])
def test_unlink_of_a_lower_object_leaves_a_whiteout(pair: StackPair, path: str) -> None:
    pair.expect(("unlink", path), ("ok", None))
    pair.expect(("lstat", path), "ENOENT")
    pair.assert_same_tree()
    pair.assert_same_upper()
    for side, upper in _uppers(pair).items():
        assert upper[path].type == "whiteout", f"{side}: {path} in upper is {upper[path]!r}"


def test_unlink_of_an_upper_only_file_leaves_nothing(pair: StackPair) -> None:
    pair.assert_ops([("create", "dir/new", b"x"), ("unlink", "dir/new"), ("lstat", "dir/new")])
    pair.assert_same_upper()
    for side, upper in _uppers(pair).items():
        assert "dir/new" not in upper, f"{side}: {upper.get('dir/new')!r}"


def test_unlink_then_recreate_replaces_the_whiteout(pair: StackPair) -> None:
    pair.assert_ops([("unlink", "top.txt"), ("create", "top.txt", b"new top"), ("read", "top.txt"),
                     ("stat", "top.txt")])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_rmdir_of_a_merged_directory(pair: StackPair) -> None:
    pair.assert_ops([
        ("rmdir", "dir"),  # not empty yet
        ("unlink", "dir/a"), ("unlink", "dir/b"), ("unlink", "dir/c"), ("unlink", "dir/sub/c"),
        ("rmdir", "dir/sub"), ("listdir", "dir"), ("rmdir", "dir"), ("lstat", "dir"), ("listdir", ""),
    ])
    pair.assert_same_tree()
    pair.assert_same_upper()
    for side, upper in _uppers(pair).items():
        assert upper["dir"].type == "whiteout", f"{side}: {upper['dir']!r}"


def test_rmdir_of_an_empty_lower_directory(pair: StackPair) -> None:
    pair.expect(("rmdir", "emptydir"), ("ok", None))
    pair.assert_same_upper()


def test_rmdir_of_an_upper_only_directory_leaves_nothing(pair: StackPair) -> None:
    pair.assert_ops([("mkdir", "newdir"), ("mkdir", "newdir/sub"), ("rmdir", "newdir"),
                     ("rmdir", "newdir/sub"), ("rmdir", "newdir"), ("lstat", "newdir")])
    pair.assert_same_upper()


def test_mkdir_over_a_whiteout_makes_an_opaque_directory(pair: StackPair) -> None:
    pair.assert_ops([
        ("unlink", "dir/sub/c"), ("rmdir", "dir/sub"), ("mkdir", "dir/sub", 0o700), ("listdir", "dir/sub"),
        ("create", "dir/sub/new", b"n"), ("listdir", "dir/sub"), ("stat", "dir/sub"),
    ])
    pair.assert_same_tree()
    pair.assert_same_upper()
    for side, upper in _uppers(pair).items():
        assert upper["dir/sub"].opaque == b"y", f"{side}: {upper['dir/sub']!r}"


def test_mkdir_where_a_file_was_deleted(pair: StackPair) -> None:
    pair.assert_ops([("unlink", "top.txt"), ("mkdir", "top.txt"), ("listdir", "top.txt"), ("stat", "top.txt")])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_mkdir_over_a_lower_layer_whiteout_does_not_uncover_the_directory_below(pair: StackPair) -> None:
    pair.assert_ops([("lstat", "dir/whd"), ("mkdir", "dir/whd"), ("listdir", "dir/whd"),
                     ("lstat", "dir/whd/leak")])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_mkdir_of_a_new_directory_is_not_opaque(pair: StackPair) -> None:
    pair.assert_ops([("mkdir", "brandnew"), ("mkdir", "dir/brandnew", 0o711), ("mkdir", "brandnew/x")])
    pair.assert_same_upper()


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("top.txt", "dir/top_moved"),  # lower file into a merged dir
        ("dir/a", "deep/er/a"),  # lower file between merged dirs
        ("mid.txt", "shared.txt"),  # over an existing lower file
        ("dir/b", "dir/c"),  # over an existing file in the same dir
        ("link_to_top", "dir/link"),  # a symlink
        ("pipe", "opq/pipe"),  # a fifo into an opaque lower dir
        ("owned", "dir/wh"),  # onto a name whited out in a lower layer
        ("bottom.txt", "xdir/f"),
    ],
)
def test_rename_of_files(pair: StackPair, src: str, dst: str) -> None:
    pair.assert_ops([("rename", src, dst), ("lstat", src), ("lstat", dst), ("read", dst)])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_rename_of_upper_files_and_back(pair: StackPair) -> None:
    pair.assert_ops([
        ("create", "u1", b"one"), ("rename", "u1", "dir/u1"), ("rename", "dir/u1", "top.txt"),
        ("rename", "top.txt", "u1"), ("read", "u1"), ("lstat", "top.txt"), ("rename", "u1", "u1"),
    ])
    pair.assert_same_tree()
    pair.assert_same_upper()


@pytest.mark.parametrize("src", ["dir", "opq", "dir/sub", "emptydir", "deep", "xdir", "filedir"])
def test_rename_of_a_lower_or_merged_directory_gives_exdev(pair: StackPair, src: str) -> None:
    pair.expect(("rename", src, "renamed"), "EXDEV")
    pair.assert_same_upper()


def test_rename_of_a_copied_up_directory_still_gives_exdev(pair: StackPair) -> None:
    pair.assert_ops([("chmod", "xdir", 0o755)])
    pair.expect(("rename", "xdir", "xdir2"), "EXDEV")


def test_rename_of_an_upper_only_directory(pair: StackPair) -> None:
    pair.assert_ops([
        ("mkdir", "nd"), ("create", "nd/f", b"f"), ("rename", "nd", "dir/nd"), ("listdir", "dir/nd"),
        ("rename", "dir/nd", "nd2"), ("read", "nd2/f"),
    ])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_rename_of_an_upper_directory_over_an_empty_lower_directory(pair: StackPair) -> None:
    pair.assert_ops([("mkdir", "nd"), ("create", "nd/f", b"f"), ("rename", "nd", "emptydir"),
                     ("listdir", "emptydir"), ("lstat", "nd")])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_rename_of_an_upper_directory_over_a_deleted_lower_directory(pair: StackPair) -> None:
    pair.assert_ops([
        ("unlink", "dir/sub/c"), ("rmdir", "dir/sub"), ("mkdir", "nd"), ("rename", "nd", "dir/sub"),
        ("listdir", "dir/sub"),
    ])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_rename_noreplace_exchange_and_whiteout_flags(pair: StackPair) -> None:
    pair.assert_ops([
        ("renameat2", "top.txt", "mid.txt", "RENAME_NOREPLACE"),
        ("renameat2", "top.txt", "top_nr", "RENAME_NOREPLACE"),
        ("renameat2", "mid.txt", "bottom.txt", "RENAME_EXCHANGE"),
        ("read", "mid.txt"), ("read", "bottom.txt"),
        ("renameat2", "mid.txt", "nonexistent", "RENAME_EXCHANGE"),
        ("renameat2", "shared.txt", "other", "RENAME_WHITEOUT"),
        ("renameat2", "shared.txt", "mid.txt", "RENAME_NOREPLACE|RENAME_EXCHANGE"),
    ])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_hard_link_to_a_lower_file_copies_it_up_once(pair: StackPair) -> None:
    pair.assert_ops([
        ("link", "top.txt", "dir/top_link"), ("stat", "top.txt"), ("stat", "dir/top_link"),
        ("append", "dir/top_link", b"via link"), ("read", "top.txt"), ("link", "top.txt", "third"),
        ("stat", "third"), ("unlink", "top.txt"), ("stat", "third"), ("read", "dir/top_link"),
    ])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_write_through_a_new_hard_link_of_a_lower_file_updates_its_times(pair: StackPair) -> None:
    pair.assert_ops([("link", "dir/c", "c2"), ("write", "c2", 3, b"XYZ")])
    pair.assert_same_tree()
    pair.assert_ops([("stat", "c2"), ("stat", "dir/c")])


@pytest.mark.skipif(not KERNEL_KEEPS_ORIGIN, reason="in a user namespace the kernel keeps no origin on copy-up, so "
                    "a name linked to a lower file shows another st_ino than the first name (see kernel_diff)")
def test_hard_link_names_share_an_inode_on_each_side(pair: StackPair) -> None:
    pair.assert_ops([("link", "mid.txt", "mid2"), ("create", "u", b"u"), ("link", "u", "dir/u2")])
    k, u = pair.both(lambda root: ((root / "mid.txt").stat().st_ino == (root / "mid2").stat().st_ino,
                                   (root / "u").stat().st_ino == (root / "dir/u2").stat().st_ino))
    assert k == ("ok", (True, True))
    assert u == k


def test_hard_link_to_a_lower_symlink_and_fifo(pair: StackPair) -> None:
    pair.assert_ops([("link", "link_to_top", "l2"), ("readlink", "l2"), ("lstat", "l2"),
                     ("link", "pipe", "pipe2"), ("lstat", "pipe2")])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_symlinks(pair: StackPair) -> None:
    pair.assert_ops([
        ("symlink", "top.txt", "s1"), ("readlink", "s1"), ("read", "s1"), ("lstat", "s1"),
        ("symlink", "../bottom.txt", "dir/s2"), ("read", "dir/s2"),
        ("symlink", "x" * 1000, "long"), ("readlink", "long"),
        ("unlink", "dangling"), ("symlink", "top.txt", "dangling"), ("read", "dangling"),
        ("symlink", "whatever", "dir/wh"), ("readlink", "dir/wh"),
    ])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_mknod_fifo_and_devices(pair: StackPair) -> None:
    pair.assert_ops([
        ("mkfifo", "f1", 0o600), ("lstat", "f1"), ("mkfifo", "dir/f2"), ("unlink", "top.txt"),
        ("mkfifo", "top.txt", 0o644), ("lstat", "top.txt"),
        ("mknod", "null", stat.S_IFCHR | 0o666, 1, 3), ("lstat", "null"),
        ("mknod", "blk", stat.S_IFBLK | 0o600, 7, 0), ("lstat", "blk"),
        ("mknod", "reg", stat.S_IFREG | 0o640), ("lstat", "reg"),
        ("mknod", "zero", stat.S_IFCHR | 0o600, 0, 0), ("lstat", "zero"),
    ])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_create_in_a_lower_only_directory_copies_up_the_parents(pair: StackPair) -> None:
    pair.assert_ops([("create", "deep/er/est/new", b"new"), ("create", "xdir/new", b"n")])
    pair.assert_same_tree()
    pair.assert_same_upper()

"""Lookup and readdir through the layers: what the merged view shows before anything is written."""

from __future__ import annotations

import pytest
from kernel_diff import (
    DIR,
    OPAQUE,
    WHITEOUT,
    File,
    StackPair,
    Symlink,
    assert_same,
    raw_readdir,
    run_op,
    snapshot_tree,
)

pytestmark = pytest.mark.kernel


def test_merged_view_of_three_layers_is_identical(pair: StackPair) -> None:
    pair.assert_same_tree()


def test_lookup_reads_each_name_from_its_topmost_layer(pair: StackPair) -> None:
    pair.expect(("read", "shared.txt"), ("ok", b"shared from l1\n"))
    pair.expect(("read", "mid.txt"), ("ok", b"mid from l2\n"))
    pair.expect(("read", "bottom.txt"), ("ok", b"bottom from l3\n"))
    pair.expect(("read", "dir/a"), ("ok", b"dir/a from l1\n"))
    pair.expect(("read", "dir/c"), ("ok", b"dir/c from l3\n"))
    pair.assert_ops([("stat", p) for p in ("shared.txt", "mid.txt", "bottom.txt", "dir", "dir/a", "dir/b",
                                           "dir/c", "dir/sub", "deep/er/est/file", "deep/er/other")])


def test_whiteout_in_a_lower_layer_hides_the_file_below(pair: StackPair) -> None:
    pair.expect(("stat", "dir/wh"), "ENOENT")
    pair.expect(("read", "dir/wh"), "ENOENT")
    pair.expect(("lstat", "dir/wh"), "ENOENT")
    k, u = pair.op(("listdir", "dir"))
    assert k[0] == "ok" and "wh" not in k[1]
    assert u == k


def test_whiteout_in_the_upper_layer_hides_lower_files_and_dirs(make_pair) -> None:  # type: ignore[no-untyped-def]
    p = make_pair(upper={"top.txt": WHITEOUT, "dir": DIR, "dir/b": WHITEOUT, "deep": WHITEOUT})
    p.expect(("stat", "top.txt"), "ENOENT")
    p.expect(("stat", "dir/b"), "ENOENT")
    p.expect(("stat", "deep"), "ENOENT")
    p.expect(("stat", "deep/er/other"), "ENOENT")
    p.assert_ops([("listdir", ""), ("listdir", "dir")])
    p.assert_same_tree()


def test_opaque_lower_directory_stops_the_merge(pair: StackPair) -> None:
    pair.expect(("listdir", "opq"), ("ok", ["only1"]))
    pair.expect(("stat", "opq/hidden"), "ENOENT")


def test_opaque_upper_directory_stops_the_merge(make_pair) -> None:  # type: ignore[no-untyped-def]
    p = make_pair(upper={"dir": OPAQUE, "dir/new": "only in upper\n"})
    p.expect(("listdir", "dir"), ("ok", ["new"]))
    p.expect(("stat", "dir/a"), "ENOENT")
    p.expect(("stat", "dir/sub/c"), "ENOENT")
    p.assert_same_tree()


def test_directory_hides_a_file_below_and_a_file_hides_a_directory_below(pair: StackPair) -> None:
    pair.expect(("listdir", "filedir"), ("ok", ["inner"]))
    pair.expect(("read", "dirfile"), ("ok", b"a file in l1 over a directory in l3\n"))
    pair.expect(("stat", "dirfile/inner"), "ENOTDIR")


def test_symlinks_resolve_within_the_merged_view(pair: StackPair) -> None:
    pair.expect(("readlink", "link_to_top"), ("ok", "top.txt"))
    pair.expect(("read", "link_to_top"), ("ok", b"top from l1\n"))
    pair.expect(("stat", "dangling"), "ENOENT")
    pair.assert_ops([("lstat", "dangling"), ("lstat", "link_to_top"), ("stat", "link_to_top")])


def test_upper_entries_override_lower_ones(make_pair) -> None:  # type: ignore[no-untyped-def]
    p = make_pair(upper={"shared.txt": File(b"from upper\n", mode=0o600, uid=5), "dir/new": "new\n",
                         "mid.txt": Symlink("bottom.txt")})
    p.expect(("read", "shared.txt"), ("ok", b"from upper\n"))
    p.expect(("read", "mid.txt"), ("ok", b"bottom from l3\n"))
    p.assert_same_tree()


def _readdir_map(root, rel):  # type: ignore[no-untyped-def]
    return sorted((name, dtype) for name, dtype, _ in raw_readdir(root / rel))


@pytest.mark.parametrize("rel", ["", "dir", "opq", "filedir", "deep/er", "emptydir", "xdir"])
def test_readdir_merges_and_dedups_names_with_the_same_d_type(pair: StackPair, rel: str) -> None:
    k, u = pair.both(lambda root: _readdir_map(root, rel))
    assert k[0] == "ok"
    names = [n for n, _ in k[1]]
    assert len(names) == len(set(names)), f"kernel readdir has duplicates: {names}"
    assert u[0] == "ok", f"readdir {rel!r} on {pair.impl}: {u!r}"
    assert_same(dict(k[1]), dict(u[1]), f"readdir {rel!r} (name -> d_type)", lb=pair.impl)


@pytest.mark.parametrize("side", ["kernel", "unionfs"])
def test_readdir_d_ino_matches_st_ino(pair: StackPair, side: str) -> None:
    """On each side separately: for every entry of every directory, d_ino == lstat().st_ino."""
    root = pair.kernel.root if side == "kernel" else pair.unionfs.root
    bad = []
    dirs = [p for p, n in snapshot_tree(root, hash_content=False).items() if n.type == "dir"]
    for rel in dirs:
        base = root if rel == "." else root / rel
        for name, _, d_ino in raw_readdir(base):
            if name == "..":
                continue
            st_ino = (base / name).lstat().st_ino if name != "." else base.lstat().st_ino
            if d_ino != st_ino:
                bad.append(f"{rel}/{name}: d_ino={d_ino} st_ino={st_ino}")
    assert not bad, f"{side}: d_ino != st_ino for:\n" + "\n".join(bad)


def test_readdir_after_changes_stays_merged_and_deduplicated(pair: StackPair) -> None:
    pair.assert_ops([
        ("create", "dir/new", b"n"), ("unlink", "dir/b"), ("write", "dir/c", 0, b"C"), ("mkdir", "dir/nd"),
        ("listdir", "dir"),
    ])
    k, u = pair.both(lambda root: _readdir_map(root, "dir"))
    assert k[0] == u[0] == "ok"
    assert_same(dict(k[1]), dict(u[1]), "readdir 'dir' (name -> d_type)", lb=pair.impl)


def test_run_op_reports_errno_names(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert run_op(tmp_path, ("stat", "missing")) == ("err", "ENOENT")
    assert run_op(tmp_path, ("mkdir", "d"))[0] == "ok"
    assert run_op(tmp_path, ("mkdir", "d")) == ("err", "EEXIST")


def test_regression_an_opaque_marker_on_a_layer_root_is_ignored_as_the_kernel_ignores_it(
        make_pair) -> None:  # type: ignore[no-untyped-def]
    """The kernel merges every layer's root, whatever opaque marker it carries (regression: unionfs honoured
    one, upper or lower, and showed only that layer's entries at the root)."""
    import os

    from kernel_diff import OPAQUE_XATTR

    for marked in ("upper", "l1"):
        p = make_pair(upper={"new": "in upper\n"}, mount=False, name=f"root-opaque-{marked}")
        for side in (p.kside, p.uside):
            os.setxattr(side.upper if marked == "upper" else side.lowers[0], OPAQUE_XATTR, b"y")
        p.mount()
        p.assert_ops([("listdir", ""), ("stat", "bottom.txt"), ("read", "shared.txt"), ("read", "mid.txt")])
        p.assert_same_tree()

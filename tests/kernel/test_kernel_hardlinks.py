"""Hard links in a lower layer (two names of one lower inode): the kernel (without index) shows them as one
inode until a change copies one name up, which breaks the link.  Hard links made through the mount."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kernel_diff import (
    HARDLINK_LOWERS,
    L1,
    PURE_UNIONFS,
    File,
    Hardlink,
    StackPair,
    assert_same,
    new_mount,
    snapshot_tree,
)

pytestmark = pytest.mark.kernel


@pytest.fixture
def hpair(make_pair) -> StackPair:  # type: ignore[no-untyped-def]
    return make_pair(HARDLINK_LOWERS)


def _ino_groups(root: Path) -> object:
    names = ["hl1", "hl2", "dir/hl3"]
    inos = {}
    for n in names:
        try:
            inos[n] = os.lstat(root / n).st_ino
        except FileNotFoundError:
            inos[n] = None
    return {n: sorted(m for m in names if inos[m] is not None and inos[m] == inos[n]) for n in names}


def assert_same_ino_groups(pair: StackPair) -> None:
    """The names share st_ino as on the kernel; in the pure mode (kernel_diff.PURE_UNIONFS), where each name of
    a hard-linked lower file shows its own inode's number, none of the three shares it with another."""
    k, u = pair.both(_ino_groups)
    if PURE_UNIONFS:
        assert k[0] == "ok" and isinstance(k[1], dict)
        alone = {n: [n] if group else [] for n, group in k[1].items()}
        assert u == ("ok", alone), f"pure mode: {pair.impl}={u!r}"
        return
    assert u == k, f"names sharing st_ino: kernel={k!r} {pair.impl}={u!r}"


def test_lower_hard_links_look_like_one_inode(hpair: StackPair) -> None:
    hpair.assert_ops([("stat", "hl1"), ("stat", "hl2"), ("stat", "dir/hl3"), ("read", "hl2")])
    assert_same_ino_groups(hpair)
    hpair.assert_same_tree()


@pytest.mark.parametrize(
    "op",
    [("append", "hl1", b"through hl1"), ("chmod", "hl2", 0o644), ("truncate", "dir/hl3", 0),
     ("setxattr", "hl1", "user.h", b"1"), ("utime", "hl2", 978307200 * 10**9, 978307200 * 10**9)],
)
def test_copy_up_breaks_a_lower_hard_link(hpair: StackPair, op: tuple) -> None:  # type: ignore[type-arg]
    hpair.assert_ops([op, ("read", "hl1"), ("read", "hl2"), ("read", "dir/hl3"), ("stat", "hl1"),
                      ("stat", "hl2"), ("stat", "dir/hl3")])
    assert_same_ino_groups(hpair)
    hpair.assert_same_tree()
    hpair.assert_same_upper()


#: Pairs of names of one lower file each, for the test below.
_PAIRS = 60


@pytest.mark.parametrize("change", [("append", "hl1", b"+"), ("chmod", "hl1", 0o640), ("append", "hl2", b"+")])
def test_regression_the_names_known_before_a_copy_up_share_a_number_after_it(hpair: StackPair,
                                                                            change: tuple) -> None:  # type: ignore[type-arg]
    """Two names known to the kernel first, then one copied up (the first one looked up, whose number the lower
    file had, or another): the copy shows a number of its own at once, the names still naming the lower file
    share one, as on the kernel; then a name removed and listings made (whose entries carry the numbers) change
    none of that. (Regression: removing the name that had been given the lower file's new number gave the
    others the copy's number back, so they looked like hard links of the copy.)"""
    hpair.assert_ops([("stat", "hl1"), ("stat", "hl2"), change,  # (dir/hl3 first looked up after the copy-up)
                      ("stat", "hl1"), ("stat", "hl2"), ("stat", "dir/hl3")])
    assert_same_ino_groups(hpair)
    hpair.assert_ops([("unlink", "dir/hl3"), ("listdir", "."), ("listdir", "dir"), ("stat", "hl1"), ("stat", "hl2")])
    assert_same_ino_groups(hpair)
    k, u = hpair.both(lambda root: {e.name: e.inode() == os.lstat(e.path).st_ino for e in os.scandir(root)})
    assert u == k and all(u[1].values()), f"d_ino == st_ino: kernel={k!r} {hpair.impl}={u!r}"
    hpair.assert_same_tree()
    hpair.assert_same_upper()


@pytest.mark.parametrize("change", [("append", b"+"), ("chmod", 0o640), ("setxattr", "user.h", b"1")])
def test_regression_a_change_through_one_name_of_a_lower_hard_link_copies_up_that_name(make_pair, change) -> None:  # type: ignore[no-untyped-def]
    """A change through one name of a lower hard link, once the kernel knows another name too, copies up the
    name it was made through, not the other one (each name is an inode of its own): that name shows the change
    at once, the other still shows the lower file (two links, the old bytes), and the upper layer holds the
    name changed, as on the kernel. (With both names one inode, ``echo new > a; cat a`` printed the old bytes,
    and the new ones were in the upper layer under ``b``.)"""
    layer: dict[str, object] = {}
    for i in range(_PAIRS):
        layer[f"d{i % 3}/a{i}"] = File(b"lower %d\n" % i)
        layer[f"d{(i + 1) % 3}/b{i}"] = Hardlink(f"d{i % 3}/a{i}")
    pair: StackPair = make_pair([L1, layer])
    ops: list[tuple[object, ...]] = []
    for i in range(_PAIRS):
        other = f"d{(i + 1) % 3}/b{i}"
        changed = f"d{i % 3}/a{i}"
        ops += [("stat", other), (change[0], changed, *change[1:]), ("stat", other), ("read", other),
                ("stat", changed), ("read", changed)]
    pair.assert_ops(ops)
    pair.assert_same_upper()


def test_rename_onto_another_name_of_the_same_lower_inode(hpair: StackPair) -> None:
    """rename(hl1, hl2) renames: the two names are inodes of their own, as on the kernel's overlay (were they one,
    the VFS would take it for a rename onto the same inode and do nothing)."""
    hpair.assert_ops([("rename", "hl1", "hl2"), ("lstat", "hl1"), ("lstat", "hl2"), ("lstat", "dir/hl3")])
    hpair.assert_same_tree()
    hpair.assert_same_upper()


def test_unlink_of_one_name_of_a_lower_hard_link(hpair: StackPair) -> None:
    hpair.assert_ops([("unlink", "hl1"), ("lstat", "hl1"), ("stat", "hl2"), ("read", "hl2")])
    hpair.assert_same_tree()
    hpair.assert_same_upper()


def test_hard_link_to_a_lower_hard_link(hpair: StackPair) -> None:
    hpair.assert_ops([("link", "hl1", "hl4"), ("stat", "hl1"), ("stat", "hl2"), ("stat", "hl4"),
                      ("append", "hl4", b"+"), ("read", "hl1"), ("read", "hl2")])
    hpair.assert_same_tree()
    hpair.assert_same_upper()


def test_remount_after_breaking_a_lower_hard_link(hpair: StackPair) -> None:
    hpair.assert_ops([("append", "hl1", b"changed")])
    before = snapshot_tree(hpair.unionfs.root, stable_only=False)
    hpair.unionfs.unmount()
    hpair.unionfs.mount()
    assert_same(before, snapshot_tree(hpair.unionfs.root, stable_only=False), "view before and after remount",
                la="before", lb="after", context=hpair.context())


def test_kernel_reads_back_broken_lower_hard_links(hpair: StackPair) -> None:
    hpair.assert_ops([("append", "hl1", b"changed"), ("chmod", "dir/hl3", 0o640)])
    before = snapshot_tree(hpair.unionfs.root, stable_only=False)
    hpair.unionfs.unmount()
    kernel = hpair.track(new_mount(hpair.uside, "kernel"))
    kernel.mount()
    assert_same(before, snapshot_tree(kernel.root, stable_only=False), "view of the same layers",
                la=hpair.impl, lb="kernel")

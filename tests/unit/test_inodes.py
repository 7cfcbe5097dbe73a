"""The inode table of the FUSE server: nodes kept small (a packed stat, the whole entry only for the recently
used), lookup counts, hard links, renames, and memory given back once the kernel has forgotten most nodes."""

from __future__ import annotations

import os
import stat
import sys
import tracemalloc
from pathlib import Path

import pyfuse3
import pytest

from unionfs.copyup import CopiedUp
from unionfs.fuse import inodes
from unionfs.fuse.inodes import RECENT, TRIM_MIN, InodeTable, Node, shared_listing
from unionfs.layers import ROOT, Entry

STAT_FIELDS = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime", "st_mtime",
               "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blksize", "st_blocks", "st_rdev")


def same_stat(a: os.stat_result, b: os.stat_result) -> bool:
    return tuple(a) == tuple(b) and all(getattr(a, f) == getattr(b, f) for f in STAT_FIELDS)


def push_out(node: Node) -> None:
    """Make enough other nodes whole that ``node`` keeps only the parts of its entry."""
    filler = Entry(b"filler", 0, os.stat("/"))
    for i in range(RECENT):
        Node(10_000 + i, filler)
    assert node._entry is None


def make_files(root: Path, n: int) -> list[Path]:
    root.mkdir(exist_ok=True)
    paths = [root / f"f{i}" for i in range(n)]
    for p in paths:
        p.touch()
    return paths


@pytest.fixture
def table(tmp_path: Path) -> InodeTable:
    return InodeTable([os.stat(tmp_path).st_dev], Entry(ROOT, 0, os.stat(tmp_path), (0,)))


@pytest.mark.parametrize("times_ns", [
    (1_700_000_000_123_456_789, 1_600_000_000_000_000_001),  # ordinary, with nanoseconds
    (-1_234_567_890_987_654_321, -1),  # before 1970: negative seconds, positive nanoseconds
    (0, 999_999_999),
])
def test_packed_stat_is_the_stat(tmp_path: Path, times_ns: tuple[int, int]) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 5000)
    os.utime(f, ns=times_ns)
    st = os.lstat(f)
    packed = inodes._pack(st)
    assert isinstance(packed, bytes) and len(packed) == 92
    back = inodes._unpack(packed)
    assert same_stat(back, st)


def test_stat_beyond_packing_is_kept_whole(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.touch()
    os.utime(f, ns=(1 << 63, 0))  # past 2262: more nanoseconds than 64 bits hold
    st = os.lstat(f)
    assert inodes._pack(st) is st
    partial = os.stat_result((stat.S_IFREG, 5, 6, 1, 0, 0, 0, 0, 0, 0))  # as DirListing makes unreachable ones
    assert inodes._pack(partial) is partial
    node = Node(2, Entry(b"f", 1, partial))
    push_out(node)
    assert node.entry.st is partial
    assert node.identity() == (stat.S_IFREG, 6, 5)


def test_entry_made_again_equals_the_original(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    entry = Entry(b"a/d", 1, os.lstat(d), (1, 2, 3), frozenset({2}), True)
    node = Node(7, entry)
    assert node.entry is entry  # recently made: kept whole
    push_out(node)
    again = node.entry
    assert again == entry and again is not entry
    assert same_stat(again.st, entry.st)
    assert node.identity() == (entry.st.st_mode, entry.st.st_dev, entry.st.st_ino)
    assert node.entry is again  # whole again, until pushed out once more


def test_shapes_are_shared(tmp_path: Path) -> None:
    files = make_files(tmp_path / "s", 2)
    a, b = (Node(2 + i, Entry(b"f%d" % i, 1, os.lstat(p))) for i, p in enumerate(files))
    push_out(a)
    assert b._entry is None
    assert a._shape is b._shape


def test_lookup_counts_are_exact(table: InodeTable, tmp_path: Path) -> None:
    (f,) = make_files(tmp_path / "c", 1)
    entry = Entry(b"c/f0", 0, os.lstat(f))
    node = table.reference(entry)
    assert table.reference(entry) is node
    table.listed(node)
    push_out(node)
    table.forget(node.ino, 2)
    assert table.get(node.ino) is node and table.by_path[b"c/f0"] is node
    table.forget(node.ino, 1)
    assert node.ino not in table.nodes and b"c/f0" not in table.by_path
    again = table.reference(entry)
    assert again is not node and again.ino == node.ino  # the same number: derived from the real inode
    table.forget(again.ino, 5)  # more than it holds: none left, never below
    assert again.ino not in table.nodes


def test_hard_links_share_a_node(table: InodeTable, tmp_path: Path) -> None:
    (f,) = make_files(tmp_path / "h", 1)
    os.link(f, tmp_path / "h" / "g")
    first = table.reference(Entry(b"h/f0", 0, os.lstat(f)))
    push_out(first)
    second = table.reference(Entry(b"h/g", 0, os.lstat(tmp_path / "h" / "g")))
    assert second is first and first.paths == [b"h/f0", b"h/g"]
    table.unlinked(first, b"h/f0", last_link=False)
    assert first.paths == [b"h/g"] and first.path == b"h/g" and first.entry.path == b"h/g"
    assert not first.unlinked and table.by_path[b"h/g"] is first
    table.unlinked(first, b"h/g", last_link=True)
    assert first.unlinked and first.paths == [] and b"h/g" not in table.by_path


def test_each_name_of_a_lower_hard_link_is_a_node_showing_the_files_number(table: InodeTable, tmp_path: Path) -> None:
    """A change through one name of a hard-linked lower file copies up that name alone, so each name is a node
    of its own (FUSE requests name the inode only); the others show the first one's number, and once that
    one is copied up (it keeps its number) a new one."""
    (f,) = make_files(tmp_path / "h", 1)
    os.link(f, tmp_path / "h" / "g")
    os.link(f, tmp_path / "h" / "k")
    first = table.reference(Entry(b"h/f0", 1, os.lstat(f)))
    second = table.reference(Entry(b"h/g", 1, os.lstat(tmp_path / "h" / "g")))
    third = table.reference(Entry(b"h/k", 1, os.lstat(tmp_path / "h" / "k")))
    assert len({first.ino, second.ino, third.ino}) == 3
    assert second.paths == [b"h/g"] and first.paths == [b"h/f0"]
    assert table.shown(first) is None and table.shown(second) == table.shown(third) == first.ino
    # The first name copied up: it keeps its number; the names still naming the lower file show another.
    upper = tmp_path / "upper"
    upper.touch()
    assert table.copied_up(CopiedUp(first.entry, Entry(b"h/f0", 0, os.lstat(upper)))) == [second, third]
    renumbered = table.shown(second)
    assert renumbered not in (None, first.ino) and table.shown(third) == renumbered
    # Another name copied up shows its own number from then on; the last one keeps the lower file's.
    upper2 = tmp_path / "upper2"
    upper2.touch()
    assert table.copied_up(CopiedUp(second.entry, Entry(b"h/g", 0, os.lstat(upper2)))) == [second]
    assert table.shown(second) is None and table.shown(third) == renumbered
    # A name looked up again once the kernel forgot it is a node of the lower file's (new) number.
    table.forget(third.ino, 1)
    assert table.take_dropped_names() == [third.ino] and table.take_dropped_names() == []
    again = table.reference(Entry(b"h/k", 1, os.lstat(tmp_path / "h" / "k")))
    assert again.ino == renumbered and table.shown(again) is None


def test_regression_removing_a_lower_name_keeps_the_number_its_other_names_show(table: InodeTable,
                                                                               tmp_path: Path) -> None:
    """(Regression: removing the name that held the lower file's new number, once its first name was copied up,
    gave the other names the copy's number back.)"""
    (f,) = make_files(tmp_path / "h", 1)
    for n in ("g", "k"):
        os.link(f, tmp_path / "h" / n)
    first = table.reference(Entry(b"h/f0", 1, os.lstat(f)))
    second = table.reference(Entry(b"h/g", 1, os.lstat(tmp_path / "h" / "g")))
    upper = tmp_path / "upper"
    upper.touch()
    table.copied_up(CopiedUp(first.entry, Entry(b"h/f0", 0, os.lstat(upper))))
    third = table.reference(Entry(b"h/k", 1, os.lstat(tmp_path / "h" / "k")))
    shown = table.shown(second)
    assert third.ino == shown and shown != first.ino
    table.unlinked(third, b"h/k", last_link=True)  # (a whiteout; the kernel still holds the node)
    assert table.shown(second) == shown
    again = table.reference(Entry(b"h/k2", 1, os.lstat(tmp_path / "h" / "k")))
    assert again is not third and table.shown(again) == shown == table.shown(second)


def test_names_of_a_lower_hard_link_are_one_node_where_nothing_is_copied_up(tmp_path: Path) -> None:
    table = InodeTable([os.stat(tmp_path).st_dev], Entry(ROOT, 0, os.stat(tmp_path), (0,)), writable=False)
    (f,) = make_files(tmp_path / "h", 1)
    os.link(f, tmp_path / "h" / "g")
    first = table.reference(Entry(b"h/f0", 1, os.lstat(f)))
    assert table.reference(Entry(b"h/g", 1, os.lstat(tmp_path / "h" / "g"))) is first
    assert first.paths == [b"h/f0", b"h/g"] and table.shown(first) is None


def test_rename_moves_compacted_descendants(table: InodeTable, tmp_path: Path) -> None:
    (tmp_path / "r" / "sub").mkdir(parents=True)
    (tmp_path / "r" / "sub" / "x").touch()
    d = table.reference(Entry(b"r", 0, os.lstat(tmp_path / "r"), (0,)))
    sub = table.reference(Entry(b"r/sub", 0, os.lstat(tmp_path / "r" / "sub"), (0,)))
    x = table.reference(Entry(b"r/sub/x", 0, os.lstat(tmp_path / "r" / "sub" / "x")))
    push_out(x)
    table.renamed(table.root, b"r", Entry(b"q", 0, os.lstat(tmp_path / "r"), (0,)), None, False)
    assert d.path == b"q" and sub.path == b"q/sub" and x.path == b"q/sub/x"
    assert x.entry.path == b"q/sub/x" and table.by_path[b"q/sub/x"] is x and b"r/sub/x" not in table.by_path
    assert same_stat(x.entry.st, os.lstat(tmp_path / "r" / "sub" / "x"))


def test_copy_up_keeps_the_number(table: InodeTable, tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.touch()
    upper.touch()
    old = Entry(b"f", 1, os.lstat(lower))
    node = table.reference(old)
    push_out(node)
    new = Entry(b"f", 0, os.lstat(upper))
    assert table.copied_up(CopiedUp(old, new)) == []
    assert node.entry == new and node.identity()[2] == upper.stat().st_ino
    assert table.reference(new) is node and table.number(new.st) == node.ino


def test_listing_values_are_shared() -> None:
    names = {b"a": (1, stat.S_IFREG), b"b": (1, stat.S_IFREG), b"c": (2, stat.S_IFDIR)}
    copy = {k: tuple(v) for k, v in names.items()}
    got = shared_listing(names)
    assert got == copy and list(got) == [b"a", b"b", b"c"]
    assert got[b"a"] is got[b"b"]


def test_trim_after_the_kernel_forgot_most_nodes(table: InodeTable, tmp_path: Path) -> None:
    files = make_files(tmp_path / "t", TRIM_MIN + 1000)
    nodes = [table.reference(Entry(b"t/" + p.name.encode(), 0, os.lstat(p))) for p in files]
    assert not table.trim()  # nothing forgotten
    big_nodes, big_paths = sys.getsizeof(table.nodes), sys.getsizeof(table.by_path)
    for node in nodes[:TRIM_MIN // 2]:
        table.forget(node.ino, 1)
    assert not table.trim()  # still more than a quarter of the peak
    for node in nodes[:-100]:
        table.forget(node.ino, 1)
    assert table.trim()
    assert sys.getsizeof(table.nodes) < big_nodes // 8 and sys.getsizeof(table.by_path) < big_paths // 8
    assert not table.trim()  # the peak is what is left now
    left = nodes[-100:]
    assert all(table.get(n.ino) is n and table.by_path[n.path] is n for n in left)
    assert all(n._entry is None for n in left)  # none kept whole any more
    assert same_stat(left[0].entry.st, os.lstat(files[-100]))
    assert table.get(pyfuse3.ROOT_INODE) is table.root


def test_memory_per_node(table: InodeTable, tmp_path: Path) -> None:
    """What a node costs, everything it holds counted (maps, path, packed stat), with the entries pushed out:
    about 400 bytes where a node keeping its Entry and os.stat_result took about 990."""
    files = make_files(tmp_path / "m", 4000)
    stats = [os.lstat(p) for p in files]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for p, st in zip(files, stats, strict=True):
            table.listed(table.node_for(Entry(b"m/" + p.name.encode(), 0, st)))
        push_out(table.root)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert (after - before) / len(files) < 600


def test_regression_freed_directory_drops_its_listing(table: InodeTable, tmp_path: Path) -> None:
    """A freed node stays among the recently used until pushed out: the listing of a large directory must not
    stay alive with it."""
    (tmp_path / "big").mkdir()
    node = table.reference(Entry(b"big", 0, os.lstat(tmp_path / "big"), (0,)))
    node.listing = {b"n%d" % i: (0, stat.S_IFREG) for i in range(1000)}
    assert node in inodes._recent.ring
    table.forget(node.ino, 1)
    assert node.ino not in table.nodes
    assert node.listing is None


def test_regression_many_names_of_one_file(table: InodeTable, tmp_path: Path) -> None:
    """Adding a name to a file with many appends in place (a copy of every name for each new one made the
    lookups of n hard links quadratic)."""
    d = tmp_path / "many"
    d.mkdir()
    (d / "n0").touch()
    for i in range(1, 300):
        os.link(d / "n0", d / f"n{i}")
    node = table.reference(Entry(b"many/n0", 0, os.lstat(d / "n0")))
    names = None
    for i in range(1, 300):
        assert table.reference(Entry(b"many/n%d" % i, 0, os.lstat(d / f"n{i}"))) is node
        if i == 2:
            names = node._names
    assert node._names is names  # the same list all along
    assert node.paths == [b"many/n%d" % i for i in range(300)]
    table.unlinked(node, b"many/n150", last_link=False)
    table.unlinked(node, b"many/n0", last_link=False)
    assert node.path == b"many/n1" and len(node.paths) == 298 and b"many/n150" not in table.by_path
    table.forget(node.ino, 300)
    assert node.ino not in table.nodes and not any(p.startswith(b"many/") for p in table.by_path)


# -- the packed form after changes made while a node is compacted ------------------------------------------------

def test_copy_up_survives_a_second_push_out(table: InodeTable, tmp_path: Path) -> None:
    """A node compacted, copied up, then compacted again keeps the copy's layer and stat."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.write_bytes(b"abc")
    upper.write_bytes(b"abcdef")
    old = Entry(b"f", 1, os.lstat(lower))
    node = table.reference(old)
    push_out(node)
    new = Entry(b"f", 0, os.lstat(upper))
    table.copied_up(CopiedUp(old, new))
    push_out(node)  # compacted again: the parts must be the copy's
    assert node.entry == new and node.entry.layer == 0 and same_stat(node.entry.st, new.st)

def test_update_survives_a_second_push_out(table: InodeTable, tmp_path: Path) -> None:
    f = tmp_path / "g"
    f.write_bytes(b"x")
    node = table.reference(Entry(b"g", 0, os.lstat(f)))
    push_out(node)
    f.write_bytes(b"x" * 9000)
    os.utime(f, ns=(1, 2))
    table.update(node, Entry(b"g", 0, os.lstat(f)))
    push_out(node)
    assert same_stat(node.entry.st, os.lstat(f))

def test_device_numbers_and_big_fields() -> None:
    st = os.lstat("/dev/null")
    assert st.st_rdev != 0
    assert same_stat(inodes._unpack(inodes._pack(st)), st)
    full = os.lstat("/")
    big = os.stat_result((full.st_mode, (1 << 64) - 1, (1 << 64) - 1, (1 << 64) - 1, (1 << 32) - 1, (1 << 32) - 1,
                          (1 << 63) - 1, full[7], full[8], full[9], full.st_atime, full.st_mtime, full.st_ctime,
                          full.st_atime_ns, full.st_mtime_ns, full.st_ctime_ns, 1 << 20, (1 << 63) - 1, (1 << 64) - 1))
    assert same_stat(inodes._unpack(inodes._pack(big)), big)

def test_hard_link_rename_of_compacted(table: InodeTable, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    f = tmp_path / "a" / "x"
    f.touch()
    os.link(f, tmp_path / "a" / "y")
    d = table.reference(Entry(b"a", 0, os.lstat(tmp_path / "a"), (0,)))
    n = table.reference(Entry(b"a/x", 0, os.lstat(f)))
    assert table.reference(Entry(b"a/y", 0, os.lstat(tmp_path / "a" / "y"))) is n
    push_out(n)
    push_out(d)
    table.renamed(table.root, b"a", Entry(b"b", 0, os.lstat(tmp_path / "a"), (0,)), None, False)
    assert n.paths == [b"b/x", b"b/y"] and n.path == b"b/x" and n.entry.path == b"b/x"
    push_out(n)
    assert n.entry.path == b"b/x" and table.by_path[b"b/y"] is n and table.by_path[b"b/x"] is n

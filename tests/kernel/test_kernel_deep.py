"""Trees deeper than PATH_MAX: the kernel limits each call's own path, not the depth of what a process reaches
relative to its working directory. A process ``cd``s ever deeper into both mounts and works there, with paths
up to PATH_MAX-1 bytes relative to that directory; every result and errno, the merged trees and the upper
layers on disk must be the same on unionfs as on the kernel, copy-up of objects 10,000 bytes deep included."""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from kernel_diff import (
    IMPL,
    IN_USER_NAMESPACE,
    Result,
    StackPair,
    diff_snapshots,
    format_op,
    run_op,
    snapshot_tree,
    snapshot_upper,
)

pytestmark = pytest.mark.kernel

PATH_MAX = 4096  # with the terminating NUL, as the kernel counts it
NAME_MAX = 255


def level(i: int, width: int = 100) -> str:
    """The name of the i-th directory of a deep chain: ``width`` bytes, the level readable at its start."""
    head = f"d{i:04d}"
    return head + "x" * (width - len(head))


def chain(n: int, width: int = 100, start: int = 0) -> list[str]:
    return [level(i, width) for i in range(start, start + n)]


@contextlib.contextmanager
def inside(root: Path, names: Sequence[str]) -> Iterator[None]:
    """Work in ``root/names...``, reached one name at a time (the whole path may be far longer than PATH_MAX);
    the working directory is given back on leaving."""
    back = os.open(".", os.O_PATH | os.O_DIRECTORY)
    try:
        os.chdir(root)
        for name in names:
            os.chdir(name)
        yield
    finally:
        os.fchdir(back)
        os.close(back)


def make_chain(root: Path, names: Sequence[str], mode: int = 0o755) -> None:
    """Make the directories ``root/names...`` one level at a time (existing ones are kept)."""
    with inside(root, ()):
        for name in names:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, mode)
            os.chdir(name)


def write(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def ops_at(pair: StackPair, where: Sequence[str], ops: Sequence[Sequence[Any]]) -> list[tuple[Result, Result]]:
    """Run ``ops`` (paths relative to ``where``, itself reached from each mount's root one name at a time) on
    the kernel's mount, then on unionfs; the pairs of results."""
    results: list[tuple[Result, Result]] = []
    for op in ops:
        with inside(pair.kernel.root, where):
            k = run_op("", op)
        with inside(pair.unionfs.root, where):
            u = run_op("", op)
        results.append((k, u))
    return results


def short(text: str) -> str:
    """``text`` (a path, or an operation with its paths) with its long names cut, for messages."""
    return re.sub(r"[^/'\"(), ]{13,}", lambda m: f"{m.group()[:5]}~{len(m.group())}", text)


def assert_same_results(ops: Sequence[Sequence[Any]], results: Sequence[tuple[Result, Result]]) -> None:
    bad = [f"  {short(format_op(op))}: kernel={k!r} {IMPL}={u!r}"
           for op, (k, u) in zip(ops, results, strict=True) if k != u]
    assert not bad, f"{len(bad)} of {len(ops)} operation(s) differ:\n" + "\n".join(bad)


def assert_same_trees(pair: StackPair, *, upper: bool = True) -> dict[str, Any]:
    k = snapshot_tree(pair.kernel.root)
    u = snapshot_tree(pair.unionfs.root)
    lines = diff_snapshots(k, u, lb=IMPL)
    assert not lines, "merged views differ:\n" + "\n".join(short(line) for line in lines[:40])
    if upper:
        pair.unmount_all()
        ku = snapshot_upper(pair.kside.upper)
        uu = snapshot_upper(pair.uside.upper)
        lines = diff_snapshots(ku, uu, lb=IMPL)
        assert not lines, "upper layers differ:\n" + "\n".join(short(line) for line in lines[:40])
    return k


def depth_of(names: Sequence[str]) -> int:
    return sum(len(n) + 1 for n in names)


# A path of PATH_MAX-1 bytes relative to the working directory: 16 directories of 250 bytes, then a name of
# 78 bytes; ``long_path(tag)`` differs in its last name only.
REL_DIRS = chain(16, 250)
REL_DIR = "/".join(REL_DIRS)


def long_path(tag: str) -> str:
    name = tag + "n" * (PATH_MAX - 1 - len(REL_DIR) - 1 - len(tag))
    path = f"{REL_DIR}/{name}"
    assert len(path) == PATH_MAX - 1
    return path


def test_a_tree_built_deep_inside_the_mount(make_pair: Any) -> None:
    """``cd`` 6,000 bytes deep from the mount root, then every kind of change with paths of PATH_MAX-1 bytes
    from there: all succeed as on the kernel; one byte more, or a name over NAME_MAX, fails with the kernel's
    ENAMETOOLONG."""
    pair: StackPair = make_pair([{"top.txt": "top\n"}])
    where = chain(60)
    assert depth_of(where) > PATH_MAX
    for root in pair.roots:
        make_chain(root, where)
    f, g, h, s, p, c, d = (long_path(t) for t in ("f", "g", "h", "s", "p", "c", "d"))
    ops: list[Sequence[Any]] = []
    # the directories on the way, each made with a path shorter than PATH_MAX
    ops += [("mkdir", "/".join(REL_DIRS[:i + 1]), 0o755) for i in range(len(REL_DIRS))]
    ops += [
        ("create", f, b"first content\n", 0o644), ("stat", f), ("read", f),
        ("chmod", f, 0o640), ("chown", f, 1234, 5678), ("truncate", f, 5), ("read", f),
        ("append", f, b"+more"), ("read", f), ("lstat", f),
        ("link", f, g), ("stat", g), ("rename", g, h), ("lstat", h), ("stat", f),
        ("symlink", "a/target", s), ("readlink", s), ("lstat", s),
        ("mkfifo", p, 0o600), ("lstat", p),
        ("mknod", c, stat.S_IFCHR | 0o644, 1, 3), ("lstat", c),
        ("setxattr", f, "user.deep", b"value"), ("getxattr", f, "user.deep"), ("listxattr", f),
        ("removexattr", f, "user.deep"), ("listxattr", f),
        ("utime", f, 10**18 - 10**9, 10**18 - 10**9), ("lstat", f),
        ("mkdir", d, 0o700), ("listdir", d), ("rmdir", d), ("mkdir", d, 0o755),
        ("listdir", REL_DIR),
        ("unlink", h), ("unlink", s), ("stat", f),
    ]
    # the kernel's own limits: a path of PATH_MAX bytes, a name over NAME_MAX
    limits: list[Sequence[Any]] = [
        ("stat", f + "x"), ("create", f + "x", b"", 0o644), ("mkdir", REL_DIR + "/" + "q" * 80, 0o755),
        ("create", "z" * (NAME_MAX + 1), b"", 0o644), ("rename", f, "y" * (NAME_MAX + 1)),
    ]
    results = ops_at(pair, where, ops + limits)
    assert_same_results(ops + limits, results)
    # the premise: at this depth the kernel did all of it (a device node needs root, and so its lstat then
    # fails; a chown to other ids too), and refused exactly the paths and names that are too long
    may_refuse = {"mknod", "chown", "lstat"} if os.geteuid() != 0 or IN_USER_NAMESPACE else set()
    assert [op for op, (k, _u) in zip(ops, results[:len(ops)], strict=True)
            if k[0] != "ok" and op[0] not in may_refuse] == []
    assert [k for k, _u in results[len(ops):]] == [("err", "ENAMETOOLONG")] * len(limits)
    assert_same_trees(pair)


def _deep_lowers(pair: StackPair, deep: Sequence[str]) -> None:
    """Lower layers (made on each side alike) holding a chain ``deep`` and more below it: the bottom layer the
    whole chain with files, a hard-linked pair, a symlink and a subdirectory at its end; the layer above it
    the first half of the chain (the directories merge) with a file of its own, and deeper a directory
    standing where the bottom layer has one (merged too)."""
    for side in (pair.kside, pair.uside):
        top, bottom = side.lowers[0], side.lowers[1]
        make_chain(bottom, deep)
        with inside(bottom, deep):
            write("file", b"lower content " * 100)
            write("other", b"another file\n")
            os.link("file", "file-link")
            os.symlink("file", "sym")
            os.mkdir("sub", 0o750)
            write("sub/inner", b"inner\n", 0o600)
            os.mkdir("emptied", 0o755)
            write("emptied/gone", b"x")
        half = deep[:len(deep) // 2]
        make_chain(top, half)
        with inside(top, half):
            write("upper-lower", b"from the top lower layer\n")


def test_copy_up_10000_bytes_deep_from_the_lower_layers(make_pair: Any) -> None:
    """Objects more than 10,000 bytes below the mount root, in lower layers: written, renamed, linked, removed
    and changed from a working directory down there, each copy-up bringing the whole chain of directories up;
    the kernel sees the same, and writes the same upper layer."""
    pair: StackPair = make_pair([{"a.txt": "a\n"}, {"b.txt": "b\n"}], mount=False)
    deep = chain(102)
    assert depth_of(deep) > 10_000
    _deep_lowers(pair, deep)
    pair.mount()
    ops: list[Sequence[Any]] = [
        ("read", "file"), ("stat", "file"), ("listdir", "./"),
        ("write", "file", 0, b"NEW"),  # copy-up of a file and its 102 parents
        ("read", "file"), ("stat", "file-link"), ("read", "file-link"),
        ("chmod", "other", 0o600), ("stat", "other"),
        ("setxattr", "sub/inner", "user.k", b"v"), ("getxattr", "sub/inner", "user.k"),
        ("rename", "other", "sub/moved"), ("listdir", "sub"), ("listdir", "./"),
        ("unlink", "emptied/gone"), ("rmdir", "emptied"), ("mkdir", "emptied", 0o700),  # whiteout, then opaque
        ("listdir", "emptied"),
        ("link", "file-link", "third-name"), ("stat", "third-name"),
        ("rename", "sym", "sub/inner"), ("readlink", "sub/inner"),
        ("unlink", "file"), ("stat", "file-link"),
    ]
    results = ops_at(pair, deep, ops)
    assert_same_results(ops, results)
    assert [short(format_op(op)) + f": {k}" for op, (k, _u) in zip(ops, results, strict=True) if k[0] != "ok"] == [], \
        "premise: the kernel did every operation"
    # and from the middle of the chain, where the two lower layers merge
    half = deep[:len(deep) // 2]
    ops2: list[Sequence[Any]] = [("listdir", "./"), ("read", "upper-lower"), ("unlink", "upper-lower"),
                                 ("listdir", "./"), ("create", "fresh", b"fresh\n", 0o644)]
    results2 = ops_at(pair, half, ops2)
    assert_same_results(ops2, results2)
    tree = assert_same_trees(pair)
    assert any(key.endswith("/third-name") for key in tree)


def test_a_long_rename_across_deep_directories(make_pair: Any) -> None:
    """Renames and hard links between two deep directories with paths of PATH_MAX-1 bytes on both sides, over
    a lower file (copied up on the way) and over an existing name."""
    pair: StackPair = make_pair([{"x": "x\n"}, {"y": "y\n"}], mount=False)
    deep = chain(45)
    for side in (pair.kside, pair.uside):
        make_chain(side.lowers[1], deep + REL_DIRS)
        with inside(side.lowers[1], deep + REL_DIRS):
            write(long_path("a").rpartition("/")[2], b"lower a\n")
            write(long_path("b").rpartition("/")[2], b"lower b\n")
    pair.mount()
    a, b, c, d = long_path("a"), long_path("b"), long_path("c"), long_path("d")
    ops: list[Sequence[Any]] = [
        ("read", a), ("rename", a, b), ("read", b), ("stat", a),
        ("link", b, c), ("stat", c), ("create", a, b"new a\n", 0o644),
        ("renameat2", a, c, "RENAME_EXCHANGE"), ("read", a), ("read", c), ("stat", b),
        ("renameat2", c, b, "RENAME_NOREPLACE"), ("rename", c, d), ("listdir", REL_DIR),
    ]
    results = ops_at(pair, deep, ops)
    assert_same_results(ops, results)
    assert_same_trees(pair)

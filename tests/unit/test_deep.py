"""Merged paths longer than PATH_MAX: reached in steps (unionfs._at), by every operation of the core, and with
one lookup per level when a copy-up brings a deep chain of directories up."""

from __future__ import annotations

import errno
import os
import random
import stat
from pathlib import Path
from typing import Any

import pytest

from unionfs._at import PATH_MAX, At, ProcAt
from unionfs.copyup import Workdir
from unionfs.layers import ROOT, Entry, Stack, join
from unionfs.ownership import OVERRIDE_XATTR, Ownership, decode_override
from unionfs.union import Union
from unionfs.whiteout import XattrFormat, is_whiteout_stat


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def make_chain(root: Path, names: list[bytes]) -> list[os.stat_result]:
    """Directories ``root/names...`` made one level at a time; the stat of each."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    out = []
    try:
        for name in names:
            os.mkdir(name, 0o755, dir_fd=fd)
            inner = os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
            out.append(os.fstat(fd))
    finally:
        os.close(fd)
    return out


def test_a_short_path_is_used_as_it_is(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        path = b"a" * 100 + b"/" + b"b" * (PATH_MAX - 101)
        with At(fd, path) as (dfd, rel):
            assert (dfd, rel) == (fd, path)
        with ProcAt(fd, b"x") as full:
            assert full == b"/proc/self/fd/%d/x" % fd
    finally:
        os.close(fd)


@pytest.mark.parametrize("seed", range(4))
def test_every_level_of_a_deep_chain_is_reached(tmp_path: Path, seed: int) -> None:
    """Names of random lengths, 30,000 bytes deep: every prefix resolves to its own directory, the part given to
    the call fits in one, and no descriptor is left open."""
    rng = random.Random(seed)
    names: list[bytes] = []
    while sum(len(n) + 1 for n in names) < 30_000:
        names.append(b"%d" % len(names) + b"n" * rng.randint(1, 250))
    stats = make_chain(tmp_path, names)
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    before = open_fds()
    try:
        for depth in range(1, len(names) + 1, 3):
            path = b"/".join(names[:depth])
            with At(root, path) as (fd, rel):
                assert len(rel) <= PATH_MAX
                st = os.stat(rel, dir_fd=fd, follow_symlinks=False)
            assert (st.st_dev, st.st_ino) == (stats[depth - 1].st_dev, stats[depth - 1].st_ino)
            with ProcAt(root, path) as full:
                assert len(full) <= PATH_MAX
                assert os.lstat(full).st_ino == stats[depth - 1].st_ino
        assert open_fds() == before
    finally:
        os.close(root)


def test_a_missing_directory_on_the_way_fails_without_leaking(tmp_path: Path) -> None:
    names = [b"d" * 200] * 30
    make_chain(tmp_path, names)
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    before = open_fds()
    try:
        # (a missing name among the directories opened on the way; one in the rest fails the call itself)
        # (and one in the second piece opened, past the first descriptor opened on the way)
        for broken in (names[:25] + [b"missing"] + names[:10], names[:5] + [b"missing"] + names[:25],
                       names[:25] + [b"missing"] + names[:25]):
            with pytest.raises(FileNotFoundError), At(root, b"/".join(broken)) as (fd, rel):
                os.stat(rel, dir_fd=fd)
        assert open_fds() == before
    finally:
        os.close(root)


# -- the core at depth -----------------------------------------------------------------------------------------

DEEP = [b"%03d" % i + b"x" * 97 for i in range(105)]  # 10,605 bytes


def _write_at(root: Path, names: list[bytes], name: bytes, data: bytes) -> None:
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        with At(fd, b"/".join([*names, name])) as (dfd, rel):
            wfd = os.open(rel, os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=dfd)
            os.write(wfd, data)
            os.close(wfd)
    finally:
        os.close(fd)


def _lstat_at(root: Path, path: bytes) -> os.stat_result:
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        with At(fd, path) as (dfd, rel):
            return os.stat(rel, dir_fd=dfd, follow_symlinks=False)
    finally:
        os.close(fd)


def _union(tmp_path: Path, ownership: Ownership | None = None) -> tuple[Union, Path, Path]:
    upper, lower, work = tmp_path / "upper", tmp_path / "lower", tmp_path / "work"
    for d in (upper, lower, work):
        d.mkdir()
    make_chain(lower, DEEP)
    _write_at(lower, DEEP, b"file", b"deep lower content\n")
    stack = Stack([os.fsencode(upper), os.fsencode(lower)], writable=True, fmt=XattrFormat.TRUSTED)
    return Union(stack, Workdir(os.fsencode(work)), ownership), upper, lower


def _entry(union: Union, path: bytes) -> Entry:
    entry = union.stack.resolve(path)
    assert entry is not None, path
    return entry


def test_copy_up_of_a_deep_chain_looks_each_level_up_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: each ancestor copied up resolved its own parent again from the root, so a copy-up D levels
    deep made about D*D/2 lookups; it now makes one per level."""
    union, upper, _lower = _union(tmp_path)
    try:
        path = b"/".join([*DEEP, b"file"])
        entry = _entry(union, path)
        calls: list[bytes] = []
        real = union.stack.lookup

        def counting(parent: Entry, name: bytes) -> Any:
            calls.append(name)
            return real(parent, name)

        monkeypatch.setattr(union.stack, "lookup", counting)
        new = union.copy_up(entry)
        assert new.layer == 0
        assert len(calls) <= len(DEEP) + 1
        st = _lstat_at(upper, path)
        assert stat.S_ISREG(st.st_mode) and st.st_size == len(b"deep lower content\n")
        assert stat.S_IMODE(_lstat_at(upper, b"/".join(DEEP[:50])).st_mode) == 0o755
        # a second copy-up beside it finds its parent in the upper layer: no lookup at all
        _write_at(tmp_path / "lower", DEEP, b"second", b"2")
        second = _entry(union, b"/".join([*DEEP, b"second"]))
        calls.clear()
        union.copy_up(second)
        assert calls == []
    finally:
        union.stack.close()


def test_every_change_of_the_core_beyond_path_max(tmp_path: Path) -> None:
    """Create, link, rename, symlink, mknod, chmod, chown, xattrs, unlink (a whiteout) and rmdir, and a mkdir over
    a whiteout (an opaque directory), 10,000 bytes deep; owners kept in the override xattr, as
    ``xattr_permissions`` keeps them."""
    union, upper, _lower = _union(tmp_path, Ownership(xattr_permissions=True))
    try:
        where = b"/".join(DEEP)
        parent = _entry(union, where)
        fd, made = union.create(parent, b"new", 0o644, os.O_WRONLY, 1234, 5678)
        os.write(fd, b"made deep\n")
        os.close(fd)
        assert made.path == join(where, b"new")
        parent = _entry(union, where)
        union.link(made, parent, b"new-link")
        union.symlink(_entry(union, where), b"sym", b"new", 0, 0)
        union.mknod(_entry(union, where), b"fifo", stat.S_IFIFO | 0o600, 0, 0, 0)
        union.mkdir(_entry(union, where), b"dir", 0o700, 0, 0)
        moved, _ = union.rename(_entry(union, where), b"new-link", _entry(union, join(where, b"dir")), b"moved")
        assert moved.path == join(where, b"dir/moved")
        entry = union.chmod(_entry(union, join(where, b"file")), 0o600)  # a copy-up of the lower file
        union.chown(entry, 42, 43)
        union.setxattr(_entry(union, join(where, b"file")), b"user.k", b"v")
        assert union.getxattr(_entry(union, join(where, b"file")), b"user.k") == b"v"
        assert b"user.k" in union.listxattr(_entry(union, join(where, b"file")))
        shown = union.shown(_entry(union, join(where, b"file")), _entry(union, join(where, b"file")).st)
        assert shown[:3] == (42, 43, stat.S_IFREG | 0o600)
        union.unlink(_entry(union, where), b"file")
        assert is_whiteout_stat(_lstat_at(upper, join(where, b"file")))
        union.mkdir(_entry(union, where), b"file", 0o755, 0, 0)
        assert _entry(union, join(where, b"file")).opaque
        union.rmdir(_entry(union, where), b"file")
        assert union.stack.resolve(join(where, b"file")) is None
        # what the merged view shows down there, and what the upper layer holds
        names = set(union.listdir(_entry(union, where)))
        assert names == {b"new", b"sym", b"fifo", b"dir"}
        assert union.readlink(_entry(union, join(where, b"sym"))) == b"new"
        new_st = _lstat_at(upper, join(where, b"new"))
        assert new_st.st_nlink == 2 and new_st.st_ino == _lstat_at(upper, join(where, b"dir/moved")).st_ino
        upper_fd = os.open(upper, os.O_PATH)
        try:
            with ProcAt(upper_fd, join(where, b"new")) as full:
                value = os.getxattr(full, OVERRIDE_XATTR, follow_symlinks=False)
        finally:
            os.close(upper_fd)
        assert decode_override(value) is not None and decode_override(value)[:2] == (1234, 5678)  # type: ignore[index]
        assert os.listdir(tmp_path / "work" / "work") == []
    finally:
        union.stack.close()


def test_the_root_of_a_layer_is_still_one_call(tmp_path: Path) -> None:
    stack = Stack([os.fsencode(tmp_path)], writable=False, fmt=XattrFormat.TRUSTED)
    try:
        assert stack.layers[0].lstat(ROOT).st_ino == os.stat(tmp_path).st_ino
        with stack.layers[0].at(ROOT) as (fd, rel):
            assert (fd, rel) == (stack.layers[0].fd, ROOT)
    finally:
        stack.close()


def test_too_long_a_single_name_is_refused_as_the_kernel_refuses_it(tmp_path: Path) -> None:
    union, _upper, _lower = _union(tmp_path)
    try:
        parent = _entry(union, b"/".join(DEEP))
        with pytest.raises(OSError) as exc:
            union.mkdir(parent, b"n" * 256, 0o755, 0, 0)
        assert exc.value.errno == errno.ENAMETOOLONG
    finally:
        union.stack.close()

"""Open file descriptors across copy-up, unlink and rename."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kernel_diff import StackPair

pytestmark = pytest.mark.kernel


def _same(pair: StackPair, fn) -> object:  # type: ignore[no-untyped-def]
    k, u = pair.both(fn)
    assert k[0] == "ok", f"kernel: {k!r}"
    assert u == k, f"kernel={k!r}\n{pair.impl}={u!r}" + pair.context()
    return k[1]


def test_unlinked_open_upper_file_keeps_working(pair: StackPair) -> None:
    def scenario(root: Path) -> object:
        fd = os.open(root / "top.txt", os.O_RDWR)  # copies up
        try:
            os.unlink(root / "top.txt")
            st = os.fstat(fd)
            os.pwrite(fd, b"TOP", 0)
            os.ftruncate(fd, 20)
            data = os.pread(fd, 100, 0)
            st2 = os.fstat(fd)
            return st.st_nlink, data, st2.st_size, st2.st_nlink, os.path.lexists(root / "top.txt")
        finally:
            os.close(fd)

    nlink, *_ = _same(pair, scenario)  # type: ignore[misc]
    assert nlink == 0
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_unlinked_open_new_file_keeps_working(pair: StackPair) -> None:
    def scenario(root: Path) -> object:
        fd = os.open(root / "dir/new", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"hello")
            os.unlink(root / "dir/new")
            os.write(fd, b" world")
            st = os.fstat(fd)
            return st.st_nlink, st.st_size, os.pread(fd, 100, 0), sorted(os.listdir(root / "dir"))
        finally:
            os.close(fd)

    assert _same(pair, scenario)[0] == 0  # type: ignore[index]
    pair.assert_same_upper()


def test_unlinked_open_lower_file_stays_readable(pair: StackPair) -> None:
    def scenario(root: Path) -> object:
        fd = os.open(root / "mid.txt", os.O_RDONLY)
        try:
            os.unlink(root / "mid.txt")
            return os.fstat(fd).st_nlink, os.pread(fd, 100, 0), os.path.lexists(root / "mid.txt")
        finally:
            os.close(fd)

    _same(pair, scenario)
    pair.assert_same_upper()


def test_read_only_fd_opened_before_copy_up_sees_later_writes(pair: StackPair) -> None:
    def scenario(root: Path) -> object:
        ro = os.open(root / "bottom.txt", os.O_RDONLY)
        try:
            before = os.pread(ro, 100, 0)
            rw = os.open(root / "bottom.txt", os.O_WRONLY)  # copies up
            try:
                os.pwrite(rw, b"BOTTOM", 0)
            finally:
                os.close(rw)
            after = os.pread(ro, 100, 0)
            return before, after, os.fstat(ro).st_size
        finally:
            os.close(ro)

    before, after, _ = _same(pair, scenario)  # type: ignore[misc]
    assert before != after, "the kernel shows the new data through the old descriptor"


def test_read_only_fd_opened_before_truncating_copy_up(pair: StackPair) -> None:
    def scenario(root: Path) -> object:
        ro = os.open(root / "shared.txt", os.O_RDONLY)
        try:
            os.truncate(root / "shared.txt", 3)
            return os.pread(ro, 100, 0), os.fstat(ro).st_size
        finally:
            os.close(ro)

    _same(pair, scenario)


def test_open_fd_follows_a_renamed_file(pair: StackPair) -> None:
    def scenario(root: Path) -> object:
        fd = os.open(root / "dir/a", os.O_RDWR)
        try:
            os.rename(root / "dir/a", root / "moved")
            os.write(fd, b"W")
            os.fsync(fd)
            return (root / "moved").read_bytes(), os.fstat(fd).st_nlink
        finally:
            os.close(fd)

    _same(pair, scenario)
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_append_fd_and_concurrent_writer(pair: StackPair) -> None:
    def scenario(root: Path) -> object:
        a = os.open(root / "dir/c", os.O_WRONLY | os.O_APPEND)
        b = os.open(root / "dir/c", os.O_RDWR)
        try:
            os.write(a, b"1")
            os.pwrite(b, b"XX", 0)
            os.write(a, b"2")
            return os.pread(b, 100, 0), os.fstat(a).st_size
        finally:
            os.close(a)
            os.close(b)

    _same(pair, scenario)
    pair.assert_same_upper()


def test_mmap_write_reaches_the_upper_file(pair: StackPair) -> None:
    import mmap

    def scenario(root: Path) -> object:
        with open(root / "mid.txt", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[0:3] = b"MID"
            m.flush()
        return (root / "mid.txt").read_bytes()

    _same(pair, scenario)
    pair.assert_same_upper()


def test_fd_on_a_directory_lists_the_merged_content(pair: StackPair) -> None:
    def scenario(root: Path) -> object:
        fd = os.open(root / "dir", os.O_RDONLY | os.O_DIRECTORY)
        try:
            (root / "dir/new").write_bytes(b"n")
            return sorted(os.listdir(fd)), os.fstat(fd).st_mode
        finally:
            os.close(fd)

    _same(pair, scenario)

"""Atomic copy-up through the workdir: parents first, then data (holes kept), owner, mode, times and xattrs.

Every object is built under a temporary name in ``workdir/work`` (the kernel's work directory) and renamed
into the upper layer only when complete, so a crash never leaves a half-copied file visible.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import shutil
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import _sys, whiteout, xattrs
from .layers import ROOT, Entry, Layer, Stack, split
from .ownership import OVERRIDE_XATTR, encode_override

if TYPE_CHECKING:
    from .trace import Trace

#: Name of the directory inside workdir= that holds objects under construction (as the kernel names it).
WORK_SUBDIR = b"work"

_CHUNK = 1 << 20


class Workdir:
    """The scratch directory inside ``workdir=``: temporary names, and clean-up of stale entries."""

    def __init__(self, workdir: bytes) -> None:
        self.path = os.path.join(workdir, WORK_SUBDIR)
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            st = os.lstat(self.path)
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, "workdir/work is not a directory", self.path) from None
        self.fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.proc = b"/proc/self/fd/%d/" % self.fd
        self._counter = itertools.count(1)
        self._tag = b"%x" % os.getpid()

    def tempname(self) -> bytes:
        return b"#unionfs-%s-%x" % (self._tag, next(self._counter))

    def clean(self) -> int:
        """Remove everything left in the work directory by an earlier crash; returns how many entries."""
        count = 0
        for name in os.listdir(self.path):
            self.discard(name)
            count += 1
        return count

    def discard(self, name: bytes) -> None:
        """Remove a temporary object (a whole tree for a directory)."""
        full = os.path.join(self.path, name)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(full)
        else:
            os.unlink(full)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def copy_xattrs(src: bytes, dst: bytes, private: tuple[bytes, ...]) -> None:
    """Copy every xattr except overlay-private ones; attributes the target refuses are skipped, as the
    kernel skips them (e.g. ``user.*`` on symlinks)."""
    for name in xattrs.names(src):
        if whiteout.xattr_from_disk(name, private) is None:
            continue
        value = xattrs.get(src, name)
        if value is None:
            continue
        try:
            xattrs.write(dst, name, value)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
                raise


def copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy ``size`` bytes, visiting only data extents so that holes stay holes."""
    off = 0
    while off < size:
        try:
            data = os.lseek(src_fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            if exc.errno != errno.EINVAL:
                raise
            data, hole = off, size
        else:
            hole = os.lseek(src_fd, data, os.SEEK_HOLE)
        _copy_range(src_fd, dst_fd, data, min(hole, size) - data)
        off = hole
    os.ftruncate(dst_fd, size)


def _copy_range(src_fd: int, dst_fd: int, off: int, count: int) -> None:
    use_cfr = True
    while count > 0:
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(count, 1 << 30), off, off)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                use_cfr = False
                continue
        else:
            buf = os.pread(src_fd, min(count, _CHUNK), off)
            n = len(buf)
            written = 0
            while written < n:
                written += os.pwrite(dst_fd, memoryview(buf)[written:], off + written)
        if n == 0:
            break
        off += n
        count -= n


def _chown(name: bytes, dir_fd: int, st: os.stat_result) -> bool:
    """Give the copy the original's owner; False where this user may not (rootless)."""
    try:
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
    except PermissionError:
        if os.geteuid() == 0:
            raise
        return False
    return True


@dataclasses.dataclass(frozen=True, slots=True)
class CopiedUp:
    """One object copied into the upper layer: what it was, and what it is now."""

    old: Entry
    new: Entry

    @property
    def breaks_hard_link(self) -> bool:
        """The lower object had other names: they still name the lower file, as on the kernel (without
        ``index=on``), so each of them must be resolved again and gets an inode of its own."""
        return not self.old.is_dir and self.old.st.st_nlink > 1


class CopyUp:
    """Copies objects from lower layers into the upper one, reporting each copy to ``on_copied``.

    ``fsync``: make each copied file durable before it becomes visible. ``owner_xattr``: where the owner cannot
    be kept (rootless), record it in the override xattr (``xattr_permissions``). ``unmapped``: tells objects
    whose owner this user namespace does not map; those are never copied up (EOVERFLOW). ``trace``: told of
    each copy (``-o trace``).
    """

    def __init__(self, stack: Stack, work: Workdir, on_copied: Callable[[CopiedUp], None] | None = None, *,
                 fsync: bool = True, owner_xattr: bool = False,
                 unmapped: Callable[[Entry], object] | None = None, trace: Trace | None = None) -> None:
        assert stack.upper is not None
        self.stack = stack
        self.upper: Layer = stack.upper
        self.work = work
        self.on_copied = on_copied
        self.fsync = fsync
        self.owner_xattr = owner_xattr
        self.unmapped = unmapped
        self.trace = trace

    def ensure_dir(self, entry: Entry) -> Entry:
        """Make sure directory ``entry`` exists in the upper layer (copying up its ancestors first)."""
        if entry.dirs and entry.dirs[0] == 0:
            return entry
        return self.copy_up(entry)

    def ensure_parents(self, path: bytes) -> None:
        """Make sure the directory holding ``path`` exists in the upper layer, copying up the missing ones
        from the top down: one lookup per level of ``path`` at most (a tree of any depth), none when the parent
        is there already (an upper directory is always the merged one at its path)."""
        parent_path, _ = split(path)
        try:
            if stat.S_ISDIR(self.upper.lstat(parent_path).st_mode):
                return
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
        if parent_path == ROOT:
            return
        entry = self.stack.root()
        for name in parent_path.split(b"/"):
            inner = self.stack.lookup(entry, name)
            if inner is None or not inner.is_dir:
                raise OSError(errno.ENOENT, "parent vanished during copy-up", parent_path)
            entry = self.ensure_dir(inner)

    def copy_up(self, entry: Entry, data: bool = True) -> Entry:
        """Copy ``entry`` into the upper layer and return its new Entry; no-op when already there.

        ``data=False`` copies metadata only (for opens with O_TRUNC, as the kernel does).
        """
        if entry.layer == 0 and self.stack.writable:
            return entry
        if entry.path == ROOT:
            raise OSError(errno.EIO, "the upper root directory is missing")
        try:
            already = self.upper.lstat(entry.path)
        except FileNotFoundError:
            pass
        else:
            # Copied up since this Entry was resolved: describe what is there now.
            if stat.S_ISDIR(already.st_mode) and stat.S_ISDIR(entry.st.st_mode):
                return _over(entry, already)
            if not stat.S_ISDIR(already.st_mode) and not whiteout.is_whiteout_stat(already):
                return Entry(entry.path, 0, already)
        self.ensure_parents(entry.path)
        if self.unmapped is not None and self.unmapped(entry):
            # the copy could not be given its owner; the kernel refuses such a copy-up the same way
            raise OSError(errno.EOVERFLOW, "owner not mapped in this user namespace: no copy-up", entry.path)
        started = time.monotonic() if self.trace is not None else 0.0
        src = self.stack.layers[entry.layer]
        st = entry.st
        tmp = self.work.tempname()
        wfd = self.work.fd
        try:
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(tmp, 0o700, dir_fd=wfd)
                self._finish_meta(src, entry.path, tmp, st)
            elif stat.S_ISREG(st.st_mode):
                self._copy_file(src, entry.path, tmp, st, data)
            elif stat.S_ISLNK(st.st_mode):
                with src.at(entry.path) as (sfd, rel):
                    target = os.readlink(rel, dir_fd=sfd)
                os.symlink(target, tmp, dir_fd=wfd)
                self._finish_meta(src, entry.path, tmp, st)
            else:
                os.mknod(tmp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=wfd)
                self._finish_meta(src, entry.path, tmp, st)
            self._rename_in(tmp, entry.path)
        except BaseException:
            self.work.discard(tmp)
            raise
        new_st = self.upper.lstat(entry.path)
        new = _over(entry, new_st) if stat.S_ISDIR(st.st_mode) else Entry(entry.path, 0, new_st)
        if self.trace is not None:
            self.trace.copy_up(entry, data, time.monotonic() - started)
        if self.on_copied is not None:
            self.on_copied(CopiedUp(entry, new))
        return new

    def _rename_in(self, tmp: bytes, path: bytes) -> None:
        """Move a finished copy into place, keeping the parent's times as they were (as the kernel does:
        a copy-up is not a change of the directory)."""
        with self.upper.at(path) as (dfd, rel):
            # (the parent is ``dfd`` itself when ``rel`` is a name: at depth, or in the upper root)
            pst = os.stat(split(rel)[0], dir_fd=dfd, follow_symlinks=False)
            _sys.renameat2(tmp, rel, _sys.RENAME_NOREPLACE, self.work.fd, dfd)
            os.utime(split(rel)[0], ns=(pst.st_atime_ns, pst.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)

    def _copy_file(self, src: Layer, path: bytes, tmp: bytes, st: os.stat_result, data: bool) -> None:
        wfd = self.work.fd
        with src.at(path) as (dirfd, rel):
            sfd = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=wfd)
            try:
                if data:
                    copy_data(sfd, dfd, st.st_size)
                self._finish_meta(src, path, tmp, st)
                if self.fsync:
                    os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def _finish_meta(self, src: Layer, path: bytes, tmp: bytes, st: os.stat_result) -> None:
        """Owner, xattrs, mode, then times: chown first, since it strips security.capability; times last."""
        wfd = self.work.fd
        owned = _chown(tmp, wfd, st)
        with src.proc_at(path) as full:
            copy_xattrs(full, self.work.proc + tmp, self.stack.private_prefixes)
        if not owned and self.owner_xattr and not stat.S_ISLNK(st.st_mode):
            xattrs.write(self.work.proc + tmp, OVERRIDE_XATTR, encode_override(st.st_uid, st.st_gid, st.st_mode))
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(tmp, stat.S_IMODE(st.st_mode), dir_fd=wfd)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=wfd, follow_symlinks=False)


def _over(lower: Entry, upper_st: os.stat_result) -> Entry:
    """The entry of a directory copied up above the lower directory ``lower`` (not opaque: it still merges)."""
    return Entry(lower.path, 0, upper_st, (0, *lower.dirs), lower.xattr_whiteouts)


def replace_with_whiteout(upper: Layer, work: Workdir, path: bytes) -> None:
    """Atomically put a whiteout where an upper object stands (a directory is exchanged, then removed)."""
    tmp = work.tempname()
    whiteout.make_whiteout(tmp, work.fd)
    try:
        with upper.at(path) as (dfd, rel):
            st = os.stat(rel, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _sys.renameat2(tmp, rel, _sys.RENAME_EXCHANGE, work.fd, dfd)
            else:
                os.rename(tmp, rel, src_dir_fd=work.fd, dst_dir_fd=dfd)
    finally:
        work.discard(tmp)


def move_to_work(upper: Layer, work: Workdir, path: bytes) -> bytes:
    """Move an upper object into the work directory (to be discarded); returns its temporary name."""
    tmp = work.tempname()
    with upper.at(path) as (sfd, rel):
        os.rename(rel, tmp, src_dir_fd=sfd, dst_dir_fd=work.fd)
    return tmp


__all__ = ["CopiedUp", "CopyUp", "Workdir", "copy_data", "copy_xattrs", "move_to_work", "replace_with_whiteout"]

"""Path-level overlay operations with the kernel's semantics; every failure is an OSError with a real errno.

Callers hand in :class:`~unionfs.layers.Entry` objects they resolved earlier; each operation re-checks what
it depends on and returns the Entries it changed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from . import _sys, whiteout, xattrs
from .copyup import CopyUp, Workdir, move_to_work, replace_with_whiteout
from .fsutil import fsync_dir
from .layers import ROOT, Entry, Stack, check_name, join
from .ownership import OVERRIDE_XATTR, Ownership, decode_override, encode_override
from .userns import Unmapped, UserNamespace
from .whiteout import XattrFormat

DEFAULT_ACL = b"system.posix_acl_default"

#: open(2) flags that need the file in the upper layer
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
#: flags we never pass to the real open: the kernel resolved creation, and we write at the kernel's offsets
_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT | os.O_TRUNC


def _erofs() -> OSError:
    return OSError(errno.EROFS, "read-only file system")


class Union:
    """A mounted stack: resolution plus every operation that changes the merged view."""

    def __init__(self, stack: Stack, work: Workdir | None, on_copied: Callable[[Entry, Entry], None] | None = None,
                 ownership: Ownership | None = None):
        self.stack = stack
        self.work = work
        self.ownership = ownership or Ownership()
        #: names hidden from the merged view's xattrs besides the overlay-private ones
        self.hidden_xattrs: frozenset[bytes] = (
            frozenset({OVERRIDE_XATTR}) if self.ownership.xattr_permissions else frozenset()
        )
        self.copier: CopyUp | None = None
        if stack.writable:
            assert work is not None
            self.copier = CopyUp(stack, work, on_copied)
            self.copier.owner_xattr = self.ownership.xattr_permissions
        self.euid = os.geteuid()
        self.egid = os.getegid()
        #: owners this user namespace does not map (see unionfs.userns); the ownership options, when given,
        #: decide owners themselves
        self.userns = UserNamespace.current()
        if self.copier is not None and self.ownership.identity and not self.userns.initial:
            self.copier.unmapped = self.unmapped

    # -- reading ------------------------------------------------------------------------------------------

    def root(self) -> Entry:
        return self.stack.root()

    def lookup(self, parent: Entry, name: bytes) -> Entry | None:
        check_name(name)
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "Not a directory")
        return self.stack.lookup(parent, name)

    def unmapped(self, entry: Entry) -> Unmapped | None:
        """Which ids of a lower object's owner this user namespace does not map (None: both mapped, or the
        object is in the upper layer, where the server's own system calls meet the kernel's checks)."""
        if self.userns.initial or not self.ownership.identity or (entry.layer == 0 and self.stack.writable):
            return None
        return self.userns.unmapped(self.stack.layers[entry.layer].fd, entry.path, entry.st)

    def lstat(self, entry: Entry) -> os.stat_result:
        return self.stack.layers[entry.layer].lstat(entry.path)

    def shown(self, entry: Entry, st: os.stat_result) -> tuple[int, int, int]:
        """(uid, gid, st_mode) as the merged view shows ``st``, the stat of ``entry``'s object."""
        mode = st.st_mode
        uid, gid = st.st_uid, st.st_gid
        if self.ownership.xattr_permissions and not stat.S_ISLNK(mode):
            value = xattrs.get(self.stack.layers[entry.layer].xpath(entry.path), OVERRIDE_XATTR)
            stored = decode_override(value) if value is not None else None
            if stored is not None:
                uid, gid = stored[0], stored[1]
                mode = stat.S_IFMT(mode) | stored[2]
        uid, gid = self.ownership.show(uid, gid)
        return uid, gid, mode

    def readlink(self, entry: Entry) -> bytes:
        return os.readlink(entry.path, dir_fd=self.stack.layers[entry.layer].fd)

    def listdir(self, entry: Entry) -> dict[bytes, tuple[int, int]]:
        return self.stack.listdir(entry)

    def fsync_dir(self, entry: Entry) -> None:
        """Make a directory's entries durable (its upper copy; lower layers never change)."""
        if entry.layer != 0 or not self.stack.writable:
            return
        fsync_dir(entry.path, self.stack.layers[0].fd)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.stack.layers[0].xpath(ROOT))

    # -- helpers ------------------------------------------------------------------------------------------

    def _copier(self) -> CopyUp:
        if self.copier is None:
            raise _erofs()
        return self.copier

    def copy_up(self, entry: Entry, data: bool = True) -> Entry:
        return self._copier().copy_up(entry, data)

    def _upper_fd(self) -> int:
        upper = self.stack.upper
        if upper is None:
            raise _erofs()
        return upper.fd

    def _owner(self, parent: Entry, uid: int, gid: int) -> tuple[int, int]:
        """The (uid, gid) to give a new object: -1 for what the file system already chose (our own ids,
        and the group of a set-group-ID directory)."""
        if parent.st.st_mode & stat.S_ISGID or gid == self.egid:
            gid = -1
        if uid == self.euid:
            uid = -1
        return uid, gid

    def _prepare_new(self, parent: Entry, name: bytes) -> tuple[Entry, bool]:
        """Checks before creating ``name`` in ``parent``: returns the upper parent, and whether the upper
        layer holds a whiteout at that name (to be replaced)."""
        check_name(name)
        if self.stack.lookup(parent, name) is not None:
            raise OSError(errno.EEXIST, "File exists")
        parent = self._copier().ensure_dir(parent)
        path = join(parent.path, name)
        try:
            st = self.stack.layers[0].lstat(path)
        except FileNotFoundError:
            return parent, False
        # Something invisible stands there: a whiteout (char 0/0 or an xattr whiteout).
        return parent, whiteout.is_whiteout_stat(st) or stat.S_ISREG(st.st_mode)

    def _place(self, build: Callable[[bytes, int], None], parent: Entry, name: bytes, over_whiteout: bool,
               is_dir: bool, owner: tuple[int, int], mode: int | None) -> Entry:
        """Create an object with ``build(name, dir_fd)``, fix its owner (and the mode bits a chown
        clears), then make it visible at ``name``: directly when nothing is there, through the workdir
        when a whiteout has to be replaced (an opaque directory, as the kernel makes it)."""
        upper_fd = self._upper_fd()
        path = join(parent.path, name)
        if not over_whiteout:
            build(path, upper_fd)
            self._fix_owner(path, upper_fd, owner, mode)
        else:
            # Built in the workdir, the object cannot inherit from a set-group-ID parent: do it here.
            if parent.st.st_mode & stat.S_ISGID:
                owner = (owner[0], parent.st.st_gid)
                if is_dir and mode is not None:
                    mode |= stat.S_ISGID
            work = self._work()
            tmp = work.tempname()
            try:
                build(tmp, work.fd)
                self._fix_owner(tmp, work.fd, owner, mode)
                if is_dir:
                    whiteout.set_opaque(work.proc + tmp, self.stack.fmt)
                    _sys.renameat2(tmp, path, _sys.RENAME_EXCHANGE, work.fd, upper_fd)
                else:
                    os.rename(tmp, path, src_dir_fd=work.fd, dst_dir_fd=upper_fd)
            finally:
                work.discard(tmp)
        return self._upper_entry(path, opaque=is_dir and over_whiteout)

    @staticmethod
    def _fix_owner(path: bytes, dir_fd: int, owner: tuple[int, int], mode: int | None) -> None:
        uid, gid = owner
        if uid == -1 and gid == -1:
            return
        os.chown(path, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        if mode is not None and mode & (stat.S_ISUID | stat.S_ISGID):
            os.chmod(path, mode, dir_fd=dir_fd)

    def _upper_entry(self, path: bytes, opaque: bool = False) -> Entry:
        st = self.stack.layers[0].lstat(path)
        if stat.S_ISDIR(st.st_mode):
            return Entry(path, 0, st, (0,), frozenset(), opaque)
        return Entry(path, 0, st)

    def _work(self) -> Workdir:
        if self.work is None:
            raise _erofs()
        return self.work

    # -- creating -----------------------------------------------------------------------------------------

    def creation_mode(self, parent: Entry, mode: int, umask: int) -> int:
        """The mode a new object gets: the caller's umask applies unless ``parent`` has a default ACL, which
        the file system then applies itself (the kernel leaves both to us once ACLs are enabled)."""
        if umask and xattrs.get(self._xpath(parent), DEFAULT_ACL) is None:
            return mode & ~umask
        return mode

    def create(self, parent: Entry, name: bytes, mode: int, flags: int, uid: int, gid: int) -> tuple[int, Entry]:
        """Create and open a regular file; returns (fd, entry)."""
        parent, over = self._prepare_new(parent, name)
        owner = self._owner(parent, uid, gid)
        path = join(parent.path, name)
        perm = stat.S_IMODE(mode)
        if not over and owner == (-1, -1):
            fd = os.open(path, (flags & ~_STRIP) | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, perm,
                         dir_fd=self._upper_fd())
            return fd, self._upper_entry(path)

        def build(p: bytes, dfd: int) -> None:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, perm, dir_fd=dfd))

        entry = self._place(build, parent, name, over, False, owner, perm)
        return self.open(entry, flags & ~os.O_TRUNC), entry

    def mkdir(self, parent: Entry, name: bytes, mode: int, uid: int, gid: int) -> Entry:
        parent, over = self._prepare_new(parent, name)
        perm = stat.S_IMODE(mode)

        def build(p: bytes, dfd: int) -> None:
            os.mkdir(p, perm, dir_fd=dfd)

        return self._place(build, parent, name, over, True, self._owner(parent, uid, gid), perm)

    def mknod(self, parent: Entry, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Entry:
        if stat.S_ISCHR(mode) and rdev == 0:
            raise OSError(errno.EPERM, "a whiteout device cannot be created in the merged view")
        parent, over = self._prepare_new(parent, name)

        def build(p: bytes, dfd: int) -> None:
            os.mknod(p, mode, rdev, dir_fd=dfd)

        return self._place(build, parent, name, over, False, self._owner(parent, uid, gid),
                           stat.S_IMODE(mode))

    def symlink(self, parent: Entry, name: bytes, target: bytes, uid: int, gid: int) -> Entry:
        parent, over = self._prepare_new(parent, name)

        def build(p: bytes, dfd: int) -> None:
            os.symlink(target, p, dir_fd=dfd)

        return self._place(build, parent, name, over, False, self._owner(parent, uid, gid), None)

    def link(self, entry: Entry, new_parent: Entry, new_name: bytes) -> Entry:
        if entry.is_dir:
            raise OSError(errno.EPERM, "hard links to directories are not allowed")
        new_parent, over = self._prepare_new(new_parent, new_name)
        entry = self.copy_up(entry)
        upper_fd = self._upper_fd()
        path = join(new_parent.path, new_name)
        if not over:
            os.link(entry.path, path, src_dir_fd=upper_fd, dst_dir_fd=upper_fd, follow_symlinks=False)
        else:
            work = self._work()
            tmp = work.tempname()
            try:
                os.link(entry.path, tmp, src_dir_fd=upper_fd, dst_dir_fd=work.fd, follow_symlinks=False)
                os.rename(tmp, path, src_dir_fd=work.fd, dst_dir_fd=upper_fd)
            finally:
                work.discard(tmp)
        return self._upper_entry(path)

    # -- opening ------------------------------------------------------------------------------------------

    def open(self, entry: Entry, flags: int) -> int:
        """Open the real file behind ``entry``; writers get the upper copy (copied up first)."""
        if flags & WRITE_FLAGS:
            if self.copier is None:
                raise _erofs()
            entry = self.copy_up(entry, data=not flags & os.O_TRUNC)
        layer = self.stack.layers[entry.layer]
        fd = os.open(entry.path, (flags & ~_STRIP) | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=layer.fd)
        if flags & os.O_TRUNC:
            if flags & os.O_ACCMODE == os.O_RDONLY:  # Linux truncates even then
                self.truncate(entry, 0)
            else:
                os.ftruncate(fd, 0)
        return fd

    # -- removing -----------------------------------------------------------------------------------------

    def _existing(self, parent: Entry, name: bytes) -> Entry:
        entry = self.lookup(parent, name)
        if entry is None:
            raise OSError(errno.ENOENT, "No such file or directory")
        return entry

    def unlink(self, parent: Entry, name: bytes) -> Entry:
        """Remove a non-directory; returns the Entry that was removed."""
        entry = self._existing(parent, name)
        if entry.is_dir:
            raise OSError(errno.EISDIR, "Is a directory")
        self._remove(parent, name, entry)
        return entry

    def rmdir(self, parent: Entry, name: bytes) -> Entry:
        entry = self._existing(parent, name)
        if not entry.is_dir:
            raise OSError(errno.ENOTDIR, "Not a directory")
        if entry.path == ROOT:
            raise OSError(errno.EBUSY, "Device or resource busy")
        if self.stack.listdir(entry):
            raise OSError(errno.ENOTEMPTY, "Directory not empty")
        self._remove(parent, name, entry)
        return entry

    def _remove(self, parent: Entry, name: bytes, entry: Entry) -> None:
        parent = self._copier().ensure_dir(parent)
        upper = self.stack.layers[0]
        path = entry.path
        needs_whiteout = self.stack.lower_positive(parent, name)
        if entry.layer != 0:
            whiteout.make_whiteout(path, upper.fd)
            return
        if needs_whiteout:
            replace_with_whiteout(upper, self._work(), path)
            return
        if not entry.is_dir:
            os.unlink(path, dir_fd=upper.fd)
            return
        try:
            os.rmdir(path, dir_fd=upper.fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # Only whiteouts remain inside: take the directory out of sight, then discard it.
            work = self._work()
            work.discard(move_to_work(upper, work, path))

    # -- renaming -----------------------------------------------------------------------------------------

    def rename(self, old_parent: Entry, old_name: bytes, new_parent: Entry, new_name: bytes,
               flags: int = 0) -> tuple[Entry, Entry | None]:
        """Rename with the kernel's checks and errnos; returns (moved entry at its new path, the entry it
        replaced or None)."""
        check_name(new_name)
        old = self._existing(old_parent, old_name)
        new = self.lookup(new_parent, new_name)
        exchange = bool(flags & _sys.RENAME_EXCHANGE)
        if flags & ~(_sys.RENAME_EXCHANGE | _sys.RENAME_NOREPLACE):
            raise OSError(errno.EINVAL, "Invalid argument")
        if exchange and flags & _sys.RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "Invalid argument")
        if exchange and new is None:
            raise OSError(errno.ENOENT, "No such file or directory")
        if new is not None and flags & _sys.RENAME_NOREPLACE:
            raise OSError(errno.EEXIST, "File exists")
        new_path = join(new_parent.path, new_name)
        if old.path == new_path:
            return old, None
        if old.is_dir and new_path.startswith(old.path + b"/"):
            raise OSError(errno.EINVAL, "Invalid argument")
        if new is not None and new.is_dir and old.path.startswith(new.path + b"/") and not exchange:
            raise OSError(errno.ENOTEMPTY, "Directory not empty")
        if new is not None and not exchange:
            if new.is_dir and not old.is_dir:
                raise OSError(errno.EISDIR, "Is a directory")
            if old.is_dir and not new.is_dir:
                raise OSError(errno.ENOTDIR, "Not a directory")
        copier = self._copier()
        if old.is_dir and (old.layer != 0 or old.merged):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        if exchange and new is not None and new.is_dir and (new.layer != 0 or new.merged):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        if new is not None and new.is_dir and not exchange and self.stack.listdir(new):
            raise OSError(errno.ENOTEMPTY, "Directory not empty")

        old = copier.copy_up(old)
        old_parent = copier.ensure_dir(old_parent)
        new_parent = copier.ensure_dir(new_parent)
        upper = self.stack.layers[0]
        work = self._work()
        old_whiteout = self.stack.lower_positive(old_parent, old_name)

        if exchange:
            assert new is not None
            new = copier.copy_up(new)
            if old.is_dir and not old.opaque and new_parent.merged:
                whiteout.set_opaque(upper.xpath(old.path), self.stack.fmt)
            if new.is_dir and not new.opaque and old_parent.merged:
                whiteout.set_opaque(upper.xpath(new.path), self.stack.fmt)
            _sys.renameat2(old.path, new_path, _sys.RENAME_EXCHANGE, upper.fd, upper.fd)
            return self._upper_entry(new_path), self._upper_entry(old.path)

        if old.is_dir and not old.opaque and new_parent.merged:
            whiteout.set_opaque(upper.xpath(old.path), self.stack.fmt)
        discard: bytes | None = None
        try:
            st = upper.lstat(new_path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                discard = move_to_work(upper, work, new_path)
            elif old.is_dir:
                os.unlink(new_path, dir_fd=upper.fd)
        try:
            if old_whiteout:
                self._rename_leaving_whiteout(old.path, new_path)
            else:
                os.rename(old.path, new_path, src_dir_fd=upper.fd, dst_dir_fd=upper.fd)
        finally:
            if discard is not None:
                work.discard(discard)
        moved = self._upper_entry(new_path, opaque=old.is_dir and (old.opaque or new_parent.merged))
        return moved, new

    def _rename_leaving_whiteout(self, old_path: bytes, new_path: bytes) -> None:
        upper = self.stack.layers[0]
        try:
            _sys.renameat2(old_path, new_path, _sys.RENAME_WHITEOUT, upper.fd, upper.fd)
            return
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EINVAL, errno.ENOSYS):
                raise
        os.rename(old_path, new_path, src_dir_fd=upper.fd, dst_dir_fd=upper.fd)
        whiteout.make_whiteout(old_path, upper.fd)

    # -- attributes ---------------------------------------------------------------------------------------

    def truncate(self, entry: Entry, size: int, fd: int | None = None) -> Entry:
        if fd is not None:
            os.ftruncate(fd, size)
            return entry
        entry = self.copy_up(entry, data=size != 0)
        wfd = os.open(entry.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._upper_fd())
        try:
            os.ftruncate(wfd, size)
        finally:
            os.close(wfd)
        return entry

    def chown(self, entry: Entry, uid: int, gid: int) -> Entry:
        """chown of the merged view (ids as it shows them; -1 leaves one unchanged)."""
        entry = self.copy_up(entry)
        if self.ownership.xattr_permissions and not stat.S_ISLNK(entry.st.st_mode):
            cur_uid, cur_gid, mode = self.shown(entry, self.lstat(entry))
            self._store_override(entry, cur_uid if uid == -1 else uid, cur_gid if gid == -1 else gid, mode)
            return entry
        uid, gid = self.ownership.to_disk(uid, gid)
        os.chown(entry.path, uid, gid, dir_fd=self._upper_fd(), follow_symlinks=False)
        return entry

    def chmod(self, entry: Entry, mode: int) -> Entry:
        if stat.S_ISLNK(entry.st.st_mode):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        entry = self.copy_up(entry)
        if self.ownership.xattr_permissions:
            uid, gid, _mode = self.shown(entry, self.lstat(entry))
            self._store_override(entry, uid, gid, mode)
            return entry
        os.chmod(entry.path, stat.S_IMODE(mode), dir_fd=self._upper_fd())
        return entry

    def _store_override(self, entry: Entry, uid: int, gid: int, mode: int) -> None:
        xattrs.write(self._xpath(entry), OVERRIDE_XATTR, encode_override(uid, gid, mode))

    def utimens(self, entry: Entry, atime_ns: int | None, mtime_ns: int | None) -> Entry:
        entry = self.copy_up(entry)
        upper_fd = self._upper_fd()
        if atime_ns is None or mtime_ns is None:
            st = os.stat(entry.path, dir_fd=upper_fd, follow_symlinks=False)
            atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
            mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
        os.utime(entry.path, ns=(atime_ns, mtime_ns), dir_fd=upper_fd, follow_symlinks=False)
        return entry

    # -- xattrs -------------------------------------------------------------------------------------------

    def _xpath(self, entry: Entry) -> bytes:
        return self.stack.layers[entry.layer].xpath(entry.path)

    def _disk_name(self, name: bytes) -> bytes:
        if name in self.hidden_xattrs:
            raise OSError(errno.EPERM, "this xattr holds the stored owner and mode")
        return whiteout.xattr_to_disk(name, self.stack.private_prefixes)

    def getxattr(self, entry: Entry, name: bytes) -> bytes:
        return self._getxattr(self._xpath(entry), name)

    def getxattr_fd(self, fd: int, name: bytes) -> bytes:
        """getxattr through an open upper-layer descriptor (an unlinked file)."""
        return self._getxattr(fd, name)

    def _getxattr(self, target: bytes | int, name: bytes) -> bytes:
        return os.getxattr(target, self._disk_name(name), follow_symlinks=isinstance(target, int))

    def listxattr(self, entry: Entry) -> list[bytes]:
        return self._listxattr(self._xpath(entry))

    def listxattr_fd(self, fd: int) -> list[bytes]:
        return self._listxattr(fd)

    def _listxattr(self, target: bytes | int) -> list[bytes]:
        out = []
        for disk in xattrs.names(target):
            name = whiteout.xattr_from_disk(disk, self.stack.private_prefixes)
            if name is not None and name not in self.hidden_xattrs:
                out.append(name)
        return out

    def setxattr(self, entry: Entry, name: bytes, value: bytes, flags: int = 0) -> Entry:
        entry = self.copy_up(entry)
        xattrs.write(self._xpath(entry), self._disk_name(name), value, flags)
        return entry

    def setxattr_fd(self, fd: int, name: bytes, value: bytes) -> None:
        xattrs.write(fd, self._disk_name(name), value)

    def removexattr(self, entry: Entry, name: bytes) -> Entry:
        disk = self._disk_name(name)
        if (entry.layer != 0 or not self.stack.writable) and xattrs.get(self._xpath(entry), disk) is None:
            raise OSError(errno.ENODATA, "No data available")
        entry = self.copy_up(entry)
        xattrs.remove(self._xpath(entry), disk)
        return entry

    def removexattr_fd(self, fd: int, name: bytes) -> None:
        xattrs.remove(fd, self._disk_name(name))


def default_format(upper: bytes | None, forced: bool | None) -> XattrFormat:
    """``user.overlay.*`` when forced or when ``trusted.*`` cannot be written in the upper layer."""
    if forced is not None:
        return XattrFormat.USER if forced else XattrFormat.TRUSTED
    if upper is None:
        return XattrFormat.TRUSTED if os.geteuid() == 0 else XattrFormat.USER
    return XattrFormat.TRUSTED if xattrs.can_store_trusted(upper) else XattrFormat.USER

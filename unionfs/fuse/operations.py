"""pyfuse3.Operations over a :class:`~unionfs.union.Union`: each handler maps inodes to the core and back."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from .. import userns
from ..layers import ROOT, Entry, check_name, join, split
from ..union import WRITE_FLAGS, Union
from ..userns import R_OK, W_OK, X_OK, Caller
from .errors import boundary
from .inodes import InodeTable, Node

log = logging.getLogger("unionfs")

T = TypeVar("T")

#: reads and writes at least this large leave the event loop for a worker thread
_BIG_IO = 1 << 20

#: how many real objects the memory of missing xattr names covers before it starts again
_ABSENT_MAX = 1 << 16


class AbsentXattrs:
    """xattr names a getxattr found missing, per real object (st_dev, st_ino), so that asking again needs no
    system call. The kernel caches no xattrs for FUSE: `ls -l` asks for security.selinux and
    system.posix_acl_access of every file on every run, and every write asks for security.capability.

    Keyed by the real object, not by node: one upper file may have two nodes (a name the kernel has not looked
    up yet, beside an unlinked open one). Forgotten for an object whenever an xattr of it changes through us,
    and whenever a name is created or removed (an inode number may be reused).
    """

    __slots__ = ("_names", "_sets")

    def __init__(self) -> None:
        self._names: dict[tuple[int, int], tuple[bytes, ...]] = {}
        #: one shared tuple per set of names (nearly every object has the same one or two)
        self._sets: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}

    def known(self, st: os.stat_result, name: bytes) -> bool:
        names = self._names.get((st.st_dev, st.st_ino))
        return names is not None and name in names

    def add(self, st: os.stat_result, name: bytes) -> None:
        key = (st.st_dev, st.st_ino)
        names = tuple(sorted({*self._names.get(key, ()), name}))
        if len(self._names) >= _ABSENT_MAX:
            self._names.clear()
            self._sets.clear()
        self._names[key] = self._sets.setdefault(names, names)

    def forget(self, st: os.stat_result) -> None:
        self._names.pop((st.st_dev, st.st_ino), None)


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.pid)


class FileHandle:
    __slots__ = ("node", "fd", "layer", "writable")

    def __init__(self, node: Node, fd: int, layer: int, writable: bool) -> None:
        self.node = node
        self.fd = fd
        self.layer = layer
        self.writable = writable


class DirHandle:
    __slots__ = ("node", "names", "entries", "unreachable", "inos")

    def __init__(self, node: Node) -> None:
        self.node = node
        #: the merged listing this handle serves, taken at its first read
        self.names: list[tuple[bytes, tuple[int, int]]] | None = None
        self.entries: dict[int, Entry | None] = {}
        #: indexes of listed names we may not look up, and the inode numbers the layers' directories list
        self.unreachable: set[int] = set()
        self.inos: dict[int, dict[bytes, int]] = {}


class Operations(pyfuse3.Operations):
    """The FUSE request handlers."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    #: the kernel checks access against POSIX ACLs too, as overlayfs does; the umask then reaches us to apply
    #: (Union.creation_mode)
    enable_acl = True

    def __init__(self, union: Union, timeout: float = 300.0) -> None:
        super().__init__()
        self.union = union
        self.timeout = timeout
        self._copied: list[tuple[Entry, Entry]] = []
        if union.copier is not None:
            union.copier.on_copied = lambda old, new: self._copied.append((old, new))
        root = union.root()
        self.inodes = InodeTable([layer.dev for layer in union.stack.layers], root)
        self._files: dict[int, FileHandle] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._next_fh = 1
        self._mutex = trio.Lock()
        self._absent = AbsentXattrs()
        self._plain_owners = union.ownership.identity

    # -- plumbing -----------------------------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _apply_copied(self) -> None:
        while self._copied:
            old, new = self._copied.pop()
            self._absent.forget(new.st)
            self.inodes.copied_up(old, new)
            self._changed(split(new.path)[0])
            node = self.inodes.by_path.get(new.path)
            if node is not None and old.st.st_nlink > 1 and not old.is_dir:
                for path in [p for p in node.paths if p != new.path]:
                    self._break_link(node, path)

    def _break_link(self, node: Node, path: bytes) -> None:
        """Copy-up broke a lower hard link (as on the kernel): ``path`` still names the lower file, so the
        kernel must look it up again and get an inode of its own."""
        self.inodes.unlinked(node, path, last_link=False)
        parent_path, name = split(path)
        parent = self.inodes.by_path.get(parent_path)
        if parent is not None:
            pyfuse3.invalidate_entry_async(parent.ino, name, ignore_enoent=True)

    def _changed(self, *dir_paths: bytes) -> None:
        """Directories whose merged listing may differ now: drop what we cached of them."""
        for path in dir_paths:
            node = self.inodes.by_path.get(path)
            if node is not None:
                node.listing = None

    async def _mutate(self, fn: Callable[..., T], *args: Any, thread: bool = False) -> T:
        """Run a core operation that changes the layers, one at a time.

        Quick ones run inline (they cannot interleave with anything: no await); ones that may copy up or
        walk trees run in a worker thread while holding the mutex, so no other change interleaves.
        """
        if not thread and not self._mutex.locked():
            try:
                return fn(*args)
            finally:
                self._apply_copied()
        async with self._mutex:
            try:
                if thread:
                    return await trio.to_thread.run_sync(fn, *args)
                return fn(*args)
            finally:
                self._apply_copied()

    # -- objects whose owner this user namespace does not map (unionfs.userns) ----------------------------------
    # The kernel checked every request against the ids we report, with the caller's capabilities; those do not
    # apply to such objects, so their mode bits are checked again here, as kernel overlayfs checks them.

    def _may(self, ctx: pyfuse3.RequestContext, entry: Entry, mask: int = 0, owner: bool = False) -> None:
        ids = self.union.unmapped(entry)
        if ids is None:
            return
        if owner:
            userns.require_owner(_caller(ctx), entry.st, ids)
        if mask:
            userns.require(_caller(ctx), entry.st, ids, mask)

    def _may_remove(self, ctx: pyfuse3.RequestContext, parent: Entry, name: bytes) -> None:
        """Removing or replacing ``name`` in ``parent``: write access to it, and the sticky bit's rule."""
        self._may(ctx, parent, W_OK | X_OK)
        if self.union.userns.initial or not parent.st.st_mode & stat.S_ISVTX:
            return
        victim = self.union.lookup(parent, name)
        ids = self.union.unmapped(victim) if victim is not None else None
        if victim is not None and ids is not None:
            userns.require_sticky(_caller(ctx), parent.st, self.union.unmapped(parent), victim.st, ids)

    def _node(self, ino: int) -> Node:
        try:
            return self.inodes.get(ino)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _entry(self, ino: int) -> Entry:
        node = self._node(ino)
        if node.unlinked:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node.entry

    def _attrs(self, node: Node, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        entry = node.entry
        if st is None:
            st = entry.st
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        if self._plain_owners or node.unlinked:
            a.st_mode = st.st_mode
            a.st_uid = st.st_uid
            a.st_gid = st.st_gid
        else:
            a.st_uid, a.st_gid, a.st_mode = self.union.shown(entry, st)
        if stat.S_ISDIR(st.st_mode) and entry.merged and not node.unlinked:
            a.st_nlink = 1
        else:
            a.st_nlink = st.st_nlink
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _stat_node(self, node: Node) -> os.stat_result:
        """Fresh stat of what stands behind ``node`` (through an open file once it is unlinked)."""
        if node.unlinked:
            for h in self._files.values():
                if h.node is node:
                    return os.fstat(h.fd)
            return node.entry.st
        node.entry.st = self.union.lstat(node.entry)
        return node.entry.st

    def _reply_new(self, entry: Entry) -> pyfuse3.EntryAttributes:
        """The reply for an object just created (its inode number may have been another object's)."""
        self._absent.forget(entry.st)
        return self._reply_entry(entry)

    def _reply_entry(self, entry: Entry) -> pyfuse3.EntryAttributes:
        """A new reference handed to the kernel (lookup, create, mkdir, mknod, symlink, link)."""
        node = self.inodes.node_for(entry)
        node.lookups += 1
        return self._attrs(node, entry.st)

    def _negative(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = self.timeout
        return a

    # -- lookup and attributes ----------------------------------------------------------------------------

    @boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> Any:
        parent = self._entry(parent_inode)
        self._may(ctx, parent, X_OK)
        if name == b".":
            return self._reply_entry(parent)
        if name == b"..":
            raise pyfuse3.FUSEError(errno.ENOENT)
        pnode = self._node(parent_inode)
        if pnode.listing is not None:
            check_name(name)
            entry = self.union.stack.lookup_listed(parent, name, pnode.listing.get(name))
        else:
            entry = self.union.lookup(parent, name)
        if entry is None:
            return self._negative()
        return self._reply_entry(entry)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Drop kernel references; never raises."""
        try:
            for ino, nlookup in inode_list:
                self.inodes.forget(ino, nlookup)
        except Exception:
            log.exception("forget failed")

    @boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Any:
        node = self._node(inode)
        return self._attrs(node, self._stat_node(node))

    def _unlinked_fd(self, node: Node) -> int:
        """An open upper-layer descriptor of an unlinked node: how its attributes are still reached."""
        for h in self._files.values():
            if h.node is node and h.layer == 0:
                return h.fd
        raise pyfuse3.FUSEError(errno.ENOENT)

    @boundary
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> Any:
        node = self._node(inode)
        handle = self._files.get(fh) if fh is not None else None
        if node.unlinked:
            fd = self._unlinked_fd(node)
            if fields.update_size:
                os.ftruncate(fd, attr.st_size)
            if fields.update_uid or fields.update_gid:
                os.fchown(fd, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1)
            if fields.update_mode:
                os.fchmod(fd, stat.S_IMODE(attr.st_mode))
            if fields.update_atime or fields.update_mtime:
                st = os.fstat(fd)
                os.utime(fd, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                 attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
            return self._attrs(node, os.fstat(fd))
        entry = node.entry
        if fields.update_uid or fields.update_gid or fields.update_mode:
            self._may(ctx, entry, owner=True)
        if fields.update_size and (handle is None or not handle.writable):
            self._may(ctx, entry, W_OK)
        if (fields.update_atime or fields.update_mtime) and (ids := self.union.unmapped(entry)) is not None:
            times = (attr.st_atime_ns if fields.update_atime else None,
                     attr.st_mtime_ns if fields.update_mtime else None)
            userns.require_times(_caller(ctx), entry.st, ids, times)
        if fields.update_size:
            if handle is not None and handle.writable:
                await self._mutate(self.union.truncate, node.entry, attr.st_size, handle.fd)
            else:
                await self._mutate(self.union.truncate, node.entry, attr.st_size, thread=node.entry.layer != 0)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            await self._mutate(self.union.chown, node.entry, uid, gid, thread=node.entry.layer != 0)
        if fields.update_mode:
            await self._mutate(self.union.chmod, node.entry, attr.st_mode, thread=node.entry.layer != 0)
        if fields.update_atime or fields.update_mtime:
            atime = attr.st_atime_ns if fields.update_atime else None
            mtime = attr.st_mtime_ns if fields.update_mtime else None
            await self._mutate(self.union.utimens, node.entry, atime, mtime, thread=node.entry.layer != 0)
        return self._attrs(node, self._stat_node(node))

    @boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.union.readlink(self._entry(inode))

    @boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> Any:
        sv = self.union.statvfs()
        out = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                     "f_favail", "f_namemax"):
            setattr(out, attr, getattr(sv, attr))
        return out

    # -- creating -----------------------------------------------------------------------------------------

    async def _change_in(self, parent: Entry, fn: Callable[..., T], *args: Any) -> T:
        """Run a core call that adds or removes a name in ``parent`` (in a worker thread when the parent must
        be copied up first), then drop what was cached of its listing."""
        result = await self._mutate(fn, parent, *args, thread=not parent.dirs or parent.dirs[0] != 0)
        self._changed(parent.path)
        return result

    @boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> Any:
        parent = self._entry(parent_inode)
        self._may(ctx, parent, W_OK | X_OK)
        mode = self.union.creation_mode(parent, mode, ctx.umask)
        return self._reply_new(await self._change_in(parent, self.union.mkdir, name, mode, ctx.uid, ctx.gid))

    @boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> Any:
        parent = self._entry(parent_inode)
        self._may(ctx, parent, W_OK | X_OK)
        mode = self.union.creation_mode(parent, mode, ctx.umask)
        return self._reply_new(
            await self._change_in(parent, self.union.mknod, name, mode, rdev, ctx.uid, ctx.gid))

    @boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext) -> Any:
        parent = self._entry(parent_inode)
        self._may(ctx, parent, W_OK | X_OK)
        return self._reply_new(await self._change_in(parent, self.union.symlink, name, target, ctx.uid, ctx.gid))

    @boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> Any:
        node = self._node(inode)
        if node.unlinked:
            raise pyfuse3.FUSEError(errno.ENOENT)
        parent = self._entry(new_parent_inode)
        if (ids := self.union.unmapped(node.entry)) is not None:
            userns.require_link_source(_caller(ctx), node.entry.st, ids)
        self._may(ctx, parent, W_OK | X_OK)
        entry = await self._mutate(self.union.link, node.entry, parent, new_name, thread=True)
        self._changed(parent.path)
        self.inodes.add_path(node, entry.path)
        node.lookups += 1
        return self._attrs(node, self._stat_node(node))

    @boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> Any:
        parent = self._entry(parent_inode)
        self._may(ctx, parent, W_OK | X_OK)
        mode = self.union.creation_mode(parent, mode, ctx.umask)
        fd, entry = await self._change_in(parent, self.union.create, name, mode, flags, ctx.uid, ctx.gid)
        attrs = self._reply_new(entry)
        node = self.inodes.get(attrs.st_ino)
        return self._open_handle(node, fd, writable=True), attrs

    # -- removing and renaming ----------------------------------------------------------------------------

    def _gone(self, parent: Entry, name: bytes, removed: Entry) -> None:
        self._absent.forget(removed.st)  # its inode number may be given to a new object
        path = join(parent.path, name)
        node = self.inodes.by_path.get(path)
        if node is None:
            return
        last = removed.is_dir or removed.st.st_nlink <= 1 or removed.layer != 0
        self.inodes.unlinked(node, path, last)

    @boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._entry(parent_inode)
        self._may_remove(ctx, parent, name)
        removed = await self._change_in(parent, self.union.unlink, name)
        self._gone(parent, name, removed)

    @boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._entry(parent_inode)
        self._may_remove(ctx, parent, name)
        removed = await self._mutate(self.union.rmdir, parent, name, thread=True)
        self._changed(parent.path)
        self._gone(parent, name, removed)

    @boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        old_parent = self._entry(parent_inode_old)
        new_parent = self._entry(parent_inode_new)
        old_path = join(old_parent.path, name_old)
        new_path = join(new_parent.path, name_new)
        moving = self.inodes.by_path.get(old_path)
        target = self.inodes.by_path.get(new_path)
        self._may_remove(ctx, old_parent, name_old)
        self._may_remove(ctx, new_parent, name_new)
        if moving is not None and moving.entry.is_dir and old_parent.path != new_parent.path:
            self._may(ctx, moving.entry, W_OK)  # its ".." changes
        if moving is not None and moving is target and moving.entry.layer == 0:
            return  # two names of one upper inode: rename(2) does nothing
        moved, replaced = await self._mutate(self.union.rename, old_parent, name_old, new_parent, name_new,
                                             flags, thread=True)
        self._changed(old_parent.path, new_parent.path)
        if moved.path == old_path:
            return
        if flags & pyfuse3.RENAME_EXCHANGE:
            assert replaced is not None
            swap = b"\0exchange"
            self.inodes.renamed(old_path, swap, None, moved.is_dir)
            self.inodes.renamed(new_path, old_path, replaced, replaced.is_dir)
            self.inodes.renamed(swap, new_path, moved, moved.is_dir)
            return
        if replaced is not None:
            self._absent.forget(replaced.st)
        if target is not None and replaced is not None:
            last = replaced.is_dir or replaced.st.st_nlink <= 1 or replaced.layer != 0
            self.inodes.unlinked(target, new_path, last)
        self.inodes.renamed(old_path, new_path, moved, moved.is_dir)

    # -- files --------------------------------------------------------------------------------------------

    def _open_handle(self, node: Node, fd: int, writable: bool) -> pyfuse3.FileInfo:
        fh = self._new_fh()
        self._files[fh] = FileHandle(node, fd, node.entry.layer, writable)
        node.opens += 1
        info = pyfuse3.FileInfo(fh=fh)
        info.keep_cache = True
        return info

    @boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> Any:
        node = self._node(inode)
        if node.unlinked:
            raise pyfuse3.FUSEError(errno.ENOENT)
        writable = bool(flags & WRITE_FLAGS)
        acc = flags & os.O_ACCMODE
        self._may(ctx, node.entry, (R_OK if acc != os.O_WRONLY else 0) | (W_OK if writable else 0))
        if writable:
            fd = await self._mutate(self.union.open, node.entry, flags, thread=node.entry.layer != 0)
        else:
            fd = self.union.open(node.entry, flags)
        return self._open_handle(node, fd, writable)

    def _current(self, handle: FileHandle) -> int:
        """A read-only handle opened before a copy-up reads the copy afterwards, as on the kernel."""
        node = handle.node
        if handle.layer != node.entry.layer and not node.unlinked:
            fd = self.union.open(node.entry, os.O_RDONLY)
            os.close(handle.fd)
            handle.fd = fd
            handle.layer = node.entry.layer
        return handle.fd

    @boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._files[fh]
        fd = self._current(handle)
        if size >= _BIG_IO:
            return await trio.to_thread.run_sync(os.pread, fd, size, off)
        return os.pread(fd, size, off)

    @boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._files[fh]
        if len(buf) >= _BIG_IO:
            return await trio.to_thread.run_sync(os.pwrite, handle.fd, buf, off)
        return os.pwrite(handle.fd, buf, off)

    @boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._files[fh]
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, handle.fd)

    @boundary
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh)
        os.close(handle.fd)
        self.inodes.release_open(handle.node)

    # -- directories --------------------------------------------------------------------------------------

    @boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if node.unlinked:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self._may(ctx, node.entry, R_OK)
        fh = self._new_fh()
        self._dirs[fh] = DirHandle(node)
        node.opens += 1
        return fh

    def _listing(self, node: Node) -> dict[bytes, tuple[int, int]]:
        if node.listing is None:
            node.listing = self.union.listdir(node.entry)
        return node.listing

    def _dir_child(self, handle: DirHandle, names: list[tuple[bytes, tuple[int, int]]], index: int) -> Entry | None:
        """Entry of the index-th listed name, resolved once per handle (None when it vanished)."""
        if index in handle.entries:
            return handle.entries[index]
        name, listed = names[index]
        entry: Entry | None
        try:
            entry = self.union.stack.lookup_listed(handle.node.entry, name, listed)
        except PermissionError:
            entry = self._unreachable(handle, name, listed)
            if entry is not None:
                handle.unreachable.add(index)
        except OSError:
            entry = None
        handle.entries[index] = entry
        return entry

    def _unreachable(self, handle: DirHandle, name: bytes, listed: tuple[int, int]) -> Entry | None:
        """A listed name in a directory we may read but not search: the kernel lists it all the same. Its
        entry carries only what the directory itself says (inode number and type); no stat is possible."""
        layer = self.union.stack.layers[listed[0]]
        inos = handle.inos.get(listed[0])
        if inos is None:
            inos = handle.inos[listed[0]] = {}
            with contextlib.suppress(OSError), os.scandir(layer.xpath(handle.node.path)) as it:
                for de in it:
                    inos[os.fsencode(de.name)] = de.inode()
        ino = inos.get(name)
        if ino is None:
            return None
        return Entry(join(handle.node.path, name), listed[0], os.stat_result((listed[1], ino, layer.dev, 1, 0, 0,
                                                                                0, 0, 0, 0)))

    def _unreachable_attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes of such an entry, which the kernel must not keep: every use of it asks us again (and
        meets the EACCES the layer gives)."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode = stat.S_IFMT(node.entry.st.st_mode)
        a.entry_timeout = 0
        a.attr_timeout = 0
        return a

    def _dot_entries(self, handle: DirHandle) -> list[tuple[bytes, Node]]:
        node = handle.node
        parent = self.inodes.by_path.get(split(node.path)[0]) if node.path != ROOT else node
        return [(b".", node), (b"..", parent if parent is not None else node)]

    @boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs[fh]
        if start_id == 0 or handle.names is None:
            # The first read takes the snapshot (as the kernel does); rewinddir(3) takes a new one.
            handle.names = list(self._listing(handle.node).items())
            handle.entries.clear()
            handle.unreachable.clear()
        names = handle.names
        if start_id < 2:
            # "." and "..": the kernel takes no lookup reference for these
            for index, (name, node) in enumerate(self._dot_entries(handle)[start_id:], start_id):
                if not pyfuse3.readdir_reply(token, name, self._attrs(node), index + 1):
                    return
            start_id = 2
        for index in range(start_id - 2, len(names)):
            entry = self._dir_child(handle, names, index)
            if entry is None:
                continue
            node = self.inodes.node_for(entry)
            attrs = self._unreachable_attrs(node) if index in handle.unreachable else self._attrs(node, entry.st)
            if not pyfuse3.readdir_reply(token, names[index][0], attrs, index + 3):
                if node.lookups == 0:
                    self.inodes.forget(node.ino, 0)
                return
            node.lookups += 1
            handle.entries.pop(index, None)

    @boundary
    async def releasedir(self, fh: int) -> None:
        handle = self._dirs.pop(fh)
        self.inodes.release_open(handle.node)

    @boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await trio.to_thread.run_sync(self.union.fsync_dir, self._dirs[fh].node.entry)

    # -- xattrs -------------------------------------------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # A name found missing stays missing until it is set (AbsentXattrs). This answer is the hot path of a
        # warm `ls -l`, so it comes first, without the error boundary's coroutine (nothing in it can raise
        # but the FUSEError it means to).
        node = self.inodes.nodes.get(inode)
        if node is not None and not node.unlinked and self._absent.known(node.entry.st, name):
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await self._getxattr(inode, name)

    @boundary
    async def _getxattr(self, inode: int, name: bytes) -> bytes:
        node = self._node(inode)
        if node.unlinked:
            return self.union.getxattr_fd(self._unlinked_fd(node), name)
        entry = node.entry
        try:
            return self.union.getxattr(entry, name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                self._absent.add(entry.st, name)
            raise

    @boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self._node(inode)
        names = self.union.listxattr_fd(self._unlinked_fd(node)) if node.unlinked else self.union.listxattr(node.entry)
        if ctx.uid != 0:  # trusted.* is listed for the superuser only, as the kernel lists it
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    @boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._node(inode)
        if node.unlinked:
            fd = self._unlinked_fd(node)
            self._absent.forget(os.fstat(fd))
            return self.union.setxattr_fd(fd, name, value)
        self._may_set_xattr(ctx, node.entry, name)
        self._absent.forget(node.entry.st)
        try:
            await self._mutate(self.union.setxattr, node.entry, name, value, thread=node.entry.layer != 0)
        finally:
            self._absent.forget(node.entry.st)  # a getxattr may have run while a worker thread copied up and set

    def _may_set_xattr(self, ctx: pyfuse3.RequestContext, entry: Entry, name: bytes) -> None:
        if name.startswith(b"user."):
            self._may(ctx, entry, W_OK)
        elif name.startswith(b"system.posix_acl_"):
            self._may(ctx, entry, owner=True)

    @boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._node(inode)
        if node.unlinked:
            return self.union.removexattr_fd(self._unlinked_fd(node), name)
        self._may_set_xattr(ctx, node.entry, name)
        await self._mutate(self.union.removexattr, node.entry, name, thread=node.entry.layer != 0)

"""pyfuse3.Operations over a :class:`~unionfs.union.Union`: each handler maps inodes to one core call and the
core's result to a reply; every rule lives in the core.

What runs where:

* **On the event loop, inline**: lookups, attributes, listings, xattr reads, opens for reading, and every
  change of an object already in the upper layer (a few system calls, no ``await`` between resolving an
  entry and using it). Lookups, attributes, listings, readlink, listxattr and opens first wait for a change
  running in a worker thread to end (``_settle``): until then the names it changes are in flux.
* **In a worker thread**: a change that may copy up first (:meth:`~unionfs.union.Union.may_copy_up`), rmdir,
  rename and link (tree walks, copy-ups), reads and writes of 1 MiB or more, fsync.
* **The mutex** serialises changes to the layers: a change in a worker thread holds it for its whole run, and
  an inline change runs at once only while no thread holds it (else it waits for it), so no two changes
  interleave. After each change, the copy-ups it made are applied to the inode table.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from .._native import Native
from .._native import recipe as native_recipe
from ..layers import Entry, subdirectory_dirs
from ..union import AttrChanges, DirListing, Union
from ..userns import Caller
from . import errors
from .errors import boundary
from .inodes import InodeTable, Node, shared_listing

log = logging.getLogger("unionfs")

T = TypeVar("T")

#: reads and writes at least this large leave the event loop for a worker thread
_BIG_IO = 1 << 20

#: how many directories opened with cached listings are remembered (beyond, all the table's directories are
#: taken for them)
_CACHED_DIRS_MAX = 1 << 16

#: how many merged listings of directories opened without OPENDIR are kept ready to serve (unionfs.fuse.native)
_OPENLESS_LISTINGS = 256
#: how many layer directories one merged listing names to read ahead at most (Native.prefetch_dirs)
_PREFETCH_DIRS = 512

#: how many real objects the memory of missing xattr names covers before it starts again
_ABSENT_MAX = 1 << 16

#: the xattrs the kernel asks a FUSE file for before each write to it (whether the write must drop privileges)
_CAPABILITY = b"security.capability"
_ASKED_BEFORE_WRITES = (_CAPABILITY,)


class AbsentXattrs:
    """xattr names a getxattr found missing, per real object (st_dev, st_ino), so that asking again needs no
    system call. The kernel caches no xattrs for FUSE: `ls -l` asks for security.selinux and
    system.posix_acl_access of every file on every run, and every write asks for security.capability.

    Keyed by the real object, not by node: one upper file may have two nodes (a name the kernel has not looked
    up yet, beside an unlinked open one). Forgotten for an object whenever an xattr of it changes through us,
    and whenever a name is created or removed (an inode number may be reused).

    With a ``mirror`` (the native part), each name found missing is told to it for the inode asked, and it
    answers the next requests itself; any forgetting empties all it was told (it knows inodes, not objects).
    """

    __slots__ = ("_names", "_sets", "mirror")

    def __init__(self) -> None:
        self._names: dict[tuple[int, int], tuple[bytes, ...]] = {}
        #: one shared tuple per set of names (nearly every object has the same one or two)
        self._sets: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}
        self.mirror: Native | None = None

    def tell(self, ino: int, name: bytes) -> None:
        """Inode ``ino``'s object lacks ``name`` (it is known here): the mirror answers for it from now on."""
        if self.mirror is not None:
            with contextlib.suppress(OSError):  # (ENOSPC: more names than it holds; asked here then)
                self.mirror.absent_at(ino, name)

    def known(self, st: os.stat_result, name: bytes) -> bool:
        return self.known_object(st.st_dev, st.st_ino, name)

    def known_object(self, dev: int, ino: int, name: bytes) -> bool:
        names = self._names.get((dev, ino))
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
        if self.mirror is not None:
            self.mirror.absent_clear()


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.pid, umask=ctx.umask)


def _current_entries(args: Sequence[Any]) -> list[Any]:
    """``args`` with each :class:`Node` replaced by its current entry (ENOENT once it has no name)."""
    out = []
    for arg in args:
        if isinstance(arg, Node):
            if arg.unlinked:
                raise OSError(errno.ENOENT, "No such file or directory")
            arg = arg.entry
        out.append(arg)
    return out


def _changes(attr: Any, fields: Any) -> AttrChanges:
    """What a setattr request asks to change."""
    return AttrChanges(
        size=attr.st_size if fields.update_size else None,
        uid=attr.st_uid if fields.update_uid else None,
        gid=attr.st_gid if fields.update_gid else None,
        mode=attr.st_mode if fields.update_mode else None,
        atime_ns=attr.st_atime_ns if fields.update_atime else None,
        mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
    )


class FileHandle:
    __slots__ = ("node", "fd", "layer", "writable")

    def __init__(self, node: Node, fd: int, layer: int, writable: bool) -> None:
        self.node = node
        self.fd = fd
        self.layer = layer
        self.writable = writable


class DirHandle:
    __slots__ = ("node", "listing")

    def __init__(self, node: Node) -> None:
        self.node = node
        #: the merged listing this handle serves, taken at its first read
        self.listing: DirListing | None = None


class Operations(pyfuse3.Operations):
    """The FUSE request handlers."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    #: the kernel checks access against POSIX ACLs too, as overlayfs does; the umask then reaches us to apply
    #: (Union.creation_mode)
    enable_acl = True

    def __init__(self, union: Union, timeout: float = 300.0) -> None:
        super().__init__()
        #: the native part when it serves this mount (unionfs.fuse.native): listings may then be cached by the
        #: kernel, and READDIR may come plain
        self.native: Native | None = None
        #: whether the shim serves reads and writes of open files on their descriptors (unionfs.fuse.native)
        self.data_path = False
        self.union = union
        self.timeout = timeout
        self.inodes = InodeTable(union.layer_devices(), union.root(), writable=union.stack.writable)
        self._files: dict[int, FileHandle] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._next_fh = 1
        self._mutex = trio.Lock()
        self._absent = AbsentXattrs()
        #: the directories opened while listings are cached: the kernel may keep a listing of these only
        self._cached_dirs: set[int] = set()
        self._cached_dirs_overflow = False
        #: what the READDIRs of directories the kernel opened without OPENDIR are served from (unionfs.fuse.native):
        #: by inode, the merged listing of the node it was made of and its listing in position order; no
        #: handle holds it (the kernel sends none), the offsets say where a reader stands (listing_position)
        self._openless: dict[int, tuple[dict[bytes, tuple[int, int]], DirListing]] = {}
        #: the native part when it answers GETATTR of directories from the attributes it was given last
        self._dir_attrs: Native | None = None
        #: the native part when it answers read-only opens of the files it is told of itself (Native.set_opens)
        self._opens: Native | None = None
        #: the native part when it reads ahead the directories a listing's subdirectories are made of
        self._prefetch: Native | None = None
        #: the xattr names the native part was asked to check on the files (_checkable)
        self._checkable_names: set[bytes] = set()

    def use_native(self, native: Native | None) -> None:
        """Serve with the native part (None: the pure mode): cached listings, the data path when it has it, and
        absent xattrs answered by it (not with -d, whose log shows every request)."""
        self.native = native
        self.data_path = native is not None and native.data_ops
        self._absent.mirror = native if not errors.debug else None
        self._dir_attrs = native if native is not None and native.dir_attrs else None
        self._opens = native if native is not None and native.opens and self.data_path else None
        self._prefetch = native if native is not None and native.prefetch else None
        if native is not None and (self._opens is not None or self._prefetch is not None):
            native.layers([layer.fd for layer in self.union.stack.layers])

    def log_table(self, signum: int = 0, frame: object = None) -> None:
        """Log the size of the inode table (on SIGUSR1): each node but the root is an inode the kernel still
        references (or one with open files), so that is what the server's memory follows."""
        s = self.inodes.stats()
        files = len(self._files) + (self._opens.open_count() if self._opens is not None else 0)
        log.info("inode table: %d nodes, %d names, %d listings kept (%d names); %d files, %d directories open",
                 s["nodes"], s["names"], s["listings"], s["listed_names"], files, len(self._dirs))

    # -- plumbing -----------------------------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _apply_copied(self) -> None:
        for copied in self.union.take_copied():
            self._absent.forget(copied.new.st)
            for node in self.inodes.copied_up(copied):
                self._renumbered(node)
            if copied.breaks_hard_link:
                # (the copy has one link: the kernel's attributes of the node still count the lower file's)
                copy = self.inodes.by_path.get(copied.new.path)
                if copy is not None:
                    self._drop_attrs(copy.ino)
            if self.data_path:
                self._follow_copy_up(copied.new.path)
            if copied.breaks_hard_link:
                # The lower file's other names now lead to another inode (the lower file, no longer the copy's):
                # a listing the kernel keeps of a directory holding one would give it the old inode number. They
                # may be names the table no longer knows (the kernel forgot them), so every listing the kernel
                # may keep is dropped.
                self._listings_changed_behind()

    def _renumbered(self, node: Node) -> None:
        """``node`` shows another inode number from now on (InodeTable.shown): the attributes the kernel keeps
        of it are dropped (a reply of the current request may be one of them)."""
        if self.native is None:  # (the pure mode shows each node's own number: it did not change)
            return
        self.native.show_numbers([(node.ino, self.inodes.shown(node) or 0)])
        self._drop_attrs(node.ino)

    @staticmethod
    def _drop_attrs(ino: int) -> None:
        """The kernel drops the attributes it keeps of inode ``ino`` (only those: no page, no lock waited for)."""
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError as exc:  # (ENOENT: not known to the kernel, or it forgot it meanwhile)
            if exc.errno not in (errno.ENOENT, errno.EBADF, errno.ENOTCONN):
                log.warning("could not drop the kernel's attributes of inode %d: %s", ino, exc)

    def _unshow_dropped(self) -> None:
        """The native part forgets the numbers it was told for nodes freed since (InodeTable.take_dropped_names)."""
        dropped = self.inodes.take_dropped_names()
        if dropped and self.native is not None:
            self.native.show_numbers([(ino, 0) for ino in dropped])

    def _show(self, node: Node) -> None:
        """Tell the native part which inode number replies show for ``node`` where that is not its own (the
        other names of a hard-linked lower file; the pure mode cannot, and shows each node's own number)."""
        if self.native is not None:
            shown = self.inodes.shown(node)
            if shown is not None:
                self.native.show_numbers([(node.ino, shown)])

    def _follow_copy_up(self, path: bytes) -> None:
        """The handles open before a copy-up on the lower file read the copy from now on (as on the kernel):
        reopened here, since their reads no longer reach Python (the data path)."""
        node = self.inodes.by_path.get(path)
        if node is None:
            return
        self._adopt(node)
        for fh, handle in self._files.items():
            if handle.node is node and handle.layer != node.entry.layer:
                self._current(handle, fh)

    def _listings_changed_behind(self) -> None:
        """Merged listings changed without a change the kernel made to their directories (which drops what
        it caches itself): drop every listing the kernel may keep (cached listings, unionfs.fuse.native), that
        of each directory opened since the last time this was done."""
        cached, self._cached_dirs = self._cached_dirs, set()
        if self._cached_dirs_overflow:  # (too many to remember: every directory the kernel holds)
            cached = {ino for ino, node in self.inodes.nodes.items() if stat.S_ISDIR(node.identity()[0])}
            self._cached_dirs_overflow = False
        for ino in cached:
            self._listing_changed_behind(ino)

    def _listing_changed_behind(self, ino: int) -> None:
        """The merged listing of directory ``ino`` changed without a change the kernel made to it (which drops
        what it caches itself): drop the listing it may keep (cached listings, unionfs.fuse.native)."""
        if self.native is None or not self.native.cached_listings:
            return
        try:
            pyfuse3.invalidate_inode(ino, attr_only=False)
        except OSError as exc:  # (ENOENT: not known to the kernel, or it forgot it meanwhile)
            if exc.errno not in (errno.ENOENT, errno.EBADF, errno.ENOTCONN):
                log.warning("could not drop the kernel's listing of inode %d: %s", ino, exc)

    async def _change(self, fn: Callable[..., T], node: Node, *args: Any) -> T:
        """Run a core call that changes ``node``'s object (or adds or removes a name in it): in a worker thread
        when it may copy up first, else inline."""
        return await self._mutate(fn, node, *args, thread=self.union.may_copy_up(node.entry))

    async def _change_long(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a core call that may walk trees or copy up whatever it is given (rmdir, rename, link)."""
        return await self._mutate(fn, *args, thread=True)

    async def _mutate(self, fn: Callable[..., T], *args: Any, thread: bool) -> T:
        """Run a core call that changes the layers, one at a time (see the module's docstring). Each
        :class:`Node` among ``args`` is passed as its entry at the time the call runs: waiting for the mutex
        may have let another change copy it up or remove its name."""
        if not thread and not self._mutex.locked():
            try:
                return fn(*_current_entries(args))
            finally:
                self._apply_copied()
        async with self._mutex:
            try:
                if thread:
                    return await trio.to_thread.run_sync(fn, *_current_entries(args))
                return fn(*_current_entries(args))
            finally:
                self._apply_copied()

    async def _settle(self) -> None:
        """Wait for the change running in a worker thread, if any, to end (and its results to reach the inode
        table): meanwhile the names it changes are in flux (a whiteout put where a file was, a renamed object
        not yet at its node's path), and a read of them through a node's entry could reach the wrong object.
        Returns with nothing running; the caller must not await again before using what it resolves."""
        if self._mutex.locked():
            async with self._mutex:
                pass

    def _node(self, ino: int) -> Node:
        try:
            return self.inodes.get(ino)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _live(self, ino: int) -> Node:
        """The node of ``ino``, which must still have a name."""
        node = self._node(ino)
        if node.unlinked:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _open_fd(self, node: Node, upper_only: bool = False) -> int | None:
        """A descriptor open on ``node``'s object (of the upper layer only, with ``upper_only``)."""
        self._adopt(node)
        for h in self._files.values():
            if h.node is node and (h.layer == 0 or not upper_only):
                return h.fd
        return None

    def _unlinked_fd(self, node: Node) -> int:
        """An open upper-layer descriptor of an unlinked node: how its attributes are still reached."""
        fd = self._open_fd(node, upper_only=True)
        if fd is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return fd

    def _target(self, node: Node) -> Entry | int:
        """What the core reaches ``node``'s object through: its entry, or once unlinked an open descriptor."""
        return self._unlinked_fd(node) if node.unlinked else node.entry

    def _attrs(self, node: Node, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        if st is None:
            st = node.entry.st
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        self._show(node)
        a.generation = 0
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        if node.unlinked:
            a.st_uid, a.st_gid, a.st_mode, a.st_nlink = self.union.shown_open(self._open_fd(node), st)
        else:
            a.st_uid, a.st_gid, a.st_mode, a.st_nlink = self.union.shown(node.entry, st)
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _fresh_stat(self, node: Node) -> os.stat_result:
        """Fresh stat of what stands behind ``node`` (through an open file once it is unlinked)."""
        if node.unlinked:
            fd = self._open_fd(node)
            return os.fstat(fd) if fd is not None else node.entry.st
        self.inodes.update(node, self.union.restat(node.entry))
        return node.entry.st

    def _openable(self, generation: int, node: Node) -> None:
        """Tell the native part where ``node``'s file is, as resolved since ``generation`` (taken after the last
        await), when a read-only open of it needs nothing else of us: it answers such opens itself until
        anything may have changed (Native.set_opens)."""
        record = self._recipe(node)
        if record is not None and self._opens is not None:
            self._opens.openable(generation, record)

    def _recipe(self, node: Node) -> bytes | None:
        """Where ``node``'s file is (a record of Native.openable), when a read-only open of it needs nothing else
        of us (the kernel checks access; only an owner this user namespace does not map needs our check)."""
        entry = node.entry
        if node.unlinked or not stat.S_ISREG(entry.st.st_mode) or self.union.unmapped(entry) is not None:
            return None
        return native_recipe(node.ino, entry.layer, entry.path, entry.st.st_dev, entry.st.st_ino)

    def _adopt(self, node: Node) -> None:
        """The handles the native part opened on ``node``'s file become ours (it must be told of them: a copy-up
        reopens them on the copy, an unlinked file's attributes are reached through them); we close them at
        their release."""
        if self._opens is None:
            return
        for fh, fd, layer in self._opens.adopt(node.ino):
            self._files[fh] = FileHandle(node, fd, layer, False)
            self.inodes.opened(node)

    def _reply_new(self, entry: Entry) -> pyfuse3.EntryAttributes:
        """The reply for an object just created (its inode number may have been another object's)."""
        self._absent.forget(entry.st)
        return self._reply_entry(entry)

    def _reply_entry(self, entry: Entry) -> pyfuse3.EntryAttributes:
        """A new reference handed to the kernel (lookup, create, mkdir, mknod, symlink)."""
        return self._attrs(self.inodes.reference(entry), entry.st)

    def _negative(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = self.timeout
        return a

    def _gone(self, parent: Node, name: bytes, removed: Entry) -> None:
        self._absent.forget(removed.st)  # its inode number may be given to a new object
        self.inodes.removed(parent, name, self.union.last_name(removed))

    # -- lookup and attributes ----------------------------------------------------------------------------

    @boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> Any:
        await self._settle()
        generation = self._opens.attr_generation() if self._opens is not None else 0
        parent = self._live(parent_inode)
        entry = self.union.lookup(parent.entry, name, _caller(ctx), parent.listing)
        if entry is None:
            return self._negative()
        attrs = self._reply_entry(entry)
        if self._opens is not None:
            self._openable(generation, self.inodes.get(attrs.st_ino))
        return attrs

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Drop kernel references; never raises."""
        try:
            for ino, nlookup in inode_list:
                self.inodes.forget(ino, nlookup)
            self._unshow_dropped()
            if self.inodes.trim():
                log.debug("inode table shrank to %d nodes: memory given back", len(self.inodes.nodes))
        except Exception:
            log.exception("forget failed")

    @boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Any:
        await self._settle()
        node = self._node(inode)
        return self._attrs(node, self._fresh_stat(node))

    @boundary
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> Any:
        node = self._node(inode)
        changes = _changes(attr, fields)
        if node.unlinked:
            return self._attrs(node, self.union.setattr_open(self._unlinked_fd(node), changes))
        handle = self._files.get(fh) if fh is not None else None
        writer = handle.fd if handle is not None and handle.writable else None
        await self._change(self.union.setattr, node, changes, _caller(ctx), writer)
        return self._attrs(node, self._fresh_stat(node))

    @boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        await self._settle()
        return self.union.readlink(self._live(inode).entry)

    @boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> Any:
        sv = self.union.statvfs()
        out = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                     "f_favail", "f_namemax"):
            setattr(out, attr, getattr(sv, attr))
        return out

    # -- creating -----------------------------------------------------------------------------------------

    async def _change_in(self, parent: Node, fn: Callable[..., T], *args: Any) -> T:
        """Run a core call that adds or removes a name in directory ``parent``, then drop what was kept of
        its listing."""
        result = await self._change(fn, parent, *args)
        self.inodes.listing_changed(parent.path)
        return result

    @boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> Any:
        parent = self._live(parent_inode)
        entry = await self._change_in(parent, self.union.mkdir, name, mode, ctx.uid, ctx.gid, _caller(ctx))
        return self._reply_new(entry)

    @boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> Any:
        parent = self._live(parent_inode)
        entry = await self._change_in(parent, self.union.mknod, name, mode, rdev, ctx.uid, ctx.gid, _caller(ctx))
        return self._reply_new(entry)

    @boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext) -> Any:
        parent = self._live(parent_inode)
        entry = await self._change_in(parent, self.union.symlink, name, target, ctx.uid, ctx.gid, _caller(ctx))
        return self._reply_new(entry)

    @boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> Any:
        node = self._live(inode)
        parent = self._live(new_parent_inode)
        entry = await self._change_long(self.union.link, node, parent, new_name, _caller(ctx))
        self.inodes.linked(node, entry)
        return self._attrs(node, self._fresh_stat(node))

    @boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> Any:
        parent = self._live(parent_inode)
        fd, entry = await self._change_in(parent, self.union.create, name, mode, flags, ctx.uid, ctx.gid,
                                          _caller(ctx))
        attrs = self._reply_new(entry)
        node = self.inodes.get(attrs.st_ino)
        self._absent_before_writes(node, fd)
        return self._open_handle(node, fd, writable=True, flags=flags), attrs

    # -- removing and renaming ----------------------------------------------------------------------------

    @boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._live(parent_inode)
        self._gone(parent, name, await self._change_in(parent, self.union.unlink, name, _caller(ctx)))

    @boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._live(parent_inode)
        removed = await self._change_long(self.union.rmdir, parent, name, _caller(ctx))
        self.inodes.listing_changed(parent.path)
        self._gone(parent, name, removed)

    @boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        old_parent, new_parent = self._live(parent_inode_old), self._live(parent_inode_new)
        moved, replaced = await self._change_long(self.union.rename, old_parent, name_old, new_parent, name_new,
                                                  flags, _caller(ctx))
        if flags & pyfuse3.RENAME_EXCHANGE and replaced is not None:
            self.inodes.exchanged(moved, replaced)
            if self.data_path:  # (a copy-up of the rename's was followed where the copy no longer was)
                self._follow_copy_up(moved.path)
                self._follow_copy_up(replaced.path)
            return
        if replaced is not None:
            self._absent.forget(replaced.st)
        last = replaced is not None and self.union.last_name(replaced)
        self.inodes.renamed(old_parent, name_old, moved, replaced, last)
        if self.data_path:
            self._follow_copy_up(moved.path)

    # -- files --------------------------------------------------------------------------------------------

    def _open_handle(self, node: Node, fd: int, writable: bool, flags: int) -> pyfuse3.FileInfo:
        fh = self._new_fh()
        self._files[fh] = FileHandle(node, fd, node.entry.layer, writable)
        info = pyfuse3.FileInfo(fh=fh)
        info.keep_cache = True
        if self.data_path and self.native is not None:
            # (a descriptor open for writing is the upper file's: the open copied up first)
            writes = writable and node.entry.layer == 0
            # A write-only handle (which cannot be mapped) writes past the page cache, on the upper file at once:
            # the shim's reader answers its WRITEs, dropping the set-ID bits as the kernel would before each. Not
            # one of a file with a capability: the kernel asks no REMOVEXATTR before such a write, and the
            # server's pwrite drops only a capability stored as itself (not one a store keeps aside).
            info.direct_io = (writes and flags & os.O_ACCMODE == os.O_WRONLY and self.native.own_reader
                              and self.union.lacks_xattr(fd, _CAPABILITY))
            self.native.serve(fh, fd, reads=True, writes=writes, direct=info.direct_io)
        self.inodes.opened(node)
        return info

    def _absent_before_writes(self, node: Node, fd: int) -> None:
        """A file just opened for writing (its upper object, ``fd``): what it lacks of the xattrs the kernel asks
        before each write is known from now on, so that in the native mode not even the first write waits for
        Python to answer that question."""
        if self._absent.mirror is None or node.unlinked:
            return
        st = os.fstat(fd)
        if node.identity()[1:] != (st.st_dev, st.st_ino) or not stat.S_ISREG(st.st_mode):
            return
        for name in _ASKED_BEFORE_WRITES:
            if self._absent.known(st, name) or self.union.lacks_xattr(fd, name):
                self._absent.add(st, name)
                self._absent.tell(node.ino, name)

    @boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> Any:
        await self._settle()
        node = self._live(inode)
        writable = self.union.opens_for_writing(flags)
        if writable:
            fd = await self._change(self.union.open, node, flags, _caller(ctx))
            self._absent_before_writes(node, fd)
        else:
            generation = self._opens.attr_generation() if self._opens is not None else 0
            fd = self.union.open(node.entry, flags, _caller(ctx))
            if self._opens is not None:  # (the next read-only open is the native part's, unless things change)
                self._openable(generation, node)
        return self._open_handle(node, fd, writable, flags)

    def _current(self, handle: FileHandle, fh: int | None = None) -> int:
        """A read-only handle opened before a copy-up reads the copy afterwards, as on the kernel. (``fh``: the
        handle's number, whose reads the shim serves, on the new descriptor from now on.) Only the copy itself:
        when what stands at the node's path now is something else (the copy was renamed away, leaving a
        whiteout or another file there, and the node is not told yet), the handle keeps its descriptor."""
        node = handle.node
        if handle.layer != node.entry.layer and not node.unlinked:
            try:
                fd = self.union.open(node.entry, os.O_RDONLY)
            except OSError:
                return handle.fd
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (node.entry.st.st_dev, node.entry.st.st_ino):
                os.close(fd)
                return handle.fd
            if fh is not None and self.native is not None:
                self.native.stop(fh)  # (waits for a read of the old descriptor under way in the shim)
            os.close(handle.fd)
            handle.fd = fd
            handle.layer = node.entry.layer
            if fh is not None and self.native is not None:
                self.native.serve(fh, fd, reads=True, writes=False)
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
        await trio.to_thread.run_sync(self.union.fsync, handle.fd, datasync)

    @boundary
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh)
        if self.data_path and self.native is not None:
            self.native.stop(fh)  # (before the close: waits for a request of it under way in the shim)
        os.close(handle.fd)
        self.inodes.release_open(handle.node)
        self._unshow_dropped()

    # -- directories --------------------------------------------------------------------------------------

    @boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        await self._settle()
        node = self._live(inode)
        self.union.opendir(node.entry, _caller(ctx))
        fh = self._new_fh()
        self._dirs[fh] = DirHandle(node)
        if self.native is not None:
            self._dir_cached(inode)
        self.inodes.opened(node)
        return fh

    def _dir_cached(self, ino: int) -> None:
        """The kernel may keep a listing of directory ``ino`` from now on (cached listings)."""
        if len(self._cached_dirs) < _CACHED_DIRS_MAX:
            self._cached_dirs.add(ino)
        else:
            self._cached_dirs_overflow = True

    def _openless_listing(self, node: Node) -> DirListing:
        """The listing a READDIR of directory ``node`` opened without OPENDIR is served from: the current merged
        listing, in position order, made again once the merged listing changed."""
        names = self._merged(node)
        kept = self._openless.pop(node.ino, None)
        if kept is None or kept[0] is not names:
            kept = (names, self.union.listing(names))
        self._dir_cached(node.ino)  # (each time: the set is emptied whenever what it names is dropped)
        self._openless[node.ino] = kept  # (the most recently used last)
        while len(self._openless) > _OPENLESS_LISTINGS:
            del self._openless[next(iter(self._openless))]
        return kept[1]

    def _merged(self, node: Node) -> dict[bytes, tuple[int, int]]:
        """The merged listing of directory ``node``, kept until something changes in it."""
        if node.listing is None:
            node.listing = shared_listing(self.union.listdir(node.entry))
            self._listed(node)
            if self._prefetch is not None:  # (a walk needs the first ones soonest; the rest wait for their turn)
                self._prefetch.prefetch_dirs(itertools.islice(subdirectory_dirs(node.entry, node.listing),
                                                              _PREFETCH_DIRS))
        return node.listing

    def _listed(self, node: Node) -> None:
        """The layers of directory ``node`` were just read, which may have moved the atime it shows (the kernel
        asks GETATTR again after such a READDIR): the attributes the native part answers with are renewed."""
        native = self._dir_attrs
        if native is None or node.unlinked:
            return
        generation = native.attr_generation()
        try:
            a = self._attrs(node, self._fresh_stat(node))
        except OSError:
            return
        native.dir_attr(generation, node.ino, a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev, a.st_size,
                        a.st_blksize, a.st_blocks, a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns, a.attr_timeout)

    def _unreachable_attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes of a listed name the server may not stat, which the kernel must not keep: every use of
        it asks us again (and meets the EACCES the layer gives)."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        self._show(node)
        a.st_mode = stat.S_IFMT(node.entry.st.st_mode)
        a.entry_timeout = 0
        a.attr_timeout = 0
        return a

    def _reply_dots(self, node: Node, start_id: int, token: pyfuse3.ReaddirToken) -> bool:
        """"." and ".." (the kernel takes no lookup reference for these); False when the buffer is full."""
        dots = [(b".", node), (b"..", self.inodes.parent_of(node) or node)]
        for index, (name, dot) in enumerate(dots[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self._attrs(dot), index + 1):
                return False
        return True

    @boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await self._settle()
        generation = self.native.attr_generation() if self.native is not None else 0
        # (the kernel's adaptive readdirplus, unionfs.fuse.native: a plain READDIR comes with a flag in the
        # handle; the kernel takes no reference for its entries)
        fh, plain = self.native.readdir_handle(fh) if self.native is not None else (fh, False)
        ino = self.native.dir_inode(fh) if self.native is not None else None
        if ino is not None:
            # A directory the kernel opened without OPENDIR: no handle, each READDIR is served from the current
            # merged listing (the offsets are positions of names: a reader goes on after the last it had).
            directory = self._node(ino)
            listing = self._openless_listing(directory)
        else:
            handle = self._dirs[fh]
            directory = handle.node
            if start_id == 0 or handle.listing is None:
                # The first read takes the snapshot (as the kernel does); rewinddir(3) takes a new one.
                handle.listing = self.union.listing(self._merged(directory))
            listing = handle.listing
        if start_id < 2 and not self._reply_dots(directory, start_id, token):
            return
        recipes: list[bytes] = []
        end = self._reply_listing(directory, listing, start_id, token, ino is not None, plain, recipes)
        if recipes and self._opens is not None:  # (one call for the reply's files)
            self._opens.openable(generation, b"".join(recipes))
        if end is not None and ino is not None and self._dir_attrs is not None:
            # (the kernel asks once more, after the last entry it had: the shim answers that it is the end)
            self._dir_attrs.listing_end(generation, ino, max(end, start_id, 2))

    def _reply_listing(self, directory: Node, listing: DirListing, start_id: int, token: pyfuse3.ReaddirToken,
                       shared: bool, plain: bool, recipes: list[bytes]) -> int | None:
        """The entries of ``listing`` after ``start_id``, as many as the reply holds; the recipes of the regular
        files among them are added to ``recipes`` (when the native part answers read-only opens). ``shared``: a
        listing readers share; ``plain``: a READDIR, whose entries give the kernel no reference. Returns None when
        the reply is full, else (the listing's end reached) the position of the last entry sent, 0 for none."""
        opens = self._opens is not None
        last = 0
        for index in range(listing.index_after(start_id), len(listing.names)):
            child = listing.child(directory.entry, index)
            if shared:
                # (a listing readers share keeps no entry: one kept unsent would be sent, perhaps much later, with
                # the attributes it had then)
                listing.sent(index)
            if child is None:
                continue
            node = self.inodes.node_for(child[0])
            attrs = self._attrs(node, child[0].st) if child[1] else self._unreachable_attrs(node)
            if not pyfuse3.readdir_reply(token, listing.names[index][0], attrs, listing.positions[index]):
                self.inodes.forget(node.ino, 0)  # freed unless the kernel holds it
                self._unshow_dropped()
                return None
            last = listing.positions[index]
            if plain:
                self.inodes.forget(node.ino, 0)  # (likewise: a plain entry hands the kernel no reference)
            else:
                self.inodes.listed(node)
                record = self._recipe(node) if child[1] and opens else None
                if record is not None:
                    recipes.append(record)
            listing.sent(index)
        self._unshow_dropped()
        return last

    @boundary
    async def releasedir(self, fh: int) -> None:
        handle = self._dirs.pop(fh)
        self.inodes.release_open(handle.node)

    @boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        ino = self.native.dir_inode(fh) if self.native is not None else None
        node = self._node(ino) if ino is not None else self._dirs[fh].node
        await trio.to_thread.run_sync(self.union.fsync_dir, node.entry)

    # -- xattrs -------------------------------------------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # A name found missing stays missing until it is set (AbsentXattrs). This answer is the hot path of a
        # warm `ls -l`, so it comes first, without the error boundary's coroutine (nothing in it can raise
        # but the FUSEError it means to).
        node = self.inodes.nodes.get(inode)
        if node is not None and not node.unlinked and self._absent.known_object(*node.identity()[1:], name):
            self._absent.tell(inode, name)
            if errors.debug:
                errors.log_request("getxattr", (inode, name), "ENODATA")
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await self._getxattr(inode, name)

    @boundary
    async def _getxattr(self, inode: int, name: bytes) -> bytes:
        node = self._node(inode)
        try:
            return self.union.getxattr(self._target(node), name)
        except OSError as exc:
            if exc.errno == errno.ENODATA and not node.unlinked:
                self._absent.add(node.entry.st, name)
                self._absent.tell(inode, name)
                self._checkable(name)
            raise

    def _checkable(self, name: bytes) -> None:
        """Let the native part answer a file's first getxattr of ``name`` when its file lacks it (each name once;
        it holds 8)."""
        if self._opens is None or name in self._checkable_names or len(self._checkable_names) >= 8:
            return
        self._checkable_names.add(name)
        disk = self.union.absence_names(name)
        if disk is not None:
            with contextlib.suppress(OSError):  # (a name too long for it: asked here)
                self._opens.checkable_xattr(name, disk)

    @boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        await self._settle()
        return self.union.listxattr(self._target(self._node(inode)), _caller(ctx))

    @boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._node(inode)
        if node.unlinked:
            fd = self._unlinked_fd(node)
            self._absent.forget(os.fstat(fd))
            self.union.setxattr(fd, name, value)
            return
        self._absent.forget(node.entry.st)
        try:
            await self._change(self.union.setxattr, node, name, value, 0, _caller(ctx))
        finally:
            self._absent.forget(node.entry.st)  # a getxattr may have run while a worker thread copied up and set

    @boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._node(inode)
        if node.unlinked:
            self.union.removexattr(self._unlinked_fd(node), name)
            return
        await self._change(self.union.removexattr, node, name, _caller(ctx))

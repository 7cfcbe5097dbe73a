"""Path-level overlay operations with the kernel's semantics; every failure is an OSError with a real errno.

Callers hand in :class:`~unionfs.layers.Entry` values they resolved earlier; each operation re-checks what
it depends on and returns the Entries it made.  Operations given a :class:`~unionfs.userns.Caller` also check
what the kernel cannot check for us: access to objects whose owner this user namespace does not map.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import functools
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import _sys, explain, userns, whiteout, xattrs
from ._at import At, ProcAt
from .copyup import CopiedUp, CopyUp, Workdir, copy_xattrs, move_to_work, replace_with_whiteout
from .fsutil import fsync_dir
from .layers import ROOT, Entry, Layer, Stack, check_name, join
from .ownership import (
    KEPT_XATTR_PREFIX,
    OVERRIDE_XATTR,
    Ownership,
    decode_override,
    encode_override,
    kept_name,
    kept_original,
)
from .userns import R_OK, W_OK, X_OK, Caller, Unmapped, UserNamespace
from .whiteout import XattrFormat

if TYPE_CHECKING:
    from .trace import Trace

DEFAULT_ACL = b"system.posix_acl_default"

#: open(2) flags that need the file in the upper layer
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
#: flags we never pass to the real open: the kernel resolved creation, and we write at the kernel's offsets
_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT | os.O_TRUNC


def _erofs() -> OSError:
    return OSError(errno.EROFS, "read-only file system")


@dataclasses.dataclass(frozen=True, slots=True)
class AttrChanges:
    """What a setattr changes; None leaves an attribute as it is."""

    size: int | None = None
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None

    @property
    def owner(self) -> bool:
        return self.uid is not None or self.gid is not None

    @property
    def times(self) -> bool:
        return self.atime_ns is not None or self.mtime_ns is not None


#: what a reply shows of an object besides its stat: (uid, gid, st_mode, st_nlink)
Shown = tuple[int, int, int, int]


#: the positions of "." and "..": a listing's names come after them
FIRST_POSITION = 3
_POSITION_BITS = (1 << 62) - 1


def listing_position(name: bytes) -> int:
    """Where ``name`` stands in every listing of its directory (the offset a reader resumes after): a function
    of the name alone, the same in a listing taken before or after others changed the directory. A reader
    resuming at a name's position continues with the names after it whatever listing serves it (a directory
    the kernel caches is filled by several readers, each from its own listing), and the kernel's own listings
    of a directory agree on where each name stands. Within one server process; 62 bits, past "." and ".."."""
    return max(hash(name) & _POSITION_BITS, FIRST_POSITION)


class DirListing:
    """What one open directory serves: the merged listing taken at its first read (as the kernel takes it),
    and the entry of each listed name, resolved when first asked for and kept until it has been sent.

    Names are served in the order of their positions (:func:`listing_position`; two names of one position, a
    hash collision, take the next free one in name order), so that the offset a reader resumes at means the
    same in every listing of the directory."""

    __slots__ = ("_stack", "names", "positions", "_children", "_inos")

    def __init__(self, stack: Stack, names: dict[bytes, tuple[int, int]]) -> None:
        self._stack = stack
        #: (name, (layer, file type)) in listing order
        self.names = sorted(names.items(), key=lambda item: (listing_position(item[0]), item[0]))
        #: the position of each name, increasing
        self.positions: list[int] = []
        last = FIRST_POSITION - 1
        for name, _ in self.names:
            last = max(listing_position(name), last + 1)
            self.positions.append(last)
        self._children: dict[int, tuple[Entry, bool] | None] = {}
        #: per layer, the inode numbers its directory lists (for names the server may not stat)
        self._inos: dict[int, dict[bytes, int]] = {}

    def child(self, directory: Entry, index: int) -> tuple[Entry, bool] | None:
        """(entry, reachable) of the index-th name in ``directory`` (its current entry), or None when the name
        vanished. An unreachable entry is a name in a directory the server may read but not search: the kernel
        lists it all the same, with only what the directory itself says (inode number and type)."""
        if index in self._children:
            return self._children[index]
        name, listed = self.names[index]
        child: tuple[Entry, bool] | None = None
        try:
            entry = self._stack.lookup_listed(directory, name, listed)
            child = (entry, True) if entry is not None else None
        except PermissionError:
            entry = self._unreachable(directory, name, listed)
            child = (entry, False) if entry is not None else None
        except OSError:
            child = None
        self._children[index] = child
        return child

    def index_after(self, position: int) -> int:
        """The index of the first name whose position is past ``position`` (the offset a reader resumes at)."""
        return bisect.bisect_right(self.positions, position)

    def sent(self, index: int) -> None:
        """The index-th name has been sent: its entry need not be kept."""
        self._children.pop(index, None)

    def _unreachable(self, directory: Entry, name: bytes, listed: tuple[int, int]) -> Entry | None:
        layer = self._stack.layers[listed[0]]
        inos = self._inos.get(listed[0])
        if inos is None:
            inos = self._inos[listed[0]] = {}
            with contextlib.suppress(OSError), layer.proc_at(directory.path) as full, os.scandir(full) as it:
                for de in it:
                    inos[os.fsencode(de.name)] = de.inode()
        ino = inos.get(name)
        if ino is None:
            return None
        st = os.stat_result((listed[1], ino, layer.dev, 1, 0, 0, 0, 0, 0, 0))
        return Entry(join(directory.path, name), listed[0], st)


class Union:
    """A mounted stack: resolution plus every operation that changes the merged view.

    Copy-ups are reported as :class:`~unionfs.copyup.CopiedUp` values, collected until :meth:`take_copied`.
    """

    def __init__(self, stack: Stack, work: Workdir | None, ownership: Ownership | None = None, *,
                 durable: bool = True, xattrs: bool = True, trace: Trace | None = None) -> None:
        """``durable``: fsync reaches the disk, and copy-ups are synced (False: ``volatile``/``fsync=0``);
        ``xattrs``: extended attributes are served (False: fuse-overlayfs's ``noxattrs=1``: every xattr call
        fails with ENOTSUP); ``trace``: told of each union decision (``-o trace``; None: tracing is off, and
        costs one attribute test where a decision is made)."""
        self.stack = stack
        self.trace = trace
        self.work = work
        self.ownership = ownership or Ownership()
        self.durable = durable
        self.xattrs = xattrs
        #: names hidden from the merged view's xattrs besides the overlay-private ones
        self.hidden_xattrs: frozenset[bytes] = (
            frozenset({OVERRIDE_XATTR}) if self.ownership.xattr_permissions else frozenset()
        )
        self.euid = os.geteuid()
        self.egid = os.getegid()
        #: owners this user namespace does not map (see unionfs.userns); the ownership options, when given,
        #: decide owners themselves
        self.userns = UserNamespace.current()
        self._plain_owners = self.ownership.identity
        self._copied: list[CopiedUp] = []
        self.copier: CopyUp | None = None
        if stack.writable:
            assert work is not None
            checks_owner = self.ownership.identity and not self.userns.initial
            self.copier = CopyUp(stack, work, self._copied.append, fsync=durable,
                                 owner_xattr=self.ownership.xattr_permissions,
                                 unmapped=self.unmapped if checks_owner else None, trace=trace)

    def take_copied(self) -> list[CopiedUp]:
        """The copy-ups made since the last call, oldest first."""
        copied = list(self._copied)
        self._copied.clear()  # in place: the copier appends to this very list
        return copied

    def layer_devices(self) -> list[int]:
        """The device of each layer, top first."""
        return [layer.dev for layer in self.stack.layers]

    def may_copy_up(self, entry: Entry) -> bool:
        """Whether changing ``entry`` may copy it (and its ancestors) up first: such a change leaves the event
        loop, as copy-ups are long. An object of the upper layer changes with single system calls."""
        return not (self.stack.writable and entry.layer == 0)

    @staticmethod
    def opens_for_writing(flags: int) -> bool:
        """Whether an open with ``flags`` needs the file in the upper layer."""
        return bool(flags & WRITE_FLAGS)

    # -- access to objects whose owner this user namespace does not map ---------------------------------------
    # The kernel checked every request against the ids we report, with the caller's capabilities; those do not
    # apply to such objects, so their mode bits are checked again here, as kernel overlayfs checks them.

    def _may(self, caller: Caller | None, entry: Entry, mask: int = 0, owner: bool = False) -> None:
        if caller is None:
            return
        ids = self.unmapped(entry)
        if ids is None:
            return
        if owner:
            userns.require_owner(caller, entry.st, ids)
        if mask:
            userns.require(caller, entry.st, ids, mask)

    def _may_remove(self, caller: Caller | None, parent: Entry, name: bytes) -> None:
        """Removing or replacing ``name`` in ``parent``: write access to it, and the sticky bit's rule."""
        if caller is None:
            return
        self._may(caller, parent, W_OK | X_OK)
        if self.userns.initial or not parent.st.st_mode & stat.S_ISVTX:
            return
        victim = self.lookup(parent, name, traced=False)
        ids = self.unmapped(victim) if victim is not None else None
        if victim is not None and ids is not None:
            userns.require_sticky(caller, parent.st, self.unmapped(parent), victim.st, ids)

    def _may_set_xattr(self, caller: Caller | None, entry: Entry, name: bytes) -> None:
        if name.startswith(b"user."):
            self._may(caller, entry, W_OK)
        elif name.startswith(b"system.posix_acl_"):
            self._may(caller, entry, owner=True)

    def _may_setattr(self, caller: Caller | None, entry: Entry, changes: AttrChanges, through_writer: bool) -> None:
        if caller is None:
            return
        if changes.owner or changes.mode is not None:
            self._may(caller, entry, owner=True)
        if changes.size is not None and not through_writer:
            self._may(caller, entry, W_OK)
        if changes.times and (ids := self.unmapped(entry)) is not None:
            userns.require_times(caller, entry.st, ids, (changes.atime_ns, changes.mtime_ns))

    # -- reading ------------------------------------------------------------------------------------------

    def root(self) -> Entry:
        return self.stack.root()

    def lookup(self, parent: Entry, name: bytes, caller: Caller | None = None,
               listing: dict[bytes, tuple[int, int]] | None = None, *, traced: bool = True) -> Entry | None:
        """Resolve ``name`` in ``parent`` (``.`` is ``parent`` itself); with ``listing``, a current merged
        listing of ``parent``, names it lacks are missing without asking any layer. ``traced``: the trace
        is told (False for the lookups an operation makes again of names the kernel looked up)."""
        self._may(caller, parent, X_OK)
        if name == b".":
            return parent
        if name == b"..":
            raise OSError(errno.ENOENT, "No such file or directory")
        check_name(name)
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "Not a directory")
        if listing is not None:
            entry = self.stack.lookup_listed(parent, name, listing.get(name))
        else:
            entry = self.stack.lookup(parent, name)
        if self.trace is not None and traced:
            self._trace_lookup(self.trace, parent, name, entry)
        return entry

    def _trace_lookup(self, trace: Trace, parent: Entry, name: bytes, entry: Entry | None) -> None:
        whited_out = None if entry is not None else self.stack.whited_out(parent, name)
        opaque = None
        if entry is None and whited_out is None:
            hidden = self.stack.hidden_by_opaque(parent)
            if hidden is not None and self.stack.held_in(join(parent.path, name), hidden[1]):
                opaque = hidden[0]
        trace.lookup(join(parent.path, name), entry, whited_out, opaque)

    def unmapped(self, entry: Entry) -> Unmapped | None:
        """Which ids of a lower object's owner this user namespace does not map (None: both mapped, or the
        object is in the upper layer, where the server's own system calls meet the kernel's checks)."""
        if self.userns.initial or not self.ownership.identity or (entry.layer == 0 and self.stack.writable):
            return None
        return self.userns.unmapped(self.stack.layers[entry.layer].fd, entry.path, entry.st)

    def lstat(self, entry: Entry) -> os.stat_result:
        return self.stack.layers[entry.layer].lstat(entry.path)

    def restat(self, entry: Entry) -> Entry:
        """``entry`` with a fresh stat of its object."""
        return entry.with_stat(self.lstat(entry))

    def shown(self, entry: Entry, st: os.stat_result) -> Shown:
        """(uid, gid, st_mode, st_nlink) as the merged view shows ``st``, the stat of ``entry``'s object: owners
        through the ownership options, and one link for a merged directory (its real count is unknown, as on
        the kernel)."""
        nlink = 1 if entry.merged and stat.S_ISDIR(st.st_mode) else st.st_nlink
        if self._plain_owners:
            return st.st_uid, st.st_gid, st.st_mode, nlink
        with self._object(entry) as target:
            return (*self._owner_and_mode(target, st), nlink)

    def shown_open(self, fd: int | None, st: os.stat_result) -> Shown:
        """:meth:`shown` for an object reached only through an open descriptor ``fd`` (all its names removed);
        without one, only the id mapping applies."""
        if self._plain_owners:
            return st.st_uid, st.st_gid, st.st_mode, st.st_nlink
        if fd is None:
            return (*self.ownership.show(st.st_uid, st.st_gid), st.st_mode, st.st_nlink)
        return (*self._owner_and_mode(fd, st), st.st_nlink)

    @staticmethod
    def last_name(removed: Entry) -> bool:
        """Whether the removal of ``removed``'s name ends the node behind it: a directory, a file with one
        link, or a lower object (whose other names, if any, are then looked up afresh)."""
        return removed.is_dir or removed.st.st_nlink <= 1 or removed.layer != 0

    def _owner_and_mode(self, target: bytes | int, st: os.stat_result) -> tuple[int, int, int]:
        """Owner (as the merged view shows it) and mode of an object."""
        uid, gid, mode = self._stored_owner_and_mode(target, st)
        uid, gid = self.ownership.show(uid, gid)
        return uid, gid, mode

    def _stored_owner_and_mode(self, target: bytes | int, st: os.stat_result) -> tuple[int, int, int]:
        """Owner (as stored: on the object, or in the override xattr with ``xattr_permissions``, both in the ids
        of the disk) and mode of an object."""
        mode = st.st_mode
        uid, gid = st.st_uid, st.st_gid
        if self.ownership.xattr_permissions and not stat.S_ISLNK(mode):
            value = xattrs.get(target, OVERRIDE_XATTR)
            stored = decode_override(value) if value is not None else None
            if stored is not None:
                uid, gid = stored[0], stored[1]
                mode = stat.S_IFMT(mode) | stored[2]
        return uid, gid, mode

    def readlink(self, entry: Entry) -> bytes:
        with self.stack.layers[entry.layer].at(entry.path) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def listdir(self, entry: Entry) -> dict[bytes, tuple[int, int]]:
        names = self.stack.listdir(entry)
        if self.trace is not None and (hidden := self.stack.hidden_by_opaque(entry)) is not None:
            self.trace.opaque(entry.path, *hidden)
        return names

    def opendir(self, entry: Entry, caller: Caller | None = None) -> None:
        """The checks of opening directory ``entry`` to list it."""
        self._may(caller, entry, R_OK)

    def listing(self, names: dict[bytes, tuple[int, int]]) -> DirListing:
        """What an open directory serves of the merged listing ``names`` (see :class:`DirListing`)."""
        return DirListing(self.stack, names)

    def fsync(self, fd: int, datasync: bool) -> None:
        """Make an open file's data (and, unless ``datasync``, its metadata) durable; nothing when not durable."""
        if self.durable:
            (os.fdatasync if datasync else os.fsync)(fd)

    def fsync_dir(self, entry: Entry) -> None:
        """Make a directory's entries durable (its upper copy; lower layers never change)."""
        if entry.layer != 0 or not self.stack.writable or not self.durable:
            return
        with self.stack.layers[0].at(entry.path) as (fd, name):
            fsync_dir(name, fd)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.stack.layers[0].proc + ROOT)

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
        and the group of a set-group-ID directory), ids mapped as ``uidmapping=``/``gidmapping=`` say."""
        uid, gid = self.ownership.creator_to_disk(uid, gid)
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
        """Create an object with ``build(name, dir_fd)``, fix its owner (and the mode bits a chown clears), then
        make it visible at ``name``: directly when it needs nothing more than its creation, else built whole in
        the workdir and renamed into place, so that a crash never leaves it visible half made (with the
        server's owner, say): over a whiteout (an opaque directory, as the kernel makes it), or with an owner of
        its own. A parent with a default ACL gets the object in place all the same: what it inherits from the
        parent is worth more than the atomicity of its owner."""
        upper_fd = self._upper_fd()
        path = join(parent.path, name)
        if not over_whiteout and (owner == (-1, -1) or self._inherits_acl(parent)):
            with At(upper_fd, path) as (dfd, rel):
                build(rel, dfd)
                self._fix_owner(rel, dfd, owner, mode)
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
                if is_dir and over_whiteout:
                    whiteout.set_opaque(work.proc + tmp, self.stack.fmt)
                with At(upper_fd, path) as (dfd, rel):
                    if not over_whiteout:
                        _sys.renameat2(tmp, rel, _sys.RENAME_NOREPLACE, work.fd, dfd)
                    elif is_dir:
                        _sys.renameat2(tmp, rel, _sys.RENAME_EXCHANGE, work.fd, dfd)
                    else:
                        os.rename(tmp, rel, src_dir_fd=work.fd, dst_dir_fd=dfd)
            finally:
                work.discard(tmp)
            if self.trace is not None and is_dir and over_whiteout:
                self.trace.opaque_made("mkdir", path)
        return self._upper_entry(path, opaque=is_dir and over_whiteout)

    def _inherits_acl(self, parent: Entry) -> bool:
        """Whether upper directory ``parent`` has a default ACL, which what is made in it inherits."""
        with self._object(parent) as target:
            return xattrs.get(target, DEFAULT_ACL) is not None

    def _fix_owner(self, path: bytes, dir_fd: int, owner: tuple[int, int], mode: int | None) -> None:
        uid, gid = owner
        if uid == -1 and gid == -1:
            return
        st = os.lstat(path, dir_fd=dir_fd)
        if self.ownership.xattr_permissions and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            # the owner goes where a chown of the merged view would put it: the override xattr (the file itself
            # stays this server's, which needs no privilege)
            with ProcAt(dir_fd, path) as full:
                self._store_override(full, st.st_uid if uid == -1 else uid, st.st_gid if gid == -1 else gid,
                                     st.st_mode if mode is None else mode)
            return
        try:
            os.chown(path, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        except PermissionError:
            if not self.ownership.xattr_permissions:
                raise
            # (a symlink, FIFO, socket or device node takes no user.* xattr, and an unprivileged server may not
            # chown it: it stays the server's, as a rootless copy-up leaves it)
            return
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
        if umask:
            with self._object(parent) as target:
                if xattrs.get(target, DEFAULT_ACL) is None:
                    return mode & ~umask
        return mode

    def _creating(self, caller: Caller | None, parent: Entry, mode: int) -> int:
        """The checks before ``caller`` creates an object in ``parent``; returns the mode it gets."""
        self._may(caller, parent, W_OK | X_OK)
        return mode if caller is None else self.creation_mode(parent, mode, caller.umask)

    def create(self, parent: Entry, name: bytes, mode: int, flags: int, uid: int, gid: int,
               caller: Caller | None = None) -> tuple[int, Entry]:
        """Create and open a regular file; returns (fd, entry)."""
        mode = self._creating(caller, parent, mode)
        parent, over = self._prepare_new(parent, name)
        owner = self._owner(parent, uid, gid)
        path = join(parent.path, name)
        perm = stat.S_IMODE(mode)
        if not over and owner == (-1, -1):
            with At(self._upper_fd(), path) as (dfd, rel):
                fd = os.open(rel, (flags & ~_STRIP) | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, perm, dir_fd=dfd)
            return fd, self._upper_entry(path)

        def build(p: bytes, dfd: int) -> None:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, perm, dir_fd=dfd))

        entry = self._place(build, parent, name, over, False, owner, perm)
        return self.open(entry, flags & ~os.O_TRUNC), entry

    def mkdir(self, parent: Entry, name: bytes, mode: int, uid: int, gid: int,
              caller: Caller | None = None) -> Entry:
        mode = self._creating(caller, parent, mode)
        parent, over = self._prepare_new(parent, name)
        perm = stat.S_IMODE(mode)

        def build(p: bytes, dfd: int) -> None:
            os.mkdir(p, perm, dir_fd=dfd)

        return self._place(build, parent, name, over, True, self._owner(parent, uid, gid), perm)

    def mknod(self, parent: Entry, name: bytes, mode: int, rdev: int, uid: int, gid: int,
              caller: Caller | None = None) -> Entry:
        mode = self._creating(caller, parent, mode)
        if stat.S_ISCHR(mode) and rdev == 0:
            raise OSError(errno.EPERM, "a whiteout device cannot be created in the merged view")
        parent, over = self._prepare_new(parent, name)

        def build(p: bytes, dfd: int) -> None:
            os.mknod(p, mode, rdev, dir_fd=dfd)

        return self._place(build, parent, name, over, False, self._owner(parent, uid, gid),
                           stat.S_IMODE(mode))

    def symlink(self, parent: Entry, name: bytes, target: bytes, uid: int, gid: int,
                caller: Caller | None = None) -> Entry:
        self._may(caller, parent, W_OK | X_OK)
        parent, over = self._prepare_new(parent, name)

        def build(p: bytes, dfd: int) -> None:
            os.symlink(target, p, dir_fd=dfd)

        return self._place(build, parent, name, over, False, self._owner(parent, uid, gid), None)

    def link(self, entry: Entry, new_parent: Entry, new_name: bytes, caller: Caller | None = None) -> Entry:
        if caller is not None and (ids := self.unmapped(entry)) is not None:
            userns.require_link_source(caller, entry.st, ids)
        self._may(caller, new_parent, W_OK | X_OK)
        if entry.is_dir:
            raise OSError(errno.EPERM, "hard links to directories are not allowed")
        new_parent, over = self._prepare_new(new_parent, new_name)
        entry = self.copy_up(entry)
        upper_fd = self._upper_fd()
        path = join(new_parent.path, new_name)
        if not over:
            with At(upper_fd, entry.path) as (sfd, src), At(upper_fd, path) as (dfd, dst):
                os.link(src, dst, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        else:
            work = self._work()
            tmp = work.tempname()
            try:
                with At(upper_fd, entry.path) as (sfd, src):
                    os.link(src, tmp, src_dir_fd=sfd, dst_dir_fd=work.fd, follow_symlinks=False)
                with At(upper_fd, path) as (dfd, dst):
                    os.rename(tmp, dst, src_dir_fd=work.fd, dst_dir_fd=dfd)
            finally:
                work.discard(tmp)
        return self._upper_entry(path)

    # -- opening ------------------------------------------------------------------------------------------

    def open(self, entry: Entry, flags: int, caller: Caller | None = None) -> int:
        """Open the real file behind ``entry``; writers get the upper copy (copied up first)."""
        writing = self.opens_for_writing(flags)
        self._may(caller, entry, (R_OK if flags & os.O_ACCMODE != os.O_WRONLY else 0) | (W_OK if writing else 0))
        if writing:
            if self.copier is None:
                raise _erofs()
            entry = self.copy_up(entry, data=not flags & os.O_TRUNC)
        with self.stack.layers[entry.layer].at(entry.path) as (dfd, rel):
            fd = os.open(rel, (flags & ~_STRIP) | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        if flags & os.O_TRUNC:
            if flags & os.O_ACCMODE == os.O_RDONLY:  # Linux truncates even then
                self.truncate(entry, 0)
            else:
                os.ftruncate(fd, 0)
        return fd

    # -- removing -----------------------------------------------------------------------------------------

    def _existing(self, parent: Entry, name: bytes) -> Entry:
        entry = self.lookup(parent, name, traced=False)
        if entry is None:
            raise OSError(errno.ENOENT, "No such file or directory")
        return entry

    def unlink(self, parent: Entry, name: bytes, caller: Caller | None = None) -> Entry:
        """Remove a non-directory; returns the Entry that was removed."""
        self._may_remove(caller, parent, name)
        entry = self._existing(parent, name)
        if entry.is_dir:
            raise OSError(errno.EISDIR, "Is a directory")
        self._remove(parent, name, entry)
        return entry

    def rmdir(self, parent: Entry, name: bytes, caller: Caller | None = None) -> Entry:
        self._may_remove(caller, parent, name)
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
        needs_whiteout = self.stack.below_upper(parent, name) is not None
        if entry.layer != 0:
            with upper.at(path) as (dfd, rel):
                whiteout.make_whiteout(rel, dfd)
            if self.trace is not None:
                self.trace.whiteout("rmdir" if entry.is_dir else "unlink", path)
            return
        if needs_whiteout:
            replace_with_whiteout(upper, self._work(), path)
            if self.trace is not None:
                self.trace.whiteout("rmdir" if entry.is_dir else "unlink", path)
            return
        try:
            with upper.at(path) as (dfd, rel):
                (os.rmdir if entry.is_dir else os.unlink)(rel, dir_fd=dfd)
        except OSError as exc:
            if not entry.is_dir:
                raise
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # Only whiteouts remain inside: take the directory out of sight, then discard it.
            work = self._work()
            work.discard(move_to_work(upper, work, path))

    # -- renaming -----------------------------------------------------------------------------------------

    def rename(self, old_parent: Entry, old_name: bytes, new_parent: Entry, new_name: bytes,
               flags: int = 0, caller: Caller | None = None) -> tuple[Entry, Entry | None]:
        """Rename with the kernel's checks and errnos; returns (moved entry at its new path, the entry it
        replaced or None). Renaming a name onto another name of the same upper file does nothing, as
        rename(2) does nothing: the moved entry is then still at its old path."""
        self._may_remove(caller, old_parent, old_name)
        self._may_remove(caller, new_parent, new_name)
        check_name(new_name)
        old = self._existing(old_parent, old_name)
        if old.is_dir and old_parent.path != new_parent.path:
            self._may(caller, old, W_OK)  # its ".." changes
        new = self.lookup(new_parent, new_name, traced=False)
        if new is not None and old.layer == new.layer == 0 and self.stack.writable and _same_object(old, new):
            return old, None
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
            if self.trace is not None:
                self.trace.exdev(old.path, new_path, old)
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        if exchange and new is not None and new.is_dir and (new.layer != 0 or new.merged):
            if self.trace is not None:
                self.trace.exdev(old.path, new_path, new)
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        if new is not None and new.is_dir and not exchange and self.stack.listdir(new):
            raise OSError(errno.ENOTEMPTY, "Directory not empty")

        old = copier.copy_up(old)
        old_parent = copier.ensure_dir(old_parent)
        new_parent = copier.ensure_dir(new_parent)
        upper = self.stack.layers[0]
        work = self._work()
        old_whiteout = self.stack.below_upper(old_parent, old_name) is not None

        if exchange:
            assert new is not None
            new = copier.copy_up(new)
            if old.is_dir and not old.opaque and new_parent.merged:
                _set_opaque(upper, old.path, self.stack.fmt)
                if self.trace is not None:
                    self.trace.opaque_made("rename", old.path, new_path)
            if new.is_dir and not new.opaque and old_parent.merged:
                _set_opaque(upper, new.path, self.stack.fmt)
                if self.trace is not None:
                    self.trace.opaque_made("rename", new.path, old.path)
            with upper.at(old.path) as (sfd, src), upper.at(new_path) as (dfd, dst):
                _sys.renameat2(src, dst, _sys.RENAME_EXCHANGE, sfd, dfd)
            return self._upper_entry(new_path), self._upper_entry(old.path)

        if old.is_dir and not old.opaque and new_parent.merged:
            _set_opaque(upper, old.path, self.stack.fmt)
            if self.trace is not None:
                self.trace.opaque_made("rename", old.path, new_path)
        discard: bytes | None = None
        try:
            st = upper.lstat(new_path)
        except FileNotFoundError:
            st = None
        # Each step leaves the merged view as it was before the rename or as it is after it, so that a crash
        # anywhere shows one of the two.
        # A directory over a whiteout (rename(2) cannot put a directory over a non-directory): the two are
        # exchanged, so that the name is never uncovered; the whiteout at the old name then stays where
        # something beneath needs hiding.
        if st is not None and old.is_dir and not stat.S_ISDIR(st.st_mode) and self._exchange_over_whiteout(
                old.path, new_path, st, keep=old_whiteout):
            if old_whiteout and self.trace is not None:
                self.trace.whiteout("rename", old.path, new_path)
            return self._upper_entry(new_path, opaque=old.opaque or new_parent.merged), new
        if st is not None and stat.S_ISDIR(st.st_mode):
            # an empty merged directory (its upper copy holding whiteouts): replaced in one exchange by an empty
            # opaque one, which rename(2) can then replace in one step
            discard = self._empty_in_place(new_path, st)
        try:
            if old_whiteout:
                self._rename_leaving_whiteout(old.path, new_path)
                if self.trace is not None:
                    self.trace.whiteout("rename", old.path, new_path)
            else:
                with upper.at(old.path) as (sfd, src), upper.at(new_path) as (dfd, dst):
                    os.rename(src, dst, src_dir_fd=sfd, dst_dir_fd=dfd)
        finally:
            if discard is not None:
                work.discard(discard)
        moved = self._upper_entry(new_path, opaque=old.is_dir and (old.opaque or new_parent.merged))
        return moved, new

    def _exchange_over_whiteout(self, old_path: bytes, new_path: bytes, st: os.stat_result, keep: bool) -> bool:
        """Move the upper directory ``old_path`` over the whiteout at ``new_path`` (its stat ``st``) by exchanging
        the two; the whiteout, now at ``old_path``, is removed unless ``keep``. False where it cannot be done so
        (the upper file system cannot exchange, or the whiteout is another kind than the kernel's, which would
        not hide anything at the old name): the whiteout has then been removed, for the caller to rename."""
        upper = self.stack.layers[0]
        with upper.at(old_path) as (sfd, src), upper.at(new_path) as (dfd, dst):
            if whiteout.is_whiteout_stat(st):
                try:
                    _sys.renameat2(src, dst, _sys.RENAME_EXCHANGE, sfd, dfd)
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                else:
                    if not keep:
                        os.unlink(src, dir_fd=sfd)
                    return True
            os.unlink(dst, dir_fd=dfd)
            return False

    def _empty_in_place(self, path: bytes, st: os.stat_result) -> bytes | None:
        """Make the upper directory at ``path`` (empty in the merged view) empty on disk: exchanged with a new
        empty opaque directory of the same owner, mode, times and xattrs; returns the workdir name of the old one,
        to be discarded (None when it is empty already). Without exchange, the old one is moved aside."""
        upper, work = self.stack.layers[0], self._work()
        with upper.proc_at(path) as full:
            if not os.listdir(full):
                return None
        tmp = work.tempname()
        os.mkdir(tmp, 0o700, dir_fd=work.fd)
        try:
            with upper.proc_at(path) as full:
                copy_xattrs(full, work.proc + tmp, self.stack.private_prefixes)
            whiteout.set_opaque(work.proc + tmp, self.stack.fmt)
            with contextlib.suppress(PermissionError):  # (an ordinary user's server owns what it makes)
                os.chown(tmp, st.st_uid, st.st_gid, dir_fd=work.fd)
            os.chmod(tmp, stat.S_IMODE(st.st_mode), dir_fd=work.fd)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=work.fd)
            with upper.at(path) as (dfd, rel):
                _sys.renameat2(tmp, rel, _sys.RENAME_EXCHANGE, work.fd, dfd)
        except OSError as exc:
            work.discard(tmp)
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            return move_to_work(upper, work, path)
        except BaseException:
            work.discard(tmp)
            raise
        return tmp

    def _rename_leaving_whiteout(self, old_path: bytes, new_path: bytes) -> None:
        upper = self.stack.layers[0]
        with upper.at(old_path) as (sfd, src), upper.at(new_path) as (dfd, dst):
            try:
                _sys.renameat2(src, dst, _sys.RENAME_WHITEOUT, sfd, dfd)
                return
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EINVAL, errno.ENOSYS):
                    raise
            os.rename(src, dst, src_dir_fd=sfd, dst_dir_fd=dfd)
            whiteout.make_whiteout(src, sfd)

    # -- attributes ---------------------------------------------------------------------------------------

    def setattr(self, entry: Entry, changes: AttrChanges, caller: Caller | None = None,
                writer: int | None = None) -> Entry:
        """setattr of the merged view, copying up first; ``writer``: a descriptor open for writing through
        which the request came (a size change goes through it). Returns the entry as it is now."""
        self._may_setattr(caller, entry, changes, writer is not None)
        if changes.size is not None:
            entry = self.truncate(entry, changes.size, writer)
        if changes.owner:
            entry = self.chown(entry, _or_keep(changes.uid), _or_keep(changes.gid))
        if changes.mode is not None:
            entry = self.chmod(entry, changes.mode)
        if changes.times:
            entry = self.utimens(entry, changes.atime_ns, changes.mtime_ns)
        return entry

    def setattr_open(self, fd: int, changes: AttrChanges) -> os.stat_result:
        """setattr of an object reached only through an upper-layer descriptor (all its names removed), with
        the same ownership rules as :meth:`setattr`; returns its stat afterwards."""
        if changes.size is not None:
            os.ftruncate(fd, changes.size)
        if changes.owner:
            self._set_owner(fd, os.fstat(fd), _or_keep(changes.uid), _or_keep(changes.gid))
        if changes.mode is not None:
            self._set_mode(fd, os.fstat(fd), changes.mode)
        if changes.times:
            self._set_times(fd, changes.atime_ns, changes.mtime_ns)
        return os.fstat(fd)

    def truncate(self, entry: Entry, size: int, fd: int | None = None) -> Entry:
        if fd is not None:
            os.ftruncate(fd, size)
            return entry
        entry = self.copy_up(entry, data=size != 0)
        with At(self._upper_fd(), entry.path) as (dfd, rel):
            wfd = os.open(rel, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            os.ftruncate(wfd, size)
        finally:
            os.close(wfd)
        return entry

    def chown(self, entry: Entry, uid: int, gid: int) -> Entry:
        """chown of the merged view (ids as it shows them; -1 leaves one unchanged)."""
        entry = self.copy_up(entry)
        with self._object(entry) as target:
            self._set_owner(target, self.lstat(entry), uid, gid)
        return entry

    def chmod(self, entry: Entry, mode: int) -> Entry:
        if stat.S_ISLNK(entry.st.st_mode):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        entry = self.copy_up(entry)
        with self._object(entry) as target:
            self._set_mode(target, self.lstat(entry), mode)
        return entry

    def utimens(self, entry: Entry, atime_ns: int | None, mtime_ns: int | None) -> Entry:
        entry = self.copy_up(entry)
        with self._object(entry) as target:
            self._set_times(target, atime_ns, mtime_ns)
        return entry

    # The real object of an upper entry, or an open descriptor of one: ``target`` is either its full path
    # (never followed through a final symlink) or the descriptor.

    def _set_owner(self, target: bytes | int, st: os.stat_result, uid: int, gid: int) -> None:
        """Give the object the owner a chown of the merged view asks for: stored in the override xattr
        (xattr_permissions), else mapped to the ids on disk."""
        uid, gid = self.ownership.to_disk(uid, gid)
        if self.ownership.xattr_permissions and not stat.S_ISLNK(st.st_mode):
            # (the xattr holds ids of the disk, as the file's own owner and a copy-up's record do)
            cur_uid, cur_gid, mode = self._stored_owner_and_mode(target, st)
            self._store_override(target, cur_uid if uid == -1 else uid, cur_gid if gid == -1 else gid, mode)
            return
        if isinstance(target, int):
            os.chown(target, uid, gid)
        else:
            os.chown(target, uid, gid, follow_symlinks=False)

    def _set_mode(self, target: bytes | int, st: os.stat_result, mode: int) -> None:
        if self.ownership.xattr_permissions:
            uid, gid, _mode = self._stored_owner_and_mode(target, st)
            self._store_override(target, uid, gid, mode)
            return
        os.chmod(target, stat.S_IMODE(mode))

    @staticmethod
    def _set_times(target: bytes | int, atime_ns: int | None, mtime_ns: int | None) -> None:
        follow = isinstance(target, int)
        if atime_ns is None or mtime_ns is None:
            st = os.stat(target, follow_symlinks=follow)
            atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
            mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
        os.utime(target, ns=(atime_ns, mtime_ns), follow_symlinks=follow)

    @staticmethod
    def _store_override(target: bytes | int, uid: int, gid: int, mode: int) -> None:
        xattrs.write(target, OVERRIDE_XATTR, encode_override(uid, gid, mode))

    # -- xattrs -------------------------------------------------------------------------------------------

    def _object(self, entry: Entry) -> ProcAt:
        """``with self._object(entry) as target``: a path of ``entry``'s real object, for calls that take no
        directory descriptor."""
        return self.stack.layers[entry.layer].proc_at(entry.path)

    def _target(self, entry: Entry | int) -> contextlib.AbstractContextManager[bytes | int]:
        """:meth:`_object` of an entry; a descriptor as it is."""
        return contextlib.nullcontext(entry) if isinstance(entry, int) else self._object(entry)

    def _check_xattrs(self) -> None:
        if not self.xattrs:
            raise OSError(errno.ENOTSUP, "extended attributes are turned off (noxattrs=1)")

    def _disk_name(self, name: bytes) -> bytes:
        """The on-disk name of a merged-view xattr; names the merged view may not change are refused."""
        self._check_xattrs()
        if name in self.hidden_xattrs:
            raise OSError(errno.EPERM, "this xattr holds the stored owner and mode")
        if name.startswith(KEPT_XATTR_PREFIX):
            raise OSError(errno.EPERM, "this xattr keeps another one an ordinary user may not set")
        return whiteout.xattr_to_disk(name, self.stack.private_prefixes)

    # The virtual xattrs user.unionfs.* (unionfs.explain): served from the layers on every read, whatever the
    # other xattr options say, never listed, never stored, and refused for writing (EPERM) as the kernel refuses
    # writes of the names of its overlay markers; a copy-up copies the object's own xattrs only.

    @functools.cached_property
    def virtual_xattrs(self) -> explain.VirtualXattrs:
        return explain.VirtualXattrs(self.stack)

    def _virtual_xattr(self, entry: Entry | int, name: bytes) -> bytes:
        if isinstance(entry, int):
            return self.virtual_xattrs.get(None, 0, name)  # (an object open in the upper layer, without a name)
        return self.virtual_xattrs.get(entry.path, entry.layer, name)

    @staticmethod
    def _refuse_virtual(name: bytes) -> None:
        if explain.is_virtual(name):
            raise OSError(errno.EPERM, f"{name.decode(errors='replace')} is a virtual xattr of unionfs (read-only)")

    def getxattr(self, entry: Entry | int, name: bytes) -> bytes:
        """An xattr of ``entry`` (or of the upper object open as a descriptor, all its names removed); names in
        ``user.unionfs.*`` are the virtual ones."""
        if explain.is_virtual(name):
            return self._virtual_xattr(entry, name)
        if name.startswith(KEPT_XATTR_PREFIX):
            self._check_xattrs()
            raise OSError(errno.ENODATA, "No data available")  # (never shown under this name)
        with self._target(entry) as target:
            try:
                return os.getxattr(target, self._disk_name(name), follow_symlinks=isinstance(target, int))
            except OSError as exc:
                if exc.errno != errno.ENODATA or not self._kept_aside(name):
                    raise
                # an xattr an ordinary user's store could not set as it is (security.capability...), kept aside
                kept = xattrs.get(target, kept_name(name))
                if kept is None:
                    raise
                return kept

    def absence_names(self, name: bytes) -> tuple[bytes, ...] | None:
        """The names on disk whose absence from a regular file's object means that :meth:`getxattr` of ``name``
        fails ENODATA (one, or two with a kept name), or None when more than the object's xattrs decides."""
        if not self.xattrs or explain.is_virtual(name) or name.startswith(KEPT_XATTR_PREFIX) \
                or name in self.hidden_xattrs:
            return None
        disk = whiteout.xattr_to_disk(name, self.stack.private_prefixes)
        return (disk, kept_name(name)) if self._kept_aside(name) else (disk,)

    def lacks_xattr(self, fd: int, name: bytes) -> bool:
        """Whether :meth:`getxattr` of ``name`` fails ENODATA for the regular file of the upper layer open as
        ``fd``, known from its object's xattrs alone (False when more decides, or the answer is not ENODATA)."""
        disk = self.absence_names(name)
        if disk is None:
            return False
        for on_disk in disk:
            try:
                os.getxattr(fd, on_disk)
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    continue
            return False
        return True

    def _kept_aside(self, name: bytes) -> bool:
        """Whether an xattr ``name`` the store refused may be kept under :func:`kept_name` (an ordinary user's
        store with ``xattr_permissions``, for names outside ``user.*``)."""
        return self.ownership.xattr_permissions and not name.startswith(b"user.")

    def listxattr(self, entry: Entry | int, caller: Caller | None = None) -> list[bytes]:
        """The xattr names the merged view shows: overlay-private and hidden ones never, and ``trusted.*``
        to the superuser only, as the kernel lists them."""
        self._check_xattrs()
        with self._target(entry) as target:
            on_disk = xattrs.names(target)
        privileged = caller is None or caller.uid == 0
        out: dict[bytes, None] = {}  # (ordered, each name once: a kept xattr and its real one show as one)
        for disk in on_disk:
            if disk.startswith(KEPT_XATTR_PREFIX):
                original = kept_original(disk)
                if self.ownership.xattr_permissions and original and (privileged or not original.startswith(
                        b"trusted.")):
                    out[original] = None
                continue
            name = whiteout.xattr_from_disk(disk, self.stack.private_prefixes)
            if name is None or name in self.hidden_xattrs or (not privileged and name.startswith(b"trusted.")) \
                    or explain.is_virtual(name):
                continue
            out[name] = None
        return list(out)

    def setxattr(self, entry: Entry | int, name: bytes, value: bytes, flags: int = 0,
                 caller: Caller | None = None) -> Entry | None:
        """Set an xattr, copying up first; returns the entry as it is now (None for a descriptor). A name in
        ``user.unionfs.*`` is refused (EPERM)."""
        self._refuse_virtual(name)
        self._check_xattrs()
        if isinstance(entry, int):
            xattrs.write(entry, self._disk_name(name), value, flags)
            return None
        self._may_set_xattr(caller, entry, name)
        entry = self.copy_up(entry)
        with self._object(entry) as target:
            xattrs.write(target, self._disk_name(name), value, flags)
        return entry

    def removexattr(self, entry: Entry | int, name: bytes, caller: Caller | None = None) -> Entry | None:
        """Remove an xattr, copying up first; a name in ``user.unionfs.*`` is refused (EPERM)."""
        self._refuse_virtual(name)
        self._check_xattrs()
        if isinstance(entry, int):
            disk = self._disk_name(name)
            if xattrs.get(entry, disk) is None and self._kept(entry, name):
                disk = kept_name(name)
            xattrs.remove(entry, disk)
            return None
        self._may_set_xattr(caller, entry, name)
        disk = self._disk_name(name)
        with self._object(entry) as target:
            if xattrs.get(target, disk) is None:
                if not self._kept(target, name):
                    raise OSError(errno.ENODATA, "No data available")  # nothing to copy up for
                # the xattr is one kept aside for what an ordinary user may not set: removing it removes that (the
                # kernel removes security.capability on every write: a write must not fail for it)
                disk = kept_name(name)
        entry = self.copy_up(entry)
        with self._object(entry) as target:
            xattrs.remove(target, disk)
        return entry

    def _kept(self, target: bytes | int, name: bytes) -> bool:
        """Whether ``target`` keeps ``name`` aside (``user.unionfs-xattr.NAME``), shown as ``name``."""
        return self._kept_aside(name) and xattrs.get(target, kept_name(name)) is not None


def _or_keep(ident: int | None) -> int:
    """An id for chown(2): -1 leaves it unchanged."""
    return -1 if ident is None else ident


def _same_object(a: Entry, b: Entry) -> bool:
    return (a.st.st_dev, a.st.st_ino) == (b.st.st_dev, b.st.st_ino)


def _set_opaque(upper: Layer, path: bytes, fmt: XattrFormat) -> None:
    with upper.proc_at(path) as full:
        whiteout.set_opaque(full, fmt)


def default_format(upper: bytes | None, forced: bool | None) -> XattrFormat:
    """``user.overlay.*`` when forced or when ``trusted.*`` cannot be written in the upper layer."""
    if forced is not None:
        return XattrFormat.USER if forced else XattrFormat.TRUSTED
    if upper is None:
        return XattrFormat.TRUSTED if os.geteuid() == 0 else XattrFormat.USER
    return XattrFormat.TRUSTED if xattrs.can_store_trusted(upper) else XattrFormat.USER

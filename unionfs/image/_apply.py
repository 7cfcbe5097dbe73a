"""Apply one OCI/Docker layer tar into a directory in the kernel's overlay on-disk format (containerd's
``pkg/archive`` semantics, written from scratch).

* Every entry name is resolved as if chrooted into the merged view of ``root`` over ``lowers`` (the layers
  beneath this one, already applied, uppermost first; only read). A name whose ``..`` climbs above the root
  is refused; absolute names are relative to the root. The directories on the way are opened one at a time
  with ``openat(O_PATH|O_NOFOLLOW)``; a symlink met on the way (planted by this layer, or in a lower one) is
  read and followed inside the root: an absolute target restarts at the root, ``..`` stops at it, 40 links at
  most, and the resolution goes on in the merged view (``lib -> /usr/lib`` in a lower layer, then ``lib/x`` in
  this one, lands in ``usr/lib/x``). The lower layers are consulted only for a component ``root`` does not
  hold, top-down: a whiteout (a character device 0/0, or an xattr whiteout in a directory marked
  ``overlay.opaque=x``) hides the name and everything beneath; a directory marked opaque (``overlay.opaque=y``
  in the namespace of ``fmt``, in a lower layer or in ``root``; not the top directory, where the kernel
  ignores the marker) hides what the layers beneath hold inside it; a non-directory hides the directories
  beneath it. A directory only a lower layer holds is made in ``root`` as a copy-up would make it: with the
  owner, mode and times of the top-most one and its xattrs (overlay-private ones left out; rootless:
  ``user.containers.override_stat`` with them), not opaque. A missing directory (nowhere, or whited out) is
  made with mode 0755. The last component is never followed: what ``root`` holds there is replaced (removed
  first) unless both it and the entry are directories. A directory entry replacing, in ``root``, a
  non-directory this layer put over a lower directory (such as its whiteout) is marked opaque: the lower
  directory it hid stays hidden.
* ``.wh.NAME`` removes what this layer put at NAME and leaves a whiteout there (a character device 0/0),
  whether or not a lower layer holds NAME; ``.wh..wh..opq`` marks its directory opaque (``overlay.opaque=y``
  in the namespace of ``fmt``), hiding the lower layers only, so entries this layer adds there, before or
  after the marker, stay. Other ``.wh..wh.*`` names (AUFS metadata) and what is below them are skipped;
  ``.wh.NAME/child`` is refused. Whiteouts naming ``.``, ``..`` or nothing, or whose directory is reached
  through a symlink (of this layer or of a lower one), are refused.
* Regular files, directories, symlinks (targets kept verbatim), hard links, FIFOs and device nodes; numeric
  owners, modes, mtimes (directories' mode and times set once the whole layer is written, deepest first) and
  ``SCHILY.xattr.*`` PAX xattrs. A hard link names an earlier entry of this layer, or a non-directory of the
  lower layers: that one is copied up into ``root`` first (content, owner, mode, times, xattrs but the
  overlay-private ones), then linked. Xattrs in the overlay namespaces (``trusted.overlay.*``,
  ``user.overlay.*``) would be read by overlayfs as its own markers (opaque, redirect, metacopy...) and
  ``user.containers.override_stat`` as a stored owner: they are dropped and counted, never written. Xattrs
  the file system or our privileges refuse (EPERM, ENOTSUP, EACCES) are dropped and counted too.
* ``rootless=True``: no chown is attempted; files stay owned by the applying user, regular files get at least
  ``u+rw`` and directories ``u+rwx`` on disk (so that this user can go on writing and reading them), and where
  the owner or mode on disk differs from the entry's, ``user.containers.override_stat`` records
  ``UID:GID:0MODE`` (what unionfs's ``xattr_permissions`` shows). A device node is stored as an empty
  regular file whose override also names the device (``UID:GID:0MODE:char-MAJ-MIN`` or ``block-...``;
  ``xattr_permissions`` reads the first three fields: it shows a regular file with the recorded owner and
  mode, not a device). The kernel allows no ``user.*`` xattr on symlinks and FIFOs: an owner or mode
  they cannot hold is counted in ``unrecorded``, not stored.

Hostile or broken input raises :class:`LayerError` naming the entry; the directory is then half-applied:
use :func:`apply_into_new` to build into a fresh directory that only appears when complete.

Not done here: nothing is fsync'd (the caller syncs if it needs durability); the digests are computed, not
compared with expected ones (the caller compares); no id mapping is applied to owners; when the kernel
refuses to make a 0/0 device for a whiteout, the apply fails (no fallback to xattr whiteouts); sparse files
are written out in full; overlay-private xattrs of the archive are dropped, not stored escaped; the lower
layers are taken as they are (not checked for changes while the layer is applied), their merged paths must
fit in PATH_MAX, and neither metacopy nor redirect xattrs in them are followed.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from typing import BinaryIO, Literal

from .. import xattrs
from ..ownership import KEPT_XATTR_PREFIX, OVERRIDE_XATTR, encode_override, kept_name
from ..whiteout import (
    AUFS_META_PREFIX,
    AUFS_OPAQUE,
    AUFS_PREFIX,
    TRUSTED_PREFIX,
    USER_PREFIX,
    XattrFormat,
    is_whiteout_stat,
    is_xattr_whiteout,
    read_dir_marks,
)
from ..whiteout import make_whiteout as _make_whiteout
from ._stream import HashingSource, LayerError, LayerStream, digest_hex

#: how many symlinks one resolution may follow (the kernel's limit)
_MAX_LINKS = 40
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: the errnos meaning "this xattr cannot be stored here" (EINVAL: a security.capability the kernel will not take
#: from this user): the xattr is dropped and counted
_XATTR_REFUSED = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES, errno.EINVAL)
_COPY = 1 << 20
_CACHE_MAX = 64
_XATTR_PAX = "SCHILY.xattr."

Progress = Callable[[int, int], None]
"""Called after each entry with (entries applied, compressed bytes read so far)."""


@dataclasses.dataclass
class ApplyResult:
    """What one layer held, and its two digests (computed while reading)."""

    entries: int = 0
    #: bytes of regular file data written
    bytes: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    #: entries whose owner or mode went to ``user.containers.override_stat`` (rootless)
    overrides: int = 0
    #: entries whose owner or mode could neither be stored nor recorded (rootless symlinks and FIFOs)
    unrecorded: int = 0
    #: PAX xattrs not written (overlay-private names, or refused by the file system), and xattrs of lower
    #: objects the file system refused on their copies
    dropped_xattrs: int = 0
    #: rootless: xattrs this user may not set (``security.capability``...) kept in ``user.unionfs-xattr.*``
    kept_xattrs: int = 0
    #: directories and hard link targets copied up from the lower layers
    copied_up: int = 0
    #: ``sha256:...`` of the uncompressed tar (the layer's diff-id) and of the stream as read (its digest)
    diff_id: str = ""
    digest: str = ""
    compression: str = ""
    compressed_size: int = 0
    uncompressed_size: int = 0

    def summary(self) -> str:
        """One line for a command's output."""
        line = (
            f"{self.entries} entries, {self.bytes} bytes, {self.whiteouts} whiteouts, "
            f"{self.opaque_dirs} opaque directories"
        )
        if self.overrides:
            line += f", {self.overrides} owners/modes recorded in {OVERRIDE_XATTR.decode()}"
        if self.unrecorded:
            line += (f", {self.unrecorded} symlinks/FIFOs left as this user's (the kernel takes no user xattr on "
                     "them to record their owner)")
        if self.copied_up:
            line += f", {self.copied_up} copied up from lower layers"
        if self.kept_xattrs:
            line += f", {self.kept_xattrs} xattrs this user may not set kept in user.unionfs-xattr.*"
        if self.dropped_xattrs:
            line += f", {self.dropped_xattrs} xattrs dropped"
        return line


def _clean(name: bytes, what: str) -> tuple[bytes, ...]:
    """The components of a name relative to the root, ``..`` applied lexically; refused when it climbs above."""
    out: list[bytes] = []
    for comp in name.split(b"/"):
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            if not out:
                raise LayerError(f"{what} {name!r} escapes the root")
            out.pop()
            continue
        out.append(comp)
    return tuple(out)


def _show(path: tuple[bytes, ...]) -> str:
    return repr(b"/" + b"/".join(path))


_NS_MAX = 2**63 - 1
#: the largest uid/gid (2**32 - 1 means "unchanged" to chown) and device number part Linux takes
_ID_MAX = 2**32 - 2
_DEV_MAX = 2**32 - 1


def _clamp_ns(seconds: float) -> int:
    if seconds != seconds:  # NaN
        return 0
    ns = seconds * 1e9
    if ns >= _NS_MAX:  # (infinity included)
        return _NS_MAX
    if ns <= -_NS_MAX:
        return -_NS_MAX
    return int(ns)


def _check_fields(m: tarfile.TarInfo, raw: bytes, what: str) -> None:
    """Refuse what no file system can hold: NUL in names, ids or device numbers out of range."""
    if b"\0" in raw or "\0" in m.linkname:
        raise LayerError(f"{what}: a NUL byte in its name or link target")
    if not (0 <= m.uid <= _ID_MAX and 0 <= m.gid <= _ID_MAX):
        raise LayerError(f"{what}: owner {m.uid}:{m.gid} out of range")
    if (m.ischr() or m.isblk()) and not (0 <= m.devmajor <= _DEV_MAX and 0 <= m.devminor <= _DEV_MAX):
        raise LayerError(f"{what}: device number {m.devmajor}:{m.devminor} out of range")


@dataclasses.dataclass
class _DirMeta:
    mode: int
    uid: int
    gid: int
    times: tuple[int, int]
    #: a copy-up of a lower directory: its mode on disk is copied as it is, and its override with its xattrs
    copied: bool = False


@dataclasses.dataclass(frozen=True)
class _LowerDir:
    """The lower layers contributing to one merged directory, top first, and those of them whose directory
    holds xattr whiteouts (``overlay.opaque=x``)."""

    dirs: tuple[int, ...]
    xwhiteouts: frozenset[int] = frozenset()


_NO_LOWER = _LowerDir(())
_Cleared = Literal["nothing", "kept", "removed"]
#: what a lookup in a lower layer may say when the name is simply not there
_MISSING = (errno.ENOENT, errno.ENOTDIR)


@dataclasses.dataclass(frozen=True)
class _LowerFound:
    """What the merged lower view shows at a name: the top-most layer holding it and its stat."""

    layer: int
    st: os.stat_result
    path: bytes


class _Applier:
    def __init__(
        self, root: bytes, fmt: XattrFormat, rootless: bool, result: ApplyResult, lowers: Sequence[bytes] = ()
    ) -> None:
        self.root_fd = os.open(root, _PATH_FLAGS)
        self.fmt = fmt
        self.rootless = rootless
        self.res = result
        self.uid, self.gid = os.geteuid(), os.getegid()
        #: (raw parent components, follow) -> (O_PATH fd, resolved components)
        self._cache: dict[tuple[tuple[bytes, ...], bool], tuple[int, tuple[bytes, ...]]] = {}
        #: resolved paths of the non-directory entries this layer made (hard links may name only these)
        self.made: set[tuple[bytes, ...]] = set()
        self.dirs: dict[tuple[bytes, ...], _DirMeta] = {}
        self._retired: list[int] = []
        self.lower_fds: list[int] = []
        try:
            for lower in lowers:
                self.lower_fds.append(os.open(lower, _PATH_FLAGS))
        except BaseException:
            self.close()
            raise
        #: resolved directory path -> the lower layers contributing to it (computed when root misses a name)
        self._lower_dirs: dict[tuple[bytes, ...], _LowerDir] = {}
        #: resolved paths of the lower symlinks followed by the cached resolutions
        self._lower_links: set[tuple[bytes, ...]] = set()

    def close(self) -> None:
        self._forget()
        self._close_retired()
        os.close(self.root_fd)
        while self.lower_fds:
            os.close(self.lower_fds.pop())

    def _forget(self) -> None:
        """Drop the resolution caches (after a removal, or when a lower name they used is hidden). Their
        descriptors are closed at the next entry: the current one may still be using one of them."""
        self._retired.extend(fd for fd, _ in self._cache.values())
        self._cache.clear()
        self._lower_dirs.clear()
        self._lower_links.clear()

    def _close_retired(self) -> None:
        while self._retired:
            os.close(self._retired.pop())

    # -- the lower layers ------------------------------------------------------------------------------

    def _root_opaque(self, path: tuple[bytes, ...]) -> bool:
        """Whether root's directory ``path`` (resolved, all directories in root) is marked opaque."""
        proc = b"/proc/self/fd/%d/%s" % (self.root_fd, b"/".join(path) or b".")
        return xattrs.get(proc, self.fmt.opaque) == b"y"

    def _lower_dir(self, path: tuple[bytes, ...]) -> _LowerDir:
        """The lower layers merged into root's directory ``path`` (which root holds, as do its ancestors)."""
        hit = self._lower_dirs.get(path)
        if hit is not None:
            return hit
        if not path:  # an opaque marker on the root hides nothing (the kernel ignores it there)
            found = _LowerDir(tuple(range(len(self.lower_fds))))
        elif self._root_opaque(path):
            found = _NO_LOWER
        else:
            found = self._lower_lookup(path[:-1], path[-1])[1]
        self._lower_dirs[path] = found
        return found

    def _lower_lookup(self, parent: tuple[bytes, ...], name: bytes) -> tuple[_LowerFound | None, _LowerDir]:
        """What the lower layers show at ``name`` in root's directory ``parent``: the top-most object (None
        when missing or whited out) and, for a directory, the layers merged into it. A whiteout hides the name
        and everything beneath; a non-directory on top stands alone; a directory merges with the directories
        beneath it down to an opaque one or to a non-directory."""
        above = self._lower_dir(parent)
        if not above.dirs:
            return None, _NO_LOWER
        path = b"/".join((*parent, name))
        top: _LowerFound | None = None
        dirs: list[int] = []
        marked: list[int] = []
        for index in above.dirs:
            fd = self.lower_fds[index]
            try:
                st = os.stat(path, dir_fd=fd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _MISSING:
                    raise
                continue
            proc = b"/proc/self/fd/%d/%s" % (fd, path)
            if is_whiteout_stat(st) or (index in above.xwhiteouts and is_xattr_whiteout(proc, st, (self.fmt,))):
                break
            if not stat.S_ISDIR(st.st_mode):
                if top is None:
                    top = _LowerFound(index, st, path)
                break
            if top is None:
                top = _LowerFound(index, st, path)
            dirs.append(index)
            marks = read_dir_marks(proc, (self.fmt,))
            if marks.xwhiteouts:
                marked.append(index)
            if marks.opaque:
                break
        return top, _LowerDir(tuple(dirs), frozenset(marked)) if dirs else _NO_LOWER

    def _lower_proc(self, found: _LowerFound) -> bytes:
        return b"/proc/self/fd/%d/%s" % (self.lower_fds[found.layer], found.path)

    def _copy_xattrs(self, found: _LowerFound, target: bytes | int) -> None:
        """The xattrs of a lower object onto its copy in root, overlay-private ones left out."""
        src = self._lower_proc(found)
        for name in xattrs.names(src):
            if name.startswith((TRUSTED_PREFIX, USER_PREFIX)):
                continue
            value = xattrs.get(src, name)
            if value is None:
                continue
            try:
                xattrs.write(target, name, value)
            except OSError as exc:
                if exc.errno not in _XATTR_REFUSED:
                    raise
                self.res.dropped_xattrs += 1

    def _copy_up_dir(self, cur: int, comp: bytes, path: tuple[bytes, ...], found: _LowerFound) -> None:
        """Make ``comp`` in ``cur`` (root's ``path``) as a copy-up of the lower directory ``found``: its owner
        and xattrs now, its mode and times once the layer is written."""
        os.mkdir(comp, 0o700, dir_fd=cur)
        self.res.copied_up += 1
        fd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
        try:
            if not self.rootless:
                os.fchown(fd, found.st.st_uid, found.st.st_gid)
            self._copy_xattrs(found, fd)
        finally:
            os.close(fd)
        st = found.st
        self.dirs[path] = _DirMeta(
            stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, (st.st_atime_ns, st.st_mtime_ns), copied=True
        )

    def _copy_up_file(self, pfd: int, base: bytes, found: _LowerFound, what: str) -> None:
        """Make ``base`` in ``pfd`` a copy of the lower non-directory ``found`` (content, owner, xattrs,
        mode, times)."""
        st = found.st
        lfd = self.lower_fds[found.layer]
        times = (st.st_atime_ns, st.st_mtime_ns)
        self.res.copied_up += 1
        if stat.S_ISREG(st.st_mode):
            src = os.open(found.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=lfd)
            try:
                fd = os.open(
                    base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd
                )
                try:
                    while os.sendfile(fd, src, None, _COPY):
                        pass
                    if not self.rootless:
                        os.fchown(fd, st.st_uid, st.st_gid)
                    self._copy_xattrs(found, fd)
                    os.fchmod(fd, stat.S_IMODE(st.st_mode))
                    os.utime(fd, ns=times)
                finally:
                    os.close(fd)
            finally:
                os.close(src)
            return
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(found.path, dir_fd=lfd), base, dir_fd=pfd)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(base, 0o600, dir_fd=pfd)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            os.mknod(base, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=pfd)
        else:
            raise LayerError(f"{what}: hard link to a lower object of an unsupported type")
        via_proc = b"/proc/self/fd/%d/%s" % (pfd, base)
        if not self.rootless:
            os.chown(base, st.st_uid, st.st_gid, dir_fd=pfd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            self._copy_xattrs(found, via_proc)
            os.chmod(base, stat.S_IMODE(st.st_mode), dir_fd=pfd)
        os.utime(base, ns=times, dir_fd=pfd, follow_symlinks=False)

    # -- resolution ------------------------------------------------------------------------------------

    def _walk(
        self,
        comps: tuple[bytes, ...],
        *,
        follow: bool,
        create: bool,
        what: str,
        lower: bool = True,
        start: tuple[int, tuple[bytes, ...]] | None = None,
    ) -> tuple[int, tuple[bytes, ...]]:
        """An O_PATH descriptor of directory ``comps`` inside the root (in the merged view of root over the
        lower layers, unless not ``lower``), and its resolved components. A directory only a lower layer holds
        is copied up; a missing one is made when ``create``.

        ``start``: a resolved directory (its descriptor, not taken over, and its resolved components) to
        resolve ``comps`` from instead of the root. A walk from there meeting a symlink or ``..`` (which may
        lead above it) raises :class:`_Restart`: the caller walks from the root instead."""
        todo = list(reversed(comps))
        names: list[bytes] = list(start[1]) if start is not None else []
        base_fd = start[0] if start is not None else self.root_fd
        fds: list[int] = []
        links = 0
        try:
            while todo:
                comp = todo.pop()
                if comp in (b"", b"."):
                    continue
                if comp == b"..":
                    if start is not None:
                        raise _Restart
                    if names:
                        names.pop()
                        os.close(fds.pop())
                    continue
                cur = fds[-1] if fds else base_fd
                try:
                    st: os.stat_result | None = os.stat(comp, dir_fd=cur, follow_symlinks=False)
                except FileNotFoundError:
                    st = None
                target: bytes | None = None
                if st is None:
                    found = self._lower_lookup(tuple(names), comp)[0] if lower and self.lower_fds else None
                    if found is None:
                        if not create:
                            raise LayerError(f"{what}: {_show((*names, comp))} does not exist")
                        os.mkdir(comp, 0o755, dir_fd=cur)
                        if self.rootless and os.geteuid() != 0:
                            # a directory the layer implies is root's, as any tar extraction makes it; this user
                            # owns it on disk, so it says so where a mount with xattr_permissions reads it
                            self._imply_root_owner(cur, comp)
                    elif stat.S_ISLNK(found.st.st_mode):
                        target = os.readlink(found.path, dir_fd=self.lower_fds[found.layer])
                        self._lower_links.add((*names, comp))
                    elif stat.S_ISDIR(found.st.st_mode):
                        self._copy_up_dir(cur, comp, (*names, comp), found)
                    else:
                        raise LayerError(f"{what}: {_show((*names, comp))} is not a directory")
                elif stat.S_ISLNK(st.st_mode):
                    target = os.readlink(comp, dir_fd=cur)
                elif not stat.S_ISDIR(st.st_mode):
                    raise LayerError(f"{what}: {_show((*names, comp))} is not a directory")
                if target is not None:
                    if not follow:
                        raise LayerError(f"{what}: goes through the symlink {_show((*names, comp))}")
                    if start is not None:
                        raise _Restart
                    links += 1
                    if links > _MAX_LINKS:
                        raise LayerError(f"{what}: too many levels of symlinks")
                    if target.startswith(b"/"):
                        names.clear()
                        while fds:
                            os.close(fds.pop())
                    todo.extend(reversed(target.split(b"/")))
                    continue
                fds.append(os.open(comp, _PATH_FLAGS, dir_fd=cur))
                names.append(comp)
            result = fds.pop() if fds else os.open(b".", _PATH_FLAGS, dir_fd=base_fd)
        finally:
            for fd in fds:
                os.close(fd)
        return result, tuple(names)

    def _parent(self, comps: tuple[bytes, ...], *, follow: bool, what: str) -> tuple[int, tuple[bytes, ...]]:
        key = (comps, follow)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if len(self._cache) >= _CACHE_MAX:
            self._forget()
        found = None
        # from the deepest cached ancestor, when there is one (the entries of a layer come mostly in tree order)
        for depth in range(len(comps) - 1, 0, -1):
            above = self._cache.get((comps[:depth], follow))
            if above is not None:
                try:
                    found = self._walk(comps[depth:], follow=follow, create=True, what=what, start=above)
                except _Restart:
                    pass
                break
        if found is None:
            found = self._walk(comps, follow=follow, create=True, what=what)
        self._cache[key] = found
        return found

    def _clear(self, pfd: int, base: bytes, path: tuple[bytes, ...], keep_dir: bool) -> _Cleared:
        """Remove what is at ``base`` (not followed; ``path`` from the root) unless ``keep_dir`` and it is a
        directory; what was there. A lower symlink the cached resolutions went through is hidden by what
        comes here next: they are dropped."""
        if path in self._lower_links:
            self._forget()
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return "nothing"
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return "kept"
            self._forget()
            shutil.rmtree(base, dir_fd=pfd)
            depth = len(path)
            self.made.difference_update([p for p in self.made if p[:depth] == path])
            for gone in [p for p in self.dirs if p[:depth] == path]:
                del self.dirs[gone]  # a directory made there again gets its own metadata
        else:
            if stat.S_ISLNK(st.st_mode):
                self._forget()  # a cached resolution may go through it
            os.unlink(base, dir_fd=pfd)
            self.made.discard(path)
        return "removed"

    # -- entries ---------------------------------------------------------------------------------------

    def apply(self, m: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        self._close_retired()
        raw = m.name.encode("utf-8", "surrogateescape")
        what = f"entry {raw!r}"
        _check_fields(m, raw, what)
        comps = _clean(raw, "entry")
        base = comps[-1] if comps else b""
        for comp in comps[:-1]:
            if comp.startswith(AUFS_META_PREFIX):
                return  # inside AUFS metadata (such as .wh..wh.plnk/, its hard link store): skipped
            if comp.startswith(AUFS_PREFIX):
                raise LayerError(f"{what}: a whiteout name as a directory")
        if base.startswith(AUFS_PREFIX):
            self._whiteout(comps, raw, what)
            return
        if not comps:
            if not m.isdir():
                raise LayerError(f"{what}: names the root, and is not a directory")
            self._dir_meta(self.root_fd, b".", (), m, what)
            return
        pfd, parent = self._parent(comps[:-1], follow=True, what=what)
        path = (*parent, base)
        try:
            self._entry(m, tf, pfd, base, path, what)
        except OSError as exc:
            raise OSError(exc.errno, f"{what}: {exc.strerror}") from None

    def _whiteout(self, comps: tuple[bytes, ...], raw: bytes, what: str) -> None:
        base = comps[-1]
        if base == AUFS_OPAQUE:
            pfd, _ = self._parent(comps[:-1], follow=False, what=f"opaque marker {raw!r}")
            fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
            try:
                os.setxattr(fd, self.fmt.opaque, b"y")
            finally:
                os.close(fd)
            self.res.opaque_dirs += 1
            if self.lower_fds:
                self._forget()  # the lower names beneath it are hidden now
            return
        if base.startswith(AUFS_META_PREFIX):
            return  # AUFS metadata (.wh..wh.plnk and such): nothing to apply
        name = base[len(AUFS_PREFIX) :]
        if name in (b"", b".", b".."):
            raise LayerError(f"whiteout {raw!r} names {name.decode(errors='replace') or 'nothing'!r}")
        pfd, parent = self._parent(comps[:-1], follow=False, what=f"whiteout {raw!r}")
        self._clear(pfd, name, (*parent, name), keep_dir=False)
        try:
            _make_whiteout(name, pfd)
        except OSError as exc:
            raise OSError(exc.errno, f"whiteout {raw!r}: cannot make a whiteout: {exc.strerror}") from None
        self.res.whiteouts += 1

    def _entry(
        self, m: tarfile.TarInfo, tf: tarfile.TarFile, pfd: int, base: bytes, path: tuple[bytes, ...], what: str
    ) -> None:
        cleared = self._clear(pfd, base, path, keep_dir=m.isdir())
        if m.isdir():
            if cleared != "kept":
                os.mkdir(base, 0o700, dir_fd=pfd)
            self.made.discard(path)
            fd = os.open(base, _PATH_FLAGS, dir_fd=pfd)
            try:
                self._dir_meta(fd, b".", path, m, what)
                if cleared == "removed" and self.lower_fds:
                    # what this layer put here (a whiteout, a file...) hid a lower directory: the new one
                    # replaces it, and is opaque (as it would be in a tree extracted onto the merged view)
                    found = self._lower_lookup(path[:-1], base)[0]
                    if found is not None and stat.S_ISDIR(found.st.st_mode):
                        xattrs.write(b"/proc/self/fd/%d" % fd + b"/.", self.fmt.opaque, b"y")
                        self._forget()
            finally:
                os.close(fd)
            return
        self.made.add(path)
        if m.isreg():
            self._file(m, tf, pfd, base, what)
        elif m.issym():
            os.symlink(m.linkname.encode("utf-8", "surrogateescape"), base, dir_fd=pfd)
            self._meta(pfd, base, m, symlink=True)
        elif m.islnk():
            self._hardlink(m, pfd, base, what)
        elif m.isfifo():
            os.mkfifo(base, 0o600, dir_fd=pfd)
            self._meta(pfd, base, m)
        elif m.ischr() or m.isblk():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            if self.rootless:
                fd = os.open(
                    base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd
                )
                try:
                    label = b"%s-%d-%d" % (b"char" if m.ischr() else b"block", m.devmajor, m.devminor)
                    self._fd_meta(fd, m, device=label)
                finally:
                    os.close(fd)
            else:
                os.mknod(base, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
                self._meta(pfd, base, m)
        else:
            raise LayerError(f"{what}: unsupported entry type {m.type!r}")

    def _file(self, m: tarfile.TarInfo, tf: tarfile.TarFile, pfd: int, base: bytes, what: str) -> None:
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
        try:
            src = tf.extractfile(m)
            assert src is not None  # a regular file always has a reader
            left = m.size
            while left > 0:
                try:
                    chunk = src.read(min(_COPY, left))
                except tarfile.ReadError:
                    chunk = b""
                if not chunk:
                    raise LayerError(f"{what}: truncated ({m.size - left} of {m.size} bytes)")
                left -= len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            self.res.bytes += m.size
            self._fd_meta(fd, m)
        finally:
            os.close(fd)

    def _hardlink(self, m: tarfile.TarInfo, pfd: int, base: bytes, what: str) -> None:
        link = m.linkname.encode("utf-8", "surrogateescape")
        tcomps = _clean(link, f"{what}: hard link target")
        if not tcomps:
            raise LayerError(f"{what}: hard link to the root")
        tfd, tparent = self._walk(tcomps[:-1], follow=True, create=False, what=f"{what}: hard link target {link!r}")
        try:
            target = (*tparent, tcomps[-1])
            if target not in self.made and not self._linkable_here(tfd, tcomps[-1]):
                found = None
                if self.lower_fds and not _lexists(tcomps[-1], tfd):
                    found = self._lower_lookup(tparent, tcomps[-1])[0]
                if found is None:
                    raise LayerError(
                        f"{what}: hard link to {link!r}, not an earlier entry of this layer or a lower file"
                    )
                if stat.S_ISDIR(found.st.st_mode):
                    raise LayerError(f"{what}: hard link to {link!r}, a directory")
                self._copy_up_file(tfd, tcomps[-1], found, what)
                self.made.add(target)
            try:
                os.link(tcomps[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                raise LayerError(f"{what}: hard link to {link!r}, which is no longer there") from None
        finally:
            os.close(tfd)

    @staticmethod
    def _linkable_here(dir_fd: int, name: bytes) -> bool:
        """Whether root already holds a non-directory at ``name`` (not a whiteout) from before this layer: a
        layer applied onto a snapshot may link to what the snapshot holds."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return False
        return not stat.S_ISDIR(st.st_mode) and not is_whiteout_stat(st)

    # -- metadata --------------------------------------------------------------------------------------

    def _xattrs(self, m: tarfile.TarInfo) -> list[tuple[bytes, bytes]]:
        found = []
        for key, value in m.pax_headers.items():
            if not key.startswith(_XATTR_PAX):
                continue
            name = key[len(_XATTR_PAX) :].encode("utf-8", "surrogateescape")
            if name.startswith((TRUSTED_PREFIX, USER_PREFIX, KEPT_XATTR_PREFIX)) or name == OVERRIDE_XATTR:
                self.res.dropped_xattrs += 1
                continue
            found.append((name, value.encode("utf-8", "surrogateescape")))
        return found

    def _set_xattrs(self, target: bytes | int, m: tarfile.TarInfo) -> None:
        for name, value in self._xattrs(m):
            try:
                xattrs.write(target, name, value)
            except OSError as exc:
                if exc.errno not in _XATTR_REFUSED:
                    raise
                if self.rootless and not name.startswith(b"user.") and self._keep_xattr(target, name, value):
                    continue
                self.res.dropped_xattrs += 1

    def _keep_xattr(self, target: bytes | int, name: bytes, value: bytes) -> bool:
        """Rootless: keep an xattr this user may not set (``security.capability``...) under
        ``user.unionfs-xattr.NAME``, where a mount with ``xattr_permissions`` and a diff find it."""
        try:
            xattrs.write(target, kept_name(name), value)
        except OSError as exc:
            if exc.errno not in _XATTR_REFUSED:
                raise
            return False
        self.res.kept_xattrs += 1
        return True

    @staticmethod
    def _times(m: tarfile.TarInfo) -> tuple[int, int]:
        """(atime, mtime) in nanoseconds, clamped to what the kernel takes (a 64-bit count)."""
        mtime = _clamp_ns(float(m.mtime))
        atime_text = m.pax_headers.get("atime")
        try:
            atime = _clamp_ns(float(atime_text)) if atime_text else mtime
        except ValueError:
            atime = mtime
        return atime, mtime

    def _imply_root_owner(self, dir_fd: int, name: bytes) -> None:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            xattrs.write(fd, OVERRIDE_XATTR, encode_override(0, 0, 0o755))
        except OSError as exc:
            if exc.errno not in _XATTR_REFUSED:
                raise
        finally:
            os.close(fd)

    def _record(self, target: bytes | int, st: os.stat_result, m: tarfile.TarInfo, device: bytes = b"") -> None:
        """Rootless: record the entry's owner and mode where the disk does not hold them."""
        want = (m.uid, m.gid, m.mode & 0o7777)
        if not device and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == want:
            return
        value = encode_override(m.uid, m.gid, m.mode) + (b":" + device if device else b"")
        try:
            xattrs.write(target, OVERRIDE_XATTR, value)
        except OSError as exc:
            if exc.errno not in _XATTR_REFUSED:
                raise
            self.res.unrecorded += 1
            return
        self.res.overrides += 1

    def _fd_meta(self, fd: int, m: tarfile.TarInfo, device: bytes = b"") -> None:
        """Owner, xattrs, mode and times of a regular file open for writing (in this order: a chown clears
        ``security.capability`` and the setuid bits)."""
        if self.rootless:
            self._set_xattrs(fd, m)
            os.fchmod(fd, (m.mode & 0o7777 | 0o600) if not device else 0o600)
            self._record(fd, os.fstat(fd), m, device)
        else:
            os.fchown(fd, m.uid, m.gid)
            self._set_xattrs(fd, m)
            os.fchmod(fd, m.mode & 0o7777)
        os.utime(fd, ns=self._times(m))

    def _meta(self, pfd: int, base: bytes, m: tarfile.TarInfo, symlink: bool = False) -> None:
        """Owner, xattrs, mode and times of a symlink, FIFO or device node ``base`` just made in ``pfd``."""
        via_proc = b"/proc/self/fd/%d/%s" % (pfd, base)
        if self.rootless:
            self._set_xattrs(via_proc, m)
            if not symlink:
                os.chmod(base, m.mode & 0o7777 | 0o600, dir_fd=pfd)
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if symlink:
                if (st.st_uid, st.st_gid) != (m.uid, m.gid):
                    self.res.unrecorded += 1
            else:
                self._record(via_proc, st, m)
        else:
            os.chown(base, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            self._set_xattrs(via_proc, m)
            if not symlink:
                # fchmodat cannot refuse to follow; ``base`` was just made here and is no symlink
                os.chmod(base, m.mode & 0o7777, dir_fd=pfd)
        os.utime(base, ns=self._times(m), dir_fd=pfd, follow_symlinks=False)

    def _dir_meta(self, pfd: int, base: bytes, path: tuple[bytes, ...], m: tarfile.TarInfo, what: str) -> None:
        """Owner and xattrs of a directory now; its mode and times once the layer is written."""
        if not any(key.startswith(_XATTR_PAX) for key in m.pax_headers):
            # no xattrs: the owner without opening the directory (``base`` is one, or "." of ``pfd``)
            if not self.rootless:
                os.chown(base, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            self.dirs[path] = _DirMeta(m.mode & 0o7777, m.uid, m.gid, self._times(m))
            return
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            if not self.rootless:
                os.fchown(fd, m.uid, m.gid)
            self._set_xattrs(fd, m)
        finally:
            os.close(fd)
        self.dirs[path] = _DirMeta(m.mode & 0o7777, m.uid, m.gid, self._times(m))

    def finish_dirs(self) -> None:
        """The directories' modes and times, deepest first (a directory's own changes come before its parent's)."""
        self._forget()
        # siblings one after another, so that their parent is walked to once (nothing is moved meanwhile)
        parent: tuple[bytes, ...] | None = None
        pfd = -1
        try:
            for path in sorted(self.dirs, key=lambda p: (-len(p), p)):
                if path[:-1] != parent:
                    if pfd >= 0:
                        os.close(pfd)
                        pfd = -1
                    parent = path[:-1]
                    try:
                        pfd = self._walk(parent, follow=False, create=False, what="", lower=False)[0]
                    except (LayerError, OSError):
                        pass  # removed or replaced later in the layer
                if pfd >= 0:
                    self._finish_dir(pfd, path, self.dirs[path])
        finally:
            if pfd >= 0:
                os.close(pfd)

    def _finish_dir(self, pfd: int, path: tuple[bytes, ...], meta: _DirMeta) -> None:
        """The mode and times of directory ``path`` (in ``pfd``, its parent), if it is still a directory."""
        try:
            fd = os.open(path[-1] if path else b".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=pfd)
        except OSError:
            return
        try:
            if meta.copied:
                os.fchmod(fd, meta.mode)
            elif self.rootless:
                os.fchmod(fd, meta.mode | 0o700)
                fake = tarfile.TarInfo()
                fake.uid, fake.gid, fake.mode = meta.uid, meta.gid, meta.mode
                self._record(fd, os.fstat(fd), fake)
            else:
                os.fchmod(fd, meta.mode)
            os.utime(fd, ns=meta.times)
        finally:
            os.close(fd)


class _Restart(Exception):
    """A walk from a cached directory met what only a walk from the root resolves correctly."""


def _lexists(name: bytes, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


#: the errnos of the file system that mean "this entry asks for what cannot be": the entry is refused
_ENTRY_ERRNOS = frozenset({errno.ERANGE, errno.E2BIG, errno.ENAMETOOLONG})
#: the largest PAX or GNU long-name header read into memory (Go's archive/tar, which containerd uses, stops there)
MAX_META_HEADER = 1 << 20
_META_TYPES = frozenset({tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                         tarfile.GNUTYPE_LONGLINK})


def _show_name(name: str) -> str:
    return repr(name.encode("utf-8", "surrogateescape"))[2:-1][:200]


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar member whose metadata headers (PAX, GNU long names) may not exceed :data:`MAX_META_HEADER`: tarfile
    reads such a header whole into memory, so a small compressed layer could ask for gigabytes."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _META_TYPES and self.size > MAX_META_HEADER:
            raise LayerError(f"a {self.size}-byte metadata header (PAX or long name): more than "
                             f"{MAX_META_HEADER} bytes are refused")
        return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]


def _check_end(stream: LayerStream, offset: int) -> None:
    """The tar must end with its end-of-archive marker where tarfile stopped: anything else there is a
    truncated archive or a corrupt header (which tarfile's stream mode takes for the end). The marker is
    two zero blocks; one zero block at the very end of the stream is accepted too (what some writers do)."""
    tail = stream.bytes_at(offset, 2 * tarfile.BLOCKSIZE)
    if tail is None:
        raise LayerError(f"corrupt tar: cannot check the end of the archive at offset {offset}")
    if tail.strip(b"\0"):
        if len(tail) < tarfile.BLOCKSIZE:
            raise LayerError(f"truncated tar: a partial header at offset {offset}")
        raise LayerError(f"corrupt tar: invalid header at offset {offset}")
    if len(tail) < tarfile.BLOCKSIZE:
        raise LayerError(f"truncated tar: no end-of-archive marker at offset {offset}")


def apply_layer(
    source: BinaryIO | bytes | str | os.PathLike[str],
    root: bytes,
    *,
    fmt: XattrFormat,
    rootless: bool,
    progress: Progress | None = None,
    lowers: Sequence[bytes] = (),
) -> ApplyResult:
    """Apply the layer ``source`` (an open binary file, or a path; uncompressed, gzip or zstd) into the
    existing directory ``root``, its names resolved in the merged view of ``root`` over the directories
    ``lowers`` (the layers beneath it, uppermost first, in the format ``fmt``; only read). Raises
    :class:`LayerError` for hostile or broken input, OSError for the file system's errors; ``root`` is then
    half-applied."""
    if isinstance(source, (bytes, str, os.PathLike)):
        with open(source, "rb") as f:
            return apply_layer(f, root, fmt=fmt, rootless=rootless, progress=progress, lowers=lowers)
    raw = HashingSource(source)
    stream = LayerStream(raw)
    try:
        result = ApplyResult(compression=stream.compression)
        applier = _Applier(root, fmt, rootless, result, lowers)
        try:
            try:
                tf = tarfile.open(  # type: ignore[call-overload]  # noqa: SIM115
                    fileobj=stream, mode="r|", bufsize=1 << 16, encoding="utf-8", errors="surrogateescape",
                    tarinfo=_BoundedTarInfo,
                )
            except tarfile.ReadError as exc:
                raise LayerError(f"not a tar archive: {exc}") from None
            with tf:
                while True:
                    try:
                        m = tf.next()
                    except tarfile.ReadError as exc:
                        raise LayerError(f"truncated or corrupt tar after {result.entries} entries: {exc}") from None
                    if m is None:
                        break
                    try:
                        applier.apply(m, tf)
                    except (ValueError, OverflowError) as exc:
                        if isinstance(exc, LayerError):
                            raise
                        raise LayerError(f"entry {_show_name(m.name)}: {exc}") from None
                    except OSError as exc:
                        if exc.errno not in _ENTRY_ERRNOS:
                            raise
                        raise LayerError(f"entry {_show_name(m.name)}: {exc.strerror}") from None
                    result.entries += 1
                    if progress is not None:
                        progress(result.entries, raw.count)
                _check_end(stream, tf.offset)
            applier.finish_dirs()
        finally:
            applier.close()
        stream.drain()
    except BaseException:
        stream.close()  # its reading thread ends before the caller closes the source
        raise
    while raw.read(1 << 16):
        pass
    result.diff_id = digest_hex(stream.sha)
    result.digest = digest_hex(raw.sha)
    result.compressed_size = raw.count
    result.uncompressed_size = stream.count
    return result


def apply_into_new(
    source: BinaryIO | bytes | str | os.PathLike[str],
    parent: bytes,
    name: bytes,
    *,
    fmt: XattrFormat,
    rootless: bool,
    progress: Progress | None = None,
    lowers: Sequence[bytes] = (),
) -> ApplyResult:
    """Apply the layer (over ``lowers``, as :func:`apply_layer` does) into a new directory ``parent/name``:
    built in a temporary sibling, renamed into place only once complete, removed on any error.
    ``parent/name`` must not exist (FileExistsError; checked before and at the rename, which would otherwise
    replace an empty directory)."""
    if os.path.lexists(os.path.join(parent, name)):
        raise FileExistsError(errno.EEXIST, "already exists", os.path.join(parent, name))
    tmp = tempfile.mkdtemp(prefix=b"." + name + b".partial-", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        result = apply_layer(source, tmp, fmt=fmt, rootless=rootless, progress=progress, lowers=lowers)
        if os.path.lexists(os.path.join(parent, name)):
            raise FileExistsError(errno.EEXIST, "already exists", os.path.join(parent, name))
        os.rename(tmp, os.path.join(parent, name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result

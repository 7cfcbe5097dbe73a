"""Objects owned by ids outside this process's user namespace, and what callers may do with them.

Inside a user namespace (a rootless container, ``unshare -r``) a file whose owner the namespace does not map
shows as the overflow id (65534).  Kernel overlayfs keeps that owner's real identity: nobody in the namespace
is its owner, no capability of the namespace applies to it (so its mode bits decide, even for the namespace's
root), and it cannot be copied up, since the copy could not be given its owner (EOVERFLOW).

The FUSE kernel only knows the ids the server reports, and 65534 may be an id the namespace maps: its
permission checks then let the namespace's root through.  So the server recognises such objects itself:

* when the overflow id is not mapped in this namespace, an owner shown as it is unmapped;
* otherwise, when this process has CAP_FOWNER in its namespace, an ``open(O_NOATIME)`` of the object, which
  the kernel allows to the owner or to a holder of CAP_FOWNER over the owner's id, and refuses (EPERM) when
  the id is outside the namespace: a probe that changes nothing.  Regular files, directories and FIFOs are
  probed; symlinks, devices and sockets cannot be opened so, and an owner of theirs shown as 65534 counts as
  unmapped (a real 65534 owner then meets refusals, never an owner changed on disk).  Without CAP_FOWNER an
  owner shown as 65534 counts as unmapped only in the first case.

The checks below are those of the kernel's ``generic_permission`` without capabilities; they are applied to
such objects only (everything else is checked by the kernel before a request reaches us).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Sequence

from ._at import At

#: a map covering every id: the initial namespace, where every owner is mapped
_FULL_RANGE = ((0, 0, 4294967295),)
_CAP_DAC_OVERRIDE = 1
_CAP_FOWNER = 3

R_OK, W_OK, X_OK = os.R_OK, os.W_OK, os.X_OK

Ranges = tuple[tuple[int, int, int], ...]


def _read_ranges(path: str) -> Ranges:
    try:
        with open(path) as f:
            return tuple((int(a), int(b), int(c)) for a, b, c in (line.split() for line in f if line.strip()))
    except (OSError, ValueError):
        return _FULL_RANGE


def _read_int(path: str, default: int) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return default


def _effective_caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def _maps(ranges: Ranges, ident: int) -> bool:
    return any(inside <= ident < inside + count for inside, _, count in ranges)


class UserNamespace:
    """What this process's user namespace maps, and which objects have owners it does not."""

    def __init__(self, uid_ranges: Ranges, gid_ranges: Ranges, overflow_uid: int = 65534,
                 overflow_gid: int = 65534, fowner: bool = False) -> None:
        self.uid_ranges = uid_ranges
        self.gid_ranges = gid_ranges
        self.overflow_uid = overflow_uid
        self.overflow_gid = overflow_gid
        #: holds CAP_FOWNER in its namespace (needed by the probe)
        self.fowner = fowner
        self.initial = uid_ranges == _FULL_RANGE and gid_ranges == _FULL_RANGE
        self._probed: dict[tuple[int, int, int], bool] = {}

    @classmethod
    def current(cls) -> UserNamespace:
        caps = _effective_caps()
        return cls(_read_ranges("/proc/self/uid_map"), _read_ranges("/proc/self/gid_map"),
                   _read_int("/proc/sys/kernel/overflowuid", 65534), _read_int("/proc/sys/kernel/overflowgid", 65534),
                   fowner=bool(caps & (1 << _CAP_FOWNER)) and bool(caps & (1 << _CAP_DAC_OVERRIDE)))

    def unmapped(self, dir_fd: int, path: bytes, st: os.stat_result) -> tuple[bool, bool] | None:
        """(uid unmapped, gid unmapped) for the object at ``path`` (at any depth) under ``dir_fd`` whose stat is
        ``st``, or None when both its ids are mapped (as far as can be told: see the module's doc)."""
        if self.initial:
            return None
        uid_suspect = st.st_uid == self.overflow_uid
        gid_suspect = st.st_gid == self.overflow_gid
        if not (uid_suspect or gid_suspect):
            return None
        uid_out = uid_suspect and not _maps(self.uid_ranges, st.st_uid)
        gid_out = gid_suspect and not _maps(self.gid_ranges, st.st_gid)
        if uid_out or gid_out:
            return uid_out, gid_out
        if not self.fowner:
            return None
        mode = st.st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISFIFO(mode):
            return (uid_suspect, gid_suspect) if self._probe(dir_fd, path, st) else None
        # Symlinks, devices, sockets: no probe leaves them untouched. An owner shown as the overflow id is taken
        # for an unmapped one: refusing a change is better than giving a copy another owner on disk.
        return uid_suspect, gid_suspect

    def _probe(self, dir_fd: int, path: bytes, st: os.stat_result) -> bool:
        key = (st.st_dev, st.st_ino, st.st_ctime_ns)
        known = self._probed.get(key)
        if known is not None:
            return known
        flags = os.O_RDONLY | os.O_NOATIME | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            with At(dir_fd, path) as (fd, name):
                os.close(os.open(name, flags, dir_fd=fd))
            outside = False
        except OSError as exc:
            # EPERM: O_NOATIME refused, no CAP_FOWNER over the owner; EACCES: no read access, no
            # CAP_DAC_OVERRIDE over it either.  Either way an id of the object is outside the namespace.
            outside = exc.errno in (errno.EPERM, errno.EACCES)
        if len(self._probed) > 4096:
            self._probed.clear()
        self._probed[key] = outside
        return outside


class Caller:
    """The process a request comes from: its ids, its umask, and its supplementary groups read when first
    needed."""

    __slots__ = ("uid", "gid", "pid", "umask", "_groups")

    def __init__(self, uid: int, gid: int, pid: int, groups: Sequence[int] | None = None, umask: int = 0) -> None:
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.umask = umask
        self._groups = frozenset(groups) if groups is not None else None

    @property
    def groups(self) -> frozenset[int]:
        if self._groups is None:
            groups = {self.gid}
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("Groups:"):
                            groups.update(int(g) for g in line.split()[1:])
                            break
            except (OSError, ValueError):
                pass
            self._groups = frozenset(groups)
        return self._groups


Unmapped = tuple[bool, bool]


def owns(caller: Caller, st: os.stat_result, unmapped: Unmapped) -> bool:
    return not unmapped[0] and caller.uid == st.st_uid


def permitted(caller: Caller, st: os.stat_result, unmapped: Unmapped, mask: int) -> bool:
    """The mode bits' answer for ``mask`` (R_OK/W_OK/X_OK bits), no capability applying."""
    mode = st.st_mode
    if owns(caller, st, unmapped):
        bits = mode >> 6
    elif not unmapped[1] and st.st_gid in caller.groups:
        bits = mode >> 3
    else:
        bits = mode
    return mask & ~bits & 0o7 == 0


def require(caller: Caller, st: os.stat_result, unmapped: Unmapped, mask: int) -> None:
    if not permitted(caller, st, unmapped, mask):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))


def require_owner(caller: Caller, st: os.stat_result, unmapped: Unmapped) -> None:
    if not owns(caller, st, unmapped):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))


def require_times(caller: Caller, st: os.stat_result, unmapped: Unmapped, times_ns: Sequence[int | None]) -> None:
    """utimensat(2): setting the current time needs ownership or write access, any other time ownership.
    (The FUSE request carries "now" as a time: one within a second of ours counts as "now".)"""
    if owns(caller, st, unmapped):
        return
    now = time.time_ns()
    if all(t is None or abs(t - now) < 1_000_000_000 for t in times_ns):
        require(caller, st, unmapped, W_OK)
    else:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))


def require_link_source(caller: Caller, st: os.stat_result, unmapped: Unmapped) -> None:
    """fs.protected_hardlinks (on by default): a link to someone else's file needs read and write access to it,
    and a plain file, neither setuid nor setgid-executable."""
    if _read_int("/proc/sys/fs/protected_hardlinks", 1) == 0 or owns(caller, st, unmapped):
        return
    mode = st.st_mode
    safe = (stat.S_ISREG(mode) and not mode & stat.S_ISUID
            and (mode & (stat.S_ISGID | stat.S_IXGRP)) != (stat.S_ISGID | stat.S_IXGRP)
            and permitted(caller, st, unmapped, R_OK | W_OK))
    if not safe:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))


def require_sticky(caller: Caller, dir_st: os.stat_result, dir_unmapped: Unmapped | None,
                   victim_st: os.stat_result, victim_unmapped: Unmapped) -> None:
    """Removing or replacing a name in a sticky directory: the caller must own the object or the directory
    (no capability applies to an object with an unmapped owner)."""
    if not dir_st.st_mode & stat.S_ISVTX:
        return
    if owns(caller, victim_st, victim_unmapped) or owns(caller, dir_st, dir_unmapped or (False, False)):
        return
    raise OSError(errno.EPERM, os.strerror(errno.EPERM))


__all__ = ["Caller", "Unmapped", "UserNamespace", "owns", "permitted", "require", "require_link_source",
           "require_owner", "require_sticky", "require_times"]

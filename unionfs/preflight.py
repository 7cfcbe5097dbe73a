"""Checks a MountSpec against the file system before anything is mounted or written.

Every problem is a :class:`MountError` with a one-line message; nothing on disk is created or changed until
all checks pass.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from .options import MountSpec


class MountError(Exception):
    """The mount cannot proceed; the message says why in one line."""


def _show(path: bytes) -> str:
    """A path as a message shows it."""
    return os.fsdecode(path)


def _inside(child: bytes, parent: bytes) -> bool:
    """Whether real path ``child`` is ``parent`` or lies below it."""
    return child == parent or child.startswith(parent.rstrip(b"/") + b"/")


def _check_dir(path: bytes, what: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"{what} {_show(path)}: no such directory") from None
    except PermissionError:
        raise MountError(f"{what} {_show(path)}: permission denied") from None
    except OSError as exc:
        raise MountError(f"{what} {_show(path)}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"{what} {_show(path)}: not a directory")
    if what != "mountpoint" and not os.access(path, os.R_OK | os.X_OK):
        raise MountError(f"{what} {_show(path)}: permission denied (the server must be able to read and search it)")
    return st


FUSE_DEVICE = "/dev/fuse"


#: where the kernel shows SELinux when it is enabled
SELINUX_FS = "/sys/fs/selinux"


def check_fuse_device(device: str = FUSE_DEVICE) -> None:
    """The FUSE device must exist and be usable by this user (mode 0666 on a standard system)."""
    try:
        st = os.stat(device)
    except FileNotFoundError:
        raise MountError(f"{device} does not exist: install fuse3 and load the fuse module (modprobe fuse)") from None
    if not os.access(device, os.R_OK | os.W_OK):
        raise MountError(
            f"{device} is mode {stat.S_IMODE(st.st_mode):04o} and not usable by uid {os.getuid()}; "
            f"a standard system ships it 0666: run `chmod 0666 {device}` as root"
        )


def check(spec: MountSpec, mountpoint: bytes) -> None:
    """Raise MountError for the first problem found."""
    check_fuse_device()
    if spec.context is not None and not os.path.exists(SELINUX_FS):
        raise MountError(f"context={spec.context}: SELinux is not enabled on this system, so the kernel cannot "
                         "label the mount; leave context= out")
    for lower in spec.lowers:
        _check_dir(lower, "lowerdir")
    layers = [("lowerdir", os.path.realpath(p)) for p in spec.lowers]
    if spec.upper is not None and spec.work is not None:
        upper_st = _check_dir(spec.upper, "upperdir")
        work_st = _check_dir(spec.work, "workdir")
        if upper_st.st_dev != work_st.st_dev:
            raise MountError(
                f"workdir {_show(spec.work)} must be on the same filesystem as upperdir {_show(spec.upper)}"
            )
        real_upper, real_work = os.path.realpath(spec.upper), os.path.realpath(spec.work)
        if _inside(real_upper, real_work) or _inside(real_work, real_upper):
            raise MountError(
                f"upperdir {_show(real_upper)} and workdir {_show(real_work)} must be separate directories, "
                "neither inside the other"
            )
        for what, real_lower in layers:
            for name, real in (("upperdir", real_upper), ("workdir", real_work)):
                if _inside(real, real_lower):
                    raise MountError(f"{name} {_show(real)} is inside {what} {_show(real_lower)}")
                if _inside(real_lower, real):
                    raise MountError(f"{what} {_show(real_lower)} is inside {name} {_show(real)}")
        if not spec.readonly and not os.access(spec.upper, os.W_OK | os.X_OK):
            raise MountError(f"upperdir {_show(spec.upper)}: not writable by this user")
        layers += [("upperdir", real_upper), ("workdir", real_work)]
    _check_dir(mountpoint, "mountpoint")
    real_mountpoint = os.path.realpath(mountpoint)
    for what, real in layers:
        if _inside(real_mountpoint, real):
            raise MountError(f"mountpoint {_show(mountpoint)} is inside {what} {_show(real)}")


class WorkdirLock:
    """An exclusive lock on workdir=, held by the server for the life of the mount."""

    def __init__(self, workdir: bytes) -> None:
        self.fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise MountError(f"workdir {_show(workdir)} is in use by another mount") from None
            raise

    @classmethod
    def adopt(cls, fd: int) -> WorkdirLock:
        """The lock held through ``fd``, a descriptor of the locked workdir passed by the process that took it."""
        lock = cls.__new__(cls)
        lock.fd = fd
        return lock

    def close(self) -> None:
        os.close(self.fd)

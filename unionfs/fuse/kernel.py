"""The FUSE mount itself, made without libfuse: the kernel is handed an open ``/dev/fuse``, and whoever reads
that descriptor serves the mount.

* mount(2) with ``fd=N`` when this process may mount (root, or root of a user namespace that owns its mount
  namespace): the descriptor is the one opened here;
* otherwise ``fusermount3 -o OPTIONS -- MOUNTPOINT``, the set-user-id helper of an ordinary user: it opens the
  device, mounts, and sends the descriptor back over the socket named by the environment variable
  ``_FUSE_COMMFD`` (SCM_RIGHTS), then exits.

Until a server answers the kernel's INIT request (queued at the mount), requests to the mount wait in the
kernel; they fail (ENOTCONN) only if the descriptor is closed first, which ends the connection.

This module imports neither pyfuse3 nor trio: ``unionfs mount`` mounts with it before it loads them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable, Iterator

from .. import _sys
from ..preflight import FUSE_DEVICE, MountError

FUSERMOUNT = "fusermount3"
#: the variable that tells fusermount3 which of its descriptors is the socket to send the device over
COMMFD_VAR = "_FUSE_COMMFD"

#: options the kernel takes in the mount data as they are (the FUSE driver's, and the security modules')
_KERNEL_OPTIONS = frozenset({"default_permissions", "allow_other"})
_KERNEL_VALUES = ("context=", "fscontext=", "defcontext=", "rootcontext=")
#: options that are mount(2) flags (``rw`` and ``atime``: the absence of one)
_FLAGS = {"ro": _sys.MS_RDONLY, "rw": 0, "noatime": _sys.MS_NOATIME, "atime": 0}
#: options that name the mount: its source and its type
_NAMES = ("fsname=", "subtype=")


def _unknown(opts: Iterable[str]) -> list[str]:
    return sorted(opt for opt in opts if opt not in _KERNEL_OPTIONS and opt not in _FLAGS
                  and opt != "allow_root" and not opt.startswith(_KERNEL_VALUES + _NAMES))


def can_mount(options: Iterable[str]) -> bool:
    """Whether :func:`mount_fuse` can make a mount with ``options``: not with ``auto_unmount``, nor with an
    option it does not know (which it would otherwise drop unseen; libfuse's mount, slower to start, takes
    them)."""
    opts = set(options)
    return "auto_unmount" not in opts and not _unknown(opts)


class Refused(MountError):
    """The kernel or fusermount3 refused the mount; nothing is mounted."""


def mount_fuse(mountpoint: str, options: Iterable[str]) -> int:
    """Mount FUSE on ``mountpoint`` (an absolute path) with ``options`` (as :func:`unionfs.fuse.prepare.fuse_options`
    gives them: ``fsname=``, ``subtype=``, ``allow_other``, ``allow_root``, ``default_permissions``, ``ro``,
    ``noatime``/``atime``); returns the open ``/dev/fuse`` descriptor (close-on-exec) the server must read.

    ``allow_root`` becomes ``allow_other`` in the kernel: the server itself turns away everyone but root and the
    owner (libfuse's allow_root, given to the session). ``auto_unmount`` cannot be had here: it needs fusermount3
    to stay alive beside the server, which only libfuse arranges (see :func:`can_mount`).

    :class:`Refused` (a MountError saying why in one line) when the mount is refused."""
    opts = set(options)
    if not can_mount(opts):
        raise ValueError(f"cannot mount with the FUSE options {', '.join(sorted(opts))} without libfuse")
    try:
        fd = _mount_syscall(mountpoint, opts)
    except PermissionError:  # not allowed to mount here: the helper may be
        fd = _mount_fusermount(mountpoint, opts)
    os.set_inheritable(fd, False)
    return fd


def _named(opts: set[str], key: str, default: str) -> str:
    for opt in opts:
        if opt.startswith(key + "="):
            return opt[len(key) + 1 :]
    return default


def kernel_options(opts: set[str]) -> list[str]:
    """What of ``opts`` goes into the kernel's mount data (after ``fd=``, ``rootmode=``, ``user_id=``,
    ``group_id=``)."""
    kernel = {"allow_other" if opt == "allow_root" else opt for opt in opts
              if opt in _KERNEL_OPTIONS or opt == "allow_root" or opt.startswith(_KERNEL_VALUES)}
    return sorted(kernel)


def _mount_syscall(mountpoint: str, opts: set[str]) -> int:
    """mount(2) on a /dev/fuse opened here; PermissionError when this process may not mount."""
    flags = _sys.MS_NOSUID | _sys.MS_NODEV
    for opt in opts:
        flags |= _FLAGS.get(opt, 0)
    try:
        root = os.stat(mountpoint)
    except OSError as exc:
        raise Refused(f"mounting {mountpoint} failed: {exc.strerror}") from None
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise Refused(f"mounting {mountpoint} failed: cannot open {FUSE_DEVICE}: {exc.strerror}") from None
    data = ",".join([f"fd={fd}", f"rootmode={stat.S_IFMT(root.st_mode):o}", f"user_id={os.getuid()}",
                     f"group_id={os.getgid()}", *kernel_options(opts)])
    subtype = _named(opts, "subtype", "")
    fstype = "fuse." + subtype if subtype else "fuse"
    source = _named(opts, "fsname", subtype or FUSE_DEVICE)
    try:
        _sys.mount(os.fsencode(source), os.fsencode(mountpoint), fstype.encode(), flags, data.encode())
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EPERM:
            raise PermissionError(exc.errno, exc.strerror, mountpoint) from None
        raise Refused(f"mounting {mountpoint} failed: fuse: mount failed: {exc.strerror}") from None
    return fd


def _escaped(value: str) -> str:
    """A value inside fusermount3's comma-separated options: a backslash escapes a comma or a backslash."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def fusermount_options(opts: set[str]) -> str:
    """The ``-o`` argument of fusermount3 for ``opts``: the flags by name, then the options for the kernel, then
    the source and the subtype (which fusermount3 turns into the type ``fuse.SUBTYPE``)."""
    words = ["ro" if "ro" in opts else "rw", "nosuid", "nodev"]
    if "noatime" in opts:
        words.append("noatime")
    words += [_escaped(opt) for opt in kernel_options(opts)]  # (context="...:s0:c1,c2" has a comma)
    for key in ("fsname", "subtype"):
        value = _named(opts, key, "")
        if value:
            words.append(f"{key}={_escaped(value)}")
    return ",".join(words)


@contextlib.contextmanager
def _captured_fd() -> Iterator[list[int]]:
    """A memory file to hand a child process as its stderr; yields [fd]; closed when the block ends."""
    fd = os.memfd_create("unionfs-fusermount-stderr", os.MFD_CLOEXEC)
    try:
        yield [fd]
    finally:
        os.close(fd)


def _read_back(fd: int) -> list[str]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode(errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _spawn(argv: list[str], stderr: int, env: dict[str, str] | None = None) -> int:
    """Run ``argv`` (looked up on PATH) with ``stderr`` as its fd 2; its exit status (128 + N for signal N)."""
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ if env is None else env,
                              file_actions=[(os.POSIX_SPAWN_DUP2, stderr, 2)])
    except OSError as exc:
        raise Refused(f"cannot run {argv[0]}: {exc.strerror}") from None
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _mount_fusermount(mountpoint: str, opts: set[str]) -> int:
    """``fusermount3 -o OPTS -- MOUNTPOINT``, receiving the device over a socket pair (the protocol libfuse uses
    with its helper). Its explanation of a refusal (on its stderr) is the message."""
    import array
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        theirs.set_inheritable(True)
        env = dict(os.environ)
        env[COMMFD_VAR] = str(theirs.fileno())
        with _captured_fd() as (err,):
            status = _spawn([FUSERMOUNT, "-o", fusermount_options(opts), "--", mountpoint], err, env)
            said = _read_back(err)
        theirs.close()  # (fusermount3 has exited: what it sent waits in the socket)
        fds = array.array("i")
        _, ancillary, _, _ = ours.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    finally:
        ours.close()
        theirs.close()
    if status != 0 or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        why = "; ".join(said) or f"{FUSERMOUNT} exited with status {status}"
        raise Refused(f"mounting {mountpoint} failed: {why}")
    if said:  # (what it said about a mount made anyway goes where it was going)
        os.write(2, ("\n".join(said) + "\n").encode())
    return fds[0]


def connected(fd: int) -> bool:
    """Whether the FUSE connection of device descriptor ``fd`` is still up: once the file system is unmounted
    (or the connection aborted through /sys/fs/fuse/connections), the device reports an error."""
    import select

    poller = select.poll()
    poller.register(fd, 0)
    return not any(revents & select.POLLERR for _, revents in poller.poll(0))


def detach(mountpoint: str) -> None:
    """Detach (lazily unmount) the FUSE mount on ``mountpoint``: umount2(MNT_DETACH) when this process may, else
    ``fusermount3 -u -z``. Errors are ignored (what is gone is gone); the caller logs whether it still sits
    there."""
    try:
        _sys.umount2(os.fsencode(mountpoint), _sys.MNT_DETACH)
        return
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EACCES):
            return
    with contextlib.suppress(MountError), _captured_fd() as (err,):
        _spawn([FUSERMOUNT, "-u", "-q", "-z", "--", mountpoint], err)

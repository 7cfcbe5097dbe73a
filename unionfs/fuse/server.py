"""Mount, serve and unmount: daemonizing, readiness, signals, and the pyfuse3 option set.

:func:`mount` is the one way to mount a :class:`MountSpec`; ``unionfs mount`` and ``unionfs snapshot mount``
both call it. Importing this module loads pyfuse3 and trio: the commands import it only to mount or unmount.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import logging.handlers
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pyfuse3
import trio

from .. import mountinfo, prescan
from ..copyup import Workdir
from ..layers import Stack
from ..options import MountSpec
from ..preflight import MountError, WorkdirLock, check
from ..union import Union, default_format
from . import errors
from .operations import Operations

log = logging.getLogger("unionfs")


def runtime_dirs() -> list[str]:
    """Where servers leave their pid files (so ``unionfs umount`` can wait for the server to exit), in order
    of preference: the first one writable is used (root in a user namespace cannot write /run)."""
    dirs = ["/run/unionfs"] if os.geteuid() == 0 else []
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        dirs.append(os.path.join(base, "unionfs"))
    dirs.append(f"/tmp/unionfs-{os.getuid()}")
    return dirs


def pid_files(mountpoint: str) -> list[str]:
    return _pid_paths(os.path.realpath(mountpoint))


def _pid_paths(real_mountpoint: str) -> list[str]:
    digest = hashlib.sha256(os.fsencode(real_mountpoint)).hexdigest()[:24]
    return [os.path.join(d, digest + ".pid") for d in runtime_dirs()]


def pid_file(mountpoint: str) -> str:
    """The pid file of the server of ``mountpoint``: the one that exists, else where it would be written."""
    candidates = pid_files(mountpoint)
    return next((p for p in candidates if os.path.exists(p)), candidates[0])


def fuse_options(spec: MountSpec) -> set[str]:
    opts = {"fsname=" + spec.fsname, "subtype=unionfs", "default_permissions"}
    if spec.allow_root:
        opts.add("allow_root")
    elif spec.allow_other or (spec.allow_other is None and os.geteuid() == 0):
        opts.add("allow_other")
    if spec.auto_unmount:
        opts.add("auto_unmount")
    opts.add("atime" if spec.atime else "noatime")
    if not spec.writable:
        opts.add("ro")
    if spec.context is not None:
        opts.add("context=" + spec.context)
    return opts


def _prescan_progress(paths: int) -> None:
    log.info("prescan: %d lower paths so far", paths)


@contextlib.contextmanager
def _prescan_display() -> Iterator[Callable[[int], None]]:
    """A progress display of ``-o prescan`` on the terminal (stderr), gone when the scan is done."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("prescan: {task.completed:,.0f} lower paths"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("prescan", total=None)
        yield lambda paths: bar.update(task, completed=paths)


class Mount:
    """Everything one mount holds open: the lock, the layers, the workdir, the core."""

    def __init__(self, spec: MountSpec, mountpoint: str,
                 progress: Callable[[int], None] = _prescan_progress) -> None:
        """``progress``: told the number of lower paths scanned so far, now and then, by ``-o prescan``."""
        self.spec = spec
        self.mountpoint = mountpoint
        mp = os.fsencode(os.path.abspath(mountpoint))
        check(spec, mp)
        self.lock: WorkdirLock | None = None
        self.stale = 0
        self.work: Workdir | None = None
        writable = spec.writable
        if writable:
            assert spec.work is not None
            self.lock = WorkdirLock(spec.work)
        try:
            if writable:
                assert spec.work is not None
                self.work = Workdir(spec.work)
                self.stale = self.work.clean()
                fmt = default_format(self.work.path, spec.userxattr)
            else:
                fmt = default_format(None, spec.userxattr)
            started = time.monotonic()
            lowers = prescan.scanner(progress) if spec.prescan else None
            self.stack = Stack(spec.layer_dirs(), writable, fmt, lowers, aufs=spec.aufs_markers)
            self.prescanned: tuple[int, float] | None = None
            if isinstance(self.stack.lowers, prescan.Prescanned):
                self.prescanned = (len(self.stack.lowers), time.monotonic() - started)
        except BaseException:
            self.close()
            raise
        self.union = Union(self.stack, self.work, ownership=spec.ownership, durable=spec.fsync,
                           xattrs=spec.xattrs)

    def describe(self) -> str:
        return (f"{self.mountpoint}: {len(self.stack.layers)} layers "
                f"({'writable' if self.stack.writable else 'read-only'}), "
                f"markers in {self.stack.fmt.value}.overlay.* xattrs"
                + (f"; prescanned {self.prescanned[0]} lower paths in {self.prescanned[1]:.2f}s"
                   if self.prescanned else ""))

    def close(self) -> None:
        if getattr(self, "stack", None) is not None:
            self.stack.close()
        if self.work is not None:
            self.work.close()
        if self.lock is not None:
            self.lock.close()


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def _serve(terminated: list[bool], mask: set[int | signal.Signals]) -> None:
    async with trio.open_nursery() as nursery:

        async def on_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.open_signal_receiver(*_SIGNALS) as signals:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # what arrived meanwhile is delivered now
                task_status.started()
                async for _sig in signals:
                    terminated.append(True)
                    pyfuse3.terminate()
                    return

        await nursery.start(on_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """What is written to file descriptor 2 inside the block (by libfuse, and by the fusermount3 it runs, which
    inherits it), as lines in the list yielded, filled when the block ends; fd 2 is put back then. A background
    server's stderr is /dev/null, so that fusermount3's explanation of a refusal would be lost otherwise."""
    lines: list[str] = []
    sys.stderr.flush()
    capture = os.memfd_create("unionfs-mount-stderr", os.MFD_CLOEXEC)
    saved = os.dup(2)
    os.dup2(capture, 2)
    try:
        yield lines
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.lseek(capture, 0, os.SEEK_SET)
        with os.fdopen(capture, "rb") as f:
            lines += f.read(65536).decode(errors="replace").splitlines()


def serve(prepared: Mount) -> None:
    """Mount and serve until unmounted or signalled; always leaves the mountpoint clean."""
    ops = Operations(prepared.union, prepared.spec.timeout)
    errors.set_debug(prepared.spec.debug)
    ops.enable_acl = prepared.spec.acl  # (-o noacl: the kernel checks the mode bits alone)
    # A signal between the mount and the handler's installation must not kill us with the mount left behind.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        with _stderr_captured() as said:
            pyfuse3.init(ops, prepared.mountpoint, fuse_options(prepared.spec))
    except RuntimeError as exc:  # the kernel or fusermount3 refused the mount
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        prepared.close()
        why = "; ".join(line.strip() for line in said if line.strip()) or str(exc)
        raise MountError(f"mounting {prepared.mountpoint} failed: {why}") from None
    if said:  # (what was written meanwhile about a mount made anyway goes where it was going)
        os.write(2, ("\n".join(said) + "\n").encode())
    terminated: list[bool] = []
    log.info("mounted %s", prepared.describe())
    try:
        _report_ready()
        trio.run(_serve, terminated, mask)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        pyfuse3.close(unmount=bool(terminated))
        prepared.close()
    log.info("unmounted %s", prepared.mountpoint)


_ready_fd: int | None = None


def _report_ready() -> None:
    """Tell a waiting parent process that the mount is in place."""
    global _ready_fd
    if _ready_fd is not None:
        os.write(_ready_fd, b"ok\n")
        os.close(_ready_fd)
        _ready_fd = None


#: the mode a new log file is created with
LOG_MODE = 0o600


def setup_logging(foreground: bool, debug: bool, log_file: str | None) -> None:
    """Send the log to ``log_file``, else to stderr in the foreground, else to syslog."""
    level = logging.DEBUG if debug else logging.INFO
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    fmt = logging.Formatter("%(asctime)s unionfs[%(process)d] %(levelname)s %(message)s")
    if log_file:
        try:
            # Created private (0600); the mode of a file that exists is left as it is.
            os.close(os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_MODE))
            handler: logging.Handler = logging.FileHandler(log_file)
        except OSError as exc:
            raise MountError(f"cannot open the log file {log_file}: {exc.strerror}") from None
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        fmt = logging.Formatter("unionfs[%(process)d]: %(levelname)s %(message)s")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def mount(spec: MountSpec, mountpoint: str | os.PathLike[str], *, foreground: bool = False,
          log_file: str | None = None) -> None:
    """Mount ``spec`` on ``mountpoint`` and serve it: in this process until it is unmounted or signalled
    (``foreground``), else in a background process, returning once the mount is in place.

    MountError when the mount is refused (nothing on disk has changed then) or fails; ``log_file``, when
    given, receives the server's log (appended)."""
    global _ready_fd
    mountpoint = os.path.abspath(mountpoint)  # the server changes to / before mounting
    if log_file:
        log_file = os.path.abspath(log_file)  # (likewise)
    setup_logging(True, spec.debug, log_file)
    if not foreground and not spec.debug and not log_file:  # (the caller's stderr: problems only)
        logging.getLogger().setLevel(logging.WARNING)
    caller_umask = os.umask(0)  # the server creates files with exactly the modes it is asked for
    try:
        if spec.prescan and foreground and sys.stderr.isatty():
            with _prescan_display() as progress:
                prepared = Mount(spec, mountpoint, progress)
        else:
            prepared = Mount(spec, mountpoint)
        if foreground:
            with _pidfile(mountpoint):
                serve(prepared)
            return
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the server
            os.close(rfd)
            code = 0
            try:
                os.setsid()
                _detach_stdio()
                setup_logging(False, spec.debug, log_file)
                if prepared.stale:
                    log.info("removed %d stale entries from the work directory", prepared.stale)
                _ready_fd = wfd
                with _pidfile(mountpoint):
                    serve(prepared)
            except BaseException as exc:  # report to the parent if it still waits, then die
                code = 1
                if _ready_fd is not None:
                    with contextlib.suppress(OSError):
                        os.write(_ready_fd, f"error: {exc}\n".encode())
                log.exception("server failed")
            finally:
                os._exit(code)
    finally:
        os.umask(caller_umask)  # (in the parent: the server has its own)
    os.close(wfd)
    prepared.close()
    msg = _read_report(rfd)
    if msg.startswith("ok"):
        return
    os.waitpid(pid, 0)
    raise MountError(msg.strip().removeprefix("error: ") or "the server exited before the mount was ready")


def _read_report(fd: int) -> str:
    """What the server wrote to the readiness pipe: one line, or nothing when it died first."""
    chunks = []
    while True:
        b = os.read(fd, 4096)
        if not b:
            break
        chunks.append(b)
        if b.endswith(b"\n"):
            break
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.chdir("/")


@contextlib.contextmanager
def _pidfile(mountpoint: str) -> Iterator[None]:
    path = ""
    for candidate in pid_files(mountpoint):
        try:
            os.makedirs(os.path.dirname(candidate), mode=0o700, exist_ok=True)
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        path = candidate
        break
    try:
        yield
    finally:
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)


FSTYPE = b"fuse.unionfs"


def resolve_mountpoint(mountpoint: str) -> str:
    """``mountpoint`` with symbolic links resolved, without looking into a mount on it: a lookup there would
    wait for its server, which may be stopped or stuck. The parent directories are resolved, and the last
    component is stat'ed only when no mount sits on it (a symbolic link cannot be a mountpoint)."""
    path = os.path.abspath(mountpoint)
    points = {os.fsdecode(m.mount_point) for m in mountinfo.read()}
    for _ in range(40):  # (the kernel's limit of symbolic links followed in one lookup)
        parent, name = os.path.split(path)
        candidate = os.path.join(os.path.realpath(parent), name)
        if candidate in points or not os.path.islink(candidate):
            return candidate
        path = os.path.normpath(os.path.join(os.path.dirname(candidate), os.readlink(candidate)))
    raise MountError(f"{mountpoint}: too many levels of symbolic links")


def mount_on(mountpoint: str) -> mountinfo.MountEntry | None:
    """The visible mount on ``mountpoint`` (symbolic links resolved), or None."""
    target = os.fsencode(resolve_mountpoint(mountpoint))
    found = [m for m in mountinfo.read() if m.mount_point == target]
    return found[-1] if found else None


def unmount(mountpoint: str, timeout: float = 30.0, lazy: bool = False) -> None:
    """Unmount the unionfs mount on ``mountpoint`` and wait for the server to finish, all within ``timeout``
    seconds whatever the server does (a stopped server cannot answer the unmount). ``lazy``: detach the mount
    at once, even when it is busy or its server does not answer, and do not wait for the server (it exits once
    the last file open in the mount is closed).

    MountError when nothing or something else than unionfs is mounted there, or when the time is up."""
    deadline = time.monotonic() + timeout
    target = resolve_mountpoint(mountpoint)
    found = mount_on(target)
    if found is None:
        raise MountError(f"{mountpoint}: not mounted")
    if found.fstype != FSTYPE:
        raise MountError(f"{mountpoint} is a {os.fsdecode(found.fstype)} mount, not unionfs")
    pid = _read_pid(target)
    pidfd = None
    if pid is not None and not lazy:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = None
    try:
        _fusermount_unmount(mountpoint, target, lazy, deadline, timeout)
        while pidfd is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MountError(f"the server (pid {pid}) did not exit within {timeout:g} s")
            ready, _, _ = select.select([pidfd], [], [], left)
            if ready:
                break
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _fusermount_unmount(mountpoint: str, target: str, lazy: bool, deadline: float, timeout: float) -> None:
    """``fusermount3 -u [-z] TARGET``, given up (and killed) at ``deadline``: the unmount waits for the server."""
    proc = subprocess.Popen(["fusermount3", "-u", *(["-z"] if lazy else []), target],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        proc.kill()  # (it may still be in the unmount, which the kernel completes once the server answers)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.5)
        raise MountError(f"{mountpoint}: the server does not answer; not unmounted within {timeout:g} s "
                         f"(`unionfs umount --lazy {mountpoint}` detaches it now)") from None
    if proc.returncode != 0:
        msg = err.strip().splitlines()[-1] if err.strip() else "fusermount3 failed"
        raise MountError(msg.removeprefix("fusermount3: "))


def _read_pid(real_mountpoint: str) -> int | None:
    for path in _pid_paths(real_mountpoint):
        try:
            with open(path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return None

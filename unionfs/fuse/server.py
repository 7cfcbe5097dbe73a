"""Mount, serve and unmount: the mount API, daemonizing, readiness, pid files and logging.

:func:`mount` is the one way to mount a :class:`MountSpec`; ``unionfs mount`` and ``unionfs snapshot mount``
both call it. In the background (the default) the command makes the FUSE mount itself
(:mod:`unionfs.fuse.kernel`) and forks the server, which loads pyfuse3 and trio and serves the mounted device:
the command returns once the mount is in place, without waiting for those imports (requests made meanwhile
wait in the kernel). This module does not load pyfuse3 or trio at its import; :mod:`unionfs.fuse.serve` does.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from .. import _sys, mountinfo
from ..options import MountSpec, OptionError, parse, render
from ..preflight import MountError, WorkdirLock
from . import kernel, native, spare
from .prepare import LOG_TABLE_SIGNAL, SIGNALS, prescan_display
from .prepare import Mount as Mount
from .prepare import fuse_options as fuse_options

log = logging.getLogger("unionfs")


def __getattr__(name: str) -> Any:
    """``pyfuse3`` and ``trio``, as attributes of this module, load when first asked for: the server uses them
    (:mod:`unionfs.fuse.serve`), the command that mounts must not wait for them."""
    if name in ("pyfuse3", "trio"):
        return importlib.import_module(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    digest = _sys.short_digest(os.fsencode(real_mountpoint))
    return [os.path.join(d, digest + ".pid") for d in runtime_dirs()]


def pid_file(mountpoint: str) -> str:
    """The pid file of the server of ``mountpoint``: the one that exists, else where it would be written."""
    candidates = pid_files(mountpoint)
    return next((p for p in candidates if os.path.exists(p)), candidates[0])


#: the mode a new log file is created with
LOG_MODE = 0o600


def setup_logging(foreground: bool, debug: bool, log_file: str | None) -> None:
    """Send the log to ``log_file``, else to stderr in the foreground, else to syslog."""
    level = logging.DEBUG if debug else logging.INFO
    root = logging.getLogger()
    for old in root.handlers:  # (closed: a server forked by a spare must not keep the first server's log open)
        old.close()
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
        from logging.handlers import SysLogHandler  # (only here: it loads socket, pickle, threading...)

        handler = SysLogHandler(address="/dev/log")
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
    given, receives the server's log (appended).

    In the background this process makes the FUSE mount (:func:`unionfs.fuse.kernel.mount_fuse`) before it
    forks the server, and returns as soon as the server has its pid file: pyfuse3 and trio, slow to import,
    load in the server only, while the kernel holds the first requests until the server answers. Two cases
    keep libfuse's own mount, made by the server: the foreground (``-f``, ``-d``), and ``auto_unmount``,
    which needs the fusermount3 that libfuse starts to stay alive beside the server (and any FUSE option
    :func:`unionfs.fuse.kernel.can_mount` does not know)."""
    mountpoint = os.path.abspath(mountpoint)  # the server changes to / before serving
    if log_file:
        log_file = os.path.abspath(log_file)  # (likewise)
    setup_logging(True, spec.debug, log_file)
    if not foreground and not spec.debug and not log_file:  # (the caller's stderr: problems only)
        logging.getLogger().setLevel(logging.WARNING)
    caller_umask = os.umask(0)  # the server creates files with exactly the modes it is asked for
    # (until the server's handler is in place, the signal that asks it for its table must not end it)
    caller_log_signal = signal.signal(LOG_TABLE_SIGNAL, signal.SIG_IGN)
    # No garbage collection while the mount is made and the server loads pyfuse3 and trio (their import makes
    # many objects and no garbage: collecting meanwhile costs ~6 ms of the start); serve() turns it on again,
    # as does the end of this call in the caller.
    collecting = gc.isenabled()
    gc.disable()
    try:
        if spec.prescan and foreground and sys.stderr.isatty():
            with prescan_display() as progress:
                prepared = Mount(spec, mountpoint, progress)
        else:
            prepared = Mount(spec, mountpoint)
        if foreground:
            native.prepare(spec)
            from .serve import serve

            with _pidfile(pid_files(mountpoint)):
                serve(prepared)
            return
        if kernel.can_mount(fuse_options(spec)):
            _mount_then_serve(prepared, log_file)
        else:  # (auto_unmount)
            _serve_in_background(prepared, log_file)
    finally:
        os.umask(caller_umask)  # (in the parent: the server has its own)
        signal.signal(LOG_TABLE_SIGNAL, caller_log_signal)
        if collecting:
            gc.enable()


def _serve_in_background(prepared: Mount, log_file: str | None) -> None:
    """libfuse mounts, in the forked server, which reports back once the mount is in place."""
    spec, mountpoint = prepared.spec, prepared.mountpoint
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server
        os.close(rfd)
        code = 0
        report = [wfd]

        def ready() -> None:
            os.write(wfd, b"ok\n")
            os.close(report.pop())

        try:
            os.setsid()
            _detach_stdio()
            setup_logging(False, spec.debug, log_file)
            if prepared.stale:
                log.info("removed %d stale entries from the work directory", prepared.stale)
            native.prepare(spec)
            from .serve import serve

            with _pidfile(pid_files(mountpoint)):
                serve(prepared, ready)
        except BaseException as exc:  # report to the parent if it still waits, then die
            code = 1
            if report:
                with contextlib.suppress(OSError):
                    os.write(wfd, f"error: {exc}\n".encode())
            log.exception("server failed")
        finally:
            os._exit(code)
    os.close(wfd)
    prepared.close()
    msg = _read_report(rfd)
    if msg.startswith("ok"):
        return
    os.waitpid(pid, 0)
    raise MountError(msg.strip().removeprefix("error: ") or "the server exited before the mount was ready")


def _mount_then_serve(prepared: Mount, log_file: str | None) -> None:
    """Mount here, then fork the server, which serves the device once it has loaded pyfuse3.

    The signals that end a server are blocked from before the mount until the server's handlers are in place
    (in the server) or the server has reported (here): neither process may die of one with the mount left
    behind and nobody to serve or remove it."""
    spec, mountpoint = prepared.spec, prepared.mountpoint
    pid_paths = pid_files(mountpoint)  # (before the mount: resolving the path then would wait for the server)
    request = _spare_request(prepared, log_file, pid_paths)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        try:
            device = kernel.mount_fuse(mountpoint, fuse_options(spec))
        except BaseException:
            prepared.close()
            raise
        if request is not None:
            try:
                handed = _handed_to_spare(prepared, device, request)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(device)
                kernel.detach(mountpoint)
                prepared.close()
                raise
            if handed:
                return
        rfd = wfd = -1
        try:
            rfd, wfd = os.pipe()
            pid = os.fork()
        except BaseException:
            for fd in (rfd, wfd, device):
                if fd >= 0:
                    os.close(fd)
            kernel.detach(mountpoint)
            prepared.close()
            raise
        if pid == 0:  # the server
            os.close(rfd)
            _server(prepared, device, wfd, mask, log_file, pid_paths)
        os.close(wfd)
        os.close(device)
        prepared.close()
        msg = _read_report(rfd)
        if msg.startswith("ok"):
            return
        os.waitpid(pid, 0)
        kernel.detach(mountpoint)  # (the server did not start: nobody serves the mount)
        raise MountError(msg.strip().removeprefix("error: ") or "the server exited before it started")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _server(prepared: Mount, device: int, report: int, mask: set[int | signal.Signals],
            log_file: str | None, pid_paths: list[str]) -> None:
    """The forked server of :func:`_mount_then_serve`: reports to the parent once its pid file is written (the
    mount is in place already), then loads pyfuse3 and serves ``device``; never returns. If it fails before it
    serves, it detaches the mount, so that no mount without a server stays behind, and logs why."""
    spec, mountpoint = prepared.spec, prepared.mountpoint
    code = 0
    serving: list[bool] = []  # (set once pyfuse3 has the device and the loop starts)
    try:
        os.setsid()
        _detach_stdio()  # (first: whoever reads the command's output sees its end once the command exits)
        with _pidfile(pid_paths):  # (removed last: `unionfs umount` waits for the server while it exists)
            os.write(report, b"ok\n")
            os.close(report)
            report = -1
            try:
                setup_logging(False, spec.debug, log_file)
                if prepared.stale:
                    log.info("removed %d stale entries from the work directory", prepared.stale)
                loaded = native.prepare(spec)
                from .serve import serve

                if spec.spare is not None:
                    try:
                        spare.start(spare.socket_path(runtime_dirs(), native.spare_kind(loaded)), spec.spare,
                                    lambda: _close_mount(prepared, device), _serve_request)
                    except Exception as exc:  # (no spare: this mount is served all the same)
                        log.warning("could not start a spare server: %s", exc)
                serve(prepared, lambda: serving.append(True), device=device, mask=mask)
            except BaseException:
                code = 1
                log.exception("server failed")
                if not serving:
                    with contextlib.suppress(OSError):
                        os.close(device)
                    kernel.detach(mountpoint)
                    log.error("%s: detached the mount, which nobody serves", mountpoint)
    except BaseException as exc:
        code = 1
        if report >= 0:  # the parent still waits: it reports, and removes the mount
            with contextlib.suppress(OSError):
                os.write(report, f"error: {exc}\n".encode())
    finally:
        os._exit(code)


def _spare_request(prepared: Mount, log_file: str | None, pid_paths: list[str]) -> dict[str, object] | None:
    """What a spare's server needs to serve this mount (``-o spare``), or None when no spare is to be asked:
    without the option, and with ``-o prescan`` (a spare's server builds the mount's table again: the command's
    one would be wasted)."""
    spec = prepared.spec
    if spec.spare is None or spec.prescan:
        return None
    try:
        options = render(spec)
    except OptionError:  # (a spec that no option string gives back: served as without the option)
        return None
    return {"options": options, "mountpoint": prepared.mountpoint, "log_file": log_file, "argv": sys.argv,
            "pid_paths": pid_paths}


def _handed_to_spare(prepared: Mount, device: int, request: dict[str, object]) -> bool:
    """Whether a spare server took the mount: then it serves it, and this process has nothing more to do.
    MountError when the spare's server could not start (the caller detaches the mount then)."""
    lock = prepared.lock
    try:
        handed = spare.hand_over(spare.socket_path(runtime_dirs(), native.wanted_kind(prepared.spec)), request,
                                 [device] + ([lock.fd] if lock is not None else []))
    except spare.HandOverFailed as exc:
        raise MountError(str(exc)) from None
    if handed:
        os.close(device)
        prepared.close()
    return handed


def _close_mount(prepared: Mount, device: int) -> None:
    """What a spare closes of the server it was forked from: its mount's files, lock and device."""
    prepared.close()
    os.close(device)


def _serve_request(request: dict[str, object], fds: list[int], conn: socket.socket) -> None:
    """In a child of a spare: serve the mount a command handed over (``fds``: the mounted device, and the
    workdir lock); answers on ``conn`` ("ok" once the pid file is written, or "error: WHY"); never returns."""
    from .serve import serve

    mountpoint = str(request["mountpoint"])
    log_file = request["log_file"]
    pid_paths = [str(p) for p in request["pid_paths"]]  # type: ignore[attr-defined]
    device = fds[0]
    os.umask(0)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    serving: list[bool] = []
    try:
        spec = parse([str(request["options"])])
        setup_logging(False, spec.debug, str(log_file) if log_file else None)
        lock = WorkdirLock.adopt(fds[1]) if len(fds) > 1 else None
        prepared = Mount(spec, mountpoint, checked=True, lock=lock)
        native.prepare(spec)  # (pyfuse3 is loaded: the shim is there when the spare's first server loaded it)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            conn.send(f"error: {exc}".encode())
        raise
    import setproctitle

    setproctitle.setproctitle(" ".join(str(a) for a in request.get("argv") or ["unionfs", mountpoint]))  # type: ignore[attr-defined]
    _sys.set_process_name(b"unionfs")
    with _pidfile(pid_paths):
        conn.send(b"ok")
        conn.close()
        log.info("serving %s, handed over by its command", mountpoint)
        try:
            serve(prepared, lambda: serving.append(True), device=device, mask=mask)
        except BaseException:
            if not serving:
                kernel.detach(mountpoint)
                log.error("%s: detached the mount, which nobody serves", mountpoint)
            raise


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
def _pidfile(candidates: list[str]) -> Iterator[None]:
    """This process's pid in the first of ``candidates`` (:func:`pid_files`) that can be written, for the time of
    the block. (The candidates come from the caller: once the mountpoint is mounted, resolving its path would
    wait for the server.)"""
    path = ""
    for candidate in candidates:
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
            with contextlib.suppress(OSError, ValueError):
                with open(path) as f:  # (only this process's: another server may have written it since)
                    mine = int(f.read().strip() or 0) == os.getpid()
                if mine:
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
    import subprocess

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

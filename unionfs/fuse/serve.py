"""Serve a prepared mount with pyfuse3 and trio until it is unmounted or the server is signalled.

Two ways in: libfuse mounts (:func:`serve` without ``device``: pyfuse3.init on the mountpoint; used in the
foreground and for ``auto_unmount``), or the mount is already made (by :mod:`unionfs.fuse.kernel`) and the
server reads the device it was handed (``device``: pyfuse3.init on ``/dev/fd/N``, which libfuse >= 3.3 takes as
that descriptor and does not mount). Either way SIGTERM, SIGINT and SIGHUP unmount and end the server, and an
unmount from outside (``fusermount3 -u``, ``unionfs umount``) ends it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator

import pyfuse3
import trio

from ..preflight import MountError
from . import errors, kernel, native
from .operations import Operations
from .prepare import LOG_TABLE_SIGNAL, SIGNALS, Mount, fuse_options

log = logging.getLogger("unionfs")


@dataclasses.dataclass(frozen=True)
class OpenFileLimit:
    """The open-file limits in force after :func:`raise_open_file_limit`, and what to log about them."""

    soft: int
    hard: int
    message: str
    level: int = logging.INFO

    def report(self) -> None:
        log.log(self.level, "%s", self.message)


def raise_open_file_limit() -> OpenFileLimit:
    """Raise this process's soft limit of open files (RLIMIT_NOFILE) to its hard limit; returns the limits in
    force afterwards, with the line to log about them (logged by the caller once the mount is made: a refused
    one says that alone).

    Every file open through the mount holds a descriptor in the server, and every layer is reached through
    directory descriptors, so the soft limit (often 1024) would be reached long before the client's. Where the
    limit is reached all the same, the request fails with EMFILE (or ENFILE for the system's table), which the
    error boundary hands to the client as it is. Called when the server starts serving (before the mount
    appears, so that no client finds the mount with the old limit), not before: a spare
    (:mod:`unionfs.fuse.spare`) must keep the limits of the commands it serves, which are part of its key; the
    server it starts raises its own."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return OpenFileLimit(soft, hard, f"open-file limit: {_shown_limit(hard)}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        return OpenFileLimit(soft, hard, f"open-file limit: {_shown_limit(soft)}; could not raise it to "
                             f"{_shown_limit(hard)}: {exc}", logging.WARNING)
    return OpenFileLimit(hard, hard, f"open-file limit: raised from {_shown_limit(soft)} to {_shown_limit(hard)}")


def _shown_limit(value: int) -> str:
    import resource

    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


async def _serve(terminated: list[bool], mask: set[int | signal.Signals]) -> None:
    async with trio.open_nursery() as nursery:

        async def on_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.open_signal_receiver(*SIGNALS) as signals:
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


def libfuse_options(options: set[str]) -> set[str]:
    """``options`` as libfuse reads them: it splits every ``-o`` argument on commas, a backslash escaping a
    comma or a backslash (``fsname=a\\,b`` is the source ``a,b``)."""
    return {opt.replace("\\", "\\\\").replace(",", "\\,") for opt in options}


def serve(prepared: Mount, ready: Callable[[], None] = lambda: None, device: int | None = None,
          mask: set[int | signal.Signals] | None = None) -> None:
    """Serve ``prepared`` until unmounted or signalled; always leaves the mountpoint clean.

    Without ``device``, libfuse mounts first (MountError when that is refused) and ``ready`` is called once the
    mount is in place. With ``device`` (an open /dev/fuse already mounted on the mountpoint), this serves it; on
    SIGTERM, SIGINT or SIGHUP it unmounts the mountpoint itself (libfuse does not know where it is mounted).
    ``mask``: the signal mask to restore once the handlers are in place, when the caller has already blocked
    the signals (from before the mount); else the signals are blocked here."""
    ops = Operations(prepared.union, prepared.spec.timeout)
    signal.signal(LOG_TABLE_SIGNAL, ops.log_table)  # (ignored from the start of the server until here)
    errors.set_debug(prepared.spec.debug)
    ops.enable_acl = prepared.spec.acl  # (-o noacl: the kernel checks the mode bits alone)
    ops.use_native(native.configure(prepared.spec))  # (the shim, when it serves natively)
    # A signal between the mount and the handler's installation must not kill us with the mount left behind.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    if mask is None:
        mask = blocked
    options = libfuse_options(fuse_options(prepared.spec))
    limit = raise_open_file_limit()
    if device is not None:
        # (the mount is made: libfuse ignores the options that name it, and pyfuse3 takes ASCII options only)
        session = {opt for opt in options if not opt.startswith(("fsname=", "subtype="))}
        try:
            pyfuse3.init(ops, f"/dev/fd/{device}", session)
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
    else:
        try:
            with _stderr_captured() as said:
                pyfuse3.init(ops, prepared.mountpoint, options)
        except RuntimeError as exc:  # the kernel or fusermount3 refused the mount
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            prepared.close()
            why = "; ".join(line.strip() for line in said if line.strip()) or str(exc)
            raise MountError(f"mounting {prepared.mountpoint} failed: {why}") from None
        if said:  # (what was written meanwhile about a mount made anyway goes where it was going)
            os.write(2, ("\n".join(said) + "\n").encode())
    terminated: list[bool] = []
    limit.report()
    native.report()
    log.info("mounted %s", prepared.describe())
    try:
        ready()
        # What start-up made lives as long as the server: out of the collector's sight, which is on again.
        gc.freeze()
        gc.enable()
        trio.run(_serve, terminated, mask)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if device is None:
            pyfuse3.close(unmount=bool(terminated))
        else:
            # As libfuse's own unmount: the device is closed first (an unmount must not wait for a server that
            # no longer reads), and the mountpoint is left alone when the connection is already gone (then
            # whatever sits there now is not ours).
            ours = bool(terminated) and kernel.connected(device)
            pyfuse3.close(unmount=False)  # (closes the device)
            if ours:
                kernel.detach(prepared.mountpoint)
        prepared.close()
    log.info("unmounted %s", prepared.mountpoint)

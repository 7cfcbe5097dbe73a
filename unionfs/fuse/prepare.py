"""What a mount holds open, made before anything is mounted: the checks, the workdir lock, the layers, the core;
and the FUSE options of a MountSpec.

Imports neither pyfuse3 nor trio: the command prepares and mounts before loading them (the server, forked
from it, inherits what is prepared here).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from .. import prescan, trace
from ..copyup import Workdir
from ..layers import Stack
from ..options import MountSpec
from ..preflight import MountError, WorkdirLock, check
from ..union import Union, default_format

log = logging.getLogger("unionfs")

#: the signals that make a server unmount and exit
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: the signal on which a server logs the size of its inode table (see Operations.log_table); ignored from the
#: start of every server process and spare until the handler is in place, so that it never ends one
LOG_TABLE_SIGNAL = signal.SIGUSR1


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
def prescan_display() -> Iterator[Callable[[int], None]]:
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
                 progress: Callable[[int], None] = _prescan_progress, *, checked: bool = False,
                 lock: WorkdirLock | None = None) -> None:
        """``progress``: told the number of lower paths scanned so far, now and then, by ``-o prescan``.
        ``checked``: the command that made the mount checked the spec, took the workdir ``lock`` and cleaned the
        workdir already (a server started by a spare, :mod:`unionfs.fuse.spare`): none of it is done again (the
        mountpoint is mounted by then: looking at it would wait for this very server)."""
        self.spec = spec
        self.mountpoint = mountpoint
        mp = os.fsencode(os.path.abspath(mountpoint))
        adopted = checked
        if not adopted:
            check(spec, mp)
        self.lock: WorkdirLock | None = lock
        self.stale = 0
        self.work: Workdir | None = None
        #: the trace file of ``-o trace=FILE``, opened here (before the server daemonizes, and before the mount:
        #: one that cannot be opened refuses the mount)
        self.trace_file: TextIO | None = None
        if spec.trace_file is not None:
            try:
                self.trace_file = trace.open_file(spec.trace_file)
            except OSError as exc:
                raise MountError(f"cannot open the trace file {os.fsdecode(spec.trace_file)}: "
                                 f"{exc.strerror}") from None
        writable = spec.writable
        if writable and not adopted:
            assert spec.work is not None
            self.lock = WorkdirLock(spec.work)
        try:
            if writable:
                assert spec.work is not None
                self.work = Workdir(spec.work)
                self.stale = 0 if adopted else self.work.clean()
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
        tracer: trace.Tracer | None = None
        if self.trace_file is not None:
            tracer = trace.Tracer(spec.layer_dirs(), trace.FileWriter(self.trace_file), writable=writable)
        elif spec.trace:
            tracer = trace.Tracer(spec.layer_dirs(), trace.log_writer, writable=writable)
        self.union = Union(self.stack, self.work, ownership=spec.ownership, durable=spec.fsync,
                           xattrs=spec.xattrs, trace=tracer)

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
        if self.trace_file is not None:
            self.trace_file.close()

"""Kill points for crash tests: a process that runs with this hook SIGKILLs itself just before its N-th call that
changes a file system, counted from the moment it is armed.

Nothing in unionfs knows of it. Which calls count (:func:`counts`, :func:`audit_unaudited_os`) is shared with
the snapshot store's kill points (tests/snapshots/killpoints.py), which count a few events of their own besides.
CPython raises an audit event before each of the calls unionfs changes layers
with (``os.mkdir``, ``os.rename`` and ``os.replace``, ``os.remove``/``os.unlink``, ``os.rmdir``, ``os.link``,
``os.symlink``, ``os.setxattr``, ``os.removexattr``, ``os.chmod``, ``os.chown``, ``os.utime``, ``os.truncate``
and ``os.ftruncate``, and ``open``/``os.open`` with flags that write or create); the few such calls that raise
none (``os.mknod``, ``os.mkfifo``, ``os.copy_file_range``, ``os.pwrite``, and ``renameat2`` reached through
ctypes) are wrapped here to raise one. An audit hook counts those events once the process is armed and, at the
N-th, writes it to the log and kills the process before the call runs.

Configured by the environment (read once, by :func:`install`, which ``sitecustomize.py`` beside this file calls
when :data:`ENV_KILL` is set):

* :data:`ENV_KILL`: N, the call to die before (1 is the first counted call); 0 only records the calls;
* :data:`ENV_TRIGGER`: a path; the process is armed from the first counted call made once it exists;
* :data:`ENV_LOG`: a file that gets one line per counted call, ``<k> <event> <detail>``, and the line
  ``kill <k>`` just before the process kills itself (the log is opened when the process is armed).
"""

from __future__ import annotations

import os
import re
import signal
import stat
import sys
import threading
from collections.abc import Callable
from typing import Any

ENV_KILL = "UNIONFS_KILLPOINTS"
ENV_TRIGGER = "UNIONFS_KILLPOINTS_TRIGGER"
ENV_LOG = "UNIONFS_KILLPOINTS_LOG"

#: audit events of calls that change a file system, whatever their arguments
CHANGING = frozenset({
    "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.link", "os.symlink", "os.setxattr", "os.removexattr",
    "os.chmod", "os.chown", "os.utime", "os.truncate",
})
#: the prefix of the events the wrappers below raise
WRAPPED_PREFIX = "killpoints."
#: functions of ``os`` that raise no audit event of their own, wrapped to raise ``killpoints.os.NAME``
WRAPPED_OS = ("mknod", "mkfifo", "copy_file_range", "pwrite")
#: C functions, called through ctypes, that change a file system
CHANGING_C = frozenset({"renameat2"})
#: open(2) flags that let an open change what it opens (or create it)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
#: modes of the built-in open() that write or create
_WRITE_MODE = re.compile(r"[wax+]")


def counts(event: str, args: tuple[Any, ...]) -> bool:
    """Whether ``event`` (with its audit arguments) is a call that changes a file system."""
    if event in CHANGING:
        return True
    if event == "open":
        path, mode, flags = args
        writes = bool(_WRITE_MODE.search(mode)) if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        return writes and not _is_device(path)
    if event.startswith(WRAPPED_PREFIX + "os."):
        return True
    if event == WRAPPED_PREFIX + "ctypes":
        return args[0] in CHANGING_C
    return False


def _is_device(path: object) -> bool:
    """Whether ``path`` names a device, not a file: /dev/null for a subprocess's standard streams, /dev/fuse."""
    if not isinstance(path, (str, bytes)):
        return False  # (a descriptor)
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False  # (not there yet: a file it creates)
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def _detail(event: str, args: tuple[Any, ...]) -> str:
    """A short, one-line description of a call for the log."""
    if event == WRAPPED_PREFIX + "ctypes":
        name, call_args = args
        return f"{name}{tuple(call_args)!r}"
    shown = []
    for a in args:
        if isinstance(a, (bytes, bytearray)) and len(a) > 64:
            a = bytes(a[:64]) + b"..."
        shown.append(repr(a))
    return " ".join(shown).replace("\n", "\\n")


class KillPoints:
    """The counting hook of one process."""

    def __init__(self, kill_at: int, trigger: str, log: str | None) -> None:
        self.kill_at = kill_at
        self.trigger = trigger
        self.log_path = log
        self.armed = False
        self.count = 0
        self.log_fd = -1
        self._lock = threading.Lock()
        self._inside = threading.local()

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not (event in CHANGING or event == "open" or event.startswith(WRAPPED_PREFIX)):
            return
        if getattr(self._inside, "busy", False) or not counts(event, args):
            return
        self._inside.busy = True
        try:
            with self._lock:
                if not self.armed:
                    if not os.path.exists(self.trigger):
                        return
                    self.armed = True
                    if self.log_path is not None:
                        self.log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                              0o644)
                self.count += 1
                self._write(f"{self.count} {event.removeprefix(WRAPPED_PREFIX)} {_detail(event, args)}\n")
                if self.count == self.kill_at:
                    self._write(f"kill {self.count}\n")
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            self._inside.busy = False

    def _write(self, line: str) -> None:
        if self.log_fd >= 0:
            os.write(self.log_fd, line.encode(errors="backslashreplace"))


def _audited(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    event = f"{WRAPPED_PREFIX}os.{name}"

    def call(*args: Any, **kwargs: Any) -> Any:
        sys.audit(event, *args, *kwargs.values())
        return fn(*args, **kwargs)

    call.__name__ = name
    call.__qualname__ = name
    call.__doc__ = fn.__doc__
    return call


def audit_unaudited_os() -> None:
    """Make the functions of ``os`` that change a file system without an audit event of their own
    (:data:`WRAPPED_OS`) raise ``killpoints.os.NAME`` before they run (once)."""
    for name in WRAPPED_OS:
        fn = getattr(os, name)
        if not getattr(fn, "_killpoints_audited", False):
            wrapped = _audited(name, fn)
            wrapped._killpoints_audited = True  # type: ignore[attr-defined]
            setattr(os, name, wrapped)


def _audit_ctypes() -> None:
    """Make every foreign function of a ``ctypes.CDLL`` loaded from now on raise ``killpoints.ctypes`` (its
    name and arguments) before it runs."""
    import ctypes

    original = ctypes.CDLL.__init__

    def init(self: ctypes.CDLL, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        base = self._FuncPtr  # type: ignore[attr-defined]

        def call(fn: Any, *call_args: Any) -> Any:
            sys.audit(WRAPPED_PREFIX + "ctypes", fn.__name__, call_args)
            return base.__call__(fn, *call_args)

        self._FuncPtr = type(base.__name__, (base,), {  # type: ignore[attr-defined]
            "_flags_": base._flags_, "_restype_": base._restype_, "__call__": call,
        })

    ctypes.CDLL.__init__ = init  # type: ignore[method-assign]


_installed: KillPoints | None = None


def install() -> KillPoints | None:
    """Install the hook configured by the environment (once); None when :data:`ENV_KILL` is not set."""
    global _installed
    if _installed is not None:
        return _installed
    value = os.environ.get(ENV_KILL)
    trigger = os.environ.get(ENV_TRIGGER)
    if not value or not trigger:
        return None
    points = KillPoints(int(value), trigger, os.environ.get(ENV_LOG))
    audit_unaudited_os()
    _audit_ctypes()
    sys.addaudithook(points.hook)
    _installed = points
    return points


# -- reading a log (for the tests) ------------------------------------------------------------------------------


def read_log(path: str | os.PathLike[str]) -> tuple[list[tuple[str, str]], int | None]:
    """The calls a log records, as (event, detail), and the number of the call the process died before (None
    when it did not kill itself)."""
    calls: list[tuple[str, str]] = []
    killed = None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return calls, None
    for line in lines:
        head, _, rest = line.partition(" ")
        if head == "kill":
            killed = int(rest)
            continue
        event, _, detail = rest.partition(" ")
        if int(head) != len(calls) + 1:
            raise ValueError(f"{path}: call {head} out of order: {line!r}")
        calls.append((event, detail))
    return calls, killed

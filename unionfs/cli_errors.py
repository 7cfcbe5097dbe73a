"""The error boundary of the ``unionfs`` commands: every failure ends a command as one line on stderr and a
documented exit status, never as a traceback.

==========  =================================================================================================
status      reason
==========  =================================================================================================
0           success
1           a failure: the mount was refused or failed, an I/O error, anything unexpected
2           bad usage: a malformed command line (argparse's own message) or mount option
3 - 6       ``unionfs snapshot``, ``image``, ``layer``: not found, already exists, failed precondition, invalid
            argument
3           also: the explaining commands (``inspect``, ``layers``, ...) for a target that names no stack
7           ``unionfs image``, ``layer``: an image or layer refused as broken or hostile (the line names the
            blob or entry)
130         interrupted (Ctrl-C)
141         ``unionfs snapshot`` only: its output was closed by the reader (``| head``); nothing is printed
==========  =================================================================================================

The line is ``PROG: KIND: MESSAGE``: the kind is ``error`` but for snapshot errors, which carry their own
(``not found``, ...); Ctrl-C gives ``PROG: interrupted``. A newline inside a message is written as ``\\n``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .options import OptionError
from .preflight import MountError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 7
EXIT_INTERRUPTED = 130


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _filename(name: object) -> str:
    return os.fsdecode(name) if isinstance(name, str | bytes) else str(name)


def describe(exc: BaseException) -> tuple[str, int]:
    """``KIND: MESSAGE`` for ``exc`` and the exit status it ends a command with."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    # The errors of a module that was never imported cannot have been raised: the snapshot errors and sqlite3
    # are looked at only when loaded (so that `unionfs mount` loads neither).
    if "unionfs.snapshots._errors" in sys.modules:
        from .snapshots._errors import SnapshotError

        if isinstance(exc, SnapshotError):
            return f"{exc.kind}: {exc}", exc.exit_status
    if "unionfs.image._stream" in sys.modules:
        from .image._stream import LayerError

        if isinstance(exc, LayerError):
            return f"refused: {exc}", EXIT_REFUSED
    if "unionfs.image._oci" in sys.modules:
        from .image._oci import ImageError

        if isinstance(exc, ImageError):
            return f"refused: {exc}", EXIT_REFUSED
    if "unionfs.targets" in sys.modules:
        from .targets import TargetError

        if isinstance(exc, TargetError):
            return f"not found: {exc}", 3
    if isinstance(exc, OptionError):
        return f"error: {exc}", EXIT_USAGE
    if isinstance(exc, MountError):
        return f"error: {exc}", EXIT_FAILED
    if "sqlite3" in sys.modules:
        import sqlite3

        if isinstance(exc, sqlite3.Error):
            return f"error: the metadata database: {exc}", EXIT_FAILED
    if isinstance(exc, OSError):
        where = ""
        if exc.filename is not None:
            where = f": {_filename(exc.filename)}"
            if exc.filename2 is not None:
                where += f" -> {_filename(exc.filename2)}"
        return f"error: {exc.strerror or exc}{where}", EXIT_FAILED
    text = str(exc)
    return f"error: unexpected {type(exc).__name__}{': ' + text if text else ''}", EXIT_FAILED


def report(prog: str, exc: BaseException) -> int:
    """Print the one line for ``exc`` on stderr; returns the exit status."""
    message, status = describe(exc)
    print(_one_line(f"{prog}: {message}"), file=sys.stderr)
    return status


def run_command(prog: str, command: Callable[[], int]) -> int:
    """``command()``'s exit status; any exception it raises is reported (:func:`report`) instead.

    SystemExit passes: argparse ends a malformed command line with its own usage message and status 2."""
    try:
        return command()
    except SystemExit:
        raise
    except BaseException as exc:
        return report(prog, exc)

"""The trace of a mount (``-o trace[=FILE]``): one readable line for each union decision, as the server makes it.

A line holds the time (monotonic seconds since the mount, 6 decimals), the operation, the merged path, the
layers involved (index and directory), what was decided, and in brackets the rule of overlayfs that decided it,
named after the sections of the kernel's Documentation/filesystems/overlayfs.rst::

    0.012345 lookup etc/os-release -> layer 2 (/l/base): found in the uppermost layer holding it [upper and ...]
    0.012400 lookup etc/passwd: whited out by layer 1 (/l/app) [whiteouts and opaque directories: ...]

The union calls a :class:`Trace` only where it holds one (``Union.trace is not None``): with tracing off nothing
here runs. Pure: no pyfuse3, no trio; the lines go to a writer (:class:`FileWriter`, or :func:`log_writer`).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    from .layers import Entry

log = logging.getLogger("unionfs.trace")

#: The rules, as ``section: what it says`` (sections of overlayfs.rst, lower-cased).
RULE_FOUND = "upper and lower: the uppermost layer holding a name shows it, hiding the layers beneath"
RULE_MERGED = "directories: directories of one name in several layers merge"
RULE_MISSING = "upper and lower: no layer holds the name"
RULE_WHITED_OUT = "whiteouts and opaque directories: a whiteout hides the name in the layers beneath it"
RULE_OPAQUE = "whiteouts and opaque directories: an opaque directory hides the layers beneath it"
RULE_COPY_UP = "non-directories: copy up on the first change"
RULE_COPY_UP_DIR = "directories: copied up, without its entries, before a change in it or to it"
RULE_REMOVED = "whiteouts and opaque directories: removing a name the lower layers hold leaves a whiteout"
RULE_MOVED = "whiteouts and opaque directories: moving a name the lower layers hold leaves a whiteout"
RULE_RECREATED = "whiteouts and opaque directories: a directory made where a name was removed is opaque"
RULE_MOVED_OPAQUE = ("renaming directories: a directory moved into a merged directory is made opaque, so that "
                     "the lower layers do not show through it")
RULE_EXDEV = ("renaming directories: without redirect_dir, a directory not wholly in the upper layer is not "
              "moved: rename(2) returns EXDEV (mv copies it)")

#: characters that would break a line or a terminal: shown as ``\\xNN``
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def show(path: bytes) -> str:
    """A path (merged, or a layer's directory) as a trace line shows it: UTF-8, other bytes and control
    characters as ``\\xNN``."""
    text = path.decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class Trace(Protocol):
    """What the union tells of its decisions (implemented by :class:`Tracer`)."""

    def lookup(self, path: bytes, entry: Entry | None, whiteout: int | None, opaque: int | None = None) -> None:
        """``path`` resolved to ``entry``; or to nothing, whited out by layer ``whiteout``, or hidden by the
        opaque directory of layer ``opaque`` from the layers beneath that hold it (both None: no layer holds
        it)."""

    def opaque(self, path: bytes, layer: int, hidden: Sequence[int]) -> None:
        """The listing of directory ``path``: its directory in ``layer`` is opaque and hides the ``hidden``
        layers, which hold something at ``path``."""

    def copy_up(self, old: Entry, data: bool, seconds: float) -> None:
        """``old`` (of a lower layer) was copied up in ``seconds``; ``data``: with its data."""

    def whiteout(self, op: str, path: bytes, new: bytes | None = None) -> None:
        """``op`` (unlink, rmdir, rename to ``new``) left a whiteout at ``path`` in the upper layer."""

    def opaque_made(self, op: str, path: bytes, new: bytes | None = None) -> None:
        """``op`` (mkdir over a whiteout, rename to ``new``) made directory ``path`` of the upper layer opaque."""

    def exdev(self, old: bytes, new: bytes, directory: Entry) -> None:
        """A rename of ``old`` to ``new`` was refused with EXDEV: ``directory`` cannot move."""


def _kind(st_mode: int) -> str:
    if stat.S_ISDIR(st_mode):
        return "directory"
    if stat.S_ISLNK(st_mode):
        return "symlink"
    if stat.S_ISREG(st_mode):
        return "file"
    if stat.S_ISFIFO(st_mode):
        return "fifo"
    if stat.S_ISSOCK(st_mode):
        return "socket"
    return "device"


class Tracer:
    """A :class:`Trace` that writes a line for each decision to ``write`` (without the newline).

    ``layer_dirs``: the directory of each layer, top first (the stack's order: the upper one first when
    ``writable``); ``clock``: seconds, the time of a line being ``clock()`` less its value at construction.
    """

    def __init__(self, layer_dirs: Sequence[bytes], write: Callable[[str], None], *, writable: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.dirs = [show(d) for d in layer_dirs]
        self.write = write
        self.writable = writable
        self.clock = clock
        self.start = clock()

    def line(self, text: str, rule: str) -> None:
        self.write(f"{self.clock() - self.start:.6f} {text} [{rule}]")

    def layer(self, index: int) -> str:
        """``layer N (DIR)``."""
        return f"layer {index} ({self.dirs[index]})"

    def layers(self, indexes: Sequence[int]) -> str:
        """``layer N (DIR)``, or ``layers N (DIR), M (DIR)``."""
        if len(indexes) == 1:
            return self.layer(indexes[0])
        return "layers " + ", ".join(f"{i} ({self.dirs[i]})" for i in indexes)

    def upper(self) -> str:
        return f"the upper layer ({self.dirs[0]})"

    # -- Trace ----------------------------------------------------------------------------------------------

    def lookup(self, path: bytes, entry: Entry | None, whiteout: int | None, opaque: int | None = None) -> None:
        if entry is not None:
            if len(entry.dirs) > 1:
                self.line(f"lookup {show(path)} -> {self.layers(entry.dirs)}: a merged directory", RULE_MERGED)
            else:
                self.line(f"lookup {show(path)} -> {self.layer(entry.layer)}: found in the uppermost layer "
                          f"holding it", RULE_FOUND)
        elif whiteout is not None:
            self.line(f"lookup {show(path)}: whited out by {self.layer(whiteout)}", RULE_WHITED_OUT)
        elif opaque is not None:
            self.line(f"lookup {show(path)}: hidden by the opaque directory in {self.layer(opaque)}", RULE_OPAQUE)
        else:
            self.line(f"lookup {show(path)}: in no layer", RULE_MISSING)

    def opaque(self, path: bytes, layer: int, hidden: Sequence[int]) -> None:
        self.line(f"readdir {show(path)}: {self.layers(hidden)} hidden by the opaque directory in "
                  f"{self.layer(layer)}", RULE_OPAQUE)

    def copy_up(self, old: Entry, data: bool, seconds: float) -> None:
        mode = old.st.st_mode
        if not stat.S_ISREG(mode):
            what = _kind(mode)
        elif data:
            what = f"{old.st.st_size} bytes"
        else:
            what = "metadata only (truncated)"
        rule = RULE_COPY_UP_DIR if stat.S_ISDIR(mode) else RULE_COPY_UP
        self.line(f"copy-up {show(old.path)}: {what} from {self.layer(old.layer)} in {seconds * 1000:.3f} ms",
                  rule)

    def whiteout(self, op: str, path: bytes, new: bytes | None = None) -> None:
        if new is None:
            self.line(f"{op} {show(path)}: whiteout created in {self.upper()}", RULE_REMOVED)
        else:
            self.line(f"{op} {show(path)} -> {show(new)}: whiteout created at {show(path)} in {self.upper()}",
                      RULE_MOVED)

    def opaque_made(self, op: str, path: bytes, new: bytes | None = None) -> None:
        if new is None:
            self.line(f"{op} {show(path)}: opaque directory made over a whiteout in {self.upper()}",
                      RULE_RECREATED)
        else:
            self.line(f"{op} {show(path)} -> {show(new)}: directory made opaque in {self.upper()}",
                      RULE_MOVED_OPAQUE)

    def exdev(self, old: bytes, new: bytes, directory: Entry) -> None:
        if len(directory.dirs) > 1:
            what = f"a merged directory of {self.layers(directory.dirs)}"
        else:
            what = f"a directory of {self.layer(directory.layer)}"
        self.line(f"rename {show(old)} -> {show(new)}: EXDEV, {show(directory.path)} is {what} "
                  f"(redirect_dir off)", RULE_EXDEV)


#: the mode a new trace file is created with
FILE_MODE = 0o600


def open_file(path: bytes) -> TextIO:
    """``path`` opened for appending trace lines, line-buffered (created private, 0600, when missing).

    OSError when it cannot be opened."""
    # (not blocking in the open: a fifo nobody reads is refused, ENXIO, instead of stopping the mount)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, FILE_MODE)
    try:
        os.set_blocking(fd, True)
        return open(fd, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    except BaseException:
        os.close(fd)
        raise


class FileWriter:
    """Writes each line to an open trace file. A failure to write (a full disk) stops the trace, said once in
    the log: the file system's answers never depend on it."""

    def __init__(self, file: TextIO) -> None:
        self.file: TextIO | None = file

    def __call__(self, line: str) -> None:
        if self.file is None:
            return
        try:
            self.file.write(line + "\n")
        except (OSError, ValueError) as exc:
            self.file = None
            log.warning("trace stopped: cannot write the trace file: %s", exc)


def log_writer(line: str) -> None:
    """Writes each line to the server's log, at INFO."""
    log.info("%s", line)

"""What the image commands show while they work: a progress bar per layer (bytes and entries) on a terminal,
a plain line every few seconds otherwise, nothing when quiet; and one line per finished step.

The work calls the function a task yields with (entries, bytes) done so far; the bar is redrawn at most a
few times per second whatever the rate of calls. ``rich`` is loaded only for a terminal.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

Update = Callable[[int, int], None]

#: seconds between two plain progress lines
PLAIN_EVERY = 5.0
#: seconds between two redraws of a bar
_REDRAW = 0.1


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _nothing(entries: int, done: int) -> None:
    del entries, done


class Feedback:
    """``mode``: "auto" (a bar on a terminal, plain lines otherwise), "plain", "bar" or "quiet"."""

    def __init__(self, stream: TextIO | None = None, mode: str = "auto") -> None:
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError):
                tty = False
            mode = "bar" if tty else "plain"
        self.mode = mode

    def say(self, line: str) -> None:
        """One line about a finished step (not shown when quiet)."""
        if self.mode != "quiet":
            print(line, file=self.stream, flush=True)

    @contextlib.contextmanager
    def task(self, label: str, total: int | None = None) -> Iterator[Update]:
        """Show the progress of one piece of work of ``total`` bytes (None: unknown)."""
        if self.mode == "quiet":
            yield _nothing
        elif self.mode == "bar":
            with self._bar(label, total) as update:
                yield update
        else:
            with self._plain(label, total) as update:
                yield update

    @contextlib.contextmanager
    def _plain(self, label: str, total: int | None) -> Iterator[Update]:
        start = last = time.monotonic()

        def update(entries: int, done: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < PLAIN_EVERY:
                return
            last = now
            of = f" of {human_bytes(total)}" if total else ""
            print(f"{label}: {human_bytes(done)}{of}, {entries} entries, {now - start:.0f} s",
                  file=self.stream, flush=True)

        yield update

    @contextlib.contextmanager
    def _bar(self, label: str, total: int | None) -> Iterator[Update]:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        console = Console(file=self.stream, force_terminal=True)  # (mode "bar": a terminal, or asked for)
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TextColumn("{task.fields[entries]} entries"), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True, auto_refresh=True) as progress:
            task = progress.add_task(label, total=total, entries=0)
            last = 0.0

            def update(entries: int, done: int) -> None:
                nonlocal last
                now = time.monotonic()
                if now - last >= _REDRAW:
                    last = now
                    progress.update(task, completed=done, entries=entries)

            yield update

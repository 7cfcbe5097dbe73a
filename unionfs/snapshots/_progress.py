"""Progress of long work (measuring, deleting and checking big layers): shown on a terminal, silent otherwise.

A :data:`Reporter` is called with what is being done (``"commit app: measuring"``) and gives a context
manager that yields a tick function; the work calls the tick once per file-system entry it has handled. The
quiet reporter does nothing; the terminal one draws a live count with ``rich`` on stderr, which it loads only
then (the package itself never needs it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TextIO

Tick = Callable[[], None]
Reporter = Callable[[str], contextlib.AbstractContextManager[Tick]]

#: How many ticks the terminal reporter gathers before it redraws.
BATCH = 256


def _nothing() -> None:
    pass


@contextlib.contextmanager
def quiet(what: str) -> Iterator[Tick]:
    """The reporter that shows nothing."""
    del what
    yield _nothing


def terminal(stream: TextIO) -> Reporter:
    """A reporter drawing on ``stream`` (a terminal): a spinner, what is being done and how many entries."""

    @contextlib.contextmanager
    def report(what: str) -> Iterator[Tick]:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn

        console = Console(file=stream)
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed} entries"))
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(what, total=None)
            pending = [0]

            def tick() -> None:
                pending[0] += 1
                if pending[0] >= BATCH:
                    progress.update(task, advance=pending[0])
                    pending[0] = 0

            yield tick
            progress.update(task, advance=pending[0])

    return report


def for_stream(stream: TextIO) -> Reporter:
    """:func:`terminal` when ``stream`` is a terminal, else :func:`quiet`."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return terminal(stream) if tty else quiet

"""Fixtures of the differential tests: two copies of the same layer stack, one mounted by kernel overlayfs and
one by unionfs, always torn down.

Run (as root, or as the root of a user namespace, on a kernel with overlayfs; skipped with the reason
otherwise)::

    python -m pytest tests/kernel                      # or: -m kernel
    UNIONFS_DIFF_IMPL=fuse-overlayfs python -m pytest tests/kernel   # another FUSE overlay in unionfs's place
    UNIONFS_DIFF_IMPL=kernel python -m pytest tests/kernel           # self-test: kernel against kernel
    sudo bash tests/run-rootless.sh                    # rootless: as an ordinary user in its own user namespace

Other knobs: ``UNIONFS_DIFF_EXAMPLES``, ``UNIONFS_DIFF_SEED``, ``UNIONFS_DIFF_SHRINK`` (the random test),
``UNIONFS_DIFF_TIMEOUT`` (seconds before a hung FUSE connection is aborted, default 120),
``UNIONFS_DIFF_MOUNT_TIMEOUT`` (seconds to wait for a mount, default 30), ``UNIONFS_TEST_XATTR`` (``trusted`` or
``user``: the overlay marker format, by default ``user`` exactly when ``trusted.*`` cannot be written; the
rootless pass sets it) and ``UNIONFS_TEST_FOREIGN_LAYER`` (a directory owned by ids outside the user namespace the
tests run in, which tests/run-rootless.sh makes).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_diff import (  # noqa: E402
    IMPL,
    STD_LOWERS,
    Layer,
    StackPair,
    build_template,
    fuse_unavailable,
    kernel_overlay_unavailable,
)


def pytest_configure(config: pytest.Config) -> None:
    # A terminated test run must still unmount what it mounted: turn SIGTERM into KeyboardInterrupt, upon
    # which pytest runs fixture teardown.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_report_header(config: pytest.Config) -> str:
    return f"kernel differential tests: unionfs side played by {IMPL!r} (UNIONFS_DIFF_IMPL)"


@pytest.fixture(scope="session")
def overlay_ready(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip (visibly) when kernel overlayfs or FUSE cannot be mounted here."""
    reason = kernel_overlay_unavailable(tmp_path_factory.mktemp("overlay-probe"))
    if reason is None:
        reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)


MakePair = Callable[..., StackPair]


@pytest.fixture
def make_pair(tmp_path: Path, overlay_ready: None) -> Iterator[MakePair]:
    """``make_pair(lowers=STD_LOWERS, upper=None, mount=True, shared=())``: build the layers, clone them for each
    side (``shared`` lower layers, existing directories, go below them uncloned), mount both.  Every pair made is
    torn down at the end of the test, whatever happened."""
    pairs: list[StackPair] = []

    def make(lowers: Sequence[Layer] = STD_LOWERS, upper: Layer | None = None, *, mount: bool = True,
             name: str | None = None, shared: Sequence[Path] = ()) -> StackPair:
        base = tmp_path / (name or f"pair{len(pairs)}")
        template = build_template(base / "template", lowers, upper, shared)
        pair = StackPair(base, template)
        pairs.append(pair)
        if mount:
            pair.mount()
        return pair

    yield make
    problems = []
    for pair in reversed(pairs):
        problems.extend(pair.close())
    if problems:
        pytest.fail("teardown: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def pair(make_pair: MakePair) -> StackPair:
    """The standard three-layer stack (:data:`kernel_diff.STD_LOWERS`, empty upper), mounted twice."""
    return make_pair()

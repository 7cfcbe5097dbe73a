"""Fixtures of the real-mount tests: layer stacks in a world-traversable temporary directory, and a registry
of everything mounted that is always unmounted (and every server stopped) in teardown."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mounthelp import Layers, Mounts, rmtree_unmounted  # noqa: E402


def _fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc.strerror}"
    return None


@pytest.fixture(scope="session")
def fuse_ready() -> None:
    reason = _fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def base(fuse_ready: None) -> Iterator[Path]:
    """A fresh directory every user can traverse (so that other uids can reach mounts made in it)."""
    d = Path(tempfile.mkdtemp(prefix="unionfs-mount-test-"))
    d.chmod(0o755)
    yield d
    rmtree_unmounted(d)


@pytest.fixture
def mounts(base: Path) -> Iterator[Mounts]:
    """Registry of mounts and servers; teardown unmounts (``fusermount3 -u -z``) and stops whatever is left.

    Depends on ``base`` so that it is torn down before the directories are removed."""
    m = Mounts()
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture
def layers(base: Path) -> Layers:
    """l1 (top lower), l2, upper, work and mnt, with a few files in the lowers."""
    s = Layers.create(base)
    (s.l1 / "top.txt").write_text("from l1\n")
    (s.l2 / "bottom.txt").write_text("from l2\n")
    (s.l2 / "shared.txt").write_text("l2 version\n")
    (s.l1 / "shared.txt").write_text("l1 version\n")
    (s.l2 / "dir").mkdir()
    (s.l2 / "dir" / "deep.txt").write_text("deep\n")
    return s

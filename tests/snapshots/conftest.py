"""Fixtures of the snapshot tests: scratch directories that are always unmounted and removed, and the
unprivileged side (a user, an interpreter and packages it can read, /dev/fuse usable by it)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import unpriv  # noqa: E402
from harness import fuse_unavailable, remove_scratch  # noqa: E402


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A fresh directory for one test, unmounted below and removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="unionfs-snap-test-"))
    os.chmod(d, 0o755)
    yield d
    remove_scratch(d)


@pytest.fixture(scope="session")
def unprivileged() -> Iterator[unpriv.Unprivileged]:
    if os.geteuid() != 0:
        pytest.skip("the tests themselves run unprivileged; the separate unprivileged run needs root")
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    user = unpriv.pick_user()
    top = Path(tempfile.mkdtemp(prefix="unionfs-snap-unpriv-"))
    os.chmod(top, 0o755)
    home = unpriv.make_user_dir(user, "unionfs-snap-home-")
    try:
        pythonpath = unpriv.build_pythonpath(top / "python")
        python = unpriv.find_python(user, pythonpath, home)
        if python is None:
            pytest.skip(f"no Python interpreter that {user.name} can run imports the copied packages")
        with unpriv.fuse_device_open_to_all():
            yield unpriv.Unprivileged(user, python, pythonpath, home)
    finally:
        shutil.rmtree(top, ignore_errors=True)
        remove_scratch(home)

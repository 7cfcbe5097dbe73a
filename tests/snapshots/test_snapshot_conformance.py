"""The conformance suite (conformance.py), each check on a fresh store: as root in this process, and as an
unprivileged user in a child interpreter (when the tests run as root; otherwise as the current user)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import unpriv
from conformance import CHECKS, SKIPPED, Skip, run
from harness import fuse_unavailable, remove_scratch

pytestmark = pytest.mark.mount
NAMES = sorted(CHECKS)


@pytest.fixture(autouse=True)
def _fuse() -> None:
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("name", NAMES)
def test_as_root(name: str, scratch: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("not running as root")
    try:
        run(name, scratch)
    except Skip as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", NAMES)
def test_as_user(name: str, request: pytest.FixtureRequest) -> None:
    if os.geteuid() != 0:  # we are the unprivileged user
        scratch = request.getfixturevalue("scratch")
        try:
            run(name, scratch)
        except Skip as exc:
            pytest.skip(str(exc))
        return
    up: unpriv.Unprivileged = request.getfixturevalue("unprivileged")
    base = unpriv.make_user_dir(up.user, "unionfs-snap-user-test-")
    try:
        r = unpriv.run_as(up.user, [up.python, str(up.tests / "conformance.py"), name, str(base)], up.env(),
                          cwd=base, timeout=240)
        if r.returncode == SKIPPED:
            pytest.skip(r.stdout.strip())
        assert r.returncode == 0, f"{name} failed as {up.user.name} (uid {up.user.uid}):\n{r.stderr[-6000:]}"
    finally:
        remove_scratch(base)

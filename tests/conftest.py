"""Fixtures shared by the test directories: how tests that run as root make another user run the project; which
tests must run alone (the ``serial`` mark, given here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: the interpreter a staged copy runs with: Debian's, which every user may run
STAGE_PYTHON = "/usr/bin/python3"
#: the user that probes whether an ordinary user can read this interpreter and the repository
PROBE_UID = 65534

#: Tests that disturb others running at the same time, or are disturbed by them (tests/run.sh runs the rest on
#: several workers, then these one at a time): a test id's prefix, and why.
SERIAL = {
    "tests/podman/": "containers copy every mount into their mount namespaces, keeping other tests' mounts alive "
                     "after their unmount; podman's state under /run is shared",
    "tests/mount/test_mount_lifecycle.py::test_mount_t_": "runs mount(8) in a new mount namespace (likewise)",
    "tests/snapshots/test_snapshot_conformance.py::test_as_user": "opens /dev/fuse to every user for the "
                     "session and puts its mode back at the end: beside others, whether an ordinary user may mount "
                     "would change under them (and two such saves and restores could leave the mode open)",
    "tests/mount/test_mount_spare.py": "spare servers listen in /run/unionfs, one per kind of command",
    "tests/mount/test_mount_limits.py::test_a_spare_": "spare servers (likewise)",
    "tests/native/test_wire.py::test_spare_servers_": "spare servers (likewise)",
    "tests/mount/test_mount_inode_table.py::test_forgotten_nodes_are_freed": "drops the kernel's caches, which "
                     "makes every mount's kernel forget inodes (the request counts of other tests change)",
    "tests/mount/test_mount_semantics.py::test_forget_after_drop_caches": "drops the kernel's caches (likewise)",
    "tests/mount/test_mount_semantics.py::test_memory_bounded_after_forget": "drops the kernel's caches (likewise)",
    "tests/native/test_native_listings.py::test_listing_follows_a_link_breaking_copy_up_when_the_kernel_forgot":
        "drops the kernel's caches (likewise)",
}
if os.geteuid() != 0:
    SERIAL["tests/mount/test_crash_steps.py"] = "an ordinary user's view of kernel overlayfs is made in a new mount " \
                                                "namespace (unshare -Urm)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.nodeid.startswith(prefix) for prefix in SERIAL):
            item.add_marker(pytest.mark.serial)


@pytest.fixture(scope="session")
def others_python() -> Iterator[tuple[str, str]]:
    """``(interpreter, PYTHONPATH)`` with which any user can import unionfs and its packages: this interpreter
    and the repository when an ordinary user can read them, else a copy of both made by tests/rootless_stage.py
    (a clone in a private directory, a virtual environment under /root), run by Debian's interpreter."""
    probe = subprocess.run(["setpriv", f"--reuid={PROBE_UID}", f"--regid={PROBE_UID}", "--clear-groups",
                            sys.executable, "-c", "import unionfs, pyfuse3"], cwd="/", capture_output=True,
                           env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    if probe.returncode == 0:
        yield sys.executable, str(REPO)
        return
    version = subprocess.run([STAGE_PYTHON, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True)
    if version.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip(f"an ordinary user cannot read {sys.executable} or {REPO}, and {STAGE_PYTHON} is not "
                    f"Python {sys.version_info[0]}.{sys.version_info[1]} to run a copy with")
    top = Path(tempfile.mkdtemp(prefix="unionfs-stage-"))
    try:
        top.chmod(0o755)
        subprocess.run([sys.executable, str(REPO / "tests" / "rootless_stage.py"), str(top / "stage"),
                        STAGE_PYTHON], check=True, capture_output=True, text=True)
        yield STAGE_PYTHON, os.pathsep.join(str(top / "stage" / d) for d in ("src", "site"))
    finally:
        shutil.rmtree(top, ignore_errors=True)

"""Fixtures shared by the test directories: how tests that run as root make another user run the project."""

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

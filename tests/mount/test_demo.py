"""The README's demo runs end to end, and the kernel shows the upper layer it wrote the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.mount

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_and_the_kernel_agrees() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py")], capture_output=True, text=True,
                          timeout=120, env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "etc/os-release: whiteout (char device 0/0)" in out
    assert "apt/  <- middle (opaque: lower layers hidden)" in out
    assert "tool v2" in out
    if os.geteuid() == 0 and "kernel overlayfs is not available" not in out:
        assert "the kernel shows the same tree as unionfs did: True" in out
    assert "Done: the demo folder has been removed." in out

"""The command line of ``unionfs``: its subcommands, the mount helper form, and the regressions of their
parsing and of ``unionfs umount``."""

from __future__ import annotations

from pathlib import Path

import pytest
from mounthelp import Layers, Mounts, is_mounted

pytestmark = pytest.mark.mount


def test_regression_mount_too_many_arguments(layers: Layers, mounts: Mounts, base: Path) -> None:
    """``unionfs mount -o ... L mnt`` (or ``mnt mnt2``) is a usage error, not a mount on the last one."""
    other = base / "mnt2"
    other.mkdir()
    for args in ([layers.l1, layers.mnt], [layers.mnt, other]):
        r = mounts.try_mount("-o", layers.opts(), *args, mnt=args[-1])
        mounts.track(layers.mnt)
        assert r.returncode == 2, r.stderr
        assert "too many arguments" in r.stderr
        assert not is_mounted(layers.mnt) and not is_mounted(other)

"""Regression tests of `unionfs snapshot`, one per fixed issue, each named for it."""

from __future__ import annotations

import pytest

import unionfs
from unionfs.snapshots.cli import main


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_regression_version_flag(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([flag])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"unionfs snapshot {unionfs.__version__}\n"

"""Installs the kill points of :mod:`killpoints` in a process started with ``UNIONFS_KILLPOINTS`` set and this
directory on ``PYTHONPATH``; then runs the ``sitecustomize`` this one hides, if any (the distribution's)."""

from __future__ import annotations

import importlib.util
import os
import sys


def _install() -> None:
    if os.environ.get("UNIONFS_KILLPOINTS"):
        import killpoints

        killpoints.install()


def _run_hidden() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == here:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_hidden_sitecustomize", candidate)
            if spec is not None and spec.loader is not None:
                try:
                    spec.loader.exec_module(importlib.util.module_from_spec(spec))
                except Exception:  # (as site.py treats a failing sitecustomize: the process goes on)
                    pass
            return


_install()
_run_hidden()

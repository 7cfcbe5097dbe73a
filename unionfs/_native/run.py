"""``python -m unionfs._native.run ARGS...``: the ``unionfs`` command with the native shim loaded first.

A stand-in until the FUSE shell loads the shim itself: the shim must be in the process before pyfuse3 is
imported, and the server is forked from this process, so it inherits it. ``UNIONFS_NATIVE_CONFIG`` (read by
the shim) turns on what is off by default, e.g. ``cache_dirs,readdirplus_auto``.
"""

from __future__ import annotations

import sys

from . import load, reason


def main() -> None:
    if load() is None:
        print(f"unionfs: native part not loaded: {reason()}", file=sys.stderr)
    from ..cli import run

    run()


if __name__ == "__main__":
    main()

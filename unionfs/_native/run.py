"""``python -m unionfs._native.run ARGS...``: the ``unionfs`` command with the native shim loaded first.

The shim is loaded before anything else of unionfs (the FUSE shell loads it itself too, in every server it
starts: this is for the shim's own tests, which set its options through ``UNIONFS_NATIVE_CONFIG``, e.g.
``cache_dirs,readdirplus_auto``).
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

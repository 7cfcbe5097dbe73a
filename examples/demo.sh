#!/usr/bin/env bash
# The demo: installs what is missing (tests/setup.sh), then builds a small three-layer stack with a whiteout
# and an opaque directory under a temporary folder, mounts it with unionfs, shows the merged view and what a
# few changes write to the upper layer, and unmounts. Run as root or as an ordinary user.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
exec .venv/bin/python examples/demo.py "$@"

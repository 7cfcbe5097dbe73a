#!/usr/bin/env bash
# The union tutorial: installs what is missing (tests/setup.sh), then walks through the union rules of overlayfs
# on a small three-layer stack with unionfs tree, inspect, layers and -o trace (examples/union_tutorial.py).
# Everything is unmounted and removed at the end. Run as root or as an ordinary user.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
exec .venv/bin/python examples/union_tutorial.py "$@"

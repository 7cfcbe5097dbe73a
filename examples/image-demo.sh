#!/usr/bin/env bash
# The image demo: installs what is missing (tests/setup.sh), then builds a small OCI image around busybox, imports
# it into a private store, mounts it writable, runs a shell in it, commits and exports the change, and mounts the
# result read-only; everything is unmounted and removed at the end. Run as root or as an ordinary user.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
exec .venv/bin/python examples/image_demo.py "$@"

#!/usr/bin/env bash
# The test command: installs what is missing (tests/setup.sh), then runs lint, type checks and the whole
# test suite (unit, real mounts, differential against kernel overlayfs). Run it as root so that the kernel
# side of the differential tests can mount; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
echo "== ruff" >&2
.venv/bin/ruff check unionfs tests bench examples
echo "== mypy" >&2
.venv/bin/mypy
echo "== pytest" >&2
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"

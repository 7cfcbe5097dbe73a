#!/usr/bin/env bash
# The test command: installs what is missing (tests/setup.sh), then runs lint, type checks and the whole
# test suite (unit, real mounts, differential against kernel overlayfs), and then the rootless pass
# (tests/run-rootless.sh: the real-mount and differential suites again as an unprivileged user). Run it as root
# so that the kernel side of the differential tests can mount; extra arguments go to pytest (the main run only).
# It fails when either run fails. Each pytest run is split in two (tests/suite.sh): most tests on several workers,
# then those that must run alone; UNIONFS_TEST_JOBS=1 runs each in one plain pytest process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
. tests/suite.sh
echo "== ruff" >&2
.venv/bin/ruff check unionfs tests bench examples
echo "== mypy" >&2
.venv/bin/mypy
echo "== pytest" >&2
status=0
echo "== pytest: on $UNIONFS_TEST_JOBS workers, then the serial tests alone" >&2
run_split .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@" || status=$?
if [ "$(id -u)" -eq 0 ]; then
    # The differential suites of lookup, errors and random operations again, with the lower layers prescanned
    # at mount (-o prescan: lookups answered from a table): they must see exactly what the kernel sees.
    echo "== pytest: differential suites again with -o prescan" >&2
    UNIONFS_DIFF_OPTIONS=prescan run_split .venv/bin/python -m pytest -q -p no:cacheprovider tests/kernel/test_kernel_lookup.py \
        tests/kernel/test_kernel_errno.py tests/kernel/test_kernel_random.py tests/kernel/test_kernel_copy_up.py \
        tests/kernel/test_kernel_deep.py \
        || status=$((status ? status : 1))
fi
# The main run serves natively (the native part beneath pyfuse3, built by the install: cached listings, tuned
# connection, the data path, read-only opens) when it is available (`unionfs --version` says). The pure mode
# (-o nonative, or a machine without the native part) runs every differential and random-operation suite of
# tests/kernel again (but test_fsx_pure, which the main run already ran in the pure mode), and the real-mount
# suites of tests/mount that serve requests: not the image, tree, inspect and demo commands, nor the kill points
# of test_crash_steps, whose servers run Python's data path in either mode. (The two directories run apart: their
# conftests name the same helpers.)
native_line=$(.venv/bin/python -m unionfs --version | tail -n 1)
echo "== $native_line" >&2
if [[ "$native_line" == "native part: available"* ]]; then
    echo "== pytest: differential, random and real-mount suites again in the pure mode (UNIONFS_NATIVE=off)" >&2
    UNIONFS_NATIVE=off run_split .venv/bin/python -m pytest -q -p no:cacheprovider tests/kernel \
        --deselect tests/kernel/test_kernel_fsx.py::test_fsx_pure || status=$((status ? status : 1))
    UNIONFS_NATIVE=off run_split .venv/bin/python -m pytest -q -p no:cacheprovider tests/native/test_native_listings.py \
        tests/mount/test_mount_semantics.py tests/mount/test_mount_lifecycle.py tests/mount/test_mount_access.py \
        tests/mount/test_mount_errors.py tests/mount/test_mount_fast.py tests/mount/test_mount_inode_table.py \
        tests/mount/test_mount_limits.py tests/mount/test_mount_program.py tests/mount/test_mount_spare.py \
        tests/mount/test_mount_aufs.py tests/mount/test_mount_trace.py tests/mount/test_mount_unlinked_ownership.py \
        || status=$((status ? status : 1))
else
    echo "== pure-mode pass: skipped (the native part is not available: the main run was in the pure mode)" >&2
fi
if [ "$(id -u)" -eq 0 ]; then
    echo "== rootless pass" >&2
    UNIONFS_TEST_PYTHON=.venv/bin/python bash tests/run-rootless.sh || status=$((status ? status : 1))
else
    echo "== rootless pass: skipped (it needs root to create its user and open /dev/fuse to it)" >&2
fi
exit "$status"

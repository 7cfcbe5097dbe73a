# Sourced by tests/run.sh and tests/run-rootless.sh. `run_split CMD...` runs the pytest command CMD (pytest's
# arguments last) twice: first every test not marked serial, on several workers (pytest-xdist, one test file per
# worker at a time), then the tests marked serial (tests/conftest.py says which and why), one at a time. Its
# status is the first failure's. UNIONFS_TEST_JOBS sets the workers (by default one more than the CPUs, at most
# 6: most tests wait on mounts and subprocesses); 1 runs everything in one plain pytest run.
_suite_jobs=$(( $(nproc) + 1 ))
[ "$_suite_jobs" -le 6 ] || _suite_jobs=6
UNIONFS_TEST_JOBS=${UNIONFS_TEST_JOBS:-$_suite_jobs}

run_split() {
    if [ "$UNIONFS_TEST_JOBS" -le 1 ]; then
        "$@"
        return
    fi
    local first=0 second=0
    "$@" -n "$UNIONFS_TEST_JOBS" --dist loadfile -m "not serial" || first=$?
    if [ "$first" -eq 5 ]; then first=0; fi  # (5: no test was selected: all of those named are serial)
    "$@" -m serial || second=$?
    if [ "$second" -eq 5 ]; then second=0; fi  # (none of them is)
    if [ "$first" -ne 0 ]; then
        return "$first"
    fi
    return "$second"
}

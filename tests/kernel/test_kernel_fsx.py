"""fsx-style random operations on a file of a lower layer (:mod:`fsx`): read, write, mmap, truncate, fallocate
(plain, KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE), copy_file_range, SEEK_DATA/SEEK_HOLE, fsync, reopen; the first
open for writing copies the file up in the middle of the run, a read-only descriptor opened before it staying
open. With the native part's data path (on unless UNIONFS_NATIVE_DATA=off), every operation must be supported and the
run, with the same seed, must end with the same bytes in the upper layer as on kernel overlayfs; in the pure
mode fallocate's three kinds are not supported (EOPNOTSUPP, as pyfuse3 has no handler) and everything else
must hold."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import fsx
import kernel_diff
import pytest
from kernel_diff import File

#: the operations of the native run (the pure run and the rootless pass, in a user namespace, do fewer)
NATIVE_OPS = 100_000
SHORT_OPS = 20_000
SEED = 20261202


def _lower_file(size: int = 200_000) -> bytes:
    return random.Random(SEED).randbytes(size)


def _serves_natively(log: str) -> bool:
    lines = [line for line in log.splitlines() if "native part" in line]
    assert lines, f"the server did not say which mode serves:\n{log}"
    return "data path" in lines[-1]


def test_regression_the_mode_is_read_from_the_log_once_the_server_has_written_it(tmp_path: Path) -> None:
    """The mount is in /proc before the server logs how it serves: read at once, its log could lack the line
    (a CI run failed so). The line is waited for."""
    import threading

    log = tmp_path / "log"
    log.write_text("$ unionfs mount\n")
    late = threading.Timer(0.3, lambda: log.write_text("$ unionfs mount\nnative part: 0.1 (data path)\n"))
    late.start()
    try:
        assert _serves_natively(kernel_diff.wait_for_line(log, "native part", timeout=30))
    finally:
        late.join()
    with pytest.raises(AssertionError, match="did not say which mode"):
        _serves_natively(kernel_diff.wait_for_line(tmp_path / "log2", "native part", timeout=0.1))


def test_fsx_finds_a_change_its_model_does_not_know(tmp_path: Path) -> None:
    """The exerciser fails when the file is not what its model says (a byte changed behind its back)."""
    f = tmp_path / "f"
    f.write_bytes(_lower_file(50_000))
    ex = fsx.Exerciser(str(f), fsx.Options(ops=50, check_every=10))
    try:
        with open(f, "r+b") as g:
            g.seek(1234)
            g.write(b"\xff" if ex.model[1234] != 0xFF else b"\x00")
        with pytest.raises(fsx.Mismatch, match="differs"):
            ex.run()
    finally:
        ex.close()


def test_fsx_finds_a_wrong_size(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(_lower_file(50_000))
    ex = fsx.Exerciser(str(f), fsx.Options(ops=50))
    try:
        with open(f, "ab") as g:  # (grown behind its back: reads inside the model's size still match)
            g.write(b"more")
        with pytest.raises(fsx.Mismatch, match="operation 1 .*: size 50004, expected 50000"):
            ex.run()
    finally:
        ex.close()


@pytest.mark.kernel
def test_fsx_native_matches_the_kernel(make_pair: Callable[..., kernel_diff.StackPair],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if os.environ.get("UNIONFS_NATIVE", "").lower() in ("off", "0", "no", "pure"):
        pytest.skip("UNIONFS_NATIVE=off: the pure mode's run is test_fsx_pure")
    ops = SHORT_OPS if kernel_diff.IN_USER_NAMESPACE or os.geteuid() != 0 else NATIVE_OPS
    if kernel_diff.IMPL != "unionfs":
        pytest.skip(f"UNIONFS_DIFF_IMPL={kernel_diff.IMPL}: no native part")
    monkeypatch.setenv("UNIONFS_NATIVE_DATA", "on")  # (whatever the environment of the run says)
    # (both runs of 100,000 operations fall under the pair's watchdog: 60 to 120 s on a busy 2-core machine)
    monkeypatch.setattr(kernel_diff, "WATCHDOG_SECONDS", max(kernel_diff.WATCHDOG_SECONDS, 360.0))
    data = _lower_file()
    pair = make_pair(lowers=({"f": File(data)},))
    assert isinstance(pair.unionfs, kernel_diff.FuseMount)
    assert _serves_natively(pair.unionfs.server_log_once("native part"))
    k = fsx.run(str(pair.kernel.root / "f"), fsx.Options(ops=ops, seed=SEED, kernel_maps=True))
    u = fsx.run(str(pair.unionfs.root / "f"), fsx.Options(ops=ops, seed=SEED))
    assert u == k
    assert not u.unsupported and {"fallocate", "punch_hole", "zero_range", "copy_range", "seek"} <= set(u.counts)
    pair.unionfs.teardown()
    pair.kernel.teardown()
    kernel_bytes = (pair.kside.upper / "f").read_bytes()
    assert (pair.uside.upper / "f").read_bytes() == kernel_bytes
    assert len(kernel_bytes) == u.size
    for side in (pair.kside, pair.uside):
        assert (side.lowers[0] / "f").read_bytes() == data, f"{side.root}: the lower file changed"
    left = [os.path.join(d, f) for d, _, files in os.walk(pair.uside.work) for f in files]
    assert not left, f"left in the workdir: {left}"


@pytest.mark.kernel
def test_fsx_pure(make_pair: Callable[..., kernel_diff.StackPair], monkeypatch: pytest.MonkeyPatch) -> None:
    if kernel_diff.IMPL != "unionfs":
        pytest.skip(f"UNIONFS_DIFF_IMPL={kernel_diff.IMPL}: no pure mode")
    opts = kernel_diff.EXTRA_OPTIONS
    monkeypatch.setattr(kernel_diff, "EXTRA_OPTIONS", f"{opts},nonative" if opts else "nonative")
    data = _lower_file()
    pair = make_pair(lowers=({"f": File(data)},))
    assert isinstance(pair.unionfs, kernel_diff.FuseMount)
    assert not _serves_natively(pair.unionfs.server_log_once("native part"))
    u = fsx.run(str(pair.unionfs.root / "f"), fsx.Options(ops=SHORT_OPS, seed=SEED, strict=False))
    assert sorted(u.unsupported) == ["fallocate", "punch_hole", "zero_range"]
    assert {"copy_range", "seek", "mapread", "mapwrite", "truncate"} <= set(u.counts)
    final = (pair.unionfs.root / "f").read_bytes()
    assert len(final) == u.size
    pair.unionfs.teardown()
    assert (pair.uside.upper / "f").read_bytes() == final
    assert (pair.uside.lowers[0] / "f").read_bytes() == data

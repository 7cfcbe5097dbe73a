"""The store killed at every step: before each mutating system call an operation makes and at each of the
store's named steps (see :mod:`killpoints`), for prepare, view, commit, remove, remove_all, cleanup,
``fsck --repair``, the mount records, the creation of a store and the CLI's cleanup, rm and fsck.

After each kill the store must be in the state before the operation or after it, never between (the
metadata as a whole; each snapshot's layer as it was); ``fsck`` must report only repairable findings, and
exactly the directories left behind; ``fsck --repair``, and separately ``cleanup``, must leave nothing
behind; and the operation, done again, must give what an uninterrupted run gives."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import killpoints
import pytest
from harness import describe, fuse_unavailable, is_mounted, lazy_unmount, remove_scratch, wait_until

from unionfs.snapshots import STEPS, FailedPrecondition, Snapshotter

#: a process id no process has (above any pid_max): a mount record of it is dead
DEAD_PID = 2**31 - 2


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A fresh directory, on tmpfs where there is one: hundreds of copies of a store are made, opened and
    checked, and a kill of a process (unlike a power loss) does not depend on the file system, while the
    fsyncs of SQLite and the store cost much more on a disk that others use too."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None
    d = Path(tempfile.mkdtemp(prefix="unionfs-killpoints-", dir=parent))
    os.chmod(d, 0o755)
    yield d
    remove_scratch(d)  # (unmounts what the mount tests left)


# -- stores ----------------------------------------------------------------------------------------------------


def _write(d: Path, files: dict[str, bytes | str]) -> None:
    """Files (bytes) and symbolic links (str: the target) under ``d``."""
    for rel, data in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            p.symlink_to(data)
        else:
            p.write_bytes(data)


def _fs(sn: Snapshotter, key: str) -> Path:
    with sn._store.read() as tx:
        row = tx.get(key)
        assert row is not None
        return Path(sn._fs(row.id))


def build(root: Path, *, big: int = 0) -> None:
    """base (committed) <- leaf (committed) <- v0 (a view); base <- side (committed); base <- work (active,
    labelled); with ``big``,
    base <- big (committed, ``big`` files in directories of ten)."""
    with Snapshotter(root) as sn:
        sn.prepare("base-a")
        _write(_fs(sn, "base-a"), {"etc/os": b"base\n", "bin/sh": b"#!\n" * 100, "bin/ash": "sh"})
        (_fs(sn, "base-a") / "etc").chmod(0o750)
        sn.commit("base", "base-a", labels={"role": "base"})
        sn.prepare("leaf-a", "base")
        _write(_fs(sn, "leaf-a"), {"leaf.txt": b"leaf\n", "d/e/f": b"deep\n"})
        sn.commit("leaf", "leaf-a")
        sn.view("v0", "leaf")
        sn.prepare("side-a", "base")
        _write(_fs(sn, "side-a"), {"side/a": b"a" * 3000, "side/b": "a", "etc/os": b"side\n"})
        sn.commit("side", "side-a")
        sn.prepare("work", "base", labels={"k": "v"})
        _write(_fs(sn, "work"), {"work/data": bytes(range(256)) * 20, "etc/os": b"changed\n"})
        if big:
            sn.prepare("big-a", "base")
            _write(_fs(sn, "big-a"), {f"d{i // 10:02}/f{i:03}": b"%d\n" % i for i in range(big)})
            sn.commit("big", "big-a")


def add_orphans(root: Path) -> None:
    """What crashes leave: a half-made ``new-*``, a half-deleted ``rm-*``, a directory whose row was never
    committed, a stray probe file; a dead mount record and a half-written one."""
    snaps = root / "snapshots"
    _write(snaps / "new-k1ll3d", {"fs/half": b"x", "work/.keep": b""})
    _write(snaps / "rm-7-0badc0de", {"fs/a/b": b"b", "fs/c": b"c", "fs/l": "a"})
    _write(snaps / "99", {"fs/never": b"committed"})
    (snaps / ".unionfs-xattr-probe-q1w2e3").write_bytes(b"")
    mounts = root / "mounts"
    mounts.mkdir(mode=0o700, exist_ok=True)
    dead = {"mountpoint": "/nowhere", "key": "work", "ids": [3, 1], "pid": DEAD_PID, "dev": None}
    (mounts / "0123456789abcdef.json").write_text(json.dumps(dead))
    (mounts / f"fedcba9876543210.json.{DEAD_PID}-0a0b0c0d.tmp").write_text('{"mountpoint": "/now')


def damage(root: Path) -> None:
    """What fsck repairs besides orphans: a missing work directory, a committed snapshot without usage, an
    active snapshot (nothing built on it) whose directory is gone."""
    with Snapshotter(root) as sn:
        sn.prepare("lost", "leaf")
        shutil.rmtree(_fs(sn, "lost").parent)
        (_fs(sn, "work").parent / "work").rmdir()
        with sn._store.write() as tx:
            row = tx.get("leaf")
            assert row is not None
            sn._store.db.execute("UPDATE snapshots SET size = NULL, inodes = NULL WHERE id = ?", (row.id,))


# -- what a store holds ----------------------------------------------------------------------------------------


def state(root: Path, create: bool = False, trees: bool = True) -> dict[str, Any]:
    """The metadata (without times), each layer's tree (unless not ``trees``), the entries of snapshots/ and
    mounts/, the modes of the store's own directories."""
    with Snapshotter(root, create=create) as sn:
        with sn._store.read() as tx:
            rows = tx.all()
            xattr = tx.meta("xattr")
            images = sorted((i.name, i.top_id) for i in tx.images())
        meta = {r.id: (r.key, r.kind, r.parent_id, sorted(r.labels.items()), r.size, r.inodes) for r in rows}
        layers = {r.id: describe(sn._fs(r.id)) if trees and os.path.isdir(sn._fs(r.id)) else None for r in rows}
        works = {r.id: os.path.isdir(sn._work(r.id)) for r in rows}
    mounts = root / "mounts"
    return {
        "meta": meta, "images": images, "layers": layers, "works": works, "xattr": xattr,
        "entries": sorted(os.listdir(root / "snapshots")),
        "mounts": sorted(os.listdir(mounts)) if mounts.is_dir() else [],
        "modes": {d: oct(stat.S_IMODE(os.stat(root / d).st_mode)) for d in ("snapshots", "empty")},
    }


def _redo(op: str) -> Callable[[Snapshotter], None]:
    """What finishes ``op`` on a recovered store (nothing when it is done)."""

    def exists(sn: Snapshotter, key: str) -> bool:
        return any(i.name == key for i in sn.walk())

    def redo(sn: Snapshotter) -> None:
        if op == "prepare" and not exists(sn, "new"):
            sn.prepare("new", "base", labels={"made": "now"})
        elif op == "view" and not exists(sn, "v"):
            sn.view("v", "leaf", labels={"made": "now"})
        elif op == "commit" and exists(sn, "work"):
            sn.commit("work-c", "work")
        elif op == "remove" and exists(sn, "side"):
            sn.remove("side")
        elif op in ("remove_all", "cli_rm") and exists(sn, "leaf"):
            sn.remove_all(["leaf", "v0"])
        elif op == "remove_image" and sn.images():
            sn.remove_image("img")
        elif op == "remove_big" and exists(sn, "big"):
            sn.remove("big")
        elif op in ("cleanup", "cli_cleanup"):
            sn.cleanup()
        elif op in ("fsck_repair", "cli_fsck_repair"):
            sn.fsck(repair=True)
        elif op.startswith("mount_") or op == "chain_mount":
            killpoints.OPS[op][0](sn, str(sn.root))

    return redo


def _orphans(st: dict[str, Any]) -> set[str]:
    return {e for e in st["entries"] if not (e.isdigit() and int(e) in st["meta"])}


def check_after_kill(op: str, run: dict[str, Any], before: dict[str, Any] | None, after: dict[str, Any],
                     before_findings: set[str]) -> None:
    """The checks of one kill point (see the module's docstring)."""
    where = f"{op} killed at event {run['n']} ({run['last']})"
    assert run["killed"] and not run["finished"], f"{where}: the child was not killed: {run}"
    root = Path(run["dir"]) / "store"
    create = op == "create"
    now = state(root, create)
    # before or after, never between
    if before is not None and (now["meta"], now["images"]) == (before["meta"], before["images"]):
        ref = before
    else:
        assert (now["meta"], now["images"]) == (after["meta"], after["images"]), \
            f"{where}: metadata neither before nor after: {now['meta']} {now['images']}"
        ref = after
    for sid, tree in now["layers"].items():
        assert tree == ref["layers"][sid], f"{where}: the layer of {now['meta'][sid][0]} changed"
    # fsck sees exactly what is left, and can repair all of it
    with Snapshotter(root, create=create) as sn:
        findings = sn.fsck()
    assert all(f.repairable and not f.repaired for f in findings), f"{where}: {[str(f) for f in findings]}"
    found = {f.subject.removeprefix("snapshots/") for f in findings if f.subject.startswith("snapshots/")}
    assert found == _orphans(now), f"{where}: fsck reports {found}, left behind: {_orphans(now)}"
    copy = root.parent / "store-cleanup"
    shutil.copytree(root, copy, symlinks=True)
    redo = _redo(op)
    # fsck --repair, then the operation again
    with Snapshotter(root, create=create) as sn:
        repaired = sn.fsck(repair=True)
        assert [str(f) for f in repaired if not f.repaired] == [], where
        assert sn.fsck() == [], f"{where}: after fsck --repair: {[str(f) for f in sn.fsck()]}"
    tidy = state(root, trees=False)
    assert tidy["entries"] == sorted(map(str, tidy["meta"])) and tidy["mounts"] == [], \
        f"{where}: left after fsck --repair: {tidy['entries']} {tidy['mounts']}"
    with Snapshotter(root, create=create) as sn:
        redo(sn)
    assert state(root) == after, f"{where}: fsck --repair, then {op} again, differs from an uninterrupted {op}"
    # cleanup, then the operation again
    with Snapshotter(copy, create=create) as sn:
        removed = sn.cleanup()
        assert set(removed) == _orphans(now), f"{where}: cleanup removed {removed}"
        left = {str(f) for f in sn.fsck()}
        assert left <= before_findings, f"{where}: after cleanup: {left - before_findings}"
    tidy = state(copy, trees=False)
    assert not _orphans(tidy) and tidy["mounts"] == [], \
        f"{where}: left after cleanup: {tidy['entries']} {tidy['mounts']}"
    with Snapshotter(copy, create=create) as sn:
        redo(sn)
    assert state(copy) == after, f"{where}: cleanup, then {op} again, differs from an uninterrupted {op}"
    shutil.rmtree(root.parent)  # keep the scratch directory small


#: the named steps (their prefix in STEPS) of each operation with any
_STEP_FAMILY = {"prepare": "prepare", "view": "prepare", "commit": "commit", "remove": "remove",
                "remove_all": "remove", "remove_big": "remove", "cli_rm": "remove", "cleanup": "cleanup",
                "cli_cleanup": "cleanup", "fsck_repair": "fsck", "cli_fsck_repair": "fsck",
                "mount_ended": "mount", "mount_placed": "mount", "chain_mount": "mount"}


def kill_everywhere(op: str, template: Path, out: Path, *, sample: list[int] | None = None,
                    umask: int | None = None, least: int = 1, strace: bool = False) -> dict[str, Any]:
    """Kill ``op`` at every kill point (or those of ``sample``) on copies of ``template`` and check each; with
    ``strace``, at every call of the system calls that write (killpoints.SYSCALLS) instead."""
    result = killpoints.spawn(op, template, out, sample, umask, strace=strace)
    dry = result["dry"]
    assert dry["finished"] and not dry["killed"], f"the uninterrupted {op} failed: {result['stderr'][-2000:]}"
    if strace:
        total = sum(dry["events"].values())
        assert len(result["runs"]) == total >= least, dry["events"]
    else:
        assert dry["events"] >= least, f"{op}: only {dry['events']} kill points"
        events, _ = killpoints.read_log(Path(dry["dir"]) / "events.log")
        steps = [e.split("\t")[1] for e in events if e.startswith(killpoints.STEP + "\t")]
        family = _STEP_FAMILY.get(op)
        if family is not None:  # each named step of the operation is a kill point too
            assert {s for s in STEPS if s.startswith(family + ".")} <= {s[2:-3] for s in steps}, steps
    create = op == "create"
    before = None if create else state(template)
    before_findings: set[str] = set()
    if not create:
        with Snapshotter(template, create=False) as sn:
            before_findings = {str(f) for f in sn.fsck() if not f.subject.startswith("snapshots/")}
    after = state(Path(dry["dir"]) / "store", create)
    if not strace:
        expected = sample if sample is not None else list(range(1, dry["events"] + 1))
        assert [r["n"] for r in result["runs"]] == expected
    for run in result["runs"]:
        check_after_kill(op, run, before, after, before_findings)
    return result


# -- the mechanism ---------------------------------------------------------------------------------------------


def test_killpoints_kill_before_each_counted_event(scratch: Path) -> None:
    """The probe makes six counted events (a read-only open is none); killed at the N-th, the child dies by
    SIGKILL and exactly the N-1 before it took effect."""
    template = scratch / "probe"
    template.mkdir()
    (template / "read-only").write_bytes(b"r")
    result = killpoints.spawn("probe", template, scratch / "out")
    dry = result["dry"]
    assert dry["finished"] and dry["events"] == 6, result
    events, finished = killpoints.read_log(Path(dry["dir"]) / "events.log")
    assert finished
    assert [e.split("\t")[0] for e in events] == ["os.mkdir", "open", "step", "os.rename", "os.remove", "open"]
    assert events[2] == "step\t('probe.step',)"
    expected_files = [
        {"read-only"}, {"read-only", "a"}, {"read-only", "a", "b"}, {"read-only", "a", "b"},
        {"read-only", "a", "c"}, {"read-only", "a"},
    ]
    assert len(result["runs"]) == 6
    for run, files in zip(result["runs"], expected_files, strict=True):
        assert run["killed"] and run["exit"] == -9 and not run["finished"], run
        assert run["events"] == run["n"]
        assert set(os.listdir(Path(run["dir"]) / "store")) == files, run
    assert set(os.listdir(Path(dry["dir"]) / "store")) == {"read-only", "a", "d"}


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_killpoints_strace_kills_before_the_system_call(scratch: Path) -> None:
    """Killed by strace on entering the k-th call of a system call, the process dies by SIGKILL and that
    call never took effect."""
    template = scratch / "probe"
    template.mkdir()
    (template / "read-only").write_bytes(b"r")
    result = killpoints.spawn("probe", template, scratch / "out", strace=True)
    assert result["dry"]["finished"]
    counted = result["dry"]["events"]
    assert (counted["mkdir"], counted["rename"], counted["unlink"]) == (1, 1, 1), counted
    runs = {r["n"]: r for r in result["runs"]}
    assert len(runs) == sum(counted.values()) and all(r["killed"] and r["exit"] == -9 for r in runs.values())

    def files(n: str) -> dict[str, int]:
        store = Path(runs[n]["dir"]) / "store"
        return {name: os.lstat(store / name).st_size for name in os.listdir(store) if name != "read-only"}

    assert files("mkdir#1") == {}
    assert "a" in files("write#1") and files("write#1")["b"] == 0  # created, not yet written
    assert set(files("rename#1")) == {"a", "b"} and files("rename#1")["b"] == 1
    assert set(files("unlink#1")) == {"a", "c"}


def test_killpoints_count_the_store_s_system_calls(scratch: Path) -> None:
    """An uninterrupted prepare logs its named steps and the mkdir/rename of its directory, in order."""
    template = scratch / "store"
    build(template)
    result = killpoints.spawn("prepare", template, scratch / "out")
    events, finished = killpoints.read_log(Path(result["dry"]["dir"]) / "events.log")
    assert finished
    names = [e.split("\t")[0] for e in events]
    steps = [e.split("\t")[1] for e in events if e.startswith("step")]
    assert steps == ["('prepare.locked',)", "('prepare.tempdir',)", "('prepare.inserted',)",
                     "('prepare.renamed',)", "('prepare.committed',)"]
    assert names.count("os.rename") == 1 and names.count("os.mkdir") >= 3, events
    assert result["runs"] and all(r["killed"] for r in result["runs"])


# -- every kill point ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["prepare", "view", "commit", "remove", "remove_all", "mount_ended",
                                "mount_placed", "chain_mount", "cli_rm"])
def test_kill_at_every_step(op: str, scratch: Path) -> None:
    template = scratch / "template"
    build(template)
    kill_everywhere(op, template, scratch / "out", least=4)


def test_kill_image_remove_at_every_step(scratch: Path) -> None:
    """image rm of an image whose top layer (side, on base) nothing else uses: the name and the layer go
    together or not at all; base, under other snapshots, stays."""
    template = scratch / "template"
    build(template)
    with Snapshotter(template) as sn:
        sn.put_image("img", manifest_digest="sha256:" + "0" * 64, manifest_media_type="application/json",
                     config_digest="sha256:" + "1" * 64, top="side", platform="linux/amd64")
    result = kill_everywhere("remove_image", template, scratch / "out", least=8)
    assert state(Path(result["dry"]["dir"]) / "store", trees=False)["images"] == []


@pytest.mark.parametrize("op", ["cleanup", "cli_cleanup"])
def test_kill_cleanup_at_every_step(op: str, scratch: Path) -> None:
    template = scratch / "template"
    build(template)
    add_orphans(template)
    kill_everywhere(op, template, scratch / "out", least=10)


@pytest.mark.parametrize("op", ["fsck_repair", "cli_fsck_repair"])
def test_kill_fsck_repair_at_every_step(op: str, scratch: Path) -> None:
    template = scratch / "template"
    build(template)
    damage(template)
    add_orphans(template)
    kill_everywhere(op, template, scratch / "out", least=10)


def test_kill_store_creation_at_every_step(scratch: Path) -> None:
    """A store being created (with a umask that takes permissions away) killed anywhere opens as a store
    exactly like one created without interruption."""
    kill_everywhere("create", scratch / "template", scratch / "out", umask=0o077, least=5)


# -- regressions -----------------------------------------------------------------------------------------------


def _point(out: Path, op: str, template: Path, wanted: Callable[[str], bool], umask: int | None = None) -> int:
    """The kill point (1-based) of the first event an uninterrupted ``op`` logs that ``wanted`` accepts."""
    result = killpoints.spawn(op, template, out, sample=[], umask=umask)
    events, finished = killpoints.read_log(Path(result["dry"]["dir"]) / "events.log")
    assert finished
    return next(i for i, e in enumerate(events, 1) if wanted(e))


def test_regression_store_directory_mode_after_a_kill_between_mkdir_and_chmod(scratch: Path) -> None:
    # A store created under umask 077 and killed between mkdir and chmod of empty/ kept it 0700 for good:
    # the next open saw it existing and skipped the chmod (unprivileged mounts cannot read their lower layer).
    n = _point(scratch / "find", "create", scratch / "template",
               lambda e: e.startswith("os.chmod") and "/store/empty'" in e, umask=0o077)
    result = killpoints.spawn("create", scratch / "template", scratch / "out", sample=[n], umask=0o077)
    (run,) = result["runs"]
    root = Path(run["dir"]) / "store"
    assert run["killed"] and stat.S_IMODE(os.stat(root / "empty").st_mode) == 0o700  # the premise
    os.umask(old := os.umask(0o077))
    try:
        Snapshotter(root).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(root / "empty").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(root / "snapshots").st_mode) == 0o700


def test_regression_store_directory_mode_set_on_purpose_stays(scratch: Path) -> None:
    # (the repair above only adds bits a umask took away; a mode set on purpose, or another owner's, stays)
    root = scratch / "store"
    Snapshotter(root).close()
    os.chmod(root / "empty", 0o775)
    Snapshotter(root).close()
    assert stat.S_IMODE(os.stat(root / "empty").st_mode) == 0o775


@pytest.mark.parametrize("op", ["mount_ended", "mount_placed"])
def test_regression_killed_record_writer_leaves_no_temporary_file(op: str, scratch: Path) -> None:
    # begin_mount killed between writing mounts/<token>.json.<hex>.tmp and renaming it left the file for
    # good: nothing read, pruned or reported *.tmp.
    template = scratch / "template"
    build(template)
    n = _point(scratch / "find", op, template, lambda e: e.startswith("os.rename") and ".tmp'" in e)
    result = killpoints.spawn(op, template, scratch / "out", sample=[n])
    (run,) = result["runs"]
    root = Path(run["dir"]) / "store"
    (stray,) = os.listdir(root / "mounts")
    assert run["killed"] and stray.endswith(".tmp")  # the premise
    for recover in (lambda sn: sn.fsck(repair=True), lambda sn: sn.cleanup(),
                    lambda sn: sn.begin_mount("work", scratch / "mp")):
        shutil.copytree(root, scratch / "copy")
        with Snapshotter(scratch / "copy") as sn:
            recover(sn)
        assert not [n for n in os.listdir(scratch / "copy" / "mounts") if n.endswith(".tmp")]
        shutil.rmtree(scratch / "copy")


def test_regression_record_of_a_running_writer_is_not_a_stray(scratch: Path) -> None:
    # (a temporary file whose writer still runs may be renamed any moment: pruning leaves it)
    root = scratch / "store"
    with Snapshotter(root) as sn:
        os.makedirs(sn.mounts_dir)
        mine = Path(sn.mounts_dir) / f"0011223344556677.json.{os.getpid()}-01020304.tmp"
        mine.write_text("{")
        old = Path(sn.mounts_dir) / "8899aabbccddeeff.json.05060708.tmp"  # a name without a writer
        old.write_text("{")
        sn.fsck(repair=True)
        assert mine.exists() and not old.exists()


def test_regression_cleanup_deletes_dead_mount_records(scratch: Path) -> None:
    # cleanup, which deletes what crashes leave, left the record of a mount whose process was killed before
    # it mounted; only a later mount or fsck --repair deleted it.
    root = scratch / "store"
    build(root)
    add_orphans(root)
    live = Path(root / "mounts" / "00000000000000aa.json")
    live.write_text(json.dumps({"mountpoint": "/x", "key": "work", "ids": [4, 1], "pid": os.getpid(), "dev": None}))
    with Snapshotter(root) as sn:
        sn.cleanup()
    assert os.listdir(root / "mounts") == [live.name]


def test_kill_remove_of_a_big_layer_at_every_step(scratch: Path) -> None:
    """remove of a committed snapshot of 200 files in 20 directories: every kill point of its deletion (each
    unlink and rmdir), none sampled away."""
    template = scratch / "template"
    build(template, big=200)
    kill_everywhere("remove_big", template, scratch / "out", least=220)


def test_regression_fsck_repair_of_a_lost_image_layer(scratch: Path) -> None:
    # fsck called the lost directory of an image's top layer repairable ("forget the snapshot"); --repair then
    # failed with sqlite3.IntegrityError (the image's row refers to it) and repaired nothing else either.
    root = scratch / "store"
    build(root)
    add_orphans(root)
    with Snapshotter(root) as sn:
        sn.put_image("img", manifest_digest="sha256:" + "0" * 64, manifest_media_type="application/json",
                     config_digest="sha256:" + "1" * 64, top="side", platform="linux/amd64")
        shutil.rmtree(_fs(sn, "side").parent)
        (lost,) = [f for f in sn.fsck() if f.subject.startswith('snapshot "side"')]
        assert not lost.repairable and "image img" in lost.problem and "unionfs image rm" in lost.problem
        repaired = sn.fsck(repair=True)
        assert [str(f) for f in repaired if not f.repaired] == [str(lost)]
        assert [str(f) for f in sn.fsck()] == [str(lost)]  # the orphans went
        assert sn.remove_image("img") == ["side"]
        assert sn.fsck() == []


def _cli_mount(root: Path, mp: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "unionfs", "snapshot", "--root", str(root), "mount", "v0", str(mp)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: is_mounted(mp), f"{mp} to be mounted")


def _unmount(mp: Path) -> None:
    lazy_unmount(mp)
    wait_until(lambda: not is_mounted(mp), f"{mp} to be unmounted")


def test_kill_cli_mount_at_every_step(scratch: Path) -> None:
    """`unionfs snapshot mount` of a view killed at every step (also before mount(2) and before it forks the
    server): while a mount is left, the snapshots it shows cannot be removed; once it is unmounted, fsck
    --repair leaves nothing behind and the view can be mounted again."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    template = scratch / "template"
    build(template)
    result = killpoints.spawn("cli_mount", template, scratch / "out")
    dry = result["dry"]
    assert dry["finished"], result["stderr"][-2000:]
    events, _ = killpoints.read_log(Path(dry["dir"]) / "events.log")
    names = [e.split("\t")[0] for e in events]
    assert "ctypes:_mount" in names and "os.fork" in names, names
    _unmount(Path(dry["dir"]) / "mp")
    left_mounted = 0
    for run in result["runs"]:
        where = f"mount killed at event {run['n']} ({run['last']})"
        assert run["killed"], where
        root, mp = Path(run["dir"]) / "store", Path(run["dir"]) / "mp"
        mounted = is_mounted(mp)
        left_mounted += mounted
        with Snapshotter(root, create=False) as sn:
            findings = sn.fsck()
            assert all(f.repairable for f in findings), f"{where}: {[str(f) for f in findings]}"
            if mounted:
                with pytest.raises(FailedPrecondition, match="mounted"):
                    sn.remove("v0")
        _unmount(mp)
        with Snapshotter(root, create=False) as sn:
            sn.fsck(repair=True)
            assert sn.fsck() == [], where
        tidy = state(root)
        assert tidy["entries"] == sorted(map(str, tidy["meta"])) and tidy["mounts"] == [], where
        _cli_mount(root, mp)
        with Snapshotter(root, create=False) as sn, pytest.raises(FailedPrecondition, match="mounted"):
            sn.remove("v0")
        _unmount(mp)
    assert left_mounted >= 3  # killed after mount(2): before the fork, before and while recording the device


@pytest.mark.parametrize("at", ["os.fork", "placed"])
def test_regression_mount_killed_before_recording_its_device_protects_the_view(at: str, scratch: Path) -> None:
    # `unionfs snapshot mount` killed after mount(2) but before it wrote the mount's device into the record
    # left a record of a dead process, which counted as no mount: the view (and, once it was removed, the
    # snapshots beneath it) could be removed under the mount.
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    template = scratch / "template"
    build(template)
    if at == "os.fork":
        n = _point(scratch / "find", "cli_mount", template, lambda e: e.startswith("os.fork"))
    else:
        n = _point(scratch / "find", "cli_mount", template, lambda e: e.startswith("os.fork")) + 1
    _unmount(scratch / "find" / "dry" / "mp")
    (run,) = killpoints.spawn("cli_mount", template, scratch / "out", sample=[n])["runs"]
    root, mp = Path(run["dir"]) / "store", Path(run["dir"]) / "mp"
    assert run["killed"] and is_mounted(mp), run  # the premise
    with Snapshotter(root, create=False) as sn:
        with pytest.raises(FailedPrecondition, match="mounted on"):
            sn.remove("v0")
        sn.fsck(repair=True)  # (keeps the record: the mount is there)
        with pytest.raises(FailedPrecondition, match="mounted on"):
            sn.remove("v0")
    _unmount(mp)
    with Snapshotter(root, create=False) as sn:
        sn.remove("v0")
        assert sn.cleanup() == [] and os.listdir(sn.mounts_dir) == []  # (the record is dead now)
        assert sn.fsck() == []


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize("op", ["prepare", "commit", "remove", "cleanup", "fsck_repair"])
def test_kill_at_every_write_system_call(op: str, scratch: Path) -> None:
    """Killed by strace at each call of each system call that writes (the k-th pwrite64, fdatasync, ...),
    SQLite's own included: its writes to the write-ahead log, the fsyncs of a commit, the checkpoint into
    the database when the store is closed."""
    template = scratch / "template"
    build(template)
    if op in ("cleanup", "fsck_repair"):
        if op == "fsck_repair":
            damage(template)
        add_orphans(template)
    result = kill_everywhere(op, template, scratch / "out", strace=True, least=10)
    counted = result["dry"]["events"]
    if op == "cleanup":  # (its transaction changes no row: SQLite writes nothing)
        assert counted.get("rename", 0) == 3 and counted.get("unlink", 0) >= 4, counted  # (rm-* is claimed)
        return
    assert counted.get("pwrite64", 0) >= 2 and counted.get("fdatasync", 0) + counted.get("fsync", 0) >= 2, counted


def test_kill_prepare_over_a_stale_directory_at_every_step(scratch: Path) -> None:
    """prepare whose new id names a directory left by an earlier crash (renamed, never committed) reclaims it
    inside its transaction; killed anywhere meanwhile, fsck and cleanup find every piece of both."""
    template = scratch / "template"
    build(template)
    with Snapshotter(template) as sn, sn._store.read() as tx:
        next_id = max(tx.ids()) + 1
    _write(template / "snapshots" / str(next_id), {"fs/stale/a": b"a", "fs/stale/b": b"b", "work/x": b""})
    result = kill_everywhere("prepare", template, scratch / "out", least=10)
    after = state(Path(result["dry"]["dir"]) / "store")
    assert after["layers"][next_id] == {".": after["layers"][next_id]["."]}  # the new layer is empty


_LOCK_HOLDER = """
import os, signal, sys, time
from unionfs.snapshots import Snapshotter, _snapshotter
root, flag = sys.argv[1:3]

def hook(name):
    if name == "prepare.inserted":  # inside the transaction: the write lock is held
        open(flag, "w").close()
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

_snapshotter.crash_hook = hook
with Snapshotter(root) as sn:
    sn.prepare("new", "base")
"""


def test_kill_of_the_write_lock_holder_frees_the_waiter(scratch: Path) -> None:
    """A process killed inside its transaction releases the write lock with its death: another prepare that
    was waiting for it goes on, and finds only what the killed one left behind (an orphan, no row)."""
    root = scratch / "store"
    build(root)
    flag = scratch / "in-transaction"
    top = str(Path(killpoints.__file__).resolve().parent.parent.parent)
    victim = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(root), str(flag)],
                              env=dict(os.environ, PYTHONPATH=top), stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: flag.exists() or victim.poll() is not None, "the victim to hold the lock")
        assert flag.exists(), victim.communicate()[1]
        start = time.monotonic()
        with Snapshotter(root, timeout=30) as sn:
            sn.prepare("other", "base")
            waited = time.monotonic() - start
            assert victim.wait(timeout=30) == -9
            assert 0.2 < waited < 20, waited  # it waited for the holder, and not for the busy timeout
            names = {i.name for i in sn.walk()}
            assert "other" in names and "new" not in names
            findings = sn.fsck()
            assert [f.subject.split("/")[0] for f in findings] == ["snapshots"] and findings[0].repairable
            assert len(sn.cleanup()) == 1 and sn.fsck() == []
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()

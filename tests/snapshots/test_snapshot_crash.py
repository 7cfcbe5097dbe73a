"""Crash tests: a process is killed (SIGKILL) at each step of prepare, commit and remove; then cleanup or
``fsck --repair`` must leave a store in which nothing is lost (every snapshot that existed, with its files)
and nothing is left behind (no directory without a snapshot, fsck clean), and the operation can be redone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness import describe

from unionfs.snapshots import STEPS, Kind, NotFound, Snapshotter

_VICTIM = textwrap.dedent("""\
    import os, signal, sys
    from unionfs.snapshots import Snapshotter, _snapshotter
    root, step, op = sys.argv[1:4]

    def hook(name):
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    _snapshotter.crash_hook = hook
    with Snapshotter(root) as sn:
        if op == "prepare":
            sn.prepare("new", "base", labels={"made": "now"})
        elif op == "commit":
            sn.commit("work-c", "work")
        else:
            sn.remove("leaf")
    print("finished without reaching", step)
""")


def _write(d: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)


def _layer(sn: Snapshotter, key: str) -> Path:
    (m,) = sn.mounts(key)
    if m.type == "bind":
        return Path(m.source)
    return Path(next(o for o in m.options if o.startswith("upperdir=")).removeprefix("upperdir="))


def make_store(root: Path) -> dict[str, dict[str, tuple[object, ...]]]:
    """base (committed) <- leaf (committed), base <- work (active), each with files written into its layer;
    returns the contents of every layer."""
    contents = {}
    with Snapshotter(root) as sn:
        sn.prepare("base-a")
        _write(_layer(sn, "base-a"), {"etc/os": b"base\n", "bin/sh": b"#!\n" * 100})
        sn.commit("base", "base-a")
        sn.prepare("leaf-a", "base")
        _write(_layer(sn, "leaf-a"), {"leaf.txt": b"leaf\n"})
        sn.commit("leaf", "leaf-a")
        sn.prepare("work", "base", labels={"k": "v"})
        _write(_layer(sn, "work"), {"work/data": os.urandom(5000), "etc/os": b"changed\n"})
        for info in sn.walk():
            contents[info.name] = describe(Path(_dir_of(sn, info.name)) / "fs")
    return contents


def _dir_of(sn: Snapshotter, name: str) -> str:
    with sn._store.read() as tx:  # the row's id names its directory
        row = tx.get(name)
        assert row is not None
        return os.path.join(sn.snapshots_dir, str(row.id))


def crash(root: Path, step: str) -> None:
    op = step.split(".")[0]
    r = subprocess.run([sys.executable, "-c", _VICTIM, str(root), step, op], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -signal.SIGKILL, f"the process was not killed at {step}: {r.returncode} {r.stdout}"


def expected_after(step: str) -> tuple[set[str], bool]:
    """The snapshots that exist after a crash at ``step``, and whether the crash leaves an orphan behind."""
    before = {"base", "leaf", "work"}
    orphan = step in ("prepare.tempdir", "prepare.inserted", "prepare.renamed",
                      "remove.committed", "remove.renamed", "remove.deleting")
    op = step.split(".")[0]
    if op == "prepare":
        return (before | {"new"} if step == "prepare.committed" else before), orphan
    if op == "commit":
        return (before - {"work"} | {"work-c"} if step == "commit.committed" else before), orphan
    gone = step not in ("remove.locked", "remove.deleted")
    return (before - {"leaf"} if gone else before), orphan


@pytest.mark.parametrize("recovery", ["cleanup", "fsck"])
@pytest.mark.parametrize("step", [s for s in STEPS if s.split(".")[0] in ("prepare", "commit", "remove")])
def test_crash_at_step(step: str, recovery: str, scratch: Path) -> None:
    root = scratch / "store"
    contents = make_store(root)
    crash(root, step)
    names, orphan = expected_after(step)
    with Snapshotter(root) as sn:
        assert {i.name for i in sn.walk()} == names
        findings = sn.fsck()
        assert [f.subject.split("/")[0] for f in findings] == (["snapshots"] if orphan else []), \
            [str(f) for f in findings]
        assert all(f.repairable and not f.repaired for f in findings)
        if recovery == "cleanup":
            removed = sn.cleanup()
            assert len(removed) == (1 if orphan else 0), removed
        else:
            repaired = sn.fsck(repair=True)
            assert [f.repaired for f in repaired] == [True] * len(findings)
        assert sn.fsck() == []
        assert sorted(os.listdir(sn.snapshots_dir)) == sorted(os.path.basename(_dir_of(sn, n)) for n in names)
        # nothing lost: every surviving snapshot has its layer as it was
        for name in names & set(contents):
            assert describe(Path(_dir_of(sn, name)) / "fs") == contents[name], name
        if "work-c" in names:
            assert describe(Path(_dir_of(sn, "work-c")) / "fs") == contents["work"]
            info = sn.stat("work-c")
            assert info.kind is Kind.COMMITTED and info.labels == {"k": "v"}
            assert sn.usage("work-c").inodes == 5  # fs, work/, work/data, etc/, etc/os
        # and the operation can be done (again)
        op = step.split(".")[0]
        if op == "prepare" and "new" not in names:
            sn.prepare("new", "base", labels={"made": "now"})
        elif op == "commit" and "work" in names:
            sn.commit("work-c", "work")
        elif op == "remove" and "leaf" in names:
            sn.remove("leaf")
        assert sn.fsck() == []
        if op == "remove":
            try:
                sn.stat("leaf")
                raise AssertionError("leaf still exists")
            except NotFound:
                pass


def test_prepare_after_crash_reuses_the_id_without_cleanup(scratch: Path) -> None:
    """A crash after the rename but before the commit leaves snapshots/<id> that the next prepare's id names:
    the next prepare reclaims it instead of failing."""
    root = scratch / "store"
    make_store(root)
    crash(root, "prepare.renamed")
    with Snapshotter(root) as sn:
        stale = set(os.listdir(sn.snapshots_dir))
        sn.prepare("new", "base")
        assert os.path.basename(_dir_of(sn, "new")) in stale
        assert os.listdir(Path(_dir_of(sn, "new")) / "fs") == []
        assert sn.fsck() == []


def test_failed_prepare_leaves_nothing(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error (not a crash) in the middle of prepare rolls the row back and deletes the directory."""
    from unionfs.snapshots import _snapshotter

    def boom(name: str) -> None:
        if name == "prepare.renamed":
            raise OSError(28, "No space left on device")

    with Snapshotter(scratch / "store") as sn:
        monkeypatch.setattr(_snapshotter, "crash_hook", boom)
        with pytest.raises(OSError):
            sn.prepare("x")
        monkeypatch.setattr(_snapshotter, "crash_hook", None)
        assert sn.walk() == [] and os.listdir(sn.snapshots_dir) == []
        sn.prepare("x")
        assert sn.fsck() == []

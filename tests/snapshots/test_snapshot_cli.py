"""The `unionfs snapshot` command: verbs, --json, the store's location, error lines and exit statuses, tree
drawing, fsck, and that the package stays free of pyfuse3 and trio."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from unionfs import cli as unionfs_cli
from unionfs.snapshots import Snapshotter, default_root
from unionfs.snapshots.cli import main


class Run:
    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.root = root
        self.capsys = capsys

    def __call__(self, *args: str, status: int = 0) -> str:
        code = main(["--root", str(self.root), *args])
        out, err = self.capsys.readouterr()
        assert code == status, f"{args}: exit {code}, wanted {status}; stderr: {err}"
        if status == 0:
            assert err == "", err
        elif args[0] == "fsck":  # its report is on stdout; stderr holds at most a hint
            assert err.count("\n") <= 1, err
        else:
            assert err.count("\n") == 1 and err.startswith("unionfs snapshot: "), err
            self.err = err
        return out

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--json"))


@pytest.fixture
def run(scratch: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    return Run(scratch / "store", capsys)


def test_lifecycle_and_read_verbs(run: Run) -> None:
    assert run("prepare", "build", "--label", "stage=1") == ""
    run("commit", "base", "build")
    run("prepare", "app", "base", "-l", "role=app")
    run("view", "look", "base")
    info = run.json("info", "app")
    assert isinstance(info, dict)
    assert {k: info[k] for k in ("name", "kind", "parent", "labels")} == {
        "name": "app", "kind": "active", "parent": "base", "labels": {"role": "app"}}
    assert "kind     active" in run("info", "app")
    listed = run.json("ls")
    assert isinstance(listed, list)
    assert [(i["name"], i["kind"], i["parent"]) for i in listed] == [
        ("app", "active", "base"), ("base", "committed", None), ("look", "view", "base")]
    assert run("ls").splitlines() == ["KEY   PARENT  KIND", "app   base    active", "base          committed",
                                      "look  base    view"]
    assert run("ls", "--filter", "kind==view", "--filter", "name==app").split()[3::3] == ["app", "look"]
    assert run.json("label", "base") == {"stage": "1"}
    assert run("label", "base", "a=b", "stage=").splitlines() == ["a=b"]
    usage = run.json("usage")
    assert isinstance(usage, dict) and set(usage) == {"app", "base", "look"}
    assert usage["look"] == {"size": 0, "inodes": 0}
    assert run("usage", "base", "--bytes").splitlines()[1].split()[2] == "1"
    assert run("usage", "app").splitlines()[0].split() == ["KEY", "SIZE", "INODES"]


def test_mount_commands(run: Run) -> None:
    run("prepare", "solo")
    line = run("mounts", "/mnt/x", "solo").strip()
    assert line == f"mount -o rw,rbind {run.root}/snapshots/1/fs /mnt/x"
    run("commit", "base", "solo")
    out = run("prepare", "app", "base", "--target", "/mnt/app")
    assert out.startswith("mount -t fuse.unionfs -o lowerdir=") and out.rstrip().endswith(" unionfs /mnt/app")
    spec = run.json("mounts", "/t", "app")
    assert isinstance(spec, list) and spec[0]["type"] == "fuse.unionfs" and spec[0]["target"] == "/t"
    printed = json.loads(run("view", "v", "base", "--mounts"))
    assert printed == [{"type": "bind", "source": f"{run.root}/snapshots/1/fs", "options": ["ro", "rbind"]}]


@pytest.mark.parametrize(("args", "status", "words"), [
    (["info", "missing"], 3, "not found"),
    (["prepare", "x", "missing"], 3, "not found"),
    (["prepare", "a"], 4, "already exists"),
    (["commit", "c", "v"], 5, "failed precondition"),
    (["prepare", "y", "a"], 5, "failed precondition"),
    (["prepare", ""], 6, "invalid argument"),
    (["ls", "--filter", "nope==1"], 6, "invalid argument"),
    (["label", "a", "novalue"], 6, "invalid argument"),
    (["mounts", "/t", "c"], 5, "failed precondition"),
    (["rm", "c"], 5, "failed precondition"),
])
def test_errors_are_one_line_with_a_distinct_status(run: Run, args: list[str], status: int, words: str) -> None:
    run("prepare", "a")
    run("view", "v")
    run("prepare", "b")
    run("commit", "c", "b")
    run("prepare", "on-c", "c")
    run(*args, status=status)
    assert run.err.startswith(f"unionfs snapshot: {words}: "), run.err


def test_rm_several_keys_goes_on_after_an_error(run: Run) -> None:
    run("prepare", "a")
    run("prepare", "b")
    run("rm", "a", "missing", "b", status=3)
    assert run.json("ls") == []


def test_tree_drawing(run: Run) -> None:
    run("prepare", "b")
    run("commit", "base", "b")
    for i in range(3):
        run("prepare", f"l{i}", "base" if i == 0 else f"layer{i - 1}")
        run("commit", f"layer{i}", f"l{i}")
    run("prepare", "app", "layer2")
    run("view", "look", "layer2")
    run("prepare", "side", "base")
    run("prepare", "alone")
    assert run("tree").splitlines() == [
        "alone (active)",
        "base",
        "├─ layer0",
        "│  └─ layer1",
        "│  └─ layer2",
        "│     ├─ app (active)",
        "│     └─ look (view)",
        "└─ side (active)",
    ]
    tree = run.json("tree")
    assert isinstance(tree, list) and [n["name"] for n in tree] == ["alone", "base"]
    assert [c["name"] for c in tree[1]["children"]] == ["layer0", "side"]


def test_long_chain_is_drawn_straight_down(run: Run) -> None:
    with Snapshotter(run.root) as sn:
        parent = None
        for i in range(40):
            sn.prepare(f"a{i}", parent)
            sn.commit(f"c{i:02}", f"a{i}")
            parent = f"c{i:02}"
    lines = run("tree").splitlines()
    assert lines[0] == "c00" and lines[-1] == "└─ c39" and max(map(len, lines)) < 10


def test_cleanup_and_fsck_verbs(run: Run) -> None:
    run("prepare", "a")
    run("prepare", "b")
    snaps = run.root / "snapshots"
    (snaps / "new-crashed").mkdir()
    (snaps / "new-crashed" / "fs").mkdir()
    (snaps / "77").mkdir()
    assert run("fsck", status=4).count("orphan") == 2
    report = json.loads(run("fsck", "--json", status=4))
    assert report["clean"] is False and len(report["findings"]) == 2
    assert sorted(run("cleanup").splitlines()) == ["removed snapshots/77", "removed snapshots/new-crashed"]
    assert "no problems found" in run("fsck")
    # a lost layer of a leaf: repaired by forgetting it; of a parent: reported only
    (m,) = Snapshotter(run.root).mounts("b")
    os.rename(m.source, m.source + ".gone")
    out = run("fsck", status=4)
    assert 'snapshot "b"' in out and "missing" in out
    run("fsck", "--repair", status=1)
    assert run.json("ls") == [json.loads(run("info", "a", "--json"))]
    run("commit", "ca", "a")
    run("prepare", "child", "ca")
    with Snapshotter(run.root) as sn:
        (m,) = sn.mounts("child")
    lower = next(o for o in m.options if o.startswith("lowerdir=")).removeprefix("lowerdir=")
    os.rename(lower, lower + ".gone")
    assert "cannot be repaired" in run("fsck", "--repair", status=4)
    os.rename(lower + ".gone", lower)
    # a missing work directory and an unrecorded usage are repaired
    work = next(o for o in m.options if o.startswith("workdir=")).removeprefix("workdir=")
    os.rmdir(work)
    db = sqlite3.connect(run.root / "metadata.db")
    db.execute("UPDATE snapshots SET size = NULL WHERE key = 'ca'")
    db.commit()
    db.close()
    out = run("fsck", "--repair", status=1)
    assert "work directory" in out and "usage" in out
    assert os.path.isdir(work) and "no problems found" in run("fsck")


def test_store_location(scratch: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("UNIONFS_ROOT", raising=False)
    monkeypatch.setenv("HOME", str(scratch / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert default_root() == str(scratch / "home/.local/share/unionfs")
    monkeypatch.setenv("XDG_DATA_HOME", str(scratch / "data"))
    assert default_root() == str(scratch / "data/unionfs")
    assert main(["prepare", "in-xdg"]) == 0
    assert (scratch / "data/unionfs/metadata.db").exists()
    monkeypatch.setenv("UNIONFS_ROOT", str(scratch / "env"))
    assert main(["prepare", "in-env"]) == 0
    assert main(["ls", "--root", str(scratch / "flag"), "--json"]) == 0  # --root after the verb too
    capsys.readouterr()
    assert main(["ls", "--json"]) == 0
    assert [i["name"] for i in json.loads(capsys.readouterr().out)] == ["in-env"]
    assert os.stat(scratch / "env").st_mode & 0o777 == 0o700


def test_help_and_registration(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for verb in ("prepare", "view", "commit", "rm", "info", "label", "usage", "ls", "mounts", "mount", "tree",
                 "cleanup", "fsck", "UNIONFS_ROOT"):
        assert verb in out
    assert main([]) == 2
    assert unionfs_cli.main(["--help"]) == 0
    assert "snapshot" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        unionfs_cli.main(["snapshot", "prepare", "--help"])
    assert "PARENT" in capsys.readouterr().out


def test_package_imports_neither_pyfuse3_nor_trio(scratch: Path) -> None:
    code = ("import sys, unionfs.snapshots, unionfs.snapshots.cli, unionfs.cli\n"
            "from unionfs.snapshots.cli import main\n"
            f"assert main(['--root', {str(scratch / 's')!r}, 'prepare', 'x']) == 0\n"
            f"assert main(['--root', {str(scratch / 's')!r}, 'ls']) == 0\n"
            "bad = [m for m in ('pyfuse3', 'trio', 'unionfs.fuse') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_command_line_entry_point(scratch: Path) -> None:
    root = str(scratch / "s")
    r = subprocess.run([sys.executable, "-m", "unionfs", "snapshot", "--root", root, "prepare", "a"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "unionfs", "snapshot", "--root", root, "commit", "a", "a"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 4 and r.stderr == 'unionfs snapshot: already exists: snapshot "a" already exists\n'

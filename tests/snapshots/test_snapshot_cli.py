"""The `unionfs snapshot` command: verbs, --json, the store's location, error lines and exit statuses, tree
drawing, fsck, and that the package stays free of pyfuse3 and trio."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from unionfs import cli as unionfs_cli
from unionfs.options import MountSpec, OptionError
from unionfs.preflight import MountError
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


def test_rm_several_keys_removes_none_after_an_error(run: Run) -> None:
    run("prepare", "a")
    run("prepare", "b")
    run("rm", "a", "missing", "b", status=3)
    assert [i["name"] for i in run.json("ls")] == ["a", "b"]
    run("rm", "a", "b")
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
        "│     └─ layer2",
        "│        ├─ app (active)",
        "│        └─ look (view)",
        "└─ side (active)",
    ]
    tree = run.json("tree")
    assert isinstance(tree, list) and [n["name"] for n in tree] == ["alone", "base"]
    assert [c["name"] for c in tree[1]["children"]] == ["layer0", "side"]


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
    assert main(["prepare", "in-flag", "--root", str(scratch / "flag")]) == 0  # --root after the verb too
    assert main(["ls", "--root", str(scratch / "flag"), "--json"]) == 0
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


# -- one error boundary, one mount API --------------------------------------------------------------------------


def _raiser(exc: BaseException) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise exc
    return fail


@pytest.mark.parametrize(("exc", "status", "line"), [
    (OSError(errno.EIO, "Input/output error", "/some/where"), 1, "error: Input/output error: /some/where"),
    (OSError(errno.EXDEV, "Invalid cross-device link", b"/a", None, b"/b"), 1,
     "error: Invalid cross-device link: /a -> /b"),
    (LookupError("forced\nand on"), 1, "error: unexpected LookupError: forced\\nand on"),
    (ZeroDivisionError(), 1, "error: unexpected ZeroDivisionError"),
    (sqlite3.OperationalError("disk I/O error"), 1, "error: the metadata database: disk I/O error"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_any_exception_is_one_line_and_a_status(run: Run, monkeypatch: pytest.MonkeyPatch, exc: BaseException,
                                                status: int, line: str) -> None:
    run("prepare", "a")
    monkeypatch.setattr(Snapshotter, "stat", _raiser(exc))
    run("info", "a", status=status)
    assert run.err == f"unionfs snapshot: {line}\n"


def test_regression_unexpected_exception_has_no_traceback(scratch: Path) -> None:
    # Anything but the errors the command knew of used to end it with a traceback.
    code = ("import sys\n"
            "from unionfs.snapshots._snapshotter import Snapshotter\n"
            "def fail(*args, **kwargs):\n"
            "    raise TypeError('forced')\n"
            "Snapshotter.prepare = fail\n"
            "from unionfs.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "snapshot", "--root", str(scratch / "s"), "prepare", "a"],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "unionfs snapshot: error: unexpected TypeError: forced\n")


class MountCall:
    """What `unionfs snapshot mount` handed to the mount API (unionfs.fuse.server.mount, replaced)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: BaseException | None = None) -> None:
        from unionfs.fuse import server

        self.calls: list[tuple[MountSpec, str, bool, str | None]] = []
        self.fail = fail
        monkeypatch.setattr(server, "mount", self)

    def __call__(self, spec: MountSpec, mountpoint: str, *, foreground: bool = False,
                 log_file: str | None = None) -> None:
        self.calls.append((spec, mountpoint, foreground, log_file))
        if self.fail is not None:
            raise self.fail


def test_mount_hands_a_mount_spec_to_the_mount_api(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    call = MountCall(monkeypatch)
    run("prepare", "solo")
    run("commit", "base", "solo")
    run("prepare", "app", "base")
    run("view", "look", "base")
    with Snapshotter(run.root) as sn:
        xattr = sn.xattr == "user"
        fs = {k: os.fsencode(run.root / "snapshots" / str(i) / "fs") for k, i in (("base", 1), ("app", 2))}
    work = os.fsencode(run.root / "snapshots/2/work")
    run("mount", "app", "/mnt/app")
    run("mount", "look", "/mnt/look", "-o", "timeout=5", "-o", "fsname=look,allow_other", "--log", "/tmp/l")
    run("mount", "app", "/mnt/d", "-d", "-o", "ro")
    assert call.calls == [
        (MountSpec(lowers=(fs["base"],), upper=fs["app"], work=work, userxattr=xattr), "/mnt/app", False, None),
        (MountSpec(lowers=(fs["base"],), readonly=True, userxattr=xattr, timeout=5.0, fsname="look",
                   allow_other=True), "/mnt/look", False, "/tmp/l"),
        (MountSpec(lowers=(fs["base"],), upper=fs["app"], work=work, userxattr=xattr, readonly=True, debug=True),
         "/mnt/d", True, None),
    ]
    # an active snapshot without parents: its layer above the store's empty directory
    run("prepare", "fresh")
    run("mount", "fresh", "/mnt/f", "-f")
    spec = call.calls[-1][0]
    assert spec.lowers == (os.fsencode(run.root / "empty"),) and spec.upper == os.fsencode(
        run.root / "snapshots/4/fs") and call.calls[-1][2] is True


@pytest.mark.parametrize(("exc", "status", "line"), [
    (MountError("workdir /w is in use by another mount"), 1, "error: workdir /w is in use by another mount"),
    (OSError(errno.ENOTDIR, "workdir/work is not a directory", b"/w/work"), 1,
     "error: workdir/work is not a directory: /w/work"),
    (RuntimeError("forced"), 1, "error: unexpected RuntimeError: forced"),
])
def test_mount_errors_are_one_line(run: Run, monkeypatch: pytest.MonkeyPatch, exc: BaseException, status: int,
                                   line: str) -> None:
    MountCall(monkeypatch, fail=exc)
    run("prepare", "a")
    run("mount", "a", "/mnt/a", status=status)
    assert run.err == f"unionfs snapshot: {line}\n"


def test_mount_option_errors_are_bad_usage(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    call = MountCall(monkeypatch, fail=OptionError("not reached"))
    run("prepare", "a")
    run("mount", "a", "/mnt/a", "-o", "frobnicate", status=2)
    assert run.err.startswith("unionfs snapshot: error: unknown mount option 'frobnicate'")
    assert call.calls == []

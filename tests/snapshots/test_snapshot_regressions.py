"""Regression tests of `unionfs snapshot`, one per fixed issue, each named for it."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import CreateFile, Harness, fuse_unavailable, is_mounted, lazy_unmount, wait_until

import unionfs
from unionfs.options import MountSpec
from unionfs.snapshots import Snapshotter, _files, _progress
from unionfs.snapshots.cli import main


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_regression_version_flag(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([flag])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"unionfs snapshot {unionfs.__version__}\n"


def test_regression_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    # `unionfs snapshot tree | head -1` printed "error: Broken pipe" and exited 1.
    root = tmp_path / "s"
    with Snapshotter(root) as sn:
        parent = None
        for i in range(300):
            sn.prepare(f"a{i}", parent)
            sn.commit(f"c{i:03}", f"a{i}")
            parent = f"c{i:03}"
    script = '"$@" | head -c 1 >/dev/null; echo "${PIPESTATUS[0]}" >&2'
    for verb in (["tree"], ["ls"], ["info", "c000", "--json"]):
        r = subprocess.run(["bash", "-c", script, "sh", sys.executable, "-m", "unionfs", "snapshot", "--root",
                            str(root), *verb], capture_output=True, text=True, timeout=120)
        assert r.stderr.strip() in ("0", "141"), (verb, r.stderr)


@pytest.mark.parametrize("args", [["ls"], ["info", "x"], ["label", "x"], ["label", "x", "a=b"], ["usage"],
                                  ["mounts", "/t", "x"], ["tree"], ["fsck"], ["fsck", "--repair"], ["cleanup"],
                                  ["rm", "x"], ["commit", "n", "x"], ["mount", "x", "/t"]])
def test_regression_read_verbs_create_no_store(args: list[str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # `unionfs snapshot --root /mistyped/path ls` created that directory tree.
    root = tmp_path / "mistyped" / "path"
    assert main(["--root", str(root), *args]) == 3
    assert capsys.readouterr().err == f"unionfs snapshot: not found: no store at {root}\n"
    assert not (tmp_path / "mistyped").exists()
    assert main(["--root", str(root), "prepare", "x"]) == 0 and (root / "metadata.db").exists()


def test_regression_fsck_without_repair_does_not_word_findings_as_done(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Without --repair the findings read "it is deleted (can be repaired)", as if fsck had acted.
    root = tmp_path / "s"
    with Snapshotter(root) as sn:
        sn.prepare("a")
    (root / "snapshots" / "77").mkdir()
    os.rmdir(root / "snapshots" / "1" / "work")
    assert main(["--root", str(root), "fsck"]) == 4
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines) == sorted([
        'snapshot "a" (snapshots/1): its work directory is missing; `fsck --repair` would recreate it',
        "snapshots/77: orphan (no snapshot refers to it); `fsck --repair` would delete it"])
    assert main(["--root", str(root), "fsck", "--repair"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines) == sorted(['snapshot "a" (snapshots/1): its work directory is missing; recreated',
                                    "snapshots/77: orphan (no snapshot refers to it); deleted"])


def test_regression_rm_checks_every_key_and_removes_all_or_none(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `unionfs snapshot rm nope ra` removed ra and reported only nope.
    root = tmp_path / "s"
    with Snapshotter(root) as sn:
        sn.prepare("ra")
        _active_on_base(sn, "kid")
    assert main(["--root", str(root), "rm", "nope", "ra", "base", "gone"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("unionfs snapshot: not found: nothing removed: ")
    for words in ('"nope" does not exist', '"gone" does not exist', '"base" has 1 child'):
        assert words in err
    with Snapshotter(root) as sn:
        assert [i.name for i in sn.walk()] == ["base", "kid", "ra"]
        assert sorted(os.listdir(root / "snapshots")) == ["1", "2", "3"]
    # a parent goes together with its only child, whatever the order given
    assert main(["--root", str(root), "rm", "base", "kid", "ra"]) == 0
    with Snapshotter(root) as sn:
        assert sn.walk() == [] and os.listdir(root / "snapshots") == []


def _active_on_base(sn: Snapshotter, key: str) -> None:
    """An active snapshot ``key`` on a committed snapshot ``base``."""
    sn.prepare("b")
    sn.commit("base", "b")
    sn.prepare(key, "base")


class _FakeMount:
    """Stands in for unionfs.fuse.server.mount and records what it was handed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from unionfs.fuse import server

        self.specs: list[MountSpec] = []
        monkeypatch.setattr(server, "mount", self)

    def __call__(self, spec: MountSpec, mountpoint: str, *, foreground: bool = False,
                 log_file: str | None = None) -> None:
        self.specs.append(spec)


@pytest.mark.parametrize(("option", "name"), [
    ("lowerdir=/tmp", "lowerdir"), ("upperdir=/tmp/u,workdir=/tmp/w", "upperdir"),
    ("timeout=3,workdir=/tmp/w", "workdir"), ("userxattr", "userxattr"), ("nouserxattr", "nouserxattr")])
def test_regression_mount_options_cannot_replace_the_layers(
        option: str, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # `snapshot mount KEY MNT -o lowerdir=/tmp` mounted /tmp as the snapshot's lower layer, and upperdir=/workdir=
    # sent its writes elsewhere (and `snapshot rm` of the snapshot then succeeded while it was mounted).
    fake = _FakeMount(monkeypatch)
    root = tmp_path / "s"
    with Snapshotter(root) as sn:
        _active_on_base(sn, "app")
    assert main(["--root", str(root), "mount", "app", str(tmp_path), "-o", option]) == 6
    assert capsys.readouterr().err.startswith(f"unionfs snapshot: invalid argument: mount option {name!r} ")
    assert fake.specs == []


def test_regression_mount_options_may_tune_a_snapshot_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeMount(monkeypatch)
    root = tmp_path / "s"
    with Snapshotter(root) as sn:
        _active_on_base(sn, "app")
        plain = sn.mount_spec("app")
    assert main(["--root", str(root), "mount", "app", str(tmp_path), "-o", "ro,timeout=3,allow_other,prescan",
                 "-o", "uidmapping=0:1000:1"]) == 0
    (spec,) = fake.specs
    assert (spec.lowers, spec.upper, spec.work, spec.userxattr) == (plain.lowers, plain.upper, plain.work,
                                                                     plain.userxattr)
    assert spec.readonly and spec.timeout == 3 and spec.allow_other and spec.prescan
    assert spec.ownership.uidmap is not None


# -- mounted snapshots ------------------------------------------------------------------------------------------

needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")


@pytest.fixture
def h(scratch: Path) -> Iterator[Harness]:
    harness = Harness(scratch)
    try:
        yield harness
    finally:
        harness.close()


@needs_fuse
def test_regression_mounted_view_and_its_parents_are_protected(h: Harness) -> None:
    # `snapshot view vv app-v1; snapshot mount vv mnt; snapshot rm vv; snapshot rm app-v1` all succeeded, the
    # live mount broke, and fsck said "no problems found".
    h.layer("base", None, [CreateFile("/a", b"a")])
    h.layer("app-v1", "base", [CreateFile("/b", b"b")])
    h.sn.view("vv", "app-v1")
    with h.mounted_at("vv") as mp:
        for keys in (["vv"], ["vv", "app-v1"], ["app-v1", "vv", "base"]):
            r = h.cli("rm", *keys)
            assert r.returncode == 5, (keys, r.stderr)
            assert r.stderr.count("\n") == 1 and f"mounted on {mp}" in r.stderr, r.stderr
        assert 'snapshot "app-v1" is mounted on ' + f'{mp} (a mount of "vv", built on it)' in r.stderr
        assert 'snapshot "base" is mounted on' in r.stderr
        assert [i.name for i in h.sn.walk()] == ["app-v1", "base", "vv"]
        assert (mp / "a").read_bytes() == b"a" and (mp / "b").read_bytes() == b"b"
        # a mount whose snapshot went anyway (behind the store's back) is reported by fsck
        db = sqlite3.connect(h.root / "metadata.db")
        db.execute("DELETE FROM snapshots WHERE key = 'vv'")
        db.commit()
        db.close()
        r = h.cli("fsck")
        assert r.returncode == 4 and f"the mount on {mp}: " in r.stdout and '"vv"' in r.stdout, r.stdout
    r = h.cli("rm", "app-v1")  # unmounted: only its (forgotten) child's directory is left
    assert r.returncode == 0, r.stderr


def _bind(source: Path, target: Path, *flags: str) -> None:
    subprocess.run(["mount", "--bind", *flags, str(source), str(target)], check=True, capture_output=True)
    wait_until(lambda: is_mounted(target), f"{target} to be mounted")


@needs_fuse
@needs_root
def test_regression_bind_mounted_view_protects_its_layer(h: Harness) -> None:
    h.layer("base", None, [CreateFile("/a", b"a")])
    h.sn.view("look", "base")
    ((m,),) = [h.sn.mounts("look")]
    mp = h.fresh_dir("bind")
    _bind(Path(m.source), mp, "-o", "ro")
    h.mounted.append(mp)
    r = h.cli("rm", "look", "base")
    assert r.returncode == 5 and f'snapshot "base" is mounted on {mp}' in r.stderr, r.stderr


@needs_fuse
@needs_root
@pytest.mark.parametrize("sub", ["", "deep/er"])
def test_regression_bind_mounted_active_snapshot_cannot_be_committed(h: Harness, sub: str) -> None:
    # An active snapshot without a parent, bind-mounted the way `snapshot mounts` prints, could be committed
    # while mounted, and what was written afterwards showed up in the committed snapshot.
    h.sn.prepare("build")
    ((m,),) = [h.sn.mounts("build")]
    assert m.type == "bind"
    os.makedirs(os.path.join(m.source, sub), exist_ok=True)
    mp = h.fresh_dir("bind")
    _bind(Path(m.source) / sub, mp)
    h.mounted.append(mp)
    for verb in (["commit", "base", "build"], ["rm", "build"]):
        r = h.cli(*verb)
        assert r.returncode == 5, (verb, r.stderr)
        assert r.stderr == (f'unionfs snapshot: failed precondition: snapshot "build" is mounted on {mp}; '
                            f"unmount it before you {'commit' if verb[0] == 'commit' else 'remove'} it\n")
    lazy_unmount(mp)
    h.mounted.remove(mp)
    assert h.cli("commit", "base", "build").returncode == 0


@needs_fuse
def test_regression_mounting_a_mounted_snapshot_says_where(h: Harness) -> None:
    # Mounting an active snapshot that was mounted already said "workdir .../work is in use by another mount"
    # with status 1, after forking a server.
    h.sn.prepare("a")
    with h.mounted_at("a") as mp:
        again = h.fresh_dir("mnt")
        r = h.cli("mount", "a", again)
        assert r.returncode == 5, r.stderr
        assert r.stderr == (f'unionfs snapshot: failed precondition: snapshot "a" is already mounted on {mp}; '
                            "unmount it first: an active snapshot is mounted once at a time\n")
        assert not is_mounted(again)
    h.sn.view("v")
    with h.mounted_at("v"), h.mounted_at("v"):  # a view can be mounted many times
        pass


# -- what containerd users type and expect ----------------------------------------------------------------------


def test_regression_tree_draws_every_child_one_level_deeper(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # A chain without branches went straight down at one depth, so that the README's own example (base,
    # app-v1 on base, the view look on app-v1) read as two siblings.
    root = tmp_path / "s"
    with Snapshotter(root) as sn:
        sn.prepare("build")
        sn.commit("base", "build")
        sn.prepare("app", "base")
        sn.commit("app-v1", "app")
        sn.view("look", "app-v1")
        parent = None
        for i in range(200):
            sn.prepare(f"a{i}", parent)
            sn.commit(f"c{i:03}", f"a{i}")
            parent = f"c{i:03}"
    assert main(["--root", str(root), "tree"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["base", "└─ app-v1", "   └─ look (view)"]
    assert lines[3] == "c000" and lines[4] == "└─ c001" and lines[-1] == "   " * 198 + "└─ c199"


def test_regression_info_prints_what_ctr_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "s"
    with Snapshotter(root) as sn:
        sn.prepare("build")
        sn.commit("base", "build")
        sn.prepare("app", "base", labels={"b": "<&>", "a": "1"})
        base, app = sn.stat("base"), sn.stat("app")
    assert main(["--root", str(root), "info", "base", "--ctr"]) == 0
    out = capsys.readouterr().out
    assert list(json.loads(out)) == ["Kind", "Name", "Created", "Updated"]
    assert out.startswith('{\n    "Kind": "Committed",\n    "Name": "base",\n    "Created": "')
    assert main(["--root", str(root), "info", "app", "--ctr"]) == 0
    out = capsys.readouterr().out
    got = json.loads(out)
    assert list(got) == ["Kind", "Name", "Parent", "Labels", "Created", "Updated"]
    assert (got["Kind"], got["Name"], got["Parent"], got["Labels"]) == ("Active", "app", "base",
                                                                         {"a": "1", "b": "<&>"})
    assert "\\u003c\\u0026\\u003e" in out
    assert app.created is not None and base.updated is not None
    for t in (got["Created"], got["Updated"]):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d*[1-9])?Z", t), t
    assert datetime.datetime.fromisoformat(got["Created"]) == app.created


def test_regression_help_names_both_commands_and_says_what_info_prints(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "unionfs snapshot" in out and "unionfs snapshots" in out
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "`ctr snapshots info` prints" in out and "Kind, Name, Parent, Labels, Created, Updated" in out


# -- progress of long work --------------------------------------------------------------------------------------


def _tree_of(top: Path, files: int, per_dir: int = 10) -> int:
    """``files`` files in directories of ``per_dir``; returns how many entries there are below ``top``."""
    entries = 0
    for i in range(files):
        d = top / f"d{i // per_dir}"
        if not d.exists():
            d.mkdir()
            entries += 1
        (d / f"f{i}").write_bytes(b"x")
        entries += 1
    return entries


class _Counting:
    """A reporter that counts what it is asked to show."""

    def __init__(self) -> None:
        self.ticks: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, what: str) -> Iterator[Callable[[], None]]:
        self.ticks[what] = 0

        def tick() -> None:
            self.ticks[what] += 1

        yield tick


def test_regression_progress_is_driven_once_per_entry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Long work (commit, rm, fsck, usage of large snapshots) showed no progress at all.
    top = tmp_path / "t"
    top.mkdir()
    n = _tree_of(top, 95)
    ticks = [0]

    def tick() -> None:
        ticks[0] += 1

    assert _files.disk_usage(str(top), tick).inodes == n + 1 and ticks[0] == n
    counting = _Counting()
    with Snapshotter(tmp_path / "s", progress=counting) as sn:
        (m,) = sn.prepare("big")
        entries = _tree_of(Path(m.source), 95)
        assert sn.usage("big").inodes == entries + 1
        with caplog.at_level(logging.INFO, logger="unionfs.snapshots"):
            sn.commit("base", "big")
            sn.remove("base")
    assert counting.ticks == {'usage "big": measuring its layer': entries, 'commit "big": measuring its layer': entries,
                              'rm "base": deleting its layer': 95}
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(logged) == 2 and logged[1] == 'removed "base" (snapshots/1)', logged
    assert logged[0].startswith('committed "big" as "base": ') and logged[0].endswith(f" {entries + 1} inodes")


def test_regression_progress_shows_on_a_terminal_only(tmp_path: Path) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert _progress.for_stream(io.StringIO()) is _progress.quiet
    screen = Terminal()
    report = _progress.for_stream(screen)
    assert report is not _progress.quiet
    with report("commit big: measuring its layer") as tick:
        for _ in range(_progress.BATCH * 3):
            tick()
    assert "commit big: measuring its layer" in screen.getvalue()
    # with stderr a pipe, the command prints nothing beyond what it always prints
    root = tmp_path / "s"
    with Snapshotter(root) as sn:
        (m,) = sn.prepare("big")
        _tree_of(Path(m.source), 300)
    for args in (["usage", "big"], ["commit", "base", "big"], ["fsck"], ["rm", "base"]):
        r = subprocess.run([sys.executable, "-m", "unionfs", "snapshot", "--root", str(root), *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stderr == "", (args, r.stderr)
        if args[0] in ("commit", "rm"):
            assert r.stdout == ""

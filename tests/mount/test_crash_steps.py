"""The server killed at every step of each change: the merged view after a remount is exactly the view before or
after each client operation of the change, never a mix; nothing stale stays in the workdir; kernel overlayfs
shows the same upper layer the same way.

Each server runs with the kill points of tests/killpoints (``sitecustomize`` on its ``PYTHONPATH``): armed once
the change starts, it SIGKILLs itself just before its N-th call that changes a file system. A reference server
that only records those calls does the change first: its log gives the number of steps, and its views between the
client operations give the states a crash may leave. Then, for every N from 1 to that number, a fresh upper layer
and workdir over the same lower layers is mounted by a server that dies before call N, the change is made through
it (the client's requests fail once the server is gone), the dead mount is detached, unionfs is mounted again over
the same upper layer and workdir, and then kernel overlayfs over them (with a workdir of its own).

A last test kills a real server from outside while it copies a file of 200 MiB up.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from crashhelp import (
    View,
    kernel_view,
    kernel_view_unavailable,
    kernel_views,
    killpoints,
    killpoints_env,
    plain_env,
    tolerant,
    view,
    view_diff,
)
from mounthelp import (
    Mounts,
    cli,
    errno_of,
    needs_root,
    pid_alive,
    run,
    server_pid,
    wait_pid_exit,
    wait_unmounted,
)

pytestmark = pytest.mark.mount

#: kill runs made side by side (each waits mostly on its servers)
WORKERS = 3
#: no change here may take more steps than this (each costs a kill run: a longer one needs a smaller stack)
MAX_STEPS = 40


# -- client operations ----------------------------------------------------------------------------------------

Op = Callable[[Path], object]


def write_at(rel: str, data: bytes, offset: int = 0) -> Op:
    """Overwrite ``data`` at ``offset`` in an existing file (no truncation: the file is copied up whole)."""

    def op(mnt: Path) -> None:
        fd = os.open(mnt / rel, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    op.__name__ = f"write {rel}"
    return op


def open_for_writing(rel: str) -> Op:
    """Open a file for writing and close it: a lower file is copied up whole, and nothing is written."""

    def op(mnt: Path) -> None:
        os.close(os.open(mnt / rel, os.O_WRONLY))

    op.__name__ = f"open {rel} for writing"
    return op


def create(rel: str, data: bytes = b"", mode: int = 0o644) -> Op:
    """Create a file and write ``data`` in it (through the descriptor of the creation: in a change, give
    no data, and write it with a second operation, as the two are two states)."""

    def op(mnt: Path) -> None:
        fd = os.open(mnt / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            if data:
                os.write(fd, data)
        finally:
            os.close(fd)

    op.__name__ = f"create {rel}"
    return op


#: the user that makes the changes of another user than the server's (as root only)
OTHER_UID = 65534


def as_other_user(name: str, code: str, rel: str) -> Op:
    """Run ``code`` (Python, with ``path``: the path of ``rel`` in the mount) as :data:`OTHER_UID`; an error
    there is raised here as the same OSError."""

    def op(mnt: Path) -> None:
        prog = (f"import os, sys\npath = sys.argv[1]\ntry:\n    {code}\nexcept OSError as exc:\n"
                "    sys.exit(f'errno {exc.errno}')\n")
        r = run(["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups", sys.executable, "-c",
                 prog, str(mnt / rel)], cwd="/")
        if r.returncode != 0:
            err = r.stderr.strip()
            code_ = int(err.split()[-1]) if err.startswith("errno ") else errno.EIO
            raise OSError(code_, f"{name} as uid {OTHER_UID}: {err}")

    op.__name__ = f"{name} as uid {OTHER_UID}"
    return op


def named(name: str, fn: Op) -> Op:
    fn.__name__ = name
    return fn


def unlink(rel: str) -> Op:
    return named(f"unlink {rel}", lambda mnt: os.unlink(mnt / rel))


def rmdir(rel: str) -> Op:
    return named(f"rmdir {rel}", lambda mnt: os.rmdir(mnt / rel))


def mkdir(rel: str, mode: int) -> Op:
    return named(f"mkdir {rel}", lambda mnt: os.mkdir(mnt / rel, mode))


def rename(old: str, new: str) -> Op:
    return named(f"rename {old} {new}", lambda mnt: os.rename(mnt / old, mnt / new))


def chmod(rel: str, mode: int) -> Op:
    return named(f"chmod {rel}", lambda mnt: os.chmod(mnt / rel, mode))


def setxattr(rel: str, name: str, value: bytes) -> Op:
    return named(f"setxattr {rel}", lambda mnt: os.setxattr(mnt / rel, name, value))


# -- the changes ----------------------------------------------------------------------------------------------


def put(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class Change:
    """A multi-step change: lower layers, client operations made before the server is armed (``setup``), the
    client operations of the change (``ops``), and what the reference views must show (``expect``: the views
    before and after each operation), so that "after" is known to mean the change done."""

    name: str
    lowers: Callable[[Path, Path], None]
    ops: tuple[Op, ...]
    expect: Callable[[list[View]], None]
    setup: tuple[Op, ...] = ()
    #: why the change is expected to fail (a known bug: the test is marked xfail, strict)
    known_bug: str | None = None
    #: the change is made by another user than the server's: only a server run by root serves it
    needs_root: bool = False


def _copy_up_file_lowers(l1: Path, l2: Path) -> None:
    put(l2 / "f", b"hidden by l1\n")
    put(l1 / "f", b"lower content\n", 0o640)


def _copy_up_file_expect(v: list[View]) -> None:
    assert v[0]["f"]["sha256"] == sha(b"lower content\n")
    assert v[1]["f"]["sha256"] == sha(b"UPPER content\n") and v[1]["f"]["mode"] == "0o640"


def _chain_lowers(l1: Path, l2: Path) -> None:
    put(l2 / "a" / "b" / "c" / "old", b"deep in l2\n")
    for d, mode in (("a", 0o751), ("a/b", 0o750), ("a/b/c", 0o700)):
        (l2 / d).chmod(mode)
    (l1 / "a").mkdir()
    (l1 / "a").chmod(0o751)
    put(l1 / "a" / "top", b"l1's a\n")


def _chain_expect(v: list[View]) -> None:
    assert "a/b/c/new" not in v[0]
    assert v[1]["a/b/c/new"]["size"] == 0 and v[2]["a/b/c/new"]["sha256"] == sha(b"new\n")
    assert v[1]["a/b/c/old"] == v[0]["a/b/c/old"] and v[1]["a/b"]["mode"] == "0o750"


def _whiteout_lowers(l1: Path, l2: Path) -> None:
    put(l1 / "gone", b"unlinked in the root\n")
    put(l2 / "sub" / "gone", b"unlinked in a lower directory\n")
    put(l2 / "sub" / "keep", b"stays\n")


def _whiteout_expect(v: list[View]) -> None:
    assert "gone" in v[0] and "gone" not in v[1] and "sub/gone" in v[1]
    assert "sub/gone" not in v[2] and v[2]["sub/keep"] == v[0]["sub/keep"]


def _opaque_lowers(l1: Path, l2: Path) -> None:
    (l1 / "e").mkdir()
    (l1 / "e").chmod(0o700)
    put(l2 / "d" / "f", b"hidden once d is opaque\n")


def _opaque_expect(v: list[View]) -> None:
    assert v[0]["e"]["mode"] == "0o700" and "d/f" not in v[0]  # (unlinked by the setup)
    assert "e" not in v[1]
    assert v[2]["e"]["mode"] == "0o755" and not any(p.startswith("e/") for p in v[2])
    assert "d" not in v[3]
    assert v[4]["d"]["mode"] == "0o750" and "d/f" not in v[4]


def _rename_lowers(l1: Path, l2: Path) -> None:
    put(l1 / "src", b"source\n", 0o600)
    put(l2 / "dst", b"destination\n")


def _rename_expect(v: list[View]) -> None:
    assert "src" not in v[1] and v[1]["dst"]["sha256"] == sha(b"source\n") and v[1]["dst"]["mode"] == "0o600"


def _rename_upper_lowers(l1: Path, l2: Path) -> None:
    put(l1 / "c", b"c in l1\n")
    put(l2 / "d", b"d in l2\n")
    put(l1 / "e", b"e in l1\n")


def _rename_upper_expect(v: list[View]) -> None:
    assert v[0]["c"]["sha256"] == sha(b"C in l1\n") and v[0]["e"]["sha256"] == sha(b"E in l1\n")
    assert "c" not in v[1] and v[1]["d"]["sha256"] == sha(b"C in l1\n")
    assert "n" not in v[2] and v[2]["e"]["sha256"] == sha(b"new\n")


def _unlink_lowers(l1: Path, l2: Path) -> None:
    put(l1 / "f", b"lower f\n")
    put(l2 / "f", b"deeper f\n")


def _unlink_expect(v: list[View]) -> None:
    assert v[0]["f"]["sha256"] == sha(b"LOWER f\n")
    assert "f" not in v[1]


def _hardlink_lowers(l1: Path, l2: Path) -> None:
    put(l1 / "h1", b"old content\n")
    os.link(l1 / "h1", l1 / "h2")


def _hardlink_expect(v: list[View]) -> None:
    assert v[0]["h1"]["nlink"] == v[0]["h2"]["nlink"] == 2 and v[0]["h1"]["sha256"] == sha(b"old content\n")
    # the copy-up breaks the link, as on the kernel without index=on: h2 still names the lower file
    assert v[1]["h1"]["nlink"] == 1 and v[1]["h1"]["sha256"] == v[0]["h1"]["sha256"] and v[1]["h2"] == v[0]["h2"]
    assert v[2]["h1"]["sha256"] == sha(b"NEW content\n") and v[2]["h2"] == v[0]["h2"]


def _meta_lowers(l1: Path, l2: Path) -> None:
    put(l2 / "m", b"chmod me\n", 0o644)


def _meta_expect(v: list[View]) -> None:
    assert v[1]["m"]["mode"] == "0o600" and v[1]["m"]["sha256"] == sha(b"chmod me\n")
    assert v[2]["m"]["xattrs"] == {"user.crash": b"value".hex()} and v[2]["m"]["mode"] == "0o600"


def _dir_over_merged_lowers(l1: Path, l2: Path) -> None:
    put(l2 / "y" / "f", b"in the lower y, unlinked before the change\n")


def _dir_over_merged_expect(v: list[View]) -> None:
    assert "y/f" not in v[0] and v[0]["x/inner"]["sha256"] == sha(b"inner\n")
    assert "x" not in v[1] and v[1]["y/inner"]["sha256"] == sha(b"inner\n") and "y/f" not in v[1]


def _dir_over_whiteout_lowers(l1: Path, l2: Path) -> None:
    put(l1 / "w", b"a lower file, unlinked before the change\n")


def _dir_over_whiteout_expect(v: list[View]) -> None:
    assert "w" not in v[0] and "x" in v[0]
    assert "x" not in v[1] and v[1]["w"]["type"] == stat.S_IFDIR and v[1]["w/inner"]["sha256"] == sha(b"inner\n")


def _other_user_lowers(l1: Path, l2: Path) -> None:
    (l2 / "pub").mkdir()
    (l2 / "pub").chmod(0o777)


def _other_user_expect(v: list[View]) -> None:
    assert v[1]["pub/new"]["uid"] == v[1]["pub/new"]["gid"] == OTHER_UID
    assert v[2]["pub/dir"]["uid"] == v[2]["pub/dir"]["gid"] == OTHER_UID and v[2]["pub/dir"]["mode"] == "0o750"


CHANGES = [
    Change("copy-up of a file", _copy_up_file_lowers, (write_at("f", b"UPPER"),), _copy_up_file_expect),
    Change("copy-up of a directory chain", _chain_lowers, (create("a/b/c/new"), write_at("a/b/c/new", b"new\n")),
           _chain_expect),
    Change("whiteouts", _whiteout_lowers, (unlink("gone"), unlink("sub/gone")), _whiteout_expect),
    Change("opaque directories", _opaque_lowers,
           (rmdir("e"), mkdir("e", 0o755), rmdir("d"), mkdir("d", 0o750)), _opaque_expect,
           setup=(unlink("d/f"),)),
    Change("rename of a lower file over a lower file", _rename_lowers, (rename("src", "dst"),), _rename_expect),
    Change("rename of upper files over lower and copied-up ones", _rename_upper_lowers,
           (rename("c", "d"), rename("n", "e")), _rename_upper_expect,
           setup=(write_at("c", b"C"), write_at("e", b"E"), create("n", b"new\n"))),
    Change("unlink of a copied-up file", _unlink_lowers, (unlink("f"),), _unlink_expect,
           setup=(write_at("f", b"LOWER"),)),
    Change("copy-up of a hard-linked file", _hardlink_lowers, (open_for_writing("h1"), write_at("h1", b"NEW")),
           _hardlink_expect),
    Change("rename of a directory over an emptied merged directory", _dir_over_merged_lowers,
           (rename("x", "y"),), _dir_over_merged_expect,
           # (regression: the target's upper directory, holding the whiteout of y/f, was moved into the workdir
           # before x was renamed: killed in between, the unlinked y/f showed again beside x)
           setup=(unlink("y/f"), mkdir("x", 0o755), create("x/inner", b"inner\n"))),
    Change("rename of a directory over a whiteout", _dir_over_whiteout_lowers,
           (rename("x", "w"),), _dir_over_whiteout_expect,
           # (regression: the whiteout was unlinked before the rename: killed in between, the unlinked lower
           # file w showed again beside x)
           setup=(unlink("w"), mkdir("x", 0o755), create("x/inner", b"inner\n"))),
    Change("creation by another user than the server's", _other_user_lowers,
           (as_other_user("create", "os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))", "pub/new"),
            as_other_user("mkdir", "os.mkdir(path, 0o750)", "pub/dir")),
           # (regression: the object was made in the upper directory with the server's owner, then chowned to
           # the caller: killed in between, the remount showed a new object owned by root)
           _other_user_expect, needs_root=True),
    Change("chmod and setxattr of a lower file", _meta_lowers,
           (chmod("m", 0o600), setxattr("m", "user.crash", b"value")), _meta_expect),
]


# -- the harness ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    """One kill run: the call the server died before, and which reference view the remount showed."""

    kill_at: int
    state: int
    client_error: str
    what: str
    #: the view of the remount, and the layers it showed (for the kernel's view of them)
    view: View
    dirs: dict[str, Path]


class Harness:
    """Mounts, kills and remounts over one set of lower layers."""

    def __init__(self, base: Path, mounts: Mounts, change: Change) -> None:
        self.base = base
        self.mounts = mounts
        self.change = change
        self.l1, self.l2 = base / "l1", base / "l2"
        for d in (self.l1, self.l2):
            d.mkdir()
            d.chmod(0o755)
        change.lowers(self.l1, self.l2)
        self.counter = iter(range(1, 1 << 30))
        self.lock = threading.Lock()

    def dirs(self, tag: str) -> dict[str, Path]:
        root = self.base / tag
        out = {k: root / k for k in ("upper", "work", "mnt", "scratch")}
        for p in out.values():
            p.mkdir(parents=True)
        for p in (root, out["upper"], out["mnt"]):
            p.chmod(0o755)
        return out

    def opts(self, d: dict[str, Path]) -> str:
        return f"lowerdir={self.l1}:{self.l2},upperdir={d['upper']},workdir={d['work']}"

    def mount(self, d: dict[str, Path], env: dict[str, str]) -> int:
        mnt = d["mnt"]
        self.mounts.points.append(mnt)
        r = cli("mount", "-o", self.opts(d), mnt, env=env)
        assert r.returncode == 0, f"mount failed ({r.returncode}): {r.stderr}"
        self.mounts.track(mnt)
        pid = server_pid(mnt)
        assert pid is not None, "no pid file for the server"
        return pid

    @staticmethod
    def umount(mnt: Path, pid: int) -> None:
        """Unmount and wait for the server to exit (fusermount3 itself: quicker than ``unionfs umount``)."""
        r = run(["fusermount3", "-u", str(mnt)])
        assert r.returncode == 0, f"fusermount3 -u failed ({r.returncode}): {r.stderr}"
        assert wait_pid_exit(pid, 30), f"the server of {mnt} did not exit after the unmount"

    def stale(self, d: dict[str, Path]) -> list[str]:
        """What a mounted unionfs left in the workdir besides its empty work directory."""
        left = sorted(os.listdir(d["work"]))
        out = [f"workdir/{n}" for n in left if n != "work"]
        if "work" in left:
            out += [f"workdir/work/{n}" for n in sorted(os.listdir(d["work"] / "work"))]
        return out

    def kernel(self, runs: list[dict[str, Path]]) -> list[View]:
        """Kernel overlayfs's views of the upper layers of ``runs`` over the lower layers."""
        return kernel_views([([self.l1, self.l2], d["upper"], d["scratch"]) for d in runs])

    def reference(self) -> tuple[list[View], list[tuple[str, str]], dict[str, Path]]:
        """The change made by a server that only records its calls: the views before and after each client
        operation, the calls of the change, and the layers it leaves."""
        change = self.change
        d = self.dirs("reference")
        log, trigger = d["scratch"] / "calls.log", d["scratch"] / "armed"
        pid = self.mount(d, killpoints_env(0, trigger, log))
        for op in change.setup:
            op(d["mnt"])
        views = [view(d["mnt"])]
        trigger.touch()
        for op in change.ops:
            op(d["mnt"])
            views.append(view(d["mnt"]))
        calls, killed = killpoints.read_log(log)  # (before the unmount, whose own calls are not the change's)
        self.umount(d["mnt"], pid)
        assert killed is None
        assert calls, f"{self.change.name}: the server recorded no call: are the kill points installed?"
        assert len(calls) <= MAX_STEPS, f"{self.change.name}: {len(calls)} steps: make the stack smaller"
        for i in range(1, len(views)):
            assert views[i] != views[i - 1], f"{self.change.name}: {self.change.ops[i - 1].__name__} changed nothing"
        self.change.expect(views)
        return views, calls, d

    def kill_run(self, kill_at: int, views: list[View], calls: list[tuple[str, str]]) -> Outcome:
        d = self.dirs(f"kill{kill_at}")
        mnt = d["mnt"]
        log, trigger = d["scratch"] / "calls.log", d["scratch"] / "armed"
        pid = self.mount(d, killpoints_env(kill_at, trigger, log))
        for op in self.change.setup:
            op(mnt)
        trigger.touch()
        error = None
        for op in self.change.ops:
            error = tolerant(lambda op=op: op(mnt))  # type: ignore[misc]
            if error is not None:
                break
        what = f"{self.change.name}, killed before call {kill_at} ({calls[kill_at - 1][0]})"
        assert wait_pid_exit(pid, 30), f"{what}: the server did not die"
        got, killed = killpoints.read_log(log)
        assert killed == kill_at, f"{what}: the log says the server died before {killed}"
        assert [c[0] for c in got] == [c[0] for c in calls[:kill_at]], f"{what}: the calls differ from the reference"
        assert error is not None, f"{what}: every client operation succeeded with the server dead"
        r = run(["fusermount3", "-u", "-z", str(mnt)])
        assert r.returncode == 0, r.stderr
        wait_unmounted(mnt)
        # unionfs again, over the same upper layer and workdir
        pid = self.mount(d, plain_env())
        left = self.stale(d)
        got_view = view(mnt)
        self.umount(mnt, pid)
        assert not left, f"{what}: stale entries after the remount: {left}"
        matches = [i for i, v in enumerate(views) if v == got_view]
        assert matches, (f"{what}: the remounted view is none of the states before or after an operation; "
                         f"closest, the state before:\n{view_diff(got_view, views[0])}\n"
                         f"the state after:\n{view_diff(got_view, views[-1])}")
        return Outcome(kill_at, matches[0], f"{type(error).__name__}: {error.strerror}", what, got_view, d)


@pytest.fixture(scope="module")
def kernel_reason(tmp_path_factory: pytest.TempPathFactory, fuse_ready: None) -> str | None:
    d = tmp_path_factory.mktemp("kernel-probe")
    d.chmod(0o755)
    return kernel_view_unavailable(d)


def _marks(c: Change) -> list[pytest.MarkDecorator]:
    marks = [pytest.mark.xfail(strict=True, reason=c.known_bug)] if c.known_bug else []
    if c.needs_root:
        marks.append(needs_root("the change is made by another user, whose requests only root's server serves"))
    return marks


@pytest.mark.parametrize("change", [pytest.param(c, id=c.name, marks=_marks(c)) for c in CHANGES])
def test_killed_at_every_step(change: Change, base: Path, mounts: Mounts, kernel_reason: str | None) -> None:
    h = Harness(base, mounts, change)
    views, calls, done = h.reference()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        outcomes = list(pool.map(lambda k: h.kill_run(k, views, calls), range(1, len(calls) + 1)))
    states = [o.state for o in outcomes]
    print(f"\n{change.name}: {len(calls)} steps; state after a kill before each: {states}")
    # a later crash never leaves an earlier state
    assert states == sorted(states), f"{change.name}: states by kill point: {states}"
    if kernel_reason is not None:
        pytest.skip(f"unionfs's side checked; {kernel_reason}")
    kernel = h.kernel([done] + [o.dirs for o in outcomes])
    assert kernel[0] == views[-1], f"{change.name}: the kernel shows the change otherwise:\n" \
                                   f"{view_diff(kernel[0], views[-1])}"
    for o, kv in zip(outcomes, kernel[1:], strict=True):
        assert kv == o.view, f"{o.what}: kernel overlayfs shows the upper layer otherwise:\n{view_diff(kv, o.view)}"


# -- the kill points themselves ---------------------------------------------------------------------------------


def _small_stack(base: Path, tag: str) -> tuple[str, dict[str, Path]]:
    root = base / tag
    d = {k: root / k for k in ("l1", "upper", "work", "mnt", "scratch")}
    for p in d.values():
        p.mkdir(parents=True)
    for p in (root, d["l1"], d["upper"], d["mnt"]):
        p.chmod(0o755)
    put(d["l1"] / "f", b"lower\n")
    return f"lowerdir={d['l1']},upperdir={d['upper']},workdir={d['work']}", d


def _mount_with(mounts: Mounts, opts: str, mnt: Path, env: dict[str, str]) -> int:
    mounts.points.append(mnt)
    r = cli("mount", "-o", opts, mnt, env=env)
    assert r.returncode == 0, f"mount failed ({r.returncode}): {r.stderr}"
    mounts.track(mnt)
    pid = server_pid(mnt)
    assert pid is not None
    return pid


def test_kill_points_count_the_steps_of_a_copy_up_and_kill_before_the_first(base: Path, mounts: Mounts) -> None:
    # recording only: a copy-up is many calls, the temporary file in the workdir first, renameat2 into place
    opts, d = _small_stack(base, "record")
    log, trigger = d["scratch"] / "calls.log", d["scratch"] / "armed"
    pid = _mount_with(mounts, opts, d["mnt"], killpoints_env(0, trigger, log))
    write_at("f", b"UPPER")(d["mnt"])  # not armed yet: nothing is counted
    assert killpoints.read_log(log) == ([], None)
    trigger.touch()
    (d["mnt"] / "f").chmod(0o600)  # armed: a copy-up of metadata
    assert (d["mnt"] / "f").read_bytes() == b"UPPER\n"
    calls, killed = killpoints.read_log(log)
    assert killed is None and pid_alive(pid)
    events = [c[0] for c in calls]
    assert events == ["os.chmod"], calls  # f was copied up before the hook was armed
    opts, d = _small_stack(base, "record2")
    log, trigger = d["scratch"] / "calls.log", d["scratch"] / "armed"
    pid = _mount_with(mounts, opts, d["mnt"], killpoints_env(0, trigger, log))
    trigger.touch()
    write_at("f", b"UPPER")(d["mnt"])
    calls, killed = killpoints.read_log(log)
    events = [c[0] for c in calls]
    assert killed is None and len(calls) > 3, calls
    assert events[0] == "open" and "#unionfs-" in calls[0][1], "the copy is not built in the workdir first"
    rename_in = events.index("ctypes")
    assert calls[rename_in][1].startswith("renameat2("), calls
    assert {"os.chown", "os.chmod", "os.utime"} <= set(events[:rename_in]), calls
    assert events[-1] == "os.pwrite", "the client's write is the last call"
    # killed before the first call: the copy-up never starts, the client sees the server gone
    opts, d = _small_stack(base, "kill1")
    log, trigger = d["scratch"] / "calls.log", d["scratch"] / "armed"
    pid = _mount_with(mounts, opts, d["mnt"], killpoints_env(1, trigger, log))
    trigger.touch()
    error = tolerant(lambda: write_at("f", b"UPPER")(d["mnt"]))
    assert error is not None and error.errno in (errno.ENOTCONN, errno.ECONNABORTED), error
    assert wait_pid_exit(pid, 30)
    got, killed = killpoints.read_log(log)
    assert killed == 1 and [c[0] for c in got] == ["open"], got
    assert errno_of(lambda: (d["mnt"] / "f").read_bytes()) == errno.ENOTCONN
    assert os.listdir(d["upper"]) == [] and os.listdir(d["work"] / "work") == []
    run(["fusermount3", "-u", "-z", str(d["mnt"])])


# -- hard links ----------------------------------------------------------------------------------------------------


def test_regression_a_write_through_the_second_name_of_a_lower_hard_link(base: Path, mounts: Mounts) -> None:
    """(Regression: the names of a lower hard link were one node of the inode table, whose entry was the name
    resolved first; an OPEN carries only the inode, so a write through another name copied up and wrote the
    first name instead, and the name written through kept the old content.)"""
    h = Harness(base, mounts, next(c for c in CHANGES if c.name == "copy-up of a hard-linked file"))
    d = h.dirs("links")
    pid = h.mount(d, plain_env())
    os.stat(d["mnt"] / "h2")  # (both names known to the kernel, h2 first: as a listing of the directory may)
    os.stat(d["mnt"] / "h1")
    write_at("h1", b"NEW")(d["mnt"])
    shown = {n: (d["mnt"] / n).read_bytes() for n in ("h1", "h2")}
    h.umount(d["mnt"], pid)
    upper = sorted(os.listdir(d["upper"]))
    # as kernel overlayfs (without index=on): the name written through is copied up, the other still the lower
    assert (shown, upper) == ({"h1": b"NEW content\n", "h2": b"old content\n"}, ["h1"])


# -- a real server killed in the middle of a large copy-up --------------------------------------------------------

BIG = 200 << 20


@pytest.fixture(scope="module")
def big_lower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A lower layer holding ``big``, 200 MiB of data (no holes: a copy-up must copy every byte), and its
    SHA-256."""
    import hashlib

    top = tmp_path_factory.mktemp("big-lower")
    top.chmod(0o755)
    lower = top / "l1"
    lower.mkdir(mode=0o755)
    block = bytearray(os.urandom(1 << 20))
    h = hashlib.sha256()
    with open(lower / "big", "wb") as f:
        for i in range(BIG >> 20):
            block[:8] = i.to_bytes(8, "little")  # (every MiB different)
            f.write(block)
            h.update(block)
    (lower / "big").chmod(0o644)
    yield lower, h.hexdigest()
    (lower / "big").unlink()


def test_sigkill_in_the_middle_of_a_large_copy_up(big_lower: tuple[Path, str], base: Path, mounts: Mounts,
                                                  kernel_reason: str | None) -> None:
    lower, digest = big_lower
    d = {k: base / k for k in ("upper", "work", "mnt", "scratch")}
    for p in d.values():
        p.mkdir(mode=0o755)
    opts = f"lowerdir={lower},upperdir={d['upper']},workdir={d['work']}"
    pid = _mount_with(mounts, opts, d["mnt"], plain_env())
    tmp_dir = d["work"] / "work"
    outcome: dict[str, object] = {}

    def writer() -> None:  # opening for writing copies the file up: the client waits for the whole copy
        try:
            os.close(os.open(d["mnt"] / "big", os.O_WRONLY))
        except OSError as exc:
            outcome["error"] = exc
        else:
            outcome["error"] = None

    def copying() -> int:
        """Bytes copied so far into the temporary copy in the workdir (0 when there is none yet)."""
        with contextlib.suppress(OSError):
            for name in os.listdir(tmp_dir):
                return os.lstat(tmp_dir / name).st_size
        return 0

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while copying() < 16 << 20 and "error" not in outcome:  # (polled tightly: the copy may take a tenth of a second)
        assert time.monotonic() < deadline, "the copy-up did not start"
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)
    copied = copying()
    in_place = os.path.lexists(d["upper"] / "big")
    assert wait_pid_exit(pid, 30), "the server survived SIGKILL"
    t.join(60)
    assert not t.is_alive(), "the client still waits on a dead server"
    assert outcome["error"] is not None and not in_place, "the copy-up finished before the kill: nothing was tested"
    print(f"\nkilled with {copied >> 20} of {BIG >> 20} MiB copied ({'syncing' if copied == BIG else 'copying'}); "
          f"the client got {outcome['error']!r}")
    assert copied > 0 and not os.path.lexists(d["upper"] / "big"), "a partial copy is visible in the upper layer"
    assert run(["fusermount3", "-u", "-z", str(d["mnt"])]).returncode == 0
    wait_unmounted(d["mnt"])
    pid = _mount_with(mounts, opts, d["mnt"], plain_env())
    left = os.listdir(tmp_dir)
    got = view(d["mnt"])
    Harness.umount(d["mnt"], pid)
    assert left == [], f"stale entries in the workdir after the remount: {left}"
    assert got["big"]["sha256"] == digest and got["big"]["size"] == BIG
    assert sorted(got) == ["", "big"] and os.listdir(d["upper"]) == []
    if kernel_reason is not None:
        pytest.skip(f"unionfs's side checked; {kernel_reason}")
    kv = kernel_view([lower], d["upper"], d["scratch"])
    assert kv == got, view_diff(kv, got)

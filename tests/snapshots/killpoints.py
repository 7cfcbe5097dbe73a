"""Kill a store operation at every step: before each mutating system call it makes and at each named step.

A *spawner* process (``python -c 'import killpoints; killpoints.main()' SPEC``) imports everything once,
then for each kill point ``N`` copies the template store, forks a child that opens the store, installs a
CPython audit hook (:func:`sys.addaudithook`) and runs the operation; the hook counts the events that change
the file system (``os.mkdir``, ``os.rename``/``os.replace``, ``os.remove``, ``os.rmdir``, ``os.link``,
``os.symlink``, ``os.chmod``, ``os.chown``, ``os.utime``, ``os.truncate``, ``os.setxattr``,
``os.removexattr``, ``open`` with a flag that writes or creates, and the calls without an event of their own
that tests/killpoints wraps: the rule every kill-point test shares), ``sqlite3.connect``, the processes
started, the ctypes functions of :mod:`unionfs._sys`, and the store's named steps (``_snapshotter.crash_hook``,
around the SQLite transactions, whose own writes raise no audit event), and sends itself SIGKILL at the
``N``-th one, before it takes effect.

A first run kills nothing: it counts the events (``N`` = 1 .. count are the kill points) and leaves the
state of an uninterrupted operation. Audit hooks cannot be removed, which is why each run is a fresh child.

Plain Python, no pytest: the spawner imports it as a module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any


def _file_system_rules() -> ModuleType:
    """tests/killpoints/killpoints.py: which audit events are changes of a file system, the rule every kill-point
    test counts by (loaded from its file, beside this module's own name)."""
    path = Path(__file__).resolve().parents[1] / "killpoints" / "killpoints.py"
    spec = importlib.util.spec_from_file_location("_file_system_killpoints", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_rules = _file_system_rules()
#: Audit events the store's operations count besides the changes of a file system: SQLite opening its
#: database, and the processes they start (their argument tuples are logged as given).
STORE_EVENTS = frozenset({"sqlite3.connect", "os.fork", "os.forkpty", "os.posix_spawn", "subprocess.Popen"})
#: The prefix of the pseudo-events of the C functions :mod:`unionfs._sys` calls through ctypes (mount(2),
#: renameat2(2), ...): foreign function calls raise no audit event, so the child wraps them.
CTYPES = "ctypes:"
#: The pseudo-event of a named step of the store.
STEP = "step"


def counts(event: str, args: tuple[Any, ...]) -> bool:
    """Whether the audit event ``event`` is a kill point."""
    return event in STORE_EVENTS or event == STEP or event.startswith(CTYPES) or bool(_rules.counts(event, args))


# -- operations ------------------------------------------------------------------------------------------------
#
# Each takes the store's root; ``open`` says whether the child opens the Snapshotter before the hook goes in
# (an operation that opens the store itself, like a CLI command, is killed while opening it too).


def _op_prepare(sn: Any, root: str) -> None:
    sn.prepare("new", "base", labels={"made": "now"})


def _op_view(sn: Any, root: str) -> None:
    sn.view("v", "leaf", labels={"made": "now"})


def _op_commit(sn: Any, root: str) -> None:
    sn.commit("work-c", "work")


def _op_remove(sn: Any, root: str) -> None:
    sn.remove("side")


def _op_remove_all(sn: Any, root: str) -> None:
    sn.remove_all(["leaf", "v0"])


def _op_remove_big(sn: Any, root: str) -> None:
    sn.remove("big")


def _op_cleanup(sn: Any, root: str) -> None:
    sn.cleanup()


def _op_fsck_repair(sn: Any, root: str) -> None:
    sn.fsck(repair=True)


def _op_mount_ended(sn: Any, root: str) -> None:
    _spec, record = sn.begin_mount("work", os.path.join(os.path.dirname(root), "mp"))
    sn.mount_ended(record)


def _op_mount_placed(sn: Any, root: str) -> None:
    # nothing is mounted on mp: placing finds no mount there and drops the record
    _spec, record = sn.begin_mount("v0", os.path.join(os.path.dirname(root), "mp"))
    sn.mount_placed(record)


def _op_remove_image(sn: Any, root: str) -> None:
    sn.remove_image("img")


def _op_chain_mount(sn: Any, root: str) -> None:
    _spec, record = sn.begin_chain_mount("leaf", os.path.join(os.path.dirname(root), "mp"))
    sn.mount_ended(record)


def _op_create(sn: Any, root: str) -> None:
    from unionfs.snapshots import Snapshotter

    Snapshotter(root).close()


def _cli(*args: str) -> Callable[[Any, str], None]:
    def run(sn: Any, root: str) -> None:
        from unionfs.snapshots.cli import main as cli_main

        status = cli_main(["--root", root, *args])
        if status not in (0, 1) or (status == 1 and args[0] != "fsck"):  # fsck: 1 when it repaired
            raise SystemExit(f"unionfs snapshot {' '.join(args)}: exit status {status}")

    return run


def _op_probe(sn: Any, root: str) -> None:
    """What the test of the mechanism runs: a known sequence of events in ``root``."""
    from unionfs.snapshots import _snapshotter

    with open(os.path.join(root, "read-only"), "rb") as f:  # not a kill point
        f.read()
    os.mkdir(os.path.join(root, "a"))                        # 1
    with open(os.path.join(root, "b"), "wb") as f:           # 2
        f.write(b"b")
    _snapshotter._step("probe.step")                         # 3
    os.rename(os.path.join(root, "b"), os.path.join(root, "c"))  # 4
    os.remove(os.path.join(root, "c"))                       # 5
    fd = os.open(os.path.join(root, "d"), os.O_WRONLY | os.O_CREAT, 0o644)  # 6
    os.close(fd)


#: name: (operation, whether the child opens the Snapshotter before installing the hook)
OPS: dict[str, tuple[Callable[[Any, str], None], bool]] = {
    "prepare": (_op_prepare, True),
    "view": (_op_view, True),
    "commit": (_op_commit, True),
    "remove": (_op_remove, True),
    "remove_all": (_op_remove_all, True),
    "remove_big": (_op_remove_big, True),
    "remove_image": (_op_remove_image, True),
    "cleanup": (_op_cleanup, True),
    "fsck_repair": (_op_fsck_repair, True),
    "mount_ended": (_op_mount_ended, True),
    "mount_placed": (_op_mount_placed, True),
    "chain_mount": (_op_chain_mount, True),
    "create": (_op_create, False),
    "cli_cleanup": (_cli("cleanup"), False),
    "cli_rm": (_cli("rm", "leaf", "v0"), False),
    "cli_fsck_repair": (_cli("fsck", "--repair"), False),
    "cli_mount": (lambda sn, root: _cli("mount", "v0", os.path.join(os.path.dirname(root), "mp"))(sn, root), False),
    "probe": (_op_probe, False),
}


# -- the child -------------------------------------------------------------------------------------------------


def _wrap_foreign_functions(hook: Callable[[str, tuple[Any, ...]], None]) -> None:
    """Make each ctypes function of :mod:`unionfs._sys` call ``hook`` first (its event ``ctypes:NAME``)."""
    import ctypes

    from unionfs import _sys

    for name, value in list(vars(_sys).items()):
        if isinstance(value, ctypes._CFuncPtr):

            def wrapped(*args: Any, _f: Any = value, _name: str = name) -> Any:
                hook(CTYPES + _name, args)
                return _f(*args)

            setattr(_sys, name, wrapped)


def _child(op: str, root: str, kill_at: int, log_path: str, umask: int | None) -> None:
    """Run ``op`` on ``root`` with the hook killing at event ``kill_at`` (0: never); never returns."""
    status = 1
    try:
        if umask is not None:
            os.umask(umask)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        from unionfs.snapshots import Snapshotter, _snapshotter

        fn, opens = OPS[op]
        sn = Snapshotter(root, create=False) if opens else None
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        seen = [0]
        me = os.getpid()

        def hook(event: str, args: tuple[Any, ...]) -> None:
            if not counts(event, args) or os.getpid() != me:  # (a server forked by the operation inherits it)
                return
            seen[0] += 1
            os.write(log_fd, f"{seen[0]}\t{event}\t{args!r}\n".encode("utf-8", "backslashreplace"))
            if seen[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        _snapshotter.crash_hook = lambda name: hook(STEP, (name,))
        _wrap_foreign_functions(hook)
        _rules.audit_unaudited_os()
        sys.addaudithook(hook)
        fn(sn, root)
        if sn is not None:
            sn.close()
        os.write(log_fd, b"finished\n")
        status = 0
    except BaseException as exc:  # the parent reports it (the child's stderr is the spawner's)
        print(f"killpoints child {op} N={kill_at}: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        os._exit(status)


#: The system calls that change files (or may), for the kills :mod:`strace` injects: SQLite's writes to the
#: database and its write-ahead log, its fsyncs and truncations, and every other write of the operation.
SYSCALLS = (
    "openat", "write", "pwrite64", "writev", "pwritev", "fsync", "fdatasync", "ftruncate", "fallocate",
    "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat", "rmdir", "fchmod", "fchmodat",
    "fchown", "fchownat", "link", "linkat", "symlink", "symlinkat", "fsetxattr", "setxattr", "lsetxattr",
)


def _traced_child(op: str, root: str, log_path: str, ready: int, go: int) -> None:
    """Open the store, say so on ``ready``, wait for a byte on ``go`` (strace attaches meanwhile), run ``op``;
    never returns."""
    status = 1
    try:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        from unionfs.snapshots import Snapshotter

        fn, opens = OPS[op]
        sn = Snapshotter(root, create=False) if opens else None
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(ready, b"r")
        os.read(go, 1)
        fn(sn, root)
        if sn is not None:
            sn.close()  # (SQLite checkpoints its log into the database here)
        os.write(log_fd, b"finished\n")
        status = 0
    except BaseException as exc:
        print(f"killpoints traced child {op}: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        os._exit(status)


def _run_traced(op: str, template: str, base: Path, kill: tuple[str, int] | None) -> dict[str, object]:
    """One run of ``op`` under strace: counting the calls of :data:`SYSCALLS` (``kill`` None) or killing at
    the k-th call of one of them."""
    base.mkdir()
    root = base / "store"
    shutil.copytree(template, root, symlinks=True)
    (base / "mp").mkdir()
    log = base / "events.log"
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        _traced_child(op, str(root), str(log), ready_w, go_r)
    os.close(ready_w)
    os.close(go_r)
    os.read(ready_r, 1)
    if kill is None:
        args = ["-e", "trace=" + ",".join(SYSCALLS), "-o", str(base / "strace.log")]
    else:
        args = ["-e", f"trace={kill[0]}", "-e", f"inject={kill[0]}:signal=KILL:when={kill[1]}", "-o", os.devnull]
    tracer = subprocess.Popen(["strace", "-qq", "-p", str(pid), *args], stderr=subprocess.PIPE)
    while not _traced(pid):
        if tracer.poll() is not None:
            raise RuntimeError(f"strace failed: {tracer.stderr.read() if tracer.stderr else ''!r}")
    os.write(go_w, b"g")
    _, status = os.waitpid(pid, 0)
    tracer.wait(timeout=60)
    os.close(ready_r)
    os.close(go_w)
    _, finished = read_log(log)
    counted: dict[str, int] = {}
    if kill is None:
        for line in (base / "strace.log").read_text().splitlines():
            name = line.partition("(")[0]
            if name in SYSCALLS:
                counted[name] = counted.get(name, 0) + 1
    return {"n": f"{kill[0]}#{kill[1]}" if kill else 0, "dir": str(base), "finished": finished,
            "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
            "exit": os.waitstatus_to_exitcode(status), "events": counted,
            "last": f"the call {kill[1]} of {kill[0]}" if kill else None}


def _traced(pid: int) -> bool:
    """Whether a tracer is attached to ``pid`` (TracerPid in its status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1]) != 0
    return False


def read_log(path: str | os.PathLike[str]) -> tuple[list[str], bool]:
    """The events a child logged (``event<TAB>args``, in order) and whether it finished."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return [], False
    finished = bool(lines) and lines[-1] == "finished"
    return [line.split("\t", 1)[1] for line in lines if line != "finished"], finished


def _run_one(op: str, template: str, base: Path, kill_at: int, umask: int | None) -> dict[str, object]:
    base.mkdir()
    root = base / "store"
    if os.path.exists(template):
        shutil.copytree(template, root, symlinks=True)
    (base / "mp").mkdir()
    log = base / "events.log"
    pid = os.fork()
    if pid == 0:
        _child(op, str(root), kill_at, str(log), umask)
    _, status = os.waitpid(pid, 0)
    events, finished = read_log(log)
    return {"n": kill_at, "dir": str(base), "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
            "exit": os.waitstatus_to_exitcode(status), "finished": finished, "events": len(events),
            "last": events[-1] if events else None}


def main() -> None:
    """The spawner: ``SPEC`` (a JSON file) names op, template, out (a new directory), sample (null: every
    kill point, else a list of them) and umask; writes out/result.json."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    sys.dont_write_bytecode = True
    import unionfs.fuse.server  # noqa: F401  (everything a child needs, loaded before the first fork)
    import unionfs.snapshots.cli  # noqa: F401

    out = Path(spec["out"])
    op, template, umask = spec["op"], spec["template"], spec.get("umask")
    if spec.get("strace"):
        dry = _run_traced(op, template, out / "dry", None)
        counted = dry["events"]
        assert isinstance(counted, dict)
        kills = [(name, k) for name in SYSCALLS for k in range(1, counted.get(name, 0) + 1)]
        runs = [_run_traced(op, template, out / f"{name}-{k:05d}", (name, k)) for name, k in kills]
        (out / "result.json").write_text(json.dumps({"dry": dry, "runs": runs}))
        return
    dry = _run_one(op, template, out / "dry", 0, umask)
    runs = []
    if dry["finished"]:
        total = int(str(dry["events"]))
        points = spec["sample"] if spec.get("sample") is not None else range(1, total + 1)
        runs = [_run_one(op, template, out / f"{n:05d}", n, umask) for n in points if 1 <= n <= total]
    (out / "result.json").write_text(json.dumps({"dry": dry, "runs": runs}))


# -- the test's side -------------------------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent


def spawn(op: str, template: Path, out: Path, sample: Sequence[int] | None = None, umask: int | None = None,
          timeout: float = 300, strace: bool = False) -> dict[str, Any]:
    """Run the spawner for ``op`` on a copy of ``template`` per kill point under ``out``; its result. With
    ``strace``, the kill points are the calls of :data:`SYSCALLS` instead, each killed by strace."""
    import unionfs

    out.mkdir(parents=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"op": op, "template": str(template), "out": str(out),
                                "sample": list(sample) if sample is not None else None, "umask": umask,
                                "strace": strace}))
    top = str(Path(unionfs.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([top, str(HERE)]), PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-c", "import killpoints; killpoints.main()", str(spec)],
                       capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"the spawner failed ({r.returncode}): {r.stderr[-3000:]}"
    result: dict[str, Any] = json.loads((out / "result.json").read_text())
    result["stderr"] = r.stderr
    return result

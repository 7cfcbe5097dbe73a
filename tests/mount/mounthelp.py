"""Helpers of the real-mount tests: run the CLI, read the mount table, wait for servers, tear everything down.

Every wait polls with a deadline; nothing relies on a fixed sleep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from unionfs.fuse.server import pid_file

PY = sys.executable


def _unionfs_exe() -> Path:
    """The ``unionfs`` command: beside the interpreter (a venv), else the one on PATH (the rootless pass runs the
    system interpreter with the packages on PYTHONPATH and the command in a directory of its own)."""
    beside = Path(sys.executable).parent / "unionfs"
    if beside.exists():
        return beside
    found = shutil.which("unionfs")
    return Path(found) if found else beside


UNIONFS_EXE = _unionfs_exe()
BIN = UNIONFS_EXE.parent
DEADLINE = 15.0


def needs_root(why: str) -> pytest.MarkDecorator:
    """Skip the test, saying why, unless it runs as root (the rootless pass, tests/run-rootless.sh, runs the
    suite as an ordinary user)."""
    return pytest.mark.skipif(os.geteuid() != 0, reason=f"needs root: {why}")


def env_with_bin() -> dict[str, str]:
    """The environment with the directory of the ``unionfs`` executable first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    return env


def cli(*args: str | os.PathLike[str], timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    """``python -m unionfs ARGS...``"""
    return run([PY, "-m", "unionfs", *map(str, args)], timeout=timeout, **kw)


def run(argv: list[str], timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload,no-any-return]


# -- the mount table -------------------------------------------------------------------------------------------


def _unescape(field: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


@dataclasses.dataclass(frozen=True)
class MountInfo:
    target: str
    fstype: str
    source: str
    mount_opts: frozenset[str]
    super_opts: frozenset[str]


def mounts() -> list[MountInfo]:
    """Parsed /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.rstrip(b"\n").split(b" ")
            sep = fields.index(b"-")
            out.append(MountInfo(
                target=os.fsdecode(_unescape(fields[4])),
                fstype=os.fsdecode(fields[sep + 1]),
                source=os.fsdecode(_unescape(fields[sep + 2])),
                mount_opts=frozenset(os.fsdecode(fields[5]).split(",")),
                super_opts=frozenset(os.fsdecode(fields[sep + 3]).split(",")),
            ))
    return out


def mount_of(path: str | os.PathLike[str]) -> MountInfo | None:
    """The top-most mount on exactly ``path``, or None."""
    target = os.path.realpath(path)
    found = None
    for m in mounts():
        if m.target == target:
            found = m
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return mount_of(path) is not None


def wait_until(pred: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def wait_mounted(path: str | os.PathLike[str], timeout: float = DEADLINE) -> None:
    wait_until(lambda: is_mounted(path), f"{path} to be mounted", timeout)


def wait_unmounted(path: str | os.PathLike[str], timeout: float = DEADLINE) -> None:
    wait_until(lambda: not is_mounted(path), f"{path} to be unmounted", timeout)


# -- server processes ------------------------------------------------------------------------------------------


def server_pid(mountpoint: str | os.PathLike[str]) -> int | None:
    """The pid the server wrote for ``mountpoint`` (None when there is no pid file)."""
    try:
        with open(pid_file(str(mountpoint))) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is running (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return False
    state = data[data.rindex(b")") + 2 : data.rindex(b")") + 3]
    return state not in (b"Z", b"X")


def open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def wait_pidfd(pidfd: int, timeout: float) -> bool:
    """Whether the process behind ``pidfd`` exited within ``timeout`` seconds."""
    ready, _, _ = select.select([pidfd], [], [], timeout)
    return bool(ready)


def wait_pid_exit(pid: int, timeout: float = DEADLINE) -> bool:
    fd = open_pidfd(pid)
    if fd is None:
        return not pid_alive(pid)
    try:
        return wait_pidfd(fd, timeout) or not pid_alive(pid)
    finally:
        os.close(fd)


# -- snapshots of directories (to prove that a failed mount changed nothing) ----------------------------------


def snapshot(*roots: Path, skip: Iterable[Path] = ()) -> dict[str, tuple[int, int, int, int]]:
    """(mode, size, mtime_ns, ino) of every object under ``roots`` (not following links, not entering
    ``skip``)."""
    skipped = {os.path.realpath(p) for p in skip}
    out: dict[str, tuple[int, int, int, int]] = {}

    def add(p: str) -> os.stat_result:
        st = os.lstat(p)
        out[p] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
        return st

    for root in roots:
        if not os.path.lexists(root):
            out[str(root)] = (0, 0, 0, 0)
            continue
        if not stat.S_ISDIR(add(str(root)).st_mode) or str(root) in skipped:
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in list(dirnames):
                full = os.path.join(dirpath, name)
                add(full)
                if full in skipped:
                    dirnames.remove(name)
            for name in filenames:
                add(os.path.join(dirpath, name))
    return out


# -- layer stacks ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Layers:
    """Two lowers, an upper, a workdir and a mountpoint under ``base``."""

    base: Path
    l1: Path
    l2: Path
    upper: Path
    work: Path
    mnt: Path

    @classmethod
    def create(cls, base: Path, name: str = "s") -> Layers:
        root = base / name
        paths = {k: root / k for k in ("l1", "l2", "upper", "work", "mnt")}
        for p in paths.values():
            p.mkdir(parents=True)
            p.chmod(0o755)
        root.chmod(0o755)
        return cls(base=root, **paths)

    def opts(self, *extra: str, upper: bool = True) -> str:
        o = [f"lowerdir={self.l1}:{self.l2}"]
        if upper:
            o += [f"upperdir={self.upper}", f"workdir={self.work}"]
        return ",".join(o + list(extra))


class Mounts:
    """Everything a test mounted (FUSE servers, foreground processes, tmpfs), undone in :meth:`cleanup`."""

    def __init__(self) -> None:
        self.points: list[Path] = []
        self.pids: set[int] = set()
        self.procs: list[subprocess.Popen[str]] = []
        self.tmpfs: list[Path] = []

    # unionfs mounts ------------------------------------------------------------------------------------------

    def track(self, mnt: Path) -> None:
        if mnt not in self.points:
            self.points.append(mnt)
        pid = server_pid(mnt)
        if pid is not None:
            self.pids.add(pid)

    def mount(self, opts: str, mnt: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        """``unionfs mount -o OPTS MNT``, which must succeed and leave ``mnt`` mounted."""
        self.points.append(mnt)
        r = cli("mount", *extra, "-o", opts, mnt)
        assert r.returncode == 0, f"mount failed ({r.returncode}): {r.stderr}"
        assert is_mounted(mnt), "`unionfs mount` returned before the mount was in place"
        self.track(mnt)
        return r

    def try_mount(self, *args: str | os.PathLike[str], mnt: Path) -> subprocess.CompletedProcess[str]:
        """Run ``unionfs mount ARGS`` expecting anything; ``mnt`` is cleaned up if it got mounted."""
        self.points.append(mnt)
        r = cli("mount", *args)
        self.track(mnt)
        return r

    def umount(self, mnt: Path) -> None:
        r = cli("umount", mnt)
        assert r.returncode == 0, f"umount failed ({r.returncode}): {r.stderr}"
        assert not is_mounted(mnt)

    def foreground(self, opts: str, mnt: Path, *extra: str) -> subprocess.Popen[str]:
        """``unionfs mount -f -o OPTS MNT`` in a child process, returned once the mount is in place."""
        self.points.append(mnt)
        p = subprocess.Popen([PY, "-m", "unionfs", "mount", "-f", *extra, "-o", opts, str(mnt)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        self.pids.add(p.pid)
        deadline = time.monotonic() + DEADLINE
        while not is_mounted(mnt):
            if p.poll() is not None:
                err = p.stderr.read() if p.stderr else ""
                raise AssertionError(f"foreground server exited with {p.returncode}: {err}")
            if time.monotonic() > deadline:
                raise AssertionError(f"foreground mount of {mnt} not ready after {DEADLINE} s")
            time.sleep(0.01)
        return p

    # tmpfs ---------------------------------------------------------------------------------------------------

    def mount_tmpfs(self, where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.tmpfs.append(where)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "unionfs-test", str(where)], check=True)

    # teardown ------------------------------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Unmount and stop everything; returns what had to be forced (for the caller to report)."""
        problems: list[str] = []
        for mnt in reversed(self.points):
            pid = server_pid(mnt)
            if pid is not None:
                self.pids.add(pid)
            while is_mounted(mnt):
                problems.append(f"{mnt} still mounted at teardown")
                r = run(["fusermount3", "-u", "-z", str(mnt)])
                if r.returncode != 0:
                    run(["umount", "-l", str(mnt)])
                    if is_mounted(mnt):
                        break
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
            with contextlib.suppress(Exception):
                p.stdout.close()  # type: ignore[union-attr]
                p.stderr.close()  # type: ignore[union-attr]
        for pid in self.pids:
            if pid_alive(pid) and not wait_pid_exit(pid, 5):
                problems.append(f"server {pid} still running at teardown; killed")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for mnt in self.points:  # a killed server cannot remove its pid file
            pid = server_pid(mnt)
            if pid is not None and not pid_alive(pid) and not is_mounted(mnt):
                with contextlib.suppress(OSError):
                    os.unlink(pid_file(str(mnt)))
        for where in reversed(self.tmpfs):
            while is_mounted(where):
                if run(["umount", "-l", str(where)]).returncode != 0:
                    problems.append(f"cannot unmount tmpfs {where}")
                    break
        return problems


def rmtree_unmounted(root: Path) -> None:
    """Remove ``root`` unless something is still mounted beneath it (then leave it, loudly)."""
    real = os.path.realpath(root)
    below = [m.target for m in mounts() if m.target == real or m.target.startswith(real + "/")]
    if below:
        raise AssertionError(f"refusing to remove {root}: still mounted: {below}")
    shutil.rmtree(root, ignore_errors=True)


def errno_of(fn: Callable[[], object]) -> int | None:
    """The errno ``fn()`` fails with, or None when it succeeds."""
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


def spare_pid(path: str) -> int | None:
    """The pid of the spare listening at ``path`` (the listener's credentials), or None."""
    import socket
    import struct

    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[0])
    except OSError:
        return None
    finally:
        conn.close()


def ppid(pid: int) -> int:
    """The parent of process ``pid``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2:].split()[1])


def stop(pid: int | None) -> None:
    """End process ``pid`` (SIGTERM) and wait for it, if it is alive."""
    if pid is not None and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        wait_pid_exit(pid)

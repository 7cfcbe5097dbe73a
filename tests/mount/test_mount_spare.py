"""``-o spare``: the first server forks a spare that has loaded pyfuse3 and trio; the next mount of the same
user is handed to it and served at once. Without the option no spare starts; a spare exits when idle; a
spare gone away leaves the command to start its own server."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounthelp import DEADLINE, Layers, Mounts, ppid, server_pid, spare_pid, stop, wait_pid_exit, wait_until

from unionfs.fuse import server, spare


def _spare_path() -> str:
    path = spare.socket_path(server.runtime_dirs())
    assert path is not None
    return path



def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()




@pytest.fixture
def no_spare() -> Iterator[str]:
    """No spare of this user and installation before the test, and none left after it."""
    path = _spare_path()
    stop(spare_pid(path))
    yield path
    stop(spare_pid(path))


def _pair(base: Path) -> tuple[Layers, Layers]:
    pair = (Layers.create(base, "first"), Layers.create(base, "second"))
    for layers in pair:
        (layers.l1 / "f").write_text(f"{layers.base.name}\n")
    return pair


def _wait_spare(path: str) -> int:
    found: list[int] = []

    def listening() -> bool:
        pid = spare_pid(path)
        if pid is not None:
            found.append(pid)
        return pid is not None

    wait_until(listening, "a spare listening")
    return found[-1]


def _holds(pid: int, *roots: Path) -> list[str]:
    """What of /dev/fuse and of ``roots`` process ``pid`` has open."""
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target == "/dev/fuse" or any(target.startswith(str(r)) for r in roots):
            held.append(target)
    return held


def test_a_spare_serves_the_next_mount(base: Path, mounts: Mounts, no_spare: str) -> None:
    first, second = _pair(base)
    mounts.mount(first.opts("spare=30"), first.mnt)
    listener = _wait_spare(no_spare)
    assert _comm(listener) == "unionfs-spare"
    assert _holds(listener, first.base) == [], "the spare holds nothing of the mount it was forked beside"
    mounts.mount(second.opts("spare=30"), second.mnt)
    pid = server_pid(second.mnt)
    assert pid is not None and ppid(pid) == listener, "the second mount is served by a child of the spare"
    assert (second.mnt / "f").read_text() == "second\n"
    (second.mnt / "new").write_text("written\n")
    assert (second.upper / "new").read_text() == "written\n"
    assert (first.mnt / "f").read_text() == "first\n"
    assert _holds(listener, first.base, second.base) == [], "nor of the mount it handed to its server"
    first_server = server_pid(first.mnt)
    assert first_server is not None and ppid(listener) != first_server, "the spare is nobody's zombie"
    # both unmount, their servers exit, the spare stays
    mounts.umount(second.mnt)
    mounts.umount(first.mnt)
    assert wait_pid_exit(pid)
    assert spare_pid(no_spare) == listener


def test_regression_a_malformed_request_ends_no_spare(layers: Layers, mounts: Mounts, no_spare: str) -> None:
    """A request that is not JSON (or not an object) is dropped; the spare goes on waiting (it ended the
    spare)."""
    mounts.mount(layers.opts("spare=30"), layers.mnt)
    pid = _wait_spare(no_spare)
    for junk in (b"not json", b"[1, 2]"):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r, w = os.pipe()
        try:
            conn.connect(no_spare)
            socket.send_fds(conn, [junk], [r])
            conn.settimeout(5)
            assert conn.recv(64) == b"", "nothing is taken"
        finally:
            conn.close()
            os.close(r)
            os.close(w)
    assert spare_pid(no_spare) == pid


def test_without_the_option_no_spare_starts(layers: Layers, mounts: Mounts, no_spare: str) -> None:
    mounts.mount(layers.opts(), layers.mnt)
    assert (layers.mnt / "top.txt").read_text() == "from l1\n"
    time.sleep(0.3)  # (a spare would be listening by now: it is forked before the server serves)
    assert spare_pid(no_spare) is None


def test_a_spare_exits_when_idle(layers: Layers, mounts: Mounts, no_spare: str) -> None:
    mounts.mount(layers.opts("spare=0.5"), layers.mnt)
    pid = _wait_spare(no_spare)
    assert wait_pid_exit(pid, DEADLINE)
    assert not os.path.exists(no_spare), "the spare removes its socket"
    assert (layers.mnt / "top.txt").read_text() == "from l1\n", "the mount is served still"


def test_regression_a_spare_gone_away_leaves_the_command_to_serve(base: Path, mounts: Mounts,
                                                                  no_spare: str) -> None:
    """A spare killed without removing its socket: the next mount is served by the command's own server, which
    starts a new spare in its place."""
    first, second = _pair(base)
    mounts.mount(first.opts("spare=30"), first.mnt)
    old = _wait_spare(no_spare)
    os.kill(old, signal.SIGKILL)
    assert wait_pid_exit(old)
    assert os.path.exists(no_spare), "the socket of the killed spare stays behind"
    mounts.mount(second.opts("spare=30"), second.mnt)
    assert (second.mnt / "f").read_text() == "second\n"
    pid = server_pid(second.mnt)
    assert pid is not None and _comm(ppid(pid)) != "unionfs-spare", "served by the command's own server"
    new = _wait_spare(no_spare)
    assert new != old

"""The server's inode table against what the kernel holds: its size logged on SIGUSR1, one node per inode the
kernel references, all of them freed when the kernel forgets them, and the same answers afterwards."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from mounthelp import Layers, Mounts, cli, needs_root, pid_alive, server_pid

_LINE = re.compile(r"inode table: (\d+) nodes, (\d+) names, (\d+) listings kept \((\d+) names\); "
                   r"(\d+) files, (\d+) directories open")


def table(pid: int, log: Path) -> tuple[int, ...]:
    """The sizes the server logs on SIGUSR1 (nodes, names, listings, listed names, open files, open dirs)."""
    seen = len(_LINE.findall(log.read_text()))
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = _LINE.findall(log.read_text())
        if len(found) > seen:
            return tuple(map(int, found[-1]))
        time.sleep(0.02)
    raise AssertionError("no inode table line logged after SIGUSR1")


def test_sigusr1_logs_the_table(base: Path, mounts: Mounts, tmp_path: Path) -> None:
    layers = Layers.create(base)
    (layers.l2 / "d").mkdir()
    for i in range(50):
        (layers.l2 / "d" / f"f{i}").touch()
    log = tmp_path / "server.log"
    mounts.mount(layers.opts(), layers.mnt, "--log", str(log))
    pid = server_pid(layers.mnt)
    assert pid is not None
    assert table(pid, log)[:2] == (1, 1)  # the root alone
    names = os.listdir(layers.mnt / "d")
    with open(layers.mnt / "d" / "f3"):
        nodes, paths, listings, listed, files, dirs = table(pid, log)
        assert (nodes, paths) == (1 + 1 + len(names), 1 + 1 + len(names))  # root, d, every file listed
        assert listings == 1 and listed == 50  # the listing of d (kept for its lookups)
        assert (files, dirs) == (1, 0)
    assert pid_alive(pid)


def test_the_signal_never_ends_a_server_still_starting(base: Path, mounts: Mounts) -> None:
    """Regression: the server wrote its pid file (and the command returned) some 100 ms before it installed its
    SIGUSR1 handler, and the signal's default action ended it there, leaving the mount without a server. It is
    ignored from the server's start now; the handler replaces that once it is in place."""
    from unionfs.fuse.server import pid_files

    layers = Layers.create(base)
    (layers.l2 / "kept").write_text("still served\n")
    where = pid_files(str(layers.mnt))  # (found before the mount: looking then would wait for the server)
    mounts.points.append(layers.mnt)  # (unmounted at the end; Mounts.mount would wait for the server to answer)
    r = cli("mount", "-o", layers.opts(), layers.mnt)
    assert r.returncode == 0, r.stderr
    pid = next(int(Path(p).read_text().split()[0]) for p in where if Path(p).exists())
    os.kill(pid, signal.SIGUSR1)  # at once: the server is still loading pyfuse3 and trio
    mounts.pids.add(pid)
    assert (layers.mnt / "kept").read_text() == "still served\n"
    os.kill(pid, signal.SIGUSR1)  # and once it serves (the handler logs the table)
    assert (layers.mnt / "kept").read_text() == "still served\n"
    assert pid_alive(pid)


@needs_root("writes /proc/sys/vm/drop_caches to make the kernel forget inodes")
def test_forgotten_nodes_are_freed(base: Path, mounts: Mounts, tmp_path: Path) -> None:
    layers = Layers.create(base)
    for d in range(4):
        (layers.l2 / f"d{d}").mkdir()
        (layers.l1 / f"d{d}").mkdir()
        for i in range(300):
            (layers.l1 if i % 2 else layers.l2).joinpath(f"d{d}", f"f{i}").touch()
    log = tmp_path / "server.log"
    mounts.mount(layers.opts(), layers.mnt, "--log", str(log))
    pid = server_pid(layers.mnt)
    assert pid is not None
    before = {p: os.lstat(p).st_ino for p in layers.mnt.rglob("*")}
    assert len(before) == 4 + 4 * 300
    assert table(pid, log)[0] == 1 + len(before)
    hold = os.open(layers.mnt / "d2" / "f7", os.O_RDONLY)  # an open file keeps its node (and its parent's)
    try:
        deadline = time.monotonic() + 60
        while True:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
            nodes, paths = table(pid, log)[:2]
            if nodes <= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert nodes == 3 and paths == 3  # the root, d2 (the open file's dentry holds it) and the file
    finally:
        os.close(hold)
    after = {p: os.lstat(p).st_ino for p in layers.mnt.rglob("*")}
    assert after == before
    assert table(pid, log)[0] == 1 + len(before)

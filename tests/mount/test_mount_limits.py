"""Open-file limits: the server raises its soft RLIMIT_NOFILE to the hard limit when it starts (a spare's server
too, while the spare keeps the command's limits), serves thousands of files open at once, and when it runs out
of descriptors all the same the client gets EMFILE or ENFILE, never EIO, and nothing it had open breaks."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mounthelp import (
    PY,
    Layers,
    Mounts,
    errno_of,
    ppid,
    server_pid,
    spare_pid,
    stop,
    wait_until,
)

from unionfs.fuse import server, spare

#: a soft limit below the hard one, as a login shell commonly has it
LOW_SOFT = 1024
#: how many files the client holds open at once through the mount
LOWER_READ, LOWER_WRITE, NEW = 1500, 500, 1500
TOO_MANY = (errno.EMFILE, errno.ENFILE)


def _limits(pid: int) -> tuple[int, int]:
    """The (soft, hard) open-file limits of process ``pid``, from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return (resource.RLIM_INFINITY if soft == "unlimited" else int(soft),
                        resource.RLIM_INFINITY if hard == "unlimited" else int(hard))
    raise AssertionError(f"no open-file limit in /proc/{pid}/limits")


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _hard() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


@contextlib.contextmanager
def _low_soft_limit() -> Iterator[None]:
    """This process (and what it starts) with a soft open-file limit of LOW_SOFT for the time of the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= LOW_SOFT:
        pytest.skip(f"the hard open-file limit ({hard}) leaves no room above a soft limit of {LOW_SOFT}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_SOFT, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _limit_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "open-file limit" in line]


def test_server_raises_its_soft_limit_to_the_hard_one(layers: Layers, mounts: Mounts, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with _low_soft_limit():
        mounts.mount(layers.opts(), layers.mnt, "--log", str(log))
    pid = server_pid(layers.mnt)
    assert pid is not None
    soft, hard = _limits(pid)
    assert hard == _hard(), "the hard limit is the one inherited"
    assert soft == hard
    assert (layers.mnt / "top.txt").read_text() == "from l1\n"
    lines = _limit_lines(log)
    assert len(lines) == 1, f"said once: {lines}"
    assert f"raised from {LOW_SOFT} to {hard}" in lines[0]


def test_foreground_server_raises_its_limit_too(layers: Layers, mounts: Mounts) -> None:
    """(Regression: the limit was raised just after the mount appeared, so a look at it as soon as the mount was
    there could still find the old one.)"""
    with _low_soft_limit():
        proc = mounts.foreground(layers.opts(), layers.mnt)
    soft, hard = _limits(proc.pid)
    assert soft == hard == _hard()





def test_a_spare_keeps_the_commands_limit_and_its_server_raises_it(base: Path, mounts: Mounts,
                                                                   tmp_path: Path) -> None:
    """The spare's key holds the resource limits: it keeps the command's, so that the next command finds it;
    the server it starts for that command raises its own."""
    first, second = Layers.create(base, "first"), Layers.create(base, "second")
    (second.l1 / "f").write_text("second\n")
    log = tmp_path / "second.log"
    with _low_soft_limit():
        path = spare.socket_path(server.runtime_dirs())  # (the key of commands with this limit)
        assert path is not None
        stop(spare_pid(path))
        try:
            mounts.mount(first.opts("spare=30"), first.mnt)
            wait_until(lambda: spare_pid(path) is not None, "a spare listening")
            listener = spare_pid(path)
            assert listener is not None
            assert _limits(listener) == (LOW_SOFT, _hard()), "the spare keeps the limits it was started with"
            first_pid = server_pid(first.mnt)
            assert first_pid is not None and _limits(first_pid) == (_hard(), _hard())
            mounts.mount(second.opts("spare=30"), second.mnt, "--log", str(log))
            pid = server_pid(second.mnt)
            assert pid is not None and pid != first_pid
            assert ppid(pid) == listener, "served by a child of the spare"
            assert _limits(pid) == (_hard(), _hard())
            assert _limits(listener) == (LOW_SOFT, _hard()), "and the spare still has its own"
            assert (second.mnt / "f").read_text() == "second\n"
            lines = _limit_lines(log)
            assert len(lines) == 1 and f"raised from {LOW_SOFT}" in lines[0], lines
        finally:
            stop(spare_pid(path))


# -- thousands of files open at once ---------------------------------------------------------------------------

_MANY_CLIENT = r"""
import json, os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
d, n_read, n_write, n_new = sys.argv[1], *map(int, sys.argv[2:5])
fds = {}
for i in range(n_read):
    fds[f"r{i}"] = os.open(f"{d}/r{i}", os.O_RDONLY)
for i in range(n_write):
    fds[f"w{i}"] = os.open(f"{d}/w{i}", os.O_RDWR)
for i in range(n_new):
    fds[f"n{i}"] = os.open(f"{d}/n{i}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
print(len(fds), flush=True)
sys.stdin.readline()  # (the test counts the server's descriptors meanwhile)
wrong = []
for name, fd in fds.items():
    if name[0] != "r":
        os.pwrite(fd, f"written {name}\n".encode(), 0)
for name, fd in fds.items():
    want = f"lower {name}\n" if name[0] == "r" else f"written {name}\n"
    got = os.pread(fd, 4096, 0).decode()
    if got != want:
        wrong.append([name, got, want])
for fd in fds.values():
    os.close(fd)
print(json.dumps(wrong), flush=True)
"""


def test_thousands_of_files_open_at_once(layers: Layers, mounts: Mounts) -> None:
    total = LOWER_READ + LOWER_WRITE + NEW
    if _hard() != resource.RLIM_INFINITY and _hard() < total + 500:
        pytest.skip(f"the hard open-file limit ({_hard()}) is below the {total} files this opens")
    for lower in (layers.l1, layers.l2):
        (lower / "many").mkdir()
    for i in range(LOWER_READ):
        (layers.l2 / "many" / f"r{i}").write_text(f"lower r{i}\n")
    for i in range(LOWER_WRITE):
        (layers.l1 / "many" / f"w{i}").write_text(f"lower w{i}\n")
    with _low_soft_limit():  # (the server must raise the limit itself)
        mounts.mount(layers.opts(), layers.mnt)
    pid = server_pid(layers.mnt)
    assert pid is not None
    client = subprocess.Popen([PY, "-c", _MANY_CLIENT, str(layers.mnt / "many"), str(LOWER_READ),
                               str(LOWER_WRITE), str(NEW)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        opened = client.stdout.readline()
        if not opened:
            raise AssertionError(f"the client failed: {client.stderr.read() if client.stderr else ''}")
        assert int(opened) == total
        assert _fd_count(pid) >= total, "the server holds a descriptor for each file open"
        client.stdin.write("\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, err
    assert json.loads(out) == []
    for i in range(NEW):
        assert (layers.upper / "many" / f"n{i}").read_text() == f"written n{i}\n"
    for i in range(LOWER_WRITE):
        assert (layers.upper / "many" / f"w{i}").read_text() == f"written w{i}\n"
        assert (layers.l1 / "many" / f"w{i}").read_text() == f"lower w{i}\n", "the lower layer is untouched"
    assert not (layers.upper / "many" / "r0").exists(), "a file opened for reading is not copied up"
    # (the kernel sends the releases after the closes, without waiting for them)
    wait_until(lambda: _fd_count(pid) < 100, "the server to release the files once closed")


# -- out of descriptors ----------------------------------------------------------------------------------------

#: descriptors the server may still open, past those it holds, once its limit is lowered
_HEADROOM = 40


def _lower_server_limit(pid: int, soft: int) -> None:
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, _limits(pid)[1]))
    except PermissionError as exc:
        pytest.skip(f"cannot lower the server's open-file limit: {exc.strerror}")


def test_out_of_descriptors_is_emfile_and_breaks_nothing(layers: Layers, mounts: Mounts, tmp_path: Path) -> None:
    for name in ("d", "untouched", "untouched/sub"):
        (layers.l2 / name).mkdir()
    for i in range(200):
        (layers.l2 / "d" / f"f{i}").write_text(f"lower {i}\n")
    (layers.l2 / "untouched" / "a").write_text("a\n")
    (layers.l2 / "untouched" / "sub" / "b").write_text("b\n")
    (layers.l1 / "copy.txt").write_text("to copy up\n")
    log = tmp_path / "server.log"
    mounts.mount(layers.opts(), layers.mnt, "--log", str(log))
    mnt = layers.mnt
    os.listdir(mnt / "d")  # (looked up and listed before the limit: what is cached of it breaks nothing)
    pid = server_pid(mnt)
    assert pid is not None
    _lower_server_limit(pid, _fd_count(pid) + _HEADROOM)

    held: dict[str, int] = {}
    failed: int | None = None
    try:
        for i in range(200):
            name = f"f{i}" if i % 2 else f"new{i}"
            try:
                if i % 2:
                    held[name] = os.open(mnt / "d" / name, os.O_RDONLY)
                else:
                    held[name] = os.open(mnt / "d" / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as exc:
                failed = exc.errno
                break
        assert failed is not None, "the server ran out of descriptors"
        assert failed in TOO_MANY, f"open failed with {errno.errorcode.get(failed, failed)}, not EMFILE/ENFILE"
        assert len(held) >= _HEADROOM // 2, "the server used the descriptors it had"

        # Out of descriptors: what the client holds works, the rest fails cleanly.
        for name, fd in held.items():
            if name.startswith("new"):
                os.pwrite(fd, f"written {name}\n".encode(), 0)
        for name, fd in held.items():
            want = f"written {name}\n" if name.startswith("new") else f"lower {name[1:]}\n"
            assert os.pread(fd, 4096, 0).decode() == want, name
        for what, fn in [
            ("open", lambda: os.close(os.open(mnt / "d" / "f198", os.O_RDONLY))),
            ("create", lambda: os.close(os.open(mnt / "d" / "late", os.O_RDWR | os.O_CREAT, 0o644))),
            ("copy-up", lambda: os.close(os.open(mnt / "copy.txt", os.O_WRONLY))),
            ("stat", lambda: os.stat(mnt / "untouched" / "sub" / "b")),
            ("readdir", lambda: os.listdir(mnt / "untouched")),
            ("readdir of a listed directory", lambda: os.listdir(mnt / "d")),
        ]:
            code = errno_of(fn)
            assert code is None or code in TOO_MANY, f"{what}: {errno.errorcode.get(code, code)}"

        # Some closed: everything works again, with the right contents.
        for name in list(held)[: len(held) // 2]:
            os.close(held.pop(name))
        assert (mnt / "d" / "f198").read_text() == "lower 198\n"
        assert sorted(os.listdir(mnt / "untouched")) == ["a", "sub"]
        assert (mnt / "untouched" / "sub" / "b").read_text() == "b\n"
        with open(mnt / "copy.txt", "a") as f:
            f.write("appended\n")
        assert (mnt / "copy.txt").read_text() == "to copy up\nappended\n"
        (mnt / "d" / "late").write_text("late\n")
        assert (layers.upper / "d" / "late").read_text() == "late\n"
        listed = set(os.listdir(mnt / "d"))
        assert {f"f{i}" for i in range(200)} | {n for n in held if n.startswith("new")} | {"late"} <= listed
        for name, fd in held.items():
            want = f"written {name}\n" if name.startswith("new") else f"lower {name[1:]}\n"
            assert os.pread(fd, 4096, 0).decode() == want, name
    finally:
        for fd in held.values():
            os.close(fd)
    work = [p.name for p in (layers.work / "work").iterdir()] if (layers.work / "work").is_dir() else []
    assert work == [], f"nothing half-made is left in the work directory: {work}"
    text = log.read_text()
    assert "Traceback" not in text and "unexpected error" not in text, text


def _changes(mnt: Path, upper: Path, k: int) -> list[tuple[str, Callable[[], None], Callable[[bool], None]]]:
    """(what, change, check) for changes through ``mnt`` that each open a few descriptors in the server (and
    may copy up): ``check(done)`` asserts the state is the changed one (``done``) or the one before, whole."""

    def copy_up() -> None:
        with open(mnt / f"c{k}", "a") as f:
            f.write("more\n")

    def copied(done: bool) -> None:
        assert (mnt / f"c{k}").read_text() == f"c{k}\n" + ("more\n" if done else "")
        assert (upper / f"c{k}").exists() == done

    def create() -> None:
        (mnt / f"new{k}").write_text("new\n")

    def created(done: bool) -> None:
        if done:
            assert (mnt / f"new{k}").read_text() == "new\n"
        else:  # (as on the kernel, where the descriptor is taken before anything is made)
            assert not (mnt / f"new{k}").exists()
            assert not (upper / f"new{k}").exists()

    def unlink() -> None:
        os.unlink(mnt / "dirs" / f"u{k}")

    def unlinked(done: bool) -> None:
        assert (f"u{k}" in os.listdir(mnt / "dirs")) != done

    def mkdir_over() -> None:
        os.rmdir(mnt / "dirs" / f"e{k}")
        os.mkdir(mnt / "dirs" / f"e{k}")
        (mnt / "dirs" / f"e{k}" / "x").write_text("x\n")

    def remade(done: bool) -> None:
        names = os.listdir(mnt / "dirs" / f"e{k}") if (mnt / "dirs" / f"e{k}").exists() else None
        assert names in (None, [], ["x"]), names
        if done:
            assert names == ["x"]

    def rename() -> None:
        os.rename(mnt / "dirs" / f"r{k}", mnt / "dirs" / f"moved{k}")

    def renamed(done: bool) -> None:
        names = set(os.listdir(mnt / "dirs"))
        assert (f"moved{k}" in names) == done and (f"r{k}" in names) != done, names
        assert (mnt / "dirs" / (f"moved{k}" if done else f"r{k}")).read_text() == "renamed\n"

    return [("copy-up", copy_up, copied), ("create", create, created), ("unlink", unlink, unlinked),
            ("rmdir and mkdir", mkdir_over, remade), ("rename", rename, renamed)]


def test_changes_with_a_few_descriptors_left_fail_whole(layers: Layers, mounts: Mounts, tmp_path: Path) -> None:
    """With 0 to 5 descriptors left, each change either succeeds or fails with EMFILE/ENFILE leaving the state
    as it was (nothing half-made in the upper or work directory), and succeeds once descriptors are back."""
    steps = range(6)
    (layers.l2 / "dirs").mkdir()
    for k in steps:
        (layers.l2 / f"c{k}").write_text(f"c{k}\n")
        (layers.l2 / "dirs" / f"u{k}").write_text("u\n")
        (layers.l2 / "dirs" / f"e{k}").mkdir()
        (layers.l2 / "dirs" / f"r{k}").write_text("renamed\n")
    log = tmp_path / "server.log"
    mounts.mount(layers.opts(), layers.mnt, "--log", str(log))
    pid = server_pid(layers.mnt)
    assert pid is not None
    os.listdir(layers.mnt / "dirs")
    hard = _limits(pid)[1]
    idle = _fd_count(pid)
    outcomes: dict[str, set[int | None]] = {}
    for k in steps:
        for what, change, check in _changes(layers.mnt, layers.upper, k):
            wait_until(lambda: _fd_count(pid) <= idle, "the server to release what it opened")
            _lower_server_limit(pid, _fd_count(pid) + k)
            try:
                code = errno_of(change)
            finally:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
            outcomes.setdefault(what, set()).add(code)
            assert code is None or code in TOO_MANY, f"{what} with {k} left: {errno.errorcode.get(code, code)}"
            check(code is None)
            work = list((layers.work / "work").iterdir()) if (layers.work / "work").is_dir() else []
            assert work == [], f"{what} with {k} left made {work}"
            if code is not None:
                if what == "rmdir and mkdir" and not (layers.mnt / "dirs" / f"e{k}").exists():
                    os.mkdir(layers.mnt / "dirs" / f"e{k}")
                    (layers.mnt / "dirs" / f"e{k}" / "x").write_text("x\n")
                elif what == "rmdir and mkdir" and os.listdir(layers.mnt / "dirs" / f"e{k}") == []:
                    (layers.mnt / "dirs" / f"e{k}" / "x").write_text("x\n")
                else:
                    change()
                check(True)
    # (an unlink of a lower file makes its whiteout without opening anything; the others open files)
    assert all(outcomes[what] & set(TOO_MANY) for what in ("copy-up", "create", "rmdir and mkdir", "rename")), \
        outcomes
    text = log.read_text()
    assert "Traceback" not in text and "unexpected error" not in text, text

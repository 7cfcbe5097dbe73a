"""The FUSE shell loads the native part itself: ``unionfs mount`` (background and foreground) and spare servers
load the shim before pyfuse3; ``-o nonative`` and ``UNIONFS_NATIVE=off`` serve in the pure mode; a shim that
cannot load is said once in the log and the mount is served as without it; ``unionfs --version`` says which."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import random
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nativehelp import PY, REPO, fuse_unavailable, is_mounted, read_stats

from unionfs import __version__
from unionfs.options import parse, render

BUILT = sorted((REPO / "unionfs" / "_native").glob("_shim*.so"))


def test_nonative_option_parses_and_renders() -> None:
    assert parse(["lowerdir=/a"]).native is True
    spec = parse(["lowerdir=/a,nonative"])
    assert spec.native is False
    assert "nonative" in render(spec).split(",")
    assert parse([render(spec)]) == spec
    assert "native" not in render(parse(["lowerdir=/a,nonative,native"])).split(",")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIONFS_NATIVE") and k != "LD_PRELOAD"}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _version(**extra: str) -> list[str]:
    r = subprocess.run([PY, "-m", "unionfs", "--version"], env=_env(**extra), capture_output=True, text=True,
                       timeout=60, cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_version_says_the_native_part_is_available(shim: Path) -> None:
    lines = _version(UNIONFS_NATIVE_LIB=str(shim))
    assert lines[0] == f"unionfs {__version__}"  # (exactly: podman parses it)
    assert len(lines) == 2
    assert lines[1].startswith("native part: available (unionfs-native ")


def test_version_says_why_the_native_part_is_not_available(tmp_path: Path) -> None:
    lines = _version(UNIONFS_NATIVE_LIB=str(tmp_path / "missing.so"))
    assert lines == [f"unionfs {__version__}", f"native part: not available: {tmp_path / 'missing.so'} does not exist"]
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"not a library")
    lines = _version(UNIONFS_NATIVE_LIB=str(bad))
    assert lines[0] == f"unionfs {__version__}"
    assert lines[1].startswith("native part: not available: cannot open ")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Mount options of a two-layer stack and a mount point (unmounted, lazily, at the end)."""
    why = fuse_unavailable()
    if why is not None:
        pytest.skip(why)
    tmp_path.chmod(0o755)
    for d in ("l/d", "u", "w", "m"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "l" / "d" / "f").write_text("lower\n")
    mnt = tmp_path / "m"
    yield f"lowerdir={tmp_path / 'l'},upperdir={tmp_path / 'u'},workdir={tmp_path / 'w'}", mnt
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)


def _server_pid(mnt: Path) -> int:
    from unionfs.fuse.server import pid_file

    return int(Path(pid_file(str(mnt))).read_text())


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _unmount(mnt: Path, pid: int) -> None:
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True, capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _mount(opts: str, mnt: Path, log: Path, **extra: str) -> int:
    r = subprocess.run([PY, "-m", "unionfs", "mount", "-o", opts, "--log", str(log), str(mnt)], env=_env(**extra),
                       capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    assert is_mounted(mnt)
    return _server_pid(mnt)


def _log_lines(log: Path, word: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if word in line]


@pytest.mark.parametrize("openless", [True, False], ids=["open-less", "UNIONFS_NATIVE_OPENLESS=off"])
def test_background_server_loads_the_shim_and_caches_listings(stack: tuple[str, Path], shim: Path,
                                                              tmp_path: Path, openless: bool) -> None:
    """Listings are cached: by default the kernel opens directories itself (the first OPENDIR answered ENOSYS,
    none after it, nor any RELEASEDIR), and asks for a listing only when it has none or it changed; with
    UNIONFS_NATIVE_OPENLESS=off every directory open is Python's, its reply flagged cache_readdir."""
    opts, mnt = stack
    stats, log = tmp_path / "stats", tmp_path / "log"
    pid = _mount(opts, mnt, log, UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats),
                 **({} if openless else {"UNIONFS_NATIVE_OPENLESS": "off"}))
    assert str(shim) in _maps(pid)
    for _ in range(3):
        assert os.listdir(mnt / "d") == ["f"]
    (mnt / "d" / "g").write_text("new")
    assert sorted(os.listdir(mnt / "d")) == ["f", "g"]
    for _ in range(3):
        assert sorted(os.listdir(mnt / "d")) == ["f", "g"]
    _unmount(mnt, pid)
    got = read_stats(stats)
    assert got["session_wrapped"] == 1
    if openless:
        assert got["opendir"] == got["opendir_enosys"] == 1 and got["dir_cached"] == 0
        # the root's listing (at the mount), d's first and d's after the change: each read once, the rest cached
        assert 2 <= got["dir_openless"] <= 2 * 3, got
    else:
        assert got["opendir_enosys"] == 0 and got["dir_openless"] == 0
        assert got["dir_cached"] == got["opendir"] >= 7
    assert got["readdirplus"] <= 2 * 3  # (a listing asks twice: the entries, then their end)
    assert got["conn.max_write"] == 1 << 20
    lines = _log_lines(log, "native part")
    assert len(lines) == 1 and "native part: unionfs-native" in lines[0] and "cached listings" in lines[0]
    assert ("open-less directories" in lines[0]) == openless


@pytest.mark.parametrize("how", ["option", "environment"])
def test_nonative_serves_in_the_pure_mode(stack: tuple[str, Path], shim: Path, tmp_path: Path, how: str) -> None:
    opts, mnt = stack
    log = tmp_path / "log"
    extra = {"UNIONFS_NATIVE": "off"} if how == "environment" else {}
    pid = _mount(opts + (",nonative" if how == "option" else ""), mnt, log, UNIONFS_NATIVE_LIB=str(shim),
                 UNIONFS_NATIVE_STATS=str(tmp_path / "stats"), **extra)
    assert str(shim) not in _maps(pid)
    assert os.listdir(mnt / "d") == ["f"]
    _unmount(mnt, pid)
    assert not (tmp_path / "stats").exists()
    why = "-o nonative" if how == "option" else "UNIONFS_NATIVE=off"
    lines = _log_lines(log, "native part")
    assert len(lines) == 1 and f"native part not loaded ({why}): serving in the pure mode" in lines[0]


def test_a_shim_that_cannot_load_is_logged_once_and_the_mount_served(stack: tuple[str, Path], tmp_path: Path) -> None:
    opts, mnt = stack
    log = tmp_path / "log"
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"\x7fELF but not a library")
    pid = _mount(opts, mnt, log, UNIONFS_NATIVE_LIB=str(bad))
    assert (mnt / "d" / "f").read_text() == "lower\n"
    (mnt / "d" / "g").write_text("new")
    assert sorted(os.listdir(mnt / "d")) == ["f", "g"]
    _unmount(mnt, pid)
    lines = _log_lines(log, "native part")
    assert len(lines) == 1
    assert f"native part not loaded (cannot open {bad}" in lines[0] and lines[0].endswith("serving in the pure mode")


def test_foreground_server_loads_the_shim(stack: tuple[str, Path], shim: Path, tmp_path: Path) -> None:
    opts, mnt = stack
    stats = tmp_path / "stats"
    proc = subprocess.Popen([PY, "-m", "unionfs", "mount", "-f", "-o", opts, str(mnt)], cwd=str(REPO),
                            env=_env(UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        assert str(shim) in _maps(proc.pid)
        assert os.listdir(mnt / "d") == ["f"]
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)
        _out, err = proc.communicate(timeout=30)
    got = read_stats(stats)
    assert got["dir_cached"] + got["dir_openless"] >= 1
    assert "native part: unionfs-native" in err


def test_spare_servers_keep_the_mode_they_were_started_in(stack: tuple[str, Path], shim: Path,
                                                          tmp_path: Path) -> None:
    """A spare forked by a native server hands its mounts native servers (the shim is mapped in them); a mount
    with -o nonative is not handed to it (it gets a server of its own, in the pure mode)."""
    opts, mnt = stack
    env = {"UNIONFS_NATIVE_LIB": str(shim), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    (tmp_path / "run").mkdir(mode=0o700)
    first = _mount(opts + ",spare=20", mnt, tmp_path / "log1", **env)
    second_mnt, third_mnt = tmp_path / "m2", tmp_path / "m3"
    for m, name in ((second_mnt, "2"), (third_mnt, "3")):
        m.mkdir()
        for d in (f"u{name}", f"w{name}"):
            (tmp_path / d).mkdir()
    spares: list[int] = []
    try:
        deadline = time.monotonic() + 30
        sock = Path(_spare_socket(env))
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = _mount(f"lowerdir={tmp_path / 'l'},upperdir={tmp_path / 'u2'},workdir={tmp_path / 'w2'},spare=20",
                        second_mnt, tmp_path / "log2", **env)
        assert str(shim) in _maps(second)
        assert "handed over by its command" in (tmp_path / "log2").read_text()
        assert os.listdir(second_mnt / "d") == ["f"]
        third = _mount(f"lowerdir={tmp_path / 'l'},upperdir={tmp_path / 'u3'},workdir={tmp_path / 'w3'},"
                       "nonative,spare=20", third_mnt, tmp_path / "log3", **env)
        assert str(shim) not in _maps(third)
        assert "handed over by its command" not in (tmp_path / "log3").read_text()
        spares = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_spare(p, str(sock))]
        _unmount(second_mnt, second)
        _unmount(third_mnt, third)
    finally:
        for m in (second_mnt, third_mnt):
            if is_mounted(m):
                subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True, check=False)
        for pid in spares:  # (the spare this test started: its title names its socket, of this checkout's key)
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
    _unmount(mnt, first)


def _spare_socket(env: dict[str, str]) -> str:
    """Where the native spare of this checkout listens (the socket's name has the installation in its key)."""
    code = ("from unionfs.fuse import spare, server, native; from unionfs.options import parse; "
            "print(spare.socket_path(server.runtime_dirs(), native.wanted_kind(parse(['lowerdir=/']))))")
    return subprocess.run([PY, "-c", code], env=_env(**env), capture_output=True, text=True, cwd=str(REPO),
                          timeout=60).stdout.strip()


def _is_spare(proc: Path, path: str) -> bool:
    try:
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    return bool(path) and cmdline.startswith(b"unionfs-spare: ") and f"({path})".encode() in cmdline


def test_adaptive_readdirplus_serves_plain_listings_without_references(stack: tuple[str, Path], shim: Path,
                                                                       tmp_path: Path) -> None:
    """With the kernel's adaptive readdirplus (UNIONFS_NATIVE_CONFIG=readdirplus_auto), the continuation of a
    large listing comes as plain READDIR: the readdir handler finds its handle, lists every name once, and
    keeps no node for the plain entries (the kernel holds no reference to them)."""
    opts, mnt = stack
    lower = tmp_path / "l" / "big"
    lower.mkdir()
    names = [f"file-{i:04d}" for i in range(600)]
    for name in names:
        (lower / name).write_text(name)
    stats, log = tmp_path / "stats", tmp_path / "log"
    pid = _mount(opts, mnt, log, UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats),
                 UNIONFS_NATIVE_CONFIG="readdirplus_auto")
    listed = os.listdir(mnt / "big")
    assert sorted(listed) == names  # (each name once)
    os.kill(pid, 10)  # SIGUSR1: the server logs its inode table
    deadline = time.monotonic() + 30
    while not _log_lines(log, "inode table") and time.monotonic() < deadline:
        time.sleep(0.05)
    nodes = int(_log_lines(log, "inode table")[0].split("inode table: ")[1].split()[0])
    assert nodes < len(names) // 2, f"{nodes} nodes kept after a listing that was mostly plain"
    assert all((mnt / "big" / n).read_text() == n for n in names[::50])
    _unmount(mnt, pid)
    got = read_stats(stats)
    assert got["readdir_plain"] > 0 and got["entries_plain"] > len(names) // 2
    assert "adaptive readdirplus" in _log_lines(log, "native part")[0]
    assert "Traceback" not in log.read_text()


def test_data_path_serves_reads_and_writes_and_follows_copy_up(stack: tuple[str, Path], shim: Path,
                                                               tmp_path: Path) -> None:
    """The data path: reads and writes of open files go to the shim on the handle's descriptor; a handle opened
    for reading on the lower file before a copy-up reads the copy afterwards (as on the kernel), and a
    write never reaches the lower file."""
    opts, mnt = stack
    stats, log = tmp_path / "stats", tmp_path / "log"
    pid = _mount(opts, mnt, log, UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats),
                 UNIONFS_NATIVE_DATA="on")
    f = mnt / "d" / "f"
    with open(f, "rb", buffering=0) as reader:
        assert reader.read() == b"lower\n"
        with open(f, "r+b", buffering=0) as writer:  # (copies up)
            writer.write(b"UPPER")
            os.fsync(writer.fileno())
        os.posix_fadvise(reader.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(reader.fileno(), 100, 0) == b"UPPER\n"
    assert (tmp_path / "l" / "d" / "f").read_text() == "lower\n"
    assert (tmp_path / "u" / "d" / "f").read_text() == "UPPER\n"
    (mnt / "d" / "new").write_bytes(b"x" * 100_000)
    assert os.stat(mnt / "d" / "new").st_size == 100_000
    assert (mnt / "d" / "new").read_bytes() == b"x" * 100_000
    _unmount(mnt, pid)
    got = read_stats(stats)
    assert got["read_native"] > 0 and got["write_native"] > 0
    assert "data path" in _log_lines(log, "native part")[0]


@pytest.mark.parametrize("data", ["", "off"])
def test_data_path_is_on_unless_switched_off(stack: tuple[str, Path], shim: Path, tmp_path: Path, data: str) -> None:
    """The data path serves a native mount by default, with the shim's own reader thread; UNIONFS_NATIVE_DATA=off
    keeps reads and writes in Python (and the device to pyfuse3)."""
    opts, mnt = stack
    stats, log = tmp_path / "stats", tmp_path / "log"
    extra = {"UNIONFS_NATIVE_DATA": data} if data else {}
    pid = _mount(opts, mnt, log, UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats), **extra)
    assert (mnt / "d" / "f").read_text() == "lower\n"
    _unmount(mnt, pid)
    got = read_stats(stats)
    assert got["read"] >= 1
    assert (got["read_native"] == got["read"]) == (not data) and (got["read_native"] == 0) == bool(data)
    assert ("data path" in _log_lines(log, "native part")[0]) == (not data)
    assert ("own reader" in _log_lines(log, "native part")[0]) == (not data)
    assert (got["reader_served"] >= 1) == (not data)


@pytest.mark.parametrize("handoff", ["", "0"], ids=["handed off", "UNIONFS_NATIVE_HANDOFF=0"])
def test_copy_ups_hand_the_device_to_pyfuse3_and_a_burst_the_shim_answers_takes_it_back(
        stack: tuple[str, Path], shim: Path, tmp_path: Path, handoff: str) -> None:
    """Requests only Python answers, in a row (a copy-up's LOOKUP and OPEN), make the reader hand the device to
    pyfuse3's thread, which reads each request itself and answers there those the shim answers (the WRITE, the
    GETXATTR of security.capability before it); a burst of those (GETXATTR of a name a file lacks, again and
    again) gives the device back to the reader. The answers are the same either way (UNIONFS_NATIVE_HANDOFF=0:
    never handed off), and the server unmounts cleanly with the device handed off."""
    opts, mnt = stack
    lower = tmp_path / "l" / "d"
    for i in range(60):
        (lower / f"c{i}").write_text(f"{i}\n")
    stats, log = tmp_path / "stats", tmp_path / "log"
    extra = {"UNIONFS_NATIVE_HANDOFF": handoff} if handoff else {}
    pid = _mount(opts, mnt, log, UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats), **extra)
    for i in range(60):
        if i == 30:  # the burst
            for _ in range(100):
                with pytest.raises(OSError) as lacking:
                    os.getxattr(mnt / "d" / "c0", "user.lacking")
                assert lacking.value.errno == errno.ENODATA
        # (read-write: a write-only handle writes past the page cache, and the kernel asks no GETXATTR before it)
        fd = os.open(mnt / "d" / f"c{i}", os.O_RDWR | os.O_APPEND)
        assert os.write(fd, b"+") == 1
        os.close(fd)
    assert [(mnt / "d" / f"c{i}").read_text() for i in range(60)] == [f"{i}\n+" for i in range(60)]
    _unmount(mnt, pid)
    assert not is_mounted(mnt) and not Path(f"/proc/{pid}").exists()
    assert [(tmp_path / "u" / "d" / f"c{i}").read_text() for i in range(60)] == [f"{i}\n+" for i in range(60)]
    assert [(lower / f"c{i}").read_text() for i in range(60)] == [f"{i}\n" for i in range(60)]
    got = read_stats(stats)
    assert got["write_native"] == 60 and got["xattr_absent"] >= 150, got
    if handoff == "0":
        assert got["handoffs"] == got["handoff_served"] == 0, got
    else:
        # handed off at the first copy-up and again after the burst; the writes (and their questions) answered in
        # pyfuse3's thread, most of the burst by the reader
        assert got["handoffs"] >= 2 and got["handoff_served"] >= 2 * 55, got
        assert got["reader_served"] - got["handoff_served"] >= 90, got


def test_regression_a_server_stopped_by_a_signal_amid_pooled_reads_ends_and_unmounts(stack: tuple[str, Path],
                                                                                      shim: Path,
                                                                                      tmp_path: Path) -> None:
    """SIGTERM while a client streams a large file (its readahead queued to the read threads) and a listing's
    subdirectories are being read ahead: the server unmounts (libfuse closes its own descriptor of the device
    first), stops the reader, the read threads and the prefetch threads, and exits; the client sees the mount
    end, not a hang. (The reader and the read threads reply on a descriptor of the device of their own: the
    session's number could be another file's by the time a queued READ was answered.)"""
    opts, mnt = stack
    (tmp_path / "l" / "d" / "big").write_bytes(os.urandom(64 << 20))
    for i in range(200):
        (tmp_path / "l" / "d" / f"s{i}").mkdir()
    stats, log = tmp_path / "stats", tmp_path / "log"
    pid = _mount(opts, mnt, log, UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats))
    os.listdir(mnt / "d")
    reader = subprocess.Popen(["dd", f"if={mnt / 'd' / 'big'}", "of=/dev/null", "bs=1M"], stderr=subprocess.DEVNULL)
    try:
        with open(mnt / "d" / "big", "rb") as f:  # (the same file's first MiB, read before the signal)
            f.read(1 << 20)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not Path(f"/proc/{pid}").exists(), "the server did not exit"
        reader.wait(timeout=30)
    finally:
        reader.kill()
    assert not is_mounted(mnt)
    assert "unmounted" in log.read_text()
    assert "Traceback" not in log.read_text()
    got = read_stats(stats)
    assert got["read_pooled"] > 0 and got["dirs_prefetched"] > 0


@pytest.mark.parametrize("threads", ["", "0"], ids=["default", "UNIONFS_NATIVE_READ_THREADS=0"])
def test_large_reads_are_answered_by_the_pool_of_read_threads(stack: tuple[str, Path], shim: Path, tmp_path: Path,
                                                              threads: str) -> None:
    """READs of 64 KiB or more (readahead) are answered by the shim's read threads, side by side, each on a
    duplicate of the handle's descriptor: the bytes are the file's, and a handle opened for reading before a
    copy-up reads the copy afterwards. UNIONFS_NATIVE_READ_THREADS=0 leaves every READ to the reader."""
    opts, mnt = stack
    data = os.urandom(8 << 20)
    (tmp_path / "l" / "d" / "big").write_bytes(data)
    stats, log = tmp_path / "stats", tmp_path / "log"
    extra = {"UNIONFS_NATIVE_READ_THREADS": threads} if threads else {}
    pid = _mount(opts, mnt, log, UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats), **extra)
    big = mnt / "d" / "big"
    assert big.read_bytes() == data
    with open(big, "rb", buffering=0) as reader:
        assert os.pread(reader.fileno(), 1 << 20, 0) == data[:1 << 20]
        with open(big, "r+b", buffering=0) as writer:  # (copies up)
            writer.write(b"UPPER" * 1000)
        os.posix_fadvise(reader.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(reader.fileno(), 2 << 20, 0) == b"UPPER" * 1000 + data[5000:2 << 20]
    assert (tmp_path / "l" / "d" / "big").read_bytes() == data
    _unmount(mnt, pid)
    got = read_stats(stats)
    assert got["read_native"] == got["read"] and got["read_max"] >= 64 << 10
    if threads == "0":
        assert got["read_pooled"] == 0
    else:
        assert got["read_pooled"] > 0


def test_the_reader_polls_after_small_reads_only_in_a_burst_of_them(stack: tuple[str, Path], shim: Path,
                                                                     tmp_path: Path) -> None:
    """Small READs in a row, each soon after the answer to the one before (random 4 KiB reads of a file not in the
    kernel's cache), keep the reader polling the device after each; a READ between other requests (files read
    one after the other, each opened and released) never does. The bytes read are the file's either way."""
    opts, mnt = stack
    data = os.urandom(1 << 20)
    (tmp_path / "l" / "d" / "big").write_bytes(data)
    for i in range(40):
        (tmp_path / "l" / "d" / f"s{i}").write_text(f"small {i}\n")
    spin = {"UNIONFS_NATIVE_SPIN_US": "5000"}  # (a window wider than the test's own delays between reads)
    got = {}
    for case in ("files", "random"):
        stats, log = tmp_path / f"stats-{case}", tmp_path / f"log-{case}"
        pid = _mount(opts, mnt, log, UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats), **spin)
        if case == "files":
            assert [(mnt / "d" / f"s{i}").read_text() for i in range(40)] == [f"small {i}\n" for i in range(40)]
        else:
            pages = list(range(256))
            random.Random(7).shuffle(pages)
            with open(mnt / "d" / "big", "rb", buffering=0) as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                for page in pages:
                    assert os.pread(f.fileno(), 4096, page * 4096) == data[page * 4096:(page + 1) * 4096]
        _unmount(mnt, pid)
        got[case] = read_stats(stats)
    assert got["files"]["read_native"] >= 40 and got["files"]["read_spins"] == 0, got["files"]
    random_reads = got["random"]
    assert random_reads["read_native"] >= 128 and random_reads["read_max"] < 64 << 10, random_reads
    assert random_reads["read_spins"] >= random_reads["read_native"] // 2, random_reads


_libc = ctypes.CDLL(None, use_errno=True)


def _dirents(fd: int) -> list[tuple[str, int]]:
    """Every (name, d_off) getdents64(2) gives on ``fd`` from where it stands to the end."""
    out: list[tuple[str, int]] = []
    buf = ctypes.create_string_buffer(4096)
    while (n := _libc.syscall(217, fd, buf, len(buf))) != 0:  # (getdents64 on x86_64)
        assert n > 0, os.strerror(ctypes.get_errno())
        raw, at = buf.raw[:n], 0
        while at < n:
            off, reclen = struct.unpack_from("<qH", raw, at + 8)
            out.append((os.fsdecode(raw[at + 19:at + reclen].split(b"\0", 1)[0]), off))
            at += reclen
    return out


@pytest.mark.skipif(platform.machine() != "x86_64", reason="getdents64's number is x86_64's")
def test_the_end_of_a_listing_is_answered_by_the_shim_until_the_directory_changes(
        stack: tuple[str, Path], shim: Path, tmp_path: Path) -> None:
    """Once Python served an open-less directory's listing to its end, the kernel's next READDIRPLUS (after the
    last entry) is answered empty by the shim; after a change through the mount (by another process) a reader
    resuming at that same offset gets the names created past it."""
    opts, mnt = stack
    # (a name's position is its hash: with the server's seed known, some of the names created stand past "f")
    probe = ("from unionfs.union import listing_position as p\n"
             "print(p(b'f'), *(p(b'n%d' % i) for i in range(400)))")
    r = subprocess.run([PY, "-c", probe], env=_env(PYTHONHASHSEED="0"), capture_output=True, text=True, check=True,
                       timeout=60, cwd=str(REPO))
    f_at, *at = map(int, r.stdout.split())
    after = [f"n{i}" for i, n in enumerate(at) if n > f_at][:20]
    before = [f"n{i}" for i, n in enumerate(at) if n < f_at][:20]
    assert after, "no name of 400 stands past 'f' with PYTHONHASHSEED=0"
    stats, log = tmp_path / "stats", tmp_path / "log"
    pid = _mount(opts, mnt, log, UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats), PYTHONHASHSEED="0")
    d = mnt / "d"
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = _dirents(fd)
        assert sorted(name for name, _ in first) == [".", "..", "f"]
        last = first[-1][1]
        assert last == f_at
        script = "import os, sys\nfor name in sys.argv[2:]: open(os.path.join(sys.argv[1], name), 'w').close()"
        subprocess.run([PY, "-c", script, str(d), *after, *before], check=True, timeout=60)
        os.lseek(fd, last, os.SEEK_SET)
        resumed = {name for name, _ in _dirents(fd)}
        again = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            everything = _dirents(again)
        finally:
            os.close(again)
    finally:
        os.close(fd)
    assert {name for name, _ in everything} == {".", "..", "f", *after, *before}
    assert resumed == {name for name, off in everything if off > last} == set(after)
    _unmount(mnt, pid)
    assert read_stats(stats)["listing_ends"] >= 1


@pytest.mark.parametrize("prefetch", ["", "off"], ids=["default", "UNIONFS_NATIVE_PREFETCH=off"])
def test_listed_subdirectories_are_read_ahead_without_touching_their_atime(stack: tuple[str, Path], shim: Path,
                                                                           tmp_path: Path, prefetch: str) -> None:
    """Listing a directory has the shim's threads read its subdirectories' layer directories ahead (a walk lists
    them next), opened O_NOATIME: a layer directory the client never listed keeps its atime, even one whose
    atime is older than its mtime (which relatime would move on a read). UNIONFS_NATIVE_PREFETCH=off: none."""
    opts, mnt = stack
    subs = [tmp_path / "l" / "d" / f"s{i}" for i in range(3)]
    for sub in [*subs, tmp_path / "control"]:
        sub.mkdir()
        (sub / "x").write_text("x\n")
        st = os.stat(sub)
        os.utime(sub, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))
    control = os.stat(tmp_path / "control").st_atime_ns
    os.listdir(tmp_path / "control")
    if os.stat(tmp_path / "control").st_atime_ns == control:
        pytest.skip(f"reading a directory of {tmp_path} does not move its atime (noatime?): nothing to show")
    before = [os.stat(sub).st_atime_ns for sub in subs]
    stats, log = tmp_path / "stats", tmp_path / "log"
    extra = {"UNIONFS_NATIVE_PREFETCH": prefetch} if prefetch else {}
    pid = _mount(opts, mnt, log, UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats), **extra)
    assert sorted(os.listdir(mnt / "d")) == ["f", "s0", "s1", "s2"]
    time.sleep(0.5)  # (the threads read them meanwhile; nothing waits for them)
    _unmount(mnt, pid)
    assert [os.stat(sub).st_atime_ns for sub in subs] == before
    got = read_stats(stats)
    if prefetch:
        assert got["dirs_prefetched"] == 0
        assert "directory prefetch" not in _log_lines(log, "native part")[0]
    else:
        assert got["dirs_prefetched"] >= 3
        assert "directory prefetch" in _log_lines(log, "native part")[0]


def test_own_reader_can_be_switched_off(stack: tuple[str, Path], shim: Path, tmp_path: Path) -> None:
    """UNIONFS_NATIVE_READER=off: pyfuse3 reads the device; the data path still serves reads in the shim."""
    opts, mnt = stack
    stats, log = tmp_path / "stats", tmp_path / "log"
    pid = _mount(opts, mnt, log, UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats),
                 UNIONFS_NATIVE_READER="off")
    assert (mnt / "d" / "f").read_text() == "lower\n"
    _unmount(mnt, pid)
    got = read_stats(stats)
    assert got["reader_served"] == got["reader_forwarded"] == 0 and got["read_native"] == got["read"] >= 1
    line = _log_lines(log, "native part")[0]
    assert "data path" in line and "own reader" not in line


def test_regression_debug_log_shows_reads_with_the_data_path_asked_for(stack: tuple[str, Path], shim: Path,
                                                                       tmp_path: Path) -> None:
    """-o debug logs every request: the data path does not take the reads away from Python then."""
    opts, mnt = stack
    log = tmp_path / "log"
    pid = _mount(opts + ",debug", mnt, log, UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_DATA="on")
    assert (mnt / "d" / "f").read_text() == "lower\n"
    _unmount(mnt, pid)
    assert _log_lines(log, "DEBUG read(")
    assert "data path" not in _log_lines(log, "native part")[0]


def test_regression_a_cached_listing_filled_from_two_listings_holds_each_name_once(tmp_path: Path, shim: Path) -> None:
    """One reader fills the kernel's cache of a directory partway; a copy-up changes the order the layers list
    its names in (not the names); a second reader takes the rest from the cache and then from the server, which
    must go on after the last cached name. A root listing once held one name twice and missed another."""
    why = fuse_unavailable()
    if why is not None:
        pytest.skip(why)
    tmp_path.chmod(0o755)
    names = [f"d{i:04}" for i in range(3000)]
    for d in ("u", "w", "m"):
        (tmp_path / d).mkdir()
    for n in names:
        (tmp_path / "l" / n).mkdir(parents=True)
    mnt = tmp_path / "m"
    stats = tmp_path / "stats"
    pid = _mount(f"lowerdir={tmp_path / 'l'},upperdir={tmp_path / 'u'},workdir={tmp_path / 'w'}", mnt,
                 tmp_path / "log", UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats))
    try:
        with os.scandir(mnt) as first:
            next(first)  # one getdents: the cache holds its entries (about a thousand), not all
            for n in names[-5:]:
                os.chmod(mnt / n, 0o700)  # copied up: the upper directory lists these first
            second = sorted(os.listdir(mnt))
        assert second == names
        assert sorted(os.listdir(mnt)) == names
    finally:
        _unmount(mnt, pid)
    got = read_stats(stats)
    assert got["dir_cached"] + got["dir_openless"] >= 1, "the kernel cached no listing"


def test_regression_a_directory_numbered_by_the_server_lists_its_own_names(stack: tuple[str, Path], shim: Path,
                                                                           tmp_path: Path) -> None:
    """A directory whose real inode number was reused while the kernel still held the old directory gets a number
    of the server's own (from 1 << 62 up). With open-less directories its listings were answered ESTALE (or
    another directory's): the bit that marked a handle as an inode number was one of its number's."""
    opts, mnt = stack
    stats = tmp_path / "stats"
    pid = _mount(opts, mnt, tmp_path / "log", UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats))
    upper = Path(opts.split("upperdir=")[1].split(",")[0])
    try:
        (mnt / "n").mkdir()
        real = (upper / "n").stat().st_ino
        held = os.open(mnt / "n", os.O_RDONLY | os.O_DIRECTORY)  # (the kernel keeps the old directory)
        try:
            for _ in range(20):
                (mnt / "n").rmdir()
                (mnt / "n").mkdir()
                if (upper / "n").stat().st_ino == real:
                    break
            else:
                pytest.skip(f"the upper file system ({upper}) gave no inode number again in 20 tries")
            assert (mnt / "n").stat().st_ino >= 1 << 62, "numbered by the server"
            (mnt / "n" / "inside").write_text("")
            assert os.listdir(mnt / "n") == ["inside"]
            assert os.listdir(held) == []
        finally:
            os.close(held)
    finally:
        _unmount(mnt, pid)
    got = read_stats(stats)
    # (the listing's two READDIRPLUS were open-less: the first reached Python, the shim answered the end)
    assert got["opendir_enosys"] == 1 and got["dir_openless"] + got["listing_ends"] >= 2


def test_absent_xattrs_are_answered_by_the_shim_until_set(stack: tuple[str, Path], shim: Path, tmp_path: Path) -> None:
    """A name found missing on a file is answered ENODATA by the shim the next time (the GETXATTR of
    security.selinux that `ls -l` sends for every file); setting it, through that name or another name of the
    object, makes it readable at once."""
    opts, mnt = stack
    stats = tmp_path / "stats"
    pid = _mount(opts, mnt, tmp_path / "log", UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats))
    f, g = mnt / "d" / "f", mnt / "d" / "g"
    try:
        for _ in range(3):
            with pytest.raises(OSError) as missing:
                os.getxattr(f, "user.a")
            assert missing.value.errno == errno.ENODATA
        os.setxattr(f, "user.a", b"1")  # (copies f up)
        assert os.getxattr(f, "user.a") == b"1"
        os.link(f, g)
        for _ in range(2):
            with pytest.raises(OSError):
                os.getxattr(f, "user.b")
        os.setxattr(g, "user.b", b"2")
        assert os.getxattr(f, "user.b") == b"2"
        for _ in range(2):
            with pytest.raises(OSError):
                os.getxattr(f, "user.c")
        os.removexattr(f, "user.a")  # (a change of the object's xattrs: nothing it knew is kept)
        os.setxattr(g, "user.c", b"3", follow_symlinks=False)
        assert os.getxattr(f, "user.c") == b"3"
    finally:
        _unmount(mnt, pid)
    got = read_stats(stats)
    assert got["xattr_absent"] >= 3, got["xattr_absent"]


def test_regression_renaming_a_lower_file_held_open_for_reading(stack: tuple[str, Path], shim: Path,
                                                               tmp_path: Path) -> None:
    """A lower file open for reading is renamed (copied up, moved, a whiteout left at its name) and then
    exchanged with another: each rename succeeds and the open handle reads the file it opened, at its new name.
    The handle's reopening after the copy-up used the old name: the rename failed with ENXIO (the whiteout), and
    after an exchange the handle would have read the other file."""
    opts, mnt = stack
    pid = _mount(opts, mnt, tmp_path / "log", UNIONFS_NATIVE_LIB=str(shim))
    d = mnt / "d"
    (d / "other").write_text("other\n")
    (d / "sub").mkdir()
    try:
        with open(d / "f", "rb", buffering=0) as held:
            os.rename(d / "f", d / "sub" / "f")
            with open(d / "sub" / "f", "a") as more:
                more.write("more\n")
            assert os.pread(held.fileno(), 100, 0) == b"lower\nmore\n"
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.renameat2(-100, bytes(d / "other"), -100, bytes(d / "sub" / "f"), 2) == 0, ctypes.get_errno()
            assert os.pread(held.fileno(), 100, 0) == b"lower\nmore\n"
            assert (d / "other").read_text() == "lower\nmore\n" and (d / "sub" / "f").read_text() == "other\n"
    finally:
        _unmount(mnt, pid)


def test_directory_attributes_are_answered_by_the_shim_until_changed(stack: tuple[str, Path], shim: Path,
                                                                     tmp_path: Path) -> None:
    """The GETATTR the kernel sends after each listing it did not have cached is answered by the shim from what
    Python gave last (after reading the layers: the atime such a reading moves is the one shown); any change
    through the mount is seen by the next stat: a name added or removed (mtime, nlink), chmod, an xattr set
    (ctime), a copy-up below."""
    opts, mnt = stack
    stats = tmp_path / "stats"
    pid = _mount(opts, mnt, tmp_path / "log", UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats))
    d, lower = mnt / "d", tmp_path / "l" / "d"
    try:
        before = os.stat(d)
        for _ in range(3):
            assert os.listdir(d) == ["f"]
            st = os.stat(d)
            assert (st.st_mode, st.st_nlink, st.st_mtime_ns) == (before.st_mode, before.st_nlink, before.st_mtime_ns)
        assert st.st_atime_ns == lower.stat().st_atime_ns  # (the layer's, after the listing read it)
        (d / "sub").mkdir()  # (d is copied up: a merged directory shows one link, as on the kernel)
        assert sorted(os.listdir(d)) == ["f", "sub"]
        assert os.stat(d).st_mtime_ns == (tmp_path / "u" / "d").stat().st_mtime_ns
        e = mnt / "e"  # (in the upper layer only: its links are counted)
        e.mkdir()
        assert os.listdir(e) == [] and os.stat(e).st_nlink == 2
        (e / "sub").mkdir()
        assert os.listdir(e) == ["sub"] and os.stat(e).st_nlink == 3
        (e / "sub").rmdir()
        assert os.listdir(e) == [] and os.stat(e).st_nlink == 2
        os.chmod(d, 0o700)
        assert os.listdir(d) and os.stat(d).st_mode & 0o7777 == 0o700
        ctime = os.stat(d).st_ctime_ns
        time.sleep(0.01)
        os.setxattr(d, "user.k", b"v")
        assert os.listdir(d) and os.stat(d).st_ctime_ns > ctime
        (d / "sub").rmdir()
        assert os.listdir(d) == ["f"]
        mtime = os.stat(d).st_mtime_ns
        time.sleep(0.01)
        with open(d / "f", "a") as f:  # (a copy-up of the file: the upper directory gains a name)
            f.write("more\n")
        assert os.listdir(d) == ["f"]
        assert os.stat(d).st_mtime_ns == (tmp_path / "u" / "d").stat().st_mtime_ns >= mtime
    finally:
        _unmount(mnt, pid)
    got = read_stats(stats)
    assert got["attr_served"] >= 2, got
    assert got["attr_untracked"] == 0


def test_directory_attributes_can_be_switched_off(stack: tuple[str, Path], shim: Path, tmp_path: Path) -> None:
    opts, mnt = stack
    stats = tmp_path / "stats"
    log = tmp_path / "log"
    pid = _mount(opts, mnt, log, UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats),
                 UNIONFS_NATIVE_ATTRS="off")
    try:
        for _ in range(3):
            assert os.listdir(mnt / "d") == ["f"]
            os.stat(mnt / "d")
    finally:
        _unmount(mnt, pid)
    got = read_stats(stats)
    assert got["attr_served"] == 0 and got["attr_kept"] == 0
    assert "directory attributes" not in log.read_text()


@pytest.mark.parametrize("volatile", [False, True], ids=["durable", "volatile"])
def test_fsync_is_served_by_the_shim_on_the_open_descriptor(stack: tuple[str, Path], shim: Path, tmp_path: Path,
                                                            volatile: bool) -> None:
    """fsync and fdatasync of a file open through the mount are made by the shim on the descriptor the open chose
    (the upper file's after a copy-up), in a thread of its own; a mount with ``volatile`` leaves them to Python,
    which does nothing."""
    opts, mnt = stack
    stats = tmp_path / "stats"
    pid = _mount(opts + (",volatile" if volatile else ""), mnt, tmp_path / "log", UNIONFS_NATIVE_LIB=str(shim),
                 UNIONFS_NATIVE_STATS=str(stats))
    try:
        fd = os.open(mnt / "d" / "f", os.O_RDWR)
        try:
            os.pwrite(fd, b"L", 0)
            os.fsync(fd)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        with open(mnt / "d" / "f", "rb") as f:
            os.fsync(f.fileno())
        assert (tmp_path / "u" / "d" / "f").read_bytes() == b"Lower\n"
    finally:
        _unmount(mnt, pid)
    got = read_stats(stats)
    assert got["fsync_native"] == (0 if volatile else 3), got["fsync_native"]


def test_read_only_opens_are_answered_by_the_shim_and_handed_over_when_python_must_know(
        stack: tuple[str, Path], shim: Path, tmp_path: Path) -> None:
    """A read-only open of a file Python named (a listing's entry, a lookup, an earlier open) is answered by the
    shim, and its release too, while nothing changed since. Such a handle still behaves as Python's would: after a
    copy-up of its file it reads the copy (Python takes it over and reopens it), and once its file is unlinked
    its attributes are still reached through it."""
    opts, mnt = stack
    stats, log = tmp_path / "stats", tmp_path / "log"
    pid = _mount(opts, mnt, log, UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats))
    d = mnt / "d"
    try:
        assert os.listdir(d) == ["f"]
        for _ in range(3):
            assert (d / "f").read_bytes() == b"lower\n"
        with open(d / "f", "rb", buffering=0) as held:  # (on the lower file, opened by the shim)
            with open(d / "f", "r+b", buffering=0) as writer:  # (copies up)
                writer.write(b"UPPER")
            os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(held.fileno(), 100, 0) == b"UPPER\n"
        assert (tmp_path / "l" / "d" / "f").read_bytes() == b"lower\n"
        for _ in range(2):  # (the first after the change goes to Python, which names the file again)
            assert (d / "f").read_bytes() == b"UPPER\n"
        with open(d / "f", "rb", buffering=0) as held:
            size = os.fstat(held.fileno()).st_size
            os.unlink(d / "f")
            st = os.fstat(held.fileno())
            assert (st.st_size, st.st_nlink) == (size, 0)
            assert os.pread(held.fileno(), 100, 0) == b"UPPER\n"
        assert os.listdir(d) == []
    finally:
        _unmount(mnt, pid)
    got = read_stats(stats)
    assert got["open_native"] >= 4, got
    assert got["release_native"] >= 3, got
    assert got["adopted"] == 2, got
    assert "read-only opens" in _log_lines(log, "native part")[0]


def test_the_files_of_a_listing_are_opened_by_the_shim(stack: tuple[str, Path], shim: Path, tmp_path: Path) -> None:
    """A READDIRPLUS reply names all its regular files to the shim at once (one record each, of the layer, the
    path, the device and the inode number): after a listing, opening each of its files (which the kernel knows
    from the listing: no LOOKUP) is answered by the shim, on the file named, in either layer."""
    opts, mnt = stack
    stats = tmp_path / "stats"
    names = {f"lower-{i:02}{'-' + 'n' * 180 if i % 7 == 0 else ''}": ("l", f"lower {i}\n".encode()) for i in range(40)}
    names.update({f"upper-{i:02}": ("u", f"upper {i}\n".encode()) for i in range(10)})
    (tmp_path / "u" / "d").mkdir()
    for name, (layer, data) in names.items():
        (tmp_path / layer / "d" / name).write_bytes(data)
    pid = _mount(opts, mnt, tmp_path / "log", UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats))
    try:
        assert sorted(os.listdir(mnt / "d")) == sorted([*names, "f"])
        for name, (_, data) in names.items():
            assert (mnt / "d" / name).read_bytes() == data
    finally:
        _unmount(mnt, pid)
    got = read_stats(stats)
    assert got["recipes_kept"] >= len(names), got
    assert got["open_native"] >= len(names) and got["open_missed"] == 0, got


def test_a_listed_file_lacking_an_xattr_is_answered_by_the_shim(stack: tuple[str, Path], shim: Path,
                                                                tmp_path: Path) -> None:
    """Once Python found a name missing on one file, the shim answers the first GETXATTR of that name of every
    other listed file by checking the file itself (a cold `ls -lR` asks one per file): ENODATA where the file
    lacks it, the value (from Python) where the file has it, and a value set through the mount shows at once."""
    opts, mnt = stack
    stats = tmp_path / "stats"
    (tmp_path / "u" / "d").mkdir()
    names = [f"lower-{i:02}" for i in range(30)] + [f"upper-{i:02}" for i in range(10)]
    for name in names:
        layer = "u" if name.startswith("upper") else "l"
        (tmp_path / layer / "d" / name).write_bytes(name.encode())
    os.setxattr(tmp_path / "l" / "d" / "lower-07", "user.tag", b"seven")
    os.setxattr(tmp_path / "u" / "d" / "upper-03", "user.tag", b"three")
    pid = _mount(opts, mnt, tmp_path / "log", UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats))
    try:
        assert sorted(os.listdir(mnt / "d")) == sorted([*names, "f"])
        got_values = {}
        for name in names:
            try:
                got_values[name] = os.getxattr(mnt / "d" / name, "user.tag")
            except OSError as exc:
                assert exc.errno == errno.ENODATA, (name, exc)
        assert got_values == {"lower-07": b"seven", "upper-03": b"three"}
        os.setxattr(mnt / "d" / "lower-20", "user.tag", b"twenty")  # (copies it up)
        assert os.getxattr(mnt / "d" / "lower-20", "user.tag") == b"twenty"
        with pytest.raises(OSError) as missing:
            os.getxattr(mnt / "d" / "lower-21", "user.tag")
        assert missing.value.errno == errno.ENODATA
    finally:
        _unmount(mnt, pid)
    got = read_stats(stats)
    # the first file is Python's, and the two that have it; every other one the shim checked
    assert got["xattr_checked"] >= len(names) - 3, got


def test_a_file_replaced_behind_the_mount_is_opened_by_python(stack: tuple[str, Path], shim: Path,
                                                              tmp_path: Path) -> None:
    """The shim opens what Python named only when it is that file (its device and inode number): another file
    put at the path behind the mount is left to Python."""
    opts, mnt = stack
    stats = tmp_path / "stats"
    (tmp_path / "u" / "g").write_bytes(b"first\n")
    pid = _mount(opts, mnt, tmp_path / "log", UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats))
    try:
        assert sorted(os.listdir(mnt)) == ["d", "g"]
        (tmp_path / "u" / "g.new").write_bytes(b"other\n")
        os.rename(tmp_path / "u" / "g.new", tmp_path / "u" / "g")
        assert (mnt / "g").read_bytes() == b"other\n"
    finally:
        _unmount(mnt, pid)
    got = read_stats(stats)
    assert got["open_missed"] == 1 and got["open_native"] == 0, got


def test_read_only_opens_can_be_switched_off(stack: tuple[str, Path], shim: Path, tmp_path: Path) -> None:
    opts, mnt = stack
    stats, log = tmp_path / "stats", tmp_path / "log"
    pid = _mount(opts, mnt, log, UNIONFS_NATIVE_LIB=str(shim), UNIONFS_NATIVE_STATS=str(stats),
                 UNIONFS_NATIVE_OPENS="off")
    try:
        for _ in range(3):
            assert (mnt / "d" / "f").read_bytes() == b"lower\n"
    finally:
        _unmount(mnt, pid)
    got = read_stats(stats)
    assert got["open_native"] == 0 and got["recipes_kept"] == 0, got
    assert "read-only opens" not in log.read_text()

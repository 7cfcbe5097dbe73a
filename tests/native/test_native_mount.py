"""Real mounts with the shim: connection flags at init, request sizes, cached listings and their invalidation,
plain READDIR under the kernel's adaptive readdirplus. The server is memfs.py (pyfuse3 over a dict), whose
directory ``d`` never changes its attributes, so only the listing cache can explain what a listing shows."""

from __future__ import annotations

import concurrent.futures
import errno
import os
from pathlib import Path

import pytest
from conftest import Start
from nativehelp import Server, read_stats

MIB = 1 << 20
CAP_READDIRPLUS = 1 << 13
CAP_READDIRPLUS_AUTO = 1 << 14


def listing(server: Server) -> list[str]:
    return sorted(os.listdir(server.mnt / "d"))


def ctl(server: Server, command: str) -> None:
    (server.mnt / "ctl").write_text(command + "\n")


def test_connection_flags_and_write_size(start: Start) -> None:
    s = start()
    fd = os.open(s.mnt / "data", os.O_WRONLY)
    try:
        assert os.write(fd, b"x" * (4 * MIB)) == 4 * MIB
    finally:
        os.close(fd)
    assert (s.mnt / "data").stat().st_size == 4 * MIB
    stats = s.stop()
    assert stats["session_wrapped"] == 1 and stats["init"] == 1 and stats["conn.valid"] == 1
    assert stats["conn.max_write"] == MIB
    assert stats["conn.max_readahead"] == stats["conn.offered_max_readahead"] > 0
    # what the kernel sent: 4 MiB in WRITE requests of at most max_write, the largest exactly 1 MiB
    assert stats["write_bytes"] == 4 * MIB
    assert stats["write_max"] == MIB
    assert stats["write"] == 4
    # by default nothing else changes: pyfuse3's wishes are what the kernel gets
    assert stats["conn.want"] == stats["conn.want_pyfuse3"]
    assert not stats["conn.want"] & CAP_READDIRPLUS_AUTO
    assert stats["dir_cached"] == 0


def test_without_cached_listings_every_listing_asks_the_server(start: Start) -> None:
    s = start()
    assert listing(s) == ["f0000", "f0001", "f0002"]
    ctl(s, "add new1")
    assert listing(s) == ["f0000", "f0001", "f0002", "new1"]
    stats = s.stop()
    assert stats["opendir"] >= 2 and stats["dir_cached"] == 0
    assert stats["readdirplus"] >= 2


def test_cached_listing_is_kept_until_invalidated(start: Start) -> None:
    s = start(config="cache_dirs")
    assert listing(s) == ["f0000", "f0001", "f0002"]
    assert listing(s) == ["f0000", "f0001", "f0002"]
    ctl(s, "add new1")
    # the kernel answers from its cache: the new name is not seen (this is what the server must prevent by
    # invalidating whenever a listing changes)
    assert listing(s) == ["f0000", "f0001", "f0002"]
    ctl(s, "inval")  # pyfuse3.invalidate_inode(d): FUSE_NOTIFY_INVAL_INODE, offset 0, length 0
    assert listing(s) == ["f0000", "f0001", "f0002", "new1"]
    stats = s.stop()
    assert stats["dir_cached"] == stats["opendir"] >= 4
    # one READDIRPLUS pass (the listing and its end) for the first listing, one after the invalidation
    assert stats["readdirplus"] == 4


def test_file_opens_are_not_flagged(start: Start) -> None:
    s = start(config="cache_dirs")
    (s.mnt / "data").write_bytes(b"abc")
    assert (s.mnt / "data").read_bytes() == b"abc"
    listing(s)
    stats = s.stop()
    assert stats["dir_cached"] == stats["opendir"] == 1
    assert stats["reply_open"] == stats["dir_cached"] + 2  # the two opens of data went out unchanged


def memfs_report(server: Server) -> dict[str, int]:
    """memfs's last line: how many readdirs it was told were plain, how many lookups it still counts."""
    words = server.output.strip().splitlines()[-1].split()
    assert words[0] == "memfs:", server.output
    return {words[i]: int(words[i + 1]) for i in range(1, len(words), 2)}


def test_readdirplus_auto_serves_plain_readdir(start: Start) -> None:
    s = start("3000", config="readdirplus_auto")
    names = os.listdir(s.mnt / "d")  # no stat of the entries: the kernel asks plain READDIR after the first
    assert sorted(names) == [f"f{i:04d}" for i in range(3000)]
    stats = s.stop()
    assert stats["conn.want"] & CAP_READDIRPLUS_AUTO
    assert stats["conn.want"] & CAP_READDIRPLUS
    assert stats["readdir_plain"] >= 1
    assert 0 < stats["entries_plain"] < 3000  # the first chunk came with attributes
    told = memfs_report(s)
    assert told["plain_readdirs"] == stats["readdir_plain"]
    # lookups memfs still counts: at most those the kernel took (entries with attributes, d, and what a
    # lookup took), none for the plain entries
    assert told["lookups_left"] <= 3000 - stats["entries_plain"] + 5


def test_plain_and_cached_together(start: Start) -> None:
    s = start("3000", config="cache_dirs,readdirplus_auto")
    expected = [f"f{i:04d}" for i in range(3000)]
    assert sorted(os.listdir(s.mnt / "d")) == expected
    ctl(s, f"dump {s.mnt.parent / 'first.stats'}")
    first = read_stats(s.mnt.parent / "first.stats")
    assert sorted(os.listdir(s.mnt / "d")) == expected
    stats = s.stop()
    assert first["readdir_plain"] >= 1 and first["readdirplus"] >= 1
    # the second listing came from the cache: no request of either kind
    assert (stats["readdirplus"], stats["readdir_plain"]) == (first["readdirplus"], first["readdir_plain"])
    assert stats["dir_cached"] == stats["opendir"] == 2


def test_unionfs_mount_through_the_shim(start: Start, tmp_path: Path) -> None:
    """unionfs itself, started through unionfs._native.run: its WRITE requests come in 1 MiB, a lower file is
    copied up and read back, and a listing is right."""
    tmp_path.chmod(0o755)
    lower, upper, work = (tmp_path / n for n in ("l", "u", "w"))
    for p in (lower, upper, work):
        p.mkdir()
    (lower / "a").write_bytes(b"lower a\n")
    s = start("-o", f"lowerdir={lower},upperdir={upper},workdir={work}", memfs=False)
    with open(s.mnt / "big", "wb") as f:
        f.write(os.urandom(1024) * 3072)  # 3 MiB in one write(2)
    with open(s.mnt / "a", "ab") as f:
        f.write(b"appended\n")
    assert (s.mnt / "a").read_bytes() == b"lower a\nappended\n"
    assert sorted(os.listdir(s.mnt)) == ["a", "big"]
    assert (upper / "big").stat().st_size == 3 * MIB
    stats = s.stop()
    assert stats["session_wrapped"] == 1
    assert stats["write_max"] == stats["conn.max_write"] == MIB
    assert stats["write_bytes"] == 3 * MIB + len(b"appended\n")
    assert (lower / "a").read_bytes() == b"lower a\n"


@pytest.mark.parametrize("config", ["", "own_reader"])
def test_reads_on_a_registered_descriptor_skip_python(start: Start, tmp_path: Path, config: str) -> None:
    """memfs registers the descriptor of each open of ``real``: every READ is then answered by the shim (pread),
    the bytes are the file's, short reads at the end included; an unregistered handle reads through Python."""
    real = tmp_path / "real"
    data = os.urandom(3 * MIB + 1234)
    real.write_bytes(data)
    s = start(name="native", config=config, MEMFS_REAL=str(real), MEMFS_NATIVE_READS="1")
    p = start(name="python", config=config, MEMFS_REAL=str(real), MEMFS_NATIVE_READS="0")
    assert (s.mnt / "real").read_bytes() == data
    with open(s.mnt / "real", "rb", buffering=0) as f:
        f.seek(len(data) - 100)
        assert f.read(4096) == data[-100:]
    assert (p.mnt / "real").read_bytes() == data
    native, python = s.stop(), p.stop()
    assert native["read"] > 0 and native["read_native"] == native["read"]
    assert python["read"] > 0 and python["read_native"] == 0
    if config == "own_reader":
        assert native["reader_served"] == native["read"]  # answered by the reader thread itself
        assert python["reader_served"] == 0 and python["reader_forwarded"] > python["read"]


@pytest.mark.parametrize("config", ["", "own_reader"])
def test_writes_on_a_registered_descriptor_skip_python(start: Start, tmp_path: Path, config: str) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"")
    s = start(config=config, MEMFS_REAL=str(real), MEMFS_NATIVE_READS="1", MEMFS_NATIVE_WRITES="1")
    data = os.urandom(2 * MIB + 4321)
    with open(s.mnt / "real", "r+b", buffering=0) as f:
        assert f.write(data) == len(data)
        f.seek(100)
        assert f.write(b"patched") == 7
    expected = data[:100] + b"patched" + data[107:]
    assert real.read_bytes() == expected  # on disk, written by the shim
    assert (s.mnt / "real").read_bytes() == expected
    assert (s.mnt / "real").stat().st_size == len(expected)
    stats = s.stop()
    assert stats["write_native"] == stats["write"] >= 3
    assert stats["write_bytes"] == len(data) + 7
    assert memfs_report(s)["python_writes"] == 0


@pytest.mark.parametrize("config", ["", "own_reader"])
def test_absent_xattr_is_answered_until_set(start: Start, config: str) -> None:
    s = start(config=f"{config},absent_xattr=user.absent".lstrip(","))
    data = s.mnt / "data"
    for _ in range(3):
        with pytest.raises(OSError) as err:
            os.getxattr(data, "user.absent")
        assert err.value.errno == errno.ENODATA
    with pytest.raises(OSError) as err:
        os.getxattr(data, "user.other")  # not declared: memfs answers
    assert err.value.errno == errno.ENODATA
    os.setxattr(data, "user.absent", b"now here")
    assert os.getxattr(data, "user.absent") == b"now here"
    stats = s.stop()
    assert stats["xattr_absent"] == 3
    assert memfs_report(s)["getxattrs"] == 2  # user.other, then user.absent once it was set


def test_own_reader_forwards_everything_else(start: Start) -> None:
    """With the shim reading the device, every other request still reaches pyfuse3 and is answered right."""
    s = start("300", config="own_reader,cache_dirs")
    assert listing(s) == [f"f{i:04d}" for i in range(300)]
    (s.mnt / "data").write_bytes(b"written" * 1000)
    assert (s.mnt / "data").read_bytes() == b"written" * 1000
    ctl(s, "add zz")
    ctl(s, "inval")
    assert listing(s)[-1] == "zz"
    stats = s.stop()
    assert stats["reader_forwarded"] > 10
    assert stats["reader_served"] == 0
    assert stats["dir_cached"] == stats["opendir"]


def test_own_reader_under_many_clients(start: Start, tmp_path: Path) -> None:
    """Eight clients at once, mixing reads the reader answers with requests pyfuse3 answers: every answer right."""
    real = tmp_path / "real"
    data = os.urandom(MIB + 77)
    real.write_bytes(data)
    s = start("500", config="own_reader,absent_xattr=user.absent", MEMFS_REAL=str(real), MEMFS_NATIVE_READS="1")
    expected = [f"f{i:04d}" for i in range(500)]

    def client(k: int) -> list[str]:
        wrong = []
        for i in range(6):
            if (s.mnt / "real").read_bytes() != data:
                wrong.append(f"{k}: read {i}")
            if listing(s) != expected:
                wrong.append(f"{k}: listing {i}")
            try:
                os.getxattr(s.mnt / "data", "user.absent")
                wrong.append(f"{k}: xattr {i}")
            except OSError as e:
                if e.errno != errno.ENODATA:
                    wrong.append(f"{k}: xattr {i}: {e}")
        return wrong

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        wrong = [w for ws in pool.map(client, range(8)) for w in ws]
    assert wrong == []
    stats = s.stop()
    assert stats["xattr_absent"] == 48
    assert stats["read_native"] == stats["read"] > 0
    assert stats["reader_forwarded"] > 48  # the opens, listings and releases went to pyfuse3


def test_unionfs_cached_listings_follow_changes_through_the_mount(start: Start, tmp_path: Path) -> None:
    """With cached listings, the kernel itself drops a directory's cached listing when it changes through the
    mount (create, unlink, rename, mkdir, rmdir, link, symlink: it bumps the directory's version), so unionfs
    sees its own changes without invalidating; only changes behind the mount need the server's invalidation."""
    tmp_path.chmod(0o755)
    lower, upper, work = (tmp_path / n for n in ("l", "u", "w"))
    for p in (lower, upper, work):
        p.mkdir()
    (lower / "d").mkdir()
    (lower / "d" / "low").write_text("x")
    s = start("-o", f"lowerdir={lower},upperdir={upper},workdir={work}", memfs=False, config="cache_dirs")
    d = s.mnt / "d"

    def names() -> list[str]:
        return sorted(os.listdir(d))

    assert names() == ["low"]
    assert names() == ["low"]
    (d / "new").write_text("y")
    assert names() == ["low", "new"]
    os.rename(d / "new", d / "renamed")
    assert names() == ["low", "renamed"]
    os.unlink(d / "low")  # a whiteout in the upper layer
    assert names() == ["renamed"]
    (d / "sub").mkdir()
    os.symlink("renamed", d / "ln")
    os.link(d / "renamed", d / "hard")
    assert names() == ["hard", "ln", "renamed", "sub"]
    os.rmdir(d / "sub")
    assert names() == ["hard", "ln", "renamed"]
    stats = s.stop()
    if stats["opendir_enosys"]:  # (open-less directories: the first OPENDIR answered ENOSYS, none after it)
        assert stats["opendir"] == 1 and stats["dir_cached"] == 0
    else:
        assert stats["dir_cached"] == stats["opendir"] == 7
    # a listing asks READDIRPLUS twice (the entries, then their end); the repeated first one asked nothing
    assert stats["readdirplus"] <= 2 * 6

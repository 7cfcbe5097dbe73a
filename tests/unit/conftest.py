"""Fixtures of the unit tests: declarative layer trees on plain directories, and a Union over them.

A tree is a dict ``name -> node``:

* ``str``/``bytes`` or :class:`File` — a regular file (content, mode, owner, times, xattrs);
* ``dict`` or :class:`Dir` — a directory (``Dir(..., opaque=True)`` marks it ``trusted.overlay.opaque=y``,
  ``Dir(..., xwhiteouts=True)`` marks it ``=x``);
* :class:`Symlink`, :class:`Fifo`;
* :data:`WHITEOUT` — a kernel whiteout (char device 0/0);
* :data:`XWHITEOUT` — an xattr whiteout (empty regular file with ``trusted.overlay.whiteout``).

Everything runs as root in plain directories under ``tmp_path``; no FUSE, no trio.

Test modules import the builder from ``unit_tree`` (this module, registered under that name so that it does not
depend on which ``conftest`` module pytest last imported).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from unionfs.copyup import Workdir
from unionfs.layers import ROOT, Entry, Stack, join, split
from unionfs.prescan import Prescanned
from unionfs.union import Union
from unionfs.whiteout import XattrFormat

OPAQUE = b"trusted.overlay.opaque"
XW_MARK = b"trusted.overlay.whiteout"


# -- declarative tree builder -----------------------------------------------------------------------------


@dataclasses.dataclass
class File:
    data: bytes | str = b""
    mode: int = 0o644
    uid: int | None = None
    gid: int | None = None
    xattrs: dict[bytes, bytes] = dataclasses.field(default_factory=dict)
    times_ns: tuple[int, int] | None = None


@dataclasses.dataclass
class Dir:
    children: dict[str, Any] = dataclasses.field(default_factory=dict)
    mode: int = 0o755
    uid: int | None = None
    gid: int | None = None
    opaque: bool = False
    xwhiteouts: bool = False
    xattrs: dict[bytes, bytes] = dataclasses.field(default_factory=dict)
    times_ns: tuple[int, int] | None = None


@dataclasses.dataclass
class Symlink:
    target: str


@dataclasses.dataclass
class Fifo:
    mode: int = 0o640


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


WHITEOUT = _Marker("WHITEOUT")
XWHITEOUT = _Marker("XWHITEOUT")


def make_whiteout(path: Path | str) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def build(root: Path, tree: dict[str, Any]) -> Path:
    """Create ``tree`` inside directory ``root`` (created if missing); returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    # Directory times are set after their children exist (creating a child bumps the parent's mtime).
    pending: list[tuple[Path, tuple[int, int]]] = []
    _build(root, tree, pending)
    for p, t in reversed(pending):
        os.utime(p, ns=t, follow_symlinks=False)
    return root


def _build(root: Path, tree: dict[str, Any], pending: list[tuple[Path, tuple[int, int]]]) -> None:
    for name, node in tree.items():
        p = root / name
        if isinstance(node, (str, bytes)):
            node = File(node)
        elif isinstance(node, dict):
            node = Dir(node)
        if isinstance(node, File):
            data = node.data.encode() if isinstance(node.data, str) else node.data
            p.write_bytes(data)
            for k, v in node.xattrs.items():
                os.setxattr(p, k, v, follow_symlinks=False)
            if node.uid is not None or node.gid is not None:
                os.chown(p, -1 if node.uid is None else node.uid, -1 if node.gid is None else node.gid)
            os.chmod(p, node.mode)
            if node.times_ns is not None:
                os.utime(p, ns=node.times_ns)
        elif isinstance(node, Dir):
            p.mkdir()
            _build(p, node.children, pending)
            if node.opaque:
                os.setxattr(p, OPAQUE, b"y")
            if node.xwhiteouts:
                os.setxattr(p, OPAQUE, b"x")
            for k, v in node.xattrs.items():
                os.setxattr(p, k, v)
            if node.uid is not None or node.gid is not None:
                os.chown(p, -1 if node.uid is None else node.uid, -1 if node.gid is None else node.gid)
            os.chmod(p, node.mode)
            if node.times_ns is not None:
                pending.append((p, node.times_ns))
        elif isinstance(node, Symlink):
            os.symlink(node.target, p)
        elif isinstance(node, Fifo):
            os.mkfifo(p, node.mode)
            os.chmod(p, node.mode)
        elif node is WHITEOUT:
            make_whiteout(p)
        elif node is XWHITEOUT:
            p.write_bytes(b"")
            os.setxattr(p, XW_MARK, b"")
        else:  # pragma: no cover - a typo in a test
            raise TypeError(f"unknown tree node {node!r} at {p}")


def is_whiteout(path: Path | str) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def opaque_value(path: Path | str) -> bytes | None:
    try:
        return os.getxattr(path, OPAQUE, follow_symlinks=False)
    except OSError:
        return None


# -- a Union over built layers -----------------------------------------------------------------------------


class Env:
    """Built layers (upper first), the Stack, Workdir and Union over them, and merged-path helpers."""

    def __init__(self, base: Path, upper: dict[str, Any] | None, lowers: list[dict[str, Any]],
                 writable: bool = True, prescan: bool = False) -> None:
        self.base = base
        self.upper = build(base / "upper", upper or {})
        self.lowers = [build(base / f"lower{i + 1}", t) for i, t in enumerate(lowers)]
        self.workdir = base / "work"
        self.workdir.mkdir()
        dirs = ([self.upper] if writable else []) + self.lowers
        self.layer_dirs = [os.fsencode(d) for d in dirs]
        self.stack = Stack(self.layer_dirs, writable=writable, fmt=XattrFormat.TRUSTED,
                           lowers=Prescanned if prescan else None)
        self.work: Workdir | None = None
        try:
            self.work = Workdir(os.fsencode(self.workdir)) if writable else None
            self.union = Union(self.stack, self.work)
        except BaseException:
            self.close()
            raise

    @property
    def work_path(self) -> Path:
        return self.workdir / "work"

    def work_entries(self) -> list[str]:
        return sorted(os.listdir(self.work_path))

    def close(self) -> None:
        self.stack.close()
        if self.work is not None:
            self.work.close()

    # merged-path helpers (paths are str, relative to the mount root)

    def resolve(self, path: str) -> Entry | None:
        return self.stack.resolve(os.fsencode(path) if path else ROOT)

    def entry(self, path: str) -> Entry:
        e = self.resolve(path)
        assert e is not None, f"{path!r} should resolve"
        return e

    def parent(self, path: str) -> tuple[Entry, bytes]:
        """(fresh parent Entry, name) of merged ``path``."""
        p, name = split(os.fsencode(path))
        parent = self.stack.resolve(p)
        assert parent is not None, f"parent of {path!r} should resolve"
        return parent, name

    def read(self, path: str) -> bytes:
        fd = self.union.open(self.entry(path), os.O_RDONLY)
        try:
            return _read_all(fd)
        finally:
            os.close(fd)

    def names(self, path: str = "") -> set[str]:
        return {os.fsdecode(n) for n in self.union.listdir(self.entry(path))}

    def tree(self, path: bytes = ROOT) -> dict[str, Any]:
        """The whole merged view: path -> bytes (file), "DIR", ("LNK", target) or ("OTHER", S_IFMT)."""
        out: dict[str, Any] = {}
        self._walk(self.stack.resolve(path), out)
        return out

    def _walk(self, entry: Entry | None, out: dict[str, Any]) -> None:
        assert entry is not None
        for name, (_layer, dtype) in self.union.listdir(entry).items():
            child = self.stack.lookup(entry, name)
            assert child is not None, f"listed name {name!r} of {entry.path!r} must resolve"
            assert stat.S_IFMT(child.st.st_mode) == dtype, f"d_type of {child.path!r} disagrees with lookup"
            key = os.fsdecode(join(entry.path, name))
            if child.is_dir:
                out[key] = "DIR"
                self._walk(child, out)
            elif stat.S_ISREG(child.st.st_mode):
                fd = self.union.open(child, os.O_RDONLY)
                try:
                    out[key] = _read_all(fd)
                finally:
                    os.close(fd)
            elif stat.S_ISLNK(child.st.st_mode):
                out[key] = ("LNK", os.fsdecode(self.union.readlink(child)))
            else:
                out[key] = ("OTHER", stat.S_IFMT(child.st.st_mode))


def _read_all(fd: int) -> bytes:
    chunks = []
    off = 0
    while True:
        b = os.pread(fd, 1 << 16, off)
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        off += len(b)


@contextlib.contextmanager
def readable_layers(upper: dict[str, Any] | None, lowers: list[dict[str, Any]]) -> Iterator[list[bytes]]:
    """Lower layers built under /tmp (which every user may traverse), their own roots mode 0755: yields the
    lower layer directories, top first; removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="unionfs-unit-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        Env(base / "env", upper, lowers).close()
        for d in (base / "env", *(base / "env").iterdir()):
            os.chmod(d, 0o755)
        yield [os.fsencode(base / "env" / f"lower{i + 1}") for i in range(len(lowers))]
    finally:
        shutil.rmtree(base)


def as_nobody(check: Callable[[], None], what: str) -> None:
    """Run ``check`` in a child process that dropped to uid/gid 65534; fail here when it raises (its
    exception is on stderr)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            check()
            code = 0
        except BaseException as exc:  # reported in the parent's assertion
            os.write(2, f"child: {exc!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"{what} (stderr has why)"


@pytest.fixture(autouse=True)
def _umask0() -> Iterator[None]:
    """The server runs with umask 0 (the kernel applied the caller's umask already); so do the tests."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Any]:
    """``make_env(upper={...}, lowers=[{...}, {...}], writable=True)``; every Env is closed at teardown."""
    envs: list[Env] = []

    def make(upper: dict[str, Any] | None = None, lowers: list[dict[str, Any]] | None = None,
             writable: bool = True, name: str | None = None, prescan: bool = False) -> Env:
        env = Env(tmp_path / (name or f"env{len(envs)}"), upper, lowers if lowers is not None else [{}, {}],
                  writable, prescan)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs mounted inside tmp_path (a different filesystem from tmp_path); always unmounted."""
    import subprocess

    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "unionfs-unit", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


sys.modules.setdefault("unit_tree", sys.modules[__name__])

"""What the conformance checks work with: a fresh store, mounts made with ``unionfs snapshot mount``, changes
applied alike to a mount and to a plain directory, and tree comparison.

Plain Python (no pytest), so that the same checks run in the test process and, as an unprivileged user, in a
child interpreter that has only the packages copied for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import select
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from unionfs.snapshots import Snapshotter

DEADLINE = 20.0


# -- the mount table -------------------------------------------------------------------------------------------


def _unescape(field: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(field):
        chunk = field[i + 1 : i + 4]
        if field[i : i + 1] == b"\\" and len(chunk) == 3 and chunk.isdigit():
            out.append(int(chunk, 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def mount_targets() -> list[str]:
    with open("/proc/self/mountinfo", "rb") as f:
        return [os.fsdecode(_unescape(line.split(b" ")[4])) for line in f]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return os.path.realpath(path) in mount_targets()


def wait_until(pred: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def lazy_unmount(path: str | os.PathLike[str]) -> None:
    for _ in range(5):
        if not is_mounted(path):
            return
        r = subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
        if r.returncode != 0 and os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def server_pid_file(mountpoint: str | os.PathLike[str]) -> str:
    from unionfs.fuse.server import pid_file  # (the tests may load pyfuse3; the package may not)

    return pid_file(str(mountpoint))


def read_pid(mountpoint: Path) -> int | None:
    try:
        with open(server_pid_file(mountpoint)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


def remove_scratch(d: Path) -> None:
    """Unmount whatever is mounted below ``d`` (lazily), then remove it."""
    real = os.path.realpath(d)
    for target in sorted(mount_targets(), reverse=True):
        if target == real or target.startswith(real + "/"):
            lazy_unmount(target)
    left = [t for t in mount_targets() if t.startswith(real + "/")]
    if left:
        raise AssertionError(f"refusing to remove {d}: still mounted: {left}")
    shutil.rmtree(d, ignore_errors=True)


# -- trees -----------------------------------------------------------------------------------------------------


def describe(root: str | os.PathLike[str], owners: bool = True) -> dict[str, tuple[object, ...]]:
    """Every object under ``root`` (root itself as ``.``): type, permission bits, owner, content digest or link
    target, user xattrs, and which paths are hard links of one another."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    root = os.fspath(root)
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else root
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                body: object = hashlib.sha256(f.read()).hexdigest()[:16] + f"/{st.st_size}"
            if st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        elif stat.S_ISLNK(st.st_mode):
            body = os.readlink(path)
        elif stat.S_ISDIR(st.st_mode):
            body = None
            stack.extend(os.path.join(rel, n) if rel else n for n in os.listdir(path))
        else:
            body = st.st_rdev
        xattrs: tuple[tuple[str, bytes], ...] = ()
        if not stat.S_ISLNK(st.st_mode):
            names = sorted(n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user."))
            xattrs = tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
        owner = (st.st_uid, st.st_gid) if owners else None
        perm = stat.S_IMODE(st.st_mode) if not stat.S_ISLNK(st.st_mode) else None
        out[rel or "."] = (kind, perm, owner, body, xattrs)
    for paths in inodes.values():
        group = tuple(sorted(paths))
        for p in paths:
            out[p] = out[p] + (group,)
    return out


def diff(expected: dict[str, tuple[object, ...]], got: dict[str, tuple[object, ...]]) -> list[str]:
    lines = []
    for p in sorted(set(expected) | set(got)):
        if p not in got:
            lines.append(f"missing {p}: {expected[p]}")
        elif p not in expected:
            lines.append(f"unexpected {p}: {got[p]}")
        elif expected[p] != got[p]:
            lines.append(f"differs {p}: expected {expected[p]}, got {got[p]}")
    return lines


def assert_same_tree(expected: str | os.PathLike[str], got: str | os.PathLike[str], owners: bool = True) -> None:
    problems = diff(describe(expected, owners), describe(got, owners))
    assert not problems, f"{got} differs from {expected}:\n  " + "\n  ".join(problems[:40])


# -- changes, applied alike to a mount and to a plain directory ------------------------------------------------

Change = Callable[[Path], None]


def _at(root: Path, rel: str) -> Path:
    return root / rel.lstrip("/")


@dataclasses.dataclass(frozen=True)
class CreateFile:
    path: str
    data: bytes
    mode: int = 0o644

    def __call__(self, root: Path) -> None:
        p = _at(root, self.path)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self.mode)
        try:
            os.write(fd, self.data)
        finally:
            os.close(fd)
        os.chmod(p, self.mode)


@dataclasses.dataclass(frozen=True)
class AppendFile:
    path: str
    data: bytes

    def __call__(self, root: Path) -> None:
        with open(_at(root, self.path), "ab") as f:
            f.write(self.data)


@dataclasses.dataclass(frozen=True)
class CreateDir:
    path: str
    mode: int = 0o755

    def __call__(self, root: Path) -> None:
        p = _at(root, self.path)
        os.mkdir(p, self.mode)
        os.chmod(p, self.mode)


@dataclasses.dataclass(frozen=True)
class Remove:
    """unlink or rmdir (the directory must be empty)."""

    path: str

    def __call__(self, root: Path) -> None:
        p = _at(root, self.path)
        if p.is_dir() and not p.is_symlink():
            os.rmdir(p)
        else:
            os.unlink(p)


@dataclasses.dataclass(frozen=True)
class RemoveAll:
    path: str

    def __call__(self, root: Path) -> None:
        p = _at(root, self.path)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)


def _copy_tree(src: Path, dst: Path) -> None:
    """What ``mv`` does across devices: copy with modes and xattrs, then the caller removes the source."""
    st = os.lstat(src)
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(dst, 0o700)
        for name in sorted(os.listdir(src)):
            _copy_tree(src / name, dst / name)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    else:
        shutil.copy2(src, dst)


@dataclasses.dataclass(frozen=True)
class Rename:
    """rename(2); where it fails with EXDEV (a merged directory), falls back to copy and delete like mv."""

    old: str
    new: str

    def __call__(self, root: Path) -> None:
        src, dst = _at(root, self.old), _at(root, self.new)
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            if dst.is_dir() and not dst.is_symlink():
                os.rmdir(dst)
            _copy_tree(src, dst)
            RemoveAll(self.old)(root)


@dataclasses.dataclass(frozen=True)
class Link:
    old: str
    new: str

    def __call__(self, root: Path) -> None:
        os.link(_at(root, self.old), _at(root, self.new))


@dataclasses.dataclass(frozen=True)
class Symlink:
    target: str
    path: str

    def __call__(self, root: Path) -> None:
        os.symlink(self.target, _at(root, self.path))


@dataclasses.dataclass(frozen=True)
class Chmod:
    path: str
    mode: int

    def __call__(self, root: Path) -> None:
        os.chmod(_at(root, self.path), self.mode)


@dataclasses.dataclass(frozen=True)
class Chown:
    path: str
    uid: int
    gid: int

    def __call__(self, root: Path) -> None:
        os.lchown(_at(root, self.path), self.uid, self.gid)


@dataclasses.dataclass(frozen=True)
class SetXattr:
    path: str
    name: str
    value: bytes

    def __call__(self, root: Path) -> None:
        os.setxattr(_at(root, self.path), self.name, self.value, follow_symlinks=False)


def apply(root: Path, changes: tuple[Change, ...] | list[Change]) -> None:
    for change in changes:
        change(root)


# -- the harness -----------------------------------------------------------------------------------------------


class Harness:
    """A fresh store under ``base`` with a Snapshotter, mountpoints, a flat oracle directory, and teardown."""

    def __init__(self, base: str | os.PathLike[str]) -> None:
        self.base = Path(base)
        self.root = self.base / "store"
        self.sn = Snapshotter(self.root)
        self.mounted: list[Path] = []
        self.servers: dict[Path, int] = {}
        self._n = 0
        self.rootful = os.geteuid() == 0

    def use_root(self, root: Path) -> None:
        """Switch to a fresh store at ``root`` (for checks that need a particular path)."""
        self.sn.close()
        self.root = root
        self.sn = Snapshotter(root)

    # paths ---------------------------------------------------------------------------------------------------

    def fresh_dir(self, prefix: str) -> Path:
        self._n += 1
        d = self.base / f"{prefix}-{self._n}"
        d.mkdir()
        return d

    def flat(self) -> Path:
        """A plain directory that receives the same changes as the snapshots (the oracle), with the mode a new
        snapshot's layer root gets."""
        d = self.fresh_dir("flat")
        os.chmod(d, 0o755)
        return d

    def copy_of(self, flat: Path) -> Path:
        """A copy of ``flat`` as it is now (owners, modes, xattrs and hard links kept)."""
        self._n += 1
        d = self.base / f"copy-{self._n}"
        subprocess.run(["cp", "-a", str(flat), str(d)], check=True)
        return d

    # the command -----------------------------------------------------------------------------------------------

    def cli(self, *args: str | os.PathLike[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "unionfs", "snapshot", "--root", str(self.root),
                               *map(str, args)], capture_output=True, text=True, timeout=timeout)

    # mounts ----------------------------------------------------------------------------------------------------

    def mount(self, key: str) -> Path:
        """``unionfs snapshot mount KEY MP`` on a fresh mountpoint, returned once the mount is in place."""
        mp = self.fresh_dir("mnt")
        self.mounted.append(mp)
        r = self.cli("mount", key, mp)
        assert r.returncode == 0, f"mounting {key} failed ({r.returncode}): {r.stderr.strip()}"
        wait_until(lambda: is_mounted(mp), f"{mp} to be mounted")
        pid = read_pid(mp)
        if pid is not None:
            self.servers[mp] = pid
        return mp

    def umount(self, mp: Path) -> None:
        """Unmount and wait until the server has exited (so every change is on disk)."""
        pid = self.servers.pop(mp, None)
        pidfd = None
        if pid is not None:
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(pid)
        try:
            r = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True)
            assert r.returncode == 0, f"fusermount3 -u {mp}: {r.stderr.strip()}"
            if pidfd is not None:
                ready, _, _ = select.select([pidfd], [], [], DEADLINE)
                assert ready, f"the server of {mp} (pid {pid}) did not exit"
        finally:
            if pidfd is not None:
                os.close(pidfd)
        wait_until(lambda: not is_mounted(mp), f"{mp} to be unmounted")
        self.mounted.remove(mp)

    @contextlib.contextmanager
    def mounted_at(self, key: str) -> Iterator[Path]:
        mp = self.mount(key)
        try:
            yield mp
        finally:
            if mp in self.mounted:
                self.umount(mp)

    def change(self, key: str, changes: tuple[Change, ...] | list[Change], flat: Path | None = None) -> None:
        """Apply ``changes`` to the mounted snapshot ``key`` (and to ``flat``, when given)."""
        with self.mounted_at(key) as mp:
            apply(mp, changes)
        if flat is not None:
            apply(flat, changes)

    def layer(self, name: str, parent: str | None, changes: tuple[Change, ...] | list[Change],
              flat: Path | None = None) -> None:
        """prepare on ``parent``, apply ``changes`` through a mount (and to ``flat``), commit as ``name``."""
        key = f"{name}-active"
        self.sn.prepare(key, parent)
        self.change(key, changes, flat)
        self.sn.commit(name, key)

    def check_view(self, parent: str, flat: Path, owners: bool = True) -> None:
        """A view of ``parent`` shows exactly what ``flat`` holds."""
        key = f"view-of-{parent}-{self._n}"
        self.sn.view(key, parent)
        with self.mounted_at(key) as mp:
            assert_same_tree(flat, mp, owners)
        self.sn.remove(key)

    # teardown --------------------------------------------------------------------------------------------------

    def close(self) -> None:
        for mp in list(reversed(self.mounted)):
            lazy_unmount(mp)
        self.mounted.clear()
        self.sn.close()

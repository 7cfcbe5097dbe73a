#!/usr/bin/env python3
"""Benchmark unionfs against kernel overlayfs and fuse-overlayfs on the same workloads.

Run as root: ``python bench/run.py [--quick] [--fs kernel,fuse-overlayfs,unionfs] [--repeat N] [--json FILE]
[--workdir DIR]``.  See bench/README.md for what each workload measures.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import dataclasses
import datetime
import functools
import io
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FS_NAMES = ("kernel", "fuse-overlayfs", "unionfs", "unionfs-pure")
SEED = 1_234_567
MOUNT_DEADLINE = 30.0  # seconds a FUSE server gets to show up in /proc/self/mountinfo
EXIT_DEADLINE = 30.0  # seconds a FUSE server gets to exit after fusermount3 -u
LOOKUP_LAYERS = (1, 16, 128, 500)
LOOKUP_DEPTH = 8  # directories above the target file
MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Sizes:
    repeat: int
    tree_files: int  # files placed in the three lower layers (before overrides and whiteouts)
    tree_dirs: int
    create_files: int
    copyup_files: int
    big_mib: int  # size of the sequential-write / read / fio file
    fio_runtime: int  # seconds
    tar_small: int  # number of small files in the tarball
    tar_large: int  # number of large files in the tarball
    tar_large_mib: int
    lookup_paths: int  # distinct deep paths stat()ed per mount
    deadline: int  # seconds one mount may stay up before its FUSE server is killed as hung


FULL = Sizes(repeat=3, tree_files=10_000, tree_dirs=600, create_files=10_000, copyup_files=500, big_mib=1024,
             fio_runtime=10, tar_small=5_000, tar_large=8, tar_large_mib=4, lookup_paths=16,
             deadline=900)
QUICK = Sizes(repeat=2, tree_files=400, tree_dirs=40, create_files=500, copyup_files=100, big_mib=32,
              fio_runtime=2, tar_small=300, tar_large=2, tar_large_mib=2, lookup_paths=8,
              deadline=120)


class MountError(RuntimeError):
    """A file system could not be mounted; the message says why (one or a few lines)."""


class WorkloadError(RuntimeError):
    """A command of a workload failed on the mounted file system."""


_t0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - _t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def tail(text: str, lines: int = 6) -> str:
    return "\n".join(line for line in text.strip().splitlines()[-lines:])


def short_reason(text: str, width: int = 60) -> str:
    """The last line of an error message (where the cause usually is), cut to fit in a table cell."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = lines[-1].removeprefix(f"{sys.executable}: ") if lines else "unknown error"
    return line if len(line) <= width else line[: width - 3] + "..."


# ---------------------------------------------------------------------------------------------------------
# System helpers


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def mountpoints() -> set[str]:
    """Mount points currently listed in /proc/self/mountinfo (octal escapes decoded)."""
    points = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            field = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), line.split(b" ")[4])
            points.add(os.fsdecode(field))
    return points


def is_mounted(path: Path) -> bool:
    return str(path) in mountpoints()


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    """Run a command and raise WorkloadError (with the tail of its stderr) if it fails."""
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.PIPE)
    proc: subprocess.CompletedProcess[bytes] = subprocess.run(cmd, stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace") if proc.stderr else ""
        raise WorkloadError(f"{Path(cmd[0]).name} exited with {proc.returncode}: {tail(err, 3)}")
    return proc


def timed(cmd: list[str], **kw: object) -> float:
    """Wall-clock seconds taken by one command."""
    t = time.perf_counter()
    run(cmd, **kw)
    return time.perf_counter() - t


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (bytes) of a process."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def cleanup_mounts_under(root: Path) -> list[str]:
    """Lazily unmount anything still mounted below root (deepest first); return what was found."""
    prefix = str(root) + "/"
    left = sorted((p for p in mountpoints() if p.startswith(prefix)), key=len, reverse=True)
    for point in left:
        for cmd in (["fusermount3", "-uz", point], ["umount", "-l", point]):
            if subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode == 0:
                break
    return left


# ---------------------------------------------------------------------------------------------------------
# The three file systems


def check_layer_paths(paths: list[Path]) -> None:
    for p in paths:
        if any(ch in str(p) for ch in ",:\\"):
            raise MountError(f"layer path {p} contains a character that needs escaping")


class Backend:
    """One of the compared file systems: how to mount and unmount it."""

    name = ""

    def unavailable(self) -> str | None:
        """Why this file system cannot be used on this machine, or None."""
        return None

    def start(self, lowers: list[Path], upper: Path, work: Path, mnt: Path,
              log: Path) -> subprocess.Popen[bytes] | None:
        raise NotImplementedError

    def stop(self, mnt: Path, proc: subprocess.Popen[bytes] | None) -> None:
        raise NotImplementedError


class Kernel(Backend):
    name = "kernel"

    def unavailable(self) -> str | None:
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                subprocess.run(["modprobe", "overlay"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return None

    def start(self, lowers: list[Path], upper: Path, work: Path, mnt: Path,
              log: Path) -> subprocess.Popen[bytes] | None:
        check_layer_paths([*lowers, upper, work])
        # The whole option string must fit in one page: name the lower layers relative to their common parent
        # and run mount(8) from there.
        base = Path(os.path.commonpath([str(p) for p in lowers]))
        if base in lowers:
            base = base.parent
        rel = ":".join(os.path.relpath(p, base) for p in lowers)
        opts = f"lowerdir={rel},upperdir={upper},workdir={work}"
        proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], cwd=base,
                              stdin=subprocess.DEVNULL, capture_output=True)
        if proc.returncode != 0:
            raise MountError(f"mount failed: {tail(proc.stderr.decode(errors='replace'), 3)}")
        return None

    def stop(self, mnt: Path, proc: subprocess.Popen[bytes] | None) -> None:
        if subprocess.run(["umount", str(mnt)], stdin=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], stdin=subprocess.DEVNULL)


class FuseServer(Backend):
    """A FUSE server run in the foreground as a child process, so that its pid is known."""

    def command(self, opts: str, mnt: Path) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        return None

    def unavailable(self) -> str | None:
        if shutil.which("fusermount3") is None:
            return "fusermount3 not installed"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse missing"
        return None

    def start(self, lowers: list[Path], upper: Path, work: Path, mnt: Path,
              log: Path) -> subprocess.Popen[bytes] | None:
        check_layer_paths([*lowers, upper, work])
        opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
        with open(log, "wb") as logf:
            # A session of its own: a Ctrl-C on the terminal reaches only us, and we unmount cleanly.
            proc = subprocess.Popen(self.command(opts, mnt), stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, env=self.environment(), start_new_session=True)
        try:
            deadline = time.monotonic() + MOUNT_DEADLINE
            while not is_mounted(mnt):
                if proc.poll() is not None:
                    raise MountError(f"{self.name} exited with {proc.returncode} before mounting:\n"
                                     f"{tail(log.read_text(errors='replace'), 4)}")
                if time.monotonic() > deadline:
                    raise MountError(f"{self.name} did not mount within {MOUNT_DEADLINE:.0f} s\n"
                                     f"{tail(log.read_text(errors='replace'), 4)}")
                time.sleep(0.01)
        except BaseException:
            self.stop(mnt, proc)
            raise
        return proc

    def stop(self, mnt: Path, proc: subprocess.Popen[bytes] | None) -> None:
        if is_mounted(mnt):
            for flags in ("-u", "-uz"):  # lazily if busy
                if subprocess.run(["fusermount3", flags, str(mnt)], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
                    break
        if proc is None:
            return
        try:
            proc.wait(timeout=EXIT_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class FuseOverlayfs(FuseServer):
    name = "fuse-overlayfs"

    def unavailable(self) -> str | None:
        if shutil.which("fuse-overlayfs") is None:
            return "fuse-overlayfs not installed"
        return super().unavailable()

    def command(self, opts: str, mnt: Path) -> list[str]:
        return ["fuse-overlayfs", "-f", "-o", opts, str(mnt)]


class Unionfs(FuseServer):
    name = "unionfs"
    #: more mount options (the prescan workload sets "prescan")
    extra_options = ""

    #: options every mount of this backend gets
    base_options = ""

    def command(self, opts: str, mnt: Path) -> list[str]:
        for more in (self.base_options, self.extra_options):
            if more:
                opts += "," + more
        return [sys.executable, "-m", "unionfs", "mount", "-f", "-o", opts, str(mnt)]

    def environment(self) -> dict[str, str] | None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return env

    def unavailable(self) -> str | None:
        # Start as an installed package starts: from compiled bytecode. Without it (PYTHONDONTWRITEBYTECODE,
        # a fresh checkout), every mount would compile the sources first, tens of milliseconds of its start.
        compileall.compile_dir(str(REPO / "unionfs"), quiet=1)
        return super().unavailable()


class UnionfsPure(Unionfs):
    """unionfs in the pure mode (``-o nonative``): every request served by Python through pyfuse3 alone."""

    name = "unionfs-pure"
    base_options = "nonative"


BACKENDS: dict[str, Callable[[], Backend]] = {
    "kernel": Kernel, "fuse-overlayfs": FuseOverlayfs, "unionfs": Unionfs, "unionfs-pure": UnionfsPure,
}


@dataclasses.dataclass
class Mount:
    path: Path
    upper: Path
    pid: int | None  # the FUSE server's pid; None for the kernel


# ---------------------------------------------------------------------------------------------------------
# Test data, built once per run


@dataclasses.dataclass(frozen=True)
class Tree:
    layers: list[Path]  # top-most lower layer first
    files: list[str]  # visible regular files, relative to the mount root
    entries: int  # what `find MNT` should print, the root included


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def merged_view(layers: list[Path]) -> tuple[list[str], list[str]]:
    """Directories and files visible through a union of layers (top-most first), by the overlayfs rules."""
    dirs: list[str] = []
    files: list[str] = []
    stack: list[tuple[str, list[Path]]] = [("", list(layers))]
    while stack:
        rel, roots = stack.pop()
        seen: dict[str, list[Any]] = {}  # name -> [kind, [roots holding it as a directory], sealed]
        for root in roots:
            with os.scandir(os.path.join(root, rel)) as it:
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    isdir = stat.S_ISDIR(st.st_mode)
                    cur = seen.get(e.name)
                    if cur is None:
                        kind = "whiteout" if is_whiteout(st) else "dir" if isdir else "file"
                        seen[e.name] = [kind, [root] if isdir else [], not isdir or is_opaque(e.path)]
                    elif cur[0] == "dir" and not cur[2]:
                        if isdir:
                            cur[1].append(root)
                        cur[2] = not isdir or is_opaque(e.path)
        for name, (kind, droots, _) in sorted(seen.items()):
            path = os.path.join(rel, name)
            if kind == "file":
                files.append(path)
            elif kind == "dir":
                dirs.append(path)
                stack.append((path, droots))
    return dirs, files


def build_tree(root: Path, sizes: Sizes, rng: random.Random) -> Tree:
    """Three lower layers: files spread over them, some overridden higher up, some whited out (files and
    whole directories), and one opaque directory in the middle layer."""
    layers = [root / str(i) for i in range(3)]  # 0 = top-most lower, 2 = bottom
    dirs, depth = [""], {"": 0}
    while len(dirs) <= sizes.tree_dirs:
        parent = rng.choice(dirs)
        if depth[parent] >= 6:
            continue
        path = os.path.join(parent, f"d{len(dirs)}")
        dirs.append(path)
        depth[path] = depth[parent] + 1
    placed: list[dict[str, int]] = [{}, {}, {}]  # per layer: file path -> size
    for i in range(sizes.tree_files):
        layer = rng.choices((0, 1, 2), weights=(2, 3, 5))[0]
        placed[layer][os.path.join(rng.choice(dirs), f"f{i}.dat")] = rng.randint(512, 8192)
    lower_files = sorted((p, layer) for layer in (1, 2) for p in placed[layer])
    picked = rng.sample(lower_files, len(lower_files) // 10)
    overrides, file_whiteouts = picked[: len(picked) // 2], picked[len(picked) // 2:][: len(picked) // 5]
    for path, layer in overrides:
        placed[rng.randrange(layer)][path] = rng.randint(512, 8192)
    whiteouts: list[set[str]] = [set(), set(), set()]
    for path, layer in file_whiteouts:
        whiteouts[rng.randrange(layer)].add(path)

    def under(path: str, d: str) -> bool:
        return path.startswith(d + "/")

    def bottom_files_under(d: str) -> int:
        return sum(under(p, d) for p in placed[2])

    deep = [d for d in dirs[1:] if depth[d] >= 2]
    opaque_pick = [d for d in deep if 3 <= bottom_files_under(d) <= max(3, sizes.tree_files // 50)] or deep
    opaque = rng.choice(opaque_pick)
    layer0 = set(placed[0]) | whiteouts[0]
    dir_whiteouts = [d for d in deep if not any(under(p, d) for p in layer0)
                     and not under(opaque, d) and not under(d, opaque) and d != opaque]
    whiteouts[0].update(rng.sample(dir_whiteouts, min(2, len(dir_whiteouts))))

    pool = rng.randbytes(MiB)
    for d in dirs:
        (layers[2] / d).mkdir(parents=True, exist_ok=True)  # the bottom layer holds the whole skeleton
    for layer in range(3):
        layers[layer].mkdir(parents=True, exist_ok=True)
        for path, size in sorted(placed[layer].items()):
            full = layers[layer] / path
            full.parent.mkdir(parents=True, exist_ok=True)
            off = rng.randrange(len(pool) - size)
            full.write_bytes(pool[off:off + size])
        for path in sorted(whiteouts[layer]):
            full = layers[layer] / path
            full.parent.mkdir(parents=True, exist_ok=True)
            os.mknod(full, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (layers[1] / opaque).mkdir(parents=True, exist_ok=True)
    (layers[1] / opaque / "only-in-middle.dat").write_bytes(pool[:1000])
    os.setxattr(layers[1] / opaque, "trusted.overlay.opaque", b"y")

    vdirs, vfiles = merged_view(layers)
    return Tree(layers=layers, files=vfiles, entries=1 + len(vdirs) + len(vfiles))


def build_big_file(path: Path, mib: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fsync", "status=none"])


def build_tarball(path: Path, sizes: Sizes, rng: random.Random) -> None:
    """Many small files in a few dozen directories, plus some large ones; fixed content and times."""
    pool = rng.randbytes(MiB)

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(sizes.tar_small):
            size = rng.randint(200, 8000)
            off = rng.randrange(len(pool) - size)
            add(tar, f"src/m{i % 40}/s{i % 7}/file{i}.txt", pool[off:off + size])
        for i in range(sizes.tar_large):
            add(tar, f"src/blobs/blob{i}.bin", rng.randbytes(sizes.tar_large_mib * MiB))


@dataclasses.dataclass(frozen=True)
class LookupLayers:
    root: Path
    targets: list[str]  # deep paths, each a file in the bottom layer

    def stack(self, n: int) -> list[Path]:
        """n lower layers, top-most first; the bottom one ("B") holds the targets."""
        return [self.root / str(i) for i in range(n - 1)] + [self.root / "B"]


def build_lookup_layers(root: Path, sizes: Sizes) -> LookupLayers:
    """max(LOOKUP_LAYERS) small layers; every one holds the parent directories of every target."""
    below = [f"d{k}" for k in range(1, LOOKUP_DEPTH)]
    chains = [os.path.join(f"p{j}", *below) for j in range(sizes.lookup_paths)]
    for name in ["B", *map(str, range(max(LOOKUP_LAYERS) - 1))]:
        layer = root / name
        for chain in chains:
            os.makedirs(layer / chain)
        (layer / "side").mkdir()
        for k in range(4):
            (layer / "side" / f"s{k}").write_bytes(name.encode())
    for chain in chains:
        (root / "B" / chain / "target").write_bytes(b"target\n")
    return LookupLayers(root=root, targets=[os.path.join(chain, "target") for chain in chains])


class Env:
    """The run's work directory, its test data (built on first use) and the mount helper."""

    def __init__(self, root: Path, sizes: Sizes) -> None:
        self.root = root
        self.sizes = sizes
        self.notes: list[str] = []
        self._serial = itertools.count()
        (root / "mnt").mkdir()

    @functools.cached_property
    def tree(self) -> Tree:
        progress(f"building the layered tree ({self.sizes.tree_files} files in 3 layers)")
        tree = build_tree(self.root / "tree", self.sizes, random.Random(SEED))
        progress(f"tree built: {len(tree.files)} visible files, {tree.entries} entries")
        return tree

    @functools.cached_property
    def big_layer(self) -> Path:
        progress(f"writing the {self.sizes.big_mib} MiB file for the read tests")
        build_big_file(self.root / "big" / "big.bin", self.sizes.big_mib)
        return self.root / "big"

    @functools.cached_property
    def tarball(self) -> Path:
        path = self.root / "src.tar"
        build_tarball(path, self.sizes, random.Random(SEED + 1))
        progress(f"tarball built: {path.stat().st_size / MiB:.1f} MiB")
        return path

    @functools.cached_property
    def lookup(self) -> LookupLayers:
        progress(f"building {max(LOOKUP_LAYERS)} small layers for the lookup test")
        return build_lookup_layers(self.root / "L", self.sizes)

    @contextlib.contextmanager
    def mount(self, fs: Backend, lowers: list[Path], cold: bool = True) -> Iterator[Mount]:
        """A fresh mount with an empty upper and work dir; caches dropped after mounting when cold."""
        n = next(self._serial)
        scratch = self.root / "scratch" / f"{fs.name}-{n}"
        upper, work, mnt = scratch / "upper", scratch / "work", self.root / "mnt" / f"{fs.name}-{n}"
        for d in (upper, work, mnt):
            d.mkdir(parents=True)
        try:
            proc = fs.start(lowers, upper, work, mnt, scratch / "server.log")
        except BaseException:
            if not is_mounted(mnt):
                shutil.rmtree(scratch, ignore_errors=True)
                mnt.rmdir()
            raise
        # A hung server would hang the benchmark: past the deadline it is killed, which fails its pending
        # requests (ENOTCONN) so that the workload ends with an error instead.
        hung = threading.Event()
        def kill_hung() -> None:
            if proc is not None:
                hung.set()
                proc.kill()

        watchdog = threading.Timer(self.sizes.deadline, kill_hung)
        watchdog.daemon = True
        watchdog.start()
        try:
            if cold:
                drop_caches()
            yield Mount(path=mnt, upper=upper, pid=proc.pid if proc else None)
        except Exception as e:
            if hung.is_set():
                raise WorkloadError(f"{fs.name} killed: still busy after {self.sizes.deadline} s") from e
            raise
        finally:
            watchdog.cancel()
            fs.stop(mnt, proc)
            if not is_mounted(mnt):
                shutil.rmtree(scratch, ignore_errors=True)
                mnt.rmdir()


# ---------------------------------------------------------------------------------------------------------
# Workloads: each mounts what it needs and returns {metric key: value, or a str saying why there is none}


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str  # "s" (shown scaled to ms/µs as fits), "IOPS", "MiB" or "B"
    higher_is_better: bool = False


Result = dict[str, "float | str"]


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    title: str
    metrics: tuple[Metric, ...]
    run: Callable[[Backend, Env], Result]
    needs_server: bool = False  # measures the FUSE server process (no kernel figure)
    tools: tuple[str, ...] = ()


WORKLOADS: list[Workload] = []


def workload(name: str, title: str, *metrics: Metric, needs_server: bool = False,
             tools: tuple[str, ...] = ()) -> Callable[[Callable[[Backend, Env], Result]],
                                                       Callable[[Backend, Env], Result]]:
    def register(fn: Callable[[Backend, Env], Result]) -> Callable[[Backend, Env], Result]:
        WORKLOADS.append(Workload(name, title, metrics, fn, needs_server, tools))
        return fn
    return register


def find_entries(mnt: Path) -> tuple[float, int]:
    t = time.perf_counter()
    out = run(["find", str(mnt)], stdout=subprocess.PIPE).stdout
    return time.perf_counter() - t, out.count(b"\n")


def check_upper_empty(env: Env, fs: Backend, m: Mount, what: str) -> None:
    if any(m.upper.iterdir()):
        env.notes.append(f"{fs.name}: {what} left entries in the upper layer (a read-only workload wrote)")


@workload("find", "find over the tree",
          Metric("cold", "find, cold", "s"), Metric("warm", "find, warm", "s"))
def wl_find(fs: Backend, env: Env) -> Result:
    with env.mount(fs, env.tree.layers) as m:
        cold, found = find_entries(m.path)
        warm, _ = find_entries(m.path)
        check_upper_empty(env, fs, m, "find")
    if found != env.tree.entries:
        note = f"{fs.name}: find printed {found} entries, the layers hold {env.tree.entries}"
        if note not in env.notes:
            env.notes.append(note)
    return {"cold": cold, "warm": warm}


@workload("ls", "ls -lR over the tree",
          Metric("cold", "ls -lR, cold", "s"), Metric("warm", "ls -lR, warm", "s"))
def wl_ls(fs: Backend, env: Env) -> Result:
    with env.mount(fs, env.tree.layers) as m:
        cold = timed(["ls", "-lR", str(m.path)])
        warm = timed(["ls", "-lR", str(m.path)])
    return {"cold": cold, "warm": warm}


@workload("read", "read every file of the tree", Metric("cold", "read all files, cold", "s"))
def wl_read(fs: Backend, env: Env) -> Result:
    with env.mount(fs, env.tree.layers) as m:
        t = timed(["find", str(m.path), "-type", "f", "-exec", "cat", "{}", "+"])
        check_upper_empty(env, fs, m, "reading files")
    return {"cold": t}


@workload("create", "create then delete small files in one new directory",
          Metric("create", "create files", "s"), Metric("delete", "rm -rf them", "s"))
def wl_create(fs: Backend, env: Env) -> Result:
    data = b"x" * 100
    with env.mount(fs, env.tree.layers) as m:
        d = m.path / "many"
        t = time.perf_counter()
        d.mkdir()
        for i in range(env.sizes.create_files):
            fd = os.open(d / f"n{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
        create = time.perf_counter() - t
        delete = timed(["rm", "-rf", str(d)])
    return {"create": create, "delete": delete}


@workload("copyup", "copy-up: append one byte to files of the lower layers", Metric("append", "copy-up", "s"))
def wl_copyup(fs: Backend, env: Env) -> Result:
    files = env.tree.files
    files = sorted(random.Random(SEED + 2).sample(files, min(env.sizes.copyup_files, len(files))))
    with env.mount(fs, env.tree.layers) as m:
        t = time.perf_counter()
        for rel in files:
            fd = os.open(m.path / rel, os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"+")
            os.close(fd)
        return {"append": time.perf_counter() - t}


@workload("seqwrite", "sequential write (dd bs=1M conv=fsync)", Metric("write", "write", "s"))
def wl_seqwrite(fs: Backend, env: Env) -> Result:
    with env.mount(fs, [env.big_layer]) as m:
        t = timed(["dd", "if=/dev/zero", f"of={m.path / 'new.bin'}", "bs=1M", f"count={env.sizes.big_mib}",
                   "conv=fsync", "status=none"])
    return {"write": t}


@workload("seqread", "sequential read of a lower-layer file (dd bs=1M)",
          Metric("cold", "read, cold", "s"), Metric("warm", "read, warm", "s"))
def wl_seqread(fs: Backend, env: Env) -> Result:
    with env.mount(fs, [env.big_layer]) as m:
        cmd = ["dd", f"if={m.path / 'big.bin'}", "of=/dev/null", "bs=1M", "status=none"]
        cold = timed(cmd)
        warm = timed(cmd)
        check_upper_empty(env, fs, m, "dd read")
    return {"cold": cold, "warm": warm}


def fio_randread(path: Path, sizes: Sizes, out: Path, *extra: str) -> float:
    run(["fio", "--name=r", f"--filename={path}", "--rw=randread", "--bs=4k", f"--size={sizes.big_mib}M",
         f"--runtime={sizes.fio_runtime}", "--time_based", "--ioengine=psync", "--direct=0",
         "--output-format=json", f"--output={out}", *extra])
    return float(json.loads(out.read_text())["jobs"][0]["read"]["iops"])


@workload("fio", "fio 4k random reads (psync, buffered)",
          Metric("iops", "randread IOPS, fio defaults", "IOPS", higher_is_better=True),
          Metric("iops_warm", "randread IOPS, file cached, --invalidate=0", "IOPS", higher_is_better=True),
          tools=("fio",))
def wl_fio(fs: Backend, env: Env) -> Result:
    with env.mount(fs, [env.big_layer]) as m:
        big, out = m.path / "big.bin", m.upper.parent / "fio.json"
        iops = fio_randread(big, env.sizes, out)
        run(["dd", f"if={big}", "of=/dev/null", "bs=1M", "status=none"])
        warm = fio_randread(big, env.sizes, out, "--invalidate=0")
        check_upper_empty(env, fs, m, "fio")
    return {"iops": iops, "iops_warm": warm}


@workload("untar", "untar a tarball into the mount", Metric("untar", "tar -xf", "s"), tools=("tar",))
def wl_untar(fs: Backend, env: Env) -> Result:
    tarball = env.tarball
    with env.mount(fs, env.tree.layers) as m:
        (m.path / "untar").mkdir()
        return {"untar": timed(["tar", "-xf", str(tarball), "-C", str(m.path / "untar")])}


@workload("rss", "memory of the server process around a cold find",
          Metric("before", "RSS before find", "MiB"), Metric("after", "RSS after find", "MiB"),
          Metric("hwm", "peak RSS (VmHWM)", "MiB"), Metric("per_entry", "RSS growth per entry", "B"),
          needs_server=True)
def wl_rss(fs: Backend, env: Env) -> Result:
    with env.mount(fs, env.tree.layers) as m:
        if m.pid is None:
            return dict.fromkeys(("before", "after", "hwm", "per_entry"), "no server process")
        before = proc_status(m.pid)
        _, found = find_entries(m.path)
        after = proc_status(m.pid)
    return {"before": before["VmRSS"] / MiB, "after": after["VmRSS"] / MiB, "hwm": after["VmHWM"] / MiB,
            "per_entry": (after["VmRSS"] - before["VmRSS"]) / max(found, 1)}


def stat_time(path: Path) -> float:
    t = time.perf_counter()
    os.stat(path)
    return time.perf_counter() - t


LOOKUP_KINDS = {
    "cold": "cold",  # first stat after mount and cache drop: the backing file system reads from disk too
    "fresh": "new mount, layers cached",  # first stat after a new mount, with the layers' own dentries cached
    "warm": "warm",  # the same stat again on the same mount
    "mount": "time to mount, layers cached",  # from starting the mount until it is ready (what prescan costs)
}


@workload("lookup", f"stat() of a path {LOOKUP_DEPTH} directories deep, target in the bottom layer",
          *(Metric(f"{kind}{n}", f"{n} lower layer{'s' if n > 1 else ''}, {label}", "s")
            for n in LOOKUP_LAYERS for kind, label in LOOKUP_KINDS.items()))
def wl_lookup(fs: Backend, env: Env) -> Result:
    return lookup_times(fs, env)


def lookup_times(fs: Backend, env: Env) -> Result:
    out: Result = {}
    targets = env.lookup.targets
    for n in LOOKUP_LAYERS:
        try:
            with env.mount(fs, env.lookup.stack(n)) as m:
                out[f"cold{n}"] = statistics.median(stat_time(m.path / p) for p in targets)
                out[f"warm{n}"] = statistics.median(stat_time(m.path / p) for p in targets)
            started = time.perf_counter()
            with env.mount(fs, env.lookup.stack(n), cold=False) as m:
                out[f"mount{n}"] = time.perf_counter() - started
                out[f"fresh{n}"] = statistics.median(stat_time(m.path / p) for p in targets)
        except (MountError, OSError) as e:
            for kind in LOOKUP_KINDS:
                out.setdefault(f"{kind}{n}", short_reason(str(e)))
    return out


@workload("prescan", "the lookup workload on unionfs mounted with -o prescan (lower layers resolved at mount)",
          *(Metric(f"{kind}{n}", f"{n} lower layer{'s' if n > 1 else ''}, {label}", "s")
            for n in LOOKUP_LAYERS for kind, label in LOOKUP_KINDS.items()))
def wl_prescan(fs: Backend, env: Env) -> Result:
    if not isinstance(fs, Unionfs):
        return {f"{kind}{n}": "a unionfs option" for n in LOOKUP_LAYERS for kind in LOOKUP_KINDS}
    fs.extra_options = "prescan"
    try:
        return lookup_times(fs, env)
    finally:
        fs.extra_options = ""


# ---------------------------------------------------------------------------------------------------------
# Harness


@dataclasses.dataclass
class Cell:
    runs: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.runs) if self.runs else None


Results = dict[tuple[str, str, str], Cell]  # (workload, metric, fs) -> cell


def run_workload(wl: Workload, backends: list[Backend], env: Env, repeat: int, results: Results,
                 unavailable: dict[str, str]) -> None:
    for fs in backends:
        reason = unavailable.get(fs.name)
        if reason is None and wl.needs_server and fs.name == "kernel":
            reason = "in-kernel, no server process"
        missing = [t for t in wl.tools if shutil.which(t) is None]
        if reason is None and missing:
            reason = f"{', '.join(missing)} not installed"
        if reason is not None:
            for metric in wl.metrics:
                results[wl.name, metric.key, fs.name] = Cell(error=reason)
    for rep in range(repeat):
        for fs in backends:
            cells = [results.setdefault((wl.name, metric.key, fs.name), Cell()) for metric in wl.metrics]
            if any(cell.error for cell in cells) and not any(cell.runs for cell in cells):
                continue  # unavailable, or failed on an earlier repetition
            try:
                values = wl.run(fs, env)
            except Exception as e:  # a failure on one file system must not stop the others
                progress(f"{wl.name:8} rep {rep + 1}/{repeat} {fs.name:14} FAILED: {e}")
                note = f"{fs.name} failed {wl.name}: {e}"
                if note not in env.notes:
                    env.notes.append(note)
                for cell in cells:
                    cell.error = short_reason(str(e))
                continue
            shown = []
            for metric, cell in zip(wl.metrics, cells, strict=True):
                value = values.get(metric.key, "not measured")
                if isinstance(value, str):
                    cell.error = value
                    shown.append(f"{metric.label} n/a ({value})")
                else:
                    cell.runs.append(value)
                    shown.append(f"{metric.label} {fmt_value(metric, value, scale_for(metric, [value]))}")
            progress(f"{wl.name:8} rep {rep + 1}/{repeat} {fs.name:14} " + "; ".join(shown))


def scale_for(metric: Metric, values: list[float]) -> tuple[str, float]:
    if metric.unit != "s":
        return metric.unit, 1.0
    smallest = min(values, default=1.0)
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if smallest >= factor:
            return unit, factor
    return "µs", 1e-6


def fmt_number(v: float) -> str:
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_value(metric: Metric, v: float, scale: tuple[str, float]) -> str:
    unit, factor = scale
    return f"{fmt_number(v / factor)} {unit}"


def table(backends: list[Backend], results: Results, repeat: int) -> list[str]:
    names = [fs.name for fs in backends]
    both = "unionfs" in names and "fuse-overlayfs" in names
    header = ["workload", "metric", *names] + (["unionfs / fuse-overlayfs"] if both else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for wl in WORKLOADS:
        for metric in wl.metrics:
            cells = {n: results.get((wl.name, metric.key, n)) for n in names}
            if not any(cells.values()):
                continue
            medians = {n: c.median for n, c in cells.items() if c is not None and c.median is not None}
            unit, factor = scale_for(metric, list(medians.values()))
            base = medians.get("kernel")
            row = [wl.name, f"{metric.label} [{unit}{' ↑' if metric.higher_is_better else ''}]"]
            for n in names:
                c = cells[n]
                if n in medians:
                    text = fmt_number(medians[n] / factor)
                    if base:
                        text += f" ({medians[n] / base:.2f})"
                    row.append(text)
                else:
                    row.append(f"n/a ({c.error if c and c.error else 'not run'})")
            if both:
                u, f = medians.get("unionfs"), medians.get("fuse-overlayfs")
                row.append(f"{u / f:.2f}" if u is not None and f else "n/a")
            lines.append("| " + " | ".join(row) + " |")
    return lines


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def tool_version(cmd: list[str], prefix: str = "") -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith(prefix)]
    return lines[0].removeprefix(prefix).strip() if lines else "unknown"


#: A virtual machine's idle CPUs poll this long before they halt (the haltpoll cpuidle driver of a KVM guest; the
#: kernel's default is 200000). With 0, every wake of a thread on an idle CPU (a FUSE server's reply to a client
#: on the other CPU, say) waits for the host to resume that CPU, which costs each FUSE round trip about 13 us
#: more (a GETXATTR the native part answers: 20 us, against 7 us with 200000, on a 2-core VM).
HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


def idle_info() -> str:
    try:
        driver = Path("/sys/devices/system/cpu/cpuidle/current_driver").read_text().strip()
    except OSError:
        return "unknown"
    if HALT_POLL.exists():
        return f"{driver}, guest_halt_poll_ns {HALT_POLL.read_text().strip()}"
    return driver


@contextlib.contextmanager
def halt_polling(ns: int | None) -> Iterator[None]:
    """Set the guest's halt polling to ``ns`` for the run (None: leave it), then put back what it was."""
    if ns is None:
        yield
        return
    before = HALT_POLL.read_text().strip()
    HALT_POLL.write_text(str(ns))
    try:
        yield
    finally:
        HALT_POLL.write_text(before)


def machine_info() -> dict[str, str]:
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{mem_kb / (1 << 20):.1f} GiB",
        "python": platform.python_version(),
        "fuse-overlayfs": tool_version(["fuse-overlayfs", "--version"], "fuse-overlayfs:"),
        "fio": tool_version(["fio", "--version"]),
        "idle": idle_info(),
    }


def describe(s: Sizes) -> str:
    return "; ".join([
        f"tree of {s.tree_files} files in {s.tree_dirs} directories over 3 layers",
        f"create {s.create_files} files",
        f"copy-up {s.copyup_files} files",
        f"{s.big_mib} MiB file",
        f"fio {s.fio_runtime} s",
        f"tarball of {s.tar_small} small + {s.tar_large} x {s.tar_large_mib} MiB files",
        f"lookup of {s.lookup_paths} paths",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Compare unionfs with kernel overlayfs and fuse-overlayfs.")
    p.add_argument("--quick", action="store_true", help="small sizes and fewer repeats, for a smoke test")
    p.add_argument("--fs", default=",".join(FS_NAMES),
                   help="comma-separated subset of: " + ", ".join(FS_NAMES))
    p.add_argument("--repeat", type=int, help="repetitions per workload (default 3, 2 with --quick)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the raw results to FILE")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="a fresh directory for the test data is made under this one (default /var/tmp)")
    p.add_argument("--workloads", help="comma-separated subset of: " + ", ".join(w.name for w in WORKLOADS))
    p.add_argument("--keep", action="store_true", help="keep the test data directory")
    p.add_argument("--halt-poll-ns", type=int, metavar="NS",
                   help=f"in a KVM guest, let idle CPUs poll NS nanoseconds before halting during the run "
                        f"({HALT_POLL}; the kernel's default is 200000), then restore the setting; the "
                        f"report's header shows the value used")
    args = p.parse_args(argv)
    if args.halt_poll_ns is not None and (args.halt_poll_ns < 0 or not HALT_POLL.exists()):
        p.error(f"--halt-poll-ns needs a non-negative number and {HALT_POLL} (a KVM guest's haltpoll driver)")
    chosen = [s.strip() for s in args.fs.split(",") if s.strip()]
    if bad := [s for s in chosen if s not in FS_NAMES]:
        p.error(f"unknown file system {', '.join(bad)}; choose from {', '.join(FS_NAMES)}")
    args.fs = [n for n in FS_NAMES if n in chosen]
    names = [w.name for w in WORKLOADS]
    if args.workloads:
        picked = [s.strip() for s in args.workloads.split(",") if s.strip()]
        if bad := [s for s in picked if s not in names]:
            p.error(f"unknown workload {', '.join(bad)}; choose from {', '.join(names)}")
        args.workloads = picked
    else:
        args.workloads = names
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def probe(fs: Backend, env: Env) -> str | None:
    """Why fs cannot be used, found by mounting it once over an empty layer; None if it works."""
    if reason := fs.unavailable():
        return reason
    empty = env.root / "empty"
    empty.mkdir(exist_ok=True)
    try:
        with env.mount(fs, [empty], cold=False) as m:
            os.stat(m.path)
    except (MountError, OSError) as e:
        return str(e)
    return None


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run.py must run as root (it mounts file systems and drops caches)", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    repeat = args.repeat or sizes.repeat
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="unionfs-bench-", dir=args.workdir)).resolve()
    env = Env(root, sizes)
    backends = [BACKENDS[n]() for n in args.fs]
    results: Results = {}
    status = 0
    progress(f"work directory {root}; file systems {', '.join(args.fs)}; {repeat} repetition(s)")
    with halt_polling(args.halt_poll_ns):
        info = machine_info()
        try:
            unavailable = {}
            for fs in backends:
                if reason := probe(fs, env):
                    unavailable[fs.name] = short_reason(reason)
                    env.notes.append(f"{fs.name} unavailable: {reason}")
                    progress(f"{fs.name} unavailable: {reason}")
            for wl in WORKLOADS:
                if wl.name in args.workloads:
                    progress(f"--- {wl.name}: {wl.title}")
                    run_workload(wl, backends, env, repeat, results, unavailable)
        except KeyboardInterrupt:
            progress("interrupted; unmounting and printing what was measured")
            status = 130
        finally:
            if left := cleanup_mounts_under(root):
                env.notes.append(f"had to lazily unmount: {', '.join(left)}")
            if left := cleanup_mounts_under(root):
                progress(f"still mounted, keeping {root}: {', '.join(left)}")
            elif args.keep:
                progress(f"test data kept in {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)

    out = [
        "# unionfs benchmark",
        "",
        f"- date: {info['date']}",
        f"- kernel: {info['kernel']} (`uname -r`)",
        f"- CPU: {info['cpu']}, {info['cores']} cores; memory {info['memory']}",
        f"- Python {info['python']}; fuse-overlayfs {info['fuse-overlayfs']}; {info['fio']}",
        f"- idle CPUs: {info['idle']}",
        f"- sizes ({'quick' if args.quick else 'full'}): {describe(sizes)}",
        f"- median of {repeat} run(s), each on a fresh mount",
        "",
        "Each cell: median (ratio to kernel, kernel = 1.00). Times: lower is better,",
        "ratio = time / kernel time. Rows marked ↑ (IOPS): higher is better, ratio = IOPS / kernel IOPS.",
        "The last column divides the unionfs median by the fuse-overlayfs median in the same way.",
        "",
        *table(backends, results, repeat),
    ]
    if env.notes:
        out += ["", "Notes:", *(f"- {n}" for n in env.notes)]
    print("\n".join(out))
    if args.json:
        rows = []
        for wl in WORKLOADS:
            for metric in wl.metrics:
                per_fs = {}
                for n in args.fs:
                    c = results.get((wl.name, metric.key, n))
                    if c is not None:
                        per_fs[n] = {"median": c.median, "runs": c.runs, "error": c.error}
                if per_fs:
                    rows.append({"workload": wl.name, "metric": metric.key, "label": metric.label,
                                 "unit": metric.unit, "higher_is_better": metric.higher_is_better,
                                 "fs": per_fs})
        doc = {"machine": info, "quick": args.quick, "repeat": repeat, "sizes": dataclasses.asdict(sizes),
               "results": rows, "notes": env.notes}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        progress(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())

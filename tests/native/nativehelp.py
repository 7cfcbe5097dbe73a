"""Helpers of the native shim's tests: compiling the shim, environments that load it, servers started with it
and their counters (``UNIONFS_NATIVE_STATS``)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
NATIVE = REPO / "unionfs" / "_native"
MEMFS = Path(__file__).resolve().parent / "memfs.py"
PY = sys.executable
DEADLINE = 30.0
CFLAGS = ["-Wall", "-Wextra", "-Werror", "-std=gnu11", "-O2", "-fPIC", "-fvisibility=hidden"]


def fuse_include_dirs() -> list[str] | None:
    """The include directories of libfuse3 (pkg-config, else /usr/include/fuse3), None without its headers."""
    dirs = ["/usr/include/fuse3"]
    if shutil.which("pkg-config"):
        r = subprocess.run(["pkg-config", "--cflags-only-I", "fuse3"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.split():
            dirs = [f[2:] for f in r.stdout.split() if f.startswith("-I")]
    return dirs if any((Path(d) / "fuse_lowlevel.h").exists() for d in dirs) else None


def compile_shim(out: Path) -> subprocess.CompletedProcess[str]:
    include = fuse_include_dirs() or []
    return subprocess.run(
        ["gcc", *CFLAGS, *[f"-I{d}" for d in include], "-shared", "-o", str(out), str(NATIVE / "shim.c"),
         f"-Wl,--version-script={NATIVE / 'shim.map'}", "-Wl,--no-as-needed", "-lfuse3", "-ldl"],
        capture_output=True, text=True)


def fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mounts through /dev/fuse from a test server)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc.strerror}"
    return None


def shim_env(shim: Path, **extra: str) -> dict[str, str]:
    """The environment of a process that loads ``shim`` through the loader (not preloaded)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIONFS_NATIVE") and k != "LD_PRELOAD"}
    env["PYTHONPATH"] = str(REPO)
    env["UNIONFS_NATIVE_LIB"] = str(shim)
    env.update(extra)
    return env


def python(code: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path).encode()
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split(b" ")[4] == target for line in f)


def read_stats(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        out[name] = int(value)
    return out


@dataclasses.dataclass
class Server:
    """A FUSE server started with the shim; :meth:`stop` unmounts it and returns its final counters."""

    proc: subprocess.Popen[str]
    mnt: Path
    stats: Path
    output: str = ""

    def wait_mounted(self) -> None:
        deadline = time.monotonic() + DEADLINE
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {self.proc.communicate()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.mnt} not mounted after {DEADLINE} s")
            time.sleep(0.01)

    def stop(self) -> dict[str, int]:
        """Unmount, wait for the server to end (the shim writes its counters as the session ends), read them."""
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False, capture_output=True)
        try:
            out, err = self.proc.communicate(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        self.output = out + err
        return read_stats(self.stats)



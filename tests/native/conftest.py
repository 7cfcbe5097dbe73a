"""Fixtures of the native shim's tests: the shim compiled from source with warnings as errors, and servers (the
memfs of memfs.py, or unionfs) started with it.

Everything skips, saying why, without a C compiler, libfuse3's headers, or a usable /dev/fuse.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nativehelp import MEMFS, PY, REPO, Server, compile_shim, fuse_include_dirs, fuse_unavailable, is_mounted, shim_env  # noqa: E402


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shim built from this checkout's source with -Wall -Wextra -Werror."""
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler (gcc): the native part cannot be built")
    if fuse_include_dirs() is None:
        pytest.skip("libfuse3's headers are missing (apt-get install libfuse3-dev)")
    out = tmp_path_factory.mktemp("shim") / "libunionfs_shim.so"
    r = compile_shim(out)
    assert r.returncode == 0, f"the shim does not compile cleanly:\n{r.stderr}"
    return out


@pytest.fixture(scope="session")
def fuse_ready() -> None:
    why = fuse_unavailable()
    if why is not None:
        pytest.skip(why)


Start = Callable[..., Server]


@pytest.fixture
def start(fuse_ready: None, shim: Path) -> Iterator[Start]:
    """``start(*args, config="", memfs=True, name="m", **environment)``: a server with the shim mounted on a fresh
    directory: memfs.py with ``args``, or ``unionfs mount -f args`` (through unionfs._native.run). Stopped in
    teardown."""
    servers: list[Server] = []
    base = Path(tempfile.mkdtemp(prefix="unionfs-native-test-"))
    base.chmod(0o755)

    def _start(*args: str, config: str = "", memfs: bool = True, name: str = "m", **extra: str) -> Server:
        mnt = base / name
        mnt.mkdir()
        stats = base / f"{name}.stats"
        env = shim_env(shim, UNIONFS_NATIVE_STATS=str(stats), UNIONFS_NATIVE_CONFIG=config, **extra)
        argv = [PY, str(MEMFS), str(mnt), *args] if memfs else [
            PY, "-m", "unionfs._native.run", "mount", "-f", *args, str(mnt)]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=str(REPO))
        server = Server(proc, mnt, stats)
        servers.append(server)
        server.wait_mounted()
        return server

    try:
        yield _start
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.stop()
        if not any(is_mounted(s.mnt) for s in servers):
            shutil.rmtree(base, ignore_errors=True)

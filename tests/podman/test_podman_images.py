"""Images between podman and unionfs: what ``podman save`` writes (OCI archive, docker archive) imports and
mounts as podman mounts it; what unionfs exports after a commit, ``podman load`` loads and runs."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from podman_env import IMAGE, Engine

ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not ROOT, reason="needs root: compares with podman's own mount of the image")


def unionfs(*args: str | os.PathLike[str]) -> str:
    r = subprocess.run([sys.executable, "-m", "unionfs", *map(str, args)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"unionfs {args}: {r.stderr}"
    return r.stdout


def tree(top: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            data = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(top))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                            data, os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
    return out


@pytest.fixture
def root_engine(engines: object) -> Engine:
    return engines.get("root", "unionfs")  # type: ignore[attr-defined,no-any-return]


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[list[Path]]:
    points: list[Path] = []
    try:
        yield points
    finally:
        for p in points:
            subprocess.run(["fusermount3", "-u", "-z", str(p)], capture_output=True)


def test_podman_save_imports_and_mounts_as_podman_mounts_it(root_engine: Engine, tmp_path: Path,
                                                            mounted: list[Path]) -> None:
    engine = root_engine
    theirs_path = Path(engine.podman("image", "mount", IMAGE).stdout.strip())
    try:
        theirs = tree(theirs_path)
    finally:
        engine.podman("image", "unmount", IMAGE, check=False)
    store = tmp_path / "store"
    for fmt in ("oci-archive", "docker-archive"):
        saved = tmp_path / f"saved-{fmt}.tar"
        engine.podman("save", "--format", fmt, "-o", saved, IMAGE)
        unionfs("image", "--root", store, "import", saved, "--name", f"busybox-{fmt}", "-q")
        mnt = tmp_path / f"mnt-{fmt}"
        mnt.mkdir()
        mounted.append(mnt)
        unionfs("image", "--root", store, "mount", f"busybox-{fmt}", mnt)
        assert tree(mnt) == theirs
        unionfs("umount", mnt)


def test_what_unionfs_exports_podman_loads_and_runs(root_engine: Engine, tmp_path: Path,
                                                   mounted: list[Path]) -> None:
    engine = root_engine
    saved = tmp_path / "saved.tar"
    engine.podman("save", "--format", "oci-archive", "-o", saved, IMAGE)
    store = tmp_path / "store"
    unionfs("image", "--root", store, "import", saved, "--name", "busybox", "-q")
    mnt = tmp_path / "rw"
    mnt.mkdir()
    mounted.append(mnt)
    key = unionfs("image", "--root", store, "mount", "busybox", mnt, "--writable").strip()
    (mnt / "hello").write_text("hello from unionfs\n")
    os.unlink(mnt / "bin" / "ls")
    unionfs("umount", mnt)
    unionfs("image", "--root", store, "commit", key, "busybox:changed", "-q")
    for fmt in ("docker", "oci-archive"):
        out = tmp_path / f"out-{fmt}.tar"
        unionfs("image", "--root", store, "export", "busybox:changed", out, "--format", fmt, "-q")
        loaded = engine.podman("load", "-i", out).stdout
        name = f"localhost/unionfs-exported-{fmt}:latest"
        image_id = loaded.strip().splitlines()[-1].rpartition(" ")[2]
        engine.podman("tag", image_id, name)
        run = engine.podman("run", "--rm", name, "sh", "-c", "cat /hello; test -e /bin/ls || echo no-ls").stdout
        assert run.splitlines() == ["hello from unionfs", "no-ls"]
        engine.podman("rmi", "--force", name, check=False)

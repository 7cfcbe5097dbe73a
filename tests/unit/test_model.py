"""Property test: random sequences of Union operations on a 3-layer stack against an in-memory model of the
merged view (path -> file content, or DIR), checked after every step."""

from __future__ import annotations

import errno
import itertools
import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unit_tree import WHITEOUT, XWHITEOUT, Dir, Env

from unionfs.prescan import Prescanned

DIR = "DIR"
NAMES = ["a", "b", "c", "d", "e"]
PATHS = NAMES + [f"{p}/{n}" for p, n in itertools.product(NAMES, NAMES)]
DATA = [b"", b"x", b"hello", b"0123456789"]

UPPER = {"a": "U-a", "b": WHITEOUT, "c": {"a": "U-ca"}, "d": {"a": WHITEOUT}}
L1 = {
    "a": "1-a",
    "d": Dir({"a": "1-da", "b": "1-db", "c": XWHITEOUT, "d": {"a": "1-dda"}}, xwhiteouts=True),
    "e": Dir({"a": "1-ea"}, opaque=True),
}
L2 = {
    "a": "2-a",
    "b": {"a": "2-ba"},
    "c": "2-c",
    "d": {"a": "2-da", "c": "2-dc", "d": {"b": "2-ddb"}},
    "e": {"b": "2-eb"},
}
#: The merged view of UPPER/L1/L2, worked out by hand from the overlayfs rules.
INITIAL = {
    "a": b"U-a",
    "c": DIR,
    "c/a": b"U-ca",
    "d": DIR,
    "d/b": b"1-db",
    "d/d": DIR,
    "d/d/a": b"1-dda",
    "d/d/b": b"2-ddb",
    "e": DIR,
    "e/a": b"1-ea",
}
#: Directories that exist only in the upper layer (and are not merged): the only ones rename may move.
INITIAL_MOVABLE = {"c"}


class ModelError(Exception):
    def __init__(self, err: int) -> None:
        self.errno = err


class Model:
    def __init__(self) -> None:
        self.tree: dict[str, bytes | str] = dict(INITIAL)
        self.movable: set[str] = set(INITIAL_MOVABLE)

    @staticmethod
    def parent_of(path: str) -> str:
        return path.rpartition("/")[0]

    def check_parent(self, path: str) -> None:
        p = self.parent_of(path)
        if p == "":
            return
        if p not in self.tree:
            raise ModelError(errno.ENOENT)
        if self.tree[p] != DIR:
            raise ModelError(errno.ENOTDIR)

    def children(self, path: str) -> list[str]:
        return [k for k in self.tree if k.startswith(path + "/")]

    def file(self, path: str) -> bytes:
        self.check_parent(path)
        if path not in self.tree:
            raise ModelError(errno.ENOENT)
        v = self.tree[path]
        if v == DIR:
            raise ModelError(errno.EISDIR)
        assert isinstance(v, bytes)
        return v

    def write(self, path: str, data: bytes) -> None:
        self.check_parent(path)
        if self.tree.get(path) == DIR:
            raise ModelError(errno.EISDIR)
        self.tree[path] = data

    def append(self, path: str, data: bytes) -> None:
        self.tree[path] = self.file(path) + data

    def truncate(self, path: str, size: int) -> None:
        old = self.file(path)
        self.tree[path] = old[:size] + bytes(max(0, size - len(old)))

    def unlink(self, path: str) -> None:
        self.file(path)
        del self.tree[path]

    def mkdir(self, path: str) -> None:
        self.check_parent(path)
        if path in self.tree:
            raise ModelError(errno.EEXIST)
        self.tree[path] = DIR
        self.movable.add(path)

    def rmdir(self, path: str) -> None:
        self.check_parent(path)
        if path not in self.tree:
            raise ModelError(errno.ENOENT)
        if self.tree[path] != DIR:
            raise ModelError(errno.ENOTDIR)
        if self.children(path):
            raise ModelError(errno.ENOTEMPTY)
        del self.tree[path]
        self.movable.discard(path)

    def rename(self, src: str, dst: str) -> None:
        self.check_parent(src)
        self.check_parent(dst)
        if src not in self.tree:
            raise ModelError(errno.ENOENT)
        if src == dst:
            return
        src_dir = self.tree[src] == DIR
        dst_kind = self.tree.get(dst)
        if src_dir and dst.startswith(src + "/"):
            raise ModelError(errno.EINVAL)
        if dst_kind == DIR and src.startswith(dst + "/"):
            raise ModelError(errno.ENOTEMPTY)
        if dst_kind is not None:
            if dst_kind == DIR and not src_dir:
                raise ModelError(errno.EISDIR)
            if src_dir and dst_kind != DIR:
                raise ModelError(errno.ENOTDIR)
        if src_dir and src not in self.movable:
            raise ModelError(errno.EXDEV)
        if dst_kind == DIR and self.children(dst):
            raise ModelError(errno.ENOTEMPTY)
        moved = {k: v for k, v in self.tree.items() if k == src or k.startswith(src + "/")}
        for k in moved:
            del self.tree[k]
        self.tree.pop(dst, None)
        self.movable.discard(dst)
        for k, v in moved.items():
            self.tree[dst + k[len(src):]] = v
        for k in [m for m in self.movable if m == src or m.startswith(src + "/")]:
            self.movable.discard(k)
            self.movable.add(dst + k[len(src):])


class Driver:
    """Drives the Union the way the FUSE layer would, path-based; path resolution errors as the VFS gives."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.u = env.union

    def parent(self, path: str):
        p, _, name = path.rpartition("/")
        entry = self.env.stack.resolve(os.fsencode(p) if p else b".")
        if entry is None:
            raise OSError(errno.ENOENT, "parent missing")
        if not entry.is_dir:
            raise OSError(errno.ENOTDIR, "parent not a directory")
        return entry, os.fsencode(name)

    def existing_file(self, path: str):
        parent, name = self.parent(path)
        entry = self.u.lookup(parent, name)
        if entry is None:
            raise OSError(errno.ENOENT, "missing")
        if entry.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        return entry

    def write(self, path: str, data: bytes) -> None:
        parent, name = self.parent(path)
        entry = self.u.lookup(parent, name)
        if entry is None:
            fd, _ = self.u.create(parent, name, stat.S_IFREG | 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
        elif entry.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        else:
            fd = self.u.open(entry, os.O_WRONLY | os.O_TRUNC)
        try:
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)

    def append(self, path: str, data: bytes) -> None:
        fd = self.u.open(self.existing_file(path), os.O_WRONLY)
        try:
            os.pwrite(fd, data, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def truncate(self, path: str, size: int) -> None:
        self.u.truncate(self.existing_file(path), size)

    def unlink(self, path: str) -> None:
        self.u.unlink(*self.parent(path))

    def mkdir(self, path: str) -> None:
        parent, name = self.parent(path)
        self.u.mkdir(parent, name, stat.S_IFDIR | 0o755, 0, 0)

    def rmdir(self, path: str) -> None:
        self.u.rmdir(*self.parent(path))

    def rename(self, src: str, dst: str) -> None:
        op, on = self.parent(src)
        np, nn = self.parent(dst)
        self.u.rename(op, on, np, nn)


def _path_st(model: Model) -> st.SearchStrategy[str]:
    """Half the time an existing path, else a (mostly new) name inside an existing directory or the root."""
    existing = sorted(model.tree)
    dirs = [""] + [p for p in existing if model.tree[p] == DIR]
    fresh = sorted({f"{d}/{n}" if d else n for d in dirs for n in NAMES} | set(PATHS))
    return st.one_of(st.sampled_from(existing), st.sampled_from(fresh)) if existing else st.sampled_from(fresh)


OPS = ["write", "append", "truncate", "unlink", "mkdir", "rmdir", "rename", "rename"]


def _draw_op(data: st.DataObject, model: Model) -> tuple:
    name = data.draw(st.sampled_from(OPS), label="op")
    path = data.draw(_path_st(model), label="path")
    if name in ("write", "append"):
        return name, path, data.draw(st.sampled_from(DATA), label="data")
    if name == "truncate":
        return name, path, data.draw(st.integers(0, 12), label="size")
    if name == "rename":
        return name, path, data.draw(_path_st(model), label="dst")
    return name, path


def _outcome(fn, *args) -> int | None:
    try:
        fn(*args)
    except ModelError as exc:
        return exc.errno
    except OSError as exc:
        return exc.errno
    return None


def _check(env: Env, model: Model, step: str) -> None:
    assert env.tree() == model.tree, f"merged view differs from the model after {step}"
    for p in PATHS:
        if p not in model.tree:
            assert env.resolve(p) is None, f"{p} should not resolve after {step}"
    assert env.work_entries() == [], f"workdir not empty after {step}"


def test_initial_view_matches_hand_computed_model(tmp_path):
    env = Env(tmp_path / "env", UPPER, [L1, L2])
    try:
        _check(env, Model(), "setup")
    finally:
        env.close()


@pytest.mark.parametrize("prescan", [False, True], ids=["probing", "prescan"])
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), steps=st.integers(1, 30))
def test_random_ops_match_model(prescan, data, steps):
    with tempfile.TemporaryDirectory(prefix="unionfs-model-") as tmp:
        env = Env(Path(tmp) / "env", UPPER, [L1, L2], prescan=prescan)
        try:
            assert isinstance(env.stack.lowers, Prescanned) == prescan
            model = Model()
            drv = Driver(env)
            for i in range(steps):
                name, *args = _draw_op(data, model)
                step = f"step {i}: {name}{tuple(args)!r}"
                want = _outcome(getattr(model, name), *args)
                got = _outcome(getattr(drv, name), *args)
                assert got == want, (
                    f"{step}: union gave {errno.errorcode.get(got, got) if got else 'success'}, "
                    f"model expects {errno.errorcode.get(want, want) if want else 'success'}"
                )
                _check(env, model, step)
        finally:
            env.close()

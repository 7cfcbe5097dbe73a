"""``volatile``/``fsync=0`` (nothing is synced) and ``noxattrs=1`` (no xattr is served), in the core."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
from unit_tree import File

from unionfs.union import Union


def _syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append("fdatasync"))
    return calls


@pytest.mark.parametrize("durable", [True, False])
def test_fsync_and_copy_up_sync_only_when_durable(make_env: Any, monkeypatch: pytest.MonkeyPatch,
                                                   durable: bool) -> None:
    env = make_env(lowers=[{"f": File(b"lower data")}, {}])
    union = Union(env.stack, env.work, durable=durable)
    calls = _syncs(monkeypatch)
    entry = union.copy_up(env.entry("f"))
    assert (env.upper / "f").read_bytes() == b"lower data"
    copied = len(calls)
    fd = os.open(env.upper / "f", os.O_RDWR)
    try:
        union.fsync(fd, datasync=False)
        union.fsync(fd, datasync=True)
    finally:
        os.close(fd)
    union.fsync_dir(union.root())
    if durable:
        assert copied >= 1, "a durable copy-up syncs the copied file"
        assert calls[copied:copied + 2] == ["fsync", "fdatasync"]
    else:
        assert calls == [], "volatile: nothing reaches the disk's sync"
    assert entry.layer == 0


@pytest.mark.parametrize("call", ["getxattr", "listxattr", "setxattr", "removexattr"])
def test_noxattrs_refuses_every_xattr_call(make_env: Any, call: str) -> None:
    env = make_env(lowers=[{"f": File(b"x")}, {}])
    union = Union(env.stack, env.work, xattrs=False)
    entry = env.entry("f")
    args: dict[str, tuple[Any, ...]] = {
        "getxattr": (entry, b"user.a"), "listxattr": (entry,), "setxattr": (entry, b"user.a", b"v"),
        "removexattr": (entry, b"user.a"),
    }
    with pytest.raises(OSError) as exc:
        getattr(union, call)(*args[call])
    assert exc.value.errno == errno.ENOTSUP
    assert not (env.upper / "f").exists(), "a refused setxattr copies nothing up"


def test_xattrs_served_by_default(make_env: Any) -> None:
    env = make_env(lowers=[{"f": File(b"x")}, {}])
    union = Union(env.stack, env.work)
    entry = union.setxattr(env.entry("f"), b"user.a", b"v")
    assert entry is not None and union.getxattr(entry, b"user.a") == b"v"

"""Pre-mount checks of a MountSpec against the file system, and the workdir lock."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from unionfs import preflight
from unionfs.options import MountSpec
from unionfs.preflight import MountError, WorkdirLock, check


def b(p) -> bytes:
    return os.fsencode(p)


@pytest.fixture
def dirs(tmp_path):
    names = ["l1", "l2", "upper", "work", "mnt"]
    for n in names:
        (tmp_path / n).mkdir()
    return {n: tmp_path / n for n in names}


def spec_of(d, **over):
    kw = dict(lowers=(b(d["l1"]), b(d["l2"])), upper=b(d["upper"]), work=b(d["work"]))
    kw.update(over)
    return MountSpec(**kw)


def listing(tmp_path):
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


def test_valid_spec_passes_and_changes_nothing(dirs, tmp_path):
    before = listing(tmp_path)
    check(spec_of(dirs), b(dirs["mnt"]))
    check(MountSpec(lowers=(b(dirs["l1"]),)), b(dirs["mnt"]))
    assert listing(tmp_path) == before


def test_missing_lowerdir(dirs, tmp_path):
    with pytest.raises(MountError, match="no such directory"):
        check(spec_of(dirs, lowers=(b(dirs["l1"]), b(tmp_path / "nope"))), b(dirs["mnt"]))


def test_lowerdir_not_a_directory(dirs, tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"")
    with pytest.raises(MountError, match="not a directory"):
        check(spec_of(dirs, lowers=(b(f),)), b(dirs["mnt"]))


def test_missing_upperdir_and_workdir(dirs, tmp_path):
    with pytest.raises(MountError, match="upperdir"):
        check(spec_of(dirs, upper=b(tmp_path / "nope")), b(dirs["mnt"]))
    with pytest.raises(MountError, match="workdir"):
        check(spec_of(dirs, work=b(tmp_path / "nope")), b(dirs["mnt"]))


def test_missing_mountpoint(dirs, tmp_path):
    with pytest.raises(MountError, match="mountpoint"):
        check(spec_of(dirs), b(tmp_path / "nope"))


def test_workdir_on_another_filesystem(dirs, tmpfs):
    with pytest.raises(MountError, match="same filesystem"):
        check(spec_of(dirs, work=b(tmpfs)), b(dirs["mnt"]))


def test_upper_inside_lower(dirs):
    inner = dirs["l2"] / "up"
    inner.mkdir()
    with pytest.raises(MountError, match="inside lowerdir"):
        check(spec_of(dirs, upper=b(inner)), b(dirs["mnt"]))


def test_lower_inside_upper(dirs):
    inner = dirs["upper"] / "low"
    inner.mkdir()
    with pytest.raises(MountError, match="is inside upperdir"):
        check(spec_of(dirs, lowers=(b(inner),)), b(dirs["mnt"]))


def test_workdir_inside_upper(dirs):
    inner = dirs["upper"] / "w"
    inner.mkdir()
    with pytest.raises(MountError, match="separate directories"):
        check(spec_of(dirs, work=b(inner)), b(dirs["mnt"]))


def test_upper_inside_lower_through_symlink(dirs, tmp_path):
    inner = dirs["l1"] / "up"
    inner.mkdir()
    link = tmp_path / "sneaky"
    link.symlink_to(inner)
    with pytest.raises(MountError, match="inside lowerdir"):
        check(spec_of(dirs, upper=b(link)), b(dirs["mnt"]))


@pytest.mark.parametrize("layer", ["l1", "l2", "upper", "work"])
def test_mountpoint_inside_a_layer(dirs, layer):
    mnt = dirs[layer] / "mnt"
    mnt.mkdir()
    with pytest.raises(MountError, match="mountpoint"):
        check(spec_of(dirs), b(mnt))


def test_mountpoint_equal_to_lower(dirs):
    with pytest.raises(MountError, match="mountpoint"):
        check(spec_of(dirs), b(dirs["l1"]))


def test_sibling_with_common_prefix_is_not_inside(dirs, tmp_path):
    # "/x/l1" and "/x/l1-more" share a string prefix but neither contains the other.
    other = tmp_path / "l1-more"
    other.mkdir()
    check(spec_of(dirs, upper=b(other)), b(dirs["mnt"]))


def test_workdir_lock_second_lock_fails(dirs):
    first = WorkdirLock(b(dirs["work"]))
    try:
        with pytest.raises(MountError, match="in use"):
            WorkdirLock(b(dirs["work"]))
    finally:
        first.close()
    again = WorkdirLock(b(dirs["work"]))
    again.close()


def _as_other_user(fn, uid=65534):
    """``fn()``'s MountError message (or None), run as ``uid`` when we are root (root may read anything)."""
    if os.geteuid() != 0:
        try:
            fn()
        except MountError as exc:
            return str(exc)
        return None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            fn()
            os.write(w, b"ok")
        except MountError as exc:
            os.write(w, b"error:" + str(exc).encode())
        except BaseException as exc:
            os.write(w, b"crash:" + repr(exc).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    assert not out.startswith("crash:"), out
    return None if out == "ok" else out.removeprefix("error:")


@pytest.mark.parametrize(("layer", "mode"), [("l2", 0o000), ("l1", 0o311), ("l2", 0o644), ("upper", 0o000),
                                             ("work", 0o300)])
def test_regression_unreadable_layer_is_named(layer, mode, monkeypatch):
    """A layer the server cannot read or search is refused, naming the layer and its path (not ``b'.'``)."""
    monkeypatch.setattr(preflight, "check_fuse_device", lambda: None)  # (/dev/fuse may be 0600 here)
    base = Path(tempfile.mkdtemp(prefix="unionfs-preflight-"))  # (reachable by every user, unlike tmp_path)
    try:
        base.chmod(0o755)
        d = {n: base / n for n in ("l1", "l2", "upper", "work", "mnt")}
        for p in d.values():
            p.mkdir()
            p.chmod(0o777)
        d[layer].chmod(mode)
        what = {"l1": "lowerdir", "l2": "lowerdir", "upper": "upperdir", "work": "workdir"}[layer]
        msg = _as_other_user(lambda: check(spec_of(d), b(d["mnt"])))
        assert msg == f"{what} {d[layer]}: permission denied (the server must be able to read and search it)"
    finally:
        d[layer].chmod(0o755)
        shutil.rmtree(base)

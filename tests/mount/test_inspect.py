"""The virtual xattrs user.unionfs.* of a live mount (readable, never listed, refused for writing, never stored,
and no copy-up carries them), and `unionfs inspect` on a mount agreeing with `unionfs inspect --layers` on the
same directories."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mounthelp import Layers, Mounts, cli, errno_of, is_mounted, needs_root, run

from unionfs import targets
from unionfs.explain import EXPLAIN_XATTR, LAYER_XATTR, STACK_XATTR
from unionfs.whiteout import XattrFormat

pytestmark = pytest.mark.mount

PREFIX = "user.unionfs."


@pytest.fixture
def mnt(layers: Layers, mounts: Mounts) -> Iterator[Path]:
    (layers.l1 / "link").symlink_to("top.txt")
    (layers.l1 / "private").write_text("no one may read this\n")
    (layers.l1 / "private").chmod(0)  # (an ordinary user may not read its xattrs through the kernel)
    mounts.mount(layers.opts(), layers.mnt)
    yield layers.mnt
    if is_mounted(layers.mnt):
        mounts.umount(layers.mnt)


def _fmt() -> XattrFormat:
    # as the mount chose: trusted.* as root, user.* (userxattr) for an ordinary user
    return XattrFormat.TRUSTED if os.geteuid() == 0 else XattrFormat.USER


def _size_probe(path: Path, name: bytes) -> int:
    """getxattr(2) with a size of 0: the size of the value, as tools ask for it first."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    n = libc.getxattr(os.fsencode(path), name, None, ctypes.c_size_t(0))
    if n < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return int(n)


def _unionfs_names(path: Path | int) -> list[str]:
    return [n for n in os.listxattr(path, follow_symlinks=False) if n.startswith(PREFIX)]


def test_virtual_xattrs_are_readable_hidden_and_refused(layers: Layers, mnt: Path) -> None:
    expected_layer = {"top.txt": layers.l1, "shared.txt": layers.l1, "bottom.txt": layers.l2, "dir": layers.l2,
                      "dir/deep.txt": layers.l2, ".": layers.upper}
    stack = targets.stack_json([os.fsencode(layers.l1), os.fsencode(layers.l2)], os.fsencode(layers.upper), _fmt())
    for rel, layer in expected_layer.items():
        p = mnt / rel
        assert os.getxattr(p, LAYER_XATTR) == os.fsencode(layer), rel
        assert os.getxattr(p, STACK_XATTR) == stack, rel
        data = json.loads(os.getxattr(p, EXPLAIN_XATTR))
        assert data["found"]["path"] == str(layer) and data["path"] == rel
        for name in (LAYER_XATTR, EXPLAIN_XATTR, STACK_XATTR):
            assert _size_probe(p, name) == len(os.getxattr(p, name)), (rel, name)
        assert _unionfs_names(p) == [], rel
        for name in (LAYER_XATTR, b"user.unionfs.other"):
            assert errno_of(lambda p=p, name=name: os.setxattr(p, name, b"x")) == errno.EPERM, (rel, name)
            assert errno_of(lambda p=p, name=name: os.removexattr(p, name)) == errno.EPERM, (rel, name)
        assert errno_of(lambda p=p: os.getxattr(p, b"user.unionfs.other")) == errno.ENODATA
    # the refusals copied nothing up, and wrote nothing
    assert sorted(os.listdir(layers.upper)) == []
    target = targets.from_mount(str(mnt))
    assert target is not None and target.dirs == [os.fsencode(p) for p in (layers.upper, layers.l1, layers.l2)]
    # an ordinary xattr still works beside them, and the listing shows it alone
    os.setxattr(mnt / "top.txt", "user.mine", b"1")
    assert os.listxattr(mnt / "top.txt") == ["user.mine"]


def test_a_copy_up_carries_no_virtual_xattr(layers: Layers, mnt: Path) -> None:
    before = json.loads(os.getxattr(mnt / "shared.txt", EXPLAIN_XATTR))
    assert before["found"]["layer"] == 1 and before["copied_up"] is None
    assert before["next_write"]["action"] == "copy-up" and before["next_write"]["bytes"] == len("l1 version\n")
    with open(mnt / "shared.txt", "a") as f:
        f.write("more\n")
    os.chmod(mnt / "dir", 0o750)  # a directory copied up (metadata only)
    for rel in ("shared.txt", "dir"):
        upper = layers.upper / rel
        assert upper.exists()
        assert _unionfs_names(upper) == [], rel
        assert errno_of(lambda upper=upper: os.getxattr(upper, LAYER_XATTR)) == errno.ENODATA, rel
        assert os.getxattr(mnt / rel, LAYER_XATTR) == os.fsencode(layers.upper), rel
    after = json.loads(os.getxattr(mnt / "shared.txt", EXPLAIN_XATTR))
    assert after["found"]["layer"] == 0
    assert after["copied_up"] == {"layer": 1, "type": "regular file", "size": len("l1 version\n")}
    assert after["next_write"]["text"] == "none (upper)"
    assert [(h["layer"], h["reason"]["kind"]) for h in after["shadowed"]] == [(1, "shadowed"), (2, "shadowed")]
    d = json.loads(os.getxattr(mnt / "dir", EXPLAIN_XATTR))
    assert d["merged_dir"] == [0, 2] and d["next_write"]["rename"] == "EXDEV"
    assert errno_of(lambda: os.rename(mnt / "dir", mnt / "moved")) == errno.EXDEV


def test_an_unlinked_open_file_still_names_its_layer(layers: Layers, mnt: Path) -> None:
    fd = os.open(mnt / "top.txt", os.O_RDWR)  # copied up
    try:
        os.unlink(mnt / "top.txt")
        assert os.getxattr(fd, LAYER_XATTR) == os.fsencode(layers.upper)
        assert errno_of(lambda: os.getxattr(fd, EXPLAIN_XATTR)) == errno.ENODATA
        assert errno_of(lambda: os.setxattr(fd, LAYER_XATTR, b"x")) == errno.EPERM
    finally:
        os.close(fd)


def _inspect_json(*args: str | os.PathLike[str]) -> Any:
    r = cli("inspect", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_inspect_on_the_mount_equals_inspect_on_its_layers(layers: Layers, mnt: Path) -> None:
    with open(mnt / "shared.txt", "a") as f:  # one copy-up
        f.write("x")
    os.unlink(mnt / "bottom.txt")  # one whiteout
    stack = ["--layers", f"{layers.l1}:{layers.l2}", "--upper", layers.upper]
    for rel in (".", "top.txt", "shared.txt", "dir", "dir/deep.txt", "link", "private"):
        on_mount = _inspect_json(mnt / rel)
        assert on_mount == _inspect_json(*stack, rel), rel
    gone = _inspect_json(*stack, "bottom.txt")
    assert gone["found"] is None and gone["absent"] == {"kind": "whiteout", "layer": 0, "at": "bottom.txt"}
    # a name the mount does not show is explained too, from the layers the mount names
    assert _inspect_json(mnt / "bottom.txt") == gone
    r = cli("inspect", mnt / "no" / "such")
    assert r.returncode == 0 and r.stdout.startswith("no/such  absent: not in any layer"), r.stdout
    assert "ENOENT" in r.stdout
    # for people: a few plain lines when piped
    r = cli("inspect", mnt / "shared.txt")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "shared.txt  regular file, 12 bytes"
    assert any(line.split()[0] == "from" and str(layers.upper) in line for line in lines)
    assert any(line.split()[:2] == ["copied", "up"] and str(layers.l1) in line for line in lines)
    assert "\x1b[" not in r.stdout


def test_inspect_outside_a_mount_is_one_line(tmp_path: Path) -> None:
    r = cli("inspect", tmp_path)
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "not inside a unionfs mount" in r.stderr
    r = cli("inspect", "--layers", tmp_path / "missing", "x")
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "missing" in r.stderr
    r = cli("inspect", "--upper", tmp_path, "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_virtual_xattrs_with_noxattrs_on_a_read_only_mount(layers: Layers, mounts: Mounts) -> None:
    mounts.mount(layers.opts("noxattrs=1", upper=False), layers.mnt)
    p = layers.mnt / "top.txt"
    assert os.getxattr(p, LAYER_XATTR) == os.fsencode(layers.l1)
    data = json.loads(os.getxattr(p, EXPLAIN_XATTR))
    assert data["writable"] is False and data["next_write"]["action"] == "erofs"
    assert errno_of(lambda: os.listxattr(p)) in (errno.ENOTSUP, errno.EOPNOTSUPP)
    assert errno_of(lambda: os.getxattr(p, b"user.other")) in (errno.ENOTSUP, errno.EOPNOTSUPP)
    mounts.umount(layers.mnt)


@needs_root("to read as another user")
def test_another_user_reads_the_virtual_xattrs(layers: Layers, mnt: Path) -> None:
    getfattr = shutil.which("getfattr")
    if getfattr is None:
        pytest.skip("getfattr is not installed")
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    r = run([*as_nobody, getfattr, "--only-values", "-n", LAYER_XATTR.decode(), str(mnt / "top.txt")])
    assert r.returncode == 0, r.stderr
    assert r.stdout == str(layers.l1)
    r = run([*as_nobody, getfattr, "-d", "-m", "-", str(mnt / "top.txt")])
    assert r.returncode == 0 and PREFIX not in r.stdout

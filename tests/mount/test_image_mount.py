"""Images through real mounts: import, mount read-only and writable, change, commit, export, re-import into
another store: the views agree; against umoci's unpack of the same image, kernel overlayfs over the same
layer directories (root), and skopeo reading what unionfs exported."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from mounthelp import Mounts, cli, is_mounted, needs_root, run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "image"))

import images as im  # noqa: E402
from layers import build, dir_, hard, reg, sym  # noqa: E402

pytestmark = pytest.mark.mount

ROOT = os.geteuid() == 0
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # a v2 vfs_cap_data
BASE = [
    dir_("bin"), reg("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755), dir_("etc"),
    reg("etc/os-release", b"ID=test\n"), reg("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    reg("etc/shadow", b"root:*:1::::::\n", mode=0o640, gid=42),
    dir_("usr"), dir_("usr/lib"), reg("usr/lib/libc.so", b"\x7fELF" + b"x" * 20000, mode=0o755),
    sym("lib", "usr/lib"), dir_("var"), dir_("var/cache"), reg("var/cache/a", b"a"), reg("var/cache/b", b"b"),
    dir_("home", mode=0o755), dir_("home/user", mode=0o700, uid=1000, gid=1000),
    reg("home/user/.profile", b"PS1=x\n", mode=0o600, uid=1000, gid=1000),
    reg("bin/su", b"su", mode=0o4755),
    reg("bin/ping", b"ping", mode=0o755, xattrs={"security.capability": CAP_NET_RAW}),
]
APP = [
    reg("etc/.wh.passwd"), dir_("var"), dir_("var/cache"), reg("var/cache/.wh..wh..opq"),
    reg("var/cache/new", b"new"), reg("lib/app.so", b"app"), hard("bin/tool2", "bin/tool"),
    reg("etc/os-release", b"ID=app\n"),
]


def tree(top: Path, closed: set[str] | None = None) -> dict[str, tuple[object, ...]]:
    """Every entry under ``top`` (not followed): type, mode, owner, size, content digest, link target.
    Directories this user may not list go to ``closed`` (when given; else they fail the test)."""
    out: dict[str, tuple[object, ...]] = {}

    def unreadable(exc: OSError) -> None:
        if closed is None or not isinstance(exc, PermissionError):
            raise exc
        closed.add(str(Path(str(exc.filename)).relative_to(top)))

    for dirpath, dirnames, filenames in os.walk(top, onerror=unreadable):
        for n in sorted(dirnames + filenames):
            p = Path(dirpath, n)
            st = p.lstat()
            data = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            out[str(p.relative_to(top))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                            st.st_size if not stat.S_ISDIR(st.st_mode) else None, data, target)
    return out


def without_owners(t: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    return {k: (v[0], v[1], v[4], v[5], v[6]) for k, v in t.items()}


class Store:
    def __init__(self, root: Path, mounts: Mounts) -> None:
        self.root = root
        self.mounts = mounts

    def cli(self, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        r = cli(args[0], "--root", self.root, *args[1:], timeout=120)
        return r

    def ok(self, *args: str | os.PathLike[str]) -> str:
        r = self.cli(*args)
        assert r.returncode == 0, f"{args}: {r.returncode}: {r.stderr}"
        return r.stdout

    def mount(self, ref: str, mnt: Path, *extra: str) -> str:
        mnt.mkdir(exist_ok=True)
        self.mounts.points.append(mnt)
        out = self.ok("image", "mount", ref, mnt, *extra)
        assert is_mounted(mnt)
        self.mounts.track(mnt)
        return out.strip()


@pytest.fixture
def image_layout(base: Path) -> tuple[Path, im.Built]:
    b = im.image([build(BASE), build(APP)], compress=["gzip", "zstd"])
    return im.write_oci_layout(base / "layout", [("test:1", b)]), b


def test_round_trip_through_a_writable_mount_commit_export_and_reimport(
        base: Path, mounts: Mounts, image_layout: tuple[Path, im.Built]) -> None:
    layout, built = image_layout
    one = Store(base / "one", mounts)
    one.ok("image", "import", layout, "-q")
    ro = base / "ro"
    one.mount("test:1", ro)
    closed: set[str] = set()
    view = tree(ro, closed)
    assert closed == (set() if ROOT else {"home/user"})  # uid 1000's 0700 directory, as the image says
    assert (ro / "usr/lib/app.so").read_bytes() == b"app" and not (ro / "etc/passwd").exists()
    assert sorted(os.listdir(ro / "var/cache")) == ["new"]
    assert (ro / "bin/tool2").stat().st_ino == (ro / "bin/tool").stat().st_ino
    assert view["bin/su"][1] == 0o4755 and view["home/user"][1] == 0o700
    # the capability, kept aside by an ordinary user's store (it may not set it), shows as the image has it
    assert os.getxattr(ro / "bin/ping", "security.capability") == CAP_NET_RAW
    assert "security.capability" in os.listxattr(ro / "bin/ping")
    assert not [n for n in os.listxattr(ro / "bin/ping") if "unionfs" in n]
    # inspect on the mount names the image layer an entry comes from, with the layer's blob digest
    r = cli("inspect", "--json", ro / "usr/lib/app.so")
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)["found"]
    assert found["label"] == f"test:1 layer 2/2 {built.layer_digests[1][7:19]}"
    assert found["digest"] == built.layer_digests[1]
    r = one.cli("image", "rm", "test:1")  # regression: the name went, and the layers' blobs, while mounted
    assert r.returncode == 5 and "mounted on" in r.stderr
    mounts.umount(ro)

    rw = base / "rw"
    key = one.mount("test:1", rw, "--writable")
    assert key.startswith("test:1@rw-")
    (rw / "hello").write_text("hello\n")
    (rw / "etc/os-release").write_text("ID=changed\n")  # copy-up
    os.unlink(rw / "bin/tool2")
    shutil.rmtree(rw / "var")
    (rw / "var").mkdir()  # an opaque directory now
    (rw / "var/fresh").write_text("fresh\n")
    os.chmod(rw / "usr/lib/libc.so", 0o700)
    # a write drops a file's capability, as the kernel drops it (regression: with the capability kept aside by
    # an ordinary user's store, the kernel's removal of it failed with ENODATA, and so did the write)
    with open(rw / "bin/ping", "ab") as f:
        f.write(b" v2")
    with pytest.raises(OSError) as gone:
        os.getxattr(rw / "bin/ping", "security.capability")
    assert gone.value.errno == errno.ENODATA
    changed = tree(rw, set())
    r = one.cli("image", "commit", key, "test:2")
    assert r.returncode == 5 and "mounted" in r.stderr  # still mounted: refused, nothing changed
    mounts.umount(rw)
    report = json.loads(one.ok("image", "commit", key, "test:2", "--json"))
    assert report["base"] == "test:1" and report["layer"]["whiteouts"] >= 1

    info = json.loads(one.ok("image", "inspect", "test:2", "--json"))
    assert [layer["digest"] for layer in info["layers"][:2]] == built.layer_digests
    out = base / "out.tar"
    one.ok("image", "export", "test:2", out)

    two = Store(base / "two", mounts)
    two.ok("image", "import", out, "-q")
    again = base / "again"
    two.mount("test:2", again)
    assert tree(again, set()) == changed
    info2 = json.loads(two.ok("image", "inspect", "test:2", "--json"))
    assert [layer["digest"] for layer in info2["layers"]] == [layer["digest"] for layer in info["layers"]]
    mounts.umount(again)


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed (Debian package umoci)")
def test_the_mounted_image_shows_what_umoci_unpacks(base: Path, mounts: Mounts,
                                                   image_layout: tuple[Path, im.Built]) -> None:
    del image_layout
    built = im.image([build(BASE), build(APP)], compress="gzip")  # (Debian's umoci reads no zstd layers)
    layout = im.write_oci_layout(base / "umoci-layout", [("v1", built)])  # umoci's tags have no colon
    store = Store(base / "store", mounts)
    store.ok("image", "import", layout, "-q")
    mnt = base / "mnt"
    store.mount("v1", mnt)
    bundle = base / "bundle"
    argv = ["umoci", "unpack", *([] if ROOT else ["--rootless"]), "--image", f"{layout}:v1", str(bundle)]
    r = run(argv, timeout=120)
    assert r.returncode == 0, r.stderr
    closed: set[str] = set()
    ours, theirs = tree(mnt, closed), tree(bundle / "rootfs")
    if ROOT:
        assert ours == theirs and not closed
    else:
        # umoci --rootless stores everything as this user; the mount shows the image's owners (home/user is
        # uid 1000's, 0700: this user may not list it)
        assert closed == {"home/user"} and ours["home/user"][1] == 0o700
        theirs = {k: v for k, v in theirs.items() if not k.startswith("home/user/")}
        assert without_owners(ours).keys() == without_owners(theirs).keys()
        for k, v in without_owners(ours).items():
            assert (v[0], v[2], v[3], v[4]) == (without_owners(theirs)[k][0],) + without_owners(theirs)[k][2:], k


@needs_root("kernel overlayfs is mounted over the store's layer directories")
def test_kernel_overlayfs_over_the_layer_directories_shows_the_same_tree(
        base: Path, mounts: Mounts, image_layout: tuple[Path, im.Built]) -> None:
    layout, built = image_layout
    store = Store(base / "store", mounts)
    store.ok("image", "import", layout, "-q")
    mnt, kmnt = base / "mnt", base / "kernel"
    store.mount("test:1", mnt)
    kmnt.mkdir()
    dirs = [_layer_dir(base / "store", chain_id) for chain_id in reversed(im.chain_ids(built.diff_ids))]
    r = run(["mount", "-t", "overlay", "overlay", "-o", "ro,lowerdir=" + ":".join(map(str, dirs)), str(kmnt)])
    assert r.returncode == 0, r.stderr
    try:
        assert tree(mnt) == tree(kmnt)
    finally:
        run(["umount", "-l", str(kmnt)])


def _layer_dir(root: Path, key: str) -> Path:
    from unionfs.snapshots import Snapshotter

    with Snapshotter(root, create=False) as sn:
        return Path(sn.layer_dirs(key)[0])


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed (Debian package skopeo)")
def test_skopeo_copies_what_unionfs_exported(base: Path, mounts: Mounts,
                                             image_layout: tuple[Path, im.Built]) -> None:
    layout, built = image_layout
    store = Store(base / "store", mounts)
    store.ok("image", "import", layout, "-q")
    for fmt, dest, transport in (("oci", base / "o", "oci"), ("oci-archive", base / "o.tar", "oci-archive"),
                                 ("docker", base / "d.tar", "docker-archive")):
        store.ok("image", "export", "test:1", dest, "--format", fmt)
        copy = base / f"copy-{fmt}"
        r = run(["skopeo", "--insecure-policy", "copy", "--tmpdir", str(base), f"{transport}:{dest}",
                 f"oci:{copy}:x"], timeout=120)
        assert r.returncode == 0, r.stderr
        r = run(["skopeo", "inspect", "--config", f"oci:{copy}:x"])
        assert json.loads(r.stdout)["rootfs"]["diff_ids"] == built.diff_ids

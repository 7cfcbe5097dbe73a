"""unionfs as containers/storage's mount program: started as ``unionfs -o OPTIONS MERGED`` (no subcommand, from
the storage's own directory), unmounted with ``fusermount3 -u``; fuse-overlayfs's options and its meaning of
``uidmapping=``, compared with fuse-overlayfs itself over the same layers."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounthelp import UNIONFS_EXE, Layers, Mounts, is_mounted, needs_root, run, server_pid, wait_pid_exit

FUSE_OVERLAYFS = shutil.which("fuse-overlayfs")
needs_fuse_overlayfs = pytest.mark.skipif(FUSE_OVERLAYFS is None,
                                          reason="fuse-overlayfs is not installed (apt-get install fuse-overlayfs)")


def program(*args: str | os.PathLike[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The installed ``unionfs`` command run as a mount program is: ``unionfs ARGS...``."""
    return run([str(UNIONFS_EXE), *map(str, args)], cwd=cwd)


def mount_program(mounts: Mounts, opts: str, mnt: Path, cwd: Path | None = None) -> None:
    mounts.points.append(mnt)
    r = program("-o", opts, mnt, cwd=cwd)
    assert r.returncode == 0, f"`unionfs -o OPTS MERGED` failed ({r.returncode}): {r.stderr}"
    assert is_mounted(mnt), "the command returned before the mount was in place"
    mounts.track(mnt)


def fusermount_unmount(mnt: Path) -> None:
    pid = server_pid(mnt)
    r = run(["fusermount3", "-u", str(mnt)])
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt)
    if pid is not None:
        assert wait_pid_exit(pid), "the server outlived its mount"


def test_mounts_in_the_form_containers_storage_runs_it(layers: Layers, mounts: Mounts) -> None:
    (layers.l1 / "etc").mkdir()
    (layers.l1 / "etc" / "os-release").write_text("ID=test\n")
    mount_program(mounts, layers.opts(), layers.mnt, cwd=layers.base)
    assert (layers.mnt / "etc" / "os-release").read_text() == "ID=test\n"
    (layers.mnt / "etc" / "hostname").write_text("box\n")
    assert (layers.upper / "etc" / "hostname").read_text() == "box\n"
    fusermount_unmount(layers.mnt)


def test_takes_the_option_string_containers_storage_writes(layers: Layers, mounts: Mounts, tmp_path: Path) -> None:
    """An empty field, volatile, id mappings with a leading colon, xattr_permissions=2 and 120 absolute
    lower layers (an option string near 8 KiB)."""
    lowers = []
    for i in range(120):
        d = layers.base / "storage" / "overlay" / f"{i:056x}" / "diff"
        d.mkdir(parents=True)
        (d / f"from-{i}").write_text(f"{i}\n")
        lowers.append(str(d))
    (Path(lowers[-1]) / "bottom").write_text("bottom\n")
    opts = (f"lowerdir={':'.join(lowers)},upperdir={layers.upper},workdir={layers.work},,volatile,"
            "uidmapping=:0:100000:65536,gidmapping=:0:100000:65536,xattr_permissions=2")
    assert len(opts) > 8000
    mount_program(mounts, opts, layers.mnt, cwd=layers.base)
    assert (layers.mnt / "from-0").read_text() == "0\n" and (layers.mnt / "bottom").read_text() == "bottom\n"
    assert len(os.listdir(layers.mnt)) == 121
    stored = os.lstat(Path(lowers[0]) / "from-0")
    expected = (stored.st_uid + 100000 if stored.st_uid < 65536 else 65534)
    assert os.lstat(layers.mnt / "from-0").st_uid == expected, "stored ids show shifted by the mapping"
    fusermount_unmount(layers.mnt)


def test_a_bad_option_is_one_line_and_mounts_nothing(layers: Layers, mounts: Mounts) -> None:
    mounts.points.append(layers.mnt)
    r = program("-o", layers.opts("plugins=/usr/lib/lazy.so"), layers.mnt)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "plugins" in r.stderr, r.stderr
    assert not is_mounted(layers.mnt)


def test_honours_aufs_markers_in_the_program_form_only(base: Path, mounts: Mounts) -> None:
    """Layers containers/storage wrote through a mount program hold ``.wh.NAME`` files and ``.wh..wh..opq``:
    honoured when started as a mount program; a plain ``unionfs mount`` shows them as the kernel does."""
    layers = Layers.create(base, "aufs")
    (layers.l2 / "gone").write_text("deleted in l1\n")
    (layers.l2 / "dir").mkdir()
    (layers.l2 / "dir" / "old").write_text("hidden by the opaque marker\n")
    (layers.l1 / ".wh.gone").touch(mode=0)
    (layers.l1 / "dir").mkdir()
    (layers.l1 / "dir" / ".wh..wh..opq").touch(mode=0)
    (layers.l1 / "dir" / "new").write_text("new\n")
    mount_program(mounts, layers.opts(), layers.mnt)
    assert sorted(os.listdir(layers.mnt)) == ["dir"]
    assert sorted(os.listdir(layers.mnt / "dir")) == ["new"]
    assert not (layers.mnt / "gone").exists() and not (layers.mnt / ".wh.gone").exists()
    fusermount_unmount(layers.mnt)
    mounts.mount(layers.opts(), layers.mnt)
    assert sorted(os.listdir(layers.mnt)) == [".wh.gone", "dir", "gone"]
    assert sorted(os.listdir(layers.mnt / "dir")) == [".wh..wh..opq", "new", "old"]


# -- uidmapping/gidmapping: unionfs against fuse-overlayfs ---------------------------------------------------------

MAPPING = "uidmapping=0:100000:65536,gidmapping=0:100000:65536"


@pytest.fixture
def twin(base: Path, mounts: Mounts) -> Iterator[tuple[Layers, Layers]]:
    """The same lower layers (owned by stored ids 0, 5, 100005 and 65534) for unionfs and fuse-overlayfs."""
    pair = (Layers.create(base, "unionfs"), Layers.create(base, "fuse-overlayfs"))
    for layers in pair:
        for name, owner in (("root0", 0), ("five", 5), ("outside", 100005), ("nobody", 65534)):
            (layers.l2 / name).write_text(f"{name}\n")
            os.chown(layers.l2 / name, owner, owner)
        (layers.l2 / "shared").mkdir(mode=0o777)
        (layers.l2 / "shared").chmod(0o777)
    yield pair


def _owners(root: Path) -> dict[str, tuple[int, int]]:
    """(uid, gid) of every entry as a listing shows them."""
    with os.scandir(root) as it:
        return {e.name: (e.stat(follow_symlinks=False).st_uid, e.stat(follow_symlinks=False).st_gid) for e in it}


def _as(uid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    return run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv])


@needs_root("gives the layers' files to other ids and works as other ids")
@needs_fuse_overlayfs
def test_regression_uidmapping_shows_stored_ids_as_fuse_overlayfs_does(twin: tuple[Layers, Layers],
                                                                       mounts: Mounts) -> None:
    """With ``uidmapping=0:100000:65536`` a file stored as uid 0 shows as 100000, as with fuse-overlayfs
    (regression: unionfs showed it as 65534, and stored 100005 as 5), in stat, listings, chown, create and
    copy-up alike; the merged views and what lands on disk are the same for both."""
    ours, theirs = twin
    mount_program(mounts, ours.opts(MAPPING), ours.mnt)
    mounts.points.append(theirs.mnt)
    r = run([str(FUSE_OVERLAYFS), "-o", theirs.opts(MAPPING), str(theirs.mnt)])
    assert r.returncode == 0, r.stderr
    shown = _owners(ours.mnt)
    assert shown["root0"] == (100000, 100000), "stored 0 is shown as 100000"
    assert shown["outside"] == (65534, 65534), "stored 100005 is outside the range"
    assert shown == _owners(theirs.mnt)
    for layers in twin:
        os.chown(layers.mnt / "five", 100007, 100008)  # shown ids: stored 7, 8
        assert _as(100003, "touch", str(layers.mnt / "shared" / "made")).returncode == 0
        with open(layers.mnt / "root0", "a") as f:  # copy-up keeps the stored owner
            f.write("more\n")
    assert _owners(ours.mnt) == _owners(theirs.mnt)
    assert _owners(ours.mnt / "shared") == _owners(theirs.mnt / "shared") == {"made": (100003, 100003)}
    on_disk = {name: (os.lstat(ours.upper / name).st_uid, os.lstat(ours.upper / name).st_gid)
               for name in ("five", "root0", "shared/made")}
    assert on_disk == {"five": (7, 8), "root0": (0, 0), "shared/made": (3, 3)}
    assert on_disk == {name: (os.lstat(theirs.upper / name).st_uid, os.lstat(theirs.upper / name).st_gid)
                       for name in on_disk}
    # Where fuse-overlayfs stores the overflow id for a chown to an id no range shows, unionfs refuses it,
    # as chown(2) does in a user namespace.
    with pytest.raises(OSError) as exc:
        os.chown(ours.mnt / "five", 5, -1)
    assert exc.value.errno == errno.EINVAL
    for layers in twin:
        fusermount_unmount(layers.mnt)


# -- lower layers whose path goes away while mounted ----------------------------------------------------------------


def _use_everything(layers: Layers, mnt: Path) -> None:
    """List, read, read an xattr, copy up, write and list again through ``mnt``."""
    assert sorted(os.listdir(mnt)) == ["bottom.txt", "dir", "shared.txt", "top.txt"]
    assert sorted(os.listdir(mnt / "dir")) == ["deep.txt"]
    assert (mnt / "top.txt").read_text() == "from l1\n"
    with pytest.raises(OSError) as exc:
        os.getxattr(mnt / "top.txt", "user.none")
    assert exc.value.errno == errno.ENODATA
    with open(mnt / "dir" / "deep.txt", "a") as f:
        f.write("more\n")
    assert (layers.upper / "dir" / "deep.txt").read_text() == "deep\nmore\n"
    os.chmod(mnt / "bottom.txt", 0o600)
    assert sorted(os.listdir(mnt)) == ["bottom.txt", "dir", "shared.txt", "top.txt"]


def test_regression_lower_layers_renamed_while_mounted_are_still_served(layers: Layers, mounts: Mounts) -> None:
    """The layers are reached through the descriptors opened at mount, not through their paths (regression:
    listings, xattrs and copy-ups went through the paths, so a lower whose path no longer led to it showed an
    empty directory and copy-ups failed with ENOENT)."""
    mount_program(mounts, layers.opts(), layers.mnt)
    layers.l1.rename(layers.base / "l1-moved")
    layers.l2.rename(layers.base / "l2-moved")
    _use_everything(layers, layers.mnt)
    fusermount_unmount(layers.mnt)


@needs_root("makes and detaches bind mounts")
def test_regression_lower_layers_on_detached_mounts_are_still_served(layers: Layers, mounts: Mounts) -> None:
    """containers/storage hands its mount program id-mapped mounts of the lower layers and detaches them once
    the mount is made (podman run --uidmap as root failed with 'create /etc: no such file or directory')."""
    binds = []
    for lower in (layers.l1, layers.l2):
        bind = layers.base / f"{lower.name}-mapped"
        bind.mkdir()
        subprocess.run(["mount", "--bind", str(lower), str(bind)], check=True)
        binds.append(bind)
    try:
        mount_program(mounts, f"lowerdir={binds[0]}:{binds[1]},upperdir={layers.upper},workdir={layers.work}",
                      layers.mnt)
    finally:
        for bind in binds:
            subprocess.run(["umount", "-l", str(bind)], check=True)
    _use_everything(layers, layers.mnt)
    fusermount_unmount(layers.mnt)


def test_noxattrs_and_volatile_through_the_mount(layers: Layers, mounts: Mounts) -> None:
    """``noxattrs=1``: every xattr call fails with EOPNOTSUPP and nothing is copied up for one; with
    ``volatile`` too, fsync and fdatasync still succeed and writes land in the upper layer (that they skip the
    disk is checked in tests/unit/test_volatile_and_noxattrs.py)."""
    mount_program(mounts, layers.opts("noxattrs=1", "volatile"), layers.mnt)
    target = layers.mnt / "top.txt"
    for call in (lambda: os.getxattr(target, "user.a"), lambda: os.listxattr(target),
                 lambda: os.setxattr(target, "user.a", b"v"), lambda: os.removexattr(target, "user.a")):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EOPNOTSUPP
    assert not (layers.upper / "top.txt").exists(), "a refused setxattr copies nothing up"
    fd = os.open(layers.mnt / "new", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"data")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert (layers.upper / "new").read_bytes() == b"data"
    fusermount_unmount(layers.mnt)

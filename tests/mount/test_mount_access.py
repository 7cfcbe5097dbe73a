"""Read-only stacks refuse every change with EROFS; a root mount is visible to other users (allow_other) with
the layers' permissions enforced by the kernel (default_permissions)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest
from mounthelp import Layers, Mounts, errno_of, mount_of, needs_root, run, snapshot

pytestmark = pytest.mark.mount


def _refuses_writes(mount: os.PathLike[str]) -> None:
    mnt = os.fspath(mount)
    j = os.path.join
    attempts = {
        "create": lambda: os.close(os.open(j(mnt, "new"), os.O_CREAT | os.O_WRONLY, 0o644)),
        "open existing for writing": lambda: os.close(os.open(j(mnt, "top.txt"), os.O_WRONLY)),
        "open lower-layer file O_RDWR": lambda: os.close(os.open(j(mnt, "bottom.txt"), os.O_RDWR)),
        "truncate": lambda: os.truncate(j(mnt, "top.txt"), 0),
        "mkdir": lambda: os.mkdir(j(mnt, "d")),
        "rmdir": lambda: os.rmdir(j(mnt, "dir")),
        "unlink": lambda: os.unlink(j(mnt, "top.txt")),
        "rename": lambda: os.rename(j(mnt, "top.txt"), j(mnt, "moved")),
        "symlink": lambda: os.symlink("x", j(mnt, "ln")),
        "link": lambda: os.link(j(mnt, "top.txt"), j(mnt, "hard")),
        "mknod fifo": lambda: os.mkfifo(j(mnt, "fifo")),
        "chmod": lambda: os.chmod(j(mnt, "top.txt"), 0o600),
        "chown": lambda: os.chown(j(mnt, "top.txt"), 1, 1),
        "utime": lambda: os.utime(j(mnt, "top.txt"), (0, 0)),
        "setxattr": lambda: os.setxattr(j(mnt, "top.txt"), "user.x", b"1"),
    }
    wrong = {what: errno.errorcode.get(e, e) if e else "succeeded"
             for what, fn in attempts.items() if (e := errno_of(fn)) != errno.EROFS}
    assert not wrong, f"expected EROFS from every change, got {wrong}"


def test_ro_option_refuses_writes(layers: Layers, mounts: Mounts) -> None:
    (layers.upper / "in-upper").write_text("up\n")
    before = snapshot(layers.l1, layers.l2, layers.upper, layers.work)
    mounts.mount(layers.opts("ro"), layers.mnt)
    m = mount_of(layers.mnt)
    assert m is not None and "ro" in m.mount_opts
    assert (layers.mnt / "in-upper").read_text() == "up\n"
    _refuses_writes(layers.mnt)
    mounts.umount(layers.mnt)
    assert snapshot(layers.l1, layers.l2, layers.upper, layers.work) == before


def test_no_upper_is_read_only(layers: Layers, mounts: Mounts) -> None:
    before = snapshot(layers.l1, layers.l2)
    mounts.mount(f"lowerdir={layers.l1}:{layers.l2}", layers.mnt)
    assert sorted(os.listdir(layers.mnt)) == ["bottom.txt", "dir", "shared.txt", "top.txt"]
    _refuses_writes(layers.mnt)
    mounts.umount(layers.mnt)
    assert snapshot(layers.l1, layers.l2) == before


def test_rw_after_ro_wins(layers: Layers, mounts: Mounts) -> None:
    """Options are applied left to right: ``ro`` then ``rw`` is writable."""
    mounts.mount(layers.opts("ro", "rw"), layers.mnt)
    (layers.mnt / "w").write_text("w")
    assert (layers.upper / "w").read_text() == "w"
    mounts.umount(layers.mnt)


def _as_uid_1000(*argv: str) -> subprocess.CompletedProcess[str]:
    return run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", *argv])


@needs_root("allow_other is the default for root only, and the test reads the mount as uid 1000 (setpriv)")
def test_other_users_see_the_mount(layers: Layers, mounts: Mounts) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    secret = layers.l2 / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    public = layers.l2 / "public"
    public.write_text("everyone\n")
    public.chmod(0o644)
    mounts.mount(layers.opts(), layers.mnt)
    m = mount_of(layers.mnt)
    assert m is not None and "allow_other" in m.super_opts and "default_permissions" in m.super_opts

    r = _as_uid_1000("cat", str(layers.mnt / "public"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "everyone\n"
    r = _as_uid_1000("cat", str(layers.mnt / "secret"))
    assert r.returncode != 0
    assert "Permission denied" in r.stderr, r.stderr
    # writing needs write permission on the directory (root's 0755 directory)
    r = _as_uid_1000("touch", str(layers.mnt / "by-1000"))
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    # a directory uid 1000 owns is writable by it, and the new file belongs to it in the upper layer
    (layers.mnt / "home").mkdir()
    os.chown(layers.mnt / "home", 1000, 1000)
    r = _as_uid_1000("sh", "-c", f"echo mine > {layers.mnt / 'home' / 'f'}")
    assert r.returncode == 0, r.stderr
    st = os.stat(layers.upper / "home" / "f")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    umask = os.umask(0o022)
    os.umask(umask)
    assert st.st_mode & 0o777 == 0o666 & ~umask
    mounts.umount(layers.mnt)

"""The command mounts before it loads pyfuse3 and trio, then forks the server (unionfs.fuse.kernel,
unionfs.fuse.server): the mount is in place when the command returns, the server serves it once started, and
ends it on ``unionfs umount``, ``fusermount3 -u`` and SIGTERM; a server that fails to start leaves no mount.

Every test runs as the user running the suite ("self": root mounts with mount(2), an ordinary user through
fusermount3) and, when that is root, once more as an ordinary user ("user", through setpriv), so that both
ways of mounting are tested in either pass of the suite.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mounthelp import (
    PY,
    Layers,
    Mounts,
    is_mounted,
    mount_of,
    pid_alive,
    server_pid,
    snapshot,
    wait_pid_exit,
    wait_unmounted,
    wait_until,
)

import unionfs

pytestmark = pytest.mark.mount

#: the directory holding the unionfs package under test (the other user's commands load it from there)
SOURCE = str(Path(unionfs.__file__).resolve().parent.parent)
TEST_USERS = ("unionfs-test", "nobody")


@dataclasses.dataclass
class Who:
    """Whoever runs the commands of a test: this process's user, or an ordinary user (setpriv) when root."""

    name: str
    prefix: list[str]
    #: the interpreter and the PYTHONPATH this user runs the project with (tests/conftest.py: others_python)
    python: str = PY
    path: str = SOURCE

    def run(self, *argv: str | os.PathLike[str], env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        environ = dict(os.environ if env is None else env)
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [environ.get("PYTHONPATH"), self.path]))
        return subprocess.run([*self.prefix, *map(str, argv)], capture_output=True, text=True, timeout=timeout,
                              env=environ, stdin=subprocess.DEVNULL)

    def cli(self, *args: str | os.PathLike[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(self.python, "-m", "unionfs", *args, env=env)

    def read(self, path: Path) -> str:
        if not self.prefix:
            return path.read_text()
        r = self.run("cat", path)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def write(self, path: Path, text: str) -> None:
        if not self.prefix:
            path.write_text(text)
            return
        r = self.run("sh", "-c", 'printf %s "$1" > "$2"', "sh", text, path)
        assert r.returncode == 0, r.stderr

    def pid(self, mnt: Path) -> int | None:
        """The pid in the server's pid file (where this user's server writes it)."""
        if not self.prefix:
            return server_pid(mnt)
        r = self.run(self.python, "-c",
                     "import sys; from unionfs.fuse.server import pid_file; print(pid_file(sys.argv[1]))", mnt)
        assert r.returncode == 0, r.stderr
        try:
            return int(Path(r.stdout.strip()).read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def ordinary(self) -> bool:
        return bool(self.prefix) or os.geteuid() != 0


def _test_user() -> pwd.struct_passwd | None:
    for name in TEST_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


@pytest.fixture(params=["self", "user"])
def who(request: pytest.FixtureRequest, layers: Layers) -> Who:
    """The user of the test; an ordinary user runs the project with ``others_python``."""
    if request.param == "self":
        return Who("self", [])
    if os.geteuid() != 0:
        pytest.skip("an ordinary user already mounts through fusermount3 in the 'self' case")
    user = _test_user()
    if user is None:
        pytest.skip(f"none of the users {', '.join(TEST_USERS)} exists")
    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        pytest.skip("/dev/fuse is not usable by every user")
    for dirpath, dirnames, filenames in os.walk(layers.base):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)
    os.chown(layers.base, user.pw_uid, user.pw_gid)
    python, path = request.getfixturevalue("others_python")
    return Who(user.pw_name, ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"],
               python, path)


def _mount(who: Who, mounts: Mounts, layers: Layers, *extra: str,
           env: dict[str, str] | None = None) -> int:
    """``unionfs mount -o OPTS MNT`` as ``who``, which must succeed with the mount in place; the server's pid."""
    mounts.points.append(layers.mnt)
    r = who.cli("mount", "-o", layers.opts(*extra), layers.mnt, env=env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r.stderr
    assert is_mounted(layers.mnt), "the command returned before the mount was in place"
    pid = who.pid(layers.mnt)
    assert pid is not None, "the command returned before the server had written its pid file"
    mounts.pids.add(pid)
    return pid


def test_mount_is_served_and_unmounted(layers: Layers, mounts: Mounts, who: Who) -> None:
    pid = _mount(who, mounts, layers)
    m = mount_of(layers.mnt)
    assert m is not None and m.fstype == "fuse.unionfs" and m.source == "unionfs"
    assert {"nosuid", "nodev", "noatime"} <= m.mount_opts and "default_permissions" in m.super_opts
    assert ("allow_other" in m.super_opts) == (not who.ordinary)
    assert who.read(layers.mnt / "top.txt") == "from l1\n"
    assert who.read(layers.mnt / "dir" / "deep.txt") == "deep\n"
    who.write(layers.mnt / "new.txt", "written")
    assert (layers.upper / "new.txt").read_text() == "written"
    r = who.cli("umount", layers.mnt)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert not is_mounted(layers.mnt)
    assert not pid_alive(pid), "unionfs umount returned before the server exited"
    assert who.pid(layers.mnt) is None, "the pid file stayed"
    assert os.listdir(layers.mnt) == []


def test_regression_server_writes_its_pid_file_without_waiting_for_its_own_mount(
        layers: Layers, mounts: Mounts, who: Who) -> None:
    # The server resolved the mountpoint's path for its pid file after the mount was made: the lookup of the
    # mountpoint went to the mount, which waited for the server, which waited for the lookup (deadlock).
    pid = _mount(who, mounts, layers)
    assert pid_alive(pid)
    assert who.read(layers.mnt / "bottom.txt") == "from l2\n"


def test_umount_while_the_server_starts(layers: Layers, mounts: Mounts, who: Who) -> None:
    """``unionfs umount`` right after the mount, while the server still loads pyfuse3: unmounted, and the
    server (which then finds the connection gone) has exited when it returns."""
    pid = _mount(who, mounts, layers)
    r = who.cli("umount", layers.mnt)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert not is_mounted(layers.mnt)
    assert not pid_alive(pid), "unionfs umount returned before the server exited"


@pytest.mark.parametrize("when", ["starting", "serving"])
def test_fusermount_unmount_ends_the_server(layers: Layers, mounts: Mounts, who: Who, when: str) -> None:
    pid = _mount(who, mounts, layers)
    if when == "serving":
        assert who.read(layers.mnt / "top.txt") == "from l1\n"
    r = who.run("fusermount3", "-u", layers.mnt)
    assert r.returncode == 0, r.stderr
    assert wait_pid_exit(pid), "the server did not exit after fusermount3 -u"
    assert not is_mounted(layers.mnt)
    wait_until(lambda: who.pid(layers.mnt) is None, "the pid file to go")


@pytest.mark.parametrize("when", ["starting", "serving"])
def test_sigterm_unmounts(layers: Layers, mounts: Mounts, who: Who, when: str) -> None:
    """SIGTERM unmounts and ends the server, also when it arrives while the server is still loading pyfuse3
    (the signals stay blocked until its handlers are in place)."""
    pid = _mount(who, mounts, layers)
    if when == "serving":
        assert who.read(layers.mnt / "top.txt") == "from l1\n"
    os.kill(pid, signal.SIGTERM)
    assert wait_pid_exit(pid), "the server did not exit on SIGTERM"
    wait_unmounted(layers.mnt)
    assert os.listdir(layers.mnt) == []


def test_refused_mount_is_one_line_and_leaves_nothing_mounted(layers: Layers, mounts: Mounts, who: Who) -> None:
    """fusermount3 refusing (allow_other without user_allow_other in /etc/fuse.conf) is the one line of the
    command's failure, with nothing mounted and no server left."""
    if not who.ordinary:
        pytest.skip("root mounts without fusermount3")
    with open("/etc/fuse.conf") as f:
        if any(line.strip() == "user_allow_other" for line in f):
            pytest.skip("user_allow_other is set in /etc/fuse.conf")
    before = snapshot(layers.l1, layers.l2, layers.upper)
    mounts.points.append(layers.mnt)
    r = who.cli("mount", "-o", layers.opts("allow_other"), layers.mnt)
    assert (r.returncode, r.stdout) == (1, ""), r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"unionfs: error: mounting {layers.mnt} failed: fusermount3: "), lines[0]
    assert "user_allow_other" in lines[0], lines[0]
    assert not is_mounted(layers.mnt)
    assert who.pid(layers.mnt) is None
    assert snapshot(layers.l1, layers.l2, layers.upper) == before


#: modules that shadow pyfuse3 for the server: the import fails; the real pyfuse3 loads but its init fails
SHADOWS = {
    "import": 'raise ImportError("pyfuse3 shadowed by the test")\n',
    "init": """\
import os, sys
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
del sys.modules[__name__]
import pyfuse3 as real
def init(*args, **kwargs):
    raise RuntimeError("pyfuse3 shadowed by the test: init failed")
real.init = init
sys.modules[__name__] = real
""",
}


@pytest.mark.parametrize("fails", sorted(SHADOWS))
def test_server_that_fails_to_start_leaves_no_mount(layers: Layers, mounts: Mounts, who: Who, fails: str) -> None:
    """The command has mounted (and returned 0) before the server loads pyfuse3; when that import, or
    pyfuse3.init on the device, fails, the server detaches the mount, says why in its log, and exits."""
    shadow = layers.base / "shadow"
    shadow.mkdir()
    (shadow / "pyfuse3.py").write_text(SHADOWS[fails])
    os.chmod(shadow, 0o755)
    log = layers.base / "server.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shadow), env.get("PYTHONPATH")]))
    mounts.points.append(layers.mnt)
    r = who.cli("mount", "--log", log, "-o", layers.opts(), layers.mnt, env=env)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr  # (so the command did not load pyfuse3 itself)
    wait_until(lambda: who.pid(layers.mnt) is None, "the failed server's pid file to go")  # (its last act)
    assert not is_mounted(layers.mnt)
    text = log.read_text()
    assert "pyfuse3 shadowed by the test" in text, text
    assert "detached the mount" in text, text
    assert os.listdir(layers.mnt) == []


#: ``python -c`` this with ``unionfs ARGS...``: prints which of pyfuse3 and trio were loaded when the command
#: made the mount, and when it returned
WATCH = """\
import sys
from unionfs.fuse import kernel
real = kernel.mount_fuse
seen = []
def mount_fuse(*args, **kwargs):
    seen.append([m for m in ("pyfuse3", "trio") if m in sys.modules])
    return real(*args, **kwargs)
kernel.mount_fuse = mount_fuse
from unionfs.cli import main
code = main(sys.argv[1:])
print(seen, [m for m in ("pyfuse3", "trio") if m in sys.modules])
sys.exit(code)
"""


def test_command_mounts_before_loading_pyfuse3_or_trio(layers: Layers, mounts: Mounts, who: Who) -> None:
    mounts.points.append(layers.mnt)
    r = who.run(who.python, "-c", WATCH, "mount", "-o", layers.opts(), layers.mnt)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert r.stdout == "[[]] []\n"
    pid = who.pid(layers.mnt)
    assert pid is not None
    mounts.pids.add(pid)
    assert who.read(layers.mnt / "top.txt") == "from l1\n"
    assert who.cli("umount", layers.mnt).returncode == 0


def test_regression_fsname_with_a_comma(layers: Layers, mounts: Mounts, who: Who) -> None:
    # libfuse splits its options on commas: fsname=a\,b (the source "a,b") failed as "unknown option(s)".
    _mount(who, mounts, layers, "fsname=my\\,stack")
    m = mount_of(layers.mnt)
    assert m is not None and m.source == "my,stack"
    assert who.read(layers.mnt / "top.txt") == "from l1\n"
    assert who.cli("umount", layers.mnt).returncode == 0


def test_regression_fsname_not_ascii(layers: Layers, mounts: Mounts, who: Who) -> None:
    # The server gave pyfuse3.init the fsname, which pyfuse3 encodes as ASCII: the server failed once mounted
    # (and removed the mount) although the command had succeeded.
    _mount(who, mounts, layers, "fsname=ünion")
    m = mount_of(layers.mnt)
    assert m is not None and m.source == "ünion"
    assert who.read(layers.mnt / "top.txt") == "from l1\n"
    assert who.cli("umount", layers.mnt).returncode == 0


def test_regression_fsname_with_a_comma_in_the_foreground(layers: Layers, mounts: Mounts) -> None:
    # (the same, where libfuse mounts)
    p = mounts.foreground(layers.opts("fsname=my\\,stack"), layers.mnt)
    m = mount_of(layers.mnt)
    assert m is not None and m.source == "my,stack"
    assert (layers.mnt / "top.txt").read_text() == "from l1\n"
    r = subprocess.run([sys.executable, "-m", "unionfs", "umount", str(layers.mnt)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert p.wait(30) == 0


def test_allow_root_turns_away_other_users(layers: Layers, mounts: Mounts, who: Who) -> None:
    """allow_root is allow_other in the kernel, the server itself turning away all but root and the owner (it
    is told so at its start, the mount being made before)."""
    if who.ordinary:
        pytest.skip("allow_root needs user_allow_other in /etc/fuse.conf for an ordinary user")
    _mount(who, mounts, layers, "allow_root")
    m = mount_of(layers.mnt)
    assert m is not None and "allow_other" in m.super_opts
    assert (layers.mnt / "top.txt").read_text() == "from l1\n"
    other = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "cat",
                            str(layers.mnt / "top.txt")], capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and "Permission denied" in other.stderr, other.stderr
    assert who.cli("umount", layers.mnt).returncode == 0


# -- the options of the mount made without libfuse (nothing mounted) -------------------------------------------


def test_kernel_mount_options() -> None:
    from unionfs.fuse import kernel

    opts = {"fsname=my,stack", "subtype=unionfs", "default_permissions", "allow_root", "noatime", "ro",
            "context=system_u:object_r:container_file_t:s0"}
    assert kernel.kernel_options(opts) == ["allow_other", "context=system_u:object_r:container_file_t:s0",
                                           "default_permissions"]
    assert kernel.fusermount_options(opts) == (
        "ro,nosuid,nodev,noatime,allow_other,context=system_u:object_r:container_file_t:s0,default_permissions,"
        "fsname=my\\,stack,subtype=unionfs")
    assert kernel.fusermount_options({"atime", "fsname=a\\b"}) == "rw,nosuid,nodev,fsname=a\\\\b"


def test_options_without_a_kernel_mount_keep_libfuse() -> None:
    """auto_unmount, and any option the kernel mount does not know, go to libfuse's mount (not dropped)."""
    from unionfs.fuse import kernel

    assert kernel.can_mount({"fsname=unionfs", "subtype=unionfs", "default_permissions", "allow_other", "atime"})
    assert not kernel.can_mount({"fsname=unionfs", "auto_unmount"})
    assert not kernel.can_mount({"fsname=unionfs", "max_read=4096"})
    with pytest.raises(ValueError, match="without libfuse"):
        kernel.mount_fuse("/nowhere", {"auto_unmount"})

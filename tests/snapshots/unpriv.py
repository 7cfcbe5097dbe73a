"""Running tests as an unprivileged user: the user, a Python it can run, the packages it can read, /dev/fuse.

The test process may be root with its interpreter and the repository in places other users cannot read (a
pyenv under /root, a clone in a private home). So the unprivileged side gets:

* a system user (``unionfs-test``, created when missing; else an existing ordinary user; else ``nobody``),
* a copy of every package the mount and snapshot code imports (unionfs itself, pyfuse3, trio, xattr and their
  dependencies, found by importing them in a child interpreter), plus the test modules it runs, in a
  world-readable temporary directory put on PYTHONPATH,
* an interpreter it can execute: the test interpreter when the user can run it with that PYTHONPATH, else
  Debian's ``/usr/bin/python3`` of the same minor version,
* ``/dev/fuse`` opened up to 0666 for the session (some machines ship it 0600), restored afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
USER_NAME = "unionfs-test"
#: the modules the unprivileged side imports; everything they pull in from outside the stdlib is copied
ENTRY_MODULES = ("unionfs.cli", "unionfs.snapshots.cli", "unionfs.fuse.server", "pyfuse3", "trio", "xattr")
#: the test modules the unprivileged side runs
TEST_MODULES = ("harness.py", "conformance.py")
FUSE_DEVICE = "/dev/fuse"


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


class Unprivileged:
    """How to run Python as the unprivileged test user."""

    def __init__(self, user: User, python: str, pythonpath: Path, home: Path) -> None:
        self.user = user
        self.python = python
        self.pythonpath = pythonpath
        self.home = home
        self.tests = pythonpath / "snapshot_tests"

    def env(self) -> dict[str, str]:
        return user_env(self.pythonpath, self.home)


def pick_user() -> User:
    """The unprivileged user the tests run as (created when missing and possible)."""
    with contextlib.suppress(KeyError):
        pw = pwd.getpwnam(USER_NAME)
        return User(pw.pw_name, pw.pw_uid, pw.pw_gid)
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    if os.path.exists(useradd):
        subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER_NAME],
                       capture_output=True, check=False)
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(USER_NAME)
            return User(pw.pw_name, pw.pw_uid, pw.pw_gid)
    for pw in sorted(pwd.getpwall(), key=lambda p: p.pw_uid):
        if 1000 <= pw.pw_uid < 60000:
            return User(pw.pw_name, pw.pw_uid, pw.pw_gid)
    pw = pwd.getpwnam("nobody")
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid)


def _import_roots(python: str) -> list[str]:
    """Files and directories (top-level packages and modules outside the stdlib) the entry modules load."""
    stdlib = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
    script = (
        "import importlib, json, sys\n"
        f"for m in {list(ENTRY_MODULES)!r}: importlib.import_module(m)\n"
        "out = {}\n"
        "for name, mod in list(sys.modules.items()):\n"
        "    f = getattr(mod, '__file__', None)\n"
        "    if f and '.' not in name: out[name] = f\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True, check=True, cwd="/")
    roots = []
    for name, file in json.loads(proc.stdout).items():
        real = os.path.realpath(file)
        if any(real.startswith(s + os.sep) for s in stdlib) and "site-packages" not in real:
            continue
        if os.path.basename(real).startswith("__init__."):
            roots.append(os.path.dirname(real))
        elif name != "__main__":
            roots.append(real)
    return sorted(set(roots))


def build_pythonpath(dest: Path) -> Path:
    """Copy what the unprivileged side imports into ``dest`` (made world-readable); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in _import_roots(sys.executable):
        target = dest / os.path.basename(src)
        if os.path.isdir(src):
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
        else:
            shutil.copy2(src, target)
    tests = dest / "snapshot_tests"
    tests.mkdir(exist_ok=True)
    for name in TEST_MODULES:
        shutil.copy2(HERE / name, tests / name)
    for dirpath, dirnames, filenames in os.walk(dest):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            p = os.path.join(dirpath, f)
            os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | 0o444 | (0o111 if os.access(p, os.X_OK) else 0))
        del dirnames
    up = dest
    while up != up.parent:  # every parent must be traversable
        if not os.stat(up).st_mode & stat.S_IXOTH:
            raise RuntimeError(f"{up} is not traversable by other users")
        up = up.parent
    return dest


def user_env(pythonpath: Path, home: Path) -> dict[str, str]:
    """A clean environment for the user (test tuning variables, ``UNIONFS_TEST_*``, pass through)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("UNIONFS_TEST_")}
    env.update({
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "PYTHONPATH": str(pythonpath),
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": str(home),
        "LANG": "C.UTF-8",
    })
    return env


def run_as(user: User, argv: Sequence[str], env: dict[str, str], cwd: Path, timeout: float,
           ) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` (no supplementary groups) when we are root; as ourselves otherwise."""
    kw: dict[str, object] = {}
    if os.geteuid() == 0:
        kw = {"user": user.uid, "group": user.gid, "extra_groups": []}
    return subprocess.run(list(argv), env=env, cwd=cwd, capture_output=True, text=True,  # type: ignore[call-overload,no-any-return]
                          timeout=timeout, **kw)


def find_python(user: User, pythonpath: Path, home: Path) -> str | None:
    """An interpreter the user can run that imports everything from ``pythonpath``."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, f"/usr/bin/python{version}", "/usr/bin/python3"]
    check = "import sys, pyfuse3, trio, xattr, unionfs.snapshots; " \
            f"assert '%d.%d' % sys.version_info[:2] == {version!r}"
    for c in dict.fromkeys(candidates):
        if not os.path.exists(c):
            continue
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            r = run_as(user, [c, "-c", check], user_env(pythonpath, home), home, timeout=60)
            if r.returncode == 0:
                return c
    return None


@contextlib.contextmanager
def fuse_device_open_to_all(device: str = FUSE_DEVICE) -> Iterator[None]:
    """Make ``device`` mode 0666 (as root) for the duration; put the old mode back afterwards."""
    old = stat.S_IMODE(os.stat(device).st_mode)
    changed = False
    if old & 0o666 != 0o666 and os.geteuid() == 0:
        os.chmod(device, old | 0o666)
        changed = True
    try:
        yield
    finally:
        if changed:
            os.chmod(device, old)


def make_user_dir(user: User, prefix: str) -> Path:
    """A fresh directory in the temp dir, owned by ``user``, traversable by everyone."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    if os.geteuid() == 0:
        os.chown(d, user.uid, user.gid)
    return d

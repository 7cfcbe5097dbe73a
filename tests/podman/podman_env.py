"""Private podman and buildah environments with a given overlay mount program, as root or as a rootless user.

Used by the podman tests (tests/podman) and by the podman benchmark (bench/podman.py); it imports nothing of
pytest. containers/storage runs its ``mount_program`` as ``PROGRAM -o OPTIONS MERGED`` and unmounts it with
``fusermount3 -u MERGED``; an :class:`Engine` is one storage (graph root, run root) using one mount program:

* everything lives under one directory of its own (storage, ``XDG_RUNTIME_DIR``, ``HOME``, ``TMPDIR``), given
  to podman and buildah through ``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF`` and ``--runroot``,
  so the machine's own storage is never touched;
* rootless: podman and buildah run as :data:`ROOTLESS_USER` (``setpriv`` from root, with a clean environment);
  the user needs subordinate ids (:func:`ensure_rootless_user`) and a readable ``/dev/fuse``;
* :meth:`Engine.destroy` resets the storage, stops the rootless pause process, unmounts whatever is left under
  the directory and removes it.

The containers.conf (:data:`CONTAINERS_CONF`) picks runc, the cgroupfs manager, explicit ulimits (runc cannot
raise the machine's limits otherwise) and no network namespace setup (``netns = "none"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTLESS_USER = "unionfs-test"
SUBIDS = 65536
IMAGE = "localhost/unionfs-test-busybox:latest"
MOUNT_PROGRAMS = ("fuse-overlayfs", "unionfs")
MODES = ("root", "rootless")
#: the interpreter the staged copy of unionfs runs with when the rootless user cannot run the venv's command
ROOTLESS_PYTHON = "/usr/bin/python3"
COMMAND_TIMEOUT = 180.0

CONTAINERS_CONF = """\
[containers]
netns = "none"
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

#: the files of the test image besides busybox: path -> (content, mode, uid, gid); a content of None is a
#: directory, a content starting with "->" a symlink
IMAGE_FILES: dict[str, tuple[str | None, int, int, int]] = {
    "etc": (None, 0o755, 0, 0),
    "etc/passwd": ("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n", 0o644, 0, 0),
    "etc/group": ("root:x:0:\nnobody:x:65534:\n", 0o644, 0, 0),
    "root": (None, 0o700, 0, 0),
    "tmp": (None, 0o1777, 0, 0),
    "x": ("x\n", 0o644, 0, 0),
    "keep": (None, 0o755, 0, 0),
    "keep/stay": ("stays\n", 0o644, 0, 0),
    "keep/gone": ("goes\n", 0o644, 0, 0),
    "deldir": (None, 0o755, 0, 0),
    "deldir/a": ("a\n", 0o644, 0, 0),
    "deldir/sub": (None, 0o755, 0, 0),
    "deldir/sub/b": ("b\n", 0o644, 0, 0),
    "dir2file": (None, 0o755, 0, 0),
    "dir2file/c": ("c\n", 0o644, 0, 0),
    "file2dir": ("a file, to become a directory\n", 0o644, 0, 0),
    "opq": (None, 0o755, 0, 0),
    "opq/old1": ("old1\n", 0o644, 0, 0),
    "opq/old2": ("old2\n", 0o644, 0, 0),
    "data": (None, 0o755, 0, 0),
    "data/hello.txt": ("hello from the image\n", 0o644, 0, 0),
    "data/private": ("secret\n", 0o600, 0, 0),
    "data/owned": ("owned by 1000\n", 0o640, 1000, 1000),
    "data/link": ("->hello.txt", 0o777, 0, 0),
    # check [-a PATH | -w DIR]...: -a PATH: PATH must not exist; -w DIR: a listing of DIR (ls -a) must show no
    # .wh. name. Every failure is told (on stderr); the status is 1 when there was one.
    "bin/check": (
        "#!/bin/sh\nst=0\nwhile [ $# -ge 2 ]; do\n  case \"$1\" in\n"
        "  -a) if [ -e \"$2\" ] || [ -L \"$2\" ]; then echo \"check: $2 exists\" >&2; st=1; fi;;\n"
        "  -w) for n in $(ls -a \"$2\"); do case \"$n\" in .wh.*) echo \"check: $2 lists $n\" >&2; st=1;; esac;"
        " done;;\n"
        "  *) echo \"check: bad argument $1\" >&2; exit 2;;\n  esac\n  shift 2\ndone\nexit $st\n", 0o755, 0, 0),
}


class CommandFailed(AssertionError):
    """A podman or buildah command failed; the message holds the command, its status and its output."""


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    subuid: int  # first subordinate uid
    subgid: int


# -- the host -----------------------------------------------------------------------------------------------


def unionfs_command() -> Path | None:
    """The installed ``unionfs`` command: beside the running interpreter (the project's venv), else on PATH."""
    beside = Path(sys.executable).parent / "unionfs"
    if beside.exists():
        return beside
    found = shutil.which("unionfs")
    return Path(found) if found else None


def _is_static_elf(path: str) -> bool:
    """Whether ``path`` is an ELF executable without a program interpreter (statically linked)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
            return False
        order = "<" if head[5] == 1 else ">"
        phoff, = struct.unpack_from(order + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(order + "HH", head, 54)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            p_type, = struct.unpack(order + "I", f.read(4))
            if p_type == 3:  # PT_INTERP
                return False
    return True


def missing_tools(mode: str) -> str | None:
    """Why podman tests cannot run here in ``mode``, or None."""
    for tool in ("podman", "buildah", "runc", "fusermount3", "busybox"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (tests/setup.sh installs it)"
    busybox = shutil.which("busybox")
    assert busybox is not None
    if not _is_static_elf(busybox):
        return f"{busybox} is not statically linked (install busybox-static)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if mode == "root" and os.geteuid() != 0:
        return "needs root: podman as root"
    if mode == "rootless":
        for tool in ("newuidmap", "newgidmap", "setpriv"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (tests/setup.sh installs uidmap)"
    return None


def _subrange(path: str, user: str, uid: int) -> int | None:
    """The start of the first range of at least :data:`SUBIDS` ids of the user in ``path``."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (user, str(uid)) and int(fields[2]) >= SUBIDS:
            return int(fields[1])
    return None


class NoRootlessUser(RuntimeError):
    """Not root, and the current user has no subordinate ids."""


def ensure_rootless_user(name: str = ROOTLESS_USER) -> User:
    """The rootless user, created (as tests/run-rootless.sh does) when missing, with :data:`SUBIDS`
    subordinate uids and gids: a free block after every range already given out, at 100000 at the lowest.
    Idempotent. Run by an ordinary user: that user, as it is (:class:`NoRootlessUser` without subordinate ids)."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        subuid, subgid = _subrange("/etc/subuid", me.pw_name, me.pw_uid), _subrange("/etc/subgid", me.pw_name,
                                                                                     me.pw_uid)
        if subuid is None or subgid is None:
            raise NoRootlessUser(f"{me.pw_name} has no range of {SUBIDS} ids in /etc/subuid and /etc/subgid")
        return User(me.pw_name, me.pw_uid, me.pw_gid, subuid, subgid)
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)
        pw = pwd.getpwnam(name)
    subuid, subgid = _subrange("/etc/subuid", name, pw.pw_uid), _subrange("/etc/subgid", name, pw.pw_uid)
    if subuid is None or subgid is None:
        end = 100000
        for path in ("/etc/subuid", "/etc/subgid"):
            with contextlib.suppress(FileNotFoundError):
                for line in Path(path).read_text().splitlines():
                    fields = line.strip().split(":")
                    if len(fields) == 3:
                        end = max(end, int(fields[1]) + int(fields[2]))
        block = f"{end}-{end + SUBIDS - 1}"
        subprocess.run(["usermod", "--add-subuids", block, "--add-subgids", block, name],
                       check=True, capture_output=True)
        subuid, subgid = _subrange("/etc/subuid", name, pw.pw_uid), _subrange("/etc/subgid", name, pw.pw_uid)
        assert subuid is not None and subgid is not None
    return User(name, pw.pw_uid, pw.pw_gid, subuid, subgid)


def as_user(user: User | None) -> list[str]:
    """The argv prefix that runs a command as ``user`` (nothing when it is None or already the current user)."""
    if user is None or os.geteuid() == user.uid:
        return []
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups"]


def user_can_run(user: User, program: Path) -> bool:
    """Whether ``user`` can run ``program --version`` (its interpreter and packages may be unreadable)."""
    argv = [*as_user(user), "env", "-i", "PATH=/usr/bin:/bin", str(program), "--version"]
    try:
        return subprocess.run(argv, capture_output=True, timeout=60, cwd="/").returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def stage_unionfs(dest: Path, python: str = ROOTLESS_PYTHON) -> Path:
    """A copy of the project and its packages under ``dest`` that every user can run (tests/rootless_stage.py),
    run by ``python``; returns its ``unionfs`` command."""
    subprocess.run([sys.executable, str(REPO / "tests" / "rootless_stage.py"), str(dest), python],
                   check=True, capture_output=True, text=True)
    # Compiled now, by the interpreter that runs the copy: the user cannot write __pycache__ there, and every
    # mount would compile the modules again (some 60 ms more per podman run).
    subprocess.run([python, "-m", "compileall", "-q", str(dest / "src" / "unionfs"), str(dest / "site")],
                   capture_output=True, text=True)  # a module that does not compile is compiled at import
    return dest / "bin" / "unionfs"


def python_minor(python: str) -> str | None:
    try:
        out = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return out.stdout.strip() or None


def short_tmp() -> str:
    """A temporary directory with a short path: podman refuses a run root longer than 50 characters."""
    tmp = tempfile.gettempdir()
    return tmp if len(tmp) <= 12 else "/tmp"


def short_name(mode: str, program: str) -> str:
    """The directory name of an engine: r-fo, r-uf, r-us (root), u-fo, u-uf, u-us (rootless user); us: unionfs with
    spare servers (``mountopt = "spare"``, bench/podman.py)."""
    short = {"fuse-overlayfs": "fo", "unionfs": "uf", "unionfs-spare": "us"}[program]
    return ("r" if mode == "root" else "u") + "-" + short


# -- the image ---------------------------------------------------------------------------------------------


def make_rootfs_tar(dest: Path) -> Path:
    """``dest``/rootfs.tar: busybox (static) with its applets as relative symlinks in /bin, plus
    :data:`IMAGE_FILES`; owners are set in the archive, so that any user can make it."""
    busybox = shutil.which("busybox")
    assert busybox is not None
    tree = dest / "rootfs"
    (tree / "bin").mkdir(parents=True)
    shutil.copy(busybox, tree / "bin" / "busybox")
    (tree / "bin" / "busybox").chmod(0o755)
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for name in applets:
        if name != "busybox" and "/" not in name:
            (tree / "bin" / name).symlink_to("busybox")
    owners: dict[str, tuple[int, int]] = {}
    for rel, (content, mode, uid, gid) in IMAGE_FILES.items():
        p = tree / rel
        if content is None:
            p.mkdir(exist_ok=True)
        elif content.startswith("->"):
            p.symlink_to(content[2:])
        else:
            if p.is_symlink():
                p.unlink()
            p.write_text(content)
        if not p.is_symlink():
            p.chmod(mode)
        owners[rel] = (uid, gid)
    out = dest / "rootfs.tar"

    def owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid, info.gid = owners.get(info.name, (0, 0))
        info.uname = info.gname = ""
        info.mtime = 1_700_000_000
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(os.listdir(tree)):
            tar.add(tree / entry, arcname=entry, filter=owner)
    shutil.rmtree(tree)
    out.chmod(0o644)
    return out


# -- mounts ------------------------------------------------------------------------------------------------


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts_under(top: Path) -> list[tuple[str, str]]:
    """(mount point, file system type) of everything mounted at or below ``top``, innermost first."""
    prefix = str(top).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = _unescape(fields[4])
            if point == str(top) or point.startswith(prefix):
                found.append((point, fields[sep + 1]))
    return sorted(found, key=lambda m: m[0], reverse=True)


def unmount_under(top: Path) -> list[str]:
    """Detach everything mounted below ``top`` (FUSE mounts with ``fusermount3 -u -z``, others, as root, with
    ``umount -l``); returns the mount points that were found."""
    found = mounts_under(top)
    for point, fstype in found:
        if fstype.startswith("fuse"):
            r = subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True)
            if r.returncode == 0:
                continue
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", point], capture_output=True)
    return [point for point, _ in found]


# -- an engine ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Engine:
    """One private storage driven by podman and buildah with one overlay mount program."""

    mode: str  # "root" or "rootless"
    program: str  # "fuse-overlayfs" or "unionfs"
    program_path: Path
    top: Path
    containers_conf: Path
    user: User | None  # the rootless user; None as root
    #: options containers/storage adds for the mount program (storage.conf's ``mountopt``)
    mount_options: str = ""

    @property
    def id(self) -> str:
        return f"{self.mode}-{self.program}"

    @property
    def graphroot(self) -> Path:
        return self.top / "graph"

    @property
    def runroot(self) -> Path:
        return self.top / "run"

    def setup(self) -> None:
        """Make the directories and the storage configuration. The storage's record that the kernel supports
        idmapped lower layers is preset to "no": with a mount program, podman 4.3's containers/storage would
        otherwise both idmap the lower layers and pass uidmapping= to the program, mapping every id twice (a
        container run with --uidmap then sees its files owned by nobody); later versions do not idmap the
        lower layers when a mount program is set. Without a mount program nothing changes."""
        self.top.mkdir(mode=0o755)
        for d in ("graph", "run", "run/overlay", "xdg", "home", "tmp", "work"):
            (self.top / d).mkdir()
        (self.top / "xdg").chmod(0o700)
        (self.top / "run" / "overlay" / "idmapped-lower-dir-false").touch()
        (self.top / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.graphroot}"\n'
            f'runroot = "{self.runroot}"\n'
            f'rootless_storage_path = "{self.graphroot}"\n'
            "\n[storage.options.overlay]\n"
            f'mount_program = "{self.program_path}"\n'
            + (f'mountopt = "{self.mount_options}"\n' if self.mount_options else "")
        )
        if self.user is not None and os.geteuid() == 0:
            for dirpath, dirnames, filenames in os.walk(self.top):
                for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                    os.lchown(name, self.user.uid, self.user.gid)

    def env(self) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(self.top / "home"),
            "XDG_RUNTIME_DIR": str(self.top / "xdg"),
            "XDG_CONFIG_HOME": str(self.top / "home" / ".config"),
            "XDG_DATA_HOME": str(self.top / "home" / ".local" / "share"),
            "TMPDIR": str(self.top / "tmp"),
            "CONTAINERS_CONF": str(self.containers_conf),
            "CONTAINERS_STORAGE_CONF": str(self.top / "storage.conf"),
            "LANG": "C.UTF-8",
        }
        if self.user is not None:
            env.update(USER=self.user.name, LOGNAME=self.user.name)
        return env

    def argv(self, tool: str, args: Sequence[str]) -> list[str]:
        env = [f"{k}={v}" for k, v in self.env().items()]
        # The graph root, driver and mount program come from storage.conf alone: --root or --storage-driver on
        # the command line make podman drop the options of storage.conf, mount_program among them (it would use
        # the kernel's overlayfs). --runroot does not, and rootless podman takes the run root from nowhere else.
        storage = ["--runroot", str(self.runroot)]
        return [*as_user(self.user), "env", "-i", *env, tool, *storage, *args]

    def run(self, tool: str, *args: str | os.PathLike[str], check: bool = True, timeout: float = COMMAND_TIMEOUT,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = self.argv(tool, [str(a) for a in args])
        shown = f"{tool} {shlex.join(str(a) for a in args)}"
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                               cwd=self.top / "work", start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            raise CommandFailed(f"[{self.id}] `{shown}` did not finish in {timeout:.0f} s\n"
                                f"{_text(exc.stdout)}{_text(exc.stderr)}") from None
        if check and r.returncode != 0:
            raise CommandFailed(f"[{self.id}] `{shown}` exited with {r.returncode}\n"
                                f"--- stdout\n{r.stdout}--- stderr\n{r.stderr}")
        return r

    def podman(self, *args: str | os.PathLike[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("podman", *args, **kw)  # type: ignore[arg-type]

    def buildah(self, *args: str | os.PathLike[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("buildah", *args, **kw)  # type: ignore[arg-type]

    @property
    def fstype(self) -> str:
        """The type a container's root shows in the mount table when the mount program serves it."""
        return f"fuse.{self.program}"

    def import_image(self, tarball: Path, name: str = IMAGE) -> None:
        self.podman("import", tarball, name)

    def host_uid(self, inside: int) -> int:
        """The host uid that an id of the storage's own user namespace is (rootless: 0 is the user, 1... are
        its subordinate ids)."""
        if self.user is None:
            return inside
        return self.user.uid if inside == 0 else self.user.subuid + inside - 1

    def host_gid(self, inside: int) -> int:
        """As :meth:`host_uid`, for groups."""
        if self.user is None:
            return inside
        return self.user.gid if inside == 0 else self.user.subgid + inside - 1

    def mount_servers(self) -> list[tuple[int, list[str]]]:
        """(pid, argv) of every process running the mount program on a ``merged`` directory of this storage
        (``PROGRAM -o OPTIONS GRAPHROOT/overlay/ID/merged``), the servers of its mounts."""
        found = []
        prefix = str(self.graphroot) + "/"
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            except OSError:
                continue
            if "-o" in argv and argv[-1].startswith(prefix) and argv[-1].endswith("/merged"):
                found.append((int(entry), argv))
        return found

    def destroy(self) -> list[str]:
        """Reset the storage, stop the rootless pause process, unmount what is left and remove the directory.
        Returns the mount points that were still there after the reset."""
        with contextlib.suppress(CommandFailed, OSError):
            self.podman("system", "reset", "--force", timeout=120, check=False)
        pause = self.top / "xdg" / "libpod" / "tmp" / "pause.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pause.read_text().strip()), signal.SIGKILL)
        left = unmount_under(self.top)
        if not mounts_under(self.top):
            _rmtree(self.top)
        return left


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def _rmtree(top: Path) -> None:
    def onerror(func: object, path: str, exc: object) -> None:
        # a directory without write or search permission for its owner (a container's /root, say)
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)

    shutil.rmtree(top, onerror=onerror)
    if top.exists():
        shutil.rmtree(top, ignore_errors=True)


def write_containers_conf(path: Path) -> Path:
    path.write_text(CONTAINERS_CONF)
    path.chmod(0o644)
    return path

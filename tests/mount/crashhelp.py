"""Helpers of the crash tests (test_crash_steps.py): servers run with the kill points of tests/killpoints, the
merged view as data, and kernel overlayfs's view of the same layers (as root, or in a user namespace of the user
running the tests).

Run as a script (``crashhelp.py kernel-view SPEC``) it mounts kernel overlayfs as SPEC (JSON) says, prints its
view (JSON) and unmounts: the rootless tests run it with ``unshare -Urm``, where an ordinary user may mount
overlayfs with ``-o userxattr``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

#: the directory put first on a killed server's PYTHONPATH: its sitecustomize installs the kill points
KILLPOINTS_DIR = Path(__file__).resolve().parents[1] / "killpoints"


def _load_killpoints() -> ModuleType:
    spec = importlib.util.spec_from_file_location("killpoints", KILLPOINTS_DIR / "killpoints.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


killpoints = _load_killpoints()

#: one object of a merged view: what a client sees of it, except inode numbers and times
Entry = dict[str, Any]
#: a merged view: path (relative, "" the root) -> entry
View = dict[str, Entry]


def killpoints_env(kill_at: int, trigger: Path, log: Path) -> dict[str, str]:
    """The environment of a server that dies before its ``kill_at``-th change of a file system once ``trigger``
    exists (0: it only records them), logging the calls in ``log``."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(KILLPOINTS_DIR) + (os.pathsep + path if path else "")
    env[killpoints.ENV_KILL] = str(kill_at)
    env[killpoints.ENV_TRIGGER] = str(trigger)
    env[killpoints.ENV_LOG] = str(log)
    # The native part's data path writes in C, where no audit hook sees it: the client's own writes are counted
    # (and killed before) only when Python makes them.
    env["UNIONFS_NATIVE_DATA"] = "off"
    return env


def plain_env() -> dict[str, str]:
    """The environment without any kill point (for remounts and reference servers)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(killpoints.ENV_KILL)}


# -- views ---------------------------------------------------------------------------------------------------


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in sorted(names):
        if name.startswith("security."):
            continue  # (labels of the host's security module, not of the layers)
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False).hex()
        except OSError as exc:
            out[name] = f"error {exc.errno}"
    return out


def entry_of(path: str, content: bool = True) -> Entry:
    """What the view shows of the object at ``path`` (not followed): type, permission bits, owner, links (of a
    non-directory: a merged directory's count is not the sum of its layers'), size and content digest of a file,
    target of a symlink, device number, xattrs."""
    st = os.lstat(path)
    e: Entry = {"type": stat.S_IFMT(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid,
                "gid": st.st_gid, "xattrs": _xattrs(path)}
    if not stat.S_ISDIR(st.st_mode):
        e["nlink"] = st.st_nlink
    if stat.S_ISREG(st.st_mode):
        e["size"] = st.st_size
        if content:
            e["sha256"] = _digest(path)
    elif stat.S_ISLNK(st.st_mode):
        e["target"] = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        e["rdev"] = st.st_rdev
    return e


def view(root: str | os.PathLike[str]) -> View:
    """The merged view under ``root``, every object of it."""
    top = os.fspath(root)
    out: View = {"": entry_of(top)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, top)] = entry_of(full)
    return out


def view_diff(a: View, b: View) -> str:
    """What differs between two views, for an assertion message."""
    lines = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            lines.append(f"  {path or '/'}: {a.get(path)} != {b.get(path)}")
    return "\n".join(lines) or "  (equal)"


def translate_owners(v: View, uid_map: dict[int, int], gid_map: dict[int, int]) -> View:
    """``v`` with the owners seen in a user namespace given as the host sees them."""
    out: View = {}
    for path, e in v.items():
        e = dict(e)
        e["uid"] = uid_map.get(e["uid"], e["uid"])
        e["gid"] = gid_map.get(e["gid"], e["gid"])
        out[path] = e
    return out


# -- kernel overlayfs ----------------------------------------------------------------------------------------


def _mount_overlay(lowers: Sequence[str], upper: str, work: str, mnt: str, userxattr: bool) -> None:
    opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}" + (",userxattr" if userxattr else "")
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"kernel overlay mount failed ({r.returncode}): {r.stderr.strip()} [{opts}]")


def _kernel_views_here(specs: list[dict[str, Any]]) -> list[View]:
    out = []
    for spec in specs:
        os.makedirs(spec["work"], exist_ok=True)
        os.makedirs(spec["mnt"], exist_ok=True)
        _mount_overlay(spec["lowers"], spec["upper"], spec["work"], spec["mnt"], spec["userxattr"])
        try:
            out.append(view(spec["mnt"]))
        finally:
            subprocess.run(["umount", spec["mnt"]], check=True)
    return out


def kernel_views(stacks: Sequence[tuple[Sequence[Path], Path, Path]]) -> list[View]:
    """Kernel overlayfs's view of each (lowers top first, upper, scratch) in ``stacks``, each with a fresh
    workdir made in its ``scratch`` (on the file system of its upper layer): mounted here as root; otherwise in
    one user namespace of this user, with ``-o userxattr`` (the markers an ordinary user's unionfs writes), the
    owners given back as the host's."""
    specs = [{"lowers": [str(p) for p in lowers], "upper": str(upper), "work": str(scratch / "kwork"),
              "mnt": str(scratch / "kmnt"), "userxattr": os.geteuid() != 0} for lowers, upper, scratch in stacks]
    if os.geteuid() == 0:
        return _kernel_views_here(specs)
    r = subprocess.run(["unshare", "--map-root-user", "--mount", sys.executable, __file__, "kernel-view",
                        json.dumps(specs)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"kernel view in a user namespace failed ({r.returncode}): {r.stderr.strip()}")
    inside: list[View] = json.loads(r.stdout)
    return [translate_owners(v, {0: os.getuid()}, {0: os.getgid()}) for v in inside]


def kernel_view(lowers: Sequence[Path], upper: Path, scratch: Path) -> View:
    """:func:`kernel_views` of one stack."""
    return kernel_views([(lowers, upper, scratch)])[0]


def kernel_view_unavailable(scratch: Path) -> str | None:
    """Why :func:`kernel_view` cannot work here (None when a probe mount works)."""
    for d in ("l", "u"):
        (scratch / d).mkdir(parents=True, exist_ok=True)
    try:
        kernel_view([scratch / "l"], scratch / "u", scratch)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"kernel overlayfs cannot be mounted here: {exc}"
    return None


# -- client operations ----------------------------------------------------------------------------------------


def tolerant(op: Callable[[], object]) -> OSError | None:
    """Run a client operation that may meet a dead server; the error it got, if any."""
    try:
        op()
    except OSError as exc:
        return exc
    return None


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "kernel-view":
        with contextlib.redirect_stdout(sys.stderr):
            v = _kernel_views_here(json.loads(argv[1]))
        json.dump(v, sys.stdout)
        return 0
    print("usage: crashhelp.py kernel-view SPEC", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""The floor of a pyfuse3 + trio server: how fast can any Python FUSE server answer a warm ``ls -lR``?

Mounts a minimal pyfuse3 file system (one root directory holding N files whose attributes live in memory,
``getxattr`` answering ENODATA at once, long entry and attribute timeouts; the same FUSE options and
capabilities unionfs uses), then times the same warm ``ls -lR`` and a loop of ``getxattr`` calls on it, on
unionfs and on fuse-overlayfs over a one-layer tree holding the same N files, and on kernel overlayfs for
reference. The ratio floor / fuse-overlayfs is the best any pyfuse3 server can reach on this machine.

Run as root: ``python bench/floor.py [--files N] [--repeat R] [--calls K]``; prints a markdown table.
``python bench/floor.py --serve MNT --files N`` is the floor server itself (started by the benchmark).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402  (bench/ is not a package)
    Backend,
    FuseOverlayfs,
    FuseServer,
    Kernel,
    MountError,
    Unionfs,
    cleanup_mounts_under,
    cpu_model,
    is_mounted,
    tool_version,
)

#: getxattr of this name on the floor's root answers the server's request counts (JSON), so that the
#: requests one warm ``ls -lR`` sends can be counted
COUNTS_XATTR = b"user.floor.counts"
XATTR = "security.selinux"  # what ``ls -l`` asks for every file; nobody here has it
TIMEOUT = 300.0
DEFAULT_MAX_TASKS = 99  # pyfuse3.main's default, which unionfs uses
FILE_SIZE = 100


# ---------------------------------------------------------------------------------------------------------
# The floor server: runs in a child process (``--serve``); pyfuse3 and trio are imported only there.


def serve(mountpoint: str, files: int, max_tasks: int) -> None:
    import pyfuse3
    import trio

    counts: dict[str, int] = {}
    names = [f"f{i:06d}".encode() for i in range(files)]
    by_name = {name: i + 2 for i, name in enumerate(names)}  # inode 1 is the root
    now = time.time_ns()

    def attrs(ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = 0o40755 if ino == pyfuse3.ROOT_INODE else 0o100644
        a.st_nlink = 2 if ino == pyfuse3.ROOT_INODE else 1
        a.st_size = 0 if ino == pyfuse3.ROOT_INODE else FILE_SIZE
        a.st_blksize = 4096
        a.st_blocks = 0 if ino == pyfuse3.ROOT_INODE else 8
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = now
        return a

    def count(op: str) -> None:
        counts[op] = counts.get(op, 0) + 1

    class Floor(pyfuse3.Operations):
        supports_dot_lookup = False
        enable_acl = True  # as unionfs: the kernel's ACL handling and the same getxattr traffic

        async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
            count("lookup")
            ino = by_name.get(name) if parent_inode == pyfuse3.ROOT_INODE else None
            if ino is None:
                a = pyfuse3.EntryAttributes()
                a.st_ino = 0
                a.entry_timeout = TIMEOUT
                return a
            return attrs(ino)

        async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
            count("forget")

        async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
            count("getattr")
            return attrs(inode)

        async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
            count("opendir")
            if inode != pyfuse3.ROOT_INODE:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return 1

        async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
            count("readdir")
            for i in range(start_id, files):
                if not pyfuse3.readdir_reply(token, names[i], attrs(i + 2), i + 1):
                    return

        async def releasedir(self, fh: int) -> None:
            count("releasedir")

        async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
            if name == COUNTS_XATTR and inode == pyfuse3.ROOT_INODE:
                return json.dumps(counts).encode()
            count("getxattr " + name.decode(errors="replace"))
            raise pyfuse3.FUSEError(errno.ENODATA)

        async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
            count("listxattr")
            return []

        async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
            count("statfs")
            return pyfuse3.StatvfsData()

    # The options unionfs mounts with as root (unionfs.fuse.server.fuse_options)
    options = {"fsname=floor", "subtype=floor", "default_permissions", "allow_other", "noatime"}
    pyfuse3.init(Floor(), mountpoint, options)
    try:
        trio.run(pyfuse3.main, 1, max_tasks)
    finally:
        pyfuse3.close(unmount=False)


# ---------------------------------------------------------------------------------------------------------
# The benchmark


class FloorServer(FuseServer):
    def __init__(self, files: int, max_tasks: int) -> None:
        self.files = files
        self.max_tasks = max_tasks
        self.name = "floor" if max_tasks == DEFAULT_MAX_TASKS else f"floor, max_tasks={max_tasks}"

    def command(self, opts: str, mnt: Path) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--serve", str(mnt), "--files", str(self.files),
                "--max-tasks", str(self.max_tasks)]


@contextlib.contextmanager
def mounted(fs: Backend, root: Path, layer: Path, serial: int) -> Iterator[Path]:
    scratch = root / f"fs{serial}"  # no fs.name: mount options cannot hold its commas
    upper, work, mnt = scratch / "upper", scratch / "work", scratch / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    proc = fs.start([layer], upper, work, mnt, scratch / "server.log")
    try:
        yield mnt
    finally:
        fs.stop(mnt, proc)
        if not is_mounted(mnt):
            shutil.rmtree(scratch, ignore_errors=True)


def time_ls(mnt: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["ls", "-lR", str(mnt)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def time_getxattr(path: Path, calls: int) -> float:
    """Seconds per ``getxattr`` of a name the file does not have."""
    t = time.perf_counter()
    for _ in range(calls):
        try:
            os.getxattr(path, XATTR)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise
    return (time.perf_counter() - t) / calls


def floor_counts(mnt: Path) -> dict[str, int]:
    counts: dict[str, int] = json.loads(os.getxattr(mnt, COUNTS_XATTR))
    return counts


def measure(mounts: dict[str, tuple[Backend, Path]], repeat: int, calls: int,
            results: dict[str, dict[str, object] | str]) -> None:
    """Rounds over every mounted file system in turn, so that drifts of the machine hit all of them alike."""
    ls: dict[str, list[float]] = {name: [] for name in mounts}
    gx: dict[str, list[float]] = {name: [] for name in mounts}
    counts: dict[str, dict[str, int]] = {}
    for _fs, mnt in mounts.values():
        time_ls(mnt)  # fills the kernel's caches: what follows is warm
        time_getxattr(mnt / "f000000", 100)
    for r in range(repeat):
        print(f"round {r + 1}/{repeat}", file=sys.stderr, flush=True)
        for name, (fs, mnt) in mounts.items():
            before = floor_counts(mnt) if isinstance(fs, FloorServer) else None
            ls[name].append(time_ls(mnt))
            if before is not None:
                after = floor_counts(mnt)
                for op, n in after.items():
                    counts.setdefault(name, {})[op] = counts.get(name, {}).get(op, 0) + n - before.get(op, 0)
            gx[name].append(time_getxattr(mnt / "f000000", calls))
    for name in mounts:
        out: dict[str, object] = {"ls": statistics.median(ls[name]), "ls_runs": ls[name],
                                  "getxattr": statistics.median(gx[name]), "getxattr_runs": gx[name]}
        if name in counts:
            out["requests"] = {op: n / repeat for op, n in counts[name].items() if n}
        results[name] = out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--files", type=int, default=10_000, help="files in the tree (default 10000)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each measurement (default 5)")
    p.add_argument("--calls", type=int, default=20_000, help="getxattr calls per timed loop (default 20000)")
    p.add_argument("--max-tasks", type=int, default=DEFAULT_MAX_TASKS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--serve", metavar="MNT", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def fmt_ms(v: object) -> str:
    return f"{float(v) * 1e3:.0f} ms" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve, args.files, args.max_tasks)
        return 0
    if os.geteuid() != 0:
        print("bench/floor.py must run as root (it mounts file systems)", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="unionfs-floor-", dir=args.workdir)).resolve()
    # The floor as unionfs runs pyfuse3 (default main() settings), and with one worker task: no second task
    # waiting for the device, so no lock handoff between tasks on every request.
    backends: list[Backend] = [FloorServer(args.files, DEFAULT_MAX_TASKS), FloorServer(args.files, 1), Unionfs(),
                               FuseOverlayfs(), Kernel()]
    results: dict[str, dict[str, object] | str] = {}
    try:
        layer = root / "layer"
        layer.mkdir()
        for i in range(args.files):
            (layer / f"f{i:06d}").write_bytes(b"x" * FILE_SIZE)
        with contextlib.ExitStack() as stack:
            mounts: dict[str, tuple[Backend, Path]] = {}
            for serial, fs in enumerate(backends):
                if reason := fs.unavailable():
                    results[fs.name] = f"n/a ({reason})"
                    continue
                try:
                    mounts[fs.name] = (fs, stack.enter_context(mounted(fs, root, layer, serial)))
                except MountError as e:
                    results[fs.name] = f"n/a ({str(e).strip().splitlines()[0]})"
            measure(mounts, args.repeat, args.calls, results)
    finally:
        if left := cleanup_mounts_under(root):
            print(f"had to lazily unmount: {', '.join(left)}", file=sys.stderr)
        if not cleanup_mounts_under(root):
            shutil.rmtree(root, ignore_errors=True)

    names = [fs.name for fs in backends]
    ref = results.get("fuse-overlayfs")

    def cell(name: str, key: str, unit: str) -> str:
        r = results[name]
        if isinstance(r, str):
            return r
        v = float(r[key])  # type: ignore[arg-type]
        text = f"{v * 1e3:.0f} ms" if unit == "ms" else f"{v * 1e6:.1f} µs"
        if isinstance(ref, dict):
            text += f" ({v / float(ref[key]):.2f})"  # type: ignore[arg-type]
        return text

    out = [
        "# pyfuse3 floor",
        "",
        f"- {time.strftime('%Y-%m-%d')}, kernel {os.uname().release}, {cpu_model()}, {os.cpu_count()} cores",
        f"- Python {sys.version.split()[0]}; fuse-overlayfs "
        f"{tool_version(['fuse-overlayfs', '--version'], 'fuse-overlayfs:')}",
        f"- {args.files} files of {FILE_SIZE} bytes in one directory (one lower layer for the overlays); "
        f"median of {args.repeat} runs; in parentheses: ratio to fuse-overlayfs",
        f"- floor: pyfuse3 + trio, attributes from memory, getxattr → ENODATA, timeouts {TIMEOUT:g} s, "
        f"`pyfuse3.main()` as unionfs calls it; the second floor column runs `pyfuse3.main(max_tasks=1)`",
        "",
        "| | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
        "| warm `ls -lR` | " + " | ".join(cell(n, "ls", "ms") for n in names) + " |",
        f"| `getxattr({XATTR})`, per call | " + " | ".join(cell(n, "getxattr", "µs") for n in names) + " |",
    ]
    fl = results.get("floor")
    if isinstance(fl, dict) and isinstance(fl.get("requests"), dict):
        reqs: dict[str, float] = fl["requests"]  # type: ignore[assignment]
        total = sum(reqs.values())
        detail = ", ".join(f"{op} {n:g}" for op, n in sorted(reqs.items(), key=lambda kv: -kv[1]))
        out += ["", f"Requests the floor server saw per warm `ls -lR`: {total:g} ({detail})."]
        if total:
            out.append(f"Warm `ls -lR` time per request on the floor: {float(fl['ls']) / total * 1e6:.1f} µs "  # type: ignore[arg-type]
                       "(including `ls`'s own work).")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

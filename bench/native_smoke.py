"""Warm `find` and `ls -lR` over a tree of small files on kernel overlayfs and on unionfs, pure and native.

    sudo python bench/native_smoke.py [--files 10000] [--repeat 5] [--workdir /var/tmp]

unionfs runs from this checkout as ``python -m unionfs mount -f``: pure with ``UNIONFS_NATIVE=off``; native with
the FUSE shell's defaults (connection flags and cached listings, with the shell's invalidation); once more with
the kernel's adaptive readdirplus (``UNIONFS_NATIVE_CONFIG=readdirplus_auto``), once with ``security.selinux``
declared absent (what ``ls -l`` asks of every file; no file here has it), and last with the shim's own reader of
the device, which answers those GETXATTR before they reach pyfuse3's loop. The shim's counters
(``UNIONFS_NATIVE_STATS``) give the number of READDIRPLUS requests each warm pass cost.
With ``--reads MIB``, also fio random reads from disk through the shim's data path (see :func:`reads`).
Prints markdown tables; times are medians of ``--repeat`` warm passes after one cold pass (``ls -lR``: after
one pass of its own).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def build_tree(lower: Path, files: int, per_dir: int = 100) -> int:
    """``files`` empty files in directories of ``per_dir``; returns the number of entries ``find`` prints."""
    dirs = (files + per_dir - 1) // per_dir
    made = 0
    for d in range(dirs):
        sub = lower / f"d{d:04d}"
        sub.mkdir()
        for f in range(min(per_dir, files - made)):
            (sub / f"f{f:04d}").touch()
            made += 1
    return 1 + dirs + made


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path).encode()
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split(b" ")[4] == target for line in f)


def wait_for(pred: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def mounted(kind: str, base: Path, lower: Path, stats: Path | None = None) -> Iterator[Path]:
    upper, work, mnt = base / f"{kind}-u", base / f"{kind}-w", base / f"{kind}-m"
    for p in (upper, work, mnt):
        p.mkdir()
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    proc = None
    if kind == "kernel":
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
    else:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("UNIONFS_NATIVE_CONFIG", None)
        env.pop("UNIONFS_NATIVE", None)
        if kind == "pure":
            env["UNIONFS_NATIVE"] = "off"
        if kind == "native-rdpauto":
            env["UNIONFS_NATIVE_CONFIG"] = "readdirplus_auto"
        if kind == "native-xattr":
            env["UNIONFS_NATIVE_CONFIG"] = "cache_dirs,absent_xattr=security.selinux"
        if kind == "native-reader":
            env["UNIONFS_NATIVE_CONFIG"] = "cache_dirs,absent_xattr=security.selinux,own_reader"
        if stats is not None:
            env["UNIONFS_NATIVE_STATS"] = str(stats)
        proc = subprocess.Popen([PY, "-m", "unionfs", "mount", "-f", "-o", f"{opts},noatime", str(mnt)], env=env,
                                stderr=subprocess.PIPE, text=True)
        wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, f"{kind} mount")
        if proc.poll() is not None:
            raise SystemExit(f"{kind} server exited: {proc.stderr.read() if proc.stderr else ''}")
    try:
        yield mnt
    finally:
        if kind == "kernel":
            subprocess.run(["umount", str(mnt)], check=True)
        else:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
            if proc is not None:
                proc.wait(timeout=30)


def find_once(mnt: Path, entries: int) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(["find", str(mnt)], stdout=subprocess.PIPE, check=True).stdout
    elapsed = time.perf_counter() - t0
    found = out.count(b"\n")
    if found != entries:
        raise SystemExit(f"find printed {found} entries on {mnt}, expected {entries}")
    return elapsed


def ls_once(mnt: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["ls", "-lR", str(mnt)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def read_stats(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            out[name] = int(value)
    return out


def fio_iops(path: Path, seconds: int, direct: bool = True) -> float:
    out = subprocess.run(["fio", "--name=r", f"--filename={path}", "--rw=randread", "--bs=4k",
                          f"--direct={int(direct)}", "--ioengine=psync", f"--runtime={seconds}", "--time_based",
                          "--readonly", "--output-format=json"], capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)["jobs"][0]["read"]["iops"])


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def reads(base: Path, size_mib: int, seconds: int) -> None:
    """fio 4 KiB random reads of one file from disk (caches dropped first): kernel overlayfs (O_DIRECT), and
    tests/native/memfs.py serving the file through pyfuse3 (Python's pread), through the shim's read handler,
    and through the shim's own reader thread (both on the descriptor memfs registers)."""
    base = base / "reads"
    data = base / "data"
    data.mkdir(parents=True)
    big = data / "big"
    with open(big, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    with mounted("kernel", base, data) as mnt:
        drop_caches()
        rows = [("kernel overlayfs", fio_iops(mnt / "big", seconds))]
    memfs = REPO / "tests" / "native" / "memfs.py"
    for name, register, config in (("pyfuse3 (Python pread)", "0", ""), ("shim read handler", "1", ""),
                                   ("shim own reader", "1", "own_reader")):
        mnt = base / f"memfs-{len(rows)}"
        mnt.mkdir()
        env = dict(os.environ, PYTHONPATH=str(REPO), MEMFS_REAL=str(big), MEMFS_NATIVE_READS=register,
                   UNIONFS_NATIVE_CONFIG=config)
        proc = subprocess.Popen([PY, str(memfs), str(mnt)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, "memfs mount")  # noqa: B023
            drop_caches()
            rows.append((name, fio_iops(mnt / "real", seconds)))
        finally:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
            proc.wait(timeout=30)
    print(f"\nfio 4 KiB random reads (O_DIRECT at the mount) of a {size_mib} MiB file from disk, {seconds} s\n")
    print("| served by | IOPS | / kernel |")
    print("| --- | ---: | ---: |")
    for name, iops in rows:
        print(f"| {name} | {iops:.0f} | {iops / rows[0][1]:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--reads", type=int, metavar="MIB", default=0,
                    help="also measure random reads from disk of a file of MIB MiB (needs fio)")
    ap.add_argument("--seconds", type=int, default=3, help="of each fio run")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="native-smoke-", dir=args.workdir))
    try:
        lower = base / "lower"
        lower.mkdir()
        entries = build_tree(lower, args.files)
        rows = []
        for kind in ("kernel", "pure", "native", "native-rdpauto", "native-xattr", "native-reader"):
            stats = base / f"{kind}.stats"
            with mounted(kind, base, lower, stats if kind.startswith("native") else None) as mnt:
                cold = find_once(mnt, entries)
                warm = [find_once(mnt, entries) for _ in range(args.repeat)]
                ls_once(mnt)
                ls_warm = [ls_once(mnt) for _ in range(args.repeat)]
            counted = read_stats(stats)
            rows.append((kind, cold, statistics.median(warm), statistics.median(ls_warm), counted))
        ref, ls_ref = rows[0][2], rows[0][3]
        print(f"warm `find` over {args.files} files ({entries} entries), median of {args.repeat}\n")
        print("| mount | find cold s | find warm s | / kernel | ls -lR warm s | / kernel | READDIRPLUS (all) "
              "| dir opens cached | GETXATTR answered by the shim |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for kind, cold, warm, ls_warm, counted in rows:
            rdp = counted.get("readdirplus", "")
            cached = counted.get("dir_cached", "")
            absent = counted.get("xattr_absent", "")
            print(f"| {kind} | {cold:.3f} | {warm:.4f} | {warm / ref:.1f}x | {ls_warm:.4f} | {ls_warm / ls_ref:.1f}x "
                  f"| {rdp} | {cached} | {absent} |")
        if args.reads:
            reads(base, args.reads, args.seconds)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

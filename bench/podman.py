#!/usr/bin/env python3
"""``podman run --rm IMAGE true`` with unionfs and with fuse-overlayfs as containers/storage's mount program.

Run as root: ``python bench/podman.py [--repeat N] [--modes root,rootless] [--json FILE]``. For each mode (podman
as root, and rootless podman as the user ``unionfs-test``, created with subordinate ids when missing) and each
mount program, a private storage is made under a fresh temporary directory (tests/podman/podman_env.py: the same
configuration as the podman tests) and a busybox image is imported into it. After one untimed run each, the runs
are timed in rounds over every storage in turn, so that drifts of the machine hit all of them alike. The report
(markdown) goes to stdout: the median wall-clock time of the whole ``podman run`` command (container creation,
the mount program's mount and unmount, runc), the fastest and slowest run, and the ratio unionfs /
fuse-overlayfs of the medians (target: within 1.5).

The unionfs command is the one beside this interpreter (the project's venv) or on PATH; when the rootless user
cannot run it (a venv whose interpreter it cannot read), a copy of the project and its packages made by
tests/rootless_stage.py is run by /usr/bin/python3 instead. ``/dev/fuse`` is opened to every user for the
rootless runs and its mode put back at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "podman"))
from podman_env import (  # noqa: E402  (tests/podman is not a package)
    IMAGE,
    MODES,
    MOUNT_PROGRAMS,
    ROOTLESS_PYTHON,
    CommandFailed,
    Engine,
    User,
    ensure_rootless_user,
    make_rootfs_tar,
    missing_tools,
    mounts_under,
    python_minor,
    short_name,
    short_tmp,
    stage_unionfs,
    unionfs_command,
    user_can_run,
    write_containers_conf,
)

TARGET = 1.5  # unionfs / fuse-overlayfs
#: unionfs with spare servers (``-o spare``, given as storage.conf's ``mountopt``): the next mount is served by a
#: server that has loaded pyfuse3 and trio already
SPARE = "unionfs-spare"
PROGRAMS = (*MOUNT_PROGRAMS, SPARE)
FUSE_DEV = "/dev/fuse"


def progress(msg: str) -> None:
    print(f"podman bench: {msg}", file=sys.stderr, flush=True)


class Setup:
    """The storages of the run, under one temporary directory; :meth:`close` removes everything."""

    def __init__(self) -> None:
        self.top = Path(tempfile.mkdtemp(prefix="unionfs-podbench-", dir=short_tmp()))
        self.top.chmod(0o755)
        self.conf = write_containers_conf(self.top / "containers.conf")
        (self.top / "image").mkdir(mode=0o755)
        self.tarball = make_rootfs_tar(self.top / "image")
        self.engines: list[Engine] = []
        self.user: User | None = None
        self.fuse_mode: int | None = None
        self.staged: Path | None = None

    def rootless_user(self) -> User:
        if self.user is None:
            self.user = ensure_rootless_user()
            mode = stat.S_IMODE(os.stat(FUSE_DEV).st_mode)
            if mode & 0o006 != 0o006:
                self.fuse_mode = mode
                os.chmod(FUSE_DEV, 0o666)
        return self.user

    def program(self, mode: str, program: str) -> Path:
        if program == "fuse-overlayfs":
            found = shutil.which("fuse-overlayfs")
            if found is None:
                raise RuntimeError("fuse-overlayfs is not installed")
            return Path(found)
        cmd = unionfs_command()
        if cmd is None:
            raise RuntimeError(f"no unionfs command beside {sys.executable} or on PATH")
        if mode == "root" or user_can_run(self.rootless_user(), cmd):
            return cmd
        if self.staged is None:
            ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
            if python_minor(ROOTLESS_PYTHON) != ours:
                raise RuntimeError(f"the rootless user cannot run {cmd}, and {ROOTLESS_PYTHON} is not Python {ours}")
            self.staged = stage_unionfs(self.top / "stage")
        return self.staged

    def engine(self, mode: str, program: str) -> Engine:
        reason = missing_tools(mode)
        if reason is not None:
            raise RuntimeError(reason)
        user = self.rootless_user() if mode == "rootless" else None
        e = Engine(mode, program, self.program(mode, program), self.top / short_name(mode, program), self.conf,
                   user, mount_options="spare" if program == SPARE else "")
        self.engines.append(e)
        e.setup()
        e.import_image(self.tarball)
        return e

    def close(self) -> None:
        for e in self.engines:
            left = e.destroy()
            if left:
                progress(f"{e.id}: still mounted after the reset, unmounted lazily: {' '.join(left)}")
        if self.fuse_mode is not None:
            os.chmod(FUSE_DEV, self.fuse_mode)
        if not mounts_under(self.top):
            shutil.rmtree(self.top, ignore_errors=True)


def time_run(engine: Engine) -> float:
    t = time.perf_counter()
    engine.podman("run", "--rm", IMAGE, "true")
    return time.perf_counter() - t


def measure(modes: list[str], programs: list[str], repeat: int) -> dict[str, dict[str, list[float] | str]]:
    """mode -> program -> the times of the runs in seconds, or the reason it could not run."""
    results: dict[str, dict[str, list[float] | str]] = {m: {} for m in modes}
    setup = Setup()
    try:
        engines: list[Engine] = []
        for mode in modes:
            for program in programs:
                try:
                    e = setup.engine(mode, program)
                    time_run(e)  # untimed: the first run also prepares the storage
                except (RuntimeError, CommandFailed, OSError, subprocess.SubprocessError) as exc:
                    reason = str(exc).strip().splitlines()
                    results[mode][program] = " ".join(reason[-2:])[-200:] if reason else type(exc).__name__
                    progress(f"{mode} {program}: cannot run: {results[mode][program]}")
                    continue
                results[mode][program] = []
                engines.append(e)
        for i in range(repeat):
            progress(f"round {i + 1}/{repeat}")
            for e in engines:
                times = results[e.mode][e.program]
                if isinstance(times, str):
                    continue
                try:
                    times.append(time_run(e))
                except CommandFailed as exc:
                    results[e.mode][e.program] = " ".join(str(exc).strip().splitlines()[-2:])[-200:]
    finally:
        setup.close()
    return results


def table(results: dict[str, dict[str, list[float] | str]], programs: list[str], repeat: int) -> list[str]:
    head = ["mode", *programs]
    ours = [p for p in programs if p != "fuse-overlayfs"] if "fuse-overlayfs" in programs else []
    head += [f"{p} / fuse-overlayfs" for p in ours]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for mode, by_program in results.items():
        cells = [mode]
        medians: dict[str, float] = {}
        for program in programs:
            got = by_program.get(program, "not run")
            if isinstance(got, str) or not got:
                cells.append(f"n/a ({got or 'no run'})")
                continue
            medians[program] = statistics.median(got)
            cells.append(f"{medians[program] * 1000:.0f} ms ({min(got) * 1000:.0f}–{max(got) * 1000:.0f})")
        for p in ours:
            if "fuse-overlayfs" in medians and p in medians:
                ratio = medians[p] / medians["fuse-overlayfs"]
                cells.append(f"{ratio:.2f} ({'within' if ratio <= TARGET else 'over'} {TARGET})")
            else:
                cells.append("n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def tool_version(argv: list[str]) -> str:
    """The first line of ``argv``'s output that names the tool (fuse-overlayfs prints fusermount3's first)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        named = [line for line in out if os.path.basename(argv[0]) in line]
        return (named or out or ["?"])[0]
    return "?"


def report(results: dict[str, dict[str, list[float] | str]], programs: list[str], repeat: int) -> str:
    lines = [
        "# podman run --rm IMAGE true",
        "",
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, Linux {platform.release()}, "
        f"{os.cpu_count()} CPUs; {tool_version(['podman', '--version'])}, "
        f"{tool_version(['fuse-overlayfs', '--version'])}, runc; median of {repeat} runs "
        "(in parentheses: fastest–slowest), wall clock of the whole command",
        "",
        *table(results, programs, repeat),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5, help="timed runs per mode and mount program (default 5)")
    p.add_argument("--modes", default=",".join(MODES), help="root, rootless or both (default: both)")
    p.add_argument("--programs", default=",".join(PROGRAMS),
                   help="mount programs to compare (default: fuse-overlayfs,unionfs,unionfs-spare)")
    p.add_argument("--json", metavar="FILE", help="also write every run's time (seconds) to FILE")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    programs = [m for m in args.programs.split(",") if m]
    bad = [m for m in modes if m not in MODES] + [m for m in programs if m not in PROGRAMS]
    if bad or args.repeat < 1:
        p.error(f"unknown mode or mount program: {', '.join(bad)}" if bad else "--repeat must be at least 1")
    if os.geteuid() != 0:
        print("bench/podman.py: run me as root (podman as root, and the rootless user's setup)", file=sys.stderr)
        return 2
    results = measure(modes, programs, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    sys.stdout.write(report(results, programs, args.repeat))
    failed = any(isinstance(v, str) for by in results.values() for v in by.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

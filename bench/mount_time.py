#!/usr/bin/env python3
"""How long a mount takes to be ready: unionfs against fuse-overlayfs, from the exec of the mount command.

containers/storage (podman, buildah) runs its mount program once per container and waits for it to exit, the
mount then in place. Measured here, for each command, median of N fresh mounts (new upper and work directories
each time, the same two small lower layers), the commands interleaved:

- **exit**: from the exec of the command to its exit (status 0), the mount then in the mount table;
- **first answer**: from the exec to the answer of the first request (a ``stat`` of a file in the mount, made
  as soon as the command has exited). A FUSE server that is still starting makes that request wait in the
  kernel, so this is when the mount is of use.

The commands: ``unionfs mount -o OPTS MNT``; the containers/storage form ``unionfs -o OPTS MNT`` when this
unionfs has it (probed once; the row says n/a otherwise); ``fuse-overlayfs -o OPTS MNT`` (which daemonizes
once it has mounted). unionfs runs as ``python -m unionfs`` from ``--repo`` (default: this repository) with its
bytecode compiled first, as an installed package has it.

Run as root: ``python bench/mount_time.py [--repeat N] [--user NAME] [--repo DIR] [--json FILE]``. The same
measurements run again as the ordinary user ``--user`` (default ``unionfs-test``; ``--user ''`` skips it),
whose mounts go through fusermount3: the script runs itself as that user (``setpriv``), which needs
/dev/fuse usable by everyone (mode 0666, as a standard system has it). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import datetime
import json
import os
import platform
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import cleanup_mounts_under, cpu_model, is_mounted, short_reason, tool_version  # noqa: E402  (no package)

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("unionfs mount", "unionfs -o", "fuse-overlayfs")
DEADLINE = 30.0  # seconds a command, an unmount or a server's exit may take
PROBE = "probe.txt"


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def unionfs_env(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    return env


def argv_of(command: str, opts: str, mnt: Path) -> list[str]:
    if command == "unionfs mount":
        return [sys.executable, "-m", "unionfs", "mount", "-o", opts, str(mnt)]
    if command == "unionfs -o":
        return [sys.executable, "-m", "unionfs", "-o", opts, str(mnt)]
    return ["fuse-overlayfs", "-o", opts, str(mnt)]


def fuse_overlayfs_pid(mnt: Path) -> int | None:
    """The pid of the fuse-overlayfs serving ``mnt`` (it daemonizes: found by its command line)."""
    want = os.fsencode(str(mnt))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            if args and args[0].endswith(b"fuse-overlayfs") and want in args:
                return int(entry)
    return None


def wait_exit(pid: int | None) -> None:
    if pid is None:
        return
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        import select

        select.select([fd], [], [], DEADLINE)
    finally:
        os.close(fd)


def unmount(command: str, mnt: Path, repo: Path) -> None:
    """Unmount ``mnt`` and wait for its server to exit (so that it does not run into the next measurement)."""
    if command.startswith("unionfs"):
        subprocess.run([sys.executable, "-m", "unionfs", "umount", str(mnt)], env=unionfs_env(repo), cwd=repo,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=DEADLINE)
    else:
        pid = fuse_overlayfs_pid(mnt)
        subprocess.run(["fusermount3", "-u", str(mnt)], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=DEADLINE)
        wait_exit(pid)
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], stdin=subprocess.DEVNULL, capture_output=True)


def make_layers(root: Path) -> list[Path]:
    lowers = [root / "lower1", root / "lower2"]
    for i, d in enumerate(lowers):
        d.mkdir()
        (d / f"file{i}").write_text(f"layer {i}\n")
    (lowers[1] / PROBE).write_text("probe\n")
    return lowers


def measure_once(command: str, root: Path, lowers: list[Path], run: int, repo: Path) -> tuple[float, float]:
    """(exit, first answer) in seconds for one fresh mount; RuntimeError when the mount fails."""
    base = root / f"{command.replace(' ', '_')}-{run}"
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    env = unionfs_env(repo) if command.startswith("unionfs") else None
    argv = argv_of(command, opts, mnt)
    try:
        start = time.perf_counter()
        # (run from the repository: ``python -m`` looks in the working directory first)
        proc = subprocess.run(argv, env=env, cwd=repo, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=DEADLINE)
        exited = time.perf_counter()
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise RuntimeError(short_reason(f"exit status {proc.returncode}: {err[-1] if err else ''}"))
        if not is_mounted(mnt):
            raise RuntimeError("the command exited before the mount was in the mount table")
        os.stat(mnt / PROBE)
        answered = time.perf_counter()
        return exited - start, answered - start
    finally:
        if is_mounted(mnt):
            unmount(command, mnt, repo)


def available(command: str, root: Path, lowers: list[Path], repo: Path) -> str | None:
    """Why ``command`` cannot be measured (one mount tried), or None."""
    if command == "fuse-overlayfs" and shutil.which("fuse-overlayfs") is None:
        return "fuse-overlayfs not installed"
    try:
        measure_once(command, root, lowers, 0, repo)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None


def measure(root: Path, repeat: int, repo: Path) -> dict[str, Any]:
    """Every command's runs (or why it was not run), as this user, under ``root``."""
    lowers = make_layers(root)
    results: dict[str, Any] = {}
    usable = []
    for command in COMMANDS:
        why = available(command, root, lowers, repo)
        results[command] = {"exit": [], "answer": [], "error": why}
        if why is None:
            usable.append(command)
        else:
            progress(f"{command}: n/a ({why})")
    for run in range(1, repeat + 1):
        for command in usable:
            try:
                exit_s, answer_s = measure_once(command, root, lowers, run, repo)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                results[command]["error"] = str(exc)
                continue
            results[command]["exit"].append(exit_s)
            results[command]["answer"].append(answer_s)
        if run % 5 == 0 or run == repeat:
            progress(f"  {os.getuid() and 'uid ' + str(os.getuid()) or 'root'}: {run}/{repeat} rounds")
    return results


def measure_as(user: str, root: Path, repeat: int, repo: Path) -> dict[str, Any] | str:
    """:func:`measure` run by ``user`` (this script again, under setpriv); a reason string when it cannot."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return f"no user {user}"
    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        return "/dev/fuse is not usable by every user (chmod 0666 /dev/fuse)"
    home = root / "user"
    home.mkdir()
    os.chown(home, pw.pw_uid, pw.pw_gid)
    argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
            sys.executable, str(Path(__file__).resolve()), "--measure", str(home), "--repeat", str(repeat),
            "--repo", str(repo)]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                          timeout=DEADLINE * 4 * (repeat + 1))
    if proc.returncode != 0:
        return f"the run as {user} failed with status {proc.returncode}"
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f}" if values else "n/a"


def table(runs: dict[str, dict[str, Any] | str]) -> list[str]:
    header = ["who", "command", "exit [ms]", "first answer [ms]", "exit / fuse-overlayfs", "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for who, result in runs.items():
        if isinstance(result, str):
            lines.append(f"| {who} | all | n/a ({result}) | | | |")
            continue
        peer = result.get("fuse-overlayfs", {}).get("exit") or []
        for command in COMMANDS:
            r = result[command]
            if not r["exit"]:
                lines.append(f"| {who} | `{command}` | n/a ({r['error'] or 'not run'}) | | | 0 |")
                continue
            ratio = f"{statistics.median(r['exit']) / statistics.median(peer):.2f}" if peer else "n/a"
            lines.append(f"| {who} | `{command}` | {ms(r['exit'])} | {ms(r['answer'])} | {ratio} | "
                         f"{len(r['exit'])} |")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time from the exec of the mount command to a ready mount: unionfs "
                                            "against fuse-overlayfs, as root and as an ordinary user.")
    p.add_argument("--repeat", type=int, default=20, help="mounts per command and user (default 20); medians")
    p.add_argument("--user", default="unionfs-test",
                   help="the ordinary user to measure as too (default unionfs-test; '' for root only)")
    p.add_argument("--repo", type=Path, default=REPO,
                   help="the unionfs source tree to run (default: this repository), e.g. another checkout "
                        "to compare with")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="a fresh directory for the layers is made under this one (default /var/tmp)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every run's figures to FILE")
    p.add_argument("--measure", type=Path, metavar="DIR", help=argparse.SUPPRESS)  # (the run as the user)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.repo = args.repo.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure is not None:  # this script run again as the ordinary user: figures as JSON on stdout
        json.dump(measure(args.measure, args.repeat, args.repo), sys.stdout)
        return 0
    if os.geteuid() != 0:
        print("bench/mount_time.py must run as root (it measures as root, then as --user)", file=sys.stderr)
        return 2
    # As an installed package starts: from compiled bytecode (PYTHONDONTWRITEBYTECODE leaves none).
    compileall.compile_dir(str(args.repo / "unionfs"), quiet=1)
    root = Path(tempfile.mkdtemp(prefix="unionfs-mount-time-", dir=args.workdir))
    root.chmod(0o755)
    runs: dict[str, dict[str, Any] | str] = {}
    try:
        progress(f"as root, {args.repeat} rounds")
        as_root = root / "root"
        as_root.mkdir()
        runs["root"] = measure(as_root, args.repeat, args.repo)
        if args.user:
            progress(f"as {args.user}, {args.repeat} rounds")
            runs[args.user] = measure_as(args.user, root, args.repeat, args.repo)
    finally:
        left = cleanup_mounts_under(root)
        if left:
            progress(f"still mounted at the end (unmounted lazily): {', '.join(left)}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "kernel": platform.release(), "cpu": cpu_model(), "cores": str(os.cpu_count()),
            "python": platform.python_version(), "repo": str(args.repo),
            "fuse-overlayfs": tool_version(["fuse-overlayfs", "--version"], "fuse-overlayfs:")}
    print(f"# Mount time, {info['date']}\n")
    print(f"- Linux {info['kernel']}; {info['cpu']}, {info['cores']} cores; Python {info['python']}; "
          f"fuse-overlayfs {info['fuse-overlayfs']}; unionfs from {info['repo']}")
    print(f"- median of {args.repeat} fresh mounts per row; exit: exec to the command's exit (mounted); "
          "first answer: exec to the answer of a stat in the mount\n")
    print("\n".join(table(runs)))
    if args.json:
        args.json.write_text(json.dumps({"info": info, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

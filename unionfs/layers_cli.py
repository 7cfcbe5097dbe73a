"""The ``unionfs layers`` command: what each layer of a stack adds, modifies and removes, the space it wastes
and dive's efficiency score (see :mod:`unionfs.analysis`), with dive's CI mode.

The stack is an image of a store, a snapshot, layer directories or a live unionfs mount
(:mod:`unionfs.targets`). Results go to stdout: a table (drawn by rich on a terminal, plain columns
otherwise) or JSON with --json. Nothing here imports pyfuse3 or trio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__, targets
from .analysis import (
    DEFAULT_HIGHEST_WASTED_PERCENT,
    DEFAULT_LOWEST_EFFICIENCY,
    Analysis,
    Figure,
    RuleResult,
    analyze,
    evaluate,
    parse_bytes,
)
from .cli_errors import EXIT_FAILED, run_command
from .image._feedback import human_bytes

PROG = "unionfs layers"
#: the exit status of a target that names nothing (as a snapshot or image that is not found)
EXIT_NOT_FOUND = 3

_DESCRIPTION = f"""\
What each layer of a stack adds, modifies and removes, and the space the stack wastes, as dive shows it
(without an image engine):

  {PROG} busybox                      an image of the store (--root DIR)
  {PROG} --snapshot KEY               a snapshot and its parents (an active one's layer on top)
  {PROG} --layers L1:L2 [--upper U]   layer directories, top-most first (as lowerdir=)
  {PROG} /mnt/b                       a live unionfs mount, its writable layer included
                                              (what copy-ups duplicated shows as "unchanged")

Per layer: its size, and the entries added (new in the merged view), modified (a new copy of a path the
layers beneath show) and removed (by a whiteout, an opaque directory, or a directory replaced by a file),
with their bytes. Then, as dive computes them: the wasted bytes (the cumulative size of every path stored
more than once, counting removals), their share of the layers above the lowest, the efficiency score (the
sum of each path's smallest copy over the sum of all its copies), and the files wasting most; besides, the
bytes squashing would reclaim and identical content stored in several layers.

--ci checks dive's rules (a threshold of "disabled" turns one off): --lowest-efficiency (default
{DEFAULT_LOWEST_EFFICIENCY}), --highest-wasted-bytes (default disabled; 20MB, 1.5GiB, ...),
--highest-wasted-percent (default {DEFAULT_HIGHEST_WASTED_PERCENT}; a fraction: 0.1 is 10 %).

exit status: 0 success (with --ci: every rule passed), 1 a --ci rule failed, or another failure,
             2 bad usage, 3 the image, snapshot or directory is not found, 130 interrupted
"""


def _share(text: str, most: float = math.inf) -> float | None:
    if text == "disabled":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is no number (or 'disabled')") from None
    if not 0.0 <= value <= most:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and {most:g}")
    return value


def _fraction(text: str) -> float | None:
    return _share(text, 1.0)


def _bytes(text: str) -> int | None:
    if text == "disabled":
        return None
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    """The target of ``unionfs layers`` and ``unionfs explore``: REF|MOUNTPOINT, or --image, --snapshot,
    --layers [--upper], and --root (resolved by :func:`target_of`)."""
    p.add_argument("target", nargs="?", metavar="REF|MOUNTPOINT", help="an image of the store, or a unionfs mount")
    p.add_argument("--image", metavar="REF", help="an image of the store")
    p.add_argument("--snapshot", metavar="KEY", help="a snapshot of the store")
    p.add_argument("--layers", metavar="L1:L2:...", help="layer directories, top-most first")
    p.add_argument("--upper", metavar="DIR", help="with --layers: the writable layer on top of them")
    p.add_argument("--root", metavar="DIR", help="the store (default: $UNIONFS_ROOT, else $XDG_DATA_HOME/unionfs)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    add_target_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--top", type=int, default=20, metavar="N",
                   help="the N files wasting most, and contents duplicated most (default 20; 0: all)")
    p.add_argument("--ci", action="store_true", help="check the thresholds below; exit 1 when one is exceeded")
    p.add_argument("--lowest-efficiency", type=_fraction, default=DEFAULT_LOWEST_EFFICIENCY, metavar="F",
                   help=f"with --ci: the lowest efficiency allowed, 0..1 (default {DEFAULT_LOWEST_EFFICIENCY})")
    p.add_argument("--highest-wasted-bytes", type=_bytes, default=None, metavar="N",
                   help="with --ci: the most wasted bytes allowed, e.g. 20MB (default disabled)")
    p.add_argument("--highest-wasted-percent", type=_share, default=DEFAULT_HIGHEST_WASTED_PERCENT,
                   metavar="F", help="with --ci: the largest share of the layers above the lowest that may be "
                   "wasted, 0..1 (or more: wasted bytes may exceed those layers' size; default "
                   f"{DEFAULT_HIGHEST_WASTED_PERCENT})")
    return p


def target_of(args: argparse.Namespace, p: argparse.ArgumentParser) -> targets.Target:
    given = [name for name, value in (("REF|MOUNTPOINT", args.target), ("--image", args.image),
                                      ("--snapshot", args.snapshot), ("--layers", args.layers)) if value]
    if len(given) != 1:
        p.error("name one stack: REF|MOUNTPOINT, --image REF, --snapshot KEY or --layers L1:L2"
                if not given else f"name one stack, not {' and '.join(given)}")
    if args.upper is not None and not args.layers:
        p.error("--upper goes with --layers")
    if args.layers:
        return targets.from_layers(args.layers, args.upper)
    if args.snapshot:
        return targets.from_snapshot(args.snapshot, args.root)
    if args.image:
        return targets.from_image(args.image, args.root)
    ref: str = args.target
    if os.path.isdir(ref):
        mounted = targets.from_mount(ref)
        if mounted is not None:
            return mounted
        from .snapshots import NotFound

        try:
            return targets.from_image(ref, args.root)
        except NotFound:
            raise targets.TargetError(f"{ref}: no unionfs mount (no {targets.STACK_XATTR.decode()}) and no image "
                                      "of the store; for layer directories use --layers") from None
    from .snapshots import NotFound as Missing

    try:
        return targets.from_image(ref, args.root)
    except Missing:
        try:
            return targets.from_snapshot(ref, args.root)  # (KEY, as the command line names it too)
        except Missing:
            raise targets.TargetError(f"{ref}: no image and no snapshot of that name in the store") from None


# -- output ------------------------------------------------------------------------------------------------------


def _cell(fig: Figure) -> str:
    return f"{fig.count} ({human_bytes(fig.bytes)})" if fig.count else "-"


def _percent(value: float) -> str:
    return f"{100 * value:.2f} %" if math.isfinite(value) else "infinite"


def _path(path: bytes) -> str:
    return "/" + path.decode("utf-8", "backslashreplace")


def _rows(analysis: Analysis, target: targets.Target, top: int | None) -> dict[str, Any]:
    layers = [["#", "layer", "size", "added", "modified", "removed", "unchanged"]]
    for f in analysis.layers:
        layers.append([str(f.index), f.label + (" (writable)" if f.writable else ""), human_bytes(f.size),
                       _cell(f.added), _cell(f.modified), _cell(f.removed), _cell(f.unchanged)])
    a = analysis
    summary = [
        f"total size: {human_bytes(a.total_size)} ({a.total_size} B) in {len(a.layers)} layers; "
        f"the final view {human_bytes(a.final_size)}",
        f"wasted: {human_bytes(a.wasted_bytes)} ({a.wasted_bytes} B), {_percent(a.wasted_percent)} of the "
        f"{len(a.layers) - 1} layers above the lowest ({human_bytes(a.user_size)})",
        f"efficiency: {_percent(a.efficiency)}",
        f"reclaimable by squashing: {human_bytes(a.reclaimable_bytes)} ({a.reclaimable_bytes} B)",
        f"duplicated: {a.duplicated.count} copies of {len(a.duplicates)} files stored in several layers, "
        f"{human_bytes(a.duplicated.bytes)} ({a.duplicated.bytes} B)",
    ]
    wasted = [["copies", "wasted", "reclaimable", "path"]]
    for w in a.wasted_files[:top]:
        wasted.append([str(w.copies), human_bytes(w.wasted_bytes), human_bytes(w.reclaimable_bytes),
                       _path(w.path) + (" (removed)" if w.removed else "")])
    return {"title": f"{target.kind} {target.name}", "layers": layers, "summary": summary, "wasted": wasted}


def _plain_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _print_human(out: dict[str, Any], ci: list[RuleResult] | None, tty: bool) -> None:
    if tty:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        console = Console()

        def table(rows: list[list[str]], title: str, right: set[int], wraps: int) -> None:
            t = Table(title=Text(title), title_justify="left")
            for i, name in enumerate(rows[0]):
                t.add_column(name, justify="right" if i in right else "left", no_wrap=i != wraps,
                             overflow="fold")
            for r in rows[1:]:
                t.add_row(*(Text(c) for c in r))  # (names are no markup)
            console.print(t)

        table(out["layers"], out["title"], {0, 2}, 1)
        for line in out["summary"]:
            console.print(line, highlight=False, markup=False)
        if len(out["wasted"]) > 1:
            table(out["wasted"], "files wasting most", {0, 1, 2}, 3)
    else:
        print(out["title"])
        _plain_table(out["layers"])
        print()
        for line in out["summary"]:
            print(line)
        if len(out["wasted"]) > 1:
            print()
            print("files wasting most:")
            _plain_table(out["wasted"])
    if ci is not None:
        print()
        for rule in ci:
            print(_rule_line(rule))
        failed = sum(1 for r in ci if r.status == "FAIL")
        checked = sum(1 for r in ci if r.status != "SKIP")
        print(f"CI: {'FAIL' if failed else 'PASS'} ({failed} of {checked} rules failed)")


def _rule_line(rule: RuleResult) -> str:
    if rule.threshold is None:
        return f"SKIP {rule.name}: disabled"
    if rule.name == "highest-wasted-bytes":
        shown = f"wasted {int(rule.value)} B, allowed {int(rule.threshold)} B"
    elif rule.name == "lowest-efficiency":
        shown = f"efficiency {rule.value:.4f}, at least {rule.threshold}"
    else:
        value = f"{rule.value:.4f}" if math.isfinite(rule.value) else "infinite"
        shown = f"wasted share {value}, at most {rule.threshold}"
    return f"{rule.status} {rule.name}: {shown}"


def _run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    try:
        target = target_of(args, p)
    except targets.TargetError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    analysis = analyze(target)
    top = args.top if args.top > 0 else None
    ci = evaluate(analysis, args.lowest_efficiency, args.highest_wasted_bytes,
                  args.highest_wasted_percent) if args.ci else None
    if args.json:
        data: dict[str, Any] = {"target": target.to_json(), **analysis.to_json(top)}
        if ci is not None:
            data["ci"] = {"passed": all(r.status != "FAIL" for r in ci), "rules": [r.to_json() for r in ci]}
        print(json.dumps(data, indent=2))
    else:
        try:
            tty = sys.stdout.isatty()
        except (AttributeError, ValueError):
            tty = False
        _print_human(_rows(analysis, target, top), ci, tty)
    sys.stdout.flush()
    if ci is not None and any(r.status == "FAIL" for r in ci):
        return EXIT_FAILED
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``unionfs layers ARGV...``; returns the exit status."""
    p = parser()
    args = p.parse_args(sys.argv[2:] if argv is None else list(argv))
    if args.top < 0:
        p.error("--top takes 0 (all) or more")
    return run_command(PROG, lambda: _run(args, p))


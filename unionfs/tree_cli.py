"""The ``unionfs tree`` command: the merged tree of a stack, every entry annotated with the layer it comes from
(one colour per layer on a terminal), and with ``--all`` what the merged view hides and why
(:mod:`unionfs.treeview`, whose reasons are :mod:`unionfs.explain`'s).

The stack is a unionfs mount, layer directories, a snapshot or an image (:mod:`unionfs.targets`); its layer
directories are read here, nothing is written to them. Nothing here imports pyfuse3 or trio; rich draws the
colours and the SVG.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import explain, targets, treeview
from .cli_errors import EXIT_FAILED, EXIT_USAGE, run_command
from .layers import Stack, join

if TYPE_CHECKING:
    from rich.text import Text

PROG = "unionfs tree"
#: the exit status of a target that names no stack
EXIT_NOT_FOUND = 3

_DESCRIPTION = f"""\
Show the merged tree of a union, every entry with the layer it comes from (#0 is the top layer; on a
terminal each layer has a colour of its own, and a legend of the layers with their labels and directories
comes first; piped, the same text without colours), its size, symlink target, and for a directory the
layers it is merged from and whether it is opaque.

  {PROG} /mnt/c                                   a unionfs mount (or a path inside one)
  {PROG} /mnt/c etc                               a directory of it, given inside the mount
  {PROG} --layers l1:l2 --upper up [PATH]         plain layer directories (lowers top first, as lowerdir=)
  {PROG} --snapshot KEY [PATH]                    a snapshot of the store (--root DIR)
  {PROG} --image busybox [PATH]                   an imported image: each layer named by its blob digest
  {PROG} --all ...                                also what the merged view hides, and why
  {PROG} --depth 1 --svg tree.svg ...             one level only; also write the picture as an SVG file

With --all, names some layer holds that the merged view does not show are listed struck through, with the
reason (whited out by layer K, below the opaque directory D of layer K, D is not a directory in layer K), and
under each entry (after a dotted guide) the lower copies it shadows, each with the reason it does not show.
--svg FILE writes the same picture (colours included) as an SVG file, whatever stdout is; --json prints the
tree as JSON instead of text.

exit status: 0 shown, 1 failure (PATH not in the merged view, an I/O error), 2 bad usage, 3 no stack found
             (no unionfs mount, a --layers directory missing, no such snapshot, image or store), 130 interrupted
"""

#: the colour of each layer, by index (repeating past the last)
PALETTE = ("green", "cyan", "magenta", "yellow", "blue", "red", "bright_green", "bright_cyan", "bright_magenta",
           "bright_yellow", "bright_blue", "bright_red")


def _depth(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is no number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    targets.add_arguments(p)
    p.add_argument("-a", "--all", action="store_true",
                   help="also show what is hidden: whited out, below an opaque directory, shadowed")
    p.add_argument("--depth", type=_depth, metavar="N", help="show N levels below PATH (default: all)")
    p.add_argument("--svg", metavar="FILE", help="also write the picture to FILE as SVG")
    p.add_argument("--json", action="store_true", help="print the tree as JSON")
    p.add_argument("where", nargs="*", metavar="MOUNTPOINT|PATH",
                   help="a unionfs mount (or a directory in it), then optionally a PATH inside it; with --layers, "
                        "--snapshot or --image: PATH inside the stack (default: its root)")
    return p


class _Refused(Exception):
    """A command line naming nothing usable: one line, and the status to exit with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _normalized(path: str) -> bytes:
    try:
        return explain.normalize(os.fsencode(path))
    except ValueError as exc:
        raise _Refused(str(exc), EXIT_USAGE) from None


def _target(args: argparse.Namespace) -> tuple[targets.Target, bytes]:
    """The stack named and the merged path to show."""
    if args.upper is not None and args.layers is None:
        raise _Refused("--upper goes with --layers", EXIT_USAGE)
    if args.root is not None and args.snapshot is None and args.image is None:
        raise _Refused("--root goes with --snapshot or --image", EXIT_USAGE)
    where: list[str] = args.where
    named = args.layers is not None or args.snapshot is not None or args.image is not None
    if named:
        if len(where) > 1:
            raise _Refused(f"one PATH inside the stack, not {' '.join(where)}", EXIT_USAGE)
        path = _normalized(where[0]) if where else explain.normalize(b".")
        if args.layers is not None:
            return targets.from_layers(args.layers, args.upper, userxattr=args.userxattr), path
        if args.snapshot is not None:
            return targets.from_snapshot(args.snapshot, args.root), path
        return targets.from_image(args.image, args.root), path
    if not where:
        raise _Refused("name a stack: MOUNTPOINT, --layers L1:L2, --snapshot KEY or --image REF", EXIT_USAGE)
    if len(where) > 2:
        raise _Refused(f"a MOUNTPOINT and one PATH inside it, not {' '.join(where)}", EXIT_USAGE)
    from .inspect_cli import _unionfs_mount_of

    if not os.path.lexists(where[0]):
        raise OSError(errno.ENOENT, "No such file or directory", where[0])
    found = _unionfs_mount_of(where[0])
    if found is None:
        raise targets.TargetError(f"{where[0]}: not inside a unionfs mount (name layer directories with --layers, a "
                                  "snapshot with --snapshot, an image with --image)")
    point, merged = found
    target = targets.from_mount(point)
    if target is None:
        raise targets.TargetError(f"{point}: its mount serves no {targets.STACK_XATTR.decode()}")
    if len(where) == 2:
        inner = _normalized(where[1])
        merged = inner if merged == b"." else (merged if inner == b"." else join(merged, inner))
    return target, merged


def build_tree(target: targets.Target, path: bytes, *, show_all: bool = False, depth: int | None = None,
               aufs: bool = False) -> treeview.Tree:
    """The tree of ``path`` in the stack of ``target``, read from its layer directories."""
    stack = Stack(target.dirs, target.writable, target.xattr, aufs=aufs)
    try:
        return treeview.build(stack, path, show_all=show_all, depth=depth, labels=[la.label for la in target.layers])
    finally:
        stack.close()


# -- output -------------------------------------------------------------------------------------------------


def _styles(kind: str, layer: int | None) -> str:
    colour = PALETTE[layer % len(PALETTE)] if layer is not None else ""
    if kind == treeview.HIDDEN:
        return f"dim strike {colour}".strip()
    if kind == treeview.REASON:
        return "dim italic"
    if kind == treeview.GUIDE:
        return "dim"
    if kind == treeview.NAME:
        return f"bold {colour}".strip()
    if kind == treeview.LAYER:
        return colour
    return ""


def _texts(tree: treeview.Tree) -> list[Text]:
    from rich.text import Text

    out: list[Text] = []
    for line in treeview.lines(tree):
        text = Text(no_wrap=True, overflow="ignore")
        for piece, kind, layer in line:
            text.append(piece, style=_styles(kind, layer))  # (a Text: a name is never read as markup)
        out.append(text)
    return out


def write_svg(tree: treeview.Tree, file: str) -> None:
    """Write the picture of ``tree`` (colours included) to ``file`` as SVG."""
    from rich.console import Console

    texts = _texts(tree)
    width = max([40, *(t.cell_len for t in texts)])
    console = Console(record=True, file=io.StringIO(), width=min(width + 1, 1000), force_terminal=True,
                      color_system="truecolor", highlight=False, soft_wrap=True)
    for t in texts:
        console.print(t)
    console.save_svg(file, title=PROG)


def _print(tree: treeview.Tree) -> None:
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty:
        sys.stdout.write(treeview.plain(tree))
        return
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    for t in _texts(tree):
        console.print(t)


def _run(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        try:
            target, path = _target(args)
        except targets.TargetError as exc:
            raise _Refused(str(exc), EXIT_NOT_FOUND) from None
        try:
            tree = build_tree(target, path, show_all=args.all, depth=args.depth, aufs=args.aufs_markers)
        except treeview.NotInView as exc:
            raise _Refused(str(exc), EXIT_FAILED) from None
    except _Refused as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.status
    if args.svg is not None:
        write_svg(tree, args.svg)
    if args.json:
        print(json.dumps(tree.to_json(), indent=2, sort_keys=True))
    else:
        _print(tree)
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``unionfs tree ARGV...``; returns the exit status."""
    return run_command(PROG, lambda: _run(list(sys.argv[1:] if argv is None else argv)))

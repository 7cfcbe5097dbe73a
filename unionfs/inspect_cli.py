"""The ``unionfs inspect`` command: where an entry of a union comes from, what it shadows, what hides the
lower copies, and what the next write would do (:mod:`unionfs.explain`).

On a unionfs mount the server answers (the virtual xattr ``user.unionfs.explain`` of the entry); on layer
directories, a snapshot or an image, the layers are read here. Nothing here imports pyfuse3 or trio.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import explain, mountinfo, targets
from .cli_errors import EXIT_USAGE, run_command
from .layers import Stack

PROG = "unionfs inspect"

_DESCRIPTION = f"""\
Show where an entry of a union comes from and why: the layer it is taken from (its directory, its place in the
stack, the snapshot or image layer it belongs to), every layer that also holds the name and is shadowed (type,
size, and what hides it: a layer above, a whiteout, an opaque directory), whether it has been copied up, and
what the next write would do (a copy-up of N bytes from layer K, EXDEV for renaming a merged directory,
nothing for an upper file).

  {PROG} /mnt/c/etc/os-release                    a path inside a unionfs mount (the server answers)
  {PROG} --layers l1:l2 --upper up etc/passwd    plain layer directories (lowers top first, as lowerdir=)
  {PROG} --snapshot KEY etc/passwd               a snapshot of the store (--root DIR)
  {PROG} --image busybox bin/sh                  an imported image: each layer named by its blob digest
  {PROG} --json ...                              the same facts as JSON, for tools

Layers are numbered from the top: #0 is the upper layer of a writable stack. With --layers, --snapshot or
--image, PATH is a path inside the stack ('/' or '.' is its root). On a mount, the same facts are served to any
process through read-only virtual xattrs: user.unionfs.layer (the directory of the entry's layer),
user.unionfs.explain (the JSON of --json) and user.unionfs.stack (the mount's layers); the kernel serves user.*
xattrs of regular files and directories only, to readers with read permission, so for other entries this
command reads the layers named by the mount (user.unionfs.stack of the parent directory) itself.

exit status: 0 explained (whether the entry exists or not: see "found" in the JSON), 1 failure (an I/O
             error: PATH missing, a layer unreadable), 2 bad usage, 3 no stack found (PATH in no unionfs mount,
             a --layers directory missing, no such snapshot, image or store), 130 interrupted
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    targets.add_arguments(p)
    p.add_argument("--json", action="store_true", help="print the explanation as JSON")
    p.add_argument("path", metavar="PATH", help="a path inside a unionfs mount, or inside the stack named")
    return p


class _Refused(Exception):
    """A command line naming nothing usable: one line, and the status to exit with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _target(args: argparse.Namespace) -> targets.Target | None:
    if args.upper is not None and args.layers is None:
        raise _Refused("--upper goes with --layers", EXIT_USAGE)
    if args.root is not None and args.snapshot is None and args.image is None:
        raise _Refused("--root goes with --snapshot or --image", EXIT_USAGE)
    if args.layers is not None:
        return targets.from_layers(args.layers, args.upper, userxattr=args.userxattr)
    if args.snapshot is not None:
        return targets.from_snapshot(args.snapshot, args.root)
    if args.image is not None:
        return targets.from_image(args.image, args.root)
    return None


def explain_target(target: targets.Target, path: bytes, *, aufs: bool = False) -> dict[str, Any]:
    """The explanation (JSON) of ``path`` in the stack of ``target``, read from its layer directories (nothing
    is written there)."""
    merged = explain.normalize(path)
    stack = Stack(target.dirs, target.writable, target.xattr, aufs=aufs)
    try:
        return explain.explain(stack, merged, labels=[la.label for la in target.layers],
                               digests=[la.digest for la in target.layers]).to_json()
    finally:
        stack.close()


def _unionfs_mount_of(path: str) -> tuple[str, bytes] | None:
    """(mount point, merged path) of ``path`` (an existing name, not followed) in a unionfs mount, or None."""
    parent, name = os.path.split(os.path.abspath(path))
    real = os.path.join(os.path.realpath(parent), name) if name else os.path.realpath(parent)
    st = os.stat(real, follow_symlinks=False)
    for entry in reversed(mountinfo.read()):
        if entry.fstype != b"fuse.unionfs" or os.makedev(entry.major, entry.minor) != st.st_dev:
            continue
        point = os.fsdecode(entry.mount_point)
        rel = os.path.relpath(real, point)
        if rel == ".." or rel.startswith("../"):
            continue
        root = entry.root.strip(b"/")
        inner = os.fsencode(rel)
        merged = inner if not root else (root if inner == b"." else root + b"/" + inner)
        return point, explain.normalize(merged)
    return None


def explain_mounted(path: str) -> dict[str, Any]:
    """The explanation (JSON) of ``path`` inside a unionfs mount: what its server serves in
    ``user.unionfs.explain``, or, where the kernel serves no user.* xattr (symlinks, devices, entries this
    user may not read), computed here from the layers the mount names."""
    try:
        value = os.getxattr(path, explain.EXPLAIN_XATTR, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES, errno.EPERM,
                             errno.E2BIG, errno.ERANGE):  # (E2BIG: an explanation over the 64 KiB of an xattr)
            raise
    else:
        try:
            data: dict[str, Any] = json.loads(value)
        except ValueError:
            raise targets.TargetError(f"{path}: {explain.EXPLAIN_XATTR.decode()} is malformed") from None
        paths = [la["path"] for la in data.get("layers", []) if isinstance(la, dict) and "path" in la]
        relabelled: dict[str, Any] = targets.relabel(data, targets.store_labels(paths))
        return relabelled
    found = _unionfs_mount_of(path)
    if found is None:
        raise targets.TargetError(f"{path}: not inside a unionfs mount (name layer directories with --layers, a "
                                  "snapshot with --snapshot, an image with --image)")
    point, merged = found
    target = targets.from_mount(point)
    if target is None:
        raise targets.TargetError(f"{path}: its mount serves no {targets.STACK_XATTR.decode()}")
    return explain_target(target, merged)


def _explain_absent(path: str) -> dict[str, Any]:
    """The explanation of a name the mount does not show (whited out, below an opaque directory, in no
    layer): from the layers of the mount its nearest existing ancestor lies in."""
    ancestor, rest = os.path.abspath(path), list[str]()
    while not os.path.lexists(ancestor):
        ancestor, name = os.path.split(ancestor)
        rest.insert(0, name)
    found = _unionfs_mount_of(ancestor)
    if found is None:
        raise OSError(errno.ENOENT, "No such file or directory", path)
    point, merged = found
    target = targets.from_mount(point)
    if target is None:
        raise targets.TargetError(f"{path}: its mount serves no {targets.STACK_XATTR.decode()}")
    inner = b"/".join(os.fsencode(n) for n in rest)
    return explain_target(target, explain.normalize(inner if merged == b"." else merged + b"/" + inner))


def _safe(line: str) -> str:
    """A line for a terminal: names that are not UTF-8 or hold control characters shown escaped."""
    from .treeview import escape

    return escape(line.encode("utf-8", "surrogateescape"))


def _print(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    lines = [_safe(line) for line in explain.lines_of(data)]
    if not sys.stdout.isatty():
        print("\n".join(lines))
        return
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=True)
    head, *rest = lines
    console.print(Text(head, style="bold"))
    for line in rest:  # "  KEY       VALUE": the key in its column of ten
        text = Text("  ")
        text.append(line[2:12], style="cyan")
        text.append(line[12:])
        console.print(text)


def _run(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        target = _target(args)
        if target is None:
            data = explain_mounted(args.path) if os.path.lexists(args.path) else _explain_absent(args.path)
        else:
            try:
                merged = explain.normalize(os.fsencode(args.path))
            except ValueError as exc:
                raise _Refused(str(exc), EXIT_USAGE) from None
            data = explain_target(target, merged, aufs=args.aufs_markers)
    except _Refused as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.status
    _print(data, args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``unionfs inspect ARGV...``; returns the exit status."""
    return run_command(PROG, lambda: _run(list(sys.argv[1:] if argv is None else argv)))

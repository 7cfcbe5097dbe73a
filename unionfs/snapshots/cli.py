"""The ``unionfs snapshot`` command: containerd's ``ctr snapshots`` verbs on a local store, plus ``mount``,
``tree``, ``cleanup`` and ``fsck``.

Errors end the command with one line on stderr and an exit status telling the kind of error (the snapshot
errors carry theirs; :mod:`unionfs.cli_errors` tells the others). Nothing here imports pyfuse3 or trio until
``mount`` hands the snapshot's MountSpec to :func:`unionfs.fuse.server.mount`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..cli_errors import EXIT_USAGE, run_command
from ..options import option_string
from ._errors import InvalidArgument
from ._progress import for_stream
from ._snapshotter import ROOT_ENV, Snapshotter
from ._types import Info, Kind

PROG = "unionfs snapshot"

_DESCRIPTION = f"""\
Build and run layer chains: prepare a writable snapshot on a chain, mount it, change files, commit it as a
new read-only layer, build the next one on it. The model and the verbs are containerd's snapshotter's; every
mount is served by unionfs, so an ordinary user can do all of it. The command is `unionfs snapshot`, also
called `unionfs snapshots` (the name of ctr's command).

  {PROG} prepare build                  an active (writable) snapshot on nothing
  {PROG} mount build /mnt/b             serve it; write into /mnt/b; then `unionfs umount /mnt/b`
  {PROG} commit base build              a read-only layer named base (build is gone)
  {PROG} prepare app base               the next writable snapshot, on base
  {PROG} view look base                 a read-only view of base

Keys of active snapshots and views and names of committed snapshots share one space. A committed snapshot
cannot change; only committed snapshots can be parents; a snapshot with children cannot be removed.

The store is --root DIR, else ${ROOT_ENV}, else $XDG_DATA_HOME/unionfs (~/.local/share/unionfs).

exit status: 0 success, 1 other failure, 2 bad usage, 3 not found, 4 already exists,
             5 failed precondition, 6 invalid argument, 130 interrupted,
             141 stdout closed by its reader (nothing printed)
             (fsck: 0 clean, 1 repaired, 4 problems left)
"""

Handler = Callable[[Snapshotter, argparse.Namespace], int]


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _parse_labels(items: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"label {item!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _mount_command(m_type: str, source: str, target: str, options: Sequence[str]) -> str:
    opts = shlex.quote(option_string(options))
    if m_type == "bind":
        return f"mount -o {opts} {shlex.quote(source)} {shlex.quote(target)}"
    return f"mount -t {shlex.quote(m_type)} -o {opts} {shlex.quote(source)} {shlex.quote(target)}"


# -- verbs ---------------------------------------------------------------------------------------------------


def _create(sn: Snapshotter, args: argparse.Namespace) -> int:
    fn = sn.view if args.verb == "view" else sn.prepare
    mounts = fn(args.key, args.parent, _parse_labels(args.label))
    if args.mounts:
        _print_json([m.to_json() for m in mounts])
    if args.target:
        for m in mounts:
            print(_mount_command(m.type, m.source, args.target, m.options))
    return 0


def _commit(sn: Snapshotter, args: argparse.Namespace) -> int:
    sn.commit(args.name, args.key, _parse_labels(args.label) if args.label else None)
    return 0


def _remove(sn: Snapshotter, args: argparse.Namespace) -> int:
    sn.remove_all(args.keys)
    return 0


def _info_rows(info: Info) -> list[list[str]]:
    rows = [["name", info.name], ["kind", info.kind.value], ["parent", info.parent or "-"],
            ["created", info.created.isoformat() if info.created else "-"],
            ["updated", info.updated.isoformat() if info.updated else "-"]]
    labels = [f"{k}={v}" for k, v in sorted(info.labels.items())] or ["-"]
    rows.append(["labels", labels[0]])
    rows += [["", lab] for lab in labels[1:]]
    return rows


def _go_time(t: datetime.datetime) -> str:
    """``t`` as Go writes a time.Time in JSON (RFC 3339, fraction without trailing zeros, ``Z`` for UTC)."""
    t = t.astimezone(datetime.UTC)
    fraction = f"{t.microsecond:06d}".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


def ctr_info(info: Info) -> str:
    """``info`` as ``ctr snapshots info`` prints a snapshot: JSON indented by four spaces with the keys Kind
    (``Active``, ``Committed``, ``View``), Name, Parent and Labels (both left out when empty), Created and
    Updated; ``<``, ``>`` and ``&`` escaped as Go escapes them."""
    value: dict[str, object] = {"Kind": info.kind.value.capitalize(), "Name": info.name}
    if info.parent:
        value["Parent"] = info.parent
    if info.labels:
        value["Labels"] = dict(sorted(info.labels.items()))
    epoch = datetime.datetime(1, 1, 1, tzinfo=datetime.UTC)
    value["Created"] = _go_time(info.created) if info.created else _go_time(epoch)
    value["Updated"] = _go_time(info.updated) if info.updated else _go_time(epoch)
    text = json.dumps(value, indent=4, ensure_ascii=False)
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _info(sn: Snapshotter, args: argparse.Namespace) -> int:
    info = sn.stat(args.key)
    if args.ctr:
        print(ctr_info(info))
    elif args.json:
        _print_json(info.to_json())
    else:
        _print_table(_info_rows(info))
    return 0


def _label(sn: Snapshotter, args: argparse.Namespace) -> int:
    if args.labels:
        given = _parse_labels(args.labels)
        current = sn.stat(args.key)
        info = sn.update(Info(kind=current.kind, name=args.key, labels=given), [f"labels.{k}" for k in given])
    else:
        info = sn.stat(args.key)
    if args.json:
        _print_json(dict(info.labels))
    else:
        for k, v in sorted(info.labels.items()):
            print(f"{k}={v}")
    return 0


def _usage(sn: Snapshotter, args: argparse.Namespace) -> int:
    keys = args.keys or [i.name for i in sn.walk()]
    usages = [(k, sn.usage(k)) for k in keys]
    if args.json:
        _print_json({k: u.to_json() for k, u in usages})
        return 0
    rows = [["KEY", "SIZE", "INODES"]]
    for k, u in usages:
        rows.append([k, str(u.size) if args.bytes else _human_size(u.size), str(u.inodes)])
    _print_table(rows)
    return 0


def _list(sn: Snapshotter, args: argparse.Namespace) -> int:
    infos = sn.walk(args.filter)
    if args.json:
        _print_json([i.to_json() for i in infos])
        return 0
    _print_table([["KEY", "PARENT", "KIND"]] + [[i.name, i.parent or "", i.kind.value] for i in infos])
    return 0


def _mounts(sn: Snapshotter, args: argparse.Namespace) -> int:
    mounts = sn.mounts(args.key)
    if args.json:
        _print_json([dict(m.to_json(), target=args.target) for m in mounts])
        return 0
    for m in mounts:
        print(_mount_command(m.type, m.source, args.target, m.options))
    return 0


def _mount(sn: Snapshotter, args: argparse.Namespace) -> int:
    # the user's options tune the snapshot's mount (and win where they disagree); they cannot replace its layers
    spec, record = sn.begin_mount(args.key, args.mountpoint, [*args.options, *(["debug"] if args.debug else [])])
    sn.close()  # the server is forked from this process: it must not inherit the database connection
    foreground = args.foreground or args.debug
    try:
        from ..fuse.server import mount  # pyfuse3 and trio load only now

        mount(spec, args.mountpoint, foreground=foreground, log_file=args.log)
    except BaseException:
        sn.mount_ended(record)
        raise
    if foreground:
        sn.mount_ended(record)
    else:
        sn.mount_placed(record)
    return 0


def _tree_lines(infos: list[Info]) -> list[str]:
    by_name = {i.name: i for i in infos}
    kids: dict[str | None, list[Info]] = {}
    for i in infos:
        parent = i.parent if i.parent in by_name else None
        kids.setdefault(parent, []).append(i)
    for group in kids.values():
        group.sort(key=lambda i: i.name)

    def label(i: Info) -> str:
        return i.name if i.kind is Kind.COMMITTED else f"{i.name} ({i.kind.value})"

    out: list[str] = []
    # (node, lead, branch): every child one level deeper than its parent, so that a chain reads as a chain
    # (kept on a stack, not by recursion: chains may be thousands of layers long)
    stack: list[tuple[Info, str, str]] = [(i, "", "") for i in reversed(kids.get(None, []))]
    while stack:
        node, lead, branch = stack.pop()
        out.append(lead + branch + label(node))
        children = kids.get(node.name, [])
        cont = lead + {"├─ ": "│  ", "└─ ": "   "}.get(branch, "")
        for n, child in reversed(list(enumerate(children))):
            stack.append((child, cont, "└─ " if n == len(children) - 1 else "├─ "))
    return out


def _tree_json(infos: list[Info]) -> list[dict[str, object]]:
    by_name = {i.name: i for i in infos}
    children: dict[str, list[dict[str, object]]] = {i.name: [] for i in infos}
    roots: list[dict[str, object]] = []
    for i in infos:
        node: dict[str, object] = {"name": i.name, "kind": i.kind.value, "children": children[i.name]}
        (children[i.parent] if i.parent is not None and i.parent in by_name else roots).append(node)
    return roots


def _tree(sn: Snapshotter, args: argparse.Namespace) -> int:
    infos = sn.walk()
    if args.json:
        _print_json(_tree_json(infos))
    else:
        for line in _tree_lines(infos):
            print(line)
    return 0


def _cleanup(sn: Snapshotter, args: argparse.Namespace) -> int:
    removed = sn.cleanup()
    if args.json:
        _print_json(removed)
    else:
        for name in removed:
            print(f"removed snapshots/{name}")
    return 0


def _fsck(sn: Snapshotter, args: argparse.Namespace) -> int:
    findings = sn.fsck(repair=args.repair)
    left = [f for f in findings if not f.repaired]
    if args.json:
        _print_json({"clean": not findings, "findings": [f.to_json() for f in findings]})
    elif not findings:
        print(f"{sn.root}: no problems found")
    else:
        for f in findings:
            print(f)
        if left and not args.repair and any(f.repairable for f in left):
            print(f"{PROG}: run `{PROG} fsck --repair` to repair what can be repaired", file=sys.stderr)
    if not findings:
        return 0
    return 4 if left else 1


# -- parser --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    root_help = f"the store (default: ${ROOT_ENV}, else $XDG_DATA_HOME/unionfs, else ~/.local/share/unionfs)"
    p = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", metavar="DIR", help=root_help)
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}",
                   help="print the version and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", metavar="DIR", default=argparse.SUPPRESS, help=root_help)
    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument("--json", action="store_true", help="print JSON")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    def verb(name: str, fn: Handler, help: str, *, aliases: Sequence[str] = (), read: bool = False,
             description: str | None = None) -> argparse.ArgumentParser:
        parents = [common, reading] if read else [common]
        sp = sub.add_parser(name, help=help, aliases=list(aliases), parents=parents,
                            description=description or help[:1].upper() + help[1:] + ".",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=fn, verb=name)
        return sp

    for name, what in (("prepare", "an active (writable) snapshot"), ("view", "a read-only view")):
        sp = verb(name, _create, f"create {what} KEY on the committed snapshot PARENT",
                  description=f"Create {what} KEY on the committed snapshot PARENT (or on nothing).\n"
                  f"Mount it with `{PROG} mount KEY MOUNTPOINT`.")
        sp.add_argument("key", metavar="KEY")
        sp.add_argument("parent", metavar="PARENT", nargs="?")
        sp.add_argument("-l", "--label", action="append", default=[], metavar="KEY=VALUE", help="set a label")
        sp.add_argument("-t", "--target", metavar="DIR", help="print the mount command for mounting on DIR")
        sp.add_argument("--mounts", action="store_true", help="print the mount spec as JSON")

    sp = verb("commit", _commit, "commit the active snapshot KEY as the read-only snapshot NAME",
              description="Commit the active snapshot KEY as the read-only snapshot NAME, usable as a parent.\n"
              "KEY ceases to exist; its layer and labels stay (unless --label is given, which replaces them).\n"
              "Unmount it first: changes made after the commit are not part of the frozen usage.")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("key", metavar="KEY")
    sp.add_argument("-l", "--label", action="append", default=[], metavar="KEY=VALUE", help="set a label")

    sp = verb("rm", _remove, "remove snapshots", aliases=("remove", "delete", "del"),
              description="Remove snapshots and their layers: all of them or, when any cannot be removed (it does not\n"
              "exist, is mounted or has children that are not removed with it), none; the error names each.")
    sp.add_argument("keys", metavar="KEY", nargs="+")

    sp = verb("info", _info, "show what is known about a snapshot", read=True,
              description="Show what is known about snapshot KEY: a table of name, kind, parent, created, updated\n"
              "and labels; --json prints those as JSON (lower-case keys, ISO 8601 times), --ctr prints what\n"
              "`ctr snapshots info` prints (JSON with the keys Kind, Name, Parent, Labels, Created, Updated).")
    sp.add_argument("key", metavar="KEY")
    sp.add_argument("--ctr", action="store_true", help="print the JSON `ctr snapshots info` prints")

    sp = verb("label", _label, "show or change the labels of a snapshot", read=True,
              description="Set labels of snapshot KEY (an empty VALUE removes the label) and print them all;\n"
              "without labels, print them.")
    sp.add_argument("key", metavar="KEY")
    sp.add_argument("labels", metavar="KEY=VALUE", nargs="*")

    sp = verb("usage", _usage, "show the disk use of snapshots' own layers", read=True,
              description="Show the disk use of snapshots' own layers (all snapshots without KEY): bytes\n"
              "allocated (st_blocks * 512) and inodes, hard links counted once. Frozen at commit for committed\n"
              "snapshots, measured now for active ones.")
    sp.add_argument("keys", metavar="KEY", nargs="*")
    sp.add_argument("-b", "--bytes", action="store_true", help="sizes in bytes")

    sp = verb("ls", _list, "list snapshots", aliases=("list",), read=True,
              description="List snapshots. --filter selects (several are or-ed), e.g.\n"
              "  kind==committed   parent==base   name~=^build-   labels.\"unionfs.io/role\"==base,kind!=view")
    sp.add_argument("--filter", action="append", default=[], metavar="FILTER", help="only matching snapshots")

    sp = verb("mounts", _mounts, "print the mount command (or spec) of a snapshot on TARGET", read=True)
    sp.add_argument("target", metavar="TARGET")
    sp.add_argument("key", metavar="KEY")

    sp = verb("mount", _mount, "mount an active snapshot or a view with unionfs",
              description="Mount the active snapshot or view KEY on MOUNTPOINT, served by unionfs (also for what\n"
              "`mounts` describes as a bind mount). Returns once the mount is ready; unmount with\n"
              "`unionfs umount MOUNTPOINT`. An active snapshot can be mounted once at a time.")
    sp.add_argument("key", metavar="KEY")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                    help="further unionfs mount options that tune the mount (see `unionfs mount --help`); "
                    "lowerdir, upperdir, workdir, userxattr and nouserxattr are the snapshot's and refused")
    sp.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground")
    sp.add_argument("-d", "--debug", action="store_true", help="log every request; implies -f")
    sp.add_argument("--log", metavar="FILE", help="append the server's log to FILE")

    verb("tree", _tree, "draw the chains of snapshots", read=True,
         description="Draw the chains: each child below its parent and one level deeper, so that a chain reads\n"
         "as a chain (base, its child indented under it, that one's child indented further).")
    verb("cleanup", _cleanup, "delete directories no snapshot refers to", read=True,
         description="Delete directories in the store that no snapshot refers to (left by a crash).")
    sp = verb("fsck", _fsck, "check the store against the directories on disk", read=True,
              description="Report disagreements between the metadata and the directories on disk; --repair\n"
              "fixes what can be fixed. Exit status: 0 clean, 1 all problems repaired, 4 problems left.")
    sp.add_argument("--repair", action="store_true", help="repair what can be repaired")
    return p


#: The exit status after the reader of stdout went away (128 + SIGPIPE, what a shell reports for a command
#: killed by the signal); nothing is printed then.
EXIT_BROKEN_PIPE = 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is left (also at interpreter exit) cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, sys.stdout.fileno())
        finally:
            os.close(null)


#: The verbs that create the store when it does not exist; the others fail with NotFound.
_CREATING = frozenset({"prepare", "view"})


def _run_verb(args: argparse.Namespace) -> int:
    try:
        with Snapshotter(args.root, create=args.verb in _CREATING, progress=for_stream(sys.stderr)) as sn:
            status: int = args.func(sn, args)
        sys.stdout.flush()  # here, where a closed pipe can still be told apart from a failure
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``unionfs snapshot ARGV...``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.verb is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return run_command(PROG, lambda: _run_verb(args))

"""The ``unionfs`` command: mount and umount, the ``mount -t fuse.unionfs`` helper form, and the form
containers/storage runs a mount program in (``unionfs -o OPTIONS MOUNTPOINT``, as fuse-overlayfs).

Both hand a :class:`MountSpec` to :mod:`unionfs.fuse.server`, imported only then (it makes the mount; only the
server it forks loads pyfuse3 and trio); every error ends the command as one line on stderr
(:mod:`unionfs.cli_errors`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .cli_errors import EXIT_USAGE, run_command
from .options import parse

PROG = "unionfs"

_MOUNT_HELP = """\
Mount a stack of layer directories with Linux overlayfs semantics.

  unionfs mount -o lowerdir=L1:L2,upperdir=U,workdir=W MOUNTPOINT

The leftmost lowerdir is the top-most lower layer. Without upperdir/workdir (or with -o ro) the mount is
read-only. Changes land in upperdir in the kernel's format (whiteouts are character devices 0/0, opaque
directories carry the overlay.opaque xattr), so the kernel can mount the same layers.

options (-o, comma separated, may be repeated; a backslash escapes a comma inside a value: \\,):
  lowerdir=DIR[:DIR...]   read-only layers, top-most first (in a path, \\: is a colon and \\\\ a backslash);
                          a later lowerdir= replaces the layers given before it, as in the kernel
  lowerdir+=DIR           one more lower layer, below those given before (the path as it is: a colon is
                          no separator); as in the kernel, it cannot follow a lowerdir=
  upperdir=DIR            the writable layer
  workdir=DIR             scratch directory on the same filesystem as upperdir, used for atomic changes
  ro | rw                 mount read-only / read-write
  userxattr | nouserxattr use (or not) user.overlay.* xattrs for markers (default: user.* when trusted.* is
                          not allowed)
  allow_other             let other users see the mount (the default when run as root)
  allow_root              let root see the mount besides its owner (not with allow_other); as allow_other,
                          an ordinary user needs user_allow_other in /etc/fuse.conf
  auto_unmount            ask fusermount3 to stay and unmount when the server dies (done for mounts made as
                          root; an ordinary user's mount stays until `unionfs umount --lazy`)
  noacl                   the kernel checks access by the mode bits alone, not POSIX ACLs
  noatime | atime         do not / do update access times (default: noatime; relatime, strictatime: atime)
  timeout=SECONDS         how long the kernel may cache names and attributes (default 300)
  uidmapping=STORED:SHOWN:N[:STORED:SHOWN:N...]   as fuse-overlayfs: ids STORED.. on disk show as SHOWN..
                          and a chown to SHOWN.. stores STORED.. (gidmapping= likewise for groups); ids
                          on disk outside every range show as 65534; uidmapping=0:100000:65536 shows a
                          file stored as uid 0 as uid 100000
  squash_to_root | squash_to_uid=N | squash_to_gid=N   show every file as owned by one id
  xattr_permissions[=1|2] keep owners and modes a chown/chmod asks for (and those a rootless copy-up
                          cannot keep) in the user.containers.override_stat xattr (=0: off)
  aufs_markers            honour AUFS-style markers in lower layers, as fuse-overlayfs: a file .wh.NAME
                          deletes NAME, .wh..wh..opq makes its directory opaque (on in the mount program
                          form below; noaufs_markers turns it off); unionfs itself writes kernel markers
  volatile | fsync=0      fsync returns at once and copy-ups are not synced (fsync=1: the default)
  noxattrs=1              extended attributes are turned off: every xattr call fails (ENOTSUP)
  context=CONTEXT         the SELinux context of every object, given to the kernel (needs SELinux)
  spare[=SECONDS]         once this server has loaded pyfuse3 and trio, keep a spare that has too, for the
                          next mount of this user, cgroup and namespaces (it then answers at once instead of
                          ~50 ms later); the spare exits after SECONDS (60) without a mount to start; for
                          podman: mountopt = "spare" in storage.conf
  prescan                 walk the lower layers once at mount and answer lookups in them from memory:
                          lookups cost the same through hundreds of layers as through one; costs mount time
                          and ~100 bytes per lower path; lower layers must not change while mounted
  nonative                serve without the native part (the C library beneath pyfuse3 that caches listings
                          and tunes the connection): every request through Python, as when it is not built;
                          `unionfs --version` says whether it is available
  fsname=NAME             the source shown in the mount table (default unionfs)
  debug                   log every request and its result (with -f, to stderr)
  trace[=FILE]            a line for each union decision (lookup, whiteout, opaque directory, copy-up, EXDEV)
                          naming the overlayfs rule that applied: appended to FILE, else to the server's log

kernel overlayfs options, accepted with the values that name what unionfs does:
  redirect_dir=off|nofollow  index=off  metacopy=off  xino=off|auto  nfs_export=off  uuid=on|off|null|auto
  (other values are refused; so is datadir+=: data-only layers need metacopy)

refused: max_read= (the server cannot agree to it at its start), and every option not listed here

accepted, with no effect here:
  nonempty                FUSE 3 always mounts on a directory that is not empty
  static_nlink            a merged directory already shows a link count of 1
  threaded=0|1            the server answers requests in one event loop either way
  fast_ino=0|1            inode numbers are unionfs's own, stable across copy-up, either way
  writeback=0             the kernel's writeback cache stays off (writeback=1 is refused)
  plugins=                no plugins (fuse-overlayfs's lazy-fetching layers; a plugin given is refused)
  subtype=unionfs         a unionfs mount is always of type fuse.unionfs (other subtypes are refused)
  default_permissions     always on: the kernel checks permissions against the merged attributes
  x-*                     options for other programs (systemd, mount(8))
  generic options of mount(8): dev, nodev, suid, nosuid, exec, noexec, auto, noauto, user, users, owner,
                          group, defaults, _netdev, nofail, sync, async, dirsync, lazytime, silent, loud, ...

Also usable as `mount -t fuse.unionfs unionfs MOUNTPOINT -o lowerdir=...` and from /etc/fstab, and as
containers/storage's mount program (podman, buildah), started as fuse-overlayfs is:
`unionfs -o OPTIONS MOUNTPOINT`, which also turns on aufs_markers; unmount with fusermount3 -u.

Rootless: an ordinary user can mount (through fusermount3) and write; whiteouts are character devices 0/0
(allowed to every user since Linux 5.8) and opaque directories use user.overlay.opaque when trusted.* xattrs
cannot be written; the kernel reads such layers with -o userxattr.

exit status: 0 mounted (with -f: served and unmounted), 1 the mount was refused or failed (a refused mount
             changes nothing on disk), 2 bad usage or a bad option, 130 interrupted
"""

_UMOUNT_HELP = """\
Unmount a unionfs mount and wait for its server to finish writing and exit.

The unmount and the wait for the server end within --timeout seconds even when the server does not answer
(stopped or stuck); then the mount is left in place and --lazy detaches it.

exit status: 0 unmounted and the server is gone (with --lazy: detached), 1 not mounted, not a unionfs mount,
             unmounting failed, or not done in time, 2 bad usage, 130 interrupted
"""


VERSION = f"{PROG} {__version__}"


def _add_version(p: argparse.ArgumentParser) -> None:
    p.add_argument("-V", "--version", action="version", version=VERSION, help="print the version and exit")


def _mount_parser(prog: str, helper: bool = False) -> argparse.ArgumentParser:
    """The parser of ``unionfs mount``; ``helper``: of the mount helper form, which takes a SOURCE first."""
    p = argparse.ArgumentParser(
        prog=prog, description=_MOUNT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_version(p)
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options, comma separated (see above)")
    p.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground (do not detach)")
    p.add_argument("-d", "--debug", action="store_true", help="log every request; implies -f")
    p.add_argument("--log", metavar="FILE", help="append the server's log to FILE")
    if helper:
        p.add_argument("source", help=argparse.SUPPRESS)
    p.add_argument("mountpoint", help="directory to mount on")
    return p


def cmd_mount(argv: Sequence[str], prog: str = f"{PROG} mount", helper: bool = False,
              program: bool = False) -> int:
    """``unionfs mount ARGV...`` (``helper``: ``unionfs SOURCE MOUNTPOINT ...``; ``program``: containers/storage's
    ``unionfs -o OPTIONS MOUNTPOINT``, which honours AUFS-style markers unless ``-o noaufs_markers``): 0 once
    mounted; errors are raised (see :func:`main`). One MOUNTPOINT only: anything more is a usage error (exit 2)."""
    parser = _mount_parser(prog, helper)
    args, extra = parser.parse_known_args(argv)
    if any(a.startswith("-") for a in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        given = [*([args.source] if helper else []), args.mountpoint, *extra]
        parser.error(f"too many arguments: {' '.join(given)} (expected {'SOURCE ' if helper else ''}MOUNTPOINT)")
    spec = parse([*(["aufs_markers"] if program else []), *args.options, *(["debug"] if args.debug else [])])
    from .fuse.server import mount

    foreground = args.foreground or args.debug
    mount(spec, args.mountpoint, foreground=foreground, log_file=args.log)
    if not foreground:
        _state["mounted"] = True
    return 0


def cmd_umount(argv: Sequence[str]) -> int:
    """``unionfs umount ARGV...``: 0 once unmounted and the server has exited; errors are raised."""
    p = argparse.ArgumentParser(prog=f"{PROG} umount", description=_UMOUNT_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_version(p)
    p.add_argument("mountpoint")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the unmount and the server's exit, whatever the server does "
                        "(default 30)")
    p.add_argument("-l", "--lazy", action="store_true",
                   help="detach the mount now, even when it is busy or its server does not answer "
                        "(as umount -l); does not wait for the server")
    args = p.parse_args(argv)
    from .fuse.server import unmount

    unmount(args.mountpoint, args.timeout, lazy=args.lazy)
    return 0


COMMANDS = {
    "mount": "mount a layer stack (unionfs mount --help)",
    "umount": "unmount and wait for the server to exit",
    "snapshot": "build layer chains: prepare, mount, commit (unionfs snapshot --help)",
    "image": "container images: import, mount, commit, export (unionfs image --help)",
    "layer": "one layer tar into or out of a snapshot: apply, diff (unionfs layer --help)",
    "layers": "what each layer adds, modifies, removes and wastes, as dive shows it (unionfs layers --help)",
    "inspect": "where an entry of a union comes from and what hides what (unionfs inspect --help)",
    "tree": "the merged tree, each entry with its layer; --all: what is hidden (unionfs tree --help)",
    "explore": "browse the layers and the merged view as of each, in the terminal (unionfs explore --help)",
}


#: other names of the commands
ALIASES = {"unmount": "umount", "snapshots": "snapshot"}


def _usage() -> str:
    lines = ["usage: unionfs COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    lines += ["", "aliases: " + ", ".join(f"{alias} ({name})" for alias, name in ALIASES.items()),
              "options: -h, --help  this text;  -V, --version  print the version"]
    lines += ["", "Run `unionfs COMMAND --help` for details.",
              "As a mount helper: unionfs SOURCE MOUNTPOINT -o OPTIONS (what mount.fuse3 runs).",
              "As a mount program (podman, buildah: overlay.mount_program): unionfs -o OPTIONS MOUNTPOINT",
              "  (as fuse-overlayfs is run; AUFS-style .wh. markers in lower layers are honoured then)."]
    return "\n".join(lines)


def _helper_form(args: Sequence[str]) -> bool:
    """Whether ``args`` has the shape mount.fuse3 gives its helper: ``SOURCE MOUNTPOINT -o OPTIONS...``,
    MOUNTPOINT an existing directory, nothing after it but options, among them at least one ``-o`` (a unionfs
    mount always has its lowerdir= there)."""
    if len(args) < 3 or args[0].startswith("-") or args[1].startswith("-") or not os.path.isdir(args[1]):
        return False
    rest = list(args[2:])
    options = False
    while rest:
        arg = rest.pop(0)
        if arg == "-o":
            if not rest:
                return False
            rest.pop(0)
            options = True
        elif arg.startswith("-o"):
            options = True
        elif not arg.startswith("-"):
            return False
    return options


def _program_form(args: Sequence[str]) -> bool:
    """Whether ``args`` has the shape of a mount program's command line, as containers/storage (podman,
    buildah) runs fuse-overlayfs: ``[-f] [-d|--debug] -o OPTIONS [-o ...] MOUNTPOINT`` (options first)."""
    flags = ("-f", "--foreground", "-d", "--debug")
    return bool(args) and (args[0].startswith("-o") or args[0] in flags) and any(
        a.startswith("-o") for a in args)


def _unknown_command(cmd: str) -> int:
    import difflib  # loaded only for this message

    known = [*COMMANDS, *ALIASES, "--version"]
    close = difflib.get_close_matches(cmd, known, n=1)
    hint = f" (did you mean '{ALIASES.get(close[0], close[0])}'?)" if close else ""
    print(f"{PROG}: error: unknown command '{cmd}'{hint}; run 'unionfs --help' for the commands", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``unionfs ARGV...``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else EXIT_USAGE
    cmd = args[0]
    if cmd == "mount":
        return run_command(PROG, lambda: cmd_mount(args[1:]))
    if ALIASES.get(cmd, cmd) == "umount":
        return run_command(PROG, lambda: cmd_umount(args[1:]))
    if cmd in ("-V", "--version"):
        print(VERSION)  # (this line exactly: podman parses it)
        from .fuse.native import version_line

        print(version_line())
        return 0
    if ALIASES.get(cmd, cmd) == "snapshot":
        from .snapshots.cli import main as snapshot_main

        return snapshot_main(args[1:])
    if cmd in ("image", "images"):
        from .image.cli import image_main

        return image_main(args[1:])
    if cmd == "layer":
        from .image.cli import layer_main

        return layer_main(args[1:])
    if cmd == "layers":
        from .layers_cli import main as layers_main

        return layers_main(args[1:])
    if cmd == "inspect":
        from .inspect_cli import main as inspect_main

        return inspect_main(args[1:])
    if cmd == "tree":
        from .tree_cli import main as tree_main

        return tree_main(args[1:])
    if cmd == "explore":
        from .explore import main as explore_main

        return explore_main(args[1:])
    if _program_form(args):
        # containers/storage's mount_program form: unionfs -o OPTIONS MOUNTPOINT
        return run_command(PROG, lambda: cmd_mount(args, prog=PROG, program=True))
    if _helper_form(args):
        # mount.fuse3 form: unionfs SOURCE MOUNTPOINT -o OPTIONS
        return run_command(PROG, lambda: cmd_mount(args, prog=PROG, helper=True))
    if not cmd.startswith("-"):
        return _unknown_command(cmd)
    print(_usage(), file=sys.stderr)
    return EXIT_USAGE


#: what the command did that :func:`run` needs to know
_state = {"mounted": False}


def run() -> NoReturn:
    """The ``unionfs`` command (its console script, and ``python -m unionfs``): :func:`main`, then its exit status.
    Once a mount is made in the background, the command exits without the interpreter's teardown of every
    module (~7 ms of each container's start under podman): all it has open then is its standard streams and
    its log, flushed first."""
    status = main()
    if _state["mounted"]:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                status = status or 120  # (what the interpreter's own exit gives when a flush fails)
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()

"""The ``unionfs image`` and ``unionfs layer`` commands: container images in a snapshot store.

Errors end a command with one line on stderr and an exit status (see :mod:`unionfs.cli_errors`; an image or
layer refused as broken or hostile gives 7). Progress goes to stderr (a bar on a terminal, a line every few
seconds otherwise, nothing with --quiet); results go to stdout (JSON with --json). Nothing here imports
pyfuse3 or trio until ``image mount`` mounts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..cli_errors import EXIT_USAGE, run_command
from ..snapshots import AlreadyExists, InvalidArgument, NotFound, Snapshotter
from ..snapshots._mounts import Record as MountRecord
from ..snapshots._progress import for_stream, quiet
from ..snapshots._snapshotter import ROOT_ENV
from . import _images
from ._feedback import Feedback, human_bytes

IMAGE_PROG = "unionfs image"
LAYER_PROG = "unionfs layer"

_EXIT_TEXT = """\
exit status: 0 success, 1 other failure, 2 bad usage, 3 not found, 4 already exists,
             5 failed precondition, 6 invalid argument, 7 image or layer refused (broken or hostile),
             130 interrupted"""

_IMAGE_DESCRIPTION = f"""\
Container images in the snapshot store: import what skopeo, podman, docker or umoci wrote, mount it (as an
ordinary user too), change it, commit the change as a new layer and export the result back.

  {IMAGE_PROG} import busybox.tar --name busybox    an OCI archive, OCI layout directory or docker save tarball
  {IMAGE_PROG} mount busybox /mnt/b                 read-only; `unionfs umount /mnt/b` ends it
  {IMAGE_PROG} mount busybox /mnt/b --writable      prints the key of the writable snapshot made for it
  {IMAGE_PROG} commit KEY busybox:changed           its changes become a new layer (unmount first)
  {IMAGE_PROG} export busybox:changed out.tar       an OCI archive (a directory without .tar; --format docker)

Each layer is a committed snapshot named by its chain ID: images sharing base layers share those snapshots
and an import applies only what the store does not hold. Every blob's digest and size and every layer's
diff-id are checked. As an ordinary user, owners, modes and device nodes a layer holds but the user cannot
store are recorded in user.containers.override_stat, and mounts show them: the image's root as you (ids
0-65535 mapped as in rootless podman: your own id and your /etc/subuid range), as the image says inside
`unshare -r` or `podman unshare`.

The store is --root DIR, else ${ROOT_ENV}, else $XDG_DATA_HOME/unionfs (~/.local/share/unionfs).

{_EXIT_TEXT}
"""

_LAYER_DESCRIPTION = f"""\
One layer tar (plain, .gz or .zst) into or out of an active snapshot of the store.

  {LAYER_PROG} apply KEY layer.tar.gz      apply it to the active snapshot KEY (all or nothing)
  {LAYER_PROG} diff KEY -o layer.tar.gz    the changes of KEY as a layer; its digest and diff-id printed

A diff is reproducible: the same content gives the same bytes (sorted entries, PAX headers, numeric owners,
mtimes clamped to $SOURCE_DATE_EPOCH when set, whiteouts dated at it or at 1970).

The store is --root DIR, else ${ROOT_ENV}, else $XDG_DATA_HOME/unionfs (~/.local/share/unionfs).

{_EXIT_TEXT}
"""

Handler = Callable[[Snapshotter, argparse.Namespace, Feedback], int]


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _short(digest: str | None) -> str:
    return (digest or "").partition(":")[2][:12]


def _source_date_epoch() -> int | None:
    text = os.environ.get("SOURCE_DATE_EPOCH")
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgument(f"SOURCE_DATE_EPOCH={text!r} is not a number of seconds") from None
    if value < 0:
        raise InvalidArgument(f"SOURCE_DATE_EPOCH={text!r} is negative")
    return value


# -- image verbs -----------------------------------------------------------------------------------------------


def _import(sn: Snapshotter, args: argparse.Namespace, fb: Feedback) -> int:
    if not os.path.lexists(args.path):
        raise NotFound(f"{args.path}: no such file or directory")
    report = _images.import_image(sn, args.path, name=args.name, platform=args.platform, feedback=fb)
    if args.json:
        _print_json(report.to_json())
    else:
        print(report.summary())
    return 0


def _ls(sn: Snapshotter, args: argparse.Namespace, fb: Feedback) -> int:
    images = sn.images()
    rows = []
    out = []
    for info in images:
        stored = _images.load(sn, info.name)
        size = sum(d.size for d in stored.layers)
        out.append({**info.to_json(), "layers": len(stored.layers), "size": size})
        rows.append([info.name, info.platform, str(len(stored.layers)), human_bytes(size),
                     _short(info.manifest_digest), info.created.strftime("%Y-%m-%d %H:%M") if info.created else ""])
    if args.json:
        _print_json(out)
    elif rows:
        _table([["NAME", "PLATFORM", "LAYERS", "SIZE", "MANIFEST", "IMPORTED"], *rows])
    return 0


def _config_lines(config: dict[str, Any]) -> list[str]:
    c = config.get("config") or {}
    lines = []
    for key in ("User", "WorkingDir", "Entrypoint", "Cmd", "Env", "ExposedPorts", "Volumes", "Labels"):
        value = c.get(key) if isinstance(c, dict) else None
        if value:
            lines.append(f"  {key}: {json.dumps(value, ensure_ascii=False)}")
    return lines


def _inspect(sn: Snapshotter, args: argparse.Namespace, fb: Feedback) -> int:
    data = _images.inspect(sn, args.ref)
    if args.json:
        _print_json(data)
        return 0
    print(f"name:      {data['name']}")
    print(f"manifest:  {data['manifest_digest']} ({data['manifest_media_type']})")
    print(f"config:    {data['config_digest']}")
    print(f"platform:  {data['platform']}")
    if data["config"].get("created"):
        print(f"created:   {data['config']['created']}")
    print(f"size:      {human_bytes(data['size'])} in {len(data['layers'])} layers")
    lines = _config_lines(data["config"])
    if lines:
        print("runs with:")
        print("\n".join(lines))
    if data["layers"]:
        print("layers (bottom first; each is the committed snapshot named by its chain ID; --json for full digests):")
        rows = [["#", "DIGEST", "SIZE", "DIFF-ID", "SNAPSHOT (CHAIN ID)", "MEDIA TYPE"]]
        for layer in data["layers"]:
            rows.append([str(layer["index"]), _short(layer["digest"]), human_bytes(layer["size"]),
                         _short(layer["diff_id"]), _short(layer["chain_id"]), layer["media_type"]])
        _table(rows)
    history = data["config"].get("history") or []
    if history:
        print("history:")
        for h in history:
            if isinstance(h, dict):
                empty = " (no layer)" if h.get("empty_layer") else ""
                print(f"  {h.get('created', '')}  {h.get('created_by', '')}{empty}")
    return 0


def _rm(sn: Snapshotter, args: argparse.Namespace, fb: Feedback) -> int:
    for ref in args.refs:
        removed, blobs = _images.remove(sn, ref)
        line = f"removed {ref}"
        if removed:
            line += f" and {len(removed)} layer snapshot{'s' if len(removed) != 1 else ''} nothing else uses"
        if blobs:
            line += f", {len(blobs)} blob{'s' if len(blobs) != 1 else ''}"
        print(line)
    return 0


def _subids(path: str, user: str, uid: int) -> tuple[int, int] | None:
    """The first subordinate id range of the user in /etc/subuid or /etc/subgid."""
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[0] in (user, str(uid)) and parts[1].isdigit() and parts[2].isdigit():
                return int(parts[1]), int(parts[2])
    return None


def _owner_options(sn: Snapshotter) -> list[str]:
    """For a store of an ordinary user: show the owners and modes recorded at import, image root as this user
    and the ids above it through the user's subordinate range (what rootless podman does)."""
    if not _images.rootless(sn) or os.geteuid() == 0:
        return []
    uid, gid = os.getuid(), os.getgid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    options = ["xattr_permissions=2"]
    for opt, own, path in (("uidmapping", uid, "/etc/subuid"), ("gidmapping", gid, "/etc/subgid")):
        triples = [f"0:{own}:1"]
        sub = _subids(path, user, uid)
        if sub is not None:
            triples.append(f"1:{sub[0]}:{min(sub[1], 65535)}")
        options.append(f"{opt}={':'.join(triples)}")
    return [",".join(options)]


def _mount(sn: Snapshotter, args: argparse.Namespace, fb: Feedback) -> int:
    options = [*_owner_options(sn), *args.options, *(["debug"] if args.debug else [])]
    record: MountRecord | None
    if args.writable:
        key = _images.prepare_writable(sn, args.ref, args.key)
        try:
            spec, record = sn.begin_mount(key, args.mountpoint, options)
        except BaseException:
            with contextlib.suppress(Exception):
                sn.remove(key)  # (made for this mount only)
            raise
    else:
        if args.key:
            raise InvalidArgument("--key names the writable snapshot: give --writable too")
        key = None
        info = sn.image(args.ref)
        spec, record = sn.begin_chain_mount(info.top, args.mountpoint, options)
    sn.close()  # the server is forked from this process: it must not inherit the database connection
    foreground = args.foreground or args.debug
    if key is not None:
        print(key, flush=True)
    try:
        from ..fuse.server import mount  # pyfuse3 and trio load only now

        mount(spec, args.mountpoint, foreground=foreground, log_file=args.log)
    except BaseException:
        with Snapshotter(sn.root) as again:
            if record is not None:
                again.mount_ended(record)
            if key is not None:
                with contextlib.suppress(Exception):
                    again.remove(key)  # the writable snapshot made for this mount, unused
        raise
    if record is not None:
        with Snapshotter(sn.root) as again:
            (again.mount_ended if foreground else again.mount_placed)(record)
    return 0


def _commit(sn: Snapshotter, args: argparse.Namespace, fb: Feedback) -> int:
    report = _images.commit(sn, args.key, args.ref, compression=args.compression,
                            source_date_epoch=_source_date_epoch(), message=args.message, feedback=fb)
    if args.json:
        _print_json(report.to_json())
    else:
        print(report.summary())
    return 0


_FORMATS = ("oci", "oci-archive", "docker")


def _export(sn: Snapshotter, args: argparse.Namespace, fb: Feedback) -> int:
    fmt = args.format
    if fmt is None:
        fmt = "oci-archive" if args.dest.endswith(".tar") else "oci"
    if os.path.lexists(args.dest):
        raise AlreadyExists(f"{args.dest} exists; name a new file or directory")
    _images.export(sn, args.ref, args.dest, fmt, feedback=fb)
    what = {"oci": "an OCI layout directory", "oci-archive": "an OCI archive", "docker": "a docker save tarball"}
    print(f"exported {args.ref} to {args.dest} ({what[fmt]})")
    return 0


# -- layer verbs -----------------------------------------------------------------------------------------------


def _layer_apply(sn: Snapshotter, args: argparse.Namespace, fb: Feedback) -> int:
    result = _images.apply_to_snapshot(sn, args.key, args.layer, feedback=fb)
    if args.json:
        _print_json({"key": args.key, **{k: v for k, v in vars(result).items()}})
    else:
        print(f"applied {args.layer} to {args.key}: {result.summary()}")
        print(f"digest:  {result.digest}")
        print(f"diff-id: {result.diff_id}")
    return 0


def _layer_diff(sn: Snapshotter, args: argparse.Namespace, fb: Feedback) -> int:
    result = _images.diff_snapshot(sn, args.key, args.output, compression=args.compression,
                                   source_date_epoch=_source_date_epoch(), feedback=fb)
    if args.json:
        _print_json({"key": args.key, "output": args.output, **{k: v for k, v in vars(result).items()}})
    else:
        print(f"wrote {args.output}: {result.summary()}")
        print(f"digest:  {result.digest}")
        print(f"diff-id: {result.diff_id}")
    return 0


# -- parsers ---------------------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--root", metavar="DIR", default=argparse.SUPPRESS,
                   help=f"the store (default: ${ROOT_ENV}, else $XDG_DATA_HOME/unionfs)")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress on stderr")
    return p


def _parser(prog: str, description: str) -> tuple[argparse.ArgumentParser, Any]:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", metavar="DIR", help=f"the store (default: ${ROOT_ENV}, else $XDG_DATA_HOME/unionfs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("-V", "--version", action="version", version=f"{prog} {__version__}")
    return p, p.add_subparsers(dest="verb", metavar="VERB")


def _verb(sub: Any, name: str, fn: Handler, help: str, description: str, *, json_out: bool = False,
          aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
    sp: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description, aliases=list(aliases),
                                                 parents=[_common()],
                                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.set_defaults(func=fn, verb=name)
    if json_out:
        sp.add_argument("--json", action="store_true", help="print JSON")
    return sp


def image_parser() -> argparse.ArgumentParser:
    p, sub = _parser(IMAGE_PROG, _IMAGE_DESCRIPTION)
    sp = _verb(sub, "import", _import, "import an image from an OCI layout, an OCI archive or a docker save tarball",
               "Import the image at PATH: an OCI image layout directory, an OCI archive (a tar of one) or a\n"
               "`docker save` tarball (the classic form with manifest.json, or the OCI form of Docker 25+).\n"
               "Every blob's digest and size and every layer's diff-id are checked; layers the store holds are\n"
               "not applied again. A multi-platform image gives the host's platform unless --platform says.\n"
               "The image is named --name, else by the layout's org.opencontainers.image.ref.name or docker's\n"
               "RepoTags, else by its manifest digest. When PATH holds several images, --name picks one.",
               json_out=True)
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("--name", metavar="REF", help="the name to give the image (and pick it in PATH)")
    sp.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="the platform to pick, e.g. linux/arm64")
    _verb(sub, "ls", _ls, "list images", "List the images of the store: name, platform, layers, size of\n"
          "their (compressed) layers, manifest digest and when imported.", json_out=True, aliases=("list",))
    sp = _verb(sub, "inspect", _inspect, "show an image: config, layers, snapshot chain",
               "Show image REF: its manifest and config digests, platform, what it runs with, its layers\n"
               "(digest, size, diff-id, the chain ID naming its snapshot) and its history; --json prints all of\n"
               "it with the whole config.", json_out=True)
    sp.add_argument("ref", metavar="REF")
    sp = _verb(sub, "rm", _rm, "remove images", "Remove the names REF...; layer snapshots and blobs that no other\n"
               "image or snapshot uses go with them.", aliases=("remove",))
    sp.add_argument("refs", metavar="REF", nargs="+")
    sp = _verb(sub, "mount", _mount, "mount an image, read-only or writable",
               "Mount image REF on MOUNTPOINT, served by unionfs: read-only, or with --writable on a new active\n"
               "snapshot on top of its layers, whose key is printed (commit it with `unionfs image commit KEY REF`\n"
               "once unmounted). Returns once the mount is ready; `unionfs umount MOUNTPOINT` ends it.")
    sp.add_argument("ref", metavar="REF")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("-w", "--writable", action="store_true", help="a writable mount on a new active snapshot")
    sp.add_argument("--key", metavar="KEY", help="the key of the writable snapshot (default: REF@rw-RANDOM)")
    sp.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                    help="further unionfs mount options (see `unionfs mount --help`)")
    sp.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground")
    sp.add_argument("-d", "--debug", action="store_true", help="log every request; implies -f")
    sp.add_argument("--log", metavar="FILE", help="append the server's log to FILE")
    sp = _verb(sub, "commit", _commit, "commit a writable snapshot of an image as a new image",
               "Make the changes of the active snapshot KEY (made by `image mount --writable`, unmounted now) a\n"
               "new layer on top of its image, and name the result REF: the config gains the layer's diff-id and\n"
               "a history entry, a new manifest lists the layers. The unchanged layers keep their digests.\n"
               "$SOURCE_DATE_EPOCH, when set, dates the config and clamps the layer's mtimes.", json_out=True)
    sp.add_argument("key", metavar="KEY")
    sp.add_argument("ref", metavar="REF")
    sp.add_argument("--compression", choices=("gzip", "zstd"), default="gzip", help="of the new layer (gzip)")
    sp.add_argument("-m", "--message", metavar="TEXT", help="the history entry's created_by")
    sp = _verb(sub, "export", _export, "write an image as an OCI layout, OCI archive or docker save tarball",
               "Write image REF to DEST: an OCI layout directory, an OCI archive (the default when DEST ends in\n"
               ".tar) or, with --format docker, a `docker save` tarball (layers uncompressed) for docker load.\n"
               "DEST must not exist; it appears only once complete. skopeo, umoci and podman read all three:\n"
               "  skopeo copy oci-archive:out.tar containers-storage:localhost/x   podman load -i out.tar")
    sp.add_argument("ref", metavar="REF")
    sp.add_argument("dest", metavar="DEST")
    sp.add_argument("--format", choices=_FORMATS, help="oci (a directory), oci-archive or docker")
    return p


def layer_parser() -> argparse.ArgumentParser:
    p, sub = _parser(LAYER_PROG, _LAYER_DESCRIPTION)
    sp = _verb(sub, "apply", _layer_apply, "apply a layer tar to an active snapshot",
               "Apply LAYER (a tar, plain, gzip or zstd, with OCI whiteouts) to the active snapshot KEY, as a\n"
               "new layer on what it holds: its paths resolve inside the snapshot's merged view (symlinks\n"
               "followed inside it, never out). All or nothing; KEY must not be mounted.", json_out=True)
    sp.add_argument("key", metavar="KEY")
    sp.add_argument("layer", metavar="LAYER")
    sp = _verb(sub, "diff", _layer_diff, "write the changes of a snapshot as a layer tar",
               "Write the layer of snapshot KEY (an active snapshot, not mounted, or a committed one) as an OCI\n"
               "layer tar to OUTPUT: compressed by its suffix (.tar, .tar.gz/.tgz, .tar.zst) unless\n"
               "--compression says. Its digest and diff-id are printed.", json_out=True)
    sp.add_argument("key", metavar="KEY")
    sp.add_argument("-o", "--output", metavar="OUTPUT", required=True)
    sp.add_argument("--compression", choices=("none", "gzip", "zstd"), help="(default: by OUTPUT's suffix)")
    return p


#: the verbs that create the store when it does not exist
_CREATING = frozenset({"import"})


def _run(args: argparse.Namespace) -> int:
    fb = Feedback(sys.stderr, "quiet" if getattr(args, "quiet", False) else "auto")
    # (the snapshot store's own progress, of deleting layers, is shown for rm only: elsewhere it would name
    # snapshots the command made for its own work)
    progress = for_stream(sys.stderr) if args.verb == "rm" and fb.mode != "quiet" else quiet
    with Snapshotter(args.root, create=args.verb in _CREATING, progress=progress) as sn:
        status: int = args.func(sn, args, fb)
    sys.stdout.flush()
    return status


def _main(parser: argparse.ArgumentParser, prog: str, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(sys.argv[2:] if argv is None else list(argv))
    if args.verb is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return run_command(prog, lambda: _run(args))


def image_main(argv: Sequence[str] | None = None) -> int:
    """Run ``unionfs image ARGV...``; returns the exit status."""
    return _main(image_parser(), IMAGE_PROG, argv)


def layer_main(argv: Sequence[str] | None = None) -> int:
    """Run ``unionfs layer ARGV...``; returns the exit status."""
    return _main(layer_parser(), LAYER_PROG, argv)

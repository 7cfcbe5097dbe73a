"""What the explaining commands (``inspect``, ``tree``, ``layers``, ``explore``) look at: a stack of layer
directories, named by the user in one of four ways, resolved to one value.

* ``--layers L1:L2:... [--upper U]``: plain directories (lowers uppermost first, as ``lowerdir=``);
* ``--snapshot KEY``: a snapshot of a store (its layer on top when active, then its parents');
* ``--image REF``: an imported image (its layers, top first, each labelled with its blob's digest);
* a mount point of unionfs: the stack its server serves, read from the virtual xattr ``user.unionfs.stack``
  of the mount's root (JSON, see :func:`stack_json`).

Nothing here imports pyfuse3 or trio; the snapshot store is loaded only for the two targets that need it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from . import xattrs
from .whiteout import XattrFormat

#: the virtual xattr a unionfs mount serves on every entry: JSON naming its layers (see :func:`stack_json`)
STACK_XATTR = b"user.unionfs.stack"


class TargetError(ValueError):
    """A target that names nothing usable; the message is one line."""


@dataclasses.dataclass(frozen=True)
class StackLayer:
    """One layer of a target: its directory, a label for people, whether it is the writable one, and the
    digest of the image layer it holds (images only)."""

    path: str
    label: str
    writable: bool = False
    digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "label": self.label, "writable": self.writable, "digest": self.digest}


@dataclasses.dataclass(frozen=True)
class Target:
    """A stack of layers, uppermost first (``layers[0]`` is the upper layer when ``writable``), and the xattr
    namespace of its overlay markers."""

    kind: str  # "layers", "snapshot", "image" or "mount"
    name: str
    layers: tuple[StackLayer, ...]
    xattr: XattrFormat

    @property
    def writable(self) -> bool:
        return bool(self.layers) and self.layers[0].writable

    @property
    def dirs(self) -> list[bytes]:
        return [os.fsencode(layer.path) for layer in self.layers]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "xattr": self.xattr.value,
                "layers": [layer.to_json() for layer in self.layers]}


def _fmt_of(userxattr: bool | None) -> XattrFormat:
    if userxattr is not None:
        return XattrFormat.USER if userxattr else XattrFormat.TRUSTED
    # as a mount would read them: trusted.* as root, user.* (-o userxattr) for an ordinary user
    return XattrFormat.USER if os.geteuid() != 0 else XattrFormat.TRUSTED


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the explaining commands that name a stack: ``--layers``/``--snapshot``/``--image``,
    ``--upper``, ``--root``, ``--userxattr``, ``--aufs-markers``."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--layers", metavar="L1:L2:...", help="plain layer directories, top-most lower first")
    which.add_argument("--snapshot", metavar="KEY", help="a snapshot of the store: its layer, then its parents'")
    which.add_argument("--image", metavar="REF", help="an image of the store: its layers, top first")
    p.add_argument("--upper", metavar="DIR", help="with --layers: the upper (writable) layer above them")
    p.add_argument("--root", metavar="DIR", help="with --snapshot or --image: the store (default: the default store)")
    p.add_argument("--userxattr", action=argparse.BooleanOptionalAction, default=None,
                   help="with --layers: markers in user.overlay.* xattrs (default: trusted.* as root, user.* else)")
    p.add_argument("--aufs-markers", action="store_true",
                   help="also honour AUFS .wh. markers in the lower layers (as -o aufs_markers)")


def from_layers(lowers: str | Sequence[str], upper: str | None = None, *, userxattr: bool | None = None) -> Target:
    """Plain layer directories: ``lowers`` uppermost first (a ``:``-separated string or a list)."""
    names = [p for p in lowers.split(":")] if isinstance(lowers, str) else list(lowers)
    if not names or any(not n for n in names):
        raise TargetError("--layers needs one or more directories, separated by ':'")
    layers = []
    if upper is not None:
        layers.append(StackLayer(os.path.abspath(upper), "upper", True))
    for i, n in enumerate(names):
        layers.append(StackLayer(os.path.abspath(n), f"lower {i + 1}"))
    for layer in layers:
        if not os.path.isdir(layer.path):
            raise TargetError(f"{layer.path}: not a directory")
    return Target("layers", ":".join(names), tuple(layers), _fmt_of(userxattr))


def from_snapshot(key: str, root: str | None = None) -> Target:
    """Snapshot ``key`` of the store ``root`` (default: the default store)."""
    from .snapshots import Snapshotter

    with Snapshotter(root, create=False) as sn:
        info = sn.stat(key)
        fs, parents = sn.layer_dirs(key)
        names: list[str] = []
        parent = info.parent
        while parent:
            names.append(parent)
            parent = sn.stat(parent).parent
        layers: list[StackLayer] = []
        if info.kind.value != "view":  # (a view's own directory is empty and never written)
            layers.append(StackLayer(fs, key, info.kind.value == "active"))
        layers += [StackLayer(p, n) for p, n in zip(parents, names, strict=True)]
        return Target("snapshot", key, tuple(layers), XattrFormat(sn.xattr))


def from_image(ref: str, root: str | None = None) -> Target:
    """Image ``ref`` of the store ``root``: its layers, top first, labelled ``layer I/N DIGEST``."""
    from .image._images import load
    from .snapshots import Snapshotter

    with Snapshotter(root, create=False) as sn:
        stored = load(sn, ref)
        chain = sn.image_chain(ref)
        n = len(chain)
        layers = []
        for i, key in reversed(list(enumerate(chain))):
            digest = stored.layers[i].digest if i < len(stored.layers) else None
            short = (digest or key).partition(":")[2][:12]
            layers.append(StackLayer(sn.layer_dirs(key)[0], f"layer {i + 1}/{n} {short}", False, digest))
        return Target("image", ref, tuple(layers), XattrFormat(sn.xattr))


def stack_json(lowers: Sequence[bytes], upper: bytes | None, fmt: XattrFormat) -> bytes:
    """What a unionfs mount serves in ``user.unionfs.stack``: its layers, uppermost first."""
    layers = []
    if upper is not None:
        layers.append({"path": os.fsdecode(upper), "label": "upper", "writable": True})
    layers += [{"path": os.fsdecode(p), "label": f"lower {i + 1}", "writable": False} for i, p in enumerate(lowers)]
    # (ASCII JSON: a path that is not UTF-8 travels as \udcXX escapes, which os.fsencode turns back into its bytes)
    return json.dumps({"xattr": fmt.value, "layers": layers}).encode()


def _on_unionfs(path: str) -> bool:
    """Whether ``path`` lies on a file system mounted as ``fuse.unionfs``."""
    from . import mountinfo

    try:
        dev = os.stat(path).st_dev
        table = mountinfo.read()
    except OSError:
        return False
    return any(e.fstype == b"fuse.unionfs" and os.makedev(e.major, e.minor) == dev for e in table)


def store_labels(paths: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """For the layer directories among ``paths`` that are snapshots of a store (``ROOT/snapshots/N/fs``): a
    label naming the image layer (``IMAGE layer I/N DIGEST``) or else the snapshot, and the image layer's blob
    digest. Stores this process cannot read are left out."""
    out: dict[str, tuple[str, str | None]] = {}
    roots: dict[str, list[str]] = {}
    for p in paths:
        fs_dir = os.path.abspath(p)
        snap, num = os.path.split(os.path.dirname(fs_dir))
        if os.path.basename(fs_dir) == "fs" and os.path.basename(snap) == "snapshots" and num.isdigit():
            root = os.path.dirname(snap)
            if os.path.isfile(os.path.join(root, "metadata.db")):
                roots.setdefault(root, []).append(fs_dir)
    for root, dirs in roots.items():
        try:
            out.update(_labels_in(root, dirs))
        except Exception:  # noqa: BLE001 (a store we cannot read or understand names nothing: labels stay)
            continue
    return out


def _labels_in(root: str, dirs: list[str]) -> dict[str, tuple[str, str | None]]:
    from .image._images import load
    from .snapshots import Snapshotter

    out: dict[str, tuple[str, str | None]] = {}
    with Snapshotter(root, create=False) as sn:
        keys = {sn.layer_dirs(info.name)[0]: info.name for info in sn.walk()}
        wanted = {d: keys[d] for d in dirs if d in keys}
        for d, key in wanted.items():
            out[d] = (f"snapshot {key}", None)
        for image in sn.images():
            chain = sn.image_chain(image.name)
            hits = [(i, d) for d, key in wanted.items() for i, k in enumerate(chain) if k == key]
            if not hits:
                continue
            layers = load(sn, image.name).layers
            for i, d in hits:
                digest = layers[i].digest if i < len(layers) else None
                short = (digest or chain[i]).partition(":")[2][:12]
                out[d] = (f"{image.name} layer {i + 1}/{len(chain)} {short}", digest)
    return out


def relabel(data: Any, labels: dict[str, tuple[str, str | None]]) -> Any:
    """``data`` (JSON of an explanation) with the label and digest of every layer it describes that ``labels``
    names (see :func:`store_labels`)."""
    if isinstance(data, dict):
        out = {k: relabel(v, labels) for k, v in data.items()}
        path = data.get("path")
        if "label" in data and isinstance(path, str) and path in labels:
            out["label"], digest = labels[path]
            if "digest" in data:
                out["digest"] = digest
        return out
    if isinstance(data, list):
        return [relabel(v, labels) for v in data]
    return data


def from_mount(mountpoint: str) -> Target | None:
    """The stack of the unionfs mount at ``mountpoint`` (None when it is no unionfs mount)."""
    value = xattrs.get(os.fsencode(mountpoint), STACK_XATTR)
    if value is None or not _on_unionfs(mountpoint):
        return None  # (a user.unionfs.stack stored on some directory names nothing: only a mount serves it)
    try:
        data = json.loads(value)
        layers = tuple(StackLayer(str(la["path"]), str(la["label"]), bool(la["writable"])) for la in data["layers"])
        named = store_labels([la.path for la in layers])  # (the snapshot or image layer of each, where there is one)
        layers = tuple(dataclasses.replace(la, label=named[la.path][0], digest=named[la.path][1])
                       if la.path in named else la for la in layers)
        return Target("mount", os.path.abspath(mountpoint), layers, XattrFormat(data["xattr"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise TargetError(f"{mountpoint}: {STACK_XATTR.decode()} is malformed: {exc}") from None

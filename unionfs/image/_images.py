"""Images in a snapshot store: import, inspect, remove, commit, export, and one layer into or out of an active
snapshot.

Each layer of an image is the committed snapshot named by its chain ID (the OCI image spec's ChainID), its
parent the one of the layer beneath: images sharing base layers share those snapshots, and an import applies
only the layers the store does not hold. A layer is applied into a fresh active snapshot on its parent (its
paths resolved in the merged view of the layers beneath, see :mod:`._apply`), checked against the config's
diff-id, synced and only then committed under its chain ID: an interrupted or refused import leaves no
snapshot behind. The blobs (manifest, config, layers as they came) go to the store's content store
(:mod:`._content`) so that an export gives back the same layers with the same digests; the image's name is
written last, in one transaction with nothing else.

Nothing here imports pyfuse3 or trio; mounting an image is the command line's business (it mounts the chain
through :func:`unionfs.fuse.server.mount`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, cast

from .. import _sys, xattrs
from ..ownership import OVERRIDE_XATTR, encode_override
from ..snapshots import AlreadyExists, FailedPrecondition, ImageInfo, NotFound, Snapshotter
from ..whiteout import XattrFormat
from ._apply import ApplyResult, apply_layer
from ._content import ContentStore, Tee
from ._diff import DiffResult, write_diff, write_diff_file
from ._feedback import Feedback, human_bytes
from ._oci import (
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    ImageError,
    canonical_json,
    chain_ids,
    json_object,
    layer_compression,
    parse_json,
    sha256_digest,
)
from ._source import Image, ImageSource, open_source
from ._stream import HashingSource, LayerError, LayerStream, digest_hex

#: the label of a committed layer snapshot: the diff-id of its layer
LABEL_DIFF_ID = "unionfs.image/diff-id"
#: the label of an active snapshot an import applies a layer into: "PID@HOST" of the importing process
LABEL_EXTRACTING = "unionfs.image/extracting"
#: the label of an active snapshot made by ``image mount --writable``: the image it was made from
LABEL_IMAGE = "unionfs.image/image"

_LAYER_TYPES = {
    (OCI_MANIFEST, "gzip"): OCI_LAYER_GZIP,
    (OCI_MANIFEST, "zstd"): OCI_LAYER_ZSTD,
    (OCI_MANIFEST, "none"): OCI_LAYER,
    (DOCKER_MANIFEST, "gzip"): DOCKER_LAYER_GZIP,
}


def store_format(sn: Snapshotter) -> XattrFormat:
    """The xattr namespace of the overlay markers in ``sn``'s layers."""
    return XattrFormat(sn.xattr)


def rootless(sn: Snapshotter) -> bool:
    """Whether layers are applied without the privilege to store other owners and device nodes: owners and
    modes then go to ``user.containers.override_stat``."""
    return os.geteuid() != 0 or sn.xattr == "user"


def _root_override(sn: Snapshotter, key: str) -> None:
    """For a store of an ordinary user: give the root directory of the new snapshot ``key`` the owner and mode
    of its parent's root as recorded there (else root's, with its mode on disk), as every other directory of
    an image has them in ``user.containers.override_stat``; without one it would show as this user's."""
    if not rootless(sn):
        return
    upper, lowers = sn.layer_dirs(key)
    if xattrs.get(os.fsencode(upper), OVERRIDE_XATTR) is not None:
        return
    value = xattrs.get(os.fsencode(lowers[0]), OVERRIDE_XATTR) if lowers else None
    if value is None:
        value = encode_override(0, 0, stat.S_IMODE(os.stat(upper).st_mode))
    xattrs.write(os.fsencode(upper), OVERRIDE_XATTR, value)


def _short(digest: str) -> str:
    return digest.partition(":")[2][:12]


# -- import ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LayerReport:
    """What an import did with one layer."""

    index: int
    digest: str
    diff_id: str
    chain_id: str
    size: int
    media_type: str
    #: "applied", "present" (the store held its snapshot and blob) or "present, blob stored"
    state: str
    result: ApplyResult | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "digest": self.digest, "diff_id": self.diff_id,
                               "chain_id": self.chain_id, "size": self.size, "media_type": self.media_type,
                               "state": self.state, "seconds": round(self.seconds, 3)}
        if self.result is not None:
            out["entries"] = self.result.entries
            out["bytes"] = self.result.bytes
            out["whiteouts"] = self.result.whiteouts
            out["opaque_dirs"] = self.result.opaque_dirs
            out["overrides"] = self.result.overrides
            out["dropped_xattrs"] = self.result.dropped_xattrs
        return out


@dataclasses.dataclass
class ImportReport:
    name: str
    manifest_digest: str
    platform: str
    layers: list[LayerReport]
    seconds: float = 0.0

    @property
    def applied(self) -> int:
        return sum(1 for layer in self.layers if layer.state == "applied")

    def summary(self) -> str:
        shared = len(self.layers) - self.applied
        line = (f"imported {self.name} ({self.platform}, {_short(self.manifest_digest)}): "
                f"{len(self.layers)} layers, {self.applied} applied")
        if shared:
            line += f", {shared} already in the store"
        overrides = sum(layer.result.overrides for layer in self.layers if layer.result is not None)
        if overrides:
            line += f"; {overrides} owners/modes this user cannot store recorded in user.containers.override_stat"
        return line + f", in {self.seconds:.1f} s"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "manifest_digest": self.manifest_digest, "platform": self.platform,
                "layers": [layer.to_json() for layer in self.layers], "applied": self.applied,
                "seconds": round(self.seconds, 3)}


def _host() -> str:
    return f"{os.getpid()}@{os.uname().nodename}"


def _remove_stale_extractions(sn: Snapshotter) -> None:
    """Remove the active snapshots of imports that died on this host (their process is gone)."""
    host = os.uname().nodename
    for info in sn.walk():
        owner = info.labels.get(LABEL_EXTRACTING)
        if not owner:
            continue
        pid, _, where = owner.partition("@")
        if where != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(NotFound, FailedPrecondition):
            sn.remove(info.name)


def _committed(sn: Snapshotter, key: str) -> bool:
    try:
        return sn.stat(key).kind.value == "committed"
    except NotFound:
        return False


def _apply_into_snapshot(sn: Snapshotter, key: str, source: BinaryIO, label: str, total: int,
                         feedback: Feedback) -> ApplyResult:
    with sn.editing(key, "apply a layer to") as (upper, lowers), feedback.task(label, total) as update:
        result = apply_layer(source, os.fsencode(upper), fmt=store_format(sn), rootless=rootless(sn),
                             lowers=[os.fsencode(lower) for lower in lowers], progress=update)
        _sys.syncfs(upper)
    return result


def _pick(src: ImageSource, name: str | None, platform: str | None) -> Image:
    """The image of ``src`` that ``name`` names; when it names none and ``src`` holds one image, that one (the
    name is then the name to give it)."""
    if name is None:
        return src.resolve(None, platform)
    try:
        return src.resolve(name, platform)
    except ImageError:
        try:
            return src.resolve(None, platform)
        except ImageError:
            pass
        raise


def _store_checked(content: ContentStore, blob: BinaryIO, desc: Descriptor, diff_id: str, label: str) -> None:
    """Store the layer blob ``blob`` (its digest checked as it is read) after checking that its uncompressed
    content has the diff-id ``diff_id``: a layer whose snapshot the store holds is not applied again, but the
    image must not name other content under that diff-id."""
    with content.writer(desc.digest) as w:
        stream = LayerStream(HashingSource(cast(BinaryIO, Tee(blob, w))))
        while stream.read(_CHUNK):
            pass
        stream.drain()
        if digest_hex(stream.sha) != diff_id:
            raise ImageError(f"{label}: its content has the diff-id {digest_hex(stream.sha)}, the config says "
                             f"{diff_id}")


_CHUNK = 1 << 20


def _refused(label: str, exc: BaseException) -> BaseException:
    """``exc`` naming the layer ``label``, as one of the errors the commands report as refusals."""
    if isinstance(exc, (ImageError, LayerError)):
        return exc if label in str(exc) else type(exc)(f"{label}: {exc}")
    return LayerError(f"{label}: {exc}")


def import_image(sn: Snapshotter, path: str | os.PathLike[str], *, name: str | None = None,
                 platform: str | None = None, feedback: Feedback | None = None) -> ImportReport:
    """Import the image at ``path`` (an OCI layout directory, an OCI archive or a ``docker save`` tarball)
    into ``sn``'s store, under ``name`` (else the image's own name, else its manifest digest).

    ImageError (or LayerError) for a broken or hostile image, naming the blob or entry; the store is then as
    it was (the layers this import committed go again, unless another image uses them meanwhile)."""
    feedback = feedback or Feedback(mode="quiet")
    start = time.monotonic()
    content = ContentStore(sn.root)
    if name is not None:
        sn.check_image_name(name)
    try:
        with content.holding(), open_source(path) as src:
            image = _pick(src, name, platform)
            final = sn.check_image_name(name or image.name or image.manifest_digest)
            _remove_stale_extractions(sn)
            chain = chain_ids(image.diff_ids)
            reports: list[LayerReport] = []
            parent: str | None = None
            for i, (desc, diff_id, chain_id) in enumerate(zip(image.layers, image.diff_ids, chain, strict=True)):
                label = f"layer {i + 1}/{len(chain)} {_short(desc.digest)}"
                report = LayerReport(i + 1, desc.digest, diff_id, chain_id, desc.size, desc.media_type, "applied")
                compression = layer_compression(desc.media_type)  # refuses foreign and unknown types up front
                t0 = time.monotonic()
                if _committed(sn, chain_id):
                    report.state = "present"
                    if not content.has(desc.digest):
                        with src.open_blob(desc, label) as blob:
                            try:
                                _store_checked(content, blob, desc, diff_id, label)
                            except (ValueError, OverflowError) as exc:
                                raise _refused(label, exc) from None
                        report.state = "present, blob stored"
                    feedback.say(f"{label}: already in the store ({_short(chain_id)})")
                else:
                    report.result = _import_layer(sn, src, content, desc, diff_id, chain_id, parent, label,
                                                  compression, src.kind != "docker-archive", feedback)
                    feedback.say(f"{label}: {report.result.summary()} ({human_bytes(desc.size)} in "
                                 f"{time.monotonic() - t0:.1f} s)")
                report.seconds = time.monotonic() - t0
                reports.append(report)
                parent = chain_id
            if (sha256_digest(image.config) != image.config_digest
                    or sha256_digest(image.manifest) != image.manifest_digest):
                raise ImageError("the manifest or config changed while it was read")
            content.put(image.config)
            content.put(image.manifest)
            sn.put_image(final, manifest_digest=image.manifest_digest,
                         manifest_media_type=image.manifest_media_type, config_digest=image.config_digest,
                         top=parent, platform=str(image.platform))
    finally:
        tidy(sn, content)  # layers of a refused import, or of the image this name stood for before
    return ImportReport(final, image.manifest_digest, str(image.platform), reports, time.monotonic() - start)


def _import_layer(sn: Snapshotter, src: ImageSource, content: ContentStore, desc: Descriptor, diff_id: str,
                  chain_id: str, parent: str | None, label: str, compression: str, check_compression: bool,
                  feedback: Feedback) -> ApplyResult:
    """Apply one layer into a fresh active snapshot on ``parent`` and commit it as ``chain_id``."""
    key = f"extract-{secrets.token_hex(6)} {chain_id}"
    sn.prepare(key, parent, labels={LABEL_EXTRACTING: _host()})
    try:
        _root_override(sn, key)
        with src.open_blob(desc, label) as blob, content.writer(desc.digest) as w:
            result = _apply_into_snapshot(sn, key, cast(BinaryIO, Tee(blob, w)), label, desc.size, feedback)
        if result.diff_id != diff_id:
            raise ImageError(f"{label}: its content has the diff-id {result.diff_id}, the config says {diff_id}")
        if check_compression and result.compression != compression:
            raise ImageError(f"{label}: its media type {desc.media_type} says {compression}, its content is "
                             f"{result.compression}")
        try:
            sn.commit(chain_id, key, labels={LABEL_DIFF_ID: diff_id})
        except AlreadyExists:  # another import committed the same layer meanwhile
            sn.remove(key)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            sn.remove(key)
        if isinstance(exc, (ValueError, OverflowError)):
            raise _refused(label, exc) from None
        raise
    return result


def tidy(sn: Snapshotter, content: ContentStore | None = None) -> tuple[list[str], list[str]] | None:
    """Remove the layer snapshots no image uses and nothing is built on (left by a refused import, a name that
    now stands for another image, a removed writable snapshot), and the blobs no image refers to. Done only
    when no import or commit holds the store (None then: the next one tidies). Returns what was removed."""
    content = content or ContentStore(sn.root)
    with content.exclusive() as alone:
        if not alone:
            return None
        images = sn.images()
        used: set[str] = set()
        for info in images:
            used.update(sn.image_chain(info.name))
        snapshots = sn.walk()
        children: dict[str, set[str]] = {}
        for snap in snapshots:
            if snap.parent:
                children.setdefault(snap.parent, set()).add(snap.name)
        candidates = {i.name for i in snapshots if i.kind.value == "committed" and LABEL_DIFF_ID in i.labels
                      and i.name not in used}
        going: set[str] = set()
        changed = True
        while changed:  # a layer goes when every snapshot built on it goes too
            changed = False
            for key in candidates - going:
                if children.get(key, set()) <= going:
                    going.add(key)
                    changed = True
        removed: list[str] = []
        for key in sorted(going, key=lambda k: -len(_depth(sn, k))):
            with contextlib.suppress(NotFound, FailedPrecondition):
                sn.remove(key)
                removed.append(key)
        keep = referenced_blobs(sn, content)
        return removed, content.prune(keep)


def _depth(sn: Snapshotter, key: str) -> list[str]:
    out = []
    parent = sn.stat(key).parent
    while parent:
        out.append(parent)
        parent = sn.stat(parent).parent
    return out


# -- reading ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stored:
    """An image of the store with its manifest and config parsed."""

    info: ImageInfo
    manifest: dict[str, Any]
    config: dict[str, Any]
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]


def load(sn: Snapshotter, name: str, content: ContentStore | None = None) -> Stored:
    content = content or ContentStore(sn.root)
    info = sn.image(name)
    manifest = json_object(parse_json(content.read(info.manifest_digest), "manifest"), "manifest")
    config = json_object(parse_json(content.read(info.config_digest), "config"), "config")
    raw_layers = manifest.get("layers") or []
    layers = tuple(Descriptor.from_json(v, f"manifest layer {i + 1}") for i, v in enumerate(raw_layers))
    rootfs = json_object(config.get("rootfs") or {}, "config rootfs")
    diff_ids = tuple(str(d) for d in rootfs.get("diff_ids") or [])
    return Stored(info, manifest, config, layers, diff_ids)


def inspect(sn: Snapshotter, name: str) -> dict[str, Any]:
    """What the store knows of image ``name``: its record, config, layers and the snapshot chain."""
    s = load(sn, name)
    chain = chain_ids(s.diff_ids)
    layers = []
    for i, (desc, diff_id, chain_id) in enumerate(zip(s.layers, s.diff_ids, chain, strict=False)):
        layers.append({"index": i + 1, "media_type": desc.media_type, "digest": desc.digest, "size": desc.size,
                       "diff_id": diff_id, "chain_id": chain_id, "snapshot": chain_id})
    return {**s.info.to_json(), "layers": layers, "size": sum(d.size for d in s.layers),
            "config": s.config, "chain": sn.image_chain(name)}


def referenced_blobs(sn: Snapshotter, content: ContentStore) -> set[str]:
    """The blobs the images of ``sn`` refer to (an image whose manifest cannot be read keeps every blob: its
    layers are not known)."""
    keep: set[str] = set()
    for info in sn.images():
        keep |= {info.manifest_digest, info.config_digest}
        try:
            keep |= {d.digest for d in load(sn, info.name, content).layers}
        except ImageError:
            return content.digests()
    return keep


def remove(sn: Snapshotter, name: str) -> tuple[list[str], list[str] | None]:
    """Remove image ``name``; returns the snapshots removed with it and the blobs deleted (None: an import was
    running, the blobs stay until the next removal)."""
    removed = sn.remove_image(name)
    tidied = tidy(sn)
    if tidied is None:
        return removed, None
    return removed + tidied[0], tidied[1]


# -- writable snapshots, commit --------------------------------------------------------------------------------


def prepare_writable(sn: Snapshotter, name: str, key: str | None = None) -> str:
    """An active snapshot on top of image ``name``'s layers, for ``image mount --writable``; returns its key."""
    info = sn.image(name)
    key = key or f"{name}@rw-{secrets.token_hex(4)}"
    sn.prepare(key, info.top, labels={LABEL_IMAGE: name})
    try:
        _root_override(sn, key)
    except BaseException:
        with contextlib.suppress(Exception):
            sn.remove(key)
        raise
    return key


def _base_image(sn: Snapshotter, key: str) -> ImageInfo:
    info = sn.stat(key)
    if info.kind.value != "active":
        raise FailedPrecondition(f'snapshot "{key}" is {info.kind.value}; only an active snapshot can be committed')
    wanted = info.labels.get(LABEL_IMAGE)
    candidates = [i for i in sn.images() if i.top == info.parent]
    for image in candidates:
        if image.name == wanted:
            return image
    if candidates:
        return candidates[0]
    raise FailedPrecondition(
        f'snapshot "{key}" is not built on an image: its parent ({info.parent or "none"}) is no image\'s top layer'
    )


def _created(source_date_epoch: int | None) -> str:
    t = source_date_epoch if source_date_epoch is not None else int(time.time())
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass
class CommitReport:
    name: str
    base: str
    manifest_digest: str
    diff: DiffResult
    chain_id: str

    def summary(self) -> str:
        return (f"committed {self.name} (on {self.base}): a new layer {_short(self.diff.digest)}, "
                f"{human_bytes(self.diff.size)}: {self.diff.entries} entries, {self.diff.whiteouts} whiteouts, "
                f"{self.diff.opaque_dirs} opaque directories; manifest {_short(self.manifest_digest)}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "manifest_digest": self.manifest_digest,
                "layer": {"digest": self.diff.digest, "diff_id": self.diff.diff_id, "size": self.diff.size,
                          "entries": self.diff.entries, "whiteouts": self.diff.whiteouts,
                          "opaque_dirs": self.diff.opaque_dirs},
                "chain_id": self.chain_id}


def commit(sn: Snapshotter, key: str, ref: str, *, compression: str = "gzip",
           source_date_epoch: int | None = None, message: str | None = None,
           feedback: Feedback | None = None) -> CommitReport:
    """Make the changes of the active snapshot ``key`` (built on an image) a new layer on top of that image,
    named ``ref``: the layer's diff goes to the content store, the config gains its diff-id and a history
    entry, a new manifest names them all, and the snapshot becomes the committed snapshot of the layer's
    chain ID."""
    feedback = feedback or Feedback(mode="quiet")
    sn.check_image_name(ref)  # before anything changes: a refused name must leave the snapshot as it is
    base = _base_image(sn, key)
    content = ContentStore(sn.root)
    with content.holding():
        s = load(sn, base.name, content)
        media_type = s.info.manifest_media_type
        layer_type = _LAYER_TYPES.get((media_type, compression))
        if layer_type is None:
            raise ImageError(f"a {compression} layer cannot be added to an image whose manifest is {media_type}")
        with sn.editing(key, "commit") as (upper, _lowers), content.writer() as w, \
                feedback.task(f"commit {key}: writing its layer", None) as update:
            diff = write_diff(os.fsencode(upper), cast(BinaryIO, w), fmt=store_format(sn), compression=compression,
                              source_date_epoch=source_date_epoch, overrides=rootless(sn), progress=update)
        config = dict(s.config)
        rootfs = dict(json_object(config.get("rootfs") or {"type": "layers"}, "config rootfs"))
        diff_ids = [*s.diff_ids, diff.diff_id]
        rootfs["diff_ids"] = diff_ids
        config["rootfs"] = rootfs
        created = _created(source_date_epoch)
        config["created"] = created
        entry = {"created": created, "created_by": message or "unionfs image commit"}
        config["history"] = [*(config.get("history") or []), entry]
        config_bytes = canonical_json(config)
        config_digest = content.put(config_bytes)
        manifest = dict(s.manifest)
        config_desc = dict(json_object(manifest.get("config") or {}, "manifest config"))
        config_desc.update(digest=config_digest, size=len(config_bytes))
        manifest["config"] = config_desc
        new_layer = Descriptor(layer_type, diff.digest, diff.size).to_json()
        manifest["layers"] = [*(manifest.get("layers") or []), new_layer]
        manifest_bytes = canonical_json(manifest)
        manifest_digest = content.put(manifest_bytes)
        chain_id = chain_ids(diff_ids)[-1]
        try:
            sn.commit(chain_id, key, labels={LABEL_DIFF_ID: diff.diff_id})
        except AlreadyExists:  # the same layer on the same chain is in the store already
            sn.remove(key)
        sn.put_image(ref, manifest_digest=manifest_digest, manifest_media_type=media_type,
                     config_digest=config_digest, top=chain_id, platform=s.info.platform)
    tidy(sn, content)  # (the image ``ref`` named before, if its layers are used no more)
    return CommitReport(ref, base.name, manifest_digest, diff, chain_id)


# -- export ----------------------------------------------------------------------------------------------------


def export(sn: Snapshotter, name: str, dest: str | os.PathLike[str], fmt: str,
           feedback: Feedback | None = None) -> None:
    """Write image ``name`` to ``dest``: an OCI layout directory (``fmt`` "oci"), an OCI archive
    ("oci-archive") or a ``docker save`` tarball ("docker")."""
    from ._export import write_image

    feedback = feedback or Feedback(mode="quiet")
    content = ContentStore(sn.root)
    s = load(sn, name, content)
    total = sum(d.size for d in s.layers)
    with feedback.task(f"export {name}", total) as update:
        write_image(dest, fmt, name=name, manifest=content.read(s.info.manifest_digest),
                    manifest_media_type=s.info.manifest_media_type, config=content.read(s.info.config_digest),
                    layers=s.layers, open_blob=content.open, progress=lambda n: update(0, n))


# -- one layer in, one layer out -------------------------------------------------------------------------------


def _is_empty(path: str) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def _clone_tree(src: str, dst: str) -> None:
    """A copy of the directory tree ``src`` at ``dst`` (which must not exist) sharing every non-directory by a
    hard link; directories are new, with the owner, mode, times and xattrs of the originals."""
    def copy_dir(s: str, d: str) -> None:
        st = os.lstat(s)
        os.mkdir(d, 0o700)
        for name in xattrs.names(os.fsencode(s)):  # (overlay markers included: they are the layer's)
            value = xattrs.get(os.fsencode(s), name)
            if value is not None:
                with contextlib.suppress(OSError):
                    xattrs.write(os.fsencode(d), name, value)
        with os.scandir(s) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    copy_dir(e.path, os.path.join(d, e.name))
                else:
                    os.link(e.path, os.path.join(d, e.name), follow_symlinks=False)
        with contextlib.suppress(PermissionError):
            os.chown(d, st.st_uid, st.st_gid)
        os.chmod(d, stat.S_IMODE(st.st_mode))
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))

    copy_dir(src, dst)


def apply_to_snapshot(sn: Snapshotter, key: str, layer: str | os.PathLike[str],
                      feedback: Feedback | None = None) -> ApplyResult:
    """Apply the layer tar ``layer`` (plain, gzip or zstd) into the active snapshot ``key``, resolving its
    paths in the merged view of the snapshot over its parents. All or nothing: the layer is applied into a
    copy of the snapshot's layer directory (non-directories shared by hard links) that replaces it only once
    complete."""
    feedback = feedback or Feedback(mode="quiet")
    size = os.stat(layer).st_size
    with sn.editing(key, "apply a layer to") as (upper, lowers), open(layer, "rb") as f, \
            feedback.task(f"apply {os.path.basename(os.fspath(layer))}", size) as update:
        staging = os.path.join(os.path.dirname(upper), f"apply-{secrets.token_hex(4)}")
        try:
            if _is_empty(upper):
                os.mkdir(staging, 0o700)
                st = os.lstat(upper)
                with contextlib.suppress(PermissionError):
                    os.chown(staging, st.st_uid, st.st_gid)
                os.chmod(staging, stat.S_IMODE(st.st_mode))
            else:
                _clone_tree(upper, staging)
            result = apply_layer(f, os.fsencode(staging), fmt=store_format(sn), rootless=rootless(sn),
                                 lowers=[os.fsencode(lower) for lower in lowers], progress=update)
            _sys.syncfs(staging)
            _sys.renameat2(os.fsencode(staging), os.fsencode(upper), _RENAME_EXCHANGE)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(staging, ignore_errors=True)  # (the old layer directory, after the exchange)
    return result


_RENAME_EXCHANGE = 2


def diff_snapshot(sn: Snapshotter, key: str, dest: str | os.PathLike[str], *, compression: str | None = None,
                  source_date_epoch: int | None = None, feedback: Feedback | None = None) -> DiffResult:
    """Write the layer of snapshot ``key`` (an active snapshot, not mounted meanwhile; or a committed one) as
    a layer tar to ``dest``."""
    feedback = feedback or Feedback(mode="quiet")
    with _layer_for_reading(sn, key) as upper, feedback.task(f"diff {key}", None) as update:
        return write_diff_file(os.fsencode(upper), dest, fmt=store_format(sn), compression=compression,
                               source_date_epoch=source_date_epoch, overrides=rootless(sn), progress=update)


@contextlib.contextmanager
def _layer_for_reading(sn: Snapshotter, key: str) -> Iterator[str]:
    if sn.stat(key).kind.value == "active":
        with sn.editing(key, "diff") as (upper, _lowers):
            yield upper
    else:
        yield sn.layer_dirs(key)[0]


__all__: Sequence[str] = (
    "CommitReport", "ImportReport", "LayerReport", "Stored", "apply_to_snapshot", "commit", "diff_snapshot",
    "export", "import_image", "inspect", "load", "prepare_writable", "remove", "rootless", "store_format",
)

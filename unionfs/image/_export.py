"""Writing an image out: an OCI image layout directory, an OCI archive (a tar of one), or a ``docker save``
tarball that ``docker load``, ``podman load`` and ``skopeo docker-archive:`` read.

The output is built beside ``dest`` (a temporary sibling) and only appears at ``dest`` when complete; on any
error the temporary is removed and ``dest`` is untouched. An existing ``dest`` is refused. Every blob is
checked against its digest (and size) as it is copied. Tars are written deterministically: members sorted,
fixed mtimes, owner 0:0 without names, modes 0644/0755.

The docker form stores every layer uncompressed (so its digest is its diff_id), named ``blobs/sha256/<hex>``
in ``manifest.json``, and beside it the OCI layout Docker 25+ writes (``oci-layout``, ``index.json`` and a
manifest naming the uncompressed layers), so that the same file is also an OCI archive.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

from ._oci import (
    CONTAINERD_NAME,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_LAYOUT_FILE,
    OCI_LAYOUT_VERSION,
    PLAIN_LAYER_OF,
    REF_NAME,
    Descriptor,
    ImageError,
    Platform,
    canonical_json,
    check_digest,
    hasher,
    json_object,
    layer_compression,
    parse_json,
    sha256_digest,
)
from ._stream import HashingSource, LayerError, LayerStream

_CHUNK = 1 << 20
_MTIME = 0
FORMATS = ("oci", "oci-archive", "docker")


class _Progress:
    def __init__(self, cb: Callable[[int], None] | None) -> None:
        self._cb = cb
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n
        if self._cb is not None and n:
            self._cb(self.done)


class _Checked:
    """A stored blob read for copying: counted, hashed, and compared with its descriptor at :meth:`check`."""

    def __init__(self, f: BinaryIO, digest: str, size: int, progress: _Progress) -> None:
        self._f, self._digest, self._size, self._progress = f, digest, size, progress
        self._sha = hasher(digest)
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._sha.update(data)
        self.count += len(data)
        self._progress.add(len(data))
        return data

    def check(self) -> None:
        if self.count == self._size and self._f.read(1):
            self.count += 1
        if self.count != self._size:
            raise ImageError(f"blob {self._digest}: {self.count} bytes stored, {self._size} declared")
        got = self._digest.partition(":")[0] + ":" + self._sha.hexdigest()
        if got != self._digest:
            raise ImageError(f"blob {self._digest}: stored content hashes to {got}")


def _blob_name(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    return f"blobs/{algo}/{hexd}"


def _platform_of(config: bytes) -> tuple[Platform | None, list[str]]:
    cfg = json_object(parse_json(config, "config"), "config")
    plat = None
    if isinstance(cfg.get("os"), str) and isinstance(cfg.get("architecture"), str):
        variant = cfg.get("variant")
        plat = Platform(cfg["os"], cfg["architecture"], variant if isinstance(variant, str) else "")
    rootfs = cfg.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise ImageError("config: rootfs.diff_ids missing")
    return plat, [check_digest(d, "config: rootfs.diff_ids") for d in diff_ids]


def _index(name: str | None, manifest: bytes, media_type: str, plat: Platform | None, tag_only: bool) -> bytes:
    annotations: dict[str, str] = {}
    if name is not None:
        if tag_only:
            annotations[CONTAINERD_NAME] = name
            annotations[REF_NAME] = _split_tag(name)[1]
        else:
            annotations[REF_NAME] = name
    desc = Descriptor(media_type, sha256_digest(manifest), len(manifest), annotations, plat)
    return canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc.to_json()]})


def _split_tag(name: str) -> tuple[str, str]:
    """``repo`` and ``tag`` of a reference (``latest`` when it has none)."""
    base = name.partition("@")[0]
    slash = base.rfind("/")
    colon = base.rfind(":")
    if colon > slash:
        return base[:colon], base[colon + 1 :]
    return base, "latest"


class _TarOut:
    """A deterministic tar being written."""

    def __init__(self, f: BinaryIO) -> None:
        self._tf = tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._dirs: set[str] = set()

    def _info(self, name: str, kind: bytes, size: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.size = size
        ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        ti.mtime = _MTIME
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    def dirs(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._dirs:
                self._dirs.add(d)
                self._tf.addfile(self._info(d + "/", tarfile.DIRTYPE))

    def add(self, name: str, data: bytes) -> None:
        self.dirs(name)
        self._tf.addfile(self._info(name, tarfile.REGTYPE, len(data)), io.BytesIO(data))

    def add_stream(self, name: str, size: int, f: Any, what: str = "") -> None:
        self.dirs(name)
        try:
            self._tf.addfile(self._info(name, tarfile.REGTYPE, size), f)
        except OSError as exc:
            if "unexpected end of data" in str(exc):
                raise ImageError(f"{what or name}: stored blob shorter than its declared {size} bytes") from None
            raise

    def close(self) -> None:
        self._tf.close()


class _DirOut:
    """A layout directory being written."""

    def __init__(self, top: str) -> None:
        self._top = top

    def _path(self, name: str) -> str:
        path = os.path.join(self._top, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def add(self, name: str, data: bytes) -> None:
        with open(self._path(name), "wb") as f:
            f.write(data)
            os.fsync(f.fileno())

    def add_stream(self, name: str, size: int, src: Any, what: str = "") -> None:
        with open(self._path(name), "wb") as f:
            while data := src.read(_CHUNK):
                f.write(data)
            os.fsync(f.fileno())


@contextlib.contextmanager
def _opened(open_blob: Callable[[str], BinaryIO], digest: str) -> Iterator[BinaryIO]:
    try:
        f = open_blob(digest)
    except (FileNotFoundError, KeyError):
        raise ImageError(f"blob {digest} missing from the store") from None
    try:
        yield f
    finally:
        f.close()


def _copy_blob(out: _TarOut | _DirOut, desc: Descriptor, open_blob: Callable[[str], BinaryIO], prog: _Progress) -> None:
    with _opened(open_blob, desc.digest) as f:
        src = _Checked(f, desc.digest, desc.size, prog)
        out.add_stream(_blob_name(desc.digest), desc.size, src, f"blob {desc.digest}")
        src.check()


def _write_oci(out: _TarOut | _DirOut, name: str | None, manifest: bytes, manifest_media_type: str, config: bytes,
               layers: Sequence[Descriptor], open_blob: Callable[[str], BinaryIO], prog: _Progress) -> None:
    plat, _ = _platform_of(config)
    files: dict[str, bytes] = {
        OCI_LAYOUT_FILE: canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}),
        "index.json": _index(name, manifest, manifest_media_type, plat, tag_only=False),
        _blob_name(sha256_digest(manifest)): manifest,
        _blob_name(sha256_digest(config)): config,
    }
    streams = {_blob_name(d.digest): d for d in layers}
    for key in sorted(set(files) | set(streams)):
        if key in files:
            out.add(key, files[key])
            prog.add(len(files[key]))
        else:
            _copy_blob(out, streams[key], open_blob, prog)


def _uncompress(desc: Descriptor, diff_id: str, open_blob: Callable[[str], BinaryIO], spool: str,
                prog: _Progress) -> int:
    """The layer ``desc`` uncompressed into the file ``spool``, checked against its digest and ``diff_id``."""
    with _opened(open_blob, desc.digest) as f, open(spool, "wb") as out:
        src = HashingSource(f)
        try:
            stream = LayerStream(src)
            while data := stream.read(_CHUNK):
                out.write(data)
                prog.add(len(data))
        except LayerError as exc:
            raise ImageError(f"layer {desc.digest}: {exc}") from None
        if src.read(1):
            raise ImageError(f"layer {desc.digest}: data after the end of the compressed stream")
        got = "sha256:" + src.sha.hexdigest()
        if src.count != desc.size or got != desc.digest:
            raise ImageError(f"layer {desc.digest}: stored blob is {src.count} bytes hashing to {got}")
        got = "sha256:" + stream.sha.hexdigest()
        if got != diff_id:
            raise ImageError(f"layer {desc.digest}: uncompressed content hashes to {got}, not its diff_id {diff_id}")
        return stream.count


def _write_docker(out: _TarOut, name: str | None, manifest: bytes, manifest_media_type: str, config: bytes,
                  layers: Sequence[Descriptor], open_blob: Callable[[str], BinaryIO], prog: _Progress,
                  spool_dir: str) -> None:
    plat, diff_ids = _platform_of(config)
    if len(diff_ids) != len(layers):
        raise ImageError(f"config: {len(diff_ids)} diff_ids for {len(layers)} layers")
    config_digest = sha256_digest(config)
    sizes: dict[str, int] = {}
    spools: dict[str, str] = {}
    for i, (desc, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
        layer_compression(desc.media_type)
        if diff_id in spools:
            continue
        spools[diff_id] = os.path.join(spool_dir, f"layer{i}")
        sizes[diff_id] = _uncompress(desc, diff_id, open_blob, spools[diff_id], prog)
    man = json_object(parse_json(manifest, "manifest"), "manifest")
    plain = PLAIN_LAYER_OF.get(manifest_media_type, PLAIN_LAYER_OF[DOCKER_MANIFEST])
    man["layers"] = [
        dict(json_object(old, "manifest: layer"), mediaType=plain, digest=d, size=sizes[d])
        for old, d in zip(man.get("layers") or [], diff_ids, strict=True)
    ]
    new_manifest = canonical_json(man)
    repo_tags = [":".join(_split_tag(name))] if name is not None else []
    files: dict[str, bytes] = {
        "manifest.json": canonical_json([{
            "Config": _blob_name(config_digest),
            "RepoTags": repo_tags,
            "Layers": [_blob_name(d) for d in diff_ids],
        }]),
        OCI_LAYOUT_FILE: canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}),
        "index.json": _index(repo_tags[0] if repo_tags else None, new_manifest, manifest_media_type, plat,
                             tag_only=True),
        _blob_name(sha256_digest(new_manifest)): new_manifest,
        _blob_name(config_digest): config,
    }
    streams = {_blob_name(d): d for d in spools}
    for key in sorted(set(files) | set(streams)):
        if key in files:
            out.add(key, files[key])
            prog.add(len(files[key]))
        else:
            d = streams[key]
            with open(spools[d], "rb") as f:
                out.add_stream(key, sizes[d], f)
            os.unlink(spools[d])


def _place(tmp: str, dest: str) -> None:
    """``tmp`` renamed to ``dest``, never replacing a ``dest`` that appeared meanwhile (a hard link where the
    file system makes them)."""
    try:
        os.link(tmp, dest)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(dest):
            raise FileExistsError(f"{dest}: already exists") from None
        os.rename(tmp, dest)
    else:
        os.unlink(tmp)


def write_image(
    dest: str | os.PathLike[str],
    fmt: str,
    *,
    name: str | None,
    manifest: bytes,
    manifest_media_type: str,
    config: bytes,
    layers: Sequence[Descriptor],
    open_blob: Callable[[str], BinaryIO],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write one image to ``dest`` as ``fmt``: "oci" (a layout directory), "oci-archive" (a tar of one) or
    "docker" (a ``docker save`` tarball). ``open_blob(digest)`` opens a stored blob (the layers; manifest and
    config are given as bytes). ``progress`` is called with the bytes written so far. ``dest`` must not exist
    (:class:`FileExistsError`); nothing is left behind on error."""
    if fmt not in FORMATS:
        raise ImageError(f"unknown image format {fmt!r} (one of {', '.join(FORMATS)})")
    dest = os.path.abspath(os.fspath(dest))
    if os.path.lexists(dest):
        raise FileExistsError(f"{dest}: already exists")
    parent, base = os.path.split(dest)
    prog = _Progress(progress)
    for d in layers:
        check_digest(d.digest, "layer")
        layer_compression(d.media_type)
    if fmt == "oci":
        tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
        try:
            _write_oci(_DirOut(tmp), name, manifest, manifest_media_type, config, layers, open_blob, prog)
            os.chmod(tmp, 0o755)
            if os.path.lexists(dest):
                raise FileExistsError(f"{dest}: already exists")
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
    spool_dir = None
    try:
        with os.fdopen(fd, "wb") as f:
            out = _TarOut(f)
            if fmt == "oci-archive":
                _write_oci(out, name, manifest, manifest_media_type, config, layers, open_blob, prog)
            else:
                spool_dir = tempfile.mkdtemp(prefix=f".{base}.", suffix=".layers", dir=parent)
                _write_docker(out, name, manifest, manifest_media_type, config, layers, open_blob, prog, spool_dir)
            out.close()
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        _place(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        if spool_dir is not None:
            shutil.rmtree(spool_dir, ignore_errors=True)

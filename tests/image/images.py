"""Building test images (OCI layout, OCI archive, ``docker save`` tarballs) from layer tar bytes.

Layers come from ``layers.build`` (uncompressed tar bytes); :func:`image` compresses them and makes the config
and manifest. The writers lay the image out on disk. To test broken input, either change the JSON before it is
hashed (``config_hook`` / ``manifest_hook`` / ``index_hook`` / ``manifest_json_hook``: functions that edit the
decoded dict in place), or edit the files afterwards: every writer has a directory form (``*_dir``) and
:func:`tar_dir` makes the archive from a directory, so a test can write a directory, break a file in it
(:func:`blob_path`, :func:`edit_json`) and then tar it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = {
    "none": "application/vnd.docker.image.rootfs.diff.tar",
    "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",  # Docker has no zstd type of its own
}
REF_NAME = "org.opencontainers.image.ref.name"
MTIME = 1_600_000_000

Hook = Callable[[dict[str, Any]], None]


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hex_of(dig: str) -> str:
    return dig.split(":", 1)[1]


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def compress(data: bytes, how: str) -> bytes:
    if how == "none":
        return data
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    raise ValueError(how)


@dataclass
class Built:
    """One image: its manifest and config (bytes as stored) and every blob by digest (manifest and config too)."""

    manifest: bytes
    config: bytes
    blobs: dict[str, bytes]
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]
    diff_ids: list[str]
    manifest_media_type: str
    #: the layers as uncompressed tars (what a classic ``docker save`` stores)
    uncompressed: list[bytes] = field(default_factory=list)
    platform: dict[str, str] = field(default_factory=dict)

    def descriptor(self) -> dict[str, Any]:
        """The manifest's descriptor with its platform (what an index lists)."""
        return {
            "mediaType": self.manifest_media_type,
            "digest": self.manifest_digest,
            "size": len(self.manifest),
            "platform": dict(self.platform),
        }

    def manifest_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.manifest)
        return out

    def config_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.config)
        return out


def image(
    layers: list[bytes],
    *,
    compress: Sequence[str] | str = "gzip",
    docker_media_types: bool = False,
    arch: str = "amd64",
    os_: str = "linux",
    variant: str = "",
    history: bool = True,
    config_extra: dict[str, Any] | None = None,
    layer_media_types: Sequence[str] | None = None,
    config_hook: Hook | None = None,
    manifest_hook: Hook | None = None,
) -> Built:
    """An image of ``layers`` (uncompressed tar bytes, lowest first). ``compress`` is one method for all layers
    or one per layer ("none", "gzip", "zstd"). ``layer_media_types`` overrides the layers' media types. The
    hooks edit the config / manifest dicts before they are serialized and hashed (the manifest hook sees the
    config descriptor already made)."""
    methods = [compress] * len(layers) if isinstance(compress, str) else list(compress)
    assert len(methods) == len(layers)
    blobs: dict[str, bytes] = {}
    diff_ids = [digest(raw) for raw in layers]
    descs: list[dict[str, Any]] = []
    layer_digests: list[str] = []
    for i, (raw, how) in enumerate(zip(layers, methods, strict=True)):
        blob = _compress(raw, how)
        d = digest(blob)
        blobs[d] = blob
        layer_digests.append(d)
        mt = (DOCKER_LAYER if docker_media_types else OCI_LAYER)[how]
        if layer_media_types is not None:
            mt = layer_media_types[i]
        descs.append({"mediaType": mt, "digest": d, "size": len(blob)})
    cfg: dict[str, Any] = {
        "architecture": arch,
        "os": os_,
        "created": "2020-09-13T12:26:40Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    if variant:
        cfg["variant"] = variant
    if history:
        cfg["history"] = [{"created": "2020-09-13T12:26:40Z", "created_by": f"layer {i}"} for i in range(len(layers))]
    if config_extra:
        cfg.update(config_extra)
    if config_hook:
        config_hook(cfg)
    config = canonical(cfg)
    config_digest = digest(config)
    blobs[config_digest] = config
    mmt = DOCKER_MANIFEST if docker_media_types else OCI_MANIFEST
    man: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mmt,
        "config": {"mediaType": DOCKER_CONFIG if docker_media_types else OCI_CONFIG, "digest": config_digest,
                   "size": len(config)},
        "layers": descs,
    }
    if manifest_hook:
        manifest_hook(man)
    manifest = canonical(man)
    manifest_digest = digest(manifest)
    blobs[manifest_digest] = manifest
    platform = {"architecture": arch, "os": os_}
    if variant:
        platform["variant"] = variant
    return Built(
        manifest=manifest,
        config=config,
        blobs=blobs,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layer_digests=layer_digests,
        diff_ids=diff_ids,
        manifest_media_type=mmt,
        uncompressed=list(layers),
        platform=platform,
    )


_compress = compress


def blob_path(root: Path, dig: str) -> Path:
    """Where a blob lives in a layout directory."""
    algo, hexd = dig.split(":", 1)
    return root / "blobs" / algo / hexd


def edit_json(path: Path, hook: Hook) -> None:
    """Rewrite a JSON file after ``hook`` edited its dict (a top-level list is passed wrapped: ``{"": [...]}``)."""
    obj = json.loads(path.read_bytes())
    if isinstance(obj, list):
        box = {"": obj}
        hook(box)
        obj = box[""]
    else:
        hook(obj)
    path.write_bytes(canonical(obj))


def _put(root: Path, data: bytes) -> str:
    d = digest(data)
    p = blob_path(root, d)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return d


def write_oci_layout_dir(
    dest: Path,
    images: list[tuple[str | None, Built]],
    *,
    index_of_platforms: bool = False,
    index_hook: Hook | None = None,
    nested_index_hook: Hook | None = None,
    docker_media_types: bool = False,
) -> Path:
    """An OCI image layout directory at ``dest``: every image's blobs and ``index.json`` listing one manifest
    per image (with its platform, and the ref name annotation when a name is given). With ``index_of_platforms``
    the images go into one nested image index (a multi-platform image), listed under the first image's name."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))
    for _, b in images:
        for data in b.blobs.values():
            _put(dest, data)
    entries: list[dict[str, Any]] = []
    if index_of_platforms:
        nested: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": DOCKER_LIST if docker_media_types else OCI_INDEX,
            "manifests": [b.descriptor() for _, b in images],
        }
        if nested_index_hook:
            nested_index_hook(nested)
        raw = canonical(nested)
        d = _put(dest, raw)
        entry: dict[str, Any] = {"mediaType": DOCKER_LIST if docker_media_types else OCI_INDEX, "digest": d,
                                 "size": len(raw)}
        if images and images[0][0] is not None:
            entry["annotations"] = {REF_NAME: images[0][0]}
        entries.append(entry)
    else:
        for name, b in images:
            entry = b.descriptor()
            if name is not None:
                entry["annotations"] = {REF_NAME: name}
            entries.append(entry)
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    if index_hook:
        index_hook(index)
    (dest / "index.json").write_bytes(canonical(index))
    return dest


def write_oci_layout(dest: Path, images: list[tuple[str | None, Built]], index_of_platforms: bool = False,
                     **kw: Any) -> Path:
    return write_oci_layout_dir(dest, images, index_of_platforms=index_of_platforms, **kw)


def tar_dir(src: Path, dest: Path, *, gzip_it: bool = False) -> Path:
    """``src``'s contents as a tar file ``dest`` (sorted, fixed times, owner 0), without a leading ``./``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for n in sorted(dirnames + filenames):
                p = Path(dirpath, n)
                ti = tf.gettarinfo(str(p), str(p.relative_to(src)))
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                ti.mtime = MTIME
                if ti.isreg():
                    with p.open("rb") as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
    data = buf.getvalue()
    dest.write_bytes(gzip.compress(data, mtime=0) if gzip_it else data)
    return dest


def write_oci_archive(dest: Path, images: list[tuple[str | None, Built]], index_of_platforms: bool = False,
                      **kw: Any) -> Path:
    """An OCI layout (see :func:`write_oci_layout_dir`) as a tar file."""
    work = dest.with_name(dest.name + ".d")
    write_oci_layout_dir(work, images, index_of_platforms=index_of_platforms, **kw)
    tar_dir(work, dest)
    _rmtree(work)
    return dest


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p)


def chain_ids(diff_ids: list[str]) -> list[str]:
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else digest(f"{out[-1]} {d}".encode()))
    return out


def write_docker_save_dir(
    dest: Path,
    images: list[tuple[list[str], Built]],
    form: str = "classic",
    *,
    manifest_json_hook: Hook | None = None,
) -> Path:
    """The files of a ``docker save`` tarball in a directory ``dest``.

    classic (Docker < 25): ``<config hex>.json``, ``<layer id>/layer.tar`` (uncompressed), ``<id>/VERSION``,
    ``<id>/json``, ``manifest.json`` and ``repositories``. oci (Docker 25+): an OCI layout whose blobs keep the
    image's layers as built, plus ``manifest.json`` naming ``blobs/sha256/<hex>`` and ``repositories``.
    ``manifest_json_hook`` sees ``{"": [entries]}``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    repositories: dict[str, dict[str, str]] = {}
    if form == "classic":
        for tags, b in images:
            cfg_name = hex_of(b.config_digest) + ".json"
            (dest / cfg_name).write_bytes(b.config)
            names = []
            parent = ""
            for cid, raw in zip(chain_ids(b.diff_ids), b.uncompressed, strict=True):
                lid = hex_of(cid)
                (dest / lid).mkdir(exist_ok=True)
                (dest / lid / "layer.tar").write_bytes(raw)
                (dest / lid / "VERSION").write_bytes(b"1.0")
                v1: dict[str, Any] = {"id": lid, "created": "2020-09-13T12:26:40Z"}
                if parent:
                    v1["parent"] = parent
                (dest / lid / "json").write_bytes(canonical(v1))
                names.append(f"{lid}/layer.tar")
                parent = lid
            entries.append({"Config": cfg_name, "RepoTags": list(tags), "Layers": names})
            for t in tags:
                repo, _, tag = t.rpartition(":")
                repositories.setdefault(repo, {})[tag] = parent
    elif form == "oci":
        layout: list[tuple[str | None, Built]] = [(tags[0] if tags else None, b) for tags, b in images]
        write_oci_layout_dir(dest, layout)
        idx = json.loads((dest / "index.json").read_bytes())
        for entry, (tags, _) in zip(idx["manifests"], images, strict=True):
            if tags:
                entry["annotations"] = {"io.containerd.image.name": tags[0], REF_NAME: tags[0].rpartition(":")[2]}
        (dest / "index.json").write_bytes(canonical(idx))
        for tags, b in images:
            entries.append({
                "Config": "blobs/sha256/" + hex_of(b.config_digest),
                "RepoTags": list(tags),
                "Layers": ["blobs/sha256/" + hex_of(d) for d in b.layer_digests],
            })
            for t in tags:
                repo, _, tag = t.rpartition(":")
                repositories.setdefault(repo, {})[tag] = hex_of(b.layer_digests[-1]) if b.layer_digests else ""
    else:
        raise ValueError(form)
    box = {"": entries}
    if manifest_json_hook:
        manifest_json_hook(box)
    (dest / "manifest.json").write_bytes(canonical(box[""]))
    if repositories:
        (dest / "repositories").write_bytes(canonical(repositories))
    return dest


def write_docker_save(dest: Path, images: list[tuple[list[str], Built]], form: str = "classic", **kw: Any) -> Path:
    """A ``docker save`` tarball (see :func:`write_docker_save_dir`)."""
    work = dest.with_name(dest.name + ".d")
    write_docker_save_dir(work, images, form, **kw)
    tar_dir(work, dest)
    _rmtree(work)
    return dest

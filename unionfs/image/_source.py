"""Reading images: an OCI image layout (a directory), an OCI archive (a tar of one) and ``docker save``
tarballs (the classic form, and the Docker 25+ form that is an OCI layout plus ``manifest.json``).

:func:`open_source` detects the kind; :meth:`ImageSource.resolve` picks one image (by ref name or RepoTag, and
by platform in an image index), reads its manifest and config, checks them against their descriptors and
their schemas, and returns an :class:`Image`. :meth:`ImageSource.open_blob` gives a blob's bytes, checked
against the descriptor's size and digest while they are read. Archives are read in place: members are found
by their offsets in the tar file, nothing is extracted.

Not done here: gzip-compressed archives are refused (decompress them first); image indexes are followed at most
four deep; of a docker archive's ``manifest.json`` only ``Config``, ``RepoTags`` and ``Layers`` are read
(``LayerSources`` and the legacy ``repositories`` file are ignored).
"""

from __future__ import annotations

import dataclasses
import io
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from types import TracebackType
from typing import Any, BinaryIO, cast

from ._oci import (
    CONFIG_TYPES,
    CONTAINERD_NAME,
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER_ZSTD,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_JSON,
    OCI_LAYOUT_FILE,
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
)

_CHUNK = 1 << 20
_MAX_INDEX_DEPTH = 4
_MAX_LINKS = 16
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclasses.dataclass(frozen=True)
class Image:
    """One resolved image: its manifest and config as stored, its layers (lowest first) and their diff_ids."""

    name: str | None
    manifest: bytes
    manifest_digest: str
    manifest_media_type: str
    config: bytes
    config_digest: str
    config_media_type: str
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]
    platform: Platform


# -- where the files are: a directory or a tar file ------------------------------------------------------------


def _clean(path: str, what: str) -> str:
    """A path inside the image, normalized; absolute paths and paths climbing out are refused."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise ImageError(f"{what}: bad path {path!r}")
    if path.startswith("/"):
        raise ImageError(f"{what}: path {path!r} is absolute")
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../"):
        raise ImageError(f"{what}: path {path!r} escapes the image")
    return norm


class _Files:
    """The files of an image, by path relative to its top."""

    def size(self, path: str, what: str) -> int | None:
        """The size of the regular file at ``path``, or None if there is none."""
        raise NotImplementedError

    def open(self, path: str, what: str) -> BinaryIO:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def read_small(self, path: str, what: str) -> bytes:
        size = self.size(path, what)
        if size is None:
            raise ImageError(f"{what}: {path} missing")
        if size > MAX_JSON:
            raise ImageError(f"{what}: {path} is too large ({size} bytes)")
        with self.open(path, what) as f:
            return f.read(MAX_JSON + 1)


class _DirFiles(_Files):
    def __init__(self, top: str) -> None:
        self._top = os.path.realpath(top)

    def _real(self, path: str, what: str) -> str:
        real = os.path.realpath(os.path.join(self._top, _clean(path, what)))
        if real != self._top and not real.startswith(self._top + os.sep):
            raise ImageError(f"{what}: {path} leads out of the image directory (symlink)")
        return real

    def size(self, path: str, what: str) -> int | None:
        try:
            st = os.stat(self._real(path, what))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ImageError(f"{what}: {path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{what}: {path} is not a regular file")
        return st.st_size

    def open(self, path: str, what: str) -> BinaryIO:
        try:
            return open(self._real(path, what), "rb")  # noqa: SIM115
        except OSError as exc:
            raise ImageError(f"{what}: {path}: {exc.strerror}") from None


class _Section(io.RawIOBase):
    """``size`` bytes of a file from ``offset`` (a tar member's data), read with pread."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        super().__init__()
        self._fd, self._pos, self._end = fd, offset, offset + size

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        left = self._end - self._pos
        if n is None or n < 0:
            n = left
        n = min(n, left)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._pos)
        if not data:
            raise ImageError("archive truncated inside a member")
        self._pos += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


class _TarFiles(_Files):
    """The members of a tar file, found once by reading the headers; data read in place."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "rb")  # noqa: SIM115
        try:
            head = self._f.read(4)
            if head.startswith(_GZIP_MAGIC) or head.startswith(_ZSTD_MAGIC):
                raise ImageError(f"{path}: compressed archive; decompress it first")
            self._f.seek(0)
            self._members: dict[str, tarfile.TarInfo] = {}
            try:
                with tarfile.open(fileobj=self._f, mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
                    for m in tf:
                        try:
                            name = _clean(m.name, "archive member")
                        except ImageError:
                            continue  # never looked up
                        self._members[name] = m
            except tarfile.TarError as exc:
                raise ImageError(f"{path}: not a readable tar archive: {exc}") from None
        except BaseException:
            self._f.close()
            raise

    def names(self) -> set[str]:
        return set(self._members)

    def _member(self, path: str, what: str) -> tarfile.TarInfo | None:
        name = _clean(path, what)
        for _ in range(_MAX_LINKS):
            m = self._members.get(name)
            if m is None:
                return None
            if m.issym():
                name = _clean(posixpath.join(posixpath.dirname(name), m.linkname), f"{what}: symlink {name}")
            elif m.islnk():
                name = _clean(m.linkname, f"{what}: hard link {name}")
            elif m.isreg() and not m.issparse():
                return m
            else:
                raise ImageError(f"{what}: archive member {name} is not a regular file")
        raise ImageError(f"{what}: too many links resolving {path}")

    def size(self, path: str, what: str) -> int | None:
        m = self._member(path, what)
        return None if m is None else m.size

    def open(self, path: str, what: str) -> BinaryIO:
        m = self._member(path, what)
        if m is None:
            raise ImageError(f"{what}: {path} missing")
        return cast(BinaryIO, _Section(self._f.fileno(), m.offset_data, m.size))

    def close(self) -> None:
        self._f.close()


# -- checked reads -----------------------------------------------------------------------------------------------


class _Verified(io.RawIOBase):
    """A blob's bytes, checked against the declared size (as they come) and digest (at the end)."""

    def __init__(self, raw: BinaryIO, desc: Descriptor, what: str) -> None:
        super().__init__()
        self._raw, self._desc, self._what = raw, desc, what
        self._left = desc.size
        self._sha = hasher(desc.digest)
        self._done = False

    def readable(self) -> bool:
        return True

    def _finish(self) -> None:
        if self._raw.read(1):
            d = self._desc
            raise ImageError(f"{self._what}: blob {d.digest} is larger than declared ({d.size} bytes)")
        got = self._desc.digest.partition(":")[0] + ":" + self._sha.hexdigest()
        if got != self._desc.digest:
            raise ImageError(f"{self._what}: blob {self._desc.digest} digest mismatch: its content hashes to {got}")
        self._done = True

    def read(self, n: int | None = -1) -> bytes:
        if self._done:
            return b""
        want = self._left if n is None or n < 0 else min(n, self._left)
        parts: list[bytes] = []
        while want > 0:
            data = self._raw.read(min(want, 1 << 24))
            if not data:
                raise ImageError(
                    f"{self._what}: blob {self._desc.digest} is shorter than declared "
                    f"({self._desc.size - self._left} of {self._desc.size} bytes)"
                )
            parts.append(data)
            self._sha.update(data)
            self._left -= len(data)
            want -= len(data)
            if n is not None and n >= 0:
                break
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        if self._left == 0:
            self._finish()
        return out

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


# -- the source --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Entry:
    """One image listed at the top: a descriptor (OCI) or a manifest.json entry (docker)."""

    name: str | None
    #: every name it answers to (its ref name annotations, or its RepoTags)
    names: tuple[str, ...]
    desc: Descriptor | None = None
    docker: dict[str, Any] | None = None


def _normalize_ref(ref: str) -> str:
    """A reference with Docker's defaults made explicit (``x`` is ``docker.io/library/x:latest``)."""
    name, digest = ref, ""
    if "@" in ref:
        name, _, digest = ref.partition("@")
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and not digest:
        name += ":latest"
    first, sep, rest = name.partition("/")
    if not sep or ("." not in first and ":" not in first and first != "localhost"):
        name = "docker.io/" + name
    first, _, rest = name.partition("/")
    if first == "docker.io" and "/" not in rest:
        name = "docker.io/library/" + rest
    return name + ("@" + digest if digest else "")


def _ref_matches(ref: str, want: str) -> int:
    """How well ``ref`` answers to ``want``: 3 exactly, 2 as its tag, 1 after Docker's normalization, else 0."""
    if ref == want:
        return 3
    if "/" not in want and ":" not in want and "@" not in want and ref.endswith(":" + want):
        return 2
    return 1 if _normalize_ref(ref) == _normalize_ref(want) else 0


class ImageSource:
    """An image store on disk: an OCI layout directory, an OCI archive or a docker archive."""

    kind: str

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._paths: dict[str, str] = {}
        self._files: _Files
        self._docker: list[dict[str, Any]] | None = None
        if os.path.isdir(self.path):
            self._files = _DirFiles(self.path)
            have = [self._files.size(n, self.path) is not None for n in (OCI_LAYOUT_FILE, "index.json")]
            if not all(have):
                raise ImageError(f"{self.path}: not an OCI image layout (no oci-layout and index.json)")
            self.kind = "oci-layout"
        elif os.path.isfile(self.path):
            files = _TarFiles(self.path)
            self._files = files
            names = files.names()
            if "manifest.json" in names:
                self.kind = "docker-archive"
            elif "index.json" in names:
                self.kind = "oci-archive"
            else:
                files.close()
                raise ImageError(f"{self.path}: not an OCI archive (index.json) or a docker archive (manifest.json)")
        else:
            raise ImageError(f"{self.path}: no such image file or directory")
        try:
            self._entries = self._read_entries()
        except BaseException:
            self._files.close()
            raise

    # -- top level

    def _read_entries(self) -> list[_Entry]:
        if self.kind == "docker-archive":
            return self._docker_entries()
        if self.kind == "oci-layout" or self._files.size(OCI_LAYOUT_FILE, self.path) is not None:
            layout = json_object(parse_json(self._files.read_small(OCI_LAYOUT_FILE, "oci-layout"), "oci-layout"),
                                 "oci-layout")
            version = layout.get("imageLayoutVersion")
            if not isinstance(version, str) or not version.startswith("1."):
                raise ImageError(f"oci-layout: unsupported imageLayoutVersion {version!r}")
        out = []
        for desc in self._index_json():
            names = tuple(n for n in (desc.annotations.get(REF_NAME), desc.annotations.get(CONTAINERD_NAME)) if n)
            out.append(_Entry(desc.annotations.get(REF_NAME) or (names[0] if names else None), names, desc=desc))
        return out

    def _index_json(self) -> list[Descriptor]:
        index = json_object(parse_json(self._files.read_small("index.json", "index.json"), "index.json"), "index.json")
        self._check_index(index, None, "index.json")
        return [Descriptor.from_json(d, f"index.json: manifests[{i}]") for i, d in enumerate(index["manifests"])]

    @staticmethod
    def _check_index(index: dict[str, Any], media_type: str | None, what: str) -> None:
        if index.get("schemaVersion") != 2 or isinstance(index.get("schemaVersion"), bool):
            raise ImageError(f"{what}: schemaVersion must be 2, not {index.get('schemaVersion')!r}")
        mt = index.get("mediaType")
        if mt is not None and (mt not in INDEX_TYPES or (media_type is not None and mt != media_type)):
            raise ImageError(f"{what}: mediaType {mt!r} is not {media_type or 'an image index'}")
        if not isinstance(index.get("manifests"), list):
            raise ImageError(f"{what}: 'manifests' must be a list")

    def _docker_entries(self) -> list[_Entry]:
        doc = parse_json(self._files.read_small("manifest.json", "manifest.json"), "manifest.json")
        if not isinstance(doc, list):
            raise ImageError("manifest.json: a list of images expected")
        out = []
        for i, e in enumerate(doc):
            what = f"manifest.json: image {i}"
            e = json_object(e, what)
            if not isinstance(e.get("Config"), str):
                raise ImageError(f"{what}: 'Config' must be a path")
            layers = e.get("Layers")
            if not isinstance(layers, list) or not all(isinstance(p, str) for p in layers):
                raise ImageError(f"{what}: 'Layers' must be a list of paths")
            tags = e.get("RepoTags") or []
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise ImageError(f"{what}: 'RepoTags' must be a list of strings")
            _clean(e["Config"], what)
            for p in layers:
                _clean(p, what)
            out.append(_Entry(tags[0] if tags else None, tuple(tags), docker=e))
        return out

    def names(self) -> list[str]:
        """The names the images here answer to (ref names, RepoTags), in the order listed."""
        seen: list[str] = []
        for e in self._entries:
            for n in e.names[:1] if self.kind != "docker-archive" else e.names:
                if n not in seen:
                    seen.append(n)
        return seen

    def _listing(self) -> str:
        names = self.names()
        unnamed = sum(1 for e in self._entries if not e.names)
        parts = names + ([f"{unnamed} unnamed"] if unnamed else [])
        return ", ".join(parts) or "none"

    def _pick(self, name: str | None) -> list[_Entry]:
        if not self._entries:
            raise ImageError(f"{self.path}: holds no image")
        if name is None:
            first = self._entries[0].names
            if len(self._entries) > 1 and any(e.names != first for e in self._entries):
                raise ImageError(f"{self.path}: holds several images ({self._listing()}); name one")
            return list(self._entries)
        scored = [(max((_ref_matches(n, name) for n in e.names), default=0), e) for e in self._entries]
        best = max(s for s, _ in scored)
        if best == 0:
            raise ImageError(f"{self.path}: no image named {name!r} (there is {self._listing()})")
        chosen = [e for s, e in scored if s == best]
        if len({e.name for e in chosen}) > 1:
            raise ImageError(f"{self.path}: {name!r} is ambiguous: {', '.join(str(e.name) for e in chosen)}")
        return chosen

    # -- resolving

    def resolve(self, name: str | None = None, platform: str | None = None) -> Image:
        """The image named ``name`` (or the only one), for ``platform`` (``os/arch[/variant]``) or the host's
        when it is a multi-platform image."""
        wanted = Platform.parse(platform) if platform is not None else None
        entries = self._pick(name)
        if self.kind == "docker-archive":
            if len(entries) > 1:
                raise ImageError(f"{self.path}: several images answer to {name!r}")
            return self._resolve_docker(entries[0], wanted)
        leaves: list[tuple[str | None, Descriptor]] = []
        for e in entries:
            assert e.desc is not None
            self._leaves(e.name, e.desc, 0, leaves, f"index.json: {e.name or e.desc.digest}")
        if not leaves:
            raise ImageError(f"{self.path}: {name or 'the image'} lists no manifest")
        if len(leaves) == 1:
            img = self._resolve_manifest(leaves[0][0], leaves[0][1])
            if wanted is not None and not img.platform.matches(wanted):
                raise ImageError(f"{self.path}: no image for {wanted} (there is {img.platform})")
            return img
        target = wanted or Platform.host()
        matching = [(n, d) for n, d in leaves if d.platform is not None and d.platform.matches(target)]
        if not matching:
            there = ", ".join(sorted({str(d.platform) if d.platform else "unknown" for _, d in leaves}))
            raise ImageError(f"{self.path}: no image for {target} (there is {there})")
        exact = [(n, d) for n, d in matching if d.platform is not None and d.platform.variant == target.variant]
        n, d = (exact or matching)[0]
        return self._resolve_manifest(n, d)

    def _leaves(self, name: str | None, desc: Descriptor, depth: int, out: list[tuple[str | None, Descriptor]],
                what: str) -> None:
        if desc.media_type in MANIFEST_TYPES:
            out.append((name, desc))
            return
        if desc.media_type not in INDEX_TYPES:
            raise ImageError(f"{what}: unsupported media type {desc.media_type!r} (not an image manifest or index)")
        if depth >= _MAX_INDEX_DEPTH:
            raise ImageError(f"{what}: image indexes nested too deeply")
        what = f"image index {desc.digest}"
        index = json_object(parse_json(self._read_json_blob(desc, what), what), what)
        self._check_index(index, desc.media_type, what)
        for i, d in enumerate(index["manifests"]):
            self._leaves(name, Descriptor.from_json(d, f"{what}: manifests[{i}]"), depth + 1, out, what)

    def _read_json_blob(self, desc: Descriptor, what: str) -> bytes:
        if desc.size > MAX_JSON:
            raise ImageError(f"{what}: blob {desc.digest} too large ({desc.size} bytes)")
        with self.open_blob(desc, what) as f:
            return f.read()

    def _resolve_manifest(self, name: str | None, desc: Descriptor) -> Image:
        what = f"manifest {desc.digest}"
        raw = self._read_json_blob(desc, what)
        man = json_object(parse_json(raw, what), what)
        if man.get("schemaVersion") != 2 or isinstance(man.get("schemaVersion"), bool):
            raise ImageError(f"{what}: schemaVersion must be 2, not {man.get('schemaVersion')!r}")
        mt = man.get("mediaType")
        if mt is not None and mt != desc.media_type:
            raise ImageError(f"{what}: mediaType {mt!r} disagrees with its descriptor's {desc.media_type!r}")
        cdesc = Descriptor.from_json(man.get("config"), f"{what}: config")
        if cdesc.media_type not in CONFIG_TYPES:
            raise ImageError(f"{what}: config media type {cdesc.media_type!r} is not an image config")
        layers_json = man.get("layers")
        if not isinstance(layers_json, list):
            raise ImageError(f"{what}: 'layers' must be a list")
        layers = tuple(Descriptor.from_json(d, f"{what}: layers[{i}]") for i, d in enumerate(layers_json))
        for i, d in enumerate(layers):
            try:
                layer_compression(d.media_type)
            except ImageError as exc:
                raise ImageError(f"{what}: layers[{i}]: {exc}") from None
        config = self._read_json_blob(cdesc, f"config {cdesc.digest}")
        for i, d in enumerate(layers):
            if self._files.size(self._blob_path(d.digest), what) is None:
                raise ImageError(f"{what}: layers[{i}]: blob {d.digest} missing from the image")
        return self._image(name, raw, desc.digest, desc.media_type, config, cdesc, layers)

    def _image(self, name: str | None, manifest: bytes, manifest_digest: str, manifest_type: str, config: bytes,
               cdesc: Descriptor, layers: tuple[Descriptor, ...]) -> Image:
        what = f"config {cdesc.digest}"
        cfg = json_object(parse_json(config, what), what)
        rootfs = json_object(cfg.get("rootfs"), f"{what}: rootfs")
        if rootfs.get("type") != "layers":
            raise ImageError(f"{what}: rootfs.type must be 'layers', not {rootfs.get('type')!r}")
        diff_ids = rootfs.get("diff_ids")
        if not isinstance(diff_ids, list):
            raise ImageError(f"{what}: rootfs.diff_ids must be a list")
        for i, d in enumerate(diff_ids):
            check_digest(d, f"{what}: rootfs.diff_ids[{i}]")
        if len(diff_ids) != len(layers):
            raise ImageError(f"{what}: {len(diff_ids)} diff_ids for {len(layers)} layers")
        if not isinstance(cfg.get("os"), str) or not isinstance(cfg.get("architecture"), str):
            raise ImageError(f"{what}: 'os' and 'architecture' must be strings")
        variant = cfg.get("variant", "")
        plat = Platform(cfg["os"], cfg["architecture"], variant if isinstance(variant, str) else "")
        return Image(
            name=name,
            manifest=manifest,
            manifest_digest=manifest_digest,
            manifest_media_type=manifest_type,
            config=config,
            config_digest=cdesc.digest,
            config_media_type=cdesc.media_type,
            layers=layers,
            diff_ids=tuple(diff_ids),
            platform=plat,
        )

    # -- docker archives

    def _blob_path_digest(self, path: str) -> str | None:
        """The digest a ``blobs/<algo>/<hex>`` path names (the Docker 25+ form), else None."""
        parts = _clean(path, "manifest.json").split("/")
        if len(parts) == 3 and parts[0] == "blobs":
            try:
                return check_digest(f"{parts[1]}:{parts[2]}")
            except ImageError:
                return None
        return None

    def _hash_member(self, path: str, what: str) -> tuple[str, int, bytes]:
        """sha256 digest, size and first bytes of a member (a layer named by path only)."""
        size = self._files.size(path, what)
        if size is None:
            raise ImageError(f"{what}: {path} missing from the archive")
        h = hasher("sha256:")
        head = b""
        with self._files.open(path, what) as f:
            while data := f.read(_CHUNK):
                if not head:
                    head = data[:8]
                h.update(data)
        return "sha256:" + h.hexdigest(), size, head

    def _resolve_docker(self, e: _Entry, wanted: Platform | None) -> Image:
        assert e.docker is not None
        what = f"manifest.json: {e.name or 'image'}"
        cpath = _clean(e.docker["Config"], what)
        cdig = self._blob_path_digest(cpath)
        cdesc_size = self._files.size(cpath, what)
        if cdesc_size is None:
            raise ImageError(f"{what}: config {cdig or cpath} missing from the archive")
        if cdig is None:
            cdig = _sha256(self._files.read_small(cpath, what))
        self._paths[cdig] = cpath
        layer_paths = [_clean(p, what) for p in e.docker["Layers"]]
        oci = self._docker_oci_manifest(cdig, layer_paths) if self._files.size("index.json", what) is not None else None
        if oci is not None:
            img = self._resolve_manifest(e.name, oci)
            img = dataclasses.replace(img, name=e.name)
        else:
            cdesc = Descriptor(DOCKER_CONFIG, cdig, cdesc_size)
            config = self._read_json_blob(cdesc, f"config {cdig}")
            layers = []
            for p in layer_paths:
                ldig = self._blob_path_digest(p)
                if ldig is not None:
                    size = self._files.size(p, what)
                    if size is None:
                        raise ImageError(f"{what}: layer {ldig} missing from the archive")
                    with self._files.open(p, what) as f:
                        head = f.read(8)
                else:
                    ldig, size, head = self._hash_member(p, what)
                self._paths[ldig] = p
                mt = DOCKER_LAYER_GZIP if head.startswith(_GZIP_MAGIC) else (
                    DOCKER_LAYER_ZSTD if head.startswith(_ZSTD_MAGIC) else DOCKER_LAYER)
                layers.append(Descriptor(mt, ldig, size))
            manifest = canonical_json({
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": cdesc.to_json(),
                "layers": [d.to_json() for d in layers],
            })
            img = self._image(e.name, manifest, _sha256(manifest), DOCKER_MANIFEST, config, cdesc, tuple(layers))
        if wanted is not None and not img.platform.matches(wanted):
            raise ImageError(f"{self.path}: no image for {wanted} (there is {img.platform})")
        return img

    def _docker_oci_manifest(self, config_digest: str, layer_paths: list[str]) -> Descriptor | None:
        """In the Docker 25+ form, the OCI manifest (listed in index.json) of the manifest.json entry."""
        layer_digests = [self._blob_path_digest(p) for p in layer_paths]
        if None in layer_digests:
            return None
        leaves: list[tuple[str | None, Descriptor]] = []
        for d in self._index_json():
            try:
                self._leaves(None, d, 0, leaves, "index.json")
            except ImageError:
                continue
        for _, d in leaves:
            try:
                man = json_object(parse_json(self._read_json_blob(d, "manifest"), "manifest"), "manifest")
                if json_object(man.get("config"), "config").get("digest") != config_digest:
                    continue
                if [json_object(x, "layer").get("digest") for x in man.get("layers") or []] == layer_digests:
                    return d
            except ImageError:
                continue
        return None

    # -- blobs

    def open_blob(self, desc: Descriptor, what: str | None = None) -> BinaryIO:
        """A reader of the blob ``desc`` names, checking its size and digest as it is read (:class:`ImageError`
        at the read revealing a mismatch)."""
        what = what or f"blob {desc.digest}"
        check_digest(desc.digest, what)
        path = self._blob_path(desc.digest)
        if self._files.size(path, what) is None:
            raise ImageError(f"{what}: blob {desc.digest} missing from the image")
        return cast(BinaryIO, _Verified(self._files.open(path, what), desc, what))

    def _blob_path(self, digest: str) -> str:
        algo, _, hexd = digest.partition(":")
        return self._paths.get(digest, f"blobs/{algo}/{hexd}")

    def close(self) -> None:
        self._files.close()

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _sha256(data: bytes) -> str:
    h = hasher("sha256:")
    h.update(data)
    return "sha256:" + str(h.hexdigest())


def open_source(path: str | os.PathLike[str]) -> ImageSource:
    """The image store at ``path`` (a context manager): an OCI layout directory, an OCI archive or a docker
    archive, told apart by their contents."""
    return ImageSource(path)

"""The vocabulary of OCI and Docker images: media types, descriptors, platforms, digests and chain ids.

Only what reading and writing images needs: the JSON shapes are checked as they are parsed (a
:class:`Descriptor` or a :class:`Platform` made from JSON is well-formed), and every refusal is an
:class:`ImageError` with a one-line message naming what was refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform as _platform
import re
from collections.abc import Mapping, Sequence
from typing import Any

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
OCI_LAYOUT_FILE = "oci-layout"
OCI_LAYOUT_VERSION = "1.0.0"

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

#: the annotation naming an image in an OCI layout's index.json
REF_NAME = "org.opencontainers.image.ref.name"
#: the annotation containerd and Docker 25+ put beside it (the full reference)
CONTAINERD_NAME = "io.containerd.image.name"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
LAYER_TYPES: Mapping[str, str] = {
    OCI_LAYER: "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    DOCKER_LAYER: "none",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_LAYER_ZSTD: "zstd",
}
#: layers whose content is not in the image (fetched from their ``urls``, if at all): refused
FOREIGN_LAYER_TYPES = frozenset(
    {OCI_LAYER_NONDIST, OCI_LAYER_NONDIST_GZIP, OCI_LAYER_NONDIST_ZSTD, DOCKER_LAYER_FOREIGN}
)
#: the uncompressed layer type of each manifest type
PLAIN_LAYER_OF = {OCI_MANIFEST: OCI_LAYER, DOCKER_MANIFEST: DOCKER_LAYER}

#: the largest JSON document (index, manifest, config) read into memory
MAX_JSON = 16 << 20

_DIGEST_RE = {"sha256": re.compile(r"[0-9a-f]{64}"), "sha512": re.compile(r"[0-9a-f]{128}")}


class ImageError(ValueError):
    """An image refused: malformed, inconsistent, hostile or not found. The message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def check_digest(value: object, what: str = "digest") -> str:
    """``value`` if it is a well-formed ``sha256:<64 lowercase hex>`` (or ``sha512:<128 hex>``) digest."""
    if isinstance(value, str):
        algo, sep, hexd = value.partition(":")
        pattern = _DIGEST_RE.get(algo)
        if sep and pattern is not None and pattern.fullmatch(hexd):
            return value
    shown = value if isinstance(value, str) and len(value) <= 200 else type(value).__name__
    raise ImageError(f"{what}: malformed digest {shown!r} (sha256:<64 lowercase hex digits> expected)")


def hasher(digest: str) -> Any:
    """A new hash object of ``digest``'s algorithm (the digest must be well-formed)."""
    return hashlib.new(digest.partition(":")[0])


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI ChainIDs of a stack of layers: ChainID(L0) = DiffID(L0), ChainID(Ln) = SHA-256 of
    ``ChainID(Ln-1) + " " + DiffID(Ln)``."""
    out: list[str] = []
    for d in diff_ids:
        check_digest(d, "diff_id")
        out.append(d if not out else sha256_digest(f"{out[-1]} {d}".encode()))
    return out


def layer_compression(media_type: str) -> str:
    """"none", "gzip" or "zstd" for a layer media type; foreign, nondistributable and unknown types refused."""
    if media_type in FOREIGN_LAYER_TYPES:
        raise ImageError(f"layer media type {media_type}: foreign/nondistributable layers are not supported")
    try:
        return LAYER_TYPES[media_type]
    except KeyError:
        raise ImageError(f"unsupported layer media type {media_type!r}") from None


def parse_json(data: bytes, what: str) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, nothing after the value."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise ImageError(f"{what}: malformed JSON: duplicate key {k!r}")
            out[k] = v
        return out

    def constant(name: str) -> Any:
        raise ImageError(f"{what}: malformed JSON: {name} is not JSON")

    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except UnicodeDecodeError:
        raise ImageError(f"{what}: malformed JSON: not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ImageError(f"{what}: malformed JSON: {exc}") from None
    except RecursionError:
        raise ImageError(f"{what}: malformed JSON: nested too deeply") from None


def json_object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ImageError(f"{what}: a JSON object expected, not {type(value).__name__}")
    return value


def _str(obj: Mapping[str, Any], key: str, what: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ImageError(f"{what}: {key!r} must be a string")
    return value


def _str_map(value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ImageError(f"{what}: annotations must map strings to strings")
    return dict(value)


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386", "i686": "386"}


@dataclasses.dataclass(frozen=True)
class Platform:
    """An image's platform in Go's names (``linux``, ``amd64``, ``arm64`` + ``v8``...)."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``os/arch[/variant]`` (``linux/arm64/v8``); ``arch`` alone means linux. Kernel names (``x86_64``,
        ``aarch64``) are taken for Go's."""
        parts = text.strip().split("/")
        if len(parts) == 1:
            parts = ["linux", *parts]
        if len(parts) > 3 or not all(parts):
            raise ImageError(f"platform {text!r}: os/arch[/variant] expected")
        arch = _ARCH_ALIASES.get(parts[1].lower(), parts[1].lower())
        return cls(parts[0].lower(), arch, parts[2].lower() if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> Platform:
        """The platform this machine runs natively."""
        machine = _platform.machine().lower()
        arch, variant = {
            "x86_64": ("amd64", ""),
            "amd64": ("amd64", ""),
            "aarch64": ("arm64", ""),
            "arm64": ("arm64", ""),
            "armv7l": ("arm", "v7"),
            "armv6l": ("arm", "v6"),
            "i386": ("386", ""),
            "i686": ("386", ""),
            "ppc64le": ("ppc64le", ""),
            "s390x": ("s390x", ""),
            "riscv64": ("riscv64", ""),
        }.get(machine, (machine, ""))
        osname = {"linux": "linux", "darwin": "darwin"}.get(os.uname().sysname.lower(), os.uname().sysname.lower())
        return cls(osname, arch, variant)

    @classmethod
    def from_json(cls, value: object, what: str) -> Platform:
        obj = json_object(value, f"{what}: platform")
        return cls(
            _str(obj, "os", f"{what}: platform"),
            _str(obj, "architecture", f"{what}: platform"),
            _str(obj, "variant", f"{what}: platform", required=False),
        )

    def to_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    def normalized_variant(self) -> str:
        if self.architecture == "arm64" and self.variant in ("", "v8"):
            return "v8"
        return self.variant

    def matches(self, wanted: Platform) -> bool:
        """Whether an image of this platform serves ``wanted``: same os and architecture, and the same variant
        when ``wanted`` names one (arm64 without a variant is v8)."""
        if (self.os, self.architecture) != (wanted.os, wanted.architecture):
            return False
        return not wanted.variant or self.normalized_variant() == wanted.normalized_variant()

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclasses.dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a blob is, its digest and size."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False, compare=True)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, value: object, what: str) -> Descriptor:
        obj = json_object(value, what)
        media_type = _str(obj, "mediaType", what)
        digest = check_digest(obj.get("digest"), what)
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{what}: 'size' must be a non-negative integer")
        urls = obj.get("urls", [])
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ImageError(f"{what}: 'urls' must be a list of strings")
        platform = Platform.from_json(obj["platform"], what) if obj.get("platform") is not None else None
        return cls(media_type, digest, size, _str_map(obj.get("annotations"), what), platform, tuple(urls))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        return out


def canonical_json(obj: Any) -> bytes:
    """Compact JSON with sorted keys (the bytes written for documents this package makes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

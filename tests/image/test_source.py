"""unionfs.image._source / _oci: every image format read alike; names, platforms; broken and hostile input."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

import images  # noqa: E402
from images import Built, blob_path, canonical, digest, edit_json, image, tar_dir  # noqa: E402
from layers import build, dir_, reg, sym  # noqa: E402

from unionfs.image import _oci  # noqa: E402
from unionfs.image._oci import Descriptor, ImageError, Platform, chain_ids, check_digest, layer_compression  # noqa: E402
from unionfs.image._source import Image, ImageSource, open_source  # noqa: E402

L1 = build([dir_("etc"), reg("etc/hostname", b"box\n"), sym("etc/link", "hostname")])
L2 = build([reg("bin/tool", b"\x7fELF" + bytes(range(256)) * 40, mode=0o755)])
L3 = build([reg("etc/.wh.hostname"), reg("data", os.urandom(3000))])
LAYERS = [L1, L2, L3]


def uncompress(data: bytes, media_type: str) -> bytes:
    how = layer_compression(media_type)
    if how == "gzip":
        return gzip.decompress(data)
    if how == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def read_all(src: ImageSource, desc: Descriptor, n: int = 1 << 16) -> bytes:
    out = bytearray()
    with src.open_blob(desc) as f:
        while data := f.read(n):
            out += data
    return bytes(out)


@pytest.fixture
def built() -> Built:
    return image(LAYERS, compress=["gzip", "zstd", "none"])


def write(kind: str, dest: Path, imgs: list[tuple[str | None, Built]], **kw: Any) -> Path:
    """One of the four forms, from (name, image) pairs."""
    if kind == "oci-layout":
        return images.write_oci_layout(dest, imgs, **kw)
    if kind == "oci-archive":
        return images.write_oci_archive(dest.with_suffix(".tar"), imgs, **kw)
    form = {"docker-classic": "classic", "docker-oci": "oci"}[kind]
    return images.write_docker_save(dest.with_suffix(".tar"), [([n] if n else [], b) for n, b in imgs], form, **kw)


KINDS = ["oci-layout", "oci-archive", "docker-classic", "docker-oci"]


# -- every format --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_formats_agree(tmp_path: Path, built: Built, kind: str) -> None:
    path = write(kind, tmp_path / "img", [("example.com/app:1.0", built)])
    with open_source(path) as src:
        assert src.kind == {"docker-classic": "docker-archive", "docker-oci": "docker-archive"}.get(kind, kind)
        assert src.names() == ["example.com/app:1.0"]
        img = src.resolve()
        assert img.name == "example.com/app:1.0"
        assert img.config == built.config
        assert img.config_digest == built.config_digest == digest(img.config)
        assert list(img.diff_ids) == built.diff_ids
        assert img.platform == Platform("linux", "amd64")
        assert img.manifest_digest == digest(img.manifest)
        if kind == "docker-classic":
            # a manifest made for the archive: Docker schema2 naming the uncompressed layer.tar members
            man = json.loads(img.manifest)
            assert img.manifest_media_type == man["mediaType"] == _oci.DOCKER_MANIFEST
            assert man["config"]["digest"] == built.config_digest
            assert [d.digest for d in img.layers] == built.diff_ids
            assert [d.size for d in img.layers] == [len(x) for x in LAYERS]
        else:
            assert img.manifest == built.manifest
            assert img.manifest_digest == built.manifest_digest
            assert [d.digest for d in img.layers] == built.layer_digests
        for desc, raw, diff_id in zip(img.layers, LAYERS, built.diff_ids, strict=True):
            blob = read_all(src, desc)
            assert digest(blob) == desc.digest and len(blob) == desc.size
            assert uncompress(blob, desc.media_type) == raw
            assert digest(raw) == diff_id


def test_classic_layer_digest_is_hashed_not_assumed(tmp_path: Path, built: Built) -> None:
    """A classic archive whose layer.tar is compressed: the layer's digest is its member's hash, not the diff_id."""
    d = images.write_docker_save_dir(tmp_path / "d", [(["x:1"], built)], "classic")
    entry = json.loads((d / "manifest.json").read_bytes())[0]
    member = d / entry["Layers"][0]
    member.write_bytes(gzip.compress(L1, mtime=0))
    with open_source(tar_dir(d, tmp_path / "x.tar")) as src:
        img = src.resolve()
        assert img.layers[0].digest == digest(gzip.compress(L1, mtime=0)) != img.diff_ids[0]
        assert img.layers[0].media_type == _oci.DOCKER_LAYER_GZIP
        assert gzip.decompress(read_all(src, img.layers[0])) == L1


def test_classic_symlinked_layer(tmp_path: Path) -> None:
    """docker save links a layer that two images share: the member is a symlink to the other's layer.tar."""
    b = image([L1], compress="none")
    d = images.write_docker_save_dir(tmp_path / "d", [(["x:1"], b)], "classic")
    entry = json.loads((d / "manifest.json").read_bytes())[0]
    lid = entry["Layers"][0].split("/")[0]
    (d / "other").mkdir()
    os.rename(d / lid / "layer.tar", d / "other" / "layer.tar")
    os.symlink("../other/layer.tar", d / lid / "layer.tar")
    with open_source(tar_dir(d, tmp_path / "x.tar")) as src:
        img = src.resolve("x:1")
        assert read_all(src, img.layers[0]) == L1


def test_docker_archive_with_several_images(tmp_path: Path) -> None:
    a, b = image([L1]), image([L1, L2])
    path = images.write_docker_save(tmp_path / "x.tar", [(["a:1", "a:latest"], a), (["b:2"], b)])
    with open_source(path) as src:
        assert src.names() == ["a:1", "a:latest", "b:2"]
        assert list(src.resolve("a:1").diff_ids) == a.diff_ids
        assert src.resolve("a").name == "a:1"  # a is a:latest (Docker's default tag); the entry's first tag names it
        assert list(src.resolve("docker.io/library/b:2").diff_ids) == b.diff_ids
        with pytest.raises(ImageError, match=r"several images \(a:1, a:latest, b:2\)"):
            src.resolve()
        with pytest.raises(ImageError, match="no image named 'c:1'.*a:1, a:latest, b:2"):
            src.resolve("c:1")


# -- names -----------------------------------------------------------------------------------------------------


def test_names_in_a_layout(tmp_path: Path) -> None:
    a, b, c = image([L1]), image([L2]), image([L3])
    path = images.write_oci_layout(tmp_path / "lay", [("docker.io/library/alpine:3.19", a), ("v2", b), (None, c)])
    with open_source(path) as src:
        assert src.names() == ["docker.io/library/alpine:3.19", "v2"]
        assert src.resolve("docker.io/library/alpine:3.19").manifest_digest == a.manifest_digest
        assert src.resolve("3.19").manifest_digest == a.manifest_digest  # a tag matches ...:tag
        assert src.resolve("alpine:3.19").manifest_digest == a.manifest_digest  # Docker's defaults
        assert src.resolve("v2").manifest_digest == b.manifest_digest
        assert src.resolve("v2").name == "v2"
        with pytest.raises(ImageError, match=r"several images \(docker.io/library/alpine:3.19, v2, 1 unnamed\)"):
            src.resolve()
        with pytest.raises(ImageError, match="no image named '3.20'"):
            src.resolve("3.20")


def test_ambiguous_tag(tmp_path: Path) -> None:
    path = images.write_oci_layout(tmp_path / "lay", [("a:1", image([L1])), ("b:1", image([L2]))])
    with open_source(path) as src, pytest.raises(ImageError, match="'1' is ambiguous: a:1, b:1"):
        src.resolve("1")


def test_one_unnamed_image(tmp_path: Path, built: Built) -> None:
    with open_source(images.write_oci_layout(tmp_path / "lay", [(None, built)])) as src:
        assert src.names() == []
        img = src.resolve()
        assert img.name is None and img.manifest_digest == built.manifest_digest
        with pytest.raises(ImageError, match="no image named 'x'"):
            src.resolve("x")


# -- platforms -------------------------------------------------------------------------------------------------


def multi() -> list[tuple[str | None, Built]]:
    return [
        ("m:1", image([L1], arch="amd64")),
        ("m:1", image([L2], arch="arm64", variant="v8")),
        ("m:1", image([L3], arch="arm", variant="v7")),
        ("m:1", image([L1, L2], arch="s390x")),
    ]


@pytest.mark.parametrize("nested", [True, False], ids=["nested-index", "top-level"])
@pytest.mark.parametrize("archive", [False, True], ids=["dir", "tar"])
def test_platform_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nested: bool, archive: bool) -> None:
    imgs = multi()
    kind = "oci-archive" if archive else "oci-layout"
    path = write(kind, tmp_path / "lay", imgs, index_of_platforms=nested)
    by_arch = {b.platform["architecture"]: b for _, b in imgs}
    with open_source(path) as src:
        assert src.names() == ["m:1"]
        for machine, arch in [("x86_64", "amd64"), ("aarch64", "arm64"), ("armv7l", "arm"), ("s390x", "s390x")]:
            monkeypatch.setattr(_oci._platform, "machine", lambda m=machine: m)
            img = src.resolve("m:1")
            assert img.manifest_digest == by_arch[arch].manifest_digest, machine
            assert img.platform.architecture == arch
        assert src.resolve(platform="linux/arm64").manifest_digest == by_arch["arm64"].manifest_digest
        assert src.resolve(platform="linux/arm64/v8").manifest_digest == by_arch["arm64"].manifest_digest
        assert src.resolve(platform="linux/arm/v7").manifest_digest == by_arch["arm"].manifest_digest
        assert src.resolve("1", platform="amd64").manifest_digest == by_arch["amd64"].manifest_digest
        with pytest.raises(ImageError, match=r"no image for linux/ppc64le \(there is linux/amd64, linux/arm/v7, "
                                             r"linux/arm64/v8, linux/s390x\)"):
            src.resolve(platform="linux/ppc64le")
        with pytest.raises(ImageError, match="no image for linux/arm/v6"):
            src.resolve(platform="linux/arm/v6")
        monkeypatch.setattr(_oci._platform, "machine", lambda: "riscv64")
        with pytest.raises(ImageError, match="no image for linux/riscv64"):
            src.resolve()


def test_docker_manifest_list(tmp_path: Path) -> None:
    imgs = [("m:1", image([L1], docker_media_types=True)), ("m:1", image([L2], arch="arm64", docker_media_types=True))]
    path = images.write_oci_layout(tmp_path / "lay", imgs, index_of_platforms=True, docker_media_types=True)
    with open_source(path) as src:
        img = src.resolve(platform="linux/arm64")
        assert img.manifest_digest == imgs[1][1].manifest_digest
        assert img.manifest_media_type == _oci.DOCKER_MANIFEST and img.config_media_type == _oci.DOCKER_CONFIG


@pytest.mark.parametrize("kind", KINDS)
def test_single_image_of_another_platform(tmp_path: Path, kind: str) -> None:
    """One image and no platform asked: that image, whatever the host; asked for another platform: refused."""
    b = image([L1], arch="arm64", variant="v8")
    with open_source(write(kind, tmp_path / "img", [("x:1", b)])) as src:
        assert src.resolve().platform == Platform("linux", "arm64", "v8")
        assert src.resolve(platform="linux/arm64").config == b.config
        with pytest.raises(ImageError, match=r"no image for linux/amd64 \(there is linux/arm64/v8\)"):
            src.resolve(platform="linux/amd64")


# -- the shared vocabulary ---------------------------------------------------------------------------------------


def test_platform_parse_and_host(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Platform.parse("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert Platform.parse("linux/x86_64") == Platform("linux", "amd64")
    assert Platform.parse("aarch64") == Platform("linux", "arm64")
    for bad in ["", "linux/", "a/b/c/d", "//"]:
        with pytest.raises(ImageError, match="os/arch"):
            Platform.parse(bad)
    for machine, want in [("x86_64", "linux/amd64"), ("aarch64", "linux/arm64"), ("armv7l", "linux/arm/v7"),
                          ("i686", "linux/386"), ("ppc64le", "linux/ppc64le"), ("s390x", "linux/s390x"),
                          ("riscv64", "linux/riscv64")]:
        monkeypatch.setattr(_oci._platform, "machine", lambda m=machine: m)
        assert str(Platform.host()) == want
    arm64 = Platform("linux", "arm64")
    assert arm64.matches(Platform.parse("linux/arm64/v8")) and Platform("linux", "arm64", "v8").matches(arm64)
    assert not Platform("linux", "arm64", "v9").matches(Platform.parse("linux/arm64/v8"))
    assert Platform("linux", "arm", "v6").matches(Platform.parse("linux/arm"))
    assert not Platform("linux", "arm", "v6").matches(Platform.parse("linux/arm/v7"))
    assert not Platform("windows", "amd64").matches(Platform.parse("linux/amd64"))


@given(st.text(alphabet="0123456789abcdefABCDEF:sha256x ", max_size=80))
@settings(max_examples=300, deadline=None)
def test_check_digest(text: str) -> None:
    good = text.startswith("sha256:") and len(text) == 71 and all(c in "0123456789abcdef" for c in text[7:])
    if good:
        assert check_digest(text) == text
    else:
        with pytest.raises(ImageError, match="malformed digest"):
            check_digest(text)


def test_check_digest_cases() -> None:
    h = hashlib.sha256(b"x").hexdigest()
    assert check_digest("sha256:" + h)
    assert check_digest("sha512:" + hashlib.sha512(b"x").hexdigest())
    for bad in ["sha256:" + h.upper(), "sha256:" + h[:-1], "sha256:" + h + "0", "md5:" + h, h, "sha256:../" + h[3:],
                None, 5, "sha256:" + h + "\n"]:
        with pytest.raises(ImageError, match="malformed digest"):
            check_digest(bad)


@given(st.lists(st.binary(max_size=20), max_size=6))
@settings(max_examples=100, deadline=None)
def test_chain_ids(layers: list[bytes]) -> None:
    diff_ids = [digest(x) for x in layers]
    got = chain_ids(diff_ids)
    assert len(got) == len(diff_ids)
    for i, d in enumerate(diff_ids):
        if i == 0:
            assert got[0] == d
        else:
            assert got[i] == "sha256:" + hashlib.sha256((got[i - 1] + " " + d).encode()).hexdigest()


def test_layer_compression() -> None:
    assert layer_compression("application/vnd.oci.image.layer.v1.tar") == "none"
    assert layer_compression("application/vnd.oci.image.layer.v1.tar+gzip") == "gzip"
    assert layer_compression("application/vnd.oci.image.layer.v1.tar+zstd") == "zstd"
    assert layer_compression("application/vnd.docker.image.rootfs.diff.tar.gzip") == "gzip"
    for foreign in ["application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"]:
        with pytest.raises(ImageError, match="foreign/nondistributable"):
            layer_compression(foreign)
    with pytest.raises(ImageError, match="unsupported layer media type"):
        layer_compression("application/vnd.oci.image.layer.v1.tar+xz")


def test_descriptor_json_round_trip() -> None:
    d = Descriptor("application/x", "sha256:" + "a" * 64, 3, {"k": "v"}, Platform("linux", "arm", "v7"), ("u",))
    assert Descriptor.from_json(json.loads(json.dumps(d.to_json())), "d") == d
    with pytest.raises(ImageError, match="'size' must be a non-negative integer"):
        Descriptor.from_json({"mediaType": "x", "digest": d.digest, "size": -1}, "d")
    with pytest.raises(ImageError, match="'size' must be a non-negative integer"):
        Descriptor.from_json({"mediaType": "x", "digest": d.digest, "size": True}, "d")


# -- checked blob reads ------------------------------------------------------------------------------------------


@given(
    data=st.binary(min_size=0, max_size=3000),
    change=st.sampled_from(["none", "truncate", "extend", "flip"]),
    where=st.integers(min_value=0, max_value=10_000),
    chunks=st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=5),
)
@settings(max_examples=80, deadline=None)
def test_blob_reads_checked(data: bytes, change: str, where: int, chunks: list[int]) -> None:
    """Read in pieces of random sizes: the exact blob, or ImageError saying which mismatch."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        b = image([L1], compress="none")
        lay = images.write_oci_layout(Path(tmp) / "lay", [(None, b)])
        desc = Descriptor(_oci.OCI_LAYER, digest(data), len(data))
        stored = data
        if change == "truncate" and data:
            stored = data[: where % len(data)]
        elif change == "extend":
            stored = data + bytes([where % 256]) * (1 + where % 5)
        elif change == "flip" and data:
            i = where % len(data)
            stored = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
        blob_path(lay, desc.digest).write_bytes(stored)
        with open_source(lay) as src, src.open_blob(desc) as f:
            got = bytearray()
            k = 0
            try:
                while piece := f.read(chunks[k % len(chunks)]):
                    got += piece
                    k += 1
            except ImageError as exc:
                msg = str(exc)
                assert stored != data
                assert desc.digest in msg and "\n" not in msg
                if len(stored) < len(data):
                    assert "shorter than declared" in msg
                elif len(stored) > len(data):
                    assert "larger than declared" in msg
                else:
                    assert "digest mismatch" in msg
                    assert bytes(got) == stored[: len(got)]
            else:
                assert stored == data and bytes(got) == data


def test_large_blob_read_in_big_pieces(tmp_path: Path) -> None:
    data = os.urandom(1 << 20) * 24
    b = image([L1], compress="none")
    lay = images.write_oci_layout(tmp_path / "lay", [(None, b)])
    desc = Descriptor(_oci.OCI_LAYER, digest(data), len(data))
    blob_path(lay, desc.digest).write_bytes(data)
    archive = tar_dir(lay, tmp_path / "lay.tar")
    for path in (lay, archive):
        with open_source(path) as src, src.open_blob(desc) as f:
            pieces = []
            while piece := f.read(1 << 22):
                pieces.append(piece)
            assert len(pieces) == 6 and b"".join(pieces) == data
            assert f.read(10) == b""
        with open_source(path) as src, src.open_blob(desc) as f:
            assert f.read() == data


# -- broken and hostile input ------------------------------------------------------------------------------------


def set_manifest(lay: Path, man: dict[str, Any] | bytes, index: int = 0) -> str:
    """Store a manifest and point index.json's entry at it (so only what the test broke is wrong)."""
    raw = man if isinstance(man, bytes) else canonical(man)
    d = put(lay, raw)

    def point(idx: dict[str, Any]) -> None:
        idx["manifests"][index].update(digest=d, size=len(raw))

    edit_json(lay / "index.json", point)
    return d


def put(lay: Path, data: bytes) -> str:
    p = blob_path(lay, digest(data))
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return digest(data)


def set_config(lay: Path, b: Built, cfg: bytes) -> None:
    d = put(lay, cfg)
    man = b.manifest_dict()
    man["config"].update(digest=d, size=len(cfg))
    set_manifest(lay, man)


Break = Callable[[Path, Built], None]


def _layer_path(lay: Path, b: Built, i: int = 0) -> Path:
    return blob_path(lay, b.layer_digests[i])


def _manifest_edit(fn: Callable[[dict[str, Any]], None]) -> Break:
    def go(lay: Path, b: Built) -> None:
        man = b.manifest_dict()
        fn(man)
        set_manifest(lay, man)

    return go


def _config_edit(fn: Callable[[dict[str, Any]], None]) -> Break:
    def go(lay: Path, b: Built) -> None:
        cfg = b.config_dict()
        fn(cfg)
        set_config(lay, b, canonical(cfg))

    return go


def _index_edit(fn: Callable[[dict[str, Any]], None]) -> Break:
    return lambda lay, b: edit_json(lay / "index.json", fn)


def _escape_blob(lay: Path, b: Built) -> None:
    p = blob_path(lay, b.config_digest)
    outside = lay.parent / "outside"
    outside.write_bytes(b.config)
    p.unlink()
    os.symlink(outside, p)


def _set_layer0(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["layers"][0].update({key: value})


H = hashlib.sha256(b"nothing").hexdigest()

BROKEN: dict[str, tuple[Break, str, str]] = {
    # name: (break it, message expected (regex), at: "resolve" or "read")
    "missing manifest": (lambda lay, b: blob_path(lay, b.manifest_digest).unlink(),
                         "blob sha256:[0-9a-f]{64} missing from the image", "resolve"),
    "missing config": (lambda lay, b: blob_path(lay, b.config_digest).unlink(),
                       "config sha256:.* missing from the image", "resolve"),
    "missing layer": (lambda lay, b: _layer_path(lay, b, 1).unlink(), r"layers\[1\]: blob sha256:.* missing",
                      "resolve"),
    "manifest digest mismatch": (lambda lay, b: blob_path(lay, b.manifest_digest).write_bytes(
        b.manifest.replace(b'"schemaVersion":2', b'"schemaVersion":3')), "manifest sha256:.*digest mismatch",
                                 "resolve"),
    "config digest mismatch": (lambda lay, b: blob_path(lay, b.config_digest).write_bytes(
        b.config.replace(b"amd64", b"arm64")), "config sha256:.*digest mismatch", "resolve"),
    "config shorter": (lambda lay, b: blob_path(lay, b.config_digest).write_bytes(b.config[:-1]),
                       "config sha256:.*shorter than declared", "resolve"),
    "manifest longer": (lambda lay, b: blob_path(lay, b.manifest_digest).write_bytes(b.manifest + b" "),
                        "larger than declared", "resolve"),
    "layer digest mismatch": (lambda lay, b: _layer_path(lay, b).write_bytes(
        _layer_path(lay, b).read_bytes()[:-1] + b"\x01"), "digest mismatch", "read"),
    "layer shorter": (lambda lay, b: _layer_path(lay, b).write_bytes(_layer_path(lay, b).read_bytes()[:-100]),
                      "shorter than declared", "read"),
    "layer longer": (lambda lay, b: _layer_path(lay, b).write_bytes(_layer_path(lay, b).read_bytes() + b"x"),
                     "larger than declared", "read"),
    "index.json malformed": (lambda lay, b: (lay / "index.json").write_bytes(b'{"schemaVersion": 2, "manifests": ['),
                             "index.json: malformed JSON", "open"),
    "index.json duplicate key": (lambda lay, b: (lay / "index.json").write_bytes(
        b'{"schemaVersion": 2, "schemaVersion": 2, "manifests": []}'), "duplicate key 'schemaVersion'", "open"),
    "index.json not an object": (lambda lay, b: (lay / "index.json").write_bytes(b"[]"),
                                 "index.json: a JSON object expected", "open"),
    "index.json not UTF-8": (lambda lay, b: (lay / "index.json").write_bytes(b'{"a": "\xff"}'), "not UTF-8", "open"),
    "oci-layout version": (lambda lay, b: (lay / "oci-layout").write_bytes(b'{"imageLayoutVersion": "2.0.0"}'),
                           "unsupported imageLayoutVersion '2.0.0'", "open"),
    "index.json schemaVersion": (_index_edit(lambda i: i.update(schemaVersion=1)), "schemaVersion must be 2", "open"),
    "index.json path escape in digest": (_index_edit(lambda i: i["manifests"][0].update(
        digest="sha256:../../../../etc/passwd")), "malformed digest", "open"),
    "index.json unknown algorithm": (_index_edit(lambda i: i["manifests"][0].update(digest="md5:" + H[:32])),
                                     "malformed digest 'md5:", "open"),
    "index.json entry media type": (_index_edit(lambda i: i["manifests"][0].update(mediaType="text/plain")),
                                    "unsupported media type 'text/plain'", "resolve"),
    "blob symlink out of the layout": (_escape_blob, "leads out of the image directory", "resolve"),
    "manifest malformed": (lambda lay, b: set_manifest(lay, b"{not json"), "manifest sha256:.*malformed JSON",
                           "resolve"),
    "manifest NaN": (lambda lay, b: set_manifest(lay, b.manifest.replace(b'"layers"', b'"x":NaN,"layers"')),
                     "NaN is not JSON", "resolve"),
    "manifest wrong mediaType": (_manifest_edit(lambda m: m.update(mediaType=_oci.OCI_INDEX)),
                                 r"mediaType 'application/vnd.oci.image.index.v1\+json' disagrees", "resolve"),
    "manifest docker mediaType under an OCI descriptor": (
        _manifest_edit(lambda m: m.update(mediaType=_oci.DOCKER_MANIFEST)), "disagrees with its descriptor", "resolve"),
    "manifest schemaVersion": (_manifest_edit(lambda m: m.update(schemaVersion="2")), "schemaVersion must be 2",
                               "resolve"),
    "manifest without layers": (_manifest_edit(lambda m: m.pop("layers")), "'layers' must be a list", "resolve"),
    "manifest config media type": (_manifest_edit(lambda m: m["config"].update(mediaType=_oci.OCI_LAYER)),
                                   "is not an image config", "resolve"),
    "manifest layer digest malformed": (_manifest_edit(_set_layer0("digest", "sha256:" + H.upper())),
                                        r"layers\[0\]: malformed digest", "resolve"),
    "manifest layer size": (_manifest_edit(_set_layer0("size", "12")), r"layers\[0\]: 'size'", "resolve"),
    "unknown layer media type": (_manifest_edit(_set_layer0("mediaType", "application/vnd.oci.image.layer.v1.tar+xz")),
                                 r"layers\[0\]: unsupported layer media type", "resolve"),
    "nondistributable layer": (_manifest_edit(_set_layer0("mediaType", _oci.OCI_LAYER_NONDIST_GZIP)),
                               r"layers\[0\]: .*foreign/nondistributable layers are not supported", "resolve"),
    "foreign layer": (_manifest_edit(_set_layer0("mediaType", _oci.DOCKER_LAYER_FOREIGN)),
                      "foreign/nondistributable", "resolve"),
    "config malformed": (lambda lay, b: set_config(lay, b, b.config[:-1]), "config sha256:.*malformed JSON", "resolve"),
    "config not an object": (lambda lay, b: set_config(lay, b, b"[1]"), "config sha256:.*JSON object expected",
                             "resolve"),
    "diff_ids count": (_config_edit(lambda c: c["rootfs"]["diff_ids"].pop()), "2 diff_ids for 3 layers", "resolve"),
    "diff_id malformed": (_config_edit(lambda c: c["rootfs"]["diff_ids"].__setitem__(1, "sha256:xyz")),
                          r"rootfs.diff_ids\[1\]: malformed digest", "resolve"),
    "rootfs type": (_config_edit(lambda c: c["rootfs"].update(type="layer")), "rootfs.type must be 'layers'",
                    "resolve"),
    "no rootfs": (_config_edit(lambda c: c.pop("rootfs")), "rootfs: a JSON object expected", "resolve"),
    "config os": (_config_edit(lambda c: c.update(os=None)), "'os' and 'architecture' must be strings", "resolve"),
}


# a tar of a layout with a symlink out holds the link, not the file: test_archive_links_out has that case
@pytest.mark.parametrize(("case", "archive"), [(c, a) for c in BROKEN for a in (False, True)
                                               if not (a and c == "blob symlink out of the layout")])
def test_broken_layout(tmp_path: Path, built: Built, case: str, archive: bool) -> None:
    fn, message, at = BROKEN[case]
    lay = images.write_oci_layout_dir(tmp_path / "lay", [("x:1", built)])
    fn(lay, built)
    path = tar_dir(lay, tmp_path / "lay.tar") if archive else lay
    with pytest.raises(ImageError, match=message) as info, open_source(path) as src:
        assert at != "open"
        img = src.resolve("x:1")
        assert at != "resolve"
        for d in img.layers:
            read_all(src, d)
    assert "\n" not in str(info.value)


def test_broken_index_of_platforms(tmp_path: Path) -> None:
    imgs = multi()
    lay = images.write_oci_layout(tmp_path / "lay", imgs, index_of_platforms=True,
                                  nested_index_hook=lambda i: i.update(mediaType=_oci.DOCKER_LIST))
    with open_source(lay) as src, pytest.raises(ImageError, match="image index sha256:.*mediaType .* is not"):
        src.resolve()
    lay2 = images.write_oci_layout(tmp_path / "lay2", imgs, index_of_platforms=True,
                                   nested_index_hook=lambda i: i["manifests"][0].update(platform={"os": 1}))
    with open_source(lay2) as src, pytest.raises(ImageError, match=r"manifests\[0\]: platform: 'os' must be a string"):
        src.resolve()


def docker_dir(tmp_path: Path, b: Built, form: str) -> Path:
    return images.write_docker_save_dir(tmp_path / "d", [(["x:1"], b)], form)


def _manifest_json(fn: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    return lambda d: edit_json(d / "manifest.json", lambda box: fn(box[""][0]))


DOCKER_BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "config escapes": (_manifest_json(lambda e: e.update(Config="../outside.json")), "escapes the image"),
    "config absolute": (_manifest_json(lambda e: e.update(Config="/etc/passwd")), "is absolute"),
    "layer escapes": (_manifest_json(lambda e: e["Layers"].__setitem__(0, "a/../../x/layer.tar")), "escapes the image"),
    "layer absolute": (_manifest_json(lambda e: e["Layers"].__setitem__(0, "/etc/shadow")), "is absolute"),
    "layer missing": (_manifest_json(lambda e: e["Layers"].__setitem__(0, "nothere/layer.tar")),
                      "nothere/layer.tar missing"),
    "config missing": (_manifest_json(lambda e: e.update(Config="none.json")), "config none.json missing"),
    "layers not a list": (_manifest_json(lambda e: e.update(Layers="x")), "'Layers' must be a list of paths"),
    "repotags not strings": (_manifest_json(lambda e: e.update(RepoTags=[1])), "'RepoTags' must be a list of strings"),
    "manifest.json malformed": (lambda d: (d / "manifest.json").write_bytes(b"[{]"), "manifest.json: malformed JSON"),
    "manifest.json not a list": (lambda d: (d / "manifest.json").write_bytes(b"{}"), "a list of images expected"),
    "diff_ids count": (lambda d: _docker_config_edit(d, lambda c: c["rootfs"]["diff_ids"].append("sha256:" + H)),
                       "4 diff_ids for 3 layers"),
    "config malformed": (lambda d: _docker_config_raw(d, b'{"rootfs": '), "malformed JSON"),
}


def _docker_config_raw(d: Path, raw: bytes) -> None:
    entry = json.loads((d / "manifest.json").read_bytes())[0]
    (d / entry["Config"]).write_bytes(raw)


def _docker_config_edit(d: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    entry = json.loads((d / "manifest.json").read_bytes())[0]
    edit_json(d / entry["Config"], fn)


@pytest.mark.parametrize("case", list(DOCKER_BROKEN))
def test_broken_docker_classic(tmp_path: Path, built: Built, case: str) -> None:
    fn, message = DOCKER_BROKEN[case]
    d = docker_dir(tmp_path, built, "classic")
    (tmp_path / "outside.json").write_bytes(built.config)
    fn(d)
    with pytest.raises(ImageError, match=message) as info, open_source(tar_dir(d, tmp_path / "x.tar")) as src:
        src.resolve()
    assert "\n" not in str(info.value)


def test_docker_oci_form_blob_checked(tmp_path: Path, built: Built) -> None:
    """Docker 25+: blobs named by digest in manifest.json are checked against that digest."""
    d = docker_dir(tmp_path, built, "oci")
    p = blob_path(d, built.layer_digests[2])
    p.write_bytes(p.read_bytes()[:-1] + b"!")
    with open_source(tar_dir(d, tmp_path / "x.tar")) as src:
        img = src.resolve()
        read_all(src, img.layers[0])
        with pytest.raises(ImageError, match=f"blob {built.layer_digests[2]} digest mismatch"):
            read_all(src, img.layers[2])


def test_docker_oci_form_without_index_entry(tmp_path: Path, built: Built) -> None:
    """Docker 25+ form whose index.json lacks the image: the manifest is made from manifest.json, blobs by digest."""
    d = docker_dir(tmp_path, built, "oci")
    edit_json(d / "index.json", lambda i: i.update(manifests=[]))
    with open_source(tar_dir(d, tmp_path / "x.tar")) as src:
        img = src.resolve("x:1")
        assert [x.digest for x in img.layers] == built.layer_digests
        assert [x.media_type for x in img.layers] == [_oci.DOCKER_LAYER_GZIP, _oci.DOCKER_LAYER_ZSTD, _oci.DOCKER_LAYER]
        assert list(img.diff_ids) == built.diff_ids
        assert uncompress(read_all(src, img.layers[1]), img.layers[1].media_type) == L2


def _hostile_tar(path: Path, members: list[tuple[str, bytes | str]]) -> Path:
    """A tar of (name, data) regular files and (name, "->target") symlinks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if isinstance(data, str):
                ti.type, ti.linkname = tarfile.SYMTYPE, data[2:]
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("target", ["../../../etc/passwd", "/etc/passwd", "../x"])
def test_archive_links_out(tmp_path: Path, built: Built, target: str) -> None:
    """A symlink member leading out of the archive is never followed to the file system."""
    cfg = "c.json"
    man = canonical([{"Config": cfg, "RepoTags": ["x:1"], "Layers": ["l/layer.tar"]}])
    path = _hostile_tar(tmp_path / "x.tar", [("manifest.json", man), (cfg, "->" + target), ("l/layer.tar", L1)])
    with open_source(path) as src, pytest.raises(ImageError, match="(escapes the image|is absolute)"):
        src.resolve()


def test_archive_link_loop(tmp_path: Path) -> None:
    man = canonical([{"Config": "a", "RepoTags": [], "Layers": []}])
    path = _hostile_tar(tmp_path / "x.tar", [("manifest.json", man), ("a", "->b"), ("b", "->a")])
    with open_source(path) as src, pytest.raises(ImageError, match="too many links"):
        src.resolve()


@pytest.mark.parametrize("what", ["empty dir", "random file", "gzip tar", "tar of nothing", "missing", "dir of docker"])
def test_not_an_image(tmp_path: Path, built: Built, what: str) -> None:
    p = tmp_path / "x"
    if what == "empty dir":
        p.mkdir()
        message = "not an OCI image layout"
    elif what == "random file":
        p.write_bytes(os.urandom(2000))
        message = "not a readable tar archive"
    elif what == "gzip tar":
        lay = images.write_oci_archive(tmp_path / "a.tar", [(None, built)])
        p.write_bytes(gzip.compress(lay.read_bytes()))
        message = "compressed archive"
    elif what == "tar of nothing":
        _hostile_tar(p, [("hello", b"x")])
        message = "not an OCI archive .* or a docker archive"
    elif what == "dir of docker":
        docker_dir(tmp_path, built, "classic")
        p = tmp_path / "d"
        message = "not an OCI image layout"
    else:
        message = "no such image"
    with pytest.raises(ImageError, match=message):
        open_source(p)


def test_empty_index(tmp_path: Path) -> None:
    lay = images.write_oci_layout(tmp_path / "lay", [])
    with open_source(lay) as src:
        assert src.names() == []
        with pytest.raises(ImageError, match="holds no image"):
            src.resolve()


def test_image_is_frozen(tmp_path: Path, built: Built) -> None:
    with open_source(images.write_oci_layout(tmp_path / "lay", [(None, built)])) as src:
        img: Image = src.resolve()
    with pytest.raises(AttributeError):
        img.name = "x"  # type: ignore[misc]
    shutil.rmtree(tmp_path / "lay")

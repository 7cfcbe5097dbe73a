"""unionfs.image._export.write_image: OCI layout, OCI archive and docker tarballs, re-read with open_source."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import images  # noqa: E402
from images import Built, blob_path, digest, image  # noqa: E402
from layers import build, dir_, reg  # noqa: E402

from unionfs.image import _oci  # noqa: E402
from unionfs.image._export import write_image  # noqa: E402
from unionfs.image._oci import ImageError  # noqa: E402
from unionfs.image._source import Image, open_source  # noqa: E402

L1 = build([dir_("etc"), reg("etc/os-release", b"ID=test\n")])
L2 = build([reg("usr/lib/big", os.urandom(200_000))])
L3 = build([reg("etc/.wh.os-release")])
FORMATS = ["oci", "oci-archive", "docker"]


def export(src_dir: Path, dest: Path, fmt: str, name: str | None = "example.com/app:1.0",
           opener: Callable[[str], BinaryIO] | None = None, progress: list[int] | None = None) -> Image:
    """Resolve the only image of the layout ``src_dir`` and write it to ``dest``; the image written."""
    with open_source(src_dir) as src:
        img = src.resolve()
        write_image(dest, fmt, name=name, manifest=img.manifest, manifest_media_type=img.manifest_media_type,
                    config=img.config, layers=img.layers,
                    open_blob=opener or (lambda d: open(blob_path(src_dir, d), "rb")),  # noqa: SIM115
                    progress=progress.append if progress is not None else None)
    return img


@pytest.fixture(params=[False, True], ids=["oci-types", "docker-types"])
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Built]:
    b = image([L1, L2, L3], compress=["gzip", "zstd", "none"] if not request.param else "gzip",
              docker_media_types=request.param, arch="arm64", variant="v8")
    return images.write_oci_layout(tmp_path / "src", [("x", b)]), b


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path: Path, layout: tuple[Path, Built], fmt: str) -> None:
    src_dir, b = layout
    progress: list[int] = []
    dest = tmp_path / "out"
    export(src_dir, dest, fmt, progress=progress)
    assert progress == sorted(progress) and progress[-1] >= sum(len(x) for x in b.blobs.values()) - len(b.manifest)
    with open_source(dest) as src:
        assert src.kind == {"oci": "oci-layout", "oci-archive": "oci-archive", "docker": "docker-archive"}[fmt]
        assert src.names() == ["example.com/app:1.0"]
        img = src.resolve("example.com/app:1.0")
        assert img.config == b.config and list(img.diff_ids) == b.diff_ids
        assert img.platform == _oci.Platform("linux", "arm64", "v8")
        if fmt == "docker":
            # stored uncompressed: every layer's digest is its diff_id
            assert [d.digest for d in img.layers] == b.diff_ids
            assert {d.media_type for d in img.layers} == {_oci.PLAIN_LAYER_OF[b.manifest_media_type]}
            assert img.manifest_media_type == b.manifest_media_type
        else:
            assert img.manifest == b.manifest and img.manifest_digest == b.manifest_digest
            assert [d.digest for d in img.layers] == b.layer_digests
        for d, raw in zip(img.layers, [L1, L2, L3], strict=True):
            with src.open_blob(d) as f:
                data = f.read()
            assert data == (raw if fmt == "docker" else b.blobs[d.digest])


def test_docker_output_holds_both_forms(tmp_path: Path, layout: tuple[Path, Built]) -> None:
    src_dir, b = layout
    dest = tmp_path / "out.tar"
    export(src_dir, dest, "docker", name="registry.local:5000/team/app")
    with tarfile.open(dest) as tf:
        entry = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
        index = json.loads(tf.extractfile("index.json").read())  # type: ignore[union-attr]
        names = tf.getnames()
    assert entry == [{"Config": "blobs/sha256/" + b.config_digest[7:],
                      "RepoTags": ["registry.local:5000/team/app:latest"],
                      "Layers": ["blobs/sha256/" + d[7:] for d in b.diff_ids]}]
    assert "oci-layout" in names
    (desc,) = index["manifests"]
    assert desc["annotations"] == {_oci.REF_NAME: "latest", _oci.CONTAINERD_NAME: "registry.local:5000/team/app:latest"}
    assert desc["platform"] == {"os": "linux", "architecture": "arm64", "variant": "v8"}
    with open_source(dest) as src:
        img = src.resolve("registry.local:5000/team/app")
        assert img.manifest_digest == desc["digest"]  # the OCI manifest beside manifest.json was found and used
        assert json.loads(img.manifest)["layers"][0]["digest"] == b.diff_ids[0]


@pytest.mark.parametrize("fmt", ["oci-archive", "docker"])
def test_tar_is_deterministic(tmp_path: Path, layout: tuple[Path, Built], fmt: str) -> None:
    src_dir, _ = layout
    export(src_dir, tmp_path / "a", fmt)
    os.utime(src_dir / "index.json", (1, 1))
    export(src_dir, tmp_path / "b", fmt)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    with tarfile.open(tmp_path / "a") as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 0)
        assert m.mode == (0o755 if m.isdir() else 0o644) and (m.isdir() or m.isreg())


def tree(top: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(top)): (p.read_bytes() if p.is_file() else None) for p in sorted(top.rglob("*"))}


def test_oci_dir_is_deterministic(tmp_path: Path, layout: tuple[Path, Built]) -> None:
    src_dir, b = layout
    export(src_dir, tmp_path / "a", "oci")
    export(src_dir, tmp_path / "b", "oci")
    ta = tree(tmp_path / "a")
    assert ta == tree(tmp_path / "b")
    assert set(ta) == {"oci-layout", "index.json", "blobs", "blobs/sha256"} | {"blobs/sha256/" + d[7:] for d in b.blobs}
    index = json.loads(ta["index.json"] or b"")
    assert index["manifests"][0]["annotations"] == {_oci.REF_NAME: "example.com/app:1.0"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_unnamed(tmp_path: Path, layout: tuple[Path, Built], fmt: str) -> None:
    src_dir, b = layout
    export(src_dir, tmp_path / "out", fmt, name=None)
    with open_source(tmp_path / "out") as src:
        assert src.names() == []
        img = src.resolve()
        assert img.name is None and img.config == b.config


@pytest.mark.parametrize("what", ["file", "dir", "empty dir", "dangling symlink"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_dest_exists(tmp_path: Path, layout: tuple[Path, Built], fmt: str, what: str) -> None:
    src_dir, _ = layout
    dest = tmp_path / "out"
    if what == "file":
        dest.write_bytes(b"keep")
    elif what == "dir":
        dest.mkdir()
        (dest / "f").write_bytes(b"keep")
    elif what == "empty dir":
        dest.mkdir()
    else:
        dest.symlink_to(tmp_path / "nowhere")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(FileExistsError, match="already exists"):
        export(src_dir, dest, fmt)
    assert sorted(os.listdir(tmp_path)) == before
    if what == "file":
        assert dest.read_bytes() == b"keep"
    elif what == "dir":
        assert tree(dest) == {"f": b"keep"}
    elif what == "empty dir":
        assert tree(dest) == {}
    else:
        assert dest.is_symlink() and not (tmp_path / "nowhere").exists()


def _corrupt_opener(src_dir: Path, victim: str, how: str) -> Callable[[str], BinaryIO]:
    def opener(d: str) -> BinaryIO:
        data = blob_path(src_dir, d).read_bytes()
        if d == victim:
            if how == "missing":
                raise FileNotFoundError(d)
            data = {"flip": data[:-1] + bytes([data[-1] ^ 1]), "short": data[:-10], "long": data + b"\0"}[how]
        return io.BytesIO(data)

    return opener


@pytest.mark.parametrize("how", ["flip", "short", "long", "missing"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_broken_store_leaves_nothing(tmp_path: Path, fmt: str, how: str) -> None:
    b = image([L1, L2], compress="gzip" if fmt == "docker" else "none")
    src_dir = images.write_oci_layout(tmp_path / "src", [(None, b)])
    victim = b.layer_digests[1]
    dest = tmp_path / "out"
    message = {"flip": "hashes to", "short": "shorter|bytes stored|truncated", "long": "bytes stored|after the end",
               "missing": "missing"}[how]
    if fmt == "docker" and how != "missing":  # decompressed on the way: a corrupt stream may be what shows first
        message = "hashing to|corrupt gzip stream|truncated gzip stream"
    with pytest.raises(ImageError, match=message) as info:
        export(src_dir, dest, fmt, opener=_corrupt_opener(src_dir, victim, how))
    assert victim in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_docker_diff_id_checked(tmp_path: Path) -> None:
    """A layer whose uncompressed content is not its diff_id is refused when written out uncompressed."""
    b = image([L1, L2], config_hook=lambda c: c["rootfs"]["diff_ids"].__setitem__(1, digest(L3)))
    src_dir = images.write_oci_layout(tmp_path / "src", [(None, b)])
    with pytest.raises(ImageError, match=f"uncompressed content hashes to {digest(L2)}, not its diff_id"):
        export(src_dir, tmp_path / "out", "docker")
    assert sorted(os.listdir(tmp_path)) == ["src"]
    export(src_dir, tmp_path / "out", "oci")  # the OCI forms copy blobs as they are: the digests do match


def test_unknown_format_and_layer_type(tmp_path: Path, layout: tuple[Path, Built]) -> None:
    src_dir, _ = layout
    with pytest.raises(ImageError, match="unknown image format 'tgz'"):
        export(src_dir, tmp_path / "out", "tgz")
    with open_source(src_dir) as src:
        img = src.resolve()
    from dataclasses import replace

    bad = [replace(img.layers[0], media_type=_oci.OCI_LAYER_NONDIST_GZIP), *img.layers[1:]]
    with pytest.raises(ImageError, match="foreign/nondistributable"):
        write_image(tmp_path / "out", "oci", name=None, manifest=img.manifest,
                    manifest_media_type=img.manifest_media_type, config=img.config, layers=bad,
                    open_blob=lambda d: open(blob_path(src_dir, d), "rb"))  # noqa: SIM115
    assert not (tmp_path / "out").exists()


def test_docker_layers_deduplicated(tmp_path: Path) -> None:
    """The same layer twice (an image may repeat one) is stored once in a docker tarball."""
    b = image([L1, L1], compress="gzip")
    src_dir = images.write_oci_layout(tmp_path / "src", [(None, b)])
    export(src_dir, tmp_path / "out", "docker", name="x:1")
    with tarfile.open(tmp_path / "out") as tf:
        layer_members = [m for m in tf.getmembers() if m.name == "blobs/sha256/" + hashlib.sha256(L1).hexdigest()]
    assert len(layer_members) == 1
    with open_source(tmp_path / "out") as src:
        img = src.resolve()
        assert list(img.diff_ids) == [digest(L1)] * 2
        with src.open_blob(img.layers[1]) as f:
            assert f.read() == L1
    assert gzip.decompress(b.blobs[b.layer_digests[0]]) == L1

"""Interoperability: skopeo and umoci read what we write, and we read what skopeo writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import images  # noqa: E402
from images import Built, blob_path, image  # noqa: E402
from layers import build, dir_, reg, sym  # noqa: E402

from unionfs.image._export import write_image  # noqa: E402
from unionfs.image._source import open_source  # noqa: E402

SKOPEO = shutil.which("skopeo")
UMOCI = shutil.which("umoci")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")
needs_umoci = pytest.mark.skipif(UMOCI is None, reason="umoci is not installed")

L1 = build([dir_("etc"), reg("etc/os-release", b"ID=test\n"), reg("etc/motd", b"hi\n"), sym("etc/rel", "os-release")])
L2 = build([reg("usr/bin/tool", b"#!/bin/sh\necho tool\n" * 50, mode=0o755)])
L3 = build([reg("etc/.wh.motd"), reg("etc/extra", b"3\n")])


def skopeo(tmp: Path, *args: str) -> str:
    tmpdir = tmp / "skopeo-tmp"
    tmpdir.mkdir(exist_ok=True)
    assert SKOPEO is not None
    proc = subprocess.run([SKOPEO, "--insecure-policy", "--tmpdir", str(tmpdir), *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def built() -> Built:
    return image([L1, L2, L3], compress=["gzip", "zstd", "none"])


@pytest.fixture
def gz_built() -> Built:
    # skopeo refuses to convert a zstd layer to a Docker manifest (docker-archive:)
    return image([L1, L2, L3], compress="gzip")


@needs_skopeo
@pytest.mark.parametrize("dest", ["docker-archive", "oci-archive", "oci"])
def test_we_read_what_skopeo_writes(tmp_path: Path, built: Built, gz_built: Built, dest: str) -> None:
    if dest == "docker-archive":
        built = gz_built
    lay = images.write_oci_layout(tmp_path / "lay", [("v1", built)])
    out = tmp_path / "out"
    target = {"docker-archive": f"docker-archive:{out}:example.com/app:v1", "oci-archive": f"oci-archive:{out}:v1",
              "oci": f"oci:{out}:v1"}[dest]
    skopeo(tmp_path, "copy", "-q", f"oci:{lay}:v1", target)
    with open_source(out) as src:
        assert src.kind == {"oci": "oci-layout"}.get(dest, dest)
        img = src.resolve("example.com/app:v1" if dest == "docker-archive" else "v1")
        assert list(img.diff_ids) == built.diff_ids
        assert json.loads(img.config) == json.loads(built.config)
        for d in img.layers:
            with src.open_blob(d) as f:
                assert len(f.read()) == d.size


def export_to(tmp_path: Path, b: Built, fmt: str, name: str) -> Path:
    lay = images.write_oci_layout(tmp_path / "src", [(None, b)])
    with open_source(lay) as src:
        img = src.resolve()
        dest = tmp_path / f"export-{fmt}"
        write_image(dest, fmt, name=name, manifest=img.manifest, manifest_media_type=img.manifest_media_type,
                    config=img.config, layers=img.layers, open_blob=lambda d: open(blob_path(lay, d), "rb"))  # noqa: SIM115
    return dest


@needs_skopeo
@pytest.mark.parametrize("fmt", ["oci", "oci-archive", "docker"])
def test_skopeo_reads_what_we_write(tmp_path: Path, built: Built, fmt: str) -> None:
    name = "example.com/app:v1" if fmt == "docker" else "v1"
    b = built if fmt != "docker" else image([L1, L2, L3], compress=["gzip", "zstd", "none"])
    dest = export_to(tmp_path, b, fmt, name)
    ref = {"oci": f"oci:{dest}:v1", "oci-archive": f"oci-archive:{dest}:v1", "docker": f"docker-archive:{dest}"}[fmt]
    raw = skopeo(tmp_path, "inspect", "--raw", ref)
    config = skopeo(tmp_path, "inspect", "--config", "--raw", ref)
    assert json.loads(config) == json.loads(b.config)
    if fmt == "docker":
        man = json.loads(raw)
        assert man["config"]["digest"] == b.config_digest
        assert [x["digest"] for x in man["layers"]] == b.diff_ids  # stored uncompressed
    else:
        assert raw.encode() == b.manifest
    info = json.loads(skopeo(tmp_path, "inspect", ref))
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"
    copy = tmp_path / "copy"
    # skopeo checks every blob's digest as it copies (and would compress an uncompressed layer unless told not to)
    skopeo(tmp_path, "copy", "-q", *(["--preserve-digests"] if fmt != "docker" else []), ref, f"oci:{copy}:t")
    with open_source(copy) as src:
        img = src.resolve("t")
        assert list(img.diff_ids) == b.diff_ids
        if fmt != "docker":
            assert [d.digest for d in img.layers] == b.layer_digests


@needs_umoci
def test_umoci_reads_our_layout(tmp_path: Path, built: Built) -> None:
    b = image([L1, L2, L3], compress="gzip")
    dest = export_to(tmp_path, b, "oci", "v1")
    assert UMOCI is not None
    stat = subprocess.run([UMOCI, "stat", "--json", "--image", f"{dest}:v1"], capture_output=True, text=True,
                          timeout=60)
    assert stat.returncode == 0, stat.stderr
    history = json.loads(stat.stdout)["history"]
    assert [h["created_by"] for h in history] == ["layer 0", "layer 1", "layer 2"]
    bundle = tmp_path / "bundle"
    unpack = subprocess.run([UMOCI, "unpack", "--rootless", "--image", f"{dest}:v1", str(bundle)],
                            capture_output=True, text=True, timeout=60)
    assert unpack.returncode == 0, unpack.stderr
    root = bundle / "rootfs"
    assert (root / "etc/os-release").read_bytes() == b"ID=test\n"
    assert (root / "etc/extra").read_bytes() == b"3\n"
    assert not (root / "etc/motd").exists()  # the whiteout of the third layer
    assert os.readlink(root / "etc/rel") == "os-release"
    assert os.access(root / "usr/bin/tool", os.X_OK)

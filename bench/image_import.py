#!/usr/bin/env python3
"""Importing a container image: ``unionfs image import`` beside ``tar -x`` of the same layers and ``umoci unpack``
of the same image, in the same run.

Run as root: ``python bench/image_import.py [--quick] [--repeat N] [--workdir DIR] [--compression gzip|zstd]
[--drop-caches] [--json FILE]``. A deterministic image is generated first (seeded: about 10,000 files and 200 MB
in 5 layers; ``--quick``: a tenth of it) and cached under the work directory. Each repetition makes fresh
targets on the same file system (``--workdir``, default /var/tmp) and times, in an order rotated from one
repetition to the next:

- ``tar -x``: GNU tar extracting each layer blob in turn into one directory (``tar -xzf``; whiteouts are not
  interpreted: they stay as ``.wh.`` files, which costs tar nothing);
- ``unionfs import``: ``python -m unionfs image --root STORE import LAYOUT -q --json`` into a fresh store, the
  command as a user runs it (interpreter start included, its bytecode compiled beforehand), from this
  repository or the source tree ``--repo``;
- ``umoci unpack``: ``umoci unpack --image LAYOUT:TAG BUNDLE`` (``--rootless`` when not run as root);
- the second image: one sharing the first 4 layers with one new layer, imported into the same store (its JSON
  output must say 1 layer applied), beside ``tar -x`` of just that new layer.

Every command's wall clock is taken alone and with a ``sync`` after it (``+ sync``): unionfs syncs each layer
before committing it, tar and umoci leave their writes to the page cache. ``sync`` runs untimed before each
command too. The CPU time (user + system) of the command and its children is shown as well: other work on the
machine disturbs it less than the wall clock. Page cache: warm (the blobs are read from memory) unless
``--drop-caches``, which drops the caches before every command. The report (markdown) goes to stdout: medians
(fastest–slowest in parentheses) and the ratios of the medians to ``tar -x`` (target: unionfs within 1.5x,
ahead of umoci).

Correctness is checked once per image: the unionfs import, mounted read-only with ``unionfs image mount``, must
show the same names, types, modes, owners, sizes and symlink targets as umoci's unpacked rootfs; the run fails
otherwise.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import dataclasses
import datetime
import functools
import gzip
import hashlib
import io
import json
import os
import platform
import random
import resource
import shutil
import stat
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import cpu_model, drop_caches, is_mounted, tool_version  # noqa: E402  (bench is no package)

REPO = Path(__file__).resolve().parent.parent
SEED = 20_261_201
GENERATOR = 1  # bump when the generated image changes: the cache key
TARGET = 1.5  # unionfs import / tar -x
TAG = "bench"
TAG2 = "bench-next"
MTIME = 1_700_000_000
MiB = 1 << 20
DEADLINE = 600.0  # seconds one command may take
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}
CONTENDERS = ("tar -x", "unionfs import", "umoci unpack", "tar -x (new layer)", "unionfs import (second image)")


def progress(msg: str) -> None:
    print(f"image bench: {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# -- the image -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    files: int
    dirs: int
    big_files: int
    total_mib: int

    def key(self, compression: str) -> str:
        return f"g{GENERATOR}-s{SEED}-{self.files}f-{self.dirs}d-{self.big_files}b-{self.total_mib}m-{compression}"


FULL = Sizes(files=10_000, dirs=700, big_files=40, total_mib=200)
QUICK = Sizes(files=1_000, dirs=80, big_files=4, total_mib=20)
#: the share of the files each layer adds, lowest first
LAYER_SHARE = (0.5, 0.2, 0.15, 0.1, 0.05)


class Content:
    """File contents compressible as real ones are (about 2x with gzip): slices of a corpus, half text made of
    words, half bytes skewed towards a few values (as code and data of binaries are)."""

    def __init__(self, rng: random.Random, size: int) -> None:
        letters = "abcdefghijklmnopqrstuvwxyz_"
        vocab = ["".join(rng.choices(letters, k=rng.randint(2, 11))) for _ in range(3000)]
        text = bytearray()
        while len(text) < size // 2:
            line = " ".join(rng.choices(vocab, k=rng.randint(3, 14)))
            text += line.encode() + (b";\n" if rng.random() < 0.3 else b"\n")
        table = bytes(0 if i < 96 else (0x40 + i % 16) if i < 160 else i for i in range(256))
        binary = rng.randbytes(size - len(text)).translate(table)
        self.corpus = bytes(text) + binary
        self.rng = rng

    def make(self, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            n = min(size - len(out), len(self.corpus) // 2)
            at = self.rng.randrange(len(self.corpus) - n + 1)
            out += self.corpus[at : at + n]
        return bytes(out)


@dataclasses.dataclass
class Entry:
    path: str
    kind: str  # "file", "dir", "sym", "hard", "whiteout", "opaque"
    size: int = 0
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    target: str = ""


def _sizes(rng: random.Random, s: Sizes) -> list[int]:
    """File sizes: small ones lognormal around a few KB, ``big_files`` of 1-8 MiB, scaled to ``total_mib``."""
    small = [max(0, min(int(rng.lognormvariate(8.0, 1.6)), 512 << 10)) for _ in range(s.files - s.big_files)]
    big = [rng.randint(1 * MiB, 8 * MiB) for _ in range(s.big_files)]
    want = s.total_mib * MiB
    scale = max(0.1, (want - sum(small)) / max(1, sum(big)))
    big = [int(b * scale) for b in big]
    out = small + big
    rng.shuffle(out)
    return out


def plan_layers(rng: random.Random, s: Sizes) -> tuple[list[list[Entry]], list[Entry]]:
    """The entries of the 5 layers of the first image, and of the new top layer of the second one."""
    top_names = ["usr", "etc", "var", "opt", "lib", "srv", "home", "app"]
    dirs: list[str] = list(top_names)
    while len(dirs) < s.dirs:
        parent = rng.choice(dirs)
        if parent.count("/") >= 6:
            continue
        name = f"{parent}/d{len(dirs)}"
        dirs.append(name)
    sizes = _sizes(rng, s)
    counts = [int(len(sizes) * share) for share in LAYER_SHARE]
    counts[0] += len(sizes) - sum(counts)
    alive: dict[str, str] = {d: "dir" for d in dirs[: len(top_names)]}  # path -> "dir" / "file" / "sym"
    deleted: set[str] = set()
    layers: list[list[Entry]] = []
    serial = 0
    at = 0

    def add_layer(count: int, upper: bool) -> list[Entry]:
        nonlocal serial, at
        entries: list[Entry] = []
        if upper:
            # whiteouts of a few lower files and one lower directory; one lower directory made opaque
            files = sorted(p for p, k in alive.items() if k != "dir")
            for victim in rng.sample(files, min(len(files), max(2, count // 100))):
                if victim in alive:
                    entries.append(Entry(_wh(victim), "whiteout"))
                    del alive[victim]
                    deleted.add(victim)
            lower_dirs = sorted(p for p, k in alive.items() if k == "dir" and "/" in p)
            for i, victim in enumerate(rng.sample(lower_dirs, min(len(lower_dirs), 2))):
                if victim not in alive:
                    continue
                gone = [p for p in alive if p == victim or p.startswith(victim + "/")]
                if i == 0:
                    entries.append(Entry(_wh(victim), "whiteout"))
                    for p in gone:
                        del alive[p]
                        deleted.add(p)
                else:
                    entries.append(Entry(victim, "dir"))
                    entries.append(Entry(victim + "/.wh..wh..opq", "opaque"))
                    for p in gone:
                        if p != victim:
                            del alive[p]
                            deleted.add(p)
            # some lower files overwritten
            files = sorted(p for p, k in alive.items() if k == "file")
            for p in rng.sample(files, min(len(files), count // 30)):
                entries.append(Entry(p, "file", size=sizes[at % len(sizes)], mode=0o644))
                at += 1
        usable = [d for d in dirs if _alive_parent(d, alive, deleted)]
        for _ in range(count):
            d = rng.choice(usable)
            serial += 1
            ext = rng.choice(["so", "py", "txt", "conf", "json", "bin", "h", "mo", ""])
            path = f"{d}/f{serial}" + (f".{ext}" if ext else "")
            mode = rng.choice([0o644] * 8 + [0o755] * 3 + [0o600, 0o444, 0o4755])
            uid = 0 if rng.random() < 0.9 else 1000
            entries.append(Entry(path, "file", size=sizes[at % len(sizes)], mode=mode, uid=uid, gid=uid))
            at += 1
        for _ in range(max(1, count // 100)):
            d = rng.choice(usable)
            serial += 1
            pool = [p for p, k in alive.items() if k == "file"] or ["etc/none"]
            goal = rng.choice(pool)
            target = "/" + goal if rng.random() < 0.5 else os.path.relpath(goal, d)
            entries.append(Entry(f"{d}/l{serial}", "sym", mode=0o777, target=target))
        # directories: every ancestor of what this layer holds, with a few modes other than 0755
        needed: set[str] = set()
        for e in entries:
            parts = e.path.split("/")
            for i in range(1, len(parts)):
                needed.add("/".join(parts[:i]))
        have = {e.path for e in entries if e.kind == "dir"}
        for d in sorted(needed - have):
            mode = 0o755 if rng.random() < 0.9 else rng.choice([0o700, 0o775, 0o1777])
            entries.append(Entry(d, "dir", mode=mode))
        entries.sort(key=_order)
        # hard links: some regular files become links to an earlier regular file of this layer
        regular = [i for i, e in enumerate(entries) if e.kind == "file"]
        for i in rng.sample(regular[1:], min(len(regular) - 1, max(1, count // 200))):
            earlier = [j for j in regular if j < i and entries[j].kind == "file"]
            if earlier:
                j = rng.choice(earlier)
                entries[i] = Entry(entries[i].path, "hard", target=entries[j].path)
        for e in entries:
            if e.kind in ("file", "hard"):
                alive[e.path] = "file"
            elif e.kind == "sym":
                alive[e.path] = "sym"
            elif e.kind == "dir":
                alive[e.path] = "dir"
        return entries

    for i, count in enumerate(counts):
        layers.append(add_layer(count, upper=i > 0))
    new_top = add_layer(counts[-1], upper=True)  # the second image's: over the same 4 layers and the fifth
    return layers, new_top


def _wh(path: str) -> str:
    head, _, base = path.rpartition("/")
    return f"{head}/.wh.{base}" if head else f".wh.{base}"


def _alive_parent(d: str, alive: dict[str, str], deleted: set[str]) -> bool:
    """Whether directory ``d`` can take new entries: it and its ancestors are alive directories, or not made
    yet (made by the layer), but not removed by a whiteout or an opaque directory."""
    parts = d.split("/")
    for i in range(1, len(parts) + 1):
        here = "/".join(parts[:i])
        kind = alive.get(here)
        if (kind is not None and kind != "dir") or (kind is None and here in deleted):
            return False
    return True


def _order(e: Entry) -> tuple[tuple[str, ...], int]:
    # a directory before its content, its opaque marker right after it
    parts = tuple(e.path.split("/"))
    if e.kind == "opaque":
        return parts[:-1] + ("",), 0
    return parts, 0


def write_layer(entries: list[Entry], content: Content, tar_path: Path) -> None:
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.path)
            ti.mtime, ti.uid, ti.gid, ti.mode = MTIME, e.uid, e.gid, e.mode
            data = None
            if e.kind == "file":
                data = content.make(e.size)
                ti.size = len(data)
            elif e.kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif e.kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, e.target
            elif e.kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, e.target
            elif e.kind in ("whiteout", "opaque"):
                ti.size = 0
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)


def _sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def compress_file(src: Path, dest: Path, how: str) -> None:
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        if how == "gzip":
            with gzip.GzipFile(fileobj=fout, mode="wb", compresslevel=6, mtime=0) as gz:
                shutil.copyfileobj(fin, gz, MiB)
        else:
            import zstandard

            zstandard.ZstdCompressor(level=3).copy_stream(fin, fout)


@dataclasses.dataclass
class Image:
    layout: Path
    tag: str
    blobs: list[Path]  # the layer blobs, lowest first

    def to_json(self) -> dict[str, Any]:
        return {"layout": str(self.layout), "tag": self.tag, "blobs": [str(b) for b in self.blobs]}


def _put_blob(layout: Path, data: bytes) -> str:
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    p = layout / "blobs" / "sha256" / d[7:]
    if not p.exists():
        p.write_bytes(data)
    return d


def write_layout(layout: Path, tag: str, layers: list[tuple[str, str, int]], compression: str) -> None:
    """An OCI layout holding one image (the layer blobs must be in place): [(digest, diff-id, size)]."""
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    config = {"architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
              "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]},
              "rootfs": {"type": "layers", "diff_ids": [d for _, d, _ in layers]},
              "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"layer {i + 1}"}
                          for i in range(len(layers))]}
    raw_config = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": _put_blob(layout, raw_config), "size": len(raw_config)},
                "layers": [{"mediaType": LAYER_TYPES[compression], "digest": dg, "size": size}
                           for dg, _, size in layers]}
    raw_manifest = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": [{"mediaType": OCI_MANIFEST, "digest": _put_blob(layout, raw_manifest),
                            "size": len(raw_manifest), "platform": {"architecture": "amd64", "os": "linux"},
                            "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (layout / "index.json").write_text(json.dumps(index, sort_keys=True, separators=(",", ":")))


def generate(cache: Path, sizes: Sizes, compression: str) -> tuple[Image, Image]:
    """The two images (generated once, then found in ``cache``)."""
    top = cache / sizes.key(compression)
    done = top / "done.json"
    if done.exists():
        info = json.loads(done.read_text())
        return tuple(Image(Path(i["layout"]), i["tag"], [Path(b) for b in i["blobs"]]) for i in info)  # type: ignore[return-value]
    shutil.rmtree(top, ignore_errors=True)
    t0 = time.perf_counter()
    progress(f"generating the image ({sizes.files} files, {sizes.total_mib} MiB, {compression}) in {top}")
    rng = random.Random(SEED)
    content = Content(rng, 16 * MiB if sizes.total_mib >= 100 else 4 * MiB)
    layers, new_top = plan_layers(rng, sizes)
    layout1, layout2 = top / "layout", top / "layout-next"
    for lay in (layout1, layout2):
        (lay / "blobs" / "sha256").mkdir(parents=True)
    described: list[tuple[str, str, int]] = []
    for i, entries in enumerate([*layers, new_top]):
        raw = top / f"layer{i + 1}.tar"
        write_layer(entries, content, raw)
        diff_id = _sha_file(raw)
        packed = top / "packed"
        compress_file(raw, packed, compression)
        raw.unlink()
        dg = _sha_file(packed)
        size = packed.stat().st_size
        dest = layout1 if i < len(layers) else layout2
        packed.rename(dest / "blobs" / "sha256" / dg[7:])
        described.append((dg, diff_id, size))
        progress(f"layer {i + 1}: {len(entries)} entries, {size / MiB:.1f} MiB {compression}")
    for dg, _, _ in described[:4]:
        os.link(layout1 / "blobs" / "sha256" / dg[7:], layout2 / "blobs" / "sha256" / dg[7:])
    first, second = described[:5], [*described[:4], described[5]]
    write_layout(layout1, TAG, first, compression)
    write_layout(layout2, TAG2, second, compression)
    images = (Image(layout1, TAG, [layout1 / "blobs" / "sha256" / d[7:] for d, _, _ in first]),
              Image(layout2, TAG2, [layout2 / "blobs" / "sha256" / d[7:] for d, _, _ in second]))
    done.write_text(json.dumps([i.to_json() for i in images]))
    progress(f"generated in {time.perf_counter() - t0:.0f} s")
    return images


# -- running ---------------------------------------------------------------------------------------------------


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    proc: subprocess.CompletedProcess[bytes] = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=DEADLINE, **kw
    )
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise BenchError(f"{' '.join(cmd[:4])}... exited with {proc.returncode}: {' / '.join(err)}")
    return proc


@dataclasses.dataclass
class Timing:
    command: float
    synced: float  # command + the sync after it
    cpu: float = 0.0  # user + system CPU time of the command and its children (tar's gzip), in seconds


class Runner:
    def __init__(self, work: Path, compression: str, drop: bool, repo: Path) -> None:
        self.work = work
        self.compression = compression
        self.drop = drop
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), self.env.get("PYTHONPATH")]))
        self.rootless = os.geteuid() != 0

    def fresh(self, name: str) -> Path:
        p = self.work / name
        if p.exists():
            shutil.rmtree(p)
        return p

    def timed(self, *cmds: list[str], env: dict[str, str] | None = None
              ) -> tuple[Timing, list[subprocess.CompletedProcess[bytes]]]:
        os.sync()
        if self.drop:
            drop_caches()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        out = [run(c, env=env or self.env, cwd=self.work) for c in cmds]
        command = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        os.sync()
        cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
        return Timing(command, time.perf_counter() - t, cpu), out

    def tar(self, blobs: list[Path], dest: Path) -> Timing:
        dest.mkdir(parents=True)
        flag = ["-xzf"] if self.compression == "gzip" else ["--zstd", "-xf"]
        return self.timed(*[["tar", *flag, str(b), "-C", str(dest)] for b in blobs])[0]

    def variant_env(self, paths: str) -> dict[str, str]:
        """The environment of a compared unionfs: ``paths`` (os.pathsep-separated) first on PYTHONPATH."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [paths, env.get("PYTHONPATH")]))
        return env

    def unionfs(self, store: Path, image: Image, applied: int, env: dict[str, str] | None = None) -> Timing:
        cmd = [sys.executable, "-m", "unionfs", "image", "--root", str(store), "import", str(image.layout), "-q",
               "--json"]
        timing, (proc,) = self.timed(cmd, env=env)
        report = json.loads(proc.stdout)
        if report.get("applied") != applied:
            raise BenchError(f"unionfs import of {image.tag}: {report.get('applied')} layers applied, not {applied}")
        return timing

    def umoci(self, image: Image, bundle: Path) -> Timing:
        cmd = ["umoci", "unpack", *(["--rootless"] if self.rootless else []), "--image",
               f"{image.layout}:{image.tag}", str(bundle)]
        return self.timed(cmd)[0]


# -- checking --------------------------------------------------------------------------------------------------


def listing(top: Path) -> dict[str, tuple[object, ...]]:
    """Every object under ``top``: type and permission bits, owner, size (regular files), symlink target."""
    out: dict[str, tuple[object, ...]] = {}

    def walk(d: str, rel: str) -> None:
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                name = f"{rel}{e.name}"
                target = os.readlink(e.path) if stat.S_ISLNK(st.st_mode) else None
                size = st.st_size if stat.S_ISREG(st.st_mode) else None
                out[name] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, size, target)
                if stat.S_ISDIR(st.st_mode):
                    walk(e.path, name + "/")

    walk(str(top), "")
    return out


def mounted_listing(runner: Runner, store: Path, tag: str) -> dict[str, tuple[object, ...]]:
    """The image as ``unionfs image mount`` shows it (read-only)."""
    mnt = runner.fresh("check-mnt")
    mnt.mkdir()
    run([sys.executable, "-m", "unionfs", "image", "--root", str(store), "mount", tag, str(mnt)], env=runner.env,
        cwd=runner.work)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            if time.monotonic() > deadline:
                raise BenchError(f"unionfs image mount {tag}: {mnt} not mounted after 30 s")
            time.sleep(0.05)
        return listing(mnt)
    finally:
        run([sys.executable, "-m", "unionfs", "umount", str(mnt)], env=runner.env, cwd=runner.work)
        mnt.rmdir()


def check_same(ours: dict[str, tuple[object, ...]], theirs: dict[str, tuple[object, ...]], what: str) -> None:
    diffs = []
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name), theirs.get(name)
        if a != b:
            diffs.append(f"  {name}: unionfs {a}, umoci {b}")
    if diffs:
        shown = "\n".join(diffs[:15])
        raise BenchError(f"{what}: the unionfs import and umoci's rootfs differ in {len(diffs)} entries:\n{shown}")
    progress(f"{what}: unionfs and umoci agree on {len(ours)} entries")


# -- the report ------------------------------------------------------------------------------------------------


Results = dict[str, list[Timing]]


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}–{max(values):.2f})"


def table(results: Results) -> list[str]:
    head = ["contender", "command", "ratio to tar -x", "command + sync", "ratio to tar -x (+ sync)", "CPU",
            "CPU ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name in [*CONTENDERS, *(k for k in results if k not in CONTENDERS)]:
        runs = results.get(name)
        if not runs:
            continue
        base = results["tar -x (new layer)" if "new layer" in name or "second" in name else "tar -x"]
        cells = [name]
        for attr in ("command", "synced", "cpu"):
            values = [getattr(t, attr) for t in runs]
            ref = statistics.median(getattr(t, attr) for t in base)
            cells += [_cell(values), f"{statistics.median(values) / ref:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def gzip_library(env: dict[str, str]) -> str:
    """The gzip library the unionfs command decompresses with (isal when installed, else zlib)."""
    code = "from unionfs.image import _stream; print(_stream.GZIP_LIBRARY)"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30,
                             cwd="/")
        return out.stdout.strip() or "unknown"
    return "unknown"


def machine(work: Path) -> dict[str, str]:
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(work)], capture_output=True,
                        text=True).stdout.strip()
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {"date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC", "kernel": platform.release(),
            "cpu": cpu_model(), "cores": str(os.cpu_count()), "memory": f"{mem_kb / (1 << 20):.1f} GiB",
            "python": platform.python_version(), "workdir": f"{work} ({fs})",
            "tar": tool_version(["tar", "--version"]), "umoci": tool_version(["umoci", "--version"])}


def report(results: Results, facts: dict[str, str], desc: str, repeat: int, drop: bool) -> str:
    lines = ["# unionfs image import", "",
             f"{facts['date']}, Linux {facts['kernel']}, {facts['cpu']} ({facts['cores']} CPUs, {facts['memory']}), "
             f"Python {facts['python']} (unionfs from {facts['repo']}, gzip: {facts['gzip']}); {facts['tar']}, "
             f"{facts['umoci']}; work directory {facts['workdir']}.",
             f"{desc}. Median of {repeat} runs (fastest–slowest); page cache "
             f"{'dropped before every command' if drop else 'warm (not dropped)'}.", "", *table(results)]
    tar_med = statistics.median(t.command for t in results["tar -x"])
    ours = statistics.median(t.command for t in results["unionfs import"])
    verdict = f"unionfs import / tar -x: {ours / tar_med:.2f} (target {TARGET})"
    if results.get("umoci unpack"):
        umoci = statistics.median(t.command for t in results["umoci unpack"])
        ahead = 'ahead of' if ours < umoci else 'behind'
        verdict += f"; umoci unpack / unionfs import: {umoci / ours:.2f} ({ahead} umoci)"
    return "\n".join([*lines, "", verdict]) + "\n"


def describe(images: tuple[Image, Image], sizes: Sizes, compression: str) -> str:
    blob_mib = sum(b.stat().st_size for b in images[0].blobs) / MiB
    new_mib = images[1].blobs[-1].stat().st_size / MiB
    return (f"Image: {len(images[0].blobs)} {compression} layers, {sizes.files} files, "
            f"about {sizes.total_mib} MiB of file data, {blob_mib:.0f} MiB of blobs; the second image: its first "
            f"4 layers and a new one of {new_mib:.1f} MiB")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each contender (default 3)")
    p.add_argument("--quick", action="store_true", help="a tenth of the image (1,000 files, 20 MiB)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where the targets (and the cached image) go; default /var/tmp (a disk, not a tmpfs)")
    p.add_argument("--compression", choices=("gzip", "zstd"), default="gzip",
                   help="of the layers (default gzip; umoci is left out for zstd: Debian's umoci reads no zstd)")
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before every command")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with umoci's rootfs")
    p.add_argument("--repo", type=Path, default=REPO,
                   help="the unionfs source tree to run (default: this repository), e.g. to compare revisions")
    p.add_argument("--compare", action="append", default=[], metavar="LABEL=PATHS",
                   help="also time, in the same rounds, the unionfs found with PATHS (os.pathsep-separated: a source "
                   "tree and anything to put before it) first on PYTHONPATH, shown as 'unionfs import (LABEL)' "
                   "(repeatable)")
    p.add_argument("--json", metavar="FILE", type=Path, help="also write every run's times (seconds) to FILE")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    missing = [t for t in ("tar", "umoci") if shutil.which(t) is None]
    if missing:
        print(f"bench/image_import.py: not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    images = generate(args.workdir / "unionfs-image-bench-cache", sizes, args.compression)
    compileall.compile_dir(str(args.repo / "unionfs"), quiet=1)
    work = Path(tempfile.mkdtemp(prefix="unionfs-image-bench-", dir=args.workdir))
    runner = Runner(work, args.compression, args.drop_caches, args.repo.resolve())
    with_umoci = args.compression == "gzip"
    results: Results = {name: [] for name in CONTENDERS if with_umoci or name != "umoci unpack"}
    variants: list[tuple[str, dict[str, str]]] = []
    for spec in args.compare:
        label, _, paths = spec.partition("=")
        if not label or not paths:
            print(f"bench/image_import.py: --compare {spec!r}: LABEL=PATHS expected", file=sys.stderr)
            return 2
        for path in paths.split(os.pathsep):
            if (Path(path) / "unionfs").is_dir():
                compileall.compile_dir(str(Path(path) / "unionfs"), quiet=1)
        variants.append((f"unionfs import ({label})", runner.variant_env(paths)))
        results[variants[-1][0]] = []
    checked = args.no_check or not with_umoci
    try:
        for rep in range(args.repeat):
            progress(f"round {rep + 1}/{args.repeat}")
            store = runner.fresh("store")
            jobs: list[tuple[str, Callable[[], Timing]]] = [
                ("tar -x", functools.partial(runner.tar, images[0].blobs, runner.fresh("tar"))),
                ("unionfs import", functools.partial(runner.unionfs, store, images[0], 5)),
            ]
            if with_umoci:
                jobs.append(("umoci unpack", functools.partial(runner.umoci, images[0], runner.fresh("bundle"))))
            for i, (label, env) in enumerate(variants):
                other = runner.fresh(f"store-{i}")
                jobs.append((label, functools.partial(runner.unionfs, other, images[0], 5, env)))
            shift = rep % len(jobs)
            for name, job in jobs[shift:] + jobs[:shift]:
                results[name].append(job())
                progress(f"  {name}: {results[name][-1].command:.2f} s")
            results["tar -x (new layer)"].append(runner.tar(images[1].blobs[-1:], runner.fresh("tar-next")))
            results["unionfs import (second image)"].append(runner.unionfs(store, images[1], applied=1))
            progress(f"  second image: {results['unionfs import (second image)'][-1].command:.2f} s")
            if not checked:
                check_same(mounted_listing(runner, store, TAG), listing(work / "bundle" / "rootfs"), "the image")
                runner.umoci(images[1], runner.fresh("bundle-next"))
                check_same(mounted_listing(runner, store, TAG2), listing(work / "bundle-next" / "rootfs"),
                           "the second image")
                checked = True
            for name in ("tar", "tar-next", "bundle", "bundle-next", *(f"store-{i}" for i in range(len(variants)))):
                shutil.rmtree(work / name, ignore_errors=True)
    except BenchError as exc:
        print(f"bench/image_import.py: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    facts = machine(args.workdir)
    facts["gzip"] = gzip_library(runner.env)
    facts["repo"] = str(args.repo.resolve())
    desc = describe(images, sizes, args.compression)
    if args.json:
        args.json.write_text(json.dumps({"machine": facts, "image": desc, "runs": {
            k: [dataclasses.asdict(t) for t in v] for k, v in results.items()}}, indent=2) + "\n")
    sys.stdout.write(report(results, facts, desc, args.repeat, args.drop_caches))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

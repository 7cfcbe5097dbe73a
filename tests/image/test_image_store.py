"""Images in a snapshot store, without mounts: import (all formats), sharing of layers by chain ID, refusals
that leave the store as it was, rm, commit of a writable snapshot's layer, export and re-import, and the
``unionfs image`` / ``unionfs layer`` commands' output and exit statuses."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import images as im
import pytest
from layers import Entry, build, dir_, hard, listing, reg, sym

from unionfs.image import _images
from unionfs.image._content import ContentStore
from unionfs.image._feedback import Feedback
from unionfs.image._oci import ImageError
from unionfs.image._stream import LayerError
from unionfs.snapshots import FailedPrecondition, InvalidArgument, NotFound, Snapshotter

BASE = [
    dir_("etc"), reg("etc/os-release", b"ID=test\n"), reg("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    dir_("usr"), dir_("usr/lib"), reg("usr/lib/libc.so", b"\x7fELF" + b"x" * 5000, mode=0o755),
    sym("lib", "usr/lib"), dir_("var"), dir_("var/cache"), reg("var/cache/a", b"a"), reg("var/cache/b", b"b"),
    dir_("opt", mode=0o700), reg("opt/tool", b"tool", mode=0o4755),
]
APP = [
    reg("etc/.wh.passwd"), dir_("var"), dir_("var/cache"),
    reg("var/cache/.wh..wh..opq"), reg("var/cache/new", b"new"),
    reg("lib/app.so", b"app"), hard("etc/os-link", "etc/os-release"), reg("etc/os-release", b"ID=app\n"),
]


def _store(root: Path) -> Snapshotter:
    return Snapshotter(root / "store")


def _layout(tmp: Path, layers: list[list[Entry]], name: str = "test:1", **kw: Any) -> tuple[Path, im.Built]:
    b = im.image([build(entries) for entries in layers], **kw)
    return im.write_oci_layout(tmp / f"layout-{name.replace(':', '-').replace('/', '-')}", [(name, b)]), b


def _merged(sn: Snapshotter, image: str) -> dict[str, tuple[object, ...]]:
    """The merged view of an image's chain computed from its layer directories by overlay rules (whiteouts
    hide, opaque directories hide what the layers beneath hold), for comparing stores without mounting."""
    dirs = [Path(sn.layer_dirs(key)[0]) for key in reversed(sn.image_chain(image))]  # top first
    fmt = _images.store_format(sn).opaque.decode()
    out: dict[str, tuple[object, ...]] = {}
    hidden: set[str] = set()
    opaque: set[str] = set()

    def under(rel: str, tops: set[str], itself: bool) -> bool:
        parts = rel.split("/")
        return any("/".join(parts[:i]) in tops for i in range(1, len(parts) + (1 if itself else 0)))

    for d in dirs:
        seen = listing(d)
        for rel in sorted(seen):
            mode = int(str(seen[rel][0]))
            if under(rel, hidden, True) or under(rel, opaque, False):
                continue
            if stat.S_ISCHR(mode) and seen[rel][6] == 0:
                hidden.add(rel)
                continue
            if rel not in out:
                data = (d / rel).read_bytes() if stat.S_ISREG(mode) else None
                out[rel] = (*seen[rel][:4], seen[rel][5], data)
            if not stat.S_ISDIR(mode):
                hidden.add(rel)
        for rel in seen:
            if stat.S_ISDIR(int(str(seen[rel][0]))):
                try:
                    if os.getxattr(d / rel, fmt) == b"y":
                        opaque.add(rel)
                except OSError:
                    pass
    return out


def test_import_makes_one_committed_snapshot_per_layer_named_by_its_chain_id(tmp_path: Path) -> None:
    layout, b = _layout(tmp_path, [BASE, APP])
    with _store(tmp_path) as sn:
        report = _images.import_image(sn, layout)
        chain = im.chain_ids(b.diff_ids)
        assert report.name == "test:1" and report.applied == 2
        assert sn.image_chain("test:1") == chain
        for key in chain:
            assert sn.stat(key).kind.value == "committed"
            assert sn.stat(key).labels[_images.LABEL_DIFF_ID] in b.diff_ids
        assert sn.stat(chain[1]).parent == chain[0]
        assert [i.name for i in sn.images()] == ["test:1"]
        assert not [i for i in sn.walk() if i.kind.value != "committed"]
        top = Path(sn.layer_dirs(chain[1])[0])
        # lib -> usr/lib in the base: the app's lib/app.so lands in usr/lib, and usr/lib keeps its metadata
        assert (top / "usr/lib/app.so").read_bytes() == b"app"
        assert not (top / "lib").exists()
        # whiteout, opaque marker, hard link to an entry of the same layer
        assert stat.S_ISCHR((top / "etc/passwd").lstat().st_mode)
        fmt = _images.store_format(sn)
        assert os.getxattr(top / "var/cache", fmt.opaque.decode()) == b"y"
        assert (top / "var/cache/new").read_bytes() == b"new"
        # the link was made to the base's etc/os-release (copied up), which the layer then replaced
        assert (top / "etc/os-link").read_bytes() == b"ID=test\n"
        assert (top / "etc/os-release").read_bytes() == b"ID=app\n"
        content = ContentStore(sn.root)
        for d in [b.manifest_digest, b.config_digest, *b.layer_digests]:
            assert content.has(d)


def test_a_second_image_sharing_the_base_applies_only_its_new_layers(tmp_path: Path) -> None:
    base = build(BASE)
    one = im.image([base, build(APP)])
    two = im.image([base, build([reg("other", b"2")])], compress=["zstd", "gzip"])  # same diff-id, other blob
    layout = im.write_oci_layout(tmp_path / "l", [("one:1", one), ("two:1", two)])
    with _store(tmp_path) as sn:
        r1 = _images.import_image(sn, layout, name="one:1")
        r2 = _images.import_image(sn, layout, name="two:1")
        assert [x.state for x in r1.layers] == ["applied", "applied"]
        assert [x.state for x in r2.layers] == ["present, blob stored", "applied"]
        assert "1 already in the store" in r2.summary()
        assert sn.image_chain("one:1")[0] == sn.image_chain("two:1")[0]
        r3 = _images.import_image(sn, layout, name="two:1")
        assert [x.state for x in r3.layers] == ["present", "present"]


@pytest.mark.parametrize("form", ["oci-layout", "oci-archive", "docker-classic", "docker-oci"])
def test_every_format_imports_to_the_same_chain(tmp_path: Path, form: str) -> None:
    b = im.image([build(BASE), build(APP)], compress=["gzip", "zstd"] if form != "docker-classic" else "gzip")
    if form == "oci-layout":
        path = im.write_oci_layout(tmp_path / "x", [("img:1", b)])
    elif form == "oci-archive":
        path = im.write_oci_archive(tmp_path / "x.tar", [("img:1", b)])
    else:
        path = im.write_docker_save(tmp_path / "x.tar", [(["img:1"], b)], form=form.split("-")[1])
    with _store(tmp_path) as sn:
        report = _images.import_image(sn, path)
        assert report.name.endswith("img:1")
        assert sn.image_chain(report.name) == im.chain_ids(b.diff_ids)
        assert _merged(sn, report.name)["etc/os-release"][-1] == b"ID=app\n"


def _host_untouched(tmp_path: Path) -> None:
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["keep"]
    assert (tmp_path / "outside" / "keep").read_bytes() == b"keep"


@pytest.mark.parametrize("layer", [
    [reg("../../outside/evil", b"x")],
    [hard("h", "../../outside/keep")],
    [reg(".wh..."), ],
    [dir_("a"), reg("a/ok", b"1"), hard("b", "missing")],
    [sym("esc", "../../../outside"), reg("esc/.wh.keep")],
], ids=["dotdot", "hardlink-out", "whiteout-dotdot", "hardlink-missing", "whiteout-through-symlink"])
def test_a_hostile_layer_leaves_the_store_as_it_was(tmp_path: Path, layer: list[Entry]) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_bytes(b"keep")
    layout, b = _layout(tmp_path, [BASE, layer])
    with _store(tmp_path) as sn:
        with pytest.raises((LayerError, ImageError)) as info:
            _images.import_image(sn, layout)
        assert "layer 2/2" in str(info.value)
        assert sn.images() == []
        assert sn.walk() == []  # the base layer, applied before the refused one, went again
        assert os.listdir(Path(sn.root) / "snapshots") == []
        assert ContentStore(sn.root).digests() == set()
    _host_untouched(tmp_path)


def test_symlinks_out_of_the_root_are_followed_inside_it(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_bytes(b"keep")
    layout, b = _layout(tmp_path, [BASE, [sym("esc", "../../../outside"), reg("esc/evil", b"x"),
                                          sym("abs", str(tmp_path / "outside")), reg("abs/evil2", b"y")]])
    with _store(tmp_path) as sn:
        _images.import_image(sn, layout)
        merged = _merged(sn, "test:1")
        assert merged["outside/evil"][-1] == b"x"
        assert merged[str(tmp_path / "outside" / "evil2").lstrip("/")][-1] == b"y"
    _host_untouched(tmp_path)


def _ids(sn: Snapshotter) -> list[int]:
    return sorted(int(Path(sn.layer_dirs(i.name)[0]).parent.name) for i in sn.walk())


def test_a_config_lying_about_a_diff_id_is_refused(tmp_path: Path) -> None:
    def lie(cfg: dict[str, object]) -> None:
        rootfs = cfg["rootfs"]
        assert isinstance(rootfs, dict)
        rootfs["diff_ids"] = ["sha256:" + "0" * 64]

    layout, _b = _layout(tmp_path, [BASE], config_hook=lie)
    with _store(tmp_path) as sn:
        with pytest.raises(ImageError, match="diff-id"):
            _images.import_image(sn, layout)
        assert sn.walk() == [] and sn.images() == []


def test_a_corrupt_layer_blob_is_refused_and_nothing_stays(tmp_path: Path) -> None:
    layout, b = _layout(tmp_path, [BASE, APP])
    path = im.blob_path(layout, b.layer_digests[1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with _store(tmp_path) as sn:
        with pytest.raises((ImageError, LayerError)):
            _images.import_image(sn, layout)
        assert sn.walk() == [] and sn.images() == []
        assert ContentStore(sn.root).digests() == set()


def test_rm_removes_what_no_other_image_uses(tmp_path: Path) -> None:
    base = build(BASE)
    one, two = im.image([base, build(APP)]), im.image([base, build([reg("x")])])
    layout = im.write_oci_layout(tmp_path / "l", [("one", one), ("two", two)])
    with _store(tmp_path) as sn:
        _images.import_image(sn, layout, name="one")
        _images.import_image(sn, layout, name="two")
        with pytest.raises(FailedPrecondition, match="image"):
            sn.remove(sn.image_chain("one")[1])
        removed, blobs = _images.remove(sn, "one")
        assert removed == [im.chain_ids(one.diff_ids)[1]]
        assert blobs is not None and one.layer_digests[1] in blobs and one.layer_digests[0] not in blobs
        assert sn.image_chain("two")[0] == im.chain_ids(one.diff_ids)[0]
        removed, _ = _images.remove(sn, "two")
        assert len(removed) == 2 and sn.walk() == []
        assert ContentStore(sn.root).digests() == set()
        with pytest.raises(NotFound):
            _images.remove(sn, "two")


def test_rm_keeps_layers_a_writable_snapshot_is_built_on(tmp_path: Path) -> None:
    layout, _ = _layout(tmp_path, [BASE])
    with _store(tmp_path) as sn:
        _images.import_image(sn, layout)
        key = _images.prepare_writable(sn, "test:1")
        removed, _ = _images.remove(sn, "test:1")
        assert removed == [] and sn.stat(key).parent is not None


def test_commit_adds_one_layer_and_keeps_the_others_digests(tmp_path: Path) -> None:
    layout, b = _layout(tmp_path, [BASE, APP])
    with _store(tmp_path) as sn:
        _images.import_image(sn, layout)
        key = _images.prepare_writable(sn, "test:1")
        with sn.editing(key, "change") as (upper, _lowers):
            Path(upper, "hello").write_bytes(b"hello\n")
            os.mknod(Path(upper, "opt"), stat.S_IFCHR | 0o000, 0)  # a whiteout: rm -r /opt
        report = _images.commit(sn, key, "test:2", source_date_epoch=1_700_000_000)
        s1, s2 = _images.load(sn, "test:1"), _images.load(sn, "test:2")
        assert [d.digest for d in s2.layers[:2]] == [d.digest for d in s1.layers] == b.layer_digests
        assert s2.diff_ids[:2] == s1.diff_ids and s2.diff_ids[2] == report.diff.diff_id
        assert s2.config["history"][-1]["created_by"] == "unionfs image commit"
        assert s2.config["created"] == "2023-11-14T22:13:20Z"
        assert report.diff.whiteouts == 1 and sn.image_chain("test:2")[-1] == report.chain_id
        merged = _merged(sn, "test:2")
        assert merged["hello"][-1] == b"hello\n" and "opt" not in merged and "opt/tool" not in merged
        with pytest.raises(NotFound):
            sn.stat(key)  # it became the committed snapshot of the new layer

        # export, re-import into another store: the same merged view, the same layer digests
        for fmt in ("oci", "oci-archive", "docker"):
            dest = tmp_path / f"out-{fmt}"
            _images.export(sn, "test:2", dest, fmt)
            with Snapshotter(tmp_path / f"store-{fmt}") as other:
                again = _images.import_image(other, dest)
                assert _merged(other, again.name) == merged
                if fmt != "docker":
                    assert [d.digest for d in _images.load(other, again.name).layers] == [d.digest for d in s2.layers]
                    assert again.manifest_digest == s2.info.manifest_digest


def test_commit_of_a_snapshot_not_built_on_an_image_is_refused(tmp_path: Path) -> None:
    with _store(tmp_path) as sn:
        sn.prepare("loose")
        with pytest.raises(FailedPrecondition, match="not built on an image"):
            _images.commit(sn, "loose", "x")


def test_layer_apply_is_all_or_nothing(tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    good.write_bytes(build([reg("a", b"1"), dir_("d"), reg("d/b", b"2")]))
    bad = tmp_path / "bad.tar"
    bad.write_bytes(build([reg("c", b"3"), reg("../../escape", b"x")]))
    with _store(tmp_path) as sn:
        sn.prepare("k")
        _images.apply_to_snapshot(sn, "k", good)
        upper = Path(sn.layer_dirs("k")[0])
        before = listing(upper)
        with pytest.raises(LayerError):
            _images.apply_to_snapshot(sn, "k", bad)
        assert listing(upper) == before and not (upper / "c").exists()
        third = tmp_path / "third.tar"
        third.write_bytes(build([reg(".wh.a"), reg("d/e", b"5")]))
        _images.apply_to_snapshot(sn, "k", third)
        assert stat.S_ISCHR((upper / "a").lstat().st_mode) and (upper / "d/b").read_bytes() == b"2"
        assert sorted(os.listdir(upper.parent)) == ["fs", "work"]


def _cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "unionfs", *args[:1], "--root", str(tmp_path / "store"), *args[1:]],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)


def test_commands_import_ls_inspect_diff_rm(tmp_path: Path) -> None:
    layout, b = _layout(tmp_path, [BASE, APP])
    r = _cli(tmp_path, "image", "import", str(layout), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["name"] == "test:1" and [x["state"] for x in data["layers"]] == ["applied", "applied"]
    assert "layer 1/2" in r.stderr  # plain progress lines when stderr is not a terminal
    r = _cli(tmp_path, "image", "ls")
    assert r.returncode == 0 and "test:1" in r.stdout and "linux/amd64" in r.stdout
    r = _cli(tmp_path, "image", "inspect", "test:1", "--json")
    info = json.loads(r.stdout)
    assert [x["digest"] for x in info["layers"]] == b.layer_digests and info["chain"] == im.chain_ids(b.diff_ids)
    r = _cli(tmp_path, "image", "inspect", "test:1")
    assert "layers (bottom first" in r.stdout and b.layer_digests[0].partition(":")[2][:12] in r.stdout
    top = im.chain_ids(b.diff_ids)[1]
    out1, out2 = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    env = {"SOURCE_DATE_EPOCH": "1600000000"}
    r = _cli(tmp_path, "layer", "diff", top, "-o", str(out1), env=env)
    assert r.returncode == 0, r.stderr
    assert "diff-id: sha256:" in r.stdout
    r = _cli(tmp_path, "layer", "diff", top, "-o", str(out2), "--quiet", env=env)
    assert out1.read_bytes() == out2.read_bytes() and r.stderr == ""
    r = _cli(tmp_path, "image", "rm", "test:1")
    assert r.returncode == 0 and "2 layer snapshots" in r.stdout
    r = _cli(tmp_path, "image", "inspect", "test:1")
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr


def test_commands_refuse_a_hostile_image_with_one_line_and_status_7(tmp_path: Path) -> None:
    layout, _ = _layout(tmp_path, [[reg("../escape", b"x")]])
    r = _cli(tmp_path, "image", "import", str(layout), "-q")
    assert r.returncode == 7
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("unionfs image: refused: layer 1/1")
    assert "Traceback" not in r.stderr and not (tmp_path / "escape").exists()
    r = _cli(tmp_path, "image", "import", str(tmp_path / "nothing-here"))
    assert r.returncode != 0 and r.stderr.count("\n") == 1


def test_feedback_plain_lines_are_periodic(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import unionfs.image._feedback as fbmod

    monkeypatch.setattr(fbmod, "PLAIN_EVERY", 0.0)
    fb = Feedback(sys.stderr, "plain")
    with fb.task("layer 1/1", 2048) as update:
        update(3, 1024)
    assert "layer 1/1: 1.0 KiB of 2.0 KiB, 3 entries" in capsys.readouterr().err
    quiet = Feedback(sys.stderr, "quiet")
    with quiet.task("x", 1) as update:
        update(1, 1)
    quiet.say("nothing")
    assert capsys.readouterr().err == ""


def _truncated_gzip() -> bytes:
    data = im.compress(build([reg("big", os.urandom(1 << 16))]), "gzip")
    return data[: len(data) // 2]


def _entry_larger_than_the_archive() -> bytes:
    raw = bytearray(build([reg("f", b"x" * 1024)]))
    return bytes(raw[: 512 + 600])  # the header says 1024 bytes; the archive ends after 600


def _corrupt_zstd() -> bytes:
    data = bytearray(im.compress(build([reg("f", os.urandom(4096))]), "zstd"))
    data[20] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("make,how", [(_truncated_gzip, "gzip"), (_entry_larger_than_the_archive, "none"),
                                      (_corrupt_zstd, "zstd")], ids=["truncated-gzip", "entry-too-large",
                                                                     "corrupt-zstd"])
def test_broken_streams_are_refused_and_leave_nothing(tmp_path: Path, make: Any, how: str) -> None:
    """The blob is what its descriptor says (digest and size agree), but its content is broken."""
    blob = make()
    base = build(BASE)
    b = im.image([base, blob], compress=["gzip", "none"], layer_media_types=[im.OCI_LAYER["gzip"], im.OCI_LAYER[how]],
                 config_hook=lambda cfg: None)
    layout = im.write_oci_layout(tmp_path / "l", [("x", b)])
    with _store(tmp_path) as sn:
        with pytest.raises((LayerError, ImageError)) as info:
            _images.import_image(sn, layout)
        assert "layer 2/2" in str(info.value)
        assert sn.walk() == [] and sn.images() == []
        assert os.listdir(Path(sn.root) / "snapshots") == []


def test_feedback_bar_draws_bytes_and_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    import unionfs.image._feedback as fbmod

    monkeypatch.setattr(fbmod, "_REDRAW", 0.0)
    out = io.StringIO()
    fb = Feedback(out, "bar")
    with fb.task("layer 2/5 abcdef", 4 << 20) as update:
        update(1234, 2 << 20)
    drawn = out.getvalue()
    assert "layer 2/5 abcdef" in drawn and "1234 entries" in drawn and "2.1/4.2 MB" in drawn


# -- regressions -----------------------------------------------------------------------------------------------


def test_regression_a_layer_the_store_holds_is_checked_against_the_diff_id_of_a_new_blob(tmp_path: Path) -> None:
    """A second image naming a diff-id the store holds, with a blob of other content: refused (regression: the
    blob was stored after a check of its digest only, and exported as the image's layer)."""
    base = build(BASE)
    one = im.image([base])
    other = build([reg("evil", b"not the base")])
    two = im.image([other], config_hook=lambda cfg: cfg["rootfs"].update(diff_ids=[im.digest(base)]))
    layout = im.write_oci_layout(tmp_path / "l", [("one", one), ("two", two)])
    with _store(tmp_path) as sn:
        _images.import_image(sn, layout, name="one")
        with pytest.raises(ImageError, match="diff-id"):
            _images.import_image(sn, layout, name="two")
        assert [i.name for i in sn.images()] == ["one"]
        assert not ContentStore(sn.root).has(two.layer_digests[0])


def test_regression_blobs_are_not_pruned_while_an_import_holds_the_store(tmp_path: Path) -> None:
    """Removing an image while another import runs deletes no blob (regression: the blobs to keep were listed
    before the lock was taken, so an image named meanwhile lost its blobs)."""
    layout, b = _layout(tmp_path, [BASE])
    with _store(tmp_path) as sn:
        _images.import_image(sn, layout)
        content = ContentStore(sn.root)
        with content.holding():
            removed, blobs = _images.remove(sn, "test:1")
            assert blobs is None and content.has(b.layer_digests[0])
        assert _images.tidy(sn) == ([], sorted([b.manifest_digest, b.config_digest, *b.layer_digests]))


def test_regression_a_commit_refused_for_its_name_leaves_the_snapshot_as_it_was(tmp_path: Path) -> None:
    layout, _ = _layout(tmp_path, [BASE])
    with _store(tmp_path) as sn:
        _images.import_image(sn, layout)
        key = _images.prepare_writable(sn, "test:1")
        with pytest.raises(InvalidArgument):
            _images.commit(sn, key, "x" * 5000)
        assert sn.stat(key).kind.value == "active" and [i.name for i in sn.images()] == ["test:1"]


def test_regression_layers_of_the_image_a_name_stood_for_go_when_it_names_another(tmp_path: Path) -> None:
    one = im.image([build(BASE)])
    two = im.image([build([reg("other")])])
    with _store(tmp_path) as sn:
        _images.import_image(sn, im.write_oci_layout(tmp_path / "a", [("x", one)]))
        _images.import_image(sn, im.write_oci_layout(tmp_path / "b", [("x", two)]))
        assert [i.name for i in sn.walk()] == two.diff_ids
        assert ContentStore(sn.root).digests() == {two.manifest_digest, two.config_digest, *two.layer_digests}


def test_regression_name_picks_the_named_image_beside_unnamed_ones(tmp_path: Path) -> None:
    one, two = im.image([build(BASE)]), im.image([build([reg("x")])])
    layout = im.write_oci_layout(tmp_path / "l", [("x", one), (None, two)])
    with _store(tmp_path) as sn:
        assert _images.import_image(sn, layout, name="x").manifest_digest == one.manifest_digest


def test_regression_hostile_metadata_is_refused_naming_the_layer(tmp_path: Path) -> None:
    """A 2 MiB PAX header (tarfile would read any size into memory), a 300-byte xattr name (ERANGE): refused as
    the layer's fault (regression: a traceback-like "unexpected" error, exit status 1); a time beyond what
    64-bit nanoseconds hold is clamped (regression: OverflowError)."""
    import tarfile

    bomb = tarfile.TarInfo("big")
    bomb.pax_headers = {"comment": "x" * (2 << 20)}
    far = tarfile.TarInfo("far")
    far.mtime = 1e300  # type: ignore[assignment]
    long_xattr = tarfile.TarInfo("lx")
    long_xattr.pax_headers = {"SCHILY.xattr.user." + "n" * 300: "v"}
    for ti, why in ((bomb, "metadata header"), (far, None), (long_xattr, "entry")):
        layout, _ = _layout(tmp_path / ti.name, [[(ti, b"")]])
        with _store(tmp_path / ti.name) as sn:
            try:
                _images.import_image(sn, layout)
            except (LayerError, ImageError) as exc:
                assert "layer 1/1" in str(exc) and (why is None or why in str(exc)), exc
            else:
                assert why is None, ti.name  # a time beyond 64-bit nanoseconds is clamped, not refused


def test_regression_layer_apply_links_to_what_the_snapshot_holds(tmp_path: Path) -> None:
    first, second = tmp_path / "1.tar", tmp_path / "2.tar"
    first.write_bytes(build([reg("f", b"data")]))
    second.write_bytes(build([hard("g", "f")]))
    with _store(tmp_path) as sn:
        sn.prepare("k")
        _images.apply_to_snapshot(sn, "k", first)
        _images.apply_to_snapshot(sn, "k", second)
        upper = Path(sn.layer_dirs("k")[0])
        assert (upper / "g").read_bytes() == b"data" and (upper / "g").stat().st_ino == (upper / "f").stat().st_ino


def test_regression_a_layer_whose_content_is_not_its_media_types_compression_is_refused(tmp_path: Path) -> None:
    raw = build([reg("f", b"x")])
    b = im.image([raw], compress="zstd", layer_media_types=[im.OCI_LAYER["gzip"]])
    layout = im.write_oci_layout(tmp_path / "l", [("x", b)])
    with _store(tmp_path) as sn:
        with pytest.raises(ImageError, match="media type"):
            _images.import_image(sn, layout)
        assert sn.walk() == []


def test_commands_exit_statuses_for_a_missing_source_and_an_existing_destination(tmp_path: Path) -> None:
    r = _cli(tmp_path, "image", "import", str(tmp_path / "nothing"))
    assert r.returncode == 3 and r.stderr.startswith("unionfs image: not found:")
    layout, _ = _layout(tmp_path, [BASE])
    assert _cli(tmp_path, "image", "import", str(layout), "-q").returncode == 0
    (tmp_path / "exists").mkdir()
    r = _cli(tmp_path, "image", "export", "test:1", str(tmp_path / "exists"))
    assert r.returncode == 4 and r.stderr.count("\n") == 1
    r = _cli(tmp_path, "image", "mount", "test:1", str(tmp_path / "no-such-dir"), "--writable")
    assert r.returncode != 0
    with _store(tmp_path) as sn:
        assert [i.name for i in sn.walk() if i.kind.value == "active"] == []  # the writable snapshot went again


CAP_NET_RAW = __import__("struct").pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # a v2 vfs_cap_data


def test_rootless_keeps_capabilities_it_may_not_set_and_diff_gives_them_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ordinary user may not set security.capability: apply keeps it in user.unionfs-xattr.*, a mount with
    xattr_permissions shows it (tests/mount), and a diff of the layer writes it as the image had it."""
    import io
    import tarfile

    from unionfs.image import _apply, write_diff
    from unionfs.whiteout import XattrFormat

    real_write = _apply.xattrs.write

    def refusing(target: bytes | int, name: bytes, value: bytes, flags: int = 0) -> None:
        if name.startswith(b"security."):
            raise PermissionError(1, "Operation not permitted")
        real_write(target, name, value, flags)

    monkeypatch.setattr(_apply.xattrs, "write", refusing)
    root = tmp_path / "root"
    root.mkdir()
    layer = build([reg("ping", b"elf", mode=0o755, xattrs={"security.capability": CAP_NET_RAW}),
                   reg("spoof", b"", xattrs={"user.unionfs-xattr.security.capability": b"forged"})])
    res = _apply.apply_layer(io.BytesIO(layer), os.fsencode(root), fmt=XattrFormat.USER, rootless=True)
    assert res.kept_xattrs == 1 and res.dropped_xattrs == 1 and "kept in user.unionfs-xattr" in res.summary()
    assert os.getxattr(root / "ping", "user.unionfs-xattr.security.capability") == CAP_NET_RAW
    assert "user.unionfs-xattr.security.capability" not in os.listxattr(root / "spoof")
    out = tmp_path / "diff.tar"
    with open(out, "wb") as f:
        write_diff(os.fsencode(root), f, fmt=XattrFormat.USER, compression="none", overrides=True)
    with tarfile.open(out) as tf:
        pax = tf.getmember("ping").pax_headers
    assert pax["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == CAP_NET_RAW
    assert not any("unionfs-xattr" in k for k in pax)

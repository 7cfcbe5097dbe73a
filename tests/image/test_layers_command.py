"""``unionfs layers`` on a hand-built image imported into a store: every figure (per layer added, modified,
removed and unchanged entries and bytes; wasted bytes and share, efficiency, reclaimable and duplicated bytes,
the files wasting most) against values computed by hand; the table, --json, and --ci's exit statuses; a
writable layer on top (an active snapshot, layer directories with --upper) counted with its copy-ups."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import images as im
import pytest
from layers import build, dir_, reg

from unionfs import cli, layers_cli
from unionfs.analysis import analyze
from unionfs.image import _images
from unionfs.snapshots import Snapshotter
from unionfs.targets import STACK_XATTR, from_image, from_mount, stack_json
from unionfs.whiteout import XattrFormat

CONFIG_A = b"a" * 1000  # etc/config as the base has it, and as layer 4 puts it back
CONFIG_B = b"b" * 1200  # etc/config as layer 2 changes it
TOOL = b"t" * 400  # bin/tool, and its copy opt/tool-copy in layer 2
DATA_B = b"B" * 300  # data/b, stored again (the same bytes) under layer 3's opaque data

LAYERS = [
    # layer 1 (size 1000 + 100 + 200 + 300 + 50 + 400 = 2050): 10 entries, all added
    [dir_("etc"), reg("etc/config", CONFIG_A), reg("etc/passwd", b"p" * 100),
     dir_("data"), reg("data/a", b"A" * 200), reg("data/b", DATA_B),
     dir_("cache"), reg("cache/x", b"x" * 50), dir_("bin"), reg("bin/tool", TOOL)],
    # layer 2 (size 1200 + 400 = 1600): a modification of the 1000-byte file, a removal by whiteout, a duplicate
    [dir_("etc"), reg("etc/config", CONFIG_B), reg("etc/.wh.passwd"), dir_("opt"), reg("opt/tool-copy", TOOL)],
    # layer 3 (size 300 + 10 = 310): an opaque directory holding data/b again and data/c; cache removed whole
    [dir_("data"), reg("data/.wh..wh..opq"), reg("data/b", DATA_B), reg("data/c", b"c" * 10), reg(".wh.cache")],
    # layer 4 (size 1000 + 80 = 1080): etc/config back as it was, etc/passwd again with other bytes
    [dir_("etc"), reg("etc/config", CONFIG_A), reg("etc/passwd", b"q" * 80)],
]

# Hand-computed figures (fig = (count, bytes)):
EXPECTED_LAYERS = [
    # layer 1: etc etc/config etc/passwd data data/a data/b cache cache/x bin bin/tool are new: 10, 2050 B
    {"size": 2050, "added": (10, 2050), "modified": (0, 0), "replaced": 0, "removed": (0, 0), "unchanged": (0, 0)},
    # layer 2: added opt and opt/tool-copy (2, 400 B); modified etc/config (1, its new 1200 B, replacing 1000 B);
    # removed etc/passwd (1, 100 B); the directory etc merges with the one beneath: no change
    {"size": 1600, "added": (2, 400), "modified": (1, 1200), "replaced": 1000, "removed": (1, 100),
     "unchanged": (0, 0)},
    # layer 3: added data/c (1, 10 B); modified the opaque directory data (0 B) and data/b (300 B, replacing
    # 300 B of the same content: unchanged 1, 300 B); removed data/a (200 B, hidden by the opaque data),
    # cache and cache/x (0 + 50 B): 3 entries, 250 B
    {"size": 310, "added": (1, 10), "modified": (2, 300), "replaced": 300, "removed": (3, 250),
     "unchanged": (1, 300)},
    # layer 4: added etc/passwd (1, 80 B: it was removed in layer 2); modified etc/config (1000 B replacing
    # layer 2's 1200 B, not unchanged: other bytes)
    {"size": 1080, "added": (1, 80), "modified": (1, 1000), "replaced": 1200, "removed": (0, 0),
     "unchanged": (0, 0)},
]
# total 2050 + 1600 + 310 + 1080 = 5040; the user layers (all but the lowest) 1600 + 310 + 1080 = 2990
TOTAL, USER = 5040, 2990
# the final view: etc/config 1000, etc/passwd 80, data/b 300, data/c 10, bin/tool 400, opt/tool-copy 400
FINAL = 2190
# Copies per path (a removal is a copy of 0 B), cumulative size, smallest copy, visible copy:
#   etc/config     1000, 1200, 1000   cum 3200  min 1000  visible 1000
#   etc/passwd     100, 0 (whiteout), 80   cum 180  min 0  visible 80
#   data/a         200, 0 (opaque)    cum 200   min 0     visible 0 (removed)
#   data/b         300, 300           cum 600   min 300   visible 300
#   cache/x        50, 0 (whiteout of cache)   cum 50  min 0  visible 0 (removed)
#   data/c 10, bin/tool 400, opt/tool-copy 400: one copy each (cum = min = visible)
# wasted (dive: the cumulative sizes of the paths with several copies) = 3200 + 180 + 200 + 600 + 50 = 4230
WASTED = 4230
# efficiency = sum of smallest copies / sum of cumulative sizes
#            = (1000 + 0 + 0 + 300 + 0 + 10 + 400 + 400) / 5040 = 2110 / 5040
EFFICIENCY = 2110 / 5040
# reclaimable = sum of (cumulative - visible) = 2200 + 100 + 200 + 300 + 50 = 2850 (= 5040 - 2190)
RECLAIMABLE = 2850
# duplicated: CONFIG_A in layers 1 and 4 (1000 B), TOOL in layers 1 and 2 (400 B), DATA_B in layers 1 and 3
# (300 B): 3 extra copies, 1700 B
DUPLICATED = (3, 1700)
# the files wasting most: (path, copies, wasted, reclaimable, removed), by wasted bytes
TOP = [("/etc/config", 3, 3200, 2200, False), ("/data/b", 2, 600, 300, False), ("/data/a", 2, 200, 200, True),
       ("/etc/passwd", 3, 180, 100, False), ("/cache/x", 2, 50, 50, True)]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("layers")
    built = im.image([build(entries) for entries in LAYERS])
    layout = im.write_oci_layout(tmp / "layout", [("hand:1", built)])
    with Snapshotter(tmp / "store") as sn:
        _images.import_image(sn, layout, name="hand:1")
    return tmp / "store"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(["layers", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    status, out, err = _run(capsys, *argv, "--json")
    assert err == ""
    data: dict[str, Any] = json.loads(out)
    return status, data


def _fig(d: dict[str, int]) -> tuple[int, int]:
    return d["count"], d["bytes"]


def test_figures_agree_with_hand_computed_values(store: Path) -> None:
    a = analyze(from_image("hand:1", str(store)))
    got = [{"size": f.size, "added": (f.added.count, f.added.bytes), "modified": (f.modified.count, f.modified.bytes),
            "replaced": f.replaced_bytes, "removed": (f.removed.count, f.removed.bytes),
            "unchanged": (f.unchanged.count, f.unchanged.bytes)} for f in a.layers]
    assert got == EXPECTED_LAYERS
    assert [f.label.split()[:2] for f in a.layers] == [["layer", f"{i}/4"] for i in range(1, 5)]
    assert (a.total_size, a.user_size, a.final_size) == (TOTAL, USER, FINAL)
    assert a.wasted_bytes == WASTED and a.wasted_percent == pytest.approx(WASTED / USER)
    assert a.efficiency == pytest.approx(EFFICIENCY)
    assert a.reclaimable_bytes == RECLAIMABLE
    assert (a.duplicated.count, a.duplicated.bytes) == DUPLICATED
    assert [(d.size, [i for i, _ in d.copies]) for d in a.duplicates] == [(1000, [1, 4]), (400, [1, 2]), (300, [1, 3])]
    assert sorted(p for _, p in a.duplicates[1].copies) == [b"bin/tool", b"opt/tool-copy"]
    assert [(os.fsdecode(b"/" + w.path), w.copies, w.wasted_bytes, w.reclaimable_bytes, w.removed)
            for w in a.wasted_files] == TOP


def test_json(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, data = _json(capsys, "hand:1", "--root", str(store))
    assert status == 0
    assert data["target"]["kind"] == "image" and data["target"]["name"] == "hand:1"
    layers = data["layers"]
    assert [x["index"] for x in layers] == [1, 2, 3, 4]
    assert [x["size"] for x in layers] == [e["size"] for e in EXPECTED_LAYERS]
    assert [_fig(x["added"]) for x in layers] == [e["added"] for e in EXPECTED_LAYERS]
    assert [_fig(x["modified"]) for x in layers] == [e["modified"] for e in EXPECTED_LAYERS]
    assert [x["modified"]["replaced_bytes"] for x in layers] == [e["replaced"] for e in EXPECTED_LAYERS]
    assert [_fig(x["removed"]) for x in layers] == [e["removed"] for e in EXPECTED_LAYERS]
    assert [_fig(x["unchanged"]) for x in layers] == [e["unchanged"] for e in EXPECTED_LAYERS]
    # the layers' digests are the image's, lowest first, and their directories the store's
    with Snapshotter(store, create=False) as sn:
        stored = _images.load(sn, "hand:1")
    assert [x["digest"] for x in layers] == [layer.digest for layer in stored.layers]
    assert all(Path(x["path"]).is_dir() and x["writable"] is False for x in layers)
    s = data["summary"]
    assert (s["total_size"], s["user_size"], s["final_size"]) == (TOTAL, USER, FINAL)
    assert (s["wasted_bytes"], s["reclaimable_bytes"]) == (WASTED, RECLAIMABLE)
    assert s["wasted_percent"] == pytest.approx(WASTED / USER) and s["efficiency"] == pytest.approx(EFFICIENCY)
    assert s["duplicated"] == {"files": 3, "copies": DUPLICATED[0], "bytes": DUPLICATED[1]}
    assert [(w["path"], w["copies"], w["wasted_bytes"], w["reclaimable_bytes"], w["removed"])
            for w in data["wasted_files"]] == TOP
    assert [d["bytes"] for d in data["duplicates"]] == [1000, 400, 300]
    assert "ci" not in data
    # --top limits the lists
    _, data = _json(capsys, "--image", "hand:1", "--root", str(store), "--top", "2")
    assert [w["path"] for w in data["wasted_files"]] == ["/etc/config", "/data/b"] and len(data["duplicates"]) == 2


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_table(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _run(capsys, "hand:1", "--root", str(store))
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "image hand:1"
    assert _cells(lines[1]) == ["#", "layer", "size", "added", "modified", "removed", "unchanged"]
    rows = [_cells(line) for line in lines[2:6]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    assert [r[2:] for r in rows] == [
        ["2.0 KiB", "10 (2.0 KiB)", "-", "-", "-"],
        ["1.6 KiB", "2 (400 B)", "1 (1.2 KiB)", "1 (100 B)", "-"],
        ["310 B", "1 (10 B)", "2 (300 B)", "3 (250 B)", "1 (300 B)"],
        ["1.1 KiB", "1 (80 B)", "1 (1000 B)", "-", "-"],
    ]
    text = "\n".join(lines)
    assert "total size: 4.9 KiB (5040 B) in 4 layers; the final view 2.1 KiB" in text
    # 4230 / 2990 = 141.47 %; 2110 / 5040 = 41.87 %
    assert "wasted: 4.1 KiB (4230 B), 141.47 % of the 3 layers above the lowest (2.9 KiB)" in text
    assert "efficiency: 41.87 %" in text
    assert "reclaimable by squashing: 2.8 KiB (2850 B)" in text
    assert "duplicated: 3 copies of 3 files stored in several layers, 1.7 KiB (1700 B)" in text
    at = lines.index("files wasting most:")
    assert _cells(lines[at + 1]) == ["copies", "wasted", "reclaimable", "path"]
    assert [_cells(line) for line in lines[at + 2:]] == [
        ["3", "3.1 KiB", "2.1 KiB", "/etc/config"], ["2", "600 B", "300 B", "/data/b"],
        ["2", "200 B", "200 B", "/data/a (removed)"], ["3", "180 B", "100 B", "/etc/passwd"],
        ["2", "50 B", "50 B", "/cache/x (removed)"]]


def test_table_on_a_terminal(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = analyze(from_image("hand:1", str(store)))
    rows = layers_cli._rows(a, from_image("hand:1", str(store)), None)
    layers_cli._print_human(rows, None, True)
    out = capsys.readouterr().out
    assert "┃ #" in out or "│ #" in out  # drawn by rich
    line = next(x for x in out.splitlines() if "310 B" in x)
    assert [c.strip() for c in line.strip("│┃ ").split("│")][2:] == ["310 B", "1 (10 B)", "2 (300 B)", "3 (250 B)",
                                                                     "1 (300 B)"]
    assert "efficiency: 41.87 %" in out and "/etc/config" in out


def test_ci_fails_with_dives_defaults(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # efficiency 0.4187 < 0.9 and share 1.4147 > 0.1: exit 1; wasted bytes: disabled by default
    status, out, _ = _run(capsys, "hand:1", "--root", str(store), "--ci")
    assert status == 1
    assert "FAIL lowest-efficiency: efficiency 0.4187, at least 0.9" in out
    assert "SKIP highest-wasted-bytes: disabled" in out
    assert "FAIL highest-wasted-percent: wasted share 1.4147, at most 0.1" in out
    assert out.rstrip().endswith("CI: FAIL (2 of 2 rules failed)")
    status, data = _json(capsys, "hand:1", "--root", str(store), "--ci")
    assert status == 1 and data["ci"]["passed"] is False
    assert [(r["rule"], r["status"]) for r in data["ci"]["rules"]] == [
        ("lowest-efficiency", "FAIL"), ("highest-wasted-bytes", "SKIP"), ("highest-wasted-percent", "FAIL")]


@pytest.mark.parametrize(("limits", "status", "statuses"), [
    # 4230 B wasted: 5kB (5000) and 4.3KB (4300) allow it, 4KiB (4096) and 4200 do not
    (["--lowest-efficiency", "0.41", "--highest-wasted-percent", "1", "--highest-wasted-bytes", "5kB"], 1,
     ["PASS", "PASS", "FAIL"]),
    (["--lowest-efficiency", "0.41", "--highest-wasted-percent", "disabled", "--highest-wasted-bytes", "4.3KB"], 0,
     ["PASS", "PASS", "SKIP"]),
    (["--lowest-efficiency", "0.42", "--highest-wasted-percent", "disabled"], 1, ["FAIL", "SKIP", "SKIP"]),
    (["--lowest-efficiency", "disabled", "--highest-wasted-percent", "disabled", "--highest-wasted-bytes", "4KiB"],
     1, ["SKIP", "FAIL", "SKIP"]),
    (["--lowest-efficiency", "disabled", "--highest-wasted-percent", "disabled", "--highest-wasted-bytes", "4230"],
     0, ["SKIP", "PASS", "SKIP"]),
    (["--lowest-efficiency", "disabled", "--highest-wasted-percent", "1.5", "--highest-wasted-bytes", "4200"],
     1, ["SKIP", "FAIL", "PASS"]),
])
def test_ci_thresholds(store: Path, capsys: pytest.CaptureFixture[str], limits: list[str], status: int,
                       statuses: list[str]) -> None:
    got, data = _json(capsys, "hand:1", "--root", str(store), "--ci", *limits)
    assert got == status
    assert [r["status"] for r in data["ci"]["rules"]] == statuses
    assert data["ci"]["passed"] is (status == 0)


def test_ci_with_one_layer_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # one layer: nothing is wasted, efficiency 1
    base = tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "f").write_bytes(b"f" * 10)
    status, out, _ = _run(capsys, "--layers", str(base), "--ci")
    assert status == 0 and "CI: PASS (0 of 2 rules failed)" in out and "efficiency: 100.00 %" in out


def test_a_writable_layer_counts_its_copy_ups(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # an active snapshot on the image: a copy-up of etc/config (the same 1000 B) and of bin/tool with a byte
    # changed, and a new file of 5 B
    with Snapshotter(store, create=False) as sn:
        top = sn.image_chain("hand:1")[-1]
        sn.prepare("hand-rw", top)
        upper = Path(sn.layer_dirs("hand-rw")[0])
    (upper / "etc").mkdir()
    (upper / "etc" / "config").write_bytes(CONFIG_A)
    (upper / "bin").mkdir()
    (upper / "bin" / "tool").write_bytes(b"T" + TOOL[1:])
    (upper / "new").write_bytes(b"n" * 5)
    status, data = _json(capsys, "--snapshot", "hand-rw", "--root", str(store))
    assert status == 0
    rw = data["layers"][-1]
    assert rw["label"] == "hand-rw" and rw["writable"] is True and rw["index"] == 5
    # added: new (5 B); modified etc/config and bin/tool (1000 + 400 B, replacing 1000 + 400 B), of which
    # etc/config is unchanged
    assert _fig(rw["added"]) == (1, 5) and _fig(rw["modified"]) == (2, 1400)
    assert rw["modified"]["replaced_bytes"] == 1400 and _fig(rw["unchanged"]) == (1, 1000)
    s = data["summary"]
    # the writable layer adds 1405 B; etc/config gains a copy (cum 4200), bin/tool becomes wasted (cum 800)
    assert s["total_size"] == TOTAL + 1405 and s["final_size"] == FINAL + 5
    assert s["wasted_bytes"] == WASTED + 1000 + 800
    # smallest copies: bin/tool still 400, new 5: (2110 + 5) / 6445
    assert s["efficiency"] == pytest.approx(2115 / 6445)
    # CONFIG_A now in layers 1, 4 and 5: two extra copies
    assert s["duplicated"]["copies"] == DUPLICATED[0] + 1 and s["duplicated"]["bytes"] == DUPLICATED[1] + 1000
    # the same through --layers with --upper, the image's layer directories top-most first
    with Snapshotter(store, create=False) as sn:
        chain = [sn.layer_dirs(key)[0] for key in reversed(sn.image_chain("hand:1"))]
    status, data2 = _json(capsys, "--layers", ":".join(chain), "--upper", str(upper))
    assert status == 0 and data2["summary"] == s
    assert [x["label"] for x in data2["layers"]] == ["lower 4", "lower 3", "lower 2", "lower 1", "upper"]


def test_targets_named_wrong(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(capsys, "nosuch:1", "--root", str(store))
    assert status == 3
    assert err == "unionfs layers: error: nosuch:1: no image and no snapshot of that name in the store\n"
    status, _, err = _run(capsys, str(tmp_path), "--root", str(store))
    assert status == 3 and err.count("\n") == 1 and "no unionfs mount" in err
    status, _, err = _run(capsys, "--layers", str(tmp_path / "missing"))
    assert status == 3 and err.strip().endswith("missing: not a directory")
    with pytest.raises(SystemExit) as exc:
        _run(capsys, "hand:1", "--layers", str(tmp_path))
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        _run(capsys, "hand:1", "--ci", "--highest-wasted-bytes", "lots")
    assert exc.value.code == 2 and "lots" in capsys.readouterr().err


def test_a_mount_point_names_its_stack(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      request: pytest.FixtureRequest) -> None:
    # A directory carrying user.unionfs.stack as a unionfs mount serves it on its root (the layers read are the
    # image's, and a writable layer with a copy-up of etc/config, the same 1000 B, and bin/tool removed)
    with Snapshotter(store, create=False) as sn:
        chain = [os.fsencode(sn.layer_dirs(key)[0]) for key in reversed(sn.image_chain("hand:1"))]
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "config").write_bytes(CONFIG_A)
    (upper / "bin").mkdir()
    os.mknod(upper / "bin" / "tool", 0o020000, os.makedev(0, 0))
    mnt, work = tmp_path / "mnt", tmp_path / "work"
    mnt.mkdir()
    work.mkdir()
    # a plain directory carrying the xattr names nothing: only a unionfs mount serves it
    os.setxattr(mnt, STACK_XATTR, stack_json(chain, os.fsencode(upper), XattrFormat.TRUSTED))
    assert from_mount(str(mnt)) is None
    os.removexattr(mnt, STACK_XATTR)
    opts = "lowerdir=" + ":".join(os.fsdecode(c) for c in chain) + f",upperdir={upper},workdir={work}"
    r = subprocess.run([sys.executable, "-m", "unionfs", "mount", "-o", opts, str(mnt)], capture_output=True,
                       text=True, timeout=60)
    request.addfinalizer(lambda: subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True))
    assert r.returncode == 0, r.stderr
    status, data = _json(capsys, str(mnt))
    assert status == 0
    assert data["target"]["kind"] == "mount" and data["target"]["name"] == str(mnt)
    # (the lower layers are the image's snapshots: named as the image's layers, bottom first)
    assert [x["label"][:16] for x in data["layers"]] == [f"hand:1 layer {i}/4" for i in range(1, 5)] + ["upper"]
    rw = data["layers"][-1]
    assert rw["writable"] is True and rw["size"] == 1000
    assert _fig(rw["modified"]) == (1, 1000) and _fig(rw["unchanged"]) == (1, 1000)
    assert _fig(rw["removed"]) == (1, 400) and _fig(rw["added"]) == (0, 0)
    s = data["summary"]
    # etc/config: a fourth copy (cum 4200); bin/tool: 400 B and a removal (cum 400, smallest 0)
    assert s["total_size"] == TOTAL + 1000 and s["final_size"] == FINAL - 400
    assert s["wasted_bytes"] == WASTED + 1000 + 400
    assert s["efficiency"] == pytest.approx((2110 - 400) / (TOTAL + 1000))
    status, out, _ = _run(capsys, str(mnt))
    assert status == 0 and out.startswith(f"mount {mnt}\n")
    assert _cells(next(line for line in out.splitlines() if line.startswith("5 "))) == [
        "5", "upper (writable)", "1000 B", "-", "1 (1000 B)", "1 (400 B)", "1 (1000 B)"]


def test_names_are_shown_as_they_are(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a name that looks like rich markup, and one that is no UTF-8, both modified in the upper layer
    low, up = tmp_path / "low", tmp_path / "up"
    for d in (low, up):
        d.mkdir()
        (d / "[red]f").write_bytes(b"1" * 5)
        with open(os.fsencode(d) + b"/\xff", "wb") as f:
            f.write(b"2" * 3)
    target = layers_cli.targets.from_layers([str(low)], str(up))
    layers_cli._print_human(layers_cli._rows(analyze(target), target, None), None, True)
    out = capsys.readouterr().out
    assert "/[red]f" in out and "/\\xff" in out
    status, data = _json(capsys, "--layers", str(low), "--upper", str(up))
    assert status == 0 and [os.fsencode(w["path"]) for w in data["wasted_files"]] == [b"/[red]f", b"/\xff"]

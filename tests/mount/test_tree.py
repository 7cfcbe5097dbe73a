"""`unionfs tree` on a live mount equals `unionfs tree --layers ... --upper ...` on its directories, and the union
tutorial (examples/union_tutorial.py) runs end to end, as root and as an ordinary user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from mounthelp import Layers, Mounts, cli, is_mounted

pytestmark = pytest.mark.mount

ROOT = Path(__file__).resolve().parents[2]


def _tree(*args: str | os.PathLike[str]) -> str:
    r = cli("tree", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_tree_of_the_mount_equals_tree_of_its_layers(layers: Layers, mounts: Mounts, tmp_path: Path) -> None:
    (layers.l1 / "dir").mkdir()
    (layers.l1 / "dir" / "mine.txt").write_text("l1's\n")
    mounts.mount(layers.opts(), layers.mnt)
    mnt = layers.mnt
    with open(mnt / "shared.txt", "a") as f:  # a copy-up
        f.write("x")
    os.unlink(mnt / "bottom.txt")  # a whiteout in the upper layer
    (mnt / "new").mkdir()
    stack = ["--layers", f"{layers.l1}:{layers.l2}", "--upper", str(layers.upper)]
    for extra in ([], ["--all"], ["--depth", "1"], ["--all", "--json"]):
        assert _tree(*extra, mnt) == _tree(*extra, *stack), extra
    assert _tree("--all", mnt, "dir") == _tree("--all", *stack, "dir") == _tree("--all", mnt / "dir")
    assert _tree(mnt / "top.txt").splitlines()[-1] == "/top.txt  #1 lower 1  8 B"
    r = cli("tree", mnt / "bottom.txt")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "bottom.txt" in r.stderr
    out = _tree("--all", mnt)
    assert "\x1b" not in out
    lines = out.splitlines()
    assert f"  #0 upper  {layers.upper}  (writable)" in lines
    assert "├── bottom.txt  #2 lower 2  8 B  hidden: whited out by layer #0" in lines
    assert "├── shared.txt  #0 upper  12 B" in lines
    assert "│   ├╌╌ #1 lower 1: regular file, 11 B  shadowed by layer #0" in lines
    assert "├── dir/  #1 lower 1  merged from #1, #2" in lines
    data = json.loads(_tree("--json", mnt))
    assert [c["name"] for c in data["root"]["children"]] == ["dir", "new", "shared.txt", "top.txt"]
    assert {c["name"]: c["layer"] for c in data["root"]["children"]} == {"dir": 1, "new": 0, "shared.txt": 0,
                                                                        "top.txt": 1}
    svg = tmp_path / "t.svg"
    _tree("--svg", svg, mnt)
    texts = "".join("".join(el.itertext()) for el in ET.parse(svg).getroot().iter("{http://www.w3.org/2000/svg}text"))
    assert "deep.txt" in texts and "lower\xa02" in texts
    mounts.umount(mnt)
    r = cli("tree", mnt)
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "not inside a unionfs mount" in r.stderr


def test_the_tutorial_runs() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "union_tutorial.py")], capture_output=True,
                          text=True, timeout=120, env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    lines = out.splitlines()
    if os.geteuid() != 0:
        assert "userxattr" in out
    # the tree with what it hides
    assert "│   ├── hostname  #2 lower 2  8 B" in lines
    assert "│   │   └╌╌ #3 lower 3: regular file, 5 B  shadowed by layer #2" in lines
    assert "│   └── motd  #3 lower 3  16 B  hidden: whited out by layer #2" in lines
    assert "    └── cache/  #2 lower 2  opaque" in lines
    assert "        └── old.pkg  #3 lower 3  100 B  hidden: below the opaque directory var/cache of layer #2" in lines
    assert "│   └── doc/  #1 lower 1  merged from #1, #3" in lines
    # inspect before and after the copy-up, and the tree after it
    assert "  write     copy-up of 8 bytes from layer #2 into the upper layer, after 1 parent directory" in lines
    assert "  copied up yes: replaces #2 lower 2 ($T/update): regular file, 8 bytes" in lines
    assert "└── hostname  #0 upper  20 B" in lines
    # the virtual xattr, EXDEV, the whiteout looked up
    asked = next(i for i, line in enumerate(lines) if line.endswith("user.unionfs.layer merged/etc/hostname") or
                 line.endswith('"merged/etc/hostname", "user.unionfs.layer"))\''))
    assert lines[asked + 1] == "$T/upper"
    assert "rename: EXDEV (Invalid cross-device link)" in lines
    assert lines[lines.index("$ stat merged/etc/motd") + 1] == "ENOENT"
    # unionfs layers on the mount counts the upper layer
    assert any(line.startswith("4  upper (writable)") for line in lines)
    # the trace shows what the server decided
    assert any(" copy-up etc/hostname: 8 bytes from layer 2 ($T/update)" in line for line in lines)
    assert any("rename share/doc -> share/manual: EXDEV" in line for line in lines)
    assert any("lookup etc/motd: whited out by layer 2 ($T/update)" in line for line in lines)
    # what the upper layer holds at the end, and nothing left behind
    assert lines[lines.index("  upper/etc/") + 1] == "  upper/etc/hostname"
    assert "  base/etc/hostname still reads: 'base'" in lines
    assert lines[-1] == "Done: the tutorial's folder has been removed."
    tmp = next(line for line in lines if line.startswith("Three layers under $T=")).split("=", 1)[1].split(",")[0]
    assert not os.path.exists(tmp) and not is_mounted(Path(tmp) / "merged")

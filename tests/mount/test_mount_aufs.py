"""``-o aufs_markers`` through a real mount, against fuse-overlayfs (which always honours AUFS markers) over the
same lower layers: containers/storage writes its image layers this way when it uses a mount program.

The two upper layers may differ on disk (fuse-overlayfs may write ``.wh.`` files there); only the merged views
are compared, after mounting, after the same changes, and after mounting the changed layers again.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))

from kernel_diff import (  # noqa: E402
    Dir,
    File,
    FuseMount,
    Mount,
    Side,
    assert_same,
    build_template,
    run_op,
    snapshot_tree,
)

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(shutil.which("fuse-overlayfs") is None,
                       reason="fuse-overlayfs is not installed: nothing to compare -o aufs_markers with"),
]

#: an AUFS marker as containers/storage writes it: empty, mode 0000
WH = File(b"", mode=0o000)


def _owned(layer: dict[str, Any]) -> dict[str, Any]:
    """``layer`` with every object (implied parent directories too) owned by this process's user, so that an
    ordinary user can lay it out (the rootless pass runs these tests as one)."""
    out: dict[str, Any] = {}
    for rel in sorted(layer):
        parts = rel.split("/")
        for i in range(1, len(parts)):
            out.setdefault("/".join(parts[:i]), Dir())
        entry = layer[rel]
        out[rel] = File(entry.encode()) if isinstance(entry, str) else entry
    return {rel: dataclasses.replace(e, uid=os.getuid(), gid=os.getgid()) for rel, e in out.items()}


#: top first. No layer holds both NAME and its marker ``.wh.NAME`` (see test_aufs: there the layer's own NAME
#: shows, where fuse-overlayfs lets the marker win).
AUFS_LOWERS: tuple[dict[str, Any], ...] = (
    {
        "keep.txt": "keep from l1\n",
        ".wh.gone.txt": WH,                 # a file of l2 and l3 deleted
        ".wh.gonedir": WH,                  # a directory of l3 deleted
        "opq": Dir(), "opq/.wh..wh..opq": WH, "opq/new.txt": "new in opq\n",
        "swap": "a directory of l2 replaced by a file\n",
        "back": Dir(), "back/.wh..wh..opq": WH, "back/again.txt": "a directory again\n",
        "mixed/.wh.a": WH, "mixed/b.txt": "b from l1\n",
        ".wh..wh.plnk": Dir(mode=0o700), ".wh..wh.plnk/x": "aufs metadata\n", ".wh..wh.aufs": WH,
        "sub/top.txt": File(b"top\n", mode=0o600),
        ".wh.target": WH, "mover": "moved over a whited-out name\n",
    },
    {
        "gone.txt": "gone from l2\n",
        "swap/in.txt": "under swap\n",
        "back": "a file between two directories\n",
        "opq/old.txt": "old in opq\n",
        "mixed/a": "a from l2\n", "mixed/c.txt": "c from l2\n",
        "sub/.wh.x": WH, "sub/y": "y from l2\n",
        "exec": File(b"#!/bin/sh\n", mode=0o755),
        "target": "hidden by l1's marker\n",
    },
    {
        "gone.txt": "gone from l3\n",
        "gonedir/f": "in gonedir\n",
        "back/old.txt": "old in back\n",
        "opq/deeper.txt": "deeper in opq\n",
        "mixed/a": "a from l3\n", "mixed/d.txt": "d from l3\n",
        "sub/x": "x from l3\n", "sub/z": "z from l3\n",
    },
)

#: the merged view the markers make (names only; contents, types and modes are compared with fuse-overlayfs)
EXPECTED_NAMES = {
    ".", "keep.txt", "opq", "opq/new.txt", "swap", "back", "back/again.txt", "mixed", "mixed/b.txt",
    "mixed/c.txt", "mixed/d.txt", "sub", "sub/top.txt", "sub/y", "sub/z", "exec", "mover",
}

CHANGES: list[tuple[Any, ...]] = [
    ("unlink", "keep.txt"),                              # delete a name (no lower copy)
    ("unlink", "mixed/c.txt"),                           # delete a lower name
    ("unlink", "sub/y"), ("unlink", "sub/z"), ("unlink", "sub/top.txt"),
    ("rmdir", "sub"),                                    # a merged directory whose rest is whited out
    ("create", "gone.txt", b"gone.txt again\n"),          # create a whited-out name again
    ("mkdir", "gonedir"), ("create", "gonedir/g", b"g\n"),
    ("create", "mixed/a", b"a again\n"),
    ("append", "opq/new.txt", b"appended\n"),            # write to a file under an opaque directory
    ("create", "opq/old.txt", b"old again\n"),            # a name hidden by the opacity, made again
    ("rename", "mixed/b.txt", "mixed/d.txt"),            # over a lower name
    ("rename", "swap", "swapped"),
    ("rename", "mover", "target"),                       # onto a whited-out name
    ("chmod", "exec", 0o700),
]


def _side(root: Path) -> Side:
    """The AUFS layers laid out under ``root``, with an empty upper layer, a workdir and a mount point (built
    for each side, not cloned: an ordinary user cannot read the mode 0000 markers)."""
    template = build_template(root, [_owned(layer) for layer in AUFS_LOWERS])
    (root / "work").mkdir()
    (root / "mnt").mkdir()
    return Side(root, [template.lower(i) for i in range(template.nlowers)], template.upper, root / "work",
                root / "mnt")


class AufsUnionfs(FuseMount):
    """unionfs with ``-o aufs_markers`` and ``options``."""

    def __init__(self, side: Side, options: str) -> None:
        super().__init__(side, "unionfs")
        self.options = options

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[-2] += "," + self.options
        return cmd


@pytest.fixture(params=["aufs_markers", "aufs_markers,prescan"])
def sides(request: pytest.FixtureRequest, tmp_path: Path, fuse_ready: None) -> Iterator[tuple[Mount, Mount]]:
    """The AUFS layers, cloned for fuse-overlayfs and for unionfs -o aufs_markers (with the lower layers
    probed, or prescanned), both mounted; always torn down."""
    mounts: list[Mount] = [FuseMount(_side(tmp_path / "fuse-overlayfs"), "fuse-overlayfs"),
                           AufsUnionfs(_side(tmp_path / "unionfs"), request.param)]
    try:
        for m in mounts:
            m.mount()
        yield mounts[0], mounts[1]
    finally:
        problems = [p for m in mounts for p in m.teardown()]
        assert not problems, problems


def _same_views(reference: Mount, unionfs: Mount, what: str) -> dict[str, Any]:
    ref = snapshot_tree(reference.root)
    got = snapshot_tree(unionfs.root)
    assert_same(ref, got, what, la="fuse-overlayfs", lb="unionfs -o aufs_markers",
                context="\n" + unionfs.server_log() if isinstance(unionfs, FuseMount) else "")
    return got


def test_merged_view_matches_fuse_overlayfs(sides: tuple[Mount, Mount]) -> None:
    got = _same_views(*sides, "merged views of AUFS layers")
    assert set(got) == EXPECTED_NAMES


def test_changes_over_aufs_layers_match_fuse_overlayfs(sides: tuple[Mount, Mount]) -> None:
    reference, unionfs = sides
    for op in CHANGES:
        want, got = run_op(reference.root, op), run_op(unionfs.root, op)
        assert want[0] == "ok", f"premise: fuse-overlayfs gave {want!r} for {op!r}"
        assert got == want, f"{op!r}: fuse-overlayfs={want!r} unionfs={got!r}"
    for rel in ("", "gonedir", "opq", "mixed"):
        want, got = run_op(reference.root, ("listdir", rel)), run_op(unionfs.root, ("listdir", rel))
        assert got == want, (rel, want, got)
    _same_views(reference, unionfs, "merged views after the changes")
    for m in sides:
        m.unmount()
    for m in sides:
        m.mount()
    after = _same_views(reference, unionfs, "merged views mounted again after the changes")
    assert "gonedir/f" not in after and "opq/deeper.txt" not in after and "sub" not in after

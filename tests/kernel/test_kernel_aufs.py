"""Without ``-o aufs_markers``, AUFS-style names in lower layers (``.wh.NAME``, ``.wh..wh..opq``) are ordinary
files, as kernel overlayfs shows them: they hide nothing, and the merged view may remove, replace or make them."""

from __future__ import annotations

import pytest
from kernel_diff import EXTRA_OPTIONS, IMPL, Dir, File, StackPair

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(IMPL == "fuse-overlayfs", reason="fuse-overlayfs always honours AUFS markers"),
    pytest.mark.skipif("aufs_markers" in EXTRA_OPTIONS, reason="unionfs runs with -o aufs_markers here"),
]

WH = File(b"", mode=0o000)

AUFS_LOWERS = (
    {".wh.f": WH, ".wh.d": WH, "o": Dir(), "o/.wh..wh..opq": WH, "o/mine": "mine\n", ".wh..wh.plnk/x": "x\n"},
    {"f": "f from l2\n", "d/x": "x from l2\n", "o/below": "below\n", ".wh.g": "an ordinary file\n"},
)


@pytest.fixture
def aufs_pair(make_pair) -> StackPair:  # type: ignore[no-untyped-def]
    pair: StackPair = make_pair(lowers=AUFS_LOWERS)
    return pair


def test_aufs_names_are_ordinary_files_without_the_option(aufs_pair: StackPair) -> None:
    view = aufs_pair.assert_same_tree()
    assert {".wh.f", ".wh.d", "f", "d/x", "o/.wh..wh..opq", "o/below", ".wh..wh.plnk/x"} <= set(view)


def test_aufs_names_change_like_ordinary_files_without_the_option(aufs_pair: StackPair) -> None:
    aufs_pair.expect(("read", ".wh.g"), ("ok", b"an ordinary file\n"))
    aufs_pair.assert_ops([
        ("unlink", ".wh.f"),
        ("stat", "f"),
        ("create", ".wh.new", b"made in the merged view\n"),
        ("unlink", "o/.wh..wh..opq"),
        ("listdir", "o"),
        ("append", ".wh.d", b"now with data\n"),
        ("rename", ".wh.g", ".wh.h"),
        ("listdir", ""),
    ])
    aufs_pair.assert_same_tree()
    aufs_pair.assert_same_upper()

"""Copy-up: the first change to a lower object copies it to the upper layer with its data, mode, owner,
nanosecond mtime, symlink target and xattrs, and its parents with their attributes."""

from __future__ import annotations

import os
from typing import Any

import pytest
from kernel_diff import CAPABILITY, OLD_NS, File, StackPair, format_op, snapshot_upper

pytestmark = pytest.mark.kernel

FILE_OPS = [
    ("write", 2, b"XY"),
    ("append", b"appended"),
    ("truncate", 3),
    ("truncate", 0),
    ("truncate", 100),
    ("chmod", 0o600),
    ("chmod", 0o4755),
    ("chown", 2000, 2001),
    ("chown", 1000, 1001),
    ("utime", OLD_NS, OLD_NS + 1),
    ("touch",),
    ("setxattr", "user.new", b"value"),
    ("setxattr", "user.k", b"replaced"),
    ("removexattr", "user.k"),
    ("open", "O_WRONLY"),
    ("open", "O_RDWR|O_TRUNC"),
    ("open", "O_RDONLY|O_TRUNC"),
]


def _cases() -> list[tuple[str, tuple]]:  # type: ignore[type-arg]
    cases = []
    for path in ("owned", "deep/er/est/file"):
        cases += [(path, op) for op in FILE_OPS]
    cases += [
        ("link_to_top", ("chown", 3000, 3000)),
        ("link_to_top", ("utime", OLD_NS, OLD_NS + 5)),
        ("link_to_top", ("setxattr", "trusted.sym", b"on a symlink")),
        ("xdir", ("chmod", 0o700)),
        ("xdir", ("chown", 0, 0)),
        ("xdir", ("utime", OLD_NS, OLD_NS + 7)),
        ("xdir", ("setxattr", "user.d2", b"second")),
        ("dir/sub", ("chmod", 0o711)),
        ("pipe", ("chmod", 0o600)),
        ("pipe", ("chown", 7, 8)),
        ("big", ("write", 300_000, b"in the middle")),
        ("exe", ("chmod", 0o700)),
    ]
    return cases


CASES = _cases()


@pytest.mark.parametrize(("path", "op"), CASES, ids=[f"{p}-{format_op(o)}" for p, o in CASES])
def test_copy_up_on_change_matches_kernel(pair: StackPair, path: str, op: tuple) -> None:  # type: ignore[type-arg]
    name, *args = op
    pair.assert_ops([(name, path, *args), ("stat", path), ("lstat", path), ("listxattr", path)])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_copy_up_preserves_data_mode_owner_mtime_and_xattrs(pair: StackPair) -> None:
    before = os.lstat(pair.uside.lowers[0] / "owned")
    pair.assert_ops([("setxattr", "owned", "user.added", b"1")])
    pair.assert_same_upper()
    for side, upper in (("kernel", pair.kside.upper), (pair.impl, pair.uside.upper)):
        node = snapshot_upper(upper, stable_only=False)["owned"]
        assert node.type == "file", side
        assert (node.mode, node.uid, node.gid) == (0o640, 1000, 1001), f"{side}: {node!r}"
        assert node.mtime_ns == before.st_mtime_ns, f"{side}: mtime not preserved: {node!r}"
        assert dict(node.xattrs)["user.k"] == b"v", f"{side}: {node!r}"  # type: ignore[arg-type]
        assert (upper / "owned").read_bytes() == b"owned by 1000\n", side


def test_copy_up_of_a_deep_file_copies_its_parents_with_their_attributes(pair: StackPair) -> None:
    pair.assert_ops([("append", "deep/er/est/file", b"+")])
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_copy_up_of_a_symlink_keeps_its_target(pair: StackPair) -> None:
    pair.assert_ops([("chown", "link_to_top", 42, 43), ("readlink", "link_to_top"), ("lstat", "link_to_top")])
    pair.assert_same_upper()
    for upper in (pair.kside.upper, pair.uside.upper):
        assert os.readlink(upper / "link_to_top") == "top.txt"


def test_reading_does_not_copy_up(pair: StackPair) -> None:
    pair.assert_ops([("read", "top.txt"), ("open", "owned", "O_RDONLY"), ("listxattr", "owned"),
                     ("getxattr", "owned", "user.k"), ("listdir", "deep/er"), ("readlink", "link_to_top")])
    pair.assert_same_upper()


def test_sparse_file_copy_up_stays_sparse(pair: StackPair) -> None:
    pair.assert_ops([("chmod", "sparse", 0o600), ("read", "sparse")])
    pair.assert_same_tree()
    pair.unmount_all()
    blocks = {side: os.stat(upper / "sparse").st_blocks
              for side, upper in (("kernel", pair.kside.upper), (pair.impl, pair.uside.upper))}
    lower_blocks = os.stat(pair.uside.lowers[2] / "sparse").st_blocks
    # 32 MiB is 65536 blocks of 512 bytes; the data is three small pieces.
    assert blocks[pair.impl] <= max(4 * lower_blocks, blocks["kernel"] * 2, 256), (
        f"copy-up filled the holes: st_blocks={blocks} (lower file: {lower_blocks})")
    pair.assert_same_upper(unmount=False)


def test_regression_files_opened_for_writing_show_the_capability_they_have_until_a_write_drops_it(
        make_pair: Any) -> None:
    # A file opened for writing has what it lacks of security.capability (the xattr the kernel asks before each
    # write) noted at the open; one that has it must go on showing it, until a write makes the kernel remove it.
    pair = make_pair([{"capped": File(b"capped\n", mode=0o755), "plain": File(b"plain\n")}], mount=False)
    for side in (pair.kside, pair.uside):  # (the layers' clones leave security.* out)
        os.setxattr(side.lowers[0] / "capped", "security.capability", CAPABILITY)
    pair.mount()
    pair.expect(("getxattr", "capped", "security.capability"), ("ok", CAPABILITY))
    pair.assert_ops([
        ("open", "capped", "O_WRONLY"), ("getxattr", "capped", "security.capability"),
        ("open", "plain", "O_WRONLY"), ("getxattr", "plain", "security.capability"),
        ("append", "plain", b"+"), ("getxattr", "plain", "security.capability"),
    ])
    pair.expect(("getxattr", "capped", "security.capability"), ("ok", CAPABILITY))
    pair.expect(("append", "capped", b"+"), ("ok", 1))
    pair.expect(("getxattr", "capped", "security.capability"), "ENODATA")
    pair.assert_ops([
        ("read", "capped"),
        ("create", "new", b"new\n", 0o644), ("append", "new", b"+"), ("getxattr", "new", "security.capability"),
        ("setxattr", "new", "security.capability", CAPABILITY), ("getxattr", "new", "security.capability"),
        ("append", "new", b"+"), ("getxattr", "new", "security.capability"),
    ])
    pair.assert_same_tree()
    pair.assert_same_upper()

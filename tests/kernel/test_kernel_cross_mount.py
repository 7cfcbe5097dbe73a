"""The upper layer is the on-disk format: what one implementation writes, the other must read back as the
same merged view, and unionfs must show after a remount what it showed before."""

from __future__ import annotations

import pytest
from kernel_diff import (
    OLD_NS,
    OVL,
    KernelMount,
    StackPair,
    assert_same,
    format_op,
    new_mount,
    run_op,
    snapshot_tree,
)

pytestmark = pytest.mark.kernel

#: Touches every on-disk construct: copied-up files (data, mode, owner, xattrs, times), whiteouts of files
#: and directories, opaque directories, new files/dirs/symlinks/fifos, hard links, escaped overlay xattrs.
CROSS_OPS = [
    ("append", "top.txt", b"+appended"),
    ("unlink", "mid.txt"),
    ("unlink", "dir/b"),
    ("unlink", "dir/sub/c"),
    ("rmdir", "dir/sub"),
    ("mkdir", "dir/sub", 0o700),
    ("create", "dir/sub/new", b"new in an opaque dir"),
    ("create", "newfile", b"data"),
    ("mkdir", "newdir"),
    ("create", "newdir/f", b"f"),
    ("symlink", "top.txt", "newlink"),
    ("chmod", "owned", 0o600),
    ("chown", "xdir/f", 77, 78),
    ("setxattr", "bottom.txt", "user.x", b"1"),
    ("setxattr", "shared.txt", OVL + "esc", b"escaped"),  # stored escaped
    ("setxattr", "xdir", "user.dx", b"on a dir"),
    ("rename", "bottom.txt", "dir/bottom"),
    ("link", "shared.txt", "shared.link"),
    ("mkfifo", "newfifo", 0o600),
    ("chown", "link_to_top", 5, 5),
    ("utime", "dir/c", OLD_NS, OLD_NS + 11),
    ("unlink", "opq/only1"),
    ("rmdir", "opq"),
    ("mkdir", "opq"),
    ("truncate", "big", 10),
    ("unlink", "deep/er/other"),
    ("rmdir", "emptydir"),
    ("create", "emptydir", b"a file now"),
    ("mkdir", "dir/whd"),
    ("create", "deep/er/est/file2", b"deep"),
    ("rename", "dangling", "deep/dangling"),
]


def _apply(root, ops) -> list[str]:  # type: ignore[no-untyped-def]
    """Run ``ops`` on one mount; the ones that fail (they all succeed on the kernel)."""
    return [f"{format_op(op)}: {res!r}" for op in ops if (res := run_op(root, op))[0] != "ok"]


def test_kernel_mounted_on_the_unionfs_upper_shows_what_unionfs_showed(pair: StackPair) -> None:
    failed = _apply(pair.unionfs.root, CROSS_OPS)
    before = snapshot_tree(pair.unionfs.root, stable_only=False)
    pair.unionfs.unmount()
    kernel = pair.track(KernelMount(pair.uside))
    kernel.mount()
    after = snapshot_tree(kernel.root, stable_only=False)
    assert_same(before, after, "view of the same layers", la=pair.impl, lb="kernel",
                context=f"\n  (operations that failed on {pair.impl}: {failed})" if failed else "")


def test_unionfs_mounted_on_the_kernel_upper_shows_what_the_kernel_showed(pair: StackPair) -> None:
    failed = _apply(pair.kernel.root, CROSS_OPS)
    assert not failed, f"premise: all operations succeed on the kernel: {failed}"
    before = snapshot_tree(pair.kernel.root, stable_only=False)
    pair.kernel.unmount()
    fuse = pair.track(new_mount(pair.kside, pair.impl))
    fuse.mount()
    after = snapshot_tree(fuse.root, stable_only=False)
    assert_same(before, after, "view of the same layers", la="kernel", lb=pair.impl, context=pair.context())
    # ... and it can go on changing them, in a way the kernel reads back.
    more = [("unlink", "newfile"), ("create", "dir/sub/more", b"more"), ("unlink", "shared.txt"),
            ("rmdir", "newdir"), ("unlink", "newdir/f"), ("rmdir", "newdir"), ("mkdir", "newdir"),
            ("unlink", "dir/c"), ("rmdir", "opq")]
    results = [run_op(fuse.root, op) for op in more]
    assert [r[0] for r in results] == ["ok", "ok", "ok", "err", "ok", "ok", "ok", "ok", "ok"], results
    before = snapshot_tree(fuse.root, stable_only=False)
    fuse.unmount()
    kernel = pair.track(KernelMount(pair.kside))
    kernel.mount()
    assert_same(before, snapshot_tree(kernel.root, stable_only=False), "view of the same layers",
                la=pair.impl, lb="kernel")


def test_kernel_continues_on_the_unionfs_upper(pair: StackPair) -> None:
    """Both sides run the first half; then the kernel takes over unionfs's layers and both run the rest: the
    two stacks must still agree."""
    half = len(CROSS_OPS) // 2
    pair.assert_ops(CROSS_OPS[:half])
    pair.unionfs.unmount()
    kernel2 = pair.track(KernelMount(pair.uside))
    kernel2.mount()
    mismatches = []
    for op in CROSS_OPS[half:]:
        a, b = run_op(pair.kernel.root, op), run_op(kernel2.root, op)
        if a != b:
            mismatches.append(f"  {format_op(op)}: kernel={a!r} kernel-on-{pair.impl}-upper={b!r}")
    assert not mismatches, "\n".join(mismatches)
    assert_same(snapshot_tree(pair.kernel.root), snapshot_tree(kernel2.root), "merged views",
                lb=f"kernel on {pair.impl}'s upper")


def test_remount_shows_the_same_view(pair: StackPair) -> None:
    _apply(pair.unionfs.root, CROSS_OPS)
    before = snapshot_tree(pair.unionfs.root, stable_only=False)
    pair.unionfs.unmount()
    pair.unionfs.mount()
    after = snapshot_tree(pair.unionfs.root, stable_only=False)
    assert_same(before, after, "view before and after remount", la="before", lb="after",
                context=pair.context())


def test_remount_after_kernel_use_of_the_same_workdir(pair: StackPair) -> None:
    """unionfs must accept a workdir the kernel has used (it leaves work/ and index/ behind)."""
    pair.assert_ops([("unlink", "top.txt"), ("create", "n", b"n")])
    pair.unionfs.unmount()
    kernel = pair.track(KernelMount(pair.uside))
    kernel.mount()
    assert run_op(kernel.root, ("unlink", "mid.txt")) == ("ok", None)
    view = snapshot_tree(kernel.root, stable_only=False)
    kernel.unmount()
    pair.unionfs.mount()
    assert_same(view, snapshot_tree(pair.unionfs.root, stable_only=False), "view of the same layers",
                la="kernel", lb=pair.impl, context=pair.context())

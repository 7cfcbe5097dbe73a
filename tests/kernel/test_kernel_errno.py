"""Errno parity: failing operations fail the same way on both mounts.

Each group runs on a fresh pair of mounts; within a group the operations run in order (a few set the stage
and must succeed).  The expected errno is what kernel overlayfs returns; the test checks that premise too.
"""

from __future__ import annotations

import stat

import pytest
from kernel_diff import OVL, StackPair, format_op

pytestmark = pytest.mark.kernel

OK = ("ok", None)
LONG = "n" * 256  # one byte over NAME_MAX
VERY_LONG = "v" * 1100  # over the FUSE name limit (1024), refused before reaching the server

ERRNO_TABLE: dict[str, list[tuple[tuple, object]]] = {  # type: ignore[type-arg]
    "ENOENT": [
        (("stat", "missing"), "ENOENT"),
        (("open", "missing", "O_RDONLY"), "ENOENT"),
        (("open", "missing/x", "O_WRONLY|O_CREAT"), "ENOENT"),
        (("unlink", "missing"), "ENOENT"),
        (("rmdir", "missing"), "ENOENT"),
        (("rename", "missing", "x"), "ENOENT"),
        (("rename", "top.txt", "missing/x"), "ENOENT"),
        (("link", "missing", "x"), "ENOENT"),
        (("link", "top.txt", "missing/x"), "ENOENT"),
        (("readlink", "missing"), "ENOENT"),
        (("mkdir", "missing/sub"), "ENOENT"),
        (("chmod", "missing", 0o600), "ENOENT"),
        (("truncate", "missing", 0), "ENOENT"),
        (("stat", "dir/wh"), "ENOENT"),  # whited out in a lower layer
        (("stat", "opq/hidden"), "ENOENT"),  # below an opaque dir
        (("stat", "dangling"), "ENOENT"),  # symlink to nowhere
        (("listdir", "dir/whd"), "ENOENT"),
        (("unlink", "top.txt"), "ok"),
        (("stat", "top.txt"), "ENOENT"),  # whited out in the upper layer now
        (("unlink", "top.txt"), "ENOENT"),
        (("setxattr", "missing", "user.x", b"1"), "ENOENT"),
        (("symlink", "t", "missing/s"), "ENOENT"),
        (("mkfifo", "missing/f"), "ENOENT"),
    ],
    "EEXIST": [
        (("mkdir", "dir"), "EEXIST"),
        (("mkdir", "top.txt"), "EEXIST"),
        (("mkdir", "dangling"), "EEXIST"),
        (("create_excl", "top.txt"), "EEXIST"),
        (("create_excl", "dir"), "EEXIST"),
        (("create_excl", "link_to_top"), "EEXIST"),
        (("symlink", "x", "mid.txt"), "EEXIST"),
        (("link", "top.txt", "bottom.txt"), "EEXIST"),
        (("link", "top.txt", "dir"), "EEXIST"),
        (("mkfifo", "shared.txt"), "EEXIST"),
        (("renameat2", "top.txt", "mid.txt", "RENAME_NOREPLACE"), "EEXIST"),
        (("setxattr", "owned", "user.k", b"x", 1), "EEXIST"),  # XATTR_CREATE on an existing xattr
        (("mkdir", "."), "EEXIST"),
    ],
    "ENOTDIR": [
        (("stat", "top.txt/x"), "ENOTDIR"),
        (("mkdir", "top.txt/x"), "ENOTDIR"),
        (("rmdir", "top.txt"), "ENOTDIR"),
        (("listdir", "top.txt"), "ENOTDIR"),
        (("open", "top.txt", "O_RDONLY|O_DIRECTORY"), "ENOTDIR"),
        (("create", "dirfile/inner", b"x"), "ENOTDIR"),  # a file in l1 over a dir in l3
        (("stat", "dirfile/inner"), "ENOTDIR"),
        (("mkdir", "newdir"), "ok"),
        (("rename", "newdir", "top.txt"), "ENOTDIR"),
        (("rename", "dir", "top.txt"), "ENOTDIR"),  # checked before the lower dir's EXDEV
        (("listdir", "link_to_top"), "ENOTDIR"),
        (("rename", "top.txt/", "x"), "ENOTDIR"),
    ],
    "EISDIR": [
        (("open", "dir", "O_WRONLY"), "EISDIR"),
        (("open", "dir", "O_RDWR"), "EISDIR"),
        (("open", "emptydir", "O_WRONLY|O_CREAT"), "EISDIR"),
        (("unlink", "dir"), "EISDIR"),
        (("unlink", "emptydir"), "EISDIR"),
        (("truncate", "dir", 0), "EISDIR"),
        (("rename", "top.txt", "dir"), "EISDIR"),
        (("rename", "top.txt", "emptydir"), "EISDIR"),
        (("mkdir", "newdir"), "ok"),
        (("rename", "top.txt", "newdir"), "EISDIR"),
        (("create", "dir", b"x"), "EISDIR"),
    ],
    "ENOTEMPTY": [
        (("rmdir", "dir"), "ENOTEMPTY"),
        (("rmdir", "opq"), "ENOTEMPTY"),
        (("rmdir", "deep/er"), "ENOTEMPTY"),
        (("rmdir", "filedir"), "ENOTEMPTY"),
        (("unlink", "dir/a"), "ok"),
        (("unlink", "dir/b"), "ok"),
        (("rmdir", "dir"), "ENOTEMPTY"),  # dir/c and dir/sub are still in lower layers
        (("mkdir", "newdir"), "ok"),
        (("rename", "newdir", "dir"), "ENOTEMPTY"),
        (("rename", "newdir", "deep"), "ENOTEMPTY"),
        (("mkdir", "full"), "ok"),
        (("create", "full/f", b"f"), "ok"),
        (("rename", "newdir", "full"), "ENOTEMPTY"),
        (("rmdir", "full"), "ENOTEMPTY"),
    ],
    "ENAMETOOLONG": [
        (("stat", LONG), "ENAMETOOLONG"),
        (("stat", "dir/" + LONG), "ENAMETOOLONG"),
        (("create", LONG, b"x"), "ENAMETOOLONG"),
        (("create", "dir/" + LONG, b"x"), "ENAMETOOLONG"),
        (("mkdir", LONG), "ENAMETOOLONG"),
        (("symlink", "t", LONG), "ENAMETOOLONG"),
        (("link", "top.txt", LONG), "ENAMETOOLONG"),
        (("rename", "top.txt", LONG), "ENAMETOOLONG"),
        (("unlink", LONG), "ENAMETOOLONG"),
        (("rmdir", LONG), "ENAMETOOLONG"),
        (("mkfifo", LONG), "ENAMETOOLONG"),
        (("stat", VERY_LONG), "ENAMETOOLONG"),
        (("create", VERY_LONG, b"x"), "ENAMETOOLONG"),
        (("stat", "n" * 255), "ENOENT"),  # exactly NAME_MAX is fine
        (("create", "n" * 255, b"x"), ("ok", 1)),
        (("setxattr", "top.txt", "user." + "x" * 300, b"v"), "ERANGE"),
    ],
    "EXDEV": [
        (("rename", "dir", "renamed"), "EXDEV"),
        (("rename", "opq", "dir/opq"), "EXDEV"),
        (("rename", "dir/sub", "sub"), "EXDEV"),
        (("rename", "emptydir", "e2"), "EXDEV"),
        (("rename", "deep/er", "deep/er2"), "EXDEV"),
        (("mkdir", "newdir"), "ok"),
        (("rename", "dir", "newdir"), "EXDEV"),  # over an empty upper dir
        (("rename", "emptydir", "newdir"), "EXDEV"),
        (("renameat2", "dir", "newdir", "RENAME_EXCHANGE"), "EXDEV"),
        (("chmod", "xdir", 0o755), "ok"),
        (("rename", "xdir", "xdir2"), "EXDEV"),  # copied up, still merged
    ],
    "EINVAL": [
        (("mkdir", "newdir"), "ok"),
        (("mkdir", "newdir/inner"), "ok"),
        (("rename", "newdir", "newdir/inner/x"), "EINVAL"),  # a directory into itself
        (("rename", "newdir", "newdir/x"), "EINVAL"),
        (("rename", "dir", "dir/x"), "EINVAL"),
        (("rmdir", "dir/."), "EINVAL"),
        (("rmdir", "newdir/."), "EINVAL"),
        (("readlink", "top.txt"), "EINVAL"),
        (("readlink", "dir"), "EINVAL"),
        (("renameat2", "top.txt", "x", "RENAME_WHITEOUT"), "EINVAL"),
        (("renameat2", "top.txt", "mid.txt", "RENAME_NOREPLACE|RENAME_EXCHANGE"), "EINVAL"),
        (("truncate", "top.txt", -1), "EINVAL"),
        (("mknod", "sock", 0o170000 | 0o644), "EINVAL"),
    ],
    "EPERM": [
        (("link", "dir", "dirlink"), "EPERM"),
        (("link", "emptydir", "dirlink"), "EPERM"),
        (("setxattr", "link_to_top", "user.x", b"1"), "EPERM"),  # user.* only on files and dirs
        (("setxattr", "pipe", "user.x", b"1"), "EPERM"),
        (("mknod", "wh", stat.S_IFCHR | 0o600, 0, 0), "EPERM"),  # a 0/0 device is a whiteout
    ],
    "ENODATA": [
        (("getxattr", "top.txt", "user.none"), "ENODATA"),
        (("getxattr", "owned", "user.none"), "ENODATA"),
        (("removexattr", "owned", "user.none"), "ENODATA"),
        (("setxattr", "owned", "user.none", b"x", 2), "ENODATA"),  # XATTR_REPLACE of a missing one
        (("getxattr", "opq", OVL + "opaque"), "ENODATA"),  # private, hidden
        (("getxattr", "dir", "user.none"), "ENODATA"),
    ],
    "ELOOP": [
        (("stat", "loop1"), "ELOOP"),
        (("open", "link_to_top", "O_RDONLY|O_NOFOLLOW"), "ELOOP"),
        (("read", "loop2"), "ELOOP"),
    ],
    "EACCES_as_root": [
        (("exec", "noexec"), "EACCES"),  # no x bit at all: refused even to root
        (("access", "noexec", 1), ("ok", False)),
        (("access", "exe", 1), ("ok", True)),
        (("exec", "exe"), ("ok", 3)),
        (("access", "ro.txt", 2), ("ok", True)),
        (("open", "ro.txt", "O_WRONLY"), "ok"),  # root overrides the mode bits
    ],
    "ENOTSUP": [
        (("setxattr", "top.txt", "nonamespace", b"1"), "ENOTSUP"),
        (("getxattr", "top.txt", "bogus.name"), "ENOTSUP"),
    ],
}

CASES = list(ERRNO_TABLE)


@pytest.mark.parametrize("group", CASES)
def test_errno_parity(pair: StackPair, group: str) -> None:
    premise, mismatches = [], []
    for i, (op, expected) in enumerate(ERRNO_TABLE[group]):
        k, u = pair.op(op)
        if expected == "ok":
            expected_ok = k[0] == "ok"
        elif isinstance(expected, str):
            expected_ok = k == ("err", expected)
        else:
            expected_ok = k == expected
        if not expected_ok:
            premise.append(f"  #{i} {format_op(op)}: kernel gave {k!r}, the table says {expected!r}")
        if u != k:
            mismatches.append(f"  #{i} {format_op(op)}: kernel={k!r} {pair.impl}={u!r}")
    if premise:
        raise AssertionError("the kernel does not do what the table says:\n" + "\n".join(premise))
    if mismatches:
        raise AssertionError(f"{len(mismatches)} errno mismatch(es):\n" + "\n".join(mismatches) + pair.context())

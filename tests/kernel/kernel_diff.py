"""Differential testing of unionfs against kernel overlayfs.

This module holds everything the tests in this directory share:

* the on-disk format both sides write: overlay markers in ``trusted.overlay.*``, or in ``user.overlay.*`` with
  both sides mounted ``-o userxattr`` when the tests cannot write ``trusted.*`` (:data:`XATTR_NS`);
* a declarative description of layers (:class:`File`, :class:`Dir`, :class:`Symlink`, :class:`Whiteout`,
  :class:`Fifo`, :class:`Hardlink`) and :func:`build_tree` / :func:`clone_tree` to lay them out on disk;
* mounting: :class:`KernelMount` (kernel overlayfs) and :class:`FuseMount` (unionfs, or fuse-overlayfs when
  ``UNIONFS_DIFF_IMPL=fuse-overlayfs``), and :class:`StackPair`, two identical stacks mounted side by side;
* observation: :func:`snapshot_tree` (a merged view), :func:`snapshot_upper` (the on-disk upper layer),
  :func:`raw_readdir` (names, ``d_type`` and ``d_ino`` as ``getdents`` returns them);
* operations: :func:`run_op` applies one operation described by a tuple and returns ``("ok", result)`` or
  ``("err", "ENAME")``, so the same list runs on both mounts and the results compare one by one.

Times that the layer builder and the tests set explicitly lie before :data:`STABLE_BEFORE_NS` (September
2001); snapshots record an mtime only when it is that old, i.e. when no live operation touched it.  A file
that one side left untouched and the other side stamped with the current time thus shows up as a
difference, while two files both written "now" compare equal.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import hashlib
import os
import re
import shlex
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Which implementation plays the "unionfs" side: ``unionfs`` (the default), ``fuse-overlayfs`` (to check the
#: harness against another FUSE overlay), or ``kernel`` (the harness's self-test: kernel against kernel, where
#: every test but the FUSE-specific command line one must pass).
IMPL = os.environ.get("UNIONFS_DIFF_IMPL", "unionfs")
#: more mount options for unionfs (e.g. ``prescan``: tests/run.sh runs part of the suite again with it)
EXTRA_OPTIONS = os.environ.get("UNIONFS_DIFF_OPTIONS", "")
IMPLS = ("unionfs", "fuse-overlayfs", "kernel")

MOUNT_TIMEOUT = float(os.environ.get("UNIONFS_DIFF_MOUNT_TIMEOUT", "30"))
#: After this many seconds a stack pair aborts its FUSE connection, so a hung server fails the test instead
#: of hanging it.
WATCHDOG_SECONDS = float(os.environ.get("UNIONFS_DIFF_TIMEOUT", "120"))

#: 2000-01-01T00:00:00Z: base of the timestamps the layer builder gives to everything it makes.
FIXED_EPOCH_NS = 946_684_800 * 10**9
#: Timestamps older than this (2001-09-09) were set on purpose; newer ones come from the clock.
STABLE_BEFORE_NS = 10**18


def _trusted_xattrs_writable() -> bool:
    """Whether this process may write ``trusted.*`` xattrs where the layers are made (the temporary directory):
    root may, an ordinary user or the root of a user namespace may not."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="unionfs-xattr-probe-") as d:
            os.setxattr(d, "trusted.overlay.probe", b"y")
    except OSError:
        return False
    return True


#: Whether the layer builder can write ``trusted.*`` xattrs; when it cannot, the ``trusted.*`` xattrs a layer
#: description names are left out (both sides get the same layers all the same).
TRUSTED_WRITABLE = _trusted_xattrs_writable()

#: The xattr namespace of the overlay markers: ``trusted`` (the kernel's default, for root) or ``user`` (both sides
#: mounted with ``-o userxattr``: the rootless format).  ``UNIONFS_TEST_XATTR=user|trusted`` forces it; by default
#: it is ``user`` exactly when ``trusted.*`` cannot be written (in a user namespace: tests/run-rootless.sh).
XATTR_NS = os.environ.get("UNIONFS_TEST_XATTR") or ("trusted" if TRUSTED_WRITABLE else "user")
if XATTR_NS not in ("trusted", "user"):
    raise ValueError(f"UNIONFS_TEST_XATTR must be 'trusted' or 'user', not {XATTR_NS!r}")
USERXATTR = XATTR_NS == "user"
#: The overlay-private prefix in force: markers live there, and user-set names below it are stored escaped.
OVL = f"{XATTR_NS}.overlay."
#: The other namespace's overlay prefix: ordinary xattrs for these mounts.
OTHER_OVL = "trusted.overlay." if USERXATTR else "user.overlay."


def _in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


#: Whether this process runs in a user namespace (the kernel pass of tests/run-rootless.sh).
IN_USER_NAMESPACE = _in_user_namespace()
def _pure_unionfs() -> bool:
    """Whether the implementation under test is unionfs served in the pure mode (``-o nonative``,
    ``UNIONFS_NATIVE=off``, or no native library built), found without loading the library."""
    if IMPL != "unionfs":
        return False
    if "nonative" in EXTRA_OPTIONS.split(",") or os.environ.get("UNIONFS_NATIVE", "").lower() in (
            "off", "0", "no", "pure"):
        return True
    from unionfs import _native

    found = _native.library_path()
    return found is None or not found.exists()


#: Whether unionfs is served in the pure mode, where the names of a hard-linked lower file each show the number
#: of their own inode: pyfuse3 makes a reply's st_ino the inode's number, and each name must be an inode of its
#: own (a change through one copies up that name alone). The native part shows one number for them, as the
#: kernel does.
PURE_UNIONFS = _pure_unionfs()
#: Whether kernel overlayfs records where a copied-up object came from (a file handle of the lower object in
#: the ``origin`` xattr), which keeps its inode number.  Not in a user namespace: encoding file handles takes
#: CAP_DAC_READ_SEARCH in the initial namespace, so a copy-up records an empty origin; the copy then shows its
#: upper inode's number once the kernel has dropped the cached inode, and a name made by link(2) from a lower
#: file shows another number than the first name meanwhile.
KERNEL_KEEPS_ORIGIN = not IN_USER_NAMESPACE
#: Whether the kernel's merged view is a reference for which names share an inode: only where it keeps origins,
#: and not in the user.* format, where symlinks, FIFOs and devices (which cannot carry user.* xattrs) get no
#: origin either.  Otherwise merged-view snapshots leave ``linkgroup`` out; the upper layers on disk still
#: compare it.
MERGED_INODES_COMPARABLE = KERNEL_KEEPS_ORIGIN and not USERXATTR and not PURE_UNIONFS

#: Options for the kernel mount: make the behaviours that kernel defaults could vary explicit.  With userxattr the
#: kernel takes no redirect_dir but ``nofollow`` (redirects neither made nor followed: the same as ``off`` here).
KERNEL_EXTRA_OPTS = f"index=off,redirect_dir={'nofollow' if USERXATTR else 'off'},metacopy=off"

#: Kernel-only on-disk xattrs that unionfs need not write; upper layer comparisons leave them out.
KERNEL_ONLY_XATTRS = frozenset({OVL + "origin", OVL + "uuid", OVL + "impure"})
OPAQUE_XATTR = OVL + "opaque"

#: xattr namespaces compared (others, like security.* and system.*, depend on the host).
XATTR_PREFIXES = ("user.", "trusted.")


# --------------------------------------------------------------------------------------------------------------
# Layer descriptions
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class File:
    """A regular file.  ``extents`` are ``(offset, data)`` pieces written after ``content``; with ``size``
    larger than the data the file is sparse."""

    content: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()
    mtime_ns: int | None = None
    extents: tuple[tuple[int, bytes], ...] = ()
    size: int | None = None


@dataclasses.dataclass(frozen=True)
class Dir:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    opaque: bool = False
    xattrs: tuple[tuple[str, bytes], ...] = ()
    mtime_ns: int | None = None


@dataclasses.dataclass(frozen=True)
class Symlink:
    target: str
    uid: int = 0
    gid: int = 0
    mtime_ns: int | None = None


@dataclasses.dataclass(frozen=True)
class Whiteout:
    """A kernel-format whiteout: character device 0/0."""


@dataclasses.dataclass(frozen=True)
class Fifo:
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int | None = None


@dataclasses.dataclass(frozen=True)
class Hardlink:
    """Another name for ``target`` (a path in the same layer, created earlier in sorted order or not)."""

    target: str


DIR = Dir()
OPAQUE = Dir(opaque=True)
WHITEOUT = Whiteout()

Entry = File | Dir | Symlink | Whiteout | Fifo | Hardlink | bytes | str
Layer = Mapping[str, Entry]


def _as_entry(value: Entry) -> File | Dir | Symlink | Whiteout | Fifo | Hardlink:
    if isinstance(value, str):
        return File(value.encode())
    if isinstance(value, bytes):
        return File(value)
    return value


def _settable(xattrs: Iterable[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """``xattrs`` less the ``trusted.*`` ones when this process cannot write those (see :data:`TRUSTED_WRITABLE`)."""
    return [(n, v) for n, v in xattrs if TRUSTED_WRITABLE or not n.startswith("trusted.")]


def build_tree(root: Path, layer: Layer, *, time_base_ns: int = FIXED_EPOCH_NS) -> None:
    """Create ``root`` holding what ``layer`` describes.  Parent directories are implied; every object gets
    a fixed (old, hence "stable") timestamp unless it names one.  Opaque directories get the marker of
    :data:`XATTR_NS`; ``trusted.*`` xattrs are left out where they cannot be written."""
    root.mkdir(parents=True, exist_ok=True)
    entries = {p.strip("/"): _as_entry(v) for p, v in layer.items()}
    for p in list(entries):
        parts = p.split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), DIR)
    paths = sorted(entries, key=lambda p: (p.count("/"), p))
    times: dict[str, int] = {}
    links: list[tuple[str, str]] = []
    for index, rel in enumerate(paths):
        entry = entries[rel]
        path = root / rel
        default_ns = time_base_ns + (index + 1) * 1_000_000_007
        if isinstance(entry, Dir):
            path.mkdir()
            os.chmod(path, entry.mode)
            os.chown(path, entry.uid, entry.gid)
            for name, value in _settable(entry.xattrs):
                os.setxattr(path, name, value)
            if entry.opaque:
                os.setxattr(path, OPAQUE_XATTR, b"y")
            times[rel] = entry.mtime_ns if entry.mtime_ns is not None else default_ns
        elif isinstance(entry, File):
            with open(path, "wb") as f:
                f.write(entry.content)
                for offset, data in entry.extents:
                    f.seek(offset)
                    f.write(data)
                if entry.size is not None:
                    f.truncate(entry.size)
            os.chown(path, entry.uid, entry.gid)
            os.chmod(path, entry.mode)
            for name, value in _settable(entry.xattrs):
                os.setxattr(path, name, value)
            ns = entry.mtime_ns if entry.mtime_ns is not None else default_ns
            os.utime(path, ns=(ns, ns))
        elif isinstance(entry, Symlink):
            os.symlink(entry.target, path)
            os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
            ns = entry.mtime_ns if entry.mtime_ns is not None else default_ns
            os.utime(path, ns=(ns, ns), follow_symlinks=False)
        elif isinstance(entry, Whiteout):
            os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        elif isinstance(entry, Fifo):
            os.mkfifo(path, entry.mode)
            os.chown(path, entry.uid, entry.gid)
            os.chmod(path, entry.mode)
            ns = entry.mtime_ns if entry.mtime_ns is not None else default_ns
            os.utime(path, ns=(ns, ns))
        elif isinstance(entry, Hardlink):
            links.append((rel, entry.target))
        else:  # pragma: no cover - guarded by the type
            raise TypeError(f"unknown layer entry {entry!r} at {rel}")
    for rel, target in links:
        os.link(root / target, root / rel)
    # Directory times last, deepest first, since filling a directory changes its mtime.
    for rel in sorted(times, key=lambda p: -p.count("/")):
        os.utime(root / rel, ns=(times[rel], times[rel]))
    os.utime(root, ns=(time_base_ns, time_base_ns))


def clone_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` exactly: types (whiteouts and other devices too), modes, owners, nanosecond
    mtimes, every xattr (trusted.* included) and hard links between files."""
    inode_map: dict[tuple[int, int], Path] = {}
    dir_times: list[tuple[Path, int, int]] = []

    def copy_xattrs(s: Path, d: Path) -> None:
        for name in os.listxattr(s, follow_symlinks=False):
            if name.startswith(("security.", "system.")):
                continue
            os.setxattr(d, name, os.getxattr(s, name, follow_symlinks=False), follow_symlinks=False)

    def copy(s: Path, d: Path) -> None:
        st = os.lstat(s)
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in inode_map:
            os.link(inode_map[key], d, follow_symlinks=False)
            return
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            d.mkdir()
            for child in sorted(os.listdir(s)):
                copy(s / child, d / child)
            dir_times.append((d, st.st_atime_ns, st.st_mtime_ns))
        elif stat.S_ISREG(mode):
            _copy_file_sparse(s, d)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(s), d)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            os.mknod(d, mode, st.st_rdev)
        else:  # pragma: no cover
            raise OSError(errno.EINVAL, f"cannot copy {s}")
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            inode_map[key] = d
        os.chown(d, st.st_uid, st.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(mode):
            os.chmod(d, stat.S_IMODE(mode))
        copy_xattrs(s, d)
        if not stat.S_ISDIR(mode):
            os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    copy(src, dst)
    for d, atime, mtime in dir_times:  # children were appended before parents
        os.utime(d, ns=(atime, mtime))


def _copy_file_sparse(src: Path, dst: Path) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                data_start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            hole = os.lseek(fi.fileno(), data_start, os.SEEK_HOLE)
            os.lseek(fi.fileno(), data_start, os.SEEK_SET)
            fo.seek(data_start)
            remaining = hole - data_start
            while remaining:
                chunk = fi.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                fo.write(chunk)
                remaining -= len(chunk)
            pos = hole
        fo.truncate(size)


@dataclasses.dataclass
class Template:
    """Layers built once on disk (``l1`` .. ``lN`` and ``upper``), cloned for every mount that needs them; below
    them, ``shared`` lower layers that are used as they are by every mount (layers the tests cannot copy, such as
    one owned by ids outside their user namespace)."""

    root: Path
    nlowers: int
    shared: tuple[Path, ...] = ()

    def lower(self, i: int) -> Path:
        return self.root / f"l{i + 1}"

    @property
    def upper(self) -> Path:
        return self.root / "upper"


def build_template(root: Path, lowers: Sequence[Layer], upper: Layer | None = None,
                   shared: Sequence[Path] = ()) -> Template:
    """Lay out ``lowers`` (first = top-most) and the initial ``upper`` layer under ``root``; ``shared`` lower
    layers (existing directories, never written) go below ``lowers``."""
    for i, layer in enumerate(lowers):
        build_tree(root / f"l{i + 1}", layer, time_base_ns=FIXED_EPOCH_NS + i * 10**13)
    build_tree(root / "upper", upper or {}, time_base_ns=FIXED_EPOCH_NS + 9 * 10**13)
    return Template(root, len(lowers), tuple(shared))


# --------------------------------------------------------------------------------------------------------------
# Observation
# --------------------------------------------------------------------------------------------------------------

NODE_FIELDS = (
    "type", "mode", "uid", "gid", "size", "sha", "target", "rdev", "xattrs", "mtime_ns", "nlink",
    "linkgroup", "opaque",
)


@dataclasses.dataclass(frozen=True)
class Node:
    """What a snapshot records of one object; ``None`` means "not recorded for this kind"."""

    type: str
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    sha: str | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: tuple[tuple[str, Any], ...] | str | None = None
    mtime_ns: int | None = None
    nlink: int | None = None
    linkgroup: str | None = None
    opaque: bytes | None = None

    def __repr__(self) -> str:
        parts = [self.type]
        for name in NODE_FIELDS[1:]:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "mode":
                value = oct(value)
            parts.append(f"{name}={value!r}")
        return "Node(" + ", ".join(parts) + ")"


def file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"), (stat.S_ISSOCK, "sock"),
    ):
        if test(mode):
            return name
    return f"?{mode:o}"


def _en(code: int | None) -> str:
    return errno.errorcode.get(code, str(code)) if code is not None else "?"


def stable_mtime(st: os.stat_result) -> int | None:
    return st.st_mtime_ns if st.st_mtime_ns < STABLE_BEFORE_NS else None


def content_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_xattrs(
    path: str | Path, prefixes: Sequence[str] = XATTR_PREFIXES, ignore: Iterable[str] = ()
) -> tuple[tuple[str, Any], ...] | str:
    """Sorted ``(name, value)`` pairs of the xattrs of ``path`` (not followed) in ``prefixes``; an error is
    returned as a string so that it shows up in comparisons instead of aborting them."""
    ignore = set(ignore)
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        return f"listxattr: {_en(exc.errno)}"
    out: list[tuple[str, Any]] = []
    for name in sorted(names):
        if not name.startswith(tuple(prefixes)) or name in ignore:
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as exc:
            out.append((name, f"getxattr: {_en(exc.errno)}"))
    return tuple(out)


def stat_node(st: os.stat_result, *, stable_only: bool = True) -> Node:
    """The attribute part of a node (no content, xattrs, or link target)."""
    kind = file_type(st.st_mode)
    is_dir = kind == "dir"
    rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else None
    return Node(
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=None if is_dir else st.st_size,
        rdev=rdev,
        mtime_ns=stable_mtime(st) if stable_only else st.st_mtime_ns,
        nlink=None if is_dir else st.st_nlink,
    )


#: paths longer than this are reached in steps by :func:`reach`
_SHORT_PATH = 3800


@contextlib.contextmanager
def reach(path: str) -> Iterator[str]:
    """A path naming the absolute ``path`` that one system call takes, at any depth: ``path`` itself when short,
    else ``/proc/self/fd/N/NAME`` with N its parent directory, opened one name at a time (so that the snapshots
    of trees deeper than PATH_MAX read them the way the tests make them: relative to a directory)."""
    if len(os.fsencode(path)) <= _SHORT_PATH:
        yield path
        return
    head, _, name = path.rpartition("/")
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        for part in head.strip("/").split("/"):
            inner = os.open(part, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def _walk(root: Path) -> Iterable[tuple[str, str, os.stat_result]]:
    """Yield ``(relative path, a path to it, lstat)`` for ``root`` (as ``.``) and everything below it, at any
    depth (see :func:`reach`: the path yielded is valid until the next item is asked for)."""
    st = os.lstat(root)
    yield ".", str(root), st
    stack = [("", str(root))]
    while stack:
        rel, absdir = stack.pop()
        with reach(absdir) as d:
            names = sorted(os.listdir(d))
        for name in names:
            r = f"{rel}/{name}" if rel else name
            a = os.path.join(absdir, name)
            with reach(a) as p:
                try:
                    st = os.lstat(p)
                except OSError as exc:
                    yield r, p, exc  # type: ignore[misc]
                    continue
                yield r, p, st
            if stat.S_ISDIR(st.st_mode):
                stack.append((r, a))


def _link_groups(inodes: dict[str, tuple[int, int]]) -> dict[str, str]:
    """For names sharing an inode: name -> the smallest of those names."""
    by_ino: dict[tuple[int, int], list[str]] = {}
    for rel, key in inodes.items():
        by_ino.setdefault(key, []).append(rel)
    out: dict[str, str] = {}
    for names in by_ino.values():
        if len(names) > 1:
            for n in names:
                out[n] = min(names)
    return out


def snapshot_tree(root: str | Path, *, stable_only: bool = True, hash_content: bool = True) -> dict[str, Node]:
    """A comparable description of the tree at ``root`` (a merged view): relative path -> :class:`Node` with
    type, permission bits, owner, size, content hash, symlink target, device numbers, ``user.*``/``trusted.*``
    xattrs, mtime (only if stable, unless ``stable_only=False``), nlink of non-directories, and which names
    are hard links of each other (unless :data:`MERGED_INODES_COMPARABLE` is false).  Errors while reading an
    object are recorded in the node."""
    root = Path(root)
    out: dict[str, Node] = {}
    inodes: dict[str, tuple[int, int]] = {}
    for rel, path, st in _walk(root):
        if isinstance(st, OSError):
            out[rel] = Node(type=f"error {_en(st.errno)}")
            continue
        node = stat_node(st, stable_only=stable_only)
        extra: dict[str, Any] = {"xattrs": read_xattrs(path)}
        try:
            if node.type == "file" and hash_content:
                extra["sha"] = content_hash(path)
            elif node.type == "symlink":
                extra["target"] = os.readlink(path)
        except OSError as exc:
            extra["sha"] = f"error {_en(exc.errno)}"
        if node.type != "dir" and st.st_nlink > 1 and MERGED_INODES_COMPARABLE:
            inodes[rel] = (st.st_dev, st.st_ino)
        out[rel] = dataclasses.replace(node, **extra)
    for rel, group in _link_groups(inodes).items():
        out[rel] = dataclasses.replace(out[rel], linkgroup=group)
    return out


def snapshot_upper(upper: str | Path, *, stable_only: bool = True) -> dict[str, Node]:
    """The on-disk form of an upper layer: like :func:`snapshot_tree`, plus whiteouts (type ``whiteout``,
    nothing else recorded: the kernel's are hard links with nlink > 1) and the raw value of the opaque marker
    (:data:`OPAQUE_XATTR`: ``trusted.overlay.opaque``, or ``user.overlay.opaque`` in the rootless format) on
    directories.  Kernel-only xattrs (origin, uuid, impure) are left out; escaped user-set ones
    (``trusted.overlay.overlay.X``, ``user.overlay.overlay.X``) are kept."""
    upper = Path(upper)
    out: dict[str, Node] = {}
    inodes: dict[str, tuple[int, int]] = {}
    ignore = KERNEL_ONLY_XATTRS | {OPAQUE_XATTR}
    for rel, path, st in _walk(upper):
        if isinstance(st, OSError):
            out[rel] = Node(type=f"error {_en(st.errno)}")
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            out[rel] = Node(type="whiteout")
            continue
        node = stat_node(st, stable_only=stable_only)
        extra: dict[str, Any] = {"xattrs": read_xattrs(path, ignore=ignore)}
        if node.type == "file":
            extra["sha"] = content_hash(path)
        elif node.type == "symlink":
            extra["target"] = os.readlink(path)
        elif node.type == "dir":
            try:
                extra["opaque"] = os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
        if node.type != "dir" and st.st_nlink > 1:
            inodes[rel] = (st.st_dev, st.st_ino)
        out[rel] = dataclasses.replace(node, **extra)
    for rel, group in _link_groups(inodes).items():
        out[rel] = dataclasses.replace(out[rel], linkgroup=group)
    return out


def diff_snapshots(a: Mapping[str, Any], b: Mapping[str, Any], la: str = "kernel", lb: str = "unionfs") -> list[str]:
    """Human-readable differences between two snapshots (empty when equal)."""
    lines = []
    for path in sorted(set(a) | set(b)):
        x, y = a.get(path), b.get(path)
        if x == y:
            continue
        if x is None:
            lines.append(f"  {path}: only on {lb}: {y!r}")
        elif y is None:
            lines.append(f"  {path}: only on {la}: {x!r}")
        elif isinstance(x, Node) and isinstance(y, Node):
            fields = [
                f"{f} {la}={getattr(x, f)!r} {lb}={getattr(y, f)!r}"
                for f in NODE_FIELDS
                if getattr(x, f) != getattr(y, f)
            ]
            lines.append(f"  {path}: " + "; ".join(fields))
        else:
            lines.append(f"  {path}: {la}={x!r} {lb}={y!r}")
    return lines


def assert_same(a: Mapping[str, Any], b: Mapping[str, Any], what: str, la: str = "kernel", lb: str = "unionfs",
                context: str = "") -> None:
    lines = diff_snapshots(a, b, la, lb)
    if lines:
        shown = lines[:60] + ([f"  ... and {len(lines) - 60} more"] if len(lines) > 60 else [])
        raise AssertionError(f"{what}: {len(lines)} difference(s) ({la} vs {lb}){context}\n" + "\n".join(shown))


# -- raw readdir ------------------------------------------------------------------------------------------------

DT_NAMES = {0: "unknown", 1: "fifo", 2: "chr", 4: "dir", 6: "blk", 8: "file", 10: "symlink", 12: "sock", 14: "wht"}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Dirent64(ctypes.Structure):
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir64.restype = ctypes.POINTER(_Dirent64)
_libc.readdir64.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int


def raw_readdir(path: str | Path) -> list[tuple[str, str, int]]:
    """``(name, d_type name, d_ino)`` of every entry ``readdir(3)`` returns, ``.`` and ``..`` included."""
    d = _libc.opendir(os.fsencode(path))
    if not d:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))
    out = []
    try:
        while True:
            ctypes.set_errno(0)
            ent = _libc.readdir64(d)
            if not ent:
                e = ctypes.get_errno()
                if e:
                    raise OSError(e, os.strerror(e), str(path))
                break
            c = ent.contents
            out.append((os.fsdecode(c.d_name), DT_NAMES.get(c.d_type, str(c.d_type)), c.d_ino))
    finally:
        _libc.closedir(d)
    return out


RENAME_FLAGS = {"RENAME_NOREPLACE": 1, "RENAME_EXCHANGE": 2, "RENAME_WHITEOUT": 4}
AT_FDCWD = -100


def renameat2(src: str, dst: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src, None, dst)


# --------------------------------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------------------------------

Result = tuple[str, Any]


def errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else f"OSError({exc})"


def parse_flags(spec: str | int) -> int:
    """``"O_WRONLY|O_CREAT"`` -> the int; ints pass through."""
    if isinstance(spec, int):
        return spec
    value = 0
    for name in spec.split("|"):
        name = name.strip()
        value |= getattr(os, name) if name.startswith("O_") else RENAME_FLAGS[name]
    return value


def _join(root: str | Path, rel: str) -> str:
    return os.path.join(str(root), rel) if rel not in ("", ".") else str(root)


def _small(data: bytes) -> Any:
    return data if len(data) <= 256 else ("sha", hashlib.sha256(data).hexdigest()[:16], len(data))


#: Every open by an operation is non-blocking, so that opening a FIFO never waits for the other end (it fails
#: with ENXIO for writing instead); regular files and directories ignore the flag.
NB = os.O_NONBLOCK


def _write_at(path: str, flags: int, data: bytes, offset: int | None = None) -> int:
    fd = os.open(path, flags | NB)
    try:
        return os.pwrite(fd, data, offset) if offset is not None else os.write(fd, data)
    finally:
        os.close(fd)


def _read(path: str) -> Any:
    fd = os.open(path, os.O_RDONLY | NB)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return _small(b"".join(chunks))
    finally:
        os.close(fd)


def _open_close(path: str, flags: str | int, mode: int = 0o644) -> None:
    os.close(os.open(path, parse_flags(flags) | NB, mode))


def _filtered_listxattr(path: str) -> list[str]:
    return sorted(n for n in os.listxattr(path, follow_symlinks=False) if n.startswith(XATTR_PREFIXES))


def _exec(path: str) -> int:
    return subprocess.run([path], capture_output=True, timeout=30).returncode


#: name -> function(root, *args).  Paths are relative to the mount root; symlink targets are taken as given.
OPS: dict[str, Callable[..., Any]] = {
    "create": lambda r, p, data=b"", mode=0o644: _create(_join(r, p), data, mode),
    "create_excl": lambda r, p, mode=0o644: _open_close(_join(r, p), os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                                                        mode),
    "open": lambda r, p, flags="O_RDONLY", mode=0o644: _open_close(_join(r, p), flags, mode),
    "write": lambda r, p, offset, data: _write_at(_join(r, p), os.O_WRONLY, data, offset),
    "append": lambda r, p, data: _write_at(_join(r, p), os.O_WRONLY | os.O_APPEND, data),
    "truncate": lambda r, p, length: os.truncate(_join(r, p), length),
    "read": lambda r, p: _read(_join(r, p)),
    "stat": lambda r, p: stat_node(os.stat(_join(r, p))),
    "lstat": lambda r, p: stat_node(os.lstat(_join(r, p))),
    "chmod": lambda r, p, mode: os.chmod(_join(r, p), mode),
    "chown": lambda r, p, uid, gid: os.chown(_join(r, p), uid, gid, follow_symlinks=False),
    "utime": lambda r, p, atime_ns, mtime_ns: os.utime(_join(r, p), ns=(atime_ns, mtime_ns),
                                                       follow_symlinks=False),
    "touch": lambda r, p: os.utime(_join(r, p)),
    "setxattr": lambda r, p, name, value, flags=0: os.setxattr(_join(r, p), name, value, flags,
                                                               follow_symlinks=False),
    "getxattr": lambda r, p, name: os.getxattr(_join(r, p), name, follow_symlinks=False),
    "listxattr": lambda r, p: _filtered_listxattr(_join(r, p)),
    "removexattr": lambda r, p, name: os.removexattr(_join(r, p), name, follow_symlinks=False),
    "unlink": lambda r, p: os.unlink(_join(r, p)),
    "rmdir": lambda r, p: os.rmdir(_join(r, p)),
    "mkdir": lambda r, p, mode=0o755: os.mkdir(_join(r, p), mode),
    "rename": lambda r, a, b: os.rename(_join(r, a), _join(r, b)),
    "renameat2": lambda r, a, b, flags: renameat2(_join(r, a), _join(r, b), parse_flags(flags)),
    "link": lambda r, a, b: os.link(_join(r, a), _join(r, b), follow_symlinks=False),
    "symlink": lambda r, target, p: os.symlink(target, _join(r, p)),
    "readlink": lambda r, p: os.readlink(_join(r, p)),
    "mkfifo": lambda r, p, mode=0o644: os.mkfifo(_join(r, p), mode),
    "mknod": lambda r, p, mode, major=0, minor=0: os.mknod(_join(r, p), mode, os.makedev(major, minor)),
    "listdir": lambda r, p: sorted(os.listdir(_join(r, p))),
    "access": lambda r, p, mode: os.access(_join(r, p), mode),
    "exec": lambda r, p: _exec(_join(r, p)),
}


def _create(path: str, data: bytes, mode: int) -> int:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | NB, mode)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def run_op(root: str | Path, op: Sequence[Any]) -> Result:
    """Apply ``op`` (``(name, *args)``, see :data:`OPS`) under ``root``; ``("ok", result)`` or
    ``("err", "ENOENT")``."""
    name, *args = op
    try:
        return ("ok", OPS[name](root, *args))
    except OSError as exc:
        return ("err", errname(exc))


#: Operations whose argument at this index is a mode, shown in octal.
_MODE_ARG = {"chmod": 1, "mkdir": 1, "mkfifo": 1, "mknod": 1, "create": 2, "create_excl": 1}


def format_op(op: Sequence[Any]) -> str:
    name, *args = op
    shown = []
    for i, a in enumerate(args):
        r = oct(a) if _MODE_ARG.get(name) == i and isinstance(a, int) else repr(a)
        shown.append(r if len(r) <= 60 else r[:40] + f"...<{len(r)} chars>")
    return f"{name}({', '.join(shown)})"


# --------------------------------------------------------------------------------------------------------------
# Mounting
# --------------------------------------------------------------------------------------------------------------


class MountError(RuntimeError):
    pass


def _unescape_mountinfo(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mountinfo(mnt: str | Path) -> dict[str, str] | None:
    """The top-most mount at ``mnt`` from /proc/self/mountinfo, or None."""
    target = os.path.realpath(mnt)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            if _unescape_mountinfo(parts[4]) == target:
                found = {"dev": parts[2], "fstype": parts[sep + 1], "source": parts[sep + 2],
                         "options": parts[sep + 3] if len(parts) > sep + 3 else ""}
    return found


def is_mounted(mnt: str | Path, fstype_prefix: str = "") -> bool:
    info = mountinfo(mnt)
    return info is not None and info["fstype"].startswith(fstype_prefix)


def wait_for_line(path: Path, fragment: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> str:
    """The tail of the file at ``path`` once a line of it holds ``fragment``; after ``timeout`` seconds, or once
    ``alive()`` is false, whatever it holds then."""
    deadline = time.monotonic() + timeout
    while True:
        out = _tail(path)
        if any(fragment in line for line in out.splitlines()) or time.monotonic() > deadline or not alive():
            return _tail(path)
        time.sleep(0.02)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return data[-limit:] if data else "<empty>"


def _dmesg_tail() -> str:
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return "\n".join(out.splitlines()[-5:])


def unionfs_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@dataclasses.dataclass
class Side:
    """The directories of one stack: lowers (top first), upper, work, mount point, and a log directory."""

    root: Path
    lowers: list[Path]
    upper: Path
    work: Path
    mnt: Path

    @classmethod
    def from_template(cls, template: Template, root: Path) -> Side:
        root.mkdir(parents=True)
        lowers = []
        for i in range(template.nlowers):
            clone_tree(template.lower(i), root / f"l{i + 1}")
            lowers.append(root / f"l{i + 1}")
        lowers.extend(template.shared)
        clone_tree(template.upper, root / "upper")
        (root / "work").mkdir()
        (root / "mnt").mkdir()
        return cls(root, lowers, root / "upper", root / "work", root / "mnt")

    def options(self, userxattr: bool = USERXATTR) -> str:
        """The mount options of this stack (with ``userxattr`` in the rootless format)."""
        opts = f"lowerdir={':'.join(map(str, self.lowers))},upperdir={self.upper},workdir={self.work}"
        return opts + ",userxattr" if userxattr else opts


class Mount:
    """A mounted (or mountable) stack.  ``name`` labels it in messages."""

    name = "?"

    def __init__(self, side: Side) -> None:
        self.side = side
        self.mounted = False

    @property
    def root(self) -> Path:
        return self.side.mnt

    def mount(self) -> None:
        raise NotImplementedError

    def unmount(self) -> None:
        """Clean unmount: flushes everything, the layers can be mounted again right away."""
        raise NotImplementedError

    def teardown(self) -> list[str]:
        """Best-effort, never raising, lazy unmount.  Returns problems met."""
        raise NotImplementedError

    def abort(self) -> None:
        """Make a hung mount fail its pending and future requests."""


class KernelMount(Mount):
    name = "kernel"

    def mount(self) -> None:
        opts = f"{self.side.options()},{KERNEL_EXTRA_OPTS}"
        res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.side.mnt)],
                             capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise MountError(f"kernel overlay mount failed ({res.returncode}): {res.stderr.strip()}\n"
                             f"options: {opts}\ndmesg: {_dmesg_tail()}")
        self.mounted = True

    def unmount(self) -> None:
        res = subprocess.run(["umount", str(self.side.mnt)], capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise MountError(f"umount {self.side.mnt} failed: {res.stderr.strip()}")
        self.mounted = False

    def teardown(self) -> list[str]:
        problems = []
        if is_mounted(self.side.mnt, "overlay"):
            res = subprocess.run(["umount", "-l", str(self.side.mnt)], capture_output=True, text=True, timeout=30)
            if res.returncode != 0:
                problems.append(f"umount -l {self.side.mnt}: {res.stderr.strip()}")
        self.mounted = False
        return problems


class FuseMount(Mount):
    """unionfs (``python -m unionfs mount -f``) or fuse-overlayfs (``fuse-overlayfs -f``), run in the
    foreground as our child so that we can see its stderr and kill it."""

    def __init__(self, side: Side, impl: str = IMPL) -> None:
        super().__init__(side)
        if impl not in IMPLS or impl == "kernel":
            raise ValueError(f"UNIONFS_DIFF_IMPL must be one of {IMPLS}, not {impl!r}")
        self.impl = impl
        self.name = impl
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None
        self.conn: str | None = None
        self._count = 0

    def command(self) -> list[str]:
        opts = self.side.options(userxattr=USERXATTR and self.impl == "unionfs")
        if self.impl == "unionfs":
            if EXTRA_OPTIONS:
                opts += "," + EXTRA_OPTIONS
            return [sys.executable, "-m", "unionfs", "mount", "-f", "-o", opts, str(self.side.mnt)]
        return ["fuse-overlayfs", "-f", "-o", opts, str(self.side.mnt)]

    def server_log(self) -> str:
        return _tail(self.log) if self.log else "<no log>"

    def server_log_once(self, fragment: str, timeout: float = 30.0) -> str:
        """The server's output once a line of it holds ``fragment`` (or ``timeout`` seconds have passed, or the
        server has exited): the mount is in /proc before the server logs how it serves."""
        return wait_for_line(self.log, fragment, timeout, alive=lambda: self.proc is not None and
                             self.proc.poll() is None) if self.log else "<no log>"

    def mount(self) -> None:
        self._count += 1
        self.log = self.side.root / f"{self.impl}.{self._count}.log"
        cmd = self.command()
        with open(self.log, "wb") as log:
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=unionfs_env(), cwd=str(REPO_ROOT), start_new_session=True)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while True:
            info = mountinfo(self.side.mnt)
            if info is not None and info["fstype"].startswith("fuse"):
                major, minor = (int(x) for x in info["dev"].split(":"))
                self.conn = str((major << 20) | minor)
                self.mounted = True
                return
            rc = self.proc.poll()
            if rc is not None:
                raise MountError(f"{self.impl} server exited with status {rc} before the mount was ready; "
                                 f"its output:\n{self.server_log()}")
            if time.monotonic() > deadline:
                self.teardown()
                raise MountError(f"{self.impl} mount not ready after {MOUNT_TIMEOUT}s; server output:\n"
                                 f"{self.server_log()}")
            time.sleep(0.02)

    def _wait_server(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def unmount(self) -> None:
        mnt = str(self.side.mnt)
        cmd = ([sys.executable, "-m", "unionfs", "umount", mnt] if self.impl == "unionfs"
               else ["fusermount3", "-u", mnt])
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=unionfs_env(), cwd=str(REPO_ROOT))
        if res.returncode != 0:
            raise MountError(f"{shlex.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}\n"
                             f"server output:\n{self.server_log()}")
        if is_mounted(mnt, "fuse"):
            raise MountError(f"{shlex.join(cmd)} returned 0 but {mnt} is still mounted")
        rc = self._wait_server(30)
        if rc is None:
            raise MountError(f"{self.impl} server still running 30s after unmount; output:\n{self.server_log()}")
        self.mounted = False
        if rc != 0:
            raise MountError(f"{self.impl} server exited with status {rc} after unmount; output:\n"
                             f"{self.server_log()}")

    def abort(self) -> None:
        if self.conn:
            with contextlib.suppress(OSError):
                Path(f"/sys/fs/fuse/connections/{self.conn}/abort").write_text("1")
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def teardown(self) -> list[str]:
        problems = []
        if is_mounted(self.side.mnt, "fuse"):
            res = subprocess.run(["fusermount3", "-u", "-z", str(self.side.mnt)], capture_output=True, text=True,
                                 timeout=30)
            if res.returncode != 0:
                problems.append(f"fusermount3 -u -z {self.side.mnt}: {res.stderr.strip()}")
        if self.proc is not None and self.proc.poll() is None and self._wait_server(5) is None:
            problems.append(f"{self.impl} server (pid {self.proc.pid}) did not exit after unmount; killed")
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            if self._wait_server(3) is None:
                with contextlib.suppress(OSError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self._wait_server(5)
        self.mounted = False
        return problems


def new_mount(side: Side, impl: str = IMPL) -> Mount:
    """A mount of ``side`` by the implementation under test."""
    if impl == "kernel":
        m = KernelMount(side)
        m.name = "kernel(self-test)"
        return m
    return FuseMount(side, impl)


# --------------------------------------------------------------------------------------------------------------
# Two stacks side by side
# --------------------------------------------------------------------------------------------------------------


def kernel_overlay_unavailable(probe_dir: Path) -> str | None:
    """Why kernel overlayfs cannot be used here, or None if a probe mount works."""
    if os.geteuid() != 0:
        return ("kernel overlayfs differential tests need root, or the root of a user namespace (mount(2) of "
                "overlay); tests/run-rootless.sh runs them in one")
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1:] == ["overlay"] for line in f):
                return "kernel has no overlay filesystem (not in /proc/filesystems)"
    except OSError as exc:
        return f"cannot read /proc/filesystems: {exc}"
    side_dirs = [probe_dir / d for d in ("l", "u", "w", "m")]
    for d in side_dirs:
        d.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={side_dirs[0]},upperdir={side_dirs[1]},workdir={side_dirs[2]}"
         + (",userxattr" if USERXATTR else ""), str(side_dirs[3])],
        capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        return f"probe mount of kernel overlayfs failed: {res.stderr.strip()}"
    subprocess.run(["umount", str(side_dirs[3])], capture_output=True, timeout=30)
    return None


def fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    from shutil import which

    if which("fusermount3") is None:
        return "fusermount3 is not installed"
    if IMPL == "fuse-overlayfs" and which("fuse-overlayfs") is None:
        return "UNIONFS_DIFF_IMPL=fuse-overlayfs but fuse-overlayfs is not installed"
    return None


class StackPair:
    """The same layers, cloned twice from ``template``: one copy mounted by the kernel (``self.kernel``), one
    by unionfs (``self.unionfs``).  Every mount made through the pair is torn down by :meth:`close`."""

    def __init__(self, base: Path, template: Template, impl: str = IMPL) -> None:
        self.base = base
        self.kside = Side.from_template(template, base / "kernel")
        self.uside = Side.from_template(template, base / "unionfs")
        self.kernel: Mount = KernelMount(self.kside)
        self.unionfs: Mount = new_mount(self.uside, impl)
        self.impl = impl
        self._mounts: list[Mount] = [self.kernel, self.unionfs]
        self.watchdog_fired = False
        self._timer: threading.Timer | None = None

    # -- lifecycle

    def mount(self) -> StackPair:
        self._timer = threading.Timer(WATCHDOG_SECONDS, self._on_watchdog)
        self._timer.daemon = True
        self._timer.start()
        self.kernel.mount()
        self.unionfs.mount()
        return self

    def _on_watchdog(self) -> None:
        self.watchdog_fired = True
        for m in self._mounts:
            if m.mounted:
                m.abort()

    def track(self, mount: Mount) -> Mount:
        self._mounts.append(mount)
        return mount

    def close(self) -> list[str]:
        if self._timer is not None:
            self._timer.cancel()
        problems: list[str] = []
        for m in reversed(self._mounts):
            try:
                problems.extend(m.teardown())
            except Exception as exc:  # teardown must go on with the others
                problems.append(f"teardown of {m.name} at {m.side.mnt}: {exc!r}")
        return problems

    def __enter__(self) -> StackPair:
        return self

    def __exit__(self, *exc: object) -> None:
        problems = self.close()
        if problems and exc[0] is None:
            raise MountError("teardown problems: " + "; ".join(problems))

    def context(self) -> str:
        out = ""
        if self.watchdog_fired:
            out += f"\n  (the watchdog aborted the FUSE connection after {WATCHDOG_SECONDS}s: the server hung)"
        for m in self._mounts:
            if not isinstance(m, FuseMount) or m.proc is None:
                continue
            rc = m.proc.poll()
            log = m.server_log()
            if rc is not None and m.mounted:
                out += f"\n  ({m.impl} server died with status {rc}; its output:\n{log})"
            elif "Traceback" in log or "rror" in log:
                out += f"\n  ({m.impl} server output:\n{log})"
        return out

    # -- operations

    @property
    def roots(self) -> tuple[Path, Path]:
        return self.kernel.root, self.unionfs.root

    def op(self, op: Sequence[Any]) -> tuple[Result, Result]:
        """Run ``op`` on the kernel mount, then on unionfs."""
        return run_op(self.kernel.root, op), run_op(self.unionfs.root, op)

    def both(self, fn: Callable[[Path], Any]) -> tuple[Result, Result]:
        """Run ``fn(root)`` on each mount; its value or errno."""
        out = []
        for root in self.roots:
            try:
                out.append(("ok", fn(root)))
            except OSError as exc:
                out.append(("err", errname(exc)))
        return out[0], out[1]

    def run_ops(self, ops: Iterable[Sequence[Any]], *, stop_at_first: bool = False) -> list[str]:
        """Run ``ops`` in lockstep; return a line for each op whose results differ."""
        mismatches = []
        for i, op in enumerate(ops):
            k, u = self.op(op)
            if k != u:
                mismatches.append(f"  #{i} {format_op(op)}: kernel={k!r} {self.impl}={u!r}")
                if stop_at_first:
                    break
        return mismatches

    def assert_ops(self, ops: Iterable[Sequence[Any]]) -> None:
        ops = list(ops)
        mismatches = self.run_ops(ops)
        if mismatches:
            raise AssertionError(f"{len(mismatches)} of {len(ops)} operation(s) differ:\n" + "\n".join(mismatches)
                                 + self.context())

    def expect(self, op: Sequence[Any], expected: Result | str) -> None:
        """Check that the kernel gives ``expected`` (an errno name or a result pair; this guards the test's
        own premise) and that unionfs gives the same."""
        if isinstance(expected, str):
            expected = ("err", expected)
        k, u = self.op(op)
        assert k == expected, f"premise: kernel gave {k!r} for {format_op(op)}, the test expected {expected!r}"
        assert u == k, f"{format_op(op)}: kernel={k!r} {self.impl}={u!r}" + self.context()

    def assert_same_tree(self, *, stable_only: bool = True) -> dict[str, Node]:
        k = snapshot_tree(self.kernel.root, stable_only=stable_only)
        u = snapshot_tree(self.unionfs.root, stable_only=stable_only)
        assert_same(k, u, "merged views", lb=self.impl, context=self.context())
        return k

    def assert_same_upper(self, *, unmount: bool = True) -> None:
        """Compare the upper layers on disk, after a clean unmount of both sides unless ``unmount=False``."""
        if unmount:
            self.unmount_all()
        k = snapshot_upper(self.kside.upper)
        u = snapshot_upper(self.uside.upper)
        assert_same(k, u, "upper layers on disk", lb=self.impl, context=self.context())

    def unmount_all(self) -> None:
        for m in (self.unionfs, self.kernel):
            if m.mounted:
                m.unmount()


# --------------------------------------------------------------------------------------------------------------
# The standard three-layer stack most tests use
# --------------------------------------------------------------------------------------------------------------

MiB = 1 << 20

#: Top-most lower layer.
L1: dict[str, Entry] = {
    "top.txt": "top from l1\n",
    "shared.txt": "shared from l1\n",
    "dir/a": "dir/a from l1\n",
    "dir/wh": WHITEOUT,  # hides l2's dir/wh
    "dir/whd": WHITEOUT,  # hides l2's directory dir/whd
    "opq": OPAQUE,  # hides l2's opq/*
    "opq/only1": "opq/only1 from l1\n",
    "link_to_top": Symlink("top.txt"),
    "dangling": Symlink("no/such/target"),
    "ro.txt": File(b"read-only\n", mode=0o444),
    "owned": File(b"owned by 1000\n", mode=0o640, uid=1000, gid=1001,
                  xattrs=(("user.k", b"v"), ("user.empty", b""), ("trusted.t", b"tv"))),
    "exe": File(b"#!/bin/sh\nexit 3\n", mode=0o755),
    "noexec": File(b"#!/bin/sh\nexit 0\n", mode=0o644),
    "dirfile": "a file in l1 over a directory in l3\n",
    "pipe": Fifo(mode=0o640),
    "xdir": Dir(mode=0o750, uid=1000, gid=1000, xattrs=(("user.d", b"dir xattr"),)),
    "xdir/f": "in xdir\n",
    "pub": Dir(mode=0o777),
    "pub/f": "root-owned file in a world-writable dir\n",
    "sticky": Dir(mode=0o1777),
    "sticky/f": "root-owned file in a sticky dir\n",
    "private": Dir(mode=0o700),
    "private/x": "private\n",
    "secret": File(b"secret\n", mode=0o600),
    "mine": File(b"owned by nobody\n", uid=65534, gid=65534),
    "xattrs.txt": File(b"xattr names\n", xattrs=(
        (OVL + "overlay.esc", f"escaped: shown as {OVL}esc".encode()),
        (OVL + "private", b"overlay-private: hidden"),
        (OTHER_OVL + "u", b"the other namespace's overlay xattr: shown as is"),
        ("user.plain", b"plain"),
    )),
    "loop1": Symlink("loop2"),
    "loop2": Symlink("loop1"),
}

#: Middle lower layer.
L2: dict[str, Entry] = {
    "shared.txt": "shared from l2\n",
    "mid.txt": "mid from l2\n",
    "dir/b": "dir/b from l2\n",
    "dir/wh": "hidden by a whiteout in l1\n",
    "dir/whd/leak": "hidden by a whiteout in l1; must not leak into a new dir/whd\n",
    "dir/sub/c": "dir/sub/c from l2\n",
    "opq/hidden": "hidden by opaque l1/opq\n",
    "filedir/inner": "l2 directory over a file in l3\n",
    "deep/er/est/file": "deep file in l2\n",
    "emptydir": DIR,
}

#: Bottom lower layer.
L3: dict[str, Entry] = {
    "shared.txt": "shared from l3\n",
    "bottom.txt": "bottom from l3\n",
    "dir/c": "dir/c from l3\n",
    "dir/a": "dir/a from l3 (hidden by l1)\n",
    "filedir": "l3 file hidden by l2 directory\n",
    "dirfile/inner": "hidden: l1 has a file here\n",
    "sparse": File(extents=((0, b"head"), (16 * MiB, b"middle"), (32 * MiB - 4, b"tail")), size=32 * MiB),
    "big": File(bytes(range(256)) * 4096),  # 1 MiB of data
    "deep/er/other": "deep other in l3\n",
}

STD_LOWERS: tuple[dict[str, Entry], ...] = (L1, L2, L3)

#: The standard stack plus two names of one inode in l2 (kept apart so that hard-link differences show in the
#: hard-link tests only).
HARDLINK_LOWERS: tuple[dict[str, Entry], ...] = (
    L1,
    {**L2, "hl1": File(b"hard linked in l2\n", mode=0o600, uid=1000), "hl2": Hardlink("hl1"),
     "dir/hl3": Hardlink("hl1")},
    L3,
)

#: A time in the "stable" range for utime operations (2001-01-01T00:00:00.123456789Z).
OLD_NS = 978_307_200 * 10**9 + 123_456_789

#: A file capability as setcap writes it (VFS_CAP_REVISION_2, effective, CAP_NET_RAW permitted): a write to the
#: file removes it. The layers' clones leave security.* out, so tests set it on each side's lower layer.
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)


def run_ops_as(uid: int, gid: int, root: str | Path, ops: Sequence[Sequence[Any]],
               groups: Sequence[int] = ()) -> list[Result]:
    """Run ``ops`` under ``root`` in a forked child with the given (unprivileged) credentials (``groups``: its
    supplementary groups)."""
    import pickle

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's code
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            payload = pickle.dumps([run_op(root, op) for op in ops])
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            payload = pickle.dumps(f"child failed: {exc!r}")
        try:
            with os.fdopen(w, "wb") as f:
                f.write(payload)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        payload = f.read()
    os.waitpid(pid, 0)
    result = pickle.loads(payload)
    if isinstance(result, str):
        raise RuntimeError(result)
    return result  # type: ignore[no-any-return]

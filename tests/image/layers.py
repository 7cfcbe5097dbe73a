"""Building layer tars in memory, and listing trees, for the layer tests."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import zstandard

Entry = tuple[tarfile.TarInfo, bytes | None]
MTIME = 1_600_000_000


def _info(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0, mtime: int = MTIME) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = mtime
    return ti


def reg(name: str, data: bytes = b"", mode: int = 0o644, xattrs: dict[str, bytes] | None = None, **kw: int) -> Entry:
    ti = _info(name, tarfile.REGTYPE, mode, **kw)
    ti.size = len(data)
    if xattrs:
        ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()}
    return ti, data


def dir_(name: str, mode: int = 0o755, **kw: int) -> Entry:
    return _info(name, tarfile.DIRTYPE, mode, **kw), None


def sym(name: str, target: str, **kw: int) -> Entry:
    ti = _info(name, tarfile.SYMTYPE, 0o777, **kw)
    ti.linkname = target
    return ti, None


def hard(name: str, target: str) -> Entry:
    ti = _info(name, tarfile.LNKTYPE, 0o644)
    ti.linkname = target
    return ti, None


def fifo(name: str, mode: int = 0o644, **kw: int) -> Entry:
    return _info(name, tarfile.FIFOTYPE, mode, **kw), None


def chrdev(name: str, major: int, minor: int, mode: int = 0o666, **kw: int) -> Entry:
    ti = _info(name, tarfile.CHRTYPE, mode, **kw)
    ti.devmajor, ti.devminor = major, minor
    return ti, None


def build(entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def gz(data: bytes) -> bytes:
    return gzip.compress(data)


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def listing(top: Path, skip: Path | None = None) -> dict[str, tuple[object, ...]]:
    """Every object under ``top`` (not followed): type and mode, owner, size, mtime, link target, rdev."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            if skip is not None and p == skip:
                continue
            st = p.lstat()
            target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            out[str(p.relative_to(top))] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                target,
                st.st_rdev,
            )
        if skip is not None:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
    return out


def shape(top: Path) -> dict[str, tuple[object, ...]]:
    """Names, types, modes, sizes and link targets under ``top`` (what ``tar -x`` must agree on)."""
    return {k: (v[0], v[3] if stat.S_ISREG(int(str(v[0]))) else None, v[5]) for k, v in listing(top).items()}


def blkdev(name: str, major: int, minor: int, mode: int = 0o660, **kw: int) -> Entry:
    ti = _info(name, tarfile.BLKTYPE, mode, **kw)
    ti.devmajor, ti.devminor = major, minor
    return ti, None


def tree(top: Path) -> dict[str, tuple[object, ...]]:
    """:func:`listing` plus link counts, content and every xattr (overlay ones included), with the mtimes of
    whiteouts (made when applied, not from the layer) left out."""
    out: dict[str, tuple[object, ...]] = {}
    for name, row in listing(top).items():
        p = top / name
        st = p.lstat()
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            row = (*row[:4], None, *row[5:])
        data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
        attrs = sorted((n, os.getxattr(p, n, follow_symlinks=False)) for n in os.listxattr(p, follow_symlinks=False))
        out[name] = (*row, st.st_nlink, data, attrs)
    return out

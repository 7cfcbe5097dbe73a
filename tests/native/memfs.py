"""A tiny pyfuse3 file system in memory for the shim's tests: ``python memfs.py MOUNTPOINT [N]``.

Run with the shim loaded first (``UNIONFS_NATIVE_LIB``, ``UNIONFS_NATIVE_STATS`` and ``UNIONFS_NATIVE_CONFIG`` are
read by the shim and the loader). The root holds a directory ``d`` (N empty files ``f0000``...), a file ``data``
that takes writes, and a file ``ctl`` whose writes are commands: ``add NAME`` adds a file to ``d`` without telling
the kernel, ``inval`` invalidates ``d`` (``pyfuse3.invalidate_inode``), ``dump PATH`` writes the shim's
counters. ``d``'s attributes never change, so the kernel has no other way to learn of an ``add``.

With ``MEMFS_REAL=PATH`` the root also holds ``real``, whose reads are preads of PATH: in Python, or, with
``MEMFS_NATIVE_READS=1``, served by the shim on the descriptor the open registered (``MEMFS_NATIVE_WRITES=1``:
writes too, on a descriptor opened for writing).

Extended attributes are kept in a dict; memfs counts the GETXATTR requests that reach it.

Its readdir honours plain READDIR (the kernel's adaptive readdirplus, through the shim): no lookup counted.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import Any

import unionfs._native as native

NATIVE = native.load()
if NATIVE is None:
    sys.exit(f"memfs: the shim did not load: {native.reason()}")

import pyfuse3  # noqa: E402  (after the shim, on purpose)
import trio  # noqa: E402

ROOT, DIR, CTL, DATA, REAL = pyfuse3.ROOT_INODE, 2, 3, 4, 5
#: file handles of opens of ``real`` (its descriptor plus this)
REAL_FH = 1 << 20
TIMEOUT = 60.0


class MemFS(pyfuse3.Operations):  # type: ignore[misc]
    def __init__(self, count: int) -> None:
        super().__init__()
        self.names: dict[int, dict[bytes, int]] = {ROOT: {b"d": DIR, b"ctl": CTL, b"data": DATA}, DIR: {}}
        self.real = os.environ.get("MEMFS_REAL")
        if self.real:
            self.names[ROOT][b"real"] = REAL
        self.native_reads = os.environ.get("MEMFS_NATIVE_READS") == "1"
        self.native_writes = os.environ.get("MEMFS_NATIVE_WRITES") == "1"
        self.python_writes = 0
        self.next_ino = 10
        for i in range(count):
            self._add(b"f%04d" % i)
        self.data = bytearray()
        self.lookups: dict[int, int] = {}
        self.plain_readdirs = 0
        self.xattrs: dict[tuple[int, bytes], bytes] = {}
        self.getxattrs = 0

    def _add(self, name: bytes) -> None:
        self.names[DIR][name] = self.next_ino
        self.next_ino += 1

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = (stat.S_IFDIR | 0o755) if ino in self.names else (stat.S_IFREG | 0o644)
        a.st_nlink = 2 if ino in self.names else 1
        a.st_size = len(self.data) if ino == DATA else 0
        if ino == REAL and self.real:
            a.st_size = os.stat(self.real).st_size
        a.st_uid = os.getuid()
        a.st_gid = os.getgid()
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = 1_000_000_000
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        ino = self.names.get(parent, {}).get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        return self._attr(ino)

    async def forget(self, inode_list: Any) -> None:
        for ino, n in inode_list:
            self.lookups[ino] = self.lookups.get(ino, 0) - n

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode not in self.names:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        fh, plain = NATIVE.readdir_handle(fh)
        if plain:
            self.plain_readdirs += 1
        entries = sorted(self.names[fh].items())
        for index, (name, ino) in enumerate(entries[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), index + 1):
                return
            if not plain:
                self.lookups[ino] = self.lookups.get(ino, 0) + 1

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode in self.names:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if inode == REAL and self.real:
            writable = flags & os.O_ACCMODE != os.O_RDONLY
            fd = os.open(self.real, os.O_RDWR if writable else os.O_RDONLY)
            if self.native_reads or (writable and self.native_writes):
                NATIVE.serve(REAL_FH + fd, fd, reads=self.native_reads, writes=writable and self.native_writes)
            return pyfuse3.FileInfo(fh=REAL_FH + fd)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh >= REAL_FH:
            return os.pread(fh - REAL_FH, size, off)
        return bytes(self.data[off:off + size]) if fh == DATA else b""

    async def release(self, fh: int) -> None:
        if fh >= REAL_FH:
            NATIVE.stop(fh)
            os.close(fh - REAL_FH)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh >= REAL_FH:
            self.python_writes += 1
            return os.pwrite(fh - REAL_FH, buf, off)
        if fh == CTL:
            for line in buf.decode().splitlines():
                word, _, arg = line.partition(" ")
                if word == "add":
                    self._add(arg.encode())
                elif word == "inval":
                    pyfuse3.invalidate_inode(DIR)
                elif word == "dump":
                    NATIVE.dump(arg)
            return len(buf)
        if fh == DATA:
            end = off + len(buf)
            if len(self.data) < end:
                self.data.extend(bytes(end - len(self.data)))
            self.data[off:end] = buf
        return len(buf)

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        self.getxattrs += 1
        try:
            return self.xattrs[(inode, name)]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENODATA) from None

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self.xattrs[(inode, name)] = value

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        if inode == DATA and fields.update_size:
            del self.data[attr.st_size:]
        if inode == REAL and self.real and fields.update_size:
            os.truncate(self.real, attr.st_size)
        return self._attr(inode)


def main() -> None:
    mountpoint = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    fs = MemFS(count)
    options = set(pyfuse3.default_options)
    options.add("fsname=memfs")
    pyfuse3.init(fs, mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)
        leaked = sum(n for ino, n in fs.lookups.items() if n > 0)
        print(f"memfs: plain_readdirs {fs.plain_readdirs} lookups_left {leaked} getxattrs {fs.getxattrs} "
              f"python_writes {fs.python_writes}", flush=True)


if __name__ == "__main__":
    main()

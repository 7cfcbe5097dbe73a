"""A file exerciser in the manner of fsx: random operations on one file, each checked against a model of its
bytes kept in memory.

Operations: read, write, mmap read, mmap write, truncate, fallocate (plain, KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE
with and without KEEP_SIZE), copy_file_range within the file, lseek SEEK_DATA/SEEK_HOLE, fsync, fdatasync, and
closing and opening the file again. The file is opened read-only first and only for reading until the first
operation that changes it: on a union mount over a lower file, that open for writing copies the file up in
the middle of the run, while the read-only descriptor stays open and must read the copy from then on.

After every operation the size is checked (fstat); every ``check_every`` operations and at the end the whole
file is read and compared. A failure raises :class:`Mismatch` naming the operation, its number and the log of
the last operations, so that a run can be repeated with the same seed.

``python tests/kernel/fsx.py FILE [--ops N] [--seed S] [--no-fallocate] ...`` runs it on its own (exit status 1 on a
mismatch).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import errno
import mmap
import os
import random
import sys
from collections import deque
from collections.abc import Callable

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Mismatch(AssertionError):
    """The file is not what the model says it must be."""


@dataclasses.dataclass
class Options:
    ops: int = 10_000
    seed: int = 1
    max_size: int = 256 * 1024
    max_io: int = 64 * 1024
    check_every: int = 1_000
    fallocate: bool = True
    punch_hole: bool = True
    zero_range: bool = True
    copy_range: bool = True
    seek_data: bool = True
    mmap: bool = True
    #: fail when an operation asked for is not supported (instead of leaving it out for the rest of the run)
    strict: bool = True
    #: map the descriptor open for writing where the read-only one was drawn, once there is one: kernel
    #: overlayfs maps the file a descriptor was opened on, so a mapping made through a descriptor opened before
    #: the copy-up shows the lower file (overlayfs.rst, "Non-standard behavior"); the operations and their
    #: order are the same either way, so two runs with one seed end with the same bytes
    kernel_maps: bool = False


@dataclasses.dataclass
class Result:
    ops: int
    counts: dict[str, int]
    size: int
    #: operations left out because the file system said EOPNOTSUPP (only when not strict)
    unsupported: list[str]


class Exerciser:
    def __init__(self, path: str, options: Options) -> None:
        self.path = path
        self.o = options
        self.rng = random.Random(options.seed)
        with open(path, "rb") as f:
            self.model = bytearray(f.read())
        self.ro = os.open(path, os.O_RDONLY)
        self.rw: int | None = None  # opened at the first change
        self.counts: dict[str, int] = {}
        self.log: deque[str] = deque(maxlen=40)
        self.unsupported: list[str] = []
        self.step = 0

    # -- helpers ------------------------------------------------------------------------------------------

    def fail(self, what: str) -> None:
        raise Mismatch(f"operation {self.step} ({self.path}, seed {self.o.seed}): {what}\nlast operations:\n"
                       + "\n".join(self.log))

    def writer(self) -> int:
        if self.rw is None:
            self.rw = os.open(self.path, os.O_RDWR)
        return self.rw

    def reader(self) -> int:
        """A descriptor to read with: the read-only one, or the one open for writing."""
        if self.rw is None or self.rng.random() < 0.5:
            return self.ro
        return self.rw

    def resize(self, size: int) -> None:
        if size > len(self.model):
            self.model.extend(bytes(size - len(self.model)))
        else:
            del self.model[size:]

    def zero(self, start: int, end: int) -> None:
        end = min(end, len(self.model))
        if end > start:
            self.model[start:end] = bytes(end - start)

    def range(self, within: int | None = None) -> tuple[int, int]:
        """An offset and a length: anywhere up to the largest size, or (``within``) inside the first bytes."""
        limit = self.o.max_size if within is None else within
        off = self.rng.randrange(max(limit, 1))
        length = self.rng.randint(1, max(1, min(self.o.max_io, limit - off)))
        return off, length

    def check_size(self) -> None:
        for fd in {self.ro, self.rw} - {None}:
            size = os.fstat(fd).st_size  # type: ignore[arg-type]
            if size != len(self.model):
                self.fail(f"size {size}, expected {len(self.model)}")

    def check_all(self) -> None:
        fd = self.reader()
        got = bytearray()
        while len(got) < len(self.model) + 1:
            chunk = os.pread(fd, 1 << 20, len(got))
            if not chunk:
                break
            got += chunk
        if got != self.model:
            at = self.first_diff(bytes(got), bytes(self.model))
            self.fail(f"content differs from byte {at} (read {len(got)} bytes, expected {len(self.model)}): "
                      f"got {bytes(got[at:at + 16])!r}, expected {bytes(self.model[at:at + 16])!r}")

    def unsupported_op(self, name: str, exc: OSError) -> bool:
        """True when ``exc`` says the operation is not supported and the run may go on without it."""
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        if self.o.strict:
            self.fail(f"{name}: {exc}")
        self.unsupported.append(name)
        return True

    def try_fallocate(self, name: str, mode: int, off: int, length: int) -> bool:
        """fallocate(2) on the writable descriptor; False when ``name`` (an :class:`Options` field) turned out
        not to be supported and is left out from now on (not strict)."""
        try:
            fallocate(self.writer(), mode, off, length)
        except OSError as exc:
            if self.unsupported_op(name, exc):
                setattr(self.o, name, False)
                return False
            raise
        return True

    # -- operations ---------------------------------------------------------------------------------------

    def op_read(self) -> None:
        if not self.model:
            return
        off, length = self.range(len(self.model))
        self.log.append(f"{self.step} read {off} {length}")
        got = os.pread(self.reader(), length, off)
        want = bytes(self.model[off:off + length])
        if got != want:
            self.fail(f"read {off}+{length}: differs at byte {self.first_diff(got, want)}")

    @staticmethod
    def first_diff(a: bytes, b: bytes) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    def op_mapread(self) -> None:
        if not self.model:
            return
        off, length = self.range(len(self.model))
        self.log.append(f"{self.step} mapread {off} {length}")
        start = off - off % mmap.ALLOCATIONGRANULARITY
        fd = self.reader()
        if self.o.kernel_maps and self.rw is not None:
            fd = self.rw
        with mmap.mmap(fd, off + length - start, prot=mmap.PROT_READ, offset=start) as m:
            got = m[off - start:off - start + length]
        want = bytes(self.model[off:off + length])
        if got != want:
            self.fail(f"mapread {off}+{length}: differs at byte {self.first_diff(got, want)}")

    def op_write(self) -> None:
        off, length = self.range()
        data = self.rng.randbytes(length)
        self.log.append(f"{self.step} write {off} {length}")
        n = os.pwrite(self.writer(), data, off)
        if n != length:
            self.fail(f"write {off}+{length} wrote {n}")
        if off + length > len(self.model):
            self.resize(off + length)
        self.model[off:off + length] = data

    def op_mapwrite(self) -> None:
        off, length = self.range()
        data = self.rng.randbytes(length)
        self.log.append(f"{self.step} mapwrite {off} {length}")
        fd = self.writer()
        if off + length > len(self.model):
            os.ftruncate(fd, off + length)
            self.resize(off + length)
        start = off - off % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(fd, off + length - start, offset=start) as m:
            m[off - start:off - start + length] = data
            m.flush()
        self.model[off:off + length] = data

    def op_truncate(self) -> None:
        size = self.rng.randrange(self.o.max_size)
        self.log.append(f"{self.step} truncate {size}")
        os.ftruncate(self.writer(), size)
        self.resize(size)

    def op_fallocate(self) -> None:
        off, length = self.range()
        keep = self.rng.random() < 0.5
        self.log.append(f"{self.step} fallocate {off} {length}{' keep_size' if keep else ''}")
        if not self.try_fallocate("fallocate", FALLOC_FL_KEEP_SIZE if keep else 0, off, length):
            return
        if not keep and off + length > len(self.model):
            self.resize(off + length)

    def op_punch_hole(self) -> None:
        if not self.model:
            return
        off, length = self.range(len(self.model))
        self.log.append(f"{self.step} punch_hole {off} {length}")
        if not self.try_fallocate("punch_hole", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length):
            return
        self.zero(off, off + length)

    def op_zero_range(self) -> None:
        off, length = self.range()
        keep = self.rng.random() < 0.5
        self.log.append(f"{self.step} zero_range {off} {length}{' keep_size' if keep else ''}")
        if not self.try_fallocate("zero_range", FALLOC_FL_ZERO_RANGE | (FALLOC_FL_KEEP_SIZE if keep else 0), off,
                                  length):
            return
        if not keep and off + length > len(self.model):
            self.resize(off + length)
        self.zero(off, off + length)

    def op_copy_range(self) -> None:
        if not self.model:
            return
        src, length = self.range(len(self.model))
        length = min(length, len(self.model) - src)
        # a destination not overlapping the source (the kernel refuses an overlap within one file)
        room = [(0, src - length), (src + length, self.o.max_size - length)]
        room = [(lo, hi) for lo, hi in room if hi >= lo]
        if not room:
            return
        lo, hi = self.rng.choice(room)
        dst = self.rng.randint(lo, hi)
        self.log.append(f"{self.step} copy_range {src} {length} -> {dst}")
        fd = self.writer()
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(self.reader() if self.rng.random() < 0.5 else fd, fd, length - done,
                                       src + done, dst + done)
            except OSError as exc:
                if done == 0 and self.unsupported_op("copy_range", exc):
                    self.o.copy_range = False
                    return
                raise
            if n == 0:
                break
            done += n
        if done != length:
            self.fail(f"copy_range copied {done} of {length}")
        data = bytes(self.model[src:src + length])
        if dst + length > len(self.model):
            self.resize(dst + length)
        self.model[dst:dst + length] = data

    def op_seek(self) -> None:
        size = len(self.model)
        off = self.rng.randrange(self.o.max_size)
        whence = self.rng.choice((os.SEEK_DATA, os.SEEK_HOLE))
        name = "seek_data" if whence == os.SEEK_DATA else "seek_hole"
        self.log.append(f"{self.step} {name} {off}")
        try:
            at = os.lseek(self.reader(), off, whence)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                # ENXIO: past the end, or (SEEK_DATA) only a hole from there on
                if off >= size or (whence == os.SEEK_DATA and not any(self.model[off:])):
                    return
                self.fail(f"{name} {off}: ENXIO with size {size}")
            if self.unsupported_op(name, exc):
                self.o.seek_data = False
                return
            raise
        if off >= size:
            self.fail(f"{name} {off} gave {at} past the end ({size})")
        if whence == os.SEEK_DATA:
            # [off, at) is a hole: zeros
            if not off <= at < size or any(self.model[off:at]):
                self.fail(f"seek_data {off} gave {at} (size {size}) over data")
        elif not off <= at <= size or (at < size and self.model[at] != 0):
            self.fail(f"seek_hole {off} gave {at} (size {size}), not a hole")

    def op_fsync(self) -> None:
        self.log.append(f"{self.step} fsync")
        if self.rng.random() < 0.5:
            os.fsync(self.writer())
        else:
            os.fdatasync(self.writer())

    def op_reopen(self) -> None:
        self.log.append(f"{self.step} close and open")
        if self.rw is not None and self.rng.random() < 0.7:
            os.close(self.rw)
            self.rw = os.open(self.path, os.O_RDWR)
        else:
            os.close(self.ro)
            self.ro = os.open(self.path, os.O_RDONLY)

    # -- the run ------------------------------------------------------------------------------------------

    def choices(self) -> list[tuple[str, Callable[[], None], int]]:
        o = self.o
        ops: list[tuple[str, Callable[[], None], int]] = [
            ("read", self.op_read, 10), ("write", self.op_write, 10), ("truncate", self.op_truncate, 2),
            ("fsync", self.op_fsync, 1), ("reopen", self.op_reopen, 1)]
        if o.mmap:
            ops += [("mapread", self.op_mapread, 4), ("mapwrite", self.op_mapwrite, 4)]
        if o.fallocate:
            ops.append(("fallocate", self.op_fallocate, 3))
        if o.punch_hole:
            ops.append(("punch_hole", self.op_punch_hole, 3))
        if o.zero_range:
            ops.append(("zero_range", self.op_zero_range, 3))
        if o.copy_range:
            ops.append(("copy_range", self.op_copy_range, 3))
        if o.seek_data:
            ops.append(("seek", self.op_seek, 3))
        return ops

    def run(self) -> Result:
        # Reads only until the first change (the open for writing, a copy-up on a union over a lower file).
        reads_first = self.rng.randint(10, 50)
        for step in range(1, self.o.ops + 1):
            self.step = step
            if self.step <= reads_first:
                name, fn = ("read", self.op_read) if self.step % 2 else ("mapread", self.op_mapread)
                if not self.o.mmap:
                    name, fn = "read", self.op_read
            else:
                ops = self.choices()
                name, fn, _ = self.rng.choices(ops, weights=[w for _, _, w in ops])[0]
            fn()
            self.counts[name] = self.counts.get(name, 0) + 1
            self.check_size()
            if self.step % self.o.check_every == 0:
                self.check_all()
        self.check_all()
        return Result(self.o.ops, dict(sorted(self.counts.items())), len(self.model), self.unsupported)

    def close(self) -> None:
        for fd in (self.ro, self.rw):
            if fd is not None:
                os.close(fd)
        self.rw = None


def run(path: str, options: Options) -> Result:
    ex = Exerciser(path, options)
    try:
        return ex.run()
    finally:
        ex.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file")
    p.add_argument("--ops", type=int, default=Options.ops)
    p.add_argument("--seed", type=int, default=Options.seed)
    for name in ("fallocate", "punch-hole", "zero-range", "copy-range", "seek-data", "mmap"):
        p.add_argument(f"--no-{name}", action="store_true", help=f"leave {name} out")
    p.add_argument("--lenient", action="store_true", help="leave out what the file system does not support")
    p.add_argument("--kernel-maps", action="store_true", help="map through the writable descriptor once there is "
                   "one (kernel overlayfs: a mapping of a descriptor opened before a copy-up shows the lower file)")
    a = p.parse_args(argv)
    o = Options(ops=a.ops, seed=a.seed, fallocate=not a.no_fallocate, punch_hole=not a.no_punch_hole,
                zero_range=not a.no_zero_range, copy_range=not a.no_copy_range, seek_data=not a.no_seek_data,
                mmap=not a.no_mmap, strict=not a.lenient, kernel_maps=a.kernel_maps)
    try:
        r = run(a.file, o)
    except Mismatch as exc:
        print(f"fsx: {exc}", file=sys.stderr)
        return 1
    print(f"fsx: {r.ops} operations, final size {r.size}: " + ", ".join(f"{k} {v}" for k, v in r.counts.items())
          + (f"; not supported: {', '.join(r.unsupported)}" if r.unsupported else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The content store of a snapshot root: the blobs of its images (manifests, configs, compressed layers), each
in ``blobs/sha256/<hex>`` under its digest, written once and never changed.

A blob is written to a temporary file in ``blobs/tmp``, synced, checked against its expected digest and only
then renamed into place: a blob in ``blobs/sha256`` is always complete and correct. Blobs no image refers to
are deleted by :meth:`ContentStore.prune`, which skips its work while an import holds the store (a blob an
import has written is referred to only once the import names its image).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from ._oci import ImageError, check_digest

_CHUNK = 1 << 20


class BlobWriter:
    """A blob being written: :meth:`write` its bytes; the digest and size are computed meanwhile."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = self._f.write(data)
        self._sha.update(data)
        self.size += n
        return n

    @property
    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()


class Tee:
    """A reader passing on what it reads from ``source`` and writing a copy into ``writer``."""

    def __init__(self, source: BinaryIO, writer: BlobWriter | None) -> None:
        self._source = source
        self._writer = writer

    def read(self, n: int = -1) -> bytes:
        data = self._source.read(n)
        if data and self._writer is not None:
            self._writer.write(data)
        return data


class ContentStore:
    """The blobs under ``ROOT/blobs``."""

    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "blobs")
        self._sha_dir = os.path.join(self.dir, "sha256")
        self._tmp_dir = os.path.join(self.dir, "tmp")
        for d in (self.dir, self._sha_dir, self._tmp_dir):
            with contextlib.suppress(FileExistsError):
                os.mkdir(d, 0o700)
        self._lock_path = os.path.join(self.dir, "lock")

    def path(self, digest: str) -> str:
        algorithm, _, hexpart = check_digest(digest).partition(":")
        if algorithm != "sha256":
            raise ImageError(f"blob {digest}: only sha256 blobs are stored")
        return os.path.join(self._sha_dir, hexpart)

    def has(self, digest: str) -> bool:
        return os.path.isfile(self.path(digest))

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise ImageError(f"blob {digest} is missing from the store {self.dir}") from None

    def read(self, digest: str) -> bytes:
        with self.open(digest) as f:
            return f.read()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Keep :meth:`prune` away meanwhile (several holders at once are fine)."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def writer(self, expected: str | None = None) -> Iterator[BlobWriter]:
        """Write a blob: the bytes written inside the ``with`` block become the blob once it ends without an
        error, provided their digest is ``expected`` (when given; ImageError otherwise). A blob already stored
        under that digest is kept as it is. The writer's ``digest`` names the blob afterwards."""
        fd, tmp = tempfile.mkstemp(dir=self._tmp_dir, prefix="blob-")
        try:
            with os.fdopen(fd, "wb", buffering=_CHUNK) as f:
                w = BlobWriter(f)
                yield w
                f.flush()
                os.fsync(f.fileno())
            if expected is not None and w.digest != expected:
                raise ImageError(f"blob {expected}: its content has the digest {w.digest}")
            os.chmod(tmp, 0o444)
            os.rename(tmp, self.path(w.digest))
            tmp = ""
        finally:
            if tmp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def put(self, data: bytes) -> str:
        """Store ``data`` as a blob; returns its digest."""
        with self.writer() as w:
            w.write(data)
        return w.digest

    def copy_in(self, source: BinaryIO, expected: str) -> None:
        """Store what ``source`` holds as the blob ``expected``."""
        with self.writer(expected) as w:
            while data := source.read(_CHUNK):
                w.write(data)

    def digests(self) -> set[str]:
        with os.scandir(self._sha_dir) as it:
            return {"sha256:" + e.name for e in it if len(e.name) == 64}

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[bool]:
        """Hold the store alone meanwhile, if no import or commit holds it (:meth:`holding`): yields whether it
        does (False: someone holds it; do nothing that could take what they are about to name)."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Delete every blob not in ``keep`` and the temporary files of writes that have ended; returns the
        digests deleted. Call it only inside :meth:`exclusive` (when it yields True), ``keep`` computed there."""
        wanted = set(keep)
        gone = sorted(self.digests() - wanted)
        for digest in gone:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(digest))
        with os.scandir(self._tmp_dir) as it:
            for e in it:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)
        return gone

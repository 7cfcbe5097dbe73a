"""Reading a layer's byte stream once: the compressed stream hashed (the layer's digest), decompressed by
its magic bytes (gzip, zstd, or none), and the uncompressed stream hashed (its diff-id).

The reading, decompression and hashing run in a thread of their own, ahead of the reader by a few MiB at
most (see :class:`LayerStream`): they overlap with what the reader does with the bytes. Truncated or corrupt
compressed streams raise :class:`LayerError`. Decompression output is bounded per call
(gzip: by ``max_length``; zstd: by feeding small input chunks), so a highly compressed stream cannot make one
read hold more than a bounded amount of memory.
"""

from __future__ import annotations

import collections
import hashlib
import queue
import threading
import weakref
import zlib
from typing import Any, BinaryIO, Protocol

_gzip_lib: Any
try:  # ISA-L's inflate (python-isal): the same streams, decompressed 2-3x faster than by zlib
    from isal import isal_zlib as _gzip_lib  # type: ignore[import-not-found, no-redef, unused-ignore]
except ImportError:  # pragma: no cover (isal is a dependency; zlib does the same, slower)
    _gzip_lib = zlib
#: the gzip library in use, for reports: "isal" or "zlib"
GZIP_LIBRARY = "zlib" if _gzip_lib is zlib else "isal"

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_BZIP2_MAGIC = b"BZh"

#: bytes read from the source at a time; zstd input is fed in smaller pieces (see the module's docstring)
_CHUNK = 1 << 16
_ZSTD_FEED = 1 << 12
#: decompressed bytes handed to the reader at a time, and how many such pieces may wait for it
_BATCH = 1 << 20
_AHEAD = 4
#: seconds between two checks, by a reading thread waiting for its reader, that the stream is still wanted
_POLL = 0.1


class LayerError(ValueError):
    """A layer archive refused: hostile, corrupt or truncated. The message names the entry when there is one."""


class HashingSource:
    """The compressed stream as read from the caller's file: counted and hashed."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int) -> bytes:
        data = self._f.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data


class _Decoder(Protocol):
    def feed(self, data: bytes) -> bytes: ...
    def more(self) -> bytes: ...
    def at_end(self) -> bool: ...


class _GzipDecoder:
    """gzip members one after another (a multi-member file decompresses to their concatenation)."""

    def __init__(self) -> None:
        self._obj: Any = _gzip_lib.decompressobj(wbits=31)
        self._started = False

    def feed(self, data: bytes) -> bytes:
        if self._obj.eof:
            rest = self._obj.unused_data + data
            if not rest.strip(b"\0"):  # zero padding after the last member is tolerated
                return b""
            if not rest.startswith(GZIP_MAGIC[: len(rest)]):
                raise LayerError("corrupt gzip stream: garbage after a member")
            self._obj = _gzip_lib.decompressobj(wbits=31)
            data = rest
        self._started = self._started or bool(data)
        try:
            out: bytes = self._obj.decompress(data, _CHUNK)
        except _gzip_lib.error as exc:
            raise LayerError(f"corrupt gzip stream: {exc}") from None
        return out

    def more(self) -> bytes:
        """Output from input already given (b"" only when more input is needed)."""
        while True:
            if self._obj.eof:
                if not self._obj.unused_data.strip(b"\0"):
                    return b""
                out = self.feed(b"")  # the next member
            else:
                tail = self._obj.unconsumed_tail
                if not tail:
                    return b""
                try:
                    out = self._obj.decompress(tail, _CHUNK)
                except _gzip_lib.error as exc:
                    raise LayerError(f"corrupt gzip stream: {exc}") from None
            if out:
                return out

    def at_end(self) -> bool:
        return self._obj.eof and not self._obj.unused_data.strip(b"\0")


class _ZstdDecoder:
    """zstd frames one after another."""

    def __init__(self) -> None:
        import zstandard

        self._mod: Any = zstandard
        self._dctx = zstandard.ZstdDecompressor()
        self._obj: Any = self._dctx.decompressobj()
        #: input given and not yet decompressed: ``_pending[_at:]`` (an offset, not a slice per piece)
        self._pending = b""
        self._at = 0
        self._eof = False

    def feed(self, data: bytes) -> bytes:
        self._pending = self._pending[self._at :] + data if self._at < len(self._pending) else data
        self._at = 0
        return self.more()

    def more(self) -> bytes:
        """Output from input already given (b"" only when more input is needed)."""
        while self._at < len(self._pending):
            piece = self._pending[self._at : self._at + _ZSTD_FEED]
            self._at += len(piece)
            if self._eof:
                if not piece.startswith(ZSTD_MAGIC[: len(piece)]):
                    raise LayerError("corrupt zstd stream: garbage after a frame")
                self._obj = self._dctx.decompressobj()
                self._eof = False
            try:
                out: bytes = self._obj.decompress(piece)
            except self._mod.ZstdError as exc:
                raise LayerError(f"corrupt zstd stream: {exc}") from None
            if self._obj.eof:
                self._eof = True
                self._pending = self._obj.unused_data + self._pending[self._at :]
                self._at = 0
            if out:
                return out
        return b""

    def at_end(self) -> bool:
        return self._eof and self._at >= len(self._pending)


class _Plain:
    def feed(self, data: bytes) -> bytes:
        return data

    def more(self) -> bytes:
        return b""

    def at_end(self) -> bool:
        return True


class _Producer:
    """The reading side of a :class:`LayerStream`, run in a thread of its own: compressed bytes read from the
    source (hashed there, and teed when the source tees), decompressed, the output hashed (the diff-id) and
    handed over in batches of about :data:`_BATCH` bytes (lists of the decoder's pieces) through a queue of at
    most :data:`_AHEAD` batches.

    The thread holds no reference to its stream: when the stream is dropped unfinished (an apply that failed),
    :meth:`stop` is called by a finalizer and the thread ends at its next hand-over."""

    def __init__(self, source: HashingSource, dec: _Decoder, first: bytes, compression: str) -> None:
        self._src = source
        self._dec = dec
        self._first: bytes | None = first
        self._compression = compression
        self.sha = hashlib.sha256()
        self.queue: queue.Queue[list[bytes] | BaseException | None] = queue.Queue(_AHEAD)
        self._stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="layer-stream", daemon=True)

    def stop(self) -> None:
        self._stopped.set()

    def _put(self, item: list[bytes] | BaseException | None) -> bool:
        while not self._stopped.is_set():
            try:
                self.queue.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        # the pieces go over as they come out of the decoder (at most _CHUNK bytes each), never joined: no large
        # buffer is allocated (and page-faulted in) per piece handed over
        batch: list[bytes] = []
        size = 0
        try:
            raw_done = False
            while True:
                out = self._dec.more()
                if not out:
                    if raw_done:
                        break
                    if self._first is not None:
                        raw, self._first = self._first, None
                    else:
                        raw = self._src.read(_CHUNK)
                    if not raw:
                        raw_done = True
                        if not self._dec.at_end():
                            raise LayerError(f"truncated {self._compression} stream")
                        continue
                    out = self._dec.feed(raw)
                if out:
                    self.sha.update(out)
                    batch.append(out)
                    size += len(out)
                    if size >= _BATCH:
                        if not self._put(batch):
                            return
                        batch, size = [], 0
            if batch and not self._put(batch):
                return
            self._put(None)
        except BaseException as exc:  # handed to the reader, raised there
            if batch and not self._put(batch):
                return
            self._put(exc)


class LayerStream:
    """The uncompressed tar stream: ``read(n)`` as tarfile wants it, hashed as it is produced.

    The source is read, decompressed and hashed ahead of the reader in a thread of its own (zlib, zstd and
    sha256 let other threads run meanwhile, so this overlaps with the file system work of the reader), at
    most a few MiB ahead. The whole source is read, to its end, before :meth:`read` returns its last bytes;
    ``sha`` (the uncompressed stream's) is complete once :meth:`read` has returned b"" (or after
    :meth:`drain`). Errors of the source or its decompression are raised by :meth:`read` once the bytes
    before them have been handed out.

    The last two pieces handed out are kept, so that the caller can check the bytes at the offset where
    tarfile stopped (the end-of-archive marker) after the fact.
    """

    def __init__(self, source: HashingSource) -> None:
        first = source.read(_CHUNK)
        self.compression: str
        dec: _Decoder
        if first.startswith(GZIP_MAGIC):
            self.compression, dec = "gzip", _GzipDecoder()
        elif first.startswith(ZSTD_MAGIC):
            self.compression, dec = "zstd", _ZstdDecoder()
        elif first.startswith(_XZ_MAGIC) or first.startswith(_BZIP2_MAGIC):
            raise LayerError("unsupported layer compression (xz or bzip2); gzip, zstd and plain tar are read")
        else:
            self.compression, dec = "none", _Plain()
        #: pieces received and not yet handed out, the offset in the first one, the bytes they hold from there
        self._pieces: collections.deque[bytes] = collections.deque()
        self._off = 0
        self._avail = 0
        self._done = False
        self._error: BaseException | None = None
        self._producer = _Producer(source, dec, first, self.compression)
        self.sha = self._producer.sha
        self.count = 0
        self._kept: list[tuple[int, bytes]] = []
        self._finalizer = weakref.finalize(self, self._producer.stop)
        self._producer.thread.start()

    def _fill(self) -> bool:
        """Add decompressed bytes to the buffer; False at the end of the stream."""
        if self._error is not None:
            raise self._error
        if self._done:
            return False
        item = self._producer.queue.get()
        if item is None:
            self._done = True
            self._producer.thread.join()
            return False
        if isinstance(item, BaseException):
            self._error = item
            self._producer.thread.join()
            raise item
        self._pieces.extend(item)
        self._avail += sum(len(piece) for piece in item)
        return True

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            while self._fill():
                pass
            n = self._avail
        while self._avail < n and self._fill():
            pass
        n = min(n, self._avail)
        if not n:
            return b""
        first = self._pieces[0]
        if len(first) - self._off >= n:
            data = first if (self._off == 0 and len(first) == n) else first[self._off : self._off + n]
            self._off += n
            if self._off == len(first):
                self._pieces.popleft()
                self._off = 0
        else:
            parts = []
            need = n
            while need:
                first = self._pieces[0]
                take = min(need, len(first) - self._off)
                parts.append(first[self._off : self._off + take] if take < len(first) or self._off else first)
                need -= take
                self._off += take
                if self._off == len(first):
                    self._pieces.popleft()
                    self._off = 0
            data = b"".join(parts)
        self._avail -= n
        self._kept = [*self._kept[-1:], (self.count, data)]
        self.count += n
        return data

    def bytes_at(self, offset: int, n: int) -> bytes | None:
        """Up to ``n`` bytes of the stream from ``offset`` (reading on as needed), or None when ``offset`` is
        before what was kept."""
        if not self._kept:
            return b"" if offset >= self.count else None
        start = self._kept[0][0]
        if offset < start:
            return None
        held = b"".join(piece for _, piece in self._kept)
        while len(held) - (offset - start) < n:
            more = self.read(_CHUNK)
            if not more:
                break
            held += more
        return held[offset - start : offset - start + n]

    def drain(self) -> None:
        """Read (and hash) the rest of the stream, to its end."""
        while self.read(_CHUNK):
            pass
        self._kept = []

    def close(self) -> None:
        """Stop reading ahead (the stream is not read further); waits for the reading thread to end."""
        self._producer.stop()
        self._producer.thread.join()


def digest_hex(sha: Any) -> str:
    return "sha256:" + str(sha.hexdigest())

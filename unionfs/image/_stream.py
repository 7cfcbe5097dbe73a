"""Reading a layer's byte stream once: the compressed stream hashed (the layer's digest), decompressed by
its magic bytes (gzip, zstd, or none), and the uncompressed stream hashed (its diff-id).

Truncated or corrupt compressed streams raise :class:`LayerError`. Decompression output is bounded per call
(gzip: by ``max_length``; zstd: by feeding small input chunks), so a highly compressed stream cannot make one
read hold more than a bounded amount of memory.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any, BinaryIO, Protocol

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_BZIP2_MAGIC = b"BZh"

#: bytes read from the source at a time; zstd input is fed in smaller pieces (see the module's docstring)
_CHUNK = 1 << 16
_ZSTD_FEED = 1 << 12


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
        self._obj = zlib.decompressobj(wbits=31)
        self._started = False

    def feed(self, data: bytes) -> bytes:
        if self._obj.eof:
            rest = self._obj.unused_data + data
            if not rest.strip(b"\0"):  # zero padding after the last member is tolerated
                return b""
            if not rest.startswith(GZIP_MAGIC[: len(rest)]):
                raise LayerError("corrupt gzip stream: garbage after a member")
            self._obj = zlib.decompressobj(wbits=31)
            data = rest
        self._started = self._started or bool(data)
        try:
            return self._obj.decompress(data, _CHUNK)
        except zlib.error as exc:
            raise LayerError(f"corrupt gzip stream: {exc}") from None

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
                except zlib.error as exc:
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
        self._pending = b""
        self._eof = False

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        return self.more()

    def more(self) -> bytes:
        """Output from input already given (b"" only when more input is needed)."""
        while self._pending:
            piece, self._pending = self._pending[:_ZSTD_FEED], self._pending[_ZSTD_FEED:]
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
                self._pending = self._obj.unused_data + self._pending
            if out:
                return out
        return b""

    def at_end(self) -> bool:
        return self._eof and not self._pending


class _Plain:
    def feed(self, data: bytes) -> bytes:
        return data

    def more(self) -> bytes:
        return b""

    def at_end(self) -> bool:
        return True


class LayerStream:
    """The uncompressed tar stream: ``read(n)`` as tarfile wants it, hashed as it is handed out.

    The last two pieces handed out are kept, so that the caller can check the bytes at the offset where
    tarfile stopped (the end-of-archive marker) after the fact.
    """

    def __init__(self, source: HashingSource) -> None:
        self._src = source
        first = source.read(_CHUNK)
        self.compression: str
        self._dec: _Decoder
        if first.startswith(GZIP_MAGIC):
            self.compression, self._dec = "gzip", _GzipDecoder()
        elif first.startswith(ZSTD_MAGIC):
            self.compression, self._dec = "zstd", _ZstdDecoder()
        elif first.startswith(_XZ_MAGIC) or first.startswith(_BZIP2_MAGIC):
            raise LayerError("unsupported layer compression (xz or bzip2); gzip, zstd and plain tar are read")
        else:
            self.compression, self._dec = "none", _Plain()
        self._buf = bytearray()
        self._raw_done = False
        self._pending_first: bytes | None = first
        self.sha = hashlib.sha256()
        self.count = 0
        self._kept: list[tuple[int, bytes]] = []

    def _fill(self) -> bool:
        """Add decompressed bytes to the buffer; False at the end of the stream."""
        while True:
            out = self._dec.more()
            if out:
                self._buf += out
                return True
            if self._raw_done:
                return False
            if self._pending_first is not None:
                raw, self._pending_first = self._pending_first, None
            else:
                raw = self._src.read(_CHUNK)
            if not raw:
                self._raw_done = True
                if not self._dec.at_end():
                    raise LayerError(f"truncated {self.compression} stream")
                return False
            out = self._dec.feed(raw)
            if out:
                self._buf += out
                return True

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            while self._fill():
                pass
            n = len(self._buf)
        while len(self._buf) < n and self._fill():
            pass
        data = bytes(self._buf[:n])
        del self._buf[:n]
        if data:
            self.sha.update(data)
            self._kept = [*self._kept[-1:], (self.count, data)]
            self.count += len(data)
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


def digest_hex(sha: Any) -> str:
    return "sha256:" + str(sha.hexdigest())

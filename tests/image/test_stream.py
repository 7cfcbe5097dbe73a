"""unionfs.image._stream.LayerStream: the bytes, their digests and the errors as a reader sees them, with the source
read and decompressed ahead in a thread of its own (bounded, stopped when the stream is dropped)."""

from __future__ import annotations

import gc
import gzip
import hashlib
import io
import tarfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest
import zstandard
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from unionfs.image import _stream, apply_layer
from unionfs.image._stream import HashingSource, LayerError, LayerStream
from unionfs.whiteout import XattrFormat


def _compress(data: bytes, how: str, members: int) -> bytes:
    if how == "none":
        return data
    cut = [len(data) * i // members for i in range(members + 1)]
    parts = [data[a:b] for a, b in zip(cut, cut[1:], strict=False)]
    if how == "gzip":
        return b"".join(gzip.compress(p, compresslevel=1, mtime=0) for p in parts)
    return b"".join(zstandard.ZstdCompressor().compress(p) for p in parts)


def _threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "layer-stream")


def _wait_threads(at_most: int) -> int:
    deadline = time.monotonic() + 5
    while _threads() > at_most and time.monotonic() < deadline:
        time.sleep(0.02)
    return _threads()


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(max_size=200_000)
    | st.builds(lambda n, b: b * n, st.integers(0, 3_000_000), st.binary(min_size=1, max_size=3)),
    how=st.sampled_from(["none", "gzip", "zstd"]),
    members=st.integers(1, 3),
    sizes=st.lists(st.integers(1, 300_000), min_size=1, max_size=8),
)
def test_bytes_and_digests(data: bytes, how: str, members: int, sizes: list[int]) -> None:
    """Whatever the read sizes, the reader gets the uncompressed bytes in order, and both digests and counts
    are those of the two streams."""
    blob = _compress(data, how, members)
    magics = (_stream.GZIP_MAGIC, _stream.ZSTD_MAGIC, _stream._XZ_MAGIC, _stream._BZIP2_MAGIC)
    assume(how != "none" or not blob.startswith(magics))  # plain data that looks compressed is taken as such
    raw = HashingSource(io.BytesIO(blob))
    stream = LayerStream(raw)
    assert stream.compression == how or (how == "none" and not data)
    got = bytearray()
    i = 0
    while True:
        piece = stream.read(sizes[i % len(sizes)])
        i += 1
        if not piece:
            break
        assert len(piece) <= sizes[(i - 1) % len(sizes)]
        got += piece
    assert bytes(got) == data
    assert stream.count == len(data)
    assert stream.sha.hexdigest() == hashlib.sha256(data).hexdigest()
    assert raw.count == len(blob)
    assert raw.sha.hexdigest() == hashlib.sha256(blob).hexdigest()
    assert stream.read(10) == b""


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_truncated_stream_raises_after_its_bytes(how: str) -> None:
    data = bytes(range(256)) * 20_000
    blob = _compress(data, how, 1)
    stream = LayerStream(HashingSource(io.BytesIO(blob[: len(blob) * 2 // 3])))
    got = bytearray()
    with pytest.raises(LayerError, match=f"truncated {how} stream"):
        while piece := stream.read(1 << 16):
            got += piece
    assert got and data.startswith(bytes(got))
    with pytest.raises(LayerError):  # and again: the stream never ends as if complete
        for _ in range(1000):
            got += stream.read(1 << 10)
    assert data.startswith(bytes(got)) and len(got) < len(data)


def test_corrupt_gzip_raises() -> None:
    blob = bytearray(gzip.compress(bytes(range(256)) * 4000, mtime=0))
    blob[len(blob) // 2] ^= 0xFF
    stream = LayerStream(HashingSource(io.BytesIO(bytes(blob))))
    with pytest.raises(LayerError, match="corrupt gzip stream"):
        while stream.read(1 << 16):
            pass


def test_source_error_reaches_the_reader() -> None:
    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            self.n = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            self.n += 1
            if self.n > 3:
                raise OSError(5, "I/O error")
            b[:] = b"x" * len(b)
            return len(b)

    stream = LayerStream(HashingSource(cast(BinaryIO, io.BufferedReader(cast(Any, Failing()), 1 << 16))))
    with pytest.raises(OSError, match="I/O error"):
        while stream.read(1 << 16):
            pass


class Endless(io.RawIOBase):
    """Zeros without end (a gzip bomb's worth), counting what was read."""

    def __init__(self) -> None:
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        b[:] = bytes(len(b))
        self.count += len(b)
        return len(b)


def test_read_ahead_is_bounded_and_stops_when_dropped() -> None:
    before = _wait_threads(0)
    src = Endless()
    stream = LayerStream(HashingSource(src))  # type: ignore[arg-type]
    assert stream.read(1) == b"\0"
    time.sleep(0.3)
    assert src.count <= (_stream._AHEAD + 3) * _stream._BATCH
    assert _threads() == before + 1
    del stream
    gc.collect()
    assert _wait_threads(before) == before
    reached = src.count
    time.sleep(0.3)
    assert src.count == reached  # no reading after the stream is gone


def test_gzip_bomb_read_ahead_is_bounded() -> None:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = comp.compress(bytes(64 << 20)) + comp.flush()
    raw = HashingSource(io.BytesIO(bomb))
    stream = LayerStream(raw)
    assert stream.read(10) == bytes(10)
    time.sleep(0.3)
    # 64 MiB of zeros are about 64 KiB compressed: the bound on decompressed bytes shows as a bound on input
    assert raw.count < len(bomb) * ((_stream._AHEAD + 3) * _stream._BATCH) // (64 << 20) + (1 << 17)
    stream.close()
    assert _wait_threads(0) == 0


def test_close_stops_the_thread() -> None:
    before = _wait_threads(0)
    stream = LayerStream(HashingSource(Endless()))  # type: ignore[arg-type]
    stream.read(100)
    stream.close()
    assert _threads() == before


def test_refused_layer_leaves_no_reader_running(tmp_path: Path) -> None:
    """apply_layer stops the reading thread before it raises: the caller may close the source at once."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        evil = tarfile.TarInfo("../escape")
        evil.size = 0
        tf.addfile(evil, io.BytesIO(b""))
        big = tarfile.TarInfo("big")
        payload = bytes(range(256)) * (48 << 12)  # 12 MiB: much more than the reader may read ahead
        big.size = len(payload)
        tf.addfile(big, io.BytesIO(payload))
    blob = gzip.compress(buf.getvalue(), compresslevel=1)
    before = _wait_threads(0)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(LayerError, match="escapes the root") as info:
        apply_layer(io.BytesIO(blob), bytes(root), fmt=XattrFormat.USER, rootless=True)
    assert info.traceback  # the traceback (and the stream in its frames) is still alive here
    assert _threads() == before

"""Splitstream reader and writer, byte-identical to composefs-rs (docs/splitstream.md).

A splitstream is a stored object: a 32-byte header, an 80-byte info section, the stream and
object reference arrays (uncompressed), the named refs (one zstd frame) and the stream of
inline/external chunks (one zstd frame).  The zstd bytes are part of every digest, so they are
produced exactly as libzstd's streaming API at level 3 produces them (3.8).

Memory stays flat: long inline runs and the compressed stream spill to temporary files in the
repository; the reader decompresses incrementally.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING

import zstandard

from cfsd.core.errors import FormatError
from cfsd.core.fsverity import Algorithm

if TYPE_CHECKING:
    from cfsd.core.objects import ObjectStore
    from cfsd.core.repository import Repository

MAGIC = b"SplitStream"
HEADER = struct.Struct("<11sBHBBQQ")
OLD_HEADER = struct.Struct("<QQH11sBBB")
INFO = struct.Struct("<QQQQQQQQQQ")
INFO_SIZE = INFO.size  # 80

TAR_LAYER = int.from_bytes(b"ocilayer", "little")
OCI_CONFIG = int.from_bytes(b"ociconfg", "little")
OCI_MANIFEST = int.from_bytes(b"ocimanif", "little")
OCI_BLOB = int.from_bytes(b"oci_blob", "little")

SPILL = 4 << 20          # spool in memory up to this many bytes
CHUNK = 1 << 20          # inline data is yielded in pieces of at most this size
MAX_NAMED_REFS = 64 << 20


def zstd_stream(chunks: list[bytes]) -> bytes:
    """One zstd frame exactly as libzstd's streaming API at level 3 writes it."""
    c = zstandard.ZstdCompressor(level=3).compressobj()
    return b"".join([c.compress(x) for x in chunks]) + c.flush()


class _Spool:
    """Bytes in memory up to SPILL, then in an anonymous temporary file."""

    def __init__(self, tmpdir: str | None) -> None:
        self._buf = bytearray()
        self._file: IO[bytes] | None = None
        self._tmpdir = tmpdir
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self._file is None:
            self._buf += data
            if len(self._buf) > SPILL:
                self._file = tempfile.TemporaryFile(dir=self._tmpdir)
                self._file.write(self._buf)
                self._buf = bytearray()
        else:
            self._file.write(data)

    def chunks(self) -> Iterator[bytes | bytearray]:
        """The spooled bytes, in order, in bounded pieces."""
        if self._file is None:
            if self._buf:
                yield self._buf
            return
        self._file.seek(0)
        while piece := self._file.read(CHUNK):
            yield piece

    def reset(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._buf = bytearray()
        self.size = 0


class _UniqueList:
    """Insertion-ordered unique list of digests (index = first insertion)."""

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self._index: dict[bytes, int] = {}

    def ensure(self, item: bytes) -> int:
        idx = self._index.get(item)
        if idx is None:
            idx = self._index[item] = len(self.items)
            self.items.append(item)
        return idx


class SplitStreamWriter:
    """Build a splitstream; done() stores it as an object and returns its verity."""

    def __init__(self, repo: Repository, content_type: int,
                 store: ObjectStore | None = None) -> None:
        self.repo = repo
        self.store: ObjectStore = store if store is not None else repo
        self.content_type = content_type
        self.stream_size = 0
        self._tmpdir = f"/proc/self/fd/{repo.writable_objects_fd}"
        self._inline = _Spool(self._tmpdir)
        self._compressed = _Spool(self._tmpdir)
        self._cctx = zstandard.ZstdCompressor(level=3).compressobj()
        self.object_refs = _UniqueList()
        self.stream_refs = _UniqueList()
        self.named_refs: dict[str, int] = {}
        self.external_bytes = 0
        self.inline_bytes = 0
        self.new_objects = 0
        self.present_objects = 0
        self.new_bytes = 0

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        out = self._cctx.compress(data)
        if out:
            self._compressed.write(out)

    def write_inline(self, data: bytes | bytearray | memoryview) -> None:
        """Append inline bytes (coalesced with adjacent inline writes)."""
        if data:
            self.stream_size += len(data)
            self.inline_bytes += len(data)
            self._inline.write(data)

    def _flush_inline(self) -> None:
        if self._inline.size:
            self._emit(struct.pack("<q", -self._inline.size))
            for piece in self._inline.chunks():
                self._emit(piece)
            self._inline.reset()

    def add_external(self, digest: bytes, size: int, *, new: bool | None = None) -> None:
        """Reference an object already stored in the repository."""
        self.stream_size += size
        self.external_bytes += size
        if new is not None:
            if new:
                self.new_objects += 1
                self.new_bytes += size
            else:
                self.present_objects += 1
        self._flush_inline()
        self._emit(struct.pack("<q", self.object_refs.ensure(digest)))

    def write_external(self, data: bytes | memoryview) -> bytes:
        """Store *data* as an object and reference it."""
        res = self.store.store_object(data)
        self.add_external(res.digest, len(data), new=res.new)
        return res.digest

    def add_named_stream_ref(self, name: str, digest: bytes) -> None:
        """Record ``name -> stream verity`` (re-adding a name overwrites it)."""
        self.named_refs[name] = self.stream_refs.ensure(digest)

    def done(self) -> bytes:
        """Assemble the file, store it as an object and return its fs-verity digest."""
        self._flush_inline()
        tail = self._cctx.flush()
        if tail:
            self._compressed.write(tail)
        names = sorted(self.named_refs, key=lambda n: n.encode())
        named = zstd_stream([f"{self.named_refs[n]}:{n}\0".encode() for n in names])
        stream_refs = b"".join(self.stream_refs.items)
        object_refs = b"".join(self.object_refs.items)
        a = HEADER.size + INFO_SIZE
        b = a + len(stream_refs)
        c = b + len(object_refs)
        d = c + len(named)
        e = d + self._compressed.size
        head = HEADER.pack(MAGIC, 0, 0, self.repo.alg.kernel_id, 12, HEADER.size, a)
        info = INFO.pack(a, b, b, c, d, e, c, d, self.content_type, self.stream_size)
        w = self.store.object_writer()
        try:
            w.write(head + info + stream_refs + object_refs + named)
            for piece in self._compressed.chunks():
                w.write(piece)
            self._compressed.reset()
            return w.finish().digest
        finally:
            w.abort()


class RangeReader:
    """A raw, read-only file object over ``[start, start+size)`` of an fd it does not own."""

    def __init__(self, fd: int, start: int, size: int,
                 on_close: Callable[[], None] | None = None) -> None:
        self.fd, self.pos, self.end = fd, start, start + size
        self._on_close = on_close

    def read(self, n: int = -1, /) -> bytes:
        """Up to *n* bytes (b"" at the end of the range)."""
        if n < 0 or n > self.end - self.pos:
            n = self.end - self.pos
        if n <= 0:
            return b""
        data = os.pread(self.fd, min(n, 4 << 20), self.pos)
        if not data:
            raise FormatError("file truncated")
        self.pos += len(data)
        return data

    def readable(self) -> bool:
        """File-object protocol."""
        return True

    def close(self) -> None:
        """Run the close callback once (e.g. to close an fd owned elsewhere)."""
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


class SplitStreamReader:
    """Parse a stored splitstream (owns *fd*; use as a context manager or call close())."""

    def __init__(self, fd: int, alg: Algorithm, expected_content_type: int | None = None,
                 *, digest: bytes | None = None) -> None:
        self.fd = fd
        self.digest = digest
        try:
            self._parse(alg, expected_content_type)
        except BaseException:
            self.close()
            raise

    def _parse(self, alg: Algorithm, expected: int | None) -> None:
        size = os.fstat(self.fd).st_size
        raw = os.pread(self.fd, HEADER.size, 0)
        if len(raw) < HEADER.size:
            raise FormatError("splitstream too short")
        if raw[:11] == MAGIC:
            _, version, _flags, alg_id, lg, istart, iend = HEADER.unpack(raw)
        elif raw[18:29] == MAGIC:
            istart, iend, _flags, _, version, alg_id, lg = OLD_HEADER.unpack(raw)
        else:
            raise FormatError("not a splitstream (bad magic)")
        if version != 0:
            raise FormatError(f"unsupported splitstream version {version}")
        if alg_id != alg.kernel_id:
            raise FormatError(f"splitstream hash algorithm {alg_id} does not match the repository")
        if lg != 12:
            raise FormatError(f"unsupported splitstream block size 2^{lg}")

        def rng(start: int, end: int, what: str) -> tuple[int, int]:
            if not (0 <= start <= end <= size):
                raise FormatError(f"splitstream {what} range {start}..{end} out of bounds")
            return start, end

        istart, iend = rng(istart, iend, "info")
        if iend - istart < INFO_SIZE:
            raise FormatError("splitstream info section too short")
        info = INFO.unpack(os.pread(self.fd, INFO_SIZE, istart))
        sr = rng(info[0], info[1], "stream_refs")
        orr = rng(info[2], info[3], "object_refs")
        self._stream_range = rng(info[4], info[5], "stream")
        nr = rng(info[6], info[7], "named_refs")
        self.content_type = info[8]
        self.stream_size = info[9]
        if expected is not None and self.content_type != expected:
            raise FormatError(
                f"splitstream has content type {self.content_type:#x}, expected {expected:#x}")
        hs = alg.size
        self.stream_refs = self._refs(sr, hs, "stream_refs")
        self.object_refs = self._refs(orr, hs, "object_refs")
        self.named_refs: dict[str, bytes] = {}
        if nr[1] > nr[0]:
            data = _decompress_all(RangeReader(self.fd, nr[0], nr[1] - nr[0]), MAX_NAMED_REFS)
            records = data.split(b"\0")
            if records[-1]:
                raise FormatError("splitstream named refs: trailing junk")
            for rec in records[:-1]:
                idx, sep, name = rec.partition(b":")
                if not sep or not idx.isdigit():
                    raise FormatError("splitstream named refs: malformed record")
                i = int(idx)
                if i >= len(self.stream_refs):
                    raise FormatError("splitstream named ref index out of range")
                try:
                    self.named_refs[name.decode()] = self.stream_refs[i]
                except UnicodeDecodeError:
                    raise FormatError("splitstream named ref is not UTF-8") from None

    def _refs(self, r: tuple[int, int], hs: int, what: str) -> list[bytes]:
        n = r[1] - r[0]
        if n % hs:
            raise FormatError(f"splitstream {what} length is not a multiple of {hs}")
        if n > 256 << 20:
            raise FormatError(f"splitstream {what} too large")
        data = os.pread(self.fd, n, r[0])
        if len(data) != n:
            raise FormatError("splitstream truncated")
        return [data[i:i + hs] for i in range(0, n, hs)]

    def chunks(self) -> Iterator[tuple[bool, bytes]]:
        """Yield ``(False, inline_bytes)`` pieces and ``(True, object_digest)`` references."""
        dctx = zstandard.ZstdDecompressor()
        start, end = self._stream_range
        src = dctx.stream_reader(RangeReader(self.fd, start, end - start),
                                 read_across_frames=True)
        try:
            while True:
                head = _read_exact(src, 8, eof_ok=True)
                if head is None:
                    return
                (n,) = struct.unpack("<q", head)
                if n < 0:
                    remaining = -n
                    while remaining:
                        piece = _read_exact(src, min(remaining, CHUNK))
                        assert piece is not None
                        remaining -= len(piece)
                        yield False, piece
                else:
                    if n >= len(self.object_refs):
                        raise FormatError(f"splitstream references object {n} of "
                                          f"{len(self.object_refs)}")
                    yield True, self.object_refs[n]
        except zstandard.ZstdError as e:
            raise FormatError(f"splitstream data is corrupt: {e}") from None

    def cat(self, repo: Repository, write: Callable[[bytes | memoryview], None]) -> int:
        """Hand the reassembled stream to *write* (objects checked against their names
        where the kernel does not enforce fs-verity); returns the number of bytes."""
        total = 0
        for external, data in self.chunks():
            if not external:
                write(data)
                total += len(data)
                continue
            total += repo.copy_object(data, write)
        return total

    def close(self) -> None:
        """Close the underlying fd."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SplitStreamReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_exact(src: zstandard.ZstdDecompressionReader, n: int,
                eof_ok: bool = False) -> bytes | None:
    parts: list[bytes] = []
    got = 0
    while got < n:
        piece = src.read(n - got)
        if not piece:
            if eof_ok and got == 0:
                return None
            raise FormatError("splitstream chunk truncated")
        parts.append(piece)
        got += len(piece)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _decompress_all(src: RangeReader, limit: int) -> bytes:
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
        while piece := reader.read(CHUNK):
            out += piece
            if len(out) > limit:
                raise FormatError("splitstream section decompresses too large")
    except zstandard.ZstdError as e:
        raise FormatError(f"splitstream data is corrupt: {e}") from None
    return bytes(out)

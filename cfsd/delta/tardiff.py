"""tar-diff (``application/vnd.tar-diff``) v1/v2: format constants and a streaming applier.

Format (docs/delta.md): an 8-byte header ``tardf1\\n\\0`` (v1) or ``tardf2\\n\\0`` (v2), then one
zstd stream (possibly several frames) holding ops.  Each op is ``u8 opcode``, an unsigned LEB128
``size`` and, for DATA/OPEN/ADD_DATA/ZSTD_DICT, ``size`` payload bytes:

====  ==========  =============================================================================
code  name        semantics
====  ==========  =============================================================================
0     DATA        write the payload
1     OPEN        payload = canonical relative path; it becomes the current source, position 0
2     COPY        copy ``size`` bytes of the source at the position; position += size
3     ADD_DATA    output ``payload[i] + source[i]`` (mod 256) over ``size`` source bytes
4     SEEK        position = ``size`` (absolute)
5     ZSTD_DICT   (v2) payload = one zstd frame; dictionary = whole source (raw content);
                  write the decoded frame; position = source size
====  ==========  =============================================================================

API::

    apply_tardiff(delta, source, out, *, max_output=None) -> int

``delta`` has ``read(n)``; ``source`` implements :class:`SourceResolver` (``open_source(name)``
returns a new readable, seekable binary file for a validated name, which the applier owns and
closes; missing or non-regular files raise :class:`SourceFileError`, and ``OSError`` /
``LookupError`` from the resolver are converted to it); ``out`` has ``write(b)``.  The result is
the number of bytes written.  The delta is decompressed incrementally, ops are read
incrementally and output is written as it is produced, so memory stays bounded (the v2
dictionary, at most 512 MiB, excepted).  Every malformed or hostile input raises
:class:`TarDiffError`.  Partial output may have been written when it is raised: callers write to
a temporary file and check the result's digest before publishing it.

cfsd rules beyond upstream (docs/delta.md): OPEN names must already be canonical (UTF-8,
non-empty, relative, no ``.``, ``..`` or empty components, no NUL, at most 4096 bytes); sizes of
2**63 or more are rejected; SEEK past the end of the source is rejected; ops that produce no
output are limited to 2**20 plus the number of bytes written, and dictionary loading to 1 GiB
plus 64 times the bytes written, so that a small hostile delta cannot keep the applier busy.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Protocol

import zstandard

from cfsd.core.errors import FormatError
from cfsd.delta.zstdframe import FrameWalker, Reader, WalkedReader, ZstdFrameError

HEADER_V1 = b"tardf1\n\0"
HEADER_V2 = b"tardf2\n\0"

OP_DATA = 0
OP_OPEN = 1
OP_COPY = 2
OP_ADD_DATA = 3
OP_SEEK = 4
OP_ZSTD_DICT = 5
OP_NAMES = {OP_DATA: "DATA", OP_OPEN: "OPEN", OP_COPY: "COPY", OP_ADD_DATA: "ADD_DATA",
            OP_SEEK: "SEEK", OP_ZSTD_DICT: "ZSTD_DICT"}

MAX_NAME = 4096
MAX_ADD_DATA = 100 * 1024 * 1024
MAX_WINDOW_LOG = 29
MAX_DICT = 1 << MAX_WINDOW_LOG
MAX_SIZE = (1 << 63) - 1
IDLE_OPS_ALLOWANCE = 1 << 20
DICT_BYTES_ALLOWANCE = 1 << 30
DICT_BYTES_PER_OUTPUT = 64
CHUNK = 1 << 20


class TarDiffError(FormatError):
    """A tar-diff is malformed, violates a limit, or cannot be applied to its source."""


class SourceFileError(TarDiffError):
    """An OPEN name does not resolve to a readable regular file of the source image."""


class SourceFile(Protocol):
    """A readable, seekable binary file (what :class:`SourceResolver` returns)."""

    def read(self, n: int = ..., /) -> bytes: ...

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def close(self) -> None: ...


class SourceResolver(Protocol):
    """Resolves validated OPEN names against the source image (the merged old rootfs)."""

    def open_source(self, name: str) -> SourceFile:
        """A new file object for regular file *name*; raise SourceFileError if there is none."""
        ...


class Writer(Protocol):
    """Anything with ``write(b)``."""

    def write(self, b: bytes, /) -> object: ...


class MappingSource:
    """A :class:`SourceResolver` over an in-memory ``{name: content}`` mapping."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        self._files = files

    def open_source(self, name: str) -> SourceFile:
        """A BytesIO over the named content."""
        try:
            return io.BytesIO(self._files[name])
        except KeyError:
            raise SourceFileError(f"source file not found: {name!r}") from None


# ---------------------------------------------------------------------------------------------
# uvarint

def encode_uvarint(value: int) -> bytes:
    """Unsigned LEB128 encoding of 0 <= value < 2**64."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"uvarint out of range: {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _uvarint(next_byte: Callable[[], int | None]) -> int:
    """Go ``binary.Uvarint`` rules: at most 10 bytes, the 10th at most 1; EOF is an error."""
    value = 0
    for i in range(10):
        b = next_byte()
        if b is None:
            raise TarDiffError("truncated uvarint")
        if b < 0x80:
            if i == 9 and b > 1:
                raise TarDiffError("uvarint overflows 64 bits")
            return value | (b << (7 * i))
        value |= (b & 0x7F) << (7 * i)
    raise TarDiffError("uvarint overflows 64 bits (more than 10 bytes)")


def decode_uvarint(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """Decode one uvarint at *offset*: ``(value, offset after it)``; TarDiffError if invalid."""
    pos = offset

    def nxt() -> int | None:
        nonlocal pos
        if pos >= len(data):
            return None
        pos += 1
        return data[pos - 1]

    value = _uvarint(nxt)
    return value, pos


# ---------------------------------------------------------------------------------------------
# names

def validate_source_name(raw: bytes) -> str:
    """The OPEN payload as a canonical relative path, or TarDiffError (docs/delta.md, cfsd)."""
    if len(raw) > MAX_NAME:
        raise TarDiffError(f"OPEN name of {len(raw)} bytes exceeds the limit of {MAX_NAME}")
    if not raw:
        raise TarDiffError("OPEN with an empty source name")
    if b"\0" in raw:
        raise TarDiffError("OPEN source name contains NUL")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TarDiffError(f"OPEN source name is not UTF-8: {raw!r}") from None
    if name.startswith("/"):
        raise TarDiffError(f"OPEN source name is absolute: {name!r}")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise TarDiffError(f"OPEN source name is not canonical: {name!r}")
    return name


def is_canonical_name(name: str) -> bool:
    """Whether *name* would pass :func:`validate_source_name`."""
    try:
        validate_source_name(name.encode("utf-8"))
    except (TarDiffError, UnicodeEncodeError):
        return False
    return True


def _zstd_read(reader: Reader, n: int) -> bytes:
    try:
        return reader.read(n)
    except (zstandard.ZstdError, ZstdFrameError) as e:
        raise TarDiffError(f"corrupt zstd data in tar-diff: {e}") from None


# ---------------------------------------------------------------------------------------------
# the op stream

class _OpStream:
    """Buffered reads over the decompressed op stream."""

    def __init__(self, delta: Reader) -> None:
        self._walker = FrameWalker()
        self._raw = WalkedReader(delta, self._walker)
        self._zr = zstandard.ZstdDecompressor().stream_reader(
            self._raw, read_size=1 << 17, read_across_frames=True, closefd=False)
        self._buf = b""
        self._pos = 0
        self._eof = False

    def _fill(self) -> bool:
        if self._eof:
            return False
        data = _zstd_read(self._zr, CHUNK)
        if not data:
            self._eof = True
            if _zstd_read(self._raw, 1) or not self._walker.at_boundary:
                raise TarDiffError("truncated or corrupt zstd stream in tar-diff")
            return False
        self._buf, self._pos = data, 0
        return True

    def next_byte(self) -> int | None:
        """One byte, or None at the end of the stream."""
        if self._pos >= len(self._buf) and not self._fill():
            return None
        self._pos += 1
        return self._buf[self._pos - 1]

    def read_some(self, n: int) -> bytes:
        """Up to *n* (> 0) bytes; empty only at the end of the stream."""
        if self._pos >= len(self._buf) and not self._fill():
            return b""
        chunk = self._buf[self._pos:self._pos + n]
        self._pos += len(chunk)
        return chunk

    def read_exact(self, n: int, what: str) -> bytes:
        """Exactly *n* bytes (n bounded by the caller)."""
        parts: list[bytes] = []
        left = n
        while left:
            chunk = self.read_some(min(left, CHUNK))
            if not chunk:
                raise TarDiffError(f"truncated {what} payload ({n - left} of {n} bytes)")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)


class _PayloadReader:
    """The ``size``-byte payload of one op as a reader (used for ZSTD_DICT frames)."""

    def __init__(self, ops: _OpStream, size: int) -> None:
        self._ops = ops
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = CHUNK
        if not self.left or not n:
            return b""
        chunk = self._ops.read_some(min(n, self.left, CHUNK))
        if not chunk:
            raise TarDiffError("truncated ZSTD_DICT payload")
        self.left -= len(chunk)
        return chunk


_M7: dict[int, tuple[int, int]] = {}


def add_bytes(a: bytes, b: bytes) -> bytes:
    """Bytewise ``(a[i] + b[i]) mod 256`` of two equal-length strings (SWAR on big ints)."""
    n = len(a)
    masks = _M7.get(n)
    if masks is None:
        masks = (int.from_bytes(b"\x7f" * n, "little"), int.from_bytes(b"\x80" * n, "little"))
        if len(_M7) > 8:
            _M7.clear()
        _M7[n] = masks
    low, high = masks
    x = int.from_bytes(a, "little")
    y = int.from_bytes(b, "little")
    return (((x & low) + (y & low)) ^ ((x ^ y) & high)).to_bytes(n, "little")


class _Applier:
    """State of one application: current source, position, counters and limits."""

    def __init__(self, ops: _OpStream, source: SourceResolver, out: Writer, v2: bool,
                 max_output: int | None) -> None:
        self.ops = ops
        self.source = source
        self.out = out
        self.v2 = v2
        self.max_output = max_output
        self.written = 0
        self.idle_ops = 0
        self.dict_bytes = 0
        self.file: SourceFile | None = None
        self.name = ""
        self.size = 0
        self.pos = 0

    # -- output and source helpers --

    def _reserve(self, n: int) -> None:
        if self.max_output is not None and self.written + n > self.max_output:
            raise TarDiffError(f"tar-diff output exceeds the limit of {self.max_output} bytes")

    def _emit(self, data: bytes) -> None:
        self._reserve(len(data))
        self.out.write(data)
        self.written += len(data)

    def _current(self, op: str) -> SourceFile:
        if self.file is None:
            raise TarDiffError(f"{op}: no current file set in data source")
        return self.file

    def _source_range(self, op: str, n: int) -> SourceFile:
        f = self._current(op)
        if n > self.size - self.pos:
            raise TarDiffError(f"{op} of {n} bytes at offset {self.pos} reads past the end of "
                               f"source {self.name!r} ({self.size} bytes)")
        return f

    def _read_source(self, f: SourceFile, n: int) -> bytes:
        data = f.read(n)
        while len(data) < n:
            more = f.read(n - len(data))
            if not more:
                raise TarDiffError(f"short read from source {self.name!r}")
            data += more
        self.pos += n
        return data

    def close(self) -> None:
        """Close the current source file."""
        if self.file is not None:
            f, self.file = self.file, None
            f.close()

    # -- ops --

    def run(self) -> int:
        ops = self.ops
        while True:
            op = ops.next_byte()
            if op is None:
                return self.written
            size = _uvarint(ops.next_byte)
            if size > MAX_SIZE:
                raise TarDiffError(f"op size {size} is too large")
            before = self.written
            if op == OP_DATA:
                self._data(size)
            elif op == OP_OPEN:
                self._open(size)
            elif op == OP_COPY:
                self._copy(size)
            elif op == OP_ADD_DATA:
                self._add(size)
            elif op == OP_SEEK:
                self._seek(size)
            elif op == OP_ZSTD_DICT:
                self._zstd_dict(size)
            else:
                raise TarDiffError(f"unexpected tar-diff op {op}")
            if self.written == before:
                self.idle_ops += 1
                if self.idle_ops > IDLE_OPS_ALLOWANCE + self.written:
                    raise TarDiffError("too many tar-diff ops that produce no output")

    def _data(self, size: int) -> None:
        self._reserve(size)
        left = size
        while left:
            chunk = self.ops.read_some(min(left, CHUNK))
            if not chunk:
                raise TarDiffError(f"truncated DATA payload ({size - left} of {size} bytes)")
            self._emit(chunk)
            left -= len(chunk)

    def _open(self, size: int) -> None:
        if size > MAX_NAME:
            raise TarDiffError(f"OPEN name of {size} bytes exceeds the limit of {MAX_NAME}")
        name = validate_source_name(self.ops.read_exact(size, "OPEN"))
        self.close()
        try:
            f = self.source.open_source(name)
        except TarDiffError:
            raise
        except (OSError, LookupError) as e:
            raise SourceFileError(f"cannot open source file {name!r}: {e}") from None
        try:
            self.size = f.seek(0, io.SEEK_END)
            f.seek(0)
        except (OSError, ValueError) as e:
            f.close()
            raise SourceFileError(f"source file {name!r} is not seekable: {e}") from None
        self.file, self.name, self.pos = f, name, 0

    def _copy(self, size: int) -> None:
        f = self._source_range("COPY", size)
        self._reserve(size)
        left = size
        while left:
            n = min(left, CHUNK)
            self._emit(self._read_source(f, n))
            left -= n

    def _add(self, size: int) -> None:
        if size > MAX_ADD_DATA:
            raise TarDiffError(f"ADD_DATA of {size} bytes exceeds the limit of {MAX_ADD_DATA}")
        f = self._source_range("ADD_DATA", size)
        self._reserve(size)
        left = size
        while left:
            delta = self.ops.read_some(min(left, CHUNK))
            if not delta:
                raise TarDiffError(f"truncated ADD_DATA payload ({size - left} of {size} bytes)")
            self._emit(add_bytes(delta, self._read_source(f, len(delta))))
            left -= len(delta)

    def _seek(self, size: int) -> None:
        f = self._current("SEEK")
        if size > self.size:
            raise TarDiffError(f"SEEK to {size} is past the end of source {self.name!r} "
                               f"({self.size} bytes)")
        try:
            f.seek(size)
        except (OSError, ValueError) as e:
            raise SourceFileError(f"cannot seek in source {self.name!r}: {e}") from None
        self.pos = size

    def _zstd_dict(self, size: int) -> None:
        if not self.v2:
            raise TarDiffError("ZSTD_DICT op (5) requires a tardf2 (v2) tar-diff header")
        f = self._current("ZSTD_DICT")
        if self.size > MAX_DICT:
            raise TarDiffError(f"ZSTD_DICT source {self.name!r} of {self.size} bytes exceeds "
                               f"the limit of {MAX_DICT}")
        self.dict_bytes += self.size
        if self.dict_bytes > DICT_BYTES_ALLOWANCE + DICT_BYTES_PER_OUTPUT * self.written:
            raise TarDiffError("too much ZSTD_DICT dictionary loading for the output produced")
        self._seek(0)
        content = self._read_source(f, self.size)
        payload = _PayloadReader(self.ops, size)
        walker = FrameWalker(first_only=True)
        try:
            if content:
                zdict = zstandard.ZstdCompressionDict(
                    content, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
                dctx = zstandard.ZstdDecompressor(dict_data=zdict, max_window_size=MAX_DICT)
            else:
                dctx = zstandard.ZstdDecompressor(max_window_size=MAX_DICT)
            reader = dctx.stream_reader(WalkedReader(payload, walker), read_size=1 << 17,
                                        read_across_frames=False, closefd=False)
        except zstandard.ZstdError as e:
            raise TarDiffError(f"cannot set up ZSTD_DICT decoding: {e}") from None
        while True:
            chunk = _zstd_read(reader, CHUNK)
            if not chunk:
                break
            self._emit(chunk)
        if not walker.frames:
            raise TarDiffError("truncated zstd frame in ZSTD_DICT payload")
        while payload.read(CHUNK):
            pass


def read_header(delta: Reader) -> int:
    """Read the 8-byte header: 1 or 2, or TarDiffError."""
    head = b""
    while len(head) < 8:
        more = delta.read(8 - len(head))
        if not more:
            break
        head += more
    if head == HEADER_V1:
        return 1
    if head == HEADER_V2:
        return 2
    raise TarDiffError(f"Invalid tar-diff header {head!r}")


def apply_tardiff(delta: Reader, source: SourceResolver, out: Writer, *,
                  max_output: int | None = None) -> int:
    """Apply a tar-diff read from *delta* against *source*, writing to *out*; bytes written."""
    version = read_header(delta)
    applier = _Applier(_OpStream(delta), source, out, version == 2, max_output)
    try:
        return applier.run()
    finally:
        applier.close()


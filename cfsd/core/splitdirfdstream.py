"""The splitdirfdstream wire format (GetLayer / PutLayer; docs/splitstream.md).

A layer tar travels through a pipe as a headerless sequence of little-endian chunks:

* ``0x00`` metadata: ``u32 length`` + bytes (tar headers and padding, verbatim);
* ``0x01`` inline data: ``u32 length`` + bytes (file content sent in the stream);
* ``0x02`` file-backed data: ``u64 length, u32 dirfd index, u32 name length`` + name: read
  ``length`` bytes from offset 0 of ``name`` opened beneath the passed directory fd.

The stream ends with a clean EOF at a chunk boundary.  The format carries no checksum: the
consumer verifies what it rebuilt (PutLayer checks the layer's diff_id).  Compatible with
composefs-rs ``splitdirfdstream-v0``.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Iterator

from cfsd.core import fsverity
from cfsd.core.errors import FormatError
from cfsd.core.openat2 import openat2

TAG_METADATA = 0
TAG_INLINE = 1
TAG_FILE = 2

MAX_INLINE = 256 << 20          # bytes in one inline or metadata chunk
MAX_NAME = 4096                 # bytes in a file-backed name
PIECE = 1 << 20                 # how much is read or copied at a time

_SHORT = struct.Struct("<BI")
_FILE = struct.Struct("<BQII")

def open_beneath(dir_fd: int, name: bytes) -> int:
    """Open *name* read-only beneath *dir_fd*: no ``..`` escape, no symlinks, no blocking
    on FIFOs.  Raises OSError."""
    return openat2(dir_fd, name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)


def check_name(name: bytes) -> None:
    """Refuse names that are empty, absolute, too long, contain NUL or a ``..`` part."""
    if not name or len(name) > MAX_NAME or name.startswith(b"/") or b"\0" in name \
            or b".." in name.split(b"/"):
        raise FormatError(f"splitdirfdstream: bad file name {name[:100]!r}")


def metadata(data: bytes) -> Iterator[bytes]:
    """Metadata chunks carrying *data*."""
    for i in range(0, len(data), MAX_INLINE):
        piece = data[i:i + MAX_INLINE]
        yield _SHORT.pack(TAG_METADATA, len(piece)) + piece


def file_backed(length: int, dir_index: int, name: bytes) -> bytes:
    """A file-backed chunk."""
    check_name(name)
    return _FILE.pack(TAG_FILE, length, dir_index, len(name)) + name


def encode_layer(chunks: Iterator[tuple[bool, bytes]], object_size: Callable[[bytes], int]
                 ) -> Iterator[bytes]:
    """The splitdirfdstream of a layer splitstream's chunks, objects named ``XX/REST``
    beneath directory fd index 0 (the repository's ``objects/``)."""
    for external, data in chunks:
        if external:
            yield file_backed(object_size(data), 0, fsverity.object_path(data).encode())
        else:
            yield from metadata(data)


class Decoder:
    """The tar a splitdirfdstream describes, as a file-like ``read()``.

    *read_raw(n)* returns up to n bytes of the stream (b"" at EOF); *open_file(index, name)*
    opens a file-backed chunk's file (the caller decides with whose rights) and returns a
    read-only fd, which this closes.
    """

    def __init__(self, read_raw: Callable[[int], bytes],
                 open_file: Callable[[int, bytes], int],
                 on_file: Callable[[int, int, int], None] | None = None) -> None:
        self._read_raw = read_raw
        self._open_file = open_file
        self._on_file = on_file     # (tar offset, length, fd) of each file-backed chunk
        self._produced = 0          # tar bytes decoded so far
        self._pieces = self._decode()
        self._buf = b""
        self.chunks = 0
        self.files = 0

    def _exact(self, n: int, eof_ok: bool = False) -> bytes | None:
        parts = []
        got = 0
        while got < n:
            data = self._read_raw(min(n - got, PIECE))
            if not data:
                if eof_ok and got == 0:
                    return None
                raise FormatError("splitdirfdstream ends inside a chunk")
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def _decode(self) -> Iterator[bytes]:
        while True:
            tag = self._exact(1, eof_ok=True)
            if tag is None:
                return
            self.chunks += 1
            if tag[0] in (TAG_METADATA, TAG_INLINE):
                (n,) = struct.unpack("<I", self._exact(4))  # type: ignore[arg-type]
                if n > MAX_INLINE:
                    raise FormatError(f"splitdirfdstream: chunk of {n} bytes is too large")
                while n:
                    piece = self._exact(min(n, PIECE))
                    n -= len(piece)  # type: ignore[arg-type]
                    self._produced += len(piece)  # type: ignore[arg-type]
                    yield piece  # type: ignore[misc]
            elif tag[0] == TAG_FILE:
                length, index, name_len = struct.unpack("<QII", self._exact(16))  # type: ignore[arg-type]
                if name_len > MAX_NAME:
                    raise FormatError("splitdirfdstream: file name too long")
                name = self._exact(name_len) if name_len else b""
                check_name(name)  # type: ignore[arg-type]
                self.files += 1
                yield from self._file(index, name, length)  # type: ignore[arg-type]
            else:
                raise FormatError(f"splitdirfdstream: unknown chunk type {tag[0]}")

    def _file(self, index: int, name: bytes, length: int) -> Iterator[bytes]:
        fd = self._open_file(index, name)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(f"splitdirfdstream: {name!r} is not a regular file")
            if st.st_size != length:
                raise FormatError(f"splitdirfdstream: {name!r} has {st.st_size} bytes, "
                                  f"the stream says {length}")
            if self._on_file is not None:
                self._on_file(self._produced, length, fd)
            off = 0
            while off < length:
                piece = os.pread(fd, min(PIECE, length - off), off)
                if not piece:
                    raise FormatError(f"splitdirfdstream: {name!r} shrank while read")
                off += len(piece)
                self._produced += len(piece)
                yield piece
        finally:
            os.close(fd)

    def read(self, n: int = -1, /) -> bytes:
        """Up to *n* bytes of the rebuilt tar (b"" at its end)."""
        if not self._buf:
            self._buf = next(self._pieces, b"")
        if n < 0 or n >= len(self._buf):
            out, self._buf = self._buf, b""
            return out
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

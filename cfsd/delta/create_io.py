"""Reading and writing helpers of the delta creator (cfsd.delta.create).

* :class:`LayerTarReader` reads a layer splitstream back as its uncompressed tar, front to
  back, hashing it with the diff_id's algorithm so the caller can check it;
* :func:`old_files` lists the regular files of the old image's merged tree as tar-diff
  sources, with their fs-verity object ids as content digests (nothing is read);
* :class:`FdWriter` / :class:`HashSink` are what the encoder, the recompressor and the guard
  write to.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import threading
from typing import Any

from cfsd.core import tree
from cfsd.core.errors import FormatError
from cfsd.core.fsverity import FsVerityHasher
from cfsd.core.repository import Repository
from cfsd.core.splitstream import TAR_LAYER
from cfsd.delta.tardiff_encode import OldFile
from cfsd.oci.digest import Digest
from cfsd.oci.layers import HashingReader
from cfsd.oci.pull import Cancelled

CHUNK = 1 << 20


class LayerStream:
    """The uncompressed tar of a layer splitstream, read front to back (cancellable)."""

    def __init__(self, repo: Repository, verity: bytes,
                 cancel: threading.Event | None = None) -> None:
        self.repo = repo
        self._stream = repo.open_stream(verity=verity, content_type=TAR_LAYER)
        self._chunks = self._stream.chunks()
        self._buf = b""
        self._fd = -1
        self.cancel = cancel

    def _next(self) -> bool:
        for external, data in self._chunks:
            if external:
                self._fd = self.repo.open_object(data)
            else:
                self._buf = data
            return True
        return False

    def read(self, n: int = -1, /) -> bytes:
        """Up to *n* bytes (a chunk when *n* < 0); b"" at the end."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("delta creation cancelled")
        want = n if n > 0 else CHUNK
        while True:
            if self._buf:
                out, self._buf = self._buf[:want], self._buf[want:]
                return out
            if self._fd >= 0:
                out = os.read(self._fd, want)
                if out:
                    return out
                os.close(self._fd)
                self._fd = -1
            if not self._next():
                return b""

    def close(self) -> None:
        """Release the stream and any open object."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._stream.close()


class LayerTarReader(HashingReader):
    """A layer's tar hashed with its diff_id's algorithm as it is read (:meth:`check`)."""

    def __init__(self, repo: Repository, verity: bytes, diff_id: str,
                 cancel: threading.Event | None = None) -> None:
        self.diff_id = Digest.parse(diff_id)
        self.stream = LayerStream(repo, verity, cancel)
        super().__init__(self.stream, self.diff_id)

    def close(self) -> None:
        """Release the stream."""
        self.stream.close()

    def check(self) -> None:
        """Read what is left; FormatError unless everything matches the diff_id."""
        while self.read(CHUNK):
            pass
        if self.hash.hexdigest() != self.diff_id.hex:
            raise FormatError(f"stored layer {self.diff_id} does not match its diff_id")


class FdWriter:
    """Writes to a file descriptor, counting and hashing (sha256)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0
        self.sha = hashlib.sha256()

    def write(self, b: bytes | bytearray | memoryview, /) -> int:
        mv = memoryview(b)
        self.sha.update(mv)
        n = len(mv)
        while mv:
            mv = mv[os.write(self.fd, mv):]
        self.size += n
        return n

    def flush(self) -> None:
        """Nothing is buffered."""

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of everything written."""
        return "sha256:" + self.sha.hexdigest()


class HashSink:
    """Hashes and counts what is written (the guard's output)."""

    def __init__(self, digest: Digest) -> None:
        self.hash = digest.hasher()
        self.size = 0

    def write(self, b: bytes, /) -> int:
        self.hash.update(b)
        self.size += len(b)
        return len(b)


def old_files(repo: Repository, fs: tree.FileSystem) -> list[OldFile]:
    """Every regular file of the merged tree, as tar-diff sources (fs-verity digests)."""
    out: list[OldFile] = []
    alg = repo.alg
    for path, inode in fs.walk():
        if type(inode) is tree.Directory:
            continue
        assert isinstance(inode, tree.Leaf)
        content = inode.content
        try:
            name = path[1:].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if isinstance(content, tree.External):
            out.append(OldFile(name, content.size, content.id,
                               functools.partial(_open_object, repo, content.id)))
        elif isinstance(content, tree.Inline) and content.data:
            h = FsVerityHasher(alg)
            h.update(content.data)
            out.append(OldFile(name, len(content.data), h.digest(),
                               functools.partial(_open_inline, content.data)))
    return out


def _open_object(repo: Repository, obj: bytes) -> Any:
    return os.fdopen(repo.open_object(obj), "rb", buffering=1 << 16)


def _open_inline(data: bytes) -> Any:
    return io.BytesIO(data)


__all__ = ["FdWriter", "HashSink", "LayerStream", "LayerTarReader", "old_files"]

"""Rebuilding one target layer of a delta into a staging area (docs/delta.md).

A tar-diff is applied on a producer thread and its output streams through a small bounded
queue straight into the tar splitter, so the reconstructed tar never exists on disk or in
memory as a whole: the only disk used is the layer's new objects (in a private staging
area, published later or removed) and, for registry deltas, an anonymous temporary copy of
the delta blob.  The tar is hashed as it is split; nothing is kept unless it matches the
layer's diff_id.  A layer shipped whole is decompressed by its magic bytes (the media types
written by upstream creators are unreliable).
"""

from __future__ import annotations

import errno
import os
import queue
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cfsd.core.objects import Staging
from cfsd.core.repository import Repository
from cfsd.core.splitstream import TAR_LAYER
from cfsd.core.tar import Reader, TarError, split_tar
from cfsd.delta.tardiff import SourceResolver, apply_tardiff
from cfsd.oci.compression import decompressed
from cfsd.oci.digest import Digest
from cfsd.oci.documents import Descriptor
from cfsd.oci.layers import DiffIdMismatch, HashingReader
from cfsd.oci.pull import Cancelled
from cfsd.oci.stats import ImportStats

CHUNK = 1 << 20
PIPE_DEPTH = 4
PIPE_BATCH = 1 << 20
GZIP_MAX_RATIO = 1032      # deflate: one 258-byte match in at least 2 bits
ZSTD_MAX_RATIO = 32768     # zstd: an RLE block of 128 KiB in 4 bytes
RATIO_SLACK = 1 << 16


def expected_layer_limit(target: Descriptor) -> int:
    """The most bytes the target layer's tar can have, given its compressed descriptor.

    An uncompressed layer is exactly ``size`` bytes; a gzip or zstd blob of ``size`` bytes
    cannot decompress to more than the format's maximum expansion ratio allows.
    """
    mt = target.media_type
    if mt.endswith("+gzip") or mt.endswith(".gzip"):
        return target.size * GZIP_MAX_RATIO + RATIO_SLACK
    if mt.endswith("+zstd") or mt.endswith(".zstd"):
        return target.size * ZSTD_MAX_RATIO + RATIO_SLACK
    return target.size


class _ReaderGone(Exception):  # noqa: N818 - internal signal
    """The consumer stopped reading."""


class _End:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class Pipe:
    """A bounded in-memory pipe from a writer thread to a reader (about 6 MiB at most).

    Small writes are batched into chunks of about 1 MiB, so that a tar-diff made of many
    small ops does not pay one queue hand-over per op.
    """

    def __init__(self, cancel: threading.Event | None = None, depth: int = PIPE_DEPTH) -> None:
        self._q: queue.Queue[bytes | _End] = queue.Queue(depth)
        self._batch = bytearray()
        self._gone = False
        self._buf = b""
        self._pos = 0
        self._done = False
        self._error: BaseException | None = None
        self._cancel = cancel

    # writer side

    def _put(self, item: bytes | _End) -> None:
        while True:
            if self._gone:
                raise _ReaderGone()
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def write(self, b: bytes | bytearray | memoryview, /) -> int:
        """Queue a copy of *b* (blocks while the pipe is full)."""
        n = len(b)
        if not self._batch and n >= PIPE_BATCH:
            self._put(bytes(b))
            return n
        self._batch += b
        if len(self._batch) >= PIPE_BATCH:
            data, self._batch = bytes(self._batch), bytearray()
            self._put(data)
        return n

    def close_write(self, error: BaseException | None = None) -> None:
        """End of data; with *error* the reader raises it after the queued data."""
        try:
            if self._batch and error is None:
                data, self._batch = bytes(self._batch), bytearray()
                self._put(data)
            self._put(_End(error))
        except _ReaderGone:
            pass

    # reader side

    def read(self, n: int = -1, /) -> bytes:
        """Up to *n* bytes; b"" at the end; re-raises the writer's error."""
        while self._pos >= len(self._buf):
            if self._done:
                if self._error is not None:
                    raise self._error
                return b""
            if self._cancel is not None and self._cancel.is_set():
                raise Cancelled("delta apply cancelled")
            try:
                item = self._q.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, _End):
                self._done, self._error = True, item.error
            else:
                self._buf, self._pos = item, 0
        end = len(self._buf) if n < 0 else min(len(self._buf), self._pos + n)
        out = self._buf[self._pos:end] if self._pos or end < len(self._buf) else self._buf
        self._pos = end
        return out

    def close_read(self) -> None:
        """The reader is done: unblock and stop the writer."""
        self._gone = True
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                return


@dataclass
class StagedLayer:
    """A layer whose objects and splitstream are staged but not yet published."""

    diff_id: str
    verity: bytes
    staging: Staging
    stats: ImportStats
    size: int


def stage_layer(repo: Repository, src: Reader, diff_id: str, *,
                before_commit: Callable[[], None] | None = None) -> StagedLayer:
    """Split the tar read from *src* into a staging area; DiffIdMismatch unless it matches.

    The caller commits ``staging`` (then publishes the stream) or aborts it.  If the tar
    cannot be parsed, the rest is still hashed so that a wrong reconstruction is reported
    as a diff_id mismatch rather than as a malformed tar.
    """
    digest = Digest.parse(diff_id)
    reader = HashingReader(src, digest)
    staging = repo.staging()
    try:
        writer = repo.create_stream(TAR_LAYER, staging)
        try:
            split_tar(reader, writer)
        except TarError:
            while reader.read(CHUNK):
                pass
            if reader.hash.hexdigest() != digest.hex:
                raise DiffIdMismatch(str(digest),
                                     f"{digest.algorithm}:{reader.hash.hexdigest()}") from None
            raise
        actual = reader.hash.hexdigest()
        if actual != digest.hex:
            raise DiffIdMismatch(str(digest), f"{digest.algorithm}:{actual}")
        verity = writer.done()
        if before_commit is not None:
            before_commit()
    except BaseException:
        staging.abort()
        raise
    stats = ImportStats(objects_copied=writer.new_objects,
                        objects_already_present=writer.present_objects,
                        bytes_copied=writer.new_bytes, bytes_inlined=writer.inline_bytes)
    return StagedLayer(diff_id, verity, staging, stats, reader.size)


def stage_tardiff(repo: Repository, delta: Reader, resolver: SourceResolver, diff_id: str, *,
                  max_output: int | None, cancel: threading.Event | None = None,
                  before_commit: Callable[[], None] | None = None) -> StagedLayer:
    """Apply a tar-diff against *resolver* and stage the result (streamed, never spooled)."""
    pipe = Pipe(cancel)

    def produce() -> None:
        try:
            apply_tardiff(delta, resolver, pipe, max_output=max_output)
        except _ReaderGone:
            return
        except BaseException as e:  # noqa: BLE001 - handed to the reading side
            pipe.close_write(e)
            return
        pipe.close_write()

    t = threading.Thread(target=produce, name="tardiff-apply", daemon=True)
    t.start()
    try:
        return stage_layer(repo, pipe, diff_id, before_commit=before_commit)
    finally:
        pipe.close_read()
        t.join()


def stage_original(repo: Repository, blob: Reader, diff_id: str, *,
                   before_commit: Callable[[], None] | None = None) -> StagedLayer:
    """A layer shipped whole: decompress by magic bytes (gzip, zstd or none) and stage it."""
    tar, _ = decompressed(blob)
    try:
        return stage_layer(repo, tar, diff_id, before_commit=before_commit)
    finally:
        tar.close()


def temp_file(repo: Repository) -> int:
    """An anonymous read-write file in ``objects/`` (gone when closed, even after a crash)."""
    try:
        return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600,
                       dir_fd=repo.writable_objects_fd)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.ENOENT):
            raise
    for _ in range(16):
        name = ".tmp-delta-" + secrets.token_hex(6)
        try:
            fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600, dir_fd=repo.writable_objects_fd)
        except FileExistsError:
            continue
        os.unlink(name, dir_fd=repo.writable_objects_fd)
        return fd
    raise OSError(errno.EEXIST, "cannot create a temporary file for the delta blob")


__all__ = ["Pipe", "StagedLayer", "expected_layer_limit", "stage_layer", "stage_original",
           "stage_tardiff", "temp_file"]

"""Creating an oci-delta artifact from two images of the repository (docs/delta.md).

``create_delta()`` is a generator like ``apply_delta()``: it yields progress events
(``started``/``progress``/``done``/``message`` dicts) and returns a :class:`CreateResult`.

Plan (docs/delta.md): a new-image layer whose diff_id occurs anywhere in the old image is
*reused* (no blob, listed in the ``reused*`` annotations); every other distinct diff_id is
encoded once as a tar-diff (``cfsd.delta.tardiff_encode``, v1 by default, v2 on request)
against the **merged root filesystem of the old image** — the very tree an applier resolves
``OPEN`` names in (``cfsd.delta.source.build_tree``), so every entry type, whiteouts and
opaque directories of later layers hide earlier paths and hardlink names are ordinary paths.
Old files are matched by their fs-verity object id (no old file is read to be hashed).

Per changed layer: the layer's tar is read back from its splitstream (and checked against
its diff_id), encoded into an anonymous scratch file next to the output, then **applied** to
the same source tree and checked against the diff_id (the guard of docs/delta.md); the patch
is kept when it is smaller than the target's compressed layer, otherwise the layer is
recompressed with the compression of the target's layer (deterministic gzip, zstd or plain
tar) and stored with its true media type.  Layers run in parallel on a thread pool; large
in-memory deltas (bsdiff, zstd) share one memory budget.

The archive is assembled by ``cfsd.delta.assemble`` into an anonymous file that becomes the
output file only when complete.  The output is a pure function of the two images and the
options (never of timing or concurrency).

Temporary disk (anonymous files in the output's directory, gone when closed): the patch (or
recompressed layer) of every changed layer until the archive is written — about the size of
the delta — plus, per worker, the target file being encoded when it exceeds 8 MiB.  Memory:
the old image's tree, at most ``CreateOptions.memory`` (1 GiB) for the in-memory deltas of
all workers together (a single larger one runs alone; the encoder's size caps bound it), and
a few MiB per worker.  ``cfsd.delta.create_io`` holds the readers and writers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import threading
import zlib
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import zstandard

from cfsd.core.errors import FormatError
from cfsd.core.fsverity import FsVerityHasher
from cfsd.core.repository import Repository
from cfsd.core.splitstream import RangeReader
from cfsd.delta.assemble import (
    EMPTY_CONFIG,
    OCI_LAYOUT,
    ArchiveWriter,
    LayerBlob,
    OutputFile,
    delta_manifest,
    layout_index,
    sha256_digest,
)
from cfsd.delta.create_io import FdWriter, HashSink, LayerTarReader, old_files
from cfsd.delta.source import SourceImage, TreeSource, build_tree
from cfsd.delta.tardiff import TarDiffError, apply_tardiff
from cfsd.delta.tardiff_encode import EncodeOptions, EncodeStats, SourceIndex
from cfsd.delta.tardiff_encode import encode_tardiff as encode
from cfsd.oci import documents, image, mediatypes
from cfsd.oci.digest import Digest
from cfsd.oci.documents import Descriptor
from cfsd.oci.image import OciImage
from cfsd.oci.pull import Cancelled
from cfsd.oci.workers import EventChannel, run_pooled

Event = dict[str, Any]
CREATE_ID = "create-delta"
CHUNK = 1 << 20
DEFAULT_MEMORY = 1 << 30
GZIP_LEVEL = 6
ZSTD_LEVEL = 3
MAX_CONCURRENCY = 64

KIND_REUSED = "reused"
KIND_TARDIFF = "tar-diff"
KIND_ORIGINAL = "original"


class InvalidDeltaRequest(FormatError):
    """The two images cannot be turned into a delta (an artifact, a missing layer...)."""


@dataclass
class CreateOptions:
    """Knobs of one delta creation.

    ``version`` of the tar-diff format (1: readable by every consumer; 2: adds zstd
    dictionary frames); ``concurrency`` layers at once (default: the CPU count);
    ``ref_name`` for the index entry; ``memory`` bytes shared by the in-memory deltas of all
    workers; ``max_delta_size`` caps (per file) bsdiff and zstd inputs (default: the
    encoder's); ``guard`` applies every patch before keeping it; ``worker_context`` is
    entered by every worker thread.
    """

    version: int = 1
    concurrency: int | None = None
    ref_name: str | None = None
    memory: int = DEFAULT_MEMORY
    max_delta_size: int | None = None
    level: int = 3
    guard: bool = True
    cancel: threading.Event = field(default_factory=threading.Event)
    worker_context: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext


@dataclass
class LayerResult:
    """What the delta carries for one target layer (manifest order)."""

    diff_id: str
    digest: str              # the target manifest's layer digest
    kind: str                # reused | tar-diff | original
    size: int                # bytes of the delta blob (0 when reused)
    layer_size: int          # the target layer's compressed size
    tar_size: int = 0        # uncompressed size (0 when reused)
    note: str | None = None  # why a layer was stored whole
    stats: EncodeStats | None = None


@dataclass
class CreateResult:
    """The written delta."""

    digest: str                      # the delta manifest's digest
    size: int                        # bytes of the archive
    version: int
    source: str                      # old manifest digest
    source_config: str
    target: str                      # new manifest digest
    layers: list[LayerResult]

    @property
    def blob_bytes(self) -> int:
        """Bytes of the layer blobs in the delta (each blob once)."""
        return sum(r.size for r in _distinct(self.layers))


def _distinct(layers: list[LayerResult]) -> list[LayerResult]:
    seen: set[str] = set()
    out = []
    for r in layers:
        if r.kind != KIND_REUSED and r.diff_id not in seen:
            seen.add(r.diff_id)
            out.append(r)
    return out


class MemoryBudget:
    """A counting budget of bytes shared by threads; a request over the whole budget runs
    alone."""

    def __init__(self, total: int, cancel: threading.Event | None = None) -> None:
        self.total = max(1, total)
        self.used = 0
        self.peak = 0
        self.cancel = cancel
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, n: int) -> Iterator[None]:
        """Hold *n* bytes (at most the whole budget) for the duration of the block."""
        n = max(0, min(n, self.total))
        with self._cond:
            while self.used and self.used + n > self.total:
                if self.cancel is not None and self.cancel.is_set():
                    raise Cancelled("delta creation cancelled")
                self._cond.wait(0.2)
            self.used += n
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


# ------------------------------------------------------------------------------ layer jobs

@dataclass
class _Job:
    index: int
    diff_id: str
    target: Descriptor
    verity: bytes


@dataclass
class _Blob:
    media_type: str
    digest: str
    size: int
    fd: int
    result: LayerResult


def original_media_type(target_media_type: str) -> tuple[str, str]:
    """(compression, OCI media type) a stored-whole layer gets: the target layer's
    compression, labelled truthfully (docs/delta.md)."""
    mt = target_media_type
    if mt.endswith("+zstd") or mt.endswith(".zstd"):
        return "zstd", "application/vnd.oci.image.layer.v1.tar+zstd"
    if mt.endswith("+gzip") or mt.endswith(".gzip"):
        return "gzip", "application/vnd.oci.image.layer.v1.tar+gzip"
    return "none", "application/vnd.oci.image.layer.v1.tar"


class _Worker:
    """Encodes, checks and, if needed, recompresses layers (shared, read-only state)."""

    def __init__(self, repo: Repository, output: OutputFile, opts: CreateOptions,
                 events: EventChannel,
                 source: concurrent.futures.Future[tuple[TreeSource, SourceIndex]]) -> None:
        self.repo = repo
        self.output = output
        self.opts = opts
        self.events = events
        self.source = source
        self.budget = MemoryBudget(opts.memory, opts.cancel)
        kw: dict[str, Any] = {}
        if opts.max_delta_size is not None:
            kw = {"max_bsdiff_size": opts.max_delta_size, "max_zstd_size": opts.max_delta_size}
        self.encode_options = EncodeOptions(
            version=opts.version, level=opts.level,
            hash_factory=functools.partial(FsVerityHasher, repo.alg),
            tmpdir=f"/proc/self/fd/{output.dir_fd}", reserve=self.budget.reserve, **kw)

    def run(self, job: _Job) -> _Blob:
        """The blob carrying *job*'s layer: the checked tar-diff when it is smaller than the
        target's compressed layer, else the smaller of the recompressed layer and the
        (checked) tar-diff."""
        with self.opts.worker_context():
            patch = self._encode(job)
            chosen = patch
            try:
                if patch.size < job.target.size:
                    note = self._guard(job, patch)
                    if note:
                        chosen = self._original(job, note, patch.result.tar_size)
                else:
                    chosen = self._original(job, "the tar-diff is not smaller than the layer",
                                            patch.result.tar_size)
                    if patch.size < chosen.size and not self._guard(job, patch):
                        os.close(chosen.fd)
                        chosen = patch
            except BaseException:
                if chosen is not patch:
                    os.close(chosen.fd)
                os.close(patch.fd)
                raise
            if chosen is not patch:
                os.close(patch.fd)
            self._say(job, chosen)
            return chosen

    def _say(self, job: _Job, blob: _Blob) -> None:
        if blob.result.kind == KIND_TARDIFF:
            text = f"tar-diff of {blob.size} bytes (layer blob {job.target.size} bytes)"
        else:
            text = f"stored whole, {blob.size} bytes ({blob.result.note})"
        self.events.put({"message": f"{job.diff_id}: {text}"})

    def _encode(self, job: _Job) -> _Blob:
        """The tar-diff of the layer, in a scratch file."""
        _, index = self.source.result()
        fd = self.output.temp_fd()
        try:
            reader = LayerTarReader(self.repo, job.verity, job.diff_id, self.opts.cancel)
            out = FdWriter(fd)
            try:
                stats = encode(reader, index, out, self.encode_options)
                reader.check()
            finally:
                reader.close()
        except BaseException:
            os.close(fd)
            raise
        result = LayerResult(job.diff_id, job.target.digest, KIND_TARDIFF, out.size,
                             job.target.size, reader.size, stats=stats)
        return _Blob(mediatypes.TAR_DIFF, out.digest, out.size, fd, result)

    def _guard(self, job: _Job, patch: _Blob) -> str:
        """Apply the patch to the source tree: "" if it rebuilds the layer, else why not."""
        if not self.opts.guard:
            return ""
        resolver, _ = self.source.result()
        digest = Digest.parse(job.diff_id)
        sink = HashSink(digest)
        tar_size = patch.result.tar_size
        try:
            apply_tardiff(RangeReader(patch.fd, 0, patch.size), resolver, sink,
                          max_output=tar_size)
        except TarDiffError as e:
            return f"the tar-diff did not apply: {e}"
        if sink.size != tar_size or sink.hash.hexdigest() != digest.hex:
            return "the tar-diff did not reproduce the layer"
        return ""

    def _original(self, job: _Job, note: str, tar_size: int) -> _Blob:
        """The layer recompressed like the target's blob (zlib gzip level 6 or zstd level 3,
        content size in the frame: byte-identical to blobs made that way)."""
        compression, media_type = original_media_type(job.target.media_type)
        fd = self.output.temp_fd()
        try:
            reader = LayerTarReader(self.repo, job.verity, job.diff_id, self.opts.cancel)
            out = FdWriter(fd)
            try:
                if compression == "gzip":
                    z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)   # zlib's gzip
                    while data := reader.read(CHUNK):
                        out.write(z.compress(data))
                    out.write(z.flush())
                elif compression == "zstd":
                    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
                    with cctx.stream_writer(out, size=tar_size,  # type: ignore[arg-type]
                                            closefd=False) as zw:
                        while data := reader.read(CHUNK):
                            zw.write(data)
                else:
                    while data := reader.read(CHUNK):
                        out.write(data)
                reader.check()
            finally:
                reader.close()
        except BaseException:
            os.close(fd)
            raise
        result = LayerResult(job.diff_id, job.target.digest, KIND_ORIGINAL, out.size,
                             job.target.size, reader.size, note=note)
        return _Blob(media_type, out.digest, out.size, fd, result)


def _run_jobs(worker: _Worker, jobs: list[_Job], blobs: dict[str, _Blob]
              ) -> Generator[Event, None, None]:
    opts = worker.opts
    n = opts.concurrency or (os.cpu_count() or 2)
    n = max(1, min(n, len(jobs), MAX_CONCURRENCY))
    done_count = 0

    def done(job: _Job, blob: _Blob) -> list[Event]:
        nonlocal done_count
        blobs[job.diff_id] = blob
        done_count += 1
        return [{"progress": {"id": CREATE_ID, "fetched": done_count, "total": len(jobs)}}]

    yield from run_pooled(sorted(jobs, key=lambda j: -j.target.size), worker.run, n,
                          worker.events, opts.cancel, "delta-create", done,
                          lambda job, blob: blobs.setdefault(job.diff_id, blob))


def _source(repo: Repository, old: OciImage, old_diff_ids: list[str]
            ) -> tuple[TreeSource, SourceIndex]:
    src = SourceImage(old.config_digest, old_diff_ids, dict(old.layer_refs),
                      f"@{old.manifest_digest}")
    fs = build_tree(repo, src)
    return TreeSource(repo, fs), SourceIndex(old_files(repo, fs))


def _open(repo: Repository, ref: str) -> tuple[OciImage, list[str]]:
    img = image.open_image(repo, ref)          # NotFound -> NoSuchImage
    if not img.is_container or img.config is None:
        raise InvalidDeltaRequest(f"{ref} is not a container image")
    diff_ids = list(img.config.rootfs.diff_ids)
    if len(diff_ids) != len(img.manifest.layers):
        raise InvalidDeltaRequest(f"{ref}: config lists {len(diff_ids)} diff_ids for "
                                  f"{len(img.manifest.layers)} layers")
    for diff_id in diff_ids:
        verity = img.layer_refs.get(diff_id)
        if verity is None or not repo.has_object(verity):
            raise InvalidDeltaRequest(f"{ref}: layer {diff_id} is missing from the repository")
    for d in img.manifest.layers:
        if not mediatypes.is_tar_layer(d.media_type):
            raise InvalidDeltaRequest(f"{ref}: unsupported layer media type {d.media_type!r}")
    return img, diff_ids


def create_delta(repo: Repository, old_ref: str, new_ref: str,
                 open_output: Callable[[], OutputFile],
                 options: CreateOptions | None = None) -> Generator[Event, None, CreateResult]:
    """Write the delta from image *old_ref* to *new_ref* (tags or ``@digest``).

    *open_output* is called once both images were found usable; the OutputFile it returns
    is committed when the archive is complete and aborted on any failure.
    """
    opts = options or CreateOptions()
    if opts.version not in (1, 2):
        raise ValueError(f"unsupported tar-diff version {opts.version}")
    old, old_ids = _open(repo, old_ref)        # NotFound -> NoSuchImage
    new, new_ids = _open(repo, new_ref)
    old_set = set(old_ids)
    layers: list[LayerResult | None] = []
    jobs: dict[str, _Job] = {}
    for i, (diff_id, desc) in enumerate(zip(new_ids, new.manifest.layers, strict=True)):
        if diff_id in old_set:
            layers.append(LayerResult(diff_id, desc.digest, KIND_REUSED, 0, desc.size))
            continue
        layers.append(None)
        if diff_id not in jobs:
            jobs[diff_id] = _Job(i, diff_id, desc, new.layer_refs[diff_id])
    yield {"message": f"Delta {old.manifest_digest} -> {new.manifest_digest}: "
                      f"{len(new_ids) - layers.count(None)} layers reused, "
                      f"{len(jobs)} to encode (tar-diff v{opts.version})"}
    output = open_output()
    blobs: dict[str, _Blob] = {}
    builder = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                    thread_name_prefix="delta-source")
    try:
        if jobs:
            yield {"message": "Building data source from the old image..."}
            source = builder.submit(_source, repo, old, old_ids)
            yield {"started": {"id": CREATE_ID, "total": len(jobs), "unit": "Items"}}
            worker = _Worker(repo, output, opts, EventChannel(), source)
            yield from _run_jobs(worker, list(jobs.values()), blobs)
            yield {"done": {"id": CREATE_ID, "transferred": len(jobs)}}
        yield {"message": "Writing the delta archive..."}
        result = _assemble(output, old, new, new_ids, layers, blobs, opts)
        output.commit()
    except BaseException:
        opts.cancel.set()
        output.abort()
        raise
    finally:
        builder.shutdown(wait=True, cancel_futures=True)
        for b in blobs.values():
            os.close(b.fd)
    return result


def _assemble(output: OutputFile, old: OciImage, new: OciImage, new_ids: list[str],
              layers: list[LayerResult | None], blobs: dict[str, _Blob],
              opts: CreateOptions) -> CreateResult:
    final: list[LayerResult] = []
    carried: list[LayerBlob] = []
    written_to: set[str] = set()
    reused: list[str] = []
    reused_ids: list[str] = []
    for diff_id, desc, r in zip(new_ids, new.manifest.layers, layers, strict=True):
        if r is not None:
            final.append(r)
            reused.append(desc.digest)
            reused_ids.append(diff_id)
            continue
        b = blobs[diff_id]
        final.append(LayerResult(diff_id, desc.digest, b.result.kind, b.size, desc.size,
                                 b.result.tar_size, b.result.note, b.result.stats))
        if desc.digest not in written_to:
            written_to.add(desc.digest)
            carried.append(LayerBlob(b.media_type, b.digest, b.size, desc.digest))
    mtype = documents.media_type_of(new.manifest_bytes)
    manifest = delta_manifest(
        target_manifest=new.manifest_bytes, target_manifest_type=mtype,
        target_config=new.config_bytes, target_config_type=new.manifest.config.media_type,
        source_manifest=old.manifest_digest, source_config=old.config_digest,
        layers=carried, reused=reused, reused_diff_ids=reused_ids)
    tar = ArchiveWriter(output.fd)
    tar.file("oci-layout", OCI_LAYOUT)
    tar.blob(new.manifest_digest, new.manifest_bytes)
    tar.blob(new.config_digest, new.config_bytes)
    for diff_id in dict.fromkeys(r.diff_id for r in final if r.kind != KIND_REUSED):
        b = blobs[diff_id]
        tar.blob_fd(b.digest, b.fd, b.size)
    tar.blob(sha256_digest(EMPTY_CONFIG), EMPTY_CONFIG)
    digest = sha256_digest(manifest)
    tar.blob(digest, manifest)
    tar.file("index.json", layout_index(manifest, opts.ref_name))
    tar.close()
    return CreateResult(digest, tar.size, opts.version, old.manifest_digest, old.config_digest,
                        new.manifest_digest, final)


__all__ = ["CreateOptions", "CreateResult", "InvalidDeltaRequest", "LayerResult", "MemoryBudget",
           "create_delta", "old_files", "original_media_type"]

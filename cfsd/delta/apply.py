"""Applying an oci-delta artifact: old image in the repository + delta -> the new image.

``apply_delta()`` is a generator like ``cfsd.oci.pull.pull()``: it yields progress events
(``started``/``progress``/``skipped``/``done``/``message`` dicts) and returns a
``PullResult``.  The result is stored exactly as a direct pull of the target stores it: the
same raw manifest and config bytes, the same layer, config and manifest streams, the same
EROFS images (``finalize_image``), and the tag set last.

Order of work (docs/delta.md): parse the delta manifest by roles; fetch and verify the
target manifest (against its descriptor, ``delta.target`` and ``subject``), the config
(against the manifest) and the diff_id count; verify the embedded signature if a key was
given; stop early if the target is already stored; find the source image by its config
digest; check that every layer the delta does not carry is already stored; merge the source
image's layers into an in-memory tree; rebuild the missing layers in parallel, each delta
blob checked against its digest and each rebuilt tar against its diff_id before anything
is kept.  Layers stay staged until all of them succeeded, so a failure leaves the repository
exactly as it was.  Local deltas run ``os.cpu_count()`` layers at once; registry deltas keep
two delta blobs in flight (each downloaded to an anonymous temporary file), so temporary
disk stays below (delta blob + one layer) x concurrency.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from cfsd.core.errors import CorruptObject, FormatError, NotFound
from cfsd.core.repository import Repository
from cfsd.core.splitstream import OCI_BLOB, OCI_CONFIG, RangeReader
from cfsd.core.tree import FileSystem
from cfsd.delta.artifact import (
    DeltaFormatError,
    DeltaManifest,
    DeltaNotApplicable,
    TargetImage,
    is_delta_manifest,
    parse_delta_manifest,
    verify_target,
)
from cfsd.delta.reconstruct import (
    StagedLayer,
    expected_layer_limit,
    stage_original,
    stage_tardiff,
    temp_file,
)
from cfsd.delta.signature import EmbeddedSignature, verify_signatures
from cfsd.delta.source import SourceImage, TreeSource, build_tree, find_source_image
from cfsd.oci import documents, image, mediatypes
from cfsd.oci.documents import Descriptor
from cfsd.oci.finalize import finalize_image
from cfsd.oci.image import OciImage
from cfsd.oci.pull import (
    PullResult,
    VerifyingReader,
    host_platform,
    resolve_manifest,
)
from cfsd.oci.reference import parse
from cfsd.oci.registry import Credentials
from cfsd.oci.sources import (
    ArchiveSource,
    BlobReader,
    LayoutSource,
    PathOpener,
    Source,
    open_source,
)
from cfsd.oci.stats import ImportStats
from cfsd.oci.workers import EventChannel, run_pooled

Event = dict[str, Any]
APPLY_ID = "apply-delta"
REMOTE_INFLIGHT = 2
MAX_SIGNATURE_BLOB = 4 << 20
MAX_SIGNATURE_LAYERS = 16
CHUNK = 1 << 20


class NotADelta(FormatError):
    """ApplyDelta was given a reference that is not an oci-delta artifact."""


@dataclass
class ApplyOptions:
    """Knobs of one delta application."""

    tag: str | None = None
    source_image: str | None = None
    verify_key: str | None = None
    concurrency: int | None = None
    max_layer_output: int | None = None
    tls_verify: bool = True
    credentials: Credentials | None = None
    auth_configs: list[bytes] = field(default_factory=list)
    opener: PathOpener | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    worker_context: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext


@dataclass
class _Job:
    diff_id: str
    target: Descriptor
    blob: Descriptor

    @property
    def tardiff(self) -> bool:
        return self.blob.media_type == mediatypes.TAR_DIFF


def is_local(source: Source) -> bool:
    """Blobs of layouts and archives are read in place; registries are downloaded."""
    return isinstance(source, LayoutSource | ArchiveSource)


def _fetch_small(source: Source, desc: Descriptor, limit: int,
                 cancel: threading.Event | None = None) -> bytes:
    if desc.size > limit:
        raise DeltaFormatError(f"blob {desc.digest} is too large ({desc.size} bytes)")
    reader = VerifyingReader(source.blob(desc.digest, desc.size), desc.digest, desc.size,
                             cancel=cancel)
    try:
        parts = []
        while data := reader.read(CHUNK):
            parts.append(data)
        reader.finish()
    finally:
        reader.close()
    return b"".join(parts)


def _fetch_signatures(source: Source, delta: DeltaManifest,
                      cancel: threading.Event) -> tuple[list[EmbeddedSignature], list[str]]:
    """Every embedded signature whose blobs the delta carries (and notes on the others)."""
    out: list[EmbeddedSignature] = []
    notes: list[str] = []
    for desc in delta.signatures:
        mbytes = _fetch_small(source, desc, documents.MAX_MANIFEST, cancel)
        try:
            m = documents.parse_manifest(mbytes)
        except FormatError as e:
            notes.append(f"signature {desc.digest} ignored: {e}")
            continue
        wanted = [m.config, *m.layers]
        if len(m.layers) > MAX_SIGNATURE_LAYERS:
            notes.append(f"signature {desc.digest} ignored: too many layers")
            continue
        missing = [d.digest for d in wanted if d.digest not in delta.signature_content]
        if missing:
            notes.append(f"signature {desc.digest} is incomplete in the delta (no {missing[0]})")
            continue
        cbytes = _fetch_small(source, delta.signature_content[m.config.digest],
                              MAX_SIGNATURE_BLOB, cancel)
        layers = [(d, _fetch_small(source, delta.signature_content[d.digest],
                                   MAX_SIGNATURE_BLOB, cancel)) for d in m.layers]
        for d, data in [(m.config, cbytes), *layers]:
            if len(data) != d.size:
                raise DeltaFormatError(f"signature blob {d.digest} has the wrong size")
        out.append(EmbeddedSignature(desc.digest, mbytes, m.config, cbytes, layers))
    return out, notes


def _have_image(repo: Repository, target: TargetImage) -> bool:
    verity = repo.has_stream(image.MANIFEST_PREFIX + target.manifest_digest)
    if verity is None or not repo.has_object(verity):
        return False
    try:
        img = OciImage.open(repo, target.manifest_digest, verity)
    except (FormatError, NotFound, CorruptObject, OSError):
        return False
    return all(v is not None and repo.has_object(v)
               for v in (img.layer_refs.get(d) for d in img.layer_order()))


class _Worker:
    """Runs layer jobs on a thread pool; shared, read-only state of one application."""

    def __init__(self, repo: Repository, source: Source, opts: ApplyOptions,
                 events: EventChannel,
                 resolver: concurrent.futures.Future[TreeSource] | None) -> None:
        self.repo = repo
        self.source = source
        self.opts = opts
        self.events = events
        self.resolver = resolver
        self.local = is_local(source)

    def _blob(self, job: _Job) -> tuple[BlobReader, Callable[[], None] | None]:
        """A reader of the verified delta blob from its start (and a final check)."""
        d = job.blob
        cancel = self.opts.cancel
        progress = self.events.progress(job.diff_id, d.size)
        if self.local:
            first = VerifyingReader(self.source.blob(d.digest, d.size), d.digest, d.size,
                                    cancel=cancel)
            try:
                first.finish()
            finally:
                first.close()
            again = VerifyingReader(self.source.blob(d.digest, d.size), d.digest, d.size,
                                    progress, cancel)
            return again, again.finish
        fd = temp_file(self.repo)
        try:
            reader = VerifyingReader(self.source.blob(d.digest, d.size), d.digest, d.size,
                                     progress, cancel)
            try:
                while data := reader.read(CHUNK):
                    mv = memoryview(data)
                    while mv:
                        mv = mv[os.write(fd, mv):]
                reader.finish()
            finally:
                reader.close()
        except BaseException:
            os.close(fd)
            raise
        return RangeReader(fd, 0, d.size, lambda: os.close(fd)), None

    def run(self, job: _Job) -> StagedLayer:
        """Rebuild one layer into a staging area (the caller commits or aborts it)."""
        with self.opts.worker_context():
            self.events.put({"started": {"id": job.diff_id, "total": job.blob.size,
                                         "unit": "Bytes"}})
            blob, finish = self._blob(job)
            try:
                if job.tardiff:
                    assert self.resolver is not None
                    resolver = self.resolver.result()  # the tree is built while blobs load
                    limit = expected_layer_limit(job.target)
                    if self.opts.max_layer_output is not None:
                        limit = min(limit, self.opts.max_layer_output)
                    staged = stage_tardiff(self.repo, blob, resolver, job.diff_id,
                                           max_output=limit, cancel=self.opts.cancel,
                                           before_commit=finish)
                else:
                    staged = stage_original(self.repo, blob, job.diff_id, before_commit=finish)
            finally:
                blob.close()
            self.events.put({"done": {"id": job.diff_id, "transferred": job.blob.size}})
            return staged


def _plan(repo: Repository, delta: DeltaManifest, target: TargetImage,
          layer_refs: dict[str, bytes]) -> tuple[list[_Job], list[str]]:
    """Jobs for the layers to rebuild, and the diff_ids already stored."""
    jobs: list[_Job] = []
    present: list[str] = []
    planned: set[str] = set()
    for diff_id, desc in zip(target.diff_ids, target.manifest.layers, strict=True):
        verity = layer_refs.get(diff_id) or image.stored_layer(repo, diff_id)
        if verity is not None:
            layer_refs[diff_id] = verity
            present.append(diff_id)
            continue
        if diff_id in planned:
            continue
        blob = delta.layers.get(desc.digest)
        if blob is None:
            raise DeltaNotApplicable(f"delta not applicable: reused layer {diff_id} not found "
                                     f"in the repository")
        if blob.media_type != mediatypes.TAR_DIFF and not mediatypes.is_tar_layer(
                blob.media_type):
            raise DeltaFormatError(f"unsupported delta layer media type {blob.media_type!r}")
        jobs.append(_Job(diff_id, desc, blob))
        planned.add(diff_id)
    return jobs, present


def _run_jobs(worker: _Worker, jobs: list[_Job], done_count: int, total: int,
              staged: list[StagedLayer]) -> Generator[Event, None, None]:
    opts = worker.opts
    workers = opts.concurrency or ((os.cpu_count() or 2) if worker.local else REMOTE_INFLIGHT)
    workers = max(1, min(workers, len(jobs)))
    order = sorted(jobs, key=lambda j: -j.blob.size) if worker.local else jobs

    def done(_job: _Job, layer: StagedLayer) -> list[Event]:
        nonlocal done_count
        staged.append(layer)
        done_count += 1
        return [{"progress": {"id": APPLY_ID, "fetched": done_count, "total": total}}]

    yield from run_pooled(order, worker.run, workers, worker.events, opts.cancel,
                          "delta-layer", done, lambda _job, layer: staged.append(layer))


def _source_tree(repo: Repository, src: SourceImage) -> TreeSource:
    fs: FileSystem = build_tree(repo, src)
    return TreeSource(repo, fs)


def _import_target(repo: Repository, source: Source, delta: DeltaManifest,
                   target: TargetImage, opts: ApplyOptions, stats: ImportStats
                   ) -> Generator[Event, None, None]:
    yield {"message": "Looking up source image..."}
    src = find_source_image(repo, delta.source_config, opts.source_image)
    layer_refs: dict[str, bytes] = {}
    config_verity = repo.has_stream(image.CONFIG_PREFIX + target.config_digest)
    if config_verity is not None and repo.has_object(config_verity):
        _, named = image.read_external(repo, config_verity, OCI_CONFIG)
        layer_refs = {k: v for k, v in named.items() if not k.startswith(image.IMAGE_REF_V2)
                      and repo.has_object(v)}
    else:
        config_verity = None
    jobs, present = _plan(repo, delta, target, layer_refs)
    total = len(target.diff_ids)
    stats.layers_already_present += total - len(jobs)
    resolver: concurrent.futures.Future[TreeSource] | None = None
    builder = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                    thread_name_prefix="delta-source")
    staged: list[StagedLayer] = []
    try:
        if any(j.tardiff for j in jobs):
            yield {"message": "Building data source from base image..."}
            resolver = builder.submit(_source_tree, repo, src)
        yield {"started": {"id": APPLY_ID, "total": total, "unit": "Items"}}
        for diff_id in present:
            yield {"skipped": {"id": diff_id}}
        if jobs:
            worker = _Worker(repo, source, opts, EventChannel(), resolver)
            yield from _run_jobs(worker, jobs, total - len(jobs), total, staged)
        yield {"done": {"id": APPLY_ID, "transferred": total}}
        yield {"message": "Storing config and manifest..."}
        # From here on nothing yields: a client going away cannot interrupt publication.
        for s in staged:
            s.staging.commit()
            layer_refs[s.diff_id] = s.verity
            stats += s.stats
    finally:
        builder.shutdown(wait=True, cancel_futures=True)
        for s in staged:
            s.staging.abort()
    to_publish = [(image.layer_id(s.diff_id), s.verity) for s in staged]
    ordered = [(d, layer_refs[d]) for d in target.diff_ids]
    if config_verity is None:
        config_verity = image.write_config(repo, target.config_bytes, target.config_digest,
                                           ordered, publish=False)
        to_publish.append((image.CONFIG_PREFIX + target.config_digest, config_verity))
    manifest_verity = repo.has_stream(image.MANIFEST_PREFIX + target.manifest_digest)
    if manifest_verity is None or not repo.has_object(manifest_verity):
        manifest_verity = image.write_manifest(repo, target.manifest_bytes,
                                               target.manifest_digest, target.config_digest,
                                               config_verity, ordered, publish=False)
        to_publish.append((image.MANIFEST_PREFIX + target.manifest_digest, manifest_verity))
    image.publish_streams(repo, to_publish)


def store_signatures(repo: Repository, subject: str, sigs: list[EmbeddedSignature]) -> None:
    """Keep embedded signatures as artifacts referring to the target manifest."""
    to_publish: list[tuple[str, bytes]] = []
    for sig in sigs:
        if repo.has_stream(image.MANIFEST_PREFIX + sig.digest) is not None:
            continue
        refs: list[tuple[str, bytes]] = []
        for desc, data in sig.layers:
            verity = image.stored_layer(repo, desc.digest)
            if verity is None:
                w = repo.create_stream(OCI_BLOB)
                w.write_external(data)
                verity = w.done()
                to_publish.append((image.layer_id(desc.digest), verity))
            refs.append((desc.digest, verity))
        cverity = repo.has_stream(image.CONFIG_PREFIX + sig.config.digest)
        if cverity is None:
            cverity = image.write_config(repo, sig.config_bytes, sig.config.digest, refs,
                                         publish=False)
            to_publish.append((image.CONFIG_PREFIX + sig.config.digest, cverity))
        mverity = image.write_manifest(repo, sig.manifest, sig.digest, sig.config.digest,
                                       cverity, refs, publish=False)
        to_publish.append((image.MANIFEST_PREFIX + sig.digest, mverity))
    image.publish_streams(repo, to_publish)
    for sig in sigs:
        repo.name_stream(image.MANIFEST_PREFIX + sig.digest,
                         image.referrer_ref(subject, sig.digest))


def apply_delta(repo: Repository, source: Source, manifest: bytes, digest: str,
                options: ApplyOptions | None = None) -> Generator[Event, None, PullResult]:
    """Apply the delta whose (verified) manifest was read from *source*; closes *source*."""
    opts = options or ApplyOptions()
    try:
        return (yield from _apply(repo, source, manifest, digest, opts))
    except BaseException:
        opts.cancel.set()
        raise
    finally:
        source.close()


def _apply(repo: Repository, source: Source, manifest: bytes, digest: str,
           opts: ApplyOptions) -> Generator[Event, None, PullResult]:
    if opts.tag is not None:
        image.validate_tag(opts.tag)
    yield {"message": f"Detected delta artifact {digest}"}
    delta = parse_delta_manifest(manifest, digest)
    mbytes = _fetch_small(source, delta.manifest_desc, documents.MAX_MANIFEST, opts.cancel)
    cbytes = _fetch_small(source, delta.config_desc, documents.MAX_CONFIG, opts.cancel)
    target = verify_target(delta, mbytes, cbytes)
    sigs, notes = _fetch_signatures(source, delta, opts.cancel)
    for note in notes:
        yield {"message": note}
    if opts.verify_key is not None:
        which = verify_signatures(opts.verify_key, target.manifest_digest, sigs)
        yield {"message": f"Signature {which} verified for {target.manifest_digest}"}
    stats = ImportStats(layers=len(target.diff_ids))
    if _have_image(repo, target):
        yield {"message": "Target image already present."}
        stats.layers_already_present = len(target.diff_ids)
        if opts.source_image is not None:
            find_source_image(repo, delta.source_config, opts.source_image)
    else:
        yield from _import_target(repo, source, delta, target, opts, stats)
    yield {"message": "Generating composefs image"}
    done = finalize_image(repo, target.manifest_digest)
    if sigs:
        store_signatures(repo, target.manifest_digest, sigs)
    if opts.tag is not None:
        image.tag(repo, target.manifest_digest, opts.tag)
    return PullResult(target.manifest_digest, target.config_digest, done.manifest_verity,
                      done.config_verity, stats, opts.tag, done.images)


def apply_delta_reference(repo: Repository, reference: str,
                          options: ApplyOptions | None = None
                          ) -> Generator[Event, None, PullResult]:
    """Open the delta *reference* (``oci:``, ``oci-archive:`` or ``docker://``) and apply it."""
    opts = options or ApplyOptions()
    repo.ensure_writable()
    if opts.tag is not None:
        image.validate_tag(opts.tag)
    source = open_source(parse(reference), opts.opener, tls_verify=opts.tls_verify,
                         credentials=opts.credentials, auth_configs=opts.auth_configs)
    try:
        mbytes, mdigest = resolve_manifest(source, host_platform())
        if not is_delta_manifest(documents.parse_manifest(mbytes)):
            raise NotADelta(f"{reference} is not an oci-delta artifact")
    except BaseException:
        source.close()
        raise
    return (yield from apply_delta(repo, source, mbytes, mdigest, opts))


__all__ = ["ApplyOptions", "NotADelta", "apply_delta", "apply_delta_reference", "is_local",
           "store_signatures"]

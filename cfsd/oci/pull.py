"""Pulling an image into the repository (docs/pull.md), verifying every byte on every transport.

``pull()`` is a generator: it yields progress events (dicts shaped like the varlink Pull
frames: ``started``/``progress``/``skipped``/``done``/``message``) and returns a
``PullResult``.  Layers are fetched in parallel (largest first, bounded pool); each is
hashed compressed and uncompressed while it is split, staged, and published only after its
blob digest and diff_id both match.  The config and manifest streams are written from the
raw bytes; the tag is set last.
"""

from __future__ import annotations

import concurrent.futures
import os
import platform
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from cfsd.core.errors import FormatError, NotFound, RepositoryError
from cfsd.core.repository import Repository
from cfsd.core.splitstream import OCI_BLOB, OCI_CONFIG
from cfsd.oci import documents, image, mediatypes
from cfsd.oci.compression import decompressed
from cfsd.oci.digest import Digest, DigestMismatch
from cfsd.oci.documents import Descriptor, Manifest
from cfsd.oci.finalize import finalize_image
from cfsd.oci.layers import import_layer
from cfsd.oci.reference import ImageReference, parse
from cfsd.oci.registry import Credentials
from cfsd.oci.sources import BlobReader, PathOpener, Source, open_source
from cfsd.oci.stats import ImportStats
from cfsd.oci.workers import EventChannel, run_pooled

Event = dict[str, Any]
MAX_INDEX_DEPTH = 4


class Cancelled(RepositoryError):
    """The pull was abandoned (client went away)."""


class UnsupportedImage(FormatError):
    """A manifest or layer kind cfsd does not import."""


class DeltaArtifact(RepositoryError):  # noqa: N818 - a signal, not a failure
    """The reference names an oci-delta artifact: the caller applies it instead.

    Carries the verified manifest bytes and digest and the still-open source.
    """

    def __init__(self, manifest: bytes, digest: str, source: Source) -> None:
        super().__init__(f"{digest} is an oci-delta artifact")
        self.manifest = manifest
        self.digest = digest
        self.source = source


def layer_workers() -> int:
    """Default number of layers imported at once."""
    return max(2, min(4, os.cpu_count() or 2))


def host_platform() -> str:
    """``linux/<arch>`` in OCI/Go naming for this machine."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
            "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}.get(machine, machine)
    return f"linux/{arch}"


@dataclass
class PullOptions:
    """Knobs of one pull."""

    tag: str | None = None
    platform: str | None = None
    tls_verify: bool = True
    credentials: Credentials | None = None
    auth_configs: list[bytes] = field(default_factory=list)
    opener: PathOpener | None = None
    max_workers: int | None = None          # None: the default (see layer_workers())
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class PullResult:
    """What a pull produced."""

    manifest_digest: str
    config_digest: str
    manifest_verity: bytes
    config_verity: bytes
    stats: ImportStats
    tag: str | None
    images: dict[int, bytes] = field(default_factory=dict)


class VerifyingReader:
    """Hashes and counts a blob as it is read; finish() proves digest and size."""

    def __init__(self, src: BlobReader, digest: str, size: int,
                 on_bytes: Callable[[int], None] | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.src = src
        self.digest = Digest.parse(digest)
        self.size = size
        self.hash = self.digest.hasher()
        self.count = 0
        self._on_bytes = on_bytes
        self._cancel = cancel

    def read(self, n: int = -1, /) -> bytes:
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("pull cancelled")
        data = self.src.read(n)
        if data:
            self.count += len(data)
            if self.count > self.size:
                raise DigestMismatch(f"blob {self.digest} is larger than its descriptor "
                                     f"({self.size} bytes)")
            self.hash.update(data)
            if self._on_bytes is not None:
                self._on_bytes(self.count)
        return data

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def finish(self) -> None:
        """Drain what is left and check size and digest (DigestMismatch otherwise)."""
        while self.read(1 << 20):
            pass
        if self.count != self.size:
            raise DigestMismatch(f"blob {self.digest} is truncated ({self.count} of "
                                 f"{self.size} bytes)")
        if self.hash.hexdigest() != self.digest.hex:
            raise DigestMismatch(f"blob content does not match its digest {self.digest}")

    def close(self) -> None:
        self.src.close()


def _check(data: bytes, digest: str, what: str) -> None:
    if not Digest.parse(digest).matches(data):
        raise DigestMismatch(f"{what} does not match its digest {digest}")


def _select_platform(index_bytes: bytes, wanted: str) -> Descriptor:
    index = documents.parse_index(index_bytes)
    os_, _, rest = wanted.partition("/")
    arch, _, variant = rest.partition("/")
    candidates = [d for d in index.manifests
                  if d.platform and d.platform.os == os_ and d.platform.architecture == arch
                  and (not variant or (d.platform.variant or "") == variant)]
    if not candidates:
        no_platform = [d for d in index.manifests if d.platform is None]
        if len(index.manifests) == 1 and no_platform:
            return no_platform[0]
        raise NotFound(f"No manifest found for platform {wanted}")
    return candidates[0]


def _untagged_layout(source: Source) -> bool:
    """An oci:/oci-archive: source named without a tag or digest (its index.json is top)."""
    ref = getattr(source, "ref", None)
    return (getattr(ref, "transport", None) in ("oci", "oci-archive")
            and not getattr(ref, "tag", None) and not getattr(ref, "digest", None))


def resolve_manifest(source: Source, wanted_platform: str) -> tuple[bytes, str]:
    """(manifest bytes, manifest digest) after platform selection, all digests checked."""
    data, mtype, expected = source.top()
    if expected is not None:
        _check(data, expected, "manifest")
    for depth in range(MAX_INDEX_DEPTH):
        kind = documents.media_type_of(data, mtype)
        if kind in mediatypes.INDEXES:
            if depth == 0 and _untagged_layout(source) and \
                    len(documents.parse_index(data).manifests) > 1:
                # skopeo's words: a layout's index.json lists images, not platforms
                raise NotFound(f"more than one image in oci, choose an image "
                               f"({source.description}:TAG or @DIGEST)")
            desc = _select_platform(data, wanted_platform)
            child = source.manifest(desc.digest, desc.size or None)
            _check(child, desc.digest, "manifest")
            if desc.size and len(child) != desc.size:
                raise DigestMismatch(f"manifest {desc.digest} has the wrong size")
            data, mtype, expected = child, desc.media_type or None, desc.digest
            continue
        if kind not in mediatypes.MANIFESTS:
            raise UnsupportedImage(f"unsupported manifest media type {kind!r}")
        return data, expected or image.sha256_digest(data)
    raise FormatError("image index nesting too deep")


@dataclass
class _LayerJob:
    index: int
    desc: Descriptor
    stream_id_digest: str   # diff_id (container) or blob digest (artifact)
    container: bool


class _InFlight:
    """Layers being imported right now in this process, so racing pulls write them once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[tuple[int, int, str], concurrent.futures.Future[bytes]] = {}

    def claim(self, repo: Repository, ident: str
              ) -> tuple[concurrent.futures.Future[bytes], bool]:
        """(future, True) for the importer; (the importer's future, False) for others."""
        st = os.fstat(repo.fd)
        key = (st.st_dev, st.st_ino, ident)
        with self._lock:
            fut = self._futures.get(key)
            if fut is not None:
                return fut, False
            fut = self._futures[key] = concurrent.futures.Future()
            return fut, True

    def release(self, repo: Repository, ident: str) -> None:
        """Forget a finished import."""
        st = os.fstat(repo.fd)
        with self._lock:
            self._futures.pop((st.st_dev, st.st_ino, ident), None)


_INFLIGHT = _InFlight()


def _import_one(repo: Repository, source: Source, job: _LayerJob, events: EventChannel,
                cancel: threading.Event) -> tuple[bytes, ImportStats]:
    ident = job.stream_id_digest
    while True:
        fut, owner = _INFLIGHT.claim(repo, ident)
        if owner:
            break
        try:
            verity = fut.result()
        except BaseException:  # noqa: BLE001 - the other import failed: do our own
            continue
        events.put({"skipped": {"id": ident}})
        return verity, ImportStats(layers_already_present=1)
    try:
        verity, stats = _import_fetch(repo, source, job, events, cancel)
    except BaseException as e:
        fut.set_exception(e)
        _INFLIGHT.release(repo, ident)
        raise
    fut.set_result(verity)
    _INFLIGHT.release(repo, ident)
    return verity, stats


def _import_fetch(repo: Repository, source: Source, job: _LayerJob, events: EventChannel,
                  cancel: threading.Event) -> tuple[bytes, ImportStats]:
    ident = job.stream_id_digest
    desc = job.desc
    existing = image.stored_layer(repo, ident)
    if existing is not None:
        events.put({"skipped": {"id": ident}})
        return existing, ImportStats(layers_already_present=1)
    events.put({"started": {"id": ident, "total": desc.size, "unit": "Bytes"}})
    reader = VerifyingReader(source.blob(desc.digest, desc.size), desc.digest, desc.size,
                             events.progress(ident, desc.size), cancel)
    try:
        if job.container:
            tar, _ = decompressed(reader)
            try:
                res = import_layer(repo, tar, ident, before_commit=reader.finish,
                                   publish=False)
            except FormatError:
                # Undecodable data: if the blob itself is not what the manifest names,
                # that is the error to report.
                tar.close()
                reader.finish()
                raise
            finally:
                tar.close()
            verity, stats = res.verity, res.stats
        else:
            verity, stats = _import_blob(repo, reader, ident)
    finally:
        reader.close()
    events.put({"done": {"id": ident, "transferred": desc.size}})
    return verity, stats


def _import_blob(repo: Repository, reader: VerifyingReader, digest: str,
                 publish: bool = False) -> tuple[bytes, ImportStats]:
    """An artifact blob: one streamed object wrapped in an oci_blob splitstream."""
    with repo.staging() as staging:
        w = staging.object_writer()
        try:
            while data := reader.read(1 << 20):
                w.write(data)
            reader.finish()
            res = w.finish()
        finally:
            w.abort()
        ss = repo.create_stream(OCI_BLOB, staging)
        ss.add_external(res.digest, res.size, new=res.new)
        verity = ss.done()
        staging.commit()
    if publish:
        repo.register_stream(image.layer_id(digest), verity)
    stats = ImportStats(objects_copied=int(res.new), objects_already_present=int(not res.new),
                        bytes_copied=res.size if res.new else 0)
    return verity, stats


def pull(repo: Repository, reference: str, options: PullOptions | None = None
         ) -> Generator[Event, None, PullResult]:
    """Pull *reference* into *repo*; yields progress events, returns the result."""
    opts = options or PullOptions()
    repo.ensure_writable()
    ref: ImageReference = parse(reference)
    if opts.tag is not None:
        image.validate_tag(opts.tag)
    source = open_source(ref, opts.opener, tls_verify=opts.tls_verify,
                         credentials=opts.credentials, auth_configs=opts.auth_configs)
    try:
        result = yield from _pull(repo, source, opts)
    except DeltaArtifact:
        raise  # the caller owns the source now
    except BaseException:
        source.close()
        raise
    source.close()
    yield {"message": "Generating composefs image"}
    done = finalize_image(repo, result.manifest_digest)
    result.manifest_verity, result.config_verity = done.manifest_verity, done.config_verity
    result.images = done.images
    if opts.tag is not None:
        image.tag(repo, result.manifest_digest, opts.tag)
        result.tag = opts.tag
    return result


def _pull(repo: Repository, source: Source, opts: PullOptions
          ) -> Generator[Event, None, PullResult]:
    mbytes, mdigest = resolve_manifest(source, opts.platform or host_platform())
    manifest: Manifest = documents.parse_manifest(mbytes)
    if manifest.artifact_type == mediatypes.DELTA_ARTIFACT:
        raise DeltaArtifact(mbytes, mdigest, source)
    cdesc = manifest.config
    container = mediatypes.is_container_config(cdesc.media_type)
    stats = ImportStats()

    config_verity = repo.has_stream(image.CONFIG_PREFIX + cdesc.digest)
    layer_refs: dict[str, bytes] = {}
    if config_verity is not None and repo.has_object(config_verity):
        cbytes, named = image.read_external(repo, config_verity, OCI_CONFIG)
        _check(cbytes, cdesc.digest, "stored config")
        yield {"message": f"Already have container config {cdesc.digest}"}
        layer_refs = {k: v for k, v in named.items() if not k.startswith(image.IMAGE_REF_V2)}
    else:
        config_verity = None
        yield {"message": f"Fetching config {cdesc.digest}"}
        if cdesc.size > documents.MAX_CONFIG:
            raise FormatError(f"config too large ({cdesc.size} bytes)")
        reader = VerifyingReader(source.blob(cdesc.digest, cdesc.size), cdesc.digest,
                                 cdesc.size)
        try:
            parts = []
            while data := reader.read(1 << 20):
                parts.append(data)
            reader.finish()
        finally:
            reader.close()
        cbytes = b"".join(parts)

    if container:
        config = documents.parse_config(cbytes)
        ids = list(config.rootfs.diff_ids)
        if len(ids) != len(manifest.layers):
            raise FormatError(f"config lists {len(ids)} diff_ids but the manifest has "
                              f"{len(manifest.layers)} layers")
        for d in manifest.layers:
            if not mediatypes.is_tar_layer(d.media_type):
                raise UnsupportedImage(f"unsupported layer media type {d.media_type!r}")
    else:
        ids = [d.digest for d in manifest.layers]

    jobs: list[_LayerJob] = []
    for i, (ident, desc) in enumerate(zip(ids, manifest.layers, strict=True)):
        verity = layer_refs.get(ident) or image.stored_layer(repo, ident)
        if verity is not None:
            layer_refs[ident] = verity
            stats.layers_already_present += 1
            yield {"skipped": {"id": ident}}
        elif ident not in {j.stream_id_digest for j in jobs}:
            jobs.append(_LayerJob(i, desc, ident, container))
    stats.layers = len(ids)
    jobs.sort(key=lambda j: -j.desc.size)
    yield from _run_layers(repo, source, jobs, layer_refs, stats, opts)

    # Everything below is stored first and named after one syncfs.
    to_publish = [(image.layer_id(j.stream_id_digest), layer_refs[j.stream_id_digest])
                  for j in jobs]
    ordered = [(ident, layer_refs[ident]) for ident in ids]
    if config_verity is None:
        config_verity = image.write_config(repo, cbytes, cdesc.digest, ordered, publish=False)
        to_publish.append((image.CONFIG_PREFIX + cdesc.digest, config_verity))
    manifest_verity = repo.has_stream(image.MANIFEST_PREFIX + mdigest)
    if manifest_verity is None or not repo.has_object(manifest_verity):
        yield {"message": f"Storing manifest {mdigest}"}
        manifest_verity = image.write_manifest(repo, mbytes, mdigest, cdesc.digest,
                                               config_verity, ordered, publish=False)
        to_publish.append((image.MANIFEST_PREFIX + mdigest, manifest_verity))
    else:
        yield {"message": f"Already have manifest {mdigest}"}
    image.publish_streams(repo, to_publish)
    return PullResult(mdigest, cdesc.digest, manifest_verity, config_verity, stats, None)


def _run_layers(repo: Repository, source: Source, jobs: list[_LayerJob],
                layer_refs: dict[str, bytes], stats: ImportStats, opts: PullOptions
                ) -> Generator[Event, None, None]:
    if not jobs:
        return
    events = EventChannel()

    def done(job: _LayerJob, result: tuple[bytes, ImportStats]) -> list[Event]:
        nonlocal stats
        layer_refs[job.stream_id_digest] = result[0]
        stats += result[1]
        return []

    yield from run_pooled(jobs, lambda j: _import_one(repo, source, j, events, opts.cancel),
                          opts.max_workers or layer_workers(), events, opts.cancel,
                          "pull-layer", done)

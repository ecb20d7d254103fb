"""Importing a layer tar into the repository as ``oci-layer-<diff_id>`` (docs/splitstream.md).

The tar is hashed while it is split; objects go to a staging area and the stream is
published only when the whole tar parsed and its digest equals the expected diff_id, so a
bad or truncated input leaves the repository unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cfsd.core.errors import RepositoryError
from cfsd.core.objects import ObjectStore, Staging
from cfsd.core.repository import Repository
from cfsd.core.splitstream import TAR_LAYER
from cfsd.core.tar import Reader, split_tar
from cfsd.oci.digest import Digest
from cfsd.oci.image import layer_id
from cfsd.oci.stats import ImportStats


class DiffIdMismatch(RepositoryError):
    """The layer content does not hash to the expected diff_id."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"layer digest mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class HashingReader:
    """Pass-through reader that hashes (and counts) what it reads (the diff_id check)."""

    def __init__(self, src: Reader, digest: Digest) -> None:
        self.src = src
        self.hash = digest.hasher()
        self.size = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self.src.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data


@dataclass
class LayerResult:
    """Outcome of a layer import."""

    verity: bytes
    already_present: bool
    stats: ImportStats
    size: int = 0


def import_layer(repo: Repository, src: Reader, diff_id: str, name: str | None = None, *,
                 before_commit: Callable[[], None] | None = None,
                 publish: bool = True,
                 store: Callable[[Staging], ObjectStore] | None = None) -> LayerResult:
    """Split the uncompressed tar read from *src* into ``oci-layer-<diff_id>``.

    *before_commit* runs after the diff_id matched and before anything becomes visible (a
    pull uses it to finish verifying the compressed blob).  With ``publish=False`` the
    objects are committed but the stream is not named (the caller registers it later).
    *store* wraps the staging area the objects go through (PutLayer's zero-copy linking).
    """
    digest = Digest.parse(diff_id)
    content_id = layer_id(str(digest))
    existing = repo.has_stream(content_id)
    if existing is not None and repo.has_object(existing):
        if name is not None:
            repo.name_stream(content_id, name)
        return LayerResult(existing, True, ImportStats(layers_already_present=1))
    reader = HashingReader(src, digest)
    with repo.staging() as staging:
        writer = repo.create_stream(TAR_LAYER, staging if store is None else store(staging))
        split_tar(reader, writer)
        actual = reader.hash.hexdigest()
        if actual != digest.hex:
            raise DiffIdMismatch(str(digest), f"{digest.algorithm}:{actual}")
        verity = writer.done()
        if before_commit is not None:
            before_commit()
        staging.commit()
    if publish:
        repo.register_stream(content_id, verity, name)
    stats = ImportStats(objects_copied=writer.new_objects,
                        objects_already_present=writer.present_objects,
                        bytes_copied=writer.new_bytes, bytes_inlined=writer.inline_bytes)
    return LayerResult(verity, False, stats, reader.size)

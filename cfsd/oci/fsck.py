"""OCI-aware integrity check (``oci fsck`` / varlink ``Oci.Check``).

On top of the repository fsck, every tagged image (or one) is checked: the stored manifest
and config hash to their digests, the config is linked from the manifest, every layer has a
named ref, a stream and its object.  Error strings are upstream's (upstream cfsctl's `oci fsck`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cfsd.core.errors import FormatError, NotFound, RepositoryError
from cfsd.core.fsck import FsckResult, fsck
from cfsd.core.repository import Repository
from cfsd.core.splitstream import OCI_CONFIG, OCI_MANIFEST
from cfsd.oci import image, mediatypes
from cfsd.oci.digest import Digest, InvalidDigest
from cfsd.oci.documents import parse_config, parse_manifest


@dataclass
class OciFsckResult:
    """Repository findings plus per-image findings."""

    repo: FsckResult
    images_checked: int = 0
    images_corrupted: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No finding at either level."""
        return self.repo.ok and not self.errors

    def to_dict(self) -> dict[str, Any]:
        """The varlink Check reply."""
        return {"ok": self.ok, "images_checked": self.images_checked,
                "images_corrupted": self.images_corrupted, "errors": list(self.errors),
                "repo": self.repo.to_dict()}


def _check_image(repo: Repository, name: str, digest: str, res: OciFsckResult) -> None:
    res.images_checked += 1
    before = len(res.errors)
    _check_image_links(repo, name, digest, res)
    if len(res.errors) > before:
        res.images_corrupted += 1


def _check_image_links(repo: Repository, name: str, digest: str, res: OciFsckResult) -> None:
    """Record findings for one image; returns at the first one that stops the walk."""
    def err(kind: str, detail: str) -> None:
        res.errors.append(f"fsck: {kind}: {name}: {detail}")

    try:
        verity = repo.has_stream(image.MANIFEST_PREFIX + digest)
        if verity is None:
            raise NotFound(f"manifest stream {image.MANIFEST_PREFIX}{digest} missing")
        mbytes, mrefs = image.read_external(repo, verity, OCI_MANIFEST)
    except (RepositoryError, OSError) as e:
        err("manifest-read-failed", str(e))
        return
    actual = image.sha256_digest(mbytes)
    if actual != digest:
        err("manifest-digest-mismatch", f"expected {digest}, got {actual}")
        return
    try:
        manifest = parse_manifest(mbytes)
    except FormatError as e:
        err("manifest-parse-failed", str(e))
        return
    cdigest = manifest.config.digest
    cverity = mrefs.get(f"config:{cdigest}")
    if cverity is None:
        err("config-ref-missing", cdigest)
        return
    try:
        cbytes, crefs = image.read_external(repo, cverity, OCI_CONFIG)
    except (RepositoryError, OSError) as e:
        err("config-read-failed", str(e))
        return
    actual = image.sha256_digest(cbytes)
    if actual != cdigest:
        err("config-digest-mismatch", f"expected {cdigest}, got {actual}")
        return
    if mediatypes.is_container_config(manifest.config.media_type):
        try:
            config = parse_config(cbytes)
        except FormatError as e:
            err("config-parse-failed", str(e))
            return
        for diff_id in config.rootfs.diff_ids:
            lverity = crefs.get(diff_id)
            if lverity is None:
                err("layer-ref-missing", diff_id)
                continue
            try:
                Digest.parse(diff_id)
            except InvalidDigest as e:
                err("layer-check-failed", f"{diff_id}: Invalid diff_id: {e}")
                continue
            if repo.has_stream(image.layer_id(diff_id)) is None:
                err("layer-stream-missing", diff_id)
            if not repo.has_object(lverity):
                err("layer-object-missing", f"{diff_id}: object {lverity.hex()} missing")
    else:
        for d in manifest.layers:
            lverity = mrefs.get(d.digest)
            if lverity is None:
                err("artifact-layer-ref-missing", d.digest)
            elif not repo.has_object(lverity):
                err("artifact-layer-object-missing", f"{d.digest}: object {lverity.hex()} "
                                                     "missing")


def oci_fsck(repo: Repository, name: str | None = None) -> OciFsckResult:
    """Check the repository and all tagged images (or only *name*; NotFound if unknown)."""
    if name is not None:
        digest, _ = image.resolve(repo, name)
        targets = [(name, digest)]
    else:
        targets = image.list_tags(repo)
    res = OciFsckResult(fsck(repo))
    for tag, digest in targets:
        if tag.startswith("@") and name is None:
            res.images_checked += 1
            res.images_corrupted += 1
            res.errors.append(f"fsck: invalid-ref-name: {tag}: leading '@' is reserved for "
                              "digest references")
            continue
        _check_image(repo, tag, digest, res)
    return res

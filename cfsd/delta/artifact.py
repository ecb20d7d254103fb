"""oci-delta artifacts (docs/delta.md): the delta manifest's roles and the target image.

A delta is an OCI artifact manifest (``artifactType`` =
``application/vnd.io.github.containers.oci-delta.v1``) whose layers are role-tagged blobs
(annotation ``io.github.containers.delta.content``): the target manifest and config (raw
bytes), one blob per changed target layer (a tar-diff or the original compressed layer,
keyed by ``io.github.containers.delta.to`` = the target layer digest) and embedded cosign
signatures.  Unknown roles are ignored.  :func:`parse_delta_manifest` reads the roles;
:func:`verify_target` checks, in this order, the target manifest bytes against their
descriptor, ``delta.target`` and ``subject``; the config bytes against the manifest; the
diff_id count against the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cfsd.core.errors import FormatError, RepositoryError
from cfsd.oci import documents, mediatypes
from cfsd.oci.digest import Digest, DigestMismatch
from cfsd.oci.documents import Descriptor, ImageConfig, Manifest

ANN_TARGET = "io.github.containers.delta.target"
ANN_SOURCE = "io.github.containers.delta.source"
ANN_SOURCE_CONFIG = "io.github.containers.delta.source-config"
ANN_REUSED = "io.github.containers.delta.reused"
ANN_REUSED_DIFF_ID = "io.github.containers.delta.reused-diff-id"
ANN_CONTENT = "io.github.containers.delta.content"
ANN_TO = "io.github.containers.delta.to"

ROLE_MANIFEST = "image-manifest"
ROLE_CONFIG = "image-config"
ROLE_LAYER = "image-layer"
ROLE_SIGNATURE = "cosign-signature"
ROLE_SIGNATURE_CONTENT = "cosign-signature-content"

MAX_SIGNATURES = 64


class DeltaFormatError(FormatError):
    """The delta manifest is malformed or inconsistent."""


class DeltaNotApplicable(RepositoryError):
    """The delta does not apply to this repository (source image or reused layer missing)."""


@dataclass
class DeltaManifest:
    """The parsed roles of a delta manifest."""

    digest: str
    source_config: str
    target: str | None
    source_manifest: str | None
    subject: Descriptor | None
    manifest_desc: Descriptor
    config_desc: Descriptor
    layers: dict[str, Descriptor] = field(default_factory=dict)
    signatures: list[Descriptor] = field(default_factory=list)
    signature_content: dict[str, Descriptor] = field(default_factory=dict)


@dataclass
class TargetImage:
    """The verified target image carried by a delta: raw bytes and parsed views."""

    manifest_bytes: bytes
    manifest_digest: str
    manifest: Manifest
    config_bytes: bytes
    config_digest: str
    config: ImageConfig

    @property
    def diff_ids(self) -> list[str]:
        """The target's diff_ids (one per manifest layer)."""
        return list(self.config.rootfs.diff_ids)


def is_delta_manifest(manifest: Manifest) -> bool:
    """True for an oci-delta artifact manifest."""
    return manifest.artifact_type == mediatypes.DELTA_ARTIFACT


def _digest(text: str, what: str) -> str:
    Digest.parse(text)
    if not text.startswith("sha256:"):
        raise DeltaFormatError(f"{what} must be a sha256 digest: {text!r}")
    return text


def parse_delta_manifest(data: bytes, digest: str) -> DeltaManifest:
    """Read the roles of a delta manifest (DeltaFormatError / InvalidDigest on bad input)."""
    manifest = documents.parse_manifest(data)
    if not is_delta_manifest(manifest):
        raise DeltaFormatError(f"{digest} is not an oci-delta artifact "
                               f"(artifactType {manifest.artifact_type!r})")
    ann = manifest.annotations or {}
    if not ann:
        raise DeltaFormatError("Delta manifest has no annotations")
    source_config = ann.get(ANN_SOURCE_CONFIG)
    if not source_config:
        raise DeltaFormatError("Delta missing source config digest annotation")
    _digest(source_config, "delta source-config")
    target = ann.get(ANN_TARGET) or None
    if target is not None:
        _digest(target, "delta target")
    source_manifest = ann.get(ANN_SOURCE) or None
    roles: dict[str, list[Descriptor]] = {}
    layers: dict[str, Descriptor] = {}
    for d in manifest.layers:
        role = (d.annotations or {}).get(ANN_CONTENT)
        if role is None:
            continue
        if role == ROLE_LAYER:
            to = (d.annotations or {}).get(ANN_TO) or ""
            if not to:
                continue  # as upstream: an image-layer without a target is skipped
            _digest(to, "delta.to")
            if to in layers and layers[to].digest != d.digest:
                raise DeltaFormatError(f"two delta blobs reconstruct target layer {to}")
            layers[to] = d
        else:
            roles.setdefault(role, []).append(d)
    manifests = roles.get(ROLE_MANIFEST, [])
    configs = roles.get(ROLE_CONFIG, [])
    if not manifests:
        raise DeltaFormatError("Delta manifest has no embedded image manifest")
    if not configs:
        raise DeltaFormatError("Delta manifest has no embedded image config")
    if len({d.digest for d in manifests}) > 1 or len({d.digest for d in configs}) > 1:
        raise DeltaFormatError("Delta manifest embeds more than one image manifest or config")
    mdesc, cdesc = manifests[0], configs[0]
    _digest(mdesc.digest, "embedded image manifest")
    _digest(cdesc.digest, "embedded image config")
    if mdesc.size > documents.MAX_MANIFEST:
        raise DeltaFormatError(f"embedded image manifest too large ({mdesc.size} bytes)")
    if cdesc.size > documents.MAX_CONFIG:
        raise DeltaFormatError(f"embedded image config too large ({cdesc.size} bytes)")
    signatures = roles.get(ROLE_SIGNATURE, [])
    if len(signatures) > MAX_SIGNATURES:
        raise DeltaFormatError(f"too many embedded signatures ({len(signatures)})")
    content = {d.digest: d for d in roles.get(ROLE_SIGNATURE_CONTENT, [])}
    return DeltaManifest(digest, source_config, target, source_manifest, manifest.subject,
                         mdesc, cdesc, layers, signatures, content)


def verify_target(delta: DeltaManifest, manifest_bytes: bytes,
                  config_bytes: bytes) -> TargetImage:
    """Check the embedded target image (docs/delta.md) and parse it.

    The bytes must already have been checked against their delta descriptors (the blob
    reader does that); here they are checked against ``delta.target``, ``subject``, the
    manifest's config descriptor and the layer count.
    """
    mdigest = delta.manifest_desc.digest
    if not Digest.parse(mdigest).matches(manifest_bytes):
        raise DigestMismatch(f"embedded image manifest does not match {mdigest}")
    if delta.target is not None and delta.target != mdigest:
        raise DigestMismatch(f"embedded image manifest is {mdigest} but the delta targets "
                             f"{delta.target}")
    if delta.subject is not None:
        if delta.subject.digest != mdigest:
            raise DigestMismatch(f"delta subject {delta.subject.digest} is not the embedded "
                                 f"image manifest {mdigest}")
        if delta.subject.size != len(manifest_bytes):
            raise DigestMismatch(f"delta subject size {delta.subject.size} is not the size of "
                                 f"the embedded image manifest ({len(manifest_bytes)} bytes)")
    kind = documents.media_type_of(manifest_bytes)
    if kind not in mediatypes.MANIFESTS:
        raise DeltaFormatError(f"embedded image manifest has media type {kind!r}")
    manifest = documents.parse_manifest(manifest_bytes)
    cdesc = manifest.config
    if not mediatypes.is_container_config(cdesc.media_type):
        raise DeltaFormatError(f"delta target is not a container image (config media type "
                               f"{cdesc.media_type!r})")
    if cdesc.digest != delta.config_desc.digest:
        raise DigestMismatch(f"embedded image config is {delta.config_desc.digest} but the "
                             f"target manifest names {cdesc.digest}")
    if not Digest.parse(cdesc.digest).matches(config_bytes) or cdesc.size != len(config_bytes):
        raise DigestMismatch(f"embedded image config does not match {cdesc.digest}")
    config = documents.parse_config(config_bytes)
    if len(config.rootfs.diff_ids) != len(manifest.layers):
        raise DeltaFormatError(f"target config lists {len(config.rootfs.diff_ids)} diff_ids "
                               f"but the target manifest has {len(manifest.layers)} layers")
    for d in manifest.layers:
        if not mediatypes.is_tar_layer(d.media_type):
            raise DeltaFormatError(f"unsupported target layer media type {d.media_type!r}")
    return TargetImage(manifest_bytes, mdigest, manifest, config_bytes, cdesc.digest, config)


__all__ = ["DeltaFormatError", "DeltaManifest", "DeltaNotApplicable", "TargetImage",
           "is_delta_manifest", "parse_delta_manifest", "verify_target"]

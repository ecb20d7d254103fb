"""OCI documents (manifest, index, image config) parsed from raw bytes with validation.

Raw bytes are what gets stored and hashed; these models are only for reading fields.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cfsd.core.errors import FormatError
from cfsd.oci.digest import Digest, InvalidDigest

MAX_MANIFEST = 4 << 20
MAX_CONFIG = 8 << 20


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Platform(_Model):
    """The platform of an index entry."""

    architecture: str = ""
    os: str = ""
    variant: str | None = None


class Descriptor(_Model):
    """A content descriptor."""

    media_type: str = Field("", alias="mediaType")
    digest: str
    size: int = Field(ge=0)
    annotations: dict[str, str] | None = None
    platform: Platform | None = None
    artifact_type: str | None = Field(None, alias="artifactType")

    def parsed_digest(self) -> Digest:
        """The digest, validated."""
        return Digest.parse(self.digest)


class Manifest(_Model):
    """An image (or artifact) manifest."""

    schema_version: int = Field(alias="schemaVersion")
    media_type: str | None = Field(None, alias="mediaType")
    artifact_type: str | None = Field(None, alias="artifactType")
    config: Descriptor
    layers: list[Descriptor] = []
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None


class Index(_Model):
    """An image index / manifest list."""

    schema_version: int = Field(alias="schemaVersion")
    media_type: str | None = Field(None, alias="mediaType")
    manifests: list[Descriptor] = []


class RootFs(_Model):
    """``rootfs`` of an image config."""

    type: str = "layers"
    diff_ids: list[str] = []


class ImageConfig(_Model):
    """The fields of an image config cfsd reads."""

    architecture: str = ""
    os: str = ""
    created: str | None = None
    rootfs: RootFs = RootFs()


def _load(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{what} is not valid JSON: {e}") from None


def parse_manifest(data: bytes) -> Manifest:
    """Validate manifest bytes."""
    if len(data) > MAX_MANIFEST:
        raise FormatError(f"manifest too large ({len(data)} bytes)")
    try:
        m = Manifest.model_validate(_load(data, "manifest"))
        for d in [m.config, *m.layers]:
            d.parsed_digest()
        return m
    except (ValidationError, InvalidDigest) as e:
        raise FormatError(f"invalid manifest: {_brief(e)}") from None


def parse_index(data: bytes) -> Index:
    """Validate index bytes."""
    if len(data) > MAX_MANIFEST:
        raise FormatError(f"index too large ({len(data)} bytes)")
    try:
        return Index.model_validate(_load(data, "index"))
    except ValidationError as e:
        raise FormatError(f"invalid image index: {_brief(e)}") from None


def parse_config(data: bytes) -> ImageConfig:
    """Validate image config bytes (diff_ids must be valid digests)."""
    if len(data) > MAX_CONFIG:
        raise FormatError(f"config too large ({len(data)} bytes)")
    try:
        c = ImageConfig.model_validate(_load(data, "config"))
        for d in c.rootfs.diff_ids:
            Digest.parse(d)
        return c
    except (ValidationError, InvalidDigest) as e:
        raise FormatError(f"invalid image config: {_brief(e)}") from None


def media_type_of(data: bytes, header: str | None = None) -> str:
    """A document's media type: its ``mediaType`` field, the transport's, or by shape."""
    obj = _load(data, "manifest")
    if not isinstance(obj, dict):
        raise FormatError("manifest is not a JSON object")
    mt = obj.get("mediaType") or header or ""
    if not mt:
        mt = "application/vnd.oci.image.index.v1+json" if "manifests" in obj else (
            "application/vnd.oci.image.manifest.v1+json")
    return str(mt)


def _brief(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        return f"{loc}: {err.get('msg')}"
    return str(e)

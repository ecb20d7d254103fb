"""Embedded cosign signatures of a delta (docs/delta.md): verification with a public key.

A signature manifest's layers carry the base64 signature in the annotation
``dev.cosignproject.cosign/signature``; the signed data is the layer's payload blob, a cosign
"simple signing" document whose ``critical.type`` is ``cosign container image signature``
and whose ``critical.image.docker-manifest-digest`` must be the target manifest digest.
Verification passes when any layer of any embedded signature verifies with the key (ECDSA
and RSA PKCS#1 v1.5 / PSS with SHA-256, or Ed25519).  No transparency log is consulted.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from cfsd.core.errors import RepositoryError
from cfsd.oci.documents import Descriptor

SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIMPLE_SIGNING_TYPE = "cosign container image signature"
MAX_KEY = 64 << 10


class SignatureInvalid(RepositoryError):  # noqa: N818 - the varlink error's name
    """No embedded signature verifies with the given key for the target manifest."""


@dataclass
class EmbeddedSignature:
    """One cosign signature manifest of a delta with the blobs it references."""

    digest: str
    manifest: bytes
    config: Descriptor
    config_bytes: bytes
    layers: list[tuple[Descriptor, bytes]] = field(default_factory=list)


def load_public_key(pem: str | bytes) -> object:
    """Parse a PEM public key (SignatureInvalid if it is not one)."""
    raw = pem.encode() if isinstance(pem, str) else pem
    if len(raw) > MAX_KEY:
        raise SignatureInvalid("verification key is too large")
    try:
        return serialization.load_pem_public_key(raw)
    except (ValueError, TypeError) as e:
        raise SignatureInvalid(f"invalid verification key: {e}") from None


def _verify_raw(key: object, signature: bytes, data: bytes) -> bool:
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            try:
                key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            except InvalidSignature:
                key.verify(signature, data, padding.PSS(padding.MGF1(hashes.SHA256()),
                                                        padding.PSS.AUTO), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:
            raise SignatureInvalid(f"unsupported key type {type(key).__name__}")
    except InvalidSignature:
        return False
    return True


def _payload_names(payload: bytes, digest: str) -> str | None:
    """None if the simple-signing payload is about *digest*, otherwise why not."""
    try:
        doc = json.loads(payload)
        critical = doc["critical"]
        kind = critical["type"]
        signed = critical["image"]["docker-manifest-digest"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "payload is not a cosign simple-signing document"
    if kind != SIMPLE_SIGNING_TYPE:
        return f"payload type is {kind!r}"
    if signed != digest:
        return f"payload signs {signed}, not {digest}"
    return None


def verify_signatures(key_pem: str | bytes, target_digest: str,
                      signatures: list[EmbeddedSignature]) -> str:
    """Pass if any signature layer verifies for *target_digest*; returns its digest.

    Raises SignatureInvalid (with the reasons) otherwise, also when there is no signature.
    """
    key = load_public_key(key_pem)
    reasons: list[str] = []
    for sig in signatures:
        for desc, payload in sig.layers:
            b64 = (desc.annotations or {}).get(SIGNATURE_ANNOTATION)
            if not b64:
                continue
            try:
                raw = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                reasons.append(f"{desc.digest}: signature is not base64")
                continue
            if not _verify_raw(key, raw, payload):
                reasons.append(f"{desc.digest}: signature does not verify with the key")
                continue
            why = _payload_names(payload, target_digest)
            if why is not None:
                reasons.append(f"{desc.digest}: {why}")
                continue
            return desc.digest
    if not reasons:
        raise SignatureInvalid(f"the delta carries no signature for {target_digest}")
    raise SignatureInvalid(f"no embedded signature verifies for {target_digest}: "
                           + "; ".join(reasons[:8]))


__all__ = ["EmbeddedSignature", "SignatureInvalid", "load_public_key", "verify_signatures"]

"""OCI digest strings (``sha256:<hex>``): parsing, validation and hashing."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from cfsd.core.errors import RepositoryError

_SIZES = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")


class InvalidDigest(RepositoryError):
    """A malformed OCI digest string."""


class DigestMismatch(InvalidDigest):
    """Content does not match the digest (or size) that names it."""


@dataclass(frozen=True)
class Digest:
    """A parsed OCI content digest."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``<alg>:<hex>`` (sha256 or sha512, lower-case hex of the right length)."""
        alg, sep, hx = text.partition(":")
        if not sep or alg not in _SIZES:
            raise InvalidDigest(f"invalid digest {text!r}: expected sha256:<hex> or sha512:<hex>")
        if len(hx) != _SIZES[alg] or not _HEX.fullmatch(hx):
            raise InvalidDigest(f"invalid digest {text!r}: bad {alg} hex")
        return cls(alg, hx)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        """A fresh hashlib object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def matches(self, data: bytes) -> bool:
        """True if *data* hashes to this digest."""
        return hashlib.new(self.algorithm, data).hexdigest() == self.hex

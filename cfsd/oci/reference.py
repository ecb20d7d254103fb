"""Image references as skopeo spells them: ``oci:``, ``oci-archive:``, ``docker://``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cfsd.core.errors import RepositoryError

SUPPORTED = "oci:DIR[:TAG|@DIGEST], oci-archive:FILE[:TAG|@DIGEST], docker://[HOST/]NAME[:TAG|@DIGEST]"
DOCKER_HUB = "registry-1.docker.io"
_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_NAME_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")


class InvalidReference(RepositoryError):
    """A malformed or unsupported image reference."""


@dataclass(frozen=True)
class ImageReference:
    """A parsed source reference."""

    transport: str            # "oci", "oci-archive" or "docker"
    path: str = ""            # layout directory or archive file
    registry: str = ""        # host[:port] for docker
    repository: str = ""      # e.g. library/fedora
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        if self.transport == "docker":
            ref = f"docker://{self.registry}/{self.repository}"
        else:
            ref = f"{self.transport}:{self.path}"
        if self.digest:
            return f"{ref}@{self.digest}"
        return f"{ref}:{self.tag}" if self.tag else ref


def _split_path_ref(rest: str) -> tuple[str, str | None, str | None]:
    """``path[:tag]`` or ``path@digest`` (a colon is a separator only if no '/' follows)."""
    if "@" in rest:
        path, _, digest = rest.rpartition("@")
        if _DIGEST.match(digest):
            return path, None, digest
    i = rest.rfind(":")
    if i > 0 and "/" not in rest[i + 1:]:
        return rest[:i], rest[i + 1:] or None, None
    return rest, None, None


def parse(text: str) -> ImageReference:
    """Parse a transport-qualified reference (InvalidReference on error)."""
    transport, sep, rest = text.partition(":")
    if not sep:
        raise InvalidReference(f"missing transport in {text!r}; supported: {SUPPORTED}")
    if transport in ("oci", "oci-archive"):
        path, tag, digest = _split_path_ref(rest)
        if not path:
            raise InvalidReference(f"missing path in {text!r}")
        return ImageReference(transport, path=path, tag=tag, digest=digest)
    if transport == "docker":
        if not rest.startswith("//"):
            raise InvalidReference(f"docker references start with docker:// ({text!r})")
        return parse_docker(rest[2:])
    raise InvalidReference(f"unsupported transport {transport!r}; supported: {SUPPORTED}")


def parse_docker(ref: str) -> ImageReference:
    """``[HOST[:PORT]/]NAME[:TAG][@DIGEST]`` with docker.io defaults."""
    digest = None
    if "@" in ref:
        ref, _, digest = ref.partition("@")
        if not _DIGEST.match(digest):
            raise InvalidReference(f"invalid digest {digest!r}")
    tag = None
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        ref, tag = ref[:colon], ref[colon + 1:]
        if not _TAG.match(tag):
            raise InvalidReference(f"invalid tag {tag!r}")
    first, sep, remainder = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, name = first, remainder
    else:
        registry, name = DOCKER_HUB, ref
    if registry in ("docker.io", "index.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    if not name or not all(_NAME_COMPONENT.match(c) for c in name.split("/")):
        raise InvalidReference(f"invalid repository name {name!r}")
    if tag is None and digest is None:
        tag = "latest"
    return ImageReference("docker", registry=registry, repository=name, tag=tag, digest=digest)

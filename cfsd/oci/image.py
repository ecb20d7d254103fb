"""OCI images in a repository: config/manifest splitstreams, tags, listing (docs/repository.md).

Manifest and config are stored as their raw bytes in single external objects; their
splitstreams carry named refs exactly as composefs-rs writes them: the config lists each
diff_id (config order) then ``composefs.image``/``composefs.image.v1``; the manifest lists
``config:<digest>`` then each diff_id.  Tags are ``streams/refs/oci/<encoded name>``.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from cfsd.core.errors import FormatError, InvalidName, NotFound, RepositoryError
from cfsd.core.repository import Repository
from cfsd.core.splitstream import OCI_CONFIG, OCI_MANIFEST
from cfsd.oci import mediatypes
from cfsd.oci.digest import Digest
from cfsd.oci.documents import ImageConfig, Manifest, parse_config, parse_manifest

CONFIG_PREFIX = "oci-config-"
MANIFEST_PREFIX = "oci-manifest-"
LAYER_PREFIX = "oci-layer-"
TAG_PREFIX = "oci/"
REFERRERS_PREFIX = "oci-referrers/"
IMAGE_REF_V2 = "composefs.image"
IMAGE_REF_V1 = "composefs.image.v1"
BOOT_PREFIX = "composefs.image.boot"


def encode_tag(name: str) -> str:
    """Filesystem-safe tag name: ``%`` -> ``%25`` then ``/`` -> ``%2F``."""
    return name.replace("%", "%25").replace("/", "%2F")


def decode_tag(enc: str) -> str:
    """Inverse of encode_tag (single pass; other ``%xx`` kept literally)."""
    out = []
    i = 0
    while i < len(enc):
        if enc.startswith("%2F", i):
            out.append("/")
            i += 3
        elif enc.startswith("%25", i):
            out.append("%")
            i += 3
        else:
            out.append(enc[i])
            i += 1
    return "".join(out)


def validate_tag(name: str) -> str:
    """A tag must be non-empty, must not start with '@' (digest syntax) and stay one name."""
    if not name or name.startswith("@") or "\0" in name:
        raise InvalidName(f"invalid tag {name!r}: leading '@' is reserved for digest references"
                          if name.startswith("@") else f"invalid tag {name!r}")
    enc = encode_tag(name)
    if enc in (".", ".."):
        raise InvalidName(f"invalid tag {name!r}")
    return enc


def tag_ref(name: str) -> str:
    """The stream ref path of a tag."""
    return TAG_PREFIX + validate_tag(name)


def layer_id(digest: str) -> str:
    """Stream content id of a layer (by diff_id, or by blob digest for artifacts)."""
    return LAYER_PREFIX + digest


def stored_layer(repo: Repository, ident: str) -> bytes | None:
    """Verity of the layer stream for *ident* (diff_id or blob digest) if it and its
    object are stored, else None."""
    verity = repo.has_stream(layer_id(ident))
    if verity is not None and repo.has_object(verity):
        return verity
    return None


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of *data*."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_config(repo: Repository, config: bytes, digest: str,
                 layers: list[tuple[str, bytes]], images: dict[str, bytes] | None = None,
                 *, publish: bool = True) -> bytes:
    """Store the config splitstream ``oci-config-<digest>``; returns its verity.

    With ``publish=False`` the stream is stored but not named (see publish_streams).
    """
    w = repo.create_stream(OCI_CONFIG)
    for diff_id, verity in layers:
        w.add_named_stream_ref(diff_id, verity)
    for key in sorted(images or {}, key=_image_ref_order):
        w.add_named_stream_ref(key, (images or {})[key])
    w.write_external(config)
    verity = w.done()
    if publish:
        repo.register_stream(CONFIG_PREFIX + digest, verity)
    return verity


def _image_ref_order(key: str) -> tuple[int, str]:
    return ({IMAGE_REF_V2: 0, IMAGE_REF_V1: 1}.get(key, 2), key)


def write_manifest(repo: Repository, manifest: bytes, digest: str, config_digest: str,
                   config_verity: bytes, layers: list[tuple[str, bytes]],
                   *, publish: bool = True) -> bytes:
    """Store the manifest splitstream ``oci-manifest-<digest>``; returns its verity."""
    w = repo.create_stream(OCI_MANIFEST)
    w.add_named_stream_ref(f"config:{config_digest}", config_verity)
    for diff_id, verity in layers:
        w.add_named_stream_ref(diff_id, verity)
    w.write_external(manifest)
    verity = w.done()
    if publish:
        repo.register_stream(MANIFEST_PREFIX + digest, verity)
    return verity


def publish_streams(repo: Repository, streams: list[tuple[str, bytes]]) -> None:
    """Name many stored streams behind one durability barrier (one syncfs)."""
    if not streams:
        return
    repo.sync()
    for content_id, verity in streams:
        repo.register_stream(content_id, verity, sync=False)


def read_external(repo: Repository, verity: bytes, content_type: int,
                  limit: int = 64 << 20) -> tuple[bytes, dict[str, bytes]]:
    """(raw bytes, named refs) of a splitstream holding exactly one external object."""
    with repo.open_stream(verity=verity, content_type=content_type) as r:
        if len(r.object_refs) != 1:
            raise FormatError("expected a splitstream with exactly one external object")
        obj = r.object_refs[0]
        named = dict(r.named_refs)
        chunks = list(r.chunks())
    if chunks != [(True, obj)]:
        raise FormatError("expected a splitstream holding one external object")
    return repo.read_object(obj, limit), named


@dataclass
class OciImage:
    """A stored image: raw manifest/config, their verities and the layer refs."""

    manifest_digest: str
    manifest_verity: bytes
    manifest_bytes: bytes
    manifest: Manifest
    config_digest: str
    config_verity: bytes
    config_bytes: bytes
    config: ImageConfig | None
    layer_refs: dict[str, bytes] = field(default_factory=dict)
    image_refs: dict[str, bytes] = field(default_factory=dict)

    @property
    def is_container(self) -> bool:
        """A container image (as opposed to an artifact)."""
        return mediatypes.is_container_config(self.manifest.config.media_type)

    def layer_order(self) -> list[str]:
        """diff_ids (container) or layer blob digests (artifact), in order."""
        if self.is_container and self.config is not None:
            return list(self.config.rootfs.diff_ids)
        return [d.digest for d in self.manifest.layers]

    @classmethod
    def open(cls, repo: Repository, manifest_digest: str,
             verity: bytes | None = None) -> OciImage:
        """Open by manifest digest; every digest is re-checked against the stored bytes.

        Parsed images are cached by manifest stream verity: that verity fixes the manifest,
        the config stream it references and every ref, so an entry can never go stale.
        """
        Digest.parse(manifest_digest)
        if verity is None:
            verity = repo.has_stream(MANIFEST_PREFIX + manifest_digest)
            if verity is None:
                raise NotFound(f"no such image: @{manifest_digest}")
        key = (*repo.identity, verity, manifest_digest)
        with _cache_lock:
            hit = _cache.get(key)
            if hit is not None:
                _cache.move_to_end(key)
                return hit
        img = cls._read(repo, manifest_digest, verity)
        with _cache_lock:
            _cache[key] = img
            if len(_cache) > IMAGE_CACHE_SIZE:
                _cache.popitem(last=False)
        return img

    @classmethod
    def _read(cls, repo: Repository, manifest_digest: str, verity: bytes) -> OciImage:
        mbytes, mrefs = read_external(repo, verity, OCI_MANIFEST)
        if not Digest.parse(manifest_digest).matches(mbytes):
            raise FormatError(f"stored manifest does not match {manifest_digest}")
        manifest = parse_manifest(mbytes)
        cdigest = manifest.config.digest
        cverity = mrefs.get(f"config:{cdigest}")
        if cverity is None:
            raise FormatError(f"manifest stream has no config:{cdigest} ref")
        cbytes, crefs = read_external(repo, cverity, OCI_CONFIG)
        if not Digest.parse(cdigest).matches(cbytes):
            raise FormatError(f"stored config does not match {cdigest}")
        container = mediatypes.is_container_config(manifest.config.media_type)
        config = parse_config(cbytes) if container else None
        images = {k: v for k, v in crefs.items() if k.startswith(IMAGE_REF_V2)}
        if container:
            layers = {k: v for k, v in crefs.items() if not k.startswith(IMAGE_REF_V2)}
        else:
            wanted = {d.digest for d in manifest.layers}
            layers = {k: v for k, v in mrefs.items() if k in wanted}
        return cls(manifest_digest, verity, mbytes, manifest, cdigest, cverity, cbytes, config,
                   layers, images)


IMAGE_CACHE_SIZE = 256          # parsed images kept (by manifest stream verity)
_cache: OrderedDict[tuple[int, int, bytes, str], OciImage] = OrderedDict()
_cache_lock = threading.Lock()


def resolve(repo: Repository, image: str) -> tuple[str, bytes]:
    """(manifest digest, manifest verity) of a tag or ``@digest`` (a bare digest too)."""
    if image.startswith("@") or image.startswith("sha256:") or image.startswith("sha512:"):
        digest = image.removeprefix("@")
        Digest.parse(digest)
        verity = repo.has_stream(MANIFEST_PREFIX + digest)
        if verity is None:
            raise NotFound(f"no such image: {image}")
        return digest, verity
    target = repo.readlink(f"streams/refs/{tag_ref(image)}")
    if target is None:
        raise NotFound(f"no such image: {image}")
    last = target.rsplit("/", 1)[-1]
    if not last.startswith(MANIFEST_PREFIX):
        raise FormatError(f"tag {image} points at {last}")
    digest = last[len(MANIFEST_PREFIX):]
    verity = repo.has_stream(last)
    if verity is None:
        raise NotFound(f"no such image: {image} (manifest {digest} missing)")
    return digest, verity


def open_image(repo: Repository, image: str) -> OciImage:
    """Open a tag or ``@digest``."""
    digest, verity = resolve(repo, image)
    return OciImage.open(repo, digest, verity)


def tag(repo: Repository, manifest_digest: str, name: str) -> None:
    """Point tag *name* at a stored manifest."""
    Digest.parse(manifest_digest)
    repo.name_stream(MANIFEST_PREFIX + manifest_digest, tag_ref(name))


def untag(repo: Repository, name: str) -> None:
    """Remove tag *name* (NotFound if absent)."""
    if not repo.unlink(f"streams/refs/{tag_ref(name)}"):
        raise NotFound(f"no such tag: {name}")


QUIET_SECONDS = 1.0            # a refs directory unchanged this long may be cached
_listing_cache: dict[tuple[int, int, str], tuple[tuple[int, int, int], list]] = {}


def _dir_signature(repo: Repository, rel: str) -> tuple[int, int, int] | None:
    """(inode, mtime, ctime) of a refs directory, if it changed long enough ago that any
    later change must show in them (timestamps are coarse: a change within the same tick
    as the one recorded could otherwise go unseen)."""
    try:
        st = os.stat(rel, dir_fd=repo.fd, follow_symlinks=False)
    except OSError:
        return None
    if st.st_ctime_ns > time.time_ns() - int(QUIET_SECONDS * 1e9):
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _cached_refs(repo: Repository, prefix: str) -> list[tuple[str, str]]:
    """``repo.list_refs("streams", prefix)`` for a flat refs directory, reused while the
    directory's signature is unchanged (one stat instead of a readlink per entry)."""
    rel = f"streams/refs/{prefix.strip('/')}"
    key = (*repo.identity, rel)
    sig = _dir_signature(repo, rel)
    if sig is not None:
        hit = _listing_cache.get(key)
        if hit is not None and hit[0] == sig:
            return hit[1]
    refs = repo.list_refs("streams", prefix)
    if sig is not None and all("/" not in name for name, _ in refs) \
            and _dir_signature(repo, rel) == sig:
        if len(_listing_cache) > IMAGE_CACHE_SIZE:
            _listing_cache.clear()
        _listing_cache[key] = (sig, refs)
    return refs


def list_tags(repo: Repository) -> list[tuple[str, str]]:
    """(tag, manifest digest) for every tag."""
    out = []
    for enc, target in _cached_refs(repo, "oci"):
        last = target.rsplit("/", 1)[-1]
        if last.startswith(MANIFEST_PREFIX):
            out.append((decode_tag(enc), last[len(MANIFEST_PREFIX):]))
    return out


def referrer_ref(subject: str, artifact: str) -> str:
    """Stream ref of an artifact (a signature, a delta...) referring to *subject*."""
    return f"{REFERRERS_PREFIX}{encode_tag(subject)}/{encode_tag(artifact)}"


def list_referrers(repo: Repository, subject: str) -> list[str]:
    """Manifest digests of the stored artifacts that refer to *subject*."""
    out = []
    for enc, target in repo.list_refs("streams", REFERRERS_PREFIX + encode_tag(subject)):
        last = target.rsplit("/", 1)[-1]
        if last.startswith(MANIFEST_PREFIX):
            out.append(decode_tag(enc))
    return sorted(out)


def image_entry(name: str, img: OciImage, referrers: int = 0) -> dict[str, Any]:
    """A varlink ImageEntry."""
    cfg = img.config
    return {"name": name, "manifest_digest": img.manifest_digest,
            "is_container": img.is_container,
            "architecture": cfg.architecture if cfg else "", "os": cfg.os if cfg else "",
            "created": cfg.created if cfg else None, "layer_count": len(img.manifest.layers),
            "referrer_count": referrers}


def list_images(repo: Repository, filter: str | None = None) -> list[dict[str, Any]]:
    """ImageEntry for each tag (unreadable images skipped)."""
    out = []
    with_referrers = {decode_tag(name) for name in _subdirs(repo, "streams/refs/"
                                                             + REFERRERS_PREFIX)}
    tags = [(n, d) for n, d in list_tags(repo) if not filter or filter in n]
    try:
        verities = repo.stream_verities([MANIFEST_PREFIX + d for _, d in tags])
    except (InvalidName, RepositoryError):
        verities = [None] * len(tags)
    for (name, digest), verity in zip(tags, verities, strict=True):
        if verity is None:
            continue
        try:
            img = OciImage.open(repo, digest, verity)
        except (NotFound, FormatError, OSError):
            continue
        count = len(list_referrers(repo, digest)) if digest in with_referrers else 0
        out.append(image_entry(name, img, count))
    return out


def _subdirs(repo: Repository, rel: str) -> set[str]:
    """Names of the subdirectories of a repository directory (none if it is absent)."""
    try:
        fd = repo.open_dir(rel)
    except (FileNotFoundError, NotADirectoryError):
        return set()
    try:
        return {e.name for e in os.scandir(fd) if e.is_dir(follow_symlinks=False)}
    finally:
        os.close(fd)


def inspect(repo: Repository, image: str) -> dict[str, Any]:
    """The varlink Inspect reply."""
    img = open_image(repo, image)
    version = repo.meta.format_versions()[0]
    erofs = img.image_refs.get(IMAGE_REF_V2 if version == 2 else IMAGE_REF_V1)
    return {"manifest": img.manifest_bytes.decode(), "config": img.config_bytes.decode(),
            "referrers": list_referrers(repo, img.manifest_digest),
            "composefs_erofs": erofs.hex() if erofs else None,
            "composefs_boot_erofs": None}


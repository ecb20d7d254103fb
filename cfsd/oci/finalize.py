"""After a pull: build the composefs EROFS image(s) and link them from the config stream.

As composefs-rs's ``ensure_oci_composefs_erofs`` (docs/pull.md): for container
images, merge the layers, build one EROFS per format version of the repository, store them
(``images/<hex>``), then rewrite the config splitstream with the same raw config bytes plus
``composefs.image`` (V2) / ``composefs.image.v1`` (V0/V1) refs and the manifest splitstream
pointing at the new config stream.  Idempotent: an image already linked is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from cfsd.core.erofs import write_image_to
from cfsd.core.repository import Repository
from cfsd.oci import image
from cfsd.oci.image import OciImage
from cfsd.oci.rootfs import create_filesystem


def image_ref_key(version: int) -> str:
    """Config named-ref key holding the EROFS of *version* (V0 and V1 share one slot)."""
    return image.IMAGE_REF_V2 if version == 2 else image.IMAGE_REF_V1


@dataclass
class Finalized:
    """Verities after finalization and the EROFS image ids by version."""

    manifest_verity: bytes
    config_verity: bytes
    images: dict[int, bytes]


def finalize_image(repo: Repository, manifest_digest: str,
                   versions: list[int] | None = None) -> Finalized:
    """Make sure the image has an EROFS for every repository format version."""
    img = OciImage.open(repo, manifest_digest)
    versions = versions or repo.meta.format_versions()
    if not img.is_container:
        return Finalized(img.manifest_verity, img.config_verity, {})
    have = dict(img.image_refs)
    missing = [v for v in versions if image_ref_key(v) not in have]
    if not missing:
        return Finalized(img.manifest_verity, img.config_verity,
                         {v: have[image_ref_key(v)] for v in versions})
    fs = create_filesystem(repo, img)
    for v in missing:           # each write validates the tree first (and nothing is named)
        have[image_ref_key(v)] = repo.stream_image(
            lambda sink, v=v: write_image_to(fs, v, sink))
    ordered = [(d, img.layer_refs[d]) for d in img.layer_order()]
    boot = {k: v for k, v in have.items() if k.startswith(image.BOOT_PREFIX)}
    refs = {k: v for k, v in have.items() if k in (image.IMAGE_REF_V1, image.IMAGE_REF_V2)}
    config_verity = image.write_config(repo, img.config_bytes, img.config_digest, ordered,
                                       {**refs, **boot}, publish=False)
    manifest_verity = image.write_manifest(repo, img.manifest_bytes, manifest_digest,
                                           img.config_digest, config_verity, ordered,
                                           publish=False)
    image.publish_streams(repo, [(image.CONFIG_PREFIX + img.config_digest, config_verity),
                                 (image.MANIFEST_PREFIX + manifest_digest, manifest_verity)])
    return Finalized(manifest_verity, config_verity, {v: have[image_ref_key(v)]
                                                      for v in versions})

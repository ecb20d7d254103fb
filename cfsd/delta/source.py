"""The data source of a delta: the merged root filesystem of the source image (docs/delta.md).

The source image is found by the delta's ``source-config`` digest (its config stream
``oci-config-<digest>`` names every layer stream), or is the image the caller named, which
must have that config.  Its layers are merged in memory (whiteouts applied, later layers
shadowing earlier ones, hardlinks sharing one leaf) without the OCI transform, so every
regular file of the old layers' merged view can be a source, as the creator assumed (the
transform would only hide ``/run``).  ``OPEN`` names resolve in that tree alone: parent
components must be directories, symlinks are never followed, the final entry must be a
regular, non-sparse file; its data comes from the repository object (or the inline bytes).
No host path is ever touched.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

from cfsd.core import tree
from cfsd.core.errors import FormatError
from cfsd.core.repository import Repository
from cfsd.core.splitstream import OCI_CONFIG
from cfsd.delta.artifact import DeltaNotApplicable
from cfsd.delta.tardiff import SourceFile, SourceFileError
from cfsd.oci import documents, image
from cfsd.oci.digest import Digest
from cfsd.oci.rootfs import apply_layer


@dataclass
class SourceImage:
    """The source image of a delta: its config and layer streams in order."""

    config_digest: str
    diff_ids: list[str]
    layer_refs: dict[str, bytes]
    description: str


def find_source_image(repo: Repository, source_config: str,
                      given: str | None = None) -> SourceImage:
    """The repository image with config *source_config* (or the *given* tag/@digest).

    DeltaNotApplicable when it is absent or does not match; NotFound when *given* names
    nothing.
    """
    if given is not None:
        img = image.open_image(repo, given)
        if img.config_digest != source_config:
            raise DeltaNotApplicable(
                f"delta not applicable: {given} has config {img.config_digest}, the delta "
                f"needs source config {source_config}")
        if not img.is_container or img.config is None:
            raise DeltaNotApplicable(f"delta not applicable: {given} is not a container image")
        return _complete(repo, SourceImage(source_config, list(img.config.rootfs.diff_ids),
                                           dict(img.layer_refs), given))
    verity = repo.has_stream(image.CONFIG_PREFIX + source_config)
    if verity is None or not repo.has_object(verity):
        raise DeltaNotApplicable(
            f"delta not applicable: source config {source_config} not in repository")
    cbytes, named = image.read_external(repo, verity, OCI_CONFIG)
    if not Digest.parse(source_config).matches(cbytes):
        raise FormatError(f"stored config does not match {source_config}")
    config = documents.parse_config(cbytes)
    refs = {k: v for k, v in named.items() if not k.startswith(image.IMAGE_REF_V2)}
    return _complete(repo, SourceImage(source_config, list(config.rootfs.diff_ids), refs,
                                       f"config {source_config}"))


def _complete(repo: Repository, src: SourceImage) -> SourceImage:
    for diff_id in src.diff_ids:
        verity = src.layer_refs.get(diff_id)
        if verity is None or not repo.has_object(verity):
            raise DeltaNotApplicable(f"delta not applicable: layer {diff_id} of the source "
                                     f"image ({src.description}) is missing")
    return src


def build_tree(repo: Repository, src: SourceImage) -> tree.FileSystem:
    """The merged (untransformed) root filesystem of the source image."""
    fs = tree.FileSystem()
    with tree.paused_gc():
        for diff_id in src.diff_ids:
            apply_layer(fs, repo, src.layer_refs[diff_id])
    return fs


class TreeSource:
    """A tar-diff SourceResolver over a merged tree whose file data lives in *repo*."""

    def __init__(self, repo: Repository, fs: tree.FileSystem) -> None:
        self.repo = repo
        self.fs = fs

    def lookup(self, name: str) -> tree.Leaf:
        """The leaf of the regular file *name* (a validated, canonical relative path)."""
        parts = name.encode("utf-8").split(b"/")
        d = self.fs.root
        for i, comp in enumerate(parts[:-1]):
            child = d.entries.get(comp)
            if child is None:
                raise SourceFileError(f"Source file not found: {name}")
            if type(child) is not tree.Directory:
                where = b"/".join(parts[:i + 1]).decode("utf-8", "replace")
                raise SourceFileError(f"source path {name!r}: {where!r} is not a directory")
            d = child
        leaf = d.entries.get(parts[-1])
        if leaf is None:
            raise SourceFileError(f"Source file not found: {name}")
        if type(leaf) is tree.Directory:
            raise SourceFileError(f"source path {name!r} is a directory")
        assert isinstance(leaf, tree.Leaf)
        content = leaf.content
        if type(content) is tree.Sparse:
            raise SourceFileError(f"Sparse file not supported as delta source: {name}")
        if type(content) not in (tree.Inline, tree.External, tree.ExternalNoVerity):
            raise SourceFileError(f"source path {name!r} is not a regular file")
        return leaf

    def open_source(self, name: str) -> SourceFile:
        """A new read-only file object over the content of *name*."""
        content = self.lookup(name).content
        if isinstance(content, tree.Inline):
            return io.BytesIO(content.data)
        assert isinstance(content, tree.External | tree.ExternalNoVerity)
        fd = self.repo.open_object(content.id)  # CorruptObject: the repository's fault
        try:
            size = os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            raise
        if size != content.size:
            os.close(fd)
            raise SourceFileError(f"source file {name!r}: object has {size} bytes, the image "
                                  f"says {content.size}")
        return os.fdopen(fd, "rb", buffering=1 << 16)


__all__ = ["SourceImage", "TreeSource", "build_tree", "find_source_image"]

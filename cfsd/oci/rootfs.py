"""The filesystem tree of an OCI image: its layers merged in order (docs/images.md).

Each layer splitstream is read back entry by entry (no layer is re-hashed when the image
was opened through its fs-verity chain), mapped to tree content and applied with the
whiteout/opaque rules, then the OCI transform runs (root metadata from /usr, /run emptied,
xattrs filtered).
"""

from __future__ import annotations

import hashlib
import os

from cfsd.core import tree
from cfsd.core.errors import FormatError
from cfsd.core.repository import Repository
from cfsd.core.splitstream import TAR_LAYER
from cfsd.core.tar import TarEntry, TarError, layer_entries
from cfsd.oci.image import OciImage

EMPTY = tree.Inline(b"")        # every empty file's content (contents are immutable)
MAX_SHARED_STATS = 1 << 16      # distinct stats remembered for sharing

def make_absolute_path(path: bytes) -> bytes:
    """Strip one leading '/', prepend '/', strip trailing '/'s; the root becomes b""."""
    if path.startswith(b"/"):
        path = path[1:]
    return (b"/" + path).rstrip(b"/")


def entry_stat(e: TarEntry, shared: dict[tuple, tree.Stat] | None = None) -> tree.Stat:
    """Tree stat of a tar entry (mode as in the header, ids truncated to 32 bits).

    With *shared*, equal stats are one object (stats are never changed in place, only
    replaced): a layer of a million files shares a handful of them.
    """
    xattrs: dict[bytes, bytes] = {}
    for k, v in e.xattrs:
        xattrs[k] = v
    items = tuple(sorted(xattrs.items()))
    mtime = e.mtime if e.mtime < 1 << 63 else e.mtime - (1 << 64)
    key = (e.mode, e.uid & 0xFFFFFFFF, e.gid & 0xFFFFFFFF, mtime, e.mtime_nsec, items)
    if shared is not None:
        st = shared.get(key)
        if st is not None:
            return st
    st = tree.Stat(key[0], key[1], key[2], mtime, e.mtime_nsec, dict(items))
    if shared is not None and len(shared) < MAX_SHARED_STATS:
        shared[key] = st
    return st


def entry_item(e: TarEntry, content: bytes | tuple[bytes, int]) -> tree.LayerItem:
    """Tree content of a tar entry (docs/images.md)."""
    t = e.typeflag
    if t == 0x35:
        return tree.DirectoryItem()
    if t in (0x30, 0, 0x37):
        if isinstance(content, tuple):
            return tree.External(content[0], content[1])
        return tree.Inline(content) if content else EMPTY
    if t == 0x31:
        if not e.link_target:
            raise TarError(f"{e.path!r}: hardlink without a target")
        return tree.Hardlink(make_absolute_path(e.link_target))
    if t == 0x32:
        return tree.Symlink(e.link_target or b"")
    if t in (0x33, 0x34):
        if e.dev_major is None or e.dev_minor is None:
            raise TarError(f"{e.path!r}: device entry without device numbers")
        rdev = os.makedev(e.dev_major, e.dev_minor)
        return tree.CharacterDevice(rdev) if t == 0x33 else tree.BlockDevice(rdev)
    if t == 0x36:
        return tree.Fifo()
    raise TarError(f"{e.path!r}: unsupported tar entry type {chr(t)!r}")


def apply_layer(fs: tree.FileSystem, repo: Repository, verity: bytes,
                diff_id: str | None = None,
                shared: dict[tuple, tree.Stat] | None = None) -> None:
    """Apply one layer splitstream; with *diff_id* its reassembled tar is re-hashed first."""
    if diff_id is not None:
        alg, _, hx = diff_id.partition(":")
        h = hashlib.new(alg)
        with repo.open_stream(verity=verity, content_type=TAR_LAYER) as r:
            for external, data in r.chunks():
                if not external:
                    h.update(data)
                    continue
                fd = repo.open_object(data)
                try:
                    while piece := os.read(fd, 1 << 20):
                        h.update(piece)
                finally:
                    os.close(fd)
        if h.hexdigest() != hx:
            raise FormatError(f"Layer has incorrect checksum: {diff_id}")
    with repo.open_stream(verity=verity, content_type=TAR_LAYER) as r:
        for entry, content in layer_entries(r.chunks()):
            path = make_absolute_path(entry.path)
            try:
                tree.apply_layer_entry(fs, path, entry_stat(entry, shared),
                                       entry_item(entry, content))
            except tree.TreeError as e:
                raise FormatError(f"layer entry {entry.path!r}: {e}") from None


def create_filesystem(repo: Repository, img: OciImage, *, verify: bool = False,
                      xattrs: tree.XattrFiltering | str = tree.XattrFiltering.ALLOWLIST_ONLY,
                      transform: bool = True) -> tree.FileSystem:
    """Merge the image's layers into a tree (and apply the OCI transform)."""
    if not img.is_container:
        raise FormatError("artifacts have no filesystem")
    fs = tree.FileSystem()
    shared: dict[tuple, tree.Stat] = {}
    with tree.paused_gc():
        for diff_id in img.layer_order():
            verity = img.layer_refs.get(diff_id)
            if verity is None:
                raise FormatError(f"config has no layer ref for {diff_id}")
            apply_layer(fs, repo, verity, diff_id if verify else None, shared)
        if transform:
            try:
                tree.transform_for_oci(fs, xattrs)
            except tree.TreeError as e:
                raise FormatError(f"cannot build the composefs image: {e}") from None
    return fs

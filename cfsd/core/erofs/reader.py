"""Composefs EROFS image reader and validation (docs/images.md).

:class:`Image` parses the header, superblock, inodes, xattrs and directory blocks with
explicit bounds checks: any malformed image raises :class:`ErofsError` (never
``IndexError``/``struct.error``), and every traversal is bounded (visited sets, depth
limit), so crafted images cannot make it hang.

* :meth:`Image.restrict_to_composefs` / :meth:`Image.fsck_metadata` - composefs checks.
* :func:`collect_objects` - object ids referenced by an image (GC / fsck).
* :func:`erofs_to_filesystem` - the inverse of the writer.
"""

from __future__ import annotations

import struct

from cfsd.core.erofs import format as F
from cfsd.core.erofs.format import ErofsError
from cfsd.core.errors import TooDeep
from cfsd.core.tree import (
    MAX_DEPTH,
    BlockDevice,
    CharacterDevice,
    Directory,
    External,
    ExternalNoVerity,
    Fifo,
    FileSystem,
    Inline,
    Leaf,
    Socket,
    Sparse,
    Stat,
    Symlink,
    paused_gc,
)

__all__ = ["ErofsError", "Image", "Inode", "collect_objects", "erofs_to_filesystem"]

MAX_INLINE_CONTENT = 512
SYMLINK_MAX = 1024
_unpack_compact = F.COMPACT_INODE.unpack_from
_unpack_extended = F.EXTENDED_INODE.unpack_from
_unpack_dirent = F.DIRENT.unpack_from
_unpack_xent = F.XATTR_ENTRY.unpack_from
_HEXDIGITS = frozenset(b"0123456789abcdefABCDEF")



def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


class Inode:
    """A parsed inode header plus the location of its xattr area and inline data."""

    __slots__ = ("nid", "offset", "compact", "layout", "xattr_icount", "mode", "nlink",
                 "size", "u", "ino", "uid", "gid", "mtime", "mtime_nsec", "header_size",
                 "xattr_size", "inline_len")

    def __repr__(self) -> str:
        return (f"Inode(nid={self.nid}, mode={self.mode:o}, layout={self.layout}, "
                f"size={self.size}, nlink={self.nlink})")

    @property
    def ifmt(self) -> int:
        """The ``S_IFMT`` bits of the mode."""
        return self.mode & F.S_IFMT

    def is_dir(self) -> bool:
        """True for a directory inode."""
        return self.mode & F.S_IFMT == F.S_IFDIR

    def is_whiteout(self) -> bool:
        """True for a native whiteout (chr with rdev 0)."""
        return self.mode & F.S_IFMT == F.S_IFCHR and self.u == 0


class Image:
    """An opened EROFS image (``Image::open``)."""

    def __init__(self, data: bytes | bytearray | memoryview,
                 max_size: int = F.MAX_IMAGE_SIZE) -> None:
        data = bytes(data)
        if len(data) > max_size:
            raise ErofsError(f"image size {len(data)} exceeds maximum {max_size}")
        if len(data) < F.SUPERBLOCK_END:
            raise ErofsError("image too small for header and superblock")
        self.data = data
        (self.magic, self.header_version, self.flags,
         self.composefs_version) = F.HEADER.unpack_from(data, 0)
        sb = F.SUPERBLOCK.unpack_from(data, F.SUPERBLOCK_OFFSET)
        (self.sb_magic, _cksum, self.feature_compat, self.blkszbits, self.extslots,
         self.root_nid, self.inos, self.build_time, self.build_time_nsec, self.blocks,
         self.meta_blkaddr, self.xattr_blkaddr, _uuid, _vol, self.feature_incompat,
         self.compr_algs, self.extra_devices, _devt, _dirblkbits, self.xattr_prefix_count,
         _pstart, self.packed_nid, _filt) = sb
        if self.blkszbits >= 64:
            raise ErofsError(f"blkszbits {self.blkszbits} >= platform word size 64")
        self.block_size = 1 << self.blkszbits
        self.meta_start = self.meta_blkaddr * self.block_size
        self.xattr_start = self.xattr_blkaddr * self.block_size
        if self.meta_start > len(data) or self.xattr_start > len(data):
            raise ErofsError("metadata or xattr area outside the image")
        self.restricted = False
        self._inodes: dict[int, Inode] = {}

    # ---------------------------------------------------------------- validation

    def restrict_to_composefs(self) -> Image:
        """Enforce the composefs header/superblock constraints; returns ``self``."""
        if self.magic != F.COMPOSEFS_MAGIC:
            raise ErofsError(f"bad composefs magic: {self.magic:#x}")
        if self.header_version != F.COMPOSEFS_HEADER_VERSION:
            raise ErofsError(f"bad EROFS format version in composefs header: "
                             f"{self.header_version}")
        if self.composefs_version not in (0, 1, 2):
            raise ErofsError(f"unknown composefs_version {self.composefs_version} "
                             "(expected 0, 1, or 2)")
        if self.sb_magic != F.EROFS_MAGIC:
            raise ErofsError(f"bad EROFS magic: {self.sb_magic:#x}")
        if self.blkszbits != F.BLOCK_BITS:
            raise ErofsError(f"composefs requires blkszbits=12, got {self.blkszbits}")
        if self.feature_compat & ~F.FEATURE_COMPAT_SUPPORTED:
            raise ErofsError(f"unsupported feature_compat flags: {self.feature_compat:#x}")
        if self.feature_incompat & ~F.FEATURE_INCOMPAT_CHUNKED_FILE:
            raise ErofsError(f"unsupported feature_incompat flags: "
                             f"{self.feature_incompat:#x}")
        if self.compr_algs:
            raise ErofsError("composefs does not support compression")
        if self.extra_devices:
            raise ErofsError("composefs does not support multi-device")
        if self.extslots:
            raise ErofsError("composefs does not support extslots")
        if self.packed_nid:
            raise ErofsError("composefs does not support packed inodes")
        if self.meta_blkaddr:
            raise ErofsError(f"composefs requires meta_blkaddr=0, got {self.meta_blkaddr}")
        if self.xattr_prefix_count:
            raise ErofsError("composefs does not support custom xattr prefixes")
        self.restricted = True
        return self

    # ---------------------------------------------------------------- inodes

    def inode(self, nid: int) -> Inode:
        """Parse the inode with node id ``nid``."""
        ino = self._inodes.get(nid)
        if ino is not None:
            return ino
        data = self.data
        off = self.meta_start + nid * 32
        if off >= len(data):
            raise ErofsError(f"Invalid inode: {nid}")
        ino = Inode()
        ino.nid = nid
        ino.offset = off
        if data[off] & 1:
            if off + 64 > len(data):
                raise ErofsError(f"Invalid inode: {nid}")
            (fmt, ino.xattr_icount, ino.mode, _r, ino.size, ino.u, ino.ino, ino.uid, ino.gid,
             ino.mtime, ino.mtime_nsec, ino.nlink) = _unpack_extended(data, off)
            ino.compact = False
            ino.header_size = 64
        else:
            if off + 32 > len(data):
                raise ErofsError(f"Invalid inode: {nid}")
            (fmt, ino.xattr_icount, ino.mode, ino.nlink, ino.size, _r, ino.u, ino.ino,
             ino.uid, ino.gid) = _unpack_compact(data, off)
            ino.compact = True
            ino.header_size = 32
            ino.mtime = self.build_time
            ino.mtime_nsec = self.build_time_nsec
        layout = fmt & F.LAYOUT_MASK
        if layout not in (F.LAYOUT_FLAT_PLAIN, F.LAYOUT_FLAT_INLINE, F.LAYOUT_CHUNK_BASED):
            raise ErofsError("invalid data layout in inode format")
        ino.layout = layout
        ino.xattr_size = 0 if ino.xattr_icount == 0 else (ino.xattr_icount - 1) * 4 + 12
        if layout == F.LAYOUT_FLAT_INLINE:
            ino.inline_len = ino.size % self.block_size
        elif layout == F.LAYOUT_CHUNK_BASED:
            ino.inline_len = 4
        else:
            ino.inline_len = 0
        if off + ino.header_size + ino.xattr_size + ino.inline_len > len(data):
            raise ErofsError(f"Invalid inode: {nid}")
        self._inodes[nid] = ino
        return ino

    def root(self) -> Inode:
        """The root directory inode."""
        return self.inode(self.root_nid)

    def inline(self, ino: Inode) -> bytes | None:
        """The inline data after the xattr area (None if empty)."""
        start = ino.offset + ino.header_size + ino.xattr_size
        if not ino.inline_len:
            return None
        return self.data[start:start + ino.inline_len]

    def inode_blocks(self, ino: Inode) -> range:
        """The data block ids of an inode, validated against the image size."""
        n = len(self.data)
        if self.restricted and ino.layout != F.LAYOUT_CHUNK_BASED and ino.size > n:
            raise ErofsError(f"inode size {ino.size} exceeds image size {n}")
        bs = self.block_size
        start = ino.u
        if ino.layout == F.LAYOUT_FLAT_PLAIN:
            end = start + (ino.size + bs - 1) // bs
        elif ino.layout == F.LAYOUT_FLAT_INLINE:
            end = start + ino.size // bs
        else:
            end = start
        if end > start and end > n // bs:
            raise ErofsError(f"inode block range {start}..{end} exceeds image "
                             f"({n // bs} blocks)")
        return range(start, end)

    def block(self, blkid: int) -> bytes:
        """One whole block."""
        bs = self.block_size
        start = blkid * bs
        if start + bs > len(self.data):
            raise ErofsError("Offset out of bounds")
        return self.data[start:start + bs]

    def file_data(self, ino: Inode) -> bytes:
        """Block data followed by inline data, truncated to the file size."""
        size = min(ino.size, len(self.data))
        if size == 0:
            return b""
        parts = [self.block(b) for b in self.inode_blocks(ino)]
        inl = self.inline(ino)
        if inl:
            parts.append(inl)
        return b"".join(parts)[:size]

    # ---------------------------------------------------------------- xattrs

    def xattrs(self, ino: Inode) -> tuple[list[tuple[int, bytes, bytes]],
                                          list[tuple[int, bytes, bytes]]]:
        """``(shared, local)`` xattrs as ``(name_index, suffix, value)``."""
        shared, local = self.xattr_entries(ino)
        return [x[:3] for x in shared], [x[:3] for x in local]

    def xattr_entries(self, ino: Inode) -> tuple[list[tuple[int, bytes, bytes, int]],
                                                 list[tuple[int, bytes, bytes, int]]]:
        """Like :meth:`xattrs` with the image offset just past each value appended."""
        if not ino.xattr_size:
            return [], []
        data = self.data
        p = ino.offset + ino.header_size
        end = p + ino.xattr_size
        count = data[p + 4]
        if 12 + 4 * count > ino.xattr_size:
            raise ErofsError("Offset out of bounds")
        shared = [self._entry_at(self.xattr_start + 4 * i, len(data))
                  for i in struct.unpack_from(f"<{count}I", data, p + 12)]
        local = []
        q = p + 12 + 4 * count
        while q < end:
            e = self._entry_at(q, end)
            local.append(e)
            q = (e[3] + 3) & ~3
        return shared, local

    def _entry_at(self, q: int, limit: int) -> tuple[int, bytes, bytes, int]:
        data = self.data
        if q + 4 > limit:
            raise ErofsError("Offset out of bounds")
        name_len, idx, vsize = _unpack_xent(data, q)
        s = q + 4
        if s + ((name_len + vsize + 3) & ~3) > limit:
            raise ErofsError("Offset out of bounds")
        v = s + name_len
        return idx, data[s:v], data[v:v + vsize], v + vsize

    def all_xattrs(self, ino: Inode) -> list[tuple[int, bytes, bytes]]:
        """Shared xattrs followed by local ones (composefs-rs order)."""
        shared, local = self.xattrs(ino)
        return shared + local

    # ---------------------------------------------------------------- directories

    def dir_entries(self, ino: Inode, lenient: bool = False) -> list[tuple[bytes, int, int]]:
        """``(name, nid, file_type)`` of a directory: block entries, then inline ones.

        ``lenient`` skips unreadable blocks and stops at a bad entry instead of raising.
        """
        out: list[tuple[bytes, int, int]] = []
        try:
            blocks = self.inode_blocks(ino)
        except ErofsError:
            if not lenient:
                raise
            blocks = range(0)
        for b in blocks:
            try:
                parse_dirblock(self.block(b), out)
            except ErofsError:
                if not lenient:
                    raise
        inl = self.inline(ino)
        if inl is not None:
            try:
                parse_dirblock(inl, out)
            except ErofsError:
                if not lenient:
                    raise
        return out

    # ---------------------------------------------------------------- fsck

    def fsck_metadata(self) -> None:
        """Structural checks: pre-6.12 symlink layout (V0/V1) and epoch invariants."""
        self._validate_v1_inline_layout()
        self._validate_epoch_invariants()

    def is_escaped_whiteout(self, ino: Inode) -> bool:
        """A regular file carrying ``trusted.overlay.overlay.whiteout`` (V1 escaping)."""
        if ino.ifmt != F.S_IFREG:
            return False
        for idx, suffix, _v in self.all_xattrs(ino):
            if idx == 4 and suffix == b"overlay.overlay.whiteout":
                return True
        return False

    def _lenient_children(self, nid: int) -> tuple[Inode | None, list[tuple[bytes, int, int]]]:
        try:
            ino = self.inode(nid)
        except ErofsError:
            return None, []
        if not ino.is_dir():
            return ino, []
        ents = self.dir_entries(ino, lenient=True)
        return ino, [e for e in ents if e[0] != b"." and e[0] != b".."]

    def _validate_v1_inline_layout(self) -> None:
        if self.composefs_version >= 2:
            return
        bs = self.block_size
        stack = [self.root_nid]
        visited: set[int] = set()
        while stack:
            nid = stack.pop()
            if nid in visited:
                continue
            visited.add(nid)
            ino, children = self._lenient_children(nid)
            if ino is None:
                continue
            if ino.is_dir():
                stack.extend(e[1] for e in children)
                continue
            if ino.ifmt != F.S_IFLNK or ino.layout != F.LAYOUT_FLAT_INLINE:
                continue
            inline_size = ino.size % bs
            if inline_size == 0:
                continue
            total = (nid * 32) % bs + ino.header_size + ino.xattr_size + inline_size
            if total > bs:
                raise ErofsError(f"inode at nid {nid} (FlatInline symlink) would trigger "
                                 f"EUCLEAN on kernels older than 6.12: {total} > {bs}")

    def _validate_epoch_invariants(self) -> None:
        cv = self.composefs_version
        epoch1 = cv in (0, 1)
        if not epoch1 and cv != 2:
            return
        root = self.root_nid
        stack = [root]
        visited: set[int] = set()
        slots: set[bytes] = set()
        while stack:
            nid = stack.pop()
            if nid in visited:
                continue
            visited.add(nid)
            ino, children = self._lenient_children(nid)
            if ino is None or not ino.is_dir():
                continue
            for name, cnid, _ft in children:
                try:
                    child = self.inode(cnid)
                except ErofsError:
                    continue
                if epoch1 and nid == root and _is_lower_hex2(name):
                    slots.add(name)
                if child.is_dir():
                    stack.append(cnid)
                    continue
                escaped = self.is_escaped_whiteout(child)
                if epoch1:
                    if nid != root and child.is_whiteout():
                        raise ErofsError(
                            "Epoch1 image contains native whiteout outside root stubs")
                elif escaped:
                    raise ErofsError("Epoch2 image contains escaped whiteout")
        if epoch1 and len(slots) != 256:
            raise ErofsError(f"Epoch1 image has {len(slots)} hex-named root entries, "
                             "expected 256 (00-ff)")


def _is_lower_hex2(name: bytes) -> bool:
    return len(name) == 2 and all(c in b"0123456789abcdef" for c in name)


def parse_dirblock(blk: bytes, out: list[tuple[bytes, int, int]]) -> None:
    """Append the entries of one directory block to ``out`` (raises on a bad entry)."""
    n = len(blk)
    if n < 12:
        raise ErofsError("Offset out of bounds")
    first = blk[8] | blk[9] << 8
    if first == 0 or first % 12:
        raise ErofsError("invalid directory entry name_offset")
    count = first // 12
    for i in range(count):
        p = 12 * i
        if p + 12 > n:
            raise ErofsError("Offset out of bounds")
        nid, nameoff, ft = _unpack_dirent(blk, p)
        if i + 1 == count:
            if nameoff > n:
                raise ErofsError("Offset out of bounds")
            name = blk[nameoff:]
            z = name.find(b"\0")
            if z >= 0:
                name = name[:z]
        else:
            if p + 24 > n:
                raise ErofsError("Offset out of bounds")
            end = blk[p + 20] | blk[p + 21] << 8
            if nameoff > end or end > n:
                raise ErofsError("Offset out of bounds")
            name = blk[nameoff:end]
        out.append((name, nid, ft))


def _resolve_alg(alg: object) -> int | None:
    if alg is None:
        return None
    if isinstance(alg, int):
        return alg
    from cfsd.core.fsverity import algorithm
    return algorithm(alg).size  # type: ignore[arg-type]


def collect_objects(image: bytes, alg: object = "sha256") -> set[bytes]:
    """Object ids referenced by ``trusted.overlay.metacopy``/``redirect`` xattrs.

    The image is opened with :meth:`Image.restrict_to_composefs` and checked with
    :meth:`Image.fsck_metadata` first; ``alg`` selects the digest size (None: both).
    """
    size = _resolve_alg(alg)
    img = Image(image).restrict_to_composefs()
    img.fsck_metadata()
    objects: set[bytes] = set()
    visited: set[int] = set()
    todo = [img.root_nid]
    while todo:
        nid = todo.pop()
        if nid in visited:
            continue
        visited.add(nid)
        ino = img.inode(nid)
        for idx, suffix, value in img.all_xattrs(ino):
            if idx != 4:
                continue
            if suffix == b"overlay.metacopy":
                _ok, digest = F.parse_metacopy(value, size)
                if digest is not None:
                    objects.add(digest)
            elif suffix == b"overlay.redirect":
                path = value[1:] if value.startswith(b"/") else value
                oid = F.parse_object_pathname(path, size)
                if oid is not None:
                    objects.add(oid)
        if ino.is_dir():
            for name, cnid, _ft in img.dir_entries(ino):
                if name != b"." and name != b".." and cnid not in visited:
                    todo.append(cnid)
    return objects


# --------------------------------------------------------------------------- image -> tree

_DROP = frozenset((F.XATTR_OVERLAY_METACOPY, F.XATTR_OVERLAY_REDIRECT, F.XATTR_OVERLAY_WHITEOUT,
                   F.XATTR_OVERLAY_WHITEOUTS, F.XATTR_OVERLAY_OPAQUE, F.XATTR_USERXATTR_WHITEOUT,
                   F.XATTR_USERXATTR_WHITEOUTS, F.XATTR_USERXATTR_OPAQUE))


def _full_name(idx: int, suffix: bytes) -> bytes:
    if idx >= len(F.XATTR_PREFIXES):
        raise ErofsError(f"xattr name_index {idx} out of range")
    return F.XATTR_PREFIXES[idx] + suffix


def _tree_stat(ino: Inode, xattrs: list[tuple[int, bytes, bytes]]) -> Stat:
    out: dict[bytes, bytes] = {}
    for idx, suffix, value in xattrs:
        name = _full_name(idx, suffix)
        if name in _DROP:
            continue
        if name.startswith(F.XATTR_OVERLAY_ESCAPED_PREFIX):
            name = F.XATTR_OVERLAY_PREFIX + name[24:]
        elif name.startswith(F.XATTR_OVERLAY_PREFIX):
            continue
        out[name] = value
    return Stat(ino.mode & 0o7777, ino.uid, ino.gid, _signed64(ino.mtime), ino.mtime_nsec,
                out)


def _leaf_content(img: Image, ino: Inode, xattrs: list[tuple[int, bytes, bytes]],
                  escaped: bool, size: int | None, name: bytes) -> object:
    if escaped:
        return CharacterDevice(0)
    t = ino.ifmt
    if t == F.S_IFREG:
        for idx, suffix, value in xattrs:
            if idx == 4 and suffix == b"overlay.metacopy" and value:
                _ok, digest = F.parse_metacopy(value, size)
                if digest is not None:
                    return External(digest, ino.size)
                if img.restricted:
                    raise ErofsError(f"malformed or invalid trusted.overlay.metacopy on {name!r}")
        for idx, suffix, value in xattrs:
            if idx == 4 and suffix == b"overlay.redirect":
                path = value[1:] if value.startswith(b"/") else value
                oid = F.parse_object_pathname(path, size)
                if oid is not None:
                    return ExternalNoVerity(oid, ino.size)
        if ino.layout == F.LAYOUT_CHUNK_BASED:
            return Sparse(ino.size)
        if img.restricted and img.composefs_version == 2 and ino.size > MAX_INLINE_CONTENT:
            raise ErofsError(f"inline regular file {name!r} has size {ino.size} "
                             f"(max {MAX_INLINE_CONTENT})")
        return Inline(img.file_data(ino))
    if t == F.S_IFLNK:
        target = img.file_data(ino)
        if img.restricted and img.composefs_version == 2 and len(target) > SYMLINK_MAX:
            raise ErofsError(f"symlink target for {name!r} is {len(target)} bytes "
                             f"(max {SYMLINK_MAX})")
        return Symlink(target)
    if t == F.S_IFBLK:
        return BlockDevice(ino.u)
    if t == F.S_IFCHR:
        return CharacterDevice(ino.u)
    if t == F.S_IFIFO:
        return Fifo()
    if t == F.S_IFSOCK:
        return Socket()
    raise ErofsError(f"unknown file type {t:#o} for {name!r}")


def erofs_to_filesystem(image: bytes, alg: object = None) -> FileSystem:
    """Rebuild the tree of a composefs image (inverse of ``write_image``).

    Validates ``.``/``..``, directory and leaf nlink, duplicate names, depth, and skips
    the root whiteout stubs; escaped whiteouts become chr 0/0 again.
    """
    with paused_gc():
        return _erofs_to_filesystem(image, _resolve_alg(alg))


def _erofs_to_filesystem(image: bytes, size: int | None) -> FileSystem:
    img = Image(image).restrict_to_composefs()
    root_nid = img.root_nid
    root_ino = img.root()
    if not root_ino.is_dir():
        raise ErofsError("root inode is not a directory")
    fs = FileSystem(_tree_stat(root_ino, img.all_xattrs(root_ino)))
    by_nid: dict[int, Leaf] = {}
    hardlinks: dict[int, Leaf] = {}
    expected_nlink: dict[int, int] = {}
    seen_dirs = {root_nid}
    # stack frames: [dir_nid, dir_ino, Directory, children iterator, n_subdirs, depth]
    stack: list[list] = []

    def enter(nid: int, parent: int, ino: Inode, d: Directory, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise TooDeep(f"the image nests deeper than {MAX_DEPTH} directories")
        dot = dotdot = None
        children = []
        for name, cnid, _ft in img.dir_entries(ino):
            if name == b".":
                dot = cnid
            elif name == b"..":
                dotdot = cnid
            else:
                children.append((name, cnid))
        if dot != nid:
            raise ErofsError("Invalid '.' entry in directory")
        if dotdot != parent:
            raise ErofsError("Invalid '..' entry in directory")
        stack.append([nid, ino, d, iter(children), 0, depth])

    enter(root_nid, root_nid, root_ino, fs.root, 0)
    while stack:
        frame = stack[-1]
        dir_nid, dir_ino, d, it, _n, depth = frame
        for name, cnid in it:
            child = img.inode(cnid)
            xattrs = img.all_xattrs(child) if child.xattr_size else []
            escaped = child.ifmt == F.S_IFREG and any(
                x[0] == 4 and x[1] == b"overlay.overlay.whiteout" for x in xattrs)
            if (dir_nid == root_nid and (escaped or child.is_whiteout()) and len(name) == 2
                    and name[0] in _HEXDIGITS and name[1] in _HEXDIGITS):
                continue
            if name in d.entries:
                raise ErofsError(f"Duplicate directory entry {name!r}")
            if child.is_dir():
                if cnid in seen_dirs:
                    raise ErofsError("Hardlinked directories detected")
                seen_dirs.add(cnid)
                frame[4] += 1
                sub = Directory(_tree_stat(child, xattrs))
                d.entries[name] = sub
                enter(cnid, dir_nid, child, sub, depth + 1)
                break
            leaf = hardlinks.get(cnid)
            if leaf is None:
                content = _leaf_content(img, child, xattrs, escaped, size, name)
                if type(content) is CharacterDevice and content.rdev == 0 and child.nlink > 1:
                    raise ErofsError(f"invalid composefs image: whiteout inode {name!r} "
                                     "has nlink > 1")
                leaf = fs.push_leaf(_tree_stat(child, xattrs), content)  # type: ignore[arg-type]
                if child.nlink > 1:
                    hardlinks[cnid] = leaf
                if cnid not in by_nid:
                    by_nid[cnid] = leaf
                    expected_nlink[cnid] = child.nlink
            d.entries[name] = leaf
        else:
            stack.pop()
            if dir_ino.nlink != frame[4] + 2:
                raise ErofsError(f"directory nlink mismatch: on-disk nlink is {dir_ino.nlink}, "
                                 f"expected {frame[4] + 2}")
    counts = fs.nlinks()
    for cnid, leaf in by_nid.items():
        if counts.get(leaf, 0) != expected_nlink[cnid]:
            raise ErofsError(f"nlink mismatch for inode nid {cnid}: on-disk nlink is "
                             f"{expected_nlink[cnid]}, found {counts.get(leaf, 0)} reference(s)")
    return fs

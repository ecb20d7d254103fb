"""Layout and emission of composefs EROFS images (storage.md 8.8-8.9).

The writer (:mod:`cfsd.core.erofs.writer`) produces a list of :class:`Ino` in inode index
order with their final local/shared xattrs.  :func:`emit_image` runs the Epoch1 data-block
fix-ups, computes every offset in a single pass (inode positions, ``inodes_end``, shared
xattr offsets, data-block offsets) and then writes the image into one zero-filled
``bytearray`` with ``struct.pack_into`` (padding is implicit).
"""

from __future__ import annotations

from cfsd.core.erofs import format as F
from cfsd.core.erofs.format import ErofsError
from cfsd.core.tree import Inline, Stat, Symlink

B = F.BLOCK_SIZE
_MASK64 = (1 << 64) - 1
_FT_MODE = {F.FT_REG: F.S_IFREG, F.FT_DIR: F.S_IFDIR, F.FT_CHR: F.S_IFCHR,
            F.FT_BLK: F.S_IFBLK, F.FT_FIFO: F.S_IFIFO, F.FT_SOCK: F.S_IFSOCK,
            F.FT_LNK: F.S_IFLNK}

_PLAIN = F.LAYOUT_FLAT_PLAIN
_INLINE = F.LAYOUT_FLAT_INLINE
_CHUNK = F.LAYOUT_CHUNK_BASED
_FT_REG = F.FT_REG
_FT_DIR = F.FT_DIR
_FT_CHR = F.FT_CHR
_FT_BLK = F.FT_BLK
_FT_LNK = F.FT_LNK

_pack_compact = F.COMPACT_INODE.pack_into
_pack_extended = F.EXTENDED_INODE.pack_into
_pack_xhdr = F.XATTR_IBODY_HEADER.pack_into
_pack_xent = F.XATTR_ENTRY.pack_into
_pack_dirent = F.DIRENT.pack_into


class Ino:
    """One inode being written (directory or leaf)."""

    __slots__ = ("stat", "ft", "content", "idx", "nlink", "local", "shared", "filt",
                 "n_blocks", "tail", "escaped", "blocks", "inline", "size", "inline_len")

    def __init__(self, stat: Stat, ft: int, content: object) -> None:
        self.stat = stat
        self.ft = ft
        self.content = content          # LeafContent, or None for a directory
        self.idx = 0
        self.nlink = 1
        self.local: list[tuple[int, bytes, bytes]] | None = None
        self.shared: list[int] | None = None
        self.filt = 0
        self.n_blocks = 0
        self.tail = 0
        self.escaped = False
        self.blocks: list[list[tuple[bytes, int, int]]] | None = None
        self.inline: list[tuple[bytes, int, int]] | None = None
        self.size = 0
        self.inline_len = 0

    def set_dir_entries(self, ents: list[tuple[bytes, int, int]]) -> None:
        """Split sorted ``(name, inode index, file type)`` entries into blocks + inline tail."""
        blocks: list[list[tuple[bytes, int, int]]] = []
        cur: list[tuple[bytes, int, int]] = []
        n = 0
        nlink = 0
        for e in ents:
            sz = 12 + len(e[0])
            if sz > B:
                raise ErofsError(f"file name too long: {e[0]!r}")
            if e[2] == _FT_DIR:
                nlink += 1
            n += sz
            if n <= B:
                cur.append(e)
            else:
                blocks.append(cur)
                cur = [e]
                n = sz
        if n > B // 2:
            blocks.append(cur)
            cur = []
            n = 0
        self.blocks = blocks
        self.inline = cur
        self.size = B * len(blocks) + n
        self.inline_len = n
        self.nlink = nlink
        self.n_blocks = len(blocks)

    def xattr_size(self) -> int:
        """Size of the inode's xattr area (0 without xattrs)."""
        if not self.filt:
            return 0
        n = 12
        if self.shared:
            n += 4 * len(self.shared)
        if self.local:
            for _i, s, v in self.local:
                n += (4 + len(s) + len(v) + 3) & ~3
        return n


def _fits_compact(st: Stat, min_mtime: tuple[int, int], size: int, nlink: int) -> bool:
    return ((st.st_mtim_sec & _MASK64) == min_mtime[0] and st.st_mtim_nsec == min_mtime[1]
            and nlink <= 0xFFFF and st.st_uid <= 0xFFFF and st.st_gid <= 0xFFFF
            and size <= 0xFFFFFFFF)


def _leaf_size(ino: Ino) -> int:
    c = ino.content
    t = type(c)
    if t is Inline:
        return len(c.data)
    if t is Symlink:
        return len(c.target)
    if ino.escaped:
        return 0
    return getattr(c, "size", 0)


def _fixup_epoch1(inodes: list[Ino], min_mtime: tuple[int, int]) -> None:
    """Move long symlink targets and oversized chunk indexes to a data block (8.8)."""
    for ino in inodes:
        tail = ino.tail
        if not tail or ino.content is None:
            continue
        t = type(ino.content)
        if t is Symlink:
            hs = 32 if _fits_compact(ino.stat, min_mtime, tail, ino.nlink) else 64
            if hs + ino.xattr_size() + tail >= B:
                ino.n_blocks += 1
                ino.tail = 0
        elif t is not Inline:
            if tail + ino.xattr_size() % 32 > B:
                ino.n_blocks = 1
                ino.tail = 0


def emit_image(inodes: list[Ino], shared: list[tuple[int, bytes, bytes]], version: int,
               flags: int, min_mtime: tuple[int, int]) -> bytes:
    """Lay out and write the image bytes."""
    epoch1 = version < 2
    if epoch1:
        _fixup_epoch1(inodes, min_mtime)
    n = len(inodes)
    pos_of = [0] * n
    hsize = [0] * n
    xsize = [0] * n
    meta_size = [0] * n
    layout_of = [0] * n

    # ---------------------------------------------------------------- pass 1: layout
    min_sec, min_nsec = min_mtime
    pos = F.SUPERBLOCK_END
    for idx, ino in enumerate(inodes):
        c = ino.content
        ft = ino.ft
        if c is None:  # directory
            size = ino.size
            layout = _PLAIN if not ino.inline else _INLINE
            inline_len = ino.inline_len
        else:
            t = type(c)
            size = _leaf_size(ino)
            if ino.escaped:
                layout = _PLAIN
                inline_len = 0
            elif t is Inline:
                if size == 0:
                    layout = _PLAIN
                elif ino.n_blocks and not ino.tail:
                    layout = _PLAIN
                else:
                    layout = _INLINE
                inline_len = ino.tail
            elif t is Symlink:
                if ino.n_blocks:
                    layout = _PLAIN
                    inline_len = 0
                else:
                    layout = _INLINE
                    inline_len = size
            elif ft == _FT_REG:
                layout = _CHUNK
                inline_len = ino.tail
            else:
                layout = _PLAIN
                inline_len = 0
        xs = ino.xattr_size() if ino.filt else 0
        st = ino.stat
        hs = 32 if (epoch1 and st.st_mtim_nsec == min_nsec and (st.st_mtim_sec & _MASK64) == min_sec
                    and ino.nlink <= 0xFFFF and st.st_uid <= 0xFFFF and st.st_gid <= 0xFFFF
                    and size <= 0xFFFFFFFF) else 64
        pos = (pos + 31) & ~31
        if epoch1:
            if layout == _PLAIN and ft == _FT_LNK:
                if pos // B != (pos + hs + xs + size - 1) // B and pos % B:
                    pos = (pos + B - 1) & ~(B - 1)
            elif layout == _CHUNK:
                if ino.tail:
                    r = (pos + hs + xs) % B
                    if r and B - r < ino.tail:
                        pos += (B - r + 31) & ~31
                elif ino.n_blocks and pos % B:
                    pos = (pos + B - 1) & ~(B - 1)
            if layout == _INLINE:
                inl = size % B
                if ft == _FT_LNK:
                    if pos % B and pos % B + hs + xs + inl > B:
                        pos = (pos + B - 1) & ~(B - 1)
                else:
                    r = (pos + hs + xs) % B
                    if r and B - r < inl:
                        pos += (B - r + 31) & ~31
        elif layout == _INLINE:
            s = pos + hs + xs
            if (s - 1) // B != (s + size % B) // B:
                pos += B - (s - 1) % B
                pos = (pos + 31) & ~31
        pos_of[idx] = pos
        hsize[idx] = hs
        xsize[idx] = xs
        meta_size[idx] = size
        layout_of[idx] = layout
        pos += hs + xs + inline_len
    inodes_end = (pos + 31) & ~31
    pos = inodes_end
    shared_off = []
    for _i, s, v in shared:
        shared_off.append(pos)
        pos += (4 + len(s) + len(v) + 3) & ~3
    pos = (pos + B - 1) & ~(B - 1)
    blk_of = [0] * n
    for idx, ino in enumerate(inodes):
        blk_of[idx] = pos
        if ino.n_blocks:
            c = ino.content
            if c is None or type(c) is Inline:
                pos += B * ino.n_blocks
            else:  # promoted symlink target or chunk index: one block
                pos += B
    end = pos
    if end // B > 0xFFFFFFFF:
        raise ErofsError("image too large")

    # ---------------------------------------------------------------- pass 2: emit
    buf = bytearray(end)
    F.HEADER.pack_into(buf, 0, F.COMPOSEFS_MAGIC, F.COMPOSEFS_HEADER_VERSION, flags, version)
    build_time, build_nsec = min_mtime if epoch1 else (0, 0)
    F.SUPERBLOCK.pack_into(
        buf, F.SUPERBLOCK_OFFSET, F.EROFS_MAGIC, 0,
        F.FEATURE_COMPAT_MTIME | F.FEATURE_COMPAT_XATTR_FILTER, F.BLOCK_BITS, 0,
        (pos_of[0] // 32) & 0xFFFF, n, build_time, build_nsec, end // B, 0,
        inodes_end // B if epoch1 else 0, b"", b"", 0, 0, 0, 0, 0, 0, 0, 0, 0)

    if epoch1:
        xbase = inodes_end % B - inodes_end
        shared_ref = [(o + xbase) >> 2 for o in shared_off]
    else:
        shared_ref = [o >> 2 for o in shared_off]

    for idx, ino in enumerate(inodes):
        p = pos_of[idx]
        hs = hsize[idx]
        xs = xsize[idx]
        size = meta_size[idx]
        layout = layout_of[idx]
        st = ino.stat
        c = ino.content
        # the u field
        if c is None:
            u = blk_of[idx] // B if ino.blocks else 0
        else:
            t = type(c)
            if ino.escaped:
                u = 0
            elif layout == _CHUNK:
                u = F.chunk_bits(size) - F.BLOCK_BITS if epoch1 else 31
                if ino.n_blocks:
                    u |= (blk_of[idx] // B) & 0xFFFF0000
            elif ino.n_blocks:
                u = blk_of[idx] // B
            elif ino.ft == _FT_CHR or ino.ft == _FT_BLK:
                u = c.rdev
                if u > 0xFFFFFFFF:
                    raise ErofsError(f"device number {u} exceeds EROFS u32 limit")
            else:
                u = 0
        mode = _FT_MODE[ino.ft] | (st.st_mode & 0o7777)
        fmt_layout = layout
        icount = 0 if xs == 0 else 1 + (xs - 12) // 4
        if icount > 0xFFFF:
            raise ErofsError("too many xattrs on one inode")
        if hs == 32:
            _pack_compact(buf, p, fmt_layout, icount, mode, ino.nlink, size, 0, u, idx,
                          st.st_uid, st.st_gid)
        else:
            if st.st_uid > 0xFFFFFFFF or st.st_gid > 0xFFFFFFFF or ino.nlink > 0xFFFFFFFF:
                raise ErofsError("uid, gid or nlink out of range")
            _pack_extended(buf, p, fmt_layout | 1, icount, mode, 0, size & _MASK64, u,
                           idx if epoch1 else p // 32, st.st_uid, st.st_gid,
                           st.st_mtim_sec & _MASK64, st.st_mtim_nsec if epoch1 else 0,
                           ino.nlink)
        q = p + hs
        if xs:
            nshared = len(ino.shared) if ino.shared else 0
            if nshared > 255:
                raise ErofsError("too many shared xattrs on one inode")
            _pack_xhdr(buf, q, ~ino.filt & 0xFFFFFFFF, nshared)
            q += 12
            if nshared:
                for ref in ino.shared:  # type: ignore[union-attr]
                    buf[q:q + 4] = shared_ref[ref].to_bytes(4, "little")
                    q += 4
            if ino.local:
                for i, s, v in ino.local:
                    _pack_xent(buf, q, len(s), i, len(v))
                    q += 4
                    buf[q:q + len(s)] = s
                    q += len(s)
                    buf[q:q + len(v)] = v
                    q = (q + len(v) + 3) & ~3
        # inline part
        if c is None:
            if ino.inline:
                _write_dirents(buf, q, ino.inline, pos_of)
        elif not ino.escaped:
            t = type(c)
            if t is Inline:
                if ino.tail:
                    data = c.data
                    buf[q:q + ino.tail] = data[len(data) - ino.tail:]
            elif t is Symlink:
                if not ino.n_blocks:
                    buf[q:q + size] = c.target
            elif layout == _CHUNK and ino.tail:
                buf[q:q + ino.tail] = b"\xff" * ino.tail

    q = inodes_end
    for i, s, v in shared:
        _pack_xent(buf, q, len(s), i, len(v))
        q += 4
        buf[q:q + len(s)] = s
        q += len(s)
        buf[q:q + len(v)] = v
        q = (q + len(v) + 3) & ~3

    for idx, ino in enumerate(inodes):
        if not ino.n_blocks:
            continue
        q = blk_of[idx]
        c = ino.content
        if c is None:
            for blk in ino.blocks:  # type: ignore[union-attr]
                _write_dirents(buf, q, blk, pos_of)
                q += B
        elif type(c) is Inline:
            data = c.data
            nb = ino.n_blocks * B
            chunk = data[:nb]
            buf[q:q + len(chunk)] = chunk
        elif type(c) is Symlink:
            chunk = c.target[:B]
            buf[q:q + len(chunk)] = chunk
        else:
            buf[q:q + B] = b"\xff" * B
    return bytes(buf)


def _write_dirents(buf: bytearray, off: int, ents: list[tuple[bytes, int, int]],
                   pos_of: list[int]) -> None:
    """Write one directory block: all 12-byte headers, then the names back to back."""
    nameoff = 12 * len(ents)
    p = off
    for name, ref, ft in ents:
        _pack_dirent(buf, p, pos_of[ref] >> 5, nameoff, ft)
        p += 12
        nameoff += len(name)
    names = b"".join(e[0] for e in ents)
    buf[p:p + len(names)] = names

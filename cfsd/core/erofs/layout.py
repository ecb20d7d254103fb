"""Layout and emission of composefs EROFS images (docs/images.md).

The writer (:mod:`cfsd.core.erofs.writer`) fills an :class:`Inodes` table: one row per
inode, in inode index order, kept as columns (arrays of machine integers, not an object
per inode) so that a million-entry tree costs tens of megabytes.  :func:`emit_image` runs
the Epoch1 data-block fix-ups, computes every offset in one pass (inode positions,
``inodes_end``, shared xattr offsets, data-block offsets) and then streams the image out
in a second, front to back: inodes, shared xattrs, data blocks.  Nothing the size of the
image is ever held in memory.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from cfsd.core.erofs import format as F
from cfsd.core.erofs.format import ErofsError
from cfsd.core.tree import Directory, Inline, Leaf, Symlink

B = F.BLOCK_SIZE
_MASK64 = (1 << 64) - 1
_FT_MODE = {F.FT_REG: F.S_IFREG, F.FT_DIR: F.S_IFDIR, F.FT_CHR: F.S_IFCHR,
            F.FT_BLK: F.S_IFBLK, F.FT_FIFO: F.S_IFIFO, F.FT_SOCK: F.S_IFSOCK, F.FT_LNK: F.S_IFLNK}

_PLAIN = F.LAYOUT_FLAT_PLAIN
_INLINE = F.LAYOUT_FLAT_INLINE
_CHUNK = F.LAYOUT_CHUNK_BASED
_FT_REG = F.FT_REG
_FT_DIR = F.FT_DIR
_FT_CHR = F.FT_CHR
_FT_BLK = F.FT_BLK
_FT_LNK = F.FT_LNK

_compact = F.COMPACT_INODE.pack
_extended = F.EXTENDED_INODE.pack
_xhdr = F.XATTR_IBODY_HEADER.pack
_xent = F.XATTR_ENTRY.pack
_dirent = F.DIRENT.pack

# Inodes.flags bits
ESCAPED = 1          # a whiteout written as an escaped regular file

FLUSH_AT = 1 << 20   # bytes buffered before they are handed to the sink

Xattr = tuple[int, bytes, bytes]    # (prefix index, name suffix, value)


class Xattrs:
    """The xattrs of one inode: local entries, references to shared ones, filter bits."""

    __slots__ = ("local", "shared", "filt")

    def __init__(self) -> None:
        self.local: list[Xattr] = []
        self.shared: list[int] = []
        self.filt = 0

    def size(self) -> int:
        """Size of the inode's xattr area."""
        n = 12 + 4 * len(self.shared)
        for _i, s, v in self.local:
            n += (4 + len(s) + len(v) + 3) & ~3
        return n


class Inodes:
    """The inode table, one row per inode in index order, stored column-wise.

    ``obj`` is the tree node (a :class:`Leaf` or :class:`Directory`), ``ft`` the EROFS
    file type, ``tail`` the inline byte count (for a directory: its inline dirent bytes).
    Directories also have ``dirents[idx] = (names, children)``: every name including
    ``.`` and ``..`` in byte order and the inode index each refers to.  ``wide`` holds the
    inodes that need an extended header whatever their fields (C: a device, fifo or socket
    whose dump SIZE does not fit 32 bits).
    """

    __slots__ = ("obj", "ft", "nlink", "n_blocks", "tail", "flags", "xattrs", "dirents",
                 "wide")

    def __init__(self) -> None:
        self.obj: list[Directory | Leaf] = []
        self.ft = bytearray()
        self.nlink = array("I")
        self.n_blocks = array("I")
        self.tail = array("I")
        self.flags = bytearray()
        self.xattrs: dict[int, Xattrs] = {}
        self.dirents: dict[int, tuple[list[bytes], array]] = {}
        self.wide: set[int] = set()

    def __len__(self) -> int:
        return len(self.obj)

    def push(self, obj: Directory | Leaf, ft: int) -> int:
        """Append a row; its index."""
        self.obj.append(obj)
        self.ft.append(ft)
        self.nlink.append(1)
        self.n_blocks.append(0)
        self.tail.append(0)
        self.flags.append(0)
        return len(self.obj) - 1

    def xattr_size(self, idx: int) -> int:
        """Size of inode *idx*'s xattr area (0 without xattrs)."""
        x = self.xattrs.get(idx)
        return x.size() if x is not None and x.filt else 0


def dirent_runs(names: list[bytes]) -> tuple[list[int], int]:
    """How the dirents *names* split into blocks: ``(bounds, inline bytes)``.

    Entries fill 4 KiB blocks in order; what is left goes inline when it is at most half a
    block, otherwise into one more block.  Block k holds ``names[bounds[k]:bounds[k+1]]``
    and the inline run is ``names[bounds[-1]:]`` (empty when the inline byte count is 0).
    """
    bounds: list[int] = []
    n = 0
    start = 0
    for i, name in enumerate(names):
        sz = 12 + len(name)
        if sz > B:
            raise ErofsError(f"file name too long: {name!r}")
        n += sz
        if n > B:
            bounds.append(start)
            start = i
            n = sz
    if n > B // 2:
        bounds.append(start)
        start = len(names)
        n = 0
    bounds.append(start)
    return bounds, n


def _fits_compact(st: object, min_mtime: tuple[int, int], size: int, nlink: int) -> bool:
    return ((st.st_mtim_sec & _MASK64) == min_mtime[0] and st.st_mtim_nsec == min_mtime[1]
            and nlink <= 0xFFFF and st.st_uid <= 0xFFFF and st.st_gid <= 0xFFFF
            and size <= 0xFFFFFFFF)


def _leaf_size(c: object, escaped: bool) -> int:
    t = type(c)
    if t is Inline:
        return len(c.data)
    if t is Symlink:
        return len(c.target)
    if escaped:
        return 0
    return getattr(c, "size", 0)


def _fixup_epoch1(ino: Inodes, min_mtime: tuple[int, int]) -> None:
    """Move long symlink targets and oversized chunk indexes to a data block (8.8)."""
    tails = ino.tail
    obj = ino.obj
    ft = ino.ft
    for idx, tail in enumerate(tails):
        if not tail or ft[idx] == _FT_DIR:
            continue
        leaf = obj[idx]
        t = type(leaf.content)
        if t is Symlink:
            hs = 32 if _fits_compact(leaf.stat, min_mtime, tail, ino.nlink[idx]) else 64
            if hs + ino.xattr_size(idx) + tail >= B:
                ino.n_blocks[idx] += 1
                tails[idx] = 0
        elif t is not Inline:
            if tail + ino.xattr_size(idx) % 32 > B:
                ino.n_blocks[idx] = 1
                tails[idx] = 0


class _Out:
    """A front-to-back writer of the image that pads gaps with zeros."""

    __slots__ = ("sink", "buf", "done")

    def __init__(self, sink: Callable[[bytes], object]) -> None:
        self.sink = sink
        self.buf = bytearray()
        self.done = 0                # bytes already handed to the sink

    def at(self, pos: int) -> None:
        """Pad with zeros up to absolute offset *pos*."""
        gap = pos - self.done - len(self.buf)
        if gap < 0:
            raise AssertionError("image emitted out of order")
        if gap:
            self.buf += bytes(gap)
        if len(self.buf) >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Hand everything buffered to the sink."""
        if self.buf:
            self.sink(bytes(self.buf))
            self.done += len(self.buf)
            self.buf = bytearray()


def _xattr_bytes(x: Xattrs, shared_ref: list[int]) -> bytes:
    if len(x.shared) > 255:
        raise ErofsError("too many shared xattrs on one inode")
    parts = [_xhdr(~x.filt & 0xFFFFFFFF, len(x.shared))]
    parts.extend(shared_ref[r].to_bytes(4, "little") for r in x.shared)
    for i, s, v in x.local:
        e = _xent(len(s), i, len(v)) + s + v
        parts.append(e + bytes(-len(e) % 4))
    return b"".join(parts)


def _dirent_bytes(names: list[bytes], kids: array, lo: int, hi: int, pos: array,
                  ft: bytearray) -> bytes:
    """One run of dirents: all 12-byte headers, then the names back to back."""
    nameoff = 12 * (hi - lo)
    heads = []
    for i in range(lo, hi):
        ref = kids[i]
        heads.append(_dirent(pos[ref] >> 5, nameoff, ft[ref]))
        nameoff += len(names[i])
    return b"".join(heads) + b"".join(names[lo:hi])


def emit_image(ino: Inodes, shared: list[Xattr], version: int, flags: int,
               min_mtime: tuple[int, int], sink: Callable[[bytes], object]) -> None:
    """Lay out the image and stream its bytes to *sink*."""
    epoch1 = version < 2
    if epoch1:
        _fixup_epoch1(ino, min_mtime)
    n = len(ino)
    objs = ino.obj
    fts = ino.ft
    nlinks = ino.nlink
    nblocks = ino.n_blocks
    tails = ino.tail
    escaped_flags = ino.flags
    xattrs = ino.xattrs
    pos_of = array("Q", bytes(8 * n))
    extended = bytearray(n)          # 1: 64-byte extended inode
    layout_of = bytearray(n)

    # ---------------------------------------------------------------- pass 1: layout
    min_sec, min_nsec = min_mtime
    wide = ino.wide
    pos = F.SUPERBLOCK_END
    for idx in range(n):
        ft = fts[idx]
        tail = tails[idx]
        if ft == _FT_DIR:
            size = B * nblocks[idx] + tail
            layout = _INLINE if tail else _PLAIN
            inline_len = tail
            st = objs[idx].stat
        else:
            leaf = objs[idx]
            st = leaf.stat
            c = leaf.content
            t = type(c)
            esc = escaped_flags[idx] & ESCAPED
            size = _leaf_size(c, esc)
            if esc:
                layout = _PLAIN
                inline_len = 0
            elif t is Inline:
                layout = _PLAIN if size == 0 or (nblocks[idx] and not tail) else _INLINE
                inline_len = tail
            elif t is Symlink:
                if nblocks[idx]:
                    layout = _PLAIN
                    inline_len = 0
                else:
                    layout = _INLINE
                    inline_len = size
            elif ft == _FT_REG:
                layout = _CHUNK
                inline_len = tail
            else:
                layout = _PLAIN
                inline_len = 0
        xs = ino.xattr_size(idx) if idx in xattrs else 0
        hs = 32 if (epoch1 and st.st_mtim_nsec == min_nsec and (st.st_mtim_sec & _MASK64) == min_sec
                    and nlinks[idx] <= 0xFFFF and st.st_uid <= 0xFFFF and st.st_gid <= 0xFFFF
                    and size <= 0xFFFFFFFF and idx not in wide) else 64
        pos = (pos + 31) & ~31
        if epoch1:
            if layout == _PLAIN and ft == _FT_LNK:
                if pos // B != (pos + hs + xs + size - 1) // B and pos % B:
                    pos = (pos + B - 1) & ~(B - 1)
            elif layout == _CHUNK:
                if tail:
                    r = (pos + hs + xs) % B
                    if r and B - r < tail:
                        pos += (B - r + 31) & ~31
                elif nblocks[idx] and pos % B:
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
        extended[idx] = hs == 64
        layout_of[idx] = layout
        pos += hs + xs + inline_len
    inodes_end = (pos + 31) & ~31
    pos = inodes_end
    shared_off = []
    for _i, s, v in shared:
        shared_off.append(pos)
        pos += (4 + len(s) + len(v) + 3) & ~3
    pos = (pos + B - 1) & ~(B - 1)
    blk_of: dict[int, int] = {}
    for idx in range(n):
        nb = nblocks[idx]
        if nb:
            blk_of[idx] = pos
            if fts[idx] == _FT_DIR or type(objs[idx].content) is Inline:
                pos += B * nb
            else:  # promoted symlink target or chunk index: one block
                pos += B
    end = pos
    if end // B > 0xFFFFFFFF:
        raise ErofsError("image too large")

    # ---------------------------------------------------------------- pass 2: emit
    out = _Out(sink)
    out.buf += F.HEADER.pack(F.COMPOSEFS_MAGIC, F.COMPOSEFS_HEADER_VERSION, flags, version)
    build_time, build_nsec = min_mtime if epoch1 else (0, 0)
    out.at(F.SUPERBLOCK_OFFSET)
    out.buf += F.SUPERBLOCK.pack(
        F.EROFS_MAGIC, 0,
        F.FEATURE_COMPAT_MTIME | F.FEATURE_COMPAT_XATTR_FILTER, F.BLOCK_BITS, 0,
        (pos_of[0] // 32) & 0xFFFF, n, build_time, build_nsec, end // B, 0,
        inodes_end // B if epoch1 else 0, b"", b"", 0, 0, 0, 0, 0, 0, 0, 0, 0)

    if epoch1:
        xbase = inodes_end % B - inodes_end
        shared_ref = [(o + xbase) >> 2 for o in shared_off]
    else:
        shared_ref = [o >> 2 for o in shared_off]

    buf = out.buf
    for idx in range(n):
        p = pos_of[idx]
        out.at(p)
        buf = out.buf
        layout = layout_of[idx]
        ft = fts[idx]
        node = objs[idx]
        st = node.stat
        nb = nblocks[idx]
        tail = tails[idx]
        esc = escaped_flags[idx] & ESCAPED
        if ft == _FT_DIR:
            c = None
            size = B * nb + tail
            u = blk_of[idx] // B if nb else 0
        else:
            c = node.content
            size = _leaf_size(c, esc)
            if esc:
                u = 0
            elif layout == _CHUNK:
                u = F.chunk_bits(size) - F.BLOCK_BITS if epoch1 else 31
                if nb:
                    u |= (blk_of[idx] // B) & 0xFFFF0000
            elif nb:
                u = blk_of[idx] // B
            elif ft == _FT_CHR or ft == _FT_BLK:
                u = c.rdev
                if u > 0xFFFFFFFF:
                    raise ErofsError(f"device number {u} exceeds EROFS u32 limit")
            else:
                u = 0
        mode = _FT_MODE[ft] | (st.st_mode & 0o7777)
        x = xattrs.get(idx)
        xs = x.size() if x is not None and x.filt else 0
        icount = 0 if xs == 0 else 1 + (xs - 12) // 4
        if icount > 0xFFFF:
            raise ErofsError("too many xattrs on one inode")
        nlink = nlinks[idx]
        if not extended[idx]:
            buf += _compact(layout, icount, mode, nlink, size, 0, u, idx, st.st_uid, st.st_gid)
        else:
            if st.st_uid > 0xFFFFFFFF or st.st_gid > 0xFFFFFFFF or nlink > 0xFFFFFFFF:
                raise ErofsError("uid, gid or nlink out of range")
            buf += _extended(layout | 1, icount, mode, 0, size & _MASK64, u,
                             idx if epoch1 else p // 32, st.st_uid, st.st_gid,
                             st.st_mtim_sec & _MASK64, st.st_mtim_nsec if epoch1 else 0,
                             nlink)
        if xs:
            buf += _xattr_bytes(x, shared_ref)
        # inline part
        if c is None:
            if tail:
                names, kids = ino.dirents[idx]
                lo = dirent_runs(names)[0][-1]
                buf += _dirent_bytes(names, kids, lo, len(names), pos_of, fts)
        elif not esc:
            t = type(c)
            if t is Inline:
                if tail:
                    data = c.data
                    buf += data[len(data) - tail:]
            elif t is Symlink:
                if not nb:
                    buf += c.target
            elif layout == _CHUNK and tail:
                buf += b"\xff" * tail

    out.at(inodes_end)
    for i, s, v in shared:
        e = _xent(len(s), i, len(v)) + s + v
        out.buf += e + bytes(-len(e) % 4)

    for idx, q in blk_of.items():
        out.at(q)
        nb = nblocks[idx]
        if fts[idx] == _FT_DIR:
            names, kids = ino.dirents[idx]
            bounds = dirent_runs(names)[0]
            for k in range(nb):
                out.at(q + k * B)
                out.buf += _dirent_bytes(names, kids, bounds[k], bounds[k + 1], pos_of, fts)
            continue
        c = objs[idx].content
        if type(c) is Inline:
            out.buf += c.data[:nb * B]
        elif type(c) is Symlink:
            out.buf += c.target[:B]
        else:
            out.buf += b"\xff" * B
    out.at(end)
    out.flush()


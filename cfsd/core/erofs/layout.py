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


class _Plan:
    """Where everything goes: inode positions and header sizes, data blocks, the end."""

    __slots__ = ("pos_of", "extended", "layout_of", "inodes_end", "shared_off", "blk_of",
                 "end")

    def __init__(self, n: int) -> None:
        self.pos_of = array("Q", bytes(8 * n))
        self.extended = bytearray(n)          # 1: 64-byte extended inode
        self.layout_of = bytearray(n)
        self.inodes_end = 0
        self.shared_off: list[int] = []
        self.blk_of: dict[int, int] = {}
        self.end = 0


def _shape(ino: Inodes, idx: int) -> tuple[object, int, int, int]:
    """(stat, i_size, data layout, inline byte count) of inode *idx*."""
    ft = ino.ft[idx]
    tail = ino.tail[idx]
    node = ino.obj[idx]
    if ft == _FT_DIR:
        return node.stat, B * ino.n_blocks[idx] + tail, _INLINE if tail else _PLAIN, tail
    c = node.content  # type: ignore[union-attr]
    t = type(c)
    esc = ino.flags[idx] & ESCAPED
    size = _leaf_size(c, esc)
    if esc:
        return node.stat, size, _PLAIN, 0
    if t is Inline:
        plain = size == 0 or (ino.n_blocks[idx] and not tail)
        return node.stat, size, _PLAIN if plain else _INLINE, tail
    if t is Symlink:
        if ino.n_blocks[idx]:
            return node.stat, size, _PLAIN, 0
        return node.stat, size, _INLINE, size
    if ft == _FT_REG:
        return node.stat, size, _CHUNK, tail
    return node.stat, size, _PLAIN, 0


def _align(pos: int, layout: int, ft: int, hs: int, xs: int, size: int, tail: int, nb: int,
           epoch1: bool) -> int:
    """The position of an inode that could start at *pos*: 32-byte slots, and inline data
    kept within one block (C's rules for V0/V1, composefs-rs's for V2)."""
    pos = (pos + 31) & ~31
    if not epoch1:
        if layout == _INLINE:
            s = pos + hs + xs
            if (s - 1) // B != (s + size % B) // B:
                pos += B - (s - 1) % B
                pos = (pos + 31) & ~31
        return pos
    if layout == _PLAIN and ft == _FT_LNK:
        if pos // B != (pos + hs + xs + size - 1) // B and pos % B:
            pos = (pos + B - 1) & ~(B - 1)
    elif layout == _CHUNK:
        if tail:
            r = (pos + hs + xs) % B
            if r and B - r < tail:
                pos += (B - r + 31) & ~31
        elif nb and pos % B:
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
    return pos


def _plan(ino: Inodes, shared: list[Xattr], epoch1: bool, min_mtime: tuple[int, int]
          ) -> _Plan:
    """Pass 1: every offset of the image."""
    n = len(ino)
    plan = _Plan(n)
    min_sec, min_nsec = min_mtime
    nlinks = ino.nlink
    xattrs = ino.xattrs
    wide = ino.wide
    pos = F.SUPERBLOCK_END
    for idx in range(n):
        st, size, layout, inline_len = _shape(ino, idx)
        xs = ino.xattr_size(idx) if idx in xattrs else 0
        hs = 32 if (epoch1 and st.st_mtim_nsec == min_nsec  # type: ignore[attr-defined]
                    and (st.st_mtim_sec & _MASK64) == min_sec  # type: ignore[attr-defined]
                    and nlinks[idx] <= 0xFFFF and st.st_uid <= 0xFFFF  # type: ignore[attr-defined]
                    and st.st_gid <= 0xFFFF and size <= 0xFFFFFFFF  # type: ignore[attr-defined]
                    and idx not in wide) else 64
        pos = _align(pos, layout, ino.ft[idx], hs, xs, size, ino.tail[idx], ino.n_blocks[idx],
                     epoch1)
        plan.pos_of[idx] = pos
        plan.extended[idx] = hs == 64
        plan.layout_of[idx] = layout
        pos += hs + xs + inline_len
    plan.inodes_end = pos = (pos + 31) & ~31
    for _i, s, v in shared:
        plan.shared_off.append(pos)
        pos += (4 + len(s) + len(v) + 3) & ~3
    pos = (pos + B - 1) & ~(B - 1)
    for idx in range(n):
        nb = ino.n_blocks[idx]
        if nb:
            plan.blk_of[idx] = pos
            if ino.ft[idx] == _FT_DIR or type(ino.obj[idx].content) is Inline:  # type: ignore[union-attr]
                pos += B * nb
            else:  # promoted symlink target or chunk index: one block
                pos += B
    plan.end = pos
    if pos // B > 0xFFFFFFFF:
        raise ErofsError("image too large")
    return plan


def _u_field(ino: Inodes, idx: int, plan: _Plan, size: int, epoch1: bool) -> int:
    """The inode's union field: first data block, chunk format, or device number."""
    nb = ino.n_blocks[idx]
    ft = ino.ft[idx]
    if ft == _FT_DIR:
        return plan.blk_of[idx] // B if nb else 0
    if ino.flags[idx] & ESCAPED:
        return 0
    if plan.layout_of[idx] == _CHUNK:
        u = F.chunk_bits(size) - F.BLOCK_BITS if epoch1 else 31
        if nb:
            u |= (plan.blk_of[idx] // B) & 0xFFFF0000
        return u
    if nb:
        return plan.blk_of[idx] // B
    if ft == _FT_CHR or ft == _FT_BLK:
        u = ino.obj[idx].content.rdev  # type: ignore[union-attr]
        if u > 0xFFFFFFFF:
            raise ErofsError(f"device number {u} exceeds EROFS u32 limit")
        return u
    return 0


def _inode_bytes(ino: Inodes, idx: int, plan: _Plan, shared_ref: list[int],
                 epoch1: bool) -> bytes:
    """Pass 2, one inode: its header, xattrs and inline data."""
    st, size, layout, _inline = _shape(ino, idx)
    ft = ino.ft[idx]
    u = _u_field(ino, idx, plan, size, epoch1)
    mode = _FT_MODE[ft] | (st.st_mode & 0o7777)  # type: ignore[attr-defined]
    x = ino.xattrs.get(idx)
    xs = x.size() if x is not None and x.filt else 0
    icount = 0 if xs == 0 else 1 + (xs - 12) // 4
    if icount > 0xFFFF:
        raise ErofsError("too many xattrs on one inode")
    nlink = ino.nlink[idx]
    uid, gid = st.st_uid, st.st_gid  # type: ignore[attr-defined]
    if not plan.extended[idx]:
        parts = [_compact(layout, icount, mode, nlink, size, 0, u, idx, uid, gid)]
    else:
        if uid > 0xFFFFFFFF or gid > 0xFFFFFFFF or nlink > 0xFFFFFFFF:
            raise ErofsError("uid, gid or nlink out of range")
        parts = [_extended(layout | 1, icount, mode, 0, size & _MASK64, u,
                           idx if epoch1 else plan.pos_of[idx] // 32, uid, gid,
                           st.st_mtim_sec & _MASK64,  # type: ignore[attr-defined]
                           st.st_mtim_nsec if epoch1 else 0, nlink)]  # type: ignore[attr-defined]
    if xs:
        parts.append(_xattr_bytes(x, shared_ref))  # type: ignore[arg-type]
    tail = ino.tail[idx]
    if ft == _FT_DIR:
        if tail:
            names, kids = ino.dirents[idx]
            lo = dirent_runs(names)[0][-1]
            parts.append(_dirent_bytes(names, kids, lo, len(names), plan.pos_of, ino.ft))
    elif not ino.flags[idx] & ESCAPED:
        c = ino.obj[idx].content  # type: ignore[union-attr]
        t = type(c)
        if t is Inline:
            if tail:
                parts.append(c.data[len(c.data) - tail:])
        elif t is Symlink:
            if not ino.n_blocks[idx]:
                parts.append(c.target)
        elif layout == _CHUNK and tail:
            parts.append(b"\xff" * tail)
    return b"".join(parts)


def _emit_blocks(out: _Out, ino: Inodes, plan: _Plan) -> None:
    """Pass 2, the data area: directory blocks, inline files' full blocks, promoted
    symlink targets and chunk indexes."""
    for idx, q in plan.blk_of.items():
        out.at(q)
        nb = ino.n_blocks[idx]
        if ino.ft[idx] == _FT_DIR:
            names, kids = ino.dirents[idx]
            bounds = dirent_runs(names)[0]
            for k in range(nb):
                out.at(q + k * B)
                out.buf += _dirent_bytes(names, kids, bounds[k], bounds[k + 1], plan.pos_of,
                                         ino.ft)
            continue
        c = ino.obj[idx].content  # type: ignore[union-attr]
        if type(c) is Inline:
            out.buf += c.data[:nb * B]
        elif type(c) is Symlink:
            out.buf += c.target[:B]
        else:
            out.buf += b"\xff" * B


def emit_image(ino: Inodes, shared: list[Xattr], version: int, flags: int,
               min_mtime: tuple[int, int], sink: Callable[[bytes], object]) -> None:
    """Lay out the image and stream its bytes to *sink*, front to back."""
    epoch1 = version < 2
    if epoch1:
        _fixup_epoch1(ino, min_mtime)
    plan = _plan(ino, shared, epoch1, min_mtime)
    n = len(ino)
    out = _Out(sink)
    out.buf += F.HEADER.pack(F.COMPOSEFS_MAGIC, F.COMPOSEFS_HEADER_VERSION, flags, version)
    build_time, build_nsec = min_mtime if epoch1 else (0, 0)
    out.at(F.SUPERBLOCK_OFFSET)
    out.buf += F.SUPERBLOCK.pack(
        F.EROFS_MAGIC, 0,
        F.FEATURE_COMPAT_MTIME | F.FEATURE_COMPAT_XATTR_FILTER, F.BLOCK_BITS, 0,
        (plan.pos_of[0] // 32) & 0xFFFF, n, build_time, build_nsec, plan.end // B, 0,
        plan.inodes_end // B if epoch1 else 0, b"", b"", 0, 0, 0, 0, 0, 0, 0, 0, 0)
    if epoch1:
        xbase = plan.inodes_end % B - plan.inodes_end
        shared_ref = [(o + xbase) >> 2 for o in plan.shared_off]
    else:
        shared_ref = [o >> 2 for o in plan.shared_off]
    for idx in range(n):
        out.at(plan.pos_of[idx])
        out.buf += _inode_bytes(ino, idx, plan, shared_ref, epoch1)
    out.at(plan.inodes_end)
    for i, s, v in shared:
        e = _xent(len(s), i, len(v)) + s + v
        out.buf += e + bytes(-len(e) % 4)
    _emit_blocks(out, ino, plan)
    out.at(plan.end)
    out.flush()

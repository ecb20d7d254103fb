"""On-disk constants and small helpers of the composefs EROFS format (docs/images.md)."""

from __future__ import annotations

import re
import struct

import xxhash

from cfsd.core.tree import (  # noqa: F401 - re-exported for the erofs modules
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    S_IFSOCK,
)

__all__ = [
    "BLOCK_BITS", "BLOCK_SIZE", "COMPOSEFS_MAGIC", "ErofsError", "EROFS_MAGIC",
    "XATTR_PREFIXES", "chunk_bits", "chunk_count", "metacopy_value", "object_pathname",
    "parse_object_pathname", "split_xattr_name",
]


class ErofsError(ValueError):
    """An EROFS image is invalid, or a tree cannot be written as an image."""


BLOCK_BITS = 12
BLOCK_SIZE = 4096
INODE_SLOT = 32

COMPOSEFS_MAGIC = 0xD078629A
COMPOSEFS_HEADER_VERSION = 1
COMPOSEFS_FLAGS_HAS_ACL = 1
EROFS_MAGIC = 0xE0F5E1E2
SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_END = 1152
MAX_IMAGE_SIZE = 1 << 30

FEATURE_COMPAT_SB_CHKSUM = 1
FEATURE_COMPAT_MTIME = 2
FEATURE_COMPAT_XATTR_FILTER = 4
FEATURE_COMPAT_SUPPORTED = 7
FEATURE_INCOMPAT_CHUNKED_FILE = 4

# data layouts as stored in the format field (already shifted)
LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 4
LAYOUT_CHUNK_BASED = 8
LAYOUT_MASK = 0x0E

# directory entry file types
FT_UNKNOWN = 0
FT_REG = 1
FT_DIR = 2
FT_CHR = 3
FT_BLK = 4
FT_FIFO = 5
FT_SOCK = 6
FT_LNK = 7


FT_TO_IFMT = {FT_REG: S_IFREG, FT_DIR: S_IFDIR, FT_CHR: S_IFCHR, FT_BLK: S_IFBLK,
              FT_FIFO: S_IFIFO, FT_SOCK: S_IFSOCK, FT_LNK: S_IFLNK}
IFMT_TO_FT = {v: k for k, v in FT_TO_IFMT.items()}

# struct layouts (little-endian)
HEADER = struct.Struct("<IIII16x")                      # composefs header, 32 bytes
SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")  # 128 bytes
COMPACT_INODE = struct.Struct("<HHHHIIIIHH4x")          # 32 bytes
EXTENDED_INODE = struct.Struct("<HHHHQIIIIQII16x")      # 64 bytes
XATTR_IBODY_HEADER = struct.Struct("<IB7x")             # 12 bytes
XATTR_ENTRY = struct.Struct("<BBH")                     # 4 bytes
DIRENT = struct.Struct("<QHBx")                         # 12 bytes

assert SUPERBLOCK.size == 128 and COMPACT_INODE.size == 32 and EXTENDED_INODE.size == 64

XATTR_FILTER_SEED = 0x25BBE08F
XATTR_PREFIXES: tuple[bytes, ...] = (
    b"", b"user.", b"system.posix_acl_access", b"system.posix_acl_default", b"trusted.",
    b"lustre.", b"security.",
)
# Prefix search order: 6, 5, 4, 3, 2, 1, 0 (Epoch1 skips 5, "lustre.")
_PREFIX_ORDER_V2 = (6, 5, 4, 3, 2, 1)
_PREFIX_ORDER_V1 = (6, 4, 3, 2, 1)

XATTR_OVERLAY_PREFIX = b"trusted.overlay."
XATTR_OVERLAY_ESCAPED_PREFIX = b"trusted.overlay.overlay."
XATTR_OVERLAY_METACOPY = b"trusted.overlay.metacopy"
XATTR_OVERLAY_REDIRECT = b"trusted.overlay.redirect"
XATTR_OVERLAY_OPAQUE_ROOT = b"trusted.overlay.opaque"
XATTR_OVERLAY_WHITEOUT = b"trusted.overlay.overlay.whiteout"
XATTR_OVERLAY_WHITEOUTS = b"trusted.overlay.overlay.whiteouts"
XATTR_OVERLAY_OPAQUE = b"trusted.overlay.overlay.opaque"
XATTR_USERXATTR_WHITEOUT = b"user.overlay.whiteout"
XATTR_USERXATTR_WHITEOUTS = b"user.overlay.whiteouts"
XATTR_USERXATTR_OPAQUE = b"user.overlay.opaque"
XATTR_SECURITY_SELINUX = b"security.selinux"

LCFS_MAX_NONINLINE_CHUNKS = 1024

_HEX = re.compile(rb"[0-9a-fA-F]*")


def split_xattr_name(name: bytes, epoch1: bool) -> tuple[int, bytes]:
    """Split an xattr name into ``(prefix index, suffix)`` (first matching prefix wins)."""
    for idx in (_PREFIX_ORDER_V1 if epoch1 else _PREFIX_ORDER_V2):
        prefix = XATTR_PREFIXES[idx]
        if name.startswith(prefix):
            return idx, name[len(prefix):]
    return 0, name


def filter_bit(idx: int, suffix: bytes) -> int:
    """The name-filter (bloom) bit of one xattr."""
    return 1 << (xxhash.xxh32_intdigest(suffix, seed=XATTR_FILTER_SEED + idx) & 31)


def chunk_bits(size: int) -> int:
    """``compute_chunk_bitsize``: log2 of the chunk size used for a file of ``size`` bytes."""
    if size <= BLOCK_SIZE:
        return BLOCK_BITS
    bits = (size - 1).bit_length()
    return bits if bits <= 31 + BLOCK_BITS else 31 + BLOCK_BITS


def chunk_count(size: int) -> int:
    """Number of chunk index entries needed for a file of ``size`` bytes."""
    if size <= 1 << (31 + BLOCK_BITS):
        return 1 if size > 0 else 0
    bits = chunk_bits(size)
    return (size + (1 << bits) - 1) >> bits


def object_pathname(digest: bytes) -> bytes:
    """``xx/yyyy…``: the object path of a digest."""
    h = digest.hex().encode()
    return h[:2] + b"/" + h[2:]


def parse_object_pathname(path: bytes, size: int | None = None) -> bytes | None:
    """The digest named by the trailing ``xx/yyyy…`` of ``path`` (composefs-rs rules).

    With ``size`` None, a 64-byte digest is tried first, then a 32-byte one.  Returns None
    if the path does not end in a valid object path.
    """
    for n in ((64, 32) if size is None else (size,)):
        need = 2 * n + 1
        if len(path) < need:
            continue
        tail = path[-need:]
        hexpart = tail[:2] + tail[3:]
        if tail[2:3] != b"/" or not _HEX.fullmatch(hexpart):
            continue
        return bytes.fromhex(hexpart.decode("ascii"))
    return None


def parse_hex_digest(text: bytes, size: int | None = None) -> bytes | None:
    """Decode a hex digest of ``size`` bytes (None: 32 or 64); None if invalid."""
    if not _HEX.fullmatch(text) or len(text) % 2:
        return None
    n = len(text) // 2
    if (size is None and n not in (32, 64)) or (size is not None and n != size):
        return None
    return bytes.fromhex(text.decode("ascii"))


def metacopy_value(digest: bytes) -> bytes:
    """The ``trusted.overlay.metacopy`` value for an fs-verity digest (sha256 or sha512)."""
    alg = 1 if len(digest) == 32 else 2
    return bytes((0, 4 + len(digest), 0, alg)) + digest


def parse_metacopy(value: bytes, size: int | None) -> tuple[bool, bytes | None]:
    """Parse a metacopy value: ``(well_formed, digest)`` for a digest size (None = any)."""
    sizes = (32, 64) if size is None else (size,)
    for n in sizes:
        if len(value) == 4 + n:
            ok = (value[0] == 0 and value[1] == 4 + n and value[2] == 0
                  and value[3] == (1 if n == 32 else 2))
            return True, (value[4:] if ok else None)
    return False, None

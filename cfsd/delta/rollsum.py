"""bup-style rolling-checksum blob splitting and matching (docs/delta.md).

The split rule is tar-diff's: a 128-byte window, char offset 31, ``s1 = 128*31`` and
``s2 = 128*127*31`` with a zeroed window at the start of every blob, per byte
``s1 += in - out; s2 += s1 - 128*(out + 31)`` (uint32); split after a byte when the low 13 bits
of ``s2`` are all ones or when the blob reaches 32 KiB.  Each blob is ``(offset, size, crc32)``.

Pure Python would need a loop per byte, so the sums are computed with big integers instead.
``s2`` depends only on the window: ``s2 = 128*127*31 + sum((age + 1) * byte)`` over the last
128 bytes of the blob (``age`` 0 = newest; bytes before the blob start count as zeros).  Spreading
a chunk into 24-bit lanes of one integer and multiplying by ``sum((a + 1) << 24a)`` yields every
full-window sum at once (a lane never exceeds 255 * 8256 < 2**24, so lanes do not interfere).
Only the first 127 positions of a blob see the zeroed window; they are computed directly.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

WINDOW = 128
CHAR_OFFSET = 31
BLOB_BITS = 13
MAX_BLOB = 8192 * 4
_MASK = (1 << BLOB_BITS) - 1
_S2_INIT = WINDOW * (WINDOW - 1) * CHAR_OFFSET
# lane condition: (S2_INIT + lane) & MASK == MASK  <=>  lane & MASK == _TARGET
_TARGET = (_MASK - _S2_INIT) & _MASK
_LANE = 24
_WEIGHTS = sum((a + 1) << (_LANE * a) for a in range(WINDOW))
CHUNK = 1 << 20


@dataclass(frozen=True)
class Blob:
    """One content-defined piece of a file: offset, size and CRC-32 (IEEE)."""

    offset: int
    size: int
    crc: int


def _full_window_splits(ctx: bytes, chunk: bytes, base: int) -> list[int]:
    """Absolute positions in *chunk* (starting at *base*) whose full-window sum splits.

    *ctx* holds up to 127 bytes preceding the chunk; positions whose window reaches before
    it are reported too but are only used when the window really lies inside one blob.
    """
    seq = bytes(WINDOW - 1 - len(ctx)) + ctx + chunk
    lanes = bytearray(3 * len(seq))
    lanes[0::3] = seq
    product = int.from_bytes(lanes, "little") * _WEIGHTS
    raw = product.to_bytes(3 * (len(seq) + WINDOW), "little")
    lows = raw[0::3]
    mids = raw[1::3]
    low_byte, mid_bits = _TARGET & 0xFF, _TARGET >> 8
    out: list[int] = []
    i = lows.find(low_byte, WINDOW - 1)
    end = len(seq)
    while 0 <= i < end:
        if mids[i] & 0x1F == mid_bits:
            out.append(base + i - (WINDOW - 1))
        i = lows.find(low_byte, i + 1)
    return out


def _early_split(data: bytes | bytearray, start: int, limit: int) -> int | None:
    """First split among the first 127 positions of a blob (window partly zero)."""
    s1 = 0
    s2 = 0
    for i in range(start, min(start + WINDOW - 1, limit)):
        s2 += s1 + data[i]
        s1 += data[i]
        if (s2 + _S2_INIT) & _MASK == _MASK:
            return i
    return None


def rollsum_blobs(read: Callable[[int], bytes]) -> list[Blob]:
    """Split the stream returned by successive ``read(n)`` calls into blobs (see module doc)."""
    blobs: list[Blob] = []
    pending = bytearray()          # bytes from the current blob start on
    start = 0                      # absolute offset of pending[0]
    splits: list[int] = []         # candidate full-window split positions >= start
    ctx = b""
    eof = False
    while not eof:
        chunk = read(CHUNK)
        if not chunk:
            eof = True
        else:
            base = start + len(pending)
            splits.extend(_full_window_splits(ctx, chunk, base))
            ctx = (ctx + chunk[-(WINDOW - 1):])[-(WINDOW - 1):]
            pending += chunk
        avail = len(pending)
        pos = 0                    # blob start inside pending
        si = 0
        while pos < avail:
            limit = min(pos + MAX_BLOB, avail)
            cut = _early_split(pending, pos, limit)
            if cut is None:
                si = bisect.bisect_left(splits, start + pos + WINDOW - 1, si)
                if si < len(splits) and splits[si] - start < limit:
                    cut = splits[si] - start
                elif limit == pos + MAX_BLOB:
                    cut = limit - 1
                elif eof:
                    cut = avail - 1
                else:
                    break
            size = cut + 1 - pos
            blobs.append(Blob(start + pos, size, zlib.crc32(pending[pos:cut + 1])))
            pos = cut + 1
        if pos:
            del pending[:pos]
            start += pos
            splits = splits[bisect.bisect_left(splits, start):]
    return blobs


@dataclass(frozen=True)
class RollsumMatch:
    """A target blob whose CRC and size equal those of a source blob."""

    source: Blob
    target: Blob


def match_blobs(source: Iterable[Blob], target: list[Blob]) -> tuple[list[RollsumMatch], int]:
    """Matches sorted by target offset, and the percentage of target blobs matched."""
    by_key: dict[tuple[int, int], Blob] = {}
    for b in source:
        by_key.setdefault((b.crc, b.size), b)
    matches = [RollsumMatch(by_key[(t.crc, t.size)], t) for t in target
               if (t.crc, t.size) in by_key]
    matches.sort(key=lambda m: m.target.offset)
    ratio = len(matches) * 100 // len(target) if target else 0
    return matches, ratio

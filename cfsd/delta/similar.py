"""Content similarity between files: sampled content-defined fingerprints (docs/delta.md).

A file's *features* are CRC-32s of the 32 bytes around content-defined anchors: positions
where a weighted sum of the last 16 bytes has its low ``bits`` bits equal to a constant (one
anchor every ``2**bits`` bytes on average, the same positions whatever precedes them, so
insertions and renames keep the features of unchanged content).  Only the first
``FP_BYTES`` of a file are sampled.

The weighted sums are computed for a whole chunk at once, as in ``rollsum``: the bytes are
spread into 16-bit lanes of one integer and multiplied by ``sum(w_a << 16a)`` with odd
weights below 16 (a lane never exceeds 255 * 16 * 15 < 2**16, so lanes do not interfere).
Above 8 bits, the 8-bit anchors are thinned by the low bits of their feature.

:class:`ContentIndex` maps features to the old files that have them (features shared by more
than ``MAX_POSTING`` files are dropped as uninformative) and ranks old files by the number of
features they share with a new file.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import closing
from typing import IO

WINDOW = 16
SPAN_BEFORE = WINDOW - 1
SPAN_AFTER = 17
LANE = 16
_WEIGHTS = sum((((a * 2654435761) >> 7) & 0x0F | 1) << (LANE * a) for a in range(WINDOW))
CHUNK = 1 << 20
FP_BYTES = 1 << 20
MIN_BITS = 6
MAX_FEATURES = 1 << 20
MAX_POSTING = 8
MIN_SIZE = 64
_TARGET = 0x15
_TABLES: dict[int, bytes] = {}


def _table(bits: int) -> bytes:
    t = _TABLES.get(bits)
    if t is None:
        mask = (1 << bits) - 1
        t = bytes(1 if (v & mask) == (_TARGET & mask) else 0 for v in range(256))
        _TABLES[bits] = t
    return t


def _anchors(seg: bytes, bits: int) -> list[int]:
    """Positions in *seg* (>= WINDOW - 1) whose 16-byte window sum is an anchor."""
    n = len(seg)
    lanes = bytearray(2 * n)
    lanes[0::2] = seg
    raw = (int.from_bytes(lanes, "little") * _WEIGHTS).to_bytes(2 * n + 2 * WINDOW, "little")
    hits = raw[0:2 * n:2].translate(_table(min(bits, 8)))
    out: list[int] = []
    i = hits.find(1, WINDOW - 1)
    while i >= 0:
        out.append(i)
        i = hits.find(1, i + 1)
    return out


def fingerprint(data: bytes | bytearray | memoryview, bits: int = MIN_BITS) -> set[int]:
    """The feature set of *data* (its first ``FP_BYTES``); empty for tiny data."""
    data = bytes(memoryview(data)[:FP_BYTES])
    out: set[int] = set()
    extra = 0
    if bits > 8:   # sparser sampling: keep a fixed fraction of the 8-bit anchors' features
        extra = bits - 8
    keep = (1 << extra) - 1
    for c in range(0, len(data), CHUNK):
        lo = max(0, c - SPAN_BEFORE)
        seg = data[lo:c + CHUNK + SPAN_AFTER]
        first = c - lo
        for i in _anchors(seg, bits):
            if i < first or i - first >= CHUNK or i + SPAN_AFTER > len(seg):
                continue
            f = zlib.crc32(seg[i - SPAN_BEFORE:i + SPAN_AFTER])
            if not f & keep:
                out.add(f)
    return out


def read_prefix(f: IO[bytes], n: int = FP_BYTES) -> bytes:
    """Up to *n* bytes from the current position of *f*."""
    parts: list[bytes] = []
    while n > 0:
        b = f.read(min(n, CHUNK))
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def density_bits(total: int) -> int:
    """Anchor bits so that *total* sampled bytes give at most about ``MAX_FEATURES``."""
    bits = MIN_BITS
    while total >> bits > MAX_FEATURES and bits < 24:
        bits += 1
    return bits


class ContentIndex:
    """Features of many files (identified by an int) -> the files that have them."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self._post: dict[int, int | list[int]] = {}
        self.files = 0

    def add(self, file_id: int, features: Iterable[int]) -> None:
        """Record the features of one file."""
        post = self._post
        self.files += 1
        for f in features:
            cur = post.get(f)
            if cur is None:
                post[f] = file_id
            elif isinstance(cur, int):
                if cur != file_id:
                    post[f] = [cur, file_id]
            elif cur and file_id not in cur:
                if len(cur) >= MAX_POSTING:
                    cur.clear()        # too common to tell files apart
                else:
                    cur.append(file_id)

    def shared(self, features: Iterable[int]) -> Counter[int]:
        """Per file id, how many of *features* it has."""
        counts: Counter[int] = Counter()
        post = self._post
        for f in features:
            cur = post.get(f)
            if cur is None:
                continue
            if isinstance(cur, int):
                counts[cur] += 1
            else:
                counts.update(cur)
        return counts


def build_index(sizes: list[int], openers: list[Callable[[], IO[bytes]]]) -> ContentIndex:
    """Index the files ``0..n-1`` (size, opener); unreadable files are left out."""
    bits = density_bits(sum(min(s, FP_BYTES) for s in sizes))
    index = ContentIndex(bits)
    for i, (size, opener) in enumerate(zip(sizes, openers, strict=True)):
        if size < MIN_SIZE:
            continue
        try:
            with closing(opener()) as f:
                data = read_prefix(f)
        except OSError:
            continue
        index.add(i, fingerprint(data, bits))
    return index

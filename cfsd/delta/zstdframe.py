"""zstd frame boundaries, found from the frame and block headers without decompressing.

python-zstandard's ``stream_reader`` returns EOF silently when its input ends inside a frame,
and with ``read_across_frames=False`` it goes on decoding whatever follows the first frame on
the next read.  :class:`FrameWalker` follows the compressed bytes (frame header, block headers
and sizes, checksum, skippable frames) so the caller can tell a clean end between frames from a
truncated stream, and :class:`WalkedReader` can hand a decoder exactly the first frame.
"""

from __future__ import annotations

from typing import Protocol

from cfsd.core.errors import FormatError

CHUNK = 1 << 20


class ZstdFrameError(FormatError):
    """The bytes cannot be zstd frames."""


class Reader(Protocol):
    """Anything with ``read(n) -> bytes`` (empty at EOF)."""

    def read(self, n: int = ..., /) -> bytes: ...


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK = 0xFFFFFFF0
_SKIPPABLE_MAGIC = 0x184D2A50


class FrameWalker:
    """Follows zstd frame structure (headers, block sizes) over the compressed bytes."""

    def __init__(self, first_only: bool = False) -> None:
        self.first_only = first_only
        self.frames = 0
        self._state = "magic"
        self._need = 4
        self._buf = bytearray()
        self._skip = 0
        self._after = ""
        self._checksum = False

    @property
    def at_boundary(self) -> bool:
        """True between frames (the only valid place for the stream to end)."""
        return self._state == "magic" and not self._buf and not self._skip

    def _end_frame(self) -> None:
        self.frames += 1
        self._state, self._need = "magic", 4

    def _after_skip(self) -> None:
        if self._after == "block":
            self._state, self._need = "block", 3
        elif self._after == "checksum":
            self._after = "end"
            self._skip = 4
        else:
            self._end_frame()

    def feed(self, data: bytes | memoryview) -> int:
        """Consume compressed bytes; ZstdFrameError on an impossible structure.

        Returns how many bytes were consumed: all of them, except in ``first_only`` mode,
        where consumption stops at the end of the first frame.
        """
        n = len(data)
        i = 0
        while i < n:
            if self.first_only and self.frames:
                return i
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                if not self._skip:
                    self._after_skip()
                continue
            k = min(self._need - len(self._buf), n - i)
            self._buf += data[i:i + k]
            i += k
            if len(self._buf) < self._need:
                return i
            field = bytes(self._buf)
            self._buf.clear()
            self._step(field)
        return i

    def _step(self, field: bytes) -> None:
        state = self._state
        if state == "magic":
            magic = int.from_bytes(field, "little")
            if magic == _ZSTD_MAGIC:
                self._state, self._need = "fhd", 1
            elif magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC and not self.first_only:
                self._state, self._need = "skiplen", 4
            else:
                raise ZstdFrameError("invalid zstd data: not a zstd frame")
        elif state == "fhd":
            fhd = field[0]
            if fhd & 0x08:
                raise ZstdFrameError("invalid zstd frame header (reserved bit set)")
            single = bool(fhd & 0x20)
            self._checksum = bool(fhd & 0x04)
            fcs = (0, 2, 4, 8)[fhd >> 6] or (1 if single else 0)
            rest = (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
            if rest:
                self._state, self._need = "fhdrest", rest
            else:
                self._state, self._need = "block", 3
        elif state == "fhdrest":
            self._state, self._need = "block", 3
        elif state == "block":
            h = int.from_bytes(field, "little")
            last, btype, bsize = h & 1, (h >> 1) & 3, h >> 3
            if btype == 3:
                raise ZstdFrameError("invalid zstd block type")
            self._skip = 1 if btype == 1 else bsize
            self._after = ("checksum" if self._checksum else "end") if last else "block"
            self._state = "skip"
            if not self._skip:
                self._after_skip()
        elif state == "skiplen":
            self._skip = int.from_bytes(field, "little")
            self._after = "end"
            self._state = "skip"
            if not self._skip:
                self._end_frame()


class WalkedReader:
    """A reader that passes everything it returns through a :class:`FrameWalker`.

    With a ``first_only`` walker it returns exactly the bytes of the first frame, then EOF
    (python-zstandard's reader would otherwise go on decoding whatever follows the frame).
    """

    def __init__(self, inner: Reader, walker: FrameWalker) -> None:
        self._inner = inner
        self.walker = walker

    def read(self, n: int = -1) -> bytes:
        if self.walker.first_only and self.walker.frames:
            return b""
        data = self._inner.read(n if n >= 0 else CHUNK)
        if data:
            k = self.walker.feed(data)
            if k < len(data):
                data = data[:k]
        return data

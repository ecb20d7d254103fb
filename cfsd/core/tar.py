"""Tar parsing with tar-core semantics and layer splitting into splitstreams (docs/splitstream.md).

The parser is incremental: ``TarParser.parse(buf)`` looks at the start of a buffer and returns
an event telling how many bytes the next item's headers occupy (every extension header
included), or how many bytes it needs.  ``split_tar`` drives it over a decompressed layer and
writes a layer splitstream: header bytes inline, regular-file bodies larger than 64 bytes as
external objects, everything else (padding, small bodies, end-of-archive and any trailing
bytes) inline, so that ``cat`` reproduces the tar byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from cfsd.core.errors import FormatError

if TYPE_CHECKING:
    from cfsd.core.splitstream import SplitStreamWriter

BLOCK = 512
INLINE_CONTENT_MAX = 64
MAX_METADATA = 1 << 20
MAX_PENDING = 16
READ_SIZE = 1 << 20
_ZERO_BLOCK = bytes(BLOCK)
_HEADER_ONLY = frozenset(b"123456")
_WS = b" \t\n\r\x0b\x0c"


class TarError(FormatError):
    """The tar stream is malformed or uses an unsupported feature."""


@dataclass
class TarEntry:
    """One archive member with every extension header applied."""

    typeflag: int
    path: bytes
    link_target: bytes | None
    mode: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    size: int
    uname: bytes | None = None
    gname: bytes | None = None
    dev_major: int | None = None
    dev_minor: int | None = None
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)

    @property
    def is_file(self) -> bool:
        """Regular or contiguous file (the types whose body may be stored externally)."""
        return self.typeflag in (0x30, 0, 0x37)

    @property
    def padded_size(self) -> int:
        """Body size rounded up to the 512-byte block."""
        return -(-self.size // BLOCK) * BLOCK


@dataclass
class NeedData:
    """The parser needs at least *min_bytes* bytes from the current position."""

    min_bytes: int


@dataclass
class EntryEvent:
    """A member: *consumed* header bytes, then the body (``entry.padded_size`` bytes)."""

    consumed: int
    entry: TarEntry


@dataclass
class GlobalEvent:
    """A PAX global header (``g``) of *consumed* bytes including its data."""

    consumed: int


@dataclass
class EndEvent:
    """End of archive: *consumed* zero blocks (more bytes may follow until EOF)."""

    consumed: int


Event = NeedData | EntryEvent | GlobalEvent | EndEvent


def _trunc(b: bytes) -> bytes:
    i = b.find(0)
    return b if i < 0 else b[:i]


_OCTAL = re.compile(rb"\+?([0-7]+)")


_octal_memo: dict[bytes, int] = {}
OCTAL_MEMO_SIZE = 8192          # distinct field texts remembered (modes, ids, times repeat)


def parse_octal(field_bytes: bytes) -> int:
    """Octal text field: NUL-truncated, whitespace-trimmed, empty means 0."""
    v = _octal_memo.get(field_bytes)
    if v is not None:
        return v
    s = field_bytes.partition(b"\0")[0].strip(_WS)
    if not s:
        v = 0
    else:
        m = _OCTAL.fullmatch(s)
        if m is None:
            raise TarError(f"invalid octal field {field_bytes!r}")
        v = int(m.group(1), 8)
    if len(_octal_memo) >= OCTAL_MEMO_SIZE:
        _octal_memo.clear()
    _octal_memo[bytes(field_bytes)] = v
    return v


def parse_numeric(field_bytes: bytes) -> int:
    """Octal text or GNU base-256 (high bit set; negative values rejected)."""
    if not field_bytes:
        return 0
    first = field_bytes[0]
    if first & 0x80:
        if first & 0x40:
            raise TarError("negative base-256 number in tar header")
        value = int.from_bytes(bytes([first & 0x7F]) + field_bytes[1:], "big")
        if value >= 1 << 64:
            raise TarError("base-256 number too large")
        return value
    return parse_octal(field_bytes)


def _pax_u64(value: bytes, key: str) -> int:
    s = value.decode("ascii", "replace")
    t = s[1:] if s.startswith("+") else s
    if not t.isdigit() or not t.isascii():
        raise TarError(f"invalid PAX value for {key}: {s!r}")
    v = int(t)
    if v >= 1 << 64:
        raise TarError(f"PAX value for {key} out of range")
    return v


def pax_mtime_nsec(value: bytes) -> int:
    """Nanoseconds of a PAX mtime: first 9 fraction digits, right-padded (0 if unparsable)."""
    _, dot, frac = value.partition(b".")
    if not dot or not frac or not frac.isdigit():
        return 0
    return int(frac[:9].ljust(9, b"0"))


def pax_records(data: bytes) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` records of a PAX extended header (tar-core iteration rules)."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    n = len(data)
    while pos < n:
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        len_text = data[pos:sp]
        if not len_text.isdigit():
            break
        length = int(len_text)
        rec = data[pos:pos + length]
        if length == 0 or len(rec) != length or rec[-1:] != b"\n":
            raise TarError("malformed PAX extended header record")
        kv = rec[len(len_text) + 1:-1] if length > len(len_text) + 1 else None
        if kv is None or b"=" not in kv:
            raise TarError("malformed PAX extended header record")
        key, _, value = kv.partition(b"=")
        out.append((key, value))
        pos += length
    return out


def _checksum_ok(h: bytes) -> None:
    expected = parse_octal(h[148:156])
    unsigned = sum(h) - sum(h[148:156]) + 8 * 32
    if expected == unsigned:
        return
    signed = unsigned - 256 * sum(1 for i, b in enumerate(h) if b >= 128 and not 148 <= i < 156)
    if expected != signed % (1 << 64):
        raise TarError(f"tar header checksum mismatch (stored {expected}, computed {unsigned})")


class TarParser:
    """Stateless-per-call tar header parser (extension chains are re-parsed on NeedData)."""

    def __init__(self) -> None:
        self.done = False

    def parse(self, buf: bytes | bytearray | memoryview) -> Event:
        """Parse the next item at the start of *buf*."""
        if self.done:
            return EndEvent(0)
        mv = memoryview(buf)
        pos = 0
        count = 0
        meta_size = 0
        long_name: bytes | None = None
        long_link: bytes | None = None
        pax: bytes | None = None
        while True:
            if len(mv) - pos < BLOCK:
                return NeedData(pos + BLOCK)
            h = bytes(mv[pos:pos + BLOCK])
            if h == _ZERO_BLOCK:
                if len(mv) - pos < 2 * BLOCK:
                    return NeedData(pos + 2 * BLOCK)
                if mv[pos + BLOCK:pos + 2 * BLOCK] != _ZERO_BLOCK:
                    raise TarError("stray zero block in tar stream")
                if count:
                    raise TarError("tar extension header without a following entry")
                self.done = True
                end = pos + 2 * BLOCK
                while len(mv) - end >= BLOCK and mv[end:end + BLOCK] == _ZERO_BLOCK:
                    end += BLOCK
                return EndEvent(end)
            if count > MAX_PENDING:
                raise TarError("too many consecutive tar extension headers")
            _checksum_ok(h)
            typeflag = h[156]
            size = parse_numeric(h[124:136])
            padded = -(-size // BLOCK) * BLOCK
            magic = h[257:265]
            ext_format = magic in (b"ustar\x0000", b"ustar  \x00")
            if ext_format and typeflag in b"LKx":
                if (typeflag == 0x4C and long_name is not None) or (
                        typeflag == 0x4B and long_link is not None) or (
                        typeflag == 0x78 and pax is not None):
                    raise TarError("duplicate tar extension header")
                meta_size += size
                if meta_size > MAX_METADATA:
                    raise TarError(f"tar entry metadata too large ({meta_size} bytes)")
                if len(mv) - pos < BLOCK + padded:
                    return NeedData(pos + BLOCK + padded)
                data = bytes(mv[pos + BLOCK:pos + BLOCK + size])
                if typeflag == 0x78:
                    pax = data
                else:
                    if data.endswith(b"\0"):
                        data = data[:-1]
                    if typeflag == 0x4C:
                        long_name = data
                    else:
                        long_link = data
                pos += BLOCK + padded
                count += 1
                continue
            if typeflag == 0x67:
                if size > MAX_METADATA:
                    raise TarError("PAX global header too large")
                if len(mv) - pos < BLOCK + padded:
                    return NeedData(pos + BLOCK + padded)
                return GlobalEvent(pos + BLOCK + padded)
            if ext_format and typeflag == 0x53:
                raise TarError("sparse tar entries are not supported")
            entry = self._entry(h, size, long_name, long_link, pax, magic)
            return EntryEvent(pos + BLOCK, entry)

    @staticmethod
    def _entry(h: bytes, size: int, long_name: bytes | None, long_link: bytes | None,
               pax: bytes | None, magic: bytes) -> TarEntry:
        ustar = magic == b"ustar\x0000"
        gnu = magic == b"ustar  \x00"
        path = _trunc(h[0:100])
        if ustar:
            prefix = _trunc(h[345:500])
            if prefix:
                path = prefix + b"/" + path
        if long_name is not None:
            path = long_name
        link: bytes | None = long_link if long_link is not None else (_trunc(h[157:257]) or None)
        uid = parse_numeric(h[108:116])
        gid = parse_numeric(h[116:124])
        mtime = parse_numeric(h[136:148])
        nsec = 0
        uname = _trunc(h[265:297]) if (ustar or gnu) else None
        gname = _trunc(h[297:329]) if (ustar or gnu) else None
        xattrs: list[tuple[bytes, bytes]] = []
        if pax is not None:
            sparse = False
            sparse_name: bytes | None = None
            version: dict[str, bytes] = {}
            for key, value in pax_records(pax):
                try:
                    k = key.decode()
                except UnicodeDecodeError:
                    raise TarError("PAX key is not UTF-8") from None
                if k == "path":
                    path = value
                elif k == "linkpath":
                    link = value
                elif k == "size":
                    size = _pax_u64(value, k)
                elif k == "uid":
                    uid = _pax_u64(value, k)
                elif k == "gid":
                    gid = _pax_u64(value, k)
                elif k == "mtime":
                    mtime = _pax_u64(value.partition(b".")[0], k)
                    nsec = pax_mtime_nsec(value)
                elif k == "uname":
                    uname = value
                elif k == "gname":
                    gname = value
                elif k in ("GNU.sparse.offset", "GNU.sparse.numbytes", "GNU.sparse.map"):
                    sparse = True
                elif k in ("GNU.sparse.major", "GNU.sparse.minor"):
                    version[k] = value
                elif k == "GNU.sparse.name":
                    sparse_name = value
                elif k.startswith("SCHILY.xattr."):
                    xattrs.append((key[len("SCHILY.xattr."):], value))
            if sparse or (version.get("GNU.sparse.major"), version.get("GNU.sparse.minor")) == (
                    b"1", b"0"):
                raise TarError("sparse tar entries are not supported")
            if sparse_name is not None:
                path = sparse_name
        if not link:
            link = None
        if not path:
            raise TarError("tar entry with an empty path")
        typeflag = h[156]
        if typeflag in _HEADER_ONLY and size != 0:
            raise TarError(f"non-zero size {size} for a tar entry of type {chr(typeflag)!r}")
        dev_major = parse_octal(h[329:337]) & 0xFFFFFFFF if (ustar or gnu) else None
        dev_minor = parse_octal(h[337:345]) & 0xFFFFFFFF if (ustar or gnu) else None
        return TarEntry(typeflag, path, link, parse_numeric(h[100:108]) & 0xFFFFFFFF,
                        uid, gid, mtime, nsec, size, uname or None, gname or None,
                        dev_major, dev_minor, xattrs)


class Reader(Protocol):
    """Anything with ``read(n) -> bytes`` (empty at EOF)."""

    def read(self, n: int = ..., /) -> bytes: ...


class _Buffer:
    """A read buffer with a moving start (avoids quadratic front deletion)."""

    def __init__(self, src: Reader) -> None:
        self.src = src
        self.buf = bytearray()
        self.pos = 0
        self.read_total = 0         # bytes read from src so far

    def __len__(self) -> int:
        return len(self.buf) - self.pos

    @property
    def offset(self) -> int:
        """Stream offset of the first unconsumed byte."""
        return self.read_total - len(self)

    def view(self) -> memoryview:
        return memoryview(self.buf)[self.pos:]

    def fill(self, n: int) -> bool:
        """Make at least *n* bytes available; False at EOF before that."""
        while len(self) < n:
            if self.pos > READ_SIZE:
                del self.buf[:self.pos]
                self.pos = 0
            data = self.src.read(max(READ_SIZE, n - len(self)))
            if not data:
                return False
            self.buf += data
            self.read_total += len(data)
        return True

    def take(self, n: int) -> bytes:
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += len(out)
        return out


def split_tar(src: Reader, writer: SplitStreamWriter,
              on_entry: Callable[[TarEntry], None] | None = None) -> None:
    """Split a decompressed tar stream into *writer* (the caller calls ``done()``)."""
    parser = TarParser()
    b = _Buffer(src)
    need = BLOCK
    store = writer.store
    while True:
        if not b.fill(need):
            if len(b) == 0 and need == BLOCK:
                return  # clean EOF at a header boundary
            raise TarError("unexpected EOF in tar stream")
        ev = parser.parse(b.view())
        if isinstance(ev, NeedData):
            need = ev.min_bytes
            continue
        need = BLOCK
        if isinstance(ev, GlobalEvent):
            writer.write_inline(b.take(ev.consumed))
            continue
        if isinstance(ev, EndEvent):
            writer.write_inline(b.take(len(b)))
            while data := src.read(READ_SIZE):
                writer.write_inline(data)
            return
        entry = ev.entry
        if on_entry is not None:
            on_entry(entry)
        writer.write_inline(b.take(ev.consumed))
        size, padded = entry.size, entry.padded_size
        if entry.is_file and size > INLINE_CONTENT_MAX:
            # a store may offer a writer for content it can place by offset (zero-copy)
            at = getattr(store, "object_writer_at", None)
            w = at(b.offset, size) if at is not None else store.object_writer()
            try:
                remaining = size
                while remaining:
                    if not len(b) and not b.fill(1):
                        raise TarError("unexpected EOF in tar entry body")
                    n = min(remaining, len(b))
                    w.write(b.view()[:n])
                    b.pos += n
                    remaining -= n
                res = w.finish()
            finally:
                w.abort()
            writer.add_external(res.digest, size, new=res.new)
            pad = padded - size
        else:
            pad = padded
        while pad:
            if not len(b) and not b.fill(1):
                raise TarError("unexpected EOF in tar entry")
            n = min(pad, len(b))
            writer.write_inline(b.take(n))
            pad -= n


class _ChunkCursor:
    """Inline bytes and external references of a layer splitstream, consumed in order."""

    def __init__(self, chunks: Iterator[tuple[bool, bytes]]) -> None:
        self.chunks = chunks
        self.buf = bytearray()
        self.pos = 0
        self.external: bytes | None = None   # an external ref waiting after the inline data
        self.done = False

    def available(self) -> int:
        return len(self.buf) - self.pos

    def fill(self, n: int) -> bool:
        """Make *n* inline bytes available (False if an external ref or the end comes first)."""
        while self.available() < n:
            if self.external is not None or self.done:
                return False
            try:
                external, data = next(self.chunks)
            except StopIteration:
                self.done = True
                return False
            if external:
                self.external = data
                return False
            if self.pos > READ_SIZE:
                del self.buf[:self.pos]
                self.pos = 0
            self.buf += data
        return True

    def take(self, n: int) -> bytes:
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def take_external(self) -> bytes | None:
        """The next chunk if it is an external reference (and no inline bytes precede it)."""
        if self.available():
            return None
        if self.external is None:
            self.fill(1)
        ext, self.external = self.external, None
        return ext


def layer_entries(chunks: Iterator[tuple[bool, bytes]]
                  ) -> Iterator[tuple[TarEntry, bytes | tuple[bytes, int]]]:
    """Entries of a layer splitstream with their content: inline bytes or (object, size).

    Reads back what split_tar wrote (docs/splitstream.md): headers from inline data, then either
    an external object (regular files > 64 bytes) or the inline body, then the padding.
    """
    cur = _ChunkCursor(chunks)
    parser = TarParser()
    need = BLOCK
    while True:
        if not cur.fill(need):
            if cur.available() == 0 and need == BLOCK and cur.done:
                return
            raise TarError("layer stream ends inside a tar header")
        ev = parser.parse(memoryview(cur.buf)[cur.pos:])
        if isinstance(ev, NeedData):
            need = ev.min_bytes
            continue
        need = BLOCK
        if isinstance(ev, GlobalEvent):
            cur.take(ev.consumed)
            continue
        if isinstance(ev, EndEvent):
            return
        entry = ev.entry
        cur.take(ev.consumed)
        content: bytes | tuple[bytes, int]
        if entry.is_file and entry.size > INLINE_CONTENT_MAX:
            ext = cur.take_external()
            if ext is None:
                raise TarError(f"{entry.path!r}: expected external content")
            content = (ext, entry.size)
            pad = entry.padded_size - entry.size
        else:
            if not cur.fill(entry.size):
                raise TarError(f"{entry.path!r}: inline content truncated")
            content = cur.take(entry.size)
            pad = entry.padded_size - entry.size
        if pad:
            if not cur.fill(pad):
                raise TarError(f"{entry.path!r}: padding truncated")
            cur.take(pad)
        yield entry, content

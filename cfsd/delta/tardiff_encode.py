"""tar-diff encoder: a new layer tar plus the old image's files -> a v1 or v2 tar-diff.

API::

    index = SourceIndex(old_files)            # Iterable[OldFile]; build once per old image
    stats = encode_tardiff(new_tar, index, out, EncodeOptions(version=1))

* ``OldFile(path, size, digest, opener)`` describes one regular file of the **merged root
  filesystem of the old image** (the consumer resolves OPEN names there, docs/delta.md):
  ``path`` is its canonical relative name (``usr/bin/bash``), ``size`` its length, ``digest``
  its content digest computed with ``EncodeOptions.hash_factory`` (or None when unknown) and
  ``opener()`` returns a new readable, seekable binary file of its content.  Files that are
  empty or whose path is not canonical UTF-8 are ignored.  Because the catalogue is the merged
  view, later layers, whiteouts and every entry type already hide earlier paths (creator bugs
  5.9.1/5.9.2 cannot happen) and every hardlink name is an ordinary path.
* ``new_tar`` is the uncompressed new layer (``read(n)``); it is read once, front to back.
  Everything except the content of chosen regular files is reproduced as DATA, so headers,
  padding and trailing bytes come back byte for byte; a tar the parser rejects (e.g. sparse
  members) degrades to DATA from that point on.
* Per regular file, a source is chosen by content digest, then by content similarity
  (sampled fingerprints, :mod:`cfsd.delta.similar`, same path/basename/stem favoured), then
  the same path, then a similar basename or stem with a similar size (docs/delta.md), and
  encoded as: DATA when tiny;
  OPEN/SEEK 0/COPY when identical; (v2) a ZSTD_DICT frame made with the whole old file as a
  raw-content dictionary when smaller than the file; bsdiff (ADD_DATA/DATA/SEEK, ADD split into
  <= 4 MiB ops, seeks absolute) within ``max_bsdiff_size``; rolling-checksum block COPYs when
  more than 20 % of the blobs match; DATA otherwise.
* Memory: one file at a time (spooled to a temporary file above 8 MiB); bsdiff holds both
  files plus ~16 bytes per old byte, zstd both files plus 8-16 bytes per old byte, rollsum
  a few MiB; the content index of the old files about 100 bytes per feature (at most
  about 2**20 features); DATA is flushed every 4 MiB.  The caps in :class:`EncodeOptions`
  bound it, and ``EncodeOptions.reserve`` lets parallel encoders share one budget.
* Output is deterministic for the same inputs and options.  ``EncodeStats.tar_sha256`` is the
  sha256 of the new tar as read, for the caller's guard: apply the result with
  :func:`cfsd.delta.tardiff.apply_tardiff` and compare before publishing (docs/delta.md).
"""

from __future__ import annotations

import hashlib
import posixpath
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, closing, nullcontext
from dataclasses import dataclass, field
from types import ModuleType
from typing import IO, Protocol

import zstandard

from cfsd.core.tar import BLOCK, EndEvent, GlobalEvent, NeedData, TarError, TarParser
from cfsd.delta import similar
from cfsd.delta.rollsum import Blob, match_blobs, rollsum_blobs
from cfsd.delta.tardiff import (
    HEADER_V1,
    HEADER_V2,
    MAX_DICT,
    OP_ADD_DATA,
    OP_COPY,
    OP_DATA,
    OP_OPEN,
    OP_SEEK,
    OP_ZSTD_DICT,
    Reader,
    SourceFile,
    TarDiffError,
    Writer,
    encode_uvarint,
    is_canonical_name,
)

DATA_CHUNK = 4 << 20
ADD_CHUNK = 4 << 20
READ = 1 << 20
SPOOL_MEMORY = 8 << 20
SIMILAR_SMALL = 64 << 10
ROLLSUM_MIN_RATIO = 20
_NO_DELTA_SUFFIXES = (".xz", ".bz2")


class Hasher(Protocol):
    """A streaming content hash (hashlib objects and FsVerityHasher qualify)."""

    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


@dataclass(frozen=True)
class OldFile:
    """One regular file of the old image's merged root filesystem, usable as a source."""

    path: str
    size: int
    digest: bytes | None
    opener: Callable[[], SourceFile]


@dataclass(frozen=True)
class EncodeOptions:
    """Encoder settings.

    ``version`` 1 (bsdiff, COPY, rollsum; readable by every consumer) or 2 (adds ZSTD_DICT,
    tried first for files within ``max_zstd_size``); ``level`` of the outer zstd stream;
    ``zstd_level`` of ZSTD_DICT frames (levels below 6 use 6); ``max_bsdiff_size`` /
    ``max_zstd_size``: both files must be smaller / no larger (lower than upstream's 192 and
    128 MiB to bound memory); ``rollsum`` enables block matching above those caps;
    ``hash_factory`` makes the hash that ``OldFile.digest`` was computed with; ``tmpdir`` for
    spooled file contents; ``reserve(nbytes)``, when given, is entered around every in-memory
    delta (zstd or bsdiff) with an estimate of the memory it needs (:func:`delta_memory`), so
    that encoders running in parallel can share one memory budget.
    """

    version: int = 1
    level: int = 3
    zstd_level: int = 6
    max_bsdiff_size: int = 64 << 20
    max_zstd_size: int = 64 << 20
    rollsum: bool = True
    hash_factory: Callable[[], Hasher] = hashlib.sha256
    tmpdir: str | None = None
    reserve: Callable[[int], AbstractContextManager[object]] | None = None


def delta_memory(old_size: int, new_size: int, zstd: bool) -> int:
    """Bytes an in-memory delta of two files needs, roughly (both files included).

    bsdiff: both files, two 8-byte suffix-sort arrays per old byte, the diff and extra
    strings (up to the new size each); zstd: both files, the dictionary's hash and chain
    tables (8-16 bytes per old byte, counted twice: the CDict and the compressor's copy).
    """
    if zstd:
        return 17 * old_size + 2 * new_size + (1 << 20)
    return 17 * old_size + 3 * new_size + (1 << 20)


@dataclass
class EncodeStats:
    """What the encoder did."""

    tar_size: int = 0
    tar_sha256: str = ""
    delta_size: int = 0
    files: int = 0
    copied: int = 0
    zstd: int = 0
    bsdiff: int = 0
    rollsum: int = 0
    literal: int = 0
    source_errors: int = 0
    sources_used: set[str] = field(default_factory=set)


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _stem(base: str) -> str:
    dot = base.find(".")
    return base if dot < 0 else base[:dot + 1]


def _similar_size(a: int, b: int) -> bool:
    return (a < SIMILAR_SMALL and b < SIMILAR_SMALL) or (a < 10 * b and b < 10 * a)


def _delta_candidate(path: str) -> bool:
    return not path.endswith(_NO_DELTA_SUFFIXES)


def normalize_tar_name(raw: bytes) -> str | None:
    """A tar member name as a clean relative path (``./d/f`` -> ``d/f``), None if unusable."""
    name = posixpath.normpath("/" + raw.decode("utf-8", "surrogateescape")).lstrip("/")
    return name if name and name != "." else None


class SourceIndex:
    """Lookup tables over the old files: by (size, digest), path, basename and stem, and
    (built on first use, once) by sampled content fingerprints (:mod:`cfsd.delta.similar`)."""

    def __init__(self, files: Iterable[OldFile]) -> None:
        self.by_content: dict[tuple[int, bytes], OldFile] = {}
        self.content_sizes: set[int] = set()
        self.by_path: dict[str, OldFile] = {}
        self.by_base: dict[str, list[OldFile]] = {}
        self.by_stem: dict[str, list[OldFile]] = {}
        self._indexed: list[OldFile] = []
        self._content: similar.ContentIndex | None = None
        self._lock = threading.Lock()
        for f in files:
            if f.size <= 0 or not is_canonical_name(f.path) or f.path in self.by_path:
                continue
            self.by_path[f.path] = f
        for path in sorted(self.by_path):
            f = self.by_path[path]
            if f.digest is not None:
                self.by_content.setdefault((f.size, f.digest), f)
                self.content_sizes.add(f.size)
            if _delta_candidate(path):
                base = _basename(path)
                self.by_base.setdefault(base, []).append(f)
                self.by_stem.setdefault(_stem(base), []).append(f)
                if f.size >= similar.MIN_SIZE:
                    self._indexed.append(f)

    def exact(self, size: int, digest: bytes, name: str | None) -> OldFile | None:
        """A file with this content, preferring the target's own path."""
        if name is not None:
            same = self.by_path.get(name)
            if same is not None and same.size == size and same.digest == digest:
                return same
        return self.by_content.get((size, digest))

    def similar(self, name: str | None, size: int) -> OldFile | None:
        """Same path, else closest-size file with the same basename, else the same stem."""
        if name is None or not _delta_candidate(name):
            return None
        same = self.by_path.get(name)
        if same is not None and _delta_candidate(same.path) and _similar_size(same.size, size):
            return same
        base = _basename(name)
        for table, key in ((self.by_base, base), (self.by_stem, _stem(base))):
            best: OldFile | None = None
            for f in table.get(key, ()):
                if _similar_size(f.size, size) and (
                        best is None or abs(f.size - size) < abs(best.size - size)):
                    best = f
            if best is not None:
                return best
        return None


    def content_index(self) -> similar.ContentIndex:
        """The fingerprint index of the old files (built once, by the first caller)."""
        with self._lock:
            if self._content is None:
                files = self._indexed
                self._content = similar.build_index([f.size for f in files],
                                                    [f.opener for f in files])
            return self._content

    def best(self, name: str | None, size: int, prefix: bytes) -> OldFile | None:
        """The old file sharing the most content with a new file (*prefix*: its first
        ``similar.FP_BYTES``), same-path/basename/stem files favoured; else :meth:`similar`.

        Score: shared features, plus a quarter of the new file's features for the same
        path and an eighth for the same basename or stem; at least 2 and 5 % of the
        features must be shared; sources over 16x the file (+1 MiB) are skipped (memory).
        Ties go to the closest size, then the path."""
        fallback = self.similar(name, size)
        if name is None or not _delta_candidate(name) or size < similar.MIN_SIZE:
            return fallback
        index = self.content_index()
        feats = similar.fingerprint(prefix, index.bits)
        n = len(feats)
        counts = index.shared(feats)
        if not counts:
            return fallback
        base = _basename(name)
        bonus: dict[str, int] = {}
        for f in (*self.by_stem.get(_stem(base), ()), *self.by_base.get(base, ())):
            bonus[f.path] = n // 8
        bonus[name] = n // 4
        limit = 16 * size + (1 << 20)
        ranked: list[tuple[int, int, str, OldFile]] = []
        for fid, c in counts.items():
            f = self._indexed[fid]
            if c >= max(2, n // 20) and f.size <= limit:
                ranked.append((-(c + bonus.get(f.path, 0)), abs(f.size - size), f.path, f))
        return min(ranked)[3] if ranked else fallback


class _OpWriter:
    """Writes the header and the zstd-compressed op stream; tracks the source position."""

    def __init__(self, out: Writer, version: int, level: int) -> None:
        self._out = out
        out.write(HEADER_V2 if version == 2 else HEADER_V1)
        self.size = 8
        self._z = zstandard.ZstdCompressor(level=level).compressobj()
        self._data = bytearray()
        self.current: str | None = None
        self.pos = 0

    def _raw(self, b: bytes | bytearray | memoryview) -> None:
        z = self._z.compress(b)
        if z:
            self._out.write(z)
            self.size += len(z)

    def _op(self, code: int, size: int, payload: bytes | bytearray | memoryview = b"") -> None:
        self._raw(bytes([code]) + encode_uvarint(size))
        if payload:
            self._raw(payload)

    def flush(self) -> None:
        """Emit buffered literal bytes as one DATA op."""
        if self._data:
            self._op(OP_DATA, len(self._data), self._data)
            self._data = bytearray()

    def literal(self, b: bytes | bytearray | memoryview) -> None:
        """Output bytes taken from the delta itself."""
        self._data += b
        if len(self._data) >= DATA_CHUNK:
            self.flush()

    def open(self, path: str) -> None:
        """Make *path* current (no op if it already is)."""
        if self.current != path:
            self.flush()
            raw = path.encode("utf-8")
            self._op(OP_OPEN, len(raw), raw)
            self.current, self.pos = path, 0

    def seek(self, pos: int) -> None:
        """Move the source position (no op if already there)."""
        if self.pos != pos:
            self.flush()
            self._op(OP_SEEK, pos)
            self.pos = pos

    def copy(self, n: int) -> None:
        """Copy *n* source bytes."""
        if n:
            self.flush()
            self._op(OP_COPY, n)
            self.pos += n

    def add(self, delta: bytes | memoryview) -> None:
        """ADD_DATA (all-zero pieces become COPY), split into ops of at most 4 MiB."""
        mv = memoryview(delta)
        for i in range(0, len(mv), ADD_CHUNK):
            piece = mv[i:i + ADD_CHUNK]
            if piece.nbytes and bytes(piece).count(0) == piece.nbytes:
                self.copy(piece.nbytes)
                continue
            self.flush()
            self._op(OP_ADD_DATA, piece.nbytes, piece)
            self.pos += piece.nbytes

    def zstd_dict(self, frame: bytes, source_size: int) -> None:
        """ZSTD_DICT: the applier ends at the source's EOF."""
        self.flush()
        self._op(OP_ZSTD_DICT, len(frame), frame)
        self.pos = source_size

    def close(self) -> None:
        """Flush everything and end the zstd stream."""
        self.flush()
        tail = self._z.flush()
        if tail:
            self._out.write(tail)
            self.size += len(tail)


class _Input:
    """Buffered single-pass reader over the new tar that hashes everything it reads."""

    def __init__(self, src: Reader) -> None:
        self._src = src
        self.buf = bytearray()
        self.pos = 0
        self.sha = hashlib.sha256()
        self.total = 0

    def __len__(self) -> int:
        return len(self.buf) - self.pos

    def _more(self, n: int) -> bool:
        data = self._src.read(n)
        if not data:
            return False
        self.sha.update(data)
        self.total += len(data)
        if self.pos > READ:
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += data
        return True

    def fill(self, n: int) -> bool:
        """At least *n* bytes buffered; False at EOF before that."""
        while len(self) < n:
            if not self._more(max(READ, n - len(self))):
                return False
        return True

    def view(self) -> memoryview:
        """The buffered bytes."""
        return memoryview(self.buf)[self.pos:]

    def chunks(self, n: int) -> Iterator[bytes]:
        """Exactly the next *n* bytes, in pieces; TarError if the stream ends first."""
        while n:
            if not len(self) and not self.fill(1):
                raise TarError("unexpected EOF in tar stream")
            k = min(n, len(self), READ)
            yield bytes(self.buf[self.pos:self.pos + k])
            self.pos += k
            n -= k

    def rest(self) -> Iterator[bytes]:
        """Everything left, buffered bytes first."""
        if len(self):
            yield bytes(self.view())
            self.pos = len(self.buf)
        while self._more(READ):
            yield bytes(self.view())
            self.pos = len(self.buf)


class _Encoder:
    def __init__(self, index: SourceIndex, w: _OpWriter, opts: EncodeOptions,
                 stats: EncodeStats) -> None:
        self.index = index
        self.w = w
        self.opts = opts
        self.stats = stats

    def run(self, inp: _Input) -> None:
        parser = TarParser()
        need = BLOCK
        while True:
            if not inp.fill(need):
                break
            try:
                ev = parser.parse(inp.view())
            except TarError:
                break
            if isinstance(ev, NeedData):
                need = ev.min_bytes
                continue
            need = BLOCK
            if isinstance(ev, GlobalEvent):
                self._literal(inp.chunks(ev.consumed))
                continue
            if isinstance(ev, EndEvent):
                break
            entry = ev.entry
            self._literal(inp.chunks(ev.consumed))
            try:
                if entry.typeflag in (0x30, 0) and entry.size > 0 and not (
                        entry.typeflag == 0 and entry.path.endswith(b"/")):
                    self._file(inp, normalize_tar_name(entry.path), entry.size)
                    self._literal(inp.chunks(entry.padded_size - entry.size))
                else:
                    self._literal(inp.chunks(entry.padded_size))
            except TarError:
                break
        self._literal(inp.rest())

    def _literal(self, chunks: Iterable[bytes]) -> None:
        for c in chunks:
            self.w.literal(c)

    # -- one regular file --

    def _file(self, inp: _Input, name: str | None, size: int) -> None:
        self.stats.files += 1
        index = self.index
        maybe_exact = size in index.content_sizes
        by_content = name is not None and _delta_candidate(name) and size >= similar.MIN_SIZE
        if not maybe_exact and not by_content and index.similar(name, size) is None:
            self.stats.literal += 1
            self._literal(inp.chunks(size))
            return
        with tempfile.SpooledTemporaryFile(SPOOL_MEMORY, dir=self.opts.tmpdir) as spool:
            hasher = self.opts.hash_factory() if maybe_exact else None
            try:
                for c in inp.chunks(size):
                    spool.write(c)
                    if hasher is not None:
                        hasher.update(c)
            except TarError:
                self._spool_literal(spool)  # truncated tar: keep the bytes read so far
                raise
            spool.seek(0)
            exact = index.exact(size, hasher.digest(), name) if hasher is not None else None
            source = exact or index.best(name, size, similar.read_prefix(spool))
            if source is None or size <= len(source.path.encode("utf-8")) + 4:
                self._spool_literal(spool)
            elif exact is not None:
                self._copy_whole(exact)
            else:
                spool.seek(0)
                self._delta(source, spool, size)

    def _spool_literal(self, spool: IO[bytes]) -> None:
        self.stats.literal += 1
        spool.seek(0)
        while c := spool.read(READ):
            self.w.literal(c)

    def _copy_whole(self, source: OldFile) -> None:
        self.stats.copied += 1
        self.stats.sources_used.add(source.path)
        self.w.open(source.path)
        self.w.seek(0)
        self.w.copy(source.size)

    def _read_old(self, source: OldFile) -> bytes | None:
        with closing(source.opener()) as f:
            data = f.read(source.size + 1)
            while len(data) <= source.size:
                more = f.read(source.size + 1 - len(data))
                if not more:
                    break
                data += more
        if len(data) != source.size:
            self.stats.source_errors += 1
            return None
        return data

    def _delta(self, source: OldFile, spool: IO[bytes], size: int) -> None:
        opts = self.opts
        zstd_cap = min(opts.max_zstd_size, MAX_DICT)
        use_zstd = opts.version == 2 and size <= zstd_cap and source.size <= zstd_cap
        use_bsdiff = (size < opts.max_bsdiff_size and source.size < opts.max_bsdiff_size
                      and _bsdiff_core() is not None)
        if use_zstd or use_bsdiff:
            need = delta_memory(source.size, size, use_zstd)
            with opts.reserve(need) if opts.reserve is not None else nullcontext():
                old = self._read_old(source)
                if old is None:
                    self._spool_literal(spool)
                    return
                spool.seek(0)
                new = spool.read()
                if old == new:
                    self._copy_whole(source)
                elif use_zstd:
                    self._zstd(source, old, new)
                elif use_bsdiff:
                    self._bsdiff(source, old, new)
            return
        if opts.rollsum and self._rollsum(source, spool, size):
            return
        self._spool_literal(spool)

    def _zstd(self, source: OldFile, old: bytes, new: bytes) -> None:
        frame = zstd_dict_frame(old, new, self.opts.zstd_level)
        if len(frame) >= len(new):
            self.stats.literal += 1
            self.w.literal(new)
            return
        self.stats.zstd += 1
        self.stats.sources_used.add(source.path)
        self.w.open(source.path)
        self.w.zstd_dict(frame, source.size)

    def _bsdiff(self, source: OldFile, old: bytes, new: bytes) -> None:
        core = _bsdiff_core()
        assert core is not None
        ctrl, diff, extra = core.diff(old, new)
        self.stats.bsdiff += 1
        self.stats.sources_used.add(source.path)
        w = self.w
        w.open(source.path)
        w.seek(0)
        pos = dpos = epos = 0
        dec = core.decode_int64
        for i in range(0, len(ctrl), 24):
            x, y, z = dec(ctrl[i:i + 8]), dec(ctrl[i + 8:i + 16]), dec(ctrl[i + 16:i + 24])
            if x:
                w.add(memoryview(diff)[dpos:dpos + x])
                dpos += x
                pos += x
            if y:
                w.literal(memoryview(extra)[epos:epos + y])
                epos += y
            pos += z
            if i + 24 < len(ctrl):   # the last triple's seek is meaningless: not emitted
                if not 0 <= pos <= len(old):
                    raise TarDiffError(f"bsdiff produced an impossible seek to {pos}")
                w.seek(pos)
        if dpos != len(diff) or epos != len(extra):
            raise TarDiffError("bsdiff control data does not cover its output")

    def _rollsum(self, source: OldFile, spool: IO[bytes], size: int) -> bool:
        spool.seek(0)
        target = rollsum_blobs(spool.read)
        with closing(source.opener()) as f:
            src_blobs: list[Blob] = rollsum_blobs(f.read)
            matches, ratio = match_blobs(src_blobs, target)
            if ratio <= ROLLSUM_MIN_RATIO:
                return False
            if sum(b.size for b in src_blobs) != source.size:
                self.stats.source_errors += 1
                return False
            self.stats.rollsum += 1
            self.stats.sources_used.add(source.path)
            w = self.w
            w.open(source.path)
            pos = 0
            for m in matches:
                t, s = m.target, m.source
                if pos < t.offset:
                    spool.seek(pos)
                    self._spool_range(spool, t.offset - pos)
                spool.seek(t.offset)
                want = spool.read(t.size)
                f.seek(s.offset)
                if f.read(s.size) == want:
                    w.seek(s.offset)
                    w.copy(s.size)
                else:
                    w.literal(want)
                pos = t.offset + t.size
            if pos < size:
                spool.seek(pos)
                self._spool_range(spool, size - pos)
        return True

    def _spool_range(self, spool: IO[bytes], n: int) -> None:
        while n:
            c = spool.read(min(n, READ))
            if not c:
                raise TarDiffError("spooled file content is shorter than expected")
            self.w.literal(c)
            n -= len(c)


def zstd_dict_frame(old: bytes, new: bytes, level: int = 6) -> bytes:
    """One zstd frame of *new* with *old* as raw-content dictionary (decodable by the applier).

    python-zstandard loads the dictionary into a CDict whose hash table is sized by the
    parameters, and long-distance matching never sees a dictionary, so the hash table must
    hold one entry per old byte (hash_log >= log2(old); smaller tables only reach
    the end of the dictionary) and the strategy is at least lazy (level 6): the fast strategies
    lose the alignment on repetitive content.  That costs 8-16 bytes per old byte (the
    CDict's table and the compressor's copy of it).  The window covers old + new, so every
    offset is within it, capped at the format's 2**29.
    """
    lvl = max(level, 6)
    base = zstandard.ZstdCompressionParameters.from_level(lvl)
    need = max(len(old) - 1, 1).bit_length()
    params = zstandard.ZstdCompressionParameters.from_level(
        lvl, window_log=min(max(10, (len(old) + len(new) - 1).bit_length()), 29),
        hash_log=min(max(base.hash_log, need), 28), chain_log=base.chain_log,
        write_content_size=True, threads=0)
    zdict = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(compression_params=params, dict_data=zdict).compress(new)


_BSDIFF: list[ModuleType | None] = []


def _bsdiff_core() -> ModuleType | None:
    """bsdiff4.core, or None when bsdiff4 is not installed (bsdiff is then skipped)."""
    if not _BSDIFF:
        try:
            import bsdiff4.core as core
        except ImportError:  # pragma: no cover - bsdiff4 is a project dependency
            core = None
        _BSDIFF.append(core)
    return _BSDIFF[0]


def encode_tardiff(new_tar: Reader, sources: SourceIndex | Iterable[OldFile], out: Writer,
                   options: EncodeOptions | None = None) -> EncodeStats:
    """Write a tar-diff turning *sources* into the tar read from *new_tar*; statistics."""
    opts = options or EncodeOptions()
    if opts.version not in (1, 2):
        raise ValueError(f"unsupported tar-diff version {opts.version}")
    index = sources if isinstance(sources, SourceIndex) else SourceIndex(sources)
    stats = EncodeStats()
    w = _OpWriter(out, opts.version, opts.level)
    inp = _Input(new_tar)
    _Encoder(index, w, opts, stats).run(inp)
    w.close()
    stats.tar_size = inp.total
    stats.tar_sha256 = inp.sha.hexdigest()
    stats.delta_size = w.size
    return stats

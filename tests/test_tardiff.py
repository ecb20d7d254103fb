"""tar-diff v1/v2: spec vectors (docs/delta.md, golden.md 10), hostile inputs, interop with the
zstd CLI, encoder round trips checked by the applier and by an independent reference decoder,
rollsum against a literal port of the spec recurrence, and decoder fuzzing."""

from __future__ import annotations

import functools
import hashlib
import io
import random
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfsd.core.fsverity import FsVerityHasher
from cfsd.delta import rollsum, tardiff, tardiff_encode, zstdframe
from cfsd.delta.tardiff import (
    HEADER_V1,
    HEADER_V2,
    MappingSource,
    SourceFileError,
    TarDiffError,
    add_bytes,
    apply_tardiff,
    decode_uvarint,
    encode_uvarint,
)
from cfsd.delta.tardiff_encode import EncodeOptions, OldFile, SourceIndex, encode_tardiff

MiB = 1 << 20


# --------------------------------------------------------------------------- helpers

def op(code: int, size: int, payload: bytes = b"") -> bytes:
    return bytes([code]) + encode_uvarint(size) + payload


def _with_payload(code: int) -> Callable[[bytes], bytes]:
    return lambda b: op(code, len(b), b)


DATA, ADD, ZDICT = _with_payload(0), _with_payload(3), _with_payload(5)
COPY, SEEK = functools.partial(op, 2), functools.partial(op, 4)


def OPEN(name: str | bytes) -> bytes:  # noqa: N802
    raw = name.encode() if isinstance(name, str) else name
    return op(1, len(raw), raw)


def mk(ops: bytes, v: int = 1, header: bytes | None = None) -> bytes:
    head = header if header is not None else (HEADER_V2 if v == 2 else HEADER_V1)
    return head + zstandard.ZstdCompressor(level=3).compress(ops)


def apply(delta: bytes, files: dict[str, bytes] | None = None, **kw: int) -> bytes:
    out = io.BytesIO()
    n = apply_tardiff(io.BytesIO(delta), MappingSource(files or {}), out, **kw)
    assert n == len(out.getvalue())
    return out.getvalue()


def raw_dict_frame(source: bytes, target: bytes, **params: int) -> bytes:
    zd = zstandard.ZstdCompressionDict(source, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    if params:
        p = zstandard.ZstdCompressionParameters(compression_level=3, **params)
        c = zstandard.ZstdCompressor(compression_params=p, dict_data=zd).compressobj()
        return c.compress(target) + c.flush()   # content size unknown: window kept
    return zstandard.ZstdCompressor(level=3, dict_data=zd).compress(target)


def fails(delta: bytes, files: dict[str, bytes] | None = None, match: str | None = None,
          **kw: int) -> TarDiffError:
    with pytest.raises(TarDiffError, match=match) as ei:
        apply(delta, files, **kw)
    return ei.value


# --------------------------------------------------------------------------- uvarint (7.1)

UVARINTS = [
    ("00", 0), ("01", 1), ("7f", 127), ("8001", 128), ("ac02", 300), ("ff7f", 16383),
    ("808001", 16384), ("ff" * 9 + "01", 2**64 - 1),
]


@pytest.mark.parametrize(("hexbytes", "value"), UVARINTS)
def test_uvarint_vectors(hexbytes: str, value: int) -> None:
    raw = bytes.fromhex(hexbytes)
    assert decode_uvarint(raw) == (value, len(raw))
    assert encode_uvarint(value) == raw


@pytest.mark.parametrize("hexbytes", ["80" * 10, "80" * 11, "ff" * 9 + "02", "80", ""])
def test_uvarint_must_fail(hexbytes: str) -> None:
    with pytest.raises(TarDiffError):
        decode_uvarint(bytes.fromhex(hexbytes))
    # the same bytes as the size of an op: still a typed error
    fails(mk(b"\x04" + bytes.fromhex(hexbytes)))


@given(st.integers(0, 2**64 - 1))
def test_uvarint_roundtrip(v: int) -> None:
    raw = encode_uvarint(v)
    assert decode_uvarint(b"\x00" + raw + b"\xff", 1) == (v, 1 + len(raw))


def test_op_size_over_2_63_rejected() -> None:
    fails(mk(b"\x04" + encode_uvarint(2**63)), {"a": b"x"}, match="too large")


# --------------------------------------------------------------------------- op streams (7.2)

BLOB = bytes([10, 20, 30, 40, 250, 2, 70])
FIRST, SECOND = b"First file content", b"Second file content"


@pytest.mark.parametrize(("files", "ops", "expected"), [
    ({"data/blob.bin": BLOB},
     OPEN("data/blob.bin") + COPY(2) + SEEK(4) + ADD(bytes([10, 255])) + COPY(1) + SEEK(1)
     + COPY(2), bytes([10, 20, 4, 1, 70, 20, 30])),
    ({}, DATA(b"Hello, World!"), b"Hello, World!"),
    ({"source.txt": b"content to copy"}, OPEN("source.txt") + COPY(7), b"content"),
    ({"f": bytes([1, 2, 3, 4, 5])}, OPEN("f") + ADD(bytes([10, 20, 30, 40, 50])),
     bytes([11, 22, 33, 44, 55])),
    ({"f": bytes([255, 254, 253])}, OPEN("f") + ADD(bytes([2, 3, 4])), bytes([1, 1, 1])),
    ({"f": b"0123456789"}, OPEN("f") + SEEK(5) + COPY(3), b"567"),
    ({"file1": FIRST, "file2": SECOND},
     OPEN("file1") + COPY(5) + DATA(b" and some raw data") + OPEN("file2") + SEEK(7) + COPY(4),
     b"First and some raw datafile"),
    ({}, b"", b""),
])
@pytest.mark.parametrize("v", [1, 2])
def test_op_stream_vectors(files: dict[str, bytes], ops: bytes, expected: bytes, v: int) -> None:
    assert apply(mk(ops, v), files) == expected


FOX = b"The quick brown fox jumps over the lazy dog"
FOX2 = b"The quick red fox runs over the lazy cat"


def test_zstd_dict_go_vector_and_v1_rejection() -> None:
    frame = raw_dict_frame(FOX, FOX2)
    ops = OPEN("src") + ZDICT(frame)
    assert apply(mk(ops, 2), {"src": FOX}) == FOX2
    err = fails(mk(ops, 1), {"src": FOX})
    assert "tardf2" in str(err)


def rust_source() -> bytes:
    return bytes(((i * 2654435761 % 2**32) >> 13) % 256 for i in range(32767))


def test_zstd_dict_rust_vector() -> None:
    source = rust_source()
    target = bytearray(source)
    target[10000:10256] = b"\x5a" * 256
    target = bytes(target) + b"appended target-only bytes"
    frame = raw_dict_frame(source, target)
    assert len(frame) < len(target) / 4
    assert apply(mk(OPEN("s") + ZDICT(frame), 2), {"s": source}) == target
    ok = raw_dict_frame(source, target, window_log=29)
    assert zstandard.get_frame_parameters(ok).window_size == 1 << 29
    assert apply(mk(OPEN("s") + ZDICT(ok), 2), {"s": source}) == target
    bad = raw_dict_frame(source, target, window_log=30)
    assert zstandard.get_frame_parameters(bad).window_size == 1 << 30
    fails(mk(OPEN("s") + ZDICT(bad), 2), {"s": source})


def test_zstd_dict_position_is_eof_and_trailing_payload_skipped() -> None:
    frame = raw_dict_frame(FOX, FOX2)
    # after ZSTD_DICT the position is EOF: COPY fails, SEEK 0 + COPY works
    fails(mk(OPEN("s") + ZDICT(frame) + COPY(1), 2), {"s": FOX}, match="past the end")
    assert apply(mk(OPEN("s") + ZDICT(frame) + SEEK(0) + COPY(3), 2), {"s": FOX}) == FOX2 + b"The"
    # bytes after the frame inside the payload are skipped, keeping the op stream in sync
    padded = op(5, len(frame) + 5, frame + b"junk!") + DATA(b"!")
    assert apply(mk(OPEN("s") + SEEK(3) + padded, 2), {"s": FOX}) == FOX2 + b"!"
    # an empty source is an empty dictionary
    plain = zstandard.ZstdCompressor().compress(b"no dictionary")
    assert apply(mk(OPEN("e") + ZDICT(plain), 2), {"e": b""}) == b"no dictionary"


@pytest.mark.parametrize("header", [b"invalid header data", b"tardf3\n\0", b"tardf1\n", b"",
                                    b"tardf1\n\1"])
def test_bad_headers(header: bytes) -> None:
    fails(header + zstandard.ZstdCompressor().compress(DATA(b"x")), match="header")


ABCD = {"f": b"abcd"}


@pytest.mark.parametrize(("ops", "files"), [
    (op(99, 0), {}),
    (op(6, 1, b"x"), {}),
    (op(1, 4097, b"a" * 4097), {}),
    (op(3, 100 * MiB + 1), ABCD),
    (OPEN("missing"), ABCD),
    (op(0, 3, b"ab"), ABCD),
    (op(1, 3, b"ab"), ABCD),
    (OPEN("f") + op(3, 3, b"ab"), ABCD),
    (OPEN("f") + COPY(5), ABCD),
    (OPEN("f") + ADD(b"abcde"), ABCD),
    (OPEN("f") + SEEK(5), ABCD),
    (OPEN("f") + SEEK(3) + COPY(2), ABCD),
    (COPY(1), ABCD),
    (ADD(b"a"), ABCD),
    (SEEK(0), ABCD),
    (b"\x00", {}),            # opcode without size
    (b"\x02\x80", ABCD),      # truncated size
])
@pytest.mark.parametrize("v", [1, 2])
def test_failure_vectors(ops: bytes, files: dict[str, bytes], v: int) -> None:
    fails(mk(ops, v), files)


def test_zstd_dict_without_source_and_truncated_frame() -> None:
    frame = raw_dict_frame(FOX, FOX2)
    fails(mk(ZDICT(frame), 2), {"s": FOX}, match="no current file")
    fails(mk(OPEN("s") + op(5, len(frame) - 3, frame[:-3]), 2), {"s": FOX})
    fails(mk(OPEN("s") + op(5, len(frame) + 3, frame), 2), {"s": FOX}, match="truncated")
    fails(mk(OPEN("s") + op(5, 4, b"abcd"), 2), {"s": FOX})
    fails(mk(OPEN("s") + op(5, 0), 2), {"s": FOX}, match="truncated")


def test_zstd_dict_source_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tardiff, "MAX_DICT", 16)
    frame = raw_dict_frame(FOX, FOX2)
    fails(mk(OPEN("s") + ZDICT(frame), 2), {"s": FOX}, match="exceeds the limit")


# --------------------------------------------------------------------------- names (2.5)

SECRETS = {"secret.txt": b"DECOY", "etc/passwd": b"root"}


@pytest.mark.parametrize("name", [
    b"../secret.txt", b"../../secret.txt", b"/etc/passwd", b"", b".", b"./secret.txt",
    b"etc/./passwd", b"etc//passwd", b"etc/passwd/", b"etc/../secret.txt", b"a\0b",
    b"\xff\xfe", b"a" * 4097, b"/" * 3,
])
def test_non_canonical_names_rejected(name: bytes) -> None:
    fails(mk(op(1, len(name), name) + COPY(1)), SECRETS)


def test_canonical_names_accepted() -> None:
    files = {"a" * 4096: b"x", "d/é/f": b"y", "back\\slash": b"z", "..x/.y/z..": b"w"}
    ops = b"".join(OPEN(n) + COPY(1) for n in files)
    assert apply(mk(ops), files) == b"xyzw"


class RecordingSource:
    def __init__(self, files: dict[str, bytes], exc: Exception | None = None) -> None:
        self.files = files
        self.asked: list[str] = []
        self.exc = exc
        self.opened: list[io.BytesIO] = []

    def open_source(self, name: str) -> io.BytesIO:
        self.asked.append(name)
        if self.exc is not None:
            raise self.exc
        f = io.BytesIO(self.files[name])
        self.opened.append(f)
        return f


def test_resolver_never_sees_bad_names_and_files_are_closed() -> None:
    src = RecordingSource(SECRETS)
    with pytest.raises(TarDiffError):
        apply_tardiff(io.BytesIO(mk(OPEN("secret.txt") + OPEN("../secret.txt"))), src,
                      io.BytesIO())
    assert src.asked == ["secret.txt"]
    assert all(f.closed for f in src.opened)
    src = RecordingSource(SECRETS)
    apply_tardiff(io.BytesIO(mk(OPEN("secret.txt") + OPEN("etc/passwd") + COPY(4))), src,
                  io.BytesIO())
    assert all(f.closed for f in src.opened) and len(src.opened) == 2


@pytest.mark.parametrize("exc", [KeyError("x"), FileNotFoundError(2, "nope"),
                                 IsADirectoryError(21, "dir"), SourceFileError("not regular")])
def test_resolver_errors_are_typed(exc: Exception) -> None:
    with pytest.raises(SourceFileError):
        apply_tardiff(io.BytesIO(mk(OPEN("x"))), RecordingSource({}, exc), io.BytesIO())


# --------------------------------------------------------------------------- hostile streams

def test_truncated_outer_zstd_every_cut() -> None:
    delta = mk(DATA(b"hello world, " * 50) + OPEN("f") + COPY(4))
    assert apply(delta, ABCD).endswith(b"abcd")
    for cut in range(9, len(delta)):   # (8 = header only = empty op stream, valid)
        fails(delta[:cut], ABCD)


def test_outer_stream_multiple_frames_and_trailing_garbage() -> None:
    z = zstandard.ZstdCompressor()
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    delta = HEADER_V1 + z.compress(DATA(b"one")) + skippable + z.compress(b"") + z.compress(
        DATA(b"two"))
    assert apply(delta) == b"onetwo"
    assert apply(HEADER_V1) == b""
    fails(HEADER_V1 + z.compress(DATA(b"one")) + b"garbage")
    fails(HEADER_V1 + b"\x28\xb5\x2f\xfd")
    # an op split across two frames is fine, an op cut at the end of the stream is not
    assert apply(HEADER_V1 + z.compress(b"\x00\x03a") + z.compress(b"bc")) == b"abc"
    fails(HEADER_V1 + z.compress(b"\x00\x03a"))


def test_max_output() -> None:
    delta = mk(DATA(b"x" * 100))
    assert apply(delta, max_output=100) == b"x" * 100
    fails(delta, max_output=99, match="limit")
    fails(mk(OPEN("f") + COPY(4)), ABCD, max_output=3, match="limit")
    fails(mk(OPEN("f") + ADD(b"\0\0\0\0")), ABCD, max_output=3, match="limit")
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(50 * MiB))
    assert len(bomb) < 10_000
    fails(mk(OPEN("f") + ZDICT(bomb), 2), ABCD, max_output=MiB, match="limit")
    # a huge DATA size is refused before anything is read
    fails(mk(op(0, 2**62)), max_output=10, match="limit")


def test_idle_op_flood(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tardiff, "IDLE_OPS_ALLOWANCE", 1000)
    fails(mk(OPEN("f") + SEEK(0) * 2000), ABCD, match="no output")
    fails(mk(b"\x00\x00" * 2000), match="no output")
    assert apply(mk(OPEN("f") + SEEK(0) * 900 + (COPY(1) + SEEK(0)) * 300), ABCD) == b"a" * 300


def test_dictionary_load_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tardiff, "DICT_BYTES_ALLOWANCE", 1000)
    empty = raw_dict_frame(FOX, b"")
    fails(mk((OPEN("s") + ZDICT(empty)) * 100, 2), {"s": FOX}, match="dictionary")


class BoundedIO:
    """Reader/writer that checks the applier's buffer sizes."""

    def __init__(self, data: bytes = b"") -> None:
        self.inner = io.BytesIO(data)
        self.max_read = 0
        self.max_write = 0
        self.total = 0

    def read(self, n: int = -1) -> bytes:
        assert 0 <= n <= 4 * MiB
        self.max_read = max(self.max_read, n)
        return self.inner.read(n)

    def write(self, b: bytes) -> int:
        self.max_write = max(self.max_write, len(b))
        self.total += len(b)
        return len(b)


def test_streaming_bounded_buffers() -> None:
    big = 64 * MiB
    z = zstandard.ZstdCompressor(level=3).compressobj()
    parts = [HEADER_V2, z.compress(op(0, big))]
    for _ in range(big // MiB):
        parts.append(z.compress(bytes(MiB)))
    frame = zstandard.ZstdCompressor().compress(bytes(16 * MiB))
    parts.append(z.compress(OPEN("f") + ADD(bytes(4)) + SEEK(0) + COPY(4) + ZDICT(frame)))
    parts.append(z.flush())
    src, out = BoundedIO(b"".join(parts)), BoundedIO()
    n = apply_tardiff(src, MappingSource(ABCD), out)
    assert n == out.total == big + 8 + 16 * MiB
    assert out.max_write <= tardiff.CHUNK and src.max_read <= tardiff.CHUNK


# --------------------------------------------------------------------------- zstd CLI (tools 3.6)

needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed")


@needs_zstd
def test_zstd_cli_patch_from_frames_decode(tmp_path: Path) -> None:
    rng = random.Random(7)
    old = rng.randbytes(300_000)
    new = old[:1000] + b"CHANGED" + old[1007:] + b"tail"
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    subprocess.run(["zstd", "-q", "-f", f"--patch-from={tmp_path / 'old'}", str(tmp_path / "new"),
                    "-o", str(tmp_path / "p.zst")], check=True, capture_output=True)
    frame = (tmp_path / "p.zst").read_bytes()
    assert len(frame) < 1000
    assert apply(mk(OPEN("usr/old") + ZDICT(frame) + SEEK(0) + COPY(3), 2),
                 {"usr/old": old}) == new + old[:3]


@needs_zstd
def test_encoder_frames_decode_with_zstd_cli(tmp_path: Path) -> None:
    rng = random.Random(8)
    old = rng.randbytes(100_000)
    new = old[:5000] + rng.randbytes(50) + old[5000:]
    delta = encode(make_tar([("f", new)]), {"f": old}, version=2)
    frames = [payload for code, payload in ref_ops(delta) if code == 5]
    assert len(frames) == 1
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "p.zst").write_bytes(frames[0])
    subprocess.run(["zstd", "-q", "-d", "-f", f"--patch-from={tmp_path / 'old'}",
                    str(tmp_path / "p.zst"), "-o", str(tmp_path / "out")], check=True,
                   capture_output=True)
    assert (tmp_path / "out").read_bytes() == new


# --------------------------------------------------------------------------- helpers internals

@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=3000), st.booleans(), st.booleans()), min_size=1,
                max_size=3))
def test_frame_walker_boundaries(frames: list[tuple[bytes, bool, bool]]) -> None:
    parts = []
    for content, checksum, size in frames:
        p = zstandard.ZstdCompressionParameters(compression_level=3, write_checksum=checksum,
                                                write_content_size=size)
        parts.append(zstandard.ZstdCompressor(compression_params=p).compress(content * 3))
    stream = b"".join(parts)
    ends = {sum(len(p) for p in parts[:i]) for i in range(len(parts) + 1)}
    for cut in range(len(stream) + 1):
        w = zstdframe.FrameWalker()
        w.feed(stream[:cut])
        assert w.at_boundary == (cut in ends), cut
    first = zstdframe.FrameWalker(first_only=True)
    assert first.feed(stream) == len(parts[0]) and first.frames == 1
    with pytest.raises(zstdframe.ZstdFrameError):
        zstdframe.FrameWalker().feed(b"\x00\x01\x02\x03")


@given(st.binary(max_size=300), st.data())
def test_add_bytes(a: bytes, data: st.DataObject) -> None:
    b = data.draw(st.binary(min_size=len(a), max_size=len(a)))
    assert add_bytes(a, b) == bytes((x + y) & 0xFF for x, y in zip(a, b, strict=True))


def slow_rollsum(data: bytes) -> list[tuple[int, int, int]]:
    """Literal port of docs/delta.md"""
    import zlib
    blobs, start, size = [], 0, 0
    for i, ch in enumerate(data):
        if size == 0:
            s1, s2, window = 128 * 31, 128 * 127 * 31, bytearray(128)
        out = window[size % 128]
        s1 = (s1 + ch - out) & 0xFFFFFFFF
        s2 = (s2 + s1 - 128 * (out + 31)) & 0xFFFFFFFF
        window[size % 128] = ch
        size += 1
        if size == 32768 or (s2 & 0x1FFF) == 0x1FFF:
            blobs.append((start, size, zlib.crc32(data[start:i + 1])))
            start, size = i + 1, 0
    if size:
        blobs.append((start, size, zlib.crc32(data[start:])))
    return blobs


def pieces(data: bytes, step: int):  # noqa: ANN201
    f = io.BytesIO(data)
    return lambda n: f.read(min(n, step))


_RNG = random.Random(17)
ROLLSUM_DATA = {
    "random": _RNG.randbytes(300_000),
    "zeros": bytes(100_000) + b"\x01" + bytes(70_000),
    "text": b"".join(b"line %d of some text\n" % _RNG.randrange(50) for _ in range(10_000)),
    "mixed": _RNG.randbytes(5000) + bytes(40_000) + b"ab" * 30_000 + _RNG.randbytes(200),
}


@pytest.mark.parametrize("kind", sorted(ROLLSUM_DATA))
def test_rollsum_matches_reference(kind: str) -> None:
    data = ROLLSUM_DATA[kind]
    want = slow_rollsum(data)
    for step in (1 << 20, 7777, 100, 1):
        if step == 1 and len(data) > 20_000:
            data, want = data[:20_000], slow_rollsum(data[:20_000])
        got = [(b.offset, b.size, b.crc) for b in rollsum.rollsum_blobs(pieces(data, step))]
        assert got == want, step


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=5000), st.integers(1, 3000))
def test_rollsum_property(data: bytes, step: int) -> None:
    got = [(b.offset, b.size, b.crc) for b in rollsum.rollsum_blobs(pieces(data, step))]
    assert got == slow_rollsum(data)


# --------------------------------------------------------------------------- reference decoder

def ref_uvarint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while buf[i] & 0x80:
        value, shift, i = value | (buf[i] & 0x7F) << shift, shift + 7, i + 1
    return value | buf[i] << shift, i + 1


def ref_ops(delta: bytes) -> list[tuple[int, bytes | int]]:
    """The ops of a delta: (code, payload) for payload ops, (code, size) otherwise."""
    assert delta[:8] in (b"tardf1\n\0", b"tardf2\n\0")
    stream = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(delta[8:]),
                                                        read_across_frames=True).read()
    ops: list[tuple[int, bytes | int]] = []
    i = 0
    while i < len(stream):
        code = stream[i]
        size, i = ref_uvarint(stream, i + 1)
        if code in (0, 1, 3, 5):
            ops.append((code, stream[i:i + size]))
            i += size
        else:
            ops.append((code, size))
    return ops


def ref_apply(delta: bytes, files: dict[str, bytes]) -> bytes:
    """A tiny tar-diff decoder written from docs/delta.md alone."""
    out = bytearray()
    cur = b""
    pos = 0
    for code, arg in ref_ops(delta):
        if code == 0:
            out += arg
        elif code == 1:
            cur, pos = files[arg.decode()], 0
        elif code == 2:
            out += cur[pos:pos + arg]
            pos += arg
        elif code == 3:
            out += bytes((a + b) % 256 for a, b in zip(arg, cur[pos:pos + len(arg)],
                                                      strict=True))
            pos += len(arg)
        elif code == 4:
            pos = arg
        elif code == 5:
            d = zstandard.ZstdCompressionDict(cur, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            out += zstandard.ZstdDecompressor(dict_data=d).decompress(arg)
            pos = len(cur)
        else:
            raise AssertionError(code)
    return bytes(out)


# --------------------------------------------------------------------------- encoder

def make_tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT,
             extra: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, content in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(content), 0o644, 1_700_000_000
            t.addfile(ti, io.BytesIO(content))
        if extra:
            d = tarfile.TarInfo("somedir")
            d.type, d.mode = tarfile.DIRTYPE, 0o755
            t.addfile(d)
            s = tarfile.TarInfo("somelink")
            s.type, s.linkname = tarfile.SYMTYPE, "target"
            t.addfile(s)
    return buf.getvalue()


def digest_with(hasher, content: bytes) -> bytes:  # noqa: ANN001
    h = hasher()
    h.update(content)
    return h.digest()


def old_files(files: dict[str, bytes], digests: bool = True,
              hasher=hashlib.sha256) -> list[OldFile]:  # noqa: ANN001
    return [OldFile(path, len(c), digest_with(hasher, c) if digests else None,
                    lambda c=c: io.BytesIO(c)) for path, c in files.items()]


def encode(tar: bytes, files: dict[str, bytes], digests: bool = True, **opts: int) -> bytes:
    out = io.BytesIO()
    stats = encode_tardiff(io.BytesIO(tar), old_files(files, digests), out, EncodeOptions(**opts))
    assert stats.tar_size == len(tar)
    assert stats.tar_sha256 == hashlib.sha256(tar).hexdigest()
    assert stats.delta_size == len(out.getvalue())
    return out.getvalue()


def roundtrip(tar: bytes, files: dict[str, bytes], **opts: int) -> bytes:
    delta = encode(tar, files, **opts)
    assert apply(delta, files) == tar
    return delta


def codes(delta: bytes) -> list[int]:
    return [c for c, _ in ref_ops(delta)]


def test_encoder_methods_and_reference_decoder() -> None:
    rng = random.Random(11)
    base = rng.randbytes(200_000)
    lib = rng.randbytes(50_000)
    old = {"usr/bin/a": base, "usr/lib/libfoo.so.1": lib, "etc/same": b"x" * 5000,
           "d/f.bin": rng.randbytes(3000), "data.xz": rng.randbytes(4000)}
    new_members = [
        ("usr/bin/a", base[:1000] + b"patch" + base[1005:150_000] + rng.randbytes(99)
         + base[150_000:]),
        ("./usr/lib/libfoo.so.2", lib[:40_000] + rng.randbytes(10)),
        ("etc/moved", b"x" * 5000),
        ("tiny", b"hi"),
        ("d/f.bin", old["d/f.bin"]),
        ("data.xz", old["data.xz"][:3000] + b"y"),
    ]
    tar = make_tar(new_members)
    for v in (1, 2):
        delta = roundtrip(tar, old, version=v)
        assert delta[:8] == (HEADER_V2 if v == 2 else HEADER_V1)
        assert ref_apply(delta, old) == tar
        assert len(delta) < len(tar) // 20
        cs = codes(delta)
        assert cs.count(2) >= 2          # the two identical files are COPYs
        assert (5 in cs) == (v == 2)
        assert (3 in cs) == (v == 1)     # bsdiff ADD_DATA in v1
        opened = [p.decode() for c, p in ref_ops(delta) if c == 1]
        assert "data.xz" not in opened   # compressed files are never delta'd by name
        assert "usr/lib/libfoo.so.1" in opened   # stem match
        assert encode(tar, old, version=v) == delta   # deterministic


def test_encoder_without_digests_and_with_fsverity() -> None:
    rng = random.Random(12)
    old = {"a/b": rng.randbytes(10_000), "c": rng.randbytes(20_000)}
    tar = make_tar([("a/b", old["a/b"]), ("x/c", old["c"])])
    delta = roundtrip(tar, old, digests=False)
    assert codes(delta).count(2) == 2    # equal content detected by reading the old file
    out = io.BytesIO()
    encode_tardiff(io.BytesIO(tar), old_files(old, hasher=FsVerityHasher), out,
                   EncodeOptions(hash_factory=FsVerityHasher))
    assert apply(out.getvalue(), old) == tar
    assert codes(out.getvalue()).count(2) == 2


def test_encoder_zstd_then_copy_same_source_seeks_back() -> None:
    rng = random.Random(13)
    src = rng.randbytes(20_000)
    old = {"lib/src.bin": src}
    tar = make_tar([("lib/src.bin", src[:10_000] + b"!" + src[10_000:]),
                    ("other/src.bin", src)])
    delta = roundtrip(tar, old, version=2)
    ops = ref_ops(delta)
    z = [i for i, (c, _) in enumerate(ops) if c == 5]
    assert len(z) == 1
    after = [o for o in ops[z[0] + 1:] if o[0] != 0]
    assert after[:2] == [(4, 0), (2, len(src))]
    assert ref_apply(delta, old) == tar


def test_encoder_add_data_split_and_zero_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tardiff_encode, "ADD_CHUNK", 1000)
    rng = random.Random(14)
    src = rng.randbytes(30_000)
    new = bytes((b + (i % 7 == 0)) & 0xFF for i, b in enumerate(src[:12_000])) + src[12_000:]
    old = {"f": src}
    delta = roundtrip(make_tar([("f", new)]), old)
    ops = ref_ops(delta)
    adds = [p for c, p in ops if c == 3]
    assert adds and all(len(p) <= 1000 for p in adds)
    assert any(c == 2 for c, _ in ops)   # zero-diff pieces became COPY
    assert ref_apply(delta, old) == make_tar([("f", new)])


def test_encoder_rollsum_path() -> None:
    rng = random.Random(15)
    zero = bytes(3 * MiB)
    changed = zero[:1_500_000] + rng.randbytes(19) + zero[1_500_019:]
    ff_old, ff_new = bytes(2 * MiB), b"\xff" * (2 * MiB)
    blob = rng.randbytes(MiB)
    blob_new = blob[:300_000] + b"inserted bytes" + blob[300_000:]
    old = {"z": zero, "ff": ff_old, "r": blob}
    tar = make_tar([("z", changed), ("ff", ff_new), ("r", blob_new)])
    delta = roundtrip(tar, old, max_bsdiff_size=1)
    assert len(delta) < 200_000
    assert ref_apply(delta, old) == tar
    opened = [p for c, p in ref_ops(delta) if c == 1]
    assert b"ff" not in opened           # nothing matched: literal
    # with rollsum disabled the same files are literal
    assert len(roundtrip(tar, old, max_bsdiff_size=1, rollsum=False)) > len(delta)


def test_encoder_rule0_and_eligibility() -> None:
    old = {"a/very/long/path/name/for/a/source/file": b"0123456789" * 4}
    tar = make_tar([("a/very/long/path/name/for/a/source/file", b"0123456789" * 4)])
    assert codes(roundtrip(tar, old)) == [0]   # 40 bytes <= len(path) + 4: literal
    # hardlinks, fifos, empty files, directories pass through
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, typ in (("e", tarfile.REGTYPE), ("h", tarfile.LNKTYPE), ("p", tarfile.FIFOTYPE)):
            ti = tarfile.TarInfo(name)
            ti.type = typ
            ti.linkname = "e" if typ == tarfile.LNKTYPE else ""
            t.addfile(ti)
    roundtrip(buf.getvalue(), {"e": b"content", "h": b"content"})


def test_encoder_odd_tars() -> None:
    rng = random.Random(16)
    src = rng.randbytes(8000)
    old = {"f": src}
    good = make_tar([("f", src), ("g", src[:4000])])
    roundtrip(good + b"trailing junk after the archive", old)
    for cut in (100, 512, 700, 1536, 5000, len(good) - 700):
        roundtrip(good[:cut], old)
    roundtrip(b"", old)
    roundtrip(b"not a tar at all" * 100, old)
    # long names (GNU), ustar prefix, a GNU sparse member: bytes always come back
    long_name = "d/" + "x" * 200
    roundtrip(make_tar([(long_name, src)], fmt=tarfile.GNU_FORMAT), {long_name: src})
    roundtrip(make_tar([("p" * 90 + "/" + "q" * 90, src)], fmt=tarfile.USTAR_FORMAT), old)
    sparse = bytearray(make_tar([("s", src[:1000]), ("f", src)], fmt=tarfile.GNU_FORMAT,
                                extra=False))
    sparse[156] = ord("S")
    sparse[148:156] = b"%06o\0 " % (sum(sparse[:148]) + sum(sparse[156:512]) + 8 * 32)
    roundtrip(bytes(sparse), old)


def test_zstd_dict_frame_go_vector() -> None:
    old = b"abcdefghijklmnop" * 12_800
    new = bytearray(old)
    new[1000] ^= 1
    new[150_000] ^= 1
    frame = tardiff_encode.zstd_dict_frame(old, bytes(new), 22)
    assert len(frame) <= 200
    assert apply(mk(OPEN("o") + ZDICT(frame), 2), {"o": old}) == new


def test_source_index_rules() -> None:
    def f(path: str, size: int) -> OldFile:
        return OldFile(path, size, None, lambda: io.BytesIO(bytes(size)))

    idx = SourceIndex([f("usr/lib/libz.so.1", 100_000), f("opt/libz.so.1", 90_000),
                       f("x/libz.so.9", 500_000), f("/abs", 10), f("a/../b", 10), f("empty", 0),
                       f("big.bin", 10 * MiB)])
    assert "/abs" not in idx.by_path and "a/../b" not in idx.by_path and "empty" not in idx.by_path
    assert idx.similar("usr/lib/libz.so.1", 95_000).path == "usr/lib/libz.so.1"
    assert idx.similar("other/libz.so.1", 91_000).path == "opt/libz.so.1"
    assert idx.similar("other/libz.so.2", 600_000).path == "x/libz.so.9"
    assert idx.similar("big.bin", 100) is None           # not a similar size
    assert idx.similar("t.xz", 100) is None
    assert idx.similar(None, 100) is None


# --------------------------------------------------------------------------- hypothesis round trip

@st.composite
def old_and_new(draw: st.DrawFn) -> tuple[dict[str, bytes], list[tuple[str, bytes]]]:
    names = ["a", "b/c.txt", "b/d.so.1", "e/f/g.bin", "h.xz", "i.so.2"]
    pool = draw(st.lists(st.sampled_from(names), unique=True, max_size=5))
    old: dict[str, bytes] = {}
    for n in pool:
        if draw(st.booleans()):
            old[n] = draw(st.binary(min_size=0, max_size=3000))
        else:
            seed = draw(st.integers(0, 2**32))
            old[n] = random.Random(seed).randbytes(draw(st.integers(0, 20_000)))
    members: list[tuple[str, bytes]] = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(names + ["j/c.txt", "k/g.bin", "./l/d.so.3"]))
        base = draw(st.sampled_from(sorted(old.values()) or [b""]))
        how = draw(st.sampled_from(["same", "edit", "insert", "delete", "random", "append"]))
        pos = draw(st.integers(0, max(len(base) - 1, 0)))
        junk = draw(st.binary(max_size=200))
        content = {"same": base, "edit": base[:pos] + junk + base[pos + len(junk):],
                   "insert": base[:pos] + junk + base[pos:],
                   "delete": base[:pos] + base[pos + 100:],
                   "random": junk * draw(st.integers(1, 20)),
                   "append": base + junk}[how]
        members.append((name, content))
    return old, members


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(old_and_new(), st.sampled_from([1, 2]), st.sampled_from([1, 1 << 20]),
       st.booleans())
def test_roundtrip_property(case: tuple[dict[str, bytes], list[tuple[str, bytes]]], v: int,
                            bsdiff_cap: int, digests: bool) -> None:
    old, members = case
    tar = make_tar(members)
    delta = encode(tar, old, digests=digests, version=v, max_bsdiff_size=bsdiff_cap)
    assert apply(delta, old) == tar
    assert ref_apply(delta, old) == tar


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=2000), st.binary(max_size=2000))
def test_roundtrip_single_file_property(a: bytes, b: bytes) -> None:
    tar = make_tar([("f", b)], extra=False)
    for v in (1, 2):
        delta = roundtrip(tar, {"f": a} if a else {}, version=v)
        assert ref_apply(delta, {"f": a}) == tar


# --------------------------------------------------------------------------- decoder fuzz

FUZZ_FILES = {"f": b"abcdefgh" * 10, "g": b"", "d/e": bytes(range(256))}


def _fuzz_apply(delta: bytes) -> None:
    try:
        apply(delta, FUZZ_FILES, max_output=1 << 20)
    except TarDiffError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([HEADER_V1, HEADER_V2]))
def test_fuzz_raw_bytes_and_op_streams(data: bytes, header: bytes) -> None:
    _fuzz_apply(data)
    _fuzz_apply(header + data)
    _fuzz_apply(mk(data, header=header))   # arbitrary op streams


_VALID = [
    mk(OPEN("f") + COPY(2) + SEEK(4) + ADD(b"\x01\x02") + DATA(b"xyz") + OPEN("d/e") + COPY(9), 1),
    mk(OPEN("f") + ZDICT(raw_dict_frame(FUZZ_FILES["f"], b"abcdXXgh" * 10)) + SEEK(0)
       + COPY(3), 2),
]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                         min_size=1, max_size=4), st.booleans())
def test_fuzz_mutated_deltas(delta: bytes, edits: list[tuple[int, int]], decompressed: bool
                             ) -> None:
    if decompressed:   # mutate the op stream itself, then recompress
        raw = bytearray(zstandard.ZstdDecompressor().stream_reader(io.BytesIO(delta[8:])).read())
        for pos, val in edits:
            raw[pos % len(raw)] = val
        _fuzz_apply(mk(bytes(raw), header=delta[:8]))
    else:
        mutated = bytearray(delta)
        for pos, val in edits:
            mutated[pos % len(mutated)] = val
        _fuzz_apply(bytes(mutated))

"""Splitstreams: byte-exact golden vectors, both header layouts, hostile input."""

from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cfsd.core import fsverity
from cfsd.core import splitstream as ss
from cfsd.core.errors import FormatError
from cfsd.core.repository import Repository
from cfsd.core.tar import split_tar

WORKED = bytes.fromhex(  # conformance/golden.md section 3
    "53706c697453747265616d000000010c2000000000000000700000000000000070000000000000007000000000"
    "000000700000000000000090000000000000009900000000000000ed0000000000000090000000000000009900"
    "0000000000006f63696c61796572000a000000000000f6fa43bbc0a7908e2ef77438244159e9dec289dfc4c49d"
    "229237f9797a6a9b7928b52ffd200001000028b52ffd00585d0200440200feff616c7068610030303030373030"
    "303137353637353100307573746172003030e8fb0e00144105c080186e2898200624e7a80000831b3463660d45"
    "c0cd6280df95d62c98d28221")
CONFIG_SS = bytes.fromhex(  # conformance/golden.md section 4
    "53706c697453747265616d000000010c200000000000000070000000000000007000000000000000d000000000"
    "000000d000000000000000f00000000000000084010000000000009501000000000000f0000000000000008401"
    "0000000000006f6369636f6e66672b0100000000000061c07629b8a41273f190744a8545c132e6b784dcb2235b"
    "b31ade307a83e092ffce472620ab69da46e385b0936865ef22f940e6bf55a083d3be37b1003795e22199ce11df"
    "4bb808a1e80ce69425dae527b64aa7a270bf99c4a6e24d66be270f3f1dc5a7ea2c7a2d322c8ab613e8427bfe3f"
    "ec9e6775b3c85896421a588d7c0e1728b52ffd00585d0400d2cc1f149025c903c7c00a21cc8cf097ed2e89a4ff"
    "7f011b41b3dcbb2813ebc773a216d5c4abeb9aa696bdd8b68f842c7683a4f4c8d2c1064e804377588e5257542f"
    "7705c90ba51413541fda319dad1db928e4f8e6bb5b7d373c18be917083712e437f7a3969552caad9d614109330"
    "3f75b87ca344083c09de060b81b3498080800402000190589a229c0128b52ffd00584100000000000000000000")


def ustar(name: bytes, size: int) -> bytes:
    """A tar exactly as golden.md section 3 describes (Rust tar::Builder style)."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000700\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156] = ord("0")
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b"%07o\0" % sum(h)
    body = bytes(size) + bytes(-size % 512)
    return bytes(h) + body + bytes(1024)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r, _ = Repository.init(str(tmp_path / "repo"), alg=fsverity.SHA256, insecure=True)
    return r


def stored_bytes(repo: Repository, digest: bytes) -> bytes:
    fd = repo.open_object(digest)
    try:
        return os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)


def import_tar(repo: Repository, data: bytes) -> bytes:
    w = repo.create_stream(ss.TAR_LAYER)
    split_tar(io.BytesIO(data), w)
    return w.done()


def test_worked_example_byte_for_byte(repo: Repository) -> None:
    tar = ustar(b"alpha", 1000)
    assert hashlib.sha256(tar).hexdigest() == (
        "757d6903198804b6ed96421a93a9973f5facc0e445a2a6c61cb0129eb67026e2")
    digest = import_tar(repo, tar)
    assert stored_bytes(repo, digest) == WORKED
    assert digest.hex() == "61c07629b8a41273f190744a8545c132e6b784dcb2235bb31ade307a83e092ff"


def test_config_splitstream_golden(repo: Repository) -> None:
    layers = []
    diff_ids = []
    for name, size in ((b"alpha", 1000), (b"beta", 2000), (b"gamma", 3000)):
        tar = ustar(name, size)
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        layers.append(import_tar(repo, tar))
    assert [x.hex()[:8] for x in layers] == ["61c07629", "ce472620", "99ce11df"]
    config = ('{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":['
              + ",".join(f'"{d}"' for d in diff_ids) + "]}}").encode()
    assert len(config) == 299
    w = repo.create_stream(ss.OCI_CONFIG)
    for d, v in zip(diff_ids, layers, strict=True):
        w.add_named_stream_ref(d, v)
    w.write_external(config)
    digest = w.done()
    assert stored_bytes(repo, digest) == CONFIG_SS
    assert digest.hex() == "4839518dea22749f8ff233e7f7baec65f23dd5336462f46ad6884769af84bf95"


def test_empty_zstd_frame() -> None:
    assert ss.zstd_stream([]) == bytes.fromhex("28b52ffd2000010000")


def test_reader_parses_golden(repo: Repository) -> None:
    digest = import_tar(repo, ustar(b"alpha", 1000))
    with repo.open_stream(verity=digest, content_type=ss.TAR_LAYER) as r:
        assert r.stream_size == 2560
        assert r.object_refs == [bytes.fromhex(
            "f6fa43bbc0a7908e2ef77438244159e9dec289dfc4c49d229237f9797a6a9b79")]
        chunks = list(r.chunks())
    assert [len(c) if not ext else "ext" for ext, c in chunks] == [512, "ext", 1048]
    with pytest.raises(FormatError, match="content type"):
        repo.open_stream(verity=digest, content_type=ss.OCI_CONFIG)


def test_old_header_layout(repo: Repository, tmp_path: Path) -> None:
    """bootc <= 1.15 wrote the header fields in another order; readers accept both."""
    new = WORKED
    magic, version, flags, alg, lg, istart, iend = ss.HEADER.unpack(new[:32])
    old = ss.OLD_HEADER.pack(istart, iend, flags, magic, version, alg, lg) + new[32:]
    p = tmp_path / "old"
    p.write_bytes(old)
    fd = os.open(p, os.O_RDONLY)
    with ss.SplitStreamReader(fd, fsverity.SHA256) as r:
        assert r.content_type == ss.TAR_LAYER
        assert [ext for ext, _ in r.chunks()] == [False, True, False]


def _open_bytes(tmp_path: Path, data: bytes) -> ss.SplitStreamReader:
    p = tmp_path / "s"
    p.write_bytes(data)
    return ss.SplitStreamReader(os.open(p, os.O_RDONLY), fsverity.SHA256)


CORRUPTIONS = {
    "empty": b"",
    "bad-magic": b"X" + WORKED[1:],
    "truncated-header": WORKED[:20],
    "truncated-info": WORKED[:60],
    "wrong-algorithm": WORKED[:14] + b"\x02" + WORKED[15:],
    "wrong-version": WORKED[:11] + b"\x01" + WORKED[12:],
    "range-out-of-file": WORKED[:40] + struct.pack("<Q", 10_000) + WORKED[48:],
    "truncated-stream": WORKED[:-10],
    "garbage-stream": WORKED[:153] + os.urandom(84),
    "refs-not-multiple": WORKED[:48] + struct.pack("<Q", 143) + WORKED[56:],
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_splitstreams_raise_format_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(FormatError):
        with _open_bytes(tmp_path, CORRUPTIONS[name]) as r:
            for _ in r.chunks():
                pass


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=4096))
def test_fuzzed_splitstreams_never_crash(tmp_path_factory: pytest.TempPathFactory,
                                         data: bytes) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    mutated = bytearray(WORKED)
    for i, b in enumerate(data[:64]):
        mutated[(b * 7 + i * 13) % len(mutated)] ^= (b | 1)
    for blob in (bytes(mutated), data):
        try:
            with _open_bytes(tmp, blob) as r:
                for _ in r.chunks():
                    pass
        except FormatError:
            pass


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.one_of(st.binary(min_size=1, max_size=3000).map(lambda b: ("in", b)),
                              st.binary(max_size=3000).map(lambda b: ("ext", b))), max_size=12),
       names=st.dictionaries(st.text(min_size=1, max_size=20).filter(lambda s: "\0" not in s),
                             st.binary(min_size=32, max_size=32), max_size=4))
def test_round_trip(tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, bytes]],
                    names: dict[str, bytes]) -> None:
    r0, _ = Repository.init(str(tmp_path_factory.mktemp("r") / "repo"), alg=fsverity.SHA256,
                            insecure=True)
    with r0 as repo:
        w = repo.create_stream(1234)
        for n, d in names.items():
            w.add_named_stream_ref(n, d)
        for kind, data in ops:
            (w.write_inline if kind == "in" else w.write_external)(data)
        digest = w.done()
        out = bytearray()
        with repo.open_stream(verity=digest) as r:
            assert r.named_refs == names
            assert r.stream_size == sum(len(d) for _, d in ops)
            for ext, c in r.chunks():
                out += stored_bytes(repo, c) if ext else c
        assert bytes(out) == b"".join(d for _, d in ops)

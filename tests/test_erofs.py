"""Composefs EROFS writer/reader: golden digests, fsck.erofs, round trips, validation."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfsd.core.dumpfile import (
    DumpfileError,
    dump_image_c,
    parse_dumpfile,
    parse_dumpfile_c,
    write_dumpfile,
)
from cfsd.core.erofs import (
    ErofsError,
    Image,
    collect_objects,
    erofs_to_filesystem,
    select_c_version,
    write_image,
)
from cfsd.core.fsverity import digest as fsverity_digest
from cfsd.core.tree import (
    BlockDevice,
    CharacterDevice,
    Directory,
    External,
    ExternalNoVerity,
    Fifo,
    FileSystem,
    Inline,
    Socket,
    Sparse,
    Stat,
    Symlink,
)
from tests.conftest import CONFORMANCE, fsck_erofs, needs_conformance

ASSETS = CONFORMANCE / "assets"
DERIVED = CONFORMANCE / "derived"
NON_STRICT = {"no-newline.dump", "longlink.dump", "honggfuzz-longlink-unterminated.dump"}


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def verity(b: bytes) -> str:
    return fsverity_digest(b, "sha256").hex()


def without_nsec(dump: bytes) -> bytes:
    """*dump* with every mtime's nanoseconds (field 8, ``SEC.NSEC``) set to 0."""
    lines = []
    for line in dump.splitlines(keepends=True):
        fields = line.split(b" ")
        fields[7] = fields[7].split(b".")[0] + b".0"
        lines.append(b" ".join(fields))
    return b"".join(lines)


def load_asset(name: str) -> FileSystem:
    data = (ASSETS / name).read_bytes()
    return parse_dumpfile_c(data, strict=name not in NON_STRICT)


def c_build(fs: FileSystem, flags: tuple[int, int] | None) -> bytes:
    """C mkcomposefs: ``flags`` = (min, max) or None for the defaults."""
    v = select_c_version(fs) if flags is None else select_c_version(fs, *flags)
    return write_image(fs, v)


# --------------------------------------------------------------------------- golden values

# golden.md section 7: asset, flags used by the test, image sha256 (= .sha256), fs-verity
ASSET_GOLDEN = [
    ("special.dump", (0, 0),
     "d344782ff962ab7d1c5533755c19c5bf3c3485f55bfaf228fc89524c7e2ba61e",
     "6fae72a66167ef8d5830fa15647263ef1b535681aa91fdf195fa3d6f5e3ae15e", 28672),
    ("special_v1.dump", (1, 1),
     "2b1dfb9ffe6938cb3134c339059572e38cbd8cc515d54758fdff55cad5a37427",
     "1d268f8bc7609b4f8f8467e98565f45300f9e192c0e6ef2d05820d3ea41d4515", 28672),
    ("longlink.dump", None,
     "6747c908f88fc6c18626027f204159f3c2a6225b45e4de2f2d5ebf969bf5f24a",
     "32f1351322d32ebed1bde5fd72e2d218435c4aada13a359f1b1d1f1e126815a6", 40960),
    ("bigfile.dump", None,
     "475838479da68b086445eca1f12dd30fc4513f3f88c66b40b58fd70f7495ea27",
     "160c71227628d810604ad305e5d4a912e01a5964866b9bec9f8fddc55e352bfb", 20480),
    ("bigfile-xattr.dump", None,
     "5bdb37d78dcf03b4ab1adc9a2d5212d3d95213b41628939f5fe3769f93d927cc",
     "96477776a78abab3bf28c57b16dd0c47ed41a05774a2352ecf15c3ac15108b3f", 20480),
    ("honggfuzz-long-symlink.dump", None,
     "7939aa24a6499de3796792d8ad220138453803ab5f20c96a8c815bf212d44ff7",
     "d7894fc7641b935efec393392e36dfab0ffbcc20d29a4c684aebde71b8c38005", 24576),
    ("honggfuzz-longlink-unterminated.dump", None,
     "83857db405498de347043d0e00b9f094c30670ed577e0ef8f6150cf99345abbb",
     "fe675c995eb476c165ec5af1001bd9289f57bacf58d55373a5695b67f421bebe", 28672),
    ("honggfuzz-bigfile-with-acl.dump", None,
     "49fcb98c1d331c3f4b414d99d17aac0a6a7e1f8fe7de0d33bbe53064fa55e88b",
     "062b7c9e88806d8fe267287a35ba7abfa8faf70460b2dd8294781d6f26d64912", 24576),
    ("no-newline.dump", (0, 0),
     "99f02c3c63d0c4c14be6f63e87250adafc0e173a12354f50d9ba7cd320deeca7",
     "4aa51e1805ee1c2d3bd8d9ba2f2740948c2ee4de7c3cbfcef863982e456f46fe", 16384),
    ("honggfuzz-chardev-nonzero-size.dump", None,
     "3e7ca8195f29cfd0583ed761c8eead21892ef0ec61d1402aa7f7d84ef8316947",
     "efdef54b5e204b11f2590a41cde5d01c57622393e2a428af4fa4cfaac18c4575", 16384),
]

# golden.md section 7, "Other version choices"
OTHER_VERSIONS = [
    ("special.dump", None, "2b1dfb9ffe6938cb3134c339059572e38cbd8cc515d54758fdff55cad5a37427",
     "1d268f8bc7609b4f8f8467e98565f45300f9e192c0e6ef2d05820d3ea41d4515"),
    ("special.dump", (1, 1), "2b1dfb9ffe6938cb3134c339059572e38cbd8cc515d54758fdff55cad5a37427",
     "1d268f8bc7609b4f8f8467e98565f45300f9e192c0e6ef2d05820d3ea41d4515"),
    ("special_v1.dump", None,
     "2b1dfb9ffe6938cb3134c339059572e38cbd8cc515d54758fdff55cad5a37427",
     "1d268f8bc7609b4f8f8467e98565f45300f9e192c0e6ef2d05820d3ea41d4515"),
    ("special.dump", (0, 0), "d344782ff962ab7d1c5533755c19c5bf3c3485f55bfaf228fc89524c7e2ba61e",
     "6fae72a66167ef8d5830fa15647263ef1b535681aa91fdf195fa3d6f5e3ae15e"),
    ("special_v1.dump", (0, 0),
     "d344782ff962ab7d1c5533755c19c5bf3c3485f55bfaf228fc89524c7e2ba61e",
     "6fae72a66167ef8d5830fa15647263ef1b535681aa91fdf195fa3d6f5e3ae15e"),
    ("longlink.dump", (1, 1), "a3e8425a626367d924e05666717b72629fb071f52698022e0afa820adc81bb57",
     "3de2a4b626ec0466196945cdbe75d98e0bed484c3a995d607d7a9eeb42dd80c7"),
    ("bigfile.dump", (1, 1), "7633ed579d438d87aec1beb7bc0937a97e98ccd0c394d03547670d2c7e51cb41",
     "fa70c287ec4bdb389f29c24bb49569d503ff0de4436be0551deea861e95ecc5c"),
    ("bigfile-xattr.dump", (1, 1),
     "fcb10f83c5309b440c6212dd7b73046f9065bcd611dc33ca4d3522a2c919e672",
     "b4e638ab18419c4a6a5bae91f0e2055873cf21331f7b745a061bd37abb84c61c"),
    ("honggfuzz-long-symlink.dump", (1, 1),
     "b6aca6772f06ad613134886cc4d4d5dd74856001d5fa173f64ea5b195a3b6d8a",
     "37d3827127f6e461cbbb42d8c94344183cba73d4ad75a532002e1a5d30a204e5"),
    ("honggfuzz-longlink-unterminated.dump", (1, 1),
     "e4e9950781830014d9cea7f9215f8dce8a83b255f0b40ef9ac0ebe5624ebeb3b",
     "e66a10337da7f5329137d1074e73c752404990a14b03e3732e62cb12ec308dc5"),
    ("honggfuzz-bigfile-with-acl.dump", (1, 1),
     "fac30eabed2b7b7da1f9d953616e3e1ee64cfa770135e2260037cccdc2002cec",
     "102bd6a8debd3d3973edec57b83ab5019867921c4de798ae6d31b693f8f6eac2"),
    ("no-newline.dump", None, "99f02c3c63d0c4c14be6f63e87250adafc0e173a12354f50d9ba7cd320deeca7",
     "4aa51e1805ee1c2d3bd8d9ba2f2740948c2ee4de7c3cbfcef863982e456f46fe"),
    ("no-newline.dump", (1, 1), "2414094bdd0d1880a6b05b42cf7fb8b9b7a18426891619e53dda18e3018e6ff6",
     "3285623de4ad5d7405606073eb239bc741717256c35f8f8d4c4dbc48135cf0be"),
    ("honggfuzz-chardev-nonzero-size.dump", (0, 0),
     "b7d4dc72c273e9813d8bc09eb080837ea4a6705737c0eacc0f42eb7a4c748e3d",
     "f73d8d22a5867aba72a22816c8c58f96bc5dca5ac0e58e54bd7a7c10703133e3"),
]

# golden.md section 5: composefs-rs pins (fs-verity) and the C sha256 column
RS_PINS = {
    ("empty", 0): "8f589e8f57ecb88823736b0d857ddca1e1068a23e264fad164b28f7038eb3682",
    ("empty", 1): "14a26c957c84f6eb774b91205476adc13196c7c33b9dd97d08d43725ecb90b63",
    ("empty", 2): "086b702a519b57d6ef5aea6f8b3f2be24355cd1fb835cd80fb4e3d388b24d5a5",
    ("simple", 0): "9f3f5620ee0c54708516467d0d58741e7963047c7106b245d94c298259d0fa01",
    ("simple", 1): "ad6db6427568a1e4fdc772cbab7b6063f5eb4b33cb62982a740ba9213e5962b5",
    ("simple", 2): "a8fcd41f8b313bede69f462f2af0a38d64b99a6333f5df884ea9ab4037fac722",
}
RS_C_SHA256 = {
    ("empty", 0): "c3dc5b0fc4afb0693a95e017fe5815e1f88f204d485df617541b5ea659aefb8b",
    ("empty", 1): "18e13c704e2aae7f84be9fda89fdc4c5001c184d279b90a93434e872e5e7c190",
    ("simple", 0): "850f94a6374fc4a920e8bc65d10bac1d1e2f3dd7b5c203d351e3ed74c08398aa",
    ("simple", 1): "c2ef36f4493efe3d15c85789b2ead2b0ece9917ef663339484c8ae35927bc1a1",
}


def rs_tree(name: str) -> FileSystem:
    """The composefs-rs ``empty``/``simple`` trees, built in code (golden.md section 5)."""
    fs = FileSystem(Stat(0o755, 0, 0, 0, 0))
    if name == "simple":
        for n, content in [(b"fifo", Fifo()), (b"regular-inline", Inline(b"hihi")),
                           (b"regular-external", External(b"\x5a" * 32, 1234)),
                           (b"chrdev", CharacterDevice(123)), (b"blkdev", BlockDevice(123)),
                           (b"socket", Socket()), (b"symlink", Symlink(b"/target"))]:
            fs.root.entries[n] = fs.push_leaf(Stat(0, 0, 0, 0, 0), content)
    return fs


@needs_conformance
@pytest.mark.parametrize("row", ASSET_GOLDEN, ids=lambda r: r[0])
def test_c_asset_checksums(row):
    name, flags, img_sha, img_verity, size = row
    path = ASSETS / name
    expected = (path.parent / (name + ".sha256")).read_text().split()[0]
    assert expected == img_sha
    version_file = path.parent / (name + ".version")
    if version_file.exists():
        v = int(version_file.read_text())
        assert flags == (v, v)
    img = c_build(load_asset(name), flags)
    assert len(img) == size
    assert sha256(img) == img_sha
    assert verity(img) == img_verity
    fsck_erofs(img)


@needs_conformance
@pytest.mark.parametrize("row", OTHER_VERSIONS, ids=lambda r: f"{r[0]}-{r[1]}")
def test_c_asset_other_versions(row):
    name, flags, img_sha, img_verity = row
    img = c_build(load_asset(name), flags)
    assert sha256(img) == img_sha
    assert verity(img) == img_verity


@needs_conformance
def test_every_asset_has_a_golden_row():
    names = {p.name[:-len(".sha256")] for p in ASSETS.glob("*.sha256")}
    assert names == {r[0] for r in ASSET_GOLDEN}


@needs_conformance
@pytest.mark.parametrize("name", ["empty", "simple"])
@pytest.mark.parametrize("version", [0, 1, 2])
def test_rs_pins_from_dumpfile(name, version):
    data = (DERIVED / f"rs-{name}.dump").read_bytes()
    fs = parse_dumpfile(data)
    assert write_dumpfile(fs) == data
    img = write_image(fs, version)
    assert verity(img) == RS_PINS[(name, version)]
    assert img == write_image(rs_tree(name), version)
    assert len(img) == (4096 if version == 2 else 16384)
    if (name, version) in RS_C_SHA256:
        assert sha256(img) == RS_C_SHA256[(name, version)]
        # the C path: strict C parsing and default flags (-> v0), or 1/1
        fs_c = parse_dumpfile_c(data, strict=True)
        flags = None if version == 0 else (1, 1)
        assert sha256(c_build(fs_c, flags)) == RS_C_SHA256[(name, version)]
    fsck_erofs(img)


@pytest.mark.parametrize("name", ["empty", "simple"])
@pytest.mark.parametrize("version", [0, 1, 2])
def test_rs_pins_from_code(name, version):
    assert verity(write_image(rs_tree(name), version)) == RS_PINS[(name, version)]


def test_v2_simple_layout_snapshot():
    """Structure of the V2 image of the ``simple`` tree."""
    img = write_image(rs_tree("simple"), 2)
    assert len(img) == 4096
    magic, version, flags, cfs_version = struct.unpack_from("<IIII", img, 0)
    assert (magic, version, flags, cfs_version) == (0xD078629A, 1, 0, 2)
    assert struct.unpack_from("<I", img, 1024)[0] == 0xE0F5E1E2
    assert struct.unpack_from("<H", img, 1024 + 14)[0] == 36
    assert struct.unpack_from("<Q", img, 1024 + 16)[0] == 8
    fmt, icount, mode, _r, size = struct.unpack_from("<HHHHQ", img, 0x480)
    assert (fmt, mode, size) == (5, 0o40755, 170)
    fmt, icount, mode, _r, size, u = struct.unpack_from("<HHHHQI", img, 0x640)
    assert (fmt, icount, mode, size, u) == (9, 37, 0o100000, 1234, 31)
    assert struct.unpack_from("<I", img, 0x640 + 64)[0] == 0x7FFDFFFF
    assert img[0x7C0 + 64:0x7C0 + 64 + 7] == b"/target"


@needs_conformance
def test_special_v1_trimmed():
    """golden.md section 6: special.dump without /inline-large* lines."""
    data = b"".join(line for line in (ASSETS / "special.dump").read_bytes().splitlines(True)
                    if not line.startswith(b"/inline-large"))
    assert sha256(data) == "26d215f6f16ad1ecbfdab7544a84618492de5994642db00f889ef921d77e5107"
    rows = [(None, "0903cda0695f4086ab587609876f4743e7aadd8a849c22cc599ac60943ee0616",
             "b1c78c25db8638be5b9b483472d32ee9624d8d32ded626a91cd536116e8df97c"),
            ((1, 1), "0903cda0695f4086ab587609876f4743e7aadd8a849c22cc599ac60943ee0616",
             "b1c78c25db8638be5b9b483472d32ee9624d8d32ded626a91cd536116e8df97c"),
            ((0, 0), "22484dec90e2fff32bf683ed55df233f7a7513ffedbf54262c3ff22a70c8a198",
             "ca8f91c7a310308bb5737cf1ab1d06395f83a2d9266423bfe5fe2b5f2c4e4218")]
    for strict in (True, False):
        for flags, img_sha, img_verity in rows:
            img = c_build(parse_dumpfile_c(data, strict=strict), flags)
            assert len(img) == 16384
            assert sha256(img) == img_sha
            assert verity(img) == img_verity
    # composefs-rs: its own parser, V1 pin; and its V0 equals the 0/0 row (no auto-bump)
    fs = parse_dumpfile(data)
    assert verity(write_image(fs, 1)) == rows[0][2]
    assert verity(write_image(fs, 0)) == rows[2][2]
    for flags, _s, _v in rows:
        fsck_erofs(c_build(fs, flags))


def test_select_c_version():
    plain = rs_tree("simple")
    wh = rs_tree("simple")
    wh.root.entries[b"wh"] = wh.push_leaf(Stat(), CharacterDevice(0))
    assert select_c_version(plain) == 0
    assert select_c_version(wh) == 1
    assert select_c_version(wh, 0, 0) == 0
    assert select_c_version(wh, 1, 1) == 1
    assert select_c_version(plain, 1, 1) == 1
    assert select_c_version(plain, 1, None) == 1      # max defaults to 0, raised to min
    assert select_c_version(wh, None, 1) == 1         # min defaults to 0; auto-bump
    assert select_c_version(plain, None, 1) == 0
    with pytest.raises(ErofsError):
        select_c_version(plain, 0, 2)
    with pytest.raises(ErofsError):
        select_c_version(plain, 2, 2)


# --------------------------------------------------------------------------- round trips


@needs_conformance
@pytest.mark.parametrize("row", ASSET_GOLDEN, ids=lambda r: r[0])
def test_asset_round_trips(row):
    name, flags, img_sha, _v, _s = row
    img = c_build(load_asset(name), flags)
    # composefs-dump: load + rewrite
    assert write_image(erofs_to_filesystem(img), Image(img).composefs_version) == img
    # composefs-info dump | mkcomposefs
    dump = dump_image_c(img)
    img2 = c_build(parse_dumpfile_c(dump, strict=True), flags)
    assert sha256(img2) == img_sha
    assert collect_objects(img) == set()


def test_collect_objects():
    fs = FileSystem(Stat(0o755))
    a, b, c = (bytes([i]) * 32 for i in (1, 2, 3))
    fs.root.entries[b"a"] = fs.push_leaf(Stat(0o644), External(a, 100))
    fs.root.entries[b"a2"] = fs.push_leaf(Stat(0o644), External(a, 100))
    sub = fs.root.entries[b"sub"] = Directory(Stat(0o755))
    sub.entries[b"b"] = fs.push_leaf(Stat(0o644), External(b, 5))
    sub.entries[b"c"] = fs.push_leaf(Stat(0o644), ExternalNoVerity(c, 5))
    sub.entries[b"s"] = fs.push_leaf(Stat(0o644), Sparse(5))
    for v in (0, 1, 2):
        img = write_image(fs, v)
        assert collect_objects(img, "sha256") == {a, b, c}
        assert collect_objects(img, None) == {a, b, c}
    big = FileSystem(Stat(0o755))
    d = bytes(range(64))
    big.root.entries[b"x"] = big.push_leaf(Stat(0o644), External(d, 10))
    img = write_image(big, 1)
    assert collect_objects(img, "sha512") == {d}
    fsck_erofs(img)


def test_hardlinks_and_whiteouts():
    fs = FileSystem(Stat(0o755, 0, 0, 10, 5))
    leaf = fs.push_leaf(Stat(0o644, 1, 2, 11, 0), Inline(b"data"))
    d1 = fs.root.entries[b"z"] = Directory(Stat(0o700))
    d2 = d1.entries[b"deep"] = Directory(Stat(0o700))
    d2.entries[b"first"] = leaf            # first in DFS order, deepest
    fs.root.entries[b"b"] = leaf
    d1.entries[b"x"] = leaf
    d1.entries[b".wh"] = fs.push_leaf(Stat(0o600), CharacterDevice(0))
    dump = write_dumpfile(fs)
    # V2 stores every mtime_nsec as 0 (docs/images.md, "extended inode mtime_nsec"): the
    # root's 10.5 comes back as 10.0 and nothing else changes
    v2_dump = without_nsec(dump)
    assert v2_dump != dump and v2_dump == dump.replace(b" 10.5 ", b" 10.0 ", 1)
    for v in (0, 1, 2):
        img = write_image(fs, v)
        fsck_erofs(img)
        back = erofs_to_filesystem(img)
        assert write_dumpfile(back) == (v2_dump if v == 2 else dump), v
        assert write_image(back, v) == img
    hl = FileSystem(Stat(0o755))
    w = hl.push_leaf(Stat(), CharacterDevice(0))
    hl.root.entries[b"w1"] = w
    hl.root.entries[b"w2"] = w
    with pytest.raises(ErofsError, match="whiteout"):
        write_image(hl, 1)


def test_invalid_trees_rejected():
    fs = FileSystem(Stat(0o755))
    fs.push_leaf(Stat(), Fifo())           # orphan
    with pytest.raises(ErofsError, match="orphan"):
        write_image(fs, 1)
    fs2 = FileSystem(Stat(0o755))
    from cfsd.core.tree import Leaf
    fs2.root.entries[b"x"] = Leaf(Stat(), Fifo())   # not in the leaf table
    with pytest.raises(ErofsError):
        write_image(fs2, 2)
    with pytest.raises(ErofsError):
        write_image(FileSystem(Stat()), 3)
    for name in (b"", b".", b"..", b"a/b", b"a\0"):
        bad = FileSystem(Stat(0o755))
        bad.root.entries[name] = bad.push_leaf(Stat(), Fifo())
        with pytest.raises(ErofsError, match="invalid file name"):
            write_image(bad, 1)
    big = FileSystem(Stat(0o755))
    big.root.entries[b"f"] = big.push_leaf(Stat(), Sparse(9_500_000_000_000_000))
    with pytest.raises(ErofsError, match="too large"):
        write_image(big, 0)


def test_negative_mtime():
    fs = FileSystem(Stat(0o755, 0, 0, -5, 7))
    fs.root.entries[b"f"] = fs.push_leaf(Stat(0o644, 0, 0, 100, 0), Inline(b"x"))
    for v in (0, 1, 2):
        img = write_image(fs, v)
        back = erofs_to_filesystem(img)
        assert back.root.stat.st_mtim_sec == -5
        assert back.root.entries[b"f"].stat.st_mtim_sec == 100
        assert write_image(back, v) == img
        fsck_erofs(img)


def test_big_directories_and_inline_boundaries():
    fs = FileSystem(Stat(0o755, 0, 0, 1, 0))
    big = fs.root.entries[b"big"] = Directory(Stat(0o755, 0, 0, 2, 0))
    for i in range(700):
        big.entries[b"entry-%05d-%s" % (i, b"x" * (i % 40))] = fs.push_leaf(
            Stat(0o644, 0, 0, 1, 0), Inline(b"%d" % i))
    for n in (0, 1, 63, 64, 65, 511, 512, 2047, 2048, 2049, 4095, 4096, 4097, 5000):
        fs.root.entries[b"inline-%d" % n] = fs.push_leaf(Stat(0o644, 0, 0, 1, 0),
                                                          Inline(bytes([n % 251]) * n))
    for n in (1, 100, 1000, 1023, 1024, 2000, 4000, 4095):
        fs.root.entries[b"link-%d" % n] = fs.push_leaf(Stat(0o777, 0, 0, 1, 0),
                                                        Symlink(b"t" * n))
    for v in (0, 1):
        img = write_image(fs, v)
        fsck_erofs(img)
        back = erofs_to_filesystem(img)
        assert write_dumpfile(back) == write_dumpfile(fs)
        assert write_image(back, v) == img
        assert c_build(parse_dumpfile_c(dump_image_c(img), strict=True), (v, v)) == img


def test_builds_a_20k_entry_tree():
    """A 20k-entry tree builds and reads back whole (its speed is bench/image.py's)."""
    fs = FileSystem(Stat(0o755, 0, 0, 1_700_000_000, 0))
    for d in range(200):
        dd = fs.root.entries[b"d%03d" % d] = Directory(Stat(0o755, 0, 0, 1_700_000_000, 0))
        for f in range(99):
            content = (External(hashlib.sha256(b"%d-%d" % (d, f)).digest(), 1000 + f)
                       if f % 3 else Inline(b"x" * (f % 64)))
            dd.entries[b"file%04d.txt" % f] = fs.push_leaf(
                Stat(0o644, 0, 0, 1_700_000_000 + f % 3, 0), content)
    img = write_image(fs, 1)
    assert len(collect_objects(img)) == 200 * 66
    assert write_dumpfile(erofs_to_filesystem(img)) == write_dumpfile(fs)


# --------------------------------------------------------------------------- reader validation


def _sample_images() -> list[bytes]:
    fs = FileSystem(Stat(0o755, 0, 0, 3, 0, {b"user.a": b"1", b"security.selinux": b"ctx"}))
    leaf = fs.push_leaf(Stat(0o644, 0, 0, 3, 0, {b"user.a": b"1"}), External(b"\x01" * 32, 99))
    sub = fs.root.entries[b"sub"] = Directory(Stat(0o755, 0, 0, 4, 0, {b"user.a": b"1"}))
    sub.entries[b"h1"] = leaf
    fs.root.entries[b"h2"] = leaf
    sub.entries[b"wh"] = fs.push_leaf(Stat(0o644), CharacterDevice(0))
    fs.root.entries[b"ln"] = fs.push_leaf(Stat(0o777), Symlink(b"target" * 30))
    fs.root.entries[b"in"] = fs.push_leaf(Stat(0o644), Inline(b"abc" * 30))
    for i in range(40):
        sub.entries[b"n%02d" % i + b"y" * 100] = fs.push_leaf(Stat(0o600), Fifo())
    return [write_image(fs, v) for v in (0, 1, 2)]


SAMPLES = _sample_images()


def _exercise(img: bytes) -> None:
    """Every reader entry point must succeed or raise ErofsError."""
    for fn in (lambda: erofs_to_filesystem(img), lambda: collect_objects(img),
               lambda: Image(img).restrict_to_composefs().fsck_metadata(),
               lambda: dump_image_c(img)):
        try:
            fn()
        except ErofsError:
            pass


def test_samples_are_valid():
    for img in SAMPLES:
        fsck_erofs(img)
        Image(img).restrict_to_composefs().fsck_metadata()
        assert collect_objects(img) == {b"\x01" * 32}
        back = erofs_to_filesystem(img)
        assert write_image(back, Image(img).composefs_version) == img


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(SAMPLES))),
       st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1,
                max_size=8))
def test_reader_survives_byte_flips(which, flips):
    img = bytearray(SAMPLES[which])
    for pos, val in flips:
        pos = 1024 + pos % (len(img) - 1024) if pos % 3 else pos % len(img)
        img[pos] = val
    _exercise(bytes(img))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(range(len(SAMPLES))), st.integers(0, 1 << 16))
def test_reader_survives_truncation(which, cut):
    img = SAMPLES[which]
    _exercise(img[:cut % len(img)])


def test_reader_rejects_specific_corruptions():
    img = bytearray(write_image(rs_tree("simple"), 2))
    with pytest.raises(ErofsError):
        erofs_to_filesystem(bytes(img[:1000]))
    bad = bytearray(img)
    bad[0] ^= 1
    with pytest.raises(ErofsError, match="composefs magic"):
        erofs_to_filesystem(bytes(bad))
    bad = bytearray(img)
    bad[1024 + 12] = 9                      # blkszbits
    with pytest.raises(ErofsError, match="blkszbits"):
        collect_objects(bytes(bad))
    bad = bytearray(img)
    struct.pack_into("<I", bad, 1024 + 80, 1)   # feature_incompat
    with pytest.raises(ErofsError, match="incompat"):
        erofs_to_filesystem(bytes(bad))
    bad = bytearray(img)
    struct.pack_into("<I", bad, 12, 3)          # composefs_version
    with pytest.raises(ErofsError, match="composefs_version"):
        erofs_to_filesystem(bytes(bad))
    # root '.' entry pointing elsewhere (first dirent of the root's inline block)
    bad = bytearray(img)
    struct.pack_into("<Q", bad, 0x480 + 64, 44)
    with pytest.raises(ErofsError, match="'.'"):
        erofs_to_filesystem(bytes(bad))
    # directory nlink
    bad = bytearray(img)
    struct.pack_into("<I", bad, 0x480 + 44, 3)
    with pytest.raises(ErofsError, match="nlink"):
        erofs_to_filesystem(bytes(bad))
    # leaf nlink
    bad = bytearray(img)
    struct.pack_into("<I", bad, 0x600 + 44, 2)
    with pytest.raises(ErofsError, match="nlink"):
        erofs_to_filesystem(bytes(bad))
    # malformed metacopy (strict) : change the length byte of the value
    bad = bytearray(img)
    pos = bad.find(b"\x00\x24\x00\x01" + b"\x5a" * 32)
    bad[pos + 3] = 2
    with pytest.raises(ErofsError, match="metacopy"):
        erofs_to_filesystem(bytes(bad))


def test_fsck_metadata_epoch_invariants():
    # a V1 image relabelled as V2 contains escaped whiteouts
    fs = FileSystem(Stat(0o755))
    sub = fs.root.entries[b"d"] = Directory(Stat(0o755))
    sub.entries[b"w"] = fs.push_leaf(Stat(), CharacterDevice(0))
    img = bytearray(write_image(fs, 1))
    Image(bytes(img)).restrict_to_composefs().fsck_metadata()
    struct.pack_into("<I", img, 12, 2)
    with pytest.raises(ErofsError, match="escaped whiteout"):
        Image(bytes(img)).restrict_to_composefs().fsck_metadata()
    # a V2 image relabelled as V1 lacks the 256 stubs (and has a native whiteout in /d)
    img2 = bytearray(write_image(fs, 2))
    struct.pack_into("<I", img2, 12, 1)
    with pytest.raises(ErofsError):
        collect_objects(bytes(img2))


def test_depth_limit_and_directory_loops(monkeypatch: pytest.MonkeyPatch):
    from cfsd.core import tree
    from cfsd.core.erofs import writer
    from cfsd.core.errors import TooDeep
    fs = FileSystem(Stat(0o755))
    d = fs.root
    for _ in range(tree.MAX_DEPTH + 1):
        d = d.entries.setdefault(b"d", Directory(Stat(0o755)))
    with pytest.raises(TooDeep, match="deeper than"):       # the writer's limit...
        write_image(fs, 2)
    monkeypatch.setattr(writer, "MAX_DEPTH", tree.MAX_DEPTH + 1)
    img = write_image(fs, 2)
    with pytest.raises(TooDeep, match="deeper than"):       # ...is the reader's
        erofs_to_filesystem(img)
    deep = FileSystem(Stat(0o755))
    d = deep.root
    for _ in range(tree.MAX_DEPTH):
        d = d.entries.setdefault(b"d", Directory(Stat(0o755)))
    img = write_image(deep, 1)
    assert write_image(erofs_to_filesystem(img), 1) == img
    shallow = FileSystem(Stat(0o755))
    d = shallow.root
    for _ in range(1500):
        d = d.entries.setdefault(b"d", Directory(Stat(0o755)))
    img = write_image(shallow, 1)
    assert write_image(erofs_to_filesystem(img), 1) == img
    assert dump_image_c(img).count(b"\n") == 1501


# --------------------------------------------------------------------------- hypothesis trees

NAME = st.binary(min_size=1, max_size=24).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))
XATTR_PREFIX = st.sampled_from([b"user.", b"trusted.", b"security.", b"trusted.overlay.",
                                b"system.posix_acl_access", b"system.posix_acl_default",
                                b"lustre.", b"x-"])
DROPPED = {b"trusted.overlay.whiteout", b"trusted.overlay.whiteouts",
           b"trusted.overlay.opaque", b"user.overlay.whiteout", b"user.overlay.whiteouts",
           b"user.overlay.opaque"}
XATTR_NAME = st.tuples(XATTR_PREFIX, st.binary(min_size=1, max_size=20)).map(
    lambda t: t[0] + t[1]).filter(lambda n: b"\0" not in n and n not in DROPPED)
XATTR_VALUE = st.one_of(st.sampled_from([b"", b"shared", b"x" * 50]), st.binary(max_size=40))
XATTRS = st.dictionaries(XATTR_NAME, XATTR_VALUE, max_size=4)


@st.composite
def stats(draw, v2: bool) -> Stat:
    return Stat(draw(st.integers(0, 0o7777)),
                draw(st.one_of(st.just(0), st.integers(0, (1 << 32) - 1))),
                draw(st.one_of(st.just(0), st.integers(0, (1 << 32) - 1))),
                draw(st.one_of(st.just(1_000_000), st.integers(0, 1 << 40))),
                0 if v2 else draw(st.one_of(st.just(0), st.integers(0, 999_999_999))),
                draw(XATTRS))


@st.composite
def contents(draw, v2: bool, sha512: bool):
    idsize = 64 if sha512 else 32
    kind = draw(st.integers(0, 11))
    if kind <= 2:
        if v2:
            n = draw(st.integers(0, 512))
        else:
            n = draw(st.sampled_from([0, 1, 64, 511, 2048, 2049, 4095, 4096, 4097, 5000])
                     | st.integers(0, 5000))
        return Inline(draw(st.binary(min_size=n, max_size=n)) if n < 200 else bytes([n % 7]) * n)
    if kind <= 4:
        size = draw(st.integers(1, 1 << 45))
        return External(draw(st.binary(min_size=idsize, max_size=idsize)), size)
    if kind == 5:
        return ExternalNoVerity(draw(st.binary(min_size=idsize, max_size=idsize)),
                                draw(st.integers(1, 1 << 30)))
    if kind == 6:
        return Sparse(draw(st.integers(1, 1 << 44)))
    if kind == 7:
        n = draw(st.integers(1, 1024 if v2 else 4095))
        t = draw(st.binary(min_size=1, max_size=min(n, 64)).filter(lambda b: b"\0" not in b))
        return Symlink((t * (n // len(t) + 1))[:n])
    if kind == 8:
        return BlockDevice(draw(st.integers(0, (1 << 32) - 1)))
    if kind == 9:
        return CharacterDevice(draw(st.integers(0, (1 << 32) - 1)))
    if kind == 10:
        return CharacterDevice(0)
    return draw(st.sampled_from([Fifo(), Socket()]))


def _is_hex2(n: bytes) -> bool:
    return len(n) == 2 and all(c in b"0123456789abcdefABCDEF" for c in n)


@st.composite
def trees(draw, v2: bool = False, sha512: bool = False) -> FileSystem:
    fs = FileSystem(draw(stats(v2)))
    dirs = [fs.root]
    leaves = []
    for _ in range(draw(st.integers(0, 25))):
        parent = draw(st.sampled_from(dirs))
        name = draw(NAME)
        if name in parent.entries:
            continue
        if draw(st.integers(0, 4)) == 0:
            d = Directory(draw(stats(v2)))
            parent.entries[name] = d
            dirs.append(d)
        else:
            c = draw(contents(v2, sha512))
            if type(c) is CharacterDevice and c.rdev == 0 and parent is fs.root \
                    and _is_hex2(name):
                continue
            leaf = fs.push_leaf(draw(stats(v2)), c)
            parent.entries[name] = leaf
            leaves.append(leaf)
    # a big directory crossing block boundaries
    nbig = draw(st.sampled_from([0, 0, 150, 400]))
    if nbig:
        big = Directory(draw(stats(v2)))
        fs.root.entries[b"big-directory"] = big
        pad = draw(st.integers(0, 30))
        for i in range(nbig):
            big.entries[b"e%04d" % i + b"\xff" * pad] = fs.push_leaf(Stat(0o644), Fifo())
    # hardlinks
    linkable = [leaf for leaf in leaves
                if not (type(leaf.content) is CharacterDevice and leaf.content.rdev == 0)]
    if linkable:
        for _ in range(draw(st.integers(0, 4))):
            parent = draw(st.sampled_from(dirs))
            name = draw(NAME)
            if name not in parent.entries:
                parent.entries[name] = draw(st.sampled_from(linkable))
    return fs


def _in_rs_domain(fs: FileSystem) -> bool:
    """Trees the composefs-rs dumpfile parser reproduces exactly (its writer prints a digest
    for ExternalNoVerity, so that distinction is lost; docs/images.md)."""
    for leaf in fs.nlinks():
        c = leaf.content
        if type(c) is ExternalNoVerity:
            return False
        if type(c) is Inline and len(c.data) > 512:
            return False
        if type(c) is Symlink and len(c.target) > 1024:
            return False
    return True


def _c_dump_domain(fs: FileSystem) -> bool:
    return all(type(leaf.content) in (Inline, Symlink, BlockDevice, CharacterDevice, Fifo,
                                      Socket, External, ExternalNoVerity, Sparse)
               for leaf in fs.nlinks())


def _check_round_trip(fs: FileSystem, version: int, sha512: bool = False) -> None:
    dump = write_dumpfile(fs)
    if _in_rs_domain(fs):
        parsed = parse_dumpfile(dump)
        assert write_dumpfile(parsed) == dump
        img = write_image(parsed, version)
        assert img == write_image(fs, version)
    else:
        img = write_image(fs, version)
    back = erofs_to_filesystem(img, "sha512" if sha512 else "sha256")
    assert write_dumpfile(back) == dump
    assert write_image(back, version) == img
    Image(img).restrict_to_composefs().fsck_metadata()
    fsck_erofs(img)
    if version < 2 and not sha512 and _c_dump_domain(fs):
        again = parse_dumpfile_c(dump_image_c(img), strict=True)
        assert write_image(again, version) == img


@pytest.mark.parametrize("version", [0, 1])
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_trees_epoch1(version, data):
    _check_round_trip(data.draw(trees(v2=False)), version)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fs=trees(v2=True))
def test_random_trees_v2(fs):
    _check_round_trip(fs, 2)


@pytest.mark.parametrize("version", [1, 2])
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_trees_sha512(version, data):
    _check_round_trip(data.draw(trees(v2=version == 2, sha512=True)), version, sha512=True)


def test_dumpfile_errors_are_not_erofs_errors():
    assert issubclass(DumpfileError, ValueError) and issubclass(ErofsError, ValueError)


def test_v2_reader_limits():
    fs = FileSystem(Stat(0o755))
    fs.root.entries[b"f"] = fs.push_leaf(Stat(0o644), Inline(b"x" * 513))
    with pytest.raises(ErofsError, match="512"):
        erofs_to_filesystem(write_image(fs, 2))
    assert erofs_to_filesystem(write_image(fs, 1)).root.entries[b"f"].content == \
        Inline(b"x" * 513)
    fs = FileSystem(Stat(0o755))
    fs.root.entries[b"l"] = fs.push_leaf(Stat(0o777), Symlink(b"y" * 1025))
    with pytest.raises(ErofsError, match="1024"):
        erofs_to_filesystem(write_image(fs, 2))


@needs_conformance
@pytest.mark.parametrize("row", ASSET_GOLDEN, ids=lambda r: r[0])
def test_fsck_erofs_accepts_asset_images(row):
    fs = load_asset(row[0])
    versions = (0, 1, 2) if row[0] in ("no-newline.dump", "honggfuzz-chardev-nonzero-size.dump") \
        else (0, 1)   # the others exceed V2's domain (inline > 512, long symlinks, > 2^43)
    for v in versions:
        fsck_erofs(write_image(fs, v))


def test_fsck_erofs_is_available_and_rejects_garbage():
    img = bytearray(write_image(rs_tree("simple"), 1))
    img[1024:1028] = b"\0\0\0\0"
    with pytest.raises(AssertionError):
        fsck_erofs(bytes(img))


def test_has_acl_flag_uses_exact_names():
    for name, flag in [(b"system.posix_acl_access", 1), (b"system.posix_acl_default", 1),
                       (b"system.posix_acl_accessX", 0), (b"user.x", 0)]:
        fs = FileSystem(Stat(0o755))
        fs.root.entries[b"a"] = fs.push_leaf(Stat(0o644, xattrs={name: b"1"}), Inline(b""))
        for v in (0, 1):
            assert struct.unpack_from("<I", write_image(fs, v), 8)[0] == flag
        assert struct.unpack_from("<I", write_image(fs, 2), 8)[0] == 0

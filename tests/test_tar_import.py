"""Layer tars through the real daemon and client: import-layer then cat is byte-identical."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfsd.core.tar import TarError, TarParser
from tests.conftest import Daemon, run_cfsctl

NAME = st.binary(min_size=1, max_size=40).map(
    lambda b: bytes(c for c in b if c not in b"/\0") or b"x").filter(lambda b: b not in (
        b".", b".."))


@st.composite
def tar_archives(draw: st.DrawFn) -> bytes:
    """Random tars made by Python's tarfile (an independent writer)."""
    fmt = draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]))
    buf = io.BytesIO()
    files: list[str] = []
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as tf:
        n = draw(st.integers(1, 12))
        for i in range(n):
            raw = draw(NAME)
            if fmt == tarfile.USTAR_FORMAT:
                raw = raw[:30]
            name = raw.decode("utf-8", "surrogateescape")
            if draw(st.booleans()) and fmt != tarfile.USTAR_FORMAT:
                name = "d" * draw(st.integers(90, 180)) + "/" + name  # long names
            name = f"{i}-{name}"
            kind = draw(st.sampled_from(["file", "file", "dir", "sym", "hard", "chr", "blk",
                                         "fifo"]))
            ti = tarfile.TarInfo(name)
            ti.mtime = draw(st.integers(0, 2**33 - 1))
            ti.mode = draw(st.integers(0, 0o7777))
            ti.uid = draw(st.integers(0, 70000))
            ti.gid = draw(st.integers(0, 70000))
            if fmt == tarfile.PAX_FORMAT and draw(st.booleans()):
                ti.pax_headers = {"SCHILY.xattr.user.test": draw(st.text(max_size=20)),
                                  "SCHILY.xattr.security.capability": "\x01\x02"}
            data = b""
            if kind == "file":
                size = draw(st.sampled_from([0, 1, 63, 64, 65, 511, 512, 513, 4096, 70_000]))
                data = draw(st.binary(min_size=min(size, 64), max_size=64)) * (size // 64 + 1)
                data = data[:size]
                ti.size = len(data)
                files.append(name)
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "sym":
                ti.type = tarfile.SYMTYPE
                ti.linkname = "t" * draw(st.integers(1, 300 if fmt != tarfile.USTAR_FORMAT
                                                        else 90))
            elif kind == "hard":
                if not files:
                    continue
                ti.type = tarfile.LNKTYPE
                ti.linkname = draw(st.sampled_from(files))
            elif kind in ("chr", "blk"):
                ti.type = tarfile.CHRTYPE if kind == "chr" else tarfile.BLKTYPE
                ti.devmajor = draw(st.integers(0, 4095))
                ti.devminor = draw(st.integers(0, 65535))
            else:
                ti.type = tarfile.FIFOTYPE
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def import_and_cat(daemon: Daemon, repo: str, tar: bytes) -> tuple[str, bytes]:
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    out = run_cfsctl("--repo", repo, "oci", "import-layer", digest, address=daemon.address,
                     input=tar)
    verity = out.stdout.decode().strip()
    back = run_cfsctl("--repo", repo, "cat", f"oci-layer-{digest}",
                      address=daemon.address).stdout
    return verity, back


@pytest.fixture(scope="module")
def repo(shared_daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("tars") / "repo")
    run_cfsctl("--repo", path, "init", "--insecure", "--algorithm", "fsverity-sha256-12",
               address=shared_daemon.address)
    return path


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(tar=tar_archives())
def test_random_tars_round_trip(shared_daemon: Daemon, repo: str, tar: bytes) -> None:
    verity, back = import_and_cat(shared_daemon, repo, tar)
    assert verity.startswith("sha256:") and len(verity) == 7 + 64
    assert back == tar


def test_gnu_tar_record_padding(shared_daemon: Daemon, repo: str, tmp_path: Path) -> None:
    """GNU tar pads archives to 10 KiB records: the padding survives the round trip."""
    if shutil.which("tar") is None:
        pytest.skip("tar not installed")
    src = tmp_path / "src"
    (src / "usr/bin").mkdir(parents=True)
    (src / "usr/bin/big").write_bytes(os.urandom(300_000))
    (src / "usr/bin/small").write_bytes(b"hi")
    os.symlink("big", src / "usr/bin/link")
    os.link(src / "usr/bin/big", src / "usr/bin/hard")
    out = tmp_path / "layer.tar"
    subprocess.run(["tar", "--format=gnu", "-C", str(src), "-cf", str(out), "."], check=True)
    data = out.read_bytes()
    assert len(data) % 10240 == 0
    _, back = import_and_cat(shared_daemon, repo, data)
    assert back == data


def _member(tf: tarfile.TarFile, name: str, data: bytes = b"", mtime: int = 0,
            **attrs: object) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime = len(data), mtime
    for k, v in attrs.items():
        setattr(ti, k, v)
    tf.addfile(ti, io.BytesIO(data) if data else None)


def fixed_tars() -> list[bytes]:
    """Three layers made by tarfile, the same every run: files on both sides of the
    64-byte inline limit, one file in all three layers, a hardlink, a long symlink, a
    device, PAX xattrs."""
    r = random.Random(1234)
    shared = r.randbytes(100_000)
    tars = []
    for n in range(3):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            t = 1_700_000_000 + n
            _member(tf, "usr/lib", mtime=t, type=tarfile.DIRTYPE)
            for size in (0, 1, 64, 65, 4096, 70_000 + n, 300_000):
                _member(tf, f"usr/lib/f{size}-{n}", r.randbytes(size), t)
            _member(tf, "usr/lib/shared", shared, t)
            _member(tf, "usr/lib/hard", b"", t, type=tarfile.LNKTYPE,
                    linkname="usr/lib/shared")
            _member(tf, "usr/lib/" + "l" * 150, b"", t, type=tarfile.SYMTYPE,
                    linkname="t" * 200)
            _member(tf, "usr/lib/dev", b"", t, type=tarfile.CHRTYPE, devmajor=1, devminor=3)
            _member(tf, "usr/lib/xattrs", r.randbytes(5000), t,
                    pax_headers={"SCHILY.xattr.user.test": f"layer {n}"})
        tars.append(buf.getvalue())
    return tars


@pytest.fixture
def imported(shared_daemon: Daemon, tmp_path: Path) -> str:
    """A repository of its own with fixed_tars() imported (no other test's leftovers)."""
    path = str(tmp_path / "repo")
    run_cfsctl("--repo", path, "init", "--insecure", "--algorithm", "fsverity-sha256-12",
               address=shared_daemon.address)
    for tar in fixed_tars():
        _, back = import_and_cat(shared_daemon, path, tar)
        assert back == tar
    return path


def test_fsck_clean_after_imports(shared_daemon: Daemon, imported: str) -> None:
    out = run_cfsctl("--repo", imported, "fsck", address=shared_daemon.address)
    assert out.stdout.decode().endswith("status: ok\n")
    report = json.loads(run_cfsctl("--repo", imported, "fsck", "--json",
                                   address=shared_daemon.address).stdout)
    # 3 layers x (4 files over 64 bytes + the xattrs file) + the shared file once + the 3
    # splitstreams themselves
    assert report["ok"] and report["streams_checked"] == 3, report
    assert report["objects_checked"] == 3 * 5 + 1 + 3, report


def test_objects_named_by_fsverity_cli(imported: str) -> None:
    """Every object file name equals `fsverity digest` of its content."""
    fsv = shutil.which("fsverity")
    if fsv is None:
        pytest.skip("fsverity not installed")
    paths = sorted(str(p) for p in Path(imported, "objects").glob("??/*"))
    assert len(paths) == 3 * 5 + 1 + 3
    for i in range(0, len(paths), 200):
        batch = paths[i:i + 200]
        out = subprocess.run([fsv, "digest", "--hash-alg=sha256", *batch], check=True,
                             capture_output=True).stdout.decode().splitlines()
        for line, p in zip(out, batch, strict=True):
            digest, name = line.split()
            assert name == p
            assert digest == "sha256:" + p.split("/")[-2] + p.split("/")[-1]


def _bad_checksum() -> bytes:
    h = bytearray(tarfile.TarInfo("file").tobuf(tarfile.GNU_FORMAT))
    h[0] = ord("g")
    return bytes(h)


@pytest.mark.parametrize(("blob", "match"), [
    (_bad_checksum(), "checksum"),
    (b"x" * 512, "invalid octal"),
    (bytes(512) + b"y" * 512, "stray zero block"),
])
def test_parser_rejects(blob: bytes, match: str) -> None:
    with pytest.raises(TarError, match=match):
        TarParser().parse(blob)


def test_parser_rejects_sparse_and_sized_symlink() -> None:
    def hdr(typeflag: bytes, size: int) -> bytes:
        ti = tarfile.TarInfo("x")
        ti.size = 0
        h = bytearray(ti.tobuf(tarfile.GNU_FORMAT)[:512])
        h[156:157] = typeflag
        h[124:136] = b"%011o\0" % size
        h[148:156] = b" " * 8
        h[148:156] = b"%06o\0 " % sum(h)
        return bytes(h) + bytes(1024)

    with pytest.raises(TarError, match="sparse"):
        TarParser().parse(hdr(b"S", 0))
    with pytest.raises(TarError, match="non-zero size"):
        TarParser().parse(hdr(b"2", 10))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=0, max_size=3000), seed=st.integers(0, 2**32 - 1))
def test_parser_never_crashes(data: bytes, seed: int) -> None:
    """Arbitrary and mutated headers raise TarError or parse; never anything else."""
    import random
    base = bytearray(tarfile.TarInfo("some/file").tobuf(tarfile.PAX_FORMAT))
    rng = random.Random(seed)
    for _ in range(rng.randint(1, 8)):
        base[rng.randrange(len(base))] = rng.randrange(256)
    for blob in (data, bytes(base) + data):
        try:
            TarParser().parse(blob)
        except TarError:
            pass

"""fs-verity digests against the golden vectors and the real `fsverity digest`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cfsd.core import fsverity

GOLDEN = [  # conformance/golden.md section 1
    (b"hello world", "sha256", "1e2eaa4202d750a41174ee454970b92c1bc2f925b1e35076d8c7d5f56362ba64"),
    (b"hello world", "sha512", "18430270729d162d4e469daca123ae61893db4b0583d8f7081e3bf4f92b88ba5"
                               "14e7982f10733fb6aa895195c5ae8fd2eb2c47a8be05513ce5a0c51a6f570409"),
    (bytes(4095), "sha256", "5372beb83c78537c8970c8361e3254119fafdf1763854ecd57d3f0fe2da7c719"),
    (bytes(4096), "sha256", "babc284ee4ffe7f449377fbf6692715b43aec7bc39c094a95878904d34bac97e"),
    (bytes(4097), "sha256", "093756e4ea9683329106d4a16982682ed182c14bf076463a9e7f97305cbac743"),
    (bytes(1000), "sha256", "f6fa43bbc0a7908e2ef77438244159e9dec289dfc4c49d229237f9797a6a9b79"),
    (bytes(2000), "sha256", "f13c0c1a5b8bc8b8983be2761bae9dd229cc951b260dab7b2558987542c45c23"),
    (bytes(3000), "sha256", "0000610752b6366b2bd42ce92fa0c0089bc132408b8f3dc20f879a06d0e05aaf"),
    (b"", "sha256", "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"),
    (b"hello world\n", "sha256",
     "37061ef2ac4c21bec68489b56138c5780306a4ad7fe6676236ecdf2c9027cd92"),
    (b"foo bar baz\n", "sha256",
     "91e7d88cb7bc9cf6d8db3b0ecf89af4abf204bef5b3ade5113d5b62ef374e70b"),
    (bytes(1048577), "sha256", "5ceb20530731a1a1cea6a4badc2fabecc8b9f15481657e1eb8fab82d8b2f2268"),
]

FSVERITY = shutil.which("fsverity")
needs_cli = pytest.mark.skipif(FSVERITY is None, reason="fsverity (fsverity-utils) not installed")


@pytest.mark.parametrize(("data", "alg", "expected"), GOLDEN)
def test_golden(data: bytes, alg: str, expected: str) -> None:
    assert fsverity.digest(data, alg).hex() == expected


def cli_digest(path: Path | str, alg: str) -> str:
    assert FSVERITY is not None
    out = subprocess.run([FSVERITY, "digest", str(path), f"--hash-alg={alg}",
                          "--block-size=4096", "--compact"], check=True, capture_output=True)
    return out.stdout.decode().strip()


@needs_cli
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, (1 << 20) + 1, 128 * 4096 + 1,
                                  64 * 4096, 3_000_001])
@pytest.mark.parametrize("alg", ["sha256", "sha512"])
def test_matches_fsverity_cli(tmp_path: Path, size: int, alg: str) -> None:
    p = tmp_path / "f"
    p.write_bytes(os.urandom(size))
    expected = cli_digest(p, alg)
    assert fsverity.digest_path(p, alg).hex() == expected
    assert fsverity.digest(p.read_bytes(), alg).hex() == expected


@needs_cli
@pytest.mark.parametrize("alg", ["sha256", "sha512"])
def test_large_file_parallel(tmp_path: Path, alg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file over PARALLEL_THRESHOLD is hashed by the worker pool (not the serial fallback)
    and matches the C tool; parallel=False hashes it without the pool, with the same result."""
    p = tmp_path / "big"
    block = os.urandom(1 << 20)
    with open(p, "wb") as f:
        for i in range(fsverity.PARALLEL_THRESHOLD >> 20):
            f.write(i.to_bytes(8, "little") + block[8:])
        f.write(b"tail")                      # not a multiple of the block size
    assert p.stat().st_size > fsverity.PARALLEL_THRESHOLD
    expected = cli_digest(p, alg)

    runs: list[int] = []                      # jobs of each pool run that returned
    real_run = fsverity._Workers.run

    def counting_run(self: fsverity._Workers, jobs: list[tuple[str, int, int, str]]
                     ) -> list[bytes]:
        out = real_run(self, jobs)
        runs.append(len(jobs))
        return out

    monkeypatch.setattr(fsverity._Workers, "run", counting_run)
    monkeypatch.setattr(fsverity, "_pool_broken", False)   # whatever an earlier test left
    fsverity.shutdown_pool()                              # start the workers afresh
    try:
        assert fsverity.digest_path(p, alg).hex() == expected
        assert len(runs) == 1 and runs[0] > 1, runs          # the pool hashed it, in parts
        assert fsverity._pool is not None and fsverity._pool.started
        assert fsverity._pool_broken is False
        assert fsverity.digest_path(p, alg, parallel=False).hex() == expected
        assert len(runs) == 1                                # serially: no pool run
    finally:
        fsverity.shutdown_pool()


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=70_000), cuts=st.lists(st.integers(0, 70_000), max_size=8),
       alg=st.sampled_from(["sha256", "sha512"]))
def test_streaming_equals_oneshot(data: bytes, cuts: list[int], alg: str) -> None:
    h = fsverity.FsVerityHasher(alg)
    pos = 0
    for c in sorted(x % (len(data) + 1) for x in cuts):
        h.update(data[pos:c])
        pos = c
    h.update(data[pos:])
    assert h.digest() == fsverity.digest(data, alg)
    assert h.size == len(data)


def test_algorithm_strings() -> None:
    assert fsverity.parse_repo_algorithm("fsverity-sha256-12") is fsverity.SHA256
    assert fsverity.parse_repo_algorithm("fsverity-sha512-12") is fsverity.SHA512
    for bad in ("sha256", "fsverity-sha256-13", "fsverity-md5-12", "fsverity--12"):
        with pytest.raises(ValueError):
            fsverity.parse_repo_algorithm(bad)


def test_object_paths() -> None:
    d = bytes(range(32))
    path = fsverity.object_path(d)
    assert path == "00/" + d[1:].hex()
    assert fsverity.parse_object_path("../objects/" + path, "sha256") == d
    with pytest.raises(ValueError):
        fsverity.parse_object_path("00" + d[1:].hex(), "sha256")


def test_kernel_ioctls_without_fsverity_support() -> None:
    """tmpfs has no fs-verity: enable reports False and measure None."""
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as f:
        assert filesystem_type(f.name) == "tmpfs"
        f.write(b"x" * 5000)
        f.flush()
        fd = os.open(f.name, os.O_RDONLY)
        try:
            assert fsverity.enable_verity(fd, "sha256") is False
            assert fsverity.measure_verity(fd, "sha256") is None
        finally:
            os.close(fd)


@pytest.fixture
def verity_fs(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """A loop-mounted ext4 with the verity feature, and whether the kernel has fs-verity."""
    if FSVERITY is None:
        pytest.skip("fsverity (fsverity-utils) not installed")
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root")
    if not Path("/dev/loop-control").exists():
        pytest.skip("no loop devices here")
    img, mnt = tmp_path / "ext4.img", tmp_path / "mnt"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-O", "verity", str(img)], check=True,
                   capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True,
                   capture_output=True)
    try:
        # the kernel decides (CONFIG_FS_VERITY): asked through the C tool, not cfsd
        probe = mnt / "probe"
        probe.write_bytes(b"probe")
        r = subprocess.run([FSVERITY, "enable", str(probe)], capture_output=True)
        if r.returncode != 0:
            assert b"Operation not supported" in r.stderr, r.stderr
        yield mnt, r.returncode == 0
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_kernel_ioctls_on_fsverity_filesystem(verity_fs: tuple[Path, bool]) -> None:
    """On ext4 with the verity feature the kernel enables verity and measures what
    userspace computes; a second enable is accepted; another algorithm is refused.  A
    kernel without fs-verity (as the C tool reports) is told apart cleanly: enabling says
    "unsupported" instead of raising, and nothing is measured."""
    mnt, kernel_has_verity = verity_fs
    p = mnt / "f"
    p.write_bytes(b"x" * 5000)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert fsverity.measure_verity(fd, "sha256") is None          # not enabled yet
        if not kernel_has_verity:
            assert fsverity.enable_verity(fd, "sha256") is False
            assert fsverity.measure_verity(fd, "sha256") is None
            return
        assert fsverity.enable_verity(fd, "sha256") is True
        assert fsverity.measure_verity(fd, "sha256") == fsverity.digest(b"x" * 5000)
        assert fsverity.enable_verity(fd, "sha256") is True           # EEXIST
        with pytest.raises(OSError, match="another algorithm"):
            fsverity.measure_verity(fd, "sha512")
    finally:
        os.close(fd)


def filesystem_type(path: str) -> str:
    """The type of the filesystem *path* is on (from /proc/self/mountinfo)."""
    best, kind = "", ""
    real = os.path.realpath(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mount_point = fields[4].encode().decode("unicode_escape")
        fstype = fields[fields.index("-") + 1]
        if (real == mount_point or real.startswith(mount_point.rstrip("/") + "/")) \
                and len(mount_point) >= len(best):
            best, kind = mount_point, fstype
    return kind

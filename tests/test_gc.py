"""Garbage collection removes exactly the unreachable objects."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfsd.core import fsverity
from cfsd.core.gc import gc
from cfsd.core.repository import Repository
from cfsd.oci.layers import import_layer
from tests.conftest import Daemon, run_cfsctl, tree_listing


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def external_objects(tar: bytes) -> set[bytes]:
    """Objects a layer needs, computed from the tar with Python's tarfile."""
    out = set()
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf.getmembers():
            if m.isfile() and m.size > 64:
                f = tf.extractfile(m)
                assert f is not None
                out.add(fsverity.digest(f.read(), "sha256"))
    return out


def all_objects(root: Path) -> set[bytes]:
    return {bytes.fromhex(p.parent.name + p.name) for p in (root / "objects").glob("??/*")}


CONTENT = st.sampled_from([b"a" * 100, b"b" * 5000, b"c" * 65, b"tiny", b"d" * 70_000])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.lists(st.tuples(st.dictionaries(st.sampled_from(["f1", "f2", "f3", "f4"]),
                                                 CONTENT, min_size=1), st.booleans()),
                       min_size=1, max_size=5))
def test_gc_removes_exactly_unreachable(tmp_path_factory: pytest.TempPathFactory,
                                        layers: list[tuple[dict[str, bytes], bool]]) -> None:
    root = tmp_path_factory.mktemp("gc") / "repo"
    repo, _ = Repository.init(str(root), alg=fsverity.SHA256, insecure=True)
    expected: set[bytes] = set()
    with repo:
        for i, (files, rooted) in enumerate(layers):
            files = {f"{i}-{k}": v for k, v in files.items()}
            tar = make_tar(files)
            diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
            res = import_layer(repo, io.BytesIO(tar), diff_id, f"layer{i}" if rooted else None)
            if rooted:
                expected |= external_objects(tar) | {res.verity}
        before = all_objects(root)
        dry = gc(repo, dry_run=True)
        assert all_objects(root) == before
        result = gc(repo)
        after = all_objects(root)
    assert after == expected
    assert result.objects_removed == len(before - expected) == dry.objects_removed
    assert result.objects_bytes == dry.objects_bytes


def test_gc_roots_and_pruning(tmp_path: Path) -> None:
    repo, _ = Repository.init(str(tmp_path / "r"), alg=fsverity.SHA256, insecure=True)
    with repo:
        tar = make_tar({"x": b"q" * 1000})
        diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
        import_layer(repo, io.BytesIO(tar), diff_id)
        # An explicit root keeps an unnamed stream alive.
        assert gc(repo, roots=[f"oci-layer-{diff_id}"]).objects_removed == 0
        result = gc(repo)
        assert result.objects_removed == 2 and result.streams_pruned == 1
        assert repo.has_stream(f"oci-layer-{diff_id}") is None


def test_cli_gc_dry_run_then_real(daemon: Daemon, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    run_cfsctl("--repo", repo, "init", "--insecure", address=daemon.address)
    tar = make_tar({"a": b"z" * 4000, "b": b"y" * 3000})
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    run_cfsctl("--repo", repo, "oci", "import-layer", digest, address=daemon.address,
               input=tar)
    snap = tree_listing(Path(repo))
    out = run_cfsctl("--repo", repo, "gc", "--dry-run", address=daemon.address)
    assert out.stdout.decode() == (
        "Dry run (no files deleted):\n"
        f"Objects: 3 would be removed ({_sizes(Path(repo))} bytes)\n"
        "Symlinks that would be pruned: 0 images, 1 streams\n")
    assert tree_listing(Path(repo)) == snap
    out = run_cfsctl("--repo", repo, "gc", address=daemon.address)
    assert out.stdout.decode().startswith("Objects: 3 removed")
    assert not list(Path(repo, "objects").glob("??/*"))
    assert "status: ok" in run_cfsctl("--repo", repo, "fsck", address=daemon.address
                                      ).stdout.decode()


def _sizes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "objects").glob("??/*"))

"""Repository rules: meta.json, locking, atomic and verified object writes, symlinks."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cfsd.core import fsverity
from cfsd.core.errors import AlreadyInitialized, InvalidName, RepoNotFound, RepositoryError
from cfsd.core.gc import gc
from cfsd.core.metadata import RepoMetadata
from cfsd.core.repository import Repository, relative_target, validate_ref_name
from cfsd.oci.layers import import_layer


def new_repo(tmp_path: Path, **kw: object) -> Repository:
    r, created = Repository.init(str(tmp_path / "repo"), alg=fsverity.SHA256, insecure=True,
                                 **kw)
    assert created
    return r


def test_meta_json_bytes_match_upstream(tmp_path: Path) -> None:
    new_repo(tmp_path).close()
    assert (tmp_path / "repo/meta.json").read_bytes() == (
        b'{\n  "version": 1,\n  "algorithm": "fsverity-sha256-12",\n  "features": {\n'
        b'    "compatible": [],\n    "read-only-compatible": [\n      "v1_erofs"\n    ],\n'
        b'    "incompatible": []\n  },\n  "erofs_formats": {\n    "default": 1\n  }\n}\n')


@pytest.mark.parametrize(("meta", "match"), [
    ({"version": 2, "algorithm": "fsverity-sha256-12"}, "newer"),
    ({"version": 1, "algorithm": "fsverity-sha256-12",
      "features": {"incompatible": ["future"]}}, "incompatible"),
    ({"version": 1, "algorithm": "fsverity-md5-12"}, "unsupported"),
    ({"algorithm": "fsverity-sha256-12"}, "version"),
])
def test_refuses_unusable_metadata(tmp_path: Path, meta: dict, match: str) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo/meta.json").write_text(json.dumps(meta))
    with pytest.raises(RepositoryError, match=match):
        Repository.open(str(tmp_path / "repo"))


def test_format_versions() -> None:
    v2 = RepoMetadata.parse(b'{"version": 1, "algorithm": "fsverity-sha512-12"}')
    assert v2.format_versions() == [2]
    v1 = RepoMetadata.parse(b'{"version": 1, "algorithm": "fsverity-sha512-12", "features": '
                            b'{"read-only-compatible": ["v1_erofs"]}}')
    assert v1.format_versions() == [1]
    both = RepoMetadata.parse(b'{"version": 1, "algorithm": "fsverity-sha512-12", '
                              b'"erofs_formats": {"default": 1, "extra": [2, 0]}}')
    assert both.format_versions() == [1, 0, 2]
    ro = RepoMetadata.parse(b'{"version": 1, "algorithm": "fsverity-sha512-12", "features": '
                            b'{"read-only-compatible": ["something-new"]}}')
    assert ro.readonly_features == ["something-new"]


def test_init_is_idempotent_and_detects_conflicts(tmp_path: Path) -> None:
    new_repo(tmp_path).close()
    r, created = Repository.init(str(tmp_path / "repo"), alg=fsverity.SHA256, insecure=True)
    assert not created
    r.close()
    with pytest.raises(AlreadyInitialized):
        Repository.init(str(tmp_path / "repo"), alg=fsverity.SHA512)
    with pytest.raises(AlreadyInitialized):
        Repository.init(str(tmp_path / "repo"), alg=fsverity.SHA256, erofs_version=2)


def test_missing_and_legacy_repositories(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepoNotFound):
        Repository.open(str(tmp_path / "empty"))
    legacy = tmp_path / "legacy"
    (legacy / "objects/ab").mkdir(parents=True)
    (legacy / "objects/ab" / ("c" * 126)).write_bytes(b"x")
    with pytest.raises(RepoNotFound):
        Repository.open(str(legacy), upgrade=False)
    with Repository.open(str(legacy)) as r:
        assert r.alg is fsverity.SHA512
        assert r.meta.format_versions() == [1]  # upstream writes V1 metadata on upgrade
    assert json.loads((legacy / "meta.json").read_text())["algorithm"] == "fsverity-sha512-12"


def test_gc_waits_for_other_processes(tmp_path: Path) -> None:
    """A shared flock held by another process blocks GC (typed timeout, no hang)."""
    repo = new_repo(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / 'repo')!r}, os.O_RDONLY)\n"
        "fcntl.flock(fd, fcntl.LOCK_SH); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(TimeoutError):
            gc(repo, lock_timeout=0.3)
        assert gc(repo, dry_run=True).objects_removed == 0
    finally:
        holder.kill()
        holder.wait()
    assert gc(repo, lock_timeout=5).objects_removed == 0
    # The shared lock is back after GC: another exclusive locker must fail.
    fd = os.open(tmp_path / "repo", os.O_RDONLY)
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
    repo.close()


def test_corrupt_object_is_replaced_on_dedup(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    data = os.urandom(5000)
    digest = repo.ensure_object(data)
    path = tmp_path / "repo/objects" / fsverity.object_path(digest)
    path.write_bytes(b"evil" + data[4:])
    repo.forget_verified()
    assert repo.store_object(data).new is True
    assert path.read_bytes() == data
    repo.close()


def test_named_tmpfile_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without O_TMPFILE objects go through .tmp-object-* files and are renamed into place."""
    repo = new_repo(tmp_path)
    real_open = os.open

    def no_tmpfile(path, flags, *a, **kw):  # type: ignore[no-untyped-def]
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", no_tmpfile)
    digest = repo.ensure_object(b"y" * 3000)
    monkeypatch.undo()
    assert (tmp_path / "repo/objects" / fsverity.object_path(digest)).read_bytes() == b"y" * 3000
    assert not list((tmp_path / "repo/objects").glob(".tmp-object-*"))
    repo.close()


def test_failed_import_leaves_nothing(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(3):
            ti = tarfile.TarInfo(f"f{i}")
            ti.size = 4000
            tf.addfile(ti, io.BytesIO(bytes([i + 1]) * 4000))
    tar = buf.getvalue()
    with pytest.raises(RepositoryError):
        import_layer(repo, io.BytesIO(tar[:-2000]), "sha256:" + hashlib.sha256(tar).hexdigest())
    assert not [p for p in (tmp_path / "repo/objects").rglob("*") if p.is_file()]
    assert not list((tmp_path / "repo/objects").iterdir())
    repo.close()


def test_relative_symlinks() -> None:
    assert relative_target("streams/x", "objects/12/34") == "../objects/12/34"
    assert relative_target("streams/refs/oci/t", "streams/m") == "../../m"
    assert relative_target("images/refs/foo", "images/ab") == "../ab"
    assert relative_target("streams/refs/name", "streams/oci-layer-x") == "../oci-layer-x"


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "..", "a//b", "a/./b", "x\0y"])
def test_ref_names_cannot_escape(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_ref_name(name)


def test_planted_symlink_is_not_followed(tmp_path: Path) -> None:
    """objects/XX replaced by a symlink elsewhere: writes fail instead of escaping."""
    repo = new_repo(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    data = b"q" * 5000
    xx = fsverity.object_path(fsverity.digest(data))[:2]
    (tmp_path / "repo/objects").mkdir(exist_ok=True)
    (tmp_path / "repo/objects" / xx).symlink_to(outside)
    with pytest.raises(OSError):
        repo.ensure_object(data)
    assert not list(outside.iterdir())
    repo.close()

"""A caller with another uid (run with setpriv) may read but not write; paths it names are
resolved with its own permissions; files it writes into its own repository are its own."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from tests.conftest import Daemon, run_cfsctl, tree_listing
from tests.otheruser import NOBODY, as_nobody, other_user_marks

pytestmark = other_user_marks


def layer() -> tuple[bytes, str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("usr/data")
        ti.size = 5000
        tf.addfile(ti, io.BytesIO(b"d" * 5000))
    tar = buf.getvalue()
    return tar, "sha256:" + hashlib.sha256(tar).hexdigest()


@pytest.fixture(scope="module")
def root_repo(world: Path, open_daemon: Daemon) -> str:
    repo = str(world / "root-repo")
    run_cfsctl("--repo", repo, "init", "--insecure", address=open_daemon.address)
    tar, digest = layer()
    run_cfsctl("--repo", repo, "oci", "import-layer", digest, "base",
               address=open_daemon.address, input=tar)
    for p in [Path(repo), *Path(repo).rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    return repo


def test_other_uid_may_read(world: Path, open_daemon: Daemon, root_repo: str) -> None:
    p = as_nobody(world, open_daemon, "--repo", root_repo, "fsck")
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().endswith("status: ok\n")
    _, digest = layer()
    p = as_nobody(world, open_daemon, "--repo", root_repo, "cat", f"oci-layer-{digest}")
    assert p.returncode == 0 and hashlib.sha256(p.stdout).hexdigest() == digest[7:]


def test_other_uid_is_refused_writes(world: Path, open_daemon: Daemon, root_repo: str) -> None:
    before = tree_listing(Path(root_repo))
    p = as_nobody(world, open_daemon, "--repo", root_repo, "gc")
    assert p.returncode == 1
    assert "permission denied" in p.stderr.decode().lower()
    tar, digest = layer()
    other = tar[:-1024] + bytes(1024)  # same content: a valid tar but a new import
    p = as_nobody(world, open_daemon, "--repo", root_repo, "oci", "import-layer",
                  "sha256:" + hashlib.sha256(other).hexdigest(), input=other)
    assert p.returncode == 1 and "permission denied" in p.stderr.decode().lower()
    p = as_nobody(world, open_daemon, "init", "--insecure", str(Path(root_repo) / "sub"))
    assert p.returncode == 1 and "permission denied" in p.stderr.decode().lower()
    assert tree_listing(Path(root_repo)) == before


def test_unreadable_paths_stay_unreadable(world: Path, open_daemon: Daemon,
                                          root_repo: str) -> None:
    private = world / "private"
    private.mkdir(mode=0o700)
    run_cfsctl("--repo", str(private / "repo"), "init", "--insecure", address=open_daemon.address)
    p = as_nobody(world, open_daemon, "--repo", str(private / "repo"), "fsck")
    assert p.returncode == 1 and "permission denied" in p.stderr.decode().lower()
    # A symlink the caller may read does not grant access to what it points at.
    link = world / "link-to-private"
    link.symlink_to(private / "repo")
    p = as_nobody(world, open_daemon, "--repo", str(link), "fsck")
    assert p.returncode == 1 and "permission denied" in p.stderr.decode().lower()


def test_owner_writes_as_owner(world: Path, open_daemon: Daemon) -> None:
    home = world / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    repo = home / "repo"
    p = as_nobody(world, open_daemon, "--repo", str(repo), "init", "--insecure")
    assert p.returncode == 0, p.stderr
    tar, digest = layer()
    p = as_nobody(world, open_daemon, "--repo", str(repo), "oci", "import-layer", digest,
                  input=tar)
    assert p.returncode == 0, p.stderr
    owners = {(st.st_uid, st.st_gid) for st in
              (os.lstat(x) for x in [repo, *repo.rglob("*")])}
    assert owners == {(NOBODY, NOBODY)}


def test_pull_into_own_repository_as_owner(world: Path, open_daemon: Daemon) -> None:
    """Layer threads of a pull write with the repository owner's identity too."""
    from tests.ocitools import build_image, require_tools
    require_tools("umoci")
    layout = world / "pull-layout"
    build_image(layout, "v1", {"usr/bin/a": os.urandom(300_000), "etc/b": b"b"})
    build_image(layout, "v2", {"usr/bin/c": os.urandom(200_000)}, base="v1")
    for p in [layout, *layout.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    home = world / "puller"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    repo = home / "repo"
    assert as_nobody(world, open_daemon, "--repo", str(repo), "init", "--insecure").returncode == 0
    p = as_nobody(world, open_daemon, "--repo", str(repo), "oci", "pull", f"oci:{layout}:v2",
                  "img")
    assert p.returncode == 0, p.stderr.decode()
    owners = {(st.st_uid, st.st_gid) for st in
              (os.lstat(x) for x in [repo, *repo.rglob("*")])}
    assert owners == {(NOBODY, NOBODY)}

"""Images as composefs: the EROFS built at pull time mounts (as root) and checks out to
exactly the files of the OCI image, compared with an independent merge of the layer tars."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import Daemon, run_cfsctl
from tests.ocitools import build_image, descriptor, require_tools
from tests.otheruser import NOBODY, as_nobody, other_user_marks
from tests.reference_rootfs import compare, flatten, merged_tree, scan


def _customize_v1(root: Path) -> None:
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-hardlink")
    os.symlink("tool", root / "usr/bin/sh")
    os.mkfifo(root / "usr/fifo")
    (root / "run/lock").mkdir(parents=True)
    (root / "run/lock/pid").write_text("1")
    (root / "opt/dir/sub").mkdir(parents=True)
    (root / "opt/dir/sub/f").write_text("x")
    os.setxattr(root / "usr/bin/tool", "security.capability", b"\x01\x00\x00\x02" + bytes(16))
    os.setxattr(root / "usr/bin/tool", "user.comment", b"dropped by the OCI transform")
    os.chmod(root / "usr/bin/tool", 0o4755)
    os.utime(root / "usr", (1_600_000_000, 1_600_000_000))


def _customize_v2(root: Path) -> None:
    shutil.rmtree(root / "opt/dir")
    (root / "opt/dir").mkdir()
    (root / "opt/dir/new").write_text("replaced")
    os.chmod(root / "etc", 0o700)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tools("umoci")
    path = tmp_path_factory.mktemp("ociimg") / "layout"
    build_image(path, "v1", {"usr/bin/tool": os.urandom(100_000), "etc/passwd": b"root:x:0:0\n",
                             "usr/lib/small": b"tiny file"}, customize=_customize_v1)
    build_image(path, "v2", {"usr/bin/tool2": os.urandom(5000)}, base="v1",
                remove=("etc/passwd",), customize=_customize_v2)
    return path


@pytest.fixture(scope="module")
def pulled(shared_daemon: Daemon, layout: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> str:
    repo = str(tmp_path_factory.mktemp("ocirepo") / "repo")
    run_cfsctl("--repo", repo, "init", "--insecure", address=shared_daemon.address)
    run_cfsctl("--repo", repo, "oci", "pull", f"oci:{layout}:v2", "img",
               address=shared_daemon.address)
    return repo


def reference(layout: Path) -> dict:
    return flatten(merged_tree(layout, descriptor(layout, "v2")["digest"]))


def test_checkout_matches_reference(shared_daemon: Daemon, pulled: str, layout: Path,
                                    tmp_path: Path) -> None:
    out = tmp_path / "co"
    run_cfsctl("--repo", pulled, "oci", "checkout", "img", str(out),
               address=shared_daemon.address)
    problems = compare(reference(layout), scan(out), owners=os.geteuid() == 0)
    assert not problems, problems
    assert os.getxattr(out / "usr/bin/tool", "security.capability")[:4] == b"\x01\x00\x00\x02"
    assert "user.comment" not in os.listxattr(out / "usr/bin/tool")


def test_checkout_to_another_filesystem(shared_daemon: Daemon, pulled: str,
                                        layout: Path) -> None:
    """A target on another filesystem (tmpfs) than the repository: no EXDEV, same files."""
    import shutil
    import tempfile
    base = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        assert os.stat(base).st_dev != os.stat(pulled).st_dev
        out = base / "co"
        run_cfsctl("--repo", pulled, "oci", "checkout", "img", str(out),
                   address=shared_daemon.address)
        problems = compare(reference(layout), scan(out), owners=os.geteuid() == 0)
        assert not problems, problems
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("mark", [pytest.param(0, marks=other_user_marks)])
def test_checkout_without_privileges(world: Path, open_daemon: Daemon, layout: Path,
                                     mark: int) -> None:
    """nobody checks out an image from a repository it may read: same files, its own."""
    repo = world / "shared-repo"
    run_cfsctl("--repo", str(repo), "init", "--insecure", address=open_daemon.address)
    run_cfsctl("--repo", str(repo), "oci", "pull", f"oci:{layout}:v2", "img",
               address=open_daemon.address)
    for p in [repo, *repo.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    home = world / "nobody-home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    out = home / "co"
    p = as_nobody(world, open_daemon, "--repo", str(repo), "oci", "checkout", "img", str(out))
    assert p.returncode == 0, p.stderr.decode()
    problems = compare(reference(layout), scan(out), owners=False)
    assert not problems, problems
    assert {os.lstat(x).st_uid for x in [out, *out.rglob("*")]} == {NOBODY}
    assert b"security.capability" in p.stderr  # a privileged xattr is reported as skipped


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_mount_matches_reference(shared_daemon: Daemon, pulled: str, layout: Path,
                                 tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = run_cfsctl("--repo", pulled, "oci", "mount", "img", str(mnt),
                   address=shared_daemon.address, check=False)
    if p.returncode != 0 and "mount failed" in p.stderr.decode():
        pytest.skip(f"kernel cannot mount composefs here: {p.stderr.decode().strip()}")
    assert p.returncode == 0, p.stderr.decode()
    try:
        problems = compare(reference(layout), scan(mnt))
        assert not problems, problems
        # the files really come from the repository objects
        assert (mnt / "usr/bin/tool").stat().st_size == 100_000
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_compute_id_and_dump(shared_daemon: Daemon, pulled: str) -> None:
    cfs = lambda *a: run_cfsctl("--repo", pulled, *a,  # noqa: E731
                                address=shared_daemon.address).stdout.decode()
    erofs = json.loads(cfs("oci", "inspect", "img"))["composefs_erofs"]
    assert cfs("oci", "compute-id", "img").strip() == erofs
    digest = json.loads(cfs("oci", "images", "--json"))["images"][0]["manifest_digest"]
    assert cfs("oci", "compute-id", f"@{digest}").strip() == erofs
    keep_user = cfs("oci", "compute-id", "--xattrs", "keep-user-xattrs", "img").strip()
    assert keep_user != erofs  # /usr/bin/tool has a user.* xattr
    dump = cfs("oci", "dump", "img")
    assert "/usr/bin/tool-hardlink 0 @120000" in dump or "@120000 - - - - 0.0 /usr/bin/tool" in dump
    assert "/run 0 40755" in dump and "/run/lock" not in dump
    assert "user.comment" not in dump


def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o700
            ti.mtime = 0
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_layer_dumpfile_golden(shared_daemon: Daemon, tmp_path: Path) -> None:
    """golden.md section 9: tar entries rendered as dumpfile lines."""
    repo = str(tmp_path / "repo")
    run_cfsctl("--repo", repo, "init", "--insecure", "--algorithm", "fsverity-sha256-12",
               address=shared_daemon.address)
    tar = _tar([("file0", b""), ("file4095", bytes(4095))])
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    run_cfsctl("--repo", repo, "oci", "import-layer", diff_id, address=shared_daemon.address,
               input=tar)
    out = run_cfsctl("--repo", repo, "oci", "layer", "--dumpfile", diff_id,
                     address=shared_daemon.address).stdout.decode()
    assert out == (
        "/file0 0 100700 1 0 0 0 0.0 - - -\n"
        "/file4095 4095 100700 1 0 0 0 0.0 53/72beb83c78537c8970c8361e3254119fafdf1763854ecd"
        "57d3f0fe2da7c719 - 5372beb83c78537c8970c8361e3254119fafdf1763854ecd57d3f0fe2da7c719\n")
    info = json.loads(run_cfsctl("--repo", repo, "oci", "layer", "--json", diff_id,
                                 address=shared_daemon.address).stdout)
    assert info["entryCount"] == 2 and info["size"] == len(tar)
    assert info["splitstream"] == {"externalObjects": 1, "externalSize": 4095,
                                   "inlineSize": len(tar) - 4095}

"""GC and fsck with real images: EROFS images stay alive through the config stream's named
refs, untagging frees everything, a damaged image is reported."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cfsd.core import fsverity
from tests.conftest import Daemon, run_cfsctl
from tests.ocitools import build_image, require_tools


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tools("umoci")
    path = tmp_path_factory.mktemp("gcimg") / "layout"
    build_image(path, "v1", {"usr/bin/a": os.urandom(50_000), "usr/bin/b": os.urandom(70_000),
                             "etc/x": b"tiny"})
    return path


def objects(repo: Path) -> set[str]:
    return {p.parent.name + p.name for p in repo.glob("objects/??/*")}


def test_images_survive_gc_until_untagged(shared_daemon: Daemon, layout: Path,
                                          tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cfs = lambda *a, **k: run_cfsctl("--repo", str(repo), *a,  # noqa: E731
                                     address=shared_daemon.address, **k)
    cfs("init", "--insecure")
    cfs("oci", "pull", f"oci:{layout}:v1", "img")
    inspect = json.loads(cfs("oci", "inspect", "img").stdout)
    erofs = inspect["composefs_erofs"]
    assert (repo / "images" / erofs).is_symlink()
    before = objects(repo)
    out = cfs("gc").stdout.decode()
    after = objects(repo)
    # Only the pre-EROFS config/manifest streams are garbage; the image and its files stay.
    assert erofs in after
    assert len(before - after) == int(out.split()[1])
    ids = cfs("image-objects", erofs).stdout.decode().split()
    assert len(ids) == 2 and all(i.startswith("sha512:") for i in ids)
    assert {i.split(":")[1] for i in ids} <= after
    assert "images: 1/1 ok" in cfs("fsck").stdout.decode()
    cfs("oci", "untag", "img")
    cfs("gc")
    assert objects(repo) == set()
    assert not list((repo / "images").iterdir())


def test_fsck_reports_damaged_image(shared_daemon: Daemon, layout: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cfs = lambda *a, **k: run_cfsctl("--repo", str(repo), *a,  # noqa: E731
                                     address=shared_daemon.address, **k)
    cfs("init", "--insecure")
    cfs("oci", "pull", f"oci:{layout}:v1", "img")
    erofs = json.loads(cfs("oci", "inspect", "img").stdout)["composefs_erofs"]
    image_obj = repo / "objects" / fsverity.object_path(bytes.fromhex(erofs))
    data = bytearray(image_obj.read_bytes())
    data[1024:1028] = b"\0\0\0\0"  # destroy the EROFS superblock magic
    image_obj.write_bytes(bytes(data))
    report = json.loads(cfs("fsck", "--json").stdout)
    assert not report["ok"]
    assert report["images_corrupted"] == 1
    assert any(e.startswith(f"fsck: image-invalid: images/{erofs}") for e in report["errors"])
    # The image is referenced from the config stream, so GC keeps it (it never needs to parse
    # an image that is not a root of its own).
    cfs("gc")
    assert image_obj.exists()


def test_oci_fsck_reports_a_damaged_manifest(shared_daemon: Daemon, layout: Path,
                                             tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cfs = lambda *a, **k: run_cfsctl("--repo", str(repo), *a,  # noqa: E731
                                     address=shared_daemon.address, **k)
    cfs("init", "--insecure")
    cfs("oci", "pull", f"oci:{layout}:v1", "img")
    ok = json.loads(cfs("oci", "fsck", "--json").stdout)
    assert ok["ok"] and ok["images_checked"] == 1
    digest = json.loads(cfs("oci", "images", "--json").stdout)["images"][0]["manifest_digest"]
    target = os.readlink(repo / "streams" / f"oci-manifest-{digest}")
    stream_obj = (repo / "streams" / target).resolve()
    from cfsd.core.splitstream import SplitStreamReader
    fd = os.open(stream_obj, os.O_RDONLY)
    with SplitStreamReader(fd, fsverity.SHA512) as r:
        manifest_obj = r.object_refs[0]
    mpath = repo / "objects" / fsverity.object_path(manifest_obj)
    mpath.write_bytes(mpath.read_bytes().replace(b"schemaVersion", b"schemaversion"))
    report = json.loads(cfs("oci", "fsck", "--json").stdout)
    assert not report["ok"] and report["images_corrupted"] == 1
    assert report["errors"][0].startswith("fsck: manifest-read-failed: img:")
    assert report["repo"]["objects_corrupted"] == 1
    p = cfs("oci", "fsck", check=False)
    assert p.returncode == 1 and "oci images: 0/1 ok" in p.stdout.decode()
    p = cfs("oci", "fsck", "nonexistent", check=False)
    assert p.returncode == 1 and "no such image" in p.stderr.decode()

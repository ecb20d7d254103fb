"""Pulling through the real daemon from real sources: oci:, oci-archive: (skopeo) and a real
docker-registry on loopback (anonymous, htpasswd basic auth, by digest, multi-arch)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, run_cfsctl
from tests.ocitools import (
    Registry,
    build_image,
    descriptor,
    make_multiarch,
    read_json_blob,
    require_tools,
    sh,
)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_tools()
    root = tmp_path_factory.mktemp("images")
    layout = root / "layout"
    build_image(layout, "v1", {"etc/hello.txt": b"hello\n", "usr/bin/big": os.urandom(300_000),
                               "usr/lib/small": b"x" * 10})
    build_image(layout, "v2", {"etc/new.txt": b"new\n", "usr/bin/big2": os.urandom(200_000)},
                base="v1", remove=("etc/hello.txt",))
    build_image(layout, "arm", {"usr/bin/armbin": os.urandom(1000)}, base="v1", arch="arm64")
    make_multiarch(layout, "multi", {"amd64": "v1", "arm64": "arm"})
    zlayout = root / "zlayout"
    sh("skopeo", "copy", "-q", "--dest-compress", "--dest-compress-format", "zstd",
       f"oci:{layout}:v1", f"oci:{zlayout}:v1")
    archive = root / "img.tar"
    sh("skopeo", "copy", "-q", f"oci:{layout}:v1", f"oci-archive:{archive}:v1")
    return {"root": root, "layout": layout, "zlayout": zlayout, "archive": archive}


@pytest.fixture(scope="module")
def registry(images: dict[str, Any]) -> Iterator[Registry]:
    r = Registry()
    r.push(f"oci:{images['layout']}:v1", "demo:v1")
    r.push(f"oci:{images['layout']}:v2", "demo:v2")
    r.push(f"oci:{images['zlayout']}:v1", "demo:zstd")
    r.push(f"oci:{images['layout']}:multi", "demo:multi", all_images=True)
    r.push(f"oci:{images['layout']}:v1", "demo:docker", docker_format=True)
    r.push(f"oci:{images['layout']}:multi", "demo:dockerlist", all_images=True,
           docker_format=True)
    yield r
    r.stop()


@pytest.fixture
def repo(shared_daemon: Daemon, tmp_path: Path) -> str:
    path = str(tmp_path / "repo")
    run_cfsctl("--repo", path, "init", "--insecure", address=shared_daemon.address)
    return path


def cfs(daemon: Daemon, repo: str, *args: str, check: bool = True) -> Any:
    return run_cfsctl("--repo", repo, *args, address=daemon.address, check=check)


def pull(daemon: Daemon, repo: str, src: str, *options: str,
         name: str | None = None) -> dict[str, Any]:
    out = cfs(daemon, repo, "--json", "oci", "pull", *options, src,
              *([name] if name else [])).stdout
    return json.loads(out)


def stream_ids(repo: str) -> dict[str, str]:
    """Every first-level stream name -> the object (verity) it points at."""
    streams = Path(repo, "streams")
    return {p.name: os.readlink(p).rsplit("/", 2)[-2] + os.readlink(p).rsplit("/", 1)[-1]
            for p in streams.iterdir() if p.is_symlink()}


def layers_hash_to_diff_ids(daemon: Daemon, repo: str, config: dict[str, Any]) -> None:
    for diff_id in config["rootfs"]["diff_ids"]:
        data = cfs(daemon, repo, "oci", "layer", diff_id).stdout
        assert "sha256:" + hashlib.sha256(data).hexdigest() == diff_id


def test_same_ids_from_every_transport(shared_daemon: Daemon, images: dict[str, Any],
                                       registry: Registry, tmp_path: Path) -> None:
    results = {}
    for name, src, extra in [
        ("oci", f"oci:{images['layout']}:v1", ()),
        ("archive", f"oci-archive:{images['archive']}:v1", ()),
        ("registry", f"docker://{registry.host}/demo:v1", ("--tls-verify=false",)),
    ]:
        repo = str(tmp_path / name)
        run_cfsctl("--repo", repo, "init", "--insecure", address=shared_daemon.address)
        completed = pull(shared_daemon, repo, src, *extra)
        results[name] = (completed, stream_ids(repo))
        config = json.loads(cfs(shared_daemon, repo, "oci", "inspect", "--config", src).stdout)
        layers_hash_to_diff_ids(shared_daemon, repo, config)
        assert cfs(shared_daemon, repo, "oci", "fsck").returncode == 0
    first = results["oci"]
    for name, other in results.items():
        assert other[0]["manifest_digest"] == first[0]["manifest_digest"], name
        assert other[0]["config_verity"] == first[0]["config_verity"], name
        assert other[1] == first[1], name  # manifest, config and layer stream ids


def test_registry_by_digest_and_tag_output(shared_daemon: Daemon, registry: Registry,
                                           images: dict[str, Any], repo: str) -> None:
    digest = descriptor(images["layout"], "v2")["digest"]
    src = f"docker://{registry.host}/demo@{digest}"
    out = cfs(shared_daemon, repo, "oci", "pull", "--tls-verify=false", src, "mytag").stdout
    lines = out.decode().splitlines()
    assert lines[0] == f"manifest {digest}"
    assert lines[1].startswith("config   sha256:")
    assert lines[3] == "tagged   mytag"
    assert lines[4].startswith("objects  ")
    table = cfs(shared_daemon, repo, "oci", "images").stdout.decode()
    assert "mytag" in table and digest[7:19] in table and "amd64" in table
    listing = json.loads(cfs(shared_daemon, repo, "oci", "images", "--json").stdout)
    assert listing["images"][0]["layer_count"] == 2
    manifest = cfs(shared_daemon, repo, "oci", "inspect", "--manifest", "mytag").stdout
    assert manifest.endswith(b"\n")            # the stored bytes, then one newline
    assert "sha256:" + hashlib.sha256(manifest[:-1]).hexdigest() == digest
    shown = json.loads(cfs(shared_daemon, repo, "oci", "inspect", f"@{digest}").stdout)
    # as upstream prints it: manifest and config as JSON strings, absent fields null
    assert shown["manifest"].encode() == manifest[:-1]
    assert isinstance(shown["config"], str) and json.loads(shown["config"])["os"] == "linux"
    assert shown["referrers"] == [] and shown["composefs_boot_erofs"] is None
    assert len(shown["composefs_erofs"]) in (64, 128)


def test_gzip_and_zstd_layers(shared_daemon: Daemon, registry: Registry, repo: str,
                              images: dict[str, Any]) -> None:
    zmanifest = read_json_blob(images["zlayout"], descriptor(images["zlayout"], "v1")["digest"])
    assert zmanifest["layers"][0]["mediaType"].endswith("+zstd")
    gz = pull(shared_daemon, repo, f"oci:{images['layout']}:v1")
    zs = pull(shared_daemon, repo, f"docker://{registry.host}/demo:zstd", "--tls-verify=false")
    assert gz["config_digest"] == zs["config_digest"]  # same diff_ids, other compression
    config = json.loads(cfs(shared_daemon, repo, "oci", "inspect", "--config",
                            f"docker://{registry.host}/demo:zstd").stdout)
    layers_hash_to_diff_ids(shared_daemon, repo, config)


def test_multiarch_index(shared_daemon: Daemon, registry: Registry, repo: str,
                         images: dict[str, Any]) -> None:
    src = f"docker://{registry.host}/demo:multi"
    host = pull(shared_daemon, repo, src, "--tls-verify=false", name="host")
    assert host["manifest_digest"] == descriptor(images["layout"], "v1")["digest"]
    arm = pull(shared_daemon, repo, src, "--tls-verify=false", "--platform", "linux/arm64",
               name="armimg")
    assert arm["manifest_digest"] == descriptor(images["layout"], "arm")["digest"]
    cfg = json.loads(cfs(shared_daemon, repo, "oci", "inspect", "--config", "armimg").stdout)
    assert cfg["architecture"] == "arm64"
    p = cfs(shared_daemon, repo, "oci", "pull", "--tls-verify=false", "--platform",
            "linux/s390x", src, check=False)
    assert p.returncode == 1 and "No manifest found for platform" in p.stderr.decode()
    layout_pull = pull(shared_daemon, repo, f"oci:{images['layout']}:multi", name="fromlayout")
    assert layout_pull["manifest_digest"] == host["manifest_digest"]


def test_basic_auth(shared_daemon: Daemon, images: dict[str, Any], repo: str,
                    tmp_path: Path) -> None:
    reg = Registry("alice", "s3cret")
    try:
        reg.push(f"oci:{images['layout']}:v1", "private:v1")
        src = f"docker://{reg.host}/private:v1"
        p = cfs(shared_daemon, repo, "oci", "pull", "--tls-verify=false", src, check=False)
        err = p.stderr.decode()
        assert p.returncode == 1 and err.count("\n") == 1, err
        assert f"registry {reg.host} requires credentials" in err, err
        for creds in ("alice:wrong", "bob:s3cret"):     # wrong password, unknown user
            p = cfs(shared_daemon, repo, "oci", "pull", "--tls-verify=false", "--creds", creds,
                    src, check=False)
            err = p.stderr.decode()
            assert p.returncode == 1 and err.count("\n") == 1, (creds, err)
            assert f"{reg.host}: access to private denied (401)" in err, (creds, err)
        assert not Path(repo, "streams/refs").exists()      # nothing pulled, nothing tagged
        assert pull(shared_daemon, repo, src, "--tls-verify=false", "--creds", "alice:s3cret")
        import base64
        authfile = tmp_path / "auth.json"
        authfile.write_text(json.dumps({"auths": {reg.host: {
            "auth": base64.b64encode(b"alice:s3cret").decode()}}}))
        out = pull(shared_daemon, repo, src, "--tls-verify=false", "--authfile", str(authfile),
                   name="again")
        assert out["manifest_digest"].startswith("sha256:")
    finally:
        reg.stop()


def test_tls_verification_is_on_by_default(shared_daemon: Daemon, registry: Registry,
                                           repo: str) -> None:
    p = cfs(shared_daemon, repo, "oci", "pull", f"docker://{registry.host}/demo:v1",
            check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1, err
    assert "SSL" in err and "--tls-verify=false" in err, err   # why, and what to do
    assert not Path(repo, "streams/refs").exists()


def test_concurrent_overlapping_pulls(shared_daemon: Daemon, registry: Registry, repo: str,
                                      images: dict[str, Any]) -> None:
    sources = [f"oci:{images['layout']}:v1", f"oci:{images['layout']}:v2",
               f"docker://{registry.host}/demo:v2", f"oci-archive:{images['archive']}:v1"]
    results: list[Any] = [None] * 4

    def run(i: int) -> None:
        extra = ("--tls-verify=false",) if sources[i].startswith("docker") else ()
        results[i] = cfs(shared_daemon, repo, "oci", "pull", *extra, sources[i], f"img{i}",
                         check=False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r.returncode == 0, r.stderr.decode()
    fsck = json.loads(cfs(shared_daemon, repo, "oci", "fsck", "--json").stdout)
    assert fsck["ok"] and fsck["images_checked"] == 4


def test_unsupported_transport_is_named(shared_daemon: Daemon, repo: str) -> None:
    for src in ("containers-storage:foo", "dir:/tmp/x", "docker-archive:/x.tar", "nonsense"):
        p = cfs(shared_daemon, repo, "oci", "pull", src, check=False)
        assert p.returncode == 1
        err = p.stderr.decode()
        assert "oci:" in err and "docker://" in err, err


def test_docker_schema2_and_manifest_list(shared_daemon: Daemon, registry: Registry,
                                          repo: str, images: dict[str, Any]) -> None:
    """Docker media types (manifest, manifest list, config, gzip layers) pull like OCI ones;
    the manifest is stored as the registry's raw bytes."""
    import httpx
    src = f"docker://{registry.host}/demo:docker"
    r = httpx.get(f"http://{registry.host}/v2/demo/manifests/docker",
                  headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    assert r.headers["content-type"] == "application/vnd.docker.distribution.manifest.v2+json"
    out = pull(shared_daemon, repo, src, "--tls-verify=false", name="docker")
    assert out["manifest_digest"] == "sha256:" + hashlib.sha256(r.content).hexdigest()
    stored = cfs(shared_daemon, repo, "oci", "inspect", "--manifest", "docker").stdout
    assert stored == r.content + b"\n"
    config = json.loads(cfs(shared_daemon, repo, "oci", "inspect", "--config", "docker").stdout)
    layers_hash_to_diff_ids(shared_daemon, repo, config)
    listed = pull(shared_daemon, repo, f"docker://{registry.host}/demo:dockerlist",
                  "--tls-verify=false", "--platform", "linux/arm64", name="dockerarm")
    cfg = json.loads(cfs(shared_daemon, repo, "oci", "inspect", "--config", "dockerarm").stdout)
    assert cfg["architecture"] == "arm64" and listed["manifest_digest"] != out["manifest_digest"]
    assert json.loads(cfs(shared_daemon, repo, "oci", "fsck", "--json").stdout)["ok"]

"""Every pull path verifies: tampered or oversized inputs give typed errors, create no tag
and leave the repository consistent; a daemon killed mid-pull leaves nothing half-visible."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, run_cfsctl
from tests.ocitools import (
    Registry,
    blob_path,
    build_image,
    descriptor,
    put_blob,
    read_json_blob,
    require_tools,
    retag,
)
from tests.varlink_raw import Raw, stream_frames


@pytest.fixture(scope="module")
def base_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tools()
    layout = tmp_path_factory.mktemp("verify") / "layout"
    build_image(layout, "v1", {"usr/bin/tool": os.urandom(200_000), "etc/conf": b"a=1\n"})
    return layout


def rewrite_manifest(layout: Path, change: Callable[[dict[str, Any]], None],
                     config_change: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Edit the v1 manifest (and config) keeping every digest consistent."""
    mdesc = descriptor(layout, "v1")
    manifest = read_json_blob(layout, mdesc["digest"])
    if config_change is not None:
        config = read_json_blob(layout, manifest["config"]["digest"])
        config_change(config)
        manifest["config"].update(put_blob(layout, json.dumps(config).encode()))
    change(manifest)
    retag(layout, "v1", {"mediaType": mdesc["mediaType"],
                         **put_blob(layout, json.dumps(manifest).encode())})


def tamper_layer_blob(layout: Path) -> None:
    manifest = read_json_blob(layout, descriptor(layout, "v1")["digest"])
    p = blob_path(layout, manifest["layers"][0]["digest"])
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x55
    p.write_bytes(bytes(data))


def truncate_layer_blob(layout: Path) -> None:
    manifest = read_json_blob(layout, descriptor(layout, "v1")["digest"])
    p = blob_path(layout, manifest["layers"][0]["digest"])
    p.write_bytes(p.read_bytes()[:-100])


def tamper_diff_id(layout: Path) -> None:
    def cfg(c: dict[str, Any]) -> None:
        c["rootfs"]["diff_ids"][0] = "sha256:" + "ab" * 32
    rewrite_manifest(layout, lambda m: None, cfg)


def wrong_manifest_digest(layout: Path) -> None:
    p = blob_path(layout, descriptor(layout, "v1")["digest"])
    p.write_bytes(p.read_bytes() + b" ")


def huge_manifest(layout: Path) -> None:
    mdesc = descriptor(layout, "v1")
    data = blob_path(layout, mdesc["digest"]).read_bytes()
    big = data[:-1] + b" " * (100 << 20) + data[-1:]
    retag(layout, "v1", {"mediaType": mdesc["mediaType"], **put_blob(layout, big)})


def unknown_media_type(layout: Path) -> None:
    rewrite_manifest(layout, lambda m: m.update(mediaType="application/vnd.example.thing+json"))


def layer_count_mismatch(layout: Path) -> None:
    rewrite_manifest(layout, lambda m: m["layers"].append(m["layers"][0]))


CASES = {
    "tampered-blob": (tamper_layer_blob, "InvalidDigest"),
    "truncated-blob": (truncate_layer_blob, "InvalidDigest"),
    "tampered-diff-id": (tamper_diff_id, "DiffIdMismatch"),
    "wrong-manifest-digest": (wrong_manifest_digest, "InvalidDigest"),
    "manifest-100MB": (huge_manifest, "InvalidData"),
    "unknown-media-type": (unknown_media_type, "InvalidData"),
    "layer-count-mismatch": (layer_count_mismatch, "InvalidData"),
}


def raw_pull(daemon: Daemon, repo: str, image: str, **extra: Any) -> list[dict[str, Any]]:
    return stream_frames(daemon.sock, repo, "org.composefs.Oci.Pull",
                         {"image": image, "local_fetch": "disabled", "bootable": False, **extra},
                         timeout=120)


def assert_clean(daemon: Daemon, repo: str) -> None:
    assert not Path(repo, "streams/refs").exists(), "a tag was created"
    fsck = json.loads(run_cfsctl("--repo", repo, "oci", "fsck", "--json",
                                 address=daemon.address).stdout)
    assert fsck["ok"], fsck


@pytest.mark.parametrize("case", list(CASES))
def test_bad_sources_are_refused(shared_daemon: Daemon, base_layout: Path, tmp_path: Path,
                                 case: str) -> None:
    layout = tmp_path / "layout"
    shutil.copytree(base_layout, layout)
    mutate, expected = CASES[case]
    mutate(layout)
    repo = str(tmp_path / "repo")
    run_cfsctl("--repo", repo, "init", "--insecure", address=shared_daemon.address)
    frames = raw_pull(shared_daemon, repo, f"oci:{layout}:v1")
    last = frames[-1]
    assert last.get("error") == f"org.composefs.Oci.{expected}", last
    assert not any("completed" in (f.get("parameters") or {}) for f in frames)
    assert_clean(shared_daemon, repo)
    p = run_cfsctl("--repo", repo, "oci", "pull", f"oci:{layout}:v1",
                   address=shared_daemon.address, check=False)
    errors = [x for x in p.stderr.decode().splitlines() if x.startswith("Error")]
    assert p.returncode == 1 and len(errors) == 1


def test_tampered_blob_in_registry(shared_daemon: Daemon, base_layout: Path,
                                   tmp_path: Path) -> None:
    reg = Registry()
    try:
        reg.push(f"oci:{base_layout}:v1", "t:v1")
        manifest = read_json_blob(base_layout, descriptor(base_layout, "v1")["digest"])
        hx = manifest["layers"][0]["digest"].split(":")[1]
        data = reg.dir / f"data/docker/registry/v2/blobs/sha256/{hx[:2]}/{hx}/data"
        raw = bytearray(data.read_bytes())
        raw[100] ^= 1
        data.write_bytes(bytes(raw))
        repo = str(tmp_path / "repo")
        run_cfsctl("--repo", repo, "init", "--insecure", address=shared_daemon.address)
        frames = raw_pull(shared_daemon, repo, f"docker://{reg.host}/t:v1", tls_verify=False)
        assert frames[-1]["error"] == "org.composefs.Oci.InvalidDigest", frames[-1]
        assert_clean(shared_daemon, repo)
    finally:
        reg.stop()


def test_pull_without_more_sends_one_reply(shared_daemon: Daemon, base_layout: Path,
                                           tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    run_cfsctl("--repo", repo, "init", "--insecure", address=shared_daemon.address)
    c = Raw(shared_daemon.sock)
    h = c.call("org.composefs.Repository.OpenRepository", {"path": repo})["parameters"]["handle"]
    r = c.call("org.composefs.Oci.Pull", {"handle": h, "image": f"oci:{base_layout}:v1",
                                          "local_fetch": "disabled", "bootable": False})
    assert set(r["parameters"]) == {"completed"} and "continues" not in r
    frames = raw_pull(shared_daemon, repo, f"oci:{base_layout}:v1", name="again")
    assert frames[-1]["parameters"]["completed"]["manifest_digest"] == (
        r["parameters"]["completed"]["manifest_digest"])
    for f in frames[:-1]:
        assert f["continues"] is True and len(f["parameters"]) == 1
    c.close()


def test_sigkill_mid_pull_then_pull_again(tmp_path: Path) -> None:
    require_tools()
    layout = tmp_path / "layout"
    build_image(layout, "big", {"usr/lib/blob1": os.urandom(60 << 20),
                                "usr/lib/blob2": os.urandom(40 << 20)})
    repo = str(tmp_path / "repo")
    d = Daemon(tmp_path)
    run_cfsctl("--repo", repo, "init", "--insecure", address=d.address)
    c = Raw(d.sock, timeout=120)
    h = c.call("org.composefs.Repository.OpenRepository", {"path": repo})["parameters"]["handle"]
    c.send("org.composefs.Oci.Pull", {"handle": h, "image": f"oci:{layout}:big",
                                       "local_fetch": "disabled", "bootable": False}, more=True)
    while True:
        f = c.recv()
        assert f is not None and "error" not in f, f
        if "progress" in f["parameters"]:
            break
    d.proc.send_signal(signal.SIGKILL)
    d.stop()
    c.close()
    assert not Path(repo, "streams/refs").exists()
    (tmp_path / "again").mkdir()
    d2 = Daemon(tmp_path / "again")
    try:
        run_cfsctl("--repo", repo, "oci", "pull", f"oci:{layout}:big", "big", address=d2.address)
        fsck = json.loads(run_cfsctl("--repo", repo, "oci", "fsck", "--json",
                                     address=d2.address).stdout)
        assert fsck["ok"] and fsck["images_checked"] == 1
        run_cfsctl("--repo", repo, "gc", address=d2.address)
        assert not [p for p in Path(repo, "objects").iterdir() if p.name.startswith(".")]
    finally:
        d2.stop()


def test_layer_tar_exact(shared_daemon: Daemon, base_layout: Path, tmp_path: Path) -> None:
    """`oci layer` writes exactly the uncompressed layer (gunzip of the blob)."""
    import gzip
    repo = str(tmp_path / "repo")
    run_cfsctl("--repo", repo, "init", "--insecure", address=shared_daemon.address)
    run_cfsctl("--repo", repo, "oci", "pull", f"oci:{base_layout}:v1", "x",
               address=shared_daemon.address)
    manifest = read_json_blob(base_layout, descriptor(base_layout, "v1")["digest"])
    blob = blob_path(base_layout, manifest["layers"][0]["digest"]).read_bytes()
    config = read_json_blob(base_layout, manifest["config"]["digest"])
    out = run_cfsctl("--repo", repo, "oci", "layer", config["rootfs"]["diff_ids"][0],
                     address=shared_daemon.address).stdout
    assert out == gzip.decompress(blob)
    assert "sha256:" + hashlib.sha256(out).hexdigest() == config["rootfs"]["diff_ids"][0]


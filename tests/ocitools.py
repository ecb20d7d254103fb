"""Real OCI tooling for tests: docker-registry on loopback, images built with umoci/skopeo."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

NEEDED = ("docker-registry", "skopeo", "umoci")


def require_tools(*tools: str) -> None:
    """Skip the test cleanly when an external tool is missing."""
    for t in tools or NEEDED:
        if shutil.which(t) is None:
            pytest.skip(f"{t} not installed")


def sh(*args: str, cwd: str | Path | None = None) -> str:
    p = subprocess.run(args, cwd=cwd, capture_output=True, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {p.stderr.decode()}")
    return p.stdout.decode()


class Registry:
    """docker-registry serving on 127.0.0.1 with a random port (optionally htpasswd auth)."""

    def __init__(self, user: str | None = None, password: str | None = None) -> None:
        require_tools("docker-registry")
        self.user, self.password = user, password
        self.dir = Path(tempfile.mkdtemp(prefix="cfsd-registry-"))
        (self.dir / "data").mkdir()
        (self.dir / "config.yml").write_text(
            "version: 0.1\nlog: {level: info, accesslog: {disabled: true}}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.dir / 'data'}}}, "
            "delete: {enabled: true}}\n"
            "http: {addr: 127.0.0.1:0}\n" + self.auth_config())
        self.log = open(self.dir / "registry.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.dir / "config.yml")],
                                     stderr=self.log, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        port = None
        while time.monotonic() < deadline and port is None:
            m = re.search(rb"listening on 127\.0\.0\.1:(\d+)",
                          (self.dir / "registry.log").read_bytes())
            if m:
                port = int(m.group(1))
            else:
                time.sleep(0.01)
        if port is None:
            self._fail("did not report its port")
        self.host = f"127.0.0.1:{port}"
        self.creds = f"{user}:{password}" if user else None
        ready, last = False, "no answer"
        while not ready and time.monotonic() < deadline and self.proc.poll() is None:
            try:
                status = httpx.get(f"http://{self.host}/v2/").status_code
                ready = status in (200, 401)
                last = f"HTTP {status}"
            except httpx.TransportError as e:
                last = repr(e)
            if not ready:
                time.sleep(0.01)
        if not ready:
            self._fail(f"is not serving /v2/ on {self.host} ({last})")

    def _fail(self, what: str) -> None:
        """Stop the registry and fail with its log."""
        log = (self.dir / "registry.log").read_text(errors="replace")
        code = self.proc.poll()
        self.stop()
        raise AssertionError(f"docker-registry {what} (exit status {code}): {log}")

    def auth_config(self) -> str:
        """The ``auth:`` section of the registry configuration (htpasswd with a user)."""
        if self.user is None:
            return ""
        import bcrypt
        assert self.password is not None
        hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
        (self.dir / "htpasswd").write_text(f"{self.user}:{hashed}\n")
        return f"auth: {{htpasswd: {{realm: cfsd-test, path: {self.dir / 'htpasswd'}}}}}\n"

    def push(self, src: str, name: str, all_images: bool = False,
             docker_format: bool = False) -> str:
        """skopeo copy *src* to this registry as *name*; returns the docker:// reference.

        *docker_format* converts to Docker schema 2 (manifest list for indexes).
        """
        dest = f"docker://{self.host}/{name}"
        args = ["skopeo", "copy", "-q", "--dest-tls-verify=false"]
        if docker_format:
            args += ["--format", "v2s2"]
        if self.creds:
            args += ["--dest-creds", self.creds]
        if all_images:
            args.append("--all")
        sh(*args, src, dest)
        return dest

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def build_image(layout: Path, tag: str, files: dict[str, bytes], base: str | None = None,
                arch: str | None = None, remove: tuple[str, ...] = (),
                customize: Callable[[Path], None] | None = None) -> None:
    """An image in an OCI layout with umoci: *base* tag (or empty) plus one layer.

    *customize* gets the rootfs directory to add links, special files, xattrs...
    """
    require_tools("umoci")
    if not (layout / "index.json").exists():
        sh("umoci", "init", "--layout", str(layout))
    work = Path(tempfile.mkdtemp(prefix="cfsd-bundle-"))
    bundle = work / "bundle"
    if base is None:
        sh("umoci", "new", "--image", f"{layout}:{tag}")
        sh("umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle))
    else:
        sh("umoci", "unpack", "--image", f"{layout}:{base}", str(bundle))
    root = bundle / "rootfs"
    (root / "usr").mkdir(exist_ok=True)
    for name in remove:
        p = root / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    if customize is not None:
        customize(root)
    sh("umoci", "repack", "--image", f"{layout}:{tag}", str(bundle))
    if arch is not None:
        sh("umoci", "config", "--image", f"{layout}:{tag}", "--architecture", arch)
    sh("umoci", "gc", "--layout", str(layout))
    shutil.rmtree(work)


def layout_index(layout: Path) -> dict[str, Any]:
    return json.loads((layout / "index.json").read_text())


def descriptor(layout: Path, tag: str) -> dict[str, Any]:
    for d in layout_index(layout)["manifests"]:
        if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return d
    raise KeyError(tag)


def blob_path(layout: Path, digest: str) -> Path:
    alg, hx = digest.split(":")
    return layout / "blobs" / alg / hx


def read_json_blob(layout: Path, digest: str) -> dict[str, Any]:
    return json.loads(blob_path(layout, digest).read_bytes())


def put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_path(layout, digest).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def retag(layout: Path, tag: str, desc: dict[str, Any]) -> None:
    """Point *tag* in index.json at *desc* (replacing an existing entry)."""
    idx = layout_index(layout)
    idx["manifests"] = [d for d in idx["manifests"] if d.get("annotations", {}).get(
        "org.opencontainers.image.ref.name") != tag]
    d = dict(desc)
    d["annotations"] = {"org.opencontainers.image.ref.name": tag}
    idx["manifests"].append(d)
    (layout / "index.json").write_text(json.dumps(idx))


def make_multiarch(layout: Path, tag: str, tags_by_arch: dict[str, str]) -> str:
    """An image index over existing tags, one entry per architecture; returns its digest."""
    entries = []
    for arch, t in tags_by_arch.items():
        d = descriptor(layout, t)
        entries.append({"mediaType": d["mediaType"], "digest": d["digest"], "size": d["size"],
                        "platform": {"architecture": arch, "os": "linux"}})
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": entries}
    desc = put_blob(layout, json.dumps(index).encode())
    retag(layout, tag, {"mediaType": index["mediaType"], **desc})
    return desc["digest"]

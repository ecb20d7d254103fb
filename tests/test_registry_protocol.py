"""The registry client against a real docker-registry using bearer tokens, and behind a
proxy that injects 503s, cross-origin redirects and a dropped blob download."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, run_cfsctl
from tests.ocitools import Registry, build_image, require_tools
from tests.registry_auth import FaultProxy, TokenRegistry, TokenService


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tools()
    path = tmp_path_factory.mktemp("proto") / "layout"
    build_image(path, "v1", {"usr/bin/x": os.urandom(400_000), "etc/y": b"y"})
    return path


@pytest.fixture(scope="module")
def token_registry(layout: Path) -> Iterator[TokenRegistry]:
    tokens = TokenService("bob", "hunter2")
    reg = TokenRegistry(tokens)
    reg.push(f"oci:{layout}:v1", "secure/img:v1")
    yield reg
    reg.stop()
    tokens.stop()


def pull(daemon: Daemon, repo: str, *args: str, check: bool = True):  # noqa: ANN201
    return run_cfsctl("--repo", repo, "oci", "pull", "--tls-verify=false", *args,
                      address=daemon.address, check=check)


@pytest.fixture
def repo(shared_daemon: Daemon, tmp_path: Path) -> str:
    path = str(tmp_path / "repo")
    run_cfsctl("--repo", path, "init", "--insecure", address=shared_daemon.address)
    return path


def test_bearer_token_flow(shared_daemon: Daemon, token_registry: TokenRegistry,
                           repo: str) -> None:
    src = f"docker://{token_registry.host}/secure/img:v1"
    before = len(token_registry.tokens.requests)
    p = pull(shared_daemon, repo, src, check=False)   # anonymous token: no pull rights
    assert p.returncode == 1 and "denied" in p.stderr.decode()
    pull(shared_daemon, repo, "--creds", "bob:hunter2", src)
    reqs = token_registry.tokens.requests[before:]
    assert any(r["authenticated"] and "repository:secure/img:pull" in r["scope"]
               for r in reqs), reqs
    p = pull(shared_daemon, repo, "--creds", "bob:wrong", src, check=False)
    assert p.returncode == 1 and "rejected" in p.stderr.decode()


def test_retries_redirects_and_resume(shared_daemon: Daemon, layout: Path, repo: str) -> None:
    reg = Registry()
    proxy = FaultProxy(reg.host)
    try:
        reg.push(f"oci:{layout}:v1", "img:v1")
        out = json.loads(run_cfsctl("--repo", repo, "--json", "oci", "pull",
                                    "--tls-verify=false", f"docker://{proxy.host}/img:v1",
                                    address=shared_daemon.address).stdout)
        assert out["manifest_digest"].startswith("sha256:")
        log = "\n".join(proxy.log)
        assert proxy.seen >= {"manifest503", "blob503", "cut"}, log
        assert "/direct/" in log                       # the redirect was followed
        assert any("bytes=" in line for line in proxy.log), log  # the cut download resumed
        fsck = json.loads(run_cfsctl("--repo", repo, "oci", "fsck", "--json",
                                     address=shared_daemon.address).stdout)
        assert fsck["ok"]
    finally:
        proxy.stop()
        reg.stop()

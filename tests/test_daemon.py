"""The daemon on real sockets: bound, socket-activated, introspection, shutdown, handles."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon, run_cfsctl, wait_for_socket
from tests.varlink_raw import Raw

INTERFACES = ["org.varlink.service", "org.composefs.Oci", "org.composefs.Repository"]


def varlink_cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "varlink.cli", *args], capture_output=True,
                         timeout=60, check=True)
    return out.stdout.decode()


def test_bound_socket_info(daemon: Daemon) -> None:
    out = varlink_cli("info", daemon.address)
    for iface in INTERFACES:
        assert iface in out
    assert "Product: cfsd" in out
    desc = varlink_cli("help", f"{daemon.address}/org.composefs.Repository")
    assert desc.strip() == Path("interfaces/org.composefs.Repository.varlink").read_text().strip()
    assert oct(os.stat(daemon.sock).st_mode & 0o777) == ("0o660" if os.geteuid() == 0
                                                          else "0o600")


def test_sigterm_shuts_down_cleanly_with_idle_client(daemon: Daemon) -> None:
    idle = Raw(daemon.sock)
    # exit status 0: it exited on SIGTERM itself (stop() kills it, -9, if it does not)
    assert daemon.stop() == 0
    assert not os.path.exists(daemon.sock)
    idle.close()
    log = daemon.log.read_text().splitlines()
    # stderr is a file here, not journald's stream: plain "name: message" lines
    assert log[0] == f"cfsd: listening on {daemon.address}"
    assert log[-1] == "cfsd: stopped"
    assert not [line for line in log if line.startswith("<")], log


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed")
@pytest.mark.parametrize("nsock", [1, 2])
def test_socket_activation(tmp_path: Path, nsock: int) -> None:
    socks = [str(tmp_path / f"s{i}.sock") for i in range(nsock)]
    cmd = ["systemd-socket-activate"]
    for s in socks:
        cmd += ["-l", s]
    if nsock > 1:
        cmd += ["--fdname=" + ":".join(f"n{i}" for i in range(nsock))]
    cmd += [sys.executable, "-m", "cfsd"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        for s in socks:
            wait_for_socket(s, proc)
            out = varlink_cli("info", f"unix:{s}")
            for iface in INTERFACES:
                assert iface in out
        repo = str(tmp_path / "repo")
        run_cfsctl("--repo", repo, "init", "--insecure", address=f"unix:{socks[-1]}")
        assert "status: ok" in run_cfsctl("--repo", repo, "fsck",
                                          address=f"unix:{socks[0]}").stdout.decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert proc.returncode == 0


def test_embedded_daemon_needs_nothing_running(tmp_path: Path) -> None:
    repo = str(tmp_path / "r")
    out = run_cfsctl("--repo", repo, "init", "--insecure").stdout.decode()
    assert out.startswith(f"Initialized composefs repository at {repo}\n")
    assert "fsverity-sha512-12" in out
    assert "status: ok" in run_cfsctl("--repo", repo, "fsck").stdout.decode()


def test_handles_outlive_their_connection(daemon: Daemon, tmp_path: Path) -> None:
    repo = str(tmp_path / "r")
    run_cfsctl("--repo", repo, "init", "--insecure", address=daemon.address)
    a = Raw(daemon.sock)
    h = a.call("org.composefs.Repository.OpenRepository", {"path": repo})["parameters"]["handle"]
    a.close()
    b = Raw(daemon.sock)
    # Same user, another connection, after the first closed: the handle works.
    assert "error" not in b.call("org.composefs.Repository.Fsck", {"handle": h})
    h2 = b.call("org.composefs.Repository.OpenRepository", {"path": repo})["parameters"]
    assert h2["handle"] > h and h2["hash_algorithm"] == "sha512"
    assert b.call("org.composefs.Repository.CloseRepository", {"handle": h2["handle"]}) == {
        "parameters": {}}
    assert b.call("org.composefs.Repository.CloseRepository", {"handle": h2["handle"]}) == {
        "error": "org.composefs.Repository.InvalidHandle", "parameters": {"handle": h2["handle"]}}
    assert "error" not in b.call("org.composefs.Repository.Fsck", {"handle": h})
    r = b.call("org.composefs.Oci.ListImages", {"handle": 999})
    assert r["error"] == "org.composefs.Oci.InvalidHandle"
    b.close()


def test_one_call_per_connection_with_varlink_cli(daemon: Daemon, tmp_path: Path) -> None:
    """composefs-rs's documented workflow with `python -m varlink.cli call`: OpenRepository,
    then Fsck, ListImages and a Pull with the returned handle, each its own process."""
    from tests.ocitools import build_image
    layout = tmp_path / "layout"
    build_image(layout, "v1", {"usr/bin/a": os.urandom(2000)})
    repo = str(tmp_path / "r")
    run_cfsctl("--repo", repo, "init", "--insecure", address=daemon.address)

    def cli(method: str, params: dict) -> dict:
        p = subprocess.run([sys.executable, "-m", "varlink.cli", "call",
                            f"{daemon.address}/{method}", json.dumps(params)],
                           capture_output=True, timeout=120)
        assert p.returncode == 0, p.stderr.decode()
        return json.loads(p.stdout or b"{}")

    h = cli("org.composefs.Repository.OpenRepository", {"path": repo})["handle"]
    assert cli("org.composefs.Repository.Fsck", {"handle": h})["ok"]
    done = cli("org.composefs.Oci.Pull", {"handle": h, "image": f"oci:{layout}:v1",
                                          "name": "img", "local_fetch": "disabled",
                                          "bootable": False})
    assert done["completed"]["manifest_digest"].startswith("sha256:")
    names = [i["name"] for i in cli("org.composefs.Oci.ListImages", {"handle": h})["images"]]
    assert names == ["img"]
    cli("org.composefs.Repository.CloseRepository", {"handle": h})


def test_handle_idle_expiry_and_per_uid_cap(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "--handle-idle", "1", "--handles-per-uid", "3")
    try:
        repo = str(tmp_path / "r")
        run_cfsctl("--repo", repo, "init", "--insecure", address=d.address)
        c = Raw(d.sock)

        def open_() -> int:
            return c.call("org.composefs.Repository.OpenRepository",
                          {"path": repo})["parameters"]["handle"]

        def ok(h: int) -> bool:
            return "error" not in c.call("org.composefs.Repository.Fsck", {"handle": h})

        first = [open_() for _ in range(3)]
        assert all(ok(h) for h in first)
        fourth = open_()                  # over the cap: the longest idle (first[0]) goes
        assert not ok(first[0]) and ok(first[1]) and ok(fourth)
        time.sleep(0.6)
        assert ok(fourth)                 # used: stays
        time.sleep(0.6)
        assert ok(fourth)
        time.sleep(2.5)                   # idle: released
        assert not ok(fourth) and not ok(first[1])
        c.close()
    finally:
        d.stop()


def test_open_repository_selectors(daemon: Daemon) -> None:
    c = Raw(daemon.sock)
    for params in ({}, {"path": "/x", "system": True}, {"user": True, "system": True}):
        r = c.call("org.composefs.Repository.OpenRepository", params)
        assert r["error"] == "org.composefs.Repository.InvalidSpec"
    r = c.call("org.composefs.Repository.OpenRepository", {"path": "/nonexistent/repo"})
    assert r["error"] == "org.composefs.Repository.RepoNotFound"
    c.close()


def test_init_idempotent_and_conflicts(daemon: Daemon, tmp_path: Path) -> None:
    c = Raw(daemon.sock)
    p = str(tmp_path / "a/b/repo")
    init = "org.composefs.Repository.InitRepository"
    # no fs-verity on this filesystem: refused unless insecure is asked for, nothing written
    r = c.call(init, {"path": p})
    assert r["error"] == "org.composefs.Repository.InvalidSpec", r
    assert "--insecure" in r["parameters"]["message"]
    assert not Path(p, "meta.json").exists()
    assert c.call(init, {"path": p, "insecure": True})["parameters"]["created"] is True
    assert oct(os.stat(p).st_mode & 0o777) == "0o700"
    assert c.call(init, {"path": p, "insecure": True})["parameters"]["created"] is False
    meta = Path(p, "meta.json").read_bytes()
    r = c.call(init, {"path": p, "algorithm": "fsverity-sha256-12", "insecure": True})
    assert r["error"] == "org.composefs.Repository.InternalError"
    assert "different configuration" in r["parameters"]["message"]
    assert Path(p, "meta.json").read_bytes() == meta
    r = c.call(init, {"path": p, "algorithm": "sha1"})
    assert r["error"] == "org.composefs.Repository.InvalidSpec"
    r = c.call("org.composefs.Repository.EnsureRepository", {"path": p})
    assert r == {"parameters": {"status": "Opened"}}
    r = c.call("org.composefs.Repository.EnsureRepository", {"path": str(tmp_path / "new")})
    assert r["error"] == "org.composefs.Repository.InvalidSpec", r
    r = c.call("org.composefs.Repository.EnsureRepository", {"path": str(tmp_path / "new"),
                                                             "insecure": True})
    assert r == {"parameters": {"status": "Created"}}
    c.close()


def test_concurrent_clients(daemon: Daemon, tmp_path: Path) -> None:
    repo = str(tmp_path / "r")
    run_cfsctl("--repo", repo, "init", "--insecure", address=daemon.address)
    errors: list[str] = []
    done: list[int] = []

    def worker(i: int) -> None:
        try:
            c = Raw(daemon.sock)
            h = c.call("org.composefs.Repository.OpenRepository", {"path": repo})
            assert h is not None and "parameters" in h, h
            for _ in range(50):
                r = c.call("org.composefs.Repository.Fsck",
                           {"handle": h["parameters"]["handle"], "metadata_only": True})
                if r is None or "error" in r:
                    errors.append(f"worker {i}: {r}")
            c.close()
            done.append(i)
        except BaseException as e:  # noqa: BLE001 - a dying thread must fail the test
            errors.append(f"worker {i}: {e!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not [t for t in threads if t.is_alive()], "a worker is stuck"
    assert not errors
    assert sorted(done) == list(range(8))


def test_varlink_pull_without_name_does_not_tag(daemon: Daemon, tmp_path: Path) -> None:
    """As composefs-rs: a varlink Pull without `name` stores the image untagged (cfsctl
    tags with the reference itself)."""
    from tests.ocitools import build_image
    from tests.varlink_raw import stream_frames
    layout = tmp_path / "layout"
    build_image(layout, "v1", {"usr/bin/a": os.urandom(2000)})
    repo = str(tmp_path / "r")
    run_cfsctl("--repo", repo, "init", "--insecure", address=daemon.address)
    frames = stream_frames(daemon.sock, repo, "org.composefs.Oci.Pull",
                           {"image": f"oci:{layout}:v1", "local_fetch": "disabled",
                            "bootable": False})
    digest = frames[-1]["parameters"]["completed"]["manifest_digest"]
    c = Raw(daemon.sock)
    h = c.call("org.composefs.Repository.OpenRepository", {"path": repo})["parameters"]["handle"]
    assert c.call("org.composefs.Oci.ListImages", {"handle": h})["parameters"]["images"] == []
    assert "error" not in c.call("org.composefs.Oci.Inspect", {"handle": h, "image": "@" + digest})
    c.close()
    run_cfsctl("--repo", repo, "oci", "pull", f"oci:{layout}:v1", address=daemon.address)
    out = run_cfsctl("--repo", repo, "oci", "images", address=daemon.address).stdout.decode()
    assert f"oci:{layout}:v1" in out

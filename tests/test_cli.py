"""cfsctl output formats and exit codes (upstream cfsctl's), through a running daemon."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Daemon, run_cfsctl


def out(*args: str, daemon: Daemon, **kw: object) -> str:
    return run_cfsctl(*args, address=daemon.address, **kw).stdout.decode()  # type: ignore[arg-type]


def test_init_messages(shared_daemon: Daemon, tmp_path: Path) -> None:
    repo = str(tmp_path / "r")
    text = out("init", repo, "--insecure", daemon=shared_daemon)
    assert text == (f"Initialized composefs repository at {repo}\n"
                    "  algorithm: fsverity-sha512-12\n  verity:    not required (insecure)\n")
    assert out("--repo", repo, "init", "--insecure", daemon=shared_daemon) == (
        f"Repository already initialized at {repo}\n")
    meta = json.loads(Path(repo, "meta.json").read_text())
    assert meta == {"version": 1, "algorithm": "fsverity-sha512-12",
                    "features": {"compatible": [], "read-only-compatible": ["v1_erofs"],
                                 "incompatible": []}, "erofs_formats": {"default": 1}}
    p = run_cfsctl("init", "--insecure", repo, "--algorithm", "fsverity-sha256-12",
                   address=shared_daemon.address, check=False)
    assert p.returncode == 1
    assert "already initialized with different configuration" in p.stderr.decode()
    assert out("init", "--insecure", "--ensure", repo, daemon=shared_daemon) == (
        f"Repository already initialized at {repo} (existing configuration preserved)\n")


def test_init_erofs_v2_and_reset(shared_daemon: Daemon, tmp_path: Path) -> None:
    repo = str(tmp_path / "r2")
    out("init", "--insecure", repo, "--erofs-version", "2", daemon=shared_daemon)
    meta = json.loads(Path(repo, "meta.json").read_text())
    assert meta["erofs_formats"] == {"default": 2}
    assert meta["features"]["read-only-compatible"] == []
    p = run_cfsctl("init", "--insecure", repo, address=shared_daemon.address, check=False)
    assert p.returncode == 1  # V1 default conflicts with the V2 repository
    Path(repo, "streams").mkdir()
    out("init", "--insecure", repo, "--reset-metadata", "--algorithm", "fsverity-sha256-12",
        daemon=shared_daemon)
    assert not Path(repo, "streams").exists()
    assert json.loads(Path(repo, "meta.json").read_text())["algorithm"] == "fsverity-sha256-12"


def test_empty_repository_reports(shared_daemon: Daemon, tmp_path: Path) -> None:
    repo = str(tmp_path / "r")
    out("init", "--insecure", repo, daemon=shared_daemon)
    assert out("--repo", repo, "gc", daemon=shared_daemon) == "Objects: 0 removed (0 bytes)\n"
    assert out("--repo", repo, "images", daemon=shared_daemon) == "No images found\n"
    assert json.loads(out("--repo", repo, "images", "--json", daemon=shared_daemon)) == {
        "images": []}
    assert out("--repo", repo, "fsck", daemon=shared_daemon) == (
        "meta.json: ok\nobjects: 0/0 ok\nstreams: 0/0 ok\nimages: 0/0 ok\nstatus: ok\n")
    fsck = json.loads(out("--repo", repo, "fsck", "--json", daemon=shared_daemon))
    assert fsck["ok"] is True and fsck["objects_checked"] == 0 and fsck["errors"] == []


def test_fsck_detects_corruption(shared_daemon: Daemon, tmp_path: Path) -> None:
    repo = tmp_path / "r"
    out("init", "--insecure", str(repo), daemon=shared_daemon)
    data = os.urandom(10_000)
    import hashlib
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("f")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    tar = buf.getvalue()
    out("--repo", str(repo), "oci", "import-layer", "sha256:" + hashlib.sha256(tar).hexdigest(),
        daemon=shared_daemon, input=tar)
    obj = next(p for p in repo.glob("objects/??/*") if p.stat().st_size == 10_000)
    obj.write_bytes(b"corrupt" + data[7:])
    fsck = json.loads(out("--repo", str(repo), "fsck", "--json", daemon=shared_daemon))
    assert fsck["ok"] is False and fsck["objects_corrupted"] == 1
    assert fsck["errors"][0].startswith(f"fsck: object-digest-mismatch: objects/{obj.parent.name}")
    p = run_cfsctl("--repo", str(repo), "fsck", address=shared_daemon.address, check=False)
    assert p.returncode == 1
    assert "status: 1 error(s)" in p.stdout.decode()


def test_hash_option(shared_daemon: Daemon, tmp_path: Path) -> None:
    repo = str(tmp_path / "r")
    out("init", "--insecure", repo, daemon=shared_daemon)
    out("--hash", "sha512", "--repo", repo, "gc", daemon=shared_daemon)
    p = run_cfsctl("--hash", "sha256", "--repo", repo, "gc", address=shared_daemon.address,
                   check=False)
    assert p.returncode == 1
    assert "configured for sha512 (from meta.json) but --hash sha256" in p.stderr.decode()


def test_errors_and_usage(shared_daemon: Daemon, tmp_path: Path) -> None:
    p = run_cfsctl("--repo", str(tmp_path / "none"), "gc", address=shared_daemon.address,
                   check=False)
    assert p.returncode == 1 and p.stderr.decode().count("\n") == 1
    assert p.stderr.decode() == (f"Error: repository {tmp_path / 'none'} does not exist "
                                 f"(create it with: cfsctl --repo {tmp_path / 'none'} init)\n")
    p = run_cfsctl("--repo", str(tmp_path), "gc", address=shared_daemon.address, check=False)
    assert p.returncode == 1 and "not a composefs repository" in p.stderr.decode()
    p = run_cfsctl("frobnicate", address=shared_daemon.address, check=False)
    assert p.returncode == 2
    p = run_cfsctl("--repo", "x", "--user", "gc", address=shared_daemon.address, check=False)
    assert p.returncode == 2
    p = run_cfsctl("gc", address="unix:/nonexistent/sock", check=False)
    assert p.returncode == 1 and "cannot connect to cfsd" in p.stderr.decode()
    assert p.stderr.decode().startswith("Error: cannot connect to cfsd at unix:/nonexistent/sock")
    # global options after the command mean what they mean before it
    p = run_cfsctl("gc", "--repo", "x", "--user", address=shared_daemon.address, check=False)
    assert p.returncode == 2


def test_embedded_daemon_is_private(tmp_path: Path) -> None:
    """Without an address and with no daemon listening, cfsctl starts its own."""
    repo = str(tmp_path / "r")
    assert run_cfsctl("--repo", repo, "init", "--insecure").returncode == 0
    assert run_cfsctl("--repo", repo, "gc").stdout.decode() == "Objects: 0 removed (0 bytes)\n"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("kind", ["system", "user"])
def test_systemd_units_verify(tmp_path: Path, kind: str) -> None:
    """The units as `cfsd install-units` writes them pass systemd-analyze verify, and start
    the cfsd of this installation."""
    cfsd = Path(sys.prefix) / "bin" / "cfsd"
    assert cfsd.exists(), "the cfsd console script is installed by .ci/run"
    p = subprocess.run([str(cfsd), "install-units", "--dest", str(tmp_path),
                        *(["--user"] if kind == "user" else [])], capture_output=True)
    assert p.returncode == 0, p.stderr
    service = (tmp_path / "cfsd.service").read_text()
    assert f"ExecStart={cfsd}\n" in service and "@CFSD@" not in service
    if kind == "system":
        assert (tmp_path / "sysusers.d" / "cfsd.conf").read_text() == "g composefs - -\n"
        assert "/var/lib/composefs" in (tmp_path / "tmpfiles.d" / "cfsd.conf").read_text()
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    cmd = ["systemd-analyze", "verify", "--man=no"] + (["--user"] if kind == "user" else [])
    p = subprocess.run([*cmd, str(tmp_path / "cfsd.socket"), str(tmp_path / "cfsd.service")],
                       capture_output=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr.decode()

"""Every kind of activation: a pre-connected socket per connection (systemd Accept=yes,
varlinkctl exec:), standard input as the connection (inetd style), and a listening daemon
that exits when idle."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import run_cfsctl, wait_for_socket
from tests.ocitools import build_image


def _get_info(sock: socket.socket) -> dict:
    sock.sendall(b'{"method":"org.varlink.service.GetInfo"}\0')
    buf = b""
    while b"\0" not in buf:
        data = sock.recv(65536)
        assert data, "connection closed"
        buf += data
    return json.loads(buf[:buf.index(b"\0")])


def test_accept_yes_serves_each_connection(tmp_path: Path) -> None:
    """systemd-socket-activate --accept: one cfsd per connection, on a connected fd 3;
    cfsctl's whole session (open, pull, list) goes through it."""
    sock = tmp_path / "accept.sock"
    act = subprocess.Popen(["systemd-socket-activate", "--accept", "-l", str(sock),
                            sys.executable, "-m", "cfsd"], cwd="/",
                           stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(str(sock), act)
        layout = tmp_path / "layout"
        build_image(layout, "v1", {"usr/bin/a": os.urandom(3000), "etc/b": b"b"})
        repo = str(tmp_path / "repo")
        address = f"unix:{sock}"
        run_cfsctl("--repo", repo, "init", "--insecure", address=address)
        run_cfsctl("--repo", repo, "oci", "pull", f"oci:{layout}:v1", "img", address=address)
        out = run_cfsctl("--repo", repo, "oci", "images", address=address).stdout
        assert b"img" in out
        assert run_cfsctl("--repo", repo, "fsck", address=address).returncode == 0
    finally:
        act.terminate()
        act.wait(10)


def test_stdin_is_the_connection() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen([sys.executable, "-m", "cfsd"], stdin=theirs, cwd="/",
                            stderr=subprocess.PIPE)
    theirs.close()
    try:
        ours.settimeout(30)
        assert _get_info(ours)["parameters"]["product"] == "cfsd"
    finally:
        ours.close()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_exit_idle(tmp_path: Path) -> None:
    sock = tmp_path / "idle.sock"
    proc = subprocess.Popen([sys.executable, "-m", "cfsd", "--address", f"unix:{sock}",
                             "--exit-idle", "1"], cwd="/", stderr=subprocess.PIPE)
    wait_for_socket(str(sock), proc)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(sock))
    c.settimeout(10)
    time.sleep(1.5)                  # an open connection keeps it running
    assert proc.poll() is None
    assert _get_info(c)["parameters"]["product"] == "cfsd"
    c.close()
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0 and b"no connections for 1 s: exiting" in err, err
    assert not sock.exists()

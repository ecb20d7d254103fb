"""Hostile clients against a root daemon: each attack comes from an unprivileged caller
(nobody); afterwards the daemon serves another client within a second, its descriptors and
memory are back within bounds, the repository is unchanged and the caller got a typed error.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import hashlib
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import termios
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, tree_listing
from tests.otheruser import NOBODY, as_nobody, other_user_marks, run_as

pytestmark = other_user_marks
MIB = 1 << 20


def fd_count(d: Daemon) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def status(d: Daemon, field: str) -> int:
    return d.status(field)


def reset_peak(d: Daemon) -> None:
    Path(f"/proc/{d.proc.pid}/clear_refs").write_text("5")


def serves_within_a_second(d: Daemon) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(d.sock)
        s.sendall(b'{"method":"org.varlink.service.GetInfo"}\0')
        buf = b""
        while b"\0" not in buf:
            data = s.recv(65536)
            if not data:
                return False
            buf += data
        return b'"product":"cfsd"' in buf
    except OSError:
        return False
    finally:
        s.close()


def settled(d: Daemon, fds: int, slack: int = 4, seconds: float = 3.0) -> bool:
    """The daemon's descriptors are back near *fds* within *seconds*."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if fd_count(d) <= fds + slack:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def hostile(world: Path) -> Iterator[tuple[Daemon, Path]]:
    """A root daemon of its own (socket 0666) and nobody's repository with one layer."""
    sockdir = world / "hostile-sock"
    sockdir.mkdir()
    sockdir.chmod(0o755)
    d = Daemon(sockdir, "--socket-mode", "0666")
    try:
        repo, _ = user_repo(world, d, "hostile-home", b"first layer" * 100)
        yield d, repo      # objects/ and streams/ exist: failures must leave them as they are
    finally:               # a failed setup must not leave the daemon running
        d.stop()


def user_repo(world: Path, d: Daemon, home_name: str, content: bytes) -> tuple[Path, str]:
    """nobody's repository (in a home of its own) with one layer holding *content* as
    ``usr/f``, named ``l``; returns (repository, the layer's diff_id)."""
    home = world / home_name
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    repo = home / "repo"
    assert as_nobody(world, d, "--repo", str(repo), "init", "--insecure").returncode == 0
    tar = _tar(content)
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    p = as_nobody(world, d, "--repo", str(repo), "oci", "import-layer", digest, "l", input=tar)
    assert p.returncode == 0, p.stderr
    return repo, digest


def _tar(data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("usr/f")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def prelude(d: Daemon, args: tuple[str, ...] = ()) -> str:
    """What attack scripts start with: imports, ``ADDRESS`` and ``ARGS``."""
    return (f"import json, os, socket, sys, time\nADDRESS = {d.sock!r}\n"
            f"ARGS = {list(args)!r}\n")


def attack(world: Path, d: Daemon, script: str, *args: str) -> dict[str, Any]:
    """Run *script* (stdlib Python, ``ADDRESS`` and ``ARGS`` defined) as nobody; it prints
    one JSON object."""
    p = run_as(world, d, ["-c", prelude(d, args) + script])
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    return json.loads(p.stdout)


def check_after(d: Daemon, fds: int, repo: Path, before: dict[str, Any]) -> None:
    assert d.alive()
    assert serves_within_a_second(d)
    assert settled(d, fds), f"{fd_count(d)} descriptors, {fds} before"
    # an aborted call unwinds on its own thread after its client is gone: its staging
    # area is removed then, not necessarily before the descriptors count settles
    deadline = time.monotonic() + 10
    while tree_listing(repo) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tree_listing(repo) == before


RECV_REPLY = """
def reply(s, timeout=5):
    s.settimeout(timeout)
    buf = b""
    try:
        while b"\\0" not in buf:
            data = s.recv(65536)
            if not data:
                break
            buf += data
    except OSError:
        pass
    return json.loads(buf[:buf.index(b"\\0")]) if b"\\0" in buf else None
"""

FD_FLOOD = RECV_REPLY + """
import array
fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(253)]
s = socket.socket(socket.AF_UNIX); s.connect(ADDRESS)
sent = 0
for _ in range(81):
    try:
        s.sendmsg([b"{"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        sent += 1
    except OSError:
        break
print(json.dumps({"sent": sent, "reply": reply(s)}))
"""

CONN_FLOOD = """
socks, busy = [], 0
for i in range(300):
    s = socket.socket(socket.AF_UNIX); s.connect(ADDRESS); socks.append(s)
time.sleep(0.5)
for s in socks:
    s.setblocking(False)
    try:
        data = s.recv(65536)
        busy += b"org.composefs.Repository.Busy" in data
    except BlockingIOError:
        pass
# the admitted ones still work
s = socks[0]; s.setblocking(True); s.settimeout(5)
s.sendall(b'{"method":"org.varlink.service.GetInfo"}\\0')
ok = b"cfsd" in s.recv(65536)
print(json.dumps({"busy": busy, "ok": ok}))
"""

BIG_PARTIAL = RECV_REPLY + """
chunk = b"[" + b" " * (1 << 20)
socks, errors = [], 0
for i in range(60):
    s = socket.socket(socket.AF_UNIX); s.connect(ADDRESS); socks.append(s)
    try:
        s.sendall(chunk + chunk)
    except OSError:
        pass
for s in socks:
    r = reply(s, 2)
    errors += r is not None and "error" in r
print(json.dumps({"errors": errors}))
"""

DEEP_JSON = RECV_REPLY + """
s = socket.socket(socket.AF_UNIX); s.connect(ADDRESS)
s.sendall(b"[" * 500000 + b"\\0")
first = reply(s)
s.sendall(b'{"method":"org.varlink.service.GetInfo"}\\0')
print(json.dumps({"first": first, "second": reply(s)}))
"""


def test_fd_flood(world: Path, hostile: tuple[Daemon, Path]) -> None:
    d, repo = hostile
    before, fds = tree_listing(repo), fd_count(d)
    r = attack(world, d, FD_FLOOD)
    assert r["reply"]["error"] == "org.varlink.service.InvalidParameter", r
    check_after(d, fds, repo, before)


def test_connection_flood(world: Path, hostile: tuple[Daemon, Path]) -> None:
    d, repo = hostile
    before, fds = tree_listing(repo), fd_count(d)
    r = attack(world, d, CONN_FLOOD)
    assert r["ok"] and r["busy"] >= 300 - 32, r
    check_after(d, fds, repo, before)


def test_unterminated_big_messages(world: Path, hostile: tuple[Daemon, Path]) -> None:
    d, repo = hostile
    before, fds = tree_listing(repo), fd_count(d)
    reset_peak(d)
    rss = status(d, "VmRSS")
    r = attack(world, d, BIG_PARTIAL)
    assert r["errors"] == 60, r      # every one answered: too big or too many connections
    assert status(d, "VmHWM") - rss < 100 * MIB
    check_after(d, fds, repo, before)


def test_deeply_nested_json(world: Path, hostile: tuple[Daemon, Path]) -> None:
    d, repo = hostile
    before, fds = tree_listing(repo), fd_count(d)
    r = attack(world, d, DEEP_JSON)
    assert r["first"]["error"] == "org.varlink.service.InvalidParameter", r
    assert r["second"]["parameters"]["product"] == "cfsd"
    check_after(d, fds, repo, before)


def test_dumpfiles_from_dev_zero(world: Path, hostile: tuple[Daemon, Path]) -> None:
    """Three mkcomposefs --from-file /dev/zero at once: each refused at the size limit,
    one held in memory at a time, the memory given back."""
    d, repo = hostile
    before, fds = tree_listing(repo), fd_count(d)
    rss = status(d, "VmRSS")
    reset_peak(d)
    procs = [subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "/usr/bin/python3", "-m", "cfsctl", "mkcomposefs", "--from-file", "/dev/zero", "-"],
        env={"PYTHONPATH": str(world / "lib"), "CFSD_INTERFACES": str(world / "interfaces"),
             "CFSD_ADDRESS": d.address, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/") for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 1 and b"larger than 256 MiB" in err, err
    assert status(d, "VmHWM") - rss < 400 * MIB
    assert status(d, "VmRSS") - rss < 64 * MIB
    check_after(d, fds, repo, before)


def test_import_from_dev_zero_stops_when_the_client_goes(world: Path,
                                                       hostile: tuple[Daemon, Path]) -> None:
    d, repo = hostile
    before, fds = tree_listing(repo), fd_count(d)
    p = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "/usr/bin/python3", "-m", "cfsctl", "--repo", str(repo), "oci", "import-layer",
         "sha256:" + "0" * 64],
        env={"PYTHONPATH": str(world / "lib"), "CFSD_INTERFACES": str(world / "interfaces"),
             "CFSD_ADDRESS": d.address, "PATH": "/usr/bin:/bin"},
        stdin=open("/dev/zero", "rb"), stderr=subprocess.DEVNULL, cwd="/")  # noqa: SIM115
    time.sleep(1.5)
    assert p.poll() is None          # still importing zeros
    p.kill()
    p.wait()
    check_after(d, fds, repo, before)
    assert b"ImportLayer: org.composefs.Oci.Cancelled" in d.log.read_bytes()


def test_sigterm_stops_a_running_import(world: Path, tmp_path: Path) -> None:
    sockdir = world / "term-sock"
    sockdir.mkdir()
    sockdir.chmod(0o755)
    d = Daemon(sockdir, "--socket-mode", "0666")
    try:
        home = world / "term-home"
        home.mkdir()
        os.chown(home, NOBODY, NOBODY)
        assert as_nobody(world, d, "--repo", str(home / "r"), "init", "--insecure").returncode == 0
        p = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "/usr/bin/python3", "-m", "cfsctl", "--repo", str(home / "r"), "oci",
             "import-layer", "sha256:" + "0" * 64],
            env={"PYTHONPATH": str(world / "lib"), "CFSD_INTERFACES": str(world / "interfaces"),
                 "CFSD_ADDRESS": d.address, "PATH": "/usr/bin:/bin"},
            stdin=open("/dev/zero", "rb"), stderr=subprocess.PIPE, cwd="/")  # noqa: SIM115
        time.sleep(1.0)
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(10)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 1 and err.count(b"\n") == 1, err
    finally:
        d.stop()


# --------------------------------------------------------------------------- registries


class _Bomb(http.server.BaseHTTPRequestHandler):
    bomb = b""

    def log_message(self, *a: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        port = self.server.server_address[1]
        if self.path == "/v2/" or self.path.startswith("/v2/tok/"):
            self.send_response(401)
            self.send_header("WWW-Authenticate",
                             f'Bearer realm="http://127.0.0.1:{port}/token",service="x"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json"
                         if "/manifests/" in self.path else "application/json")
        self.send_header("Content-Length", str(len(self.bomb)))
        self.end_headers()
        self.wfile.write(self.bomb)


@pytest.fixture(scope="module")
def bomb_registry() -> Iterator[str]:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zero = bytes(MIB)
    _Bomb.bomb = b"".join(c.compress(zero) for _ in range(1024)) + c.flush()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Bomb)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.mark.parametrize("repository", ["tok", "plain"])
def test_gzip_bombs_from_a_registry(world: Path, hostile: tuple[Daemon, Path],
                                    bomb_registry: str, repository: str) -> None:
    """A token service or a manifest that decompresses to 1 GiB: refused at the bound."""
    d, repo = hostile
    before, fds = tree_listing(repo), fd_count(d)
    rss = status(d, "VmRSS")
    reset_peak(d)
    p = as_nobody(world, d, "--repo", str(repo), "oci", "pull", "--tls-verify=false",
                  f"docker://{bomb_registry}/{repository}/img:v1", "x")
    assert p.returncode == 1 and b"larger than" in p.stderr, p.stderr
    assert status(d, "VmHWM") - rss < 64 * MIB
    check_after(d, fds, repo, before)


# --------------------------------------------------------------------------- things that block


def test_fifo_in_a_layout(world: Path, hostile: tuple[Daemon, Path]) -> None:
    d, repo = hostile
    before, fds = tree_listing(repo), fd_count(d)
    layout = world / "fifo-layout"
    layout.mkdir()
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    os.mkfifo(layout / "index.json")
    for q in (layout, layout / "oci-layout", layout / "index.json"):
        q.chmod(0o755 if q.is_dir() else 0o644)
    # a pull that blocked on the FIFO would hang (pytest-timeout); it answers an error
    p = as_nobody(world, d, "--repo", str(repo), "oci", "pull", f"oci:{layout}", "x")
    assert p.returncode == 1 and p.stderr.count(b"\n") == 1, p.stderr
    check_after(d, fds, repo, before)


def test_fifo_as_a_stream_object(world: Path, hostile: tuple[Daemon, Path]) -> None:
    """A FIFO planted as an object in the caller's own repository: cat, fsck and gc answer
    (typed errors or findings) instead of hanging."""
    d, _ = hostile
    repo, digest = user_repo(world, d, "fifo-home", b"f" * 1000)
    stream = Path(os.path.realpath(repo / "streams" / f"oci-layer-{digest}"))
    stream.unlink()
    os.mkfifo(stream)
    os.chown(stream, NOBODY, NOBODY)
    fds = fd_count(d)
    for args in (["cat", f"oci-layer-{digest}"], ["fsck"], ["gc"]):
        p = as_nobody(world, d, "--repo", str(repo), *args)
        assert p.returncode == 1, (args, p.stdout, p.stderr)
    assert serves_within_a_second(d) and settled(d, fds)


def test_daemon_log_has_no_traceback(hostile: tuple[Daemon, Path]) -> None:
    d, _ = hostile
    assert d.alive()
    log = d.log.read_bytes()
    i = log.find(b"Traceback")
    assert i < 0, log[max(0, i - 300):i + 3000].decode(errors="replace")



# --------------------------------------------------------------------------- readers and owners


def _object_of_layer(repo: Path, content: bytes) -> Path:
    """The object file holding *content* (a file of an imported layer)."""
    for p in (repo / "objects").rglob("*"):
        if p.is_file() and p.stat().st_size == len(content) and p.read_bytes() == content:
            return p
    raise AssertionError("object not found")


@pytest.mark.parametrize("size", [5000, 65 * MIB])
def test_flipped_byte_is_never_served(world: Path, hostile: tuple[Daemon, Path],
                                      size: int) -> None:
    """No kernel fs-verity here: a flipped byte in an object makes cat and checkout fail
    with a typed error, and none of the object reaches the caller."""
    d, _ = hostile
    content = (b"0123456789abcdef" * (size // 16 + 1))[:size]
    repo, digest = user_repo(world, d, f"flip-{size}", content)
    home = repo.parent
    tar = _tar(content)
    p = as_nobody(world, d, "--repo", str(repo), "cat", f"oci-layer-{digest}")
    assert p.returncode == 0 and p.stdout == tar     # intact: served
    obj = _object_of_layer(repo, content)
    with open(obj, "r+b") as f:
        f.seek(size // 2)
        f.write(b"X")
    p = as_nobody(world, d, "--repo", str(repo), "cat", f"oci-layer-{digest}")
    assert p.returncode == 1 and b"does not match its name" in p.stderr, p.stderr
    assert content[:4096] not in p.stdout
    # the layer as an image, checked out
    layout = world / f"flip-layout-{size}"
    from tests.ocitools import build_image
    build_image(layout, "v1", {"usr/big": content})
    for q in [layout, *layout.rglob("*")]:
        q.chmod(0o755 if q.is_dir() else 0o644)
    p = as_nobody(world, d, "--repo", str(repo), "oci", "pull", f"oci:{layout}:v1", "img")
    assert p.returncode == 0, p.stderr
    obj = _object_of_layer(repo, content)     # the pull stored the good content again
    with open(obj, "r+b") as f:
        f.seek(size // 2)
        f.write(b"X")
    p = as_nobody(world, d, "--repo", str(repo), "oci", "checkout", "img", str(home / "co"))
    assert p.returncode == 1 and b"does not match its name" in p.stderr, p.stderr
    assert os.listdir(home / "co") == []        # what the failed checkout made is gone


def test_stalled_reader_does_not_keep_gc_out(world: Path, hostile: tuple[Daemon, Path]) -> None:
    """A reader that never reads its Cat output, and one holding an insecure handle: the
    owner's gc still runs."""
    from tests.varlink_raw import Raw
    d, repo = hostile
    layer = next(n for n in os.listdir(repo / "streams") if n.startswith("oci-layer-"))
    held = Raw(d.sock)
    r = held.call("org.composefs.Repository.OpenRepository",
                  {"path": str(repo), "insecure": True})
    assert "parameters" in r, r
    # gc succeeds: had the held handle kept it out, it would fail after its lock timeout
    p = as_nobody(world, d, "--repo", str(repo), "gc")
    assert p.returncode == 0, p.stderr
    # a Cat into a pipe nobody reads, with a big stream so the pipe fills
    tar = _tar(os.urandom(4 * MIB))
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    assert as_nobody(world, d, "--repo", str(repo), "oci", "import-layer", digest, "big",
                     input=tar).returncode == 0
    rd, wr = os.pipe()
    staller = Raw(d.sock, timeout=60)
    h = staller.call("org.composefs.Repository.OpenRepository",
                     {"path": str(repo)})["parameters"]["handle"]
    staller.send("org.composefs.Repository.Cat", {"handle": h, "name": "refs/big"}, fds=[wr])
    os.close(wr)
    # the Cat is under way once bytes arrive; it stays stuck (holding the repository) as the
    # 4 MiB stream can never fit the pipe nobody reads
    assert fcntl.fcntl(rd, fcntl.F_GETPIPE_SZ) < 4 * MIB
    while pipe_fill(rd) == 0:
        time.sleep(0.01)
    # gc cancels the stuck reader and succeeds (waiting it out would fail: lock timeout)
    p = as_nobody(world, d, "--repo", str(repo), "gc")
    assert p.returncode == 0, p.stderr
    reply = staller.recv()
    assert reply["error"] == "org.composefs.Repository.Cancelled", reply
    os.close(rd)
    staller.close()
    held.close()
    assert layer in os.listdir(repo / "streams")


def pipe_fill(fd: int) -> int:
    """Bytes waiting in the pipe read end *fd* (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    return buf[0]


PIDS_CGROUP = Path("/sys/fs/cgroup/pids")


def test_thread_limit_never_kills_the_daemon(world: Path) -> None:
    """Under a pids limit (as with TasksMax=), connections past what threads allow are
    refused with Busy; the daemon keeps serving."""
    sockdir = world / "pids-sock"
    sockdir.mkdir()
    sockdir.chmod(0o755)
    d = Daemon(sockdir, "--socket-mode", "0666")
    group = PIDS_CGROUP / f"cfsd-test-{os.getpid()}"
    group.mkdir()
    try:
        threads = status(d, "Threads") // 1024        # a count, not kB
        (group / "pids.max").write_text(str(threads + 12))
        (group / "cgroup.procs").write_text(str(d.proc.pid))
        r = attack(world, d, CONN_FLOOD)
        # fewer admitted than the per-uid cap of 32: the pids limit refused the rest
        assert r["ok"] and r["busy"] > 300 - 32, r
        assert b"cannot serve a connection" in d.log.read_bytes()
        (PIDS_CGROUP / "cgroup.procs").write_text(str(d.proc.pid))
        assert d.alive() and serves_within_a_second(d)
    finally:
        if d.alive():
            with contextlib.suppress(OSError):
                (PIDS_CGROUP / "cgroup.procs").write_text(str(d.proc.pid))
        d.stop()
        group.rmdir()


ACCEPT_FLOOD = """
socks = []
for i in range(int(ARGS[0])):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(ADDRESS)
    except OSError:
        break
    socks.append(s)
time.sleep(2.0)
for s in socks:
    s.close()
print(json.dumps({"opened": len(socks)}))
"""


def test_accept_failures_back_off(world: Path) -> None:
    """Out of descriptors (a low RLIMIT_NOFILE, four users each within their connection
    cap): accept fails, is logged once, retried with back-off, and the daemon serves again
    once descriptors are free."""
    sockdir = world / "emfile-sock"
    sockdir.mkdir()
    sockdir.chmod(0o755)
    d = Daemon(sockdir, "--socket-mode", "0666")
    try:
        fds = fd_count(d)
        subprocess.run(["prlimit", f"--pid={d.proc.pid}", f"--nofile={fds + 24}"], check=True)
        procs = [subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
             "/usr/bin/python3", "-c", prelude(d, ("30",)) + ACCEPT_FLOOD],
            stdout=subprocess.PIPE) for uid in (NOBODY, 4301, 4302, 4303)]
        opened = [json.loads(p.communicate(timeout=60)[0])["opened"] for p in procs]
        assert sum(opened) > 24, opened          # more than the daemon had descriptors for
        log = d.log.read_bytes()
        assert log.count(b"accept failed") >= 1
        assert log.count(b"accept failed") <= 4, log.count(b"accept failed")
        deadline = time.monotonic() + 10
        while not serves_within_a_second(d) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert serves_within_a_second(d) and d.alive()
    finally:
        d.stop()

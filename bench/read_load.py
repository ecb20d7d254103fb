#!/usr/bin/env python3
"""Read methods under load: ListImages and Inspect calls/s with many concurrent clients.

Usage: python bench/read_load.py [--images 10] [--clients 50] [--seconds 5]

Builds a repository with --images small tagged images, starts a private cfsd and runs
--clients client threads (the system python, no cfsd code), each with its own connection
and handle, calling one method as fast as the replies come for --seconds.  cfsd serves at
most 32 connections per user, so the clients are spread over processes of several users
(root, then nobody, ...; needs root and setpriv), 25 per process.  Prints calls/s per
method, the daemon's CPU seconds per 1000 calls, and the ratio to the target of issue 13
(>= 2000 calls/s with 10 images and 50 clients).  The clients share the machine with the
daemon, as real ones do.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)
from tests.deltatools import D, F, Layout, make_tar  # noqa: E402

TARGET = 2000.0

CLIENT = r"""
import json, socket, sys, threading, time
sock, repo, method = sys.argv[1], sys.argv[2], sys.argv[3]
n, seconds, start = int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
counts = [0] * n
ready = threading.Barrier(n + 1)
stop = [0.0]
def call(s, buf, m, p):
    s.sendall(json.dumps({"method": m, "parameters": p}).encode() + b"\0")
    while b"\0" not in buf[0]:
        data = s.recv(1 << 20)
        if not data:
            raise SystemExit("connection closed")
        buf[0] += data
    msg, _, buf[0] = buf[0].partition(b"\0")
    r = json.loads(msg)
    if "error" in r:
        raise SystemExit(str(r))
    return r["parameters"]
def worker(i):
    s = socket.socket(socket.AF_UNIX); s.connect(sock); buf = [b""]
    h = call(s, buf, "org.composefs.Repository.OpenRepository", {"path": repo})["handle"]
    p = {"handle": h} if method == "ListImages" else {"handle": h, "image": "img3"}
    ready.wait()
    while time.monotonic() < stop[0]:
        call(s, buf, "org.composefs.Oci." + method, p)
        counts[i] += 1
    call(s, buf, "org.composefs.Repository.CloseRepository", {"handle": h})
ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
[t.start() for t in ts]
stop[0] = time.time() + 3600
ready.wait(timeout=60)
time.sleep(max(0.0, start - time.time()))     # every process starts at the same moment
t0 = time.monotonic()
stop[0] = t0 + seconds
[t.join() for t in ts]
print(sum(counts), time.monotonic() - t0)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


PER_PROCESS = 25
UIDS = [0, 65534, 65533, 65532]


def _clients(sock: Path, repo: Path, method: str, clients: int, seconds: float
             ) -> tuple[int, float]:
    start = time.time() + 3.0
    procs = []
    for k in range(0, clients, PER_PROCESS):
        uid = UIDS[k // PER_PROCESS]
        prefix = [] if uid == 0 else ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                      "--clear-groups"]
        procs.append(subprocess.Popen(
            [*prefix, "/usr/bin/python3", "-c", CLIENT, str(sock), str(repo), method,
             str(min(PER_PROCESS, clients - k)), str(seconds), str(start)],
            stdout=subprocess.PIPE, text=True, cwd="/"))
    calls = 0
    secs = 0.0
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 120)
        if p.returncode:
            raise SystemExit(f"a client process failed ({p.returncode})")
        n, t = out.split()
        calls += int(n)
        secs = max(secs, float(t))
    return calls, secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    if a.clients > PER_PROCESS * len(UIDS):
        ap.error(f"at most {PER_PROCESS * len(UIDS)} clients")
    with tempfile.TemporaryDirectory(prefix="cfsd-bench-read-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)                   # the other users' clients reach the socket
        layout = Layout(work / "layout")
        for i in range(a.images):
            layout.write_image(f"img{i}", [make_tar([D("usr"), F(f"usr/f{i}", b"x" * 200)])])
        repo = work / "repo"
        sock = work / "cfsd.sock"
        daemon = subprocess.Popen([sys.executable, "-m", "cfsd", "--address", f"unix:{sock}",
                                   "--socket-mode", "0666", "--log-level", "error"],
                                  cwd=str(ROOT))
        env = dict(os.environ, CFSD_ADDRESS=f"unix:{sock}")
        try:
            for _ in range(1000):
                if sock.exists() or daemon.poll() is not None:
                    break
                time.sleep(0.01)
            if daemon.poll() is not None:
                raise SystemExit("cfsd did not start")

            def cfsctl(*args: str) -> None:
                subprocess.run([sys.executable, "-m", "cfsctl", "--repo", str(repo), *args],
                               env=env, cwd=str(ROOT), check=True, capture_output=True)
            cfsctl("init", "--insecure")
            for i in range(a.images):
                cfsctl("oci", "pull", "-q", f"oci:{layout.path}:img{i}", f"img{i}")
            subprocess.run(["chmod", "-R", "a+rX", str(repo)], check=True)  # other users read
            print(f"{a.images} images, {a.clients} clients, {a.seconds:.0f} s per method")
            for method in ("ListImages", "Inspect"):
                before = cpu_seconds(daemon.pid)
                calls, secs = _clients(sock, repo, method, a.clients, a.seconds)
                rate = calls / secs
                cpu = cpu_seconds(daemon.pid) - before
                print(f"{method:<11} {rate:8.0f} calls/s   daemon CPU {1000 * cpu / calls:.2f}"
                      f" s per 1000 calls   ratio to the {TARGET:.0f}/s target: "
                      f"{rate / TARGET:.2f}")
        finally:
            daemon.terminate()
            daemon.wait()


if __name__ == "__main__":
    main()

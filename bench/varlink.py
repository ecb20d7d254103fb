#!/usr/bin/env python3
"""Varlink call rate of cfsd versus a stock python-varlink ThreadingServer.

Usage: python bench/varlink.py [--calls 1000] [--clients 8]
Both servers answer a trivial call (org.varlink.service.GetInfo) on a Unix socket; the same
client code drives both.  Prints calls/s for sequential calls on one connection and for N
concurrent clients, and the ratio cfsd / python-varlink.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # this file is named like the varlink package: do not shadow it
from cfsctl.client import Client  # noqa: E402

STOCK = r'''
import sys, varlink
service = varlink.Service(vendor="x", product="stock", version="1", url="x",
                          interface_dir=".")
class H(varlink.RequestHandler):
    service = service
class S(varlink.ThreadingServer):
    daemon_threads = True
with S(sys.argv[1], H) as s:
    s.serve_forever()
'''


def wait(path: str) -> None:
    for _ in range(500):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.01)
        finally:
            s.close()
    raise TimeoutError(path)


def run_calls(path: str, n: int) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    c = Client(s)
    for _ in range(n):
        c.call("org.varlink.service.GetInfo")
    c.close()


def measure(path: str, calls: int, clients: int) -> tuple[float, float]:
    run_calls(path, 50)  # warm up
    t = time.perf_counter()
    run_calls(path, calls)
    seq = calls / (time.perf_counter() - t)
    threads = [threading.Thread(target=run_calls, args=(path, calls // clients))
               for _ in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    conc = (calls // clients) * clients / (time.perf_counter() - t)
    return seq, conc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=8)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    ours = os.path.join(tmp, "cfsd.sock")
    stock = os.path.join(tmp, "stock.sock")
    p1 = subprocess.Popen([sys.executable, "-m", "cfsd", "--address", f"unix:{ours}",
                           "--log-level", "error"], cwd=str(ROOT))
    p2 = subprocess.Popen([sys.executable, "-c", STOCK, f"unix:{stock}"], cwd=tmp)
    try:
        wait(ours)
        wait(stock)
        ours_seq, ours_conc = measure(ours, a.calls, a.clients)
        st_seq, st_conc = measure(stock, a.calls, a.clients)
    finally:
        for p in (p1, p2):
            p.terminate()
            p.wait()
    print(f"sequential ({a.calls} calls, 1 connection): cfsd {ours_seq:7.0f} calls/s | "
          f"python-varlink {st_seq:7.0f} calls/s | ratio {ours_seq / st_seq:.2f}")
    print(f"concurrent ({a.clients} clients): cfsd {ours_conc:7.0f} calls/s | "
          f"python-varlink {st_conc:7.0f} calls/s | ratio {ours_conc / st_conc:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

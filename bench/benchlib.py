"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Cfsd:
    """A private cfsd on a socket in *work*, driven through the real cfsctl."""

    def __init__(self, work: Path) -> None:
        self.sock = work / "cfsd.sock"
        self.proc = subprocess.Popen([sys.executable, "-m", "cfsd", "--address",
                                      f"unix:{self.sock}", "--log-level", "error"],
                                     cwd=str(ROOT))
        for _ in range(1000):
            if self.sock.exists():
                break
            time.sleep(0.01)
        self.env = dict(os.environ, CFSD_ADDRESS=f"unix:{self.sock}")

    def run(self, repo: Path, *args: str) -> str:
        p = subprocess.run([sys.executable, "-m", "cfsctl", "--repo", str(repo), *args],
                           env=self.env, cwd=str(ROOT), capture_output=True, check=False)
        if p.returncode:
            raise RuntimeError(f"cfsctl {' '.join(args)}: {p.stderr.decode()}")
        return p.stdout.decode()

    def timed(self, repo: Path, *args: str) -> tuple[float, str]:
        os.sync()
        t = time.perf_counter()
        out = self.run(repo, *args)
        return time.perf_counter() - t, out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()

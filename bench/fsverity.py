#!/usr/bin/env python3
"""fs-verity digest throughput: cfsd versus `fsverity digest` (fsverity-utils) on one file.

Usage: python bench/fsverity.py [--size-mib 256] [--repeat 3] [--file PATH]
Prints MB/s for both and the ratio ours/fsverity for sha256 and sha512 (best of N, warm).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cfsd.core import fsverity  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--file")
    a = ap.parse_args()
    tool = shutil.which("fsverity")
    if tool is None:
        print("fsverity (fsverity-utils) is not installed", file=sys.stderr)
        return 1
    tmp = None
    if a.file:
        path = a.file
    else:
        tmp = tempfile.NamedTemporaryFile(prefix="cfsd-bench-", delete=False)  # noqa: SIM115
        block = os.urandom(1 << 20)
        for i in range(a.size_mib):
            tmp.write(i.to_bytes(8, "little") + block[8:])
        tmp.close()
        path = tmp.name
    size = os.path.getsize(path)
    try:
        for alg in ("sha256", "sha512"):
            cmd = [tool, "digest", path, f"--hash-alg={alg}", "--block-size=4096", "--compact"]
            ref = subprocess.run(cmd, capture_output=True, check=True).stdout.decode().strip()
            ours = fsverity.digest_path(path, alg).hex()  # also warms the worker pool
            assert ours == ref, (alg, ours, ref)
            t_tool = best(lambda cmd=cmd: subprocess.run(cmd, capture_output=True, check=True),
                          a.repeat)
            t_ours = best(lambda alg=alg: fsverity.digest_path(path, alg), a.repeat)
            t_one = best(lambda alg=alg: fsverity.digest_path(path, alg, parallel=False),
                         a.repeat)
            mb = size / 1e6
            print(f"{alg}: fsverity {mb / t_tool:7.0f} MB/s | cfsd {mb / t_ours:7.0f} MB/s "
                  f"(1 process {mb / t_one:5.0f} MB/s) | ratio cfsd/fsverity "
                  f"{t_tool / t_ours:.2f}")
    finally:
        fsverity.shutdown_pool()
        if tmp is not None:
            os.unlink(tmp.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

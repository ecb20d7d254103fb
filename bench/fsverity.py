#!/usr/bin/env python3
"""fs-verity digest throughput: cfsd versus `fsverity digest` (fsverity-utils) on one file.

Usage: python bench/fsverity.py [--size-mib 256] [--repeat 3] [--file PATH]

For sha256 and sha512 (best of N, warm cache) it prints first the like-for-like comparison:
cfsd hashing in one process (parallel=False) against `fsverity digest`, which is
single-threaded (its time includes starting the tool, about a millisecond), and their
ratio.  Then, labelled as such, the extra speed-up of cfsd's
worker pool (files over PARALLEL_THRESHOLD use several processes, which the C tool does
not): it says how many workers and is not a like-for-like ratio.
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
    workers = max(2, os.cpu_count() or 2)        # what fsverity._get_pool starts
    print(f"file: {size / 1e6:.0f} MB, best of {a.repeat}, {os.cpu_count()} CPUs")
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
            print(f"{alg}: 1 process vs 1 process: cfsd {mb / t_one:6.0f} MB/s, "
                  f"fsverity digest {mb / t_tool:6.0f} MB/s, ratio cfsd/fsverity "
                  f"{t_tool / t_one:.2f}")
            if size >= fsverity.PARALLEL_THRESHOLD:
                print(f"{alg}: extra, not like for like: cfsd's pool of {workers} worker "
                      f"processes {mb / t_ours:6.0f} MB/s = {t_one / t_ours:.2f}x cfsd's one "
                      f"process ({t_tool / t_ours:.2f}x the one-threaded C tool)")
            else:
                print(f"{alg}: no pool: the file is under PARALLEL_THRESHOLD "
                      f"({fsverity.PARALLEL_THRESHOLD >> 20} MiB), cfsd hashes it in one "
                      f"process ({mb / t_ours:.0f} MB/s)")
    finally:
        fsverity.shutdown_pool()
        if tmp is not None:
            os.unlink(tmp.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

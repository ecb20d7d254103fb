#!/usr/bin/env python3
"""Image creation from a directory: cfsd versus `mkfs.erofs` (erofs-utils) on the same tree.

Usage: python bench/image.py [--dirs 1000] [--files 100] [--repeat 3] [--workdir DIR] [--keep]

Generates (once, cached in $TMPDIR/cfsd-bench-image-DxF) a tree of --dirs directories with
--files regular files each (sizes drawn from the golden.md 11 set, 0 to 20 000 bytes, about
5.5 KB on average; 100 000 files + 1 001 directories by default) materialized on disk, then
reports entries/s, best of --repeat, for:
  * mkfs.erofs IMG TREE (erofs-utils; the reference: reads every file into a plain EROFS);
  * cfsd mkcomposefs TREE IMG (cfsctl -> a running cfsd: scan, fs-verity sha256 of every
    file over 64 bytes, C-compatible composefs image written by the daemon);
  * cfsd compute-id (sha512, V1, no OCI transform; nothing stored);
  * cfsd create-image into a fresh repository (every file over 64 bytes becomes an object),
    and again into the populated repository.
Target (issue 4): mkcomposefs entries/s >= 0.5 x mkfs.erofs.  create-image does more work
than mkfs.erofs (it creates one object file per file over 64 bytes, about 70 000 here, and
syncs them before the image is named), so its ratio is reported for information.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = [0, 10, 50, 64, 65, 100, 500, 1000, 3000, 4096, 5000, 8000, 20000]


def build_tree(dest: Path, dirs: int, files: int) -> Path:
    root = dest / "tree"
    if (dest / "complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(1234)
    root.mkdir(parents=True)
    for d in range(dirs):
        dp = root / f"d{d:04d}"
        dp.mkdir()
        for f in range(files):
            p = dp / f"f{f:03d}.txt"
            p.write_bytes(rng.randbytes(rng.choice(SIZES)))
            os.utime(p, (1_700_000_000, 1_700_000_000))
        os.utime(dp, (1_700_000_000, 1_700_000_000))
    os.utime(root, (1_700_000_000, 1_700_000_000))
    (dest / "complete").touch()
    return root


def count_entries(root: Path) -> int:
    n = 1
    for _, dirnames, filenames in os.walk(root):
        n += len(dirnames) + len(filenames)
    return n


def best(fn: Callable[[], object], repeat: int,
         before: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        os.sync()  # do not let one run pay for the previous run's writeback
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(cmd, check=True, env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dirs", type=int, default=1000)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where the images and repositories of both tools go (default "
                         "/dev/shm, so a throttled or shared disk does not dominate; the "
                         "tree itself is always on disk in $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the generated tree")
    a = ap.parse_args()
    mkfs = shutil.which("mkfs.erofs")
    if mkfs is None:
        print("mkfs.erofs (erofs-utils) is required", file=sys.stderr)
        return 1
    cache = Path(tempfile.gettempdir()) / f"cfsd-bench-image-{a.dirs}x{a.files}"
    cache.mkdir(exist_ok=True)
    print("preparing tree ...", flush=True)
    tree = build_tree(cache, a.dirs, a.files)
    entries = count_entries(tree)
    work = Path(tempfile.mkdtemp(prefix="cfsd-bench-image-work-", dir=a.workdir))
    sock = work / "cfsd.sock"
    daemon = subprocess.Popen([sys.executable, "-m", "cfsd", "--address", f"unix:{sock}",
                               "--log-level", "error"], cwd=str(ROOT))
    try:
        for _ in range(500):
            if sock.exists():
                break
            time.sleep(0.01)
        env = dict(os.environ, CFSD_ADDRESS=f"unix:{sock}")
        cfsctl = [sys.executable, "-m", "cfsctl"]
        img = work / "img"
        t_mkfs = best(lambda: run([mkfs, "--quiet", str(img), str(tree)]), a.repeat)
        mkfs_size = img.stat().st_size
        t_mk = best(lambda: run([*cfsctl, "mkcomposefs", str(tree), str(img)], env), a.repeat)
        cfs_size = img.stat().st_size
        t_id = best(lambda: run([*cfsctl, "--no-repo", "compute-id",
                                 "--no-propagate-usr-to-root", str(tree)], env), a.repeat)
        repo = work / "repo"

        def fresh() -> None:
            shutil.rmtree(repo, ignore_errors=True)
            run([*cfsctl, "--repo", str(repo), "init", "--insecure"], env)

        create = [*cfsctl, "--repo", str(repo), "create-image", "--no-propagate-usr-to-root",
                  str(tree)]
        t_new = best(lambda: run(create, env), a.repeat, before=fresh)
        t_again = best(lambda: run(create, env), a.repeat)
        with open(f"/proc/{daemon.pid}/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work)
        if not a.keep:
            shutil.rmtree(cache)

    def line(label: str, t: float) -> str:
        return (f"{label:34s} {t:6.2f} s {entries / t:9.0f} entries/s   ratio "
                f"{t_mkfs / t:4.2f}")

    print(f"tree: {entries} entries ({a.dirs} dirs x {a.files} files) on {cache.parent}; "
          f"outputs on {work.parent}; best of {a.repeat}")
    print(line("mkfs.erofs (erofs-utils)", t_mkfs) + f"   ({mkfs_size / 1e6:.0f} MB image)")
    print(line("cfsd mkcomposefs", t_mk) + f"   ({cfs_size / 1e6:.1f} MB image)  target >= 0.5")
    print(line("cfsd compute-id (sha512)", t_id))
    print(line("cfsd create-image, fresh repo", t_new))
    print(line("cfsd create-image, objects present", t_again))
    print(f"cfsd peak RSS: {hwm / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

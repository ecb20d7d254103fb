#!/usr/bin/env python3
"""Pull throughput: `cfsctl oci pull oci-archive:` versus real peers, plus cfsd's peak RSS.

Usage: python bench/pull.py [--mib 300] [--files 12000] [--layers 3] [--keep]

Generates (once, cached in $TMPDIR/cfsd-bench-pull-*) a gzip image of about --mib MB
compressed with --files files, then reports in one run:
  * cfsd: a running cfsd pulls the oci-archive into a fresh repository (cfsctl wall time);
  * peer pipeline: `skopeo copy oci-archive:X oci:Y` then `tar -xzf` of every layer;
  * raw limit: ISA-L gunzip + sha256 of compressed and uncompressed bytes, one process;
  * peak RSS (VmHWM) of the cfsd process.
Targets (issue 3): faster than the peer pipeline, >= 50 % of the raw limit, peak RSS < 300 MB.

Everything either side writes goes to one directory, --workdir (default /dev/shm, a tmpfs,
so a throttled disk does not dominate; give a directory on disk to measure that): cfsd's
repository and its temporary files (TMPDIR), skopeo's unpacked copy of the archive
(`skopeo --tmpdir`, otherwise /var/tmp), its output layout and tar's extraction.  The
report names the directory and its filesystem type.  The input archive is read by both from
the cache directory.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from isal import igzip, isal_zlib

ROOT = Path(__file__).resolve().parents[1]
WORDS = [bytes(random.Random(i).choices(b"abcdefghijklmnopqrstuvwxyz", k=random.Random(i)
                                        .randint(2, 10))) for i in range(2000)]


def file_content(rng: random.Random, size: int) -> bytes:
    """Half incompressible (binaries), half text-like (compresses about 3x)."""
    if rng.random() < 0.5:
        return rng.randbytes(size)
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(WORDS, k=64)) + b"\n"
    return bytes(out[:size])


def make_layer(rng: random.Random, nfiles: int, target: int, idx: int) -> bytes:
    buf = io.BytesIO()
    sizes = [max(0, int(rng.lognormvariate(8, 2))) for _ in range(nfiles)]
    scale = target / max(1, sum(sizes))
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("usr", f"usr/l{idx}"):
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            tf.addfile(ti)
        for i, s in enumerate(sizes):
            if i % 100 == 0:
                ti = tarfile.TarInfo(f"usr/l{idx}/d{i // 100}")
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                tf.addfile(ti)
            data = file_content(rng, int(s * scale))
            ti = tarfile.TarInfo(f"usr/l{idx}/d{i // 100}/f{i}")
            ti.size = len(data)
            ti.mode = 0o644
            ti.mtime = 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def build_archive(dest: Path, mib: int, files: int, layers: int) -> Path:
    archive = dest / "image.tar"
    if archive.exists():
        return archive
    rng = random.Random(42)
    layout = dest / "layout"
    (layout / "blobs/sha256").mkdir(parents=True)

    def blob(data: bytes) -> dict:
        d = hashlib.sha256(data).hexdigest()
        (layout / "blobs/sha256" / d).write_bytes(data)
        return {"digest": f"sha256:{d}", "size": len(data)}

    descs, diff_ids = [], []
    per_layer = mib * (1 << 20) * 1.5 / layers
    for i in range(layers):
        tar = make_layer(rng, files // layers, int(per_layer), i)
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        gz = igzip.compress(tar, compresslevel=2)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(gz)})
        print(f"  layer {i}: {len(tar) >> 20} MiB -> {len(gz) >> 20} MiB gzip", flush=True)
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cdesc = {"mediaType": "application/vnd.oci.image.config.v1+json",
             **blob(json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cdesc, "layers": descs}
    mdesc = {"mediaType": manifest["mediaType"], **blob(json.dumps(manifest).encode()),
             "annotations": {"org.opencontainers.image.ref.name": "bench"}}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    with tarfile.open(archive, "w") as tf:
        for name in ("oci-layout", "index.json", "blobs"):
            tf.add(layout / name, arcname=name)
    shutil.rmtree(layout)
    return archive


def timed(fn) -> float:  # noqa: ANN001
    os.sync()  # do not let one stage pay for the previous stage's writeback
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def raw_limit(archive: Path) -> float:
    """ISA-L gunzip + sha256 (compressed and uncompressed) of every layer, one process."""
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith("blobs/") and m.size > 4096]
        t = time.perf_counter()
        for m in members:
            f = tf.extractfile(m)
            assert f is not None
            d = isal_zlib.decompressobj(31)
            hc, hu = hashlib.sha256(), hashlib.sha256()
            while chunk := f.read(1 << 20):
                hc.update(chunk)
                hu.update(d.decompress(chunk))
        return time.perf_counter() - t


def filesystem_type(path: Path) -> str:
    """The type of the filesystem *path* is on (the longest mount point above it)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mnt = fields[4].encode().decode("unicode_escape")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, fields[fields.index("-") + 1]
    return kind


def peer(archive: Path, work: Path) -> float:
    def run() -> None:
        lay = work / "peer-layout"
        tmp = work / "peer-tmp"          # skopeo unpacks the oci-archive here, not /var/tmp
        tmp.mkdir()
        subprocess.run(["skopeo", "--tmpdir", str(tmp), "copy", "-q",
                        f"oci-archive:{archive}:bench", f"oci:{lay}"], check=True)
        idx = json.loads((lay / "index.json").read_text())
        m = json.loads((lay / "blobs" / idx["manifests"][0]["digest"].replace(":", "/"))
                       .read_text())
        out = work / "peer-rootfs"
        out.mkdir()
        for layer in m["layers"]:
            subprocess.run(["tar", "-xzf", str(lay / "blobs" / layer["digest"].replace(":", "/")),
                            "-C", str(out)], check=True)
    t = timed(run)
    leftovers = list((work / "peer-tmp").iterdir())
    assert not leftovers, f"skopeo left {leftovers} in its --tmpdir"
    for d in ("peer-layout", "peer-rootfs", "peer-tmp"):
        shutil.rmtree(work / d)
    return t


def ours(archive: Path, work: Path) -> tuple[float, int]:
    sock = work / "cfsd.sock"
    tmp = work / "cfsd-tmp"
    tmp.mkdir()
    d = subprocess.Popen([sys.executable, "-m", "cfsd", "--address", f"unix:{sock}",
                          "--log-level", "error"], cwd=str(ROOT),
                         env=dict(os.environ, TMPDIR=str(tmp)))
    try:
        for _ in range(500):
            if sock.exists():
                break
            time.sleep(0.01)
        env = dict(os.environ, CFSD_ADDRESS=f"unix:{sock}")
        repo = work / "repo"
        cfsctl = [sys.executable, "-m", "cfsctl", "--repo", str(repo)]
        subprocess.run([*cfsctl, "init", "--insecure"], check=True, env=env, cwd=str(ROOT),
                       capture_output=True)
        t = timed(lambda: subprocess.run([*cfsctl, "oci", "pull", "-q",
                                          f"oci-archive:{archive}:bench"], check=True, env=env,
                                         cwd=str(ROOT), capture_output=True))
        with open(f"/proc/{d.pid}/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    finally:
        d.terminate()
        d.wait()
    shutil.rmtree(work / "repo")
    shutil.rmtree(tmp)
    return t, hwm * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=300)
    ap.add_argument("--files", type=int, default=12000)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the generated image")
    ap.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="the one directory both sides write to: cfsd's repository and "
                         "TMPDIR, skopeo's --tmpdir and output, tar's extraction (default "
                         "/dev/shm, a tmpfs, so a throttled disk does not dominate)")
    a = ap.parse_args()
    for tool in ("skopeo", "tar"):
        if shutil.which(tool) is None:
            print(f"{tool} is required", file=sys.stderr)
            return 1
    cache = Path(tempfile.gettempdir()) / f"cfsd-bench-pull-{a.mib}-{a.files}-{a.layers}"
    cache.mkdir(exist_ok=True)
    print("preparing image ...", flush=True)
    archive = build_archive(cache, a.mib, a.files, a.layers)
    size = archive.stat().st_size
    work = Path(tempfile.mkdtemp(prefix="cfsd-bench-work-", dir=a.workdir))
    medium = f"{work.parent} ({filesystem_type(work)})"
    try:
        t_raw = raw_limit(archive)
        t_peer = peer(archive, work)
        t_ours, rss = ours(archive, work)
    finally:
        shutil.rmtree(work)
        if not a.keep:
            shutil.rmtree(cache)
    mb = size / 1e6
    print(f"image: {mb:.0f} MB gzip, {a.files} files, {a.layers} layers (read from {cache})")
    print(f"both sides write to: {medium}")
    print(f"cfsd pull:      {t_ours:6.2f} s  {mb / t_ours:6.0f} MB/s (compressed)")
    print(f"peer pipeline:  {t_peer:6.2f} s  (skopeo copy + tar -xzf)  speed cfsd/peer "
          f"{t_peer / t_ours:.2f}")
    print(f"raw limit:      {t_raw:6.2f} s  (isal gunzip + sha256)     cfsd reaches "
          f"{100 * t_raw / t_ours:.0f} % of it")
    print(f"cfsd peak RSS:  {rss / 1e6:6.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

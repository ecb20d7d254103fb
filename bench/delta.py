#!/usr/bin/env python3
"""Delta apply versus pulling the new image, from the same medium, through a running cfsd.

Usage: python bench/delta.py [--mib 120] [--files 3000] [--layers 3] [--changed 0.1]
                             [--media oci,oci-archive,docker] [--version 2] [--keep]
       python bench/delta.py --create [...]   (delta creation on two versions of real
                                              Python packages: see bench/delta_create.py)

Generates (once, cached in $TMPDIR/cfsd-bench-delta-*) an old image of --layers gzip layers
(about --mib MiB uncompressed, --files files) and a package-upgrade-like new image whose first
layer is rebuilt: --changed of its files are edited the way a rebuild changes them, a few
added and a few dropped; the other layers are unchanged.  An edited file is
  * text (half the files): about 3 % of its lines replaced, inserted or deleted;
  * binary: one block of 0.1-2 % of its size inserted or deleted (code grew or shrank, all
    that follows moves) and a 4-byte value rewritten about every 1 KiB (the addresses and
    offsets a relink changes); a file under 4 KiB gets a few such rewrites.
The delta is made the way a user makes one: both images are pulled into a repository and
`cfsctl oci create-delta old new DELTA.tar --format vN --name delta` writes it (an
oci-archive; unpacked, it is also the oci: layout).

Per medium (oci: layout, oci-archive:, docker:// on a loopback docker-registry) into fresh
repositories that hold the old image, it times:
  * apply:      `cfsctl oci pull DELTA` (the delta is detected and applied);
  * pull new:   `cfsctl oci pull NEW` (only the rebuilt layer is fetched; the rest is present);
  * pull fresh: `cfsctl oci pull NEW` into an empty repository (every layer);
and prints apply time as a ratio to both pulls, plus the bytes each reads from the medium
(delta blobs versus the new image's changed and total blobs).  Results are checked to be
identical (same manifest stream).
"""

from __future__ import annotations

import argparse
import gzip
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchlib import Cfsd  # noqa: E402

WORDS = [bytes(random.Random(i).choices(b"abcdefghijklmnopqrstuvwxyz",
                                        k=random.Random(i).randint(2, 10))) for i in range(2000)]
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def content(rng: random.Random, size: int) -> bytes:
    """Half incompressible (binaries), half text-like."""
    if rng.random() < 0.5:
        return rng.randbytes(size)
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(WORDS, k=64)) + b"\n"
    return bytes(out[:size])


def edit(rng: random.Random, data: bytes) -> bytes:
    """*data* as a rebuild of its package changes it (see the module docstring)."""
    if data[:64].isascii():
        lines = data.split(b"\n")
        for _ in range(max(1, len(lines) * 3 // 100)):
            i = rng.randrange(len(lines))
            what = rng.random()
            new_line = b" ".join(rng.choices(WORDS, k=rng.randint(3, 20)))
            if what < 0.5:
                lines[i] = new_line
            elif what < 0.8:
                lines.insert(i, new_line)
            elif len(lines) > 1:
                del lines[i]
        return b"\n".join(lines)
    b = bytearray(data)
    if len(b) >= 4096:
        n = max(16, int(len(b) * rng.uniform(0.001, 0.02)))
        i = rng.randrange(len(b) - n)
        if rng.random() < 0.6:
            b[i:i] = rng.randbytes(n)                   # code grew
        else:
            del b[i:i + n]                              # code shrank
    for _ in range(max(3, len(b) // 1024)):
        i = rng.randrange(max(1, len(b) - 4))
        b[i:i + 4] = rng.randbytes(4)                   # a relocated address or offset
    return bytes(b)


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    dirs = sorted({p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)})
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tf.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o755, 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


class Layout:
    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs/sha256").mkdir(parents=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.index: list[dict] = []

    def blob(self, data: bytes, mt: str) -> dict:
        d = sha(data)
        (self.path / "blobs/sha256" / d[7:]).write_bytes(data)
        return {"mediaType": mt, "digest": d, "size": len(data)}

    def manifest(self, data: bytes, tag: str, **extra: object) -> None:
        self.index.append({**self.blob(data, MANIFEST), **extra,
                           "annotations": {"org.opencontainers.image.ref.name": tag}})
        (self.path / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                          "manifests": self.index}))

    def image(self, tag: str, tars: list[bytes]) -> tuple[bytes, list[dict], bytes]:
        descs = [self.blob(gzip.compress(t, 3, mtime=0),
                           "application/vnd.oci.image.layer.v1.tar+gzip") for t in tars]
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
            "type": "layers", "diff_ids": [sha(t) for t in tars]}}).encode()
        m = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "config": self.blob(
            config, "application/vnd.oci.image.config.v1+json"), "layers": descs}).encode()
        self.manifest(m, tag)
        return m, descs, config


def archive(layout: Path, dest: Path) -> None:
    with tarfile.open(dest, "w") as tf:
        for name in ("oci-layout", "index.json", "blobs"):
            tf.add(layout / name, arcname=name)


def build(cache: Path, mib: int, nfiles: int, nlayers: int, changed: float,
          version: int, cfsd: Cfsd, work: Path) -> dict:
    """The old and new images (oci layout and archive) and the delta between them, made by
    `cfsctl oci create-delta` (cached in *cache* with info.json)."""
    info_path = cache / "info.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    rng = random.Random(7)
    per = nfiles // nlayers
    layers: list[dict[str, bytes]] = []
    for li in range(nlayers):
        sizes = [max(0, int(rng.lognormvariate(8, 2))) for _ in range(per)]
        scale = mib * (1 << 20) / nlayers / max(1, sum(sizes))
        layers.append({f"usr/l{li}/d{i // 100}/f{i}": content(rng, int(s * scale))
                       for i, s in enumerate(sizes)})
    new0 = {}
    for name, data in layers[0].items():
        r = rng.random()
        if r < 0.02:
            continue                                    # dropped
        new0[name] = edit(rng, data) if r < 0.02 + changed and data else data
    for i in range(per // 50):
        new0[f"usr/l0/new/f{i}"] = content(rng, rng.randint(100, 50_000))
    old_tars = [tar_of(x) for x in layers]
    new_tars = [tar_of(new0), *old_tars[1:]]
    images = Layout(cache / "images")
    images.image("old", old_tars)
    new_m, new_descs, new_c = images.image("new", new_tars)
    archive(cache / "images", cache / "images.tar")

    # the delta, as a user makes it: both images in a repository, then create-delta
    repo = work / "create"
    cfsd.run(repo, "init", "--insecure")
    for tag in ("old", "new"):
        cfsd.run(repo, "oci", "pull", "-q", f"oci:{cache / 'images'}:{tag}", tag)
    secs, out = cfsd.timed(repo, "--json", "oci", "create-delta", "old", "new",
                           str(cache / "delta.tar"), "--format", f"v{version}",
                           "--name", "delta", "-q")
    shutil.rmtree(repo)
    created = json.loads(out)
    assert created["target"] == sha(new_m), created
    kinds = [x["kind"] for x in created["layers"]]
    print(f"  cfsctl oci create-delta: {secs:.1f} s, layers {'/'.join(kinds)}", flush=True)
    with tarfile.open(cache / "delta.tar") as tf:                 # the same, as a layout
        tf.extractall(cache / "delta", filter="data")
    index = json.loads((cache / "delta/index.json").read_text())
    delta_m = json.loads((cache / "delta/blobs/sha256" /
                          index["manifests"][0]["digest"][7:]).read_text())
    info = {"new_digest": sha(new_m), "kinds": kinds, "create_s": secs,
            "delta_bytes": sum(d["size"] for d in delta_m["layers"]),
            "changed_bytes": new_descs[0]["size"],
            "new_bytes": sum(d["size"] for d in new_descs) + len(new_c),
            "tar_bytes": sum(len(t) for t in new_tars)}
    info_path.write_text(json.dumps(info))
    return info


def registry(work: Path) -> tuple[subprocess.Popen, str]:
    (work / "reg").mkdir()
    (work / "reg/config.yml").write_text(
        "version: 0.1\nlog: {level: info, accesslog: {disabled: true}}\n"
        f"storage: {{filesystem: {{rootdirectory: {work / 'reg/data'}}}}}\n"
        "http: {addr: 127.0.0.1:0}\n")
    log = open(work / "reg/log", "wb")  # noqa: SIM115
    p = subprocess.Popen(["docker-registry", "serve", str(work / "reg/config.yml")],
                         stderr=log, stdout=subprocess.DEVNULL)
    import re
    for _ in range(2000):
        m = re.search(rb"listening on (127\.0\.0\.1:\d+)", (work / "reg/log").read_bytes())
        if m:
            return p, m.group(1).decode()
        time.sleep(0.01)
    raise RuntimeError("docker-registry did not start")


def main() -> int:
    if "--create" in sys.argv[1:]:
        from bench.delta_create import main as create_main
        return create_main([x for x in sys.argv[1:] if x != "--create"])
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=120)
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--changed", type=float, default=0.1)
    ap.add_argument("--version", type=int, default=2, choices=(1, 2))
    ap.add_argument("--media", default="oci,oci-archive,docker")
    ap.add_argument("--keep", action="store_true", help="keep the generated images")
    ap.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    a = ap.parse_args()
    media = a.media.split(",")
    if "docker" in media and (shutil.which("docker-registry") is None
                              or shutil.which("skopeo") is None):
        media.remove("docker")
    cache = Path(tempfile.gettempdir()) / (f"cfsd-bench-delta-{a.mib}-{a.files}-{a.layers}-"
                                           f"{a.changed}-v{a.version}")
    cache.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cfsd-bench-delta-", dir=a.workdir))
    d = Cfsd(work)
    reg = None
    rows = []
    try:
        print("preparing images and delta ...", flush=True)
        info = build(cache, a.mib, a.files, a.layers, a.changed, a.version, d, work)
        refs = {"oci": (f"oci:{cache / 'delta'}:delta", f"oci:{cache / 'images'}:new"),
                "oci-archive": (f"oci-archive:{cache / 'delta.tar'}:delta",
                                f"oci-archive:{cache / 'images.tar'}:new")}
        if "docker" in media:
            reg, host = registry(work)
            for src, dst in ((f"oci:{cache / 'images'}:new", "img:new"),
                             (f"oci:{cache / 'delta'}:delta", "delta:v1")):
                subprocess.run(["skopeo", "copy", "-q", "--preserve-digests",
                                "--dest-tls-verify=false", src, f"docker://{host}/{dst}"],
                               check=True)
            refs["docker"] = (f"docker://{host}/delta:v1", f"docker://{host}/img:new")
        for medium in media:
            delta_ref, new_ref = refs[medium]
            extra = ["--tls-verify", "false"] if medium == "docker" else []
            times = {}
            for kind in ("apply", "pull", "fresh"):
                repo = work / f"repo-{medium}-{kind}"
                d.run(repo, "init", "--insecure")
                if kind != "fresh":
                    d.run(repo, "oci", "pull", "-q", f"oci:{cache / 'images'}:old", "old")
                ref = delta_ref if kind == "apply" else new_ref
                times[kind], out = d.timed(repo, "oci", "pull", "-q", *extra, ref, "new")
                assert f"manifest {info['new_digest']}" in out, out
                shutil.rmtree(repo)
            rows.append((medium, times))
    finally:
        d.stop()
        if reg is not None:
            reg.terminate()
            reg.wait()
        shutil.rmtree(work)
        if not a.keep:
            shutil.rmtree(cache)
    mb = 1e6
    print(f"images: {info['tar_bytes'] / mb:.0f} MB uncompressed in {a.layers} layers, "
          f"{a.files} files, {a.changed:.0%} of the first layer's files edited")
    print(f"delta: cfsctl oci create-delta --format v{a.version}, layers "
          f"{'/'.join(info['kinds'])}, {info['create_s']:.1f} s to create")
    print(f"bytes read: delta {info['delta_bytes'] / mb:.2f} MB  vs  new image "
          f"{info['new_bytes'] / mb:.2f} MB ({info['delta_bytes'] / info['new_bytes']:.1%}), "
          f"changed layer {info['changed_bytes'] / mb:.2f} MB "
          f"({info['delta_bytes'] / info['changed_bytes']:.1%})")
    print(f"{'medium':12} {'apply':>8} {'pull new':>9} {'ratio':>6} {'pull fresh':>11} "
          f"{'ratio':>6}")
    for medium, t in rows:
        print(f"{medium:12} {t['apply']:7.2f}s {t['pull']:8.2f}s {t['apply'] / t['pull']:6.2f} "
              f"{t['fresh']:10.2f}s {t['apply'] / t['fresh']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

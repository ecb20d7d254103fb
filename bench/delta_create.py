#!/usr/bin/env python3
"""Delta creation on a realistic pair: two versions of a Python site-packages tree as images.

Usage: python bench/delta.py --create [--packages SPEC] [--old-dir DIR --new-dir DIR]
                                      [--formats v1,v2] [--keep] [--pair renames]
   or: python bench/delta_create.py ...

The old and new trees are ``pip install --target`` of two versions of a few real packages
(small version bumps by default: numpy, cryptography, pip, setuptools, requests, urllib3;
wheels are downloaded once into $TMPDIR/cfsd-bench-create/wheels), or any two directories
given with --old-dir/--new-dir.  ``--pair renames`` instead generates (seeded, no network) a
~2.4 MiB tree of libraries, documents and scripts and a new version of it with files edited,
added, removed, renamed and version-bumped (``libapp.so.1.2.3`` -> ``libapp.so.1.2.4``) and
documents whose date line changed, like the pair of issue 16.  Each image is built with
umoci (python's tarfile when umoci is missing): a shared base layer plus one layer holding
the tree at usr/lib/python3.11/site-packages.  Through a running cfsd, both images are pulled into a
repository and `cfsctl oci create-delta` is timed for each format; the delta is then applied
to a repository holding only the old image and checked to give the new image.

Printed per format: the delta's layer blobs as a fraction of the compressed changed layers
(the target <= 30 % for small version bumps), the archive size, creation time (and apply
time for reference), next to Go tar-diff's ratio on the issue-16 pair (a constant, for
context) and whole-layer ``zstd --patch-from -19 --long`` of each changed layer against the
old layer at the same position (the practical floor).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.benchlib import Cfsd  # noqa: E402

SITE = "usr/lib/python3.11/site-packages"
DEFAULT_PACKAGES = ("numpy==1.26.3:1.26.4,cryptography==42.0.7:42.0.8,pip==24.1:24.1.1,"
                    "setuptools==69.5.0:69.5.1,requests==2.32.2:2.32.3,urllib3==2.2.1:2.2.2")
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
GO_TARDIFF_RATIO = 0.134      # Go tar-diff v1 on the issue-16 renames pair (for context)
WORDS = ("the and of to in is for on that with as by this be are from at or an it not "
         "config value option return error file path image layer delta source target "
         "function module object buffer stream version release library install").split()


def sh(*args: str) -> str:
    p = subprocess.run(args, capture_output=True, check=False)
    if p.returncode:
        raise RuntimeError(f"{' '.join(args)}: {p.stderr.decode(errors='replace')}")
    return p.stdout.decode()


def pip_trees(cache: Path, spec: str) -> tuple[Path, Path, str]:
    """pip install --target of the old and of the new versions (cached)."""
    pairs = [p.split("==") for p in spec.split(",")]
    old = [f"{n}=={v.split(':')[0]}" for n, v in pairs]
    new = [f"{n}=={v.split(':')[1]}" for n, v in pairs]
    key = hashlib.sha256(spec.encode()).hexdigest()[:12]
    wheels = cache / "wheels"
    out = []
    for name, reqs in (("old", old), ("new", new)):
        target = cache / f"site-{key}-{name}"
        if not (target / ".done").exists():
            shutil.rmtree(target, ignore_errors=True)
            pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
            sh(*pip, "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels), *reqs)
            sh(*pip, "install", "--no-deps", "--no-index", "--find-links", str(wheels),
               "--no-compile", "--target", str(target), *reqs)
            (target / ".done").touch()
        out.append(target)
    desc = ", ".join(f"{n} {v.replace(':', ' -> ')}" for n, v in pairs)
    return out[0], out[1], desc


def _text(r: random.Random, n: int) -> bytes:
    out: list[str] = []
    size = 0
    while size < n:
        line = " ".join(r.choice(WORDS) for _ in range(r.randint(3, 14))) + "\n"
        out.append(line)
        size += len(line)
    return "".join(out).encode()[:n]


def _binary(r: random.Random, n: int) -> bytes:
    """Library-like bytes: code-ish random runs, tables, strings and zero padding."""
    out = bytearray()
    while len(out) < n:
        k = r.random()
        if k < 0.45:
            out += r.randbytes(r.randint(64, 2048))
        elif k < 0.7:
            out += bytes(r.randint(0, 40) for _ in range(r.randint(64, 1024)))
        elif k < 0.9:
            out += _text(r, r.randint(32, 512)).replace(b"\n", b"\0")
        else:
            out += bytes(r.randint(16, 512))
    return bytes(out[:n])


def _edit(r: random.Random, data: bytes, edits: int) -> bytes:
    b = bytearray(data)
    for _ in range(edits):
        i = r.randrange(max(1, len(b) - 64))
        k = r.random()
        if k < 0.4:
            b[i:i + 16] = r.randbytes(16)
        elif k < 0.7:
            b[i:i] = r.randbytes(r.randint(1, 300))
        else:
            del b[i:i + r.randint(1, 300)]
    return bytes(b)


def renames_trees(cache: Path, seed: int = 16) -> tuple[Path, Path, str]:
    """The issue-16 style pair: edits, additions, removals, renames and version bumps."""
    r = random.Random(seed)
    old: dict[str, bytes] = {}
    for i in range(40):
        old[f"lib/lib{WORDS[i % len(WORDS)]}{i}.so.1.2.3"] = _binary(r, r.randint(8, 90) << 10)
    for i in range(60):
        date = f"Date: 2024-0{1 + i % 9}-1{i % 10}\n".encode()
        old[f"share/doc/pkg{i}-1.0/README.md"] = date + _text(r, r.randint(1, 40) << 10)
    for i in range(20):
        old[f"share/web/chunk{i}.{r.randbytes(4).hex()}.js"] = _text(r, r.randint(4, 60) << 10)
    for i in range(50):
        old[f"lib/python/mod{i}.py"] = _text(r, r.randint(1, 24) << 10)
    new = dict(old)
    names = sorted(old)
    r.shuffle(names)
    libs = [n for n in names if n.startswith("lib/lib")]
    for n in libs[:10]:                          # version bumps: renamed and edited
        del new[n]
        new[n.replace("1.2.3", "1.2.4")] = _edit(r, old[n], r.randint(2, 8))
    for n in [n for n in names if n.endswith(".py")][:5]:   # moved to another directory
        del new[n]
        new[n.replace("lib/python/", "lib/python/pkg/")] = _edit(r, old[n], 2)
    docs = [n for n in names if n.endswith(".md")]
    for n in docs[:20]:                          # new version directory, new date line
        del new[n]
        new[n.replace("-1.0/", "-1.1/")] = b"Date: 2025-06-30\n" + old[n].split(b"\n", 1)[1]
    for n in [n for n in names if n.endswith(".js")][:12]:  # content-hashed bundle names
        del new[n]
        new[n.split(".")[0] + f".{r.randbytes(4).hex()}.js"] = _edit(r, old[n], 3)
    for n in [n for n in names if n.endswith(".py")][5:13] + libs[10:20]:
        if n in new and r.random() < 0.5:
            new[n] = _edit(r, old[n], r.randint(1, 6))
    for n in docs[20:32]:                        # removed
        del new[n]
    for i in range(8):                           # new files
        new[f"lib/python/new{i}.py"] = _text(r, r.randint(1, 16) << 10)
    key = hashlib.sha256(repr(sorted((k, len(v)) for k, v in new.items())).encode())
    out = []
    for tag, files in (("old", old), ("new", new)):
        target = cache / f"renames-{seed}-{key.hexdigest()[:8]}-{tag}"
        if not (target / ".done").exists():
            shutil.rmtree(target, ignore_errors=True)
            for name, data in files.items():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                (target / name).write_bytes(data)
            (target / ".done").touch()
        out.append(target)
    return out[0], out[1], "generated pair with edits, renames and version bumps"


def _layers(layout: Path, tag: str) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            man = json.loads((layout / "blobs/sha256" / m["digest"][7:]).read_text())
            return [x["digest"][7:] for x in man["layers"]]
    raise KeyError(tag)


def zstd_patch_from(layout: Path, work: Path) -> int:
    """Bytes of ``zstd --patch-from -19 --long`` of every changed new layer (uncompressed)
    against the old layer at the same position."""
    old, new = _layers(layout, "old"), _layers(layout, "new")
    total = 0
    for i, digest in enumerate(new):
        if digest in old:
            continue
        paths = []
        for name, d in (("o", old[min(i, len(old) - 1)]), ("n", digest)):
            p = work / f"zpf-{name}.tar"
            p.write_bytes(gzip.decompress((layout / "blobs/sha256" / d).read_bytes()))
            paths.append(p)
        out = work / "zpf.zst"
        sh("zstd", "-q", "-f", "-19", "--long=27", f"--patch-from={paths[0]}", str(paths[1]),
           "-o", str(out))
        total += out.stat().st_size
    return total


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".done"))


def umoci_images(layout: Path, old: Path, new: Path) -> None:
    """old/new = base layer + a site-packages layer, built with umoci."""
    work = Path(tempfile.mkdtemp(prefix="cfsd-bench-umoci-"))
    try:
        sh("umoci", "init", "--layout", str(layout))
        sh("umoci", "new", "--image", f"{layout}:base")
        sh("umoci", "unpack", "--image", f"{layout}:base", str(work / "b"))
        root = work / "b/rootfs"
        for d in ("usr/bin", "usr/lib/python3.11", "etc"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "etc/os-release").write_text("NAME=bench\nVERSION=1\n")
        (root / "usr/bin/python3").write_bytes(Path(sys.executable).resolve().read_bytes())
        sh("umoci", "repack", "--image", f"{layout}:base", str(work / "b"))
        for tag, tree in (("old", old), ("new", new)):
            bundle = work / tag
            sh("umoci", "unpack", "--image", f"{layout}:base", str(bundle))
            _copy_tree(tree, bundle / "rootfs" / SITE)
            sh("umoci", "repack", "--image", f"{layout}:{tag}", str(bundle))
        sh("umoci", "gc", "--layout", str(layout))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tar_of(tree: Path, prefix: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(tree, arcname=prefix, filter=lambda ti: None if ti.name.endswith("/.done")
               else ti)
    return buf.getvalue()


def tarfile_images(layout: Path, old: Path, new: Path) -> None:
    """The same images written by hand (when umoci is missing)."""
    def sha(b: bytes) -> str:
        return "sha256:" + hashlib.sha256(b).hexdigest()

    def blob(b: bytes, mt: str) -> dict:
        (layout / "blobs/sha256" / sha(b)[7:]).write_bytes(b)
        return {"mediaType": mt, "digest": sha(b), "size": len(b)}

    (layout / "blobs/sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    base_dir = Path(tempfile.mkdtemp())
    (base_dir / "etc").mkdir()
    (base_dir / "etc/os-release").write_text("NAME=bench\nVERSION=1\n")
    base = _tar_of(base_dir, ".")
    shutil.rmtree(base_dir)
    index = []
    for tag, tree in (("old", old), ("new", new)):
        tars = [base, _tar_of(tree, SITE)]
        descs = [blob(gzip.compress(t, 6, mtime=0),
                      "application/vnd.oci.image.layer.v1.tar+gzip") for t in tars]
        cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
            "type": "layers", "diff_ids": [sha(t) for t in tars]}}).encode()
        m = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "config": blob(
            cfg, "application/vnd.oci.image.config.v1+json"), "layers": descs}).encode()
        index.append({**blob(m, MANIFEST),
                      "annotations": {"org.opencontainers.image.ref.name": tag}})
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": index}))


def tree_size(p: Path) -> tuple[int, int]:
    files = [f for f in p.rglob("*") if f.is_file() and not f.is_symlink()]
    return len(files), sum(f.stat().st_size for f in files)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packages", default=DEFAULT_PACKAGES,
                    help="name==OLD:NEW,... installed with pip --target")
    ap.add_argument("--old-dir", type=Path, help="use this tree as the old site-packages")
    ap.add_argument("--new-dir", type=Path, help="use this tree as the new site-packages")
    ap.add_argument("--pair", choices=("packages", "renames"), default="packages",
                    help="pip version bumps, or a generated pair with renames")
    ap.add_argument("--formats", default="v1,v2")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    a = ap.parse_args(argv)
    cache = Path(tempfile.gettempdir()) / "cfsd-bench-create"
    cache.mkdir(exist_ok=True)
    print("preparing the trees ...", flush=True)
    if a.old_dir and a.new_dir:
        old, new, what = a.old_dir, a.new_dir, f"{a.old_dir} -> {a.new_dir}"
    elif a.pair == "renames":
        old, new, what = renames_trees(cache)
    else:
        old, new, what = pip_trees(cache, a.packages)
    work = Path(tempfile.mkdtemp(prefix="cfsd-bench-create-", dir=a.workdir))
    layout = work / "images"
    builder = "umoci" if shutil.which("umoci") else "tarfile"
    (umoci_images if builder == "umoci" else tarfile_images)(layout, old, new)
    zpf = zstd_patch_from(layout, work) if shutil.which("zstd") else 0
    d = Cfsd(work)
    rows = []
    try:
        both = work / "both"
        d.run(both, "init", "--insecure")
        for tag in ("old", "new"):
            d.run(both, "oci", "pull", "-q", f"oci:{layout}:{tag}", tag)
        for fmt in a.formats.split(","):
            out = work / f"delta-{fmt}.tar"
            secs, text = d.timed(both, "--json", "oci", "create-delta", "old", "new", str(out),
                                 "--format", fmt, "-q")
            created = json.loads(text)
            changed = [x for x in created["layers"] if x["kind"] != "reused"]
            blobs = sum({x["diff_id"]: x["size"] for x in changed}.values())
            layer_bytes = sum(x["layer_size"] for x in changed)
            fresh = work / f"fresh-{fmt}"
            d.run(fresh, "init", "--insecure")
            d.run(fresh, "oci", "pull", "-q", f"oci:{layout}:old", "old")
            apply_s, applied = d.timed(fresh, "oci", "apply-delta", "-q",
                                       f"oci-archive:{out}", "new")
            assert f"manifest {created['target']}" in applied, applied
            shutil.rmtree(fresh)
            rows.append((fmt, secs, apply_s, blobs, layer_bytes, created["size"],
                         [x["kind"] for x in created["layers"]]))
    finally:
        d.stop()
        if not a.keep:
            shutil.rmtree(work)
    (n_old, b_old), (n_new, b_new) = tree_size(old), tree_size(new)
    mb = 1e6
    print(f"trees: {what}")
    print(f"       old {n_old} files {b_old / mb:.1f} MB, new {n_new} files "
          f"{b_new / mb:.1f} MB; images built with {builder}")
    print(f"Go tar-diff v1 reference (issue 16 pair): {GO_TARDIFF_RATIO:.3f} of changed layers;"
          f" zstd --patch-from -19 --long of the changed layers: {zpf / mb:.3f} MB")
    print(f"{'format':7} {'layers':18} {'delta blobs':>12} {'changed layers':>15} "
          f"{'fraction':>9} {'vs zstd':>8} {'archive':>9} {'create':>8} {'apply':>7}")
    for fmt, secs, apply_s, blobs, layer_bytes, size, kinds in rows:
        print(f"{fmt:7} {'/'.join(k[:6] for k in kinds):18} {blobs / mb:9.3f} MB "
              f"{layer_bytes / mb:12.3f} MB {blobs / max(1, layer_bytes):9.3f} "
              f"{blobs / max(1, zpf):7.2f}x {size / mb:6.2f} MB {secs:7.2f}s {apply_s:6.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

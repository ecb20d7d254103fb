#!/usr/bin/env python3
"""The main job, end to end, with nothing running beforehand.

Builds sample layers locally, then drives the real `cfsctl` (which starts a private cfsd
because no daemon is listening): init a repository, import the layers, read them back
byte-for-byte, list, garbage-collect and fsck.  Run with `.ci/run demo`.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path


def cfsctl(*args: str, input: bytes | None = None) -> bytes:
    cmd = [sys.executable, "-m", "cfsctl", *args]
    print("$ cfsctl " + " ".join(args), flush=True)
    env = dict(os.environ)
    env.pop("CFSD_ADDRESS", None)
    p = subprocess.run(cmd, input=input, capture_output=True, env=env)
    if p.returncode != 0:
        sys.stderr.write(p.stderr.decode())
        raise SystemExit(f"cfsctl {' '.join(args)} failed with {p.returncode}")
    return p.stdout


def sample_layer(version: int) -> bytes:
    """A small OS-like layer: directories, binaries, config files, links, a device."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name: str, data: bytes | None = None, **kw: object) -> None:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000 + version
            for k, v in kw.items():
                setattr(ti, k, v)
            if data is not None:
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)

        for d in ("usr", "usr/bin", "usr/lib", "etc", "run"):
            add(d, type=tarfile.DIRTYPE, mode=0o755)
        for i in range(40):
            add(f"usr/bin/tool{i}", hashlib.sha256(b"%d-%d" % (i, version)).digest() * 900,
                mode=0o755)
        add("usr/lib/libdemo.so.1", os.urandom(200_000), mode=0o644)
        add("etc/os-release", f"ID=demo\nVERSION_ID={version}\n".encode(), mode=0o644)
        add("usr/bin/sh", type=tarfile.SYMTYPE, linkname="tool0")
        add("usr/bin/tool-hard", type=tarfile.LNKTYPE, linkname="usr/bin/tool1")
        add("etc/caps", b"x" * 100, pax_headers={"SCHILY.xattr.security.capability": "\x01"})
    return buf.getvalue()


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="cfsd-demo-"))
    repo = str(work / "repo")
    t0 = time.monotonic()
    print(cfsctl("--repo", repo, "init", "--algorithm", "fsverity-sha256-12").decode())
    layers = []
    for version in (1, 2):
        tar = sample_layer(version)
        diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
        verity = cfsctl("--repo", repo, "oci", "import-layer", diff_id, f"demo/v{version}",
                        input=tar).decode().strip()
        print(f"  layer v{version}: {diff_id} -> {verity} ({len(tar)} bytes)")
        back = cfsctl("--repo", repo, "cat", f"oci-layer-{diff_id}")
        if back != tar:
            raise SystemExit("layer did not round-trip byte for byte")
        layers.append(diff_id)
    print("  both layers reassemble byte for byte")
    print(cfsctl("--repo", repo, "gc", "--dry-run").decode())
    print(cfsctl("--repo", repo, "fsck").decode())
    print(f"demo finished in {time.monotonic() - t0:.1f} s (repository at {repo})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

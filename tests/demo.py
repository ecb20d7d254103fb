#!/usr/bin/env python3
"""The main job, end to end, with nothing running beforehand.

1. Build two versions of a small OS-like image locally (umoci), as an oci-archive (skopeo)
   and push both to a local docker-registry on loopback.
2. A "publisher" repository pulls both versions from the registry and creates an oci-delta
   artifact v1 -> v2 (`cfsctl oci create-delta`).
3. A "client" repository pulls v1 from the oci-archive, then pulls the *delta* (from the
   registry, where it is pushed as an artifact, and from an archive): cfsd recognises it,
   rebuilds v2 from v1 plus the delta and stores it exactly as a direct pull would.
4. Every id is compared with the publisher's direct pull; fsck, checkout and gc run.

Every command is the real `cfsctl`, which starts a private cfsd because no daemon listens.
Run with `.ci/run demo`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.ocitools import Registry, build_image, require_tools  # noqa: E402


def cfsctl(*args: str) -> str:
    print("$ cfsctl " + " ".join(args), flush=True)
    env = dict(os.environ)
    env.pop("CFSD_ADDRESS", None)
    env["XDG_RUNTIME_DIR"] = env.get("XDG_RUNTIME_DIR", "/nonexistent")
    p = subprocess.run([sys.executable, "-m", "cfsctl", *args], capture_output=True, env=env,
                       cwd=str(ROOT))
    if p.returncode != 0:
        sys.stderr.write(p.stderr.decode())
        raise SystemExit(f"cfsctl {' '.join(args)} failed with {p.returncode}")
    return p.stdout.decode()


def customize(version: int):  # noqa: ANN201
    def run(root: Path) -> None:
        bin_dir = root / "usr/bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        rnd = __import__("random").Random(7)
        tool = bytearray(rnd.randbytes(3_000_000))
        if version == 2:  # an "upgrade": a few patched regions in a big binary
            for off in (1000, 900_000, 2_500_000):
                tool[off:off + 64] = b"v2" * 32
        (bin_dir / "tool").write_bytes(bytes(tool))
        (root / "etc").mkdir(exist_ok=True)
        (root / "etc/os-release").write_text(f"ID=demo\nVERSION_ID={version}\n")
        lib = root / "usr/lib/demo"
        lib.mkdir(parents=True, exist_ok=True)
        for i in range(200):
            (lib / f"mod{i}.py").write_text(f"# module {i}\nVALUE = {i * (version + 1)}\n" * 20)
        if version == 2:
            (lib / "mod7.py").unlink()
            (lib / "new_feature.py").write_text("FEATURE = True\n")
        os.utime(root / "usr", (1_700_000_000, 1_700_000_000))
    return run


def main() -> int:
    require_tools("umoci", "skopeo", "docker-registry")
    work = Path(tempfile.mkdtemp(prefix="cfsd-demo-"))
    t0 = time.monotonic()
    layout = work / "layout"
    print("== building images v1 and v2 locally", flush=True)
    build_image(layout, "v1", {}, customize=customize(1))
    build_image(layout, "v2", {}, base="v1", customize=customize(2))
    subprocess.run(["skopeo", "copy", "-q", f"oci:{layout}:v1",
                    f"oci-archive:{work / 'v1.tar'}:v1"], check=True)
    subprocess.run(["skopeo", "copy", "-q", f"oci:{layout}:v2",
                    f"oci-archive:{work / 'v2.tar'}:v2"], check=True)
    registry = Registry()
    try:
        for tag in ("v1", "v2"):
            registry.push(f"oci:{layout}:{tag}", f"demo:{tag}")
        reg = f"docker://{registry.host}/demo"

        print("\n== publisher: pull both versions from the registry, create the delta")
        pub = str(work / "publisher")
        cfsctl("--repo", pub, "init", "--insecure")
        for tag in ("v1", "v2"):
            print(cfsctl("--repo", pub, "oci", "pull", "-q", "--tls-verify=false",
                         f"{reg}:{tag}", tag))
        delta = work / "delta.tar"
        print(cfsctl("--repo", pub, "oci", "create-delta", "-q", "v1", "v2", str(delta)))
        v2_size = (work / "v2.tar").stat().st_size
        print(f"delta: {delta.stat().st_size} bytes; the full v2 archive: {v2_size} bytes")
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false",
                        f"oci-archive:{delta}", f"{reg}:v2-delta"], check=True)

        print("\n== client: v1 from an archive, then v2 from the delta in the registry")
        client = str(work / "client")
        cfsctl("--repo", client, "init", "--insecure")
        print(cfsctl("--repo", client, "oci", "pull", "-q", f"oci-archive:{work / 'v1.tar'}:v1",
                     "v1"))
        print(cfsctl("--repo", client, "oci", "pull", "-q", "--tls-verify=false",
                     f"{reg}:v2-delta", "v2"))
        client2 = str(work / "client-archive")
        cfsctl("--repo", client2, "init", "--insecure")
        cfsctl("--repo", client2, "oci", "pull", "-q", f"oci-archive:{work / 'v1.tar'}:v1", "v1")
        print(cfsctl("--repo", client2, "oci", "apply-delta", "-q", f"oci-archive:{delta}",
                     "v2"))
    finally:
        registry.stop()

    print("\n== checking the results against the publisher's direct pull")
    want = json.loads(cfsctl("--repo", pub, "oci", "inspect", "v2"))
    for repo in (client, client2):
        got = json.loads(cfsctl("--repo", repo, "oci", "inspect", "v2"))
        if got != want:
            raise SystemExit(f"{repo}: v2 differs from a direct pull")
        print(f"{repo}: manifest, config and composefs image "
              f"{got['composefs_erofs'][:16]}… identical to a direct pull of v2")
        print(cfsctl("--repo", repo, "oci", "fsck"))
    checkout = work / "rootfs"
    print(cfsctl("--repo", client, "oci", "checkout", "v2", str(checkout)))
    print("os-release in v2:", (checkout / "etc/os-release").read_text().strip().replace(
        "\n", "; "))
    print(cfsctl("--repo", client, "oci", "untag", "v1"))
    print(cfsctl("--repo", client, "gc"))
    print(f"demo finished in {time.monotonic() - t0:.1f} s (work directory {work})")
    if "--keep" not in sys.argv:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

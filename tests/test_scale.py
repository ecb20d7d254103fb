"""Memory stays flat in the number of entries: a layer of a million files pulls, with its
composefs image built, inside 300 MB of daemon RSS (peak, whole process)."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

from tests.conftest import Daemon, run_cfsctl
from tests.deltatools import GZIP_LAYER, OCI_CONFIG, Layout, go_json

ENTRIES = 1_000_000
PER_DIR = 1000
MIB = 1 << 20
RSS_LIMIT = 300 * 1000 * 1000          # "300 MB"


def _header(name: bytes, typeflag: bytes, mode: int) -> bytes:
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"%07o\0" % mode
    h[108:124] = b"0000000\x000000000\0"
    h[124:136] = b"00000000000\0"
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def write_million_layer(path: Path) -> tuple[str, dict]:
    """A gzip ustar layer of ENTRIES empty files in directories of PER_DIR, streamed to
    *path*; returns (diff_id, descriptor) without holding the tar in memory."""
    diff = hashlib.sha256()
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    blob = hashlib.sha256()
    size = 0
    with open(path, "wb") as f:
        def put(data: bytes) -> None:
            nonlocal size
            diff.update(data)
            out = comp.compress(data)
            blob.update(out)
            size += len(out)
            f.write(out)
        put(_header(b"usr/", b"5", 0o755))
        for d in range(ENTRIES // PER_DIR):
            chunk = [_header(b"usr/d%d/" % d, b"5", 0o755)]
            chunk += [_header(b"usr/d%d/f%d" % (d, i), b"0", 0o644) for i in range(PER_DIR)]
            put(b"".join(chunk))
        put(bytes(1024))
        out = comp.flush()
        blob.update(out)
        size += len(out)
        f.write(out)
    digest = "sha256:" + blob.hexdigest()
    final = path.with_name(digest[7:])
    path.rename(final)
    return "sha256:" + diff.hexdigest(), {"mediaType": GZIP_LAYER, "digest": digest,
                                          "size": size}


def test_million_entry_layer_pulls_within_300_mb(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    diff_id, ldesc = write_million_layer(layout.path / "blobs/sha256/layer.tmp")
    config = go_json({"architecture": "amd64", "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    cdesc = layout.blob(config, OCI_CONFIG)
    manifest = json.dumps({"schemaVersion": 2,
                           "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": cdesc, "layers": [ldesc]}).encode()
    layout.add_manifest(manifest, "million")
    d = Daemon(tmp_path)
    try:
        repo = str(tmp_path / "repo")
        run_cfsctl("--repo", repo, "init", "--insecure", address=d.address)
        base = d.status("VmRSS")
        run_cfsctl("--repo", repo, "oci", "pull", f"oci:{layout.path}:million", "million",
                   address=d.address)
        peak = d.status("VmHWM")
        assert peak < RSS_LIMIT, f"peak RSS {peak / MIB:.0f} MiB (idle {base / MIB:.0f} MiB)"
        # the image holds every entry: the first and the last file are in it
        ids = [n for n in os.listdir(Path(repo) / "images") if n != "refs"]
        assert len(ids) == 1
        last = ENTRIES // PER_DIR - 1
        lines = run_cfsctl("--repo", repo, "dump-files", ids[0], "/usr/d0/f0",
                           f"/usr/d{last}/f{PER_DIR - 1}", address=d.address).stdout
        assert [line.split(b" ")[0] for line in lines.splitlines()] == [
            b"/usr/d0/f0", b"/usr/d%d/f%d" % (last, PER_DIR - 1)]
        assert d.alive()
    finally:
        d.stop()

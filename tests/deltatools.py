"""Independent oci-delta tooling for the tests; shares no code with cfsd.

* images: deterministic layer tars from entry lists (files, directories, symlinks, hardlinks,
  whiteouts, devices) written into OCI layouts;
* a tar-diff encoder: DATA for everything but chosen file contents, COPY for identical
  files, bsdiff control triples (``bsdiff4``) as ADD_DATA/DATA/SEEK, block-wise SEEK+COPY for
  large same-size files, and (v2) ZSTD_DICT frames made by the real ``zstd --patch-from``;
  a reference decoder checks every patch before it is used;
* oci-delta artifacts assembled as docs/delta.md describes (layout, archive, registry push),
  optionally with a cosign simple-signing signature.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bsdiff4.core
import httpx
import zstandard

MTIME = 1_700_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR_DIFF = "application/vnd.tar-diff"
DELTA_TYPE = "application/vnd.io.github.containers.oci-delta.v1"
EMPTY = b"{}"
HEADER_V1 = b"tardf1\n\0"
HEADER_V2 = b"tardf2\n\0"
OP_DATA, OP_OPEN, OP_COPY, OP_ADD, OP_SEEK, OP_ZSTD = range(6)
DATA_CHUNK = 1 << 20


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def go_json(obj: Any) -> bytes:
    """Compact JSON with sorted keys, as Go's json.Marshal of maps writes it."""
    text = json.dumps(obj, separators=(",", ":"), sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


# ------------------------------------------------------------------------------ layers

@dataclass
class Entry:
    """One tar member: kind is file, dir, symlink, hardlink, whiteout, opaque or chardev."""

    path: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    target: str = ""
    rdev: tuple[int, int] = (0, 0)


def F(path: str, data: bytes, mode: int = 0o644) -> Entry:  # noqa: N802
    return Entry(path, "file", data, mode)


def D(path: str) -> Entry:  # noqa: N802
    return Entry(path, "dir", mode=0o755)


def make_tar(entries: list[Entry]) -> bytes:
    """A deterministic layer tar (PAX format, fixed mtimes, owner 0)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            name = e.path
            if e.kind == "whiteout":
                d, _, base = name.rpartition("/")
                name = f"{d}/.wh.{base}" if d else f".wh.{base}"
            elif e.kind == "opaque":
                name = f"{name}/.wh..wh..opq"
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.uid, ti.gid, ti.mode = MTIME, 0, 0, e.mode
            if e.kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif e.kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, e.target
            elif e.kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, e.target
            elif e.kind == "chardev":
                ti.type, (ti.devmajor, ti.devminor) = tarfile.CHRTYPE, e.rdev
            elif e.kind in ("file", "whiteout", "opaque"):
                ti.size = len(e.data)
            else:
                raise ValueError(e.kind)
            tf.addfile(ti, io.BytesIO(e.data) if ti.size else None)
    return buf.getvalue()


def merged_files(layers: list[list[Entry]]) -> dict[str, bytes]:
    """Regular files of the merged root of *layers* (whiteouts and shadowing applied)."""
    files: dict[str, bytes | None] = {}

    def drop(prefix: str) -> None:
        for k in [k for k in files if k == prefix or k.startswith(prefix + "/")]:
            del files[k]

    for layer in layers:
        for e in layer:
            if e.kind == "whiteout":
                drop(e.path)
            elif e.kind == "opaque":
                for k in [k for k in files if k.startswith(e.path + "/")]:
                    del files[k]
            elif e.kind == "file":
                drop(e.path)
                files[e.path] = e.data
            elif e.kind == "hardlink":
                drop(e.path)
                files[e.path] = files.get(e.target)
            elif e.kind == "dir":
                files.pop(e.path, None)
            else:
                drop(e.path)
                files[e.path] = None
    return {k: v for k, v in files.items() if v is not None}


# ------------------------------------------------------------------------------ images

@dataclass
class Image:
    """An image written into a layout."""

    tag: str
    manifest: bytes
    config: bytes
    layers: list[bytes]          # uncompressed tars
    blobs: list[bytes]           # compressed blobs, manifest order
    descriptors: list[dict[str, Any]]

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    @property
    def config_digest(self) -> str:
        return sha256(self.config)

    @property
    def diff_ids(self) -> list[str]:
        return [sha256(t) for t in self.layers]


class Layout:
    """An OCI image layout directory written by hand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs/sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_bytes(b'{"imageLayoutVersion":"1.0.0"}')
        self.entries: list[dict[str, Any]] = []
        self._write_index()

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        d = sha256(data)
        (self.path / "blobs/sha256" / d[7:]).write_bytes(data)
        return {"mediaType": media_type, "digest": d, "size": len(data)}

    def _write_index(self) -> None:
        (self.path / "index.json").write_bytes(go_json({"schemaVersion": 2,
                                                        "manifests": self.entries}))

    def add_manifest(self, data: bytes, name: str | None, **extra: Any) -> dict[str, Any]:
        desc = self.blob(data, OCI_MANIFEST)
        desc.update(extra)
        if name is not None:
            desc["annotations"] = {"org.opencontainers.image.ref.name": name}
            self.entries = [e for e in self.entries
                            if e.get("annotations", {}).get(
                                "org.opencontainers.image.ref.name") != name]
        self.entries.append(desc)
        self._write_index()
        return desc

    def write_image(self, tag: str, layers: list[bytes], level: int = 6) -> Image:
        """An amd64/linux image of gzip layers (mtime 0 in the gzip header)."""
        blobs = [gzip.compress(t, compresslevel=level, mtime=0) for t in layers]
        descs = [self.blob(b, GZIP_LAYER) for b in blobs]
        config = go_json({"architecture": "amd64", "os": "linux",
                          "config": {"Env": ["PATH=/usr/bin"]},
                          "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in layers]}})
        cdesc = self.blob(config, OCI_CONFIG)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cdesc,
                               "layers": descs}, indent=2).encode() + b"\n"
        self.add_manifest(manifest, tag)
        return Image(tag, manifest, config, layers, blobs, descs)


# ------------------------------------------------------------------------------ tar-diff

def uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def op(code: int, size: int, payload: bytes = b"") -> bytes:
    return bytes([code]) + uvarint(size) + payload


class OpStream:
    """Collects ops, tracking the current source and position like a decoder would."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.used: set[int] = set()
        self.cur: str | None = None
        self.pos = 0

    def emit(self, code: int, size: int, payload: bytes = b"") -> None:
        self.used.add(code)
        self.out += op(code, size, payload)

    def data(self, b: bytes) -> None:
        for i in range(0, len(b), DATA_CHUNK):
            self.emit(OP_DATA, len(b[i:i + DATA_CHUNK]), b[i:i + DATA_CHUNK])

    def open(self, name: str) -> None:
        if self.cur != name:
            raw = name.encode()
            self.emit(OP_OPEN, len(raw), raw)
            self.cur, self.pos = name, 0

    def seek(self, pos: int) -> None:
        if self.pos != pos:
            self.emit(OP_SEEK, pos)
            self.pos = pos

    def copy(self, n: int) -> None:
        self.emit(OP_COPY, n)
        self.pos += n

    def add(self, payload: bytes) -> None:
        self.emit(OP_ADD, len(payload), payload)
        self.pos += len(payload)


def zstd_patch_frame(old: bytes, new: bytes) -> bytes:
    """One zstd frame of *new* against *old* as a raw dictionary, by the zstd CLI."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "old").write_bytes(old)
        (Path(d) / "new").write_bytes(new)
        subprocess.run(["zstd", "-q", "-f", "--single-thread", f"--patch-from={d}/old",
                        f"{d}/new", "-o", f"{d}/frame"], check=True, timeout=300,
                       capture_output=True)
        return (Path(d) / "frame").read_bytes()


def _bsdiff(ops: OpStream, old: bytes, new: bytes) -> None:
    ctrl, diff, extra = bsdiff4.core.diff(old, new)
    ints = [bsdiff4.core.decode_int64(ctrl[i:i + 8]) for i in range(0, len(ctrl), 8)]
    opos = dp = ep = 0
    for i in range(0, len(ints), 3):
        x, y, z = ints[i:i + 3]
        if x:
            ops.seek(opos)
            ops.add(diff[dp:dp + x])
            dp += x
            opos += x
        if y:
            ops.data(extra[ep:ep + y])
            ep += y
        opos += z


def _blocks(ops: OpStream, old: bytes, new: bytes, block: int = 1 << 16) -> None:
    for i in range(0, len(new), block):
        piece = new[i:i + block]
        if old[i:i + len(piece)] == piece:
            ops.seek(i)
            ops.copy(len(piece))
        else:
            ops.data(piece)


def encode_tardiff(new_tar: bytes, old: dict[str, bytes], version: int = 1,
                   methods: dict[str, str] | None = None, frames: int = 2
                   ) -> tuple[bytes, set[int]]:
    """A tar-diff reconstructing *new_tar* from the *old* merged files; (delta, op codes).

    Per regular file: ``methods[path]`` (``literal``, ``copy:<old path>``, ``bsdiff``,
    ``zstd`` (v2), ``blocks``), else COPY when identical content exists in *old*, else
    bsdiff (v1) / zstd (v2) against the same path, else DATA.
    """
    methods = methods or {}
    by_hash = {hashlib.sha256(v).digest(): k for k, v in sorted(old.items())}
    ops = OpStream()
    done = 0
    with tarfile.open(fileobj=io.BytesIO(new_tar), mode="r:") as tf:
        members = [m for m in tf if m.isreg() and m.size > 0]
    for m in members:
        name = m.name.removeprefix("./").lstrip("/")
        content = new_tar[m.offset_data:m.offset_data + m.size]
        method = methods.get(name)
        if method is None:
            src = by_hash.get(hashlib.sha256(content).digest())
            if src is not None and m.size > 64:
                method = f"copy:{src}"
            elif name in old and m.size > 64:
                method = "zstd" if version == 2 else "bsdiff"
            else:
                method = "literal"
        if method == "literal":
            continue
        ops.data(new_tar[done:m.offset_data])
        done = m.offset_data + m.size
        if method.startswith("copy:"):
            src = method[5:]
            ops.open(src)
            ops.seek(0)
            ops.copy(m.size)
        elif method == "bsdiff":
            ops.open(name)
            _bsdiff(ops, old[name], content)
        elif method == "blocks":
            ops.open(name)
            _blocks(ops, old[name], content)
        elif method == "zstd":
            assert version == 2
            ops.open(name)
            frame = zstd_patch_frame(old[name], content)
            ops.emit(OP_ZSTD, len(frame), frame)
            ops.pos = len(old[name])
        else:
            raise ValueError(method)
    ops.data(new_tar[done:])
    delta = wrap_ops(bytes(ops.out), version, frames)
    assert decode_tardiff(delta, old) == new_tar, "encoder self-check failed"
    return delta, ops.used


def wrap_ops(ops: bytes, version: int = 1, frames: int = 1) -> bytes:
    """Header + the op stream compressed as *frames* concatenated zstd frames."""
    cctx = zstandard.ZstdCompressor(level=3)
    cut = [len(ops) * i // frames for i in range(frames + 1)]
    body = b"".join(cctx.compress(ops[cut[i]:cut[i + 1]]) for i in range(frames))
    return (HEADER_V2 if version == 2 else HEADER_V1) + body


def decode_tardiff(delta: bytes, old: dict[str, bytes]) -> bytes:
    """A plain reference decoder (trusting input; for checking the encoder only)."""
    body = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(delta[8:]),
                                                      read_across_frames=True).read()
    out = bytearray()
    i = 0
    cur = b""
    pos = 0

    def varint() -> int:
        nonlocal i
        v = shift = 0
        while True:
            b = body[i]
            i += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return v

    while i < len(body):
        code = body[i]
        i += 1
        n = varint()
        if code == OP_DATA:
            out += body[i:i + n]
            i += n
        elif code == OP_OPEN:
            cur, pos = old[body[i:i + n].decode()], 0
            i += n
        elif code == OP_COPY:
            out += cur[pos:pos + n]
            pos += n
        elif code == OP_ADD:
            out += bytes((a + b) & 0xFF for a, b in zip(body[i:i + n], cur[pos:pos + n],
                                                         strict=True))
            i += n
            pos += n
        elif code == OP_SEEK:
            pos = n
        elif code == OP_ZSTD:
            zd = zstandard.ZstdCompressionDict(cur, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            dctx = zstandard.ZstdDecompressor(dict_data=zd, max_window_size=1 << 29)
            out += dctx.stream_reader(io.BytesIO(body[i:i + n])).read()
            i += n
            pos = len(cur)
        else:
            raise ValueError(code)
    return bytes(out)


# ------------------------------------------------------------------------------ artifacts

@dataclass
class Signature:
    """A cosign simple-signing signature manifest and its blobs."""

    manifest: bytes
    config: bytes
    payload: bytes
    layer_desc: dict[str, Any]


def make_signature(target_digest: str, private_key: Any,
                   reference: str = "example.test/image") -> Signature:
    """Sign the simple-signing payload of *target_digest* (ECDSA P-256 / SHA-256)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    payload = go_json({"critical": {"identity": {"docker-reference": reference},
                                    "image": {"docker-manifest-digest": target_digest},
                                    "type": "cosign container image signature"},
                       "optional": None})
    sig = private_key.sign(payload, ec.ECDSA(hashes.SHA256()))
    layer = {"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
             "digest": sha256(payload), "size": len(payload),
             "annotations": {"dev.cosignproject.cosign/signature": base64.b64encode(sig).decode()}}
    config = go_json({"architecture": "", "config": {}, "created": "0001-01-01T00:00:00Z",
                      "os": "", "rootfs": {"type": "layers", "diff_ids": [sha256(payload)]}})
    manifest = go_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config),
                                   "size": len(config)}, "layers": [layer]})
    return Signature(manifest, config, payload, layer)


@dataclass
class Delta:
    """A delta artifact written as a layout."""

    path: Path
    manifest: bytes
    layer_blobs: dict[int, bytes] = field(default_factory=dict)
    ops: dict[int, set[int]] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    @property
    def blob_bytes(self) -> int:
        return sum(len(b) for b in self.layer_blobs.values())


def build_delta(path: Path, old: Image, new: Image, old_files: dict[str, bytes],
                plan: dict[int, str], *, methods: dict[str, str] | None = None,
                blobs: dict[int, tuple[str, bytes]] | None = None,
                signatures: list[Signature] = (),  # type: ignore[assignment]
                mutate: Callable[[dict[str, Any]], None] | None = None,
                target_manifest: bytes | None = None, name: str | None = None) -> Delta:
    """Write the oci-delta of *old* -> *new* into the layout *path*.

    ``plan[i]`` for new layer i: ``v1``/``v2`` (tar-diff), ``original`` (the gzip blob),
    ``original-zstd`` (zstd-recompressed, labelled +gzip as upstream creators do) or
    ``omit``; layers whose diff_id the old image has are reused unless planned.  *blobs*
    supplies raw (media type, bytes) for a layer; *mutate* edits the delta manifest dict.
    """
    lay = Layout(path)
    delta = Delta(path, b"")
    tm = target_manifest if target_manifest is not None else new.manifest
    layer_descs = [
        {**lay.blob(tm, OCI_MANIFEST),
         "annotations": {"io.github.containers.delta.content": "image-manifest"}},
        {**lay.blob(new.config, OCI_CONFIG),
         "annotations": {"io.github.containers.delta.content": "image-config"}}]
    reused, reused_ids = [], []
    for i, (tar, desc) in enumerate(zip(new.layers, new.descriptors, strict=True)):
        kind = plan.get(i)
        if kind is None and sha256(tar) in old.diff_ids:
            reused.append(desc["digest"])
            reused_ids.append(sha256(tar))
            continue
        kind = kind or "v1"
        if kind == "omit":
            continue
        if blobs and i in blobs:
            mt, data = blobs[i]
        elif kind in ("v1", "v2"):
            data, used = encode_tardiff(tar, old_files, int(kind[1]), methods)
            delta.ops[i] = used
            mt = TAR_DIFF
        elif kind == "original":
            mt, data = GZIP_LAYER, new.blobs[i]
        elif kind == "original-zstd":
            mt, data = GZIP_LAYER, zstandard.ZstdCompressor(level=3).compress(tar)
        else:
            raise ValueError(kind)
        delta.layer_blobs[i] = data
        layer_descs.append({**lay.blob(data, mt), "annotations": {
            "io.github.containers.delta.content": "image-layer",
            "io.github.containers.delta.to": desc["digest"]}})
    for sig in signatures:
        layer_descs.append({**lay.blob(sig.manifest, OCI_MANIFEST), "annotations": {
            "io.github.containers.delta.content": "cosign-signature"}})
        layer_descs.append({**lay.blob(sig.config, OCI_CONFIG), "annotations": {
            "io.github.containers.delta.content": "cosign-signature-content"}})
        layer_descs.append({**lay.blob(sig.payload, sig.layer_desc["mediaType"]),
                            "annotations": {
                                "io.github.containers.delta.content":
                                    "cosign-signature-content"}})
    lay.blob(EMPTY, "application/vnd.oci.empty.v1+json")
    ann = {"io.github.containers.delta.target": sha256(tm),
           "io.github.containers.delta.source": old.digest,
           "io.github.containers.delta.source-config": old.config_digest}
    if reused:
        ann["io.github.containers.delta.reused"] = json.dumps(reused, separators=(",", ":"))
        ann["io.github.containers.delta.reused-diff-id"] = json.dumps(reused_ids,
                                                                      separators=(",", ":"))
    manifest: dict[str, Any] = {
        "schemaVersion": 2, "artifactType": DELTA_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(EMPTY),
                   "size": 2},
        "layers": layer_descs,
        "subject": {"mediaType": OCI_MANIFEST, "digest": sha256(tm), "size": len(tm)},
        "annotations": ann}
    if mutate is not None:
        mutate(manifest)
    delta.manifest = go_json(manifest)
    lay.add_manifest(delta.manifest, name, artifactType=DELTA_TYPE)
    return delta


def write_archive(layout: Path, archive: Path) -> None:
    """An oci-archive: an uncompressed tar of the layout directory."""
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("oci-layout", "index.json", "blobs"):
            tf.add(layout / name, arcname=name)


def push_layout(host: str, repository: str, tag: str, layout: Path) -> str:
    """Push the single manifest of *layout* with every blob, verbatim, over HTTP."""
    index = json.loads((layout / "index.json").read_text())
    mdesc = index["manifests"][0]
    base = f"http://{host}/v2/{repository}"
    with httpx.Client(timeout=120) as c:
        for p in sorted((layout / "blobs/sha256").iterdir()):
            if p.name == mdesc["digest"][7:]:
                continue
            r = c.post(f"{base}/blobs/uploads/")
            assert r.status_code == 202, r.text
            loc = r.headers["Location"]
            url = loc if loc.startswith("http") else f"http://{host}{loc}"
            sep = "&" if "?" in url else "?"
            r = c.put(f"{url}{sep}digest=sha256:{p.name}", content=p.read_bytes(),
                      headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 201, r.text
        body = (layout / "blobs/sha256" / mdesc["digest"][7:]).read_bytes()
        r = c.put(f"{base}/manifests/{tag}", content=body,
                  headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 201, r.text
    return f"docker://{host}/{repository}:{tag}"

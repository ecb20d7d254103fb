"""An independent oci-delta applier for the tests, written from docs/delta.md alone.

It shares no code with cfsd (nor with tests/deltatools.py): the archive is read with
``tarfile``, the documents with ``json``, tar-diff streams are decoded op by op with every
rule of docs/delta.md checked, and the source is the merged root filesystem of the old image
computed here from the old image's layer tars (whiteouts, opaque directories, every entry
type hiding earlier paths, hardlinks sharing content).

``apply_artifact(archive, old_layers, stored)`` checks the whole artifact (docs/delta.md and
3.6) and returns the target manifest, config and every layer tar, each checked against its
diff_id.  Any deviation raises :class:`SpecError`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

DELTA_TYPE = "application/vnd.io.github.containers.oci-delta.v1"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
TAR_DIFF = "application/vnd.tar-diff"
P = "io.github.containers.delta."
MAX_NAME = 4096
MAX_ADD = 100 << 20
MAX_DICT = 512 << 20


class SpecError(Exception):
    """The artifact or a tar-diff does not follow docs/delta.md."""


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ merged rootfs

def _clean(name: str) -> str:
    name = posixpath.normpath("/" + name).lstrip("/")
    return "" if name == "." else name


def merged_rootfs(layer_tars: list[bytes]) -> dict[str, bytes]:
    """Regular files of the merged root filesystem of *layer_tars* (in order): path -> data.

    Whiteouts (``.wh.NAME``) remove NAME and what is below it; ``.wh..wh..opq`` empties its
    directory; any entry replaces what was at its path (a directory over a directory keeps the
    children); hardlinks name the content of their target.
    """
    kinds: dict[str, str] = {}        # path -> "file" | "dir" | "other"
    files: dict[str, bytes] = {}

    def drop(path: str, keep_self: bool = False) -> None:
        pre = path + "/" if path else ""
        for k in [k for k in kinds if k.startswith(pre) or (k == path and not keep_self)]:
            kinds.pop(k, None)
            files.pop(k, None)

    for tar in layer_tars:
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
            for m in tf:
                name = _clean(m.name)
                if not name:
                    continue
                d, base = posixpath.split(name)
                if base == ".wh..wh..opq":
                    drop(d, keep_self=True)
                    continue
                if base.startswith(".wh."):
                    drop(posixpath.join(d, base[4:]))
                    continue
                if m.isdir():
                    if kinds.get(name) != "dir":
                        drop(name)
                        kinds[name] = "dir"
                    continue
                if m.islnk():
                    target = _clean(m.linkname)
                    data = files.get(target)
                    drop(name)
                    if data is None:
                        raise SpecError(f"hardlink {name} to a missing file {target}")
                    kinds[name], files[name] = "file", data
                    continue
                drop(name)
                if m.isreg():
                    f = tf.extractfile(m)
                    assert f is not None
                    kinds[name], files[name] = "file", f.read()
                else:
                    kinds[name] = "other"
    return files


# ------------------------------------------------------------------------------ tar-diff

class _Ops:
    """The decompressed op stream (all frames), read incrementally."""

    def __init__(self, body: bytes) -> None:
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        self.r = dctx.stream_reader(io.BytesIO(body), read_across_frames=True)
        self.buf = b""

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            more = self.r.read(max(n - len(self.buf), 1 << 16))
            if not more:
                return
            self.buf += more

    def at_end(self) -> bool:
        self._fill(1)
        return not self.buf

    def take(self, n: int) -> bytes:
        self._fill(n)
        if len(self.buf) < n:
            raise SpecError("op stream ends inside an op")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def uvarint(self) -> int:
        value = shift = 0
        for i in range(10):
            b = self.take(1)[0]
            if i == 9 and b > 1:
                raise SpecError("uvarint overflow")
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7
        raise SpecError("uvarint longer than 10 bytes")


def canonical(name: str) -> bool:
    """A producer-normalized relative path (docs/delta.md)."""
    return bool(name) and not name.startswith("/") and "\0" not in name and all(
        c not in ("", ".", "..") for c in name.split("/"))


@dataclass
class Decoded:
    output: bytes
    ops: dict[int, int] = field(default_factory=dict)    # opcode -> count
    opened: set[str] = field(default_factory=set)


def decode_tardiff(delta: bytes, files: dict[str, bytes]) -> Decoded:
    """Apply one tar-diff to *files* (the merged old rootfs) following docs/delta.md"""
    header = delta[:8]
    if header == b"tardf1\n\0":
        v2 = False
    elif header == b"tardf2\n\0":
        v2 = True
    else:
        raise SpecError(f"bad tar-diff header {header!r}")
    ops = _Ops(delta[8:])
    out = bytearray()
    res = Decoded(b"")
    cur: bytes | None = None
    pos = 0
    while not ops.at_end():
        code = ops.take(1)[0]
        size = ops.uvarint()
        res.ops[code] = res.ops.get(code, 0) + 1
        if code == 0:                                   # DATA
            out += ops.take(size)
        elif code == 1:                                 # OPEN
            if size > MAX_NAME:
                raise SpecError("OPEN name too long")
            name = ops.take(size).decode("utf-8")
            if not canonical(name):
                raise SpecError(f"OPEN of a non-canonical name {name!r}")
            if name not in files:
                raise SpecError(f"OPEN of {name!r}: not a regular file of the old image")
            cur, pos = files[name], 0
            res.opened.add(name)
        elif code in (2, 3, 4, 5) and cur is None:
            raise SpecError("no current file")
        elif code == 2:                                 # COPY
            assert cur is not None
            if pos + size > len(cur):
                raise SpecError("COPY past the end of the source")
            out += cur[pos:pos + size]
            pos += size
        elif code == 3:                                 # ADD_DATA
            assert cur is not None
            if size > MAX_ADD:
                raise SpecError("ADD_DATA over 100 MiB")
            payload = ops.take(size)
            if pos + size > len(cur):
                raise SpecError("ADD_DATA past the end of the source")
            out += bytes((a + b) & 0xFF for a, b in zip(payload, cur[pos:pos + size],
                                                         strict=True))
            pos += size
        elif code == 4:                                 # SEEK (absolute)
            pos = size
        elif code == 5:                                 # ZSTD_DICT
            assert cur is not None
            if not v2:
                raise SpecError("ZSTD_DICT under a tardf1 header (needs tardf2)")
            if len(cur) > MAX_DICT:
                raise SpecError("dictionary over 512 MiB")
            frame = ops.take(size)
            zd = zstandard.ZstdCompressionDict(cur, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            dctx = zstandard.ZstdDecompressor(dict_data=zd, max_window_size=1 << 29)
            out += dctx.stream_reader(io.BytesIO(frame)).read()
            pos = len(cur)
        else:
            raise SpecError(f"unexpected op {code}")
    res.output = bytes(out)
    return res


# ------------------------------------------------------------------------------ artifacts

def read_archive(path: Path) -> tuple[list[tarfile.TarInfo], dict[str, bytes]]:
    """Members (in order) and file contents of an oci-archive."""
    with tarfile.open(path, mode="r:") as tf:
        members = tf.getmembers()
        files = {}
        for m in members:
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                files[m.name] = f.read()
    return members, files


def _blob(files: dict[str, bytes], desc: dict[str, Any]) -> bytes:
    digest = desc["digest"]
    if not digest.startswith("sha256:"):
        raise SpecError(f"unsupported digest {digest}")
    data = files.get(f"blobs/sha256/{digest[7:]}")
    if data is None:
        raise SpecError(f"blob {digest} is missing")
    if sha256(data) != digest or len(data) != desc["size"]:
        raise SpecError(f"blob {digest} does not match its descriptor")
    return data


def decompress(blob: bytes) -> bytes:
    """A layer shipped whole: gzip, zstd or plain tar, by magic bytes (docs/delta.md)."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob),
                                                          read_across_frames=True).read()
    return blob


@dataclass
class Applied:
    manifest: bytes
    config: bytes
    layers: list[bytes]                               # every target layer tar, in order
    delta_manifest: dict[str, Any]
    carried: dict[int, tuple[str, Decoded | None]]    # target index -> (media type, decode)
    reused: list[int]


def apply_artifact(archive: Path, old_layers: list[bytes]) -> Applied:
    """Rebuild the target image of the delta *archive* on top of the old image's layer tars."""
    _, files = read_archive(archive)
    if files.get("oci-layout") != b'{"imageLayoutVersion":"1.0.0"}':
        raise SpecError("oci-layout is missing or wrong")
    index = json.loads(files["index.json"])
    if index.get("schemaVersion") != 2 or len(index.get("manifests", [])) != 1:
        raise SpecError("index.json must list exactly one manifest")
    mdesc = index["manifests"][0]
    if mdesc["mediaType"] != "application/vnd.oci.image.manifest.v1+json":
        raise SpecError("the delta manifest has the wrong media type")
    m = json.loads(_blob(files, mdesc))
    if m.get("schemaVersion") != 2 or "mediaType" in m:
        raise SpecError("delta manifest: schemaVersion 2 and no mediaType")
    if m.get("artifactType") != DELTA_TYPE:
        raise SpecError("not an oci-delta artifact")
    if m["config"] != {"mediaType": EMPTY_TYPE, "digest": EMPTY_DIGEST, "size": 2} or \
            _blob(files, m["config"]) != b"{}":
        raise SpecError("the config must be the empty descriptor")
    ann = m.get("annotations") or {}
    if not ann.get(P + "source-config"):
        raise SpecError("missing source-config")
    roles: dict[str, list[dict[str, Any]]] = {}
    by_to: dict[str, dict[str, Any]] = {}
    for d in m["layers"]:
        role = (d.get("annotations") or {}).get(P + "content")
        if role == "image-layer":
            to = d["annotations"].get(P + "to")
            if not to or to in by_to:
                raise SpecError("image-layer without a unique delta.to")
            by_to[to] = d
        else:
            roles.setdefault(role or "", []).append(d)
    if len(roles.get("image-manifest", [])) != 1 or len(roles.get("image-config", [])) != 1:
        raise SpecError("exactly one image-manifest and one image-config expected")
    tm = _blob(files, roles["image-manifest"][0])
    target = sha256(tm)
    if ann.get(P + "target") != target or m["subject"]["digest"] != target or \
            m["subject"]["size"] != len(tm):
        raise SpecError("target, subject and embedded manifest disagree")
    manifest = json.loads(tm)
    tc = _blob(files, roles["image-config"][0])
    if sha256(tc) != manifest["config"]["digest"]:
        raise SpecError("embedded config is not the target's")
    diff_ids = json.loads(tc)["rootfs"]["diff_ids"]
    if len(diff_ids) != len(manifest["layers"]):
        raise SpecError("diff_id count differs from the layer count")
    old_ids = [sha256(t) for t in old_layers]
    merged = merged_rootfs(old_layers)
    out: list[bytes] = []
    carried: dict[int, tuple[str, Decoded | None]] = {}
    reused: list[int] = []
    for i, (desc, diff_id) in enumerate(zip(manifest["layers"], diff_ids, strict=True)):
        d = by_to.get(desc["digest"])
        if d is None:
            if diff_id not in old_ids:
                raise SpecError(f"layer {i} is neither carried nor in the old image")
            tar = old_layers[old_ids.index(diff_id)]
            reused.append(i)
        else:
            blob = _blob(files, d)
            if d["mediaType"] == TAR_DIFF:
                dec = decode_tardiff(blob, merged)
                tar = dec.output
                carried[i] = (d["mediaType"], dec)
            else:
                tar = decompress(blob)
                carried[i] = (d["mediaType"], None)
        if sha256(tar) != diff_id:
            raise SpecError(f"layer {i}: diff_id mismatch")
        out.append(tar)
    want = [manifest["layers"][i]["digest"] for i in reused]
    want_ids = [diff_ids[i] for i in reused]
    if want:
        if json.loads(ann.get(P + "reused", "null")) != want or \
                json.loads(ann.get(P + "reused-diff-id", "null")) != want_ids:
            raise SpecError("reused annotations do not list the reused layers")
    elif P + "reused" in ann or P + "reused-diff-id" in ann:
        raise SpecError("reused annotations present without reused layers")
    return Applied(tm, tc, out, m, carried, reused)


def iter_ops(delta: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(opcode, size, payload) of a tar-diff (payload empty for COPY and SEEK)."""
    ops = _Ops(delta[8:])
    while not ops.at_end():
        code = ops.take(1)[0]
        size = ops.uvarint()
        yield code, size, ops.take(size) if code in (0, 1, 3, 5) else b""

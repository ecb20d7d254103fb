"""Creating oci-delta artifacts (issue 6) through the real daemon and cfsctl.

The image pair is upgrade-like: small edits in big binaries, renames (identical and edited),
additions, deletions (whiteouts, an opaque directory), hardlinks on both sides, old paths
replaced by a symlink, a directory and an empty file (the upstream stale-path bug), layers
reused at another position, and layers that only ship whole (random content) in gzip, zstd
and plain tar.  For v1 and v2: `cfsctl oci create-delta` then `apply-delta` into a fresh
repository holding only the old image must store exactly what pulling the new image stores;
the independent applier of tests/deltaspec.py (written from the format spec) must rebuild
every layer; the same inputs must give a byte-identical archive.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.conftest import Daemon, repo_snapshot, run_cfsctl
from tests.deltaspec import (
    TAR_DIFF,
    Applied,
    SpecError,
    apply_artifact,
    decode_tardiff,
    merged_rootfs,
    read_archive,
    sha256,
)
from tests.deltatools import OCI_CONFIG, OCI_MANIFEST, D, Entry, F, Layout, go_json, make_tar
from tests.otheruser import NOBODY, as_nobody, other_user_marks
from tests.varlink_raw import stream_frames

OCI = "org.composefs.Oci."
LAYER = "application/vnd.oci.image.layer.v1.tar"


# ------------------------------------------------------------------------------ content

def rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def text(seed: int, n: int) -> bytes:
    r = random.Random(seed)
    words = [bytes(r.choices(b"abcdefghijklmnopqrstuvwxyz_", k=r.randint(2, 9)))
             for _ in range(500)]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(r.choices(words, k=10)) + b"\n"
    return bytes(out[:n])


def edited(data: bytes, seed: int, edits: int = 12) -> bytes:
    """A new version: scattered small edits, an insertion and a deletion."""
    r = random.Random(seed)
    b = bytearray(data)
    for _ in range(edits):
        i = r.randrange(len(b) - 8)
        b[i:i + 8] = r.randbytes(8)
    n = len(b)
    b[n // 3:n // 3] = r.randbytes(300)
    del b[2 * n // 3:2 * n // 3 + 200]
    return bytes(b)


@dataclass
class ImageInfo:
    tag: str
    digest: str
    config_digest: str
    layers: list[bytes]
    descriptors: list[dict[str, Any]]


def write_image(lay: Layout, tag: str, layers: list[tuple[bytes, str]]) -> ImageInfo:
    """An image whose layers are (tar, compression: gzip | zstd | none)."""
    descs = []
    for tar, comp in layers:
        if comp == "gzip":
            descs.append(lay.blob(gzip.compress(tar, 6, mtime=0), LAYER + "+gzip"))
        elif comp == "zstd":
            descs.append(lay.blob(zstandard.ZstdCompressor(level=3).compress(tar),
                                  LAYER + "+zstd"))
        else:
            descs.append(lay.blob(tar, LAYER))
    config = go_json({"architecture": "amd64", "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t, _ in layers]}})
    cdesc = lay.blob(config, OCI_CONFIG)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cdesc,
                           "layers": descs}, indent=1).encode()
    lay.add_manifest(manifest, tag)
    return ImageInfo(tag, sha256(manifest), sha256(config), [t for t, _ in layers], descs)


# ------------------------------------------------------------------------------ the pair

BIG1, BIG2, TOOL, LIBBAR = rand(1, 1_500_000), rand(2, 600_000), rand(3, 200_000), rand(4, 300_000)
LIBFOO, STALE = text(5, 400_000), text(6, 50_000)


def old_layers() -> list[tuple[bytes, str]]:
    o1 = [D("usr"), D("usr/bin"), D("usr/sbin"), D("usr/lib"), D("usr/share"),
          D("usr/share/doc"), D("etc"), D("dev"), D("opt"), D("opt/app"),
          F("usr/bin/big1", BIG1, 0o755), F("usr/bin/big2", BIG2, 0o755),
          F("usr/bin/tool", TOOL, 0o755),
          Entry("usr/sbin/tool-hl", "hardlink", target="usr/bin/tool"),
          F("usr/lib/libfoo.so.1", LIBFOO), F("usr/lib/libbar.so.1.2", LIBBAR),
          F("usr/share/doc/README", text(7, 20_000)), F("etc/config", text(8, 3000)),
          F("usr/share/stale", STALE), F("usr/share/stale2", text(9, 50_000)),
          F("usr/share/stale3", text(10, 50_000)),
          Entry("usr/bin/sh", "symlink", target="big1"),
          Entry("dev/console", "chardev", mode=0o600, rdev=(5, 1)),
          F("opt/app/a.bin", rand(11, 100_000)), F("opt/app/b.bin", rand(12, 100_000))]
    o2 = [Entry("usr/bin/tool", "whiteout"),                 # left only as usr/sbin/tool-hl
          Entry("usr/share/stale", "symlink", target="doc/README"),
          D("usr/share/stale2"), F("usr/share/stale2/inner", b"x" * 100),
          F("usr/share/stale3", b""),
          D("opt/app"), Entry("opt/app", "opaque"), F("opt/app/c.bin", rand(13, 100_000))]
    shared = [D("srv"), F("srv/data.bin", rand(14, 150_000)), F("srv/notes", text(15, 8000))]
    return [(make_tar(o1), "gzip"), (make_tar(o2), "gzip"), (make_tar(shared), "gzip")]


def new_layers(old: list[tuple[bytes, str]]) -> list[tuple[bytes, str]]:
    n1 = [F("usr/bin/big1", edited(BIG1, 1), 0o755),
          Entry("usr/bin/big1-hl", "hardlink", target="usr/bin/big1"),
          D("usr/libexec"), F("usr/libexec/big2", BIG2, 0o755),          # renamed
          Entry("usr/bin/big2", "whiteout"),
          F("usr/lib/libbar.so.1.3", edited(LIBBAR, 2)),                 # renamed + edited
          Entry("usr/lib/libbar.so.1.2", "whiteout"),
          F("usr/bin/tool2", TOOL, 0o755),                               # only as tool-hl
          F("usr/share/stale", edited(STALE, 3)),                        # old: a symlink
          F("usr/share/stale3", text(10, 50_000)),                       # old: empty
          Entry("etc/config", "whiteout"), Entry("usr/share/doc/README", "whiteout"),
          F("usr/share/new.txt", text(16, 30_000)), F("usr/share/tiny", b"hi\n")]
    n2 = [F("usr/lib/libfoo.so.1", edited(LIBFOO, 4)),
          D("opt/app"), Entry("opt/app", "opaque"),
          F("opt/app/c.bin", edited(rand(13, 100_000), 5))]
    fresh_gzip = [D("var"), F("var/random-gz", rand(20, 300_000))]
    fresh_zstd = [D("var"), F("var/random-zst", rand(21, 300_000))]
    plain = [D("usr"), F("usr/bin/big1-copy", edited(BIG1, 1), 0o755)]
    return [old[2], old[0], (make_tar(n1), "gzip"), (make_tar(n2), "zstd"),
            (make_tar(fresh_gzip), "gzip"), (make_tar(fresh_zstd), "zstd"),
            (make_tar(plain), "none")]


EXPECTED_KINDS = ["reused", "reused", "tar-diff", "tar-diff", "original", "original",
                  "tar-diff"]


@dataclass
class Pair:
    root: Path
    layout: Path
    old: ImageInfo
    new: ImageInfo
    both: str          # a repository with old and new pulled directly
    daemon: Daemon

    def cfs(self, repo: str, *args: str, check: bool = True) -> Any:
        return run_cfsctl("--repo", repo, *args, address=self.daemon.address, check=check)

    def old_repo(self, path: Path) -> str:
        repo = str(path)
        self.cfs(repo, "init", "--insecure")
        self.cfs(repo, "oci", "pull", f"oci:{self.layout}:old", "old")
        return repo


@pytest.fixture(scope="module")
def pair(shared_daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    root = tmp_path_factory.mktemp("create")
    lay = Layout(root / "images")
    old_l = old_layers()
    old = write_image(lay, "old", old_l)
    new = write_image(lay, "new", new_layers(old_l))
    p = Pair(root, lay.path, old, new, str(root / "both"), shared_daemon)
    p.cfs(p.both, "init", "--insecure")
    p.cfs(p.both, "oci", "pull", f"oci:{lay.path}:old", "old")
    p.cfs(p.both, "oci", "pull", f"oci:{lay.path}:new", "new")
    return p


@pytest.fixture(scope="module")
def deltas(pair: Pair) -> dict[str, Path]:
    """v1 and v2 deltas of the pair, made once by `cfsctl oci create-delta`."""
    out = {}
    for v in ("v1", "v2"):
        path = pair.root / f"delta-{v}.tar"
        p = pair.cfs(pair.both, "oci", "create-delta", "old", "new", str(path), "--format", v)
        assert f"written  {path}" in p.stdout.decode()
        out[v] = path
    return out


def raw_call(daemon: Daemon, repo: str, method: str, **params: Any) -> list[dict[str, Any]]:
    return stream_frames(daemon.sock, repo, OCI + method, params)


# ------------------------------------------------------------------------------ round trip

@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("via", ["apply-delta", "pull"])
def test_round_trip_equals_direct_pull(pair: Pair, deltas: dict[str, Path], tmp_path: Path,
                                       version: str, via: str) -> None:
    repo = pair.old_repo(tmp_path / "repo")
    ref = f"oci-archive:{deltas[version]}"
    cmd = ["oci", "apply-delta", ref, "new"] if via == "apply-delta" else [
        "oci", "pull", ref, "new"]
    out = pair.cfs(repo, *cmd).stdout.decode()
    assert f"manifest {pair.new.digest}" in out
    assert repo_snapshot(repo) == repo_snapshot(pair.both)
    got = json.loads(pair.cfs(repo, "oci", "inspect", "new").stdout)
    want = json.loads(pair.cfs(pair.both, "oci", "inspect", "new").stdout)
    assert got["composefs_erofs"] and got["composefs_erofs"] == want["composefs_erofs"]
    assert got["manifest"] == want["manifest"] and got["config"] == want["config"]
    fsck = json.loads(pair.cfs(repo, "oci", "fsck", "--json").stdout)
    assert fsck["ok"], fsck


def test_apply_in_the_creating_repository_is_a_no_op(pair: Pair,
                                                     deltas: dict[str, Path]) -> None:
    before = repo_snapshot(pair.both)
    p = pair.cfs(pair.both, "oci", "apply-delta", f"oci-archive:{deltas['v1']}", "new")
    assert "Target image already present." in p.stderr.decode()
    assert repo_snapshot(pair.both) == before


def test_layer_decisions(pair: Pair, deltas: dict[str, Path], tmp_path: Path) -> None:
    p = pair.cfs(pair.both, "--json", "oci", "create-delta", "old", "new",
                 str(tmp_path / "d.tar"))
    created = json.loads(p.stdout)
    assert created["format"] == "v1"
    assert created["source"] == pair.old.digest and created["target"] == pair.new.digest
    assert [x["kind"] for x in created["layers"]] == EXPECTED_KINDS
    assert [x["digest"] for x in created["layers"]] == [d["digest"]
                                                        for d in pair.new.descriptors]
    assert [x["layer_size"] for x in created["layers"]] == [d["size"]
                                                            for d in pair.new.descriptors]
    for x in created["layers"]:
        assert (x["size"] == 0) == (x["kind"] == "reused")
        if x["kind"] == "tar-diff":
            assert x["size"] < x["layer_size"]
    _, files = read_archive(tmp_path / "d.tar")
    assert created["delta_digest"] == json.loads(files["index.json"])["manifests"][0]["digest"]
    assert created["size"] == (tmp_path / "d.tar").stat().st_size
    # the edited layers shrink to a small fraction of their compressed size
    changed = created["layers"][2:4]
    assert sum(x["size"] for x in changed) < sum(x["layer_size"] for x in changed) / 5


# ------------------------------------------------------------------------------ the format

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_independent_applier_rebuilds_every_layer(pair: Pair, deltas: dict[str, Path],
                                                  version: str) -> None:
    applied: Applied = apply_artifact(deltas[version], pair.old.layers)
    assert sha256(applied.manifest) == pair.new.digest
    assert sha256(applied.config) == pair.new.config_digest
    assert applied.layers == pair.new.layers
    assert applied.reused == [0, 1]
    kinds = {i: mt for i, (mt, _) in applied.carried.items()}
    assert kinds == {2: TAR_DIFF, 3: TAR_DIFF, 4: LAYER + "+gzip", 5: LAYER + "+zstd",
                     6: TAR_DIFF}
    ops: dict[int, int] = {}
    merged = merged_rootfs(pair.old.layers)
    for _, dec in applied.carried.values():
        if dec is None:
            continue
        for code, n in dec.ops.items():
            ops[code] = ops.get(code, 0) + n
        assert dec.opened <= set(merged)
    # stale paths of the old layers are never sources; hidden and hardlink-only names are
    opened = set().union(*(d.opened for _, d in applied.carried.values() if d is not None))
    assert not opened & {"usr/share/stale", "usr/share/stale2", "usr/share/stale3",
                         "usr/bin/tool", "opt/app/a.bin", "etc/config"}
    assert "usr/sbin/tool-hl" in opened and "usr/bin/big2" in opened
    if version == "v1":
        assert ops.keys() >= {0, 1, 2, 3, 4} and 5 not in ops    # DATA OPEN COPY ADD SEEK
        assert all(d[:8] == b"tardf1\n\0" for d in _tardiffs(deltas[version]))
    else:
        assert ops.keys() >= {0, 1, 2, 5}
        assert all(d[:8] == b"tardf2\n\0" for d in _tardiffs(deltas[version]))


def _tardiffs(archive: Path) -> list[bytes]:
    _, files = read_archive(archive)
    m = _delta_manifest(files)
    return [files["blobs/sha256/" + d["digest"][7:]] for d in m["layers"]
            if d["mediaType"] == TAR_DIFF]


def _delta_manifest(files: dict[str, bytes]) -> dict[str, Any]:
    digest = json.loads(files["index.json"])["manifests"][0]["digest"]
    return json.loads(files["blobs/sha256/" + digest[7:]])


def test_artifact_layout_and_manifest(pair: Pair, deltas: dict[str, Path]) -> None:
    members, files = read_archive(deltas["v1"])
    names = [m.name for m in members]
    m = _delta_manifest(files)
    index = json.loads(files["index.json"])
    blob = "blobs/sha256/"
    carried = [d for d in m["layers"] if d["annotations"][
        "io.github.containers.delta.content"] == "image-layer"]
    # the Go creator's order (docs/delta.md)
    assert names == ["oci-layout", "blobs", "blobs/sha256", blob + pair.new.digest[7:],
                     blob + pair.new.config_digest[7:],
                     *[blob + d["digest"][7:] for d in carried],
                     blob + "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
                     blob + index["manifests"][0]["digest"][7:], "index.json"]
    for mem in members:
        assert (mem.uid, mem.gid, mem.mtime) == (0, 0, 0)
        assert mem.mode == (0o755 if mem.isdir() else 0o644)
    # Go json.Marshal: compact, struct order, sorted annotation keys
    raw = files[blob + index["manifests"][0]["digest"][7:]]
    assert raw == go_json_struct(m)
    assert list(m) == ["schemaVersion", "artifactType", "config", "layers", "subject",
                       "annotations"]
    ann = m["annotations"]
    assert list(ann) == sorted(ann)
    assert ann["io.github.containers.delta.target"] == pair.new.digest
    assert ann["io.github.containers.delta.source"] == pair.old.digest
    assert ann["io.github.containers.delta.source-config"] == pair.old.config_digest
    assert json.loads(ann["io.github.containers.delta.reused"]) == [
        d["digest"] for d in pair.new.descriptors[:2]]
    assert json.loads(ann["io.github.containers.delta.reused-diff-id"]) == [
        sha256(t) for t in pair.new.layers[:2]]
    assert m["subject"] == {"mediaType": OCI_MANIFEST, "digest": pair.new.digest,
                            "size": len(files[blob + pair.new.digest[7:]])}
    roles = [d["annotations"]["io.github.containers.delta.content"] for d in m["layers"]]
    assert roles == ["image-manifest", "image-config"] + ["image-layer"] * 5
    assert [d["annotations"]["io.github.containers.delta.to"] for d in carried] == [
        d["digest"] for d in pair.new.descriptors[2:]]
    assert index == {"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha256(raw), "size": len(raw)}]}
    # stored originals are labelled with their true compression; these test layers were
    # compressed the way the creator recompresses (zlib level 6, zstd level 3 with the
    # content size), so they come out as the very blobs of the target
    originals = [d for d in carried if d["mediaType"] != TAR_DIFF]
    assert [d["mediaType"] for d in originals] == [LAYER + "+gzip", LAYER + "+zstd"]
    for d in originals:
        data = files[blob + d["digest"][7:]]
        assert data[:4] in (b"\x1f\x8b\x08\x00", b"\x28\xb5\x2f\xfd")
        assert d["digest"] == d["annotations"]["io.github.containers.delta.to"]


def go_json_struct(obj: Any) -> bytes:
    """Compact JSON keeping key order (Go struct order), HTML characters escaped."""
    text_ = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return text_.replace("<", "\\u003c").replace(">", "\\u003e").replace(
        "&", "\\u0026").encode()


def test_skopeo_reads_the_archive(deltas: dict[str, Path]) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo not installed")
    import subprocess
    raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci-archive:{deltas['v2']}"],
                         check=True, capture_output=True).stdout
    assert json.loads(raw)["artifactType"] == "application/vnd.io.github.containers.oci-delta.v1"


# ------------------------------------------------------------------------------ determinism

def test_byte_identical_for_the_same_inputs(pair: Pair, deltas: dict[str, Path],
                                            tmp_path: Path) -> None:
    for v, extra in (("v1", ["--concurrency", "1"]), ("v2", ["--concurrency", "3"])):
        again = tmp_path / f"again-{v}.tar"
        pair.cfs(pair.both, "oci", "create-delta", "@" + pair.old.digest,
                 "new", str(again), "--format", v, *extra, "-q")
        assert again.read_bytes() == deltas[v].read_bytes()
    # another repository holding the same images gives the same bytes
    other = pair.old_repo(tmp_path / "other")
    pair.cfs(other, "oci", "pull", f"oci:{pair.layout}:new", "new")
    third = tmp_path / "third.tar"
    pair.cfs(other, "oci", "create-delta", "old", "new", str(third), "-q")
    assert third.read_bytes() == deltas["v1"].read_bytes()


# ------------------------------------------------------------------------------ edge pairs

def test_identical_and_disjoint_images(pair: Pair, tmp_path: Path) -> None:
    same = tmp_path / "same.tar"
    created = json.loads(pair.cfs(pair.both, "--json", "oci", "create-delta", "new", "new",
                                  str(same)).stdout)
    assert {x["kind"] for x in created["layers"]} == {"reused"}
    applied = apply_artifact(same, pair.new.layers)
    assert applied.layers == pair.new.layers and not applied.carried
    # nothing in common: no reused annotations, everything carried
    lay = Layout(tmp_path / "images")
    a = write_image(lay, "a", [(make_tar([D("usr"), F("usr/one", text(30, 20_000))]), "gzip")])
    b = write_image(lay, "b", [(make_tar([D("usr"), F("usr/one", edited(text(30, 20_000), 1)),
                                          F("usr/two", text(31, 5000))]), "gzip")])
    repo = str(tmp_path / "repo")
    pair.cfs(repo, "init", "--insecure")
    for t in ("a", "b"):
        pair.cfs(repo, "oci", "pull", f"oci:{lay.path}:{t}", t)
    out = tmp_path / "ab.tar"
    pair.cfs(repo, "oci", "create-delta", "a", "b", str(out), "--name", "delta")
    applied = apply_artifact(out, a.layers)
    assert applied.layers == b.layers and applied.reused == []
    assert "io.github.containers.delta.reused" not in applied.delta_manifest["annotations"]
    index = json.loads(read_archive(out)[1]["index.json"])
    assert index["manifests"][0]["annotations"] == {"org.opencontainers.image.ref.name":
                                                    "delta"}
    fresh = str(tmp_path / "fresh")
    pair.cfs(fresh, "init", "--insecure")
    pair.cfs(fresh, "oci", "pull", f"oci:{lay.path}:a", "a")
    assert f"manifest {b.digest}" in pair.cfs(
        fresh, "oci", "pull", f"oci-archive:{out}:delta", "b").stdout.decode()


def test_decoder_rejects_what_the_spec_forbids() -> None:
    """The independent applier is strict (so that passing it means something)."""
    import zstandard as z

    def wrap(ops: bytes, v: int = 1) -> bytes:
        return (b"tardf1\n\0" if v == 1 else b"tardf2\n\0") + z.ZstdCompressor().compress(ops)
    files = {"a/b": b"0123456789"}
    assert decode_tardiff(wrap(b"\x01\x03a/b\x04\x05\x02\x03"), files).output == b"567"
    for bad in (b"\x01\x04a/../b"[:6], b"\x01\x03a/c", b"\x02\x01", b"\x01\x03a/b\x02\x0b",
                b"\x01\x03a/b\x05\x01x", b"\x09\x00", b"\x00\x05ab"):
        with pytest.raises(SpecError):
            decode_tardiff(wrap(bad), files)
    with pytest.raises(SpecError):
        decode_tardiff(b"tardf3\n\0" + z.ZstdCompressor().compress(b""), files)


# ------------------------------------------------------------------------------ errors

def _dir_listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


@pytest.mark.parametrize(("params", "error"), [
    ({"old": "nope"}, "NoSuchImage"),
    ({"new": "@sha256:" + "0" * 64}, "NoSuchImage"),
    ({"format": "v3"}, "InvalidRequest"),
    ({"concurrency": 0}, "InvalidRequest"),
    ({"output": ""}, "InvalidRequest"),
    ({"output": "/nonexistent-dir/x.tar"}, "InvalidRequest"),
    ({"output": "DIR"}, "InvalidRequest"),
    ({"output": "DIR/"}, "InvalidRequest"),
    ({"old": "@sha256:xyz"}, "InvalidDigest"),
])
def test_bad_requests(pair: Pair, tmp_path: Path, params: dict[str, Any], error: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.tar").write_bytes(b"previous")
    full = {"old": "old", "new": "new", "output": str(out / "keep.tar"), **params}
    if full["output"].startswith("DIR"):
        full["output"] = str(out) + full["output"][3:]
    frames = raw_call(pair.daemon, pair.both, "CreateDelta", **full)
    assert frames[-1].get("error") == OCI + error, frames[-1]
    assert _dir_listing(out) == ["keep.tar"]
    assert (out / "keep.tar").read_bytes() == b"previous"


def test_cli_errors_are_one_line(pair: Pair, tmp_path: Path) -> None:
    for args in (["old", "missing", str(tmp_path / "x.tar")],
                 ["old", "new", str(tmp_path / "no/such/dir/x.tar")],
                 ["old", "new", str(tmp_path)]):
        p = pair.cfs(pair.both, "oci", "create-delta", *args, check=False)
        errors = [x for x in p.stderr.decode().splitlines() if x.startswith("Error")]
        assert p.returncode == 1 and len(errors) == 1, p.stderr
    p = pair.cfs(pair.both, "oci", "create-delta", "old", "new", "x", "--format", "v9",
                 check=False)
    assert p.returncode == 2


def test_failure_leaves_output_untouched(pair: Pair, tmp_path: Path) -> None:
    """A layer object that no longer matches: nothing is written, the old file stays."""
    lay = Layout(tmp_path / "images")
    a = write_image(lay, "a", [(make_tar([D("usr"), F("usr/one", text(40, 30_000))]), "gzip")])
    victim = rand(41, 70_000)
    b = write_image(lay, "b", [(make_tar([D("usr"), F("usr/one", edited(text(40, 30_000), 1)),
                                          F("usr/victim", victim)]), "gzip")])
    assert a and b
    repo = str(tmp_path / "repo")
    pair.cfs(repo, "init", "--insecure")
    for t in ("a", "b"):
        pair.cfs(repo, "oci", "pull", f"oci:{lay.path}:{t}", t)
    obj = next(p for p in Path(repo, "objects").rglob("*") if p.is_file()
               and p.stat().st_size == len(victim) and p.read_bytes() == victim)
    obj.chmod(0o644)
    obj.write_bytes(b"\0" + victim[1:])
    out = tmp_path / "out"
    out.mkdir()
    (out / "d.tar").write_bytes(b"previous")
    frames = raw_call(pair.daemon, repo, "CreateDelta", old="a", new="b",
                      output=str(out / "d.tar"))
    assert frames[-1].get("error") == OCI + "InvalidData", frames[-1]
    assert _dir_listing(out) == ["d.tar"] and (out / "d.tar").read_bytes() == b"previous"


def test_output_replaces_a_file_not_a_symlink_target(pair: Pair, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious")
    link = tmp_path / "d.tar"
    link.symlink_to(target)
    pair.cfs(pair.both, "oci", "create-delta", "old", "new", str(link), "-q")
    assert not link.is_symlink() and link.stat().st_size > 1000
    assert target.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["d.tar", "elsewhere"]


# ------------------------------------------------------------------------------ caller's rights

@pytest.fixture(scope="module")
def open_pair(world: Path, open_daemon: Daemon) -> Iterator[tuple[Path, str]]:
    """A root-owned repository with both images, readable by everybody."""
    lay = Layout(world / "cimages")
    old_l = old_layers()[:1]
    write_image(lay, "old", old_l)
    write_image(lay, "new", [*old_l, (make_tar([D("usr"), F("usr/x", text(50, 9000))]),
                                      "gzip")])
    repo = world / "crepo"
    run_cfsctl("--repo", str(repo), "init", "--insecure", address=open_daemon.address)
    for t in ("old", "new"):
        run_cfsctl("--repo", str(repo), "oci", "pull", f"oci:{lay.path}:{t}", t,
                   address=open_daemon.address)
    for p in [repo, *repo.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o555)
    yield world, str(repo)


@other_user_marks[0]
@other_user_marks[1]
@other_user_marks[2]
def test_output_is_written_with_the_callers_permissions(open_daemon: Daemon,
                                                        open_pair: tuple[Path, str]) -> None:
    world, repo = open_pair
    mine = world / "nobody-out"
    mine.mkdir(exist_ok=True)
    os.chown(mine, NOBODY, NOBODY)
    p = as_nobody(world, open_daemon, "--repo", repo, "oci", "create-delta", "old", "new",
                  str(mine / "d.tar"), "-q")
    assert p.returncode == 0, p.stderr
    st = (mine / "d.tar").stat()
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY) and stat.S_ISREG(st.st_mode)
    assert os.listdir(mine) == ["d.tar"]
    # a directory the caller may not write: refused, nothing created
    theirs = world / "root-out"
    theirs.mkdir(exist_ok=True)
    theirs.chmod(0o755)
    p = as_nobody(world, open_daemon, "--repo", repo, "oci", "create-delta", "old", "new",
                  str(theirs / "d.tar"))
    assert p.returncode == 1 and "ermission denied" in p.stderr.decode(), p.stderr
    assert os.listdir(theirs) == []
    # a sticky world-writable directory: another user's file is not replaced
    sticky = world / "sticky"
    sticky.mkdir(exist_ok=True)
    sticky.chmod(0o1777)
    (sticky / "d.tar").write_bytes(b"root's")
    p = as_nobody(world, open_daemon, "--repo", repo, "oci", "create-delta", "old", "new",
                  str(sticky / "d.tar"))
    assert p.returncode == 1 and "not permitted" in p.stderr.decode(), p.stderr
    assert (sticky / "d.tar").read_bytes() == b"root's"
    assert os.listdir(sticky) == ["d.tar"]

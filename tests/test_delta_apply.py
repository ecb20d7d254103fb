"""Applying oci-delta artifacts through the real daemon (issue 5).

Old and new images are package-upgrade-like (modified big binaries, added and removed files,
whiteouts, a hardlink); the delta is made by the independent encoder of tests/deltatools.py
(all five v1 ops, v2 ZSTD_DICT frames from `zstd --patch-from`, a zstd-recompressed original
labelled +gzip).  Applying it from oci:, oci-archive: and a real docker-registry must give
exactly what a direct pull of the new image gives; hostile deltas give typed errors and leave
the repository byte-for-byte unchanged; temporary disk stays bounded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import Daemon, repo_snapshot, run_cfsctl, tree_listing
from tests.deltatools import (
    GZIP_LAYER,
    HEADER_V1,
    HEADER_V2,
    TAR_DIFF,
    D,
    Delta,
    Entry,
    F,
    Image,
    Layout,
    build_delta,
    encode_tardiff,
    make_signature,
    make_tar,
    merged_files,
    op,
    push_layout,
    sha256,
    wrap_ops,
    write_archive,
)
from tests.ocitools import Registry, require_tools, sh
from tests.varlink_raw import Raw, stream_frames

MiB = 1 << 20
OCI = "org.composefs.Oci."


# ------------------------------------------------------------------------------ content

def rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def text(seed: int, n: int) -> bytes:
    r = random.Random(seed)
    words = [bytes(r.choices(b"abcdefghijklmnop", k=r.randint(2, 9))) for _ in range(400)]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(r.choices(words, k=12)) + b"\n"
    return bytes(out[:n])


def upgrade(data: bytes, seed: int) -> bytes:
    """A new version of a file: scattered edits, an insertion and a deletion."""
    r = random.Random(seed)
    b = bytearray(data)
    for _ in range(20):
        i = r.randrange(len(b) - 16)
        b[i:i + 16] = r.randbytes(16)
    n = len(b)
    b[n // 3:n // 3] = r.randbytes(1000)
    del b[2 * n // 3:2 * n // 3 + 500]
    return bytes(b)


@dataclass
class World:
    root: Path
    images: Path
    old: Image
    new: Image
    files: dict[str, bytes]
    delta: Delta
    archive: Path
    reference: str      # a repository with old and new pulled directly


def build_world(root: Path) -> tuple[Path, Image, Image, dict[str, bytes], Delta]:
    big1, big2 = rand(1, 1_500_000), rand(2, 700_000)
    libfoo, libdata = text(3, 600_000), text(4, 300_000)
    l1 = [D("usr"), D("usr/bin"), D("usr/lib"), D("usr/share"), D("usr/share/doc"), D("etc"),
          D("dev"), F("usr/bin/big1", big1, 0o755), F("usr/bin/big2", big2, 0o755),
          F("usr/lib/libfoo.so.1", libfoo), F("usr/lib/libdata.so", libdata),
          F("etc/os-release", b"NAME=test\nVERSION=1\n"), F("etc/removed.conf", text(5, 5000)),
          F("usr/share/doc/README", text(6, 20000)), F("usr/share/doc/obsolete", text(7, 3000)),
          Entry("usr/bin/sh-link", "symlink", target="big1"),
          Entry("dev/console", "chardev", mode=0o600, rdev=(5, 1))]
    l2 = [F("usr/lib/libbar.so", rand(8, 400_000)),
          F("etc/os-release", b"NAME=test\nVERSION=1.1\n"),
          Entry("usr/share/doc/obsolete", "whiteout")]
    # the upgrade: three new layers on top of the old two
    l3 = [F("usr/bin/big1", upgrade(big1, 1), 0o755),
          Entry("usr/bin/big1-hard", "hardlink", target="usr/bin/big1"),
          F("usr/bin/big2-copy", big2, 0o755), Entry("etc/removed.conf", "whiteout"),
          F("usr/share/new.txt", text(9, 40000)), F("usr/lib/libdata.so", upgrade(libdata, 2))]
    l4 = [F("usr/lib/libfoo.so.1", upgrade(libfoo, 3)), F("usr/lib/libfoo.so.1.orig", libfoo),
          F("usr/bin/big2", upgrade(big2, 4), 0o755)]
    l5 = [D("usr/share/extra"), F("usr/share/extra/a.bin", rand(10, 200_000)),
          F("usr/share/extra/b.txt", text(11, 10000))]
    images = root / "images"
    lay = Layout(images)
    old = lay.write_image("old", [make_tar(l1), make_tar(l2)])
    new = lay.write_image("new", [make_tar(x) for x in (l1, l2, l3, l4, l5)])
    files = merged_files([l1, l2])
    delta = build_delta(root / "delta", old, new, files, {2: "v1", 3: "v2", 4: "original-zstd"})
    return images, old, new, files, delta


def cfs(daemon: Daemon, repo: str, *args: str, check: bool = True) -> Any:
    return run_cfsctl("--repo", repo, *args, address=daemon.address, check=check)


@pytest.fixture(scope="module")
def world(shared_daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> World:
    require_tools("zstd", "skopeo")
    root = tmp_path_factory.mktemp("delta")
    images, old, new, files, delta = build_world(root)
    archive = root / "delta.tar"
    write_archive(delta.path, archive)
    ref = str(root / "reference")
    cfs(shared_daemon, ref, "init", "--insecure")
    cfs(shared_daemon, ref, "oci", "pull", f"oci:{images}:old", "old")
    cfs(shared_daemon, ref, "oci", "pull", f"oci:{images}:new", "new")
    return World(root, images, old, new, files, delta, archive, ref)


@pytest.fixture(scope="module")
def registry(world: World) -> Iterator[Registry]:
    r = Registry()
    try:
        sh("skopeo", "copy", "-q", "--preserve-digests", "--dest-tls-verify=false",
           f"oci:{world.delta.path}", f"docker://{r.host}/delta:v1")
    except AssertionError:
        push_layout(r.host, "delta", "v1", world.delta.path)
    yield r
    r.stop()


def old_repo(daemon: Daemon, world: World, path: Path) -> str:
    """A repository holding only the old image (tagged "old")."""
    repo = str(path)
    cfs(daemon, repo, "init", "--insecure")
    cfs(daemon, repo, "oci", "pull", f"oci:{world.images}:old", "old")
    return repo


def raw_call(daemon: Daemon, repo: str, method: str, **params: Any) -> list[dict[str, Any]]:
    if method == "Pull":
        params = {"local_fetch": "disabled", "bootable": False, **params}
    return stream_frames(daemon.sock, repo, OCI + method, params)


def messages(frames: list[dict[str, Any]]) -> list[str]:
    return [f["parameters"]["message"] for f in frames
            if "message" in (f.get("parameters") or {})]


def assert_fsck_ok(daemon: Daemon, repo: str) -> None:
    fsck = json.loads(cfs(daemon, repo, "oci", "fsck", "--json").stdout)
    assert fsck["ok"], fsck


# ------------------------------------------------------------------------------ the encoder

def test_encoder_covers_every_op(world: World) -> None:
    assert world.delta.ops[2] == {0, 1, 2, 3, 4}          # v1: DATA OPEN COPY ADD SEEK
    assert {0, 1, 2, 4, 5} <= world.delta.ops[3]           # v2: ZSTD_DICT, then SEEK 0 + COPY
    assert world.delta.layer_blobs[2].startswith(HEADER_V1)
    assert world.delta.layer_blobs[3].startswith(HEADER_V2)
    assert world.delta.layer_blobs[4][:4] == b"\x28\xb5\x2f\xfd"   # zstd, labelled +gzip
    new_bytes = sum(len(b) for b in world.new.blobs[2:])
    assert world.delta.blob_bytes < new_bytes / 4


# ------------------------------------------------------------------------------ end to end

MEDIA = [("oci", "pull"), ("oci-archive", "pull"), ("oci-archive", "apply-delta"),
         ("docker", "pull"), ("docker", "apply-delta")]


@pytest.mark.parametrize(("medium", "via"), MEDIA, ids=[f"{m}-{v}" for m, v in MEDIA])
def test_apply_equals_direct_pull(shared_daemon: Daemon, world: World, registry: Registry,
                                  tmp_path: Path, medium: str, via: str) -> None:
    ref = {"oci": f"oci:{world.delta.path}", "oci-archive": f"oci-archive:{world.archive}",
           "docker": f"docker://{registry.host}/delta:v1"}[medium]
    repo = old_repo(shared_daemon, world, tmp_path / "repo")
    extra = ["--tls-verify", "false"] if medium == "docker" else []
    cmd = ["oci", "pull", *extra, ref, "new"] if via == "pull" else [
        "oci", "apply-delta", *extra, ref, "new"]
    p = cfs(shared_daemon, repo, *cmd)
    out = p.stdout.decode()
    assert f"manifest {world.new.digest}" in out
    assert f"config   {world.new.config_digest}" in out
    assert "Looking up source image..." in p.stderr.decode()
    expected = repo_snapshot(world.reference)
    assert repo_snapshot(repo) == expected
    ref_inspect = json.loads(cfs(shared_daemon, world.reference, "oci", "inspect", "new").stdout)
    got_inspect = json.loads(cfs(shared_daemon, repo, "oci", "inspect", "new").stdout)
    assert got_inspect["composefs_erofs"] == ref_inspect["composefs_erofs"]
    assert got_inspect["composefs_erofs"]
    for diff_id in world.new.diff_ids:
        tar = cfs(shared_daemon, repo, "oci", "layer", diff_id).stdout
        assert sha256(tar) == diff_id
    assert_fsck_ok(shared_daemon, repo)
    # applying again changes nothing
    p = cfs(shared_daemon, repo, "--json", *cmd)
    assert json.loads(p.stdout)["manifest_digest"] == world.new.digest
    frames = raw_call(shared_daemon, repo, "Pull" if via == "pull" else "ApplyDelta",
                      **{"image" if via == "pull" else "delta": ref, "name": "new"},
                      **({"tls_verify": False} if medium == "docker" else {}))
    assert "Target image already present." in messages(frames)
    assert repo_snapshot(repo) == expected


def test_apply_delta_cli_and_from(shared_daemon: Daemon, world: World, tmp_path: Path) -> None:
    repo = old_repo(shared_daemon, world, tmp_path / "repo")
    ref = f"oci:{world.delta.path}"
    p = cfs(shared_daemon, repo, "oci", "apply-delta", ref, "--from", "new", check=False)
    assert p.returncode == 1
    assert "NoSuchImage" in p.stderr.decode() or "no such image" in p.stderr.decode()
    p = cfs(shared_daemon, repo, "oci", "apply-delta", ref, "mine", "--from", "old",
            "--concurrency", "1")
    out = p.stdout.decode()
    assert f"manifest {world.new.digest}" in out and "tagged   mine" in out
    # --from an image with another config: not applicable (the target exists by now, still
    # the named source must be the delta's)
    cfs(shared_daemon, repo, "oci", "tag", f"@{world.new.digest}", "other")
    frames = raw_call(shared_daemon, repo, "ApplyDelta", delta=ref, source="other")
    assert frames[-1]["error"] == OCI + "DeltaNotApplicable", frames[-1]
    assert repo_snapshot(repo)["streams"] == repo_snapshot(world.reference)["streams"]


def test_not_a_delta(shared_daemon: Daemon, world: World, tmp_path: Path) -> None:
    repo = old_repo(shared_daemon, world, tmp_path / "repo")
    before = tree_listing(Path(repo))
    frames = raw_call(shared_daemon, repo, "ApplyDelta", delta=f"oci:{world.images}:new")
    assert frames[-1]["error"] == OCI + "InvalidData", frames[-1]
    assert tree_listing(Path(repo)) == before


def test_roles_not_positions(shared_daemon: Daemon, world: World, tmp_path: Path) -> None:
    """Layers are found by their role annotation: any order, unknown roles ignored."""
    def shuffle(m: dict[str, Any]) -> None:
        m["layers"].reverse()
        m["layers"].insert(1, {"mediaType": "application/x-future", "digest": sha256(b"?"),
                               "size": 1, "annotations": {
                                   "io.github.containers.delta.content": "future-role"}})
        m["layers"].append({"mediaType": TAR_DIFF, "digest": sha256(b"!"), "size": 1,
                            "annotations": {"io.github.containers.delta.content":
                                            "image-layer"}})
        m["layers"].append({"mediaType": TAR_DIFF, "digest": sha256(b"#"), "size": 1})
    blobs = {i: (TAR_DIFF if i < 4 else GZIP_LAYER, b)
             for i, b in world.delta.layer_blobs.items()}
    delta = build_delta(tmp_path / "delta", world.old, world.new, world.files,
                        {2: "v1", 3: "v2", 4: "original-zstd"}, blobs=blobs, mutate=shuffle)
    repo = old_repo(shared_daemon, world, tmp_path / "repo")
    # without "more": exactly one reply
    c = Raw(shared_daemon.sock, timeout=300)
    h = c.call("org.composefs.Repository.OpenRepository", {"path": repo})["parameters"]["handle"]
    r = c.call(OCI + "ApplyDelta", {"handle": h, "delta": f"oci:{delta.path}", "name": "new"})
    c.close()
    assert r is not None and set(r["parameters"]) == {"completed"} and "continues" not in r, r
    assert r["parameters"]["completed"]["manifest_digest"] == world.new.digest
    assert repo_snapshot(repo) == repo_snapshot(world.reference)


def test_source_resolution_rules(tmp_path: Path) -> None:
    """OPEN names resolve in the merged tree only: regular files (inline or objects, also
    through hardlinks); never symlinks, directories, devices or sparse files."""
    from cfsd.core import tree
    from cfsd.core.repository import Repository
    from cfsd.delta.source import TreeSource
    from cfsd.delta.tardiff import SourceFileError
    repo, _ = Repository.init(str(tmp_path / "repo"), insecure=True)
    data = rand(5, 5000)
    obj = repo.ensure_object(data)
    fs = tree.FileSystem()
    usr = tree.Directory()
    fs.root.insert(b"usr", usr)
    st = tree.Stat(0o100644)
    big = fs.push_leaf(st, tree.External(obj, len(data)))
    usr.insert(b"big", big)
    usr.insert(b"big-link", big)                     # a hardlink: the same leaf
    usr.insert(b"small", fs.push_leaf(st, tree.Inline(b"tiny")))
    usr.insert(b"sparse", fs.push_leaf(st, tree.Sparse(100)))
    usr.insert(b"sym", fs.push_leaf(tree.Stat(0o120777), tree.Symlink(b"big")))
    usr.insert(b"null", fs.push_leaf(tree.Stat(0o20666), tree.CharacterDevice(259)))
    usr.insert(b"dir", tree.Directory())
    fs.root.insert(b"lnk", fs.push_leaf(tree.Stat(0o120777), tree.Symlink(b"usr")))
    src = TreeSource(repo, fs)
    for name, want in (("usr/big", data), ("usr/big-link", data), ("usr/small", b"tiny")):
        f = src.open_source(name)
        try:
            assert f.read(1 << 20) == want
            f.seek(10)
            assert f.read(5) == want[10:15]
        finally:
            f.close()
    for name in ("usr/sparse", "usr/sym", "usr/null", "usr/dir", "lnk/big", "usr/big/x",
                 "usr/missing", "nope/big"):
        with pytest.raises(SourceFileError):
            src.open_source(name)
    repo.close()


# ------------------------------------------------------------------------------ signatures

def _pem(key: ec.EllipticCurvePrivateKey, path: Path) -> str:
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(path)


def test_signatures(shared_daemon: Daemon, world: World, tmp_path: Path) -> None:
    good, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    good_pem, other_pem = _pem(good, tmp_path / "good.pem"), _pem(other, tmp_path / "other.pem")
    blobs = {i: (TAR_DIFF if i < 4 else GZIP_LAYER, b)
             for i, b in world.delta.layer_blobs.items()}
    plan = {2: "v1", 3: "v2", 4: "original-zstd"}
    sig = make_signature(world.new.digest, good)
    signed = build_delta(tmp_path / "signed", world.old, world.new, world.files, plan,
                         blobs=blobs, signatures=[sig])
    wrong = build_delta(tmp_path / "wrong", world.old, world.new, world.files, plan,
                        blobs=blobs, signatures=[make_signature(world.old.digest, good)])
    unsigned = f"oci:{world.delta.path}"
    repo = old_repo(shared_daemon, world, tmp_path / "repo")
    before = tree_listing(Path(repo))
    for ref, key in ((f"oci:{signed.path}", other_pem), (unsigned, good_pem),
                     (f"oci:{wrong.path}", good_pem)):
        frames = raw_call(shared_daemon, repo, "ApplyDelta", delta=ref,
                          verify_key=Path(key).read_text())
        assert frames[-1].get("error") == OCI + "SignatureInvalid", frames[-1]
        assert tree_listing(Path(repo)) == before
    p = cfs(shared_daemon, repo, "oci", "apply-delta", unsigned, "--verify-key", good_pem,
            check=False)
    errors = [x for x in p.stderr.decode().splitlines() if x.startswith("Error")]
    assert p.returncode == 1 and len(errors) == 1 and "no signature" in errors[0]
    p = cfs(shared_daemon, repo, "oci", "apply-delta", f"oci:{signed.path}", "new",
            "--verify-key", good_pem)
    assert "verified" in p.stderr.decode()
    sig_digest = sha256(sig.manifest)
    link = Path(repo, "streams/refs/oci-referrers", world.new.digest, sig_digest)
    assert os.readlink(link).endswith(f"oci-manifest-{sig_digest}")
    inspect = json.loads(cfs(shared_daemon, repo, "oci", "inspect", "new").stdout)
    assert inspect["referrers"] == [sig_digest]
    listing = json.loads(cfs(shared_daemon, repo, "oci", "images", "--json").stdout)
    assert [i["referrer_count"] for i in listing["images"] if i["name"] == "new"] == [1]
    ref_streams = repo_snapshot(world.reference)["streams"]
    assert repo_snapshot(repo)["streams"].items() >= ref_streams.items()
    assert_fsck_ok(shared_daemon, repo)


# ------------------------------------------------------------------------------ hostile deltas

def _ops_blob(ops: bytes, version: int = 1) -> tuple[str, bytes]:
    return TAR_DIFF, wrap_ops(ops, version)


def _open(name: str) -> bytes:
    return op(1, len(name.encode()), name.encode())


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _blob_file(delta: Path, digest: str) -> Path:
    return delta / "blobs/sha256" / digest.removeprefix("sha256:")


@dataclass
class Hostile:
    error: str
    layer2: tuple[str, bytes] | Callable[[World], tuple[str, bytes]] | None = None
    layer3: tuple[str, bytes] | Callable[[World], tuple[str, bytes]] | None = None
    plan: dict[int, str] | None = None
    mutate: Callable[[dict[str, Any]], None] | None = None
    after: Callable[[World, Delta], None] | None = None
    target_manifest: Callable[[World], bytes] | None = None
    params: dict[str, Any] | None = None
    target: Callable[[World], Image] | None = None


def _wrong_content(w: World) -> tuple[str, bytes]:
    tar = bytearray(w.new.layers[2])
    i = tar.find(b"\n", tar.find(text(9, 40000)[:64]))
    tar[i + 1] ^= 0x20
    return TAR_DIFF, encode_tardiff(bytes(tar), w.files, 1)[0]


def _truncated(i: int) -> Callable[[World], tuple[str, bytes]]:
    return lambda w: (TAR_DIFF, w.delta.layer_blobs[i][:-7])


def _set_annotation(key: str, value: str) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["annotations"].__setitem__(key, value)


def _tamper_role(role: str) -> Callable[[World, Delta], None]:
    def f(w: World, d: Delta) -> None:
        m = json.loads(d.manifest)
        desc = next(x for x in m["layers"]
                    if x["annotations"]["io.github.containers.delta.content"] == role)
        _flip(_blob_file(d.path, desc["digest"]))
    return f


def _tamper_layer(i: int) -> Callable[[World, Delta], None]:
    return lambda w, d: _flip(_blob_file(d.path, sha256(d.layer_blobs[i])))


HOSTILE: dict[str, Hostile] = {
    "open-dotdot": Hostile("InvalidData", _ops_blob(_open("usr/../etc/os-release") + op(2, 4))),
    "open-absolute": Hostile("InvalidData", _ops_blob(_open("/etc/os-release") + op(2, 4))),
    "open-symlink": Hostile("InvalidData", _ops_blob(_open("usr/bin/sh-link") + op(2, 4))),
    "open-directory": Hostile("InvalidData", _ops_blob(_open("usr/bin") + op(2, 4))),
    "open-device": Hostile("InvalidData", _ops_blob(_open("dev/console") + op(2, 4))),
    "open-through-symlink": Hostile("InvalidData",
                                    _ops_blob(_open("usr/bin/sh-link/x") + op(2, 4))),
    "open-missing": Hostile("InvalidData", _ops_blob(_open("usr/bin/nope") + op(2, 4))),
    "open-whited-out": Hostile("InvalidData",
                               _ops_blob(_open("usr/share/doc/obsolete") + op(2, 4))),
    "oversized-add": Hostile("InvalidData",
                             _ops_blob(_open("usr/bin/big1") + op(3, 100 * MiB + 1))),
    "copy-past-end": Hostile("InvalidData", _ops_blob(_open("etc/os-release") + op(2, 1000))),
    "seek-past-end": Hostile("InvalidData", _ops_blob(_open("etc/os-release") + op(4, 1000))),
    "truncated-zstd": Hostile("InvalidData", _truncated(2)),
    "varint-overflow": Hostile("InvalidData", _ops_blob(b"\x00" + b"\xff" * 9 + b"\x02")),
    "zstd-op-in-v1": Hostile("InvalidData", _ops_blob(_open("usr/bin/big1") + op(5, 4, b"abcd"))),
    "bad-header": Hostile("InvalidData", (TAR_DIFF, b"tardf3\n\0" + wrap_ops(b"")[8:])),
    "wrong-diff-id": Hostile("DiffIdMismatch", _wrong_content),
    # one layer at a time, largest blob first: layer 2 is rebuilt and staged, then layer 3
    # fails; the staged layer must not become visible
    "second-layer-truncated": Hostile("InvalidData", None, _truncated(3),
                                      params={"concurrency": 1}),
    "tampered-target-manifest": Hostile("InvalidDigest", after=_tamper_role("image-manifest")),
    "target-annotation-mismatch": Hostile(
        "InvalidDigest", target_manifest=lambda w: w.new.manifest + b" ",
        mutate=lambda m: m["annotations"].__setitem__("io.github.containers.delta.target",
                                                      sha256(m["subject"]["digest"].encode()))),
    "tampered-config": Hostile("InvalidDigest", after=_tamper_role("image-config")),
    "tampered-delta-blob": Hostile("InvalidDigest", after=_tamper_layer(2)),
    "missing-source": Hostile("DeltaNotApplicable", mutate=_set_annotation(
        "io.github.containers.delta.source-config", sha256(b"some other config"))),
    "reused-layer-absent": Hostile("DeltaNotApplicable", plan={2: "omit", 3: "v2",
                                                               4: "original-zstd"}),
    "no-source-config": Hostile("InvalidData", mutate=lambda m: m["annotations"].pop(
        "io.github.containers.delta.source-config")),
}


def _extra_diff_id(w: World) -> Image:
    config = json.loads(w.new.config)
    config["rootfs"]["diff_ids"].append(sha256(b"one more"))
    cbytes = json.dumps(config).encode()
    manifest = json.loads(w.new.manifest)
    manifest["config"].update(digest=sha256(cbytes), size=len(cbytes))
    return Image("x", json.dumps(manifest).encode(), cbytes, w.new.layers, w.new.blobs,
                 w.new.descriptors)


def _other_config(w: World) -> Image:
    return Image("x", w.new.manifest, w.old.config, w.new.layers, w.new.blobs,
                 w.new.descriptors)


HOSTILE["diff-id-count"] = Hostile("InvalidData", target=_extra_diff_id)
HOSTILE["config-not-the-manifests"] = Hostile("InvalidDigest", target=_other_config)


def build_hostile(world: World, case: Hostile, path: Path) -> Delta:
    blobs = {i: (TAR_DIFF if i < 4 else GZIP_LAYER, b)
             for i, b in world.delta.layer_blobs.items()}
    for i, spec in ((2, case.layer2), (3, case.layer3)):
        if spec is not None:
            blobs[i] = spec(world) if callable(spec) else spec
    plan = case.plan or {2: "v1", 3: "v2", 4: "original-zstd"}
    tm = case.target_manifest(world) if case.target_manifest else None
    new = case.target(world) if case.target else world.new
    d = build_delta(path, world.old, new, world.files, plan, blobs=blobs,
                    mutate=case.mutate, target_manifest=tm)
    if case.after is not None:
        case.after(world, d)
    return d


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_delta(shared_daemon: Daemon, world: World, tmp_path: Path, case: str) -> None:
    spec = HOSTILE[case]
    delta = build_hostile(world, spec, tmp_path / "delta")
    repo = old_repo(shared_daemon, world, tmp_path / "repo")
    before = tree_listing(Path(repo))
    method = "Pull" if case in ("wrong-diff-id", "missing-source", "open-dotdot") else "ApplyDelta"
    key = "image" if method == "Pull" else "delta"
    frames = raw_call(shared_daemon, repo, method, **{key: f"oci:{delta.path}", "name": "x"},
                      **(spec.params or {}))
    assert frames[-1].get("error") == OCI + spec.error, frames[-1]
    assert not any("completed" in (f.get("parameters") or {}) for f in frames)
    assert tree_listing(Path(repo)) == before
    assert_fsck_ok(shared_daemon, repo)


def test_output_capped_at_layer_size(shared_daemon: Daemon, tmp_path: Path) -> None:
    """A tiny target layer cannot be rebuilt from a delta that expands to gigabytes."""
    lay = Layout(tmp_path / "images")
    old = lay.write_image("old", [make_tar([D("usr"), F("usr/a", text(1, 5000))])])
    new = lay.write_image("new", [make_tar([D("usr"), F("usr/a", text(1, 5000))]),
                                  make_tar([F("usr/b", b"tiny\n")])])
    assert len(new.blobs[1]) < 300
    bomb = wrap_ops(op(0, 64 * MiB, bytes(64 * MiB)))
    assert len(bomb) < 64 << 10
    delta = build_delta(tmp_path / "delta", old, new, {}, {1: "v1"},
                        blobs={1: (TAR_DIFF, bomb)})
    repo = str(tmp_path / "repo")
    cfs(shared_daemon, repo, "init", "--insecure")
    cfs(shared_daemon, repo, "oci", "pull", f"oci:{lay.path}:old", "old")
    before = tree_listing(Path(repo))
    frames = raw_call(shared_daemon, repo, "ApplyDelta", delta=f"oci:{delta.path}")
    assert frames[-1]["error"] == OCI + "InvalidData", frames[-1]
    assert "exceeds the limit" in frames[-1]["parameters"]["message"]
    assert tree_listing(Path(repo)) == before


# ------------------------------------------------------------------------------ temporary disk

class DiskWatch:
    """Samples, in a thread, the daemon's anonymous temporary files under the repository
    (delta blob downloads, objects being written) and its staging areas."""

    def __init__(self, pid: int, repo: str) -> None:
        self.pid, self.objects = pid, os.path.join(repo, "objects")
        self.temp_peak = self.total_peak = self.samples = 0
        self.rss_start = self.rss_peak = self.rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))

    def sample(self) -> tuple[int, int]:
        temp: dict[tuple[int, int], int] = {}
        fds = f"/proc/{self.pid}/fd"
        for fd in os.listdir(fds):
            try:
                target = os.readlink(f"{fds}/{fd}")
                if target.startswith(self.objects) and target.endswith(" (deleted)"):
                    st = os.stat(f"{fds}/{fd}")
                    temp[(st.st_dev, st.st_ino)] = st.st_size
            except OSError:
                continue
        staged = 0
        for d in os.listdir(self.objects):
            if d.startswith(".staging-"):
                try:
                    for e in os.scandir(os.path.join(self.objects, d)):
                        staged += e.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
        return sum(temp.values()), staged

    def _run(self) -> None:
        while not self._stop.is_set():
            temp, staged = self.sample()
            self.samples += 1
            self.temp_peak = max(self.temp_peak, temp)
            self.total_peak = max(self.total_peak, temp + staged)
            self.rss_peak = max(self.rss_peak, self.rss())
            time.sleep(0.003)

    def __enter__(self) -> DiskWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


@pytest.fixture(scope="module")
def big_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three 32 MiB binaries, each upgraded in its own new layer (three delta layers)."""
    root = tmp_path_factory.mktemp("bigdelta")
    names = ["usr/big-a", "usr/big-b", "usr/big-c"]
    files = {n: rand(21 + i, 32 * MiB) for i, n in enumerate(names)}

    def edit(data: bytes, seed: int) -> bytes:
        r = random.Random(seed)
        buf = bytearray(data)
        for _ in range(8):
            i = r.randrange(len(buf) - 100)
            buf[i:i + 100] = r.randbytes(100)
        return bytes(buf)

    l1 = make_tar([D("usr")] + [F(n, files[n]) for n in names])
    lay = Layout(root / "images")
    old = lay.write_image("old", [l1], level=1)
    new = lay.write_image("new", [l1] + [make_tar([F(n, edit(files[n], i))])
                                         for i, n in enumerate(names)], level=1)
    delta = build_delta(root / "delta", old, new, files, {1: "v1", 2: "v1", 3: "v1"},
                        methods={n: "blocks" for n in names})
    return {"root": root, "images": lay.path, "old": old, "new": new, "delta": delta}


def in_flight(frames: list[dict[str, Any]]) -> int:
    """The most layers rebuilt at the same time, from the started/done events."""
    now = peak = 0
    for f in frames:
        p = f.get("parameters") or {}
        if "started" in p and p["started"]["unit"] == "Bytes":
            now += 1
            peak = max(peak, now)
        elif "done" in p and p["done"]["id"] != "apply-delta":
            now -= 1
    return peak


@pytest.mark.parametrize("medium", ["docker", "oci"])
def test_temporary_disk_is_bounded(tmp_path: Path, big_world: dict[str, Any],
                                   medium: str) -> None:
    d = Daemon(tmp_path)
    reg = Registry() if medium == "docker" else None
    try:
        delta: Delta = big_world["delta"]
        new: Image = big_world["new"]
        repo = str(tmp_path / "repo")
        run_cfsctl("--repo", repo, "init", "--insecure", address=d.address)
        run_cfsctl("--repo", repo, "oci", "pull", f"oci:{big_world['images']}:old", "old",
                   address=d.address)
        if reg is not None:
            ref = push_layout(reg.host, "big", "v1", delta.path)
            params = {"tls_verify": False}
        else:
            ref, params = f"oci:{delta.path}", {"concurrency": 2}
        objects_before = _du(Path(repo, "objects"))
        with DiskWatch(d.proc.pid, repo) as watch:
            frames = raw_call(d, repo, "ApplyDelta", delta=ref, **params)
        assert "completed" in frames[-1]["parameters"], frames[-1]
        assert in_flight(frames) == 2       # the default for registries; asked for oci:
        added = _du(Path(repo, "objects")) - objects_before
        layer = max(len(t) for t in new.layers[1:])
        blob = max(len(b) for b in delta.layer_blobs.values())
        concurrency = 2
        bound = (blob + layer) * concurrency
        print(f"{medium}: {watch.samples} samples, temporary peak {watch.temp_peak / MiB:.1f} "
              f"MiB, temporary+staged peak {watch.total_peak / MiB:.1f} MiB, objects added "
              f"{added / MiB:.1f} MiB, bound (blob {blob} + layer {layer / MiB:.1f} MiB) x 2 = "
              f"{bound / MiB:.1f} MiB; daemon RSS {watch.rss_start / MiB:.0f} -> peak "
              f"{watch.rss_peak / MiB:.0f} MiB")
        assert watch.samples > 10
        assert watch.total_peak >= layer // 2          # the watch did see the layer being built
        assert watch.temp_peak <= bound
        # beyond what stays in the repository, at most the bound was ever used
        assert watch.total_peak <= added + bound
        # memory does not grow with the layers (2 x 32 MiB rebuilt at once)
        assert watch.rss_peak - watch.rss_start < 48 * MiB
        assert frames[-1]["parameters"]["completed"]["manifest_digest"] == new.digest
    finally:
        if reg is not None:
            reg.stop()
        d.stop()


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


def test_pull_of_delta_cleans_up_on_cancel(tmp_path: Path, big_world: dict[str, Any]) -> None:
    """A client that goes away mid-apply leaves no staging area and no tag behind."""
    d = Daemon(tmp_path)
    try:
        repo = str(tmp_path / "repo")
        run_cfsctl("--repo", repo, "init", "--insecure", address=d.address)
        run_cfsctl("--repo", repo, "oci", "pull", f"oci:{big_world['images']}:old", "old",
                   address=d.address)
        before = tree_listing(Path(repo))
        c = Raw(d.sock, timeout=120)
        h = c.call("org.composefs.Repository.OpenRepository",
                   {"path": repo})["parameters"]["handle"]
        c.send(OCI + "ApplyDelta", {"handle": h, "delta": f"oci:{big_world['delta'].path}",
                                    "name": "x"}, more=True)
        while True:
            f = c.recv()
            assert f is not None and "error" not in f, f
            if "started" in f["parameters"] and f["parameters"]["started"]["unit"] == "Bytes":
                break
        c.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if tree_listing(Path(repo)) == before:
                break
            time.sleep(0.05)
        assert tree_listing(Path(repo)) == before
        assert d.alive()
    finally:
        d.stop()
    shutil.rmtree(tmp_path / "repo", ignore_errors=True)

"""Repository-to-repository transfer (splitdirfdstream-v0): ``cfsctl oci copy``, and
GetLayer / PutLayer / FinalizeImage through a raw varlink client passing real fds."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, run_cfsctl
from tests.deltatools import D, F, Layout, make_tar, sha256
from tests.otheruser import NOBODY, as_nobody, other_user_marks, run_as
from tests.varlink_raw import Raw

OCI = "org.composefs.Oci."
REPO = "org.composefs.Repository."

LAYERS = [
    [D("usr"), F("usr/small", b"tiny"), F("usr/big", bytes(range(256)) * 40),
     F("usr/bin/tool", b"\x7fELF" + b"x" * 5000, 0o755)],
    [D("usr"), F("usr/more", b"y" * 3000), F("usr/big", b"replaced" * 100)],
]


class Peer(Raw):
    """A raw varlink connection whose calls return the descriptors of the reply too."""

    def __init__(self, path: str) -> None:
        super().__init__(path, timeout=60)

    def call(self, method: str, params: Any = None,  # type: ignore[override]
             fds: list[int] | None = None, **flags: Any) -> tuple[dict[str, Any], list[int]]:
        self.send(method, params, fds, **flags)
        reply, got = self.recv_with_fds()
        if reply is None:
            raise ConnectionError("connection closed")
        return reply, got

    def open(self, repo: str) -> int:
        reply, _ = self.call(REPO + "OpenRepository", {"path": repo})
        return reply["parameters"]["handle"]


def read_all(fd: int) -> bytes:
    parts = []
    while data := os.read(fd, 1 << 16):
        parts.append(data)
    return b"".join(parts)


def resolve(stream: bytes, dirs: list[int]) -> tuple[bytes, int]:
    """The tar a splitdirfdstream describes (an independent decoder), and its file count."""
    out = []
    pos = files = 0
    while pos < len(stream):
        tag = stream[pos]
        if tag in (0, 1):
            (n,) = struct.unpack_from("<I", stream, pos + 1)
            out.append(stream[pos + 5:pos + 5 + n])
            pos += 5 + n
        else:
            assert tag == 2
            length, index, name_len = struct.unpack_from("<QII", stream, pos + 1)
            name = stream[pos + 17:pos + 17 + name_len]
            pos += 17 + name_len
            fd = os.open(name, os.O_RDONLY, dir_fd=dirs[index])
            try:
                data = read_all(fd)
            finally:
                os.close(fd)
            assert len(data) == length
            out.append(data)
            files += 1
    return b"".join(out), files


def stream(chunks: list[bytes | tuple[bytes, int]]) -> bytes:
    """A splitdirfdstream of inline bytes and (name, length) file references (dir 0)."""
    out = b""
    for c in chunks:
        if isinstance(c, tuple):
            out += struct.pack("<BQII", 2, c[1], 0, len(c[0])) + c[0]
        else:
            out += struct.pack("<BI", 0, len(c)) + c
    return out


def piped(data: bytes) -> int:
    """A pipe read end already holding *data* (writer closed)."""
    r, w = os.pipe()
    assert len(data) < 60_000
    os.write(w, data)
    os.close(w)
    return r


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, shared_daemon: Daemon) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("transfer")
    layout = Layout(root / "layout")
    img = layout.write_image("app", [make_tar(x) for x in LAYERS])
    repo = str(root / "src")
    cfs = lambda *a: run_cfsctl("--repo", repo, *a, address=shared_daemon.address)  # noqa: E731
    cfs("init", "--insecure")
    cfs("oci", "pull", f"oci:{layout.path}:app", "app")
    return {"root": root, "repo": repo, "img": img, "tars": img.layers}


def test_oci_copy_gives_the_same_image(source: dict[str, Any], shared_daemon: Daemon,
                                       tmp_path: Path) -> None:
    dest = str(tmp_path / "dest")
    cfs = lambda repo, *a: run_cfsctl("--repo", repo, *a,  # noqa: E731
                                      address=shared_daemon.address)
    cfs(dest, "init", "--insecure")
    out = cfs(dest, "oci", "copy", "app", "--from", source["repo"]).stdout.decode()
    assert f"manifest {source['img'].digest}" in out and "2 copied, 0 already" in out
    assert "tagged app" in out
    for what in ("compute-id", "dump"):
        assert cfs(dest, "oci", what, "app").stdout == cfs(source["repo"], "oci", what,
                                                            "app").stdout
    for flag in ("--manifest", "--config"):
        assert cfs(dest, "oci", "inspect", flag, "app").stdout == \
            cfs(source["repo"], "oci", "inspect", flag, "app").stdout
    assert json.loads(cfs(dest, "oci", "fsck", "--json").stdout)["ok"]
    assert cfs(dest, "fsck").returncode == 0
    # again, under another name: every layer is already there
    out = cfs(dest, "oci", "copy", f"@{source['img'].digest}", "--from", source["repo"],
              "--name", "again").stdout.decode()
    assert "0 copied, 2 already present" in out and "tagged again" in out
    # zero-copy on one filesystem: the objects are the source's files, hardlinked
    linked = str(tmp_path / "linked")
    cfs(linked, "init", "--insecure")
    out = cfs(linked, "oci", "copy", "app", "--from", source["repo"], "--zerocopy").stdout
    assert b"objects 0 copied, 4 linked" in out, out
    assert cfs(linked, "oci", "compute-id", "app").stdout == cfs(source["repo"], "oci",
                                                                 "compute-id", "app").stdout
    shared = [p for p in Path(linked, "objects").glob("??/*")
              if (Path(source["repo"]) / "objects" / p.parent.name / p.name).exists()
              and p.stat().st_ino == (Path(source["repo"]) / "objects" / p.parent.name
                                      / p.name).stat().st_ino]
    assert len(shared) == 4
    assert cfs(linked, "fsck").returncode == 0


def test_get_layer_streams_the_exact_tar(source: dict[str, Any],
                                         shared_daemon: Daemon) -> None:
    p = Peer(shared_daemon.sock)
    try:
        h = p.open(source["repo"])
        info, _ = p.call(OCI + "GetInfo", {})
        assert info["parameters"]["features"] == ["splitdirfdstream-v0"]
        for more in (False, True):
            for tar in source["tars"]:
                reply, fds = p.call(OCI + "GetLayer", {"handle": h,
                                                     "params": {"diff_id": sha256(tar)}},
                                    more=more)
                assert not reply.get("continues")
                n = reply["parameters"]["dir_count"]
                assert len(fds) >= 1 + n
                try:
                    raw = read_all(fds[0])
                    rebuilt, files = resolve(raw, fds[1:1 + n])
                finally:
                    for fd in fds:
                        os.close(fd)
                assert rebuilt == tar
                assert files >= 2          # the files above 64 bytes are file-backed
        reply, fds = p.call(OCI + "GetLayer", {"handle": h, "params": {}})
        assert reply["error"] == OCI + "InvalidRequest" and not fds
        reply, _ = p.call(OCI + "GetLayer", {"handle": h,
                                           "params": {"diff_id": "sha256:" + "0" * 64}})
        assert reply["error"] == OCI + "NoSuchLayer"
        reply, _ = p.call(OCI + "GetLayer", {"handle": h, "params": {"diff_id": "sha256:zz"}})
        assert reply["error"] == OCI + "InvalidDigest"
    finally:
        p.close()


def test_put_layer_relay_and_its_refusals(source: dict[str, Any], shared_daemon: Daemon,
                                          tmp_path: Path) -> None:
    dest = str(tmp_path / "dest")
    run_cfsctl("--repo", dest, "init", "--insecure", address=shared_daemon.address)
    files = tmp_path / "files"
    files.mkdir()
    body = b"z" * 1000
    (files / "data").write_bytes(body)
    os.symlink("data", files / "link")
    tar = make_tar([D("usr"), F("usr/data", body)])
    # the tar split at the file body: header + body (from a file) + padding/end
    head = tar[:1024]
    tail = tar[1024 + len(body):]
    p = Peer(shared_daemon.sock)
    dfd = os.open(files, os.O_RDONLY | os.O_DIRECTORY)
    try:
        h = p.open(dest)

        def put(data: bytes, diff_id: str, extra: list[int] | None = None) -> dict[str, Any]:
            r = piped(data)
            try:
                reply, _ = p.call(OCI + "PutLayer", {"handle": h, "diff_id": diff_id,
                                                   "zerocopy": False},
                                  [r] + (extra if extra is not None else [dfd]))
            finally:
                os.close(r)
            return reply

        def has(diff_id: str) -> bool:
            return p.call(OCI + "HasLayer", {"handle": h, "diff_id": diff_id})[0][
                "parameters"]["present"]

        wrong = "sha256:" + "1" * 64
        reply = put(stream([head, (b"data", len(body)), tail]), wrong)
        assert reply["error"] == OCI + "DiffIdMismatch"
        assert reply["parameters"] == {"expected": wrong, "actual": sha256(tar)}
        assert not has(wrong) and not has(sha256(tar))
        for bad, error in [((b"../files/data", len(body)), "InvalidData"),
                           ((b"/etc/passwd", 10), "InvalidData"),
                           ((b"link", len(body)), "InvalidData"),
                           ((b"data", len(body) + 1), "InvalidData"),
                           ((b"missing", 3), "InvalidRequest")]:
            reply = put(stream([head, bad, tail]), sha256(tar))
            assert reply["error"] == OCI + error, (bad, reply)
        reply = put(stream([head])[:-3], sha256(tar))
        assert reply["error"] == OCI + "InvalidData"          # ends inside a chunk
        reply = put(stream([head, (b"data", len(body)), tail]), sha256(tar), extra=[])
        assert reply["error"] == OCI + "InvalidRequest"       # no directory fd
        assert not has(sha256(tar))
        reply = put(stream([head, (b"data", len(body)), tail]), sha256(tar))
        assert reply["parameters"]["already_present"] is False
        assert reply["parameters"]["objects_copied"] == 1
        assert has(sha256(tar))
        reply = put(stream([head, (b"data", len(body)), tail]), sha256(tar))
        assert reply["parameters"]["already_present"] is True
        # zero-copy links only files nobody but the repository owner can change
        (files / "loose").write_bytes(b"q" * len(body))
        (files / "loose").chmod(0o666)
        loose = make_tar([D("usr"), F("usr/data", b"q" * len(body))])
        r = piped(stream([loose[:1024], (b"loose", len(body)), loose[1024 + len(body):]]))
        try:
            reply, _ = p.call(OCI + "PutLayer", {"handle": h, "diff_id": sha256(loose),
                                                 "zerocopy": True}, [r, dfd])
        finally:
            os.close(r)
        assert reply["parameters"]["objects_copied"] == 1, reply
        assert reply["parameters"]["objects_hardlinked"] == 0, reply
        # a relay GetLayer (source) -> PutLayer (destination) on one connection
        hs = p.open(source["repo"])
        for tar in source["tars"]:
            got, fds = p.call(OCI + "GetLayer", {"handle": hs, "params": {"diff_id": sha256(tar)}})
            try:
                reply, _ = p.call(OCI + "PutLayer", {"handle": h, "diff_id": sha256(tar),
                                                   "zerocopy": True}, fds[:2])
            finally:
                for fd in fds:
                    os.close(fd)
            assert reply["parameters"]["already_present"] is False, reply
            # repository objects (root's, 0644, same filesystem) are linked, not copied
            assert reply["parameters"]["objects_copied"] == 0, reply
            assert reply["parameters"]["objects_hardlinked"] >= 1, reply
        layers = [{"diff_id": sha256(t), "layer_verity": p.call(
            OCI + "HasLayer", {"handle": h, "diff_id": sha256(t)})[0]["parameters"]["layer_verity"]}
            for t in source["tars"]]
        img = source["img"]
        docs = {"handle": h, "manifest_json": img.manifest.decode(),
                "config_json": img.config.decode()}
        reply, _ = p.call(OCI + "FinalizeImage", {**docs, "layers": layers[::-1], "name": "x"})
        assert reply["error"] == OCI + "InvalidRequest"       # layers out of order
        reply, _ = p.call(OCI + "FinalizeImage", {**docs, "layers": layers, "name": "copied"})
        assert reply["parameters"]["manifest_digest"] == img.digest
        assert reply["parameters"]["config_digest"] == img.config_digest
        # more directories than PutLayer takes: FdLimitExceeded, nothing imported
        extra = [os.dup(dfd) for _ in range(9)]
        r = piped(stream([head, (b"data", len(body)), tail]))
        try:
            reply, _ = p.call(OCI + "PutLayer", {"handle": h, "diff_id": sha256(tar),
                                                 "zerocopy": False}, [r, *extra])
        finally:
            os.close(r)
            for fd in extra:
                os.close(fd)
        assert reply == {"error": OCI + "FdLimitExceeded",
                         "parameters": {"fd_count": 10, "max_per_frame": 9}}, reply
        # too many fds in flight: a typed error, the connection dropped, the daemon serving
        q = Peer(shared_daemon.sock)
        many = [os.dup(dfd) for _ in range(20)]
        try:
            reply, _ = q.call(OCI + "PutLayer", {"handle": 0, "diff_id": sha256(tar),
                                               "zerocopy": False}, many)
            assert reply["error"] == "org.varlink.service.InvalidParameter"
            with pytest.raises(ConnectionError):
                q.call(OCI + "GetInfo", {})
        finally:
            for fd in many:
                os.close(fd)
            q.close()
    finally:
        os.close(dfd)
        p.close()
    cfs = lambda *a: run_cfsctl("--repo", dest, *a, address=shared_daemon.address)  # noqa: E731
    assert cfs("oci", "compute-id", "copied").stdout == run_cfsctl(
        "--repo", source["repo"], "oci", "compute-id", "app",
        address=shared_daemon.address).stdout
    assert json.loads(cfs("oci", "fsck", "--json").stdout)["ok"]


PUT_AS_CALLER = r"""
import array, json, os, socket, struct, sys
sock_path, repo, dir_path, name, size, diff_id = sys.argv[1:7]
dfd = os.open(dir_path, os.O_RDONLY | os.O_DIRECTORY)
s = socket.socket(socket.AF_UNIX)
s.connect(sock_path)
def call(method, params, fds=()):
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    s.sendmsg([json.dumps({"method": method, "parameters": params}).encode() + b"\0"], anc)
    buf = b""
    while not buf.endswith(b"\0"):
        buf += s.recv(65536)
    return json.loads(buf[:-1])
h = call("org.composefs.Repository.OpenRepository", {"path": repo})["parameters"]["handle"]
data = struct.pack("<BQII", 2, int(size), 0, len(name)) + name.encode()
r, w = os.pipe()
os.write(w, data)
os.close(w)
print(json.dumps(call("org.composefs.Oci.PutLayer",
                      {"handle": h, "diff_id": diff_id, "zerocopy": False}, [r, dfd])))
"""


def test_put_layer_reads_files_with_the_callers_rights(world: Path,
                                                       open_daemon: Daemon) -> None:
    """A directory fd gives no more than the caller has: a file beneath it that the caller
    may not read is refused by the kernel, not read by root."""
    home = world / "transfer-home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    repo = home / "repo"
    p = as_nobody(world, open_daemon, "--repo", str(repo), "init", "--insecure")
    assert p.returncode == 0, p.stderr
    files = world / "transfer-files"
    files.mkdir(mode=0o755)
    (files / "secret").write_bytes(b"s" * 500)
    (files / "secret").chmod(0o600)               # root's
    (files / "open").write_bytes(b"o" * 500)      # readable, but not a tar
    (files / "open").chmod(0o644)
    script = world / "put_as_caller.py"
    script.write_text(PUT_AS_CALLER)
    script.chmod(0o644)
    for name, want in (("secret", "PermissionDenied"), ("open", "InvalidData")):
        p = run_as(world, open_daemon, [str(script), open_daemon.sock, str(repo), str(files),
                                        name, "500", "sha256:" + "2" * 64])
        assert p.returncode == 0, p.stderr
        reply = json.loads(p.stdout)
        assert reply["error"] == OCI + want, reply
    assert open_daemon.alive()


for _mark in other_user_marks:
    test_put_layer_reads_files_with_the_callers_rights = _mark(
        test_put_layer_reads_files_with_the_callers_rights)

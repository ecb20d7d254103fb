"""Bad input: a typed error or a clean close every time; the daemon keeps serving; the
repository is left exactly as it was."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, run_cfsctl, tree_listing
from tests.varlink_raw import Raw

R = "org.composefs.Repository."
O = "org.composefs.Oci."  # noqa: E741


def good_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(5):
            data = bytes([i]) * (1000 * (i + 1))
            ti = tarfile.TarInfo(f"usr/f{i}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def env(shared_daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    repo = str(tmp_path_factory.mktemp("bad") / "repo")
    run_cfsctl("--repo", repo, "init", "--insecure", "--algorithm", "fsverity-sha256-12",
               address=shared_daemon.address)
    tar = good_tar()
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    run_cfsctl("--repo", repo, "oci", "import-layer", digest, "good",
               address=shared_daemon.address, input=tar)
    return {"repo": repo, "sock": shared_daemon.sock, "digest": digest}


def with_handle(env: dict[str, str]) -> tuple[Raw, int]:
    c = Raw(env["sock"])
    r = c.call(R + "OpenRepository", {"path": env["repo"]})
    assert r is not None and "parameters" in r, r
    return c, r["parameters"]["handle"]


def pipe_with(data: bytes) -> int:
    """A read fd delivering *data* then EOF (written by a thread for large inputs)."""
    import threading
    r, w = os.pipe()

    def feed() -> None:
        try:
            os.write(w, data) if len(data) < 65536 else _write_all(w, data)
        except BrokenPipeError:
            pass
        finally:
            os.close(w)

    threading.Thread(target=feed, daemon=True).start()
    return r


def _write_all(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    while mv:
        mv = mv[os.write(fd, mv):]


def corrupt_tar(kind: str) -> bytes:
    t = bytearray(good_tar())
    if kind == "checksum":
        t[512 * 3 + 10] ^= 0xFF  # inside the second member's ustar header
    elif kind == "truncated":
        del t[1500:]
    elif kind == "stray-zero":
        t[0:0] = bytes(512)
    return bytes(t)


def import_case(kind: str) -> Callable[[dict[str, str]], dict | None]:
    def run(env: dict[str, str]) -> dict | None:
        c, h = with_handle(env)
        data = corrupt_tar(kind)
        fd = pipe_with(data)
        try:
            return c.call(O + "ImportLayer", {"handle": h, "digest": "sha256:" + hashlib.sha256(
                data).hexdigest()}, fds=[fd])
        finally:
            os.close(fd)
            c.close()
    return run


def call_case(method: str, params: object, *, out_fd: bool = False, **flags: object
              ) -> Callable[[dict[str, str]], dict | None]:
    def run(env: dict[str, str]) -> dict | None:
        c, h = with_handle(env)
        p = params(h) if callable(params) else params
        fd = os.open(os.devnull, os.O_WRONLY) if out_fd else None
        try:
            return c.call(method, p, fds=[fd] if fd is not None else None, **flags)
        finally:
            if fd is not None:
                os.close(fd)
            c.close()
    return run


def raw_case(data: bytes) -> Callable[[dict[str, str]], dict | None]:
    def run(env: dict[str, str]) -> dict | None:
        c = Raw(env["sock"])
        try:
            c.send_raw(data)
            return c.recv()
        finally:
            c.close()
    return run


def half_message(env: dict[str, str]) -> None:
    c = Raw(env["sock"])
    c.send_raw(b'{"method": "org.composefs.Repository.OpenRepos')
    c.close()


def wrong_digest_import(env: dict[str, str]) -> dict | None:
    c, h = with_handle(env)
    fd = pipe_with(good_tar() + b"\0" * 512)
    try:
        return c.call(O + "ImportLayer", {"handle": h, "digest": "sha256:" + "1" * 64}, fds=[fd])
    finally:
        os.close(fd)
        c.close()


def corrupt_stream_cat(env: dict[str, str]) -> dict | None:
    """A splitstream object whose content no longer matches: Cat reports InvalidData."""
    repo = Path(env["repo"])
    target = os.readlink(repo / "streams" / f"oci-layer-{env['digest']}")
    obj = (repo / "streams" / target).resolve()
    saved = obj.read_bytes()
    obj.write_bytes(saved[:150] + os.urandom(len(saved) - 150))
    c, h = with_handle(env)
    try:
        r, w = os.pipe()
        os.set_blocking(r, False)
        reply = c.call(R + "Cat", {"handle": h, "name": "refs/good"}, fds=[w])
        os.close(w)
        os.close(r)
        return reply
    finally:
        obj.write_bytes(saved)
        c.close()


BIG = "x" * (10 << 20)
CASES: dict[str, tuple[Callable[[dict[str, str]], dict | None], str | None]] = {
    "unknown-method": (call_case(R + "Frobnicate", {}), "org.varlink.service.MethodNotFound"),
    "unknown-interface": (call_case("org.example.Nope.Ping", {}),
                          "org.varlink.service.InterfaceNotFound"),
    "wrong-type-string-for-int": (call_case(R + "Fsck", {"handle": "1"}),
                                  "org.varlink.service.InvalidParameter"),
    "wrong-type-bool-for-int": (call_case(R + "Fsck", {"handle": True}),
                                "org.varlink.service.InvalidParameter"),
    "wrong-type-float-for-int": (call_case(R + "Fsck", {"handle": 1.5}),
                                 "org.varlink.service.InvalidParameter"),
    "wrong-type-int-for-bool": (call_case(R + "Gc", lambda h: {"handle": h, "dry_run": 5,
                                                                "roots": []}),
                                "org.varlink.service.InvalidParameter"),
    "wrong-enum": (call_case(O + "ComputeId", lambda h: {"handle": h, "image": "x",
                                                         "bootable": False, "xattrs": 3}),
                   "org.varlink.service.InvalidParameter"),
    "nested-wrong-type": (call_case(R + "Mount", lambda h: {"handle": h, "name": "x",
                                                             "options": "yes"}),
                          "org.varlink.service.InvalidParameter"),
    "missing-parameter": (call_case(R + "Gc", lambda h: {"handle": h}),
                          "org.varlink.service.InvalidParameter"),
    "unknown-parameter": (call_case(R + "Fsck", lambda h: {"handle": h, "bogus": 1}),
                          "org.varlink.service.InvalidParameter"),
    "parameters-not-object": (call_case(R + "Fsck", [1, 2]),
                              "org.varlink.service.InvalidParameter"),
    "more-not-bool": (call_case(R + "Fsck", lambda h: {"handle": h}, more="yes"),
                      "org.varlink.service.InvalidParameter"),
    "ten-megabyte-parameter": (call_case(R + "OpenRepository", {"path": "/" + BIG}),
                               "org.varlink.service.InvalidParameter"),
    "long-path": (call_case(R + "OpenRepository", {"path": "/" + "x" * 100_000}),
                  "org.composefs.Repository.RepoNotFound"),
    "garbage-bytes": (raw_case(b"\x00\xff\xfe garbage \x01\x02\0"),
                      "org.varlink.service.InvalidParameter"),
    "json-array": (raw_case(b"[1,2,3]\0"), "org.varlink.service.InvalidParameter"),
    "half-message-then-disconnect": (half_message, None),
    "tar-bad-checksum": (import_case("checksum"), "org.composefs.Oci.InvalidData"),
    "tar-truncated": (import_case("truncated"), "org.composefs.Oci.InvalidData"),
    "tar-stray-zero-block": (import_case("stray-zero"), "org.composefs.Oci.InvalidData"),
    "tar-wrong-diff-id": (wrong_digest_import, "org.composefs.Oci.DiffIdMismatch"),
    "cat-without-fd": (call_case(R + "Cat", lambda h: {"handle": h, "name": "refs/good"}),
                       "org.composefs.Repository.InvalidSpec"),
    "import-without-fd": (call_case(O + "ImportLayer", lambda h: {
        "handle": h, "digest": "sha256:" + "2" * 64}), "org.composefs.Oci.InvalidRequest"),
    "import-bad-digest": (call_case(O + "ImportLayer", lambda h: {
        "handle": h, "digest": "sha256:xyz"}), "org.composefs.Oci.InvalidDigest"),
    "cat-unknown": (call_case(R + "Cat", lambda h: {"handle": h, "name": "nope"}, out_fd=True),
                    "org.composefs.Repository.NoSuchRef"),
    "cat-escaping-name": (call_case(R + "Cat", lambda h: {"handle": h,
                                                          "name": "refs/../../../etc"},
                                    out_fd=True),
                          "org.composefs.Repository.InvalidSpec"),
    "corrupt-splitstream": (corrupt_stream_cat, "org.composefs.Repository.InvalidData"),
    "init-empty-path": (call_case(R + "InitRepository", {"path": ""}),
                           "org.composefs.Repository.InvalidSpec"),
    "unknown-handle": (call_case(R + "Fsck", {"handle": 424242}),
                       "org.composefs.Repository.InvalidHandle"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(env: dict[str, str], shared_daemon: Daemon, name: str) -> None:
    case, expected = CASES[name]
    before = tree_listing(Path(env["repo"]))
    reply = case(env)                      # a hang is a socket timeout, then pytest-timeout
    if expected is None:
        assert reply is None
    else:
        assert reply is not None, "connection closed instead of a typed error"
        assert reply.get("error") == expected, reply
        assert isinstance(reply.get("parameters", {}), dict)
    assert shared_daemon.alive()
    c = Raw(env["sock"])
    assert c.call("org.varlink.service.GetInfo")["parameters"]["product"] == "cfsd"
    c.close()
    assert tree_listing(Path(env["repo"])) == before
    out = run_cfsctl("--repo", env["repo"], "fsck", address=shared_daemon.address)
    assert out.stdout.decode().endswith("status: ok\n")


def test_oversized_message_is_refused(shared_daemon: Daemon) -> None:
    """A request growing past the 1 MiB limit without its NUL: a typed error, then the
    daemon closes the connection (unread bytes are dropped, the reply still arrives)."""
    c = Raw(shared_daemon.sock)
    c.send_raw(b"x" * (20 << 20))          # tolerates the daemon closing before the end
    assert c.recv() == {"error": "org.varlink.service.InvalidParameter",
                        "parameters": {"parameter": "message exceeds the size limit"}}
    try:
        assert c.recv() is None
    except ConnectionResetError:           # closed with our bytes unread: also a close
        pass
    c.close()
    assert shared_daemon.alive()
    c = Raw(shared_daemon.sock)
    assert c.call("org.varlink.service.GetInfo")["parameters"]["product"] == "cfsd"
    c.close()


def test_cli_one_line_errors(shared_daemon: Daemon, env: dict[str, str], tmp_path: Path) -> None:
    p = run_cfsctl("--repo", str(tmp_path / "missing"), "fsck", address=shared_daemon.address,
                   check=False)
    assert p.returncode == 1
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    bad = corrupt_tar("checksum")
    p = run_cfsctl("--repo", env["repo"], "oci", "import-layer",
                   "sha256:" + hashlib.sha256(bad).hexdigest(), address=shared_daemon.address,
                   input=bad, check=False)
    assert p.returncode == 1 and len(p.stderr.decode().splitlines()) == 1
    assert "checksum" in p.stderr.decode()
    p = run_cfsctl("--repo", env["repo"], "gc", "--bogus", address=shared_daemon.address,
                   check=False)
    assert p.returncode == 2

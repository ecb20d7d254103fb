"""A minimal raw varlink client for protocol-level tests (no client-side validation)."""

from __future__ import annotations

import array
import json
import os
import socket
from typing import Any


class Raw:
    """Send arbitrary bytes, read NUL-framed replies."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        """Send *data*; a server that answers (an error) and closes before reading all of
        it is allowed: its reply is still there to be read."""
        try:
            if fds:
                self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            array.array("i", fds).tobytes())])
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def send(self, method: str, params: Any = None, fds: list[int] | None = None,
             **flags: Any) -> None:
        msg = {"method": method, **flags}
        if params is not None:
            msg["parameters"] = params
        self.send_raw(json.dumps(msg).encode() + b"\0", fds)

    def recv_with_fds(self) -> tuple[dict[str, Any] | None, list[int]]:
        """The next reply and the descriptors that came with it (None at EOF)."""
        fds: list[int] = []
        while b"\0" not in self.buf:
            got = array.array("i")
            data, anc, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(253 * 4))
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got.frombytes(cdata[:len(cdata) - len(cdata) % 4])
            fds += got
            if not data:
                for fd in fds:
                    os.close(fd)
                return None, []
            self.buf += data
        msg, _, self.buf = self.buf.partition(b"\0")
        return json.loads(msg), fds

    def recv(self) -> dict[str, Any] | None:
        msg, fds = self.recv_with_fds()
        for fd in fds:
            os.close(fd)
        return msg

    def call(self, method: str, params: Any = None, fds: list[int] | None = None,
             **flags: Any) -> dict[str, Any] | None:
        self.send(method, params, fds, **flags)
        return self.recv()

    def close(self) -> None:
        self.sock.close()


def stream_frames(sock: str, repo: str, method: str, params: dict[str, Any],
                  timeout: float = 300) -> list[dict[str, Any]]:
    """Open *repo*, call the streaming *method* (fully qualified) with "more" and collect
    every frame up to the last one (an error reply is the last frame)."""
    c = Raw(sock, timeout=timeout)
    h = c.call("org.composefs.Repository.OpenRepository", {"path": repo})["parameters"]["handle"]
    c.send(method, {"handle": h, **params}, more=True)
    frames = []
    while True:
        f = c.recv()
        assert f is not None, "connection dropped"
        frames.append(f)
        if not f.get("continues"):
            break
    c.close()
    return frames

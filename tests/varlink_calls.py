"""A client that cannot pass file descriptors, as varlinkctl: one connection per call.

Standard library only, so another user can run it with the system python:
``python3 varlink_calls.py ADDRESS < calls.json`` where calls.json is a list of
``[method, parameters]`` pairs or of lists of pairs (a list of pairs shares one connection,
for calls that need a handle: use ``"$handle"`` for the handle the previous reply gave).
Prints one JSON list: per call, ``{"parameters": ...}`` or ``{"error": ..., "parameters": ...}``.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any


def call(sock: socket.socket, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """One request, its (final) reply."""
    sock.sendall(json.dumps({"method": method, "parameters": params}).encode() + b"\0")
    buf = b""
    while b"\0" not in buf:
        data = sock.recv(1 << 16)
        if not data:
            return {"error": "closed", "parameters": {}}
        buf += data
    return json.loads(buf[:buf.index(b"\0")])


def session(address: str, calls: list[list[Any]]) -> list[dict[str, Any]]:
    """Several calls on one connection; ``"$handle"`` is replaced by the last handle."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address.removeprefix("unix:"))
    handle = None
    out = []
    try:
        for method, params in calls:
            params = {k: (handle if v == "$handle" else v) for k, v in params.items()}
            reply = call(sock, method, params)
            handle = reply.get("parameters", {}).get("handle", handle)
            out.append(reply)
    finally:
        sock.close()
    return out


def main() -> None:
    address = sys.argv[1]
    results = []
    for item in json.load(sys.stdin):
        if item and isinstance(item[0], str):
            results.extend(session(address, [item]))
        else:
            results.extend(session(address, item))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()

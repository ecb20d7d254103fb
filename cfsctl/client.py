"""A varlink client with file-descriptor passing, and how cfsctl finds (or starts) cfsd.

cfsctl never touches a repository itself: every command is one or more calls to cfsd.  When
no daemon answers on the default sockets, cfsctl starts a private cfsd for the duration of
the command, connected through a socket pair (the "embedded" daemon).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import varlink

MAX_FDS = 253
INTERFACES = ("org.composefs.Repository", "org.composefs.Oci")


class CallError(Exception):
    """A varlink error reply."""

    def __init__(self, name: str, parameters: dict[str, Any]) -> None:
        super().__init__(name)
        self.name = name
        self.parameters = parameters

    @property
    def short(self) -> str:
        """The error name without its interface."""
        return self.name.rsplit(".", 1)[-1]

    def __str__(self) -> str:
        params = self.parameters
        if set(params) == {"message"}:
            return str(params["message"])
        detail = ", ".join(f"{k}: {v}" for k, v in params.items())
        return f"{self.short}" + (f" ({detail})" if detail else "")


class ConnectError(Exception):
    """No daemon could be reached or started."""


def interface_dir() -> Path:
    """Where the .varlink files are: $CFSD_INTERFACES, the source tree, or share/cfsd."""
    env = os.environ.get("CFSD_INTERFACES")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[1] / "interfaces",
                   Path(sys.prefix) / "share/cfsd/interfaces"]
    for c in candidates:
        if (c / f"{INTERFACES[0]}.varlink").is_file():
            return c
    raise ConnectError("cannot find the cfsd interfaces/ directory (set CFSD_INTERFACES)")


_known: dict[str, varlink.Interface] = {}


def method_params(method: str) -> list[str]:
    """Parameter names of *method* as declared in interfaces/ (ValueError if unknown)."""
    iface_name, _, name = method.rpartition(".")
    if iface_name not in _known:
        if iface_name == "org.varlink.service":
            path = Path(varlink.__file__).parent / "org.varlink.service.varlink"
        else:
            path = interface_dir() / f"{iface_name}.varlink"
        if not path.is_file():
            raise ValueError(f"unknown interface {iface_name}")
        _known[iface_name] = varlink.Interface(path.read_text(encoding="utf-8"))
    return list(_known[iface_name].get_method(name).in_type.fields)


class Client:
    """One varlink connection (not thread-safe; one call at a time)."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes] | None = None,
                 address: str | None = None) -> None:
        self.sock = sock
        self.proc = proc
        self.address = address        # None for an embedded daemon
        self.in_call = False          # a call was sent and its last reply not yet read
        self._buf = bytearray()
        self._fds: list[int] = []

    def close(self) -> None:
        """Close the connection (and wait for an embedded daemon to clean up and exit: it
        cancels a call in flight when the connection closes)."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self.sock.close()
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            except KeyboardInterrupt:      # a second Ctrl-C: do not wait for the cleanup
                pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, obj: dict[str, Any], fds: Sequence[int]) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\0"
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = self.sock.sendmsg([data], anc)
        else:
            sent = self.sock.send(data)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def _recv(self) -> tuple[dict[str, Any], list[int]]:
        while True:
            i = self._buf.find(b"\0")
            if i >= 0:
                msg = json.loads(bytes(self._buf[:i]))
                del self._buf[:i + 1]
                fds, self._fds = self._fds, []
                return msg, fds
            fds = array.array("i")
            data, anc, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(MAX_FDS * 4))
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(cdata[:len(cdata) - len(cdata) % 4])
            self._fds.extend(fds)
            if not data:
                raise ConnectionError("cfsd closed the connection")
            self._buf += data

    def stream(self, method: str, params: dict[str, Any] | None = None,
               fds: Sequence[int] = (), more: bool = True
               ) -> Iterator[tuple[dict[str, Any], list[int]]]:
        """Call *method* and yield ``(parameters, fds)`` for every reply frame."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        known = method_params(method)
        unknown = set(params) - set(known)
        if unknown:
            raise ValueError(f"{method} has no parameter(s) {', '.join(sorted(unknown))}")
        msg: dict[str, Any] = {"method": method, "parameters": params}
        if more:
            msg["more"] = True
        self.in_call = True
        self._send(msg, fds)
        while True:
            reply, rfds = self._recv()
            if "error" in reply:
                self.in_call = False
                for fd in rfds:
                    os.close(fd)
                raise CallError(reply["error"], reply.get("parameters") or {})
            last = not reply.get("continues")
            if last:
                self.in_call = False
            yield reply.get("parameters") or {}, rfds
            if last:
                return

    def call(self, method: str, params: dict[str, Any] | None = None,
             fds: Sequence[int] = ()) -> dict[str, Any]:
        """Call *method* and return its single reply (reply fds are closed)."""
        for reply, rfds in self.stream(method, params, fds, more=False):
            for fd in rfds:
                os.close(fd)
            return reply
        raise ConnectionError("no reply")


def default_sockets() -> list[str]:
    """Sockets cfsctl tries when no --address is given."""
    system = "/run/composefs/composefs.sock"
    if os.geteuid() == 0:
        return [system]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    user = [os.path.join(runtime, "composefs/composefs.sock")] if runtime else []
    return [*user, system]


def connect(address: str, timeout: float | None = None) -> Client:
    """Connect to ``unix:PATH`` (or a plain path)."""
    path = address.removeprefix("unix:")
    if path.startswith("@"):
        path = "\0" + path[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return Client(sock, address=address)


def daemon_command() -> list[str]:
    """How to start cfsd: $CFSD_DAEMON (a command line) or this interpreter's ``-m cfsd``."""
    env = os.environ.get("CFSD_DAEMON")
    return shlex.split(env) if env else [sys.executable, "-m", "cfsd"]


def spawn(extra_args: Sequence[str] = ()) -> Client:
    """Start a private cfsd serving one connection over a socket pair.

    It runs in a session of its own, so that the terminal's Ctrl-C reaches cfsctl only:
    cfsctl then closes the connection, and the daemon cancels the call and cleans up.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    cmd = [*daemon_command(), "--connection-fd", str(theirs.fileno()),
           "--log-level", os.environ.get("CFSD_LOG_LEVEL", "error"), *extra_args]
    try:
        proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError as e:
        ours.close()
        raise ConnectError(f"cannot start cfsd ({cmd[0]}): {e.strerror}") from None
    finally:
        theirs.close()
    return Client(ours, proc)


def open_client(address: str | None, daemon_args: Sequence[str] = ()) -> Client:
    """Connect to the given address, else a default socket, else an embedded daemon."""
    address = address or os.environ.get("CFSD_ADDRESS") or None
    if address:
        try:
            return connect(address)
        except OSError as e:
            raise ConnectError(f"cannot connect to cfsd at {address}: {e.strerror}") from None
    for path in default_sockets():
        with contextlib.suppress(OSError):
            return connect(path)
    return spawn(daemon_args)

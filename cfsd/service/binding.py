"""The one wrapper around the python ``varlink`` package (31.0.0).

We use the package for what it does well, parsing ``.varlink`` interface files, and replace
its server side, which has known defects (python varlink 31.0.0): here every request is
validated strictly against the IDL and called with keyword arguments (defects 1, 3), every
exception becomes a typed error reply and the connection stays up (2), requests are read in
large chunks (4), streaming replies set ``continues`` correctly (9), and the transport passes
file descriptors with SCM_RIGHTS and reports the peer's credentials (SO_PEERCRED).

Method implementations are methods of a handler object named like the IDL methods:
``def Method(self, call: Call, **params) -> dict``.  Streaming methods are generators: each
yielded dict is a frame with ``continues: true``; the generator's return value is the final
frame.  Without ``more`` only the final frame is sent.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import json
import logging
import os
import select
import selectors
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any

import varlink
import varlink.scanner as vs

log = logging.getLogger("cfsd.varlink")

# Limits on what one client can make the daemon hold (docs/limits.md).
MAX_MESSAGE = 1 << 20            # bytes of one request (its parameters are JSON)
MAX_PENDING_FDS = 16             # descriptors received and not yet claimed by a call
MAX_CONNECTIONS = 256            # connections served at once (one thread each)
MAX_CONNECTIONS_PER_UID = 32     # of which one user may hold
PARTIAL_MESSAGE_TIMEOUT = 30.0   # seconds a request may stay incomplete without progress
IDLE_TIMEOUT = 600.0             # seconds a connection may wait between requests
ACCEPT_BACKOFF_MAX = 1.0         # seconds between accept attempts while accept fails
WATCH_INTERVAL = 0.5             # seconds between checks for clients that went away
RECV_SIZE = 1 << 16
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
SERVICE_INTERFACE = "org.varlink.service"


class CallCancelled(Exception):
    """The call's client went away, or the daemon is stopping: the work stops."""


class VarlinkError(Exception):
    """An error reply: fully qualified error name plus parameters."""

    def __init__(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        super().__init__(name, parameters or {})
        self.name = name
        self.parameters = parameters or {}

    def __str__(self) -> str:
        return f"{self.name}: {json.dumps(self.parameters)}"


@dataclass(frozen=True)
class PeerCreds:
    """Credentials of the process at the other end of a Unix socket."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @classmethod
    def of(cls, sock: socket.socket) -> PeerCreds:
        """SO_PEERCRED (+ SO_PEERGROUPS) of a connected Unix socket."""
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return cls(pid, uid, gid, _peer_groups(sock))


_libc = ctypes.CDLL(None, use_errno=True)
NGROUPS_MAX = 65536


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """SO_PEERGROUPS: the supplementary groups of the peer when it connected.

    Read with libc directly: Python's getsockopt caps the buffer at 1024 bytes (256 groups)
    and fails beyond.  Without the option (old kernels) the caller gets no groups, which can
    only deny, never grant.
    """
    n = 64
    while True:
        buf = (ctypes.c_uint32 * n)()
        size = ctypes.c_uint32(ctypes.sizeof(buf))
        if _libc.getsockopt(sock.fileno(), socket.SOL_SOCKET, SO_PEERGROUPS, buf,
                            ctypes.byref(size)) == 0:
            return tuple(buf[:size.value // 4])
        if ctypes.get_errno() != errno.ERANGE or n >= NGROUPS_MAX:
            return ()
        n = min(NGROUPS_MAX, max(size.value // 4, n * 2))   # the kernel said how many


class Connection:
    """One client connection: identity, close callbacks and framed I/O with fds."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        try:
            self.creds = PeerCreds.of(sock)
        except OSError:
            self.creds = PeerCreds(0, -1, -1)
        self._send_lock = threading.Lock()
        self.closed = False
        self._buf = bytearray()
        self._fds: list[tuple[int, int]] = []   # (buffer offset of the message, fd)
        self.current: Call | None = None         # the call being served
        self.cancelled = False                  # set when the daemon stops

    def close(self) -> None:
        """Close the socket and drop unclaimed fds (handles outlive connections)."""
        if self.closed:
            return
        self.closed = True
        self._drop_fds()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _drop_fds(self) -> None:
        for _, fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def read_message(self) -> tuple[bytes, list[int]] | None:
        """Next NUL-terminated message and the fds that arrived with it; None at EOF (or
        when the client stalls: idle or mid-message past the timeouts)."""
        while True:
            i = self._buf.find(b"\0")
            if i >= 0:
                msg = bytes(self._buf[:i])
                del self._buf[:i + 1]
                fds = [fd for off, fd in self._fds if off <= i]
                self._fds = [(off - i - 1, fd) for off, fd in self._fds if off > i]
                return msg, fds
            if len(self._buf) > MAX_MESSAGE:
                raise VarlinkError(f"{SERVICE_INTERFACE}.InvalidParameter",
                                   {"parameter": "message exceeds the size limit"})
            fds = array.array("i")
            self.sock.settimeout(PARTIAL_MESSAGE_TIMEOUT if self._buf else IDLE_TIMEOUT)
            try:
                data, anc, flags, _ = self.sock.recvmsg(
                    RECV_SIZE, socket.CMSG_SPACE(MAX_PENDING_FDS * fds.itemsize))
            except (ConnectionResetError, OSError):     # includes the timeouts
                return None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
            for fd in fds:
                os.set_inheritable(fd, False)
                self._fds.append((len(self._buf), fd))
            if flags & socket.MSG_CTRUNC or len(self._fds) > MAX_PENDING_FDS:
                # the kernel dropped what did not fit; what did is closed here
                self._drop_fds()
                raise VarlinkError(f"{SERVICE_INTERFACE}.InvalidParameter",
                                   {"parameter": f"more than {MAX_PENDING_FDS} file "
                                                 "descriptors in flight"})
            if not data:
                return None
            self._buf += data

    def send(self, obj: dict[str, Any], fds: Iterable[int] = (),
             timeout: float = IDLE_TIMEOUT) -> None:
        """Send one message (with fds attached to its first byte); a client that reads
        nothing for *timeout* seconds is given up (TimeoutError, an OSError)."""
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\0"
        fdl = list(fds)
        with self._send_lock:
            self.sock.settimeout(timeout)
            if fdl:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fdl).tobytes())]
                sent = self.sock.sendmsg([data], anc)
            else:
                sent = self.sock.send(data)
            if sent < len(data):
                self.sock.sendall(data[sent:])


@dataclass
class Call:
    """Context of one method call, handed to the implementation."""

    method: str
    more: bool
    oneway: bool
    connection: Connection
    fds: list[int] = field(default_factory=list)
    reply_fds: list[int] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)

    def check_cancelled(self) -> None:
        """CallCancelled when the client went away or the daemon is stopping."""
        if self.cancel.is_set():
            raise CallCancelled(f"{self.method} cancelled: the client went away or the "
                                "daemon is stopping")

    @property
    def creds(self) -> PeerCreds:
        """Credentials of the caller."""
        return self.connection.creds

    def close_fds(self) -> None:
        """Close every received fd not taken by the implementation (and unsent reply fds)."""
        for fd in self.reply_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.reply_fds.clear()
        for i, fd in enumerate(self.fds):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                self.fds[i] = -1


class FdReader:
    """Blocking reads from a descriptor a call received, stopped when the call is
    cancelled (its client went away, or the daemon is stopping)."""

    def __init__(self, fd: int, call: Call) -> None:
        self.fd = fd
        self.call = call

    def read(self, n: int = -1, /) -> bytes:
        """Up to *n* bytes (1 MiB when *n* is not positive); b"" at the end."""
        self.call.check_cancelled()
        return os.read(self.fd, n if n > 0 else 1 << 20)


# ---------------------------------------------------------------------------------------------
# IDL type checking


class _TypeCheck:
    """Strict checks of JSON values against parsed varlink types."""

    def __init__(self, iface: vs.Interface) -> None:
        self.iface = iface

    def check(self, t: Any, v: Any, path: str) -> None:
        if isinstance(t, vs._Maybe):
            if v is not None:
                self.check(t.element_type, v, path)
            return
        if v is None:
            raise ValueError(path)
        if isinstance(t, vs._CustomType):
            member = self.iface.members.get(t.name)
            if not isinstance(member, vs._Alias):
                raise ValueError(path)
            self.check(member.type, v, path)
        elif isinstance(t, vs._Alias):
            self.check(t.type, v, path)
        elif isinstance(t, vs._Object):
            return
        elif isinstance(t, vs._Enum):
            if not isinstance(v, str) or v not in t.fields:
                raise ValueError(path)
        elif isinstance(t, vs._Array):
            if not isinstance(v, list):
                raise ValueError(path)
            for i, x in enumerate(v):
                self.check(t.element_type, x, f"{path}[{i}]")
        elif isinstance(t, vs._Dict):
            if not isinstance(v, dict):
                raise ValueError(path)
            for k, x in v.items():
                self.check(t.element_type, x, f"{path}[{k}]")
        elif isinstance(t, set):
            if not isinstance(v, dict):
                raise ValueError(path)
        elif isinstance(t, vs._Struct):
            self.struct(t, v, path)
        elif isinstance(t, bool):
            if not isinstance(v, bool):
                raise ValueError(path)
        elif isinstance(t, int):
            if not isinstance(v, int) or isinstance(v, bool) or not -(1 << 63) <= v < 1 << 64:
                raise ValueError(path)
        elif isinstance(t, float):
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise ValueError(path)
        elif isinstance(t, str):
            if not isinstance(v, str):
                raise ValueError(path)
        else:
            raise ValueError(path)

    def struct(self, t: vs._Struct, v: Any, path: str) -> None:
        if not isinstance(v, dict):
            raise ValueError(path or "parameters")
        for k in v:
            if k not in t.fields:
                raise ValueError(f"{path}.{k}" if path else k)
        for name, ft in t.fields.items():
            sub = f"{path}.{name}" if path else name
            if name not in v:
                if not isinstance(ft, vs._Maybe):
                    raise ValueError(sub)
                continue
            self.check(ft, v[name], sub)


ErrorMap = Callable[[str, Exception], VarlinkError | None]


@dataclass
class _Iface:
    iface: vs.Interface
    impl: Any
    checker: _TypeCheck
    error_map: ErrorMap | None


class Service:
    """A set of interfaces served together (plus org.varlink.service)."""

    def __init__(self, *, vendor: str, product: str, version: str, url: str) -> None:
        self.info = {"vendor": vendor, "product": product, "version": version, "url": url}
        self._ifaces: dict[str, _Iface] = {}
        path = os.path.join(os.path.dirname(varlink.__file__), "org.varlink.service.varlink")
        with open(path, encoding="utf-8") as f:
            self._service_text = f.read()

    def add_interface(self, text: str, impl: Any, error_map: ErrorMap | None = None) -> None:
        """Serve interface *text* (varlink IDL) with the methods of *impl*.

        *error_map* turns exceptions raised by the implementation into typed errors; anything
        it does not map becomes ``<interface>.InternalError``.
        """
        iface = vs.Interface(text)
        self._ifaces[iface.name] = _Iface(iface, impl, _TypeCheck(iface), error_map)

    def interface_names(self) -> list[str]:
        """Names of every interface served, org.varlink.service first."""
        return [SERVICE_INTERFACE, *sorted(self._ifaces)]

    def _service_method(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if method == "GetInfo":
            if params:
                raise VarlinkError(f"{SERVICE_INTERFACE}.InvalidParameter",
                                   {"parameter": next(iter(params))})
            return {**self.info, "interfaces": self.interface_names()}
        if method == "GetInterfaceDescription":
            name = params.get("interface")
            if not isinstance(name, str) or set(params) != {"interface"}:
                raise VarlinkError(f"{SERVICE_INTERFACE}.InvalidParameter",
                                   {"parameter": "interface"})
            if name == SERVICE_INTERFACE:
                return {"description": self._service_text}
            if name not in self._ifaces:
                raise VarlinkError(f"{SERVICE_INTERFACE}.InterfaceNotFound",
                                   {"interface": name})
            return {"description": self._ifaces[name].iface.description}
        raise VarlinkError(f"{SERVICE_INTERFACE}.MethodNotFound",
                           {"method": f"{SERVICE_INTERFACE}.{method}"})

    def handle(self, conn: Connection, raw: bytes, fds: list[int]) -> None:
        """Process one request message and send its replies on *conn*."""
        call: Call | None = None
        try:
            try:
                msg = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise VarlinkError(f"{SERVICE_INTERFACE}.InvalidParameter",
                                   {"parameter": "message is not valid JSON"}) from None
            if not isinstance(msg, dict) or not isinstance(msg.get("method"), str):
                raise VarlinkError(f"{SERVICE_INTERFACE}.InvalidParameter",
                                   {"parameter": "method"})
            for flag in ("more", "oneway", "upgrade"):
                if not isinstance(msg.get(flag, False), bool):
                    raise VarlinkError(f"{SERVICE_INTERFACE}.InvalidParameter",
                                       {"parameter": flag})
            params = msg.get("parameters", {})
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise VarlinkError(f"{SERVICE_INTERFACE}.InvalidParameter",
                                   {"parameter": "parameters"})
            call = Call(msg["method"], msg.get("more", False), msg.get("oneway", False),
                        conn, list(fds))
            fds = []
            conn.current = call
            if conn.cancelled:
                call.cancel.set()
            self._dispatch(call, params)
        except VarlinkError as e:
            if call is None or not call.oneway:
                conn.send({"error": e.name, "parameters": e.parameters})
        finally:
            conn.current = None
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if call is not None:
                call.close_fds()

    def _dispatch(self, call: Call, params: dict[str, Any]) -> None:
        iface_name, _, method = call.method.rpartition(".")
        if not iface_name or not method:
            raise VarlinkError(f"{SERVICE_INTERFACE}.InvalidParameter", {"parameter": "method"})
        if iface_name == SERVICE_INTERFACE:
            reply = self._service_method(method, params)
            if not call.oneway:
                call.connection.send({"parameters": reply})
            return
        entry = self._ifaces.get(iface_name)
        if entry is None:
            raise VarlinkError(f"{SERVICE_INTERFACE}.InterfaceNotFound",
                               {"interface": iface_name})
        member = entry.iface.members.get(method)
        if not isinstance(member, vs._Method):
            raise VarlinkError(f"{SERVICE_INTERFACE}.MethodNotFound", {"method": call.method})
        try:
            entry.checker.struct(member.in_type, params, "")
        except ValueError as e:
            raise VarlinkError(f"{SERVICE_INTERFACE}.InvalidParameter",
                               {"parameter": str(e)}) from None
        fn = getattr(entry.impl, method, None)
        if fn is None:
            raise VarlinkError(f"{SERVICE_INTERFACE}.MethodNotImplemented",
                               {"method": call.method})
        try:
            result = fn(call, **params)
            if isinstance(result, Generator):
                self._stream(call, entry, member, result)
            else:
                self._reply(call, entry, member, result, False)
        except VarlinkError:
            raise
        except BrokenPipeError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a typed reply
            mapped = entry.error_map(iface_name, e) if entry.error_map else None
            if mapped is not None:
                log.info("%s: %s", call.method, mapped)
                raise mapped from None
            log.error("%s failed: %s", call.method, e)
            log.debug("%s", traceback.format_exc())
            raise VarlinkError(f"{iface_name}.InternalError",
                               {"message": f"{type(e).__name__}: {e}"}) from None

    def _reply(self, call: Call, entry: _Iface, member: vs._Method, params: Any,
               continues: bool) -> None:
        params = params or {}
        try:
            entry.checker.struct(member.out_type, params, "")
        except ValueError as e:
            raise RuntimeError(f"reply of {call.method} does not match the interface at "
                               f"{e}") from None
        if call.oneway:
            return
        msg: dict[str, Any] = {"parameters": params}
        if continues:
            msg["continues"] = True
        fds, call.reply_fds = call.reply_fds, []
        try:
            call.connection.send(msg, fds)
        finally:
            for fd in fds:  # the peer has its own copies now
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _stream(self, call: Call, entry: _Iface, member: vs._Method,
                gen: Generator[dict[str, Any], None, dict[str, Any]]) -> None:
        try:
            while True:
                try:
                    frame = next(gen)
                except StopIteration as stop:
                    self._reply(call, entry, member, stop.value, False)
                    return
                if call.more:
                    self._reply(call, entry, member, frame, True)
        finally:
            gen.close()


# ---------------------------------------------------------------------------------------------
# Server


def listen_fds(unset: bool = True) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_FDS/LISTEN_PID), any count."""
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        n = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if pid != os.getpid() or n <= 0:
        return []
    if unset:
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(k, None)
    socks = []
    for fd in range(3, 3 + n):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def is_listening(sock: socket.socket) -> bool:
    """True for a listening socket (SO_ACCEPTCONN), False for a connected one."""
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def bind_unix(path: str, mode: int) -> socket.socket:
    """Bind and listen on a Unix socket path (a stale socket file is replaced)."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            probe.close()
            raise OSError(f"another server is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # the socket is created with exactly *mode* (bind honours the umask); no chmod of the
    # path afterwards, which would follow a symlink swapped in meanwhile
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


class Server:
    """Accept loop over listening sockets; one thread per connection, within the limits."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._conns: set[Connection] = set()
        self._per_uid: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._threads: list[threading.Thread] = []
        self._watcher: threading.Thread | None = None
        self._last_active = time.monotonic()

    def _admit(self, conn: Connection) -> str | None:
        """Count the connection in, or say why it cannot be served now."""
        with self._lock:
            if self._stop.is_set():
                return "the daemon is stopping"
            if len(self._conns) >= MAX_CONNECTIONS:
                return f"too many connections ({MAX_CONNECTIONS})"
            uid = conn.creds.uid
            if self._per_uid.get(uid, 0) >= MAX_CONNECTIONS_PER_UID:
                return f"too many connections of uid {uid} ({MAX_CONNECTIONS_PER_UID})"
            self._conns.add(conn)
            self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        return None

    def _leave(self, conn: Connection) -> None:
        with self._lock:
            if conn in self._conns:
                self._conns.discard(conn)
                uid = conn.creds.uid
                self._per_uid[uid] -= 1
                if not self._per_uid[uid]:
                    del self._per_uid[uid]
                self._last_active = time.monotonic()

    def serve_connection(self, sock: socket.socket, conn: Connection | None = None) -> None:
        """Serve one connected socket until the peer closes it (in this thread)."""
        if conn is None:
            conn = Connection(sock)
            refusal = self._admit(conn)
            if refusal is not None:
                _refuse(conn, refusal)
                return
        self._ensure_watcher()
        try:
            while not conn.closed:
                try:
                    item = conn.read_message()
                except VarlinkError as e:
                    with contextlib.suppress(OSError):
                        conn.send({"error": e.name, "parameters": e.parameters})
                    break
                if item is None:
                    break
                try:
                    self.service.handle(conn, *item)
                except OSError:
                    break
        finally:
            self._leave(conn)
            conn.close()

    def _ensure_watcher(self) -> None:
        with self._lock:
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="varlink-watch",
                                                 daemon=True)
                self._watcher.start()

    def _watch(self) -> None:
        """Cancel the calls whose client went away (or all, when the daemon stops)."""
        hangup = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0x2000)
        while True:
            stopping = self._stop.wait(WATCH_INTERVAL)
            with self._lock:
                busy = [c for c in self._conns if c.current is not None or stopping]
            for conn in busy:
                call = conn.current
                if stopping:
                    conn.cancelled = True
                    if call is not None:
                        call.cancel.set()
                    continue
                if call is None or call.cancel.is_set():
                    continue
                p = select.poll()
                try:
                    p.register(conn.sock.fileno(), hangup)
                    events = p.poll(0)
                except (OSError, ValueError):
                    events = [(0, select.POLLHUP)]
                if any(ev & hangup for _, ev in events):
                    call.cancel.set()
            if stopping:
                return

    def start_connection(self, sock: socket.socket) -> None:
        """Serve an already connected socket in a thread of its own (within the limits)."""
        self._start(sock)

    def wait_connections(self) -> None:
        """Return when every connection has closed (or shutdown() was called)."""
        while not self._stop.is_set():
            with self._lock:
                if not self._conns:
                    return
            self._stop.wait(0.2)

    def serve(self, listeners: list[socket.socket], exit_idle: float | None = None) -> None:
        """Accept connections until shutdown() is called (or, with *exit_idle*, until no
        connection has been open for that many seconds)."""
        sel = selectors.DefaultSelector()
        for s in listeners:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        backoff = 0.0
        try:
            while not self._stop.is_set():
                ready = sel.select(None if exit_idle is None else min(exit_idle, 1.0))
                if exit_idle is not None and not ready:
                    with self._lock:
                        idle = not self._conns and \
                            time.monotonic() - self._last_active >= exit_idle
                    if idle:
                        log.info("no connections for %.0f s: exiting", exit_idle)
                        return
                for key, _ in ready:
                    if key.fileobj == self._wake_r:
                        continue
                    lsock = key.fileobj
                    assert isinstance(lsock, socket.socket)
                    try:
                        csock, _ = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as e:
                        # EMFILE, ENFILE, ENOBUFS...: said once per episode, retried slower
                        if not backoff:
                            log.warning("accept failed: %s (backing off)", e)
                        backoff = min(ACCEPT_BACKOFF_MAX, (backoff or 0.01) * 2)
                        self._stop.wait(backoff)
                        continue
                    if backoff:
                        log.info("accepting connections again")
                        backoff = 0.0
                    self._start(csock)
        finally:
            sel.close()

    def _start(self, csock: socket.socket) -> None:
        csock.setblocking(True)
        conn = Connection(csock)
        refusal = self._admit(conn)
        if refusal is not None:
            _refuse(conn, refusal)
            return
        t = threading.Thread(target=self.serve_connection, args=(csock, conn),
                             name="varlink-conn", daemon=True)
        try:
            t.start()
        except RuntimeError as e:           # no thread could be started (pids limit)
            log.warning("cannot serve a connection: %s", e)
            self._leave(conn)
            _refuse(conn, "the daemon cannot start another thread now")
            return
        self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, cancel running calls, close every connection, wait briefly."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.cancelled = True
            if c.current is not None:
                c.current.cancel.set()
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout)


def _refuse(conn: Connection, why: str) -> None:
    """Tell a client it cannot be served now (typed error), and close."""
    with contextlib.suppress(OSError):
        conn.send({"error": "org.composefs.Repository.Busy", "parameters": {"message": why}},
                  timeout=1.0)
    conn.close()

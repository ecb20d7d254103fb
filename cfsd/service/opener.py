"""The opener: paths named by callers are opened by a process that *is* the caller.

A root daemon never resolves a caller's path itself.  Clients that can pass file descriptors
(cfsctl) open what they name and pass the fds.  For the others (``varlinkctl``,
``python -m varlink.cli``) the daemon asks this helper: a small single-threaded process,
started as root when the daemon starts (so it has loaded all it needs), that forks one child
per request.  The child takes the caller's exact identity (``setgroups``, ``setresgid``,
``setresuid`` from SO_PEERCRED + SO_PEERGROUPS), opens or creates what was asked — the kernel
applies mode bits, ACLs, symlinks and mount options as for the caller —, sends the fds back
over a socket private to the request and exits.  Directories it creates belong to the caller
because the caller created them; nothing is chowned.

Relative paths are resolved against the caller's working directory (``/proc/PID/cwd``, which
only a process with the caller's identity may open).

This module imports only the standard library: ``python -m cfsd.service.opener FD`` is the
helper's entry point.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

MAX_REQUEST = 1 << 20
CHILD_SECONDS = 30          # a request's child is killed after this long
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class OpenerError(OSError):
    """The helper could not be used (not an answer about the path)."""


# --------------------------------------------------------------------------- operations
# Shared by the helper's children and by an unprivileged daemon opening for its own user.


def _base(path: str, pid: int) -> int | None:
    """The caller's working directory for a relative path (None for an absolute one)."""
    if path.startswith("/"):
        return None
    if pid <= 0:
        raise OSError(errno.EINVAL, "a relative path needs the caller's working directory")
    return os.open(f"/proc/{pid}/cwd", DIR_FLAGS)


def _mkdirs(path: str, mode: int, base: int | None) -> None:
    """``mkdir -p`` (the last component with *mode*), each step relative to its parent."""
    parts = [p for p in path.split("/") if p]
    fd = os.open("/", DIR_FLAGS) if path.startswith("/") else os.dup(base)  # type: ignore[arg-type]
    try:
        for i, part in enumerate(parts):
            if part not in (".", ".."):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mode if i == len(parts) - 1 else 0o755, dir_fd=fd)
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def open_one(op: str, path: str, mode: int, pid: int) -> int:
    """Perform one operation as the current process; returns the opened fd.

    ``dir``: a directory; ``file``: a regular file (never blocks on a FIFO or device);
    ``mkdir``: a directory, created with its missing parents first; ``parent``: the
    directory that holds *path*'s last component.
    """
    if "\0" in path or not path:
        raise OSError(errno.EINVAL, "invalid path")
    base = _base(path, pid)
    try:
        if op == "parent":
            head, _, name = path.rstrip("/").rpartition("/")
            if not name or name in (".", ".."):
                raise OSError(errno.EINVAL, "the path does not name a file")
            path = head or ("/" if path.startswith("/") else ".")
            op = "dir"
        if op == "mkdir":
            _mkdirs(path, mode, base)
            op = "dir"
        if op == "dir":
            return os.open(path, DIR_FLAGS, dir_fd=base)
        if op == "file":
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                         dir_fd=base)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, "not a regular file")
            os.set_blocking(fd, True)
            return fd
        raise OSError(errno.EINVAL, f"unknown operation {op!r}")
    finally:
        if base is not None:
            os.close(base)


def run_ops(ops: list[dict[str, Any]], pid: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Every operation of a request: (results, fds of the successful ones, in order)."""
    results: list[dict[str, Any]] = []
    fds: list[int] = []
    for o in ops:
        try:
            fds.append(open_one(str(o["op"]), str(o["path"]), int(o.get("mode", 0o755)), pid))
            results.append({"ok": True})
        except OSError as e:
            results.append({"errno": e.errno or errno.EIO,
                            "error": e.strerror or str(e)})
    return results, fds


# --------------------------------------------------------------------------- framing


def _send(sock: socket.socket, obj: object, fds: Sequence[int] = ()) -> None:
    """One length-prefixed JSON message, with *fds* attached."""
    data = json.dumps(obj).encode()
    msg = struct.pack("!I", len(data)) + data
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds \
        else []
    sent = sock.sendmsg([msg], anc)
    if sent < len(msg):
        sock.sendall(msg[sent:])


def _recv(sock: socket.socket, max_fds: int) -> tuple[Any, list[int]] | None:
    """One message and its fds (at most *max_fds*); None at EOF."""
    buf = b""
    fds = array.array("i")
    while len(buf) < 4 or len(buf) < 4 + struct.unpack("!I", buf[:4])[0]:
        data, anc, _, _ = sock.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(max_fds * 4))
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[:len(cdata) - len(cdata) % 4])
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        buf += data
        if len(buf) > MAX_REQUEST + 4:
            raise OSError(errno.EMSGSIZE, "opener message too large")
    return json.loads(buf[4:]), list(fds)


# --------------------------------------------------------------------------- the helper


def _child(req: dict[str, Any], reply: socket.socket) -> None:
    signal.alarm(CHILD_SECONDS)
    try:
        os.setgroups([int(g) for g in req["groups"]])
        os.setresgid(req["gid"], req["gid"], req["gid"])
        os.setresuid(req["uid"], req["uid"], req["uid"])
        results, fds = run_ops(req["ops"], int(req.get("pid", 0)))
        _send(reply, {"results": results}, fds)
    except Exception as e:  # noqa: BLE001 - reported to the daemon
        with contextlib.suppress(OSError):
            _send(reply, {"failed": str(e)})
    os._exit(0)


def helper_main(fd: int) -> None:
    """The helper's loop: one fork per request, replies on the request's own socket."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)     # children are reaped by the kernel
    sock = socket.socket(fileno=fd)
    while True:
        item = _recv(sock, 1)
        if item is None:
            return
        req, fds = item
        if len(fds) != 1:
            for x in fds:
                os.close(x)
            continue
        reply = socket.socket(fileno=fds[0])
        try:
            pid = os.fork()
        except OSError:
            with contextlib.suppress(OSError):
                _send(reply, {"failed": "cannot fork"})
            reply.close()
            continue
        if pid == 0:
            sock.close()
            _child(req, reply)
        reply.close()


class Opener:
    """The daemon's side: starts the helper and asks it to open paths as a caller."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the helper (as the daemon's own identity; call before serving)."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._sock is not None:
            self._sock.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cfsd.service.opener", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            theirs.close()
        self._sock = ours

    def open(self, uid: int, gid: int, groups: tuple[int, ...], pid: int,
             ops: list[dict[str, Any]], timeout: float = CHILD_SECONDS + 5
             ) -> list[int | OSError]:
        """Perform *ops* as the caller: an fd or the OSError for each, in order."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            req = {"uid": uid, "gid": gid, "groups": list(groups), "pid": pid, "ops": ops}
            with self._lock:
                for attempt in (0, 1):
                    self._start_locked()
                    assert self._sock is not None
                    try:
                        _send(self._sock, req, [theirs.fileno()])
                        break
                    except (BrokenPipeError, ConnectionError):
                        if attempt:
                            raise OpenerError(errno.EIO,
                                              "the opener helper is not running") from None
                        if self._proc is not None:
                            self._proc.kill()
            theirs.close()
            ours.settimeout(timeout)
            try:
                item = _recv(ours, len(ops) + 1)
            except TimeoutError:
                raise OpenerError(errno.ETIMEDOUT, "opening the path timed out") from None
            if item is None:
                raise OpenerError(errno.EIO, "the opener helper did not answer")
            reply, fds = item
        finally:
            ours.close()
            with contextlib.suppress(OSError):
                theirs.close()
        if "failed" in reply:
            for fd in fds:
                os.close(fd)
            raise OpenerError(errno.EPERM, f"cannot act as uid {uid}: {reply['failed']}")
        out: list[int | OSError] = []
        it = iter(fds)
        for r in reply["results"]:
            if r.get("ok"):
                out.append(next(it))
            else:
                out.append(OSError(int(r["errno"]), str(r["error"])))
        return out

    def stop(self) -> None:
        """Stop the helper."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(5)
                if self._proc.poll() is None:
                    self._proc.kill()
                    self._proc.wait()
                self._proc = None


if __name__ == "__main__":
    helper_main(int(sys.argv[1]))

"""Writing a call's output to a descriptor its caller passed, without ever blocking forever.

A caller may pass a pipe it never reads.  A blocking write would then hold the call — and
the repository lock it holds — for as long as the caller likes, keeping the owner's gc out.
Pipes are therefore written through a descriptor of our own opened non-blocking
(``/proc/self/fd/N`` gives a new open file description, so the caller's flags are left
alone), sockets with ``MSG_DONTWAIT``; a write that makes no progress for
:data:`WRITE_STALL_TIMEOUT` seconds gives up.  Regular files and other descriptors are
written as they are (their writes do not wait on anyone).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
import time
from collections.abc import Callable

from cfsd.core.errors import RepositoryError

WRITE_STALL_TIMEOUT = 20.0      # seconds a reader may leave our output unread
WRITE_CHUNK = 1 << 20


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of *data* to the blocking descriptor *fd*."""
    mv = memoryview(data)
    while mv:
        mv = mv[os.write(fd, mv[:WRITE_CHUNK]):]


class OutputStalled(RepositoryError):
    """The caller did not read the output for WRITE_STALL_TIMEOUT seconds."""


class Sink:
    """A writable view of a caller's descriptor (see the module docstring)."""

    def __init__(self, fd: int, check: Callable[[], None] | None = None,
                 stall_timeout: float = WRITE_STALL_TIMEOUT) -> None:
        self.check = check or (lambda: None)
        self.stall_timeout = stall_timeout
        self.fd = fd
        self._own: int | None = None
        self._sock: socket.socket | None = None
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode):
            with contextlib.suppress(OSError):
                self._own = os.open(f"/proc/self/fd/{fd}",
                                    os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self.fd = self._own
        elif stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=os.dup(fd))
        self.written = 0

    def _write_some(self, mv: memoryview) -> int:
        try:
            if self._sock is not None:
                return self._sock.send(mv, socket.MSG_DONTWAIT)
            return os.write(self.fd, mv)
        except BlockingIOError:
            return 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of *data* (OutputStalled if the reader stops reading)."""
        mv = memoryview(data)
        total = len(mv)
        if self._own is None and self._sock is None:
            write_all(self.fd, mv)
            self.written += total
            return
        last = time.monotonic()
        while mv:
            n = self._write_some(mv[:WRITE_CHUNK])
            if n:
                mv = mv[n:]
                last = time.monotonic()
                continue
            self.check()
            if time.monotonic() - last > self.stall_timeout:
                raise OutputStalled(f"the output was not read for {self.stall_timeout:.0f} s")
            p = select.poll()
            p.register(self.fd if self._sock is None else self._sock.fileno(), select.POLLOUT)
            p.poll(200)
        self.written += total

    def close(self) -> None:
        """Release our own descriptor (the caller's stays open)."""
        if self._own is not None:
            os.close(self._own)
            self._own = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

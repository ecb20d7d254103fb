"""Locks: an in-process reader/writer lock and the repository flock discipline.

Upstream holds a shared flock on the repository directory for every open handle and upgrades
it to exclusive for garbage collection (docs/repository.md).  Inside one daemon process several
operations share one repository fd, so the flock alone cannot order them; an RWLock does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator


class RWLock:
    """A writer-preferring reader/writer lock."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the lock shared (many holders)."""
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the lock exclusively; TimeoutError if not obtained within *timeout*."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError("repository is busy")
                    self._cond.wait(remaining)
            finally:
                self._waiting_writers -= 1
                if not self._waiting_writers:
                    self._cond.notify_all()     # readers held back for this writer
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class DirLock:
    """The locks of one repository directory, shared by every Repository object of this
    process that opened it: one RWLock and one flocked descriptor.  Separate objects for the
    same directory (say, opened secure and insecure) therefore never hold shared flocks that
    would keep this process's own gc from upgrading to exclusive."""

    def __init__(self, fd: int) -> None:
        self.rw = RWLock()
        self.fd = fd
        self.refs = 0


_dir_locks: dict[tuple[int, int], DirLock] = {}
_dir_locks_guard = threading.Lock()


def acquire_dir_lock(dir_fd: int) -> DirLock:
    """The process's DirLock for the directory *dir_fd* (shared flock taken on first use)."""
    st = os.fstat(dir_fd)
    key = (st.st_dev, st.st_ino)
    with _dir_locks_guard:
        lock = _dir_locks.get(key)
        if lock is None:
            fd = os.dup(dir_fd)
            os.set_inheritable(fd, False)
            try:
                flock_shared(fd)
            except BaseException:
                os.close(fd)
                raise
            lock = _dir_locks[key] = DirLock(fd)
        lock.refs += 1
        return lock


def release_dir_lock(lock: DirLock) -> None:
    """Drop one reference; the last one closes the descriptor (and with it the flock)."""
    with _dir_locks_guard:
        lock.refs -= 1
        if lock.refs:
            return
        st = os.fstat(lock.fd)
        if _dir_locks.get((st.st_dev, st.st_ino)) is lock:
            del _dir_locks[(st.st_dev, st.st_ino)]
        os.close(lock.fd)


def flock_shared(fd: int) -> None:
    """Take (or downgrade to) a shared flock on *fd*."""
    fcntl.flock(fd, fcntl.LOCK_SH)


def flock_exclusive(fd: int, timeout: float) -> None:
    """Upgrade to an exclusive flock, polling so a foreign holder cannot hang us forever."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                fcntl.flock(fd, fcntl.LOCK_SH)
                raise TimeoutError(
                    "repository is in use by another process (shared lock held)") from None
            time.sleep(0.05)

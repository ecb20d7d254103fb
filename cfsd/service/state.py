"""Daemon state: repository handles and the repositories they share.

Handles are small integers (from 1, never reused), service-wide: any connection of the user
that opened one may use it (root may use any), so one call per connection works (varlinkctl,
``python -m varlink.cli``).  A handle is released by CloseRepository, after
``Defaults.handle_idle`` seconds without a call (never while a call uses it), or when its
user opens more than ``Defaults.handles_per_uid`` (the longest idle goes first).  Handles to
the same directory share one Repository object (one fd, one in-process lock).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from cfsd.core.errors import RepositoryError
from cfsd.core.repository import Repository
from cfsd.service import auth
from cfsd.service.binding import Call, PeerCreds, VarlinkError

SYSTEM_REPO = "/sysroot/composefs"


@dataclass
class Defaults:
    """Service-wide open options (cfsd command-line flags)."""

    insecure: bool = False
    require_verity: bool = False
    no_upgrade: bool = False
    handle_idle: float = 600.0          # seconds without a call before a handle is released
    handles_per_uid: int = 64           # open handles one user may hold


class _Shared:
    """One open Repository shared by handles, with a count of calls using it right now."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.refs = 1
        self.inflight = 0
        self.closing = False
        self.cond = threading.Condition()


@dataclass
class Handle:
    """An open repository as seen by one caller."""

    id: int
    repo: Repository
    shared: _Shared
    key: tuple[int, int, bool]
    creds: PeerCreds
    writable: bool = field(default=False)
    inflight: int = 0                   # calls using it now (guarded by State._lock)
    last_used: float = field(default_factory=time.monotonic)


def user_repo_path(creds: PeerCreds) -> str:
    """``$HOME/.var/lib/composefs`` of the calling user (home from the passwd database)."""
    try:
        home = pwd.getpwuid(creds.uid).pw_dir
    except KeyError:
        raise VarlinkError("org.composefs.Repository.InvalidSpec",
                           {"message": f"no home directory for uid {creds.uid}"}) from None
    return os.path.join(home, ".var/lib/composefs")


class State:
    """Handles and shared repositories of one daemon."""

    def __init__(self, defaults: Defaults | None = None) -> None:
        self.defaults = defaults or Defaults()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._handles: dict[int, Handle] = {}
        self._repos: dict[tuple[int, int, bool], _Shared] = {}
        self._janitor: threading.Thread | None = None

    def open(self, call: Call, fd: int, path: str, *, insecure: bool, require_verity: bool,
             no_upgrade: bool) -> Handle:
        """Open (or share) the repository whose directory the caller opened as *fd*.

        Only the owner (root for root's repositories) upgrades a legacy repository; for
        anyone else it is read as it is and nothing is written.
        """
        insecure = insecure or self.defaults.insecure
        require_verity = require_verity or self.defaults.require_verity
        st = os.fstat(fd)
        owner = st.st_uid == call.creds.uid
        upgrade = owner and not (no_upgrade or self.defaults.no_upgrade)
        key = (st.st_dev, st.st_ino, insecure)
        with self._lock:
            shared = self._repos.get(key)
            if shared is not None:
                shared.refs += 1
        if shared is None:
            with auth.as_owner(fd, call.creds) if upgrade else contextlib.nullcontext():
                new = Repository.open_at(fd, path, insecure=insecure,
                                         require_verity=require_verity, upgrade=upgrade,
                                         legacy_read=not owner)
            with self._lock:
                shared = self._repos.get(key)
                if shared is not None:
                    shared.refs += 1
                else:
                    shared = self._repos[key] = _Shared(new)
            if shared.repo is not new:
                new.close()
        elif require_verity and not shared.repo.secure:
            self._release(key, shared)
            raise RepositoryError(f"repository {path} does not have fs-verity enabled")
        writable = call.creds.uid == 0 or owner
        with self._lock:
            h = Handle(next(self._ids), shared.repo, shared, key, call.creds, writable)
            self._handles[h.id] = h
            mine = sorted((x for x in self._handles.values()
                           if x.creds.uid == h.creds.uid and not x.inflight and x is not h),
                          key=lambda x: x.last_used)
            over = sum(1 for x in self._handles.values() if x.creds.uid == h.creds.uid) \
                - self.defaults.handles_per_uid
            evicted = [x.id for x in mine[:max(over, 0)]]
        for hid in evicted:
            self.close(hid, quiet=True)
        self._ensure_janitor()
        return h

    def _ensure_janitor(self) -> None:
        with self._lock:
            if self._janitor is not None:
                return
            self._janitor = threading.Thread(target=self._expire, name="handle-janitor",
                                             daemon=True)
            self._janitor.start()

    def _expire(self) -> None:
        """Release handles idle for longer than ``handle_idle`` (none with a call running)."""
        idle = self.defaults.handle_idle
        while True:
            time.sleep(max(0.1, min(idle / 4, 30.0)))
            now = time.monotonic()
            with self._lock:
                stale = [h.id for h in self._handles.values()
                         if not h.inflight and now - h.last_used > idle]
            for hid in stale:
                self.close(hid, quiet=True)

    def get(self, call: Call, handle: int, iface: str) -> Handle:
        """The handle, if it exists and belongs to the caller's user."""
        with self._lock:
            h = self._handles.get(handle)
        if h is None or (h.creds.uid != call.creds.uid and call.creds.uid != 0):
            raise VarlinkError(f"{iface}.InvalidHandle", {"handle": handle})
        return h

    @contextlib.contextmanager
    def use(self, call: Call, handle: int, iface: str) -> Iterator[Handle]:
        """The handle, kept open (not closed under the call) until the block ends."""
        h = self.get(call, handle, iface)
        with self._lock:
            if self._handles.get(handle) is not h:
                raise VarlinkError(f"{iface}.InvalidHandle", {"handle": handle})
            h.inflight += 1
            h.last_used = time.monotonic()
        try:
            with h.shared.cond:
                if h.shared.closing:
                    raise VarlinkError(f"{iface}.InvalidHandle", {"handle": handle})
                h.shared.inflight += 1
            try:
                yield h
            finally:
                with h.shared.cond:
                    h.shared.inflight -= 1
                    h.shared.cond.notify_all()
        finally:
            with self._lock:
                h.inflight -= 1
                h.last_used = time.monotonic()

    def close(self, handle: int, *, quiet: bool = False,
              iface: str = "org.composefs.Repository") -> None:
        """Release a handle (and the repository when it was the last one)."""
        with self._lock:
            h = self._handles.pop(handle, None)
        if h is None:
            if quiet:
                return
            raise VarlinkError(f"{iface}.InvalidHandle", {"handle": handle})
        self._release(h.key, h.shared)

    def _release(self, key: tuple[int, int, bool], shared: _Shared) -> None:
        with self._lock:
            shared.refs -= 1
            if shared.refs:
                return
            if self._repos.get(key) is shared:
                del self._repos[key]
        with shared.cond:
            shared.closing = True
            while shared.inflight:
                shared.cond.wait()
        shared.repo.close()

    def close_all(self) -> None:
        """Release everything (daemon shutdown)."""
        with self._lock:
            ids = list(self._handles)
        for i in ids:
            self.close(i, quiet=True)

"""Daemon state: repository handles and the repositories they share.

Handles are small integers (from 1, never reused).  A handle is usable by connections of the
user that opened it and is released when the connection that opened it closes.  Handles to
the same directory share one Repository object (one fd, one flock, one in-process lock).
"""

from __future__ import annotations

import itertools
import os
import pwd
import threading
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


@dataclass
class Handle:
    """An open repository as seen by one caller."""

    id: int
    repo: Repository
    key: tuple[int, int, bool]
    creds: PeerCreds
    conn_id: int
    writable: bool = field(default=False)


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
        self._repos: dict[tuple[int, int, bool], tuple[Repository, int]] = {}

    def open(self, call: Call, path: str, *, insecure: bool, require_verity: bool,
             no_upgrade: bool) -> Handle:
        """Open (or share) the repository at *path* for the caller and return a new handle."""
        insecure = insecure or self.defaults.insecure
        require_verity = require_verity or self.defaults.require_verity
        upgrade = not (no_upgrade or self.defaults.no_upgrade)
        try:
            fd = auth.open_dir(path, call.creds)
        except FileNotFoundError:
            raise RepositoryError(f"repository {path} does not exist") from None
        except NotADirectoryError:
            raise RepositoryError(f"{path} is not a directory") from None
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino, insecure)
            with self._lock:
                shared = self._repos.get(key)
                if shared is not None:
                    repo = shared[0]
                    self._repos[key] = (repo, shared[1] + 1)
                else:
                    repo = None
            if repo is None:
                with auth.fs_identity(fd):
                    new = Repository.open_at(fd, path, insecure=insecure,
                                             require_verity=require_verity, upgrade=upgrade)
                with self._lock:
                    shared = self._repos.get(key)
                    if shared is not None:
                        new.close()
                        repo = shared[0]
                        self._repos[key] = (repo, shared[1] + 1)
                    else:
                        repo = new
                        self._repos[key] = (repo, 1)
            elif require_verity and not repo.secure:
                self._release(key)
                raise RepositoryError(f"repository {path} does not have fs-verity enabled")
            writable = call.creds.uid == 0 or st.st_uid == call.creds.uid
        finally:
            os.close(fd)
        with self._lock:
            h = Handle(next(self._ids), repo, key, call.creds, call.connection.id, writable)
            self._handles[h.id] = h
        call.connection.on_close(lambda: self.close(h.id, quiet=True))
        return h

    def get(self, call: Call, handle: int, iface: str) -> Handle:
        """The handle, if it exists and belongs to the caller's user."""
        with self._lock:
            h = self._handles.get(handle)
        if h is None or (h.creds.uid != call.creds.uid and call.creds.uid != 0):
            raise VarlinkError(f"{iface}.InvalidHandle", {"handle": handle})
        return h

    def close(self, handle: int, *, quiet: bool = False,
              iface: str = "org.composefs.Repository") -> None:
        """Release a handle (and the repository when it was the last one)."""
        with self._lock:
            h = self._handles.pop(handle, None)
        if h is None:
            if quiet:
                return
            raise VarlinkError(f"{iface}.InvalidHandle", {"handle": handle})
        self._release(h.key)

    def _release(self, key: tuple[int, int, bool]) -> None:
        with self._lock:
            repo, count = self._repos[key]
            if count > 1:
                self._repos[key] = (repo, count - 1)
                return
            del self._repos[key]
        repo.close()

    def close_all(self) -> None:
        """Release everything (daemon shutdown)."""
        with self._lock:
            ids = list(self._handles)
        for i in ids:
            self.close(i, quiet=True)

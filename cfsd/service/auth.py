"""Callers and what they may touch: the kernel decides, the daemon never re-implements it.

* **What a caller names is opened by the caller.**  A method's path parameter comes with an
  optional ``<name>_fd`` parameter: the index of a descriptor the caller opened itself and
  passed with the request (cfsctl always does).  Without one, the path is opened — and
  missing directories are created — by the opener helper running with the caller's exact
  identity (:mod:`cfsd.service.opener`).  The daemon then works only beneath those fds.
* **Work beneath a caller's fds runs as the caller.**  Scanning a tree, checking out into a
  directory, writing an output file: the thread takes the caller's fsuid, fsgid and groups
  (:mod:`cfsd.service.identity`), so ACLs, mode bits and capabilities apply as for the
  caller.
* **The repository belongs to its owner.**  Writes need root or ownership of the repository
  directory; a root daemon writes into a user's repository with the owner's identity, so
  every file it creates is the owner's.  Readers (anyone who could open the directory)
  never change a repository.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from cfsd.core.errors import RepositoryError
from cfsd.service import identity
from cfsd.service.binding import Call, PeerCreds
from cfsd.service.identity import Identity
from cfsd.service.opener import Opener, OpenerError, open_one


class PermissionDenied(RepositoryError):
    """The caller lacks the permission for the operation."""


class CallerPathError(OSError):
    """A path the caller named could not be opened (errno as the kernel said)."""

    def __init__(self, err: int, path: str, detail: str | None = None) -> None:
        super().__init__(err, detail or os.strerror(err))
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.strerror}"


PATH_MAX = 4096
_opener: Opener | None = None


def start_opener() -> None:
    """Start the opener helper (a root daemon, before it serves anyone)."""
    global _opener
    if identity.switching() and _opener is None:
        _opener = Opener()
        _opener.start()


def stop_opener() -> None:
    """Stop the opener helper."""
    global _opener
    if _opener is not None:
        _opener.stop()
        _opener = None


def caller(creds: PeerCreds) -> Identity:
    """The caller's filesystem identity (uid, gid, supplementary groups from the socket)."""
    return Identity(creds.uid, creds.gid, tuple(creds.groups))


def as_caller(creds: PeerCreds) -> contextlib.AbstractContextManager[None]:
    """Run the block as the caller: the kernel checks the caller's permissions."""
    return identity.acting_as(caller(creds))


def owner_identity(dir_fd: int, creds: PeerCreds) -> Identity:
    """The identity that writes into the repository *dir_fd*: its owner (with the caller's
    groups when the caller is the owner)."""
    st = os.fstat(dir_fd)
    if st.st_uid == creds.uid:
        return caller(creds)
    return Identity(st.st_uid, st.st_gid, (st.st_gid,))


def as_owner(dir_fd: int, creds: PeerCreds) -> contextlib.AbstractContextManager[None]:
    """Run the block with the repository owner's identity."""
    return identity.acting_as(owner_identity(dir_fd, creds))


def check_writer(dir_fd: int, creds: PeerCreds, what: str) -> None:
    """Writes need root or ownership of the repository directory."""
    if creds.uid == 0:
        return
    if os.fstat(dir_fd).st_uid != creds.uid:
        raise PermissionDenied(f"permission denied: only root or the owner of the repository "
                               f"may {what}")


def _path_error(e: OSError, path: str) -> CallerPathError:
    if isinstance(e, CallerPathError):
        return e
    return CallerPathError(e.errno or errno.EIO, path, e.strerror)


class CallerFiles:
    """Opens what one call's caller names: a passed descriptor, or the path as the caller."""

    def __init__(self, call: Call) -> None:
        self.call = call

    def passed(self, index: int, what: str) -> int:
        """A duplicate of the fd the caller passed at *index* (the caller closes it)."""
        if not 0 <= index < len(self.call.fds) or self.call.fds[index] < 0:
            raise CallerPathError(errno.EBADF, what,
                                  f"no file descriptor {index} was passed "
                                  f"({len(self.call.fds)} passed)")
        return os.dup(self.call.fds[index])

    def _open(self, op: str, path: str | None, index: int | None, what: str,
              mode: int = 0o755) -> int:
        if index is not None:
            fd = self.passed(index, what)
            want = stat.S_ISREG if op == "file" else stat.S_ISDIR
            if not want(os.fstat(fd).st_mode):
                os.close(fd)
                kind = "regular file" if op == "file" else "directory"
                raise CallerPathError(errno.ENOTDIR if op != "file" else errno.EINVAL,
                                      path or what, f"the passed descriptor is not a {kind}")
            return fd
        if path is None:
            raise CallerPathError(errno.EINVAL, what, "no path given")
        if len(os.fsencode(path)) >= PATH_MAX:
            raise CallerPathError(errno.ENAMETOOLONG, path[:64] + "...")
        try:
            return self._open_as_caller(op, path, mode)
        except OSError as e:
            raise _path_error(e, path) from None

    def _open_as_caller(self, op: str, path: str, mode: int) -> int:
        creds = self.call.creds
        if creds.uid < 0:
            raise PermissionDenied("the caller's credentials are unknown")
        if _opener is not None:
            try:
                (res,) = _opener.open(creds.uid, creds.gid, creds.groups, creds.pid,
                                      [{"op": op, "path": path, "mode": mode}])
            except OpenerError as e:
                raise PermissionDenied(f"cannot open {path} as the caller: {e.strerror}") \
                    from None
            if isinstance(res, OSError):
                raise res
            return res
        if creds.uid != os.geteuid():
            raise PermissionDenied(f"cannot open {path} as uid {creds.uid}: only that user "
                                   "or a root daemon with its opener helper can")
        return open_one(op, path, mode, creds.pid)   # the caller is this daemon's own user

    def directory(self, path: str | None, index: int | None = None, *, what: str = "path",
                  create: bool = False, mode: int = 0o755) -> int:
        """An O_DIRECTORY fd of what the caller named (created by the caller if asked)."""
        return self._open("mkdir" if create else "dir", path, index, what, mode)

    def file(self, path: str | None, index: int | None = None, *, what: str = "path") -> int:
        """A read-only fd of the regular file the caller named."""
        return self._open("file", path, index, what)

    def parent(self, path: str, index: int | None = None, *,
               what: str = "path") -> tuple[int, str]:
        """(fd of the directory that holds *path*, its last component).

        With *index*, the caller passed that directory itself.
        """
        head, _, name = path.rstrip("/").rpartition("/")
        if not name or name in (".", "..") or path.endswith("/") or "\0" in path:
            raise CallerPathError(errno.EINVAL, path, "the path does not name a file")
        if index is not None:
            return self._open("dir", head or "/", index, what), name
        return self._open("parent", path, None, what), name


class CallerOpener:
    """The oci layer's PathOpener for one call: the descriptor the caller passed for its
    reference (*index*), else the path opened by the caller; reads beneath it as the caller."""

    def __init__(self, call: Call, index: int | None = None) -> None:
        self.files = CallerFiles(call)
        self.creds = call.creds
        self.index = index

    def open_dir(self, path: str) -> int:
        """The layout directory."""
        return self.files.directory(path, self.index, what="image")

    def open_file(self, path: str) -> int:
        """The archive file."""
        return self.files.file(path, self.index, what="image")

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """The identity that reads beneath what was opened: the caller's."""
        return as_caller(self.creds)

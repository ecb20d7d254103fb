"""What the user names on the command line, opened by cfsctl itself and passed as fds.

cfsd never resolves a path for cfsctl: cfsctl opens every file and directory named on its
command line with its own identity (so the kernel applies the user's permissions, ACLs and
working directory) and passes the descriptors with the request (SCM_RIGHTS).  The request
then carries ``<name>_fd``, the index of the descriptor, next to the path, which only
labels it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Any

from cfsctl.context import CommandError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class Passed:
    """The descriptors one request passes, in order (closed by :meth:`close`)."""

    def __init__(self, fds: list[int] | None = None) -> None:
        self.fds: list[int] = list(fds or [])
        self._own: list[int] = []

    def __enter__(self) -> Passed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the descriptors this object opened."""
        for fd in self._own:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._own.clear()

    def add(self, fd: int, *, own: bool = False) -> int:
        """Pass *fd*; its index in the request."""
        self.fds.append(fd)
        if own:
            self._own.append(fd)
        return len(self.fds) - 1

    def _open(self, path: str, flags: int, what: str) -> int:
        try:
            return self.add(os.open(path, flags), own=True)
        except OSError as e:
            raise CommandError(f"cannot open {what} {path}: {e.strerror}") from None

    def directory(self, path: str, *, create: bool = False, mode: int = 0o755,
                  what: str = "directory") -> int:
        """Open (with *create*: first make, with parents) the directory *path*."""
        if create:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path, mode)
            except OSError as e:
                raise CommandError(f"cannot create {what} {path}: {e.strerror}") from None
        return self._open(path, DIR_FLAGS, what)

    def file(self, path: str, *, what: str = "file") -> int:
        """Open the regular file *path* for reading (a FIFO or device is refused)."""
        i = self._open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, what)
        fd = self.fds[i]
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CommandError(f"{what} {path} is not a regular file")
        os.set_blocking(fd, True)
        return i

    def parent(self, path: str, *, what: str = "output") -> int:
        """Open the directory that will hold the file *path*."""
        head = os.path.dirname(path.rstrip("/")) or "."
        return self._open(head, DIR_FLAGS, f"the directory of {what}")

    def transport_path(self, reference: str, params: dict[str, Any], key: str) -> None:
        """For an ``oci:DIR[:TAG]`` / ``oci-archive:FILE[:TAG]`` reference, open its path and
        set ``params[key]`` to the fd index (other transports need no fd)."""
        transport, _, rest = reference.partition(":")
        if transport not in ("oci", "oci-archive"):
            return
        path = _reference_path(rest)
        if transport == "oci":
            params[key] = self.directory(path, what="OCI layout")
        else:
            params[key] = self.file(path, what="archive")

    def auth_file(self, reference: str, authfile: str | None, creds: str | None,
                  params: dict[str, Any]) -> None:
        """Pass the auth file (--authfile, else the user's default) for a registry."""
        if creds or not reference.startswith("docker://"):
            return
        path = authfile or default_auth_file()
        if path is not None:
            params["auth_file"] = path
            params["auth_file_fd"] = self.file(path, what="auth file")


def _reference_path(rest: str) -> str:
    """The path of ``PATH[:TAG|@DIGEST]``, split as skopeo (and cfsd) split it: ``@`` before
    a digest; a colon only when no ``/`` follows it."""
    if "@" in rest:
        path, _, digest = rest.rpartition("@")
        if ":" in digest:
            return path
    i = rest.rfind(":")
    if i > 0 and "/" not in rest[i + 1:]:
        return rest[:i]
    return rest


def default_auth_file() -> str | None:
    """The user's registry auth file as skopeo finds it (the first that exists)."""
    env = os.environ
    candidates = [env.get("REGISTRY_AUTH_FILE")]
    if env.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(env["XDG_RUNTIME_DIR"], "containers/auth.json"))
    home = os.path.expanduser("~")
    candidates += [os.path.join(home, ".config/containers/auth.json"),
                   os.path.join(home, ".docker/config.json")]
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    return None

"""Caller authorization: the daemon never lets a caller do more than it could do alone.

Paths named by a caller are resolved component by component with the caller's permissions
(SO_PEERCRED uid and groups) checked on every directory actually opened, symlinks expanded
by hand and never followed by the kernel, so a root daemon cannot be steered into a
directory the caller could not reach.  Writes need root or ownership of the repository, and
when a root daemon writes into a repository owned by someone else it does so with that
owner's filesystem identity (per-thread setfsuid/setfsgid), so every file it creates belongs
to the repository's owner, exactly as if the owner had written it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Iterator

from cfsd.core.errors import RepositoryError
from cfsd.service.binding import PeerCreds

MAX_SYMLINKS = 40
_libc = ctypes.CDLL(None, use_errno=True)
R, W, X = 4, 2, 1


class PermissionDenied(RepositoryError):
    """The caller lacks the permission for the operation."""


def may(st: os.stat_result, creds: PeerCreds, want: int) -> bool:
    """Classic Unix permission check of *want* (R|W|X bits) for the caller."""
    if creds.uid == 0:
        return True
    if st.st_uid == creds.uid:
        bits = st.st_mode >> 6
    elif creds.in_group(st.st_gid):
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return (bits & want) == want


def _trusted(creds: PeerCreds) -> bool:
    """Callers whose own permissions the kernel already enforces on our opens."""
    return creds.uid == 0 or creds.uid == os.geteuid()


def open_dir(path: str, creds: PeerCreds, *, want: int = R | X, create: bool = False,
             create_mode: int = 0o700) -> int:
    """Open directory *path* (absolute) as the caller could; returns an O_DIRECTORY fd.

    With *create*, missing components are created (the caller needs write permission on
    each parent) and handed to the caller (chown) when the daemon is root.
    """
    if not path.startswith("/"):
        raise PermissionDenied(f"path must be absolute: {path!r}")
    if "\0" in path:
        raise PermissionDenied("path contains NUL")
    trusted = _trusted(creds)
    todo = [c for c in path.split("/") if c]
    todo.reverse()
    stack = [os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
    hops = 0
    try:
        while todo:
            comp = todo.pop()
            cur = stack[-1]
            if comp == ".":
                continue
            if comp == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            if not trusted and not may(os.fstat(cur), creds, X):
                raise PermissionDenied(f"permission denied: {path}")
            try:
                st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    raise
                last = not todo
                if not trusted and not may(os.fstat(cur), creds, W | X):
                    raise PermissionDenied(f"permission denied creating {path}") from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(comp, create_mode if last else 0o755, dir_fd=cur)
                fd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=cur)
                if os.geteuid() == 0 and creds.uid not in (0, -1):
                    os.fchown(fd, creds.uid, creds.gid)
                stack.append(fd)
                continue
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, f"too many symlinks in {path}")
                target = os.readlink(comp, dir_fd=cur)
                parts = [c for c in target.split("/") if c]
                todo.extend(reversed(parts))
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                continue
            try:
                fd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=cur)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise PermissionDenied(f"{path} changed while it was being opened") from None
                raise
            stack.append(fd)
        final = stack[-1]
        if not trusted and not may(os.fstat(final), creds, want):
            raise PermissionDenied(f"permission denied: {path}")
        stack.pop()
        return final
    finally:
        for fd in stack:
            os.close(fd)


def open_file(path: str, creds: PeerCreds, _hops: int = 0) -> int:
    """Open the regular file *path* read-only, as the caller could."""
    if _hops > MAX_SYMLINKS:
        raise OSError(errno.ELOOP, f"too many symlinks in {path}")
    parent, _, name = path.rstrip("/").rpartition("/")
    if not name or name in (".", ".."):
        raise PermissionDenied(f"not a file path: {path!r}")
    dfd = open_dir(parent or "/", creds, want=X)
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=dfd)
            base = path.rpartition("/")[0] or "/"
            return open_file(target if target.startswith("/") else f"{base}/{target}", creds,
                             _hops + 1)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=dfd)
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not (_trusted(creds) or may(st, creds, R)):
        os.close(fd)
        raise PermissionDenied(f"permission denied: {path}")
    os.set_blocking(fd, True)
    return fd


class CallerOpener:
    """Opens paths for the oci layer with a caller's permissions."""

    def __init__(self, creds: PeerCreds) -> None:
        self.creds = creds

    def open_dir(self, path: str) -> int:
        """A directory fd, checked against the caller."""
        return open_dir(path, self.creds)

    def open_file(self, path: str) -> int:
        """A file fd, checked against the caller."""
        return open_file(path, self.creds)


def check_writer(dir_fd: int, creds: PeerCreds, what: str) -> None:
    """Writes need root or ownership of the repository directory."""
    if creds.uid == 0:
        return
    st = os.fstat(dir_fd)
    if st.st_uid != creds.uid:
        raise PermissionDenied(f"permission denied: only root or the owner of the repository "
                               f"may {what}")


@contextlib.contextmanager
def _as_fs_ids(uid: int, gid: int) -> Iterator[None]:
    """This thread's filesystem uid/gid set to *uid*/*gid* for the block (root daemon only).

    setfsuid/setfsgid are per thread; with a non-zero fsuid the kernel also drops the
    filesystem capabilities, so it enforces that user's permissions in the block.
    """
    if os.geteuid() != 0 or uid in (0, -1):
        yield
        return
    old_uid = _libc.setfsuid(uid)
    old_gid = _libc.setfsgid(gid)
    try:
        yield
    finally:
        _libc.setfsgid(old_gid)
        _libc.setfsuid(old_uid)


def fs_identity(dir_fd: int) -> contextlib.AbstractContextManager[None]:
    """Run the block with the filesystem identity of the owner of *dir_fd*."""
    st = os.fstat(dir_fd)
    return _as_fs_ids(st.st_uid, st.st_gid)


def caller_identity(creds: PeerCreds) -> contextlib.AbstractContextManager[None]:
    """Run the block with the caller's filesystem identity (root daemon serving a user).

    Files created belong to the caller and the kernel checks the caller's permissions.
    """
    return _as_fs_ids(creds.uid, creds.gid)

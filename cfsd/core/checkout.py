"""Materialize a composefs tree into a directory (``oci checkout``), without privileges.

Every entry is created below a directory fd with the *at syscalls and O_NOFOLLOW, so nothing
is written outside the target.  Files are copied from repository objects (reflink where the
filesystem can, else copy_file_range), hardlinks are recreated as hardlinks, metadata is
applied after content.  Directories stay owner-writable until everything is written and get
their own metadata last, deepest first, so their mtimes stick and a mode-0000 directory still
receives its entries (and hardlinks into it) without privileges.  Without privileges,
ownership is left to the caller and device nodes, sockets and xattrs the kernel refuses are
skipped and reported.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from cfsd.core import tree
from cfsd.core.errors import RepositoryError
from cfsd.core.repository import Repository

FICLONE = 0x40049409
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class CheckoutResult:
    """What was written and what had to be skipped."""

    entries: int = 0
    skipped: list[str] = field(default_factory=list)


def _copy(src: int, dst: int, size: int) -> None:
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError:
        pass
    off = 0
    while off < size:
        n = os.copy_file_range(src, dst, size - off, off, off)
        if n == 0:
            raise RepositoryError("object shorter than its recorded size")
        off += n


class _Writer:
    def __init__(self, open_object: Callable[[bytes], int], root_fd: int,
                 privileged: bool) -> None:
        self.open_object = open_object
        self.root_fd = root_fd
        self.privileged = privileged
        self.result = CheckoutResult()
        self.first: dict[int, bytes] = {}   # id(leaf) -> first path written (relative)
        self.dirs: list[tuple[bytes, tree.Stat]] = []   # directories, parents first

    def skip(self, path: bytes, why: str) -> None:
        self.result.skipped.append(f"{path.decode(errors='replace')}: {why}")

    def meta(self, dfd: int, name: bytes, path: bytes, st: tree.Stat, ifmt: int) -> None:
        if self.privileged:
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
        for key, value in sorted(st.xattrs.items()):
            if not self.privileged and not key.startswith(b"user."):
                # Only the user namespace is the caller's to set; a root daemon acting for
                # someone else must not hand out file capabilities or trusted xattrs.
                self.skip(path, f"xattr {key.decode(errors='replace')}: needs privileges")
                continue
            try:
                os.setxattr(f"/proc/self/fd/{dfd}/".encode() + name, key, value,
                            follow_symlinks=False)
            except OSError as e:
                self.skip(path, f"xattr {key.decode(errors='replace')}: {e.strerror}")
        if ifmt != stat.S_IFLNK:
            os.chmod(name, st.st_mode & 0o7777, dir_fd=dfd, follow_symlinks=False)
        sec = st.st_mtim_sec
        os.utime(name, ns=(sec * 10**9 + st.st_mtim_nsec,) * 2, dir_fd=dfd,
                 follow_symlinks=False)

    def leaf(self, dfd: int, name: bytes, path: bytes, leaf: tree.Leaf) -> None:
        first = self.first.get(id(leaf))
        if first is not None:
            os.link(first, name, src_dir_fd=self.root_fd, dst_dir_fd=dfd,
                    follow_symlinks=False)
            self.result.entries += 1
            return
        c = leaf.content
        t = type(c)
        ifmt = tree.file_type_bits(c)
        if t in (tree.Inline, tree.External, tree.ExternalNoVerity, tree.Sparse):
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                if t is tree.Inline:
                    os.write(fd, c.data)  # type: ignore[union-attr]
                elif t is tree.Sparse:
                    os.ftruncate(fd, c.size)  # type: ignore[union-attr]
                else:
                    src = self.open_object(c.id)  # type: ignore[union-attr]
                    try:
                        _copy(src, fd, c.size)  # type: ignore[union-attr]
                    finally:
                        os.close(src)
            finally:
                os.close(fd)
        elif t is tree.Symlink:
            os.symlink(c.target, name, dir_fd=dfd)  # type: ignore[union-attr]
        elif t is tree.Fifo:
            os.mkfifo(name, 0o600, dir_fd=dfd)
        elif t in (tree.BlockDevice, tree.CharacterDevice):
            try:
                os.mknod(name, ifmt | 0o600, c.rdev, dir_fd=dfd)  # type: ignore[union-attr]
            except PermissionError:
                self.skip(path, "device nodes need privileges")
                return
        else:
            self.skip(path, "sockets are not materialized")
            return
        self.meta(dfd, name, path, leaf.stat, ifmt)
        self.first[id(leaf)] = path.lstrip(b"/")
        self.result.entries += 1

    def directory(self, dfd: int, d: tree.Directory, path: bytes) -> None:
        for name, child in d.sorted_entries():
            cpath = path + b"/" + name
            if isinstance(child, tree.Directory):
                os.mkdir(name, 0o700, dir_fd=dfd)
                self.dirs.append((cpath.lstrip(b"/"), child.stat))
                sub = os.open(name, DIR_FLAGS, dir_fd=dfd)
                try:
                    self.directory(sub, child, cpath)
                finally:
                    os.close(sub)
                self.result.entries += 1
            else:
                self.leaf(dfd, name, cpath, child)


def _open_beneath(root_fd: int, rel: bytes) -> int:
    """The directory *rel* below *root_fd*, one component at a time, following no symlink."""
    fd = os.dup(root_fd)
    for part in (p for p in rel.split(b"/") if p):
        try:
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nfd
    return fd


def checkout(repo: Repository, fs: tree.FileSystem, dir_fd: int, *, privileged: bool,
             open_object: Callable[[bytes], int] | None = None) -> CheckoutResult:
    """Write *fs* into the empty directory *dir_fd*; its own metadata becomes the root's.

    *open_object* opens a repository object for reading (default: ``repo.open_object``).
    """
    if os.listdir(dir_fd):
        raise RepositoryError("checkout target directory is not empty")
    w = _Writer(open_object or repo.open_object, dir_fd, privileged)
    try:
        w.directory(dir_fd, fs.root, b"")
        for path, st in reversed(w.dirs):     # children before their parents
            parent, _, name = path.rpartition(b"/")
            pfd = _open_beneath(dir_fd, parent)
            try:
                w.meta(pfd, name, b"/" + path, st, stat.S_IFDIR)
            finally:
                os.close(pfd)
        w.meta(dir_fd, b".", b"/", fs.root.stat, stat.S_IFDIR)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RepositoryError(f"checkout: {e.strerror}") from None
        raise
    w.result.entries += 1
    return w.result

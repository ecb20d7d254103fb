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

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from cfsd.core import tree
from cfsd.core.errors import RepositoryError
from cfsd.core.repository import Repository
from cfsd.core.sink import write_all

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
        try:
            n = os.copy_file_range(src, dst, size - off, off, off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            break                       # another filesystem: plain reads and writes
        if n == 0:
            raise RepositoryError("object shorter than its recorded size")
        off += n
    if off < size:
        os.lseek(dst, off, os.SEEK_SET)      # sequential writes from where the kernel stopped
    while off < size:
        data = os.pread(src, min(size - off, 1 << 20), off)
        if not data:
            raise RepositoryError("object shorter than its recorded size")
        write_all(dst, data)
        off += len(data)


class _Writer:
    def __init__(self, repo: Repository, root_fd: int, privileged: bool,
                 as_repository: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        self.repo = repo
        self.as_repository = as_repository
        self.root_fd = root_fd
        self.privileged = privileged
        self.result = CheckoutResult()
        self.first: dict[int, bytes] = {}   # id(leaf) -> first path written (relative)
        self.dirs: list[tuple[bytes, tree.Stat]] = []   # finished last (post-order)

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

    def content(self, digest: bytes, fd: int, size: int) -> None:
        """Fill *fd* with object *digest*: cloned or copied in kernel where fs-verity is
        enforced, otherwise checked against its name before it is written."""
        with self.as_repository():
            if not self.repo.secure:
                self.repo.copy_object(digest, lambda data: write_all(fd, data))
                return
            src = self.repo.open_object(digest)
        try:
            _copy(src, fd, size)
        finally:
            os.close(src)

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
                    self.content(c.id, fd, c.size)  # type: ignore[union-attr]
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

    def directory(self, root_fd: int, root: tree.Directory) -> None:
        """Write the tree below *root* (iteratively: depth comes from the image)."""
        stack = [(os.dup(root_fd), b"", iter(root.sorted_entries()), b"", root.stat)]
        try:
            while stack:
                dfd, path, entries, dname, dstat = stack[-1]
                item = next(entries, None)
                if item is None:
                    os.close(stack.pop()[0])
                    if stack:
                        self.finish_directory(stack[-1][0], dname, path, dstat)
                    continue
                name, child = item
                cpath = path + b"/" + name
                if isinstance(child, tree.Directory):
                    os.mkdir(name, 0o700, dir_fd=dfd)
                    self.result.entries += 1
                    stack.append((os.open(name, DIR_FLAGS, dir_fd=dfd), cpath,
                                  iter(child.sorted_entries()), name, child.stat))
                else:
                    self.leaf(dfd, name, cpath, child)
        finally:
            for dfd, *_ in stack:
                os.close(dfd)

    def finish_directory(self, parent_fd: int, name: bytes, path: bytes,
                         st: tree.Stat) -> None:
        """Metadata of a directory whose entries are all written.  One its owner could not
        search is finished last: a later hardlink may still need to reach into it."""
        if st.st_mode & 0o100 or self.privileged:
            self.meta(parent_fd, name, path, st, stat.S_IFDIR)
        else:
            self.dirs.append((path.lstrip(b"/"), st))


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
             as_repository: Callable[[], contextlib.AbstractContextManager[None]]
             = contextlib.nullcontext) -> CheckoutResult:
    """Write *fs* into the empty directory *dir_fd*; its own metadata becomes the root's.

    Repository objects are opened inside *as_repository* (the daemon's own identity, while
    the rest runs as the caller).
    """
    if os.listdir(dir_fd):
        raise RepositoryError("checkout target directory is not empty")
    w = _Writer(repo, dir_fd, privileged, as_repository)
    try:
        w.directory(dir_fd, fs.root)
        for path, st in w.dirs:               # in post-order: children before parents
            parent, _, name = path.rpartition(b"/")
            pfd = _open_beneath(dir_fd, parent)
            try:
                w.meta(pfd, name, b"/" + path, st, stat.S_IFDIR)
            finally:
                os.close(pfd)
        w.meta(dir_fd, b".", b"/", fs.root.stat, stat.S_IFDIR)
    except BaseException:
        remove_contents(dir_fd)          # it was empty: leave it so
        raise
    w.result.entries += 1
    return w.result


def remove_contents(dir_fd: int) -> None:
    """Remove everything below the directory *dir_fd* (ours: directories are made
    searchable first), iteratively, never following a symlink."""
    stack = [os.dup(dir_fd)]
    emptied: set[tuple[int, int]] = set()
    try:
        while stack:
            fd = stack[-1]
            descended = False
            for entry in os.scandir(fd):
                if entry.is_dir(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        os.chmod(entry.name, 0o700, dir_fd=fd, follow_symlinks=False)
                    try:
                        os.rmdir(entry.name, dir_fd=fd)
                    except OSError:
                        st = entry.stat(follow_symlinks=False)
                        if (st.st_dev, st.st_ino) in emptied:
                            raise
                        emptied.add((st.st_dev, st.st_ino))
                        stack.append(os.open(entry.name, DIR_FLAGS, dir_fd=fd))
                        descended = True
                        break
                else:
                    os.unlink(entry.name, dir_fd=fd)
            if not descended:
                os.close(stack.pop())   # emptied: its parent removes it on the next round
    finally:
        for fd in stack:
            os.close(fd)

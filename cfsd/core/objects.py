"""Writing objects: streaming O_TMPFILE writers, verified dedup, and staging areas.

An object becomes visible only complete: it is written to an unnamed O_TMPFILE (or a named
``.tmp-object-*`` file where O_TMPFILE is unsupported), hashed while written, made
read-only, verity-enabled where the filesystem supports it and linked into
``objects/XX/rest``.  An existing object is trusted only after its content is verified
(upstream trusts a matching size).

A ``Staging`` area collects the objects of one import in a private directory
``objects/.staging-*`` and publishes them all in ``commit()``; ``abort()`` removes them, so
an import that fails half-way leaves the repository exactly as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cfsd.core import fsverity
from cfsd.core.errors import CorruptObject, RepositoryError
from cfsd.core.metadata import DIR_FLAGS

if TYPE_CHECKING:
    from cfsd.core.repository import Repository

STAGING_PREFIX = ".staging-"
WRITEBACK_MIN = 64 << 10
SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class ObjectResult:
    """Outcome of storing one object."""

    digest: bytes
    size: int
    new: bool


class ObjectStore(Protocol):
    """Where new objects go: the repository itself or a staging area."""

    def object_writer(self) -> ObjectWriter: ...

    def store_object(self, data: bytes | memoryview) -> ObjectResult: ...


class ObjectWriter:
    """Stream one object into a temporary file, hashing as it goes."""

    def __init__(self, repo: Repository, staging: Staging | None = None) -> None:
        self.repo = repo
        self.staging = staging
        self.hasher = fsverity.FsVerityHasher(repo.alg)
        self._named: str | None = None
        try:
            self.fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644,
                              dir_fd=repo.writable_objects_fd)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.ENOENT):
                raise
            self.fd = self._named_tmpfile()

    def _named_tmpfile(self) -> int:
        for _ in range(16):
            name = ".tmp-object-" + secrets.token_hex(6)
            try:
                fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC
                             | os.O_NOFOLLOW, 0o644, dir_fd=self.repo.writable_objects_fd)
                self._named = name
                return fd
            except FileExistsError:
                continue
        raise RepositoryError("cannot create a temporary object file")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append data."""
        mv = memoryview(data)
        self.hasher.update(mv)
        while mv:
            n = os.write(self.fd, mv)
            mv = mv[n:]

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self.hasher.size

    def finish(self, expected: bytes | None = None) -> ObjectResult:
        """Verify, enable verity where supported and give the object its name."""
        repo = self.repo
        digest = self.hasher.digest()
        size = self.hasher.size
        if size >= WRITEBACK_MIN:
            # Start writeback now so the durability barrier before names are published
            # (one syncfs) finds most data already on its way to disk.
            _libc.sync_file_range(self.fd, ctypes.c_longlong(0), ctypes.c_longlong(0),
                                  SYNC_FILE_RANGE_WRITE)
        if expected is not None and digest != expected:
            raise CorruptObject(f"object content hashes to {digest.hex()}, "
                                f"expected {expected.hex()}")
        if repo.verity_supported is not False:
            # fs-verity needs a read-only fd and no writer; skipped once the filesystem has
            # shown it has no fs-verity (insecure repositories only).
            ro = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
            os.close(self.fd)
            self.fd = ro
            enabled = fsverity.enable_verity(ro, repo.alg)
            if enabled:
                repo.verity_supported = True
                measured = fsverity.measure_verity(ro, repo.alg)
                if measured is not None and measured != digest:
                    raise CorruptObject(f"kernel fs-verity {measured.hex()} != {digest.hex()}")
            elif repo.secure:
                raise RepositoryError("fs-verity is required but not supported by the "
                                      "filesystem")
            else:
                repo.verity_supported = False
        if repo.object_ok(digest):
            return ObjectResult(digest, size, False)
        if self.staging is not None:
            return self.staging.adopt(self, digest, size)
        xx, rest = fsverity.object_path(digest).split("/")
        dfd = repo.object_dir(xx)
        try:
            if not self.link_as(dfd, rest):
                if repo.object_ok(digest):
                    return ObjectResult(digest, size, False)
                # A corrupt file squats on the name: replace it atomically.
                tmp = ".tmp-" + secrets.token_hex(6)
                self.link_as(dfd, tmp)
                try:
                    os.rename(tmp, rest, src_dir_fd=dfd, dst_dir_fd=dfd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=dfd)
                    raise
            repo.remember(digest)
            return ObjectResult(digest, size, True)
        finally:
            os.close(dfd)

    def link_as(self, dfd: int, name: str) -> bool:
        """Give the temporary file *name* in directory *dfd*; False if the name exists."""
        try:
            if self._named is not None:
                os.link(self._named, name, src_dir_fd=self.repo.writable_objects_fd, dst_dir_fd=dfd,
                        follow_symlinks=False)
            else:
                os.link(f"/proc/self/fd/{self.fd}", name, dst_dir_fd=dfd, follow_symlinks=True)
            return True
        except FileExistsError:
            return False

    def abort(self) -> None:
        """Discard the temporary file (safe after finish())."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._named is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._named, dir_fd=self.repo.writable_objects_fd)
            self._named = None


def store_bytes(store: ObjectStore, repo: Repository, data: bytes | memoryview) -> ObjectResult:
    """Store an in-memory object through *store* (skipping the write when present)."""
    digest = fsverity.digest(data, repo.alg)
    if repo.object_ok(digest):
        return ObjectResult(digest, len(data), False)
    w = store.object_writer()
    try:
        w.write(data)
        return w.finish(expected=digest)
    finally:
        w.abort()


class Staging:
    """Objects of one import, invisible until commit()."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.staged: dict[bytes, str] = {}
        self.name = ""
        for _ in range(16):
            name = STAGING_PREFIX + secrets.token_hex(8)
            try:
                os.mkdir(name, 0o700, dir_fd=repo.writable_objects_fd)
                self.name = name
                break
            except FileExistsError:
                continue
        else:
            raise RepositoryError("cannot create a staging directory")
        self.fd = os.open(self.name, DIR_FLAGS, dir_fd=repo.writable_objects_fd)

    def object_writer(self) -> ObjectWriter:
        """A writer whose object lands in this staging area."""
        return ObjectWriter(self.repo, self)

    def store_object(self, data: bytes | memoryview) -> ObjectResult:
        """Stage an in-memory object."""
        return store_bytes(self, self.repo, data)

    def adopt(self, writer: ObjectWriter, digest: bytes, size: int) -> ObjectResult:
        """Called by ObjectWriter.finish(): keep the finished file here."""
        if digest in self.staged:
            return ObjectResult(digest, size, False)
        name = digest.hex()
        if not writer.link_as(self.fd, name):
            os.unlink(name, dir_fd=self.fd)
            writer.link_as(self.fd, name)
        self.staged[digest] = name
        return ObjectResult(digest, size, True)

    def commit(self) -> None:
        """Publish every staged object into ``objects/`` and remove the staging area."""
        repo = self.repo
        dirs: dict[str, int] = {}
        try:
            for digest, name in self.staged.items():
                xx, rest = fsverity.object_path(digest).split("/")
                dfd = dirs.get(xx)
                if dfd is None:
                    dfd = dirs[xx] = repo.object_dir(xx)
                if not rename_noreplace(self.fd, name, dfd, rest):
                    if not repo.object_ok(digest):
                        os.rename(name, rest, src_dir_fd=self.fd, dst_dir_fd=dfd)
                repo.remember(digest)
        finally:
            for dfd in dirs.values():
                os.close(dfd)
        self.staged.clear()
        self.abort()

    def abort(self) -> None:
        """Remove the staging area and everything in it."""
        if self.fd < 0:
            return
        try:        # the directory goes first: once its fd is closed, nothing is left
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.name, dir_fd=self.repo.writable_objects_fd)
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


_RENAME_NOREPLACE = 1
_renameat2_ok = True


def rename_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> bool:
    """renameat2(RENAME_NOREPLACE): False if *dst* exists (then *src* is left alone)."""
    global _renameat2_ok
    if _renameat2_ok:
        if _libc.renameat2(src_dir, src.encode(), dst_dir, dst.encode(),
                           _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), dst)
        _renameat2_ok = False
    try:
        os.link(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
    except FileExistsError:
        return False
    os.unlink(src, dir_fd=src_dir)
    return True


def remove_stale_staging(repo: Repository) -> int:
    """Delete staging areas left by crashed imports (caller holds the exclusive lock)."""
    n = 0
    for name in os.listdir(repo.objects_fd):
        if name.startswith(STAGING_PREFIX):
            shutil.rmtree(name, dir_fd=repo.objects_fd, ignore_errors=True)
            n += 1
    return n

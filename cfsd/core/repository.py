"""The composefs repository: meta.json, objects, streams, images and refs (docs/repository.md).

Everything goes through a directory fd with O_NOFOLLOW on every component we open, so a
symlink planted inside a repository can never redirect a write (or a read) outside it.
Objects are written to O_TMPFILE files and linked into place only when complete; names
(streams, refs, images) are relative symlinks exactly as composefs-rs writes them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from cfsd.core import fsverity
from cfsd.core import openat2 as _openat2
from cfsd.core.errors import (
    AlreadyInitialized,
    CorruptObject,
    InvalidName,
    NotFound,
    NotWritable,
    RepoNotFound,
    RepositoryError,
)
from cfsd.core.fsverity import Algorithm
from cfsd.core.locking import (
    DirLock,
    RWLock,
    acquire_dir_lock,
    flock_exclusive,
    flock_shared,
    release_dir_lock,
)
from cfsd.core.metadata import (
    DIR_FLAGS,
    RepoMetadata,
    ensure_writable,
    exists,
    read_meta,
    upgrade_legacy,
    write_meta,
)
from cfsd.core.objects import ObjectResult, ObjectStore, ObjectWriter, Staging, store_bytes

if TYPE_CHECKING:
    from cfsd.core.splitstream import SplitStreamReader, SplitStreamWriter


_libc = ctypes.CDLL(None, use_errno=True)


VERIFY_IN_MEMORY = 64 << 20    # objects up to this size are verified in memory when read
_absent: int | None = None


def _pread_chunks(fd: int, size: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The first *size* bytes of *fd*, in chunks (stops early at a short file)."""
    off = 0
    while off < size:
        data = os.pread(fd, min(chunk, size - off), off)
        if not data:
            return
        yield data
        off += len(data)


def _absent_dir() -> int:
    """An fd of an empty, already removed directory: nothing can be found or created in it."""
    global _absent
    if _absent is None:
        path = tempfile.mkdtemp(prefix="cfsd-absent-")
        fd = os.open(path, DIR_FLAGS)
        os.rmdir(path)
        _absent = fd
    return _absent


def syncfs(fd: int) -> None:
    """syncfs(2) on the filesystem holding *fd*."""
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# ---------------------------------------------------------------------------------------------
# Names


def validate_ref_name(name: str) -> list[str]:
    """Split a ref name (``a/b/c``) into components; InvalidName if it could escape."""
    if not name or "\0" in name or name.startswith("/"):
        raise InvalidName(f"invalid ref name: {name!r}")
    parts = name.split("/")
    for p in parts:
        if p in ("", ".", ".."):
            raise InvalidName(f"invalid ref name: {name!r}")
    return parts


def validate_content_id(name: str) -> str:
    """A stream content id is one path component (colons allowed)."""
    if not name or "/" in name or "\0" in name or name in (".", "..") or name == "refs":
        raise InvalidName(f"invalid stream name: {name!r}")
    return name


def relative_target(link: str, target: str) -> str:
    """Relative symlink text from repo-relative *link* to repo-relative *target*."""
    lp = link.split("/")[:-1]
    tp = target.split("/")
    i = 0
    while i < len(lp) and i < len(tp) - 1 and lp[i] == tp[i]:
        i += 1
    return "/".join([".."] * (len(lp) - i) + tp[i:])


# ---------------------------------------------------------------------------------------------
# Repository


class Repository:
    """An open repository (holds a shared flock on its directory until closed)."""

    def __init__(self, fd: int, path: str, meta: RepoMetadata, secure: bool,
                 dir_lock: DirLock) -> None:
        self.fd = fd
        self.path = path
        self.meta = meta
        self.alg: Algorithm = meta.algorithm
        self.secure = secure
        self._dir_lock = dir_lock
        self.lock: RWLock = dir_lock.rw
        self._objects_fd: int | None = None
        self._init_lock = threading.Lock()
        self._verified: set[bytes] = set()
        self.verity_supported: bool | None = None
        self.closed = False
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)      # which directory this is, for caches

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open_at(cls, dir_fd: int, path: str = "", *, insecure: bool = False,
                require_verity: bool = False, upgrade: bool = True,
                legacy_read: bool = False) -> Repository:
        """Open the repository whose directory is *dir_fd* (the fd is duplicated).

        A repository without meta.json is upgraded (meta.json written) with *upgrade*; with
        *legacy_read* instead it is opened as it is, its metadata inferred, nothing written.
        """
        fd = os.dup(dir_fd)
        try:
            os.set_inheritable(fd, False)
            dir_lock = acquire_dir_lock(fd)
        except BaseException:
            os.close(fd)
            raise
        try:
            meta, secure = read_meta(fd)
            if meta is None:
                if not upgrade and not legacy_read:
                    raise RepoNotFound(
                        f"meta.json not found in {path or 'repository'}; this repository must "
                        "be initialized with 'cfsctl init'")
                if not exists(fd, "objects"):
                    raise RepoNotFound(f"{path or 'path'} is not a composefs repository "
                                       "(no meta.json)")
                meta, secure = upgrade_legacy(fd, path, write=upgrade)
            if insecure:
                secure = False
            if require_verity and not secure:
                raise RepositoryError(f"repository {path} does not have fs-verity enabled")
            return cls(fd, path, meta, secure, dir_lock)
        except BaseException:
            release_dir_lock(dir_lock)
            os.close(fd)
            raise

    @classmethod
    def open(cls, path: str, **kw: bool) -> Repository:
        """Open the repository at *path*."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RepoNotFound(f"repository {path} does not exist") from None
        except NotADirectoryError:
            raise RepoNotFound(f"{path} is not a directory") from None
        try:
            return cls.open_at(fd, path, **kw)
        finally:
            os.close(fd)

    @classmethod
    def init_at(cls, dir_fd: int, path: str = "", *, alg: Algorithm = fsverity.SHA512,
                insecure: bool = False, erofs_version: int = 1,
                require_verity: bool = False) -> tuple[Repository, bool]:
        """Write meta.json into the (existing) directory; idempotent for an equal config.

        Returns ``(repository, created)``.  When the filesystem lacks fs-verity the repository
        is created insecure (there is nothing to enforce verity with), unless
        *require_verity*: then VerityUnsupported and nothing is written.
        """
        meta = RepoMetadata.new(alg, erofs_version)
        existing, _ = read_meta(dir_fd)
        if existing is not None:
            if not existing.same_config(meta):
                raise AlreadyInitialized(
                    f"repository already initialized with different configuration "
                    f"(algorithm: {existing.algorithm.repo_string}, erofs_version: "
                    f"{existing.format_versions()[0]}); cannot re-initialize with "
                    f"(algorithm: {alg.repo_string}, erofs_version: {erofs_version})")
            return cls.open_at(dir_fd, path), False
        ensure_writable(dir_fd)
        try:
            write_meta(dir_fd, meta, verity=not insecure, require=require_verity)
        except FileExistsError:
            return cls.init_at(dir_fd, path, alg=alg, insecure=insecure,
                               erofs_version=erofs_version, require_verity=require_verity)
        return cls.open_at(dir_fd, path), True

    @classmethod
    def init(cls, path: str, **kw: object) -> tuple[Repository, bool]:
        """Create *path* (and parents; the repository directory itself 0700) and init it."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return cls.init_at(fd, path, **kw)  # type: ignore[arg-type]
        finally:
            os.close(fd)

    def close(self) -> None:
        """Release the fds (and with them the shared flock)."""
        if self.closed:
            return
        self.closed = True
        if self._objects_fd is not None:
            os.close(self._objects_fd)
            self._objects_fd = None
        os.close(self.fd)
        release_dir_lock(self._dir_lock)

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------------

    def ensure_writable(self) -> None:
        """NotWritable unless the repository can be written (checked per write operation)."""
        if self.meta.readonly_features:
            raise NotWritable(
                f"repository {self.path} uses unknown read-only-compatible features: "
                f"{', '.join(self.meta.readonly_features)}")
        ensure_writable(self.fd, self.path)

    def open_dir(self, rel: str, *, create: bool = False) -> int:
        """Open a repository subdirectory without following symlinks (optionally mkdir -p)."""
        if not create and _openat2.available():
            return _openat2.openat2(self.fd, rel.strip("/") or ".", DIR_FLAGS)
        fd = os.dup(self.fd)
        try:
            for part in rel.split("/"):
                if not part:
                    continue
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    @property
    def objects_fd(self) -> int:
        """fd of ``objects/`` for reading: an empty stand-in while it does not exist.

        Readers never create it; writers use :attr:`writable_objects_fd`.
        """
        with self._init_lock:
            if self._objects_fd is None:
                try:
                    self._objects_fd = os.open("objects", DIR_FLAGS, dir_fd=self.fd)
                except FileNotFoundError:
                    return _absent_dir()
            return self._objects_fd

    @property
    def writable_objects_fd(self) -> int:
        """fd of ``objects/``, created when missing (writers only)."""
        with self._init_lock:
            if self._objects_fd is None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir("objects", 0o755, dir_fd=self.fd)
                self._objects_fd = os.open("objects", DIR_FLAGS, dir_fd=self.fd)
            return self._objects_fd

    def sync(self) -> None:
        """Durability barrier before a name is published (one syncfs, no per-object fsync)."""
        syncfs(self.fd)

    # -- objects ---------------------------------------------------------------------------

    def object_writer(self) -> ObjectWriter:
        """A streaming writer for one new object (linked into objects/ by finish())."""
        return ObjectWriter(self)

    def ensure_object(self, data: bytes | memoryview) -> bytes:
        """Store *data* as an object (deduplicated, verified); return its digest."""
        return self.store_object(data).digest

    def store_object(self, data: bytes | memoryview) -> ObjectResult:
        """Like ensure_object, also telling whether the object was new."""
        return store_bytes(self, self, data)

    def staging(self) -> Staging:
        """A staging area: objects written through it appear only on commit()."""
        return Staging(self)

    def object_dir(self, xx: str) -> int:
        """fd of ``objects/XX`` (created 0755 if missing, never a symlink)."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(xx, 0o755, dir_fd=self.writable_objects_fd)
        return os.open(xx, DIR_FLAGS, dir_fd=self.writable_objects_fd)

    def open_object(self, digest: bytes, *, verify: bool | None = None) -> int:
        """Open ``objects/XX/rest`` read-only; in secure mode the measured verity must match."""
        xx, rest = fsverity.object_path(digest).split("/")
        try:
            dfd = os.open(xx, DIR_FLAGS, dir_fd=self.objects_fd)
        except FileNotFoundError:
            raise CorruptObject(f"object {digest.hex()} is missing") from None
        try:
            # O_NONBLOCK: a FIFO or device planted as an object is refused, never waited on
            fd = os.open(rest, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                         | os.O_NOCTTY, dir_fd=dfd)
        except FileNotFoundError:
            raise CorruptObject(f"object {digest.hex()} is missing") from None
        finally:
            os.close(dfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CorruptObject(f"object {digest.hex()} is not a regular file")
        try:
            os.set_blocking(fd, True)
            if verify if verify is not None else self.secure:
                measured = fsverity.measure_verity(fd, self.alg)
                if measured != digest:
                    raise CorruptObject(f"object {digest.hex()}: fs-verity "
                                        f"{'missing' if measured is None else 'mismatch'}")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def copy_object(self, digest: bytes, write: Callable[[bytes | memoryview], None]) -> int:
        """Hand the content of object *digest* to *write*; returns its size.

        Where the kernel enforces fs-verity (a secure repository) the content is streamed.
        Otherwise it is checked against its name before any of it reaches *write*, in one
        read: small objects in memory, large ones through a private temporary copy (the
        repository's owner could change the object between two reads).  A mismatch raises
        CorruptObject.
        """
        fd = self.open_object(digest)
        try:
            size = os.fstat(fd).st_size
            if self.secure:
                for chunk in _pread_chunks(fd, size):
                    write(chunk)
                return size
            if size <= VERIFY_IN_MEMORY:
                write(self._read_checked(fd, digest, size))
                return size
            h = fsverity.FsVerityHasher(self.alg)
            with tempfile.TemporaryFile() as tmp:
                for chunk in _pread_chunks(fd, size):
                    h.update(chunk)
                    tmp.write(chunk)
                if h.digest() != digest or tmp.tell() != size:
                    raise CorruptObject(f"object {digest.hex()} does not match its name")
                for chunk in _pread_chunks(tmp.fileno(), size):
                    write(chunk)
            return size
        finally:
            os.close(fd)

    def read_object(self, digest: bytes, limit: int = 64 << 20) -> bytes:
        """Whole content of a (small) object, verified against its digest."""
        fd = self.open_object(digest)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise CorruptObject(f"object {digest.hex()} is too large ({size} bytes)")
            return self._read_checked(fd, digest, size)
        finally:
            os.close(fd)

    def _read_checked(self, fd: int, digest: bytes, size: int) -> bytes:
        """The *size* bytes of object *fd*, in one read, checked against its name."""
        data = b"".join(_pread_chunks(fd, size))
        if len(data) != size or fsverity.digest(data, self.alg) != digest:
            raise CorruptObject(f"object {digest.hex()} does not match its name")
        return data

    def has_object(self, digest: bytes) -> bool:
        """True if the object file exists (no content check)."""
        xx, rest = fsverity.object_path(digest).split("/")
        try:
            os.stat(f"{xx}/{rest}", dir_fd=self.objects_fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def object_ok(self, digest: bytes) -> bool:
        """True if the object exists and its content hashes to its name (cached per process)."""
        if digest in self._verified:
            return True
        if not self.has_object(digest):
            return False
        try:
            fd = self.open_object(digest, verify=False)
        except CorruptObject:
            return False
        try:
            measured = fsverity.measure_verity(fd, self.alg)
            if measured is None:
                if self.secure:
                    return False
                measured = fsverity.digest_fd(fd, self.alg)
        finally:
            os.close(fd)
        if measured == digest:
            self.remember(digest)
            return True
        return False

    def remember(self, digest: bytes) -> None:
        """Record that *digest* is present and verified."""
        if len(self._verified) > 1_000_000:
            self._verified.clear()
        self._verified.add(digest)

    def forget_verified(self) -> None:
        """Drop the cache of verified objects (after GC deleted some)."""
        self._verified.clear()

    # -- symlinks --------------------------------------------------------------------------

    def symlink(self, link: str, target: str) -> None:
        """Atomically point repo-relative *link* at repo-relative *target* (relative text)."""
        parent, _, name = link.rpartition("/")
        text = relative_target(link, target)
        dfd = self.open_dir(parent, create=True)
        try:
            try:
                os.symlink(text, name, dir_fd=dfd)
                return
            except FileExistsError:
                pass
            try:
                if os.readlink(name, dir_fd=dfd) == text:
                    return
            except OSError:
                pass
            for _ in range(16):
                tmp = ".symlink-" + secrets.token_urlsafe(9)[:12]
                try:
                    os.symlink(text, tmp, dir_fd=dfd)
                    break
                except FileExistsError:
                    continue
            else:
                raise RepositoryError(f"cannot create temporary symlink for {link}")
            try:
                if stat.S_ISDIR(_lstat_mode(dfd, name)):
                    raise RepositoryError(f"{link} is a directory")
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
        finally:
            os.close(dfd)

    def readlink(self, rel: str) -> str | None:
        """Target text of a repo-relative symlink, or None if absent."""
        parent, _, name = rel.rpartition("/")
        try:
            dfd = self.open_dir(parent)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return _readlink_at(dfd, name)
        finally:
            os.close(dfd)

    def unlink(self, rel: str) -> bool:
        """Remove a repo-relative symlink; False if it did not exist."""
        parent, _, name = rel.rpartition("/")
        try:
            dfd = self.open_dir(parent)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            if not stat.S_ISLNK(_lstat_mode(dfd, name)):
                raise RepositoryError(f"{rel} is not a symlink")
            os.unlink(name, dir_fd=dfd)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(dfd)

    def object_of_link(self, rel: str) -> bytes | None:
        """The object a first-level ``streams/X`` or ``images/X`` symlink points at."""
        target = self.readlink(rel)
        return None if target is None else self._object_of_target(rel, target)

    def _object_of_target(self, rel: str, target: str) -> bytes:
        """The object named by the target ``../objects/XX/REST`` of the link *rel*."""
        if not target.startswith("../"):
            raise RepositoryError(f"{rel}: unexpected symlink target {target!r}")
        try:
            return fsverity.parse_object_path(target, self.alg)
        except ValueError:
            raise RepositoryError(f"{rel}: unexpected symlink target {target!r}") from None

    def stream_verities(self, content_ids: list[str]) -> list[bytes | None]:
        """has_stream for many content ids, with one open of ``streams/``."""
        try:
            dfd = self.open_dir("streams")
        except (FileNotFoundError, NotADirectoryError):
            return [None] * len(content_ids)
        out: list[bytes | None] = []
        try:
            for cid in content_ids:
                validate_content_id(cid)
                target = _readlink_at(dfd, cid)
                out.append(None if target is None
                           else self._object_of_target(f"streams/{cid}", target))
        finally:
            os.close(dfd)
        return out

    # -- streams ---------------------------------------------------------------------------

    def create_stream(self, content_type: int,
                      staging: ObjectStore | None = None) -> SplitStreamWriter:
        """A splitstream writer storing its objects here (or in *staging*, or another
        object store)."""
        from cfsd.core.splitstream import SplitStreamWriter
        return SplitStreamWriter(self, content_type, staging)

    def register_stream(self, content_id: str, digest: bytes, ref: str | None = None,
                        *, sync: bool = True) -> None:
        """Publish an already-stored splitstream object under its content id.

        The name appears only after a syncfs made every object durable; pass ``sync=False``
        only right after an explicit ``sync()`` that covered this stream's objects.
        """
        validate_content_id(content_id)
        if ref is not None:
            validate_ref_name(ref)
        if sync:
            self.sync()
        self.symlink(f"streams/{content_id}", "objects/" + fsverity.object_path(digest))
        if ref is not None:
            self.symlink(f"streams/refs/{ref}", f"streams/{content_id}")

    def has_stream(self, content_id: str) -> bytes | None:
        """Verity of the splitstream named *content_id*, or None."""
        validate_content_id(content_id)
        return self.object_of_link(f"streams/{content_id}")

    def resolve_stream(self, name: str) -> bytes:
        """Verity for a content id or ``refs/<name>`` (symlinks resolved, never followed)."""
        if name.startswith("refs/"):
            validate_ref_name(name)
            target = self.readlink(f"streams/{name}")
            if target is None:
                raise NotFound(f"no such stream: {name}")
            name = target.rsplit("/", 1)[-1]
        digest = self.has_stream(name)
        if digest is None:
            raise NotFound(f"no such stream: {name}")
        return digest

    def open_stream(self, name: str | None = None, verity: bytes | None = None,
                    content_type: int | None = None) -> SplitStreamReader:
        """Open a splitstream by name (content id or ``refs/…``) or by verity."""
        from cfsd.core.splitstream import SplitStreamReader
        if verity is None:
            if name is None:
                raise ValueError("open_stream needs a name or a verity")
            verity = self.resolve_stream(name)
        fd = self.open_object(verity)
        return SplitStreamReader(fd, self.alg, content_type, digest=verity)

    def name_stream(self, content_id: str, ref: str) -> None:
        """Point ``streams/refs/<ref>`` at ``streams/<content_id>``."""
        validate_content_id(content_id)
        validate_ref_name(ref)
        if self.has_stream(content_id) is None:
            raise NotFound(f"no such stream: {content_id}")
        self.symlink(f"streams/refs/{ref}", f"streams/{content_id}")

    def list_refs(self, category: str, prefix: str = "") -> list[tuple[str, str]]:
        """``(name, target)`` for every symlink below ``<category>/refs/<prefix>``."""
        base = f"{category}/refs" + (f"/{prefix.strip('/')}" if prefix else "")
        try:
            fd = self.open_dir(base)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out: list[tuple[str, str]] = []
        _walk_links(fd, "", out)
        return sorted(out)

    def layout_problems(self) -> list[str]:
        """What is wrong with the repository's directory layout (empty when sound).

        ``objects/``, ``images/``, ``streams/`` and their ``refs/`` trees must be
        directories (or absent), and a refs tree holds only directories and symlinks:
        anything else would hide roots from gc.
        """
        problems: list[str] = []
        for rel in ("objects", "images", "streams", "images/refs", "streams/refs"):
            try:
                mode = os.stat(rel, dir_fd=self.fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                continue
            except NotADirectoryError:
                continue            # its parent is already reported
            if not stat.S_ISDIR(mode):
                problems.append(f"{rel} is not a directory")
            elif rel.endswith("/refs"):
                fd = self.open_dir(rel)
                _refs_problems(fd, rel, problems)
        return problems

    # -- images ----------------------------------------------------------------------------

    def write_image(self, data: bytes, name: str | None = None) -> bytes:
        """Store an EROFS image, link ``images/<hex>`` (and ``images/refs/<name>``)."""
        if name is not None:
            validate_ref_name(name)
        return self._link_image(self.ensure_object(data), name)

    def stream_image(self, emit: Callable[[Callable[[bytes], object]], None],
                     name: str | None = None) -> bytes:
        """Like write_image, with the image streamed by ``emit(sink)`` instead of in memory."""
        if name is not None:
            validate_ref_name(name)
        w = ObjectWriter(self)
        try:
            emit(w.write)
            digest = w.finish().digest
        finally:
            w.abort()
        return self._link_image(digest, name)

    def _link_image(self, digest: bytes, name: str | None) -> bytes:
        self.sync()
        self.symlink(f"images/{digest.hex()}", "objects/" + fsverity.object_path(digest))
        if name is not None:
            self.symlink(f"images/refs/{name}", f"images/{digest.hex()}")
        return digest

    def resolve_image(self, name: str) -> bytes:
        """Image id for ``<hex>`` or ``refs/<name>`` (or a bare ref name)."""
        if not name.startswith("refs/"):
            try:
                raw = bytes.fromhex(name)
            except ValueError:
                raw = b""
            if len(raw) == self.alg.size:
                digest = self.object_of_link(f"images/{name}")
                if digest is not None:
                    return digest
            if "/" in name:
                raise NotFound(f"no such image: {name}")
            name = "refs/" + name
        validate_ref_name(name)
        target = self.readlink(f"images/{name}")
        if target is None:
            raise NotFound(f"no such image: {name}")
        digest = self.object_of_link("images/" + target.rsplit("/", 1)[-1])
        if digest is None:
            raise NotFound(f"no such image: {name}")
        return digest


# ---------------------------------------------------------------------------------------------
# Module helpers


def _readlink_at(dir_fd: int, name: str) -> str | None:
    """Target of the symlink *name* in *dir_fd*; None if absent or not a symlink."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise


def _lstat_mode(dir_fd: int, name: str) -> int:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode


def _refs_problems(fd: int, prefix: str, out: list[str]) -> None:
    """Entries below the refs directory *fd* (closed here) that are neither links nor dirs."""
    try:
        for e in list(os.scandir(fd)):
            name = f"{prefix}/{e.name}"
            if e.is_symlink():
                continue
            if e.is_dir(follow_symlinks=False):
                _refs_problems(os.open(e.name, DIR_FLAGS, dir_fd=fd), name, out)
            else:
                out.append(f"{name} is neither a symlink nor a directory")
    finally:
        os.close(fd)


def _walk_links(fd: int, prefix: str, out: list[tuple[str, str]]) -> None:
    """Collect symlinks below the directory *fd* (which this closes)."""
    try:
        for e in list(os.scandir(fd)):
            name = prefix + e.name
            if e.is_symlink():
                out.append((name, os.readlink(e.name, dir_fd=fd)))
            elif e.is_dir(follow_symlinks=False):
                _walk_links(os.open(e.name, DIR_FLAGS, dir_fd=fd), name + "/", out)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(repo: Repository, timeout: float = 30.0) -> Iterator[None]:
    """Hold the repository exclusively (in-process RWLock, then the flock upgraded)."""
    with repo.lock.exclusive(timeout=timeout):
        flock_exclusive(repo._dir_lock.fd, timeout)
        try:
            yield
        finally:
            flock_shared(repo._dir_lock.fd)

"""Image sources: where manifests and blobs come from during a pull.

A source answers three questions: the top-level document for the reference (manifest or
index), a manifest by digest, and a blob stream by digest.  Every byte handed out is checked
against its digest and size by the caller (``VerifyingReader``); sources only locate data.
Local paths are opened through a ``PathOpener`` so the daemon can check the caller's
permissions; the default opener uses the process's own permissions.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tarfile
from collections.abc import Callable
from typing import Protocol

from cfsd.core.errors import FormatError, NotFound, RepositoryError
from cfsd.core.splitstream import RangeReader
from cfsd.oci.digest import Digest, DigestMismatch, InvalidDigest
from cfsd.oci.documents import MAX_MANIFEST, Descriptor
from cfsd.oci.reference import ImageReference

REF_NAME = "org.opencontainers.image.ref.name"


class BlobReader(Protocol):
    """A readable stream of one blob."""

    def read(self, n: int = ..., /) -> bytes: ...

    def close(self) -> None: ...


class PathOpener(Protocol):
    """Opens local paths on behalf of a caller (and reads beneath them as the caller)."""

    def open_dir(self, path: str) -> int: ...

    def open_file(self, path: str) -> int: ...

    def reading(self) -> contextlib.AbstractContextManager[None]: ...


class DefaultOpener:
    """Opens paths with the process's own permissions."""

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Nothing to switch: the process reads as itself."""
        return contextlib.nullcontext()

    def open_dir(self, path: str) -> int:
        """An O_DIRECTORY fd for *path*."""
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def open_file(self, path: str) -> int:
        """A read-only fd for the regular file *path*."""
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


class SourceError(RepositoryError):
    """The source cannot provide what was asked (missing blob, unreadable layout...)."""


class Source(Protocol):
    """What a pull needs from a transport."""

    description: str

    def top(self) -> tuple[bytes, str | None, str | None]:
        """(document bytes, media type if known, digest it must match if known)."""
        ...

    def manifest(self, digest: str, size: int | None) -> bytes:
        """A manifest (or nested index) by digest."""
        ...

    def blob(self, digest: str, size: int) -> BlobReader:
        """A stream of the blob *digest*."""
        ...

    def close(self) -> None:
        """Release resources."""
        ...


def _select_by_ref(index_bytes: bytes, ref: ImageReference, where: str) -> tuple[
        bytes | None, Descriptor | None]:
    """From an index.json: the descriptor named by the reference's tag/digest, if any."""
    from cfsd.oci.documents import parse_index
    index = parse_index(index_bytes)
    if ref.digest:
        for d in index.manifests:
            if d.digest == ref.digest:
                return None, d
        return None, Descriptor(mediaType="", digest=ref.digest, size=0)
    if ref.tag:
        for d in index.manifests:
            if (d.annotations or {}).get(REF_NAME) == ref.tag:
                return None, d
        raise NotFound(f"no image tagged {ref.tag!r} in {where}")
    return index_bytes, None


class _FileStore:
    """Blob lookup shared by layouts (directory) and archives (tar file)."""

    description = ""

    def _read_file(self, name: str, limit: int) -> bytes:
        raise NotImplementedError

    def _open(self, name: str) -> tuple[int, int, int, Callable[[], None] | None]:
        raise NotImplementedError

    def __init__(self, ref: ImageReference) -> None:
        self.ref = ref

    @staticmethod
    def blob_name(digest: str) -> str:
        d = Digest.parse(digest)
        return f"blobs/{d.algorithm}/{d.hex}"

    def top(self) -> tuple[bytes, str | None, str | None]:
        index = self._read_file("index.json", MAX_MANIFEST)
        doc, desc = _select_by_ref(index, self.ref, self.description)
        if desc is None:
            assert doc is not None
            return doc, "application/vnd.oci.image.index.v1+json", None
        data = self.manifest(desc.digest, desc.size or None)
        return data, desc.media_type or None, desc.digest

    def manifest(self, digest: str, size: int | None) -> bytes:
        if size is not None and size > MAX_MANIFEST:
            raise FormatError(f"manifest {digest} too large ({size} bytes)")
        return self._read_file(self.blob_name(digest), MAX_MANIFEST)

    def blob(self, digest: str, size: int) -> BlobReader:
        fd, offset, length, on_close = self._open(self.blob_name(digest))
        if length != size:
            if on_close:
                on_close()
            raise DigestMismatch(f"blob {digest} has {length} bytes, descriptor says {size}")
        return RangeReader(fd, offset, length, on_close)


def _open_error(e: OSError, what: str) -> Exception:
    """What the caller gets when the path it named cannot be opened."""
    if e.errno == errno.ENOENT:
        return NotFound(f"{what} does not exist")
    if e.errno in (errno.EACCES, errno.EPERM):
        return PermissionError(e.errno, f"{what}: {e.strerror}")
    return SourceError(f"{what}: {e.strerror}")


class LayoutSource(_FileStore):
    """An OCI image layout directory (``oci:DIR``)."""

    def __init__(self, ref: ImageReference, opener: PathOpener) -> None:
        super().__init__(ref)
        self.description = f"oci:{ref.path}"
        self.opener = opener
        try:
            self.dfd = opener.open_dir(ref.path)
        except OSError as e:
            raise _open_error(e, f"OCI layout {ref.path}") from None

    def _open(self, name: str) -> tuple[int, int, int, Callable[[], None] | None]:
        parts = name.split("/")
        opened: list[int] = []
        try:
            with self.opener.reading():
                fd = self.dfd
                for p in parts[:-1]:
                    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=fd)
                    opened.append(fd)
                # O_NONBLOCK: a FIFO planted in a layout is refused below, never waited on
                ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                              | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=fd)
        except FileNotFoundError:
            raise NotFound(f"{name} missing in {self.description}") from None
        except PermissionError as e:
            raise PermissionError(e.errno, f"cannot open {name} in {self.description}: "
                                           f"{e.strerror}") from None
        except OSError as e:
            raise SourceError(f"cannot open {name} in {self.description}: {e.strerror}") from None
        finally:
            for x in opened:
                os.close(x)
        st = os.fstat(ffd)
        if not stat.S_ISREG(st.st_mode):
            os.close(ffd)
            raise SourceError(f"{name} in {self.description} is not a regular file")
        os.set_blocking(ffd, True)
        return ffd, 0, st.st_size, lambda: os.close(ffd)

    def _read_file(self, name: str, limit: int) -> bytes:
        fd, _, size, close = self._open(name)
        try:
            if size > limit:
                raise FormatError(f"{name} in {self.description} is too large ({size} bytes)")
            return os.pread(fd, size, 0)
        finally:
            assert close is not None
            close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.dfd)


class ArchiveSource(_FileStore):
    """An OCI layout packed in a tar file (``oci-archive:FILE``); blobs read in place."""

    def __init__(self, ref: ImageReference, opener: PathOpener) -> None:
        super().__init__(ref)
        self.description = f"oci-archive:{ref.path}"
        try:
            self.fd = opener.open_file(ref.path)
        except OSError as e:
            raise _open_error(e, f"archive {ref.path}") from None
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise SourceError(f"{ref.path} is not a regular file")
        self.members: dict[str, tuple[int, int]] = {}
        try:
            with os.fdopen(os.dup(self.fd), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                for m in tf:
                    if m.isfile():
                        name = os.path.normpath(m.name).lstrip("/")
                        self.members[name] = (m.offset_data, m.size)
        except (tarfile.TarError, EOFError) as e:
            os.close(self.fd)
            raise FormatError(f"{ref.path} is not a valid OCI archive: {e}") from None

    def _open(self, name: str) -> tuple[int, int, int, Callable[[], None] | None]:
        try:
            offset, size = self.members[name]
        except KeyError:
            raise NotFound(f"{name} missing in {self.description}") from None
        return self.fd, offset, size, None

    def _read_file(self, name: str, limit: int) -> bytes:
        _, offset, size, _ = self._open(name)
        if size > limit:
            raise FormatError(f"{name} in {self.description} is too large ({size} bytes)")
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def open_source(ref: ImageReference, opener: PathOpener | None = None,
                **registry_options: object) -> Source:
    """The Source for a parsed reference."""
    opener = opener or DefaultOpener()
    if ref.transport == "oci":
        return LayoutSource(ref, opener)
    if ref.transport == "oci-archive":
        return ArchiveSource(ref, opener)
    from cfsd.oci.registry import RegistrySource
    return RegistrySource(ref, **registry_options)  # type: ignore[arg-type]


__all__ = ["ArchiveSource", "BlobReader", "DefaultOpener", "InvalidDigest", "LayoutSource",
           "PathOpener", "Source", "SourceError", "open_source"]

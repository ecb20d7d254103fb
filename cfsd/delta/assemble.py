"""Writing an oci-delta artifact as an oci-archive (docs/delta.md): JSON, tar and output file.

* :func:`delta_manifest` builds the delta manifest (``artifactType``, the empty config,
  role-annotated layers, ``subject`` and the five annotations, ``reused*`` only when
  non-empty) and :func:`go_json` serializes it the way Go's ``json.Marshal`` does: compact,
  struct fields in declaration order, map keys sorted, ``<``, ``>``, ``&``, U+2028 and
  U+2029 escaped.
* :class:`ArchiveWriter` writes a deterministic uncompressed tar of the image layout in the
  Go creator's order (``oci-layout``, ``blobs/``, ``blobs/sha256/``, the target manifest and
  config, the layer blobs in target order, the empty config, the delta manifest,
  ``index.json``): ustar headers, mode 0644 for files and 0755 for directories, owner 0, no
  mtime, blobs streamed from file descriptors, and each blob written once.
* :class:`OutputFile` is the archive on its way to ``OUTPUT``: an anonymous file
  (``O_TMPFILE``) in the output directory, linked under a hidden temporary name and renamed
  over ``OUTPUT`` only once it is complete and synced (a named ``O_EXCL | O_NOFOLLOW``
  temporary file where ``O_TMPFILE`` is unsupported).  It never follows a symlink and never
  leaves a partial ``OUTPUT`` behind.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from cfsd.core.sink import write_all
from cfsd.delta.artifact import (
    ANN_CONTENT,
    ANN_REUSED,
    ANN_REUSED_DIFF_ID,
    ANN_SOURCE,
    ANN_SOURCE_CONFIG,
    ANN_TARGET,
    ANN_TO,
    ROLE_CONFIG,
    ROLE_LAYER,
    ROLE_MANIFEST,
)
from cfsd.oci import mediatypes
from cfsd.oci.image import sha256_digest

OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
EMPTY_CONFIG = b"{}"
REF_NAME = "org.opencontainers.image.ref.name"
BLOCK = 512
COPY_CHUNK = 1 << 20


def go_json(obj: Any) -> bytes:
    """Compact JSON as Go's json.Marshal writes it (dict order is kept: build dicts in
    struct-field order and sort map keys before calling)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text.encode("utf-8")


def descriptor(media_type: str, digest: str, size: int,
               annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """An OCI descriptor in Go field order (mediaType, digest, size, annotations)."""
    d: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        d["annotations"] = dict(sorted(annotations.items()))
    return d


@dataclass(frozen=True)
class LayerBlob:
    """One changed target layer as carried by the delta."""

    media_type: str
    digest: str
    size: int
    to: str                 # the target manifest's layer digest it reconstructs


def delta_manifest(*, target_manifest: bytes, target_manifest_type: str,
                   target_config: bytes, target_config_type: str, source_manifest: str,
                   source_config: str, layers: list[LayerBlob], reused: list[str],
                   reused_diff_ids: list[str]) -> bytes:
    """The delta manifest bytes (docs/delta.md)."""
    target = sha256_digest(target_manifest)
    entries = [
        descriptor(target_manifest_type, target, len(target_manifest),
                   {ANN_CONTENT: ROLE_MANIFEST}),
        descriptor(target_config_type, sha256_digest(target_config), len(target_config),
                   {ANN_CONTENT: ROLE_CONFIG}),
    ]
    entries += [descriptor(b.media_type, b.digest, b.size, {ANN_CONTENT: ROLE_LAYER,
                                                            ANN_TO: b.to})
                for b in layers]
    ann = {ANN_TARGET: target, ANN_SOURCE: source_manifest, ANN_SOURCE_CONFIG: source_config}
    if reused:
        ann[ANN_REUSED] = go_json(reused).decode("utf-8")
        ann[ANN_REUSED_DIFF_ID] = go_json(reused_diff_ids).decode("utf-8")
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "artifactType": mediatypes.DELTA_ARTIFACT,
        "config": descriptor(mediatypes.EMPTY_CONFIG, sha256_digest(EMPTY_CONFIG),
                             len(EMPTY_CONFIG)),
        "layers": entries,
        "subject": descriptor(target_manifest_type, target, len(target_manifest)),
        "annotations": dict(sorted(ann.items())),
    }
    return go_json(manifest)


def layout_index(manifest: bytes, ref_name: str | None = None) -> bytes:
    """``index.json`` with the one delta manifest (named only when *ref_name* is given)."""
    ann = {REF_NAME: ref_name} if ref_name else None
    return go_json({"schemaVersion": 2, "manifests": [
        descriptor(mediatypes.OCI_MANIFEST, sha256_digest(manifest), len(manifest), ann)]})


# ------------------------------------------------------------------------------ tar

def _octal(value: int, width: int) -> bytes:
    text = f"{value:0{width - 1}o}".encode("ascii")
    if len(text) > width - 1:
        raise ValueError(f"{value} does not fit a {width}-byte tar field")
    return text + b"\0"


def tar_header(name: str, size: int, directory: bool = False) -> bytes:
    """A ustar header: owner 0, mtime 0, mode 0644 (0755 for directories)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name too long: {name}")
    h = bytearray(BLOCK)
    h[0:len(raw)] = raw
    h[100:108] = _octal(0o755 if directory else 0o644, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(0, 12)
    h[148:156] = b" " * 8
    h[156] = ord("5") if directory else ord("0")
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[329:337] = _octal(0, 8)
    h[337:345] = _octal(0, 8)
    h[148:156] = f"{sum(h):06o}".encode("ascii") + b"\0 "
    return bytes(h)



def copy_fd(src: int, dst: int, size: int) -> None:
    """Copy *size* bytes from the start of *src* to the current position of *dst*."""
    offset = 0
    try:
        while offset < size:
            n = os.copy_file_range(src, dst, size - offset, offset)
            if n <= 0:
                break
            offset += n
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                           errno.EBADF):
            raise
    while offset < size:
        data = os.pread(src, min(COPY_CHUNK, size - offset), offset)
        if not data:
            raise OSError(errno.EIO, "temporary blob file is shorter than expected")
        write_all(dst, data)
        offset += len(data)


class ArchiveWriter:
    """A deterministic tar of an OCI image layout, written to *fd* from its current position."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0
        self._blobs: set[str] = set()
        self._dirs = False

    def _raw(self, data: bytes) -> None:
        write_all(self.fd, data)
        self.size += len(data)

    def _pad(self, n: int) -> None:
        if n % BLOCK:
            self._raw(bytes(BLOCK - n % BLOCK))

    def file(self, name: str, data: bytes) -> None:
        """A regular file from memory."""
        self._raw(tar_header(name, len(data)))
        self._raw(data)
        self._pad(len(data))

    def _blob_dirs(self) -> None:
        if not self._dirs:
            self._raw(tar_header("blobs/", 0, directory=True))
            self._raw(tar_header("blobs/sha256/", 0, directory=True))
            self._dirs = True

    def blob(self, digest: str, data: bytes) -> None:
        """``blobs/sha256/<hex>`` from memory (skipped if already written)."""
        if digest in self._blobs:
            return
        self._blob_dirs()
        self._blobs.add(digest)
        self.file("blobs/sha256/" + digest.removeprefix("sha256:"), data)

    def blob_fd(self, digest: str, fd: int, size: int) -> None:
        """``blobs/sha256/<hex>`` copied from the start of *fd* (skipped if already written)."""
        if digest in self._blobs:
            return
        self._blob_dirs()
        self._blobs.add(digest)
        self._raw(tar_header("blobs/sha256/" + digest.removeprefix("sha256:"), size))
        copy_fd(fd, self.fd, size)
        self.size += size
        self._pad(size)

    def close(self) -> None:
        """The end-of-archive marker (two zero blocks)."""
        self._raw(bytes(2 * BLOCK))


# ------------------------------------------------------------------------------ output file

IdentityContext = Callable[[], AbstractContextManager[None]]


class OutputError(OSError):
    """Creating, naming or replacing the output file (or a scratch file beside it) failed."""


def _output_error(e: OSError) -> OutputError:
    return OutputError(e.errno, e.strerror or str(e))


class OutputFile:
    """``OUTPUT`` in the directory *dir_fd*, appearing only when :meth:`commit` is called.

    *identity* is entered around every file creation, rename and unlink in the directory
    (the caller's filesystem identity when a root daemon serves a user), so the files belong
    to the caller and the kernel checks the caller's permissions.  :meth:`temp_fd` makes
    further anonymous scratch files in the same directory.
    """

    def __init__(self, dir_fd: int, name: str, identity: IdentityContext = nullcontext,
                 mode: int = 0o644) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"invalid output file name {name!r}")
        self.dir_fd = dir_fd
        self.name = name
        self.identity = identity
        self.mode = mode
        self._temp_name: str | None = None
        self.fd = -1
        try:
            with identity():
                self.fd, self._temp_name = self._create()
        except OutputError:
            raise
        except OSError as e:
            raise _output_error(e) from None

    def _create(self) -> tuple[int, str | None]:
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, self.mode,
                         dir_fd=self.dir_fd)
            os.fchmod(fd, self.mode)
            return fd, None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.ENOENT, errno.EINVAL):
                raise
        for _ in range(16):
            name = f".{self.name[:200]}.{secrets.token_hex(6)}.tmp"
            try:
                fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC
                             | os.O_NOFOLLOW, self.mode, dir_fd=self.dir_fd)
            except FileExistsError:
                continue
            os.fchmod(fd, self.mode)
            return fd, name
        raise OutputError(errno.EEXIST, "cannot create a temporary output file")

    def temp_fd(self) -> int:
        """An anonymous read-write scratch file next to OUTPUT (gone when closed)."""
        try:
            return self._temp_fd()
        except OutputError:
            raise
        except OSError as e:
            raise _output_error(e) from None

    def _temp_fd(self) -> int:
        with self.identity():
            try:
                return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600,
                               dir_fd=self.dir_fd)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.ENOENT,
                                   errno.EINVAL):
                    raise
            for _ in range(16):
                name = f".{self.name[:200]}.{secrets.token_hex(6)}.scratch"
                try:
                    fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC
                                 | os.O_NOFOLLOW, 0o600, dir_fd=self.dir_fd)
                except FileExistsError:
                    continue
                os.unlink(name, dir_fd=self.dir_fd)
                return fd
            raise OutputError(errno.EEXIST, "cannot create a temporary file")

    def commit(self) -> None:
        """Sync the data and move it to OUTPUT atomically (replacing a file of that name)."""
        try:
            self._commit()
        except OutputError:
            raise
        except OSError as e:
            raise _output_error(e) from None

    def _commit(self) -> None:
        os.fsync(self.fd)
        with self.identity():
            if self._temp_name is None:
                for _ in range(16):
                    name = f".{self.name[:200]}.{secrets.token_hex(6)}.tmp"
                    try:
                        os.link(f"/proc/self/fd/{self.fd}", name, dst_dir_fd=self.dir_fd,
                                follow_symlinks=True)
                    except FileExistsError:
                        continue
                    self._temp_name = name
                    break
                else:
                    raise OutputError(errno.EEXIST, "cannot name the output file")
            try:
                os.rename(self._temp_name, self.name, src_dir_fd=self.dir_fd,
                          dst_dir_fd=self.dir_fd)
            except BaseException:
                self._unlink_temp()
                raise
            self._temp_name = None
        try:
            os.fsync(self.dir_fd)
        except OSError:
            pass
        self.close()

    def _unlink_temp(self) -> None:
        if self._temp_name is not None:
            try:
                os.unlink(self._temp_name, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass
            self._temp_name = None

    def abort(self) -> None:
        """Drop everything written (OUTPUT is left as it was)."""
        if self._temp_name is not None:
            with self.identity():
                self._unlink_temp()
        self.close()

    def close(self) -> None:
        """Close the file descriptor (after commit or abort)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


__all__ = ["ArchiveWriter", "EMPTY_CONFIG", "LayerBlob", "OCI_LAYOUT", "OutputError", "OutputFile",
           "copy_fd",
           "delta_manifest", "go_json", "layout_index", "sha256_digest",
           "tar_header"]

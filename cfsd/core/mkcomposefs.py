"""C ``mkcomposefs`` semantics on top of the tree model (composefs tools/mkcomposefs.c).

* Directory source (``lcfs_build``): every name is its own inode (hardlinks are **not**
  preserved unless ``hardlinks`` is asked for, which deliberately breaks C compatibility),
  regular files of 1..64 bytes are inlined, larger ones are referenced by their fs-verity
  sha256 digest with the payload ``XX/DIGEST``; ``use_epoch`` zeroes every mtime,
  ``skip_devices`` leaves out block and character devices, ``skip_xattrs`` reads no xattrs
  and ``user_xattrs`` only ``user.*`` ones (the two conflict: ``Invalid argument``).
* Dump source (``--from-file``): the C dumpfile parser (:func:`parse_dumpfile_c` with
  ``mkcomposefs=True``: whatever C accepts, including redirects that are not object
  paths, digests without payloads and hardlinks to directories); the directory options
  and the digest store do not apply.  Errors C only meets while writing (a file too large,
  too many xattrs once the overlay ones are added, hardlink cycles) come from
  :func:`build_image`, after the version check, as in C.
* Version: ``--min-version``/``--max-version`` with C defaults and the whiteout auto-bump
  (docs/images.md, :func:`select_c_version`).
* Digest store: the content of every non-inline file is copied to ``DIR/XX/DIGEST`` (the
  flat C layout) unless that name exists, through a temporary file renamed into place,
  mode 0644, fs-verity enabled where the filesystem supports it.

Error messages are the ones C prints after ``mkcomposefs: ``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cfsd.core import fsverity
from cfsd.core.dumpfile import DumpfileError, parse_dumpfile_c
from cfsd.core.erofs import ErofsError, select_c_version, validate_filesystem, write_image
from cfsd.core.fsread import ScanError, ScanOptions, read_filesystem
from cfsd.core.repository import syncfs
from cfsd.core.tree import FileSystem

__all__ = [
    "DigestStore", "MkcomposefsError", "MkcomposefsOptions", "build_image", "from_directory",
    "from_dump",
]

_LINE_PREFIX = re.compile(r"^line \d+: ")


class MkcomposefsError(Exception):
    """mkcomposefs failed; the message is what C prints after ``mkcomposefs: ``."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


@dataclass
class MkcomposefsOptions:
    """The options of C mkcomposefs (plus composefs-rs ``--hardlinks``)."""

    min_version: int | None = None
    max_version: int | None = None
    use_epoch: bool = False
    skip_devices: bool = False
    skip_xattrs: bool = False
    user_xattrs: bool = False
    hardlinks: bool = False


class DigestStore:
    """Copies file contents into a C digest store (``XX/DIGEST`` below the store directory).

    ``identity`` wraps every filesystem write (the daemon writes with the caller's identity).
    """

    def __init__(self, dir_fd: int,
                 identity: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
                 ) -> None:
        self.dir_fd = dir_fd
        self.identity = identity or contextlib.nullcontext
        self._lock = threading.Lock()
        self._done: set[bytes] = set()
        self.copied = 0

    def store(self, fd: int, data: bytes | None, size: int, digest: bytes) -> None:
        """Copy the file unless ``XX/DIGEST`` exists already."""
        with self._lock:
            if digest in self._done:
                return
            self._done.add(digest)
        hexd = digest.hex()
        xx, rest = hexd[:2], hexd[2:]
        with self.identity():
            with contextlib.suppress(FileExistsError):
                os.mkdir(xx, 0o755, dir_fd=self.dir_fd)
            sub = os.open(xx, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=self.dir_fd)
            try:
                try:
                    os.stat(rest, dir_fd=sub, follow_symlinks=False)
                    return
                except FileNotFoundError:
                    pass
                tmp, tfd = self._tmpfile()
                try:
                    if data is not None:
                        mv = memoryview(data)
                        while mv:
                            mv = mv[os.write(tfd, mv):]
                    else:
                        _copy(fd, tfd, size, digest)
                    os.fchmod(tfd, 0o644)
                    ro = os.open(f"/proc/self/fd/{tfd}", os.O_RDONLY | os.O_CLOEXEC)
                    os.close(tfd)
                    tfd = ro
                    with contextlib.suppress(OSError):
                        fsverity.enable_verity(tfd, fsverity.SHA256)
                    os.rename(tmp, rest, src_dir_fd=self.dir_fd, dst_dir_fd=sub)
                    tmp = ""
                    with self._lock:
                        self.copied += 1
                finally:
                    os.close(tfd)
                    if tmp:
                        with contextlib.suppress(OSError):
                            os.unlink(tmp, dir_fd=self.dir_fd)
            finally:
                os.close(sub)

    def _tmpfile(self) -> tuple[str, int]:
        for _ in range(16):
            name = ".tmp" + secrets.token_hex(3)
            try:
                return name, os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, 0o600, dir_fd=self.dir_fd)
            except FileExistsError:
                continue
        raise MkcomposefsError("cannot fill store: File exists", errno.EEXIST)

    def sync(self) -> None:
        """One syncfs for every file copied (C fsyncs each file)."""
        if self.copied:
            syncfs(self.dir_fd)


def _copy(src: int, dst: int, size: int, digest: bytes) -> None:
    """Copy a file that was hashed earlier, checking it still has that digest."""
    hasher = fsverity.FsVerityHasher(fsverity.SHA256)
    off = 0
    while off < size:
        buf = os.pread(src, min(8 << 20, size - off), off)
        if not buf:
            break
        hasher.update(buf)
        mv = memoryview(buf)
        while mv:
            mv = mv[os.write(dst, mv):]
        off += len(buf)
    if off != size or hasher.digest() != digest:
        raise MkcomposefsError("cannot fill store: file changed while it was copied",
                               errno.EIO)


def from_directory(root_fd: int, opts: MkcomposefsOptions, *, source: str = ".",
                   store: DigestStore | None = None,
                   hide_trusted_xattrs: bool = False) -> FileSystem:
    """Scan a directory the way C ``lcfs_build`` + ``compute_digest`` (+ ``fill_store``) do.

    *source* is the path as the user named it (for error messages).
    """
    if opts.skip_xattrs and opts.user_xattrs:
        raise MkcomposefsError(f"error accessing {source}: Invalid argument", errno.EINVAL)
    scan = ScanOptions(hardlinks=opts.hardlinks,
                       xattrs="none" if opts.skip_xattrs else "user" if opts.user_xattrs
                       else "all",
                       use_epoch=opts.use_epoch, skip_devices=opts.skip_devices,
                       hide_trusted_xattrs=hide_trusted_xattrs)
    try:
        fs = read_filesystem(root_fd, fsverity.SHA256, scan, store)
    except ScanError as e:
        where = source.rstrip("/") + "/" + e.path if e.path else source
        where = os.fsencode(where).decode("utf-8", "backslashreplace")
        raise MkcomposefsError(f"error accessing {where}: {e.strerror}", e.errno) from None
    if store is not None:
        store.sync()
    return fs


def from_dump(data: bytes, *, strict: bool = False) -> FileSystem:
    """Parse a dumpfile with the C rules (``strict`` = ``CFS_PARSE_STRICT``); the tree is
    meant for :func:`build_image`."""
    if not data:
        raise MkcomposefsError("No files in dump file")
    try:
        return parse_dumpfile_c(data, strict=strict, alg="sha256", mkcomposefs=True)
    except DumpfileError as e:
        raise MkcomposefsError(_LINE_PREFIX.sub("", str(e))) from None


def build_image(fs: FileSystem, opts: MkcomposefsOptions) -> tuple[bytes, int]:
    """The image C writes for *fs* and the version it chose: ``(bytes, version)``."""
    try:
        version = select_c_version(fs, opts.min_version, opts.max_version)
        validate_filesystem(fs)
        return write_image(fs, version), version
    except ErofsError as e:
        msg = str(e)
        if not msg.startswith("cannot write file"):
            msg = f"cannot write file: {msg}"
        raise MkcomposefsError(msg, errno.EINVAL if msg.endswith("Invalid argument")
                               else None) from None

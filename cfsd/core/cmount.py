"""C ``mount.composefs`` semantics (``lcfs_mount_fd``) with the new mount API.

The image is checked as C checks it (expected fs-verity digest, composefs header), mounted
as a read-only EROFS (``noacl`` unless the image records ACLs, optionally idmapped), and an
overlayfs is stacked on it with ``metacopy=on``, ``redirect_dir=on``, the object
directories as data-only lower layers (``datadir+``), ``verity=require`` when asked, and an
optional upper/work directory.  The result is a detached mount fd that the caller attaches
with move_mount(2).  Every directory and the image are descriptors the caller opened; the
kernel resolves them through ``/proc/self/fd``.  Needs CAP_SYS_ADMIN.

Differences from C: no loop-device fallback for kernels without file-backed EROFS mounts
(before 6.12), and no legacy mount(2) fallback for kernels without ``lowerdir+`` (before
6.7).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cfsd.core import fsverity
from cfsd.core.mount import create_and_mount, fsconfig, fsopen, idmap

__all__ = ["CMountError", "MountOptions", "check_image", "mount", "parse_digest"]

MAX_DIGEST_SIZE = 64
DIGEST_SIZE = 32                    # LCFS_DIGEST_SIZE: C compares this many bytes
COMPOSEFS_MAGIC = 0xD078629A
HEADER = struct.Struct("<IIII16x")  # magic, version, flags, composefs_version
FLAG_HAS_ACL = 1
MOUNT_SOURCE = "composefs"
_HEX = frozenset("0123456789abcdefABCDEF")


class CMountError(Exception):
    """A mount failure: the errno and the reason C prints after the image name."""

    def __init__(self, err: int, reason: str | None = None) -> None:
        super().__init__(reason or os.strerror(err))
        self.errno = err
        self.reason = reason or os.strerror(err)


def _no_verity() -> CMountError:
    return CMountError(errno.ENOTTY, "Image has no fs-verity")        # ENOVERITY


def _wrong_verity() -> CMountError:
    return CMountError(errno.EILSEQ, "Image has wrong fs-verity")     # EWRONGVERITY


@dataclass
class MountOptions:
    """What ``mount.composefs -o`` selects (fds are the caller's, duplicated)."""

    digest: bytes | None = None     # raw; empty means no check (as C with digest=)
    verity: bool = False
    try_verity: bool = False
    read_only: bool = False
    upper_fd: int | None = None
    work_fd: int | None = None
    idmap_fd: int | None = None


def parse_digest(text: str) -> bytes:
    """C ``digest_to_raw``: hex pairs, at most 64 bytes (:class:`CMountError` EINVAL)."""
    if len(text) % 2 or len(text) > 2 * MAX_DIGEST_SIZE or not set(text) <= _HEX:
        raise CMountError(errno.EINVAL)
    return bytes.fromhex(text)


def _measure(fd: int) -> bytes:
    """The kernel's fs-verity digest of the image (C ``lcfs_fd_measure_fsverity``)."""
    buf = bytearray(struct.pack("<HH", 0, MAX_DIGEST_SIZE) + bytes(MAX_DIGEST_SIZE))
    try:
        fcntl.ioctl(fd, fsverity.FS_IOC_MEASURE_VERITY, buf, True)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTTY):
            raise _no_verity() from None
        raise CMountError(e.errno or errno.EIO) from None
    _alg, size = struct.unpack_from("<HH", buf)
    if size != DIGEST_SIZE:
        raise _wrong_verity()
    return bytes(buf[4:4 + DIGEST_SIZE])


def check_image(image_fd: int, digest: bytes | None) -> int:
    """C's checks before mounting: the expected digest (kernel fs-verity only), then the
    composefs header.  Returns the header flags."""
    if digest:
        expected = digest[:DIGEST_SIZE].ljust(DIGEST_SIZE, b"\0")
        if _measure(image_fd) != expected:
            raise _wrong_verity()
    try:
        raw = os.pread(image_fd, HEADER.size, 0)
    except OSError as e:
        raise CMountError(e.errno or errno.EIO) from None
    if len(raw) != HEADER.size:
        raise CMountError(errno.EINVAL)
    magic, _version, flags, _cfs = HEADER.unpack(raw)
    if magic != COMPOSEFS_MAGIC:
        raise CMountError(errno.EINVAL)
    return flags


# --------------------------------------------------------------------------- syscalls


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _erofs(image_fd: int, flags: int, idmap_fd: int | None) -> int:
    fs = -1
    try:
        fs = fsopen("erofs")
        fsconfig(fs, "source", _fd_path(image_fd))
        fsconfig(fs, "ro")
        if not flags & FLAG_HAS_ACL:
            fsconfig(fs, "noacl")
        mnt = create_and_mount(fs, True)
        if idmap_fd is not None:
            try:
                idmap(mnt, idmap_fd)
            except BaseException:
                os.close(mnt)
                raise
        return mnt
    finally:
        if fs >= 0:
            os.close(fs)


def _overlay(lower: int, basedir_fds: Sequence[int], opts: MountOptions) -> int:
    fs = fsopen("overlay")
    try:
        fsconfig(fs, "source", MOUNT_SOURCE)
        fsconfig(fs, "metacopy", "on")
        fsconfig(fs, "redirect_dir", "on")
        require = opts.verity or opts.digest is not None
        if require or opts.try_verity:
            try:
                fsconfig(fs, "verity", "require")
            except OSError:
                if require:
                    raise
        fsconfig(fs, "lowerdir+", _fd_path(lower))
        for fd in basedir_fds:
            fsconfig(fs, "datadir+", _fd_path(fd))
        if opts.upper_fd is not None:
            fsconfig(fs, "upperdir", _fd_path(opts.upper_fd))
        if opts.work_fd is not None:
            fsconfig(fs, "workdir", _fd_path(opts.work_fd))
        return create_and_mount(fs, opts.read_only)
    finally:
        os.close(fs)


def mount(image_fd: int, flags: int, basedir_fds: Sequence[int], opts: MountOptions) -> int:
    """A detached composefs mount of the image *image_fd* whose header flags
    :func:`check_image` returned (:class:`CMountError` as C reports failures)."""
    if not basedir_fds or (opts.upper_fd is None) != (opts.work_fd is None):
        raise CMountError(errno.EINVAL)
    try:
        lower = _erofs(image_fd, flags, opts.idmap_fd)
        try:
            return _overlay(lower, basedir_fds, opts)
        finally:
            os.close(lower)
    except OSError as e:
        raise CMountError(e.errno or errno.EIO) from None

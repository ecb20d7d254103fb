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

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cfsd.core import fsverity

__all__ = ["CMountError", "MountOptions", "check_image", "mount", "parse_digest"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT, SYS_MOUNT_SETATTR = 430, 431, 432, 442
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY = 1
MOUNT_ATTR_IDMAP = 0x00100000
AT_EMPTY_PATH = 0x1000
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


def _sys(nr: int, *args: object) -> int:
    r = _libc.syscall(ctypes.c_long(nr), *args)
    if r < 0:
        raise CMountError(ctypes.get_errno())
    return int(r)


def _fsopen(fstype: str) -> int:
    return _sys(SYS_FSOPEN, fstype.encode(), ctypes.c_uint(FSOPEN_CLOEXEC))


def _set(fd: int, key: str, value: str) -> None:
    _sys(SYS_FSCONFIG, ctypes.c_int(fd), ctypes.c_uint(FSCONFIG_SET_STRING), key.encode(),
         value.encode(), ctypes.c_int(0))


def _flag(fd: int, key: str) -> None:
    _sys(SYS_FSCONFIG, ctypes.c_int(fd), ctypes.c_uint(FSCONFIG_SET_FLAG), key.encode(),
         None, ctypes.c_int(0))


def _create_and_mount(fd: int, read_only: bool) -> int:
    _sys(SYS_FSCONFIG, ctypes.c_int(fd), ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None,
         ctypes.c_int(0))
    return _sys(SYS_FSMOUNT, ctypes.c_int(fd), ctypes.c_uint(FSMOUNT_CLOEXEC),
                ctypes.c_uint(MOUNT_ATTR_RDONLY if read_only else 0))


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _idmap(mnt: int, userns_fd: int) -> None:
    attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
    _sys(SYS_MOUNT_SETATTR, ctypes.c_int(mnt), b"", ctypes.c_uint(AT_EMPTY_PATH),
         ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _erofs(image_fd: int, flags: int, idmap_fd: int | None) -> int:
    fs = -1
    try:
        fs = _fsopen("erofs")
        _set(fs, "source", _fd_path(image_fd))
        _flag(fs, "ro")
        if not flags & FLAG_HAS_ACL:
            _flag(fs, "noacl")
        mnt = _create_and_mount(fs, True)
        if idmap_fd is not None:
            try:
                _idmap(mnt, idmap_fd)
            except BaseException:
                os.close(mnt)
                raise
        return mnt
    finally:
        if fs >= 0:
            os.close(fs)


def _overlay(lower: int, basedir_fds: Sequence[int], opts: MountOptions) -> int:
    fs = _fsopen("overlay")
    try:
        _set(fs, "source", MOUNT_SOURCE)
        _set(fs, "metacopy", "on")
        _set(fs, "redirect_dir", "on")
        require = opts.verity or opts.digest is not None
        if require or opts.try_verity:
            try:
                _set(fs, "verity", "require")
            except CMountError:
                if require:
                    raise
        _set(fs, "lowerdir+", _fd_path(lower))
        for fd in basedir_fds:
            _set(fs, "datadir+", _fd_path(fd))
        if opts.upper_fd is not None:
            _set(fs, "upperdir", _fd_path(opts.upper_fd))
        if opts.work_fd is not None:
            _set(fs, "workdir", _fd_path(opts.work_fd))
        return _create_and_mount(fs, opts.read_only)
    finally:
        os.close(fs)


def mount(image_fd: int, flags: int, basedir_fds: Sequence[int], opts: MountOptions) -> int:
    """A detached composefs mount of the image *image_fd* whose header flags
    :func:`check_image` returned (:class:`CMountError` as C reports failures)."""
    if not basedir_fds or (opts.upper_fd is None) != (opts.work_fd is None):
        raise CMountError(errno.EINVAL)
    lower = _erofs(image_fd, flags, opts.idmap_fd)
    try:
        return _overlay(lower, basedir_fds, opts)
    finally:
        os.close(lower)

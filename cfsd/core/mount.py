"""Composefs mounts with the new mount API: detached mounts handed out as file descriptors.

The EROFS image is mounted file-backed (no loop device), then an overlayfs stacks it over
the repository's ``objects/`` directory as a data-only lower layer (metacopy + redirects),
with ``verity=require`` in secure repositories.  The result is a detached mount fd that the
caller attaches with move_mount(2).  Needs CAP_SYS_ADMIN.
"""

from __future__ import annotations

import ctypes
import errno
import os

from cfsd.core.errors import RepositoryError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT, SYS_MOUNT_SETATTR = 430, 431, 432, 442
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY = 1
MOUNT_ATTR_IDMAP = 0x00100000
AT_EMPTY_PATH = 0x1000


class MountError(RepositoryError):
    """The kernel refused the mount (or the caller lacks the privilege)."""


def syscall(nr: int, *args: object) -> int:
    """A raw system call; OSError with the kernel's errno on failure."""
    r = _libc.syscall(ctypes.c_long(nr), *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(r)


def fsopen(fstype: str) -> int:
    """fsopen(2): a filesystem context fd."""
    return syscall(SYS_FSOPEN, fstype.encode(), ctypes.c_uint(FSOPEN_CLOEXEC))


def fsconfig(fd: int, key: str, value: str | None = None) -> None:
    """fsconfig(2): set a string option (or a flag when *value* is None)."""
    if value is None:
        syscall(SYS_FSCONFIG, ctypes.c_int(fd), ctypes.c_uint(FSCONFIG_SET_FLAG), key.encode(),
                None, ctypes.c_int(0))
    else:
        syscall(SYS_FSCONFIG, ctypes.c_int(fd), ctypes.c_uint(FSCONFIG_SET_STRING),
                key.encode(), value.encode(), ctypes.c_int(0))


def create_and_mount(fd: int, read_only: bool) -> int:
    """Create the superblock of context *fd* and return a detached mount fd of it."""
    syscall(SYS_FSCONFIG, ctypes.c_int(fd), ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None,
            ctypes.c_int(0))
    return syscall(SYS_FSMOUNT, ctypes.c_int(fd), ctypes.c_uint(FSMOUNT_CLOEXEC),
                   ctypes.c_uint(MOUNT_ATTR_RDONLY if read_only else 0))


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def idmap(mnt: int, userns_fd: int) -> None:
    """mount_setattr(2): make the detached mount *mnt* idmapped by the user namespace."""
    attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
    syscall(SYS_MOUNT_SETATTR, ctypes.c_int(mnt), b"", ctypes.c_uint(AT_EMPTY_PATH),
            ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))


def composefs_mount(image_fd: int, objects_fd: int, *, verity: bool = False,
                    upper_fd: int | None = None, work_fd: int | None = None,
                    read_write: bool = False) -> int:
    """A detached composefs mount of the EROFS image open as *image_fd*."""
    ctx = erofs = ov = -1
    try:
        ctx = fsopen("erofs")
        fsconfig(ctx, "source", f"/proc/self/fd/{image_fd}")
        erofs = create_and_mount(ctx, True)
        os.close(ctx)
        ctx = -1
        ov = fsopen("overlay")
        fsconfig(ov, "metacopy", "on")
        fsconfig(ov, "redirect_dir", "follow")
        fsconfig(ov, "lowerdir+", f"/proc/self/fd/{erofs}")
        fsconfig(ov, "datadir+", f"/proc/self/fd/{objects_fd}")
        if verity:
            fsconfig(ov, "verity", "require")
        if upper_fd is not None and work_fd is not None:
            fsconfig(ov, "upperdir", f"/proc/self/fd/{upper_fd}")
            fsconfig(ov, "workdir", f"/proc/self/fd/{work_fd}")
        mnt = create_and_mount(ov, not (read_write and upper_fd is not None))
        return mnt
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            raise MountError("mounting needs CAP_SYS_ADMIN (run as root)") from None
        raise MountError(f"mount failed: {e.strerror}") from None
    finally:
        for fd in (ctx, erofs, ov):
            if fd >= 0:
                os.close(fd)


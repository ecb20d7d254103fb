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
SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 429, 430, 431, 432
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 1, 6
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY = 1
MOVE_MOUNT_F_EMPTY_PATH = 4


class MountError(RepositoryError):
    """The kernel refused the mount (or the caller lacks the privilege)."""


def _sys(nr: int, *args: object) -> int:
    r = _libc.syscall(ctypes.c_long(nr), *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(r)


def _fsopen(fstype: str) -> int:
    return _sys(SYS_FSOPEN, fstype.encode(), ctypes.c_uint(FSOPEN_CLOEXEC))


def _set(fd: int, key: str, value: str) -> None:
    _sys(SYS_FSCONFIG, ctypes.c_int(fd), ctypes.c_uint(FSCONFIG_SET_STRING), key.encode(),
         value.encode(), ctypes.c_int(0))


def _create_and_mount(fd: int, read_only: bool) -> int:
    _sys(SYS_FSCONFIG, ctypes.c_int(fd), ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None,
         ctypes.c_int(0))
    return _sys(SYS_FSMOUNT, ctypes.c_int(fd), ctypes.c_uint(FSMOUNT_CLOEXEC),
                ctypes.c_uint(MOUNT_ATTR_RDONLY if read_only else 0))


def composefs_mount(image_fd: int, objects_fd: int, *, verity: bool = False,
                    upper_fd: int | None = None, work_fd: int | None = None,
                    read_write: bool = False) -> int:
    """A detached composefs mount of the EROFS image open as *image_fd*."""
    ctx = erofs = ov = -1
    try:
        ctx = _fsopen("erofs")
        _set(ctx, "source", f"/proc/self/fd/{image_fd}")
        erofs = _create_and_mount(ctx, True)
        os.close(ctx)
        ctx = -1
        ov = _fsopen("overlay")
        _set(ov, "metacopy", "on")
        _set(ov, "redirect_dir", "follow")
        _set(ov, "lowerdir+", f"/proc/self/fd/{erofs}")
        _set(ov, "datadir+", f"/proc/self/fd/{objects_fd}")
        if verity:
            _set(ov, "verity", "require")
        if upper_fd is not None and work_fd is not None:
            _set(ov, "upperdir", f"/proc/self/fd/{upper_fd}")
            _set(ov, "workdir", f"/proc/self/fd/{work_fd}")
        mnt = _create_and_mount(ov, not (read_write and upper_fd is not None))
        return mnt
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            raise MountError("mounting needs CAP_SYS_ADMIN (run as root)") from None
        raise MountError(f"mount failed: {e.strerror}") from None
    finally:
        for fd in (ctx, erofs, ov):
            if fd >= 0:
                os.close(fd)


def attach(mount_fd: int, target: str) -> None:
    """move_mount(2) a detached mount onto *target*."""
    _sys(SYS_MOVE_MOUNT, ctypes.c_int(mount_fd), b"", ctypes.c_int(-100), target.encode(),
         ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))

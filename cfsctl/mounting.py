"""Attaching a detached mount received from cfsd (move_mount(2))."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_MOVE_MOUNT = 429
MOVE_MOUNT_F_EMPTY_PATH = 4


def attach(mount_fd: int, target: str) -> None:
    """Attach the detached mount *mount_fd* at *target*."""
    r = _libc.syscall(ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(mount_fd), b"",
                      ctypes.c_int(-100), os.fsencode(target),
                      ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"move_mount to {target}: {os.strerror(e)}")

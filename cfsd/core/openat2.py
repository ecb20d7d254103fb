"""``openat2(2)`` beneath a directory fd: one system call that refuses ``..`` escapes and
symlinks in every component (Linux 5.6+; ``available()`` says whether the kernel has it)."""

from __future__ import annotations

import ctypes
import errno
import os

SYS_OPENAT2 = 437                   # the same number on every architecture
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_probed: bool | None = None


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2(dir_fd: int, path: str | bytes, flags: int, resolve: int = STRICT) -> int:
    """Open *path* relative to *dir_fd* with *resolve* restrictions; raises OSError
    (ENOSYS when the kernel has no openat2)."""
    raw = os.fsencode(path)
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(SYS_OPENAT2, dir_fd, ctypes.c_char_p(raw), ctypes.byref(how),
                       ctypes.sizeof(how))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fsdecode(raw))
    return fd


def available() -> bool:
    """Whether openat2 works here (probed once)."""
    global _probed
    if _probed is None:
        try:
            os.close(openat2(-100, ".", os.O_PATH | os.O_CLOEXEC))   # AT_FDCWD
            _probed = True
        except OSError as e:    # ENOSYS, or EPERM from a seccomp filter
            _probed = e.errno not in (errno.ENOSYS, errno.EPERM)
    return _probed

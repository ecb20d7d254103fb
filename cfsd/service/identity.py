"""Per-thread filesystem identities: the kernel checks a caller's permissions on our behalf.

A root daemon works beneath descriptors a caller handed it (a tree to scan, a directory to
check out into, a layout to pull from).  While it does, the worker thread takes the caller's
filesystem identity — fsuid, fsgid *and* supplementary groups — so every open, mkdir and
getxattr is decided by the kernel exactly as if the caller had made it (mode bits, POSIX
ACLs, capabilities dropped with a non-zero fsuid).  Nothing here decides a permission.

Credentials are per thread in Linux; glibc's ``setgroups`` changes every thread of the
process, so groups are set with the raw system call (``setfsuid``/``setfsgid`` are per
thread already).  A switch saves the thread's current credentials and restores exactly those,
so switches nest (read as the caller, write the repository as its owner).

Python must not touch its own files while a thread is switched: the interpreter may be
unreadable to the caller.  :func:`warm_up` imports everything a call can need before the
daemon serves anyone, and processes are only spawned under the daemon's own identity
(:func:`as_daemon`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import os
import pkgutil
import platform
from collections.abc import Iterator
from dataclasses import dataclass

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# (getgroups, setgroups) system call numbers of the 32-bit-gid-safe calls, per architecture.
_GROUP_SYSCALLS = {"x86_64": (115, 116), "aarch64": (158, 159), "riscv64": (158, 159),
                   "ppc64le": (80, 81), "s390x": (205, 206)}
MAX_GROUPS = 65536


class IdentityError(OSError):
    """The thread's identity could not be switched (the work must not go on)."""


@dataclass(frozen=True)
class Identity:
    """A filesystem identity: uid, gid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def _group_calls() -> tuple[int, int]:
    calls = _GROUP_SYSCALLS.get(platform.machine())
    if calls is None:
        raise IdentityError(f"per-thread groups are not supported on {platform.machine()}")
    return calls


def _thread_groups() -> tuple[int, ...]:
    get, _ = _group_calls()
    n = _libc.syscall(get, 0, None)
    if n < 0:
        raise IdentityError(ctypes.get_errno(), "getgroups failed")
    arr = (ctypes.c_uint * max(n, 1))()
    n = _libc.syscall(get, n, arr)
    if n < 0:
        raise IdentityError(ctypes.get_errno(), "getgroups failed")
    return tuple(arr[:n])


def _set_thread(ident: Identity) -> None:
    """Set this thread's groups, fsgid and fsuid (in that order) and check they took."""
    _, set_ = _group_calls()
    groups = ident.groups[:MAX_GROUPS]
    arr = (ctypes.c_uint * max(len(groups), 1))(*groups)
    if _libc.syscall(set_, len(groups), arr) != 0:
        raise IdentityError(ctypes.get_errno(), "setgroups failed")
    _libc.setfsgid(ident.gid)
    _libc.setfsuid(ident.uid)
    if _libc.setfsuid(-1) != ident.uid or _libc.setfsgid(-1) != ident.gid:
        raise IdentityError(f"could not switch this thread to uid {ident.uid}")


def current() -> Identity:
    """This thread's filesystem identity."""
    return Identity(_libc.setfsuid(-1), _libc.setfsgid(-1), _thread_groups())


def switching() -> bool:
    """True when identities are switched (the daemon runs as root)."""
    return os.geteuid() == 0


_DAEMON: Identity | None = None


def daemon() -> Identity:
    """The daemon's own identity (recorded by :func:`warm_up`, before any switch)."""
    global _DAEMON
    if _DAEMON is None:
        _DAEMON = Identity(os.geteuid(), os.getegid(), tuple(os.getgroups()))
    return _DAEMON


@contextlib.contextmanager
def acting_as(ident: Identity) -> Iterator[None]:
    """Run the block with *ident* as this thread's filesystem identity (root daemon only).

    Threads started inside the block inherit the identity (the kernel copies credentials
    at clone).  On exit the thread gets back exactly the credentials it had.
    """
    if not switching():
        yield
        return
    before = current()
    if before == ident:
        yield
        return
    try:
        _set_thread(ident)
    except BaseException:
        _set_thread(before)
        raise
    try:
        yield
    finally:
        _set_thread(before)


def as_daemon() -> contextlib.AbstractContextManager[None]:
    """The daemon's own identity for the block (to spawn processes, read its own files)."""
    return acting_as(daemon())


def warm_up() -> None:
    """Load everything a call may need while the thread is someone else.

    Imports every cfsd module and the standard-library modules they import lazily, fills
    the codec caches (a failed codec lookup is cached for the life of the process) and
    builds the TLS context from the CA bundle on disk.
    """
    daemon()
    import cfsd
    for mod in pkgutil.walk_packages(cfsd.__path__, "cfsd."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
    for name in ("concurrent.futures.thread", "concurrent.futures.process", "encodings.idna",
                 "encodings.punycode", "encodings.ascii", "encodings.latin_1",
                 "encodings.utf_8", "stringprep", "unicodedata", "json.decoder", "tarfile",
                 "shutil", "tempfile", "hmac", "secrets", "base64", "zlib", "email.utils",
                 "http.client", "urllib.parse", "ssl", "selectors", "queue", "uuid"):
        importlib.import_module(name)
    for codec in ("idna", "punycode", "ascii", "latin-1", "utf-8", "utf-16", "utf-32"):
        "composefs.example".encode(codec)
    from cfsd.oci.registry import tls_context
    tls_context()

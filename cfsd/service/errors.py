"""Mapping of library exceptions to the typed varlink errors of our interfaces."""

from __future__ import annotations

import errno

from cfsd.core.dumpfile import DumpfileError
from cfsd.core.erofs import ErofsError
from cfsd.core.errors import (
    AlreadyInitialized,
    CorruptObject,
    DamagedRepository,
    FormatError,
    InvalidName,
    NotFound,
    NotWritable,
    RepoNotFound,
    RepositoryError,
    TooDeep,
    VerityUnsupported,
)
from cfsd.core.fsread import ScanError
from cfsd.core.mkcomposefs import MkcomposefsError
from cfsd.core.mount import MountError
from cfsd.core.sink import OutputStalled
from cfsd.delta.artifact import DeltaNotApplicable
from cfsd.delta.signature import SignatureInvalid
from cfsd.oci.digest import InvalidDigest
from cfsd.oci.layers import DiffIdMismatch
from cfsd.oci.pull import Cancelled
from cfsd.service.auth import CallerPathError, PermissionDenied
from cfsd.service.binding import CallCancelled, VarlinkError

REPOSITORY = "org.composefs.Repository"
OCI = "org.composefs.Oci"


def map_error(iface: str, e: Exception) -> VarlinkError | None:
    """The typed error for *e* in interface *iface*, or None for an internal error."""
    def err(name: str, **params: object) -> VarlinkError:
        return VarlinkError(f"{iface}.{name}", params)

    if isinstance(e, VerityUnsupported):
        return err("InvalidSpec" if iface == REPOSITORY else "InvalidRequest",
                   message=f"{e}: initialize with insecure (cfsctl init --insecure) to "
                           "create a repository without fs-verity")
    if isinstance(e, ScanError | MkcomposefsError):
        # reading a caller's directory tree, or C mkcomposefs semantics
        if e.errno in (errno.EACCES, errno.EPERM):
            return err("PermissionDenied", message=str(e))
        if e.errno is None:
            return err("InvalidData", message=str(e))
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return err("NoSpace", message=str(e))
        if e.errno in (errno.EIO, errno.ENOMEM, errno.EMFILE):
            return err("InternalError", message=str(e))
        return err("InvalidSpec" if iface == REPOSITORY else "InvalidRequest", message=str(e))
    if isinstance(e, CallCancelled | Cancelled | OutputStalled):
        return err("Cancelled", message=str(e))
    if isinstance(e, CorruptObject):
        return err("InvalidData", message=str(e))
    if isinstance(e, CallerPathError):
        # a path the caller named, opened by the caller: the kernel's answer
        if e.errno in (errno.EACCES, errno.EPERM):
            return err("PermissionDenied", message=str(e))
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EINVAL, errno.ENAMETOOLONG,
                       errno.ELOOP, errno.EISDIR, errno.EEXIST, errno.EBADF, errno.ENOTEMPTY):
            return err("InvalidSpec" if iface == REPOSITORY else "InvalidRequest",
                       message=str(e))
        return err("InternalError", message=str(e))
    if isinstance(e, DamagedRepository):
        return err("InvalidData", message=str(e))
    if isinstance(e, DumpfileError | ErofsError):
        return err("InvalidData", message=str(e))
    if isinstance(e, PermissionDenied | PermissionError):
        return err("PermissionDenied", message=str(e))
    if isinstance(e, RepoNotFound):
        return err("RepoNotFound", message=str(e))
    if isinstance(e, DeltaNotApplicable | SignatureInvalid) and iface == OCI:
        return err(type(e).__name__, message=str(e))
    if isinstance(e, InvalidDigest):
        if iface == OCI:
            return err("InvalidDigest", message=str(e))
        return err("InvalidSpec", message=str(e))
    if isinstance(e, DiffIdMismatch):
        if iface == OCI:
            return err("DiffIdMismatch", expected=e.expected, actual=e.actual)
        return err("InvalidData", message=str(e))
    if isinstance(e, InvalidName):
        return err("InvalidSpec" if iface == REPOSITORY else "InvalidRequest", message=str(e))
    if isinstance(e, FormatError):
        return err("InvalidData", message=str(e))
    if isinstance(e, NotFound):
        return err("NoSuchImage", image=str(e)) if iface == OCI else err(
            "NoSuchRef", reference=str(e))
    if isinstance(e, MountError):
        return err("PermissionDenied" if "CAP_SYS_ADMIN" in str(e) else "InternalError",
                   message=str(e))
    if isinstance(e, TimeoutError):
        return err("Busy", message=str(e) or "repository is busy")
    if isinstance(e, AlreadyInitialized | NotWritable | RepositoryError):
        return err("InternalError", message=str(e))
    if isinstance(e, TooDeep):
        return err("TooDeep", message=str(e))
    if isinstance(e, RecursionError):
        return err("TooDeep", message="the tree nests too deeply")
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return err("NoSpace", message=str(e))
        if e.errno == errno.EXDEV:
            return err("CrossDevice", message=str(e))
        if e.errno in (errno.EACCES, errno.EPERM):
            return err("PermissionDenied", message=str(e))
        return err("InternalError", message=f"{e.strerror or e}")
    return None

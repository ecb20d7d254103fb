"""org.composefs.Repository image methods: composefs images from directories and dumpfiles.

Every path a caller names is opened by the caller (a passed fd, or the opener helper with the
caller's identity) and the tree beneath it is scanned with the caller's identity, so the
kernel decides what may be read; ``trusted.*`` xattrs, which an unprivileged caller cannot
see, are left out.
Outputs go to file descriptors the caller passes with the request.  The repository only
changes when everything worked: objects are staged and published together with the images.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
from typing import Any

from cfsd.core import fsverity
from cfsd.core.dumpfile import dump_directory, leaf_line, write_dumpfile
from cfsd.core.erofs import erofs_to_filesystem, validate_filesystem, write_image_to
from cfsd.core.errors import NotFound
from cfsd.core.fsread import RepositoryStore, ScanError, ScanOptions, read_filesystem
from cfsd.core.gc import MAX_IMAGE
from cfsd.core.metadata import read_meta
from cfsd.core.mkcomposefs import (
    DigestStore,
    MkcomposefsError,
    MkcomposefsOptions,
    build_image,
    from_directory,
    from_dump,
)
from cfsd.core.repository import validate_ref_name
from cfsd.core.sink import write_all
from cfsd.core.tree import (
    Directory,
    External,
    ExternalNoVerity,
    FileSystem,
    Leaf,
    TreeError,
    XattrFiltering,
    transform_for_oci,
)
from cfsd.service import auth
from cfsd.service.binding import Call, PeerCreds, VarlinkError
from cfsd.service.errors import REPOSITORY
from cfsd.service.state import Handle

_XATTR_MODES = {m.value for m in XattrFiltering}
MAX_DUMP = 256 << 20        # a dumpfile read by Mkcomposefs is held in memory...
_DUMP_SLOTS = threading.BoundedSemaphore(1)   # ...one at a time, whoever sends them
_libc = ctypes.CDLL(None)


def _spec(message: str) -> VarlinkError:
    return VarlinkError(f"{REPOSITORY}.InvalidSpec", {"message": message})


def hide_trusted(creds: PeerCreds) -> bool:
    """``trusted.*`` xattrs are visible to privileged callers only."""
    return creds.uid != 0


def _fs_options(options: dict[str, Any] | None) -> tuple[bool, str]:
    """(apply the OCI transform, xattr mode) from FsOptions; refuses bootable."""
    options = options or {}
    if options.get("bootable"):
        raise _spec("--bootable is not supported: cfsd does not implement boot transforms "
                    "(SELinux relabeling, empty /boot and /sysroot)")
    mode = options.get("xattrs") or XattrFiltering.ALLOWLIST_ONLY.value
    if mode not in _XATTR_MODES:
        raise _spec(f"invalid xattrs mode {mode!r} (expected allowlist-only or "
                    "keep-user-xattrs)")
    return not options.get("no_propagate_usr_to_root"), mode


def _version(v: int | None, default: int) -> int:
    if v is None:
        return default
    if v not in (0, 1, 2):
        raise _spec(f"invalid EROFS version {v} (expected 0, 1 or 2)")
    return v


def open_source(call: Call, path: str, fd: int | None) -> int:
    """The directory the caller named (or passed), opened by the caller (ScanError)."""
    try:
        return auth.CallerFiles(call).directory(path, fd, what="path")
    except auth.PermissionDenied:
        raise ScanError(errno.EACCES, path) from None
    except OSError as e:
        raise ScanError(e.errno or errno.EIO, path) from None


def _read_dump(call: Call, fd: int, strict: bool) -> FileSystem:
    """Parse the dumpfile read from *fd*: one dumpfile in memory at a time, bounded, and
    given back to the system afterwards."""
    while not _DUMP_SLOTS.acquire(timeout=0.5):
        call.check_cancelled()
    try:
        return from_dump(_read_bounded(call, fd), strict=strict)
    finally:
        _DUMP_SLOTS.release()
        _libc.malloc_trim(0)


def _read_bounded(call: Call, fd: int) -> bytes:
    """All of *fd*, at most MAX_DUMP bytes (the call can be cancelled while it reads)."""
    chunks = []
    total = 0
    while True:
        call.check_cancelled()
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > MAX_DUMP:
            chunks.clear()          # the exception's traceback must not keep them alive
            raise MkcomposefsError(f"dump file larger than {MAX_DUMP >> 20} MiB")
        chunks.append(chunk)


def _has_usr(fd: int) -> bool:
    try:
        return stat.S_ISDIR(os.stat("usr", dir_fd=fd, follow_symlinks=False).st_mode)
    except OSError:
        return False



class ImageMethods:
    """Mixin of RepositoryAPI implementing the image-building methods."""

    state: Any

    # ---------------------------------------------------------------- helpers

    def _open_tree(self, call: Call, path: str, options: dict | None,
                   path_fd: int | None) -> int:
        """The root of the tree, opened as the caller (checked for /usr if transformed)."""
        transform, _ = _fs_options(options)
        fd = open_source(call, path, path_fd)
        if transform and not _has_usr(fd):
            os.close(fd)
            raise _spec(f"{path}: /usr must exist and be a directory for the OCI transform "
                        "(use --no-propagate-usr-to-root for other trees)")
        return fd

    def _scan(self, call: Call, path: str, alg: fsverity.Algorithm, options: dict | None,
              fd: int, store: RepositoryStore | None = None) -> FileSystem:
        """Read the tree opened as *fd* (closed here) with the caller's identity."""
        transform, mode = _fs_options(options)
        try:
            with auth.as_caller(call.creds):
                fs = read_filesystem(fd, alg,
                                     ScanOptions(hide_trusted_xattrs=hide_trusted(call.creds)),
                                     store)
        except ScanError as e:
            raise ScanError(e.errno, f"{path.rstrip('/')}/{e.path}" if e.path else path,
                            e.strerror) from None
        finally:
            os.close(fd)
        if transform:
            try:
                transform_for_oci(fs, mode)
            except TreeError as e:
                raise _spec(f"{path}: cannot apply the OCI transform: {e}") from None
        return fs

    def _algorithm(self, call: Call, repository: str | None, algorithm: str | None,
                   repository_fd: int | None) -> fsverity.Algorithm:
        if algorithm is not None:
            try:
                return fsverity.algorithm(algorithm)
            except ValueError as e:
                raise _spec(str(e)) from None
        if repository is not None or repository_fd is not None:
            # the repository the caller named decides; one it cannot open is an error, not
            # a silent guess (only a repository without meta.json has the default)
            fd = auth.CallerFiles(call).directory(repository, repository_fd,
                                                  what="repository")
            try:
                meta, _ = read_meta(fd)
            finally:
                os.close(fd)
            if meta is not None:
                return meta.algorithm
        return fsverity.SHA512

    # ---------------------------------------------------------------- methods

    def CreateImage(self, call: Call, handle: int, path: str,  # noqa: N802
                    name: str | None = None, erofs_version: int | None = None,
                    options: dict[str, Any] | None = None,
                    path_fd: int | None = None) -> dict[str, Any]:
        """Scan a directory, store its objects and commit its EROFS image(s)."""
        _fs_options(options)
        if name is not None:
            validate_ref_name(name)
        h: Handle
        with self.state.use(call, handle, REPOSITORY) as h:
            if not h.writable:
                raise auth.PermissionDenied("permission denied: only root or the owner of the "
                                            "repository may create images")
            repo = h.repo
            repo.ensure_writable()
            versions = ([_version(erofs_version, 1)] if erofs_version is not None
                        else repo.meta.format_versions())
            owner = lambda: auth.as_owner(repo.fd, call.creds)  # noqa: E731
            fd = self._open_tree(call, path, options, path_fd)
            with repo.lock.shared():
                try:
                    with owner():
                        staging = repo.staging()
                except BaseException:
                    os.close(fd)
                    raise
                try:
                    store = RepositoryStore(repo, staging, owner)
                    fs = self._scan(call, path, repo.alg, options, fd, store)
                    validate_filesystem(fs)
                    with owner():
                        staging.commit()
                        ids = [(v, repo.stream_image(
                                    lambda sink, v=v: write_image_to(fs, v, sink),
                                    name if i == 0 else None))
                               for i, v in enumerate(versions)]
                finally:
                    with owner():
                        staging.abort()
            return {"image_id": ids[0][1].hex(), "algorithm": repo.alg.name,
                    "images": [{"version": v, "image_id": d.hex()} for v, d in ids]}

    def ComputeId(self, call: Call, path: str, repository: str | None = None,  # noqa: N802
                  algorithm: str | None = None, erofs_version: int | None = None,
                  options: dict[str, Any] | None = None, path_fd: int | None = None,
                  repository_fd: int | None = None) -> dict[str, Any]:
        """The image id of a directory, storing nothing."""
        _fs_options(options)
        version = _version(erofs_version, 1)
        alg = self._algorithm(call, repository, algorithm, repository_fd)
        fs = self._scan(call, path, alg, options, self._open_tree(call, path, options, path_fd))
        validate_filesystem(fs)
        hasher = fsverity.FsVerityHasher(alg)
        write_image_to(fs, version, hasher.update)
        return {"image_id": hasher.digest().hex(), "algorithm": alg.name}

    def CreateDumpfile(self, call: Call, path: str, repository: str | None = None,  # noqa: N802
                       algorithm: str | None = None,
                       options: dict[str, Any] | None = None, path_fd: int | None = None,
                       repository_fd: int | None = None,
                       output_fd: int | None = None) -> dict[str, Any]:
        """The dumpfile of a directory, written to the output fd passed with the request."""
        if output_fd is None and len(call.fds) != 1:
            raise _spec(f"CreateDumpfile expects 1 fd (the output), got {len(call.fds)}")
        _fs_options(options)
        alg = self._algorithm(call, repository, algorithm, repository_fd)
        data = write_dumpfile(self._scan(call, path, alg, options,
                                         self._open_tree(call, path, options, path_fd)))
        out = auth.CallerFiles(call).passed(0 if output_fd is None else output_fd, "output_fd")
        try:
            write_all(out, data)
        finally:
            os.close(out)
        return {"size": len(data)}

    def DumpFiles(self, call: Call, handle: int, image: str, files: list[str],  # noqa: N802
                  backing_path_only: bool | None = None) -> dict[str, Any]:
        """Dumpfile lines (or backing paths) of some files of a stored image."""
        with self.state.use(call, handle, REPOSITORY) as h:
            repo = h.repo
            with repo.lock.shared():
                try:
                    digest = repo.resolve_image(image)
                except NotFound:
                    raise VarlinkError(f"{REPOSITORY}.NoSuchRef", {"reference": image}) from None
                data = repo.read_object(digest, limit=MAX_IMAGE)
            fs = erofs_to_filesystem(data, repo.alg)
        return {"lines": dump_files(fs, files, bool(backing_path_only))}

    def Mkcomposefs(self, call: Call, source: str | None = None,  # noqa: N802
                    input_fd: int | None = None, output_fd: int | None = None,
                    strict: bool | None = None, min_version: int | None = None,
                    max_version: int | None = None, digest_store: str | None = None,
                    use_epoch: bool | None = None, skip_devices: bool | None = None,
                    skip_xattrs: bool | None = None, user_xattrs: bool | None = None,
                    hardlinks: bool | None = None, threads: int | None = None,
                    source_fd: int | None = None, digest_store_fd: int | None = None,
                    ) -> dict[str, Any]:
        """C mkcomposefs: a directory or dumpfile to an image (written to output_fd)."""
        def fd_at(index: int | None, what: str) -> int | None:
            if index is None:
                return None
            if not 0 <= index < len(call.fds):
                raise _spec(f"{what} {index} is not one of the {len(call.fds)} fds passed")
            return call.fds[index]

        inp = fd_at(input_fd, "input_fd")
        out = fd_at(output_fd, "output_fd")
        if (inp is None) == (source is None and source_fd is None):
            raise _spec("exactly one of source and input_fd must be given")
        if threads is not None and threads <= 0:
            raise _spec(f"Invalid threads count {threads}")
        opts = MkcomposefsOptions(min_version, max_version, bool(use_epoch),
                                  bool(skip_devices), bool(skip_xattrs), bool(user_xattrs),
                                  bool(hardlinks))
        if inp is not None:
            fs = _read_dump(call, inp, bool(strict))
        else:
            fs = self._mkcomposefs_dir(call, source or f"fd:{source_fd}", source_fd,
                                       digest_store, digest_store_fd, opts)
        image, version = build_image(fs, opts)
        if out is not None:
            write_all(out, image)
        return {"digest": fsverity.digest(image, fsverity.SHA256).hex(), "size": len(image),
                "version": version}

    def _mkcomposefs_dir(self, call: Call, source: str, source_fd: int | None,
                         digest_store: str | None, digest_store_fd: int | None,
                         opts: MkcomposefsOptions) -> FileSystem:
        files = auth.CallerFiles(call)
        try:
            fd = open_source(call, source, source_fd)
        except ScanError as e:
            raise MkcomposefsError(str(e), e.errno) from None
        sfd = None
        try:
            if digest_store is not None or digest_store_fd is not None:
                where = digest_store or f"fd:{digest_store_fd}"
                try:
                    sfd = files.directory(digest_store, digest_store_fd, what="digest_store",
                                          create=True)
                except auth.PermissionDenied:
                    raise MkcomposefsError(f"cannot fill store: {where}: Permission "
                                           "denied", errno.EACCES) from None
                except OSError as e:
                    raise MkcomposefsError(f"cannot fill store: {where}: "
                                           f"{e.strerror}", e.errno) from None
            store = (DigestStore(sfd, lambda: auth.as_caller(call.creds))
                     if sfd is not None else None)
            with auth.as_caller(call.creds):
                return from_directory(fd, opts, source=source, store=store,
                                      hide_trusted_xattrs=hide_trusted(call.creds))
        finally:
            os.close(fd)
            if sfd is not None:
                os.close(sfd)


# --------------------------------------------------------------------------- dump-files


def dump_files(fs: FileSystem, files: list[str], backing_path_only: bool) -> list[str]:
    """composefs-rs ``dump_files``: dumpfile lines or backing paths for some paths."""
    nlinks = fs.nlinks()
    out: list[str] = []
    for path in files:
        bpath = os.fsencode(path)
        try:
            parent, name = fs.root.split(bpath)
        except TreeError as e:
            raise _spec(f"{path}: {e}") from None
        node = parent.lookup(name)
        if node is None:
            raise VarlinkError(f"{REPOSITORY}.InvalidSpec", {"message": f"{path} not found"})
        if type(node) is Directory:
            if backing_path_only:
                raise _spec(f"{path} is a directory")
            out.extend(dump_directory(bpath, node, nlinks).decode().splitlines())
            continue
        leaf: Leaf = node  # type: ignore[assignment]
        if backing_path_only:
            c = leaf.content
            if type(c) is External or type(c) is ExternalNoVerity:
                out.append(f"{path} {fsverity.object_path(c.id)}")
            else:
                out.append(f"{path} inline")
            continue
        out.append(leaf_line(bpath, leaf.stat, leaf.content, nlinks[leaf]).decode().rstrip("\n"))
    return out

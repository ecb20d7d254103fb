"""org.composefs.Repository methods of the C tools ``composefs-info`` and ``mount.composefs``.

Images, files and directories are descriptors the caller opened and passed (or paths the
opener helper opens with the caller's identity).  Images are read through their fds, one in
memory at a time; objects are looked up beneath the caller's basedir with the caller's
identity.  Every failure is a typed error whose message is what C prints after the
program name, so the client prints C's line.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from cfsd.core import cmount
from cfsd.core.erofs import cinfo
from cfsd.core.sink import Sink
from cfsd.service import auth
from cfsd.service.binding import Call, VarlinkError
from cfsd.service.errors import REPOSITORY

_IMAGE_SLOTS = threading.BoundedSemaphore(1)    # one image read into memory at a time
_libc = ctypes.CDLL(None)


def _error(kind: str, message: str) -> VarlinkError:
    return VarlinkError(f"{REPOSITORY}.{kind}", {"message": message})


def _open_error(e: OSError, message: str) -> VarlinkError:
    """PermissionDenied or InvalidSpec for a path the caller named that cannot be opened."""
    denied = isinstance(e, auth.PermissionDenied) or e.errno in (errno.EACCES, errno.EPERM)
    reason = os.strerror(errno.EACCES) if isinstance(e, auth.PermissionDenied) \
        else (e.strerror or os.strerror(e.errno or errno.EIO))
    return _error("PermissionDenied" if denied else "InvalidSpec", f"{message}: {reason}")


def _fd_list(call: Call, indexes: list[int] | None, count: int, what: str) -> list[int] | None:
    """The received fds *indexes* name (None without indexes); InvalidSpec when they do not
    match *count* names or were not passed."""
    if indexes is None:
        return None
    if len(indexes) != count:
        raise _error("InvalidSpec", f"{what} has {len(indexes)} fds for {count} names")
    files = auth.CallerFiles(call)
    out: list[int] = []
    try:
        for i in indexes:
            out.append(files.passed(i, what))
    except OSError as e:
        for fd in out:
            os.close(fd)
        raise _error("InvalidSpec", str(e)) from None
    return out


@contextlib.contextmanager
def _image_slot(call: Call) -> Iterator[None]:
    """Hold the one image slot (waiting cancellably); memory goes back to the system after."""
    while not _IMAGE_SLOTS.acquire(timeout=0.5):
        call.check_cancelled()
    try:
        yield
    finally:
        _IMAGE_SLOTS.release()
        _libc.malloc_trim(0)


def _filters(filters: list[str] | None) -> list[bytes] | None:
    if filters is None:
        return None
    out = []
    for f in filters:
        if "/" in f or "\0" in f:
            raise _error("InvalidSpec", f"Filter must be a single name: {f}")
        out.append(os.fsencode(f))
    return out


class InfoMethods:
    """Mixin of RepositoryAPI: ComposefsInfo, MeasureFile and MountComposefs."""

    # ---------------------------------------------------------------- composefs-info

    def ComposefsInfo(self, call: Call, command: str, images: list[str],  # noqa: N802
                      filters: list[str] | None = None, basedir: str | None = None,
                      output_fd: int | None = None, images_fd: list[int] | None = None,
                      basedir_fd: int | None = None) -> dict[str, Any]:
        """C ``composefs-info ls|objects|missing-objects|dump`` written to output_fd."""
        if command not in cinfo.COMMANDS:
            raise _error("InvalidSpec", f"Unknown command '{command}'")
        wanted = _filters(filters)
        if not images:
            raise _error("InvalidSpec", "No image path specified")
        if output_fd is None:
            raise _error("InvalidSpec", "ComposefsInfo needs output_fd")
        files = auth.CallerFiles(call)
        try:
            out = files.passed(output_fd, "output_fd")
        except OSError as e:
            raise _error("InvalidSpec", str(e)) from None
        fds = base = None
        try:
            fds = _fd_list(call, images_fd, len(images), "images_fd")
            if basedir_fd is not None:
                try:
                    base = files.passed(basedir_fd, "basedir_fd")
                except OSError as e:
                    raise _error("InvalidSpec", str(e)) from None
            elif basedir is not None:
                try:
                    base = files.directory(basedir, what="basedir")
                except OSError as e:
                    raise _open_error(e, f"Can't open basedir `{basedir}`") from None
            with Sink(out, call.check_cancelled) as sink:
                try:
                    names = self._info_images(call, command, images, fds, wanted, sink.write)
                    if names is not None:
                        if command == "missing-objects":
                            names = self._missing(call, names, base)
                        sink.write(cinfo.sorted_objects(names))
                except BrokenPipeError:
                    raise _error("Cancelled", "the output was closed") from None
        finally:
            for fd in [out, base, *(fds or [])]:
                if fd is not None:
                    os.close(fd)
        return {"images": len(images)}

    def _info_images(self, call: Call, command: str, images: list[str],
                     fds: list[int] | None, wanted: list[bytes] | None,
                     write: Callable[[bytes], None]) -> set[bytes] | None:
        """Run *command* on each image in turn: ls and dump output is written as each image
        is done (outside the image slot); objects are collected and returned."""
        names: set[bytes] | None = None if command in ("ls", "dump") else set()
        for i, label in enumerate(images):
            with _image_slot(call):
                data = self._load(call, label, fds[i] if fds is not None else None)
                try:
                    if names is not None:
                        names |= cinfo.objects(data, wanted)
                        text = b""
                    else:
                        text = (cinfo.ls if command == "ls" else cinfo.dump)(data, wanted)
                except cinfo.InfoError as e:
                    raise _error("InvalidData", f"Failed to load '{label}': "
                                                f"{os.strerror(e.errno)}") from None
                finally:
                    del data
            if text:
                write(text)
        return names

    def _load(self, call: Call, label: str, fd: int | None) -> bytes:
        """The bytes of one image: its passed fd, or its path opened as the caller."""
        if fd is None:
            try:
                fd = auth.CallerFiles(call).file(label, what="image")
            except OSError as e:
                raise _open_error(e, f"Failed to open '{label}'") from None
            own = True
        else:
            own = False
        try:
            return cinfo.read_image(fd, call.check_cancelled)
        except cinfo.InfoError as e:
            raise _error("InvalidData", f"Failed to load '{label}': "
                                        f"{os.strerror(e.errno)}") from None
        except OSError as e:
            raise _error("InvalidData", f"Failed to load '{label}': "
                                        f"{os.strerror(e.errno or errno.EIO)}") from None
        finally:
            if own:
                os.close(fd)

    def _missing(self, call: Call, names: set[bytes], base: int | None) -> set[bytes]:
        """The objects not found beneath *base*, looked up as the caller (all without)."""
        if base is None:
            return names
        with auth.as_caller(call.creds):
            return cinfo.missing(names, base)

    # ---------------------------------------------------------------- measure-file

    def MeasureFile(self, call: Call, path: str,  # noqa: N802
                    path_fd: int | None = None) -> dict[str, Any]:
        """C ``composefs-info measure-file`` of one file: its fs-verity sha256 digest."""
        files = auth.CallerFiles(call)
        try:
            fd = files.passed(path_fd, "path_fd") if path_fd is not None \
                else files.file(path, what="path")
        except OSError as e:
            raise _open_error(e, f"Failed to open '{path}'") from None
        try:
            digest = cinfo.measure(fd, call.check_cancelled)
        except cinfo.InfoError as e:
            raise _error("InvalidData", f"failed to measure '{path}': "
                                        f"{os.strerror(e.errno)}") from None
        finally:
            os.close(fd)
        return {"digest": digest.hex()}

    # ---------------------------------------------------------------- mount.composefs

    def MountComposefs(self, call: Call, image: str, basedirs: list[str],  # noqa: N802
                       digest: str | None = None, verity: bool | None = None,
                       try_verity: bool | None = None, read_only: bool | None = None,
                       upperdir: str | None = None, workdir: str | None = None,
                       image_fd: int | None = None, basedirs_fd: list[int] | None = None,
                       upperdir_fd: int | None = None, workdir_fd: int | None = None,
                       idmap_fd: int | None = None) -> dict[str, Any]:
        """C ``mount.composefs``: a detached composefs mount (fd out)."""
        if not basedirs:
            raise _error("InvalidSpec", "No object dirs specified")
        if (upperdir is None and upperdir_fd is None) != (workdir is None and workdir_fd is None):
            raise _error("InvalidSpec", "Both workdir and upperdir must be specified if used")
        fail = f"Failed to mount composefs {image}"
        opts = cmount.MountOptions(verity=bool(verity), try_verity=bool(try_verity),
                                   read_only=bool(read_only))
        if digest is not None:
            try:
                opts.digest = cmount.parse_digest(digest)
            except cmount.CMountError as e:
                raise _error("InvalidSpec", f"{fail}: {e.reason}") from None
        files = auth.CallerFiles(call)
        own: list[int] = []
        try:
            try:
                img = files.passed(image_fd, "image_fd") if image_fd is not None \
                    else files.file(image, what="image")
            except OSError as e:
                raise _open_error(e, f"Failed to open {image}") from None
            own.append(img)
            dirs = self._mount_dirs(call, fail, basedirs, basedirs_fd, own)
            for name, fd, what in ((upperdir, upperdir_fd, "upperdir_fd"),
                                   (workdir, workdir_fd, "workdir_fd")):
                if name is None and fd is None:
                    continue
                try:
                    d = files.directory(name, fd, what=what)
                except OSError as e:
                    raise _open_error(e, fail) from None
                own.append(d)
                if what == "upperdir_fd":
                    opts.upper_fd = d
                else:
                    opts.work_fd = d
            if idmap_fd is not None:
                try:
                    opts.idmap_fd = files.passed(idmap_fd, "idmap_fd")
                except OSError as e:
                    raise _error("InvalidSpec", str(e)) from None
                own.append(opts.idmap_fd)
            try:
                flags = cmount.check_image(img, opts.digest)
            except cmount.CMountError as e:
                raise _error("InvalidData", f"{fail}: {e.reason}") from None
            if call.creds.uid != 0:
                raise auth.PermissionDenied(f"{fail}: {os.strerror(errno.EPERM)}")
            try:
                mnt = cmount.mount(img, flags, dirs, opts)
            except cmount.CMountError as e:
                kind = "PermissionDenied" if e.errno in (errno.EPERM, errno.EACCES) \
                    else "InvalidSpec"
                raise _error(kind, f"{fail}: {e.reason}") from None
        finally:
            for fd in own:
                os.close(fd)
        call.reply_fds.append(mnt)
        return {"fd_index": 0}

    def _mount_dirs(self, call: Call, fail: str, basedirs: list[str],
                    indexes: list[int] | None, own: list[int]) -> list[int]:
        """The basedir fds (passed, or opened as the caller), also recorded in *own*."""
        passed = _fd_list(call, indexes, len(basedirs), "basedirs_fd")
        if passed is not None:
            own.extend(passed)
            return passed
        files = auth.CallerFiles(call)
        out = []
        for path in basedirs:
            try:
                out.append(files.directory(path, what="basedir"))
            except OSError as e:
                raise _open_error(e, fail) from None
            own.append(out[-1])
        return out

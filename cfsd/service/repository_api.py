"""org.composefs.Repository: repository lifecycle, integrity, GC and raw stream access."""

from __future__ import annotations

import errno
import os
from typing import Any

from cfsd.core import fsverity
from cfsd.core.errors import NotFound, RepositoryError
from cfsd.core.fsck import fsck
from cfsd.core.gc import gc, image_objects
from cfsd.core.metadata import exists, read_meta
from cfsd.core.metadata import reset_metadata as drop_metadata
from cfsd.core.repository import Repository
from cfsd.core.sink import Sink
from cfsd.service import auth
from cfsd.service.binding import Call, VarlinkError
from cfsd.service.errors import REPOSITORY
from cfsd.service.image_api import ImageMethods
from cfsd.service.info_api import InfoMethods
from cfsd.service.oci_image_api import mount_fds
from cfsd.service.state import SYSTEM_REPO, Handle, State, user_repo_path


def _spec_error(message: str) -> VarlinkError:
    return VarlinkError(f"{REPOSITORY}.InvalidSpec", {"message": message})


def parse_algorithm(text: str | None) -> fsverity.Algorithm:
    """``fsverity-<hash>-12`` (default sha512) or InvalidSpec."""
    try:
        return fsverity.parse_repo_algorithm(text or "fsverity-sha512-12")
    except ValueError as e:
        raise _spec_error(f"invalid algorithm: {e}") from None


def require_writer(call: Call, h: Handle, what: str) -> None:
    """PermissionDenied unless the caller may write the repository behind *h*."""
    if not h.writable:
        raise auth.PermissionDenied(
            f"permission denied: only root or the owner of the repository may {what}")
    h.repo.ensure_writable()


class RepositoryAPI(ImageMethods, InfoMethods):
    """Implementation of org.composefs.Repository."""

    def __init__(self, state: State) -> None:
        self.state = state

    def InitRepository(self, call: Call, path: str, algorithm: str | None = None,  # noqa: N802
                       insecure: bool | None = None, erofs_version: int | None = None,
                       reset_metadata: bool | None = None,
                       path_fd: int | None = None) -> dict[str, Any]:
        """Create (or verify) a repository."""
        alg = parse_algorithm(algorithm)
        version = 1 if erofs_version is None else erofs_version
        if version not in (0, 1, 2):
            raise _spec_error(f"invalid EROFS version {version} (expected 0, 1 or 2)")
        fd = auth.CallerFiles(call).directory(path, path_fd, what="path", create=True,
                                              mode=0o700)
        try:
            auth.check_writer(fd, call.creds, "initialize it")
            insecure = bool(insecure) or self.state.defaults.insecure
            with auth.as_owner(fd, call.creds):
                if reset_metadata:
                    drop_metadata(fd)
                repo, created = Repository.init_at(fd, path, alg=alg, insecure=insecure,
                                                   erofs_version=version,
                                                   require_verity=not insecure)
            try:
                return {"created": created, "verity": repo.secure,
                        "algorithm": repo.alg.repo_string}
            finally:
                repo.close()
        finally:
            os.close(fd)

    def EnsureRepository(self, call: Call, path: str, algorithm: str | None = None,  # noqa: N802
                         insecure: bool | None = None,
                         path_fd: int | None = None) -> dict[str, Any]:
        """Open as is, create when absent, or upgrade a legacy repository."""
        alg = parse_algorithm(algorithm)
        fd = auth.CallerFiles(call).directory(path, path_fd, what="path", create=True,
                                              mode=0o700)
        try:
            meta, _ = read_meta(fd)
            if meta is not None:
                if algorithm is not None and meta.algorithm != alg:
                    raise RepositoryError(
                        f"repository is configured for {meta.algorithm.name} (from meta.json) "
                        f"but {alg.name} was requested")
                return {"status": "Opened"}
            auth.check_writer(fd, call.creds, "initialize it")
            with auth.as_owner(fd, call.creds):
                if exists(fd, "objects"):
                    Repository.open_at(fd, path, upgrade=True).close()
                    return {"status": "Upgraded"}
                insecure = bool(insecure) or self.state.defaults.insecure
                repo, _ = Repository.init_at(fd, path, alg=alg, insecure=insecure,
                                             require_verity=not insecure)
                repo.close()
            return {"status": "Created"}
        finally:
            os.close(fd)

    def OpenRepository(self, call: Call, path: str | None = None,  # noqa: N802
                       user: bool | None = None, system: bool | None = None,
                       insecure: bool | None = None, require_verity: bool | None = None,
                       no_upgrade: bool | None = None,
                       path_fd: int | None = None) -> dict[str, Any]:
        """Open a repository and return a handle."""
        selectors = [path is not None or path_fd is not None, bool(user), bool(system)]
        if sum(selectors) != 1:
            raise _spec_error("exactly one of 'path', 'user', 'system' must be set")
        if user:
            target = user_repo_path(call.creds)
        elif system:
            target = SYSTEM_REPO
        else:
            target = path if path is not None else f"fd:{path_fd}"
        try:
            fd = auth.CallerFiles(call).directory(target, path_fd, what="path")
        except auth.CallerPathError as e:
            if e.errno in (errno.EACCES, errno.EPERM):
                raise auth.PermissionDenied(f"permission denied: {target}") from None
            if e.errno == errno.ENOENT:
                raise VarlinkError(f"{REPOSITORY}.RepoNotFound",
                                   {"message": f"repository {target} does not exist"}) from None
            raise VarlinkError(f"{REPOSITORY}.RepoNotFound",
                               {"message": f"{target}: {e.strerror}"}) from None
        try:
            h = self.state.open(call, fd, target, insecure=bool(insecure),
                                require_verity=bool(require_verity),
                                no_upgrade=bool(no_upgrade))
        except (RepositoryError, OSError) as e:
            msg = str(e) if isinstance(e, RepositoryError) else f"{target}: {e.strerror}"
            raise VarlinkError(f"{REPOSITORY}.RepoNotFound", {"message": msg}) from None
        finally:
            os.close(fd)
        return {"handle": h.id, "hash_algorithm": h.repo.alg.name,
                "objects_device_id": os.fstat(h.repo.fd).st_dev}

    def CloseRepository(self, call: Call, handle: int) -> dict[str, Any]:  # noqa: N802
        """Release a handle."""
        self.state.get(call, handle, REPOSITORY)
        self.state.close(handle)
        return {}

    def Fsck(self, call: Call, handle: int,  # noqa: N802
             metadata_only: bool | None = None) -> dict[str, Any]:
        """Check the repository."""
        with self.state.use(call, handle, REPOSITORY) as h:
            return fsck(h.repo, metadata_only=bool(metadata_only)).to_dict()

    def Gc(self, call: Call, handle: int, dry_run: bool,  # noqa: N802
           roots: list[str]) -> dict[str, Any]:
        """Garbage-collect (or report with dry_run)."""
        with self.state.use(call, handle, REPOSITORY) as h:
            if not dry_run:
                require_writer(call, h, "collect garbage")
            with auth.as_owner(h.repo.fd, call.creds):
                result = gc(h.repo, roots, dry_run=dry_run)
            return {"result": result.to_dict(), "dry_run": dry_run}

    def ImageObjects(self, call: Call, handle: int, name: str) -> dict[str, Any]:  # noqa: N802
        """Objects referenced by an image, as sorted ``<alg>:<hex>`` ids."""
        with self.state.use(call, handle, REPOSITORY) as h:
            repo = h.repo
            with repo.lock.shared():
                try:
                    digest = repo.resolve_image(name)
                except NotFound:
                    raise VarlinkError(f"{REPOSITORY}.NoSuchRef", {"reference": name}) from None
                ids = sorted(f"{repo.alg.name}:{d.hex()}" for d in image_objects(repo, digest))
            return {"object_ids": ids}

    def ListImageRefs(self, call: Call, handle: int) -> dict[str, Any]:  # noqa: N802
        """Named image refs with the image id they point at."""
        with self.state.use(call, handle, REPOSITORY) as h:
            refs = h.repo.list_refs("images")
            return {"images": [{"name": n, "digest": t.rsplit("/", 1)[-1]} for n, t in refs]}

    def Mount(self, call: Call, handle: int, name: str,  # noqa: N802
              options: dict[str, Any]) -> dict[str, Any]:
        """A detached composefs mount of a stored image (fd out)."""
        if call.creds.uid != 0:
            raise auth.PermissionDenied("mounting needs root")
        with self.state.use(call, handle, REPOSITORY) as h:
            try:
                image_id = h.repo.resolve_image(name)
            except NotFound:
                raise VarlinkError(f"{REPOSITORY}.NoSuchRef", {"reference": name}) from None
            call.reply_fds.append(mount_fds(h.repo, image_id, options, call.fds,
                                            f"{REPOSITORY}.InvalidSpec"))
            return {"fd_index": 0}

    def Cat(self, call: Call, handle: int, name: str) -> dict[str, Any]:  # noqa: N802
        """Reassemble a splitstream into the fd passed with the request."""
        with self.state.use(call, handle, REPOSITORY) as h:
            if len(call.fds) != 1:
                raise _spec_error(f"Cat expects 1 fd (the output), got {len(call.fds)}")
            out = call.fds[0]
            repo = h.repo
            with repo.lock.shared():
                try:
                    reader = repo.open_stream(name)
                except NotFound:
                    raise VarlinkError(f"{REPOSITORY}.NoSuchRef", {"reference": name}) from None
                with reader, Sink(out, call.check_cancelled) as sink:
                    size = reader.cat(repo, sink.write)
            return {"size": size}

    def Describe(self, call: Call, handle: int) -> dict[str, Any]:  # noqa: N802
        """Where the handle points and what it allows."""
        with self.state.use(call, handle, REPOSITORY) as h:
            repo = h.repo
            return {"path": repo.path, "algorithm": repo.alg.repo_string, "secure": repo.secure,
                    "erofs_versions": repo.meta.format_versions(), "writable": h.writable}


"""org.composefs.Oci: OCI images and layers in the repository."""

from __future__ import annotations

import os
import pwd
from collections.abc import Generator
from typing import Any

from cfsd.core.errors import NotFound
from cfsd.oci import image as oci_image
from cfsd.oci.digest import Digest
from cfsd.oci.fsck import oci_fsck
from cfsd.oci.layers import import_layer
from cfsd.oci.pull import DeltaArtifact, PullOptions, pull
from cfsd.oci.reference import InvalidReference
from cfsd.oci.registry import AuthenticationError, Credentials, RegistryError
from cfsd.service import auth
from cfsd.service.binding import Call, FdReader, VarlinkError
from cfsd.service.delta_api import DeltaMethods
from cfsd.service.errors import OCI
from cfsd.service.layer_api import LayerTransferMethods
from cfsd.service.oci_image_api import OciImageMethods
from cfsd.service.repository_api import require_writer
from cfsd.service.state import State

FEATURES = ["splitdirfdstream-v0"]


def _err(name: str, **params: object) -> VarlinkError:
    return VarlinkError(f"{OCI}.{name}", params)


def caller_auth_configs(call: Call, auth_file: str | None,
                        auth_file_fd: int | None) -> list[bytes]:
    """Contents of the caller's auth file (the named or passed one, or the defaults).

    Every file is opened by the caller (a passed fd or the opener helper as the caller);
    the defaults are the caller's containers/docker auth files.
    """
    files = auth.CallerFiles(call)
    if auth_file is not None or auth_file_fd is not None:
        named = [(auth_file, auth_file_fd)]
    else:
        uid = call.creds.uid
        named = [(f"/run/user/{uid}/containers/auth.json", None)]
        try:
            home = pwd.getpwuid(uid).pw_dir
            named += [(os.path.join(home, ".config/containers/auth.json"), None),
                      (os.path.join(home, ".docker/config.json"), None)]
        except KeyError:
            pass
    out = []
    for path, index in named:
        try:
            fd = files.file(path, index, what="auth_file")
        except (OSError, auth.PermissionDenied):
            if auth_file is not None or auth_file_fd is not None:
                raise
            continue
        try:
            out.append(os.pread(fd, 1 << 20, 0))
        finally:
            os.close(fd)
    return out


class OciAPI(DeltaMethods, OciImageMethods, LayerTransferMethods):
    """Implementation of org.composefs.Oci."""

    def __init__(self, state: State) -> None:
        self.state = state

    def GetInfo(self, call: Call) -> dict[str, Any]:  # noqa: N802
        """Capability tokens."""
        return {"features": list(FEATURES)}

    def HasLayer(self, call: Call, handle: int, diff_id: str) -> dict[str, Any]:  # noqa: N802
        """Whether ``oci-layer-<diff_id>`` exists."""
        with self.state.use(call, handle, OCI) as h:
            Digest.parse(diff_id)
            verity = h.repo.has_stream(oci_image.layer_id(diff_id))
            return {"present": verity is not None,
                    "layer_verity": verity.hex() if verity is not None else None}

    def ImportLayer(self, call: Call, handle: int, digest: str,  # noqa: N802
                    name: str | None = None) -> dict[str, Any]:
        """Split the tar passed as fd 0 of the request into a layer stream."""
        Digest.parse(digest)
        with self.state.use(call, handle, OCI) as h:
            if len(call.fds) != 1:
                raise _err("InvalidRequest",
                           message=f"ImportLayer expects 1 fd (the tar), got {len(call.fds)}")
            require_writer(call, h, "import layers")
            repo = h.repo
            with repo.lock.shared(), auth.as_owner(repo.fd, call.creds):
                res = import_layer(repo, FdReader(call.fds[0], call), digest, name)
            return {"verity": res.verity.hex(), "already_present": res.already_present,
                    "stats": res.stats.display()}

    def ListImages(self, call: Call, handle: int,  # noqa: N802
                   filter: str | None = None) -> dict[str, Any]:
        """Tagged images."""
        with self.state.use(call, handle, OCI) as h:
            return {"images": oci_image.list_images(h.repo, filter)}

    def Inspect(self, call: Call, handle: int, image: str) -> dict[str, Any]:  # noqa: N802
        """Raw manifest and config of a tag or @digest."""
        with self.state.use(call, handle, OCI) as h:
            try:
                return oci_image.inspect(h.repo, image)
            except NotFound:
                raise _err("NoSuchImage", image=image) from None

    def Tag(self, call: Call, handle: int, manifest_digest: str,  # noqa: N802
            name: str) -> dict[str, Any]:
        """Point a tag at a stored manifest."""
        with self.state.use(call, handle, OCI) as h:
            require_writer(call, h, "tag images")
            # shared with other writers, exclusive of gc: a tag never names a manifest
            # that a running gc has already decided to remove
            with h.repo.lock.shared(), auth.as_owner(h.repo.fd, call.creds):
                try:
                    oci_image.tag(h.repo, manifest_digest.removeprefix("@"), name)
                except NotFound:
                    raise _err("NoSuchImage", image=manifest_digest) from None
            return {}

    def Untag(self, call: Call, handle: int, name: str) -> dict[str, Any]:  # noqa: N802
        """Remove a tag."""
        with self.state.use(call, handle, OCI) as h:
            require_writer(call, h, "untag images")
            try:
                oci_image.untag(h.repo, name)
            except NotFound:
                raise _err("NoSuchImage", image=name) from None
            return {}

    def Check(self, call: Call, handle: int,  # noqa: N802
              image: str | None = None) -> dict[str, Any]:
        """OCI-aware fsck."""
        with self.state.use(call, handle, OCI) as h:
            try:
                return oci_fsck(h.repo, image).to_dict()
            except NotFound:
                raise _err("NoSuchImage", image=image or "") from None

    def Pull(self, call: Call, handle: int, image: str, local_fetch: str,  # noqa: N802
             bootable: bool, name: str | None = None, storage_root: str | None = None,
             xattrs: str | None = None, expected_digest: str | None = None,
             platform: str | None = None, tls_verify: bool | None = None,
             credentials: str | None = None, auth_file: str | None = None,
             concurrency: int | None = None, image_fd: int | None = None,
             auth_file_fd: int | None = None,
             ) -> Generator[dict[str, Any], None, dict[str, Any]]:
        """Pull an image (streaming progress with "more")."""
        if expected_digest is not None and not bootable:
            raise _err("InvalidRequest", message="expected_digest requires bootable")
        if expected_digest is not None and xattrs is not None:
            raise _err("InvalidRequest", message="expected_digest cannot be combined with xattrs")
        if bootable:
            raise _err("InvalidRequest", message="bootable images are not supported by cfsd")
        if image.startswith("containers-storage:"):
            raise _err("InvalidRequest", message="containers-storage: is not supported; "
                       "use oci:, oci-archive: or docker://")
        if concurrency is not None and not 1 <= concurrency <= 64:
            raise _err("InvalidRequest", message="concurrency must be between 1 and 64")
        creds = Credentials.parse(credentials) if credentials else None
        with self.state.use(call, handle, OCI) as h:
            require_writer(call, h, "pull images")
            configs = [] if credentials else caller_auth_configs(call, auth_file, auth_file_fd)
            opts = PullOptions(tag=name, platform=platform,
                               tls_verify=True if tls_verify is None else tls_verify,
                               credentials=creds, auth_configs=configs,
                               opener=auth.CallerOpener(call, image_fd), cancel=call.cancel)
            if concurrency:
                opts.max_workers = concurrency
            repo = h.repo
            with repo.lock.shared(), auth.as_owner(repo.fd, call.creds):
                try:
                    result = yield from pull(repo, image, opts)
                except DeltaArtifact as delta:
                    return (yield from self.apply_delta_from_pull(call, h, delta, opts))
                except InvalidReference as e:
                    raise _err("InvalidRequest", message=str(e)) from None
                except NotFound as e:
                    raise _err("NoSuchImage", image=f"{image}: {e}") from None
                except AuthenticationError as e:
                    raise _err("PermissionDenied", message=str(e)) from None
                except RegistryError as e:
                    raise _err("TransportError", message=str(e)) from None
            return {"completed": {
                "manifest_digest": result.manifest_digest,
                "config_digest": result.config_digest,
                "manifest_verity": result.manifest_verity.hex(),
                "config_verity": result.config_verity.hex(),
                "stats": result.stats.display()}}


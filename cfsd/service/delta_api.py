"""org.composefs.Oci delta methods: ApplyDelta, CreateDelta, and Pull handing delta artifacts
over here."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Generator, Iterator
from typing import Any

from cfsd.core.errors import NotFound
from cfsd.delta.apply import ApplyOptions, apply_delta, apply_delta_reference
from cfsd.delta.assemble import OutputError, OutputFile
from cfsd.delta.create import CreateOptions, CreateResult, InvalidDeltaRequest, create_delta
from cfsd.oci import image as oci_image
from cfsd.oci.pull import DeltaArtifact, PullOptions, PullResult
from cfsd.oci.reference import InvalidReference
from cfsd.oci.registry import AuthenticationError, Credentials, RegistryError
from cfsd.service import auth
from cfsd.service.binding import Call, VarlinkError
from cfsd.service.errors import OCI
from cfsd.service.repository_api import require_writer
from cfsd.service.state import Handle, State

Frames = Generator[dict[str, Any], None, dict[str, Any]]


def _err(name: str, **params: object) -> VarlinkError:
    return VarlinkError(f"{OCI}.{name}", params)


@contextlib.contextmanager
def _transport_errors() -> Iterator[None]:
    """Reference, registry and credential failures as the typed errors Pull uses."""
    try:
        yield
    except InvalidReference as e:
        raise _err("InvalidRequest", message=str(e)) from None
    except AuthenticationError as e:
        raise _err("PermissionDenied", message=str(e)) from None
    except RegistryError as e:
        raise _err("TransportError", message=str(e)) from None


def completed(result: PullResult) -> dict[str, Any]:
    """The final ``completed`` frame of Pull / ApplyDelta."""
    return {"completed": {
        "manifest_digest": result.manifest_digest,
        "config_digest": result.config_digest,
        "manifest_verity": result.manifest_verity.hex(),
        "config_verity": result.config_verity.hex(),
        "stats": result.stats.display()}}


def _pull_concurrency(opts: PullOptions) -> int | None:
    """The concurrency a Pull asked for, or None when it left the default."""
    return opts.max_workers


class DeltaMethods:
    """Mixin of OciAPI implementing the delta methods."""

    state: State

    def apply_delta_from_pull(self, call: Call, h: Handle, artifact: DeltaArtifact,
                              opts: PullOptions) -> Frames:
        """Pull found a delta artifact: apply it (returns the Completed reply).

        Runs inside Pull's shared lock and filesystem identity.
        """
        repo = h.repo
        aopts = ApplyOptions(tag=opts.tag, concurrency=_pull_concurrency(opts),
                             tls_verify=opts.tls_verify, credentials=opts.credentials,
                             auth_configs=opts.auth_configs, opener=opts.opener,
                             cancel=opts.cancel,
                             worker_context=lambda: auth.as_owner(repo.fd, call.creds))
        with _transport_errors():
            result = yield from apply_delta(repo, artifact.source, artifact.manifest,
                                            artifact.digest, aopts)
        return completed(result)

    def ApplyDelta(self, call: Call, handle: int, delta: str,  # noqa: N802
                   source: str | None = None, name: str | None = None,
                   tls_verify: bool | None = None, credentials: str | None = None,
                   auth_file: str | None = None, concurrency: int | None = None,
                   verify_key: str | None = None, delta_fd: int | None = None,
                   auth_file_fd: int | None = None) -> Frames:
        """Apply an oci-delta artifact to an image of this repository (streaming like Pull)."""
        from cfsd.service.oci_api import caller_auth_configs
        if concurrency is not None and not 1 <= concurrency <= 64:
            raise _err("InvalidRequest", message="concurrency must be between 1 and 64")
        if delta.startswith("containers-storage:"):
            raise _err("InvalidRequest", message="containers-storage: is not supported; "
                       "use oci:, oci-archive: or docker://")
        with _transport_errors():
            creds = Credentials.parse(credentials) if credentials else None
        with self.state.use(call, handle, OCI) as h:
            require_writer(call, h, "apply deltas")
            configs = [] if credentials else caller_auth_configs(call, auth_file, auth_file_fd)
            repo = h.repo
            opts = ApplyOptions(tag=delta if name is None else name, source_image=source,
                                verify_key=verify_key, concurrency=concurrency,
                                tls_verify=True if tls_verify is None else tls_verify,
                                credentials=creds, auth_configs=configs,
                                opener=auth.CallerOpener(call, delta_fd), cancel=call.cancel,
                                worker_context=lambda: auth.as_owner(repo.fd, call.creds))
            with repo.lock.shared(), auth.as_owner(repo.fd, call.creds), _transport_errors():
                result = yield from apply_delta_reference(repo, delta, opts)
            return completed(result)

    def CreateDelta(self, call: Call, handle: int, old: str, new: str,  # noqa: N802
                    output: str, format: str | None = None, concurrency: int | None = None,
                    ref_name: str | None = None, output_dir_fd: int | None = None) -> Frames:
        """Write the oci-delta artifact from image *old* to image *new* to *output*."""
        version = {None: 1, "v1": 1, "v2": 2}.get(format)
        if version is None:
            raise _err("InvalidRequest", message=f"format must be v1 or v2, not {format!r}")
        if concurrency is not None and not 1 <= concurrency <= 64:
            raise _err("InvalidRequest", message="concurrency must be between 1 and 64")
        if ref_name is not None and (not ref_name or "\0" in ref_name):
            raise _err("InvalidRequest", message="invalid ref_name")
        if not output or "\0" in output or output.endswith("/"):
            raise _err("InvalidRequest", message=f"output must name a file: {output!r}")
        with self.state.use(call, handle, OCI) as h:
            repo = h.repo
            with repo.lock.shared():
                for ref in (old, new):
                    try:
                        oci_image.resolve(repo, ref)
                    except NotFound:
                        raise _err("NoSuchImage", image=ref) from None
                dir_fd, name = _open_output_dir(call, output, output_dir_fd)
                try:
                    def identity() -> contextlib.AbstractContextManager[None]:
                        return auth.as_caller(call.creds)

                    def open_output() -> OutputFile:
                        return OutputFile(dir_fd, name, identity)

                    opts = CreateOptions(version=version, concurrency=concurrency,
                                         ref_name=ref_name)
                    try:
                        result = yield from create_delta(repo, old, new, open_output, opts)
                    except InvalidDeltaRequest as e:
                        raise _err("InvalidRequest", message=str(e)) from None
                    except OutputError as e:
                        raise _output_error(output, e) from None
                finally:
                    os.close(dir_fd)
            return {"created": created(result)}


def created(result: CreateResult) -> dict[str, Any]:
    """The final ``created`` frame of CreateDelta."""
    return {"delta_digest": result.digest, "size": result.size,
            "format": f"v{result.version}", "source": result.source,
            "target": result.target,
            "layers": [{"diff_id": r.diff_id, "digest": r.digest, "kind": r.kind,
                        "size": r.size, "layer_size": r.layer_size} for r in result.layers]}


def _output_error(output: str, e: OSError) -> VarlinkError:
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return _err("PermissionDenied", message=f"cannot write {output}: {e.strerror}")
    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP,
                   errno.ENAMETOOLONG, errno.EEXIST):
        return _err("InvalidRequest", message=f"cannot write {output}: {e.strerror}")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return _err("InvalidRequest", message=f"cannot write {output}: {e.strerror}")
    return _err("InternalError", message=f"cannot write {output}: {e.strerror or e}")


def _open_output_dir(call: Call, output: str, index: int | None) -> tuple[int, str]:
    """The output's directory, opened by the caller, and the file name in it."""
    try:
        fd, name = auth.CallerFiles(call).parent(output, index, what="output")
    except OSError as e:
        raise _output_error(output, e) from None
    try:
        with auth.as_caller(call.creds):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return fd, name
    except OSError as e:
        os.close(fd)
        raise _output_error(output, e) from None
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise _err("InvalidRequest", message=f"cannot write {output}: it is a directory")
    return fd, name

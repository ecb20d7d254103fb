"""org.composefs.Oci: OCI images and layers in the repository."""

from __future__ import annotations

import os
from typing import Any

from cfsd.oci.digest import Digest
from cfsd.oci.layers import import_layer, layer_stream_id
from cfsd.service import auth
from cfsd.service.binding import Call, VarlinkError
from cfsd.service.errors import OCI
from cfsd.service.repository_api import require_writer
from cfsd.service.state import State

FEATURES = ["splitdirfdstream-v0"]


class _FdReader:
    """Blocking reads from a received file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, n: int = -1, /) -> bytes:
        return os.read(self.fd, n if n > 0 else 1 << 20)


class OciAPI:
    """Implementation of org.composefs.Oci."""

    def __init__(self, state: State) -> None:
        self.state = state

    def GetInfo(self, call: Call) -> dict[str, Any]:  # noqa: N802
        """Capability tokens."""
        return {"features": list(FEATURES)}

    def HasLayer(self, call: Call, handle: int, diff_id: str) -> dict[str, Any]:  # noqa: N802
        """Whether ``oci-layer-<diff_id>`` exists."""
        with self.state.use(call, handle, OCI) as h:
            verity = h.repo.has_stream(layer_stream_id(Digest.parse(diff_id)))
            return {"present": verity is not None,
                    "layer_verity": verity.hex() if verity is not None else None}

    def ImportLayer(self, call: Call, handle: int, digest: str,  # noqa: N802
                    name: str | None = None) -> dict[str, Any]:
        """Split the tar passed as fd 0 of the request into a layer stream."""
        Digest.parse(digest)
        with self.state.use(call, handle, OCI) as h:
            if len(call.fds) != 1:
                raise VarlinkError(f"{OCI}.InvalidRequest",
                                   {"message": f"ImportLayer expects 1 fd (the tar), got "
                                               f"{len(call.fds)}"})
            require_writer(call, h, "import layers")
            repo = h.repo
            with repo.lock.shared(), auth.fs_identity(repo.fd):
                res = import_layer(repo, _FdReader(call.fds[0]), digest, name)
            return {"verity": res.verity.hex(), "already_present": res.already_present,
                    "stats": res.stats.display()}

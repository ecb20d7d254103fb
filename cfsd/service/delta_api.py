"""org.composefs.Oci delta methods (ApplyDelta; Pull hands delta artifacts over here)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from cfsd.oci.pull import DeltaArtifact, PullOptions
from cfsd.service.binding import Call, VarlinkError
from cfsd.service.errors import OCI
from cfsd.service.state import Handle


class DeltaMethods:
    """Mixin of OciAPI implementing the delta methods."""

    def apply_delta_from_pull(self, call: Call, h: Handle, artifact: DeltaArtifact,
                              opts: PullOptions) -> Generator[dict[str, Any], None,
                                                              dict[str, Any]]:
        """Pull found a delta artifact: apply it (returns the Completed reply)."""
        artifact.source.close()
        raise VarlinkError(f"{OCI}.InvalidRequest",
                           {"message": "applying oci-delta artifacts is not supported yet"})
        yield {}  # pragma: no cover - makes this a generator

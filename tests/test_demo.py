"""The README's main-job command keeps working (no daemon running beforehand): images built
locally, pulled from a real registry and an archive, a delta created, pushed and applied."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT
from tests.ocitools import require_tools


def test_demo_runs_end_to_end() -> None:
    require_tools("umoci", "skopeo", "docker-registry")
    env = dict(os.environ)
    env.pop("CFSD_ADDRESS", None)
    env["XDG_RUNTIME_DIR"] = "/nonexistent"
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "demo.py")], capture_output=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    out = p.stdout.decode()
    assert out.count("identical to a direct pull of v2") == 2
    assert out.count("status: ok") == 2
    assert "VERSION_ID=2" in out

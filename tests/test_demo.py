"""The README's main-job command keeps working (no daemon running beforehand)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_demo_runs_end_to_end() -> None:
    env = dict(os.environ)
    env.pop("CFSD_ADDRESS", None)
    env["XDG_RUNTIME_DIR"] = "/nonexistent"
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "demo.py")], capture_output=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    out = p.stdout.decode()
    assert "both layers reassemble byte for byte" in out
    assert "status: ok" in out

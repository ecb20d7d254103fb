"""Running the real cfsctl as another user (nobody, through setpriv) against a cfsd whose
socket everybody may connect to."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Daemon

NOBODY = 65534
SYSTEM_PY = "/usr/bin/python3"
other_user_marks = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uid"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv not installed"),
    pytest.mark.skipif(not os.access(SYSTEM_PY, os.X_OK), reason=f"{SYSTEM_PY} missing"),
]


def as_nobody(world: Path, daemon: Daemon, *args: str, input: bytes | None = None
              ) -> subprocess.CompletedProcess[bytes]:
    env = {"PYTHONPATH": str(world / "lib"), "CFSD_INTERFACES": str(world / "interfaces"),
           "CFSD_ADDRESS": daemon.address, "HOME": "/nonexistent", "PATH": "/usr/bin:/bin"}
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", SYSTEM_PY, "-m", "cfsctl", *args],
                          input=input, capture_output=True, env=env, cwd="/", timeout=120)



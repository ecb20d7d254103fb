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


def as_nobody(world: Path, daemon: Daemon, *args: str, input: bytes | None = None,
              cwd: str | Path = "/", groups: tuple[int, ...] = (), uid: int = NOBODY,
              ) -> subprocess.CompletedProcess[bytes]:
    """The real cfsctl run as *uid* (nobody by default) with exactly *groups*."""
    return run_as(world, daemon, ["-m", "cfsctl", *args], input=input, cwd=cwd,
                  groups=groups, uid=uid)


def run_as(world: Path, daemon: Daemon, pyargs: list[str], *, input: bytes | None = None,
           cwd: str | Path = "/", groups: tuple[int, ...] = (), uid: int = NOBODY,
           ) -> subprocess.CompletedProcess[bytes]:
    """The system python with *pyargs*, as *uid* with exactly *groups* (no others)."""
    env = {"PYTHONPATH": str(world / "lib"), "CFSD_INTERFACES": str(world / "interfaces"),
           "CFSD_ADDRESS": daemon.address, "HOME": "/nonexistent", "PATH": "/usr/bin:/bin"}
    group_args = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", *group_args,
                           SYSTEM_PY, *pyargs],
                          input=input, capture_output=True, env=env, cwd=str(cwd), timeout=300)

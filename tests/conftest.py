"""Shared fixtures: a real cfsd on a real socket, the real cfsctl, conformance data."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import varlink

ROOT = Path(__file__).resolve().parents[1]


DATA = ROOT / "tests" / "data"


def conformance_dir() -> Path | None:
    """The conformance data: the project's own copy in tests/data."""
    p = DATA / "conformance"
    return p if p.is_dir() else None


CONFORMANCE = conformance_dir() or DATA / "conformance"
needs_conformance = pytest.mark.skipif(not CONFORMANCE.is_dir(),
                                       reason=f"conformance data not found at {CONFORMANCE}")
FSCK_EROFS = shutil.which("fsck.erofs")


def fsck_erofs(image: bytes | Path, *, extract: bool = False) -> None:
    """fsck.erofs accepts *image* (bytes or a file); with *extract* it also decodes every
    file's data layout (``--extract`` without a destination writes nothing).

    erofs-utils is a test dependency (.ci/run installs it): a missing fsck.erofs fails the
    test instead of letting the check pass unexamined.
    """
    if FSCK_EROFS is None:
        pytest.fail("fsck.erofs is not installed (Debian package erofs-utils): the EROFS "
                    "image cannot be checked")
    args = [FSCK_EROFS, *(["--extract"] if extract else [])]
    if isinstance(image, Path):
        r = subprocess.run([*args, str(image)], capture_output=True, timeout=600)
    else:
        with tempfile.NamedTemporaryFile(suffix=".img") as f:
            f.write(image)
            f.flush()
            r = subprocess.run([*args, f.name], capture_output=True, timeout=600)
    assert r.returncode == 0, (f"fsck.erofs{' --extract' if extract else ''} rejected the "
                               f"image: {r.stderr.decode(errors='replace')[-2000:]}")


@pytest.fixture(scope="session")
def conformance() -> Path:
    p = conformance_dir()
    if p is None:
        pytest.skip("conformance data not found in tests/data")
    return p


def wait_for_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Wait until a daemon accepts connections on *path*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cfsd exited with {proc.returncode}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    raise TimeoutError(f"cfsd did not listen on {path}")


class Daemon:
    """A cfsd subprocess bound to a socket in a temporary directory."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.sock = str(tmp / "cfsd.sock")
        self.address = f"unix:{self.sock}"
        self.log = tmp / "cfsd.log"
        self._logf = open(self.log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cfsd", "--address", self.address, "--log-level", "debug",
             *args], stderr=self._logf, cwd="/")
        wait_for_socket(self.sock, self.proc)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def status(self, field: str) -> int:
        """A byte-valued field of the daemon's /proc status (VmRSS, VmHWM...)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        return self.proc.returncode


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("daemon"))
    yield d
    d.stop()


def run_cfsctl(*args: str, address: str | None = None, input: bytes | None = None,
               stdin: int | None = None, check: bool = True,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the real cfsctl; *address* None means the embedded daemon."""
    e = dict(os.environ)
    e.pop("CFSD_ADDRESS", None)
    e["XDG_RUNTIME_DIR"] = "/nonexistent"
    if address:
        e["CFSD_ADDRESS"] = address
    if env:
        e.update(env)
    p = subprocess.run([sys.executable, "-m", "cfsctl", *args], input=input, stdin=stdin,
                       capture_output=True, env=e, cwd=str(ROOT), timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"cfsctl {' '.join(args)} failed ({p.returncode}): "
                             f"{p.stderr.decode(errors='replace')}")
    return p


def repo_snapshot(repo: str) -> dict[str, Any]:
    """Every stream name -> its object, every EROFS image, and the tags of a repository."""
    def links(d: Path) -> dict[str, str]:
        return {p.name: os.readlink(p) for p in d.iterdir() if p.is_symlink()} if d.is_dir() \
            else {}
    return {"streams": links(Path(repo, "streams")), "images": links(Path(repo, "images")),
            "tags": sorted(links(Path(repo, "streams/refs/oci")))}


def tree_listing(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path below *root* with (mode, size, symlink target) — for unchanged checks."""
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            target = os.readlink(p) if os.path.islink(p) else ""
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size if not
                                             os.path.isdir(p) else 0, target)
    return out


@pytest.fixture(scope="module")
def world() -> Iterator[Path]:
    """A world-readable scratch dir holding a copy of cfsctl another uid can run."""
    d = Path(tempfile.mkdtemp(prefix="cfsd-auth-"))
    d.chmod(0o755)
    lib = d / "lib"
    shutil.copytree(ROOT / "cfsctl", lib / "cfsctl")
    shutil.copytree(Path(varlink.__file__).parent, lib / "varlink")
    shutil.copytree(ROOT / "interfaces", d / "interfaces")
    shutil.copy(ROOT / "tests" / "varlink_calls.py", lib / "varlink_calls.py")
    for p in [d, *d.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    yield d
    shutil.rmtree(d)


@pytest.fixture(scope="module")
def open_daemon(world: Path) -> Iterator[Daemon]:
    sockdir = world / "sock"
    sockdir.mkdir()
    sockdir.chmod(0o755)
    d = Daemon(sockdir, "--socket-mode", "0666")
    yield d
    d.stop()

"""gc never loses data: interrupted at any point (SIGKILL) it leaves a repository that fsck
finds clean and whose images still pull and mount; a damaged layout makes it refuse; a
reader stalled on the repository lock does not keep other readers waiting after gc gives up.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cfsd.core.fsck import fsck
from cfsd.core.locking import RWLock
from cfsd.core.repository import Repository
from tests.conftest import Daemon, run_cfsctl
from tests.ocitools import build_image

# gc in a child that SIGKILLs itself just before its k-th unlink (argv[2]; 0: never) and
# prints how many unlinks it made: every interruption point is chosen, none is left to timing.
GC_SCRIPT = """
import os, signal, sys
from cfsd.core.gc import gc
from cfsd.core.repository import Repository
stop, count, real_unlink = int(sys.argv[2]), 0, os.unlink
def unlink(*args, **kw):
    global count
    count += 1
    if count == stop:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_unlink(*args, **kw)
os.unlink = unlink
gc(Repository.open(sys.argv[1], insecure=True))
print(count)
"""


def count_objects(repo: Path) -> int:
    return sum(1 for p in (repo / "objects").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def garbage_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A repository with image ``keep`` and, untagged, an image of 1,500 small files."""
    d = tmp_path_factory.mktemp("gcsafety")
    layout = d / "layout"
    build_image(layout, "keep", {"usr/bin/tool": os.urandom(200_000), "etc/conf": b"c" * 300})
    rng = random.Random(7)
    build_image(layout, "junk", {f"usr/share/junk/{i:04d}": rng.randbytes(100 + i % 500)
                                 for i in range(1500)}, base="keep")
    repo = d / "repo"
    run_cfsctl("--repo", str(repo), "init", "--insecure")
    run_cfsctl("--repo", str(repo), "oci", "pull", f"oci:{layout}:keep", "keep")
    run_cfsctl("--repo", str(repo), "oci", "pull", f"oci:{layout}:junk", "junk")
    run_cfsctl("--repo", str(repo), "oci", "untag", "junk")
    return repo, layout


def _gc_unlinks(repo: Path, scratch: Path) -> int:
    """How many unlinks a whole gc of *repo* makes (on a copy)."""
    copy = scratch / "count"
    shutil.copytree(repo, copy, symlinks=True)
    out = subprocess.run([sys.executable, "-c", GC_SCRIPT, str(copy), "0"], check=True,
                         capture_output=True).stdout
    shutil.rmtree(copy)
    return int(out)


def test_sigkill_during_gc_never_loses_data(garbage_repo: tuple[Path, Path],
                                           tmp_path: Path, shared_daemon: Daemon) -> None:
    repo, layout = garbage_repo
    before = count_objects(repo)
    total = _gc_unlinks(repo, tmp_path)
    assert total > 1500                   # the junk image's objects, its streams and names
    # 20 points from before the first unlink (names pruned, nothing else) to the last
    stops = sorted({1 + round(i * (total - 1) / 19) for i in range(20)})
    assert len(stops) == 20
    for run, stop in enumerate(stops):
        copy = tmp_path / f"run{run}"
        shutil.copytree(repo, copy, symlinks=True)
        proc = subprocess.run([sys.executable, "-c", GC_SCRIPT, str(copy), str(stop)],
                              capture_output=True)
        assert proc.returncode == -signal.SIGKILL, (stop, proc.stderr.decode())
        with Repository.open(str(copy), insecure=True) as r:
            res = fsck(r)
        assert res.ok, (run, stop, res.errors[:5])
        # every image still usable: the kept one mounts, both pull again (no "object missing")
        address = shared_daemon.address
        run_cfsctl("--repo", str(copy), "--insecure", "oci", "pull", f"oci:{layout}:keep",
                   "keep", address=address)
        run_cfsctl("--repo", str(copy), "--insecure", "oci", "pull", f"oci:{layout}:junk",
                   "junk", address=address)
        if os.geteuid() == 0:
            mnt = tmp_path / f"mnt{run}"
            mnt.mkdir()
            run_cfsctl("--repo", str(copy), "--insecure", "oci", "mount", "keep", str(mnt),
                       address=address)
            try:
                assert (mnt / "etc" / "conf").read_bytes() == b"c" * 300
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
        with Repository.open(str(copy), insecure=True) as r:
            assert fsck(r).ok
        shutil.rmtree(copy)
    assert count_objects(repo) == before


def test_damaged_layout_makes_gc_refuse(garbage_repo: tuple[Path, Path],
                                        tmp_path: Path) -> None:
    repo, _ = garbage_repo
    copy = tmp_path / "damaged"
    shutil.copytree(repo, copy, symlinks=True)
    shutil.rmtree(copy / "streams" / "refs")
    (copy / "streams" / "refs").write_bytes(b"not a directory")
    before = count_objects(copy)
    p = run_cfsctl("--repo", str(copy), "--insecure", "fsck", check=False)
    assert p.returncode == 1 and b"layout-damaged" in p.stdout, p.stdout
    p = run_cfsctl("--repo", str(copy), "--insecure", "gc", check=False)
    assert p.returncode == 1
    assert p.stderr.decode().count("\n") == 1 and "damaged" in p.stderr.decode(), p.stderr
    assert count_objects(copy) == before
    # a stray file inside a refs tree hides roots just the same
    (copy / "streams" / "refs").unlink()
    (copy / "streams" / "refs").mkdir()
    (copy / "streams" / "refs" / "stray").write_bytes(b"x")
    p = run_cfsctl("--repo", str(copy), "--insecure", "gc", check=False)
    assert p.returncode == 1 and "stray" in p.stderr.decode(), p.stderr
    assert count_objects(copy) == before


class Staged(threading.Condition):
    """The lock's condition, holding the writer in its wait until the late reader waits too,
    so the writer's timeout always comes with a reader queued behind it."""

    def __init__(self, writer: str, reader: str) -> None:
        super().__init__()
        self.writer, self.reader = writer, reader
        self.writer_waiting = threading.Event()
        self.reader_waiting = False

    def wait(self, timeout: float | None = None) -> bool:
        name = threading.current_thread().name
        if name == self.reader and not self.reader_waiting:
            self.reader_waiting = True
            self.notify_all()
        elif name == self.writer:
            self.writer_waiting.set()
            while not self.reader_waiting:
                super().wait(60)
        return super().wait(timeout)


def test_writer_timeout_wakes_the_readers_behind_it() -> None:
    """A reader that stalls makes gc give up; readers that queued behind gc go on at once
    instead of waiting for the stalled reader (no lost wakeup)."""
    lock = RWLock()
    lock._cond = cond = Staged("writer", "late reader")
    stalled = threading.Event()
    release = threading.Event()
    got: list[str] = []
    timed_out: list[bool] = []

    def stall() -> None:
        with lock.shared():
            stalled.set()
            release.wait(60)

    def writer() -> None:
        try:
            with lock.exclusive(timeout=0.5):
                got.append("writer")
        except TimeoutError:
            timed_out.append(True)

    def late_reader() -> None:
        with lock.shared():
            got.append("reader")

    s = threading.Thread(target=stall)
    s.start()
    assert stalled.wait(60)
    w = threading.Thread(target=writer, name="writer")
    w.start()
    assert cond.writer_waiting.wait(60)              # the writer waits for the stalled one
    r = threading.Thread(target=late_reader, name="late reader")
    r.start()                                        # queued behind the writer
    w.join(60)
    r.join(60)                                       # the stalled reader still holds it
    done = not r.is_alive()
    release.set()
    s.join(60)
    assert timed_out == [True] and not w.is_alive()
    assert done and got == ["reader"], "the reader queued behind the timed-out writer " \
                                       "is still waiting"

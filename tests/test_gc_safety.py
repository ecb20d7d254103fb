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
import time
from pathlib import Path

import pytest

from cfsd.core.fsck import fsck
from cfsd.core.locking import RWLock
from cfsd.core.repository import Repository
from tests.conftest import Daemon, run_cfsctl
from tests.ocitools import build_image

GC_SCRIPT = ("import sys; from cfsd.core.repository import Repository; "
             "from cfsd.core.gc import gc; gc(Repository.open(sys.argv[1], insecure=True))")


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


def _gc_seconds(repo: Path, scratch: Path) -> float:
    copy = scratch / "timing"
    shutil.copytree(repo, copy, symlinks=True)
    t = time.monotonic()
    subprocess.run([sys.executable, "-c", GC_SCRIPT, str(copy)], check=True)
    return time.monotonic() - t


def test_sigkill_during_gc_never_loses_data(garbage_repo: tuple[Path, Path],
                                           tmp_path: Path, shared_daemon: Daemon) -> None:
    repo, layout = garbage_repo
    before = count_objects(repo)
    total = _gc_seconds(repo, tmp_path)
    rng = random.Random(20261208)
    interrupted = 0
    for run in range(20):
        copy = tmp_path / f"run{run}"
        shutil.copytree(repo, copy, symlinks=True)
        proc = subprocess.Popen([sys.executable, "-c", GC_SCRIPT, str(copy)])
        time.sleep(rng.uniform(0.0, total))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        interrupted += proc.returncode == -signal.SIGKILL
        with Repository.open(str(copy), insecure=True) as r:
            res = fsck(r)
        assert res.ok, (run, res.errors[:5])
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
    assert interrupted >= 10, f"only {interrupted} of 20 gc runs were interrupted"
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


def test_writer_timeout_wakes_the_readers_behind_it() -> None:
    """A reader that stalls makes gc give up; readers that queued behind gc go on at once
    instead of waiting for the stalled reader (no lost wakeup)."""
    lock = RWLock()
    stalled = threading.Event()
    release = threading.Event()
    got: list[float] = []

    def stall() -> None:
        with lock.shared():
            stalled.set()
            release.wait(30)

    def writer() -> None:
        with pytest.raises(TimeoutError), lock.exclusive(timeout=0.5):
            pass

    def late_reader() -> None:
        with lock.shared():
            got.append(time.monotonic())

    threads = [threading.Thread(target=stall)]
    threads[0].start()
    stalled.wait(5)
    w = threading.Thread(target=writer)
    w.start()
    time.sleep(0.1)                       # the writer is waiting now
    r = threading.Thread(target=late_reader)
    r.start()
    w.join(10)
    r.join(5)
    done = bool(got)
    release.set()
    threads[0].join(10)
    assert done, "the reader queued behind the timed-out writer is still waiting"

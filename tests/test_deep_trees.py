"""Depth comes from input: a 4,096-level tree pulls, checks out and dumps (no recursion
limit of Python's is reached), and one depth limit refuses deeper trees with TooDeep."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import run_cfsctl
from tests.deltatools import D, F, Layout, make_tar

DEPTH = 4096


def deep_layer(depth: int) -> bytes:
    parts = ["usr"] + ["d"] * (depth - 1)
    entries = [D("/".join(parts[:i])) for i in range(1, depth + 1)]
    entries.append(F("/".join(parts) + "/leaf", b"bottom" * 20))
    return make_tar(entries)


def test_4096_deep_tree_pulls_checks_out_and_dumps(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    layout.write_image("deep", [deep_layer(DEPTH)])
    repo = str(tmp_path / "repo")
    run_cfsctl("--repo", repo, "init", "--insecure")
    run_cfsctl("--repo", repo, "oci", "pull", f"oci:{layout.path}:deep", "deep")
    out = tmp_path / "out"
    try:
        _check_out(repo, out)
    finally:      # pytest's own cleanup recurses per level: remove the deep tree here
        subprocess.run(["rm", "-rf", str(out)], check=True)
    dump = run_cfsctl("--repo", repo, "oci", "dump", "deep").stdout
    assert dump.count(b"\n") == DEPTH + 2            # root, DEPTH directories, the leaf
    image_id = run_cfsctl("--repo", repo, "oci", "compute-id", "deep").stdout.decode().strip()
    lines = run_cfsctl("--repo", repo, "dump-files", image_id, "/usr").stdout
    assert lines.count(b"\n") == DEPTH + 1          # /usr, the directories below, the leaf
    p = run_cfsctl("--repo", repo, "fsck")
    assert p.returncode == 0


def _check_out(repo: str, out: Path) -> None:
    run_cfsctl("--repo", repo, "oci", "checkout", "deep", str(out))
    # walk down without building the >PATH_MAX path
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    levels = 0
    for name in ["usr"] + ["d"] * (DEPTH - 1):
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
        levels += 1
    leaf = os.open("leaf", os.O_RDONLY, dir_fd=fd)
    assert os.read(leaf, 1000) == b"bottom" * 20
    os.close(leaf)
    os.close(fd)
    assert levels == DEPTH

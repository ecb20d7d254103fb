"""Real images upstream refuses and Docker, podman and containers/storage accept: an image
without /usr (FROM scratch) and layers whose tars leave out parent directory entries."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import run_cfsctl
from tests.deltatools import D, F, Layout, make_tar


def pull(tmp_path: Path, layers: list[bytes]) -> str:
    layout = Layout(tmp_path / "layout")
    layout.write_image("img", layers)
    repo = str(tmp_path / "repo")
    run_cfsctl("--repo", repo, "init", "--insecure")
    run_cfsctl("--repo", repo, "oci", "pull", f"oci:{layout.path}:img", "img")
    assert run_cfsctl("--repo", repo, "fsck").returncode == 0
    return repo


def dump_lines(repo: str) -> dict[str, list[str]]:
    out = run_cfsctl("--repo", repo, "oci", "dump", "img").stdout.decode()
    return {line.split(" ")[0]: line.split(" ") for line in out.splitlines()}


def test_image_without_usr(tmp_path: Path) -> None:
    """A static binary FROM scratch: no /usr, the root keeps its own metadata."""
    repo = pull(tmp_path, [make_tar([F("app", b"#!static binary" * 100, 0o755),
                                     F("etc/passwd", b"root:x:0:0::/:/app\n")])])
    lines = dump_lines(repo)
    assert "/app" in lines and "/etc/passwd" in lines and "/usr" not in lines
    assert lines["/"][2] == "40755" and lines["/"][4:6] == ["0", "0"], lines["/"]
    out = tmp_path / "out"
    run_cfsctl("--repo", repo, "oci", "checkout", "img", str(out))
    assert (out / "app").read_bytes() == b"#!static binary" * 100
    assert os.stat(out / "app").st_mode & 0o777 == 0o755


def test_layer_without_parent_directory_entries(tmp_path: Path) -> None:
    """Parents a tar leaves out are created root-owned 0755 with mtime 0; a directory entry
    that comes after its children still gives the directory its own metadata."""
    first = make_tar([F("usr/lib/deep/file", b"f" * 100), F("etc/conf", b"c")])
    second = make_tar([F("usr/lib/deep/more", b"m" * 100), D("usr")])
    repo = pull(tmp_path, [first, second])
    lines = dump_lines(repo)
    for implicit in ("/usr/lib", "/usr/lib/deep", "/etc"):
        fields = lines[implicit]
        assert fields[2] == "40755" and fields[4:6] == ["0", "0"], fields
        assert fields[7].startswith("0."), fields          # mtime 0
    assert lines["/usr"][7].split(".")[0] != "0"            # the explicit entry's mtime
    assert "/usr/lib/deep/file" in lines and "/usr/lib/deep/more" in lines

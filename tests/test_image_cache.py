"""Read paths are cached without ever going stale: parsed images by manifest stream verity
(content-addressed), tag listings by the refs directory's signature once it is quiet."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cfsd.core.repository import Repository
from cfsd.oci import image
from tests.conftest import Daemon, run_cfsctl
from tests.deltatools import D, F, Layout, make_tar


def test_tag_listing_cache_follows_every_change(tmp_path: Path, shared_daemon: Daemon,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    layout = Layout(tmp_path / "layout")
    imgs = {t: layout.write_image(t, [make_tar([D("usr"), F("usr/f", t.encode() * 100)])])
            for t in ("a", "b")}
    repo_path = str(tmp_path / "repo")
    cfs = lambda *a: run_cfsctl("--repo", repo_path, *a,  # noqa: E731
                                address=shared_daemon.address)
    cfs("init", "--insecure")
    for t in imgs:
        cfs("oci", "pull", f"oci:{layout.path}:{t}", t)
    repo = Repository.open(repo_path)
    walks = []
    real = repo.list_refs

    def counting(category: str, prefix: str = "") -> list[tuple[str, str]]:
        walks.append(prefix)
        return real(category, prefix)

    monkeypatch.setattr(repo, "list_refs", counting)
    try:
        names = lambda: sorted(e["name"] for e in image.list_images(repo))  # noqa: E731
        assert names() == ["a", "b"]          # just changed: listed, not cached
        time.sleep(image.QUIET_SECONDS + 0.1)
        walks.clear()
        assert names() == ["a", "b"] and names() == ["a", "b"]
        assert walks.count("oci") == 1        # the second listing came from the cache
        image.untag(repo, "b")                # the very next listing sees it
        assert names() == ["a"]
        image.tag(repo, imgs["b"].digest, "c")
        assert names() == ["a", "c"]
        image.tag(repo, imgs["a"].digest, "c")        # re-pointed within the same tick
        assert [(e["name"], e["manifest_digest"]) for e in image.list_images(repo)] == [
            ("a", imgs["a"].digest), ("c", imgs["a"].digest)]
        # parsed images are shared by manifest stream verity
        assert image.open_image(repo, "a") is image.open_image(repo, "c")
    finally:
        repo.close()

"""create-image, compute-id, create-dumpfile, image-objects and dump-files through the real
daemon and cfsctl: the upstream CLI acceptance tests (composefs-rs's) that concern them,
plus authorization and failure atomicity."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Daemon, fsck_erofs, run_cfsctl, tree_listing
from tests.otheruser import NOBODY, as_nobody, other_user_marks

HEX = set("0123456789abcdef")


def create_test_rootfs(parent: Path) -> Path:
    """composefs-rs ``create_test_rootfs``."""
    root = parent / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "etc").mkdir(parents=True)
    (root / "usr/bin/hello").write_bytes(b"x" * 128 * 1024)
    (root / "usr/lib/readme.txt").write_bytes(b"test fixture\n")
    (root / "etc/hostname").write_bytes(b"integration-test\n")
    return root


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return create_test_rootfs(tmp_path)


def cfs(daemon: Daemon, *args: str, check: bool = True, **kw: object
        ) -> subprocess.CompletedProcess[bytes]:
    return run_cfsctl(*args, address=daemon.address, check=check, **kw)  # type: ignore[arg-type]


def out(daemon: Daemon, *args: str) -> str:
    return cfs(daemon, *args).stdout.decode()


def v2_repo(daemon: Daemon, path: Path, *extra: str) -> str:
    """``init_insecure_repo`` of the upstream tests (V2 so pinned digests stay valid)."""
    out(daemon, "--repo", str(path), "init", "--insecure", "--erofs-version", "2", *extra)
    return str(path)


def listing(repo: Path | str) -> dict[str, tuple[int, int, str]]:
    """tree_listing without the objects/ directory itself (created lazily, empty is fine)."""
    return {k: v for k, v in tree_listing(Path(repo)).items() if k != "objects"}


def object_file(repo: str, image_id: str) -> Path:
    return Path(repo) / "objects" / image_id[:2] / image_id[2:]


def test_create_image_twice_and_list_objects(shared_daemon: Daemon, tmp_path: Path,
                                            rootfs: Path) -> None:
    repo = v2_repo(shared_daemon, tmp_path / "repo")
    id1 = out(shared_daemon, "--insecure", "--repo", repo, "create-image", str(rootfs),
              "my-image").strip()
    id2 = out(shared_daemon, "--insecure", "--repo", repo, "create-image", str(rootfs)).strip()
    assert id1 == id2 and id1.startswith("sha512:") and len(id1) == 7 + 128
    objects = out(shared_daemon, "--repo", repo, "image-objects", "refs/my-image").split()
    assert len(objects) == 1 and objects[0].startswith("sha512:")
    assert object_file(repo, objects[0][7:]).read_bytes() == b"x" * 128 * 1024
    assert os.readlink(Path(repo, "images/refs/my-image")) == f"../{id1[7:]}"
    fsck_erofs(object_file(repo, id1[7:]), extract=True)
    report = json.loads(out(shared_daemon, "--repo", repo, "fsck", "--json"))
    assert report["ok"] and report["images_checked"] == 1 and report["objects_checked"] == 2


def test_gc_after_create_image(shared_daemon: Daemon, tmp_path: Path, rootfs: Path) -> None:
    repo = v2_repo(shared_daemon, tmp_path / "repo")
    out(shared_daemon, "--insecure", "--repo", repo, "create-image", str(rootfs), "my-image")
    assert out(shared_daemon, "--insecure", "--repo", repo, "gc", "--dry-run").startswith(
        "Dry run")
    dry = json.loads(out(shared_daemon, "--insecure", "--json", "--repo", repo, "gc",
                         "--dry-run"))
    assert dry["dry_run"] is True and dry["result"]["objects_removed"] == 0, dry  # tagged
    assert out(shared_daemon, "--repo", repo, "image-objects", "refs/my-image").strip()
    repo2 = v2_repo(shared_daemon, tmp_path / "repo2")
    image = out(shared_daemon, "--insecure", "--repo", repo2, "create-image", str(rootfs))
    hello = out(shared_daemon, "--repo", repo2, "image-objects", image.strip()[7:]).split()
    assert len(hello) == 1
    # untagged: the image and usr/bin/hello (the two small files are inline) both go
    gc = json.loads(out(shared_daemon, "--insecure", "--json", "--repo", repo2, "gc"))
    assert gc["dry_run"] is False
    assert gc["result"]["objects_removed"] == 2 and gc["result"]["images_pruned"] == 1, gc
    assert not object_file(repo2, image.strip()[7:]).exists()
    assert not object_file(repo2, hello[0][7:]).exists()
    again = json.loads(out(shared_daemon, "--insecure", "--json", "--repo", repo2, "gc"))
    assert again["result"]["objects_removed"] == 0, again


def test_dump_files(shared_daemon: Daemon, tmp_path: Path, rootfs: Path) -> None:
    repo = v2_repo(shared_daemon, tmp_path / "repo")
    out(shared_daemon, "--insecure", "--repo", repo, "create-image", str(rootfs), "my-image")
    line = out(shared_daemon, "--insecure", "--repo", repo, "dump-files", "refs/my-image",
               "/usr/bin/hello", "--backing-path-only")
    path = line.split()[1]
    assert path != "inline"
    obj = Path(repo, "objects", path.lstrip("/"))
    assert hashlib.sha512(obj.read_bytes()).digest() == hashlib.sha512(
        (rootfs / "usr/bin/hello").read_bytes()).digest()
    line = out(shared_daemon, "--repo", repo, "dump-files", "refs/my-image",
               "/usr/lib/readme.txt", "--backing-path-only")
    assert line == "/usr/lib/readme.txt inline\n"
    # dumpfile lines; a directory lists itself and everything below it, pre-order
    lines = out(shared_daemon, "--repo", repo, "dump-files", "refs/my-image", "/usr",
                "/etc/hostname").splitlines()
    assert [x.split()[0] for x in lines] == [
        "/usr", "/usr/bin", "/usr/bin/hello", "/usr/lib", "/usr/lib/readme.txt",
        "/etc/hostname"]
    assert lines[4].split()[1:4] == ["13", "100644", "1"]
    assert lines[4].split()[9] == "test\\x20fixture\\n"
    p = cfs(shared_daemon, "--repo", repo, "dump-files", "refs/my-image", "/usr",
            "--backing-path-only", check=False)
    assert p.returncode == 1 and "is a directory" in p.stderr.decode()
    p = cfs(shared_daemon, "--repo", repo, "dump-files", "refs/my-image", "/nope",
            check=False)
    assert p.returncode == 1 and "/nope not found" in p.stderr.decode()
    p = cfs(shared_daemon, "--repo", repo, "dump-files", "refs/other", "/usr", check=False)
    assert p.returncode == 1 and "no such image" in p.stderr.decode()


def test_hash_and_erofs_versions(shared_daemon: Daemon, tmp_path: Path,
                                 rootfs: Path) -> None:
    r256 = str(tmp_path / "r256")
    r512 = str(tmp_path / "r512")
    out(shared_daemon, "--insecure", "--repo", r256, "init", "--algorithm",
        "fsverity-sha256-12")
    out(shared_daemon, "--insecure", "--repo", r512, "init")
    id256 = out(shared_daemon, "--repo", r256, "create-image", str(rootfs)).strip()
    id512 = out(shared_daemon, "--repo", r512, "create-image", str(rootfs)).strip()
    assert id256.startswith("sha256:") and id512.startswith("sha512:")
    # compute-id: hash from the repository's meta.json, EROFS V1 unless told otherwise
    assert out(shared_daemon, "--repo", r256, "compute-id", str(rootfs)).strip() == id256[7:]
    nr = ["--no-repo", "compute-id", "--no-propagate-usr-to-root", str(rootfs)]
    v1 = out(shared_daemon, "--no-repo", "--erofs-version", "1", *nr[1:]).strip()
    v2 = out(shared_daemon, "--no-repo", "--erofs-version", "2", *nr[1:]).strip()
    dflt = out(shared_daemon, *nr).strip()
    assert v1 != v2 and v1 == dflt and len(dflt) == 128 and set(dflt) <= HEX
    # an uninitialized --repo gives the same as --no-repo
    empty = tmp_path / "not-a-repo"
    empty.mkdir()
    assert out(shared_daemon, "--insecure", "--repo", str(empty), *nr[1:]).strip() == dflt
    assert out(shared_daemon, "--no-repo", "--hash", "sha256", *nr[1:]).strip() != dflt
    # create-image: the repository's default format wins, the global flag overrides it
    repo = v2_repo(shared_daemon, tmp_path / "v2")
    img1 = out(shared_daemon, "--insecure", "--erofs-version", "1", "--repo", repo,
               "create-image", str(rootfs)).strip()
    img1b = out(shared_daemon, "--insecure", "--erofs-version", "1", "--repo", repo,
                "create-image", str(rootfs)).strip()
    img2 = out(shared_daemon, "--insecure", "--erofs-version", "2", "--repo", repo,
               "create-image", str(rootfs)).strip()
    imgd = out(shared_daemon, "--insecure", "--repo", repo, "create-image",
               str(rootfs)).strip()
    assert img1 == img1b and img1 != img2 and img2 == imgd
    v1repo = str(tmp_path / "v1")
    out(shared_daemon, "--repo", v1repo, "init", "--insecure", "--erofs-version", "1")
    assert "v1_erofs" in Path(v1repo, "meta.json").read_text()
    d1 = out(shared_daemon, "--insecure", "--repo", v1repo, "create-image", str(rootfs))
    e1 = out(shared_daemon, "--insecure", "--erofs-version", "1", "--repo", v1repo,
             "create-image", str(rootfs))
    e2 = out(shared_daemon, "--insecure", "--erofs-version", "2", "--repo", v1repo,
             "create-image", str(rootfs))
    assert d1 == e1 != e2
    for version in ("0", "1", "2"):
        i = out(shared_daemon, "--erofs-version", version, "--repo", v1repo, "create-image",
                str(rootfs)).strip()
        fsck_erofs(object_file(v1repo, i[7:]), extract=True)


def test_all_format_versions_committed(shared_daemon: Daemon, tmp_path: Path,
                                       rootfs: Path) -> None:
    repo = tmp_path / "multi"
    out(shared_daemon, "--repo", str(repo), "init", "--insecure")
    meta = json.loads((repo / "meta.json").read_text())
    meta["erofs_formats"] = {"default": 1, "extra": [2]}
    (repo / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    reply = json.loads(out(shared_daemon, "--json", "--repo", str(repo), "create-image",
                           str(rootfs), "both"))
    assert [i["version"] for i in reply["images"]] == [1, 2]
    assert reply["image_id"] == reply["images"][0]["image_id"]
    for i in reply["images"]:
        assert (repo / "images" / i["image_id"]).is_symlink()
    assert os.readlink(repo / "images/refs/both") == "../" + reply["image_id"]


def test_xattr_modes(shared_daemon: Daemon, tmp_path: Path, rootfs: Path) -> None:
    target = rootfs / "usr/lib/readme.txt"
    try:
        os.setxattr(target, "user.probe", b"1")
        os.removexattr(target, "user.probe")
    except OSError:
        pytest.skip("no user xattrs here")
    plain = out(shared_daemon, "--no-repo", "compute-id", str(rootfs)).strip()
    os.setxattr(target, "user.testxattr", b"testvalue")
    default = out(shared_daemon, "--no-repo", "compute-id", str(rootfs)).strip()
    kept = out(shared_daemon, "--no-repo", "compute-id", "--xattrs", "keep-user-xattrs",
               str(rootfs)).strip()
    assert plain == default != kept
    dump = out(shared_daemon, "--no-repo", "create-dumpfile", "--no-propagate-usr-to-root",
               str(rootfs))
    assert "user.testxattr=testvalue" in dump


def test_create_dumpfile_and_no_repo(shared_daemon: Daemon, tmp_path: Path,
                                     rootfs: Path) -> None:
    dump = out(shared_daemon, "--no-repo", "create-dumpfile", "--no-propagate-usr-to-root",
               str(rootfs))
    assert "/usr/bin/hello" in dump and "/etc/hostname" in dump
    lines = dump.splitlines()
    assert lines[0].split()[0] == "/" and lines[1].split()[0] == "/etc"
    hello = next(x for x in lines if x.startswith("/usr/bin/hello "))
    digest = hello.split()[10]
    assert len(digest) == 128 and hello.split()[8] == f"{digest[:2]}/{digest[2:]}"
    # the OCI transform copies /usr's metadata to / (here: the same mode anyway)
    assert out(shared_daemon, "--no-repo", "create-dumpfile", str(rootfs)).count("\n") == 8
    p = cfs(shared_daemon, "--no-repo", "create-image", "--no-propagate-usr-to-root",
            str(rootfs), check=False)
    assert p.returncode == 1 and "--no-repo is only supported" in p.stderr.decode()
    p = cfs(shared_daemon, "--no-repo", "gc", check=False)
    assert p.returncode == 1


def test_bad_inputs(shared_daemon: Daemon, tmp_path: Path, rootfs: Path) -> None:
    repo = str(tmp_path / "repo")
    out(shared_daemon, "--repo", repo, "init", "--insecure")
    before = listing(repo)
    no_usr = tmp_path / "plain"
    no_usr.mkdir()
    (no_usr / "f").write_bytes(b"z" * 1000)
    cases = [
        (["create-image", "--bootable", str(rootfs)], "boot transforms"),
        (["create-image", str(no_usr)], "/usr must exist"),
        (["create-image", str(tmp_path / "missing")], "No such file or directory"),
        (["create-image", str(rootfs / "etc/hostname")], "Not a directory"),
        (["create-image", str(rootfs), "../escape"], "invalid ref name"),
        (["compute-id", "--bootable", str(rootfs)], "boot transforms"),
    ]
    for args, message in cases:
        p = cfs(shared_daemon, "--repo", repo, *args, check=False)
        assert p.returncode == 1, args
        err = p.stderr.decode()
        assert message in err and err.count("\n") == 1, (args, err)
    p = cfs(shared_daemon, "--repo", repo, "create-image", "--xattrs", "all", str(rootfs),
            check=False)
    assert p.returncode == 2
    assert listing(repo) == before


# --------------------------------------------------------------------------- other users


def _world_tree(world: Path, name: str) -> Path:
    root = world / name
    (root / "usr").mkdir(parents=True)
    (root / "usr/public").write_bytes(b"p" * 5000)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def other_user(f):  # noqa: ANN001, ANN201
    for mark in other_user_marks:
        f = mark(f)
    return f


@other_user
def test_other_user_reads_only_what_it_may(world: Path, open_daemon: Daemon) -> None:
    root = _world_tree(world, "tree-private")
    secret = root / "usr" / "zz-secret"
    secret.mkdir(mode=0o700)
    (secret / "key").write_bytes(b"s" * 100)
    p = as_nobody(world, open_daemon, "--no-repo", "compute-id", str(root))
    assert p.returncode == 1 and "permission denied" in p.stderr.decode().lower()
    secret.chmod(0o755)
    (secret / "key").chmod(0o600)
    p = as_nobody(world, open_daemon, "--no-repo", "compute-id", str(root))
    assert p.returncode == 1 and "permission denied" in p.stderr.decode().lower()
    assert "zz-secret/key" in p.stderr.decode()
    (secret / "key").chmod(0o644)
    p = as_nobody(world, open_daemon, "--no-repo", "compute-id", str(root))
    assert p.returncode == 0, p.stderr
    # its own repository: objects and images are written as the caller
    home = world / "home-img"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    repo = home / "repo"
    assert as_nobody(world, open_daemon, "--repo", str(repo), "init", "--insecure").returncode == 0
    (secret / "key").chmod(0o600)
    before = listing(repo)
    p = as_nobody(world, open_daemon, "--repo", str(repo), "create-image", str(root), "n")
    assert p.returncode == 1 and "permission denied" in p.stderr.decode().lower()
    assert listing(repo) == before            # nothing staged became visible
    (secret / "key").chmod(0o644)
    p = as_nobody(world, open_daemon, "--repo", str(repo), "create-image", str(root), "n")
    assert p.returncode == 0, p.stderr
    owners = {(st.st_uid, st.st_gid) for st in (os.lstat(x) for x in [repo, *repo.rglob("*")])}
    assert owners == {(NOBODY, NOBODY)}
    # someone else's repository: refused
    p = as_nobody(world, open_daemon, "--repo", str(world / "home-img"), "create-image",
                  str(root))
    assert p.returncode == 1

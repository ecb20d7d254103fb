"""The kernel decides what a caller may touch through a root daemon (issue: ACLs, readers,
relative paths, races, identity leaks).

Every case runs as another user against a root daemon, both through cfsctl (which opens
what it names and passes fds) and through a client that cannot pass fds (one connection per
call, as varlinkctl), whose paths the daemon's opener helper opens as the caller.  The
permissions come from real POSIX ACLs (setfacl), which the old mode-bit emulation ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, run_cfsctl, wait_for_socket
from tests.ocitools import Registry, build_image
from tests.otheruser import NOBODY, as_nobody, other_user_marks, run_as

pytestmark = other_user_marks
OWNER = 4243            # a user that owns repositories readers look at
GROUP = 4242            # a supplementary group granted access by ACLs
SECRET = b"s3cret-" + b"x" * 20
BIG_SECRET = b"BIGSECRET" * 456         # stored as an object (> 64 bytes)
R = "org.composefs.Repository."
OCI = "org.composefs.Oci."


def setfacl(*args: str) -> None:
    subprocess.run(["setfacl", *args], check=True)


def raw(world: Path, daemon: Daemon, calls: list[Any], *, cwd: str | Path = "/",
        groups: tuple[int, ...] = (), uid: int = NOBODY) -> list[dict[str, Any]]:
    """Calls from a client that passes no fds, run as *uid*."""
    p = run_as(world, daemon, [str(world / "lib" / "varlink_calls.py"), daemon.address],
               input=json.dumps(calls).encode(), cwd=cwd, groups=groups, uid=uid)
    assert p.returncode == 0, p.stderr.decode()
    return json.loads(p.stdout)


def errname(reply: dict[str, Any]) -> str:
    return str(reply.get("error", "")).rsplit(".", 1)[-1]


def listing(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path below *root*: (mode, uid, gid, content hash or link target)."""
    out = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        if p.is_symlink():
            what = "-> " + os.readlink(p)
        elif p.is_file():
            what = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            what = ""
        out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, what)
    return out


def user_dir(world: Path, name: str, uid: int = NOBODY) -> Path:
    d = world / name
    d.mkdir()
    os.chown(d, uid, uid)
    return d


@pytest.fixture(scope="module")
def acl_tree(world: Path) -> Path:
    """A tree nobody may list and read except for ``usr/secret``, which an ACL denies."""
    t = world / "acl-tree"
    (t / "usr" / "secret").mkdir(parents=True)
    (t / "usr" / "ok").write_bytes(b"fine")
    (t / "usr" / "secret" / "small").write_bytes(SECRET)
    (t / "usr" / "secret" / "big").write_bytes(BIG_SECRET)
    for p in [t, *t.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    setfacl("-m", f"u:{NOBODY}:---", str(t / "usr" / "secret"))
    return t


@pytest.fixture(scope="module")
def nobody_repo(world: Path, open_daemon: Daemon) -> Path:
    home = user_dir(world, "nobody-home")
    repo = home / "repo"
    p = as_nobody(world, open_daemon, "--repo", str(repo), "init", "--insecure")
    assert p.returncode == 0, p.stderr
    tree = home / "tree"
    (tree / "usr").mkdir(parents=True)
    (tree / "usr" / "f").write_bytes(b"y" * 100)
    for q in [tree, *tree.rglob("*")]:
        os.chown(q, NOBODY, NOBODY)
    p = as_nobody(world, open_daemon, "--repo", str(repo), "create-image", str(tree), "t")
    assert p.returncode == 0, p.stderr     # objects/ exists from here on
    return repo


def test_acl_denied_tree_is_not_read(world: Path, open_daemon: Daemon, acl_tree: Path,
                                     nobody_repo: Path) -> None:
    """cat is denied, so is every method that would read the tree for the caller."""
    check = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                            "--clear-groups", "cat", str(acl_tree / "usr/secret/small")],
                           capture_output=True)
    assert check.returncode != 0          # the kernel says no to the user directly
    store = user_dir(world, "nobody-store")
    before = listing(nobody_repo)
    for args in (["create-dumpfile", str(acl_tree)], ["compute-id", str(acl_tree)],
                 ["create-image", str(acl_tree), "img"],
                 ["mkcomposefs", "--digest-store", str(store / "s"), str(acl_tree),
                  str(store / "img")]):
        p = as_nobody(world, open_daemon, "--repo", str(nobody_repo), *args)
        assert p.returncode != 0, args
        assert b"permission denied" in p.stderr.lower(), (args, p.stderr)
        assert SECRET not in p.stdout and b"BIGSECRET" not in p.stdout
    assert listing(nobody_repo) == before
    assert not any(BIG_SECRET == f.read_bytes() for f in store.rglob("*") if f.is_file())
    # the same without fd passing: the opener helper and the scan act as nobody
    replies = raw(world, open_daemon, [
        [R + "ComputeId", {"path": str(acl_tree)}],
        [R + "Mkcomposefs", {"source": str(acl_tree), "digest_store": str(store / "s2")}],
        [[R + "OpenRepository", {"path": str(nobody_repo)}],
         [R + "CreateImage", {"handle": "$handle", "path": str(acl_tree), "name": "x"}]]])
    assert [errname(r) for r in replies] == ["PermissionDenied", "PermissionDenied", "",
                                            "PermissionDenied"], replies
    assert listing(nobody_repo) == before
    assert not any(BIG_SECRET == f.read_bytes() for f in store.rglob("*") if f.is_file())
    # and a readable tree works for the same caller, proving the denial is the ACL's
    ok = world / "acl-tree-ok"
    (ok / "usr").mkdir(parents=True)
    (ok / "usr" / "f").write_bytes(BIG_SECRET)
    for p in [ok, *ok.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    p = as_nobody(world, open_daemon, "--repo", str(nobody_repo), "create-dumpfile", str(ok))
    assert p.returncode == 0, p.stderr
    assert b"/usr/f 4104" in p.stdout


def _layout_and_archive(world: Path, name: str) -> tuple[Path, Path]:
    layout = world / name
    build_image(layout, "v1", {"usr/bin/a": os.urandom(5000), "etc/b": b"b"})
    archive = world / f"{name}.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(archive), "."], check=True)
    for p in [layout, *layout.rglob("*"), archive]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return layout, archive


def test_acl_denied_layout_and_archive(world: Path, open_daemon: Daemon,
                                       nobody_repo: Path) -> None:
    layout, archive = _layout_and_archive(world, "acl-layout")
    setfacl("-m", f"u:{NOBODY}:---", str(layout / "blobs" / "sha256"))
    setfacl("-m", f"u:{NOBODY}:---", str(archive))
    before = listing(nobody_repo)
    for ref in (f"oci:{layout}:v1", f"oci-archive:{archive}:v1"):
        p = as_nobody(world, open_daemon, "--repo", str(nobody_repo), "oci", "pull", ref, "x")
        assert p.returncode != 0 and b"permission denied" in p.stderr.lower(), p.stderr
        (r,) = raw(world, open_daemon, [[[R + "OpenRepository", {"path": str(nobody_repo)}],
                                         [OCI + "Pull", {"handle": "$handle", "image": ref,
                                                       "local_fetch": "disabled",
                                                       "bootable": False}]]])[1:]
        assert errname(r) == "PermissionDenied", r
    assert listing(nobody_repo) == before
    # root pulls the same layout: the ACL was the only obstacle
    root_repo = world / "root-pull-repo"
    run_cfsctl("--repo", str(root_repo), "init", "--insecure", address=open_daemon.address)
    run_cfsctl("--repo", str(root_repo), "oci", "pull", f"oci:{layout}:v1", "x",
               address=open_daemon.address)


def test_group_acl_grants_more_than_mode_bits(world: Path, open_daemon: Daemon) -> None:
    """A 0600 file and a 0700 directory readable through a group ACL of a supplementary
    group: allowed with the group, refused without it."""
    t = world / "group-tree"
    (t / "usr").mkdir(parents=True)
    (t / "usr" / "f").write_bytes(BIG_SECRET)
    t.chmod(0o755)
    (t / "usr").chmod(0o700)
    (t / "usr" / "f").chmod(0o600)
    setfacl("-m", f"g:{GROUP}:r-x", str(t / "usr"))
    setfacl("-m", f"g:{GROUP}:r--", str(t / "usr" / "f"))
    _, archive = _layout_and_archive(world, "group-layout")
    archive.chmod(0o600)
    setfacl("-m", f"g:{GROUP}:r--", str(archive))
    home = user_dir(world, "group-home")
    repo = home / "repo"
    assert as_nobody(world, open_daemon, "--repo", str(repo), "init", "--insecure").returncode == 0
    for groups, ok in (((GROUP,), True), ((), False)):
        p = as_nobody(world, open_daemon, "create-dumpfile", str(t), groups=groups)
        assert (p.returncode == 0) == ok, p.stderr
        (r,) = raw(world, open_daemon, [[R + "ComputeId", {"path": str(t)}]], groups=groups)
        assert (errname(r) == "") == ok, r
        p = as_nobody(world, open_daemon, "--repo", str(repo), "oci", "pull",
                      f"oci-archive:{archive}:v1", f"g{ok}", groups=groups)
        assert (p.returncode == 0) == ok, p.stderr
        (r,) = raw(world, open_daemon, [[[R + "OpenRepository", {"path": str(repo)}],
                                         [OCI + "Pull", {"handle": "$handle",
                                                       "image": f"oci-archive:{archive}:v1",
                                                       "name": f"raw{ok}",
                                                       "local_fetch": "disabled",
                                                       "bootable": False}]]],
                   groups=groups)[1:]
        assert (errname(r) == "") == ok, r


@pytest.fixture(scope="module")
def image_repo(world: Path, open_daemon: Daemon, nobody_repo: Path) -> str:
    """nobody's repository holding an image ``img`` (with a hardlink in a 0000 directory)."""
    layout = world / "nobody-layout"

    def locked(root: Path) -> None:
        (root / "usr" / "locked" / "inner").mkdir(parents=True)
        (root / "usr" / "locked" / "data").write_bytes(BIG_SECRET)
        (root / "usr" / "locked" / "inner" / "data2").write_bytes(BIG_SECRET[::-1])
        os.link(root / "usr" / "locked" / "data", root / "usr" / "link")
        # sorted after "locked": its first copy is written inside the locked directories
        os.link(root / "usr" / "locked" / "inner" / "data2", root / "usr" / "zlink")
        (root / "usr" / "locked" / "inner").chmod(0)
        (root / "usr" / "locked").chmod(0)

    build_image(layout, "v1", {"etc/b": b"b"}, customize=locked)
    for p in [layout, *layout.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    p = as_nobody(world, open_daemon, "--repo", str(nobody_repo), "oci", "pull",
                  f"oci:{layout}:v1", "img")
    assert p.returncode == 0, p.stderr
    return str(nobody_repo)


def test_acl_read_only_directory_cannot_be_written(world: Path, open_daemon: Daemon,
                                                   image_repo: str) -> None:
    """Mode 0777 but an ACL makes it read-only for nobody: nothing is created in it, also
    through a symlink nobody planted."""
    target = world / "acl-ro"
    target.mkdir()
    target.chmod(0o777)
    setfacl("-m", f"u:{NOBODY}:r-x", str(target))
    home = user_dir(world, "planter")
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                    "ln", "-s", str(target), str(home / "link")], check=True)
    src = world / "small-src"
    (src / "usr").mkdir(parents=True)
    (src / "usr" / "f").write_bytes(BIG_SECRET)
    for p in [src, *src.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    for base in (target, home / "link"):
        for args in (["--repo", image_repo, "oci", "checkout", "img", str(base / "co")],
                     ["--repo", str(base / "repo"), "init", "--insecure"],
                     ["mkcomposefs", "--digest-store", str(base / "store"), str(src),
                      str(home / "img")],
                     ["--repo", image_repo, "oci", "create-delta", "img", "img",
                      str(base / "d.tar")]):
            p = as_nobody(world, open_daemon, *args)
            assert p.returncode != 0, args
            assert b"permission denied" in p.stderr.lower(), (args, p.stderr)
        replies = raw(world, open_daemon, [
            [R + "InitRepository", {"path": str(base / "repo"), "insecure": True}],
            [R + "Mkcomposefs", {"source": str(src), "digest_store": str(base / "store")}],
            [[R + "OpenRepository", {"path": image_repo}],
             [OCI + "Checkout", {"handle": "$handle", "image": "img",
                               "directory": str(base / "co")}],
             [OCI + "CreateDelta", {"handle": "$handle", "old": "img", "new": "img",
                                  "output": str(base / "d.tar")}]]])
        assert [errname(r) for r in replies] == ["PermissionDenied", "PermissionDenied", "",
                                                "PermissionDenied", "PermissionDenied"], \
            replies
    assert list(target.iterdir()) == []


def test_checkout_hardlink_into_mode_0000_directory(world: Path, open_daemon: Daemon,
                                                   image_repo: str) -> None:
    home = user_dir(world, "co-home")
    p = as_nobody(world, open_daemon, "--repo", image_repo, "oci", "checkout", "img",
                  str(home / "out"))
    assert p.returncode == 0, p.stderr
    out = home / "out"
    assert (out / "usr" / "locked").stat().st_mode & 0o7777 == 0
    assert (out / "usr" / "link").read_bytes() == BIG_SECRET
    assert (out / "usr" / "link").stat().st_nlink == 2
    assert (out / "usr" / "zlink").read_bytes() == BIG_SECRET[::-1]
    assert (out / "usr" / "zlink").stat().st_nlink == 2
    assert {(st.st_uid, st.st_gid) for st in (p.lstat() for p in [out, *out.rglob("*")])} \
        == {(NOBODY, NOBODY)}


@pytest.fixture(scope="module")
def owner_repos(world: Path, open_daemon: Daemon) -> dict[str, Path]:
    """Repositories of OWNER: fresh (no objects/), legacy (no meta.json), populated."""
    home = user_dir(world, "owner-home", OWNER)
    home.chmod(0o755)
    repos = {k: home / k for k in ("fresh", "legacy", "populated")}
    layout, _ = _layout_and_archive(world, "owner-layout")
    for name, repo in repos.items():
        p = as_nobody(world, open_daemon, "--repo", str(repo), "init", "--insecure", uid=OWNER)
        assert p.returncode == 0, p.stderr
        repo.chmod(0o755)
        if name != "fresh":
            p = as_nobody(world, open_daemon, "--repo", str(repo), "oci", "pull",
                          f"oci:{layout}:v1", "img", uid=OWNER)
            assert p.returncode == 0, p.stderr
        if name == "legacy":
            (repo / "meta.json").unlink()
    for repo in repos.values():
        for p in repo.rglob("*"):
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)
    assert not (repos["fresh"] / "objects").exists()
    return repos


@pytest.mark.parametrize("kind", ["fresh", "legacy", "populated"])
def test_readers_leave_repository_unchanged(world: Path, open_daemon: Daemon,
                                            owner_repos: dict[str, Path], kind: str) -> None:
    repo = owner_repos[kind]
    before = listing(repo)
    commands = [["fsck"], ["images"], ["oci", "images"], ["oci", "fsck"]]
    if kind != "fresh":
        layer = next(n for n in os.listdir(repo / "streams") if n.startswith("oci-layer-"))
        commands.append(["cat", layer])
    for uid in (NOBODY, 0):
        for args in commands:
            if uid == 0:
                p = run_cfsctl("--repo", str(repo), *args, address=open_daemon.address,
                               check=False)
            else:
                p = as_nobody(world, open_daemon, "--repo", str(repo), *args)
            if kind == "legacy" and "fsck" in args:
                # a reader reports the missing meta.json instead of writing one
                assert p.returncode == 1 and b"meta.json" in p.stdout, (args, p.stdout)
            else:
                assert p.returncode == 0, (uid, args, p.stderr)
        replies = raw(world, open_daemon, [[[R + "OpenRepository", {"path": str(repo)}],
                                            [R + "Fsck", {"handle": "$handle"}],
                                            [OCI + "ListImages", {"handle": "$handle"}]]],
                      uid=uid)
        assert all("error" not in r for r in replies), replies
        assert listing(repo) == before, (uid, kind)


def test_relative_paths_against_a_daemon_elsewhere(world: Path, open_daemon: Daemon,
                                                  tmp_path: Path) -> None:
    """The daemon runs in /; paths are relative to the caller's directory, with cfsctl
    (fds) and without fds (the helper resolves them in the caller's working directory)."""
    work = user_dir(world, "relative")
    layout, archive = _layout_and_archive(world, "rel-layout")
    shutil.copytree(layout, work / "img")
    shutil.copy(archive, work / "v1.tar")
    src = work / "src" / "usr"
    src.mkdir(parents=True)
    (src / "f").write_bytes(BIG_SECRET)
    for p in [work, *work.rglob("*")]:
        os.chown(p, NOBODY, NOBODY)

    def cli(*args: str) -> None:
        p = as_nobody(world, open_daemon, *args, cwd=work)
        assert p.returncode == 0, (args, p.stderr)

    cli("--repo", "repo", "init", "--insecure")
    cli("--repo", "repo", "oci", "pull", "oci:img:v1", "a")
    cli("--repo", "repo", "oci", "pull", "oci-archive:v1.tar:v1", "b")
    cli("--repo", "repo", "create-image", "src", "tree")
    cli("--repo", "repo", "oci", "checkout", "a", "out")
    cli("--repo", "repo", "oci", "create-delta", "a", "b", "d.tar")
    cli("mkcomposefs", "--digest-store", "store", "src", "src.img")
    assert (work / "out" / "etc" / "b").read_bytes() == b"b"
    assert (work / "d.tar").is_file() and (work / "src.img").is_file()
    replies = raw(world, open_daemon, [
        [R + "InitRepository", {"path": "repo2", "insecure": True}],
        [R + "ComputeId", {"path": "src"}],
        [[R + "OpenRepository", {"path": "repo2"}],
         [OCI + "Pull", {"handle": "$handle", "image": "oci:img:v1", "name": "a2",
                         "local_fetch": "disabled", "bootable": False}],
         [OCI + "Checkout", {"handle": "$handle", "image": "a2", "directory": "out2"}]]],
        cwd=work)
    assert all("error" not in r for r in replies), replies
    assert (work / "out2" / "etc" / "b").read_bytes() == b"b"
    assert not Path("/repo2").exists() and not Path("/out2").exists()


def test_relative_paths_under_socket_activation(tmp_path: Path) -> None:
    sock = tmp_path / "act.sock"
    proc = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), sys.executable,
                             "-m", "cfsd"], cwd="/", stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(str(sock), proc)
        work = tmp_path / "w"
        work.mkdir()
        layout, _ = _layout_and_archive(tmp_path, "sa-layout")
        shutil.copytree(layout, work / "img")
        env = dict(os.environ, CFSD_ADDRESS=f"unix:{sock}", XDG_RUNTIME_DIR="/nonexistent")
        for args in (["--repo", "repo", "init", "--insecure"],
                     ["--repo", "repo", "oci", "pull", "oci:img:v1", "a"],
                     ["--repo", "repo", "oci", "checkout", "a", "out"]):
            p = subprocess.run([sys.executable, "-m", "cfsctl", *args], cwd=work, env=env,
                               capture_output=True, timeout=120)
            assert p.returncode == 0, (args, p.stderr)
        assert (work / "out" / "etc" / "b").read_bytes() == b"b"
    finally:
        proc.terminate()
        proc.wait(10)


RACE_SCRIPT = r"""
import json, os, socket, sys, threading, time
sys.path.insert(0, os.path.dirname(sys.argv[1]))
from varlink_calls import session
address, home, rootdir, image_repo, n = sys.argv[2:7]
x = os.path.join(home, "x")
stop = False
def swap():
    n = 0
    while not stop:
        for step in (lambda: os.mkdir(x), lambda: time.sleep(0.003),
                     lambda: os.rename(x, f"{x}.{n}"), lambda: os.symlink(rootdir, x),
                     lambda: time.sleep(0.003), lambda: os.unlink(x)):
            try:
                step()
            except OSError:
                pass
        n += 1
t = threading.Thread(target=swap)
t.start()
out = []
R = "org.composefs.Repository."
try:
    for i in range(int(n)):
        kind = i % 3
        if kind == 0:
            r = session(address, [[R + "InitRepository", {"path": x + f"/repo{i}",
                                                           "insecure": True}]])
        elif kind == 1:
            r = session(address, [[R + "Mkcomposefs", {"source": x,
                                                         "digest_store": x + "/store"}]])
        else:
            r = session(address, [[R + "OpenRepository", {"path": image_repo}],
                                  ["org.composefs.Oci.Checkout", {"handle": "$handle",
                                   "image": "img", "directory": x + f"/co{i}"}]])
        out.append(json.dumps(r))
finally:
    stop = True
    t.join()
print(json.dumps(out))
"""


def test_swapping_directory_for_symlink_race(world: Path, open_daemon: Daemon,
                                             image_repo: str) -> None:
    """1,000 calls while the caller swaps its directory for a symlink to a root-owned
    directory: nothing is created, chowned or read outside its reach."""
    rootdir = world / "root-owned"
    rootdir.mkdir()
    rootdir.chmod(0o755)
    (rootdir / "usr").mkdir()
    (rootdir / "usr" / "secret").write_bytes(BIG_SECRET)
    (rootdir / "usr" / "secret").chmod(0o600)
    before = listing(rootdir)
    home = user_dir(world, "racer")
    script = world / "lib" / "race.py"
    script.write_text(RACE_SCRIPT)
    script.chmod(0o644)
    started = time.monotonic()
    p = run_as(world, open_daemon, [str(script), str(world / "lib" / "varlink_calls.py"),
                                    open_daemon.address, str(home), str(rootdir),
                                    image_repo, "1000"])
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    results = json.loads(p.stdout)
    assert len(results) == 1000
    assert listing(rootdir) == before
    assert all(BIG_SECRET.hex() not in r for r in results)
    outcomes = [errname(json.loads(r)[-1]) for r in results]
    print({k: outcomes.count(k) for k in set(outcomes)})
    assert "PermissionDenied" in outcomes          # the symlink was met and refused
    assert "" in outcomes                          # and the directory was met and used
    # everything created below the caller's home is the caller's, and root chowned nothing
    for q in [home, *home.rglob("*")]:
        st = q.lstat()
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), q
    assert (rootdir / "usr").stat().st_uid == 0
    print(f"1000 racing calls in {time.monotonic() - started:.1f} s")


def test_interpreter_unreadable_to_the_caller(world: Path, open_daemon: Daemon) -> None:
    """The daemon's interpreter is unreadable to nobody: a user pull (registry) followed by
    root pulls works, nothing identity-dependent stays behind in the process."""
    python = os.path.realpath(sys.executable)
    stdlib = os.path.dirname(os.__file__)
    for path in (python, stdlib):
        probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                "--clear-groups", "test", "-r", path])
        assert probe.returncode != 0, f"{path} is readable by nobody: this test needs an " \
                                      "interpreter other users cannot read"
    layout, _ = _layout_and_archive(world, "reg-layout")
    registry = Registry()
    try:
        ref = registry.push(f"oci:{layout}:v1", "unreadable/img:v1")
        home = user_dir(world, "reg-home")
        repo = home / "repo"
        p = as_nobody(world, open_daemon, "--repo", str(repo), "init", "--insecure")
        assert p.returncode == 0, p.stderr
        p = as_nobody(world, open_daemon, "--repo", str(repo), "oci", "pull",
                      "--tls-verify=false", ref, "img")
        assert p.returncode == 0, p.stderr
        root_repo = world / "reg-root-repo"
        run_cfsctl("--repo", str(root_repo), "init", "--insecure", address=open_daemon.address)
        run_cfsctl("--repo", str(root_repo), "oci", "pull", "--tls-verify=false", ref, "img",
                   address=open_daemon.address)
        p = as_nobody(world, open_daemon, "--repo", str(repo), "oci", "pull",
                      f"oci:{layout}:v1", "img2")
        assert p.returncode == 0, p.stderr
    finally:
        registry.stop()
    assert open_daemon.alive()
    assert b"Traceback" not in open_daemon.log.read_bytes()


def test_handles_belong_to_their_user(world: Path, open_daemon: Daemon,
                                      owner_repos: dict[str, Path]) -> None:
    """A handle outlives its connection for its own user; another uid is refused it."""
    from tests.varlink_raw import Raw
    repo = owner_repos["populated"]
    c = Raw(open_daemon.sock)
    h = c.call(R + "OpenRepository", {"path": str(repo)})["parameters"]["handle"]
    c.close()
    (r,) = raw(world, open_daemon, [[R + "Fsck", {"handle": h}]])
    assert errname(r) == "InvalidHandle", r
    (r,) = raw(world, open_daemon, [[R + "Fsck", {"handle": h}]], uid=0)
    assert "error" not in r, r
    mine = raw(world, open_daemon, [[R + "OpenRepository", {"path": str(repo)}]])[0]
    hn = mine["parameters"]["handle"]
    (r,) = raw(world, open_daemon, [[OCI + "ListImages", {"handle": hn}]])
    assert "error" not in r, r       # nobody's own handle, from a new connection

"""``composefs-info`` and ``mount.composefs``, multi-call names of cfsctl, against C composefs
1.0.8: every pinned case of tests/data/composefs_info (stdout byte for byte, exit status,
C's stderr as one-line messages) through launchers named like the C tools and the real
daemon; real mounts as root; other users; typed errors for bad requests."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cfsctl.client import CallError, connect
from cfsd.core import fsverity
from tests.conftest import ROOT, Daemon, run_cfsctl
from tests.otheruser import as_nobody, other_user_marks

_spec = importlib.util.spec_from_file_location(
    "cinfo_generate", ROOT / "tests" / "data" / "composefs_info" / "generate.py")
assert _spec is not None and _spec.loader is not None
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

EXPECTED = gen.expected()
R = "org.composefs.Repository."
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
ROOT_ONLY = {"mount-missing-target"}     # non-root callers fail earlier (EPERM) than C root
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope="module")
def bindir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Launchers named composefs-info and mount.composefs (argv[0] selects the tool)."""
    d = tmp_path_factory.mktemp("bin")
    for tool in (gen.INFO, gen.MOUNT):
        p = d / tool
        p.write_text(f"#!{sys.executable}\nimport sys\nfrom cfsctl.main import main\n"
                     "sys.exit(main())\n")
        p.chmod(0o755)
    return d


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """The pinned cases' working directory, reachable by other users."""
    parent = Path(tempfile.mkdtemp(prefix="cfsd-cinfo-"))
    parent.chmod(0o755)
    work = parent / "work"
    gen.setup_workdir(work)
    yield work
    shutil.rmtree(parent)


def run(bindir: Path, daemon: Daemon, tool: str, *args: str, cwd: Path,
        stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, CFSD_ADDRESS=daemon.address, PYTHONPATH=str(ROOT))
    return subprocess.run([str(bindir / tool), *args], capture_output=True, env=env,
                          cwd=str(cwd), stdin=stdin, timeout=300)


def check(case: dict, stdout: bytes, status: int, stderr: str) -> None:
    want = EXPECTED[case["name"]]
    assert stdout == gen.expected_stdout(case["name"])
    assert status == want["status"], stderr
    assert stderr == gen.normalize_c_stderr(want["stderr"])


# --------------------------------------------------------------------------- pinned cases


@pytest.mark.parametrize("case", [c for c in gen.CASES if c["user"] is None],
                         ids=lambda c: c["name"])
def test_pinned_case(case: dict, shared_daemon: Daemon, bindir: Path, workdir: Path) -> None:
    if case["name"] in ROOT_ONLY and os.geteuid() != 0:
        pytest.skip("C ran as root")
    p = run(bindir, shared_daemon, case["tool"], *case["args"], cwd=workdir)
    check(case, p.stdout, p.returncode,
          p.stderr.decode().replace(str(bindir / case["tool"]), case["tool"]))
    assert not os.path.ismount(workdir / "mnt")


def _other_user(f):  # noqa: ANN001, ANN202
    for mark in other_user_marks:
        f = mark(f)
    return f


@_other_user
@pytest.mark.parametrize("case", [c for c in gen.CASES if c["user"] == "nobody"],
                         ids=lambda c: c["name"])
def test_pinned_case_as_nobody(case: dict, world: Path, open_daemon: Daemon,
                               workdir: Path) -> None:
    """The basedir is searched with the caller's rights (basedir/76 is root's); only root
    may mount (C: EPERM from the kernel, cfsd: the same message)."""
    p = as_nobody(world, open_daemon, case["tool"], *case["args"], cwd=workdir)
    check(case, p.stdout, p.returncode, p.stderr.decode())


def test_cfsctl_subcommand_and_pinned_data(shared_daemon: Daemon, workdir: Path) -> None:
    """``cfsctl [--address A] composefs-info …`` is the same tool; the pinned images are the
    ones C measured."""
    p = run_cfsctl("--address", shared_daemon.address, gen.INFO, "measure-file",
                   str(workdir / "basic.img"))
    assert p.stdout == gen.expected_stdout("measure-basic")
    for name in gen.NAMES:
        digest = fsverity.digest(gen.image_bytes(name), "sha256").hex()
        assert gen.expected_stdout(f"measure-{name}") == (digest + "\n").encode()
    p = run_cfsctl(gen.MOUNT, address=shared_daemon.address, check=False)
    assert p.returncode == 1 and p.stderr.startswith(b"No source path specified\n")


# --------------------------------------------------------------------------- real mounts


def _umount(path: Path) -> None:
    if _libc.umount2(os.fsencode(str(path)), 0) != 0:
        raise OSError(ctypes.get_errno(), f"umount {path}")


@contextlib.contextmanager
def mounted(bindir: Path, daemon: Daemon, cwd: Path, *args: str) -> Iterator[Path]:
    p = run(bindir, daemon, gen.MOUNT, *args, cwd=cwd)
    assert (p.returncode, p.stderr) == (0, b"")
    target = cwd / args[-1]
    try:
        assert os.path.ismount(target)
        yield target
    finally:
        _umount(target)
    assert not os.path.ismount(target)


def _mountinfo(target: Path) -> list[str]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(target):
            return fields
    raise AssertionError(f"{target} is not in mountinfo")


@pytest.fixture
def tree_image(tmp_path: Path, shared_daemon: Daemon) -> Path:
    """A small tree, its image (our mkcomposefs) and its objects in store/."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "small").write_bytes(b"hello\n")
    (tree / "sub" / "big").write_bytes(os.urandom(100_000))
    (tree / "sub" / "other").write_bytes(b"o" * 5000)
    os.symlink("sub/big", tree / "link")
    run_cfsctl("mkcomposefs", f"--digest-store={tmp_path / 'store'}", str(tree),
               str(tmp_path / "img"), address=shared_daemon.address)
    for d in ("mnt", "upper", "work"):
        (tmp_path / d).mkdir()
    return tmp_path


def _same_tree(a: Path, b: Path) -> None:
    for rel in ("small", "sub/big", "sub/other", "link"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert os.readlink(a / "link") == "sub/big"


@needs_root
def test_mount_reads_files(tree_image: Path, shared_daemon: Daemon, bindir: Path) -> None:
    t = tree_image
    store = sorted(str(p.relative_to(t / "store")) for p in (t / "store").rglob("*")
                   if p.is_file())
    p = run(bindir, shared_daemon, gen.INFO, "objects", "img", cwd=t)
    assert p.stdout.decode().split() == store
    p = run(bindir, shared_daemon, gen.INFO, "--basedir=store", "missing-objects", "img", cwd=t)
    assert (p.returncode, p.stdout) == (0, b"")
    with mounted(bindir, shared_daemon, t, "-t", "composefs", "-o", "basedir=store",
                 "img", "mnt") as mnt:
        _same_tree(mnt, t / "tree")
        fields = _mountinfo(mnt)
        sep = fields.index("-")
        assert fields[sep + 1:sep + 3] == ["overlay", "composefs"]
        # as C's: a read-only overlay superblock (no upperdir) on a mount without MS_RDONLY
        assert fields[5].split(",")[0] == "rw"
        assert {"ro", "metacopy=on", "redirect_dir=on"} <= set(fields[sep + 3].split(","))
        with pytest.raises(OSError) as e:
            (mnt / "new").write_bytes(b"x")
        assert e.value.errno == errno.EROFS


@needs_root
def test_mount_options(tree_image: Path, shared_daemon: Daemon, bindir: Path) -> None:
    t = tree_image
    # writable with upperdir/workdir; ro wins when given
    with mounted(bindir, shared_daemon, t, "-o", "basedir=store,upperdir=upper,workdir=work",
                 "img", "mnt") as mnt:
        (mnt / "new").write_bytes(b"written")
        _same_tree(mnt, t / "tree")
    assert (t / "upper" / "new").read_bytes() == b"written"
    with mounted(bindir, shared_daemon, t, "-o",
                 "upperdir=upper,workdir=work,basedir=store,rw,ro", "img", "mnt") as mnt:
        assert (mnt / "new").read_bytes() == b"written"
        with pytest.raises(OSError) as e:
            (mnt / "new2").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
    # objects spread over two basedirs (one with an escaped comma in its name)
    (t / "s,2").mkdir()
    for obj in sorted(p for p in (t / "store").rglob("*") if p.is_file())[::2]:
        dest = t / "s,2" / obj.relative_to(t / "store")
        dest.parent.mkdir(exist_ok=True)
        obj.rename(dest)
    with mounted(bindir, shared_daemon, t, "-o", "basedir=store:s\\,2", "img", "mnt") as mnt:
        _same_tree(mnt, t / "tree")
    p = run(bindir, shared_daemon, gen.INFO, "--basedir=store", "missing-objects", "img", cwd=t)
    assert p.stdout and p.returncode == 0


@needs_root
def test_mount_idmap(tree_image: Path, shared_daemon: Daemon, bindir: Path) -> None:
    """idmap=/proc/PID/ns/user: files (root's in the image) appear as the mapped ids."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import ctypes, sys, time\n"
         "if ctypes.CDLL(None).unshare(0x10000000): sys.exit(1)\n"
         "print('ok', flush=True)\ntime.sleep(120)\n"], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ok\n"
        Path(f"/proc/{child.pid}/uid_map").write_text("0 1000 1\n")
        Path(f"/proc/{child.pid}/gid_map").write_text("0 2000 1\n")
        with mounted(bindir, shared_daemon, tree_image, "-o",
                     f"basedir=store,idmap=/proc/{child.pid}/ns/user", "img", "mnt") as mnt:
            st = os.stat(mnt / "small")
            assert (st.st_uid, st.st_gid) == (1000, 2000)
            assert (mnt / "small").read_bytes() == b"hello\n"
        p = run(bindir, shared_daemon, gen.MOUNT, "-o", "basedir=store,idmap=/proc/self/ns/user",
                "img", "mnt", cwd=tree_image)
        assert p.returncode == 1
        assert p.stderr == b"mount.composefs: Failed to mount composefs img: " \
                           b"Operation not permitted\n"
    finally:
        child.kill()
        child.wait()


# --------------------------------------------------------------------------- bad requests


def test_bad_requests_get_typed_errors(shared_daemon: Daemon, workdir: Path) -> None:
    img = os.open(workdir / "basic.img", os.O_RDONLY)
    adir = os.open(workdir / "adir", os.O_RDONLY | os.O_DIRECTORY)
    null = os.open(os.devnull, os.O_WRONLY)

    def err(method: str, params: dict, fds: list[int]) -> tuple[str, str]:
        with connect(shared_daemon.address) as c, pytest.raises(CallError) as e:
            c.call(R + method, params, fds=fds)
        return e.value.short, str(e.value.parameters.get("message", ""))

    try:
        info = {"command": "ls", "images": ["basic.img"], "output_fd": 0, "images_fd": [1]}
        assert err("ComposefsInfo", dict(info, command="nope"), [null, img]) == (
            "InvalidSpec", "Unknown command 'nope'")
        assert err("ComposefsInfo", dict(info, command="measure-file"), [null, img]) == (
            "InvalidSpec", "Unknown command 'measure-file'")
        assert err("ComposefsInfo", dict(info, filters=["a/b"]), [null, img]) == (
            "InvalidSpec", "Filter must be a single name: a/b")
        assert err("ComposefsInfo", dict(info, images=[]), [null])[0] == "InvalidSpec"
        assert err("ComposefsInfo", dict(info, output_fd=None), [null, img])[0] \
            == "InvalidSpec"
        assert err("ComposefsInfo", dict(info, images_fd=[1, 2]), [null, img])[0] \
            == "InvalidSpec"
        assert err("ComposefsInfo", dict(info, images_fd=[5]), [null, img])[0] == "InvalidSpec"
        assert err("ComposefsInfo", dict(info, images_fd=[1]), [null, adir]) == (
            "InvalidData", "Failed to load 'basic.img': No such device")
        # without fds, paths are opened as the caller (relative to its working directory)
        assert err("ComposefsInfo", {"command": "ls", "images": ["/nonexistent"],
                                     "output_fd": 0}, [null]) == (
            "InvalidSpec", "Failed to open '/nonexistent': No such file or directory")
        assert err("ComposefsInfo", dict(info, basedir="/nonexistent"), [null, img]) == (
            "InvalidSpec", "Can't open basedir `/nonexistent`: No such file or directory")
        assert err("MeasureFile", {"path": "adir", "path_fd": 0}, [adir]) == (
            "InvalidData", "failed to measure 'adir': No data available")
        assert err("MeasureFile", {"path": "x", "path_fd": 3}, [img])[0] == "InvalidSpec"
        mount = {"image": "basic.img", "basedirs": ["adir"], "image_fd": 0,
                 "basedirs_fd": [1]}
        assert err("MountComposefs", dict(mount, basedirs=[], basedirs_fd=[]),
                   [img, adir]) == ("InvalidSpec", "No object dirs specified")
        assert err("MountComposefs", dict(mount, upperdir="adir"), [img, adir])[0] \
            == "InvalidSpec"
        assert err("MountComposefs", dict(mount, digest="xyz"), [img, adir]) == (
            "InvalidSpec", "Failed to mount composefs basic.img: Invalid argument")
        assert err("MountComposefs", dict(mount, image_fd=1, basedirs_fd=[0]),
                   [img, adir])[0] == "InvalidData"
        with connect(shared_daemon.address) as c:   # the daemon still serves
            reply = c.call(R + "MeasureFile", {"path": "basic.img", "path_fd": 0}, fds=[img])
        assert reply["digest"] + "\n" == gen.expected_stdout("measure-basic").decode()
    finally:
        for fd in (img, adir, null):
            os.close(fd)
    assert stat.S_ISSOCK(os.stat(shared_daemon.sock).st_mode)

"""The C-compatible mkcomposefs (``cfsctl mkcomposefs`` and argv[0] ``mkcomposefs``) through the
real daemon: golden.md 11 (directory mode, measured with C mkcomposefs), the C conformance
assets in --from-file mode, the C command line, the digest store and fsck.erofs."""

from __future__ import annotations

import hashlib
import os
import pty
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cfsd.core import fsverity
from tests.conftest import ROOT, Daemon, conformance_dir, fsck_erofs, run_cfsctl
from tests.otheruser import NOBODY, as_nobody, other_user_marks

COMPOSEFS_MAGIC = bytes.fromhex("d078629a")[::-1]   # 0xd078629a little-endian
EROFS_MAGIC = (0xE0F5E1E2).to_bytes(4, "little")
CONF = conformance_dir()
ASSETS = CONF / "assets" if CONF else Path("/nonexistent")
needs_conformance = pytest.mark.skipif(CONF is None, reason="conformance data not found")
NON_STRICT = {"no-newline.dump", "longlink.dump", "honggfuzz-longlink-unterminated.dump"}

# golden.md 11: the tree generator, verbatim
GOLDEN_TREE_SCRIPT = textwrap.dedent("""\
    import os, random, sys
    random.seed(1234); root = sys.argv[1]; os.makedirs(root)
    for d in range(100):
        dp = os.path.join(root, f'd{d:03d}'); os.mkdir(dp)
        for f in range(100):
            p = os.path.join(dp, f'f{f:03d}.txt')
            size = random.choice([0, 10, 50, 64, 65, 100, 500, 1000, 3000, 4096, 5000, 8000, 20000])
            with open(p, 'wb') as fh: fh.write(random.randbytes(size))
            os.utime(p, (1700000000, 1700000000))
        os.utime(dp, (1700000000, 1700000000))
    os.utime(root, (1700000000, 1700000000))
    """)
GOLDEN_DIGEST = "57638f8028bf03aac59d49db1c0243add02634ad3eba9e49ffe029ac90988ca7"
GOLDEN_EPOCH_DIGEST = "b8aa6525bd85b50bcfa1ca0be035870bbed545057fe73ca96b5f18a341d488a0"
GOLDEN_IMAGE_SHA256 = "70a79b70ef191700160248b61f5db2e68780c0022c98be07dd3eb7b9e3f52703"


def mk(daemon: Daemon, *args: str, check: bool = True, **kw: object
       ) -> subprocess.CompletedProcess[bytes]:
    return run_cfsctl("mkcomposefs", *args, address=daemon.address, check=check, **kw)  # type: ignore[arg-type]


def rootfs(parent: Path) -> Path:
    root = parent / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "usr/bin/hello").write_bytes(b"x" * 128 * 1024)
    (root / "usr/lib/readme.txt").write_bytes(b"test fixture\n")
    (root / "etc/hostname").write_bytes(b"integration-test\n")
    return root


# --------------------------------------------------------------------------- golden.md 11


@pytest.fixture(scope="module")
def golden_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("golden.md 11 needs root (files owned by uid/gid 0)")
    if sys.version_info[:2] != (3, 11):
        pytest.skip("golden.md 11 needs CPython 3.11 (random.randbytes/choice)")
    root = tmp_path_factory.mktemp("golden") / "root"

    def umask() -> None:
        os.umask(0o022)

    subprocess.run([sys.executable, "-c", GOLDEN_TREE_SCRIPT, str(root)], check=True,
                   preexec_fn=umask)
    if any(os.listxattr(p) for p in [root, root / "d000", root / "d000" / "f000.txt"]):
        pytest.skip("the filesystem adds xattrs to new files")
    return root


def test_golden_directory_digests(shared_daemon: Daemon, golden_tree: Path,
                                  tmp_path: Path) -> None:
    p = mk(shared_daemon, "--print-digest-only", str(golden_tree))
    assert p.stdout.decode() == GOLDEN_DIGEST + "\n"
    p = mk(shared_daemon, "--use-epoch", "--print-digest-only", str(golden_tree))
    assert p.stdout.decode() == GOLDEN_EPOCH_DIGEST + "\n"
    img = tmp_path / "img"
    mk(shared_daemon, str(golden_tree), str(img))
    data = img.read_bytes()
    # golden.md 11 lists this sha256 on the --use-epoch row, but an image has one sha256
    # and one fs-verity digest: 70a79b70… is the image whose fs-verity is 57638f80… (no
    # --use-epoch); the --use-epoch image's fs-verity is b8aa6525… as the row above says.
    assert hashlib.sha256(data).hexdigest() == GOLDEN_IMAGE_SHA256
    assert fsverity.digest(data, "sha256").hex() == GOLDEN_DIGEST
    assert abs(len(data) - 1_980_000) < 10_000
    fsck_erofs(img, extract=True)
    epoch = tmp_path / "epoch"
    p = mk(shared_daemon, "--use-epoch", "--print-digest", str(golden_tree), str(epoch))
    assert p.stdout.decode() == GOLDEN_EPOCH_DIGEST + "\n"
    assert fsverity.digest(epoch.read_bytes(), "sha256").hex() == GOLDEN_EPOCH_DIGEST
    # identical with a digest store; the store holds the 6 983 files over 64 bytes
    store = tmp_path / "store"
    stored = tmp_path / "stored"
    mk(shared_daemon, f"--digest-store={store}", str(golden_tree), str(stored))
    assert stored.read_bytes() == data
    objects = [p for p in store.rglob("*") if p.is_file()]
    assert len(objects) == 6983
    for obj in objects[:50]:
        name = f"{obj.parent.name}{obj.name}"
        assert fsverity.digest(obj.read_bytes(), "sha256").hex() == name
        assert stat.S_IMODE(obj.stat().st_mode) == 0o644
    assert not [p for p in store.iterdir() if p.name.startswith(".tmp")]
    # and again with the store populated (nothing copied), and with --threads
    mk(shared_daemon, "--digest-store", str(store), "--threads=1", str(golden_tree),
       str(stored))
    assert stored.read_bytes() == data


# --------------------------------------------------------------------------- --from-file


def _version_flags(asset: Path) -> list[str]:
    vfile = asset.with_name(asset.name + ".version")
    if not vfile.exists():
        return []
    v = vfile.read_text().strip()
    return [f"--min-version={v}", f"--max-version={v}"]


def _sha256_assets() -> list[str]:
    return sorted(p.name[:-len(".sha256")] for p in ASSETS.glob("*.dump.sha256"))


@needs_conformance
@pytest.mark.parametrize("name", _sha256_assets())
def test_conformance_assets(shared_daemon: Daemon, tmp_path: Path, name: str) -> None:
    asset = ASSETS / name
    env = {} if name in NON_STRICT else {"CFS_PARSE_STRICT": "1"}
    img = tmp_path / "img"
    mk(shared_daemon, *_version_flags(asset), "--from-file", "-", str(img),
       input=asset.read_bytes(), env=env)
    expected = (ASSETS / f"{name}.sha256").read_text().split()[0]
    assert hashlib.sha256(img.read_bytes()).hexdigest() == expected
    # plain fsck as upstream: --extract would read the 8 TiB sparse files of bigfile*
    fsck_erofs(img, extract=False)
    # a dump named by path, written to stdout
    p = mk(shared_daemon, *_version_flags(asset), "--from-file", str(asset), "-", env=env)
    assert p.stdout == img.read_bytes()


@needs_conformance
def test_should_fail_assets(shared_daemon: Daemon, tmp_path: Path) -> None:
    names = sorted(p.name for p in ASSETS.glob("should-fail-*.dump"))
    assert names
    for name in names:
        p = mk(shared_daemon, "--from-file", str(ASSETS / name), str(tmp_path / "out"),
               check=False)
        err = p.stderr.decode()
        assert p.returncode == 1, name
        assert err.startswith("mkcomposefs: ") and err.count("\n") == 1, (name, err)
    p = mk(shared_daemon, "--from-file", str(ASSETS / "should-fail-no-ftype.dump"),
           str(tmp_path / "out"), check=False)
    assert p.stderr.decode() == "mkcomposefs: Invalid mode 0\n"
    p = mk(shared_daemon, "--from-file", "-", str(tmp_path / "out"), input=b"", check=False)
    assert (p.returncode, p.stderr.decode()) == (1, "mkcomposefs: No files in dump file\n")


# --------------------------------------------------------------------------- command line


def test_upstream_mkcomposefs_tests(shared_daemon: Daemon, tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    cfs = tmp_path / "out.cfs"
    mk(shared_daemon, "--use-epoch", str(root), str(cfs))
    data = cfs.read_bytes()
    assert data[:4] == COMPOSEFS_MAGIC and data[0x400:0x404] == EROFS_MAGIC
    fsck_erofs(cfs, extract=True)
    digest = mk(shared_daemon, "--use-epoch", "--print-digest-only", str(root)).stdout
    assert digest.decode().strip() == fsverity.digest(data, "sha256").hex()
    cfs2 = tmp_path / "out2.cfs"
    mk(shared_daemon, "--use-epoch", str(root), str(cfs2))
    assert cfs2.read_bytes() == data
    # hardlinks: C does not preserve them; --hardlinks does (and differs)
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a").write_bytes(b"hello hardlink\n")
    os.link(d / "a", d / "b")
    no_hl, with_hl, no_hl2 = (tmp_path / n for n in ("no", "with", "no2"))
    mk(shared_daemon, "--use-epoch", str(d), str(no_hl))
    mk(shared_daemon, "--use-epoch", "--hardlinks", str(d), str(with_hl))
    mk(shared_daemon, "--use-epoch", str(d), str(no_hl2))
    assert no_hl.read_bytes() != with_hl.read_bytes()
    assert no_hl.read_bytes() == no_hl2.read_bytes()
    for img in (no_hl, with_hl):
        fsck_erofs(img, extract=True)


def test_options(shared_daemon: Daemon, tmp_path: Path) -> None:
    root = rootfs(tmp_path)

    def digest(*args: str) -> bytes:
        return mk(shared_daemon, "--use-epoch", *args, "--print-digest-only", str(root)).stdout

    base = digest()
    v1 = digest("--min-version=1", "--max-version", "1")
    assert base != v1 == digest("--min-version=1") == digest("--min-version=1",
                                                              "--max-version=0")
    assert digest("--max-version=1") == digest("--max-version=0") == base
    # GNU getopt: unique prefixes, options after operands
    assert mk(shared_daemon, str(root), "--use-e", "--print-digest-o").stdout == base
    p = mk(shared_daemon, "--max-version=2", "--print-digest-only", str(root), check=False)
    assert (p.returncode, p.stderr.decode()) == (
        1, "mkcomposefs: cannot write file: Invalid argument\n")
    p = mk(shared_daemon, "--skip-xattrs", "--user-xattrs", "--print-digest-only", str(root),
           check=False)
    assert p.returncode == 1 and p.stderr.decode().endswith(": Invalid argument\n")
    if os.geteuid() == 0:
        os.mknod(root / "etc/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        with_dev = digest()
        assert with_dev != base and digest("--skip-devices") == base
        os.mknod(root / "etc/whiteout", 0o666 | stat.S_IFCHR, 0)
        assert digest() == digest("--min-version=1", "--max-version=1")   # auto-bump
        assert digest("--max-version=0") != digest()
        assert digest("--skip-devices") == base
        os.unlink(root / "etc/null")
        os.unlink(root / "etc/whiteout")
    try:
        os.setxattr(root / "etc/hostname", "user.x", b"1")
    except OSError:
        return
    with_x = digest()
    assert with_x != base
    assert digest("--skip-xattrs") == base
    assert digest("--user-xattrs") == with_x


@pytest.mark.parametrize("args, message", [
    ([], "No source path specified"),
    (["SRC"], "No destination path specified"),
    (["a", "b", "c"], "Too many arguments"),
    (["--print-digest-only", "a", "b"], "Cannot specify destination path with "
                                        "--print-digest-only"),
    ([""], "Empty source path specified"),
    (["--min-version=x", "a", "b"], "Invalid min version x"),
    (["--max-version=", "a", "b"], "Invalid max version "),
    (["--threads=0", "a", "b"], "Invalid threads count 0"),
    (["--threads=two", "a", "b"], "Invalid threads count two"),
    (["a", "b", "--min-version"], "option needs a value"),
    (["--bogus", "a", "b"], "unrecognized option '--bogus'"),
    (["--print", "a", "b"], "option '--print' is ambiguous"),
    (["--use-epoch=1", "a", "b"], "option '--use-epoch' doesn't allow an argument"),
    (["-x", "a", "b"], "invalid option -- 'x'"),
])
def test_usage_errors(args: list[str], message: str) -> None:
    p = run_cfsctl("mkcomposefs", *args, check=False)
    assert p.returncode == 1
    assert p.stderr.decode().splitlines()[0] == f"mkcomposefs: {message}"


def test_io_errors_and_tty(shared_daemon: Daemon, tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    p = mk(shared_daemon, str(root), str(tmp_path / "missing-dir" / "img"), check=False)
    assert (p.returncode, p.stderr.decode()) == (
        1, "mkcomposefs: failed to open output file: No such file or directory\n")
    p = mk(shared_daemon, "--from-file", str(tmp_path / "nope"), str(tmp_path / "img"),
           check=False)
    assert (p.returncode, p.stderr.decode()) == (
        1, f"mkcomposefs: open `{tmp_path / 'nope'}`: No such file or directory\n")
    p = mk(shared_daemon, str(tmp_path / "nope"), str(tmp_path / "img"), check=False)
    assert (p.returncode, p.stderr.decode()) == (
        1, f"mkcomposefs: error accessing {tmp_path / 'nope'}: No such file or directory\n")
    master, slave = pty.openpty()
    try:
        e = dict(os.environ, CFSD_ADDRESS=shared_daemon.address)
        p = subprocess.run([sys.executable, "-m", "cfsctl", "mkcomposefs", str(root), "-"],
                           stdout=slave, stderr=subprocess.PIPE, env=e, cwd=str(ROOT))
    finally:
        os.close(slave)
        os.close(master)
    assert (p.returncode, p.stderr.decode()) == (
        1, "mkcomposefs: stdout is a tty.  Refusing to use it\n")
    # stdout that is not a tty gets the image, then the digest
    p = mk(shared_daemon, "--print-digest", str(root), "-")
    img, digest = p.stdout[:-65], p.stdout[-65:]
    assert digest.decode() == fsverity.digest(img, "sha256").hex() + "\n"


def test_multicall_name_and_help(shared_daemon: Daemon, tmp_path: Path) -> None:
    launcher = tmp_path / "bin" / "mkcomposefs"
    launcher.parent.mkdir()
    launcher.write_text(f"#!{sys.executable}\nimport sys\nfrom cfsctl.main import main\n"
                        "sys.exit(main())\n")
    launcher.chmod(0o755)
    root = rootfs(tmp_path)
    e = dict(os.environ, CFSD_ADDRESS=shared_daemon.address, PYTHONPATH=str(ROOT))
    p = subprocess.run([str(launcher), "--print-digest-only", str(root)],
                       capture_output=True, env=e)
    assert p.returncode == 0, p.stderr
    assert p.stdout == mk(shared_daemon, "--print-digest-only", str(root)).stdout
    p = subprocess.run([str(launcher)], capture_output=True, env=e)
    assert p.returncode == 1 and p.stderr.startswith(b"mkcomposefs: No source path")
    p = run_cfsctl("mkcomposefs", "--help")
    assert p.stdout.startswith(b"Usage: mkcomposefs [OPTIONS] SOURCE IMAGE")
    # also as a (hidden) subcommand after global options
    p = run_cfsctl("--address", shared_daemon.address, "mkcomposefs", "--print-digest-only",
                   str(root))
    assert p.stdout == mk(shared_daemon, "--print-digest-only", str(root)).stdout


def _other_user(f):  # noqa: ANN001, ANN202
    for mark in other_user_marks:
        f = mark(f)
    return f


@_other_user
def test_digest_store_as_other_user(world: Path, open_daemon: Daemon) -> None:
    src = world / "mk-src"
    src.mkdir()
    (src / "big").write_bytes(b"b" * 1000)
    for p in (src, src / "big"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    home = world / "mk-home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    img = home / "img"
    p = as_nobody(world, open_daemon, "mkcomposefs", f"--digest-store={home / 'store'}",
                  str(src), str(img))
    assert p.returncode == 0, p.stderr
    owners = {(st.st_uid, st.st_gid) for st in
              (os.lstat(x) for x in [img, home / "store", *(home / "store").rglob("*")])}
    assert owners == {(NOBODY, NOBODY)}
    # a store it may not write, a source it may not read
    private = world / "mk-private"
    private.mkdir(mode=0o755)
    p = as_nobody(world, open_daemon, "mkcomposefs", f"--digest-store={private / 's'}",
                  str(src), "-")
    assert p.returncode == 1 and p.stderr.startswith(b"mkcomposefs: ")
    assert not (private / "s").exists()
    (src / "big").chmod(0o600)
    p = as_nobody(world, open_daemon, "mkcomposefs", "--print-digest-only", str(src))
    assert p.returncode == 1
    assert p.stderr.decode() == f"mkcomposefs: error accessing {src}/big: Permission denied\n"

"""Reading directory trees (cfsd.core.fsread, docs/images.md) and C mkcomposefs semantics
(cfsd.core.mkcomposefs), in process."""

from __future__ import annotations

import errno
import os
import random
import socket
import stat
import threading
from pathlib import Path

import pytest

from cfsd.core import fsverity
from cfsd.core.erofs import erofs_to_filesystem, write_image
from cfsd.core.fsread import (
    RepositoryStore,
    ScanError,
    ScanOptions,
    fsverity_digest,
    read_filesystem,
)
from cfsd.core.mkcomposefs import (
    DigestStore,
    MkcomposefsError,
    MkcomposefsOptions,
    build_image,
    from_directory,
    from_dump,
)
from cfsd.core.repository import Repository
from cfsd.core.tree import (
    BlockDevice,
    CharacterDevice,
    Directory,
    External,
    Fifo,
    FileSystem,
    Inline,
    Leaf,
    Socket,
    Symlink,
)
from tests.conftest import tree_listing

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, chown)")


def scan(path: Path, alg: str = "sha512", store: object = None, **kw: object) -> FileSystem:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return read_filesystem(fd, alg, ScanOptions(**kw), store)  # type: ignore[arg-type]
    finally:
        os.close(fd)


def leaf(fs: FileSystem, path: str) -> Leaf:
    d, name = fs.root.split(path.encode())
    node = d.lookup(name)
    assert isinstance(node, Leaf), path
    return node


def xattrs_supported(p: Path) -> bool:
    try:
        os.setxattr(p, "user.cfsd-probe", b"1")
        os.removexattr(p, "user.cfsd-probe")
        return True
    except OSError:
        return False


@pytest.mark.parametrize("alg", ["sha256", "sha512"])
def test_oneshot_digest_matches_streaming(alg: str) -> None:
    rng = random.Random(7)
    a = fsverity.algorithm(alg)
    for n in [0, 1, 64, 65, 4095, 4096, 4097, 8192, 4096 * 128, 4096 * 128 + 1,
              4096 * 129, 4096 * 16384 + 3]:
        data = rng.randbytes(n)
        assert fsverity_digest(data, a) == fsverity.digest(data, a), n


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "small").write_bytes(b"x" * 64)
    (root / "big").write_bytes(b"y" * 65)
    (root / "sub" / "large").write_bytes(os.urandom(300_000))
    (root / "sub" / "deep" / "f").write_bytes(b"deep")
    os.link(root / "big", root / "sub" / "big-link")
    (root / "abs-link").symlink_to("/etc/passwd")
    (root / "dir-link").symlink_to("sub")
    os.mkfifo(root / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "sock"))
    s.close()
    os.chmod(root / "small", 0o4750)
    os.utime(root / "small", ns=(0, 1_700_000_000_123_456_789))
    return root


def test_scan_metadata_and_contents(sample: Path) -> None:
    fs = scan(sample)
    fs.fsck()
    st = os.lstat(sample / "small")
    small = leaf(fs, "/small")
    assert small.content == Inline(b"x" * 64)
    assert small.stat.st_mode == 0o4750
    assert (small.stat.st_uid, small.stat.st_gid) == (st.st_uid, st.st_gid)
    assert (small.stat.st_mtim_sec, small.stat.st_mtim_nsec) == (1_700_000_000, 123_456_789)
    assert leaf(fs, "/empty").content == Inline(b"")
    big = leaf(fs, "/big")
    assert big.content == External(fsverity.digest(b"y" * 65, "sha512"), 65)
    large = (sample / "sub" / "large").read_bytes()
    assert leaf(fs, "/sub/large").content == External(fsverity.digest(large, "sha512"),
                                                       len(large))
    assert leaf(fs, "/abs-link").content == Symlink(b"/etc/passwd")
    assert leaf(fs, "/dir-link").content == Symlink(b"sub")      # not followed
    assert leaf(fs, "/fifo").content == Fifo()
    assert leaf(fs, "/sock").content == Socket()
    assert leaf(fs, "/sub/deep/f").content == Inline(b"deep")
    # hardlinks are shared leaves by default (composefs-rs), separate ones when broken (C)
    assert leaf(fs, "/big") is leaf(fs, "/sub/big-link")
    assert fs.nlinks()[leaf(fs, "/big")] == 2
    broken = scan(sample, hardlinks=False)
    broken.fsck()
    assert leaf(broken, "/big") is not leaf(broken, "/sub/big-link")
    assert leaf(broken, "/big").content == leaf(broken, "/sub/big-link").content
    sub = fs.root.lookup(b"sub")
    assert isinstance(sub, Directory)
    assert sub.stat.st_mode == os.stat(sample / "sub").st_mode & 0o7777
    epoch = scan(sample, use_epoch=True)
    assert all(s.st_mtim_sec == 0 and s.st_mtim_nsec == 0 for s in epoch.for_each_stat())
    # every version of the image can be built and read back
    for v in (0, 1, 2):
        back = erofs_to_filesystem(write_image(fs, v), "sha512")
        assert leaf(back, "/sub/large").content == leaf(fs, "/sub/large").content


@root_only
def test_scan_devices_and_skip_devices(tmp_path: Path) -> None:
    root = tmp_path / "dev"
    root.mkdir()
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "blk", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    os.mknod(root / "whiteout", 0o600 | stat.S_IFCHR, 0)
    (root / "keep").write_bytes(b"k")
    fs = scan(root)
    assert leaf(fs, "/null").content == CharacterDevice(os.makedev(1, 3))
    assert leaf(fs, "/blk").content == BlockDevice(os.makedev(7, 0))
    assert leaf(fs, "/whiteout").content == CharacterDevice(0)
    fs = scan(root, skip_devices=True)
    assert sorted(fs.root.entries) == [b"keep"]
    fs.fsck()
    # C: a whiteout bumps the default version to 1
    img, version = build_image(from_directory(os.open(root, os.O_RDONLY), MkcomposefsOptions()),
                               MkcomposefsOptions())
    assert version == 1


def test_xattrs(sample: Path) -> None:
    if not xattrs_supported(sample / "big"):
        pytest.skip("no user xattrs on this filesystem")
    os.setxattr(sample / "big", "user.one", b"1")
    os.setxattr(sample / "sub", "user.two", b"2\x00=")
    fs = scan(sample)
    assert leaf(fs, "/big").stat.xattrs == {b"user.one": b"1"}
    sub = fs.root.lookup(b"sub")
    assert isinstance(sub, Directory) and sub.stat.xattrs == {b"user.two": b"2\x00="}
    assert scan(sample, xattrs="none").root.lookup(b"sub").stat.xattrs == {}  # type: ignore[union-attr]
    if os.geteuid() == 0:
        os.setxattr(sample / "big", "trusted.cfsd", b"t")
        assert leaf(scan(sample), "/big").stat.xattrs == {b"user.one": b"1", b"trusted.cfsd": b"t"}
        assert leaf(scan(sample, xattrs="user"), "/big").stat.xattrs == {b"user.one": b"1"}
        assert leaf(scan(sample, hide_trusted_xattrs=True), "/big").stat.xattrs == {
            b"user.one": b"1"}


@root_only
def test_scan_as_another_identity_is_decided_by_the_kernel(sample: Path) -> None:
    """A thread switched to nobody's identity reads only what nobody may read; the thread
    gets its own credentials back and other threads never lose theirs."""
    from cfsd.service.identity import Identity, acting_as, current
    nobody = Identity(65534, 65534, ())
    for p in [sample, *sample.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    (sample / "sub" / "large").chmod(0o600)
    before = current()
    seen: list[object] = []

    def scan_fd() -> FileSystem:      # the root is opened by root: the test dir is 0700
        fd = os.open(sample, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with acting_as(nobody):
                return read_filesystem(fd, "sha512", ScanOptions())
        finally:
            os.close(fd)

    with acting_as(nobody):
        t = threading.Thread(target=lambda: seen.append(current()))
        t.start()
        t.join()
    with pytest.raises(ScanError) as e:
        scan_fd()
    assert e.value.errno == errno.EACCES and e.value.path == "sub/large"
    assert str(e.value) == "error accessing sub/large: Permission denied"
    assert seen == [nobody]                  # threads started inside inherit it
    assert current() == before
    scan(sample)                             # and root reads it again
    (sample / "sub").chmod(0o700)
    with pytest.raises(ScanError) as e:
        scan_fd()
    assert e.value.path == "sub"


def test_repository_store_is_staged(tmp_path: Path, sample: Path) -> None:
    repo, _ = Repository.init(str(tmp_path / "repo"), insecure=True)
    with repo:
        repo.writable_objects_fd  # noqa: B018 - objects/ itself is created lazily
        before = tree_listing(tmp_path / "repo")
        staging = repo.staging()
        store = RepositoryStore(repo, staging)
        fs = scan(sample, repo.alg, store)
        assert store.new_objects == 2          # big (shared with big-link) and sub/large
        staging.abort()
        assert tree_listing(tmp_path / "repo") == before
        staging = repo.staging()
        store = RepositoryStore(repo, staging)
        fs = scan(sample, repo.alg, store)
        staging.commit()
        for lf in fs.leaves:
            if isinstance(lf.content, External):
                assert repo.object_ok(lf.content.id)
        # large files are copied while hashed again (not read whole)
        big = os.urandom(9 << 20)
        (sample / "huge").write_bytes(big)
        staging = repo.staging()
        store = RepositoryStore(repo, staging)
        fs = scan(sample, repo.alg, store)
        staging.commit()
        assert store.new_objects == 1
        assert repo.read_object(fsverity.digest(big, repo.alg)) == big
        os.unlink(sample / "huge")
        # a second scan stores nothing new
        staging = repo.staging()
        store = RepositoryStore(repo, staging)
        scan(sample, repo.alg, store)
        staging.commit()
        assert store.new_objects == 0


def test_mkcomposefs_core(tmp_path: Path, sample: Path) -> None:
    fd = os.open(sample, os.O_RDONLY | os.O_DIRECTORY)
    sfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir(tmp_path / "store")
    store_fd = os.open(tmp_path / "store", os.O_RDONLY | os.O_DIRECTORY)
    try:
        opts = MkcomposefsOptions()
        plain, v = build_image(from_directory(fd, opts), opts)
        assert v == 0
        stored, _ = build_image(from_directory(fd, opts, store=DigestStore(store_fd)), opts)
        assert plain == stored
        files = sorted(str(p.relative_to(tmp_path / "store"))
                       for p in (tmp_path / "store").rglob("*") if p.is_file())
        big = fsverity.digest(b"y" * 65, "sha256").hex()
        large = fsverity.digest((sample / "sub/large").read_bytes(), "sha256").hex()
        assert files == sorted([f"{big[:2]}/{big[2:]}", f"{large[:2]}/{large[2:]}"])
        assert stat.S_IMODE(os.stat(tmp_path / "store" / files[0]).st_mode) == 0o644
        # C breaks hardlinks; --hardlinks keeps them and changes the image
        huge = os.urandom(9 << 20)
        (sample / "huge").write_bytes(huge)
        from_directory(fd, opts, store=DigestStore(store_fd))
        hd = fsverity.digest(huge, "sha256").hex()
        assert (tmp_path / "store" / hd[:2] / hd[2:]).read_bytes() == huge
        os.unlink(sample / "huge")
        hl = MkcomposefsOptions(hardlinks=True)
        assert build_image(from_directory(fd, hl), hl)[0] != plain
        with pytest.raises(MkcomposefsError, match="error accessing src: Invalid argument"):
            from_directory(fd, MkcomposefsOptions(skip_xattrs=True, user_xattrs=True),
                           source="src")
        bad = MkcomposefsOptions(min_version=2, max_version=2)
        with pytest.raises(MkcomposefsError, match="^cannot write file: Invalid argument$"):
            build_image(from_directory(fd, bad), bad)
    finally:
        for x in (fd, sfd, store_fd):
            os.close(x)


def test_mkcomposefs_dump_errors() -> None:
    with pytest.raises(MkcomposefsError, match="^No files in dump file$"):
        from_dump(b"")
    with pytest.raises(MkcomposefsError, match="^Invalid mode 0$"):
        from_dump(b"/ 0 0 1 0 0 0 0.0 - - -\n")
    with pytest.raises(MkcomposefsError, match="^Missing trailing newline$"):
        from_dump(b"/ 0 40755 1 0 0 0 0.0 - - -", strict=True)
    fs = from_dump(b"/ 0 40755 1 0 0 0 0.0 - - -")
    assert build_image(fs, MkcomposefsOptions())[1] == 0

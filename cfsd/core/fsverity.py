"""fs-verity file digests (4 KiB blocks, no salt) and the kernel fs-verity ioctls.

The digest is the hash of the 256-byte fs-verity descriptor whose root hash is the top of a
Merkle tree over 4096-byte blocks (docs/repository.md).  Hashing is streaming with
O(log n) memory; large files are hashed by a small process pool over mmap'd ranges, which
roughly doubles throughput on two cores (bench/fsverity.py).  The daemon itself never
maps a file (pread): a file truncated under it must not kill it with SIGBUS; a worker that
dies that way is replaced and the file hashed again, serially.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

BLOCK_SIZE = 4096
LG_BLOCK_SIZE = 12

FS_IOC_ENABLE_VERITY = 0x40806685
FS_IOC_MEASURE_VERITY = 0xC0046686

# Files at least this large are hashed by the process pool.
PARALLEL_THRESHOLD = 32 << 20


@dataclass(frozen=True)
class Algorithm:
    """A supported fs-verity hash: name, kernel id and digest size."""

    name: str
    kernel_id: int
    size: int

    @property
    def repo_string(self) -> str:
        """The `meta.json` spelling, e.g. ``fsverity-sha256-12``."""
        return f"fsverity-{self.name}-{LG_BLOCK_SIZE}"

    def new(self, data: bytes | memoryview = b"") -> hashlib._Hash:
        """A fresh hashlib object for this algorithm."""
        return _CONSTRUCTORS[self.name](data)


_CONSTRUCTORS = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
SHA256 = Algorithm("sha256", 1, 32)
SHA512 = Algorithm("sha512", 2, 64)
ALGORITHMS = {a.name: a for a in (SHA256, SHA512)}


def algorithm(name: str | Algorithm) -> Algorithm:
    """Resolve ``sha256``/``sha512`` (or an Algorithm) to an Algorithm."""
    if isinstance(name, Algorithm):
        return name
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unsupported fs-verity hash algorithm: {name!r}") from None


def parse_repo_algorithm(text: str) -> Algorithm:
    """Parse ``fsverity-<sha256|sha512>-12`` as written in meta.json."""
    if not text.startswith("fsverity-"):
        raise ValueError(f"invalid algorithm: {text!r} (expected fsverity-<hash>-12)")
    name, sep, lg = text[len("fsverity-"):].rpartition("-")
    if not sep or lg != str(LG_BLOCK_SIZE):
        raise ValueError(f"invalid algorithm: {text!r} (block size must be 2^12)")
    return algorithm(name)


def _hash_blocks(alg: Algorithm, data: memoryview) -> bytes:
    """Concatenated hashes of each 4096-byte block of *data* (last block zero-padded)."""
    h = _CONSTRUCTORS[alg.name]
    n = len(data)
    full = n - n % BLOCK_SIZE
    out = b"".join([h(data[i:i + BLOCK_SIZE]).digest() for i in range(0, full, BLOCK_SIZE)])
    if full < n:
        tail = bytes(data[full:])
        out += h(tail + bytes(BLOCK_SIZE - len(tail))).digest()
    return out


class FsVerityHasher:
    """Incremental fs-verity digest: feed bytes with update(), read digest()."""

    def __init__(self, alg: str | Algorithm = SHA256) -> None:
        self.alg = algorithm(alg)
        self._partial = bytearray()
        self._levels: list[bytearray] = []
        self._counts: list[int] = []
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Add data to the stream being hashed."""
        mv = memoryview(data).cast("B")
        n = len(mv)
        if not n:
            return
        self.size += n
        if self._partial:
            take = min(BLOCK_SIZE - len(self._partial), n)
            self._partial += mv[:take]
            mv = mv[take:]
            if len(self._partial) < BLOCK_SIZE:
                return
            self._push_hashes(self.alg.new(self._partial).digest())
            self._partial.clear()
        full = len(mv) - len(mv) % BLOCK_SIZE
        if full:
            self._push_hashes(_hash_blocks(self.alg, mv[:full]))
        if full < len(mv):
            self._partial += mv[full:]

    def add_block_hashes(self, hashes: bytes, nbytes: int) -> None:
        """Add precomputed level-0 hashes covering *nbytes* of data.

        Every covered block except possibly the last must be full; nothing may be pending.
        """
        if self._partial:
            raise ValueError("add_block_hashes after a partial block")
        self.size += nbytes
        self._push_hashes(hashes)

    def _push_hashes(self, hashes: bytes, level: int = 0) -> None:
        hs = self.alg.size
        while len(self._levels) <= level:
            self._levels.append(bytearray())
            self._counts.append(0)
        buf = self._levels[level]
        self._counts[level] += len(hashes) // hs
        mv = memoryview(hashes)
        while mv:
            take = min(BLOCK_SIZE - len(buf), len(mv))
            buf += mv[:take]
            mv = mv[take:]
            if len(buf) == BLOCK_SIZE:
                self._push_hashes(self.alg.new(buf).digest(), level + 1)
                buf = self._levels[level]
                buf.clear()

    def root_hash(self) -> bytes:
        """The Merkle tree root (all zero for empty input)."""
        if self.size == 0:
            return bytes(self.alg.size)
        if not self._levels and self.size <= BLOCK_SIZE:
            # One partial data block: the root is its (zero-padded) hash.
            return self.alg.new(bytes(self._partial) + bytes(BLOCK_SIZE - len(self._partial))
                                ).digest()
        levels = [bytearray(b) for b in self._levels]
        counts = list(self._counts)
        clone = FsVerityHasher(self.alg)
        clone._levels, clone._counts = levels, counts
        if self._partial:
            pad = bytes(self._partial) + bytes(BLOCK_SIZE - len(self._partial))
            clone._push_hashes(self.alg.new(pad).digest())
        i = 0
        while True:
            if i == len(clone._levels) - 1 and clone._counts[i] == 1:
                return bytes(clone._levels[i])
            buf = clone._levels[i]
            if buf:
                pad = bytes(buf) + bytes(BLOCK_SIZE - len(buf))
                buf.clear()
                clone._push_hashes(self.alg.new(pad).digest(), i + 1)
            i += 1

    def digest(self) -> bytes:
        """The fs-verity file digest of everything fed so far."""
        return descriptor_digest(self.alg, self.root_hash(), self.size)

    def hexdigest(self) -> str:
        """Lower-case hex form of digest()."""
        return self.digest().hex()


def descriptor_digest(alg: Algorithm, root: bytes, size: int) -> bytes:
    """Hash of the 256-byte fs-verity descriptor."""
    desc = struct.pack("<BBBBIQ64s32s144s", 1, alg.kernel_id, LG_BLOCK_SIZE, 0, 0, size,
                       root.ljust(64, b"\0"), bytes(32), bytes(144))
    return alg.new(desc).digest()


def digest(data: bytes | bytearray | memoryview, alg: str | Algorithm = SHA256) -> bytes:
    """fs-verity digest of an in-memory buffer (one pass per Merkle tree level)."""
    a = algorithm(alg)
    mv = memoryview(data).cast("B")
    if not len(mv):
        return descriptor_digest(a, bytes(a.size), 0)
    level = _hash_blocks(a, mv)
    while len(level) > a.size:
        level = _hash_blocks(a, memoryview(level))
    return descriptor_digest(a, level, len(mv))


# ---------------------------------------------------------------------------------------------
# Files: single process for small files, a process pool over mmap'd ranges for large ones.

class _Workers:
    """Hashing helper processes (``python -c`` children speaking a tiny pipe protocol).

    Plain subprocesses rather than multiprocessing: nothing of the host program's
    ``__main__`` is re-run in them, and a broken worker only costs a serial fallback.
    """

    def __init__(self, n: int) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.idle: queue.Queue[subprocess.Popen[bytes]] = queue.Queue()
        self.all = []
        self.started = False        # a job has completed: the workers can run at all
        for _ in range(n):
            proc = subprocess.Popen(
                [sys.executable, "-c", "from cfsd.core.fsverity import _worker_main; "
                 "_worker_main()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                close_fds=True)
            self.all.append(proc)
            self.idle.put(proc)

    def run(self, jobs: list[tuple[str, int, int, str]]) -> list[bytes]:
        """Results of ``_hash_range`` for each job, computed by up to n workers."""
        take = min(len(jobs), len(self.all))
        procs = [self.idle.get() for _ in range(take)]
        broken = False
        try:
            out: list[bytes] = []
            for i in range(0, len(jobs), take):
                batch = jobs[i:i + take]
                for proc, (path, start, end, alg) in zip(procs, batch, strict=False):
                    assert proc.stdin is not None
                    proc.stdin.write(f"{path} {start} {end} {alg}\n".encode())
                    proc.stdin.flush()
                for proc, _job in zip(procs, batch, strict=False):
                    assert proc.stdout is not None
                    head = proc.stdout.read(8)
                    if len(head) != 8:
                        raise OSError("hashing worker died")
                    (n,) = struct.unpack("<Q", head)
                    if n == (1 << 64) - 1:
                        raise OSError("hashing worker failed")
                    data = proc.stdout.read(n)
                    if len(data) != n:
                        raise OSError("hashing worker died")
                    out.append(data)
            self.started = True
            return out
        except BaseException:
            broken = True
            raise
        finally:
            for proc in procs:
                if broken:
                    proc.kill()
                else:
                    self.idle.put(proc)

    def close(self) -> None:
        """Stop every worker."""
        for proc in self.all:
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
            proc.kill()
            proc.wait()


HASH_CHUNK = 8 << 20
_pool: _Workers | None = None
_pool_lock = threading.Lock()
_pool_broken = False
# Entered around starting workers: a root daemon sets it to its own identity so a worker is
# never started with (and never inherits) the credentials of the caller a thread works for.
spawn_context: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext


def _get_pool() -> _Workers:
    global _pool
    with _pool_lock:
        if _pool is None:
            with spawn_context():
                _pool = _Workers(max(2, os.cpu_count() or 2))
            atexit.register(shutdown_pool)
        return _pool


def shutdown_pool() -> None:
    """Stop the hashing worker processes (they restart lazily)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


def _worker_main() -> None:
    """Body of a hashing worker: ``path start end alg`` lines in, framed hashes out."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while line := inp.readline():
        try:
            path, start, end, alg = line.decode().rsplit(" ", 3)
            data = _hash_range(path, int(start), int(end), alg.strip())
            out.write(struct.pack("<Q", len(data)) + data)
        except Exception:  # noqa: BLE001 - reported to the parent, which falls back
            out.write(struct.pack("<Q", (1 << 64) - 1))
        out.flush()


def _hash_range(path: str, start: int, end: int, alg_name: str) -> bytes:
    """Worker: level-0 hashes of bytes [start, end) of the file at *path*."""
    alg = algorithm(alg_name)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
            with memoryview(m) as mv:
                return _hash_blocks(alg, mv[start:end])
    finally:
        os.close(fd)


def _digest_fd_serial(fd: int, size: int, alg: Algorithm) -> bytes:
    h = FsVerityHasher(alg)
    buf = bytearray(min(HASH_CHUNK, size))
    mv = memoryview(buf)
    off = 0
    while off < size:
        n = os.preadv(fd, [mv[:min(len(buf), size - off)]], off)
        if not n:
            break
        h.update(mv[:n])
        off += n
    return h.digest()


def digest_fd(fd: int, alg: str | Algorithm = SHA256, *, parallel: bool = True) -> bytes:
    """fs-verity digest of the whole regular file open as *fd* (position is not used)."""
    global _pool_broken
    a = algorithm(alg)
    size = os.fstat(fd).st_size
    if not parallel or size < PARALLEL_THRESHOLD or _pool_broken:
        return _digest_fd_serial(fd, size, a)
    try:
        return _digest_fd_parallel(fd, size, a)
    except OSError:
        # A worker that died (a file truncated under its mapping) is replaced on the next
        # call; a pool that cannot start at all (odd __main__, resource limits) is given up.
        _pool_broken = _pool is None or not _pool.started
        shutdown_pool()
        return _digest_fd_serial(fd, size, a)


def _digest_fd_parallel(fd: int, size: int, a: Algorithm) -> bytes:
    pool = _get_pool()
    nchunks = max(2, os.cpu_count() or 2) * 2
    chunk = -(-size // nchunks)
    chunk += -chunk % BLOCK_SIZE
    path = f"/proc/{os.getpid()}/fd/{fd}"
    offsets = list(range(0, size, chunk))
    results = pool.run([(path, off, min(off + chunk, size), a.name) for off in offsets])
    h = FsVerityHasher(a)
    for data, off in zip(results, offsets, strict=True):
        h.add_block_hashes(data, min(off + chunk, size) - off)
    return h.digest()


def digest_path(path: str | os.PathLike[str], alg: str | Algorithm = SHA256,
                *, parallel: bool = True) -> bytes:
    """fs-verity digest of the file at *path*."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return digest_fd(fd, alg, parallel=parallel)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Kernel interface.

_UNSUPPORTED = (errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def enable_verity(fd: int, alg: str | Algorithm) -> bool:
    """FS_IOC_ENABLE_VERITY on a read-only fd.

    Returns True when verity is (now or already) enabled, False when the filesystem does not
    support it; retries ETXTBSY briefly and raises OSError on other failures.
    """
    a = algorithm(alg)
    arg = struct.pack("<IIIIQIIQ88s", 1, a.kernel_id, BLOCK_SIZE, 0, 0, 0, 0, 0, bytes(88))
    for attempt in range(4):
        try:
            fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg)
            return True
        except OSError as e:
            if e.errno == errno.EEXIST:
                return True
            if e.errno in _UNSUPPORTED:
                return False
            if e.errno == errno.ETXTBSY and attempt < 3:
                threading.Event().wait(0.001)
                continue
            raise
    return False


def measure_verity(fd: int, alg: str | Algorithm) -> bytes | None:
    """FS_IOC_MEASURE_VERITY: the kernel's digest, or None when verity is absent/unsupported."""
    a = algorithm(alg)
    buf = bytearray(struct.pack("<HH", 0, 64) + bytes(64))
    try:
        fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf, True)
    except OSError as e:
        if e.errno in (errno.ENODATA, *_UNSUPPORTED, errno.EOVERFLOW):
            return None
        raise
    kalg, size = struct.unpack_from("<HH", buf)
    if kalg != a.kernel_id or size != a.size:
        raise OSError(errno.EINVAL, f"file has fs-verity with another algorithm (id {kalg})")
    return bytes(buf[4:4 + size])


def object_path(digest_bytes: bytes) -> str:
    """``XX/rest`` path of an object inside ``objects/``."""
    h = digest_bytes.hex()
    return f"{h[:2]}/{h[2:]}"


def parse_object_path(path: str, alg: str | Algorithm) -> bytes:
    """Inverse of object_path: takes the last ``2*size+1`` characters (any prefix ignored)."""
    a = algorithm(alg)
    n = 2 * a.size + 1
    tail = path[-n:]
    if len(tail) != n or tail[2] != "/":
        raise ValueError(f"not an object path: {path!r}")
    return bytes.fromhex(tail[:2] + tail[3:])

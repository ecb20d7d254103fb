"""C ``composefs-info``: ``ls``, ``objects``, ``missing-objects`` and ``measure-file``.

``dump`` is :func:`cfsd.core.erofs.cdump.dump_image_c`, which mirrors the C image loader
(``lcfs_load_node_from_image``: on-disk child order, the first inode occurrence in depth-first
order is the node and later ones are hardlinks, native whiteouts hidden, ``--filter`` on the
top level).  The other commands are derived from its lines, so every command sees exactly the
tree C's loader builds, and fails on exactly the images it rejects:

* ``ls``: every node but the root, ``<path>`` escaped with spaces kept, then ``/\\t`` for a
  directory, ``\\t-> <target>`` for a symlink, ``\\t@ <payload>`` for a regular file with a
  payload.  A hardlink node has mode 0 in C, so it is its bare path.
* ``objects``: the payloads of regular files, unescaped, sorted bytewise (``strcmp``),
  without duplicates, across every image of the call.
* ``missing-objects``: those whose ``fstatat(basedir, payload without leading "/",
  AT_EMPTY_PATH)`` fails (symlinks followed, as C).
* ``measure-file``: the fs-verity sha256 digest of a file: the kernel's when the file has
  fs-verity, else computed from its bytes (read to the end, as C reads it).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct
from collections.abc import Callable, Iterable, Iterator

from cfsd.core import fsverity
from cfsd.core.erofs import format as F
from cfsd.core.erofs.cdump import dump_image_c
from cfsd.core.erofs.format import ErofsError
from cfsd.core.erofs.reader import Image
from cfsd.core.errors import TooDeep

__all__ = ["COMMANDS", "InfoError", "dump", "escape_ls", "ls", "measure", "missing", "objects",
           "read_image", "sorted_objects", "unescape"]

COMMANDS = ("ls", "objects", "missing-objects", "dump")
READ_CHUNK = 8 << 20
_S_IFMT = 0o170000
_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFLNK = 0o120000

Check = Callable[[], None]


class InfoError(Exception):
    """A C ``composefs-info`` failure: the errno C would report and its message text."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message


# --------------------------------------------------------------------------- escaping

_UNESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|[\\nrt])")
_NAMED = {b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}
_LS_SPECIAL = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")
_STD_SPECIAL = re.compile(rb"[^\x21-\x5b\x5d-\x7e]")
_LS_NAMED = {0x5C: b"\\\\", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t"}


def unescape(field: bytes) -> bytes:
    """The bytes of a dumpfile field as C ``composefs-info dump`` escapes them."""
    if b"\\" not in field:
        return field

    def sub(m: re.Match[bytes]) -> bytes:
        s = m.group(1)
        return bytes((int(s[1:], 16),)) if len(s) == 3 else _NAMED[s]
    return _UNESCAPE.sub(sub, field)


def _esc(m: re.Match[bytes]) -> bytes:
    b = m.group(0)[0]
    return _LS_NAMED.get(b) or b"\\x%02x" % b


def escape_ls(data: bytes) -> bytes:
    """C ``print_escaped(…, NOESCAPE_SPACE)``: like the dump escaping, but spaces stay."""
    return _LS_SPECIAL.sub(_esc, data)


def _escape_std(data: bytes) -> bytes:
    """C ``print_escaped(…, ESCAPE_STANDARD)``."""
    return _STD_SPECIAL.sub(_esc, data)


# --------------------------------------------------------------------------- loading


def read_image(fd: int, check: Check | None = None,
               limit: int = F.MAX_IMAGE_SIZE) -> bytes:
    """The whole image open as *fd*, read through the descriptor (never mapped).

    Fails (:class:`InfoError`) where C's ``mmap`` of the file fails: ``ENODEV`` for
    directories, FIFOs and sockets, ``EINVAL`` for devices and empty files; files over
    *limit* are ``EFBIG``.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        dev = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        raise InfoError(errno.EINVAL if dev else errno.ENODEV, "not a regular file")
    if st.st_size == 0:
        raise InfoError(errno.EINVAL, "empty file")
    if st.st_size > limit:
        raise InfoError(errno.EFBIG, f"larger than {limit >> 20} MiB")
    if check is not None:
        check()
    data = os.pread(fd, st.st_size, 0)      # one read, no second copy of a large image
    if len(data) == st.st_size or not data:
        return data
    chunks = [data]
    off = len(data)
    while off < st.st_size:                 # a short read: go on in chunks
        if check is not None:
            check()
        chunk = os.pread(fd, min(READ_CHUNK, st.st_size - off), off)
        if not chunk:
            break
        chunks.append(chunk)
        off += len(chunk)
    return b"".join(chunks)


def _check_header(image: bytes) -> None:
    """C's loader reports a composefs header of another version (and a whiteout root) as
    ``ENOTSUP``; everything else it rejects is ``EINVAL``."""
    if len(image) < F.BLOCK_SIZE:
        return
    magic, version, _flags, _cfs = F.HEADER.unpack_from(image, 0)
    if magic == F.COMPOSEFS_MAGIC and version != F.COMPOSEFS_HEADER_VERSION:
        raise InfoError(errno.ENOTSUP, "unsupported composefs header version")
    try:
        if Image(image).root().is_whiteout():
            raise InfoError(errno.ENOTSUP, "the root is a whiteout")
    except (ErofsError, struct.error, TooDeep):
        return


def dump(image: bytes, filters: list[bytes] | None = None) -> bytes:
    """C ``composefs-info dump`` of one image (:class:`InfoError` when C cannot load it)."""
    _check_header(image)
    try:
        return dump_image_c(image, filters)
    except (ErofsError, TooDeep) as e:
        raise InfoError(errno.EINVAL, str(e)) from None


def _nodes(dumped: bytes) -> Iterator[tuple[bytes, int, bytes | None]]:
    """(path, mode, payload) of every node but the root; hardlink nodes have mode 0 and no
    payload, as in C's loader."""
    for line in dumped.split(b"\n"):
        if not line:
            continue
        f = line.split(b" ", 9)
        path = unescape(f[0])
        if path == b"/":
            continue
        if f[2].startswith(b"@"):
            yield path, 0, None
            continue
        payload = None if f[8] == b"-" else unescape(f[8])
        yield path, int(f[2], 8), payload


# --------------------------------------------------------------------------- commands


def ls(image: bytes, filters: list[bytes] | None = None) -> bytes:
    """C ``composefs-info ls`` of one image."""
    out = []
    for path, mode, payload in _nodes(dump(image, filters)):
        line = escape_ls(path)
        kind = mode & _S_IFMT
        if kind == _S_IFDIR:
            line += b"/\t"
        elif kind == _S_IFLNK:
            line += b"\t-> " + _escape_std(payload or b"")
        elif kind == _S_IFREG and payload is not None:
            line += b"\t@ " + _escape_std(payload)
        out.append(line + b"\n")
    return b"".join(out)


def objects(image: bytes, filters: list[bytes] | None = None) -> set[bytes]:
    """The backing-file payloads of one image's regular files."""
    return {payload for _path, mode, payload in _nodes(dump(image, filters))
            if mode & _S_IFMT == _S_IFREG and payload is not None}


def missing(names: Iterable[bytes], basedir_fd: int) -> set[bytes]:
    """The payloads that ``fstatat(basedir_fd, payload.lstrip("/"), AT_EMPTY_PATH)`` cannot
    find (run it with the identity whose view counts)."""
    out = set()
    for name in names:
        rel = name.lstrip(b"/")
        try:
            if rel:
                os.stat(rel, dir_fd=basedir_fd)
            else:
                os.fstat(basedir_fd)
        except (OSError, ValueError):
            out.add(name)
    return out


def sorted_objects(names: Iterable[bytes]) -> bytes:
    """Payloads one per line, in ``strcmp`` order, printed raw as C prints them."""
    return b"".join(n + b"\n" for n in sorted(names))


# --------------------------------------------------------------------------- measure-file

_MEASURE = struct.Struct("<HH")


def _kernel_digest(fd: int) -> bytes | None:
    """FS_IOC_MEASURE_VERITY: the digest when the file has fs-verity, None when it has not
    (or the filesystem lacks it); ``EILSEQ`` (C's EWRONGVERITY) for a non-sha256 digest."""
    buf = bytearray(_MEASURE.pack(0, 64) + bytes(64))
    try:
        fcntl.ioctl(fd, fsverity.FS_IOC_MEASURE_VERITY, buf, True)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTTY):
            return None
        raise
    _alg, size = _MEASURE.unpack_from(buf)
    if size != fsverity.SHA256.size:
        raise OSError(errno.EILSEQ, os.strerror(errno.EILSEQ))
    return bytes(buf[4:4 + size])


def measure(fd: int, check: Check | None = None) -> bytes:
    """C ``composefs-info measure-file`` of the file open as *fd* (:class:`InfoError`).

    Only regular files are read (a directory fails as in C, with ``ENODATA``; so do FIFOs
    and devices, which C would read).
    """
    try:
        measured = _kernel_digest(fd)
    except OSError as e:
        raise InfoError(e.errno or errno.EIO, os.strerror(e.errno or errno.EIO)) from None
    if measured is not None:
        return measured
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise InfoError(errno.ENODATA, os.strerror(errno.ENODATA))
    h = fsverity.FsVerityHasher(fsverity.SHA256)
    off = 0
    try:
        while True:
            if check is not None:
                check()
            chunk = os.pread(fd, READ_CHUNK, off)
            if not chunk:
                return h.digest()
            h.update(chunk)
            off += len(chunk)
    except OSError:
        # C reports every read failure as ENODATA
        raise InfoError(errno.ENODATA, os.strerror(errno.ENODATA)) from None

"""The composefs dumpfile text format (composefs-dump(5), docs/images.md).

* :func:`write_dumpfile` - the composefs-rs writer (``write_dumpfile``, 7.2).
* :func:`parse_dumpfile` - the composefs-rs parser rules (7.3; 512-byte inline limit,
  canonical paths, hardlink targets must come first, nlink recomputed).
* :func:`parse_dumpfile_c` - C ``mkcomposefs --from-file`` rules (7.4; 5000-byte inline
  limit, optional ``CFS_PARSE_STRICT`` strict mode, forward hardlinks, size ignored for
  symlinks, missing trailing fields read as empty strings).
* :func:`dump_image_c` - C ``composefs-info dump`` of an image (7.5), re-exported from
  :mod:`cfsd.core.erofs.cdump`.

Every rejection raises :class:`DumpfileError` with a message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from cfsd.core.erofs.format import (
    object_pathname,
    parse_hex_digest,
    parse_object_pathname,
)
from cfsd.core.tree import (
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    S_IFSOCK,
    BlockDevice,
    CharacterDevice,
    Directory,
    External,
    ExternalNoVerity,
    Fifo,
    FileSystem,
    Inline,
    Leaf,
    Redirect,
    Socket,
    Sparse,
    Stat,
    Symlink,
    file_type_bits,
    paused_gc,
)

__all__ = [
    "DumpfileError", "dump_image_c", "escape", "escape_optional", "parse_dumpfile",
    "parse_dumpfile_c", "strict_from_env", "write_dumpfile",
]

MAX_INLINE_CONTENT = 512          # composefs-rs
SYMLINK_MAX = 1024                # composefs-rs
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 0xFFFF
XATTR_LIST_MAX = 0xFFFF


class DumpfileError(ValueError):
    """A dumpfile line or the tree it describes is invalid."""


def strict_from_env() -> bool:
    """C strict mode: enabled iff the ``CFS_PARSE_STRICT`` environment variable is set."""
    return "CFS_PARSE_STRICT" in os.environ


# --------------------------------------------------------------------------- escaping


def _escape_table(xattr: bool) -> list[bytes]:
    table = []
    for b in range(256):
        if b == 0x5C:
            table.append(b"\\\\")
        elif b == 0x0A:
            table.append(b"\\n")
        elif b == 0x0D:
            table.append(b"\\r")
        elif b == 0x09:
            table.append(b"\\t")
        elif (b == 0x3D and xattr) or not 0x21 <= b <= 0x7E:
            table.append(b"\\x%02x" % b)
        else:
            table.append(bytes((b,)))
    return table


_TABLE = _escape_table(False)
_TABLE_X = _escape_table(True)
_SPECIAL = re.compile(rb"[^\x21-\x5b\x5d-\x7e]")
_SPECIAL_X = re.compile(rb"[^\x21-\x3c\x3e-\x5b\x5d-\x7e]")


def _sub(m: re.Match[bytes]) -> bytes:
    return _TABLE[m.group()[0]]


def _sub_x(m: re.Match[bytes]) -> bytes:
    return _TABLE_X[m.group()[0]]


def escape(data: bytes, xattr: bool = False) -> bytes:
    """Escape a dumpfile field (backslash, LF, CR, TAB named; other non-graphic bytes and,
    in xattr fields, ``=`` as ``\\xHH``)."""
    if xattr:
        return _SPECIAL_X.sub(_sub_x, data) if _SPECIAL_X.search(data) else data
    return _SPECIAL.sub(_sub, data) if _SPECIAL.search(data) else data


def escape_optional(data: bytes) -> bytes:
    """Escape a path/payload/content field: empty is ``-`` and a lone ``-`` is ``\\x2d``."""
    if not data:
        return b"-"
    if data == b"-":
        return b"\\x2d"
    return escape(data)


# --------------------------------------------------------------------------- writer


def write_dumpfile(fs: FileSystem) -> bytes:
    """Serialize ``fs`` like composefs-rs ``write_dumpfile`` (pre-order DFS, name order)."""
    with paused_gc():
        return dump_directory(b"/", fs.root, fs.nlinks())


def dump_directory(path: bytes, d: Directory, nlinks: dict[Leaf, int]) -> bytes:
    """Dumpfile lines of directory *d* (at *path*) and everything below it, pre-order in
    name order; the second and later names of a hardlinked leaf are ``@`` lines."""
    first: dict[Leaf, bytes] = {}
    out: list[bytes] = []
    append = out.append
    iters: list[tuple[bytes, Iterator[tuple[bytes, Directory | Leaf]]]] = []
    cur: Directory | None = d
    while True:
        if cur is not None:
            ents = cur.sorted_entries()
            nsub = sum(1 for _, c in ents if type(c) is Directory)
            append(_line(path, cur.stat, S_IFDIR, 0, 2 + nsub, 0, b"", b"", None))
            iters.append((path.rstrip(b"/"), iter(ents)))
            cur = None
        if not iters:
            break
        prefix, it = iters[-1]
        for name, child in it:
            cpath = prefix + b"/" + name
            if type(child) is Directory:
                path, cur = cpath, child
                break
            leaf: Leaf = child  # type: ignore[assignment]
            n = nlinks[leaf]
            if n > 1:
                target = first.get(leaf)
                if target is not None:
                    append(hardlink_line(cpath, target))
                    continue
                first[leaf] = cpath
            append(_leaf_line(cpath, leaf, n))
        else:
            iters.pop()
    return b"".join(out)


def _line(path: bytes, st: Stat, ifmt: int, size: int, nlink: int, rdev: int,
          payload: bytes, content: bytes, digest: bytes | None) -> bytes:
    head = b"%s %d %o %d %d %d %d %d.%d %s %s %s" % (
        escape_optional(path), size, st.st_mode | ifmt, nlink, st.st_uid, st.st_gid, rdev,
        st.st_mtim_sec, st.st_mtim_nsec, escape_optional(payload), escape_optional(content),
        digest if digest is not None else b"-")
    if st.xattrs:
        head += b"".join(b" " + escape(k, True) + b"=" + escape(v, True)
                         for k, v in sorted(st.xattrs.items()))
    return head + b"\n"


def _leaf_line(path: bytes, leaf: Leaf, nlink: int) -> bytes:
    c = leaf.content
    st = leaf.stat
    t = type(c)
    if t is Inline:
        return _line(path, st, S_IFREG, len(c.data), nlink, 0, b"", c.data, None)
    if t is External or t is ExternalNoVerity:
        return _line(path, st, S_IFREG, c.size, nlink, 0, object_pathname(c.id), b"",
                     c.id.hex().encode())
    if t is Sparse:
        return _line(path, st, S_IFREG, c.size, nlink, 0, b"", b"", None)
    if t is Redirect:
        return _line(path, st, S_IFREG, c.size, nlink, 0, c.payload, b"",
                     c.digest.hex().encode() if c.digest is not None else None)
    if t is Symlink:
        return _line(path, st, S_IFLNK, len(c.target), nlink, 0, c.target, b"", None)
    if t is BlockDevice or t is CharacterDevice:
        return _line(path, st, file_type_bits(c), 0, nlink, c.rdev, b"", b"", None)
    return _line(path, st, file_type_bits(c), 0, nlink, 0, b"", b"", None)


# --------------------------------------------------------------------------- shared helpers

def _unescape_rs(s: bytes, limit: int | None = None) -> bytes:
    """composefs-rs ``unescape_limited``."""
    if b"\\" not in s:
        if limit is not None and len(s) > limit:
            raise DumpfileError(f"Input {len(s)} exceeded maximum length {limit}")
        return s
    out = bytearray()
    i = 0
    n = len(s)
    while i < n:
        j = s.find(b"\\", i)
        if j < 0:
            out += s[i:]
            break
        out += s[i:j]
        if j + 1 >= n:
            raise DumpfileError("Unterminated escape")
        c = s[j + 1]
        if c == 0x5C:
            out.append(0x5C)
        elif c == 0x6E:
            out.append(0x0A)
        elif c == 0x72:
            out.append(0x0D)
        elif c == 0x74:
            out.append(0x09)
        elif c == 0x78:
            if j + 3 >= n:
                raise DumpfileError("Unterminated hex escape")
            hx = s[j + 2:j + 4]
            if not re.fullmatch(rb"\+?[0-9a-fA-F]+", hx):
                raise DumpfileError(f"Invalid hex escape {hx!r}")
            out.append(int(hx, 16))
            i = j + 4
            continue
        else:
            raise DumpfileError(f"Invalid escape {chr(c)}")
        i = j + 2
    if limit is not None and len(out) > limit:
        raise DumpfileError(f"Input exceeded maximum length {limit}")
    return bytes(out)


def _stat(mode: int, uid: int, gid: int, sec: int, nsec: int) -> Stat:
    if nsec >= 1_000_000_000:
        raise DumpfileError(f"Invalid mtime nanoseconds: {nsec} (must be < 1_000_000_000)")
    if sec >= 1 << 63:
        sec -= 1 << 64
    return Stat(mode & 0o7777, uid, gid, sec, nsec)


def _parse_digest_payload(digest: bytes | None, payload: bytes | None, size: int,
                          alg_size: int | None) -> External | ExternalNoVerity:
    """composefs-rs mapping of an external regular file."""
    if digest is not None:
        d = parse_hex_digest(digest, alg_size)
        if d is None:
            raise DumpfileError(f"Invalid fs-verity digest {digest!r}")
        return External(d, size)
    d = parse_object_pathname(payload or b"", alg_size)
    if d is None:
        raise DumpfileError(f"invalid object pathname: {payload!r}")
    return ExternalNoVerity(d, size)


def _alg_size(alg: object) -> int | None:
    if alg is None:
        return None
    from cfsd.core.fsverity import algorithm
    return algorithm(alg).size  # type: ignore[arg-type]


# --------------------------------------------------------------------------- composefs-rs parser

_RS_DEC = re.compile(rb"\+?[0-9]+")
_RS_OCT = re.compile(rb"\+?[0-7]+")


def _rs_uint(field: bytes | None, name: str, bits: int, octal: bool = False) -> int:
    if field is None:
        raise DumpfileError(f"Missing {name}")
    if not (_RS_OCT if octal else _RS_DEC).fullmatch(field):
        raise DumpfileError(f"Invalid {name}: {field!r}")
    v = int(field, 8 if octal else 10)
    if v >> bits:
        raise DumpfileError(f"Invalid {name}: {field!r} (out of range)")
    return v


def _rs_path(s: bytes, canonical: bool) -> bytes:
    p = _unescape_rs(s)
    if b"\0" in p:
        raise DumpfileError("Invalid embedded NUL")
    if not p:
        raise DumpfileError("Invalid empty path")
    if len(p) > PATH_MAX:
        raise DumpfileError(f"Path is too long: {len(p)} bytes")
    if canonical:
        if not p.startswith(b"/"):
            raise DumpfileError("Invalid non-absolute path")
        if p != b"/":
            for comp in p[1:].split(b"/"):
                if comp == b"":
                    raise DumpfileError("Empty path component (// or trailing /)")
                if comp == b"." or comp == b"..":
                    raise DumpfileError(f"Invalid path component {comp.decode()!r}")
    return p


def parse_dumpfile(data: bytes | str, *, alg: object = None) -> FileSystem:
    """Parse a dumpfile with the composefs-rs rules and build the tree.

    ``alg`` (``"sha256"``/``"sha512"``/Algorithm) fixes the digest size; None accepts both.
    """
    with paused_gc():
        return _parse_dumpfile(data, alg)


def _parse_dumpfile(data: bytes | str, alg: object) -> FileSystem:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DumpfileError(f"dumpfile is not valid UTF-8: {e}") from None
    alg_size = _alg_size(alg)
    fs: FileSystem | None = None
    dirs: dict[bytes, Directory] = {}
    hardlinks: dict[bytes, Leaf] = {}
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.decode("utf-8").strip():
            continue
        try:
            if fs is None:
                path, stat, item = _rs_entry(line, alg_size)
                if path != b"/":
                    raise DumpfileError(
                        f"Dumpfile must start with root directory entry, found: {path!r}")
                if item is not Directory:
                    raise DumpfileError("Root must be a directory")
                fs = FileSystem(stat)
                dirs[b"/"] = fs.root
                continue
            _rs_add(fs, dirs, hardlinks, line, alg_size)
        except DumpfileError as e:
            raise DumpfileError(f"line {lineno}: {e}") from None
    if fs is None:
        raise DumpfileError("Dumpfile is empty, expected root directory entry")
    return fs


def _rs_entry(line: bytes, alg_size: int | None) -> tuple[bytes, Stat | None, object]:
    """``Entry::parse``: returns (path, stat, item) where item is a content, ``Directory``
    (the class, for directories) or ``("hardlink", target)``."""
    fields = line.split(b" ")
    nf = len(fields)

    def f(i: int, name: str) -> bytes:
        if i >= nf:
            raise DumpfileError(f"Missing {name}")
        return fields[i]

    path = _rs_path(fields[0], True)
    size = _rs_uint(f(1, "size"), "size", 64)
    modeval = f(2, "mode")
    at = modeval.find(b"@")
    if at >= 0:
        mode = _rs_uint(modeval[at + 1:], "mode", 32, True)
        if mode & S_IFMT == S_IFDIR:
            raise DumpfileError("Invalid hardlinked directory")
        for i, name in enumerate(("nlink", "uid", "gid", "rdev", "mtime")):
            f(3 + i, name)
        payload = f(8, "payload")
        if payload == b"-":
            raise DumpfileError("Missing payload")
        return path, None, ("hardlink", _rs_path(payload, True))
    mode = _rs_uint(modeval, "mode", 32, True)
    nlink = _rs_uint(f(3, "nlink"), "nlink", 32)
    uid = _rs_uint(f(4, "uid"), "uid", 32)
    gid = _rs_uint(f(5, "gid"), "gid", 32)
    rdev = _rs_uint(f(6, "rdev"), "rdev", 64)
    mt = f(7, "mtime")
    dot = mt.find(b".")
    if dot < 0:
        raise DumpfileError("Missing . in mtime")
    sec = _rs_uint(mt[:dot], "mtime", 64)
    nsec = _rs_uint(mt[dot + 1:], "mtime", 64)
    payload = f(8, "payload")
    content = f(9, "content")
    digest = f(10, "digest")
    p_opt = None if payload == b"-" else payload
    c_opt = None if content == b"-" else content
    d_opt = None if digest == b"-" else digest
    xattrs: list[tuple[bytes, bytes]] = []
    total = 0
    for x in fields[11:]:
        eq = x.find(b"=")
        if eq < 0:
            raise DumpfileError("Missing = in xattrs")
        key = _unescape_rs(x[:eq])
        if b"\0" in key:
            raise DumpfileError("Invalid embedded NUL")
        if not key:
            raise DumpfileError("Invalid empty xattr name")
        if len(key) > XATTR_NAME_MAX:
            raise DumpfileError(f"xattr name too long; max={XATTR_NAME_MAX} found={len(key)}")
        value = _unescape_rs(x[eq + 1:])
        if len(value) > XATTR_SIZE_MAX:
            raise DumpfileError(f"xattr value too long; max={XATTR_SIZE_MAX}")
        total += len(key)
        if total > XATTR_LIST_MAX:
            raise DumpfileError("Too many xattrs")
        xattrs.append((key, value))
    xattrs.sort()
    stat = _stat(mode, uid, gid, sec, nsec)
    stat.xattrs = dict(xattrs)
    ty = mode & S_IFMT

    def nonreg() -> None:
        if c_opt is not None:
            raise DumpfileError("entry cannot have content")
        if d_opt is not None:
            raise DumpfileError("entry cannot have fsverity digest")

    def no_rdev() -> None:
        if rdev != 0:
            raise DumpfileError(f"entry cannot have device (rdev) {rdev}")

    item: object
    if ty == S_IFREG:
        no_rdev()
        if p_opt is not None:
            pl = _rs_path(p_opt, False)
            item = _parse_digest_payload(d_opt, pl, size, alg_size)
        else:
            data = _unescape_rs(c_opt or b"", MAX_INLINE_CONTENT)
            if d_opt is not None:
                raise DumpfileError("Inline file cannot have fsverity digest")
            item = Sparse(size) if not data and size > 0 else Inline(data)
    elif ty == S_IFLNK:
        nonreg()
        no_rdev()
        if p_opt is None:
            raise DumpfileError("Missing payload")
        target = _rs_path(p_opt, False)
        if len(target) > SYMLINK_MAX:
            raise DumpfileError(
                f"Symlink target length {len(target)} exceeds limit {SYMLINK_MAX}")
        item = Symlink(target)
    elif ty == S_IFIFO or ty == S_IFSOCK:
        nonreg()
        no_rdev()
        item = Fifo() if ty == S_IFIFO else Socket()
    elif ty == S_IFCHR or ty == S_IFBLK:
        nonreg()
        if ty == S_IFCHR and rdev == 0 and nlink > 1:
            raise DumpfileError(f"invalid dumpfile: whiteout entry {path!r} has nlink > 1")
        item = CharacterDevice(rdev) if ty == S_IFCHR else BlockDevice(rdev)
    elif ty == S_IFDIR:
        nonreg()
        no_rdev()
        item = Directory
    else:
        raise DumpfileError(f"Unhandled file type from raw mode: {mode}")
    return path, stat, item


def _rs_add(fs: FileSystem, dirs: dict[bytes, Directory], hardlinks: dict[bytes, Leaf],
            line: bytes, alg_size: int | None) -> None:
    path, stat, item = _rs_entry(line, alg_size)
    if path == b"/":
        if item is not Directory:
            raise DumpfileError("Root must be a directory")
        fs.set_root_stat(stat)  # type: ignore[arg-type]
        return
    slash = path.rfind(b"/")
    parent_path = path[:slash] or b"/"
    name = path[slash + 1:]
    inode: Directory | Leaf
    if item is Directory:
        inode = Directory(stat)
    elif type(item) is tuple:
        target = hardlinks.get(item[1])
        if target is None:
            raise DumpfileError(f"Hardlink target not found: {item[1]!r}")
        inode = target
    else:
        inode = fs.push_leaf(stat, item)  # type: ignore[arg-type]
    parent = dirs.get(parent_path)
    if parent is None:
        raise DumpfileError(f"Parent directory not found: {parent_path!r}")
    if name in parent.entries:
        raise DumpfileError(f"Duplicate path {path!r}")
    parent.entries[name] = inode
    if type(inode) is Directory:
        dirs[path] = inode
    else:
        hardlinks[path] = inode  # type: ignore[assignment]


# --------------------------------------------------------------------------- C tools


def parse_dumpfile_c(data: bytes, *, strict: bool = False, alg: object = None,
                     mkcomposefs: bool = False) -> FileSystem:
    """Parse a dumpfile like C ``mkcomposefs --from-file`` and build the tree.

    ``strict`` is ``CFS_PARSE_STRICT`` (see :func:`strict_from_env`).  With
    ``mkcomposefs`` every construct C accepts is kept (redirects that are not object
    paths, digests without payloads, hardlinks to directories) and C's write-time failures
    are left to ``write_image``; without it they are rejected here, so the tree holds only
    what the rest of cfsd knows.  See :func:`cfsd.core.erofs.cdump.parse_dumpfile_c`.
    """
    from cfsd.core.erofs.cdump import parse_dumpfile_c as _parse
    return _parse(data, strict=strict, alg=alg, mkcomposefs=mkcomposefs)


def dump_image_c(image: bytes, filters: list[bytes] | None = None) -> bytes:
    """``composefs-info dump`` of an image (optionally only some top-level names)."""
    from cfsd.core.erofs.cdump import dump_image_c as _dump
    return _dump(image, filters)




def directory_line(path: bytes, st: Stat, nlink: int) -> bytes:
    """One dumpfile line for a directory (used to render layer entries one by one)."""
    return _line(path, st, S_IFDIR, 0, nlink, 0, b"", b"", None)


def leaf_line(path: bytes, st: Stat, content: object, nlink: int) -> bytes:
    """One dumpfile line for a leaf with the given content."""
    return _leaf_line(path, Leaf(st, content), nlink)  # type: ignore[arg-type]


def hardlink_line(path: bytes, target: bytes) -> bytes:
    """One dumpfile line for a hardlink entry (``@120000`` notation)."""
    return (escape_optional(path) + b" 0 @120000 - - - - 0.0 " + escape_optional(target)
            + b" - -\n")

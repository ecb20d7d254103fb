"""C composefs dumpfile compatibility: ``mkcomposefs --from-file`` parsing and
``composefs-info dump`` printing (docs/images.md).

Parsing (:func:`parse_dumpfile_c`) follows the C rules: 5000-byte inline limit, optional
strict mode (``CFS_PARSE_STRICT``), missing trailing fields read as empty strings, forward
hardlink references resolved at the end (C's way: chains, cycles, links to directories),
size ignored for symlinks, ``strtoull`` numbers truncated to C's field widths, digests
parsed as C does (into a buffer that keeps the previous digest's bytes).  A regular file
with a redirect that is not its object path, or a digest without a payload, is a
``Redirect``; the NLINK of the dump and the other C facts ride along in the tree
(:class:`~cfsd.core.erofs.writer.CFileSystem`), so ``write_image`` writes C's bytes.

Printing (:func:`dump_image_c`) mirrors the C image loader (``lcfs_load_node_from_image``)
and ``dump_node``: children in on-disk order (blocks, then inline), the first occurrence
of an inode (DFS) is printed in full and later ones as ``@`` hardlinks with the target's
fields; native whiteouts (chr 0/0, the stubs) are hidden; escaped whiteouts are shown as
chr 0/0; directory sizes are the EROFS directory sizes; xattrs appear in C load order
(local, then shared) with the overlay xattrs interpreted or unescaped as C does (so V1
directories holding whiteouts show ``trusted.overlay.opaque=x user.overlay.opaque=x``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from cfsd.core.dumpfile import (
    PATH_MAX,
    XATTR_NAME_MAX,
    DumpfileError,
    _alg_size,
    escape,
    escape_optional,
)
from cfsd.core.erofs import format as F
from cfsd.core.erofs.format import (
    ErofsError,
    object_pathname,
    parse_object_pathname,
)
from cfsd.core.erofs.reader import Image, Inode
from cfsd.core.erofs.writer import CFileSystem, c_chunk_count
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
    Inline,
    Leaf,
    Redirect,
    Socket,
    Sparse,
    Stat,
    Symlink,
    paused_gc,
)

__all__ = ["dump_image_c", "parse_dumpfile_c"]

LCFS_INLINE_CONTENT_MAX = 5000
LCFS_INODE_EXTERNAL_XATTR_MAX = 0xFFFF // 2
LCFS_MAX_NONINLINE_CHUNKS = 1024
_MASK64 = (1 << 64) - 1

_REDIRECT = b"trusted.overlay.redirect"
_METACOPY = b"trusted.overlay.metacopy"
_SKIP = frozenset((F.XATTR_OVERLAY_WHITEOUTS, F.XATTR_USERXATTR_WHITEOUT,
                   F.XATTR_USERXATTR_WHITEOUTS))


# --------------------------------------------------------------------------- parser

_HEXVAL = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}


def _unescape_c(s: bytes) -> bytes:
    """C ``unescape_string``."""
    if b"\\" not in s:
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
            raise DumpfileError("No character after escape")
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
            if j + 2 >= n or j + 3 >= n:
                raise DumpfileError("No hex characters after hex escape")
            x1 = _HEXVAL.get(s[j + 2])
            x2 = _HEXVAL.get(s[j + 3])
            if x1 is None or x2 is None:
                raise DumpfileError("Invalid hex characters after hex escape")
            out.append(x1 << 4 | x2)
            i = j + 4
            continue
        else:
            raise DumpfileError(f"Unsupported escape type {chr(c)}")
        i = j + 2
    return bytes(out)




_ISSPACE = frozenset(b" \t\n\v\f\r")
_DIGITS10 = frozenset(b"0123456789")
_DIGITS8 = frozenset(b"01234567")
_C_TYPES = frozenset((S_IFREG, S_IFDIR, S_IFLNK, S_IFBLK, S_IFCHR, S_IFSOCK, S_IFIFO))


def _strtoull(s: bytes, base: int) -> int:
    """C ``parse_int_field``: ``strtoull`` that must consume the whole non-empty field."""
    if not s:
        raise DumpfileError("Invalid integer ")
    n = len(s)
    i = 0
    while i < n and s[i] in _ISSPACE:
        i += 1
    neg = False
    if i < n and s[i] in b"+-":
        neg = s[i] == 0x2D
        i += 1
    digits = _DIGITS10 if base == 10 else _DIGITS8
    start = i
    while i < n and s[i] in digits:
        i += 1
    if i == start or i != n:
        raise DumpfileError(f"Invalid integer {s.decode('latin-1')}")
    v = int(s[start:], base)
    if v > _MASK64:
        return _MASK64
    return (-v) & _MASK64 if neg else v


def _cstr(b: bytes) -> bytes:
    """A C string view of unescaped bytes (truncated at the first NUL)."""
    z = b.find(b"\0")
    return b if z < 0 else b[:z]


def _s(b: bytes) -> str:
    """Bytes as C prints them with ``%s`` (``os.fsencode`` gives them back)."""
    return b.decode("utf-8", "surrogateescape")


def _lld(v: int) -> int:
    """A u64 printed with ``%lld``."""
    return v - (1 << 64) if v >= 1 << 63 else v


_M32 = 0xFFFFFFFF
_HEX64 = re.compile(rb"[0-9a-fA-F]{64}")
_LOOP, _HANG = 1, 2


class _CLink:
    """A C hardlink node (an ``@`` line), linked after all lines are read."""

    __slots__ = ("target", "parent", "name", "path", "mode", "link_to", "leaf")

    def __init__(self, target: bytes | None, parent: Directory, name: bytes,
                 path: bytes, mode: int) -> None:
        self.target = target
        self.parent = parent
        self.name = name
        self.path = path
        self.mode = mode
        self.link_to: object = None    # the node its target path named (C ``link_to``)
        # C ``link_to_invalid`` (the target chain was a cycle): the link stays a node of
        # its own, of the ``@`` line's mode and otherwise empty
        self.leaf: Leaf | None = None


def _follow(start: object) -> tuple[object, int]:
    """C ``follow_links``: the node a chain of hardlinks ends at, or why it does not end.

    ``_LOOP``: the chain comes back to *start* (ELOOP).  ``_HANG``: it runs into a cycle
    that does not pass through *start* (C loops forever).
    """
    n = start
    seen: set[int] = set()
    while type(n) is _CLink and n.link_to is not None:
        n = n.link_to
        if n is start:
            return None, _LOOP
        if id(n) in seen:
            return None, _HANG
        seen.add(id(n))
    return n, 0


def parse_dumpfile_c(data: bytes, *, strict: bool = False, alg: object = None,
                     mkcomposefs: bool = False) -> CFileSystem:
    """Parse a dumpfile like C ``mkcomposefs --from-file`` and build the tree.

    ``strict`` is ``CFS_PARSE_STRICT`` (see :func:`strict_from_env`).  The tree carries the
    C facts the model has no room for (:class:`~cfsd.core.erofs.writer.CFacts`), so
    ``write_image`` writes what C writes.  With ``mkcomposefs`` everything C accepts is
    kept: arbitrary redirects and digests without payloads (``Redirect``), hardlinks to
    directories, and hardlinks C cannot write (reported by ``write_image`` as C does; so is
    a file too large).  Without it those are rejected here.
    """
    with paused_gc():
        return _parse(data, strict, _alg_size(alg), mkcomposefs)


def _c_reads(data: bytes, strict: bool) -> Iterator[tuple[int, int, bool]]:
    """The lines as C ``tree_from_dump`` reads them: ``(start, end, fresh)``.

    C reads the file into a 64 KiB buffer (doubled while one line does not fit) and
    parses the complete lines of each read, keeping a partial last line for the next read.
    ``fresh`` marks the first line after each read: the calls in between overwrite the
    stack slot C parses digests into (cfsd assumes zeros; C keeps whatever those calls
    left, often zeros).  A read that returns nothing ends the file, and its partial line
    is parsed even in strict mode; a partial line left at the end is parsed too, or is an
    error in strict mode.
    """
    n = len(data)
    cap = 0
    start = off = 0
    while True:
        keep = off - start
        if cap < keep + 1:
            cap = max(cap * 2 if cap else 64 << 10, keep + 1)
        want = cap - keep
        got = min(want, n - off)
        off += got
        fresh = True
        while start < off:
            j = data.find(b"\n", start, off)
            if j < 0:
                if got == 0:
                    yield start, off, fresh
                    start = off
                break
            yield start, j, fresh
            fresh = False
            start = j + 1
        if got < want:
            break
    if start < off:
        if strict:
            raise DumpfileError("Missing trailing newline")
        yield start, off, True


def _parse(data: bytes, strict: bool, alg_size: int | None, complete: bool) -> CFileSystem:
    state = _CState(alg_size, strict, complete)
    for lineno, (start, end, fresh) in enumerate(_c_reads(data, strict), 1):
        if fresh:
            state.raw = bytearray(32)
        try:
            state.line(data[start:end])
        except DumpfileError as e:
            raise DumpfileError(f"line {lineno}: {e}") from None
    return state.finish()


class _CState:
    """The tree C ``tree_from_dump`` builds, one line at a time."""

    def __init__(self, alg_size: int | None, strict: bool, complete: bool) -> None:
        self.alg_size = alg_size
        self.strict = strict
        self.complete = complete
        self.fs: CFileSystem | None = None
        self.links: list[_CLink] = []
        self.nlinks: dict[Leaf, int] = {}   # leaves whose dump NLINK is not 1
        # C parses a digest into an uninitialised stack buffer and ignores how much it
        # parsed: a short or malformed digest keeps the bytes of the previous one
        self.raw = bytearray(32)

    def _lookup_parent(self, path: bytes) -> tuple[object, bytes]:
        assert self.fs is not None
        node: object = self.fs.root
        i = 0
        n = len(path)
        while True:
            while i < n and path[i] == 0x2F:
                i += 1
            j = path.find(b"/", i)
            if j < 0:
                return node, path[i:]
            name = path[i:j]
            child = node.entries.get(name) if type(node) is Directory else None
            if child is None:
                return None, b""
            node = child
            i = j

    def _digest(self, text: bytes) -> bytes:
        """C ``digest_to_raw`` into the shared buffer (stops at the first bad digit)."""
        if _HEX64.match(text):
            d = bytes.fromhex(text[:64].decode())
            self.raw[:] = d
            return d
        raw = self.raw
        n = len(text)
        i = size = 0
        while i < n and size < 32:
            hi = _HEXVAL.get(text[i])
            lo = _HEXVAL.get(text[i + 1]) if i + 1 < n else None
            if hi is None or lo is None:
                break
            raw[size] = hi << 4 | lo
            size += 1
            i += 2
        return bytes(raw)

    def line(self, line: bytes) -> None:
        """Parse one line (``tree_from_dump_line``) and add its node to the tree."""
        nul = line.find(b"\0")
        if nul >= 0:
            raise DumpfileError(f"Invalid embedded NUL character at position {nul}")
        fields = []
        pos = 0
        n = len(line)
        for _ in range(11):
            j = line.find(b" ", pos)
            if j < 0:
                fields.append(line[pos:])
                pos = n
            else:
                fields.append(line[pos:j])
                pos = j + 1
        rest = line[pos:]
        path = _cstr(_unescape_c(fields[0]))
        if not path:
            raise DumpfileError("Invalid empty path")
        modef = fields[2]
        is_link = modef.startswith(b"@")
        if is_link:
            modef = modef[1:]
        mode = _strtoull(modef, 8) & _M32
        ty = mode & S_IFMT
        if ty not in _C_TYPES:
            raise DumpfileError(f"Invalid mode {mode:o}")
        # tree_add_node
        parent: object = None
        name = b""
        if path == b"/":
            if ty != S_IFDIR:
                raise DumpfileError("Root must be a directory")
            if self.fs is not None:
                raise DumpfileError("Can't have multiple roots")
        else:
            if self.fs is None:
                raise DumpfileError("Root node not present")
            parent, name = self._lookup_parent(path)
            if parent is None:
                raise DumpfileError(f"Parent directory missing for {_s(path)}")
            if type(parent) is not Directory:
                raise DumpfileError(f"Parent must be a directory for {_s(path)}")
            if name == b"." or name == b"..":
                raise DumpfileError(f"Invalid . or .. in path: {_s(path)}")
            if not name or len(name) > 255:
                raise DumpfileError("Can't add child")
            if name in parent.entries:
                # C means to say "Path %s already exist", but lcfs_node_add_child returns
                # -1 (errno EEXIST), not -EEXIST, so it says "Can't add child"
                raise DumpfileError("Can't add child" if self.complete
                                    else f"Path {_s(path)} already exist")
        if is_link:
            if ty == S_IFDIR:
                raise DumpfileError("Directories can't be hardlinked")
            tp = None if fields[8] == b"-" else _cstr(_unescape_c(fields[8]))
            link = _CLink(tp, parent, name, path, mode)  # type: ignore[arg-type]
            parent.entries[name] = link  # type: ignore[attr-defined]
            self.links.append(link)
            return
        size = _strtoull(fields[1], 10)
        nlink = _strtoull(fields[3], 10) & _M32
        uid = _strtoull(fields[4], 10)
        try:
            gid = _strtoull(fields[5], 10)
        except DumpfileError:
            if uid == 0:
                raise
            gid = 0  # C bug: GID errors are only caught when uid == 0
        try:
            rdev = _strtoull(fields[6], 10)
        except DumpfileError:
            if uid == 0:
                raise
            rdev = 0
        mt = fields[7]
        dot = mt.find(b".")
        sec = _strtoull(mt if dot < 0 else mt[:dot], 10)
        nsec = _strtoull(b"" if dot < 0 else mt[dot + 1:], 10)
        payload = None if fields[8] == b"-" else _cstr(_unescape_c(fields[8]))
        content = None if fields[9] == b"-" else _unescape_c(fields[9])
        if content is not None and len(content) != size:
            raise DumpfileError(
                f"Invalid content size {len(content)}, must match size {_lld(size)}")
        # a missing DIGEST field is an empty digest: set, from the buffer as it is
        digest = None if fields[10] == b"-" else self._digest(_cstr(_unescape_c(fields[10])))
        if ty not in (S_IFCHR, S_IFBLK) and self.strict and rdev != 0:
            raise DumpfileError("Non-zero devnum on non-device")
        item: object
        rdev &= _M32
        if ty == S_IFLNK:
            if not payload or len(payload) >= PATH_MAX:
                raise DumpfileError("Invalid symlink")
            if self.strict:
                if size != len(payload):
                    raise DumpfileError(f"Invalid symlink size {len(payload)}, must match "
                                        f"size {_lld(size)}")
                if content:
                    raise DumpfileError("Symlink cannot have content")
            item = Symlink(payload)
        else:
            if payload is not None and len(payload) >= PATH_MAX:
                raise DumpfileError("Invalid payload")
            if content is not None and len(content) > LCFS_INLINE_CONTENT_MAX:
                raise DumpfileError(f"Inline content size {len(content)} exceeds maximum "
                                    f"{LCFS_INLINE_CONTENT_MAX}")
            if ty == S_IFREG:
                item = self._regular(size, payload, content, digest)
            elif ty == S_IFDIR:
                item = Directory
            elif ty == S_IFCHR:
                item = CharacterDevice(rdev)
            elif ty == S_IFBLK:
                item = BlockDevice(rdev)
            elif ty == S_IFIFO:
                item = Fifo()
            else:
                item = Socket()
        if len(rest) > 0xFFFF:
            raise DumpfileError("Too many xattrs")
        stat = Stat(mode & 0o7777, uid & _M32, gid & _M32,
                    sec - (1 << 64) if sec >= 1 << 63 else sec, nsec & _M32)
        if rest:
            stat.xattrs = self._xattrs(rest)
        if path == b"/":
            self.fs = CFileSystem(stat)
            return
        if item is Directory:
            parent.entries[name] = Directory(stat)  # type: ignore[attr-defined]
            return
        fs: CFileSystem = self.fs  # type: ignore[assignment]
        leaf = parent.entries[name] = fs.push_leaf(stat, item)  # type: ignore[arg-type, attr-defined]
        if nlink != 1:
            self.nlinks[leaf] = nlink
        # C needs an extended inode when the (otherwise unused) size exceeds 32 bits
        if size > _M32 and ty != S_IFREG and ty != S_IFLNK and not (
                ty == S_IFCHR and rdev == 0):
            fs.c.wide.add(leaf)

    def _regular(self, size: int, payload: bytes | None, content: bytes | None,
                 digest: bytes | None) -> object:
        """The content of a regular file (C: overlay xattrs iff size > 0 and no content)."""
        if content is not None:
            return Inline(content)
        if size == 0:
            return Inline(b"")
        if not self.complete and c_chunk_count(size) > LCFS_MAX_NONINLINE_CHUNKS:
            raise DumpfileError("cannot write file: File too large")
        p = payload or b""
        if digest is None:
            if not p:
                return Sparse(size)
            d = parse_object_pathname(p, self.alg_size)
            if d is not None and object_pathname(d) == p:
                return ExternalNoVerity(d, size)
        elif p and object_pathname(digest) == p:
            return External(digest, size)
        if not self.complete:
            if not p:
                raise DumpfileError("unsupported: fs-verity digest without a payload")
            if digest is not None:
                raise DumpfileError(
                    f"unsupported: payload {p!r} is not the object path of the digest")
            raise DumpfileError(f"unsupported: payload {p!r} is not an object path")
        return Redirect(size, p, digest)

    @staticmethod
    def _xattrs(rest: bytes) -> dict[bytes, bytes]:
        xattrs: dict[bytes, bytes] = {}
        used = 0
        pos = 0
        n = len(rest)
        while pos < n:
            j = rest.find(b" ", pos)
            if j < 0:
                x = rest[pos:]
                pos = n
            else:
                x = rest[pos:j]
                pos = j + 1
            eq = x.find(b"=")
            if eq < 0:
                raise DumpfileError("Missing = in xattr")
            key = _cstr(_unescape_c(x[:eq]))
            value = _unescape_c(x[eq + 1:])
            if not key or len(key) > XATTR_NAME_MAX or len(value) > 0xFFFF:
                raise DumpfileError("Can't set xattr")
            old = xattrs.pop(key, None)
            if old is not None:
                used -= 7 + len(key) + len(old)
                if not xattrs:
                    used = 0
            entry = 7 + len(key) + len(value) + (12 if not xattrs else 0)
            if used + entry > LCFS_INODE_EXTERNAL_XATTR_MAX:
                raise DumpfileError("Can't set xattr")
            used += entry
            xattrs[key] = value
        return xattrs

    def finish(self) -> CFileSystem:
        """Link the hardlinks (after all lines, so forward references work), as C does."""
        if self.fs is None:
            raise DumpfileError("No root entry in dumpfile")
        fs = self.fs
        c = fs.c
        where: dict[Leaf, tuple[Directory, bytes]] = {}
        # tree_resolve_hardlinks: the last line first
        for link in reversed(self.links):
            if link.target is None:
                raise DumpfileError("No target path for the hardlink")
            parent, name, node = _c_lookup(fs.root, link.target)
            if node is None:
                raise DumpfileError(f"No target at {_s(link.target)} for hardlink")
            if node is link:
                raise DumpfileError(f"Self-referential hardlink {_s(link.target)}")
            if type(node) is Leaf:
                where[node] = (parent, name)  # type: ignore[assignment]
            # lcfs_node_make_hardlink refuses a target whose chain leads back to it (and
            # C's deep copy of the tree then forgets the refusal: the link is a plain node)
            if _follow(node)[1]:
                link.leaf = fs.push_leaf(Stat(link.mode & 0o7777), _EMPTY[link.mode & S_IFMT])
                where[link.leaf] = (link.parent, link.name)
            else:
                link.link_to = node
        for link in self.links:
            if link.leaf is not None:
                link.parent.entries[link.name] = link.leaf
        counts: dict[Leaf, int] = {}
        for link in self.links:
            if link.leaf is not None:
                continue
            node, why = _follow(link)
            if why:
                if not self.complete:
                    raise DumpfileError("cannot write file: Too many levels of symbolic "
                                        f"links (hardlink cycle at {_s(link.path)})")
                c.loops = True
                del link.parent.entries[link.name]
                continue
            if type(node) is _CLink:
                node = node.leaf
            if type(node) is Directory:
                if not self.complete:
                    raise DumpfileError("cannot write file: Invalid argument (hardlink "
                                        f"{link.path!r} to a directory)")
                del link.parent.entries[link.name]
                c.dir_links.setdefault(link.parent, {})[link.name] = node
                continue
            leaf: Leaf = node  # type: ignore[assignment]
            link.parent.entries[link.name] = leaf
            counts[leaf] = counts.get(leaf, 1) + 1
            c.primary[leaf] = where[leaf]
        # C writes the NLINK of the dump, not the number of entries
        for leaf, n in self.nlinks.items():
            if counts.get(leaf, 1) != n:
                c.nlink[leaf] = n
        for leaf, n in counts.items():
            if leaf not in self.nlinks and n != 1:
                c.nlink[leaf] = 1
        return fs


_EMPTY: dict[int, object] = {
    S_IFREG: Inline(b""), S_IFLNK: Symlink(b""), S_IFCHR: CharacterDevice(0),
    S_IFBLK: BlockDevice(0), S_IFIFO: Fifo(), S_IFSOCK: Socket()}


def _c_lookup(root: Directory, path: bytes) -> tuple[Directory | None, bytes, object]:
    """C ``lookup_path``: ``(parent, name, node)``; node None if not found."""
    node: object = root
    parent: Directory | None = None
    last = b""
    for comp in path.split(b"/"):
        if not comp:
            continue
        if type(node) is not Directory:
            return None, b"", None
        parent, last = node, comp
        node = node.entries.get(comp)
        if node is None:
            return None, b"", None
    return parent, last, node


# --------------------------------------------------------------------------- dump


class _Node:
    __slots__ = ("mode", "nlink", "size", "uid", "gid", "rdev", "sec", "nsec", "payload",
                 "content", "digest", "xattrs", "path")


def _load(img: Image, ino: Inode, path: bytes) -> _Node | None:
    """Build a C node from an inode; None for a native whiteout (skipped)."""
    data = img.data
    n = _Node()
    n.path = path
    n.mode = ino.mode
    n.nlink = ino.nlink
    n.size = ino.size
    n.uid = ino.uid
    n.gid = ino.gid
    n.sec = ino.mtime - (1 << 64) if ino.mtime >= 1 << 63 else ino.mtime
    n.nsec = ino.mtime_nsec
    t = ino.mode & F.S_IFMT
    n.rdev = ino.u if t in (F.S_IFCHR, F.S_IFBLK) else 0
    n.payload = n.content = n.digest = None
    if t == F.S_IFCHR and n.rdev == 0:
        if n.nlink > 1:
            raise ErofsError("cannot load image: hardlinked whiteout")
        return None
    bs = img.block_size
    tailpacked = ino.layout == F.LAYOUT_FLAT_INLINE
    if t == F.S_IFLNK:
        if ino.size >= PATH_MAX:
            raise ErofsError("cannot load image: symlink target too long")
        if tailpacked:
            raw = img.inline(ino) or b""
        else:
            start = ino.u * bs
            raw = data[start:start + ino.size]
            if len(raw) != ino.size:
                raise ErofsError("cannot load image: symlink target out of bounds")
        target = _cstr(raw[:ino.size])
        if not target:
            raise ErofsError("cannot load image: empty symlink target")
        n.payload = target
        n.size = len(target)
    elif t == F.S_IFREG and ino.size and ino.layout != F.LAYOUT_CHUNK_BASED:
        if ino.size > min(LCFS_INLINE_CONTENT_MAX, len(data)):
            raise ErofsError("cannot load image: inline file too large")
        n_blocks = (ino.size + bs - 1) // bs
        oob = (n_blocks - 1) * bs if tailpacked else ino.size
        start = ino.u * bs
        content = data[start:start + oob]
        if len(content) != oob:
            raise ErofsError("cannot load image: file data out of bounds")
        if tailpacked:
            content += img.inline(ino) or b""
        n.content = content
    shared, local = img.xattr_entries(ino)
    if local:
        # C quirk: the inline loop runs while ``entry + 4 < end``, so a final 4-byte entry
        # (empty suffix and value) is never read
        start = ino.offset + ino.header_size + 12 + 4 * len(shared)
        end = ino.offset + ino.header_size + ino.xattr_size
        kept = []
        for e in local:
            if start + 4 >= end:
                break
            kept.append(e)
            start = (e[3] + 3) & ~3
        local = kept
    xattrs: dict[bytes, bytes] = {}
    for idx, suffix, value, vend in local + shared:
        if idx >= len(F.XATTR_PREFIXES):
            raise ErofsError(f"cannot load image: unknown xattr index {idx}")
        name = F.XATTR_PREFIXES[idx] + suffix
        cur = n.mode & F.S_IFMT
        if name == _REDIRECT:
            if cur == F.S_IFREG:
                if len(value) > 1 and value[:1] == b"/":
                    # C quirk: after skipping "/" it reads len(value) bytes, i.e. one byte
                    # past the value (normally zero padding)
                    value = value[1:] + data[vend:vend + 1]
                n.payload = _cstr(value)
            continue
        if name == _METACOPY:
            if cur == F.S_IFREG and len(value) == 36:
                n.digest = value[4:36]
            continue
        if name == F.XATTR_OVERLAY_WHITEOUT and cur == F.S_IFREG:
            n.mode = (n.mode & ~F.S_IFMT) | F.S_IFCHR
            n.rdev = 0
            n.size = 0
            continue
        if name in _SKIP:
            continue
        if name.startswith(F.XATTR_OVERLAY_PREFIX):
            if not name.startswith(F.XATTR_OVERLAY_ESCAPED_PREFIX):
                continue
            name = b"trusted." + name[16:]
        name = _cstr(name)
        if not name or len(name) > 255:
            raise ErofsError("cannot load image: invalid xattr name")
        xattrs.pop(name, None)
        xattrs[name] = value
    n.xattrs = xattrs
    return n


def dump_image_c(image: bytes, filters: list[bytes] | None = None) -> bytes:
    """Print an image like C ``composefs-info [--filter=NAME…] dump``."""
    img = Image(image)
    if len(image) < F.BLOCK_SIZE or img.magic != F.COMPOSEFS_MAGIC \
            or img.sb_magic != F.EROFS_MAGIC:
        raise ErofsError("cannot load image: not a composefs image")
    if img.header_version != F.COMPOSEFS_HEADER_VERSION:
        raise ErofsError("cannot load image: unsupported composefs version")
    if img.meta_start >= len(image) or img.xattr_start >= len(image):
        raise ErofsError("cannot load image: invalid superblock")
    wanted = set(filters) if filters is not None else None
    out: list[bytes] = []
    nodes: dict[int, _Node] = {}
    root = _load(img, img.root(), b"")
    if root is None:
        raise ErofsError("cannot load image: root is a whiteout")
    nodes[img.root_nid] = root
    _emit(out, root, None)
    stack = [(b"", iter(_children(img, img.root(), wanted)))]
    depth_limit = 4096
    while stack:
        prefix, it = stack[-1]
        for name, nid in it:
            path = prefix + b"/" + name
            first = nodes.get(nid)
            if first is not None:
                _emit(out, first, path)
                continue
            ino = img.inode(nid)
            node = _load(img, ino, path)
            if node is None:
                continue
            nodes[nid] = node
            _emit(out, node, None)
            if ino.is_dir():
                if len(stack) >= depth_limit:
                    raise ErofsError("cannot load image: directory depth exceeded")
                stack.append((path, iter(_children(img, ino, None))))
                break
        else:
            stack.pop()
    return b"".join(out)


def _children(img: Image, ino: Inode, wanted: set[bytes] | None) -> list[tuple[bytes, int]]:
    ents = img.dir_entries(ino)
    return [(name, nid) for name, nid, _ft in ents
            if name != b"." and name != b".." and (wanted is None or name in wanted)]


def _emit(out: list[bytes], node: _Node, link_path: bytes | None) -> None:
    path = link_path if link_path is not None else node.path
    payload = node.path if link_path is not None else node.payload
    line = b"%s %d %s%o %d %d %d %d %d.%d " % (
        escape(path or b"/"), node.size, b"@" if link_path is not None else b"", node.mode,
        node.nlink, node.uid, node.gid, node.rdev, node.sec, node.nsec)
    line += b"-" if payload is None else (escape_optional(payload) if payload else b"")
    line += b" "
    if node.content is None:
        line += b"-"
    else:  # C prints ``size`` bytes (0 once an escaped whiteout was turned back into chr)
        content = node.content[:node.size]
        line += escape_optional(content) if content else b""
    line += b" " + (node.digest.hex().encode() if node.digest is not None else b"-")
    for k, v in node.xattrs.items():
        line += b" " + escape(k, True) + b"=" + escape(v, True)
    out.append(line + b"\n")

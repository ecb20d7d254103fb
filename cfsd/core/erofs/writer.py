"""Composefs EROFS image writer for format versions V0, V1 and V2 (docs/images.md).

``write_image(fs, version)`` is a pure function of the tree and the version.  V0/V1
("Epoch1") follow C mkcomposefs byte for byte (BFS inode order, compact inodes, 256
whiteout stubs, escaped whiteouts); V2 follows the legacy composefs-rs layout (DFS order,
extended inodes).  Inodes are collected here into a column-wise table
(:class:`~cfsd.core.erofs.layout.Inodes`), then :mod:`cfsd.core.erofs.layout` computes
every offset in one pass and streams the bytes out in a second
(``write_image_to(fs, version, sink)``): memory grows by a few dozen bytes per entry,
never by the size of the image.

Link counts live in each leaf's ``mark`` slot during collection (a dict per leaf would
cost more than the tree itself), held with ``tree.leaf_marks``.

A tree parsed from a C dumpfile is a :class:`CFileSystem`: it carries the node facts of C
``mkcomposefs`` that the tree model has no room for (:class:`CFacts`: the NLINK given in
the dump, which line of a hardlinked leaf is its own, hardlinks to directories, hardlink
cycles).  For such a tree the writer also reports C's write-time errors in C's order
(:func:`check_c_tree`), truncates chunk counts and compares mtimes as C does, and shares
at most 128 xattrs per inode.
"""

from __future__ import annotations

import errno
import os
from array import array
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cfsd.core.erofs import format as F
from cfsd.core.erofs.format import ErofsError
from cfsd.core.erofs.layout import ESCAPED, Inodes, Xattr, Xattrs, dirent_runs, emit_image
from cfsd.core.errors import TooDeep
from cfsd.core.tree import (
    MAX_DEPTH,
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
    TreeError,
    leaf_marks,
    paused_gc,
)

__all__ = ["CFacts", "CFileSystem", "ErofsError", "c_chunk_count", "check_c_tree",
           "select_c_version", "validate_filesystem", "write_image", "write_image_to"]

LCFS_VERSION_MAX = 1
LCFS_DEFAULT_VERSION_MIN = 0
LCFS_DEFAULT_VERSION_MAX = 1

_MASK64 = (1 << 64) - 1

_LEAF_FT = {
    Inline: F.FT_REG, External: F.FT_REG, ExternalNoVerity: F.FT_REG, Sparse: F.FT_REG,
    Redirect: F.FT_REG, BlockDevice: F.FT_BLK, CharacterDevice: F.FT_CHR, Fifo: F.FT_FIFO,
    Socket: F.FT_SOCK, Symlink: F.FT_LNK,
}
_CHUNKED = (External, ExternalNoVerity, Sparse, Redirect)

C_SHARED_XATTRS_MAX = 128          # EROFS_XATTR_LONG_PREFIX: C's cap of shared refs per inode
C_XATTR_MAX = 0xFFFF // 2          # LCFS_INODE_EXTERNAL_XATTR_MAX


@dataclass(eq=False)
class CFacts:
    """What a C ``mkcomposefs`` node knows beyond the tree model (all sparse).

    ``nlink``: leaves whose NLINK in the dump differs from their number of entries (C
    writes the dump's value).  ``wide``: non-regular leaves whose SIZE in the dump exceeds
    32 bits (C then needs an extended inode).  ``primary``: for hardlinked leaves, the
    directory and name of the leaf's own (non-``@``) line, where C gives it its inode.
    ``dir_links``: hardlinks to directories, kept out of ``entries`` (directory -> name ->
    target).  ``loops``: some hardlinks form a cycle (ELOOP at write time; they are left
    out of the tree).
    """

    nlink: dict[Leaf, int] = field(default_factory=dict)
    wide: set[Leaf] = field(default_factory=set)
    primary: dict[Leaf, tuple[Directory, bytes]] = field(default_factory=dict)
    dir_links: dict[Directory, dict[bytes, Directory]] = field(default_factory=dict)
    loops: bool = False


class CFileSystem(FileSystem):
    """A tree parsed from a C dumpfile, with its :class:`CFacts` (``c``)."""

    __slots__ = ("c",)

    def __init__(self, root_stat: Stat | None = None, *, root: Directory | None = None,
                 leaves: list[Leaf] | None = None) -> None:
        super().__init__(root_stat, root=root, leaves=leaves)
        self.c = CFacts()


def _facts(fs: FileSystem) -> CFacts | None:
    return fs.c if isinstance(fs, CFileSystem) else None


class _CXattrSize:
    """C's running xattr size of one node while ``lcfs_write_to`` adds the overlay xattrs.

    C writes a deep copy of the tree whose nodes start at size 0 whatever xattrs they
    have; replacing an existing xattr subtracts its entry size from that ``size_t``, which
    then wraps, and the next check (``size + entry > LCFS_INODE_EXTERNAL_XATTR_MAX``) fails
    unless the sum wraps back.  Names are as escaped (``trusted.overlay.*`` first).
    """

    __slots__ = ("names", "size")

    def __init__(self, xattrs: dict[bytes, bytes]) -> None:
        esc, ovl = F.XATTR_OVERLAY_ESCAPED_PREFIX, F.XATTR_OVERLAY_PREFIX
        self.names = {(esc + k[16:] if k.startswith(ovl) else k): len(v)
                      for k, v in xattrs.items()}
        self.size = 0

    def set(self, name: bytes, vlen: int) -> None:
        """Set an xattr as ``lcfs_node_set_xattr`` does (ERANGE when over budget)."""
        old = self.names.pop(name, None)
        if old is not None:
            self.size = (self.size - (7 + len(name) + old)) & _MASK64 if self.names else 0
        entry = 7 + len(name) + vlen + (0 if self.names else 12)
        size = (self.size + entry) & _MASK64
        if size > C_XATTR_MAX:
            raise _c_error(errno.ERANGE)
        self.size = size
        self.names[name] = vlen


def c_chunk_count(size: int) -> int:
    """C's chunk count: ``DIV_ROUND_UP`` in 64 bits, which wraps to 0 near 2**64."""
    bits = F.chunk_bits(size)
    return ((size + (1 << bits) - 1) & _MASK64) >> bits


def _c_error(code: int) -> ErofsError:
    return ErofsError(f"cannot write file: {os.strerror(code)}")


def check_c_tree(fs: CFileSystem, version: int) -> None:
    """Raise the error C ``lcfs_write_to`` meets first when writing *fs* as *version*.

    C walks its tree depth first (names in order, hardlinks skipped) checking each node
    (more than 1024 chunks: EFBIG) and adding the overlay xattrs (the whiteout escapes on
    the node and its parent may replace an xattr and overflow the budget: ERANGE, see
    :class:`_CXattrSize`); then the root's opaque xattr; then it follows every hardlink (a
    cycle: ELOOP).
    """
    c = fs.c
    primary = c.primary
    budgets: dict[Directory, _CXattrSize] = {}

    def budget(d: Directory) -> _CXattrSize:
        b = budgets.get(d)
        if b is None:
            b = budgets[d] = _CXattrSize(d.stat.xattrs)
        return b

    for d, name, leaf in fs.leaf_entries():
        where = primary.get(leaf)
        if where is not None and where != (d, name):
            continue
        ct = leaf.content
        t = type(ct)
        if t in _CHUNKED and ct.size > 0:  # type: ignore[union-attr]
            if c_chunk_count(ct.size) > F.LCFS_MAX_NONINLINE_CHUNKS:  # type: ignore[union-attr]
                raise _c_error(errno.EFBIG)
            # metacopy and redirect never replace an xattr: they cannot overflow
        elif t is CharacterDevice and ct.rdev == 0:  # type: ignore[union-attr]
            if leaf.stat.xattrs:     # without xattrs nothing is replaced
                b = _CXattrSize(leaf.stat.xattrs)
                b.set(F.XATTR_OVERLAY_WHITEOUT, 0)
                b.set(F.XATTR_USERXATTR_WHITEOUT, 0)
            if d.stat.xattrs:
                b = budget(d)
                b.set(F.XATTR_OVERLAY_WHITEOUTS, 0)
                b.set(F.XATTR_USERXATTR_WHITEOUTS, 0)
                if version >= 1:
                    b.set(F.XATTR_OVERLAY_OPAQUE, 1)
                    b.set(F.XATTR_USERXATTR_OPAQUE, 1)
    if fs.root.stat.xattrs:
        budget(fs.root).set(F.XATTR_OVERLAY_OPAQUE_ROOT, 1)
    if c.loops:
        raise _c_error(errno.ELOOP)


def select_c_version(fs: FileSystem, min_version: int | None = None,
                     max_version: int | None = None) -> int:
    """The format version C mkcomposefs writes for ``--min-version``/``--max-version``.

    No option given: min 0, max 1.  One option given: the other defaults to 0.  max is
    raised to min; versions above 1 are invalid.  With ``min < 1 <= max`` the version is
    bumped to 1 iff the tree contains a whiteout (docs/images.md).
    """
    if min_version is None and max_version is None:
        lo, hi = LCFS_DEFAULT_VERSION_MIN, LCFS_DEFAULT_VERSION_MAX
    else:
        lo, hi = min_version or 0, max_version or 0
    if lo < 0 or hi < 0 or lo > LCFS_VERSION_MAX or hi > LCFS_VERSION_MAX:
        raise ErofsError("cannot write file: Invalid argument")
    if hi < lo:
        hi = lo
    if lo < 1 <= hi and fs.has_whiteouts():
        return 1
    return lo


def validate_filesystem(fs: FileSystem) -> None:
    """Check the tree can be written: fsck clean, valid names, not too deep, no hardlinked
    whiteout (C trees may have them).  Costs no memory per entry."""
    with leaf_marks(fs):
        _count_links(fs, _facts(fs) is not None)


def _invalid(fs: FileSystem) -> ErofsError:
    """The error for a tree whose entries and leaf table disagree (fsck's words)."""
    for leaf in fs.leaves:
        leaf.mark = None
    try:
        fs.fsck()
    except TreeError as e:
        return ErofsError(f"invalid composefs filesystem: {e}")
    return ErofsError("invalid composefs filesystem")


def _count_links(fs: FileSystem, c_tree: bool = False) -> int:
    """Put every leaf's link count in ``leaf.mark`` and validate the tree on the way.

    Returns how many leaves are hardlinked.  Every leaf must be in the leaf table exactly
    once and be referenced; names must be valid; the tree no deeper than MAX_DEPTH; no
    whiteout hardlinked (unless ``c_tree``: C writes them).  Runs inside ``leaf_marks(fs)``.
    """
    leaves = fs.leaves
    for leaf in leaves:
        if leaf.mark is not None:
            raise _invalid(fs)          # listed twice
        leaf.mark = 0
    hard = 0
    stack = [(fs.root, 0)]
    while stack:
        d, level = stack.pop()
        for name, child in d.entries.items():
            if not name or b"/" in name or b"\0" in name or name == b"." or name == b"..":
                raise ErofsError(f"invalid file name {name!r}")
            if type(child) is Directory:
                if level >= MAX_DEPTH:
                    raise TooDeep(f"the tree nests deeper than {MAX_DEPTH} directories")
                stack.append((child, level + 1))
                continue
            m = child.mark  # type: ignore[union-attr]
            if m is None:
                raise _invalid(fs)      # not in the leaf table
            if m == 1:
                hard += 1
                c = child.content  # type: ignore[union-attr]
                if type(c) is CharacterDevice and c.rdev == 0 and not c_tree:
                    raise ErofsError("invalid composefs filesystem: whiteout inode has nlink > 1")
            child.mark = m + 1  # type: ignore[union-attr]
    for leaf in leaves:
        if not leaf.mark:
            raise _invalid(fs)          # orphaned
    return hard


class _Collector:
    """Builds the inode table (with local xattrs and data placement) for one version."""

    def __init__(self, fs: FileSystem, version: int) -> None:
        self.fs = fs
        self.version = version
        self.epoch1 = version < 2
        self.ino = Inodes()
        self.c = _facts(fs)
        self.hardlinks: dict[Leaf, int] = {}
        self.first_dir: dict[Leaf, tuple[Directory, bytes]] = {}
        self.dir_idx: dict[Directory, int] | None = (
            {} if self.c is not None and self.c.dir_links else None)
        self._names: dict[bytes, tuple[int, bytes, int]] = {}
        self.stubs: dict[bytes, Leaf] = {}
        self._metacopy_bit = self._name(F.XATTR_OVERLAY_METACOPY)[2]
        self._overlay_bits = self._metacopy_bit | self._name(F.XATTR_OVERLAY_REDIRECT)[2]

    # ---------------------------------------------------------------- traversal helpers

    def _sorted_names(self, d: Directory) -> list[bytes]:
        names = list(d.entries)
        if self.stubs and d is self.fs.root:
            names += self.stubs
        if self.dir_idx is not None:
            names += self.c.dir_links.get(d, ())  # type: ignore[union-attr]
        names.sort()
        return names

    def prepare(self, hardlinked: int) -> None:
        """Whiteout stubs (Epoch1) and, for hardlinks, the entry that owns the inode.

        C gives a hardlinked leaf its inode at the entry of its own dump line, and
        composefs-rs where a name-ordered DFS meets it first (the line C dumps in full).
        """
        fs = self.fs
        if not self.epoch1:
            return
        root = fs.root
        rst = root.stat
        xattrs = {}
        sel = rst.xattrs.get(F.XATTR_SECURITY_SELINUX)
        if sel is not None:
            xattrs[F.XATTR_SECURITY_SELINUX] = sel
        stub_stat = Stat(0o644, rst.st_uid, rst.st_gid, rst.st_mtim_sec, rst.st_mtim_nsec,
                         xattrs)
        present = root.entries
        links = self.c.dir_links.get(root, {}) if self.dir_idx is not None else {}
        for i in range(256):
            name = b"%02x" % i
            if name not in present and name not in links:
                self.stubs[name] = Leaf(stub_stat, CharacterDevice(0))
        if not hardlinked:
            return
        first = self.first_dir
        for d, name, leaf in fs.leaf_entries():
            if leaf.mark > 1 and leaf not in first:  # type: ignore[operator]
                first[leaf] = (d, name)
        if self.c is not None:
            first.update(self.c.primary)

    # ---------------------------------------------------------------- xattrs

    def _name(self, name: bytes) -> tuple[int, bytes, int]:
        r = self._names.get(name)
        if r is None:
            idx, suffix = F.split_xattr_name(name, self.epoch1)
            if len(suffix) > 255:
                raise ErofsError(f"xattr name too long: {name!r}")
            r = (idx, suffix, F.filter_bit(idx, suffix))
            self._names[name] = r
        return r

    def add_xattr(self, idx: int, name: bytes, value: bytes, replace: bool = False) -> None:
        """Add a local xattr; with ``replace`` an existing one of that name is dropped first."""
        pidx, suffix, bit = self._name(name)
        if len(value) > 0xFFFF:
            raise ErofsError(f"xattr value too long for {name!r}")
        x = self.ino.xattrs.get(idx)
        if x is None:
            x = self.ino.xattrs[idx] = Xattrs()
        elif replace:
            x.local = [e for e in x.local if e[0] != pidx or e[1] != suffix]
        x.local.append((pidx, suffix, value))
        x.filt |= bit

    def _push(self, node: Directory | Leaf, ft: int) -> int:
        idx = self.ino.push(node, ft)
        stat = node.stat
        if type(node) is Leaf:
            content = node.content
            t = type(content)
            if t is External:
                digest = content.id
                h = digest.hex().encode()
                x = self.ino.xattrs[idx] = Xattrs()
                x.local = [(4, b"overlay.metacopy", F.metacopy_value(digest)),
                           (4, b"overlay.redirect", b"/" + h[:2] + b"/" + h[2:])]
                x.filt = self._overlay_bits
            elif t is ExternalNoVerity:
                h = content.id.hex().encode()
                x = self.ino.xattrs[idx] = Xattrs()
                x.local = [(4, b"overlay.metacopy", b""),
                           (4, b"overlay.redirect", b"/" + h[:2] + b"/" + h[2:])]
                x.filt = self._overlay_bits
            elif t is Sparse:
                x = self.ino.xattrs[idx] = Xattrs()
                x.local = [(4, b"overlay.metacopy", b"")]
                x.filt = self._metacopy_bit
            elif t is Redirect:
                x = self.ino.xattrs[idx] = Xattrs()
                d = content.digest
                x.local = [(4, b"overlay.metacopy", F.metacopy_value(d) if d else b"")]
                x.filt = self._metacopy_bit
                if content.payload:
                    x.local.append((4, b"overlay.redirect", b"/" + content.payload))
                    x.filt = self._overlay_bits
        elif self.dir_idx is not None:
            self.dir_idx[node] = idx  # type: ignore[index]
        if stat.xattrs:
            for name, value in sorted(stat.xattrs.items()):
                if name.startswith(F.XATTR_OVERLAY_PREFIX):
                    name = F.XATTR_OVERLAY_ESCAPED_PREFIX + name[16:]
                self.add_xattr(idx, name, value)
        return idx

    # ---------------------------------------------------------------- inodes

    def collect_leaf(self, leaf: Leaf, nlink: int) -> int:
        """The inode index of ``leaf``, creating the inode on first use."""
        if nlink > 1:
            idx = self.hardlinks.get(leaf)
            if idx is not None:
                return idx
        content = leaf.content
        t = type(content)
        n_blocks = tail = 0
        if self.epoch1:
            if t is Inline:
                n = len(content.data)
                if n:
                    n_blocks, tail = divmod(n, F.BLOCK_SIZE)
                    if tail > F.BLOCK_SIZE // 2:
                        n_blocks += 1
                        tail = 0
            elif t is Symlink:
                tail = len(content.target)
            elif t in _CHUNKED and content.size > 0:
                count = (F.chunk_count if self.c is None else c_chunk_count)(content.size)
                if count > F.LCFS_MAX_NONINLINE_CHUNKS:
                    raise ErofsError("cannot write file: File too large")
                tail = 4 * count
        elif t is Inline:
            tail = len(content.data)
        elif t is External or (t is Redirect and content.digest):
            tail = 4
        idx = self._push(leaf, _LEAF_FT[t])
        ino = self.ino
        ino.nlink[idx] = nlink
        ino.n_blocks[idx] = n_blocks
        ino.tail[idx] = tail
        if nlink > 1:
            self.hardlinks[leaf] = idx
        c = self.c
        if c is not None:
            given = c.nlink.get(leaf)
            if given is not None:
                ino.nlink[idx] = given
            if leaf in c.wide:
                ino.wide.add(idx)
        return idx

    def _finish_dir(self, me: int, parent: int, names: list[bytes], kids: list[int],
                    nsub: int) -> list[int]:
        """Record a directory's dirents (``.`` and ``..`` put in their sorted places).

        Returns where each original entry of *kids* ended up.
        """
        p1 = bisect_left(names, b".")
        names.insert(p1, b".")
        kids.insert(p1, me)
        p2 = bisect_left(names, b"..", p1 + 1)
        names.insert(p2, b"..")
        kids.insert(p2, parent)
        ino = self.ino
        ino.dirents[me] = (names, array("I", kids))
        bounds, inline = dirent_runs(names)
        ino.n_blocks[me] = len(bounds) - 1
        ino.tail[me] = inline
        ino.nlink[me] = 2 + nsub
        return [p1, p2]

    def collect_bfs(self) -> None:
        """Epoch1 inode order (C ``lcfs_compute_tree``), with whiteout escaping."""
        root = self.fs.root
        ino = self.ino
        root_idx = self._push(root, F.FT_DIR)
        fts = ino.ft
        flags = ino.flags
        first = self.first_dir
        hardlinks = self.hardlinks
        stubs = self.stubs
        v1 = self.version == 1
        dir_idx = self.dir_idx
        queue = deque([(root, root_idx, root_idx)])
        deferred: list[tuple[int, int, Leaf | Directory]] = []
        while queue:
            d, parent, me = queue.popleft()
            names = self._sorted_names(d)
            entries = d.entries
            dlinks = self.c.dir_links.get(d, {}) if dir_idx is not None else {}  # type: ignore[union-attr]
            kids: list[int] = []
            later: list[tuple[int, Leaf | Directory]] = []
            has_wh = False
            nsub = 0
            for name in names:
                child = entries.get(name)
                if child is None:
                    target = dlinks.get(name)
                    if target is not None:      # a C hardlink to a directory
                        cidx = dir_idx.get(target)  # type: ignore[union-attr]
                        if cidx is None:
                            later.append((len(kids), target))
                            cidx = 0
                        kids.append(cidx)
                        continue
                    # a whiteout stub: stays a native whiteout
                    kids.append(self.collect_leaf(stubs[name], 1))
                    continue
                if type(child) is Directory:
                    cidx = self._push(child, F.FT_DIR)
                    queue.append((child, me, cidx))
                    kids.append(cidx)
                    nsub += 1
                    continue
                leaf: Leaf = child  # type: ignore[assignment]
                m = leaf.mark
                if m == 1 or first[leaf] == (d, name):
                    cidx = self.collect_leaf(leaf, m)  # type: ignore[arg-type]
                    c = leaf.content
                    # The 256 stubs are added after escaping in C, so only they stay
                    # native; a user whiteout is always escaped (composefs-rs instead
                    # guesses "stub-like" user entries, which C does not do).
                    if type(c) is CharacterDevice and c.rdev == 0 and not flags[cidx] & ESCAPED:
                        flags[cidx] |= ESCAPED
                        fts[cidx] = F.FT_REG
                        self.add_xattr(cidx, F.XATTR_OVERLAY_WHITEOUT, b"", True)
                        self.add_xattr(cidx, F.XATTR_USERXATTR_WHITEOUT, b"", True)
                        has_wh = True
                    kids.append(cidx)
                else:
                    cidx = hardlinks.get(leaf)
                    if cidx is None:    # its inode comes with a directory queued later
                        later.append((len(kids), leaf))
                        cidx = 0
                    kids.append(cidx)
            if has_wh:
                self.add_xattr(me, F.XATTR_OVERLAY_WHITEOUTS, b"", True)
                self.add_xattr(me, F.XATTR_USERXATTR_WHITEOUTS, b"", True)
                if v1:
                    self.add_xattr(me, F.XATTR_OVERLAY_OPAQUE, b"x", True)
                    self.add_xattr(me, F.XATTR_USERXATTR_OPAQUE, b"x", True)
            p1, p2 = self._finish_dir(me, parent, names, kids, nsub)
            for i, leaf in later:
                j = i + (i >= p1)
                deferred.append((me, j + (j >= p2), leaf))
        for me, k, node in deferred:
            ino.dirents[me][1][k] = (dir_idx[node] if type(node) is Directory  # type: ignore[index]
                                     else hardlinks[node])  # type: ignore[index]

    def collect_dfs(self) -> None:
        """V2 inode order: pre-order DFS, children in name order."""
        root = self.fs.root
        me = self._push(root, F.FT_DIR)
        names = sorted(root.entries)
        # frame: directory, its inode, its parent's inode, names, iterator, kids, subdirs
        stack: list[list] = [[root, me, me, names, iter(names), [], 0]]
        while stack:
            frame = stack[-1]
            d, me, _parent, names, it, kids, _nsub = frame
            entries = d.entries
            for name in it:
                child = entries[name]
                if type(child) is Directory:
                    cidx = self._push(child, F.FT_DIR)
                    kids.append(cidx)
                    frame[6] += 1
                    sub = sorted(child.entries)
                    stack.append([child, cidx, me, sub, iter(sub), [], 0])
                    break
                kids.append(self.collect_leaf(child, child.mark))  # type: ignore[arg-type]
            else:
                stack.pop()
                self._finish_dir(me, frame[2], names, kids, frame[6])


def _full_key(x: Xattr) -> tuple[bytes, int, bytes]:
    return (F.XATTR_PREFIXES[x[0]] + x[1], len(x[2]), x[2])


def _share_xattrs(ino: Inodes, epoch1: bool, cap: int | None = None) -> list[Xattr]:
    """Move xattrs used by more than one inode to the shared table (docs/images.md).

    With ``cap`` (C) an inode refers to at most that many shared entries; the rest of its
    xattrs stay local even if they are in the table."""
    counts: Counter = Counter()
    with_x = [x for x in ino.xattrs.values() if x.local]
    for x in with_x:
        if epoch1 and len(x.local) > 1:
            x.local.sort(key=_full_key)
        counts.update(x.local)
    shared = [x for x, n in counts.items() if n > 1]
    if not shared:
        return []
    if epoch1:
        shared.sort(key=_full_key, reverse=True)
    else:
        shared.sort()
    index = {x: i for i, x in enumerate(shared)}
    for x in with_x:
        local = []
        refs = []
        for e in x.local:
            i = index.get(e)
            if i is None or (cap is not None and len(refs) >= cap):
                local.append(e)
            else:
                refs.append(i)
        if refs:
            x.local = local
            x.shared = refs
    return shared


def write_image(fs: FileSystem, version: int) -> bytes:
    """The composefs EROFS image of ``fs`` for format ``version`` (0, 1 or 2)."""
    parts: list[bytes] = []
    write_image_to(fs, version, parts.append)
    return b"".join(parts)


def write_image_to(fs: FileSystem, version: int, sink: Callable[[bytes], object]) -> None:
    """Stream the composefs EROFS image of ``fs`` to ``sink`` in chunks, front to back."""
    if version not in (0, 1, 2):
        raise ErofsError(f"unsupported composefs format version {version}")
    c = _facts(fs)
    with paused_gc():
        if c is not None and version < 2:
            check_c_tree(fs, version)  # type: ignore[arg-type]
        with leaf_marks(fs):
            col = _Collector(fs, version)
            col.prepare(_count_links(fs, c is not None))
            if col.epoch1:
                col.collect_bfs()
            else:
                col.collect_dfs()
        ino = col.ino
        flags = 0
        if col.epoch1:
            col.add_xattr(0, F.XATTR_OVERLAY_OPAQUE_ROOT, b"y")
            # C sets HAS_ACL for the exact names system.posix_acl_{access,default};
            # composefs-rs tests the prefix index (2/3), which differs for longer names
            for x in ino.xattrs.values():
                if any((e[0] == 2 or e[0] == 3) and not e[1] for e in x.local):
                    flags = F.COMPOSEFS_FLAGS_HAS_ACL
                    break
        if c is not None and col.epoch1:
            shared = _share_xattrs(ino, True, C_SHARED_XATTRS_MAX)
            # C compares seconds as signed (composefs-rs as unsigned)
            sec, nsec = min((node.stat.st_mtim_sec, node.stat.st_mtim_nsec)
                            for node in ino.obj)
            min_mtime = (sec & _MASK64, nsec)
        else:
            shared = _share_xattrs(ino, col.epoch1)
            min_mtime = min((node.stat.st_mtim_sec & _MASK64, node.stat.st_mtim_nsec)
                            for node in ino.obj)
        emit_image(ino, shared, version, flags, min_mtime, sink)

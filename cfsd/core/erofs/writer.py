"""Composefs EROFS image writer for format versions V0, V1 and V2 (storage.md 8.4-8.10).

``write_image(fs, version)`` is a pure function of the tree and the version.  V0/V1
("Epoch1") follow C mkcomposefs byte for byte (BFS inode order, compact inodes, 256
whiteout stubs, escaped whiteouts); V2 follows the legacy composefs-rs layout (DFS order,
extended inodes).  The image is built in memory: inodes are collected and prepared here,
then :mod:`cfsd.core.erofs.layout` computes every offset in one pass and emits the bytes
into a preallocated buffer in a second.
"""

from __future__ import annotations

from collections import Counter, deque

from cfsd.core.erofs import format as F
from cfsd.core.erofs.format import ErofsError
from cfsd.core.erofs.layout import Ino, emit_image
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
    Socket,
    Sparse,
    Stat,
    Symlink,
    TreeError,
    paused_gc,
)

__all__ = ["ErofsError", "select_c_version", "validate_filesystem", "write_image"]

LCFS_VERSION_MAX = 1
LCFS_DEFAULT_VERSION_MIN = 0
LCFS_DEFAULT_VERSION_MAX = 1

_MASK64 = (1 << 64) - 1

_LEAF_FT = {
    Inline: F.FT_REG, External: F.FT_REG, ExternalNoVerity: F.FT_REG, Sparse: F.FT_REG,
    BlockDevice: F.FT_BLK, CharacterDevice: F.FT_CHR, Fifo: F.FT_FIFO, Socket: F.FT_SOCK,
    Symlink: F.FT_LNK,
}
_CHUNKED = (External, ExternalNoVerity, Sparse)


def select_c_version(fs: FileSystem, min_version: int | None = None,
                     max_version: int | None = None) -> int:
    """The format version C mkcomposefs writes for ``--min-version``/``--max-version``.

    No option given: min 0, max 1.  One option given: the other defaults to 0.  max is
    raised to min; versions above 1 are invalid.  With ``min < 1 <= max`` the version is
    bumped to 1 iff the tree contains a whiteout (storage.md 8.2).
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
    """Check the tree can be written: fsck clean and no hardlinked whiteout."""
    try:
        fs.fsck()
    except TreeError as e:
        raise ErofsError(f"invalid composefs filesystem: {e}") from e
    if fs.depth() > MAX_DEPTH:
        raise TooDeep(f"the tree nests deeper than {MAX_DEPTH} directories")
    for leaf, n in fs.nlinks().items():
        if n > 1 and type(leaf.content) is CharacterDevice and leaf.content.rdev == 0:
            raise ErofsError("invalid composefs filesystem: whiteout inode has nlink > 1")


class _Collector:
    """Builds the inode list (with local xattrs and data placement) for one version."""

    def __init__(self, fs: FileSystem, version: int) -> None:
        self.fs = fs
        self.version = version
        self.epoch1 = version < 2
        self.inodes: list[Ino] = []
        self.hardlinks: dict[Leaf, int] = {}
        self.sorted: dict[int, list[tuple[bytes, Directory | Leaf]]] = {}
        self.nlinks: dict[Leaf, int] = {}
        self.first_dir: dict[Leaf, Directory] = {}
        self._names: dict[bytes, tuple[int, bytes, int]] = {}
        self.stubs: list[tuple[bytes, Leaf]] = []
        self._metacopy_bit = self._name(F.XATTR_OVERLAY_METACOPY)[2]
        self._overlay_bits = self._metacopy_bit | self._name(F.XATTR_OVERLAY_REDIRECT)[2]

    # ---------------------------------------------------------------- traversal helpers

    def _entries(self, d: Directory) -> list[tuple[bytes, Directory | Leaf]]:
        ents = self.sorted.get(id(d))
        if ents is None:
            ents = sorted(d.entries.items())
            for name, _child in ents:
                if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
                    raise ErofsError(f"invalid file name {name!r}")
            if d is self.fs.root and self.stubs:
                ents = sorted(ents + self.stubs)
            self.sorted[id(d)] = ents
        return ents

    def scan(self) -> None:
        """DFS in name order: nlink of every leaf and the directory of its first occurrence."""
        fs = self.fs
        if self.epoch1:
            root = fs.root
            rst = root.stat
            xattrs = {}
            sel = rst.xattrs.get(F.XATTR_SECURITY_SELINUX)
            if sel is not None:
                xattrs[F.XATTR_SECURITY_SELINUX] = sel
            stub_stat = Stat(0o644, rst.st_uid, rst.st_gid, rst.st_mtim_sec, rst.st_mtim_nsec,
                             xattrs)
            present = root.entries
            for i in range(256):
                name = b"%02x" % i
                if name not in present:
                    self.stubs.append((name, Leaf(stub_stat, CharacterDevice(0))))
        counts = self.nlinks
        first = self.first_dir
        get = counts.get
        stack = [(fs.root, iter(self._entries(fs.root)))]
        while stack:
            d, it = stack[-1]
            for _name, child in it:
                if type(child) is Directory:
                    if len(stack) > MAX_DEPTH:
                        raise TooDeep(f"the tree nests deeper than {MAX_DEPTH} directories")
                    stack.append((child, iter(self._entries(child))))
                    break
                c = get(child)  # type: ignore[arg-type]
                if c is None:
                    counts[child] = 1  # type: ignore[index]
                    first[child] = d  # type: ignore[index]
                else:
                    counts[child] = c + 1  # type: ignore[index]
            else:
                stack.pop()
        # validation (fsck + hardlinked whiteouts), without a second tree walk
        stub_leaves = {id(leaf) for _, leaf in self.stubs}
        table = {id(leaf) for leaf in fs.leaves}
        n_real = len(counts) - len(stub_leaves)
        if len(table) != len(fs.leaves) or n_real != len(table) or any(
                id(leaf) not in table for leaf in counts if id(leaf) not in stub_leaves):
            validate_filesystem(fs)
            raise ErofsError("invalid composefs filesystem")
        for leaf, n in counts.items():
            if n > 1 and type(leaf.content) is CharacterDevice and leaf.content.rdev == 0:
                raise ErofsError("invalid composefs filesystem: whiteout inode has nlink > 1")

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

    def add_xattr(self, ino: Ino, name: bytes, value: bytes, replace: bool = False) -> None:
        """Add a local xattr; with ``replace`` an existing one of that name is dropped first."""
        idx, suffix, bit = self._name(name)
        if len(value) > 0xFFFF:
            raise ErofsError(f"xattr value too long for {name!r}")
        if ino.local is None:
            ino.local = []
        elif replace:
            ino.local = [x for x in ino.local if x[0] != idx or x[1] != suffix]
        ino.local.append((idx, suffix, value))
        ino.filt |= bit

    def _push(self, stat: Stat, ft: int, content: object) -> Ino:
        ino = Ino(stat, ft, content)
        t = type(content)
        if t is External:
            digest = content.id
            h = digest.hex().encode()
            ino.local = [(4, b"overlay.metacopy", F.metacopy_value(digest)),
                         (4, b"overlay.redirect", b"/" + h[:2] + b"/" + h[2:])]
            ino.filt = self._overlay_bits
        elif t is ExternalNoVerity:
            h = content.id.hex().encode()
            ino.local = [(4, b"overlay.metacopy", b""),
                         (4, b"overlay.redirect", b"/" + h[:2] + b"/" + h[2:])]
            ino.filt = self._overlay_bits
        elif t is Sparse:
            ino.local = [(4, b"overlay.metacopy", b"")]
            ino.filt = self._metacopy_bit
        if stat.xattrs:
            for name, value in sorted(stat.xattrs.items()):
                if name.startswith(F.XATTR_OVERLAY_PREFIX):
                    name = F.XATTR_OVERLAY_ESCAPED_PREFIX + name[16:]
                self.add_xattr(ino, name, value)
        ino.idx = len(self.inodes)
        self.inodes.append(ino)
        return ino

    # ---------------------------------------------------------------- inodes

    def collect_leaf(self, leaf: Leaf) -> int:
        """The inode index of ``leaf``, creating the inode on first use."""
        nlink = self.nlinks[leaf]
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
                count = F.chunk_count(content.size)
                if count > F.LCFS_MAX_NONINLINE_CHUNKS:
                    raise ErofsError("cannot write file: File too large")
                tail = 4 * count
        elif t is Inline:
            tail = len(content.data)
        elif t is External:
            tail = 4
        ino = self._push(leaf.stat, _LEAF_FT[t], content)
        ino.nlink = nlink
        ino.n_blocks = n_blocks
        ino.tail = tail
        if nlink > 1:
            self.hardlinks[leaf] = ino.idx
        return ino.idx

    def collect_bfs(self) -> None:
        """Epoch1 inode order (C ``lcfs_compute_tree``), with whiteout escaping."""
        root = self.fs.root
        root_idx = self._push(root.stat, F.FT_DIR, None).idx
        inodes = self.inodes
        nlinks = self.nlinks
        first = self.first_dir
        hardlinks = self.hardlinks
        v1 = self.version == 1
        stub_ids = {id(leaf) for _name, leaf in self.stubs}
        queue = deque([(root, root_idx, root_idx)])
        records: list[tuple[int, list]] = []
        deferred = False
        while queue:
            d, parent, me = queue.popleft()
            ents: list = [(b".", me, F.FT_DIR), (b"..", parent, F.FT_DIR)]
            has_wh = False
            is_root = me == root_idx
            for name, child in self._entries(d):
                if type(child) is Directory:
                    cidx = self._push(child.stat, F.FT_DIR, None).idx
                    queue.append((child, me, cidx))
                    ents.append((name, cidx, F.FT_DIR))
                    continue
                leaf: Leaf = child  # type: ignore[assignment]
                if nlinks[leaf] == 1 or first[leaf] is d:
                    cidx = self.collect_leaf(leaf)
                    c = leaf.content
                    if type(c) is CharacterDevice and c.rdev == 0:
                        ino = inodes[cidx]
                        # The 256 stubs are added after escaping in C, so only they stay
                        # native; a user whiteout is always escaped (composefs-rs instead
                        # guesses "stub-like" user entries, which C does not do).
                        if not ino.escaped and not (is_root and id(leaf) in stub_ids):
                            ino.escaped = True
                            ino.ft = F.FT_REG
                            self.add_xattr(ino, F.XATTR_OVERLAY_WHITEOUT, b"", True)
                            self.add_xattr(ino, F.XATTR_USERXATTR_WHITEOUT, b"", True)
                            has_wh = True
                    ents.append((name, cidx, inodes[cidx].ft))
                else:
                    cidx = hardlinks.get(leaf)
                    if cidx is None:
                        deferred = True
                        ents.append((name, leaf, F.FT_REG))
                    else:
                        ents.append((name, cidx, inodes[cidx].ft))
            if has_wh:
                dino = inodes[me]
                self.add_xattr(dino, F.XATTR_OVERLAY_WHITEOUTS, b"", True)
                self.add_xattr(dino, F.XATTR_USERXATTR_WHITEOUTS, b"", True)
                if v1:
                    self.add_xattr(dino, F.XATTR_OVERLAY_OPAQUE, b"x", True)
                    self.add_xattr(dino, F.XATTR_USERXATTR_OPAQUE, b"x", True)
            self.sorted.pop(id(d), None)     # last use: the list goes with the walk
            records.append((me, ents))
        for me, ents in records:
            if deferred:
                for i, e in enumerate(ents):
                    if type(e[1]) is Leaf:
                        cidx = hardlinks[e[1]]
                        ents[i] = (e[0], cidx, inodes[cidx].ft)
            ents.sort()
            inodes[me].set_dir_entries(ents)

    def collect_dfs(self) -> None:
        """V2 inode order: pre-order DFS, children in name order."""
        root = self.fs.root
        inodes = self.inodes
        me = self._push(root.stat, F.FT_DIR, None).idx
        stack = [(me, iter(self._entries(root)), [(b".", me, F.FT_DIR), (b"..", me, F.FT_DIR)])]
        self.sorted.clear()                 # last use: each list lives as long as its walk
        while stack:
            me, it, ents = stack[-1]
            for name, child in it:
                if type(child) is Directory:
                    cidx = self._push(child.stat, F.FT_DIR, None).idx
                    ents.append((name, cidx, F.FT_DIR))
                    stack.append((cidx, iter(self._entries(child)),
                                  [(b".", cidx, F.FT_DIR), (b"..", me, F.FT_DIR)]))
                    self.sorted.pop(id(child), None)
                    break
                cidx = self.collect_leaf(child)  # type: ignore[arg-type]
                ents.append((name, cidx, inodes[cidx].ft))
            else:
                stack.pop()
                ents.sort()
                inodes[me].set_dir_entries(ents)


def _full_key(x: tuple[int, bytes, bytes]) -> tuple[bytes, int, bytes]:
    return (F.XATTR_PREFIXES[x[0]] + x[1], len(x[2]), x[2])


def _share_xattrs(inodes: list[Ino], epoch1: bool) -> list[tuple[int, bytes, bytes]]:
    """Move xattrs used by more than one inode to the shared table (storage.md 8.7)."""
    counts: Counter = Counter()
    with_x = [ino for ino in inodes if ino.local]
    for ino in with_x:
        if epoch1 and len(ino.local) > 1:
            ino.local.sort(key=_full_key)
        counts.update(ino.local)
    shared = [x for x, n in counts.items() if n > 1]
    if not shared:
        return []
    if epoch1:
        shared.sort(key=_full_key, reverse=True)
    else:
        shared.sort()
    index = {x: i for i, x in enumerate(shared)}
    for ino in with_x:
        local = []
        refs = []
        for x in ino.local:
            i = index.get(x)
            if i is None:
                local.append(x)
            else:
                refs.append(i)
        if refs:
            ino.local = local
            ino.shared = refs
    return shared


def write_image(fs: FileSystem, version: int) -> bytes:
    """Build the composefs EROFS image of ``fs`` for format ``version`` (0, 1 or 2)."""
    if version not in (0, 1, 2):
        raise ErofsError(f"unsupported composefs format version {version}")
    with paused_gc():
        return _write_image(fs, version)


def _write_image(fs: FileSystem, version: int) -> bytes:
    col = _Collector(fs, version)
    col.scan()
    epoch1 = col.epoch1
    if epoch1:
        col.collect_bfs()
    else:
        col.collect_dfs()
    inodes = col.inodes
    flags = 0
    if epoch1:
        col.add_xattr(inodes[0], F.XATTR_OVERLAY_OPAQUE_ROOT, b"y")
        # C sets HAS_ACL for the exact names system.posix_acl_{access,default};
        # composefs-rs tests the prefix index (2/3), which differs for longer names
        for ino in inodes:
            if ino.local and any((x[0] == 2 or x[0] == 3) and not x[1] for x in ino.local):
                flags = F.COMPOSEFS_FLAGS_HAS_ACL
                break
    shared = _share_xattrs(inodes, epoch1)
    min_mtime = min((ino.stat.st_mtim_sec & _MASK64, ino.stat.st_mtim_nsec) for ino in inodes)
    return emit_image(inodes, shared, version, flags, min_mtime)

"""The composefs filesystem tree model (docs/images.md).

A :class:`FileSystem` is a root :class:`Directory` plus a table of :class:`Leaf` objects.
Directory entries map a name (``bytes``) to either a sub-:class:`Directory` or a
:class:`Leaf`; hardlinks are several entries holding the *same* :class:`Leaf` object, and
the nlink of a leaf is the number of entries that reference it.  Names, paths, symlink
targets and xattrs are ``bytes`` everywhere; "sorted" always means plain byte order.

Besides the model this module implements path lookup with Rust ``Path::components``
semantics (6.2), the OCI layer merge ``apply_layer_entry`` (6.3), ``transform_for_oci``
(6.4), ``fsck`` and ``compact``.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = [
    "BlockDevice", "CharacterDevice", "Directory", "DirectoryItem", "External",
    "ExternalNoVerity", "Fifo", "FileSystem", "Hardlink", "Inline", "InvalidFilename",
    "IsADirectory", "Leaf", "LeafContent", "LayerItem", "NotADirectory", "NotFound",
    "OrphanedLeaves", "Redirect", "RegularFile", "Socket", "Sparse", "Stat", "Symlink",
    "TreeError",
    "XattrFiltering", "apply_layer_entry", "canonicalize_run", "copy_root_metadata_from_usr",
    "file_name", "file_type_bits", "is_whiteout", "leaf_marks", "paused_gc",
    "transform_for_oci",
]

S_IFMT = 0o170000
S_IFSOCK = 0o140000
S_IFLNK = 0o120000
S_IFREG = 0o100000
S_IFBLK = 0o060000
S_IFDIR = 0o040000
S_IFCHR = 0o020000
S_IFIFO = 0o010000


# --------------------------------------------------------------------------- errors



# How deep a tree may nest: the writer refuses deeper trees and the reader deeper images, so
# cfsd reads every image it writes (composefs-rs reads 2047 levels; checkouts, dumps and
# every walk here are iterative, so depth costs no recursion).
MAX_DEPTH = 8192

class TreeError(ValueError):
    """A tree operation failed (lookup, merge, validation)."""


class NotFound(TreeError):
    """A path component does not exist."""


class NotADirectory(TreeError):
    """A path component that must be a directory is something else."""


class IsADirectory(TreeError):
    """A leaf was expected but a directory was found."""


class InvalidFilename(TreeError):
    """The path has no file name, or contains ``..`` (or a ``.`` where not allowed)."""


class OrphanedLeaves(TreeError):
    """The leaves table holds leaves that no directory entry references."""


_MARKS = threading.Lock()


@contextlib.contextmanager
def leaf_marks(fs: FileSystem) -> Iterator[None]:
    """Own the ``mark`` slot of the leaves for one whole-tree pass.

    Passes that would otherwise keep a dict per leaf (link counts, liveness) use the slot
    instead; one lock keeps two passes from sharing it, and on exit every leaf in the
    table has its mark back at None (a pass only marks leaves of the table).
    """
    with _MARKS:
        try:
            yield
        finally:
            for leaf in fs.leaves:
                leaf.mark = None


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector around bulk tree/image work.

    Building or parsing large trees allocates many acyclic objects; automatic collections
    would cost about a third of the time.  The previous state is restored on exit.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------- model


@dataclass(slots=True)
class Stat:
    """Inode metadata: permission bits (no type bits), owner, mtime and xattrs."""

    st_mode: int = 0
    st_uid: int = 0
    st_gid: int = 0
    st_mtim_sec: int = 0
    st_mtim_nsec: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    @classmethod
    def uninitialized(cls) -> Stat:
        """The all-zero stat used for a fresh root (``Stat::uninitialized``)."""
        return cls()

    def copy(self) -> Stat:
        """An independent copy (the xattr dict is copied too)."""
        return Stat(self.st_mode, self.st_uid, self.st_gid, self.st_mtim_sec,
                    self.st_mtim_nsec, dict(self.xattrs))

@dataclass(frozen=True, slots=True)
class Inline:
    """A regular file whose content is stored in the image."""

    data: bytes


@dataclass(frozen=True, slots=True)
class External:
    """A regular file backed by the object ``id`` (fs-verity digest) of ``size`` bytes."""

    id: bytes
    size: int


@dataclass(frozen=True, slots=True)
class ExternalNoVerity:
    """A regular file redirected to object ``id`` without a metacopy digest (C API only)."""

    id: bytes
    size: int


@dataclass(frozen=True, slots=True)
class Sparse:
    """A regular file of ``size`` bytes with neither content nor backing object."""

    size: int


@dataclass(frozen=True, slots=True)
class Redirect:
    """A regular file of ``size`` bytes redirected to an arbitrary ``payload`` path (no
    redirect when empty), with an optional fs-verity ``digest`` (C dumpfiles only).

    C ``mkcomposefs --from-file`` accepts any payload and any digest; this kind holds what
    External, ExternalNoVerity and Sparse cannot: a payload that is not the object path of
    the digest, a digest without a payload.
    """

    size: int
    payload: bytes
    digest: bytes | None


@dataclass(frozen=True, slots=True)
class BlockDevice:
    """A block device node."""

    rdev: int


@dataclass(frozen=True, slots=True)
class CharacterDevice:
    """A character device node; ``rdev == 0`` is an overlayfs whiteout."""

    rdev: int


@dataclass(frozen=True, slots=True)
class Fifo:
    """A named pipe."""


@dataclass(frozen=True, slots=True)
class Socket:
    """A unix socket."""


@dataclass(frozen=True, slots=True)
class Symlink:
    """A symbolic link to ``target`` (kept verbatim)."""

    target: bytes


RegularFile = Inline | External | ExternalNoVerity | Sparse | Redirect
LeafContent = Inline | External | ExternalNoVerity | Sparse | Redirect | BlockDevice \
    | CharacterDevice | Fifo | Socket | Symlink

REGULAR_TYPES = (Inline, External, ExternalNoVerity, Sparse, Redirect)


def is_whiteout(content: object) -> bool:
    """True for an overlayfs whiteout (character device with rdev 0)."""
    return type(content) is CharacterDevice and content.rdev == 0


def file_type_bits(content: object) -> int:
    """The ``S_IFxxx`` bits of a leaf content (or a Directory)."""
    t = type(content)
    if t in REGULAR_TYPES:
        return S_IFREG
    return _TYPE_BITS[t]


@dataclass(eq=False, slots=True)
class Leaf:
    """A non-directory inode; shared by identity between hardlinked entries.

    ``mark`` is scratch space for whole-tree passes that must not allocate per leaf (the
    EROFS writer counts links in it, under its lock); it is None outside such a pass.
    """

    stat: Stat
    content: LeafContent
    mark: int | None = field(default=None, init=False, repr=False, compare=False)


class Directory:
    """A directory: a stat plus entries ``name -> Directory | Leaf``."""

    __slots__ = ("stat", "entries")

    def __init__(self, stat: Stat | None = None,
                 entries: dict[bytes, Directory | Leaf] | None = None) -> None:
        self.stat = stat if stat is not None else Stat()
        self.entries: dict[bytes, Directory | Leaf] = entries if entries is not None else {}

    def __repr__(self) -> str:
        return f"Directory({self.stat!r}, {len(self.entries)} entries)"

    def sorted_entries(self) -> list[tuple[bytes, Directory | Leaf]]:
        """Entries in name byte order."""
        return sorted(self.entries.items())

    def lookup(self, name: bytes) -> Directory | Leaf | None:
        """The entry called ``name`` in this directory, or None."""
        return self.entries.get(name)

    def insert(self, name: bytes, inode: Directory | Leaf) -> bool:
        """Insert or replace ``name``; True if it was new."""
        new = name not in self.entries
        self.entries[name] = inode
        return new

    def merge(self, name: bytes, inode: Directory | Leaf) -> None:
        """Insert with layer semantics: a directory over a directory only replaces the stat."""
        old = self.entries.get(name)
        if type(inode) is Directory and type(old) is Directory:
            old.stat = inode.stat
        else:
            self.entries[name] = inode

    def remove(self, name: bytes) -> None:
        """Remove ``name`` if present."""
        self.entries.pop(name, None)

    def clear(self) -> None:
        """Remove every entry (the stat is kept)."""
        self.entries.clear()

    def get_directory_opt(self, path: bytes) -> Directory | None:
        """The directory at ``path`` (relative to this one); None if a component is missing."""
        d = self
        for comp in _components(path):
            if comp is _ROOT:
                continue
            if comp is _CUR or comp is _PARENT:
                raise InvalidFilename(f"invalid filename {path!r}")
            child = d.entries.get(comp)  # type: ignore[arg-type]
            if child is None:
                return None
            if type(child) is not Directory:
                raise NotADirectory(f"{comp!r} is not a directory")  # type: ignore[str-bytes-safe]
            d = child
        return d

    def get_directory(self, path: bytes) -> Directory:
        """The directory at ``path``; raises NotFound / NotADirectory / InvalidFilename."""
        d = self.get_directory_opt(path)
        if d is None:
            raise NotFound(f"no such directory {path!r}")
        return d

    def split(self, path: bytes, *,
              implicit: Stat | None = None) -> tuple[Directory, bytes]:
        """Split ``path`` into (existing parent directory, file name).

        With *implicit*, missing parent directories are created with that stat (a layer
        whose tar leaves out parent entries, as Docker and containers/storage accept).
        """
        comps = _components(path)
        if not comps or not isinstance(comps[-1], bytes):
            raise InvalidFilename(f"path {path!r} has no file name")
        d = self
        for comp in comps[:-1]:
            if comp is _ROOT:
                continue
            if comp is _CUR or comp is _PARENT:
                raise InvalidFilename(f"invalid filename {path!r}")
            child = d.entries.get(comp)  # type: ignore[arg-type]
            if child is None and implicit is not None:
                child = d.entries[comp] = Directory(implicit.copy())  # type: ignore[index]
            if child is None:
                raise NotFound(f"no such directory {comp!r}")  # type: ignore[str-bytes-safe]
            if type(child) is not Directory:
                raise NotADirectory(f"{comp!r} is not a directory")  # type: ignore[str-bytes-safe]
            d = child
        return d, comps[-1]

    def leaf(self, name: bytes) -> Leaf:
        """The leaf called ``name``; raises NotFound or IsADirectory."""
        child = self.entries.get(name)
        if child is None:
            raise NotFound(f"no such file {name!r}")
        if type(child) is Directory:
            raise IsADirectory(f"{name!r} is a directory")
        return child  # type: ignore[return-value]


_TYPE_BITS: dict[type, int] = {
    Directory: S_IFDIR, BlockDevice: S_IFBLK, CharacterDevice: S_IFCHR, Fifo: S_IFIFO,
    Socket: S_IFSOCK, Symlink: S_IFLNK,
}


class FileSystem:
    """A tree: the root directory and the table of leaves (in creation order)."""

    __slots__ = ("root", "leaves")

    def __init__(self, root_stat: Stat | None = None, *, root: Directory | None = None,
                 leaves: list[Leaf] | None = None) -> None:
        self.root = root if root is not None else Directory(
            root_stat if root_stat is not None else Stat.uninitialized())
        self.leaves: list[Leaf] = leaves if leaves is not None else []

    def __repr__(self) -> str:
        return f"FileSystem({self.root!r}, {len(self.leaves)} leaves)"

    @classmethod
    def from_root(cls, root: Directory) -> FileSystem:
        """A filesystem whose leaf table is every leaf reachable from ``root`` (DFS order)."""
        fs = cls(root=root)
        fs.leaves = list(fs.nlinks())
        return fs

    def set_root_stat(self, stat: Stat) -> None:
        """Replace the root directory's stat."""
        self.root.stat = stat

    def push_leaf(self, stat: Stat, content: LeafContent) -> Leaf:
        """Create a leaf, record it in the leaf table and return it."""
        leaf = Leaf(stat, content)
        self.leaves.append(leaf)
        return leaf

    def walk(self) -> Iterator[tuple[bytes, Directory | Leaf]]:
        """Pre-order DFS in name order: ``(absolute path, inode)``; the root is ``b"/"``."""
        yield b"/", self.root
        stack: list[tuple[bytes, Iterator[tuple[bytes, Directory | Leaf]]]] = [
            (b"", iter(self.root.sorted_entries()))]
        while stack:
            prefix, it = stack[-1]
            for name, inode in it:
                path = prefix + b"/" + name
                yield path, inode
                if type(inode) is Directory:
                    stack.append((path, iter(inode.sorted_entries())))
                    break
            else:
                stack.pop()

    def leaf_entries(self) -> Iterator[tuple[Directory, bytes, Leaf]]:
        """Every leaf entry as ``(directory, name, leaf)``: depth first, pre-order, names in
        byte order (hardlinked leaves once per entry)."""
        stack: list[tuple[Directory, Iterator[tuple[bytes, Directory | Leaf]]]] = [
            (self.root, iter(self.root.sorted_entries()))]
        while stack:
            d, it = stack[-1]
            for name, child in it:
                if type(child) is Directory:
                    stack.append((child, iter(child.sorted_entries())))
                    break
                yield d, name, child  # type: ignore[misc]
            else:
                stack.pop()

    def depth(self) -> int:
        """Nesting of the deepest directory (the root alone: 0), computed iteratively."""
        deepest = 0
        stack = [(self.root, 0)]
        while stack:
            d, level = stack.pop()
            deepest = max(deepest, level)
            for child in d.entries.values():
                if type(child) is Directory:
                    stack.append((child, level + 1))
        return deepest

    def directories(self) -> Iterator[Directory]:
        """Every directory (root first; order unspecified otherwise)."""
        stack = [self.root]
        while stack:
            d = stack.pop()
            yield d
            for child in d.entries.values():
                if type(child) is Directory:
                    stack.append(child)

    def nlinks(self) -> dict[Leaf, int]:
        """Number of directory entries referencing each reachable leaf (DFS first-seen order)."""
        counts: dict[Leaf, int] = {}
        get = counts.get
        for d in self.directories():
            for child in d.entries.values():
                if type(child) is not Directory:
                    counts[child] = get(child, 0) + 1  # type: ignore[index, arg-type]
        return counts

    def fsck(self) -> None:
        """Check that every referenced leaf is in the table and no table leaf is orphaned."""
        known = {id(leaf): i for i, leaf in enumerate(self.leaves)}
        if len(known) != len(self.leaves):
            raise TreeError("leaf table contains the same leaf twice")
        referenced = set()
        for leaf in self.nlinks():
            i = known.get(id(leaf))
            if i is None:
                raise TreeError("directory entry references a leaf missing from the leaf table")
            referenced.add(i)
        orphans = [i for i in range(len(self.leaves)) if i not in referenced]
        if orphans:
            raise OrphanedLeaves(f"orphaned leaves: {orphans[:10]}")

    def compact(self) -> None:
        """Drop unreferenced leaves from the table, keeping the order of the rest."""
        with leaf_marks(self):
            for leaf in self.leaves:
                leaf.mark = 0
            for d in self.directories():
                for child in d.entries.values():
                    if type(child) is not Directory and child.mark is not None:  # type: ignore[union-attr]
                        child.mark = 1  # type: ignore[union-attr]
            live = [leaf for leaf in self.leaves if leaf.mark]
            for leaf in self.leaves:
                leaf.mark = None
            self.leaves = live

    def has_whiteouts(self) -> bool:
        """True if any reachable leaf is a whiteout (chr 0/0)."""
        return any(type(child) is not Directory and is_whiteout(child.content)
                   for d in self.directories() for child in d.entries.values())

    def for_each_stat(self) -> Iterator[Stat]:
        """Every directory stat (via the tree) and every leaf stat (via the table)."""
        for d in self.directories():
            yield d.stat
        for leaf in self.leaves:
            yield leaf.stat


# --------------------------------------------------------------------------- paths


class _Component:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_ROOT = _Component("RootDir")
_CUR = _Component("CurDir")
_PARENT = _Component("ParentDir")


def _components(path: bytes) -> list[bytes | _Component]:
    """Rust ``Path::components`` on a unix byte path."""
    out: list[bytes | _Component] = []
    parts = path.split(b"/")
    if path.startswith(b"/"):
        out.append(_ROOT)
    elif parts and parts[0] == b".":
        out.append(_CUR)
        parts = parts[1:]
    for p in parts:
        if p == b"" or p == b".":
            continue
        out.append(_PARENT if p == b".." else p)
    return out


def file_name(path: bytes) -> bytes | None:
    """Rust ``Path::file_name``: the last component if it is a normal name."""
    comps = _components(path)
    if comps and isinstance(comps[-1], bytes):
        return comps[-1]
    return None


# --------------------------------------------------------------------------- layer merge


@dataclass(frozen=True, slots=True)
class Hardlink:
    """A layer entry that is a hardlink to ``target`` (an absolute path)."""

    target: bytes


@dataclass(frozen=True, slots=True)
class DirectoryItem:
    """A layer entry that is a directory."""


LayerItem = LeafContent | Hardlink | DirectoryItem


# Parent directories a layer's tar leaves out: created like this (root-owned 0755, mtime 0,
# deterministic), as Docker and containers/storage accept such layers.
IMPLICIT_DIRECTORY = Stat(0o755, 0, 0, 0, 0, {})


def apply_layer_entry(fs: FileSystem, path: bytes, stat: Stat, item: LayerItem) -> None:
    """Apply one layer entry to ``fs`` (``process_entry``, docs/images.md).

    ``path`` is the absolute entry path (``make_absolute_path`` output; the root is ``b""``
    or ``b"/"``).  Whiteouts (``.wh.NAME``, ``.wh..wh..opq``) delete instead of inserting;
    a directory over a directory only replaces the stat.
    """
    name = file_name(path)
    if name is None:
        if type(item) is not DirectoryItem:
            raise TreeError(f"Unpacking layer tar: filename {path!r} must be a directory")
        fs.set_root_stat(stat)
        return
    inode: Directory | Leaf
    if type(item) is DirectoryItem:
        inode = Directory(stat)
    elif type(item) is Hardlink:
        tdir, tname = fs.root.split(item.target)
        inode = tdir.leaf(tname)
    else:
        inode = fs.push_leaf(stat, item)  # type: ignore[arg-type]
    parent, name = fs.root.split(path, implicit=IMPLICIT_DIRECTORY)
    if name.startswith(b".wh."):
        rest = name[4:]
        if rest == b".wh..opq":
            parent.clear()
        else:
            parent.remove(rest)
    else:
        parent.merge(name, inode)


# --------------------------------------------------------------------------- OCI transform

CONTAINER_XATTR_ALLOWLIST = (b"security.capability",)


class XattrFiltering(enum.Enum):
    """Which xattrs ``transform_for_oci`` keeps."""

    ALLOWLIST_ONLY = "allowlist-only"
    KEEP_USER_XATTRS = "keep-user-xattrs"


def copy_root_metadata_from_usr(fs: FileSystem) -> None:
    """Give the root ``/usr``'s mode, owner, mtime and xattrs.

    An image without ``/usr`` (``FROM scratch``: a static binary) keeps the root its
    layers gave it, or gets an implicit directory's when they gave none (composefs-rs
    refuses such images; Docker and podman run them).
    """
    usr = fs.root.get_directory_opt(b"usr")
    if usr is not None:
        fs.root.stat = usr.stat.copy()   # a fresh Stat: stats may be shared between inodes
    elif fs.root.stat == Stat.uninitialized():
        fs.root.stat = IMPLICIT_DIRECTORY.copy()


def canonicalize_run(fs: FileSystem) -> None:
    """Empty ``/run`` (if present) and give it ``/usr``'s mtime."""
    run = fs.root.get_directory_opt(b"run")
    if run is not None:
        usr = fs.root.get_directory_opt(b"usr") or fs.root
        st = run.stat.copy()
        st.st_mtim_sec = usr.stat.st_mtim_sec
        st.st_mtim_nsec = usr.stat.st_mtim_nsec
        run.stat = st
        run.clear()


def transform_for_oci(fs: FileSystem,
                      xattr_mode: XattrFiltering | str = XattrFiltering.ALLOWLIST_ONLY) -> None:
    """Normalize a merged OCI tree in place (docs/images.md).

    Copies root metadata from ``/usr`` (error if missing), empties ``/run``, filters
    xattrs (``allowlist-only`` keeps ``security.capability``; ``keep-user-xattrs`` also
    keeps ``user.*``) and compacts the leaf table.
    """
    mode = XattrFiltering(xattr_mode)
    copy_root_metadata_from_usr(fs)
    canonicalize_run(fs)
    keep_user = mode is XattrFiltering.KEEP_USER_XATTRS
    for st in fs.for_each_stat():
        if st.xattrs:
            st.xattrs = {k: v for k, v in st.xattrs.items()
                         if k in CONTAINER_XATTR_ALLOWLIST
                         or (keep_user and k.startswith(b"user."))}
    fs.compact()

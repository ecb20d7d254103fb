"""Garbage collection (docs/repository.md), with upstream's failure modes fixed.

Roots are every ``images/refs/**`` and ``streams/refs/**`` symlink plus caller-named
first-level entries.  Live objects: root images and everything their EROFS references,
root streams and everything reachable through their object refs and named refs (named refs
that are not streams, like ``composefs.image``, keep images alive).  Unlike upstream, dangling
refs and stray files do not abort the collection; they are skipped (dangling refs pruned).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

from cfsd.core import fsverity
from cfsd.core.errors import DamagedRepository, RepositoryError
from cfsd.core.metadata import DIR_FLAGS
from cfsd.core.objects import remove_stale_staging
from cfsd.core.repository import Repository, exclusive
from cfsd.core.splitstream import SplitStreamReader

MAX_IMAGE = 1 << 30


@dataclass
class GcResult:
    """Counts reported by gc (varlink GcResult)."""

    objects_removed: int = 0
    objects_bytes: int = 0
    images_pruned: int = 0
    streams_pruned: int = 0

    def to_dict(self) -> dict[str, int]:
        """Wire form."""
        return asdict(self)


def first_level(repo: Repository, category: str) -> Iterator[tuple[str, bytes | None]]:
    """``(name, object digest or None)`` for the symlinks directly in ``images/``/``streams/``."""
    try:
        fd = repo.open_dir(category)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        names = sorted(os.listdir(fd))
        for name in names:
            if name == "refs":
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISLNK(st.st_mode):
                continue
            try:
                yield name, repo.object_of_link(f"{category}/{name}")
            except RepositoryError:
                yield name, None
    finally:
        os.close(fd)


def image_objects(repo: Repository, digest: bytes) -> set[bytes]:
    """Object ids referenced by a stored composefs image (validated)."""
    from cfsd.core.erofs.reader import collect_objects
    data = repo.read_object(digest, limit=MAX_IMAGE)
    return set(collect_objects(data, repo.alg))


def stream_children(repo: Repository, digest: bytes) -> tuple[list[bytes], list[bytes]]:
    """(object refs, named-ref targets) of a stored splitstream."""
    fd = repo.open_object(digest)
    with SplitStreamReader(fd, repo.alg) as r:
        return list(r.object_refs), list(r.named_refs.values())


def _root_names(repo: Repository, category: str, extra: Sequence[str],
                present: dict[str, bytes | None]) -> set[str]:
    names = {t.rsplit("/", 1)[-1] for _, t in repo.list_refs(category)}
    names.update(r for r in extra if r in present)
    return {n for n in names if present.get(n) is not None}


def live_objects(repo: Repository, roots: Sequence[str] = ()) -> set[bytes]:
    """Every object reachable from the roots."""
    live: set[bytes] = set()
    images = dict(first_level(repo, "images"))
    for name in sorted(_root_names(repo, "images", roots, images)):
        digest = images[name]
        assert digest is not None
        if digest in live or not repo.has_object(digest):
            continue
        live.add(digest)
        live |= image_objects(repo, digest)
    streams = dict(first_level(repo, "streams"))
    by_object = {d: n for n, d in streams.items() if d is not None}
    walked: set[bytes] = set()
    todo = [streams[n] for n in sorted(_root_names(repo, "streams", roots, streams))]
    while todo:
        digest = todo.pop()
        if digest is None or digest in walked:
            continue
        walked.add(digest)
        live.add(digest)
        if not repo.has_object(digest):
            continue
        objects, named = stream_children(repo, digest)
        live.update(objects)
        for ref in named:
            live.add(ref)
            if ref in by_object:
                todo.append(ref)
    return live


def gc(repo: Repository, roots: Sequence[str] = (), dry_run: bool = False,
       lock_timeout: float = 30.0) -> GcResult:
    """Collect garbage (or, with *dry_run*, only report what would be removed).

    Waits at most *lock_timeout* seconds for other users of the repository (TimeoutError).
    """
    ctx = repo.lock.shared() if dry_run else exclusive(repo, lock_timeout)
    with ctx:
        if not dry_run:
            repo.ensure_writable()
        problems = repo.layout_problems()
        if problems:
            raise DamagedRepository("refusing to collect garbage in a damaged repository ("
                                    + "; ".join(problems) + "); run fsck")
        live = live_objects(repo, roots)
        result = GcResult()
        removed: set[bytes] = set()
        doomed: list[tuple[str, str]] = []      # (xx, rest) of the objects to remove
        ofd = repo.objects_fd
        for i in range(256):
            xx = f"{i:02x}"
            try:
                sfd = os.open(xx, DIR_FLAGS, dir_fd=ofd)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                for name in sorted(os.listdir(sfd)):
                    st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
                    if name.startswith(".tmp-"):
                        if not dry_run:
                            os.unlink(name, dir_fd=sfd)
                        continue
                    try:
                        digest = fsverity.parse_object_path(f"{xx}/{name}", repo.alg)
                    except ValueError:
                        continue
                    if len(name) != 2 * repo.alg.size - 2 or digest in live:
                        continue
                    result.objects_removed += 1
                    result.objects_bytes += st.st_size
                    removed.add(digest)
                    doomed.append((xx, name))
            finally:
                os.close(sfd)
        # Names go before the objects they point to, durably: a gc interrupted at any point
        # leaves no name without its object (at worst unreferenced objects, removed next time).
        result.images_pruned = _prune(repo, "images", removed, dry_run)
        result.streams_pruned = _prune(repo, "streams", removed, dry_run)
        if not dry_run:
            repo.sync()
            for xx, name in doomed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{xx}/{name}", dir_fd=ofd)
            for name in os.listdir(ofd):
                if name.startswith(".tmp-object-"):
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=ofd)
            remove_stale_staging(repo)
            repo.forget_verified()
        return result


def _prune(repo: Repository, category: str, removed: set[bytes], dry_run: bool) -> int:
    """Remove refs to first-level links that go, then those links (to objects that go or
    are gone): never a ref without its link, never a link without its object."""
    gone: list[str] = []
    present: set[str] = set()
    for name, digest in first_level(repo, category):
        if digest is None or digest in removed or not repo.has_object(digest):
            gone.append(name)
        else:
            present.add(name)
    refs = [ref for ref, target in repo.list_refs(category)
            if target.rsplit("/", 1)[-1] not in present]
    if not dry_run:
        for ref in refs:
            repo.unlink(f"{category}/refs/{ref}")
        for name in gone:
            repo.unlink(f"{category}/{name}")
    return len(refs) + len(gone)

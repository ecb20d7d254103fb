"""Repository integrity check (docs/repository.md).

Phases: meta.json, every object (name == fs-verity digest of content), every stream link
(splitstream parses, referenced objects exist), every image link (composefs validation,
referenced objects exist), and the refs trees.  Errors are stable strings
``fsck: <kind>: <path>: <detail>``.
"""

from __future__ import annotations

import concurrent.futures
import os
import stat
from dataclasses import dataclass, field

from cfsd.core import fsverity
from cfsd.core.errors import RepositoryError
from cfsd.core.metadata import DIR_FLAGS, META_JSON, read_meta
from cfsd.core.repository import Repository


@dataclass
class FsckResult:
    """fsck counters and findings (varlink FsckReply)."""

    has_metadata: bool = False
    objects_checked: int = 0
    objects_corrupted: int = 0
    streams_checked: int = 0
    streams_corrupted: int = 0
    images_checked: int = 0
    images_corrupted: int = 0
    broken_links: int = 0
    missing_objects: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was found."""
        return not self.errors

    def to_dict(self) -> dict[str, object]:
        """Wire form (FsckReply)."""
        return {"ok": self.ok, "has_metadata": self.has_metadata,
                "objects_checked": self.objects_checked,
                "objects_corrupted": self.objects_corrupted,
                "streams_checked": self.streams_checked,
                "streams_corrupted": self.streams_corrupted,
                "images_checked": self.images_checked,
                "images_corrupted": self.images_corrupted,
                "broken_links": self.broken_links, "missing_objects": self.missing_objects,
                "errors": list(self.errors)}

    def error(self, kind: str, path: str, detail: str = "") -> None:
        """Record one finding."""
        self.errors.append(f"fsck: {kind}: {path}" + (f": {detail}" if detail else ""))


def _check_object_dir(repo: Repository, xx: str) -> tuple[int, list[tuple[str, str, str]]]:
    checked = 0
    problems: list[tuple[str, str, str]] = []
    try:
        sfd = os.open(xx, DIR_FLAGS, dir_fd=repo.objects_fd)
    except (FileNotFoundError, NotADirectoryError):
        return 0, []
    try:
        for name in sorted(os.listdir(sfd)):
            path = f"objects/{xx}/{name}"
            checked += 1
            try:
                digest = fsverity.parse_object_path(f"{xx}/{name}", repo.alg)
                if len(name) != 2 * repo.alg.size - 2:
                    raise ValueError
            except ValueError:
                problems.append(("object-invalid-name", path, ""))
                continue
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                             dir_fd=sfd)
            except OSError as e:
                problems.append(("object-open-failed", path, e.strerror or str(e)))
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    problems.append(("object-open-failed", path, "not a regular file"))
                    continue
                measured = fsverity.measure_verity(fd, repo.alg)
                if measured is None:
                    if repo.secure:
                        problems.append(("object-verity-missing", path, ""))
                        continue
                    measured = fsverity.digest_fd(fd, repo.alg)
            except OSError as e:
                problems.append(("object-verity-failed", path, e.strerror or str(e)))
                continue
            finally:
                os.close(fd)
            if measured != digest:
                problems.append(("object-digest-mismatch", path, f"measured {measured.hex()}"))
    finally:
        os.close(sfd)
    return checked, problems


def _links(repo: Repository, category: str) -> list[tuple[str, int]]:
    try:
        fd = repo.open_dir(category)
    except (FileNotFoundError, NotADirectoryError):
        return []
    try:
        out = []
        for name in sorted(os.listdir(fd)):
            if name == "refs":
                continue
            out.append((name, os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode))
        return out
    finally:
        os.close(fd)


def _link_object(repo: Repository, res: FsckResult, category: str, name: str,
                 mode: int) -> bytes | None:
    path = f"{category}/{name}"
    if not stat.S_ISLNK(mode):
        res.error("entry-not-symlink", path)
        return None
    try:
        digest = repo.object_of_link(path)
    except RepositoryError as e:
        res.error("broken-symlink", path, str(e))
        res.broken_links += 1
        return None
    if digest is None or not repo.has_object(digest):
        res.error("broken-symlink", path)
        res.broken_links += 1
        return None
    return digest


def fsck(repo: Repository, metadata_only: bool = False) -> FsckResult:
    """Check the whole repository; findings are returned, never raised."""
    from cfsd.core.gc import image_objects, stream_children
    res = FsckResult()
    with repo.lock.shared():
        try:
            meta, _ = read_meta(repo.fd)
            res.has_metadata = meta is not None
            if meta is None:
                res.error("metadata-parse-failed", META_JSON, "absent")
            elif meta.algorithm != repo.alg:
                res.error("metadata-algorithm-mismatch", META_JSON,
                          f"expected {meta.algorithm.repo_string}, actual {repo.alg.name}")
        except RepositoryError as e:
            res.error("metadata-parse-failed", META_JSON, str(e))

        for problem in repo.layout_problems():
            res.error("layout-damaged", problem.split(" ", 1)[0], problem)

        if not metadata_only:
            dirs = [f"{i:02x}" for i in range(256)]
            with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as ex:
                for checked, problems in ex.map(lambda x: _check_object_dir(repo, x), dirs):
                    res.objects_checked += checked
                    for kind, path, detail in problems:
                        res.objects_corrupted += 1
                        res.error(kind, path, detail)

        for name, mode in _links(repo, "streams"):
            res.streams_checked += 1
            digest = _link_object(repo, res, "streams", name, mode)
            if digest is None:
                res.streams_corrupted += 1
                continue
            try:
                objects, named = stream_children(repo, digest)
            except (RepositoryError, OSError) as e:
                res.error("stream-open-failed", f"streams/{name}", str(e))
                res.streams_corrupted += 1
                continue
            bad = False
            for obj in objects:
                if not repo.has_object(obj):
                    res.error("missing-object-ref", f"streams/{name}", obj.hex())
                    res.missing_objects += 1
                    bad = True
            for ref in named:
                if not repo.has_object(ref):
                    res.error("missing-named-ref", f"streams/{name}", ref.hex())
                    res.missing_objects += 1
                    bad = True
            res.streams_corrupted += bad

        for name, mode in _links(repo, "images"):
            res.images_checked += 1
            digest = _link_object(repo, res, "images", name, mode)
            if digest is None:
                res.images_corrupted += 1
                continue
            try:
                objects = image_objects(repo, digest)
            except (RepositoryError, ValueError, OSError) as e:
                res.error("image-invalid", f"images/{name}", str(e))
                res.images_corrupted += 1
                continue
            missing = sorted(o for o in objects if not repo.has_object(o))
            for obj in missing:
                res.error("image-missing-object", f"images/{name}", obj.hex())
                res.missing_objects += 1
            res.images_corrupted += bool(missing)

        for category in ("streams", "images"):
            present = {n for n, m in _links(repo, category) if stat.S_ISLNK(m)}
            for ref, target in repo.list_refs(category):
                first = target.rsplit("/", 1)[-1]
                ok = first in present
                if ok:
                    try:
                        digest = repo.object_of_link(f"{category}/{first}")
                        ok = digest is not None and repo.has_object(digest)
                    except RepositoryError:
                        ok = False
                if not ok:
                    res.error("broken-symlink", f"{category}/refs/{ref}")
                    res.broken_links += 1
    return res

"""meta.json: repository metadata, its creation, validation and the legacy upgrade.

Bytes and rules follow composefs-rs (docs/repository.md): serde_json pretty printing with a
trailing newline, unknown incompatible features refuse the open, an absent ``erofs_formats``
means V2, and meta.json carries fs-verity exactly when the repository is secure.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from dataclasses import dataclass, field

from cfsd.core import fsverity
from cfsd.core.errors import NotWritable, RepoNotFound, RepositoryError, VerityUnsupported
from cfsd.core.fsverity import Algorithm

META_JSON = "meta.json"
REPO_FORMAT_VERSION = 1
KNOWN_FEATURES: dict[str, frozenset[str]] = {
    "compatible": frozenset(),
    "read-only-compatible": frozenset({"v1_erofs"}),
    "incompatible": frozenset(),
}
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def exists(dir_fd: int, name: str) -> bool:
    """True if *name* exists in *dir_fd* (symlinks not followed)."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def ensure_writable(fd: int, path: str = "") -> None:
    """NotWritable for a read-only filesystem or a directory we may not write."""
    if os.fstatvfs(fd).f_flag & os.ST_RDONLY:
        raise NotWritable(f"repository {path} is on a read-only filesystem (not writable)")
    if not os.access(".", os.W_OK, dir_fd=fd, effective_ids=True):
        raise NotWritable(f"repository {path} is not writable")



@dataclass
class RepoMetadata:
    """Parsed meta.json (field order and bytes exactly as composefs-rs writes them)."""

    algorithm: Algorithm
    erofs_default: int = 1
    erofs_extra: tuple[int, ...] = ()
    version: int = REPO_FORMAT_VERSION
    features: dict[str, list[str]] = field(default_factory=dict)
    has_erofs_formats: bool = True

    @classmethod
    def new(cls, alg: Algorithm, erofs_version: int = 1) -> RepoMetadata:
        """Metadata for a fresh repository (``v1_erofs`` iff the default format is V1)."""
        if erofs_version not in (0, 1, 2):
            raise ValueError(f"unsupported EROFS format version {erofs_version}")
        ro = ["v1_erofs"] if erofs_version == 1 else []
        return cls(alg, erofs_version, (), REPO_FORMAT_VERSION,
                   {"compatible": [], "read-only-compatible": ro, "incompatible": []})

    def to_json(self) -> bytes:
        """Serialized form: serde_json pretty (2 spaces) plus a trailing newline."""
        formats: dict[str, object] = {"default": self.erofs_default}
        if self.erofs_extra:
            formats["extra"] = list(self.erofs_extra)
        obj = {
            "version": self.version,
            "algorithm": self.algorithm.repo_string,
            "features": {k: list(self.features.get(k, [])) for k in KNOWN_FEATURES},
            "erofs_formats": formats,
        }
        return (json.dumps(obj, indent=2) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> RepoMetadata:
        """Parse and validate meta.json bytes; RepositoryError when unusable."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise RepositoryError(f"meta.json is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise RepositoryError("meta.json is not a JSON object")
        version = obj.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise RepositoryError("meta.json: missing or invalid 'version'")
        if version > REPO_FORMAT_VERSION:
            raise RepositoryError(
                f"repository format version {version} is newer than supported "
                f"({REPO_FORMAT_VERSION})")
        alg_text = obj.get("algorithm")
        if not isinstance(alg_text, str):
            raise RepositoryError("meta.json: missing 'algorithm'")
        try:
            alg = fsverity.parse_repo_algorithm(alg_text)
        except ValueError as e:
            raise RepositoryError(f"meta.json: {e}") from None
        feats_obj = obj.get("features", {})
        if not isinstance(feats_obj, dict):
            raise RepositoryError("meta.json: invalid 'features'")
        features: dict[str, list[str]] = {}
        for key in KNOWN_FEATURES:
            vals = feats_obj.get(key, [])
            if not isinstance(vals, list) or not all(isinstance(v, str) for v in vals):
                raise RepositoryError(f"meta.json: invalid features.{key}")
            features[key] = list(vals)
        unknown = [f for f in features["incompatible"]
                   if f not in KNOWN_FEATURES["incompatible"]]
        if unknown:
            raise RepositoryError(
                f"repository uses unsupported incompatible features: {', '.join(unknown)}")
        formats = obj.get("erofs_formats")
        has_formats = formats is not None
        if formats is None:
            formats = {"default": 2}
        if not isinstance(formats, dict) or formats.get("default") not in (0, 1, 2):
            raise RepositoryError("meta.json: invalid 'erofs_formats'")
        extra = formats.get("extra", [])
        if not isinstance(extra, list) or any(v not in (0, 1, 2) for v in extra):
            raise RepositoryError("meta.json: invalid 'erofs_formats.extra'")
        return cls(alg, formats["default"], tuple(extra), version, features, has_formats)

    @property
    def readonly_features(self) -> list[str]:
        """Unknown read-only-compatible features (the repository should not be written)."""
        return [f for f in self.features.get("read-only-compatible", [])
                if f not in KNOWN_FEATURES["read-only-compatible"]]

    def format_versions(self) -> list[int]:
        """EROFS versions to generate: the effective default first, then the extras."""
        if self.erofs_default == 2 and not self.erofs_extra:
            default = 1 if "v1_erofs" in self.features.get("read-only-compatible", []) else 2
            return [default]
        return [self.erofs_default] + sorted(set(self.erofs_extra) - {self.erofs_default})

    def same_config(self, other: RepoMetadata) -> bool:
        """True when two metadata describe the same repository configuration."""
        return self.to_json() == other.to_json()


def read_meta(fd: int) -> tuple[RepoMetadata | None, bool]:
    """(metadata, secure) from meta.json, or (None, False) if it does not exist."""
    try:
        mfd = os.open(META_JSON, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                      dir_fd=fd)
    except FileNotFoundError:
        return None, False
    except OSError as e:
        raise RepositoryError(f"cannot open meta.json: {e.strerror}") from None
    try:
        st = os.fstat(mfd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
            raise RepositoryError("meta.json is not a small regular file")
        data = os.pread(mfd, st.st_size, 0)
        meta = RepoMetadata.parse(data)
        secure = fsverity.measure_verity(mfd, meta.algorithm) is not None
        return meta, secure
    finally:
        os.close(mfd)



def write_meta(fd: int, meta: RepoMetadata, *, verity: bool, require: bool = False) -> None:
    """Create meta.json atomically (O_TMPFILE + linkat; fails if it exists).

    With *verity* fs-verity is enabled on it (the mark of a secure repository); with
    *require* as well, a filesystem that cannot enable it raises VerityUnsupported and
    nothing is written.
    """
    data = meta.to_json()
    try:
        tfd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644, dir_fd=fd)
        named = None
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
            raise
        named = META_JSON
        tfd = os.open(META_JSON, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC
                      | os.O_NOFOLLOW, 0o644, dir_fd=fd)
    try:
        os.write(tfd, data)
        os.fsync(tfd)
        ro = os.open(f"/proc/self/fd/{tfd}", os.O_RDONLY | os.O_CLOEXEC)
        os.close(tfd)
        tfd = ro
        if verity and not fsverity.enable_verity(tfd, meta.algorithm) and require:
            if named is not None:
                os.unlink(named, dir_fd=fd)
            raise VerityUnsupported("the filesystem does not support fs-verity")
        if named is None:
            os.link(f"/proc/self/fd/{tfd}", META_JSON, dst_dir_fd=fd, follow_symlinks=True)
        os.fsync(fd)
    finally:
        os.close(tfd)



def upgrade_legacy(fd: int, path: str, *, write: bool = True) -> tuple[RepoMetadata, bool]:
    """Write meta.json for a pre-meta.json repository (algorithm inferred from objects).

    With ``write=False`` (a reader) nothing is written: the inferred metadata is returned.
    """
    ofd = os.open("objects", DIR_FLAGS, dir_fd=fd)
    try:
        for sub in sorted(os.listdir(ofd)):
            if len(sub) != 2:
                continue
            try:
                sfd = os.open(sub, DIR_FLAGS, dir_fd=ofd)
            except OSError:
                continue
            try:
                for name in os.listdir(sfd):
                    alg = {62: fsverity.SHA256, 126: fsverity.SHA512}.get(len(name))
                    if alg is None:
                        continue
                    with contextlib.suppress(OSError):
                        of = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     dir_fd=sfd)
                        try:
                            had = fsverity.measure_verity(of, alg) is not None
                        finally:
                            os.close(of)
                        meta = RepoMetadata.new(alg, 1)
                        if not write:
                            return meta, had
                        ensure_writable(fd, path)
                        with contextlib.suppress(FileExistsError):
                            write_meta(fd, meta, verity=had)
                        m, secure = read_meta(fd)
                        assert m is not None
                        return m, secure
            finally:
                os.close(sfd)
    finally:
        os.close(ofd)
    raise RepoNotFound(f"no meta.json in {path}; tried to infer algorithm from objects")



def reset_metadata(dir_fd: int) -> None:
    """Delete ``streams/``, ``images/`` and ``meta.json`` (objects are kept)."""
    for d in ("streams", "images"):
        if exists(dir_fd, d):
            shutil.rmtree(d, dir_fd=dir_fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(META_JSON, dir_fd=dir_fd)



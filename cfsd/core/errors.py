"""Exception types of the storage core (mapped to typed varlink errors by the service)."""

from __future__ import annotations


class RepositoryError(Exception):
    """A repository operation failed; the message is meant for the user."""


class RepoNotFound(RepositoryError):
    """The path is not (or not yet) a composefs repository."""


class AlreadyInitialized(RepositoryError):
    """init on a repository that exists with a different configuration."""


class NotWritable(RepositoryError):
    """The repository cannot be written (read-only filesystem, permissions, features)."""


class InvalidName(RepositoryError):
    """A stream, ref or image name that is malformed or could escape the repository."""


class CorruptObject(RepositoryError):
    """An object is missing or its content does not match its name."""


class FormatError(RepositoryError):
    """Malformed on-disk data (splitstream, tar, image)."""


class NotFound(RepositoryError):
    """A named stream, image or ref does not exist."""


class DamagedRepository(RepositoryError):
    """The repository's layout is damaged (a file where a directory belongs...)."""


class TooDeep(RepositoryError):
    """A tree nests deeper than MAX_DEPTH (cfsd.core.tree), which writer and reader share."""


class VerityUnsupported(RepositoryError):
    """fs-verity was required but the filesystem cannot enable it."""

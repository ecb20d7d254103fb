"""Per-invocation state of cfsctl: global options, the daemon connection, the handle."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
from typing import Any

from cfsctl.client import Client, connect, open_client

SYSTEM_REPO = "/sysroot/composefs"


class UsageError(Exception):
    """A command-line mistake (exit status 2)."""


class CommandError(Exception):
    """An operation failed (exit status 1) with a one-line message (and an optional hint)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def repo_path(args: argparse.Namespace) -> str:
    """The repository selected by --repo/--user/--system (default by uid), absolute."""
    if args.repo:
        return os.path.abspath(args.repo)
    if args.system or (not args.user and os.geteuid() == 0):
        return SYSTEM_REPO
    home = os.environ.get("HOME")
    if not home:
        raise CommandError("$HOME is not set (needed for the user repository)",
                           "name the repository with --repo PATH")
    return os.path.join(home, ".var/lib/composefs")


def open_repository_dir(path: str) -> int:
    """The repository directory, opened by cfsctl with the user's own permissions."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CommandError(f"repository {path} does not exist",
                           f"create it with: cfsctl --repo {shlex.quote(path)} init") from None
    except PermissionError:
        raise CommandError(f"repository {path}: permission denied") from None
    except OSError as e:
        raise CommandError(f"repository {path}: {e.strerror}") from None


class Context:
    """Lazily connects to cfsd and opens the selected repository."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._client: Client | None = None
        self._handle: int | None = None
        self.hash_algorithm: str | None = None
        self.subject: str | None = None     # what the command works on, for error messages
        self.ref_kind = "image"             # what a NoSuchRef error is about
        self.interrupted = False

    @property
    def json(self) -> bool:
        """--json was given."""
        return bool(self.args.json)

    @property
    def quiet(self) -> bool:
        """No progress output (-q, or --json)."""
        return bool(self.args.quiet or self.args.json)

    def cli(self, *words: str) -> str:
        """A cfsctl command line for a hint, with this invocation's repository selection."""
        a = self.args
        sel = [f"--repo {shlex.quote(os.path.abspath(a.repo))}"] if a.repo else \
            ["--user"] if a.user else ["--system"] if a.system else []
        return " ".join(["cfsctl", *sel, *words])

    def daemon_args(self) -> list[str]:
        """Flags an embedded daemon gets from the global options."""
        a = self.args
        return [f for f, on in (("--insecure", a.insecure),
                                ("--require-verity", a.require_verity),
                                ("--no-upgrade", a.no_upgrade)) if on]

    @property
    def client(self) -> Client:
        """The daemon connection."""
        if self._client is None:
            self._client = open_client(self.args.address, self.daemon_args())
        return self._client

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One call on the daemon connection."""
        return self.client.call(method, params)

    @property
    def handle(self) -> int:
        """Handle of the selected repository (opened on first use)."""
        if self._handle is None:
            try:
                self._open()
            except Exception as e:
                e.about_repository = True   # type: ignore[attr-defined]  # not the subject's
                raise
        assert self._handle is not None
        return self._handle

    def _open(self) -> None:
        a = self.args
        path = repo_path(a)
        client = self.client          # connect first: a missing daemon is reported first
        fd = open_repository_dir(path)
        try:
            reply = client.call("org.composefs.Repository.OpenRepository", {
                "path": path, "path_fd": 0, "insecure": a.insecure or None,
                "require_verity": a.require_verity or None,
                "no_upgrade": a.no_upgrade or None}, fds=[fd])
        finally:
            os.close(fd)
        self._handle = reply["handle"]
        self.hash_algorithm = reply.get("hash_algorithm")
        if a.hash and self.hash_algorithm and a.hash != self.hash_algorithm:
            raise CommandError(f"repository is configured for {self.hash_algorithm} "
                               f"(from meta.json) but --hash {a.hash} was specified")

    def close(self) -> None:
        """Release the handle and drop the connection.

        A connection interrupted in the middle of a call is only closed (the daemon cancels
        the call and removes what it staged); the handle is then released over a new
        connection to a shared daemon (a private one goes away with its connection).
        """
        client, handle = self._client, self._handle
        self._client = self._handle = None
        if client is None:
            return
        close = {"handle": handle}
        if handle is not None and not client.in_call:
            with contextlib.suppress(Exception):
                client.call("org.composefs.Repository.CloseRepository", close)
            handle = None
        address = client.address
        client.close()
        if handle is not None and address is not None:
            with contextlib.suppress(Exception), connect(address, timeout=2.0) as again:
                again.call("org.composefs.Repository.CloseRepository", close)

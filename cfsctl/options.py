"""The one option model of cfsctl.

Global options (``--repo``, ``--json``, ``--hash``, ...) are defined once, here.  They are
valid before the command, after it and after ``oci``, and mean the same everywhere: every
occurrence is recorded, and :func:`resolve` decides the value (the same option twice with
different values, or two repository selectors, is a usage error).  Option types that
validate their values (``--platform``, ``--tls-verify``, ``--algorithm``) live here too.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

# dest -> (flags, keyword arguments of add_argument; "flag": True for a switch)
GLOBAL_OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "repo": (("--repo",), {
        "metavar": "PATH",
        "help": "the repository (default: /sysroot/composefs as root, else "
                "$HOME/.var/lib/composefs)"}),
    "user": (("--user",), {
        "flag": True, "help": "use the user's repository, $HOME/.var/lib/composefs"}),
    "system": (("--system",), {
        "flag": True, "help": "use the system repository, /sysroot/composefs"}),
    "address": (("--address",), {
        "metavar": "ADDRESS",
        "help": "cfsd socket, unix:PATH (default: $CFSD_ADDRESS, then the user's and the "
                "system socket, else a private daemon for this one command)"}),
    "json": (("--json",), {
        "flag": True,
        "help": "print the result as one JSON document on stdout (shapes: cfsctl(1), JSON "
                "OUTPUT)"}),
    "quiet": (("-q", "--quiet"), {
        "flag": True, "help": "no progress output on stderr"}),
    "hash": (("--hash",), {
        "choices": ("sha256", "sha512"),
        "help": "fs-verity hash: the one init creates the repository with; other commands "
                "check that the repository uses it; with --no-repo the digests to compute "
                "(default sha512)"}),
    "erofs_version": (("--erofs-version",), {
        "type": int, "choices": (0, 1, 2), "metavar": "{0,1,2}",
        "help": "EROFS format version: init makes it the repository's default; "
                "create-image and compute-id write that version"}),
    "insecure": (("--insecure",), {
        "flag": True,
        "help": "do without fs-verity: init creates a repository without it, other commands "
                "accept one"}),
    "require_verity": (("--require-verity",), {
        "flag": True, "help": "refuse a repository without fs-verity"}),
    "no_upgrade": (("--no-upgrade",), {
        "flag": True,
        "help": "do not upgrade a legacy repository (without meta.json) when opening it"}),
    "no_repo": (("--no-repo",), {
        "flag": True,
        "help": "run without a repository (compute-id, create-dumpfile): the hash is --hash's"}),
}
SELECTORS = ("repo", "user", "system")
GLOBAL_NOTE = ("Global options (cfsctl --help) may also follow the command; each means the "
               "same wherever it is given.")


class Recorder:
    """Every global option given on the command line, in order: ``(dest, flag, value)``."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, Any]] = []


def _actions(rec: Recorder) -> tuple[type[argparse.Action], type[argparse.Action]]:
    """Switch and value actions that record into *rec*."""

    class Flag(argparse._StoreTrueAction):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                     values: Any, option_string: str | None = None) -> None:
            rec.seen.append((self.dest, option_string or "", True))
            setattr(namespace, self.dest, True)

    class Value(argparse._StoreAction):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                     values: Any, option_string: str | None = None) -> None:
            rec.seen.append((self.dest, option_string or "", values))
            setattr(namespace, self.dest, values)

    return Flag, Value


def add_global_options(p: argparse.ArgumentParser, rec: Recorder, top: bool) -> None:
    """The global options on *p*: documented on the top-level parser, accepted silently (and
    without touching the value given elsewhere) on every command."""
    flag_action, value_action = _actions(rec)
    group = p.add_argument_group("global options") if top else p
    # (hidden options in a mutually exclusive group break argparse's usage line; resolve()
    # checks the selectors of every level)
    selectors = group.add_mutually_exclusive_group() if top else p
    for dest, (flags, kw) in GLOBAL_OPTIONS.items():
        kw = dict(kw)
        is_flag = kw.pop("flag", False)
        if not top:
            kw["help"] = argparse.SUPPRESS
            kw["default"] = argparse.SUPPRESS
        elif is_flag:
            kw["default"] = False
        target = selectors if dest in SELECTORS else group
        target.add_argument(*flags, dest=dest, action=flag_action if is_flag else value_action,
                            **kw)


def resolve(args: argparse.Namespace, rec: Recorder, parser: argparse.ArgumentParser) -> None:
    """Set every global option of *args* from what was given anywhere on the command line."""
    values: dict[str, tuple[str, Any]] = {}
    for dest, flag, value in rec.seen:
        if dest in values and values[dest][1] != value:
            parser.error(f"argument {flag}: given twice with different values "
                         f"({values[dest][1]!r} and {value!r})")
        values[dest] = (flag, value)
    chosen = [values[d][0] for d in SELECTORS if d in values]
    if len(chosen) > 1:
        parser.error(f"argument {chosen[1]}: not allowed with argument {chosen[0]}")
    for dest, (_flags, kw) in GLOBAL_OPTIONS.items():
        default = False if kw.get("flag") else None
        setattr(args, dest, values[dest][1] if dest in values else default)


def command(sub: argparse._SubParsersAction, rec: Recorder, name: str,  # type: ignore[type-arg]
            help: str, description: str | None = None, **kw: Any) -> argparse.ArgumentParser:
    """A subcommand parser that also accepts the global options."""
    text = description or help[0].upper() + help[1:] + "."
    p = sub.add_parser(name, help=help, description=text, epilog=GLOBAL_NOTE, **kw)
    add_global_options(p, rec, top=False)
    p.set_defaults(parser=p)          # usage errors show the usage of the command
    return p


# --------------------------------------------------------------------------- value types

_PLATFORM_PART = re.compile(r"[A-Za-z0-9_.-]+")


def platform(text: str) -> str:
    """``os/arch[/variant]`` (skopeo's --override-os/--override-arch/--override-variant)."""
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(_PLATFORM_PART.fullmatch(x) for x in parts):
        raise argparse.ArgumentTypeError(
            f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64 or "
            "linux/arm64/v8")
    return text


def boolean(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no), as skopeo's --tls-verify takes it."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


ALGORITHMS = ("sha256", "sha512")


def algorithm(text: str) -> str:
    """A repository algorithm: ``sha256``/``sha512`` (as --hash) or ``fsverity-<hash>-12``."""
    name = text.lower()
    if name in ALGORITHMS:
        return f"fsverity-{name}-12"
    if name in (f"fsverity-{a}-12" for a in ALGORITHMS):
        return name
    raise argparse.ArgumentTypeError(
        f"invalid algorithm {text!r}: expected sha256, sha512, fsverity-sha256-12 or "
        "fsverity-sha512-12")


def positive(text: str) -> int:
    """A positive integer."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, not {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, not {n}")
    return n


def hidden(p: argparse.ArgumentParser, *flags: str, **kw: Any) -> None:
    """An option kept only so that old command lines get a clear error (not offered)."""
    p.add_argument(*flags, help=argparse.SUPPRESS, **kw)

"""The one place where a failure becomes what the user reads, and an exit status.

Every error is one line on stderr, ``Error: <what>: <why>``, followed in parentheses by a
hint where there is an obvious next step; the exit status is 1.  Usage errors exit with 2
(argparse's format).  Varlink errors are turned into text here, from their name and
parameters, whichever command got them.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
from collections.abc import Callable
from typing import Any

from cfsctl.client import CallError, ConnectError
from cfsctl.context import CommandError, Context, UsageError

Render = Callable[[dict[str, Any], Context | None], tuple[str, str | None]]


def _oci_images_hint(ctx: Context | None) -> str:
    return f"list them with: {ctx.cli('oci', 'images') if ctx else 'cfsctl oci images'}"


def _no_such_image(p: dict[str, Any], ctx: Context | None) -> tuple[str, str | None]:
    image = str(p.get("image", ""))
    if " " in image:            # a sentence (a pull's source has no such image)
        return image, None
    return f"no such image: {image}", _oci_images_hint(ctx)


def _no_such_ref(p: dict[str, Any], ctx: Context | None) -> tuple[str, str | None]:
    name = str(p.get("reference", ""))
    what = ctx.ref_kind if ctx else "image"
    hint = None
    if what == "image":
        hint = f"list them with: {ctx.cli('images') if ctx else 'cfsctl images'}"
    return f"no such {what}: {name}", hint


def _no_such_layer(p: dict[str, Any], ctx: Context | None) -> tuple[str, str | None]:
    return (f"no such layer: {p.get('diff_id', '')}",
            "give a diff_id or a layer digest of a stored image's manifest")


def _repo_not_found(p: dict[str, Any], ctx: Context | None) -> tuple[str, str | None]:
    return (str(p.get("message", "")),
            f"create one with: {ctx.cli('init') if ctx else 'cfsctl --repo PATH init'}")


def _message(hint: str | None = None) -> Render:
    def render(p: dict[str, Any], ctx: Context | None) -> tuple[str, str | None]:
        return str(p.get("message", "")), hint
    return render


def _template(text: str, hint: str | None = None) -> Render:
    def render(p: dict[str, Any], ctx: Context | None) -> tuple[str, str | None]:
        return text.format_map(_Missing(p)), hint
    return render


class _Missing(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> str:
        return "?"


# varlink error name (without its interface) -> its text
ERRORS: dict[str, Render] = {
    "NoSuchImage": _no_such_image,
    "NoSuchRef": _no_such_ref,
    "NoSuchLayer": _no_such_layer,
    "RepoNotFound": _repo_not_found,
    "DiffIdMismatch": _template(
        "layer content does not match its diff_id: expected {expected}, got {actual}"),
    "InvalidHandle": _template(
        "the repository handle {handle} is no longer valid (released after being idle)",
        "run the command again"),
    "FdLimitExceeded": _template(
        "too many file descriptors in one request ({fd_count}; at most {max_per_frame})"),
    "BootImageMismatch": _template(
        "the boot image does not match {expected} ({tried} tried)"),
    "Busy": _message("try again in a moment"),
    "InvalidParameter": _template("invalid request parameter: {parameter}"),
    "MethodNotFound": _template(
        "cfsd does not know the method {method}", "is the daemon an older version?"),
    "MethodNotImplemented": _template(
        "cfsd does not implement the method {method}", "is the daemon an older version?"),
    "InterfaceNotFound": _template(
        "cfsd does not serve the interface {interface}", "is the daemon an older version?"),
}


def call_error_text(e: CallError, ctx: Context | None = None) -> tuple[str, str | None]:
    """``(why, hint)`` for a varlink error reply."""
    params = e.parameters if isinstance(e.parameters, dict) else {}
    render = ERRORS.get(e.short)
    if render is not None:
        return render(params, ctx)
    if set(params) == {"message"}:
        return str(params["message"]), None
    detail = ", ".join(f"{k}: {v}" for k, v in params.items())
    return e.short + (f" ({detail})" if detail else ""), None


def line(why: str, hint: str | None, subject: str | None) -> str:
    """``Error: <subject>: <why> (<hint>)``; the subject is left out when *why* names it."""
    why = " ".join(why.strip().splitlines())            # always one line
    text = why if not subject or subject in why else f"{subject}: {why}"
    return f"Error: {text}" + (f" ({hint})" if hint and hint not in why else "")


def describe(e: BaseException, ctx: Context | None) -> tuple[str, int]:
    """The error line for *e* and the exit status."""
    subject = ctx.subject if ctx and not getattr(e, "about_repository", False) else None
    if isinstance(e, CallError):
        why, hint = call_error_text(e, ctx)
        return line(why, hint, subject), 2 if e.name.endswith(".InvalidParameter") else 1
    if isinstance(e, CommandError):
        return line(str(e), e.hint, subject), 1
    if isinstance(e, ConnectError):
        hint = ("is cfsd running? without --address and $CFSD_ADDRESS cfsctl starts a "
                "private one") if str(e).startswith("cannot connect") else None
        return line(str(e), hint, None), 1
    if isinstance(e, OSError):
        why = e.strerror or str(e)
        if e.filename is not None:
            why = f"{os.fsdecode(e.filename)}: {why}"
        return line(why, None, subject), 1
    return line(str(e) or type(e).__name__, None, subject), 1


# --------------------------------------------------------------------------- pipes


def stdout_closed() -> bool:
    """True when stdout is a pipe (or socket) that nobody reads any more."""
    try:
        p = select.poll()
        p.register(1, select.POLLOUT)
        return any(ev & select.POLLERR for _fd, ev in p.poll(0))
    except OSError:
        return False


def die_of_sigpipe() -> None:
    """End quietly as a C tool ends writing to a closed pipe: killed by SIGPIPE (the shell
    sees 141), after pointing stdout at /dev/null so nothing more fails on the way out."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)


def is_broken_pipe(e: BaseException) -> bool:
    """*e* comes from writing to a closed stdout (by us, or by the daemon into our fd 1)."""
    if isinstance(e, BrokenPipeError):
        return True
    return isinstance(e, ConnectionError | CallError) and stdout_closed()


def report(e: BaseException, ctx: Context | None, parser: argparse.ArgumentParser) -> int:
    """Print *e* as the user reads it (usage errors as argparse prints them, with the usage
    of *parser*); the exit status."""
    if isinstance(e, UsageError):
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    text, status = describe(e, ctx)
    print(text, file=sys.stderr)
    return status

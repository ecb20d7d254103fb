"""cfsctl: the command-line client of cfsd (every command is a varlink call)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from cfsctl import errors
from cfsctl.commands import cinfo, cmount, image, oci, repo, tools
from cfsctl.context import Context
from cfsctl.options import Recorder, add_global_options, resolve

VERSION = "0.1.0"
MULTICALL = {"mkcomposefs": image.mkcomposefs_main, "composefs-info": cinfo.main,
             "mount.composefs": cmount.main}
DESCRIPTION = """\
composefs repository client: every command is a call to the cfsd daemon (the one at
--address or $CFSD_ADDRESS, the user's or the system's; without one, a private daemon is
started for the command).  Global options may be given before or after the command and
mean the same everywhere.  Errors are one line, "Error: <what>: <why>", exit status 1;
usage errors exit with 2."""


def build_parser(rec: Recorder | None = None) -> argparse.ArgumentParser:
    """The command tree (global options recorded into *rec*)."""
    rec = rec or Recorder()
    p = argparse.ArgumentParser(prog="cfsctl", description=DESCRIPTION)
    add_global_options(p, rec, top=True)
    p.add_argument("--version", action="version", version=f"cfsctl {VERSION}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    repo.register(sub, rec)
    image.register(sub, rec)
    oci.register(sub, rec)
    tools.register(sub, rec)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; argv[0] ``mkcomposefs``, ``composefs-info`` or ``mount.composefs`` (or
    ``cfsctl NAME …``) is that C tool."""
    if argv is None and os.path.basename(sys.argv[0]) in MULTICALL:
        return MULTICALL[os.path.basename(sys.argv[0])](sys.argv[1:], sys.argv[0])
    argv = sys.argv[1:] if argv is None else argv
    tool = cinfo.multicall_argv(argv, tuple(MULTICALL))
    if tool is not None:
        return MULTICALL[tool[1]](tool[2], tool[1], address=tool[0])
    rec = Recorder()
    parser = build_parser(rec)
    args = parser.parse_args(argv)
    resolve(args, rec, parser)
    return run(Context(args), parser)


def run(ctx: Context, parser: argparse.ArgumentParser) -> int:
    """Run the chosen command; every failure is reported by :func:`errors.report`."""
    args = ctx.args
    status = 0
    sigpipe = False
    try:
        if args.no_repo and args.command not in image.NO_REPO_COMMANDS:
            raise image.no_repo_error()
        status = int(args.func(ctx, args) or 0)
        sys.stdout.flush()
    except KeyboardInterrupt:
        ctx.interrupted = True
        status = 130
    except BaseException as e:
        if not isinstance(e, Exception):
            raise
        if errors.is_broken_pipe(e):
            sigpipe = True
        else:
            status = errors.report(e, ctx, getattr(args, "parser", parser))
    finally:
        try:
            ctx.close()
        except KeyboardInterrupt:
            status = 130
    if status == 130:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("Error: interrupted", file=sys.stderr)
    if sigpipe:
        errors.die_of_sigpipe()
    return status

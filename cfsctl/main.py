"""cfsctl: the command-line client of cfsd (every command is a varlink call)."""

from __future__ import annotations

import argparse
import os
import sys

from cfsctl.client import CallError, ConnectError
from cfsctl.commands import cinfo, cmount, image, oci, repo
from cfsctl.context import CommandError, Context, UsageError

VERSION = "0.1.0"
MULTICALL = {"composefs-info": cinfo.main, "mount.composefs": cmount.main}


def build_parser() -> argparse.ArgumentParser:
    """The command tree."""
    p = argparse.ArgumentParser(prog="cfsctl", description="composefs repository client")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--repo", metavar="PATH", help="repository path")
    sel.add_argument("--user", action="store_true", help="$HOME/.var/lib/composefs")
    sel.add_argument("--system", action="store_true", help="/sysroot/composefs")
    p.add_argument("--address", help="cfsd socket (unix:PATH; default $CFSD_ADDRESS, the "
                                     "standard sockets, else a private daemon)")
    p.add_argument("--json", action="store_true", help="print varlink replies as JSON")
    p.add_argument("--hash", choices=("sha256", "sha512"))
    p.add_argument("--erofs-version", type=int, choices=(0, 1, 2))
    p.add_argument("--insecure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--require-verity", action="store_true")
    p.add_argument("--no-upgrade", action="store_true")
    p.add_argument("--no-repo", action="store_true",
                   help="run without a repository (compute-id, create-dumpfile)")
    p.add_argument("--version", action="version", version=f"cfsctl {VERSION}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    repo.register(sub)
    image.register(sub)
    oci.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; argv[0] ``mkcomposefs``, ``composefs-info`` or ``mount.composefs`` (or
    ``cfsctl NAME …``) is that C tool."""
    if argv is None and os.path.basename(sys.argv[0]) == "mkcomposefs":
        return image.mkcomposefs_main(sys.argv[1:], sys.argv[0])
    if argv is None and os.path.basename(sys.argv[0]) in MULTICALL:
        return MULTICALL[os.path.basename(sys.argv[0])](sys.argv[1:], sys.argv[0])
    argv = sys.argv[1:] if argv is None else argv
    tool = cinfo.multicall_argv(argv, tuple(MULTICALL))
    if tool is not None:
        return MULTICALL[tool[1]](tool[2], tool[1], address=tool[0])
    mk = image.mkcomposefs_argv(argv)
    if mk is not None:
        return image.mkcomposefs_main(mk[1], address=mk[0])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_repo and args.command not in image.NO_REPO_COMMANDS:
        print(f"Error: {image.NO_REPO_ERROR}", file=sys.stderr)
        return 1
    ctx = Context(args)
    try:
        return int(args.func(ctx, args) or 0)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"cfsctl: error: {e}", file=sys.stderr)
        return 2
    except CallError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2 if e.name.endswith(".InvalidParameter") else 1
    except (CommandError, ConnectError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except (OSError, ConnectionError) as e:
        print(f"Error: {e.strerror or e}" if isinstance(e, OSError) else f"Error: {e}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        ctx.close()

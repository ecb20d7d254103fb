"""``cfsctl completion`` and the C composefs tools as commands (``mkcomposefs``,
``composefs-info``, ``mount.composefs``).

The C tools keep their own command lines: ``cfsctl [--address A] NAME …`` reaches them
before cfsctl's parser (see :mod:`cfsctl.main`); the entries here list them in
``cfsctl --help``, the man page and the completions, and run them when other global options
come first.
"""

from __future__ import annotations

import argparse
import sys

from cfsctl.context import CommandError, Context
from cfsctl.options import Recorder, command
from cfsctl.output import print_result

SHELLS = ("bash", "zsh", "fish")
C_TOOLS = {
    "mkcomposefs": "C composefs's mkcomposefs: a composefs image from a directory or a "
                   "dumpfile (options: cfsctl mkcomposefs --help)",
    "composefs-info": "C composefs's composefs-info: ls, objects, missing-objects, dump, "
                      "measure-file (options: cfsctl composefs-info)",
    "mount.composefs": "C composefs's mount.composefs: mount a composefs image (root; "
                       "options: cfsctl mount.composefs -h)",
}


def completion_script(shell: str) -> str:
    """The completion script of cfsctl for *shell* (generated from the parser by shtab)."""
    try:
        import shtab
    except ImportError:
        raise CommandError("completion needs the shtab package",
                           "install it: pip install shtab") from None

    from cfsctl.main import build_parser
    return str(shtab.complete(build_parser(), shell=shell))


def cmd_completion(ctx: Context, a: argparse.Namespace) -> int:
    """Print a completion script."""
    script = completion_script(a.shell)
    if ctx.json:
        print_result(ctx, {"shell": a.shell, "script": script})
    else:
        sys.stdout.write(script if script.endswith("\n") else script + "\n")
    return 0


def cmd_tool(ctx: Context, a: argparse.Namespace) -> int:
    """Run a C composefs tool with the rest of the command line."""
    from cfsctl.commands import cinfo, cmount, image
    if a.command == "mkcomposefs":
        return image.mkcomposefs_main(a.args, address=ctx.args.address)
    main = cinfo.main if a.command == "composefs-info" else cmount.main
    return main(a.args, a.command, address=ctx.args.address)


def register(sub: argparse._SubParsersAction, rec: Recorder) -> None:  # type: ignore[type-arg]
    """Add ``completion`` and the C tools."""
    p = command(sub, rec, "completion", "print a shell completion script",
                description="Print the completion script of cfsctl for bash, zsh or fish.  "
                            "bash: `source <(cfsctl completion bash)`; zsh: save it as _cfsctl "
                            "in a directory of $fpath; fish: `cfsctl completion fish | "
                            "source`.")
    p.add_argument("shell", choices=SHELLS, help="the shell: bash, zsh or fish")
    p.set_defaults(func=cmd_completion)
    for name, help in C_TOOLS.items():
        p = sub.add_parser(name, help=help, description=help + ".", add_help=False,
                           prefix_chars="\0")
        p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                       help="the tool's own options and arguments")
        p.set_defaults(func=cmd_tool)

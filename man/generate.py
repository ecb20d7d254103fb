#!/usr/bin/env python3
"""Generate the man pages cfsctl.1 and cfsd.1 from the argument parsers (argparse-manpage).

    python man/generate.py           # rewrite man/cfsctl.1 and man/cfsd.1
    python man/generate.py --check   # exit 1 if they differ from the parsers

The pages are installed with the package (pyproject data-files, share/man/man1);
tests/test_cli_ux.py checks that they are current and that ``man -l`` renders them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ["COLUMNS"] = "80"       # argparse wraps usage lines to the terminal's width

from argparse_manpage.manpage import Manpage  # noqa: E402

from cfsctl.main import VERSION, build_parser  # noqa: E402
from cfsctl.output import JSON_SHAPES, shape_text  # noqa: E402
from cfsd.service.main import build_parser as cfsd_parser  # noqa: E402

DATE = "2025"          # fixed, so that the pages only change with the parsers
URL = "https://github.com/composefs/composefs"


def roff(text: str) -> str:
    """Plain text as roff: backslashes, leading dots and quotes escaped, '-' as \\-."""
    lines = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").split("\n"):
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


Section = tuple[str, list[tuple[str, str]]]      # plain text, then a .TP list


def section(content: Section) -> str:
    """A section's roff: the text, then its list."""
    text, pairs = content
    out = [roff(text)] if text else []
    out += [f".TP\n.B {roff(k)}\n{roff(v)}" for k, v in pairs]
    return "\n".join(out)


CFSCTL_SECTIONS: dict[str, Section] = {
    "json output": (
        "With --json every command prints one JSON document on stdout, of the shape below "
        "(numbers are JSON numbers; the byte amounts in \"stats\" have the precision of "
        "the daemon's summary line, kept as \"summary\").  Progress and errors stay on "
        "stderr.  Commands whose output is data print facts or lines instead of the bytes: "
        "cat its size, oci dump and create-dumpfile the dumpfile's lines.  The C tools "
        "(mkcomposefs, composefs-info, mount.composefs) keep their own command lines.",
        [(f"cfsctl {name}", shape_text(shape)) for name, shape in JSON_SHAPES.items()]),
    "exit status": ("", [
        ("0", "success"),
        ("1", "the operation failed: one line on stderr, \"Error: <what>: <why>\", with a "
              "hint in parentheses where there is an obvious next step"),
        ("2", "a usage error (unknown option, invalid value, conflicting options)"),
        ("130", "interrupted (Ctrl-C): one line, the call is cancelled and what it staged "
                "is removed"),
        ("141", "stdout was a pipe that closed early (e.g. | head): cfsctl ends quietly, "
                "killed by SIGPIPE as C tools are"),
    ]),
    "environment": ("", [
        ("CFSD_ADDRESS", "the daemon's socket (unix:PATH) when --address is not given"),
        ("XDG_RUNTIME_DIR", "the user's socket is $XDG_RUNTIME_DIR/composefs/composefs.sock"),
        ("CFSD_DAEMON", "the command line that starts a private daemon (default: this "
                        "Python's -m cfsd)"),
        ("CFSD_LOG_LEVEL", "log level of a private daemon (default error)"),
        ("REGISTRY_AUTH_FILE", "registry credentials, as for skopeo"),
    ]),
    "progress": (
        "Long operations (oci pull, apply-delta, create-delta, checkout, gc, fsck) report "
        "progress on stderr: a live line on a terminal, plain lines otherwise, nothing "
        "with -q or --json.  Layers are named by their diff_id; sizes are those of the "
        "compressed blobs transferred.", []),
    "see also": ("cfsd(1), mkcomposefs(1), composefs-info(1), mount.composefs(8), "
                 "skopeo(1)", []),
}

CFSD_SECTIONS: dict[str, Section] = {
    "signals": ("", [
        ("SIGTERM, SIGINT", "stop: running calls are cancelled, then the daemon exits 0"),
    ]),
    "logging": (
        "Messages go to stderr: with journald priority prefixes (<6>) when stderr is the "
        "journal stream systemd set up ($JOURNAL_STREAM), plain \"cfsd: message\" lines "
        "otherwise.  Registry requests are logged at debug level.", []),
    "environment": ("", [
        ("CFSD_LOG_LEVEL", "default of --log-level"),
        ("CFSD_INTERFACES", "directory of the .varlink interface files"),
        ("JOURNAL_STREAM", "set by systemd: log with journald priorities"),
    ]),
    "see also": ("cfsctl(1), systemd.socket(5), varlinkctl(1)", []),
}


def page(parser: argparse.ArgumentParser, description: str,
         sections: dict[str, Section]) -> str:
    """One man page."""
    man = Manpage(parser, _data={"date": DATE, "version": VERSION, "project_name": "cfsd",
                                 "manual_title": "cfsd manual", "description": description,
                                 "url": URL})
    for heading, content in sections.items():
        man.add_section(heading, ">", section(content))
    return str(man)


def pages() -> dict[str, str]:
    """File name -> text."""
    return {
        "cfsctl.1": page(build_parser(), "composefs repository client (of cfsd)",
                         CFSCTL_SECTIONS),
        "cfsd.1": page(cfsd_parser(), "composefs repository daemon (varlink)", CFSD_SECTIONS),
    }


def main(argv: list[str]) -> int:
    """Write the pages, or with --check compare them."""
    stale = []
    for name, text in pages().items():
        path = HERE / name
        if "--check" in argv:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python man/generate.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""``cfsd install-units``: the systemd units with the path of this installation.

The units in ``systemd/`` are templates: ``@CFSD@`` stands for the command that runs this
cfsd (its console script, or this interpreter with ``-m cfsd``), so the installed units
start the daemon that was installed, wherever it lives.  The system units come with a
sysusers.d entry for the ``composefs`` group (who may connect) and a tmpfiles.d entry for
``/var/lib/composefs``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

SYSTEM_DEST = "/etc/systemd/system"
SYSUSERS = "g composefs - -\n"
TMPFILES = "d /var/lib/composefs 0755 root root -\n"


def template_dir() -> Path:
    """Where the unit templates are: the source tree or share/cfsd/systemd."""
    for c in (Path(__file__).resolve().parents[2] / "systemd",
              Path(sys.prefix) / "share/cfsd/systemd"):
        if (c / "cfsd.service").is_file():
            return c
    raise FileNotFoundError("cannot find the cfsd systemd unit templates")


def daemon_command() -> str:
    """The command line that runs this cfsd."""
    script = Path(sys.prefix) / "bin" / "cfsd"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    found = shutil.which("cfsd")
    if found:
        return os.path.realpath(found)
    return f"{shlex.quote(sys.executable)} -m cfsd"


def render(user: bool) -> dict[str, str]:
    """File name -> content of the units (and, for the system, sysusers/tmpfiles)."""
    src = template_dir() / ("user" if user else "")
    command = daemon_command()
    out = {name: (src / name).read_text(encoding="utf-8").replace("@CFSD@", command)
           for name in ("cfsd.socket", "cfsd.service")}
    if not user:
        out["sysusers.d/cfsd.conf"] = SYSUSERS
        out["tmpfiles.d/cfsd.conf"] = TMPFILES
    return out


def install(user: bool, dest: str | None) -> list[Path]:
    """Write the units (and for the system the sysusers/tmpfiles entries); their paths."""
    if dest is None:
        dest = (os.path.expanduser("~/.config/systemd/user") if user else SYSTEM_DEST)
    base = Path(dest)
    written = []
    for name, text in render(user).items():
        if "/" in name:          # sysusers.d/, tmpfiles.d/ live beside systemd/system
            path = base.parent.parent / name if dest == SYSTEM_DEST else base / name
        else:
            path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    """``cfsd install-units [--user] [--dest DIR]``."""
    p = argparse.ArgumentParser(prog="cfsd install-units",
                                description="install the systemd units of this cfsd")
    p.add_argument("--user", action="store_true", help="the per-user units")
    p.add_argument("--dest", help=f"directory for the units (default {SYSTEM_DEST}, or "
                                  "~/.config/systemd/user with --user)")
    args = p.parse_args(argv)
    for path in install(args.user, args.dest):
        print(path)
    print("then: systemctl " + ("--user " if args.user else "") + "daemon-reload && "
          "systemctl " + ("--user " if args.user else "") + "enable --now cfsd.socket")
    return 0

"""C-compatible ``mount.composefs`` (argv[0] ``mount.composefs``, or ``cfsctl
mount.composefs``): ``mount.composefs [-t composefs] [-o OPTIONS] IMAGE MOUNTPOINT``.

Options, checks, their order and the exit status are C composefs 1.0.x's; messages are C's,
each on one line.  cfsctl opens the image, the basedirs, upperdir, workdir and the idmap
user namespace itself; the daemon (``MountComposefs``) checks the image and builds a
detached mount, which cfsctl attaches at MOUNTPOINT with move_mount(2).  Only root may
mount (others get C's "Operation not permitted").
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from cfsctl.client import CallError, ConnectError, open_client
from cfsctl.commands.cinfo import Exit, eprint, finish, getopt, message, open_file
from cfsctl.mounting import attach

R = "org.composefs.Repository."
PROG = "mount.composefs"
MAX_BASEDIRS = 16 - 4            # fds per request, less image, upperdir, workdir, idmap
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_WITH_VALUE = ("basedir", "digest", "upperdir", "workdir", "idmap")

USAGE = """\
usage: {bin} [-t type] [-o opt[,opts..]] IMAGE MOUNTPOINT
Example:
  {bin} -o basedir=/composefs/objects exampleimage.cfs /mnt/exampleimage
or, as a mount helper:
  mount -t composefs -o basedir=/composefs/objects exampleimage.cfs /mnt/exampleimage

Supported options:
  basedir=PATH[:PATH]    Specify location of basedir(s)
  digest=DIGEST          Specify required image digest
  idmap=PATH             Specify path to a user namespace whose ID mapping should be used
  verity                 Require all files to have specified and valid fs-verity digests
  tryverity              If supported by kernel, require fs-verity
  ro                     Read only
  rw                     Read/write
  upperdir               Overlayfs upperdir
  workdir                Overlayfs workdir"""


def split_options(text: str) -> list[tuple[str, str | None]]:
    """C ``parse_option``: comma-separated ``key[=value]``; a backslash escapes the next
    character (a comma, say), and is removed from values."""
    out: list[tuple[str, str | None]] = []
    rest: str | None = text
    while rest is not None:
        equal = None
        i = 0
        while i < len(rest):
            c = rest[i]
            if c == "=" and equal is None:
                equal = i
            elif c == "\\" and i + 1 < len(rest):
                i += 1
            elif c == ",":
                break
            i += 1
        item, rest = rest[:i], (rest[i + 1:] if i < len(rest) else None)
        if equal is None:
            out.append((item, None))
            continue
        value = item[equal + 1:]
        unescaped = []
        j = 0
        while j < len(value):
            if value[j] == "\\":
                j += 1
                if j >= len(value):
                    break
            unescaped.append(value[j])
            j += 1
        out.append((item[:equal], "".join(unescaped)))
    return out


def parse(argv: Sequence[str], argv0: str) -> dict[str, Any]:
    """The command line as C reads it (:class:`Exit` on a mistake or ``-h``)."""
    name = os.path.basename(argv0)
    usage = USAGE.format(bin=name)
    opts, pos = getopt(argv, argv0, "ht:o:", {})
    options = None
    for opt, value in opts:
        if opt == "?":
            raise Exit(1, str(value), usage)
        if opt == "t" and value != "composefs":
            raise Exit(1, f"{name}: Unsupported fs type '{value}'")
        if opt == "o":
            options = value
        if opt == "h":
            raise Exit(0, usage)
    if not pos:
        raise Exit(1, "No source path specified", usage)
    if len(pos) < 2:
        raise Exit(1, "No mount path specified", usage)
    o: dict[str, Any] = {"image": pos[0], "target": pos[1], "basedirs": [],
                         "verity": False, "tryverity": False, "ro": False}
    for key, value in split_options(options) if options is not None else []:
        if key in _WITH_VALUE:
            if value is None:
                raise Exit(1, f"{name}: No value specified for {key} option")
            o[key] = value
        elif key in ("verity", "tryverity"):
            o[key] = True
        elif key in ("ro", "rw"):
            o["ro"] = key == "ro"
        else:
            raise Exit(1, f"{name}: Unsupported option {key}")
    if "basedir" in o:
        parts = o["basedir"].split(":")
        if not all(parts):
            raise Exit(1, f"{name}: Value for basedir option has incorrect format")
        o["basedirs"] = parts
    if not o["basedirs"]:
        raise Exit(1, "No object dirs specified", usage)
    if ("upperdir" in o) != ("workdir" in o):
        raise Exit(1, f"{name}: Both workdir and upperdir must be specified if used")
    return o


def main(argv: Sequence[str], argv0: str = PROG, address: str | None = None) -> int:
    """C-compatible ``mount.composefs``; its exit status."""
    name = os.path.basename(argv0)
    try:
        o = parse(argv, argv0)
        with contextlib.ExitStack() as stack:
            _mount(o, name, address, stack)
        return 0
    except Exit as e:
        return finish(e)
    except CallError as e:
        eprint(f"{name}: {message(e)}\n")
        return 1
    except (ConnectError, OSError, ConnectionError) as e:
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        eprint(f"{name}: {text}\n")
        return 1
    except KeyboardInterrupt:
        return 130


def _mount(o: dict[str, Any], name: str, address: str | None,
           stack: contextlib.ExitStack) -> None:
    image = o["image"]
    fail = f"{name}: Failed to mount composefs {image}"
    fds: list[int] = []

    def add(fd: int) -> int:
        stack.callback(os.close, fd)
        fds.append(fd)
        return len(fds) - 1

    params: dict[str, Any] = {"image": image, "basedirs": o["basedirs"],
                              "digest": o.get("digest"), "verity": o["verity"] or None,
                              "try_verity": o["tryverity"] or None, "read_only": o["ro"] or None}
    if "idmap" in o:
        try:
            params["idmap_fd"] = add(os.open(o["idmap"], os.O_RDONLY | os.O_CLOEXEC
                                             | os.O_NOCTTY))
        except OSError as e:
            raise Exit(1, f"{name}: Failed to open userns {o['idmap']}: {e.strerror}") \
                from None
    try:
        params["image_fd"] = add(open_file(image))
    except OSError as e:
        raise Exit(1, f"{name}: Failed to open {image}: {e.strerror}") from None
    if len(o["basedirs"]) > MAX_BASEDIRS:
        raise Exit(1, f"{fail}: at most {MAX_BASEDIRS} basedirs")
    try:
        params["basedirs_fd"] = [add(os.open(d, _DIR_FLAGS)) for d in o["basedirs"]]
        for key in ("upperdir", "workdir"):
            if key in o:
                params[key] = o[key]
                params[f"{key}_fd"] = add(os.open(o[key], _DIR_FLAGS))
    except OSError as e:
        raise Exit(1, f"{fail}: {e.strerror}") from None
    with open_client(address) as client:
        for reply, rfds in client.stream(R + "MountComposefs", params, fds=fds, more=False):
            try:
                attach(rfds[reply["fd_index"]], o["target"])
            except OSError as e:
                raise Exit(1, f"{fail}: {os.strerror(e.errno or 0)}") from None
            finally:
                for fd in rfds:
                    os.close(fd)
    sys.stdout.flush()

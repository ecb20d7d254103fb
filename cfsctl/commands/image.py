"""Image commands built from directories or dumpfiles (create-image, compute-id, mkcomposefs…).

The daemon reads every path named here with the caller's permissions; outputs (dumpfiles,
images) are written by the daemon into file descriptors passed with the request.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from cfsctl.client import CallError, ConnectError, open_client
from cfsctl.context import CommandError, Context, repo_path
from cfsctl.options import Recorder, command, hidden
from cfsctl.output import Capture, emit, print_result
from cfsctl.paths import Passed

R = "org.composefs.Repository."
_INT = re.compile(r"[ \t\n\r\f\v]*[+-]?[0-9]+")
NO_REPO_COMMANDS = ("compute-id", "create-dumpfile", "mkcomposefs")
NO_REPO_ERROR = "--no-repo is only supported for compute-id and create-dumpfile"
BOOTABLE_ERROR = "boot transforms are not supported by cfsd"


def no_repo_error() -> CommandError:
    """The error for --no-repo with a command that needs a repository."""
    return CommandError(NO_REPO_ERROR)


def refuse_bootable(a: argparse.Namespace) -> None:
    """``--bootable`` is not offered (cfsd has no boot transforms): a clear error for old
    command lines that still give it."""
    if getattr(a, "bootable", False):
        raise CommandError(f"--bootable: {BOOTABLE_ERROR}")


def _fs_options(a: argparse.Namespace) -> dict[str, Any]:
    refuse_bootable(a)
    return {"no_propagate_usr_to_root": a.no_propagate_usr_to_root or None,
            "xattrs": a.xattrs}


def _repository(ctx: Context) -> str | None:
    """The repository whose meta.json chooses the hash (none with --no-repo)."""
    if getattr(ctx.args, "no_repo", False):
        return None
    try:
        return repo_path(ctx.args)
    except CommandError:
        return None


def _pass_repository(ctx: Context, passed: Passed, params: dict[str, Any]) -> None:
    """Pass the repository whose meta.json chooses the hash, when there is one."""
    path = _repository(ctx)
    if path is None or ctx.args.hash:
        return
    with contextlib.suppress(OSError):
        params["repository_fd"] = passed.add(
            os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), own=True)
        params["repository"] = path


def cmd_create_image(ctx: Context, a: argparse.Namespace) -> int:
    """Scan a directory, store its objects and commit its EROFS image(s)."""
    options = _fs_options(a)
    ctx.subject = a.path
    with Passed() as passed:
        index = passed.directory(a.path, what="directory")
        reply = ctx.client.call(R + "CreateImage", {
            "handle": ctx.handle, "path": a.path, "path_fd": index, "name": a.image_name,
            "erofs_version": ctx.args.erofs_version, "options": options},
            fds=passed.fds)
    emit(ctx, reply, f"{reply['algorithm']}:{reply['image_id']}")
    return 0


def cmd_compute_id(ctx: Context, a: argparse.Namespace) -> int:
    """The image id of a directory (hex), storing nothing."""
    options = _fs_options(a)
    ctx.subject = a.path
    with Passed() as passed:
        params = {"path": a.path, "path_fd": passed.directory(a.path, what="directory"),
                  "algorithm": ctx.args.hash, "erofs_version": ctx.args.erofs_version,
                  "options": options}
        _pass_repository(ctx, passed, params)
        reply = ctx.client.call(R + "ComputeId", params, fds=passed.fds)
    emit(ctx, reply, reply["image_id"])
    return 0


def cmd_create_dumpfile(ctx: Context, a: argparse.Namespace) -> int:
    """A directory as a dumpfile on stdout (with --json: its lines as a JSON list)."""
    options = _fs_options(a)
    ctx.subject = a.path
    capture = Capture() if ctx.json else None
    try:
        sys.stdout.flush()
        with Passed([capture.write_fd if capture else 1]) as passed:
            params = {"path": a.path, "path_fd": passed.directory(a.path, what="directory"),
                      "algorithm": ctx.args.hash, "options": options, "output_fd": 0}
            _pass_repository(ctx, passed, params)
            ctx.client.call(R + "CreateDumpfile", params, fds=passed.fds)
        if capture:
            print_result(ctx, {"lines": capture.lines()})
    finally:
        if capture:
            capture.close()
    return 0


def cmd_dump_files(ctx: Context, a: argparse.Namespace) -> int:
    """Dumpfile lines (or backing paths) of files in a stored image."""
    ctx.subject = a.image_name
    reply = ctx.call(R + "DumpFiles", handle=ctx.handle, image=a.image_name,
                     files=a.files, backing_path_only=a.backing_path_only or None)
    emit(ctx, reply, lambda: sys.stdout.writelines(line + "\n" for line in reply["lines"]))
    return 0


XATTRS_HELP = ("which xattrs to keep: allowlist-only (default; security.capability and "
               "the like) or keep-user-xattrs (also user.*)")


def _add_fs_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="DIR", help="root directory of the tree")
    hidden(p, "--bootable", action="store_true")
    p.add_argument("--no-propagate-usr-to-root", action="store_true",
                   help="do not copy /usr metadata to / (skips the OCI transform)")
    p.add_argument("--xattrs", choices=("allowlist-only", "keep-user-xattrs"),
                   help=XATTRS_HELP)


def register(sub: argparse._SubParsersAction, rec: Recorder) -> None:  # type: ignore[type-arg]
    """Add the image commands to the top-level command tree."""
    p = command(sub, rec, "create-image", "scan a directory, store it and commit its image")
    _add_fs_options(p)
    p.add_argument("image_name", nargs="?", metavar="NAME",
                   help="also name it images/refs/NAME")
    p.set_defaults(func=cmd_create_image)

    p = command(sub, rec, "compute-id", "composefs image id of a directory (stores nothing)")
    _add_fs_options(p)
    p.set_defaults(func=cmd_compute_id)

    p = command(sub, rec, "create-dumpfile", "a directory as a composefs dumpfile on stdout")
    _add_fs_options(p)
    p.set_defaults(func=cmd_create_dumpfile)

    p = command(sub, rec, "dump-files", "dumpfile lines of files in a stored image")
    p.add_argument("image_name", metavar="IMAGE", help="image id or refs/NAME")
    p.add_argument("files", nargs="*", metavar="FILE", help="paths inside the image")
    p.add_argument("--backing-path-only", action="store_true",
                   help='print "<path> inline" or "<path> <object path>"')
    p.set_defaults(func=cmd_dump_files)


# --------------------------------------------------------------------------- mkcomposefs

MKCOMPOSEFS_USAGE = """\
Usage: {bin} [OPTIONS] SOURCE IMAGE
Options:
  --digest-store=PATH   Store content files in this directory
  --use-epoch           Make all mtimes zero
  --skip-devices        Don't store device nodes
  --skip-xattrs         Don't store file xattrs
  --user-xattrs         Only store user.* xattrs
  --print-digest        Print the digest of the image
  --print-digest-only   Print the digest of the image, don't write image
  --from-file           The source is a dump file, not a directory
  --min-version=N       Use this minimal format version (default=0)
  --max-version=N       Use this maximum format version (default=1)
  --threads=N           Use this to override the default number of threads used to \
calculate digest and copy files (default={cpus})
  --hardlinks           Share inodes of hardlinked files (cfsd/composefs-rs; not C-compatible)
"""

# long option -> takes a value
_MK_OPTIONS = {
    "skip-xattrs": False, "user-xattrs": False, "skip-devices": False, "use-epoch": False,
    "digest-store": True, "print-digest": False, "print-digest-only": False,
    "from-file": False, "max-version": True, "min-version": True, "threads": True,
    "hardlinks": False, "help": False,
}


class _MkExit(Exception):
    def __init__(self, message: str | None, usage: bool = False, status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.usage = usage
        self.status = status


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


def _strtol(text: str) -> int | None:
    """C ``strtol(…, 10)`` that must consume the whole non-empty string."""
    return int(text) if _INT.fullmatch(text) else None


def _getopt(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """GNU getopt_long (permuting, ``--opt=v`` / ``--opt v``, unique prefixes)."""
    opts: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positional.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        if not arg.startswith("--"):
            raise _MkExit(f"invalid option -- '{arg[1]}'", usage=True)
        name, eq, value = arg[2:].partition("=")
        matches = [o for o in _MK_OPTIONS if o == name] or \
            [o for o in _MK_OPTIONS if o.startswith(name)]
        if len(matches) != 1:
            what = "ambiguous" if matches else "unrecognized"
            raise _MkExit(f"option '--{name}' is {what}" if matches
                          else f"{what} option '{arg}'", usage=True)
        opt = matches[0]
        if _MK_OPTIONS[opt]:
            if not eq:
                if i >= len(argv):
                    raise _MkExit("option needs a value")
                value = argv[i]
                i += 1
            opts[opt] = value
        else:
            if eq:
                raise _MkExit(f"option '--{opt}' doesn't allow an argument", usage=True)
            opts[opt] = True
    return opts, positional


def _parse_mkcomposefs(argv: Sequence[str]) -> dict[str, Any]:
    opts, pos = _getopt(argv)
    if opts.get("help"):
        raise _MkExit(None, usage=True, status=0)
    out: dict[str, Any] = {"opts": opts}
    for key, msg in (("min-version", "Invalid min version"),
                     ("max-version", "Invalid max version")):
        if key in opts:
            v = _strtol(opts[key])
            if v is None:
                raise _MkExit(f"{msg} {opts[key]}")
            out[key] = v
    if "threads" in opts:
        t = _strtol(opts["threads"])
        if t is None:
            raise _MkExit(f"Invalid threads count {opts['threads']}")
        if t <= 0:
            raise _MkExit(f"Invalid threads count {t}")
        out["threads"] = t
    version_set = "min-version" in out or "max-version" in out
    if version_set:
        out.setdefault("min-version", 0)
        out.setdefault("max-version", 0)
    if not pos:
        raise _MkExit("No source path specified", usage=True)
    if not pos[0]:
        raise _MkExit("Empty source path specified")
    if len(pos) > 2:
        raise _MkExit("Too many arguments", usage=True)
    digest_only = bool(opts.get("print-digest-only"))
    if len(pos) == 1 and not digest_only:
        raise _MkExit("No destination path specified", usage=True)
    if len(pos) == 2 and digest_only:
        raise _MkExit("Cannot specify destination path with --print-digest-only", usage=True)
    out["source"] = pos[0]
    out["image"] = pos[1] if len(pos) == 2 else None
    return out


def mkcomposefs_main(argv: Sequence[str], prog: str = "mkcomposefs",
                     address: str | None = None) -> int:
    """C-compatible ``mkcomposefs``: errors as ``mkcomposefs: <msg>`` with exit status 1."""
    name = os.path.basename(prog)
    try:
        return _mkcomposefs(argv, address)
    except _MkExit as e:
        if e.message is not None:
            print(f"{name}: {e.message}", file=sys.stderr)
        if e.usage:
            print(MKCOMPOSEFS_USAGE.format(bin=name, cpus=_cpus()), end="",
                  file=sys.stdout if e.status == 0 else sys.stderr)
        return e.status
    except CallError as e:
        msg = e.parameters.get("message") if isinstance(e.parameters, dict) else None
        print(f"{name}: {msg or e}", file=sys.stderr)
        return 1
    except (ConnectError, OSError, ConnectionError) as e:
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f"{name}: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _mkcomposefs(argv: Sequence[str], address: str | None) -> int:
    p = _parse_mkcomposefs(argv)
    o = p["opts"]
    fds: list[int] = []
    own: list[int] = []
    params: dict[str, Any] = {
        "min_version": p.get("min-version"), "max_version": p.get("max-version"),
        "use_epoch": o.get("use-epoch"), "skip_devices": o.get("skip-devices"),
        "skip_xattrs": o.get("skip-xattrs"), "user_xattrs": o.get("user-xattrs"),
        "hardlinks": o.get("hardlinks"), "threads": p.get("threads")}
    try:
        image = p["image"]
        if image == "-":
            if os.isatty(1):
                raise _MkExit("stdout is a tty.  Refusing to use it")
            sys.stdout.flush()
            params["output_fd"] = len(fds)
            fds.append(1)
        elif image is not None:
            try:
                fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                             0o666)
            except OSError as e:
                raise _MkExit(f"failed to open output file: {e.strerror}") from None
            own.append(fd)
            params["output_fd"] = len(fds)
            fds.append(fd)
        source = p["source"]
        if o.get("from-file"):
            if source == "-":
                fd = 0
            else:
                try:
                    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise _MkExit(f"open `{source}`: {e.strerror}") from None
                own.append(fd)
            params["input_fd"] = len(fds)
            fds.append(fd)
            params["strict"] = "CFS_PARSE_STRICT" in os.environ or None
        else:
            params["source"] = source
            try:
                fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise _MkExit(f"error accessing {source}: {e.strerror}") from None
            own.append(fd)
            params["source_fd"] = len(fds)
            fds.append(fd)
            store = o.get("digest-store")
            if store is not None:
                try:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(store, 0o755)
                    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError as e:
                    raise _MkExit(f"cannot fill store: {store}: {e.strerror}") from None
                own.append(fd)
                params["digest_store"] = store
                params["digest_store_fd"] = len(fds)
                fds.append(fd)
        params = {k: v for k, v in params.items() if v is not None}
        with open_client(address) as client:
            reply = client.call(R + "Mkcomposefs", params, fds=fds)
    finally:
        for fd in own:
            os.close(fd)
    if o.get("print-digest") or o.get("print-digest-only"):
        print(reply["digest"])
    return 0

"""C-compatible ``composefs-info`` (argv[0] ``composefs-info``, or ``cfsctl composefs-info``).

The command line, the order of checks, stdout and the exit status are C composefs 1.0.x's;
error messages are C's, each on one line (C prints some without a final newline or with an
extra blank line).  cfsctl opens every image, file and the basedir itself and passes the
fds; the daemon reads the images (``ComposefsInfo``) and measures files (``MeasureFile``),
writing to our stdout.

Also the GNU ``getopt`` emulation ``mount.composefs`` shares, and the recognition of the
multi-call names.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cfsctl.client import CallError, Client, ConnectError, open_client
from cfsctl.errors import die_of_sigpipe, stdout_closed

R = "org.composefs.Repository."
PROG = "composefs-info"
COMMANDS = ("ls", "objects", "missing-objects", "dump")
MAX_FDS = 16                     # descriptors cfsd accepts with one request
_LONG = {"basedir": True, "filter": True}     # long option -> takes a value
_GLOBAL_WITH_VALUE = ("--repo", "--address", "--hash", "--erofs-version")
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class Exit(Exception):
    """Stop with *status* after printing *lines* to stderr (and *stdout* first)."""

    def __init__(self, status: int, *lines: str, stdout: str = "") -> None:
        super().__init__(*lines)
        self.status = status
        self.lines = lines
        self.stdout = stdout


def flush_stdout() -> None:
    """Flush what we printed (die of SIGPIPE if nobody reads it)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        die_of_sigpipe()


def eprint(text: str) -> None:
    """Write *text* to stderr as bytes (paths keep their original bytes), after stdout."""
    flush_stdout()
    sys.stderr.flush()
    sys.stderr.buffer.write(os.fsencode(text))
    sys.stderr.buffer.flush()


def finish(e: Exit) -> int:
    """Print what an :class:`Exit` carries; its status."""
    if e.stdout:
        sys.stdout.write(e.stdout)
    for line in e.lines:
        eprint(line + "\n")
    flush_stdout()
    return e.status


# --------------------------------------------------------------------------- getopt


def getopt(argv: Sequence[str], prog: str, shortopts: str, longopts: dict[str, bool]
           ) -> tuple[list[tuple[str, str | None]], list[str]]:
    """GNU ``getopt_long`` (glibc 2.36): options anywhere unless POSIXLY_CORRECT, unique
    long prefixes, ``--opt=v`` / ``--opt v``, ``-ov`` / ``-o v``; ``--`` ends options.

    Returns ``([(name, value)], positional)`` in command-line order.  A mistake ends the
    list with ``("?", glibc's message)`` (prefixed with *prog*, the full argv[0]): the
    caller handles the options before it first, as C's option loop does.
    """
    opts: list[tuple[str, str | None]] = []
    pos: list[str] = []
    try:
        _getopt(argv, prog, shortopts, longopts, opts, pos)
    except ValueError as e:
        opts.append(("?", str(e)))
    return opts, pos


def _getopt(argv: Sequence[str], prog: str, shortopts: str, longopts: dict[str, bool],
            opts: list[tuple[str, str | None]], pos: list[str]) -> None:
    permute = "POSIXLY_CORRECT" not in os.environ
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            pos.extend(argv[i:])
            return
        if not arg.startswith("-") or arg == "-":
            pos.append(arg)
            if not permute:
                pos.extend(argv[i:])
                return
            continue
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            exact = [o for o in longopts if o == name]
            matches = exact or [o for o in longopts if o.startswith(name)]
            if not matches:
                raise ValueError(f"{prog}: unrecognized option '{arg}'")
            if len(matches) > 1:
                raise ValueError(f"{prog}: option '{arg}' is ambiguous; possibilities:"
                                 + "".join(f" '--{m}'" for m in matches))
            opt = matches[0]
            if longopts[opt]:
                if not eq:
                    if i >= len(argv):
                        raise ValueError(f"{prog}: option '--{opt}' requires an argument")
                    value = argv[i]
                    i += 1
                opts.append((opt, value))
            elif eq:
                raise ValueError(f"{prog}: option '--{opt}' doesn't allow an argument")
            else:
                opts.append((opt, None))
            continue
        j = 1
        while j < len(arg):
            c = arg[j]
            j += 1
            k = shortopts.find(c)
            if c == ":" or k < 0:
                raise ValueError(f"{prog}: invalid option -- '{c}'")
            if k + 1 < len(shortopts) and shortopts[k + 1] == ":":
                if j < len(arg):
                    value = arg[j:]
                elif i < len(argv):
                    value = argv[i]
                    i += 1
                else:
                    raise ValueError(f"{prog}: option requires an argument -- '{c}'")
                opts.append((c, value))
                break
            opts.append((c, None))


def multicall_argv(argv: Sequence[str], names: Sequence[str]
                   ) -> tuple[str | None, str, list[str]] | None:
    """``(address, name, args)`` if *argv* is ``[cfsctl global options] NAME …`` for one of
    *names*: intercepted before argparse so every argument reaches the C-style parser."""
    address = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in names:
            return address, arg, list(argv[i + 1:])
        if not arg.startswith("--"):
            return None
        name, eq, value = arg.partition("=")
        if name in _GLOBAL_WITH_VALUE and not eq:
            if i + 1 >= len(argv):
                return None
            value = argv[i + 1]
            i += 1
        if name == "--address":
            address = value
        i += 1
    return None


def message(e: CallError) -> str:
    """The message of a varlink error (what C prints after the program name)."""
    msg = e.parameters.get("message") if isinstance(e.parameters, dict) else None
    return str(msg) if msg else str(e)


def open_file(path: str) -> int:
    """*path* opened for reading as C opens it (but never blocking on a FIFO)."""
    fd = os.open(path, _OPEN_FLAGS)
    os.set_blocking(fd, True)
    return fd


# --------------------------------------------------------------------------- composefs-info


def _usage(argv0: str) -> str:
    return (f"usage: {argv0} [--basedir=path] [ls|objects|dump|missing-objects|measure-file]"
            " IMAGES...")


Connect = Callable[[], Client]


def main(argv: Sequence[str], argv0: str = PROG, address: str | None = None) -> int:
    """C-compatible ``composefs-info``; its exit status."""
    name = os.path.basename(argv0)
    client: Client | None = None
    try:
        with contextlib.ExitStack() as stack:
            def connect() -> Client:
                nonlocal client
                if client is None:
                    client = stack.enter_context(open_client(address))
                return client
            status = _run(argv, argv0, name, connect)
        flush_stdout()
        return status
    except Exit as e:
        return finish(e)
    except (CallError, ConnectError, OSError, ConnectionError) as e:
        if stdout_closed():         # the daemon wrote into a pipe nobody reads any more
            die_of_sigpipe()
        if isinstance(e, CallError):
            text = message(e)
        else:
            text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        eprint(f"{name}: {text}\n")
        return 1
    except KeyboardInterrupt:
        return 130


def _run(argv: Sequence[str], argv0: str, name: str, connect: Connect) -> int:
    opts, pos = getopt(argv, argv0, "", _LONG)
    basedir = None
    filters: list[str] | None = None
    for opt, value in opts:
        assert value is not None
        if opt == "?":
            raise Exit(1, value, _usage(argv0), stdout="Def\n")
        if opt == "basedir":
            basedir = value
        else:
            if "/" in value:
                raise Exit(1, f"{name}: Filter must be a single name: {value}: Success")
            filters = [*(filters or []), value]
    if not pos:
        raise Exit(1, "No command specified", _usage(argv0))
    command, images = pos[0], pos[1:]
    if command == "measure-file":
        return _measure(images, argv0, name, connect)
    if command not in COMMANDS:
        raise Exit(1, f"{name}: Unknown command '{command}'")
    with contextlib.ExitStack() as stack:
        base = None
        if basedir is not None:
            try:
                base = os.open(basedir, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY | os.O_PATH)
            except OSError as e:
                raise Exit(1, f"{name}: Can't open basedir `{basedir}`: {e.strerror}") from None
            stack.callback(os.close, base)
        elif command == "missing-objects" and _is_open(0):
            base = 0          # C's basedir fd is 0 without --basedir: paths resolve against it
        if not images:
            raise Exit(1, "No image path specified", _usage(argv0))
        params = {"command": command, "filters": filters}
        if command in ("ls", "dump"):
            for image in images:
                fd = _open_image(name, image)
                try:
                    _call(connect(), params, [image], [fd], base)
                finally:
                    os.close(fd)
            return 0
        return _objects(connect, name, params, images, base, stack)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _open_image(name: str, image: str) -> int:
    try:
        return open_file(image)
    except OSError as e:
        raise Exit(1, f"{name}: Failed to open '{image}': {e.strerror}") from None


def _call(client: Client, params: dict[str, Any], images: list[str], fds: list[int],
          base: int | None, output: int = 1) -> None:
    """One ComposefsInfo call: output, then the images, then the basedir."""
    flush_stdout()
    passed = [output, *fds]
    p = dict(params, images=images, output_fd=0, images_fd=list(range(1, len(passed))))
    if base is not None:
        p["basedir_fd"] = len(passed)
        passed.append(base)
    client.call(R + "ComposefsInfo", p, fds=passed)


def _objects(connect: Connect, name: str, params: dict[str, Any], images: list[str],
             base: int | None, stack: contextlib.ExitStack) -> int:
    """objects / missing-objects: every image in one call (the union is sorted at the end).

    C opens and loads the images in turn; when one cannot be opened, the ones before it are
    still loaded (output discarded) so that a bad image before it is reported first.
    """
    limit = MAX_FDS - 2
    if len(images) > limit:
        raise Exit(1, f"{name}: at most {limit} images for {params['command']}")
    fds: list[int] = []
    for image in images:
        try:
            fd = open_file(image)
        except OSError as e:
            if fds:
                null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                stack.callback(os.close, null)
                _call(connect(), params, images[:len(fds)], fds, base, output=null)
            raise Exit(1, f"{name}: Failed to open '{image}': {e.strerror}") from None
        stack.callback(os.close, fd)
        fds.append(fd)
    _call(connect(), params, images, fds, base)
    return 0


def _measure(files: list[str], argv0: str, name: str, connect: Connect) -> int:
    """measure-file: each file's fs-verity digest, printed as soon as it is known."""
    if not files:
        raise Exit(1, "No files specified", _usage(argv0))
    for path in files:
        try:
            fd = open_file(path)
        except OSError as e:
            raise Exit(1, f"{name}: Failed to open '{path}': {e.strerror}") from None
        try:
            reply = connect().call(R + "MeasureFile", {"path": path, "path_fd": 0}, fds=[fd])
        except CallError as e:
            raise Exit(1, message(e)) from None
        finally:
            os.close(fd)
        sys.stdout.write(reply["digest"] + "\n")
        flush_stdout()
    return 0

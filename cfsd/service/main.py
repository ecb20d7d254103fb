"""The cfsd daemon: socket setup (bound, socket-activated or one connection), logging, signals."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

from cfsd import __version__
from cfsd.core import fsverity
from cfsd.service import auth, identity
from cfsd.service.binding import Server, Service, bind_unix, is_listening, listen_fds
from cfsd.service.errors import map_error
from cfsd.service.oci_api import OciAPI
from cfsd.service.repository_api import RepositoryAPI
from cfsd.service.state import Defaults, State

log = logging.getLogger("cfsd")
INTERFACES = ("org.composefs.Repository", "org.composefs.Oci")
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def interface_dir() -> Path:
    """Where the .varlink files are: $CFSD_INTERFACES, the source tree, or share/cfsd."""
    env = os.environ.get("CFSD_INTERFACES")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[2] / "interfaces",
                   Path(sys.prefix) / "share/cfsd/interfaces"]
    for c in candidates:
        if (c / f"{INTERFACES[0]}.varlink").is_file():
            return c
    raise FileNotFoundError("cannot find the cfsd interfaces/ directory (set CFSD_INTERFACES)")


class JournalFormatter(logging.Formatter):
    """``<priority>message`` lines, as systemd-journald parses them from stderr."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{record.name}: {super().format(record)}"


class PlainFormatter(logging.Formatter):
    """``name: message`` (``name: warning: message`` above info) for a terminal or a file."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{record.name}: {level}{super().format(record)}"


def under_journald(fd: int = 2) -> bool:
    """Whether *fd* is the journal stream systemd connected (``$JOURNAL_STREAM`` names its
    device and inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(fd)
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (OSError, ValueError):
        return False


def _demote_to_debug(record: logging.LogRecord) -> bool:
    """httpx logs every registry request at info: they are debug messages here."""
    if record.levelno == logging.INFO:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return logging.getLogger().isEnabledFor(record.levelno)


def setup_logging(level: str) -> None:
    """Log to stderr: journald priorities under systemd, plain lines otherwise; registry
    requests at debug level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter("%(message)s") if under_journald()
                         else PlainFormatter("%(message)s"))
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(level=numeric if isinstance(numeric, int) else logging.INFO,
                        handlers=[handler], force=True)
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).addFilter(_demote_to_debug)


def build_service(state: State) -> Service:
    """The varlink service with both composefs interfaces."""
    service = Service(vendor="org.composefs", product="cfsd", version=__version__,
                      url="https://github.com/composefs/composefs")
    d = interface_dir()
    impls = {"org.composefs.Repository": RepositoryAPI(state),
             "org.composefs.Oci": OciAPI(state)}
    for name in INTERFACES:
        service.add_interface((d / f"{name}.varlink").read_text(encoding="utf-8"),
                              impls[name], map_error)
    return service


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def build_parser() -> argparse.ArgumentParser:
    """The daemon's command line (also the source of cfsd(1))."""
    p = argparse.ArgumentParser(
        prog="cfsd", description="composefs repository daemon: serves the varlink interfaces "
        "org.composefs.Repository and org.composefs.Oci on a Unix socket (bound with "
        "--address, socket-activated, or standard input as the one connection).  "
        "`cfsd install-units [--user] [--dest DIR]` writes its systemd units.")
    p.add_argument("--address", metavar="unix:PATH",
                   help="listen on unix:PATH (default: socket activation)")
    p.add_argument("--socket-mode", type=lambda s: int(s, 8), default=None, metavar="MODE",
                   help="mode of a bound socket (default 0660 as root, 0600 otherwise)")
    p.add_argument("--connection-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--insecure", action="store_true", help="do not require fs-verity")
    p.add_argument("--require-verity", action="store_true",
                   help="refuse repositories without fs-verity")
    p.add_argument("--no-upgrade", action="store_true",
                   help="do not upgrade repositories without meta.json")
    p.add_argument("--handle-idle", type=float, default=600.0, metavar="SECONDS",
                   help="release a repository handle after SECONDS without a call "
                        "(default 600)")
    p.add_argument("--handles-per-uid", type=int, default=64, metavar="N",
                   help="open handles one user may hold; the longest idle goes first "
                        "(default 64)")
    p.add_argument("--exit-idle", type=float, default=None, metavar="SECONDS",
                   help="exit after SECONDS without connections (socket activation starts "
                        "the daemon again on the next one)")
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS,
                   default=os.environ.get("CFSD_LOG_LEVEL", "info").lower(),
                   help="least important messages logged (default: $CFSD_LOG_LEVEL, else "
                        "info); registry requests are debug")
    p.add_argument("--version", action="version", version=f"cfsd {__version__}",
                   help="print the version and exit")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    return build_parser().parse_args(argv)


def stdin_connection() -> socket.socket | None:
    """Standard input, when it is a connected stream socket (inetd-style activation)."""
    try:
        sock = socket.socket(fileno=os.dup(0))
    except OSError:
        return None
    try:
        if (sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
                and not is_listening(sock)):
            sock.getpeername()
            return sock
    except OSError:
        pass
    sock.close()
    return None


def _raise_fd_limit() -> None:
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    except OSError:     # a syscall filter without @resources: the unit sets LimitNOFILE=
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the daemon until SIGTERM (or until its single connection closes)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install-units"]:
        from cfsd.service import units
        return units.main(argv[1:])
    args = parse_args(argv)
    setup_logging(args.log_level)
    _raise_fd_limit()
    # Before anyone is served: load everything a call may need (a thread working as a caller
    # must not read the interpreter's files), and start the helpers while the daemon is
    # still only itself.
    if args.connection_fd is None:   # a private daemon only ever serves its own user
        identity.warm_up()
    fsverity.spawn_context = identity.as_daemon
    if args.connection_fd is None:
        auth.start_opener()     # a private daemon serves only the cfsctl that passes its fds
    state = State(Defaults(args.insecure, args.require_verity, args.no_upgrade,
                           handle_idle=args.handle_idle,
                           handles_per_uid=args.handles_per_uid))
    try:
        service = build_service(state)
    except (OSError, SyntaxError) as e:
        log.error("cannot load interfaces: %s", e)
        return 1
    server = Server(service)

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received signal %d, shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    if args.connection_fd is not None:
        sock = socket.socket(fileno=args.connection_fd)
        try:
            server.serve_connection(sock)
        finally:
            state.close_all()
            auth.stop_opener()
        return 0

    listeners: list[socket.socket] = []
    connected: list[socket.socket] = []
    for s in listen_fds():
        (listeners if is_listening(s) else connected).append(s)
    if not listeners and not connected and not args.address:
        stdin = stdin_connection()
        if stdin is not None:
            connected.append(stdin)
    if args.address:
        path = args.address.removeprefix("unix:")
        mode = args.socket_mode if args.socket_mode is not None else (
            0o660 if os.geteuid() == 0 else 0o600)
        try:
            listeners.append(bind_unix(path, mode))
        except OSError as e:
            log.error("cannot listen on %s: %s", path, e)
            return 1
        log.info("listening on unix:%s", path)
    if not listeners and not connected:
        log.error("no --address given, not socket-activated and stdin is not a connection")
        return 2

    try:
        for s in connected:          # Accept=yes, varlinkctl exec:, inetd style
            server.start_connection(s)
        if listeners:
            server.serve(listeners, exit_idle=args.exit_idle)
        else:
            server.wait_connections()
    finally:
        for s in listeners:
            s.close()
        if args.address:
            try:
                os.unlink(args.address.removeprefix("unix:"))
            except OSError:
                pass
        state.close_all()
        auth.stop_opener()
    log.info("stopped")
    return 0

"""Progress on stderr for long operations: a live status line on a terminal, plain lines
when stderr is not a terminal, nothing with ``-q`` (or ``--json``).

Streaming calls (pull, apply-delta, create-delta) show their event frames; every long call,
streaming or not (checkout, gc, the indexing phase of create-delta), also shows that it is
still working when nothing else was shown for a while: a spinner with the elapsed time on a
terminal, a "still working" line every :data:`PLAIN_EVERY` seconds otherwise.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

TTY_AFTER = 1.0          # seconds of silence before the terminal spinner appears
PLAIN_EVERY = 10.0       # seconds of silence between two plain "still working" lines
_DIGEST_MESSAGE = re.compile(r"^((?:sha256|sha512):[0-9a-f]{64}): (.*)$")


def human(n: float) -> str:
    """Binary units, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def layer_label(ident: str) -> str:
    """How every progress line names a layer: by its diff_id (what ``oci layer`` takes)."""
    return f"layer {ident}"


class ProgressView:
    """Consumes event frames (exactly one event per frame) and silences."""

    def __init__(self, label: str, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.out = stream or sys.stderr
        self.tty = self.out.isatty()
        self.quiet = quiet
        self.label = label
        self.lock = threading.Lock()
        self.started = self.last = time.monotonic()
        self.activity = label          # the last thing said, for the spinner
        self.totals: dict[str, int] = {}
        self.fetched: dict[str, int] = {}
        self.finished: set[str] = set()
        self.items: dict[str, int] = {}
        self.shown: dict[str, int] = {}
        self._line = False
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if not quiet:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    # ------------------------------------------------------------------ output

    def _clear(self) -> None:
        if self._line:
            self.out.write("\r\x1b[2K")
            self._line = False

    def _say(self, text: str) -> None:
        self._clear()
        self.out.write(f"{text}\n")
        self.last = time.monotonic()

    def _status(self) -> None:
        total = sum(self.totals.values())
        got = sum(self.fetched.values())
        bar_w = 30
        filled = int(bar_w * got / total) if total else bar_w
        self.out.write(f"\r\x1b[2K[{'#' * filled}{'.' * (bar_w - filled)}] "
                       f"{human(got)} / {human(total)} downloaded  "
                       f"layers {len(self.finished)}/{len(self.totals)}")
        self._line = True

    def _tick(self) -> None:
        spin = "|/-\\"
        n = 0
        while not self._stop.wait(0.25 if self.tty else 1.0):
            with self.lock:
                now = time.monotonic()
                quiet_for = now - self.last
                elapsed = int(now - self.started)
                if self.tty and quiet_for >= TTY_AFTER and not self.totals:
                    n += 1
                    self.out.write(f"\r\x1b[2K{spin[n % 4]} {self.activity} ({elapsed} s)")
                    self._line = True
                    self.out.flush()
                elif not self.tty and quiet_for >= PLAIN_EVERY:
                    self._say(f"{self.label}: still working ({elapsed} s)")
                    self.out.flush()

    # ------------------------------------------------------------------ events

    def _items(self, frame: dict[str, Any]) -> bool:
        """Item-counted components (apply-delta's and create-delta's layers) print as
        lines: ``<label>: N/M layers``."""
        ev = frame.get("started")
        if ev is not None and ev.get("unit") == "Items":
            self.items[ev["id"]] = ev.get("total") or 0
            self.activity = f"{self.label}: 0/{self.items[ev['id']]} layers"
            return True
        for kind in ("progress", "done"):
            ev = frame.get(kind)
            if ev is not None and ev["id"] in self.items:
                count = ev["fetched"] if kind == "progress" else ev["transferred"]
                text = f"{self.label}: {count}/{self.items[ev['id']]} layers"
                self.activity = text
                if (kind == "done" or not self.tty) and self.shown.get(ev["id"]) != count:
                    self.shown[ev["id"]] = count
                    self._say(text)
                return True
        return False

    def event(self, frame: dict[str, Any]) -> None:
        """Show one event."""
        if self.quiet:
            return
        with self.lock:
            self._event(frame)
            if self.tty and self.totals:
                self._status()
            self.out.flush()

    def _event(self, frame: dict[str, Any]) -> None:
        self.last = time.monotonic()
        if self._items(frame):
            return
        if (msg := frame.get("message")) is not None:
            m = _DIGEST_MESSAGE.match(msg)
            if m:
                msg = f"{layer_label(m[1])}: {m[2]}"
            self.activity = msg.rstrip(".")
            self._say(msg)
        elif (ev := frame.get("started")) is not None:
            self.totals[ev["id"]] = ev.get("total") or 0
            self.fetched[ev["id"]] = 0
            if not self.tty:
                self._say(f"{layer_label(ev['id'])}: downloading "
                          f"{human(ev.get('total') or 0)} (compressed)")
        elif (ev := frame.get("progress")) is not None:
            self.fetched[ev["id"]] = ev["fetched"]
        elif (ev := frame.get("skipped")) is not None:
            self._say(f"{layer_label(ev['id'])}: already present")
        elif (ev := frame.get("done")) is not None:
            self.finished.add(ev["id"])
            self.fetched[ev["id"]] = self.totals.get(ev["id"], ev["transferred"])
            if not self.tty:
                self._say(f"{layer_label(ev['id'])}: stored")

    def close(self) -> None:
        """Stop the ticker and end the live line."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self.lock:
            if self._line and self.totals and self.tty:
                self.out.write("\n")
                self._line = False
            self._clear()
            self.out.flush()


def stream_with_progress(ctx: Any, method: str, params: dict[str, Any], final: str,
                         label: str, fds: Sequence[int] = ()) -> dict[str, Any] | None:
    """Call a streaming method (passing *fds*), show its event frames, return *final*."""
    view = ProgressView(label, quiet=ctx.quiet)
    result = None
    try:
        for frame, _ in ctx.client.stream(method, params, fds=fds, more=True):
            if frame.get(final) is not None:
                result = frame[final]
            else:
                view.event(frame)
    finally:
        view.close()
    return result


@contextlib.contextmanager
def busy(ctx: Any, label: str) -> Iterator[None]:
    """Show that a single long call (checkout, gc) is still working."""
    view = ProgressView(label, quiet=ctx.quiet)
    try:
        yield
    finally:
        view.close()

"""Rendering of Pull progress frames: a live status line on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO


def human(n: float) -> str:
    """Binary units, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


class ProgressView:
    """Consumes event frames (exactly one event per frame)."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.out = stream or sys.stderr
        self.tty = self.out.isatty()
        self.quiet = quiet
        self.totals: dict[str, int] = {}
        self.fetched: dict[str, int] = {}
        self.finished: set[str] = set()
        self.items: dict[str, int] = {}
        self.shown: dict[str, int] = {}
        self._line = False

    def _clear(self) -> None:
        if self._line:
            self.out.write("\r\x1b[2K")
            self._line = False

    def _status(self) -> None:
        total = sum(self.totals.values())
        got = sum(self.fetched.values())
        n = len(self.totals)
        bar_w = 30
        filled = int(bar_w * got / total) if total else bar_w
        self.out.write(f"\r\x1b[2K[{'#' * filled}{'.' * (bar_w - filled)}] "
                       f"{human(got)} / {human(total)}  layers {len(self.finished)}/{n}")
        self.out.flush()
        self._line = True

    def _items(self, frame: dict[str, Any]) -> bool:
        """Item-counted components (e.g. ``apply-delta`` layers) print as lines."""
        ev = frame.get("started")
        if ev is not None and ev.get("unit") == "Items":
            self.items[ev["id"]] = ev.get("total") or 0
            return True
        for kind in ("progress", "done"):
            ev = frame.get(kind)
            if ev is not None and ev["id"] in self.items:
                count = ev["fetched"] if kind == "progress" else ev["transferred"]
                if (kind == "done" or not self.tty) and self.shown.get(ev["id"]) != count:
                    self.shown[ev["id"]] = count
                    self.event({"message": f"{ev['id']}: {count}/{self.items[ev['id']]} "
                                           "layers"})
                return True
        return False

    def event(self, frame: dict[str, Any]) -> None:
        """Show one event."""
        if self.quiet or self._items(frame):
            return
        if (msg := frame.get("message")) is not None:
            self._clear()
            self.out.write(f"{msg}\n")
        elif (ev := frame.get("started")) is not None:
            self.totals[ev["id"]] = ev.get("total") or 0
            self.fetched[ev["id"]] = 0
            if not self.tty:
                self.out.write(f"{ev['id']}: fetching {human(ev.get('total') or 0)}\n")
        elif (ev := frame.get("progress")) is not None:
            self.fetched[ev["id"]] = ev["fetched"]
        elif (ev := frame.get("skipped")) is not None:
            self._clear()
            self.out.write(f"{ev['id']}: skipped (already present)\n")
        elif (ev := frame.get("done")) is not None:
            self.finished.add(ev["id"])
            self.fetched[ev["id"]] = self.totals.get(ev["id"], ev["transferred"])
            if not self.tty:
                self.out.write(f"{ev['id']}: done\n")
        if self.tty and self.totals:
            self._status()
        self.out.flush()

    def close(self) -> None:
        """End the live line."""
        if self._line:
            self.out.write("\n")
            self._line = False
        self.out.flush()


def stream_with_progress(client: Any, method: str, params: dict[str, Any], final: str,
                         quiet: bool, fds: Sequence[int] = ()) -> dict[str, Any] | None:
    """Call a streaming method (passing *fds*), show its event frames, return *final*."""
    view = ProgressView(quiet=quiet)
    result = None
    try:
        for frame, _ in client.stream(method, params, fds=fds, more=True):
            if frame.get(final) is not None:
                result = frame[final]
            else:
                view.event(frame)
    finally:
        view.close()
    return result

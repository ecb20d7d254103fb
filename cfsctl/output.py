"""Output shared by cfsctl commands: human formats (mirroring upstream cfsctl), the JSON
documents ``--json`` prints (:data:`JSON_SHAPES`, their one description), and dumpfiles
captured for JSON."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

from cfsctl.context import Context

# The JSON document of every command with --json (one document on stdout): key -> type.
# A type is a Python type, a tuple of alternatives (None: null) or a nested shape.
Shape = dict[str, Any]
STATS: Shape = {"objects_new": int, "objects_already_present": int,
                "objects_reflinked": int, "objects_hardlinked": int, "bytes_stored": int,
                "bytes_inlined": int, "bytes_reflinked": int, "bytes_hardlinked": int,
                "summary": str}
FSCK: Shape = {"ok": bool, "has_metadata": bool, "objects_checked": int,
               "objects_corrupted": int, "streams_checked": int, "streams_corrupted": int,
               "images_checked": int, "images_corrupted": int, "broken_links": int,
               "missing_objects": int, "errors": [str]}
COMPLETED: Shape = {"manifest_digest": str, "config_digest": str, "manifest_verity": str,
                    "config_verity": str, "tag": (str, None), "stats": STATS}
LINES: Shape = {"lines": [str]}
MOUNTED: Shape = {"image": str, "mountpoint": str}
JSON_SHAPES: dict[str, Shape] = {
    "init": {"path": str, "created": bool, "status": str, "algorithm": (str, None),
             "verity": (bool, None)},
    "cat": {"name": str, "size": int},
    "fsck": FSCK,
    "gc": {"dry_run": bool, "result": {"objects_removed": int, "objects_bytes": int,
                                       "images_pruned": int, "streams_pruned": int}},
    "images": {"images": [{"name": str, "digest": str}]},
    "image-objects": {"object_ids": [str]},
    "mount": MOUNTED,
    "create-image": {"image_id": str, "algorithm": str,
                     "images": [{"version": int, "image_id": str}]},
    "compute-id": {"image_id": str, "algorithm": str},
    "create-dumpfile": LINES,
    "dump-files": LINES,
    "oci import-layer": {"diff_id": str, "verity": str, "already_present": bool,
                         "stats": STATS},
    "oci pull": COMPLETED,
    "oci images": {"images": [{"name": str, "manifest_digest": str, "is_container": bool,
                               "architecture": str, "os": str, "created": (str, None),
                               "layer_count": int, "referrer_count": int}]},
    "oci inspect": {"manifest": str, "config": str, "referrers": [str],
                    "composefs_erofs": (str, None), "composefs_boot_erofs": (str, None)},
    "oci copy": {"manifest_digest": str, "tag": (str, None), "layers_copied": int,
                 "layers_present": int, "objects_copied": int, "objects_linked": int},
    "oci tag": {"manifest_digest": str, "name": str},
    "oci untag": {"name": str},
    "oci layer": {"diffId": str, "verity": str, "size": int, "entryCount": int,
                  "splitstream": {"externalObjects": int, "externalSize": int,
                                  "inlineSize": int}},
    "oci compute-id": {"image_id": str},
    "oci dump": LINES,
    "oci mount": MOUNTED,
    "oci checkout": {"image": str, "directory": str, "entries": int, "skipped": [str]},
    "oci fsck": {"ok": bool, "images_checked": int, "images_corrupted": int,
                 "errors": [str], "repo": FSCK},
    "oci apply-delta": COMPLETED,
    "oci create-delta": {"output": str, "delta_digest": str, "size": int, "format": str,
                         "source": str, "target": str,
                         "layers": [{"diff_id": str, "digest": str, "kind": str, "size": int,
                                     "layer_size": int}]},
    "completion": {"shell": str, "script": str},
}


def shape_text(shape: Any) -> str:
    """A shape as documentation: ``{"key": string, ...}``."""
    if isinstance(shape, dict):
        return "{" + ", ".join(f'"{k}": {shape_text(v)}' for k, v in shape.items()) + "}"
    if isinstance(shape, list):
        return f"[{shape_text(shape[0])}, ...]"
    if isinstance(shape, tuple):
        return " | ".join(shape_text(x) for x in shape)
    return {str: "string", int: "number", bool: "boolean", None: "null"}[shape]


def check_shape(obj: Any, shape: Any, where: str = "$") -> None:
    """Raise ValueError unless *obj* has exactly *shape* (tests use this)."""
    if isinstance(shape, tuple):
        errors = []
        for alt in shape:
            try:
                check_shape(obj, alt, where)
                return
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if shape is None:
        if obj is not None:
            raise ValueError(f"{where}: expected null, got {obj!r}")
    elif isinstance(shape, dict):
        if not isinstance(obj, dict) or set(obj) != set(shape):
            raise ValueError(f"{where}: expected keys {sorted(shape)}, got "
                             f"{sorted(obj) if isinstance(obj, dict) else obj!r}")
        for k, v in shape.items():
            check_shape(obj[k], v, f"{where}.{k}")
    elif isinstance(shape, list):
        if not isinstance(obj, list):
            raise ValueError(f"{where}: expected a list, got {obj!r}")
        for i, x in enumerate(obj):
            check_shape(x, shape[0], f"{where}[{i}]")
    elif shape is int:
        if not isinstance(obj, int) or isinstance(obj, bool):
            raise ValueError(f"{where}: expected a number, got {obj!r}")
    elif not isinstance(obj, shape):
        raise ValueError(f"{where}: expected {shape_text(shape)}, got {obj!r}")


_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
          "PiB": 1 << 50}
_AMOUNT = re.compile(r"([0-9.]+) (B|KiB|MiB|GiB|TiB|PiB) (\w+)")
_COUNT = re.compile(r"([0-9]+) (new|copied|reflinked|hardlinked|already present)")


def parse_stats(text: str) -> dict[str, Any]:
    """The daemon's import statistics line (``1 new + 0 already present objects; 4.88 KiB
    stored, 4.62 KiB inlined``) as numbers; byte amounts have the line's precision."""
    counts, _, amounts = text.partition(";")
    out: dict[str, Any] = {k: 0 for k in STATS if k != "summary"}
    for n, kind in _COUNT.findall(counts):
        key = {"new": "new", "copied": "new"}.get(kind, kind.replace(" ", "_"))
        out[f"objects_{key}"] = int(n)
    for n, unit, kind in _AMOUNT.findall(amounts):
        key = "stored" if kind == "copied" else kind
        if f"bytes_{key}" in out:
            out[f"bytes_{key}"] = round(float(n) * _UNITS[unit])
    out["summary"] = text
    return out


def project(obj: Any, shape: Any) -> Any:
    """*obj* reduced to the keys of *shape* (missing optional values as null), so that the
    documented shape holds whatever else a newer daemon's reply carries."""
    if isinstance(shape, dict):
        src = obj if isinstance(obj, dict) else {}
        return {k: project(src.get(k), v) for k, v in shape.items()}
    if isinstance(shape, list):
        return [project(x, shape[0]) for x in obj or []]
    return obj


def command_key(args: Any) -> str:
    """The JSON_SHAPES key of the command being run."""
    name = {"list-images": "images"}.get(args.command, args.command)
    return f"oci {args.oci_command}" if name == "oci" else name


def print_result(ctx: Context, obj: Any) -> None:
    """The command's result as its documented JSON document."""
    print_json(project(obj, JSON_SHAPES[command_key(ctx.args)]))


def emit(ctx: Context, obj: Any, text: Callable[[], None] | str | None) -> None:
    """The result: *obj* as JSON with --json, else *text* (printed, or a function that
    prints)."""
    if ctx.json:
        print_result(ctx, obj)
    elif callable(text):
        text()
    elif text is not None:
        print(text)


class Capture:
    """A pipe whose write end is passed to the daemon as an output fd; the read end is
    drained by a thread, so the call can write any amount (for ``--json`` dumpfiles)."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        self._chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while data := os.read(self.read_fd, 1 << 16):
            self._chunks.append(data)

    def lines(self) -> list[str]:
        """Everything written, as lines (after the call: closes the pipe)."""
        os.close(self.write_fd)
        self._thread.join()
        os.close(self.read_fd)
        return b"".join(self._chunks).decode("utf-8", "surrogateescape").splitlines()

    def close(self) -> None:
        """Release the pipe (after a failed call)."""
        for fd in (self.write_fd, self.read_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def print_json(obj: Any) -> None:
    """Pretty JSON like serde_json::to_writer_pretty, plus a newline.

    Written in pieces: one huge write that a closing pipe cuts short is not reported by
    Python's buffered stdout, the next write is (EPIPE, see cfsctl.errors)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    for i in range(0, len(text), 1 << 14):
        sys.stdout.write(text[i:i + (1 << 14)])


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A comfy-table UTF8_FULL table (what upstream cfsctl prints)."""
    widths = [_width(h) for h in header]
    for row in rows:
        widths = [max(w, _width(c)) for w, c in zip(widths, row, strict=True)]

    def line(left: str, fill: str, mid: str, right: str) -> str:
        return left + mid.join(fill * (w + 2) for w in widths) + right

    def cells(row: Sequence[str]) -> str:
        return "│" + "┆".join(f" {c}{' ' * (w - _width(c))} "
                              for c, w in zip(row, widths, strict=True)) + "│"

    out = [line("┌", "─", "┬", "┐"), cells(header), line("╞", "═", "╪", "╡")]
    for i, row in enumerate(rows):
        if i:
            out.append(line("├", "╌", "┼", "┤"))
        out.append(cells(row))
    out.append(line("└", "─", "┴", "┘"))
    return "\n".join(out)


def fsck_text(r: dict[str, Any]) -> str:
    """Upstream's FsckResult Display."""
    def ratio(checked: str, bad: str) -> str:
        return f"{r[checked] - r[bad]}/{r[checked]} ok"

    lines = [f"meta.json: {'ok' if r['has_metadata'] else 'absent'}",
             f"objects: {ratio('objects_checked', 'objects_corrupted')}",
             f"streams: {ratio('streams_checked', 'streams_corrupted')}",
             f"images: {ratio('images_checked', 'images_corrupted')}"]
    if r["broken_links"]:
        lines.append(f"broken symlinks: {r['broken_links']}")
    if r["missing_objects"]:
        lines.append(f"missing objects: {r['missing_objects']}")
    if r["ok"]:
        lines.append("status: ok")
    else:
        lines.append(f"status: {len(r['errors'])} error(s)")
        lines += [f"  - {e}" for e in r["errors"]]
    return "\n".join(lines)


def gc_text(result: dict[str, int], dry_run: bool) -> str:
    """Upstream's gc summary; a dry run says what would be removed."""
    if dry_run:
        lines = ["Dry run (no files deleted):",
                 f"Objects: {result['objects_removed']} would be removed "
                 f"({result['objects_bytes']} bytes)"]
        if result["images_pruned"] or result["streams_pruned"]:
            lines.append(f"Symlinks that would be pruned: {result['images_pruned']} images, "
                         f"{result['streams_pruned']} streams")
        return "\n".join(lines)
    lines = [f"Objects: {result['objects_removed']} removed ({result['objects_bytes']} bytes)"]
    if result["images_pruned"] or result["streams_pruned"]:
        lines.append(f"Pruned symlinks: {result['images_pruned']} images, "
                     f"{result['streams_pruned']} streams")
    return "\n".join(lines)


def print_completed(ctx: Context, completed: dict[str, Any], tag: str | None) -> None:
    """The summary lines of a pull or an applied delta (upstream's format), or its JSON."""
    if ctx.json:
        print_result(ctx, {"manifest_digest": completed["manifest_digest"],
                    "config_digest": completed["config_digest"],
                    "manifest_verity": completed["manifest_verity"],
                    "config_verity": completed["config_verity"], "tag": tag,
                    "stats": parse_stats(completed["stats"])})
        return
    print(f"manifest {completed['manifest_digest']}")
    print(f"config   {completed['config_digest']}")
    print(f"verity   {completed['manifest_verity']}")
    print(f"tagged   {tag}")
    print(f"objects  {completed['stats']}")

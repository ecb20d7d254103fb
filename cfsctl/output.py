"""Human output formats shared by cfsctl commands (mirroring upstream cfsctl)."""

from __future__ import annotations

import json
import sys
import unicodedata
from collections.abc import Sequence
from typing import Any


def print_json(obj: Any) -> None:
    """Pretty JSON like serde_json::to_writer_pretty, plus a newline."""
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


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
    """Upstream's gc summary."""
    lines = ["Dry run (no files deleted):"] if dry_run else []
    lines.append(f"Objects: {result['objects_removed']} removed "
                 f"({result['objects_bytes']} bytes)")
    if result["images_pruned"] or result["streams_pruned"]:
        lines.append(f"Pruned symlinks: {result['images_pruned']} images, "
                     f"{result['streams_pruned']} streams")
    return "\n".join(lines)


def print_completed(completed: dict[str, Any], tag: str, as_json: bool) -> None:
    """The summary lines of a pull or an applied delta (upstream's format), or its JSON."""
    if as_json:
        print_json(completed)
        return
    print(f"manifest {completed['manifest_digest']}")
    print(f"config   {completed['config_digest']}")
    print(f"verity   {completed['manifest_verity']}")
    print(f"tagged   {tag}")
    print(f"objects  {completed['stats']}")

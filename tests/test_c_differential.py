"""C ``mkcomposefs --from-file`` differential cases, pinned (tests/data/c_differential/).

Each case is a dumpfile that C mkcomposefs 1.0.8 was run on with some options; the expected
result is the sha256 of the image C wrote or the message C printed after ``mkcomposefs: ``.
cfsd (:func:`from_dump` + :func:`build_image`) must give the same, so CI needs no C build.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from cfsd.core.dumpfile import DumpfileError, parse_dumpfile_c
from cfsd.core.mkcomposefs import MkcomposefsError, MkcomposefsOptions, build_image, from_dump
from cfsd.core.tree import Redirect

DATA = Path(__file__).parent / "data" / "c_differential" / "cases.jsonl.gz"


def load_cases() -> list[dict[str, Any]]:
    """The pinned cases (``dump`` is the dumpfile decoded as latin-1)."""
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


CASES = load_cases()


def run(case: dict[str, Any]) -> tuple[str, str]:
    """``("ok", sha256 of the image)`` or ``("err", message)`` for one case."""
    dump = case["dump"].encode("latin-1")
    opts = MkcomposefsOptions(min_version=case["min_version"], max_version=case["max_version"])
    try:
        image, _version = build_image(from_dump(dump, strict=case["strict"]), opts)
    except MkcomposefsError as e:
        return "err", str(e)
    return "ok", hashlib.sha256(image).hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_same_as_c(case: dict[str, Any]) -> None:
    expected = ("ok", case["sha256"]) if "sha256" in case else ("err", case["error"])
    assert run(case) == expected


def test_inventory() -> None:
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names)) >= 300
    oks = sum("sha256" in c for c in CASES)
    assert 100 < oks < len(CASES)
    for name in ("report-redirect-not-object-path@0-None-None",
                 "report-digest-without-payload@0-None-None",
                 "report-escaped-payload@0-None-None"):
        assert name in names


def test_reported_constructs_are_redirects() -> None:
    """What the standard tree cannot hold is a ``Redirect``; ``parse_dumpfile_c`` without
    ``mkcomposefs`` still refuses it (the tree it returns is for any consumer)."""
    root = b"/ 0 40755 2 0 0 0 0.0 - - -\n"
    digest = b"9c" * 32
    dump = (root + b"/r 10 100644 1 0 0 0 0.0 50/231e.file - " + digest + b"\n"
            b"/d 10 100644 1 0 0 0 0.0 - - " + digest + b"\n"
            b"/e 10 100644 1 0 0 0 0.0 dd/\\x359c - -\n")
    entries = from_dump(dump).root.entries
    raw = bytes.fromhex(digest.decode())
    assert entries[b"r"].content == Redirect(10, b"50/231e.file", raw)
    assert entries[b"d"].content == Redirect(10, b"", raw)
    assert entries[b"e"].content == Redirect(10, b"dd/59c", None)
    with pytest.raises(DumpfileError, match="not the object path"):
        parse_dumpfile_c(dump)

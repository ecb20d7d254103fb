"""Image commands built from directories or dumpfiles (create-image, compute-id, mkcomposefs…)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the image commands to the top-level command tree."""

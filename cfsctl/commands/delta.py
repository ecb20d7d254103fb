"""``cfsctl oci apply-delta`` / ``create-delta``."""

from __future__ import annotations

import argparse


def register(osub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the delta subcommands to ``cfsctl oci``."""

"""``cfsctl oci …`` commands."""

from __future__ import annotations

import argparse

from cfsctl.context import Context

OCI = "org.composefs.Oci."


def cmd_import_layer(ctx: Context, a: argparse.Namespace) -> int:
    """Import an uncompressed layer tar from stdin; print its verity."""
    reply = ctx.client.call(OCI + "ImportLayer",
                            {"handle": ctx.handle, "digest": a.digest, "name": a.name},
                            fds=[0])
    print(f"{ctx.hash_algorithm}:{reply['verity']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``oci`` and its subcommands."""
    oci = sub.add_parser("oci", help="OCI images")
    osub = oci.add_subparsers(dest="oci_command", required=True, metavar="COMMAND")
    p = osub.add_parser("import-layer", help="import an uncompressed tar from stdin")
    p.add_argument("digest")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_import_layer)

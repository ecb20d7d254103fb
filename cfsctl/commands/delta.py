"""``cfsctl oci apply-delta`` / ``create-delta``: apply an oci-delta artifact to an image in
the repository, or write one from two images of the repository."""

from __future__ import annotations

import argparse
import os

from cfsctl.context import CommandError, Context
from cfsctl.options import Recorder, command, positive
from cfsctl.output import print_completed, print_result
from cfsctl.paths import Passed
from cfsctl.progress import human, stream_with_progress

OCI = "org.composefs.Oci."
MAX_KEY = 64 << 10


def read_key(path: str) -> str:
    """The PEM text of a public key file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY + 1)
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_KEY:
        raise CommandError(f"{path} is too large for a public key")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise CommandError(f"{path} is not a PEM public key") from None


def cmd_apply_delta(ctx: Context, a: argparse.Namespace) -> int:
    """Apply a delta (oci:, oci-archive: or docker://) and tag the resulting image."""
    ctx.subject = a.delta
    params = {"handle": ctx.handle, "delta": a.delta, "name": a.name, "source": a.source,
              "tls_verify": a.tls_verify, "credentials": a.creds,
              "concurrency": a.concurrency,
              "verify_key": read_key(a.verify_key) if a.verify_key else None}
    with Passed() as passed:
        passed.transport_path(a.delta, params, "delta_fd")
        passed.auth_file(a.delta, a.authfile, a.creds, params)
        completed = stream_with_progress(ctx, OCI + "ApplyDelta", params, "completed",
                                         "apply-delta", passed.fds)
    if completed is None:
        raise CommandError("apply-delta finished without a result")
    print_completed(ctx, completed, a.name or a.delta)
    return 0


def cmd_create_delta(ctx: Context, a: argparse.Namespace) -> int:
    """Write the delta OLD -> NEW as an oci-archive (the daemon writes it as the caller)."""
    if a.concurrency is not None and not 1 <= a.concurrency <= 64:
        raise CommandError("--concurrency must be between 1 and 64")
    params = {"handle": ctx.handle, "old": a.old, "new": a.new, "output": a.output,
              "format": a.format, "concurrency": a.concurrency, "ref_name": a.ref_name}
    with Passed() as passed:
        params["output_dir_fd"] = passed.parent(a.output, what=a.output)
        created = stream_with_progress(ctx, OCI + "CreateDelta", params, "created",
                                       "create-delta", passed.fds)
    if created is None:
        raise CommandError("create-delta finished without a result")
    if ctx.json:
        print_result(ctx, {"output": os.path.abspath(a.output), **created})
        return 0
    layers = created["layers"]
    changed = [x for x in layers if x["kind"] != "reused"]
    blobs = {x["diff_id"]: x["size"] for x in changed}
    changed_bytes = sum(x["layer_size"] for x in changed)
    print(f"delta    {created['delta_digest']}")
    print(f"written  {a.output} ({human(created['size'])}, tar-diff {created['format']})")
    print(f"source   {created['source']}")
    print(f"target   {created['target']}")
    for x in layers:
        size = "" if x["kind"] == "reused" else (f" {human(x['size'])} for "
                                                 f"{human(x['layer_size'])}")
        print(f"layer    {x['diff_id']} {x['kind']}{size}")
    if changed_bytes:
        print(f"changed  {len(changed)} layers, {human(sum(blobs.values()))} for "
              f"{human(changed_bytes)} "
              f"({sum(blobs.values()) / changed_bytes:.1%})")
    return 0


def register(osub: argparse._SubParsersAction, rec: Recorder) -> None:  # type: ignore[type-arg]
    """Add the delta subcommands to ``cfsctl oci``."""
    from cfsctl.commands.oci import add_registry_options
    p = command(osub, rec, "apply-delta", "apply an oci-delta artifact to a stored image")
    p.add_argument("delta", help="oci:DIR[:NAME], oci-archive:FILE[:NAME] or docker://REF")
    p.add_argument("name", nargs="?", help="tag for the result (default: the delta reference)")
    p.add_argument("--from", dest="source", metavar="IMAGE",
                   help="the source image (tag or @digest); default: found by its config")
    p.add_argument("--verify-key", metavar="PUBKEY",
                   help="PEM public key the embedded signature must verify with")
    add_registry_options(p, "layers applied at once")
    p.set_defaults(func=cmd_apply_delta)
    p = command(osub, rec, "create-delta",
                "write an oci-delta artifact turning image OLD into image NEW")
    p.add_argument("old", help="the image the delta applies to (tag or @digest)")
    p.add_argument("new", help="the image the delta rebuilds (tag or @digest)")
    p.add_argument("output", help="path of the oci-archive to write")
    p.add_argument("--format", choices=("v1", "v2"), default=None,
                   help="tar-diff format: v1 (default, readable everywhere) or v2 (zstd "
                        "dictionary frames)")
    p.add_argument("--concurrency", type=positive, metavar="N",
                   help="layers encoded at once (1 to 64)")
    p.add_argument("--name", dest="ref_name", metavar="NAME",
                   help="org.opencontainers.image.ref.name of the index entry")
    p.set_defaults(func=cmd_create_delta)

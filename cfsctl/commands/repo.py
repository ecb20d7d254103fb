"""Repository commands: init, cat, fsck, gc, images, image-objects."""

from __future__ import annotations

import argparse
import os
import sys

from cfsctl.client import CallError
from cfsctl.context import CommandError, Context, repo_path
from cfsctl.output import fsck_text, gc_text, print_json, table
from cfsctl.paths import Passed

R = "org.composefs.Repository."


def cmd_init(ctx: Context, a: argparse.Namespace) -> int:
    """Create (or verify) a repository."""
    path = os.path.abspath(a.path) if a.path else repo_path(ctx.args)
    version = a.erofs_version if a.erofs_version is not None else ctx.args.erofs_version
    with Passed() as passed:
        index = passed.directory(path, create=True, mode=0o700, what="repository")
        if a.ensure:
            status = ctx.client.call(R + "EnsureRepository", {
                "path": path, "path_fd": index, "algorithm": a.algorithm,
                "insecure": a.insecure or ctx.args.insecure or None}, fds=passed.fds)["status"]
        else:
            reply = ctx.client.call(R + "InitRepository", {
                "path": path, "path_fd": index, "algorithm": a.algorithm,
                "insecure": a.insecure or ctx.args.insecure or None,
                "erofs_version": version, "reset_metadata": a.reset_metadata or None},
                fds=passed.fds)
    if a.ensure:
        if status == "Opened":
            print(f"Repository already initialized at {path} (existing configuration preserved)")
        elif status == "Upgraded":
            print(f"Upgraded legacy repository at {path}")
        else:
            print(f"Initialized composefs repository at {path}")
        return 0
    if not reply["created"]:
        print(f"Repository already initialized at {path}")
        return 0
    print(f"Initialized composefs repository at {path}")
    print(f"  algorithm: {reply.get('algorithm') or a.algorithm}")
    if reply.get("verity"):
        print("  verity:    required")
    elif a.insecure or ctx.args.insecure:
        print("  verity:    not required (insecure)")
    else:
        print("  verity:    not required (insecure: the filesystem does not support fs-verity)")
    return 0


def cmd_cat(ctx: Context, a: argparse.Namespace) -> int:
    """Reassemble a splitstream to stdout."""
    sys.stdout.flush()
    ctx.client.call(R + "Cat", {"handle": ctx.handle, "name": a.name}, fds=[1])
    return 0


def cmd_fsck(ctx: Context, a: argparse.Namespace) -> int:
    """Check repository integrity."""
    reply = ctx.call(R + "Fsck", handle=ctx.handle, metadata_only=a.metadata_only or None)
    if a.json or ctx.args.json:
        print_json(reply)
        return 0
    print(fsck_text(reply))
    if not reply["ok"]:
        raise CommandError("repository integrity check failed")
    return 0


def cmd_gc(ctx: Context, a: argparse.Namespace) -> int:
    """Garbage-collect unreferenced objects."""
    reply = ctx.call(R + "Gc", handle=ctx.handle, dry_run=a.dry_run, roots=a.root or [])
    if ctx.args.json:
        print_json(reply)
    else:
        print(gc_text(reply["result"], reply["dry_run"]))
    return 0


def cmd_images(ctx: Context, a: argparse.Namespace) -> int:
    """List named images."""
    reply = ctx.call(R + "ListImageRefs", handle=ctx.handle)
    if a.json or ctx.args.json:
        print_json(reply)
    elif not reply["images"]:
        print("No images found")
    else:
        rows = [(e["name"], e["digest"] if a.no_trunc else e["digest"][:12])
                for e in reply["images"]]
        print(table(["NAME", "DIGEST"], rows))
    return 0


def cmd_image_objects(ctx: Context, a: argparse.Namespace) -> int:
    """Objects referenced by an image."""
    try:
        reply = ctx.call(R + "ImageObjects", handle=ctx.handle, name=a.name)
    except CallError as e:
        if e.short == "NoSuchRef":
            raise CommandError(f"no such image: {a.name}") from None
        raise
    for oid in reply["object_ids"]:
        print(oid)
    return 0


def cmd_mount(ctx: Context, a: argparse.Namespace) -> int:
    """Mount a stored composefs image (root only)."""
    from cfsctl.mounting import attach
    if bool(a.upperdir) != bool(a.workdir):
        raise CommandError("--upperdir and --workdir require each other")
    if a.read_write and not a.upperdir:
        raise CommandError("--read-write requires --upperdir")
    fds_in = []
    try:
        if a.upperdir:
            for d in (a.upperdir, a.workdir):
                fds_in.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY))
        options = {"overlay": bool(a.upperdir) or None, "read_write": a.read_write or None}
        for reply, fds in ctx.client.stream(R + "Mount", {
                "handle": ctx.handle, "name": a.name, "options": options}, fds=fds_in,
                more=False):
            try:
                attach(fds[reply["fd_index"]], os.path.abspath(a.mountpoint))
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        for fd in fds_in:
            os.close(fd)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the repository commands."""
    p = sub.add_parser("init", help="create or verify a repository")
    p.add_argument("path", nargs="?")
    p.add_argument("--algorithm", default="fsverity-sha512-12")
    # default=SUPPRESS: absent here, the global option of the same name stays in force
    p.add_argument("--insecure", action="store_true", default=argparse.SUPPRESS,
                   help="create the repository without fs-verity (needed where the "
                        "filesystem lacks it)")
    p.add_argument("--reset-metadata", action="store_true")
    p.add_argument("--ensure", action="store_true")
    p.add_argument("--erofs-version", type=int, choices=(0, 1, 2), default=argparse.SUPPRESS,
                   help="default EROFS format version of the repository (0, 1 or 2)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("cat", help="reassemble a splitstream to stdout")
    p.add_argument("name")
    p.set_defaults(func=cmd_cat)

    p = sub.add_parser("fsck", help="check repository integrity")
    p.add_argument("--json", action="store_true")
    p.add_argument("--metadata-only", action="store_true")
    p.set_defaults(func=cmd_fsck)

    p = sub.add_parser("gc", help="garbage-collect unreferenced objects")
    p.add_argument("-r", "--root", action="append")
    p.add_argument("-n", "--dry-run", action="store_true")
    p.set_defaults(func=cmd_gc)

    for name in ("images", "list-images"):
        p = sub.add_parser(name, help="list named images")
        p.add_argument("--json", action="store_true")
        p.add_argument("--no-trunc", action="store_true")
        p.set_defaults(func=cmd_images)

    p = sub.add_parser("mount", help="mount a composefs image (root only)")
    p.add_argument("name")
    p.add_argument("mountpoint")
    p.add_argument("--upperdir")
    p.add_argument("--workdir")
    p.add_argument("--read-write", action="store_true")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("image-objects", help="objects referenced by an image")
    p.add_argument("name")
    p.set_defaults(func=cmd_image_objects)

"""Repository commands: init, cat, fsck, gc, images, image-objects, mount."""

from __future__ import annotations

import argparse
import os
import sys

from cfsctl.client import CallError
from cfsctl.context import CommandError, Context, UsageError, repo_path
from cfsctl.options import Recorder, algorithm, command
from cfsctl.output import emit, fsck_text, gc_text, print_result, table
from cfsctl.paths import Passed
from cfsctl.progress import busy

R = "org.composefs.Repository."
OCI = "org.composefs.Oci."
_STATUS = {"Opened": "existing", "Created": "created", "Upgraded": "upgraded"}


def _init_target(ctx: Context, a: argparse.Namespace) -> str:
    """The repository init works on: PATH or the global selection, not two different ones."""
    if a.path is None:
        return repo_path(ctx.args)
    path = os.path.abspath(a.path)
    if ctx.args.repo is not None and os.path.abspath(ctx.args.repo) != path:
        raise UsageError(f"--repo {ctx.args.repo} and PATH {a.path} name different "
                         "repositories; give one of them")
    if ctx.args.user or ctx.args.system:
        raise UsageError("PATH cannot be combined with --user or --system")
    return path


def _init_algorithm(ctx: Context, a: argparse.Namespace) -> str:
    """--algorithm, or the one --hash names (they must agree)."""
    from_hash = f"fsverity-{ctx.args.hash}-12" if ctx.args.hash else None
    if a.algorithm and from_hash and a.algorithm != from_hash:
        raise UsageError(f"--algorithm {a.algorithm} and --hash {ctx.args.hash} "
                         "disagree")
    return a.algorithm or from_hash or "fsverity-sha512-12"


def cmd_init(ctx: Context, a: argparse.Namespace) -> int:
    """Create (or verify) a repository."""
    path = _init_target(ctx, a)
    alg = _init_algorithm(ctx, a)
    ctx.subject = path
    insecure = ctx.args.insecure or None
    with Passed() as passed:
        index = passed.directory(path, create=True, mode=0o700, what="repository")
        if a.ensure:
            if ctx.args.erofs_version is not None or a.reset_metadata:
                raise UsageError("--ensure never changes a configuration: it takes "
                                 "neither --erofs-version nor --reset-metadata")
            status = ctx.client.call(R + "EnsureRepository", {
                "path": path, "path_fd": index, "algorithm": alg,
                "insecure": insecure}, fds=passed.fds)["status"]
            reply = {"created": status != "Opened", "algorithm": None, "verity": None}
        else:
            reply = ctx.client.call(R + "InitRepository", {
                "path": path, "path_fd": index, "algorithm": alg, "insecure": insecure,
                "erofs_version": ctx.args.erofs_version,
                "reset_metadata": a.reset_metadata or None}, fds=passed.fds)
            status = "Created" if reply["created"] else "Opened"
    if ctx.json:
        print_result(ctx, {
            "path": path, "created": reply["created"], "status": _STATUS[status],
            "algorithm": reply.get("algorithm") or (alg if reply["created"] else None),
            "verity": reply.get("verity")})
        return 0
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
    print(f"  algorithm: {reply.get('algorithm') or alg}")
    if reply.get("verity"):
        print("  verity:    required")
    elif insecure:
        print("  verity:    not required (insecure)")
    else:
        print("  verity:    not required (insecure: the filesystem does not support fs-verity)")
    return 0


def cmd_cat(ctx: Context, a: argparse.Namespace) -> int:
    """Reassemble a splitstream to stdout (with --json: only its size)."""
    ctx.subject = a.name
    ctx.ref_kind = "stream"
    if ctx.json:
        fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            reply = ctx.client.call(R + "Cat", {"handle": ctx.handle, "name": a.name},
                                    fds=[fd])
        finally:
            os.close(fd)
        print_result(ctx, {"name": a.name, "size": reply["size"]})
        return 0
    sys.stdout.flush()
    ctx.client.call(R + "Cat", {"handle": ctx.handle, "name": a.name}, fds=[1])
    return 0


def cmd_fsck(ctx: Context, a: argparse.Namespace) -> int:
    """Check repository integrity."""
    with busy(ctx, "fsck"):
        reply = ctx.call(R + "Fsck", handle=ctx.handle, metadata_only=a.metadata_only or None)
    if ctx.json:
        print_result(ctx, reply)
        return 0
    print(fsck_text(reply))
    if not reply["ok"]:
        raise CommandError("repository integrity check failed")
    return 0


def _root_exists(ctx: Context, root: str) -> bool:
    """Whether the gc root *root* names an image or a stream of the repository."""
    try:
        ctx.call(R + "ImageObjects", handle=ctx.handle, name=root)
        return True
    except CallError:
        pass
    if root.startswith("oci-layer-"):
        try:
            return bool(ctx.call(OCI + "HasLayer", handle=ctx.handle,
                                 diff_id=root.removeprefix("oci-layer-"))["present"])
        except CallError:
            return False
    fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        ctx.client.call(R + "Cat", {"handle": ctx.handle, "name": root}, fds=[fd])
        return True
    except CallError:
        return False
    finally:
        os.close(fd)


def cmd_gc(ctx: Context, a: argparse.Namespace) -> int:
    """Garbage-collect unreferenced objects."""
    roots = a.root or []
    for root in roots:
        if "/" in root or not root:
            raise UsageError(f"--root {root!r}: a root is an image id or a stream name "
                             "(a name directly in images/ or streams/)")
        if not _root_exists(ctx, root):
            raise CommandError(f"gc: --root {root}: no image or stream of that name",
                               f"image ids: {ctx.cli('images')}; stream names: "
                               "oci-layer-<diff_id>, oci-config-<digest>, ...")
    with busy(ctx, "gc"):
        reply = ctx.call(R + "Gc", handle=ctx.handle, dry_run=a.dry_run, roots=roots)
    emit(ctx, reply, gc_text(reply["result"], reply["dry_run"]))
    return 0


def cmd_images(ctx: Context, a: argparse.Namespace) -> int:
    """List named composefs images."""
    reply = ctx.call(R + "ListImageRefs", handle=ctx.handle)
    if a.filter:
        reply["images"] = [e for e in reply["images"] if a.filter in e["name"]]
    if ctx.json:
        print_result(ctx, reply)
    elif not reply["images"]:
        print("No images found")
        oci_images = ctx.call(OCI + "ListImages", handle=ctx.handle)["images"]
        if oci_images and not a.filter:
            n = len(oci_images)
            print(f"({n} OCI image{'s' if n != 1 else ''}: {ctx.cli('oci', 'images')})")
    else:
        rows = [(e["name"], e["digest"] if a.no_trunc else e["digest"][:12])
                for e in reply["images"]]
        print(table(["NAME", "DIGEST"], rows))
    return 0


def cmd_image_objects(ctx: Context, a: argparse.Namespace) -> int:
    """Objects referenced by an image."""
    ctx.subject = a.name
    reply = ctx.call(R + "ImageObjects", handle=ctx.handle, name=a.name)
    if ctx.json:
        print_result(ctx, reply)
        return 0
    out = sys.stdout
    for oid in reply["object_ids"]:
        out.write(oid + "\n")
    return 0


def cmd_mount(ctx: Context, a: argparse.Namespace) -> int:
    """Mount a stored composefs image (root only)."""
    from cfsctl.mounting import attach
    ctx.subject = a.name
    if bool(a.upperdir) != bool(a.workdir):
        raise UsageError("--upperdir and --workdir require each other")
    if a.read_write and not a.upperdir:
        raise UsageError("--read-write requires --upperdir")
    target = os.path.abspath(a.mountpoint)
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
                attach(fds[reply["fd_index"]], target)
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        for fd in fds_in:
            os.close(fd)
    emit(ctx, {"image": a.name, "mountpoint": target}, None)
    return 0


def register(sub: argparse._SubParsersAction, rec: Recorder) -> None:  # type: ignore[type-arg]
    """Add the repository commands."""
    p = command(sub, rec, "init", "create or verify a repository",
                description="Create a repository (sha512 and EROFS V1 unless --hash / "
                            "--algorithm and --erofs-version say otherwise), or check that "
                            "the existing one has this configuration.")
    p.add_argument("path", nargs="?", metavar="PATH",
                   help="the repository directory (default: the one --repo, --user or "
                        "--system selects; giving both is an error unless they agree)")
    p.add_argument("--algorithm", type=algorithm, metavar="ALG",
                   help="fs-verity algorithm: sha256 or sha512 (also spelled "
                        "fsverity-sha256-12 / fsverity-sha512-12); default sha512, or --hash's")
    p.add_argument("--reset-metadata", action="store_true",
                   help="first delete streams/, images/ and meta.json (objects/ are kept)")
    p.add_argument("--ensure", action="store_true",
                   help="open, create or upgrade the repository, never changing an existing "
                        "configuration")
    p.set_defaults(func=cmd_init)

    p = command(sub, rec, "cat", "reassemble a stored stream to stdout",
                description="Write the splitstream NAME, reassembled, to stdout (with --json "
                            "only its size).")
    p.add_argument("name", metavar="NAME",
                   help="stream name (e.g. oci-layer-sha256:...) or refs/NAME")
    p.set_defaults(func=cmd_cat)

    p = command(sub, rec, "fsck", "check repository integrity")
    p.add_argument("--metadata-only", action="store_true",
                   help="check meta.json, links and streams, not every object's content")
    p.set_defaults(func=cmd_fsck)

    p = command(sub, rec, "gc", "garbage-collect unreferenced objects",
                description="Remove objects, streams and images nothing refers to (tags, "
                            "image refs and the --root names are kept, with everything they "
                            "reference).")
    p.add_argument("-r", "--root", action="append", metavar="NAME",
                   help="also keep this image id or stream name (repeatable); it must exist")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="only report what would be removed")
    p.set_defaults(func=cmd_gc)

    for name in ("images", "list-images"):
        p = command(sub, rec, name, "list named composefs images (images/refs)"
                    if name == "images" else "the same as images",
                    description="List the composefs images named in images/refs (OCI "
                                "images: cfsctl oci images).")
        p.add_argument("--no-trunc", action="store_true", help="show whole image ids")
        p.add_argument("--filter", metavar="TEXT",
                       help="only names containing TEXT")
        p.set_defaults(func=cmd_images)

    p = command(sub, rec, "mount", "mount a composefs image (root only)")
    p.add_argument("name", metavar="IMAGE", help="image id or refs/NAME")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="where to attach it")
    p.add_argument("--upperdir", metavar="DIR",
                   help="overlayfs upper directory (with --workdir)")
    p.add_argument("--workdir", metavar="DIR", help="overlayfs work directory")
    p.add_argument("--read-write", action="store_true",
                   help="a writable overlay (needs --upperdir)")
    p.set_defaults(func=cmd_mount)

    p = command(sub, rec, "image-objects", "objects referenced by an image")
    p.add_argument("name", metavar="IMAGE", help="image id or refs/NAME")
    p.set_defaults(func=cmd_image_objects)

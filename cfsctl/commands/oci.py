"""``cfsctl oci …`` commands."""

from __future__ import annotations

import argparse
import json
import os
import sys

from cfsctl.client import CallError
from cfsctl.commands import delta
from cfsctl.context import CommandError, Context, UsageError, open_repository_dir
from cfsctl.output import fsck_text, print_completed, print_json, table
from cfsctl.paths import Passed
from cfsctl.progress import stream_with_progress

OCI = "org.composefs.Oci."
REPO = "org.composefs.Repository."


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _no_such_image(e: CallError, name: str) -> CommandError:
    return CommandError(f"no such image: {name}") if e.short == "NoSuchImage" else e  # type: ignore[return-value]


def cmd_import_layer(ctx: Context, a: argparse.Namespace) -> int:
    """Import an uncompressed layer tar from stdin; print its verity."""
    reply = ctx.client.call(OCI + "ImportLayer",
                            {"handle": ctx.handle, "digest": a.digest, "name": a.name},
                            fds=[0])
    print(f"{ctx.hash_algorithm}:{reply['verity']}")
    return 0


def cmd_pull(ctx: Context, a: argparse.Namespace) -> int:
    """Pull an image from a layout, an archive or a registry."""
    if a.expected_digest and not a.bootable:
        raise UsageError("--expected-digest requires --bootable")
    params = {"handle": ctx.handle, "image": a.image, "name": a.name or a.image,
              "local_fetch": a.local_fetch, "bootable": a.bootable,
              "expected_digest": a.expected_digest, "platform": a.platform,
              "tls_verify": a.tls_verify, "credentials": a.creds,
              "concurrency": a.concurrency}
    with Passed() as passed:
        passed.transport_path(a.image, params, "image_fd")
        passed.auth_file(a.image, a.authfile, a.creds, params)
        completed = stream_with_progress(ctx.client, OCI + "Pull", params, "completed",
                                         a.quiet or ctx.args.json, passed.fds)
    if completed is None:
        raise CommandError("pull finished without a result")
    print_completed(completed, a.name or a.image, ctx.args.json)
    return 0


def cmd_images(ctx: Context, a: argparse.Namespace) -> int:
    """Table of tagged images."""
    reply = ctx.call(OCI + "ListImages", handle=ctx.handle, filter=a.filter)
    if a.json or ctx.args.json:
        print_json(reply)
    elif not reply["images"]:
        print("No images found")
    else:
        rows = []
        for img in reply["images"]:
            digest = img["manifest_digest"].removeprefix("sha256:")[:12]
            rows.append((img["name"], digest, img["architecture"] or "artifact",
                         str(img["layer_count"]), str(img["referrer_count"])))
        print(table(["NAME", "DIGEST", "ARCH", "LAYERS", "REFS"], rows))
    return 0


def cmd_inspect(ctx: Context, a: argparse.Namespace) -> int:
    """Manifest, config and composefs image of a stored image."""
    try:
        reply = ctx.call(OCI + "Inspect", handle=ctx.handle, image=a.image)
    except CallError as e:
        raise _no_such_image(e, a.image) from None
    if a.manifest:
        sys.stdout.write(reply["manifest"] + "\n")
    elif a.config:
        sys.stdout.write(reply["config"] + "\n")
    else:       # the varlink reply as upstream prints it: raw JSON as strings, nulls kept
        print_json({"manifest": reply["manifest"], "config": reply["config"],
                    "referrers": reply.get("referrers") or [],
                    "composefs_erofs": reply.get("composefs_erofs"),
                    "composefs_boot_erofs": reply.get("composefs_boot_erofs")})
    return 0


_CONTAINER_CONFIGS = ("application/vnd.oci.image.config.v1+json",
                      "application/vnd.docker.container.image.v1+json")


def cmd_copy(ctx: Context, a: argparse.Namespace) -> int:
    """Copy an image and its layers from the repository at --from into this one."""
    dest = ctx.handle
    client = ctx.client
    src_path = os.path.abspath(a.source)
    fd = open_repository_dir(src_path)
    try:
        src = client.call(REPO + "OpenRepository", {
            "path": src_path, "path_fd": 0, "insecure": ctx.args.insecure or None},
            fds=[fd])["handle"]
    finally:
        os.close(fd)
    try:
        try:
            info = client.call(OCI + "Inspect", {"handle": src, "image": a.image})
        except CallError as e:
            raise _no_such_image(e, a.image) from None
        manifest = json.loads(info["manifest"])
        if manifest.get("config", {}).get("mediaType") in _CONTAINER_CONFIGS:
            ids = json.loads(info["config"])["rootfs"]["diff_ids"]
        else:
            raise CommandError("oci copy supports container images only (this is an "
                               "artifact)")
        refs = []
        copied = present = linked = objects = 0
        for diff_id in ids:
            has = client.call(OCI + "HasLayer", {"handle": dest, "diff_id": diff_id})
            if has["present"]:
                refs.append({"diff_id": diff_id, "layer_verity": has["layer_verity"]})
                present += 1
                continue
            frames = client.stream(OCI + "GetLayer", {"handle": src,
                                                      "params": {"diff_id": diff_id}},
                                   more=False)
            reply, fds = next(frames)
            try:
                put = client.call(OCI + "PutLayer",
                                  {"handle": dest, "diff_id": diff_id, "zerocopy": a.zerocopy},
                                  fds=fds[:1 + reply["dir_count"]])
            finally:
                for f in fds:
                    os.close(f)
            refs.append({"diff_id": diff_id, "layer_verity": put["layer_verity"]})
            copied += 1
            linked += put["objects_hardlinked"] + put["objects_reflinked"]
            objects += put["objects_copied"]
        name = a.name if a.name is not None else (None if a.image.startswith("@") else a.image)
        done = client.call(OCI + "FinalizeImage", {
            "handle": dest, "manifest_json": info["manifest"], "config_json": info["config"],
            "layers": refs, "name": name})
    finally:
        client.call(REPO + "CloseRepository", {"handle": src})
    print(f"manifest {done['manifest_digest']}")
    print(f"layers {copied} copied, {present} already present")
    print(f"objects {objects} copied, {linked} linked")
    if name is not None:
        print(f"tagged {name}")
    return 0


def cmd_tag(ctx: Context, a: argparse.Namespace) -> int:
    """Tag a manifest digest."""
    ctx.call(OCI + "Tag", handle=ctx.handle, manifest_digest=a.digest, name=a.name)
    print(f"Tagged {a.digest} as {a.name}")
    return 0


def cmd_untag(ctx: Context, a: argparse.Namespace) -> int:
    """Remove a tag."""
    try:
        ctx.call(OCI + "Untag", handle=ctx.handle, name=a.name)
    except CallError as e:
        raise _no_such_image(e, a.name) from None
    print(f"Removed tag {a.name}")
    return 0


def cmd_layer(ctx: Context, a: argparse.Namespace) -> int:
    """The exact layer tar to stdout (or its entries as a dumpfile, or facts as JSON)."""
    if a.json:
        info = ctx.call(OCI + "LayerInfo", handle=ctx.handle, diff_id=a.diff_id)
        split = info["splitstream"]
        print_json({"diffId": info["diff_id"], "verity": info["verity"], "size": info["size"],
                    "entryCount": info["entry_count"],
                    "splitstream": {"externalObjects": split["external_objects"],
                                    "externalSize": split["external_size"],
                                    "inlineSize": split["inline_size"]}})
        return 0
    if a.dumpfile:
        sys.stdout.flush()
        ctx.client.call(OCI + "LayerDump", {"handle": ctx.handle, "diff_id": a.diff_id},
                        fds=[1])
        return 0
    if os.isatty(1):
        raise CommandError("Refusing to write tar data to terminal; redirect stdout")
    sys.stdout.flush()
    try:
        ctx.client.call(REPO + "Cat", {"handle": ctx.handle, "name": f"oci-layer-{a.diff_id}"},
                        fds=[1])
    except CallError as e:
        if e.short == "NoSuchRef":
            raise CommandError(f"no such layer: {a.diff_id}") from None
        raise
    return 0


XATTRS = {None: None, "allowlist-only": "AllowlistOnly", "keep-user-xattrs": "KeepUserXattrs"}


def cmd_compute_id(ctx: Context, a: argparse.Namespace) -> int:
    """Print the composefs image id (hex) of an image's root filesystem."""
    try:
        reply = ctx.call(OCI + "ComputeId", handle=ctx.handle, image=a.image,
                         verity=a.config_verity, bootable=a.bootable, xattrs=XATTRS[a.xattrs])
    except CallError as e:
        raise _no_such_image(e, a.image) from None
    print(reply["image_id"])
    return 0


def cmd_dump(ctx: Context, a: argparse.Namespace) -> int:
    """An image's root filesystem as a dumpfile."""
    if a.bootable:
        raise CommandError("bootable images are not supported by cfsd")
    sys.stdout.flush()
    try:
        ctx.client.call(OCI + "Dump", {"handle": ctx.handle, "image": a.image,
                                       "xattrs": XATTRS[a.xattrs]}, fds=[1])
    except CallError as e:
        raise _no_such_image(e, a.image) from None
    return 0


def cmd_mount(ctx: Context, a: argparse.Namespace) -> int:
    """Mount an image's composefs at a directory."""
    from cfsctl.mounting import attach
    target = os.path.abspath(a.mountpoint)
    for reply, fds in ctx.client.stream(OCI + "OciMount", {
            "handle": ctx.handle, "image": a.image, "bootable": a.bootable, "options": {}},
            more=False):
        try:
            attach(fds[reply["fd_index"]], target)
        finally:
            for fd in fds:
                os.close(fd)
    return 0


def cmd_checkout(ctx: Context, a: argparse.Namespace) -> int:
    """Write an image's files into a directory."""
    with Passed() as passed:
        index = passed.directory(a.directory, create=True, what="checkout directory")
        reply = ctx.client.call(OCI + "Checkout", {
            "handle": ctx.handle, "image": a.image, "directory": a.directory,
            "directory_fd": index}, fds=passed.fds)
    for s in reply["skipped"]:
        print(f"skipped {s}", file=sys.stderr)
    print(f"Checked out {reply['entries']} entries to {a.directory}")
    return 0


def cmd_fsck(ctx: Context, a: argparse.Namespace) -> int:
    """OCI-aware integrity check."""
    try:
        reply = ctx.call(OCI + "Check", handle=ctx.handle, image=a.image)
    except CallError as e:
        raise _no_such_image(e, a.image or "") from None
    if a.json or ctx.args.json:
        print_json(reply)
        return 0
    text = fsck_text(reply["repo"])
    ok = reply["images_checked"] - reply["images_corrupted"]
    text += f"\noci images: {ok}/{reply['images_checked']} ok"
    if reply["errors"]:
        text += f"\noci errors: {len(reply['errors'])}"
        text += "".join(f"\n  - {e}" for e in reply["errors"])
    print(text)
    if not reply["ok"]:
        raise CommandError("OCI integrity check failed")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``oci`` and its subcommands."""
    oci = sub.add_parser("oci", help="OCI images")
    osub = oci.add_subparsers(dest="oci_command", required=True, metavar="COMMAND")

    p = osub.add_parser("import-layer", help="import an uncompressed tar from stdin")
    p.add_argument("digest")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_import_layer)

    p = osub.add_parser("pull", help="pull from oci:, oci-archive: or docker://")
    p.add_argument("image")
    p.add_argument("name", nargs="?")
    p.add_argument("--bootable", action="store_true")
    p.add_argument("--expected-digest")
    p.add_argument("--local-fetch", default="disabled", choices=("disabled", "auto",
                                                                 "zerocopy"))
    p.add_argument("--platform", help="os/arch[/variant] to pick from an index")
    p.add_argument("--tls-verify", type=_bool, default=None, metavar="BOOL")
    p.add_argument("--creds", metavar="USER:PASSWORD")
    p.add_argument("--authfile", metavar="PATH")
    p.add_argument("--concurrency", type=int)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_pull)

    p = osub.add_parser("images", help="table of tagged images")
    p.add_argument("--json", action="store_true")
    p.add_argument("--filter")
    p.set_defaults(func=cmd_images)

    p = osub.add_parser("inspect", help="manifest and config of an image")
    p.add_argument("image")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--manifest", action="store_true")
    g.add_argument("--config", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = osub.add_parser("copy", help="copy an image and its layers from another repository")
    p.add_argument("image", help="tag or @manifest-digest in the source repository")
    p.add_argument("--from", dest="source", required=True, metavar="PATH",
                   help="the source repository")
    p.add_argument("--name", help="tag in this repository (default: the source tag)")
    p.add_argument("--zerocopy", action="store_true",
                   help="ask for reflinks or hardlinks instead of copies")
    p.set_defaults(func=cmd_copy)

    p = osub.add_parser("tag", help="tag a manifest digest")
    p.add_argument("digest")
    p.add_argument("name")
    p.set_defaults(func=cmd_tag)

    p = osub.add_parser("untag", help="remove a tag")
    p.add_argument("name")
    p.set_defaults(func=cmd_untag)

    p = osub.add_parser("layer", help="write a layer tar to stdout")
    p.add_argument("diff_id")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dumpfile", action="store_true", help="entries as dumpfile lines")
    g.add_argument("--json", action="store_true", help="layer facts as JSON")
    p.set_defaults(func=cmd_layer)

    p = osub.add_parser("compute-id", help="composefs image id of an image's rootfs")
    p.add_argument("image")
    p.add_argument("config_verity", nargs="?")
    p.add_argument("--bootable", action="store_true")
    p.add_argument("--xattrs", choices=("allowlist-only", "keep-user-xattrs"))
    p.set_defaults(func=cmd_compute_id)

    p = osub.add_parser("dump", help="an image's rootfs as a composefs dumpfile")
    p.add_argument("image")
    p.add_argument("config_verity", nargs="?")
    p.add_argument("--bootable", action="store_true")
    p.add_argument("--xattrs", choices=("allowlist-only", "keep-user-xattrs"))
    p.set_defaults(func=cmd_dump)

    p = osub.add_parser("mount", help="mount an image (root only)")
    p.add_argument("image")
    p.add_argument("mountpoint")
    p.add_argument("--bootable", action="store_true")
    p.set_defaults(func=cmd_mount)

    p = osub.add_parser("checkout", help="materialize an image into a directory")
    p.add_argument("image")
    p.add_argument("directory")
    p.set_defaults(func=cmd_checkout)

    p = osub.add_parser("fsck", help="OCI-aware integrity check")
    p.add_argument("image", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fsck)

    delta.register(osub)

"""``cfsctl oci …`` commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from cfsctl.client import CallError
from cfsctl.commands import delta
from cfsctl.commands.image import refuse_bootable
from cfsctl.context import CommandError, Context, UsageError, open_repository_dir
from cfsctl.options import Recorder, boolean, command, hidden, platform, positive
from cfsctl.output import (
    Capture,
    emit,
    fsck_text,
    parse_stats,
    print_completed,
    print_result,
    table,
)
from cfsctl.paths import Passed
from cfsctl.progress import busy, stream_with_progress

OCI = "org.composefs.Oci."
REPO = "org.composefs.Repository."


def cmd_import_layer(ctx: Context, a: argparse.Namespace) -> int:
    """Import an uncompressed layer tar from stdin; print its verity."""
    ctx.subject = "import-layer"
    reply = ctx.client.call(OCI + "ImportLayer",
                            {"handle": ctx.handle, "digest": a.digest, "name": a.name},
                            fds=[0])
    verity = f"{ctx.hash_algorithm}:{reply['verity']}"
    emit(ctx, {"diff_id": a.digest, "verity": verity,
               "already_present": reply["already_present"],
               "stats": parse_stats(reply["stats"])}, verity)
    return 0


def cmd_pull(ctx: Context, a: argparse.Namespace) -> int:
    """Pull an image from a layout, an archive or a registry."""
    refuse_bootable(a)
    if a.expected_digest:
        raise CommandError("--expected-digest: it checks boot images, which cfsd does not "
                           "make")
    if a.local_fetch not in (None, "disabled"):
        raise CommandError(f"--local-fetch {a.local_fetch}: needs containers-storage, which "
                           "cfsd does not support")
    ctx.subject = a.image
    params = {"handle": ctx.handle, "image": a.image, "name": a.name or a.image,
              "local_fetch": "disabled", "bootable": False, "platform": a.platform,
              "tls_verify": a.tls_verify, "credentials": a.creds,
              "concurrency": a.concurrency}
    with Passed() as passed:
        passed.transport_path(a.image, params, "image_fd")
        passed.auth_file(a.image, a.authfile, a.creds, params)
        completed = stream_with_progress(ctx, OCI + "Pull", params, "completed", "pull",
                                         passed.fds)
    if completed is None:
        raise CommandError("pull finished without a result")
    print_completed(ctx, completed, a.name or a.image)
    return 0


def cmd_images(ctx: Context, a: argparse.Namespace) -> int:
    """Table of tagged images."""
    reply = ctx.call(OCI + "ListImages", handle=ctx.handle, filter=a.filter)
    if a.filter:            # a substring of the name, whatever the daemon's version does
        reply["images"] = [i for i in reply["images"] if a.filter in i["name"]]
    if ctx.json:
        print_result(ctx, reply)
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
    ctx.subject = a.image
    reply = ctx.call(OCI + "Inspect", handle=ctx.handle, image=a.image)
    if a.manifest:
        sys.stdout.write(reply["manifest"] + "\n")
    elif a.config:
        sys.stdout.write(reply["config"] + "\n")
    else:       # the varlink reply as upstream prints it: raw JSON as strings, nulls kept
        print_result(ctx, {"manifest": reply["manifest"], "config": reply["config"],
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
    ctx.subject = a.image
    src_path = os.path.abspath(a.source)
    fd = open_repository_dir(src_path)
    try:
        src = client.call(REPO + "OpenRepository", {
            "path": src_path, "path_fd": 0, "insecure": ctx.args.insecure or None},
            fds=[fd])["handle"]
    finally:
        os.close(fd)
    try:
        info = client.call(OCI + "Inspect", {"handle": src, "image": a.image})
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
    if ctx.json:
        print_result(ctx, {"manifest_digest": done["manifest_digest"], "tag": name,
                           "layers_copied": copied, "layers_present": present,
                           "objects_copied": objects, "objects_linked": linked})
        return 0
    print(f"manifest {done['manifest_digest']}")
    print(f"layers {copied} copied, {present} already present")
    print(f"objects {objects} copied, {linked} linked")
    if name is not None:
        print(f"tagged {name}")
    return 0


def cmd_tag(ctx: Context, a: argparse.Namespace) -> int:
    """Tag a manifest digest."""
    ctx.subject = a.digest
    ctx.call(OCI + "Tag", handle=ctx.handle, manifest_digest=a.digest, name=a.name)
    emit(ctx, {"manifest_digest": a.digest, "name": a.name},
         f"Tagged {a.digest} as {a.name}")
    return 0


def cmd_untag(ctx: Context, a: argparse.Namespace) -> int:
    """Remove a tag."""
    ctx.subject = a.name
    ctx.call(OCI + "Untag", handle=ctx.handle, name=a.name)
    emit(ctx, {"name": a.name}, f"Removed tag {a.name}")
    return 0


def _diff_id_of(ctx: Context, digest: str) -> str | None:
    """The diff_id of the layer whose compressed blob is *digest* in a tagged image."""
    for img in ctx.call(OCI + "ListImages", handle=ctx.handle)["images"]:
        if not img["is_container"]:
            continue
        info = ctx.call(OCI + "Inspect", handle=ctx.handle, image=img["name"])
        layers = json.loads(info["manifest"]).get("layers") or []
        ids = json.loads(info["config"]).get("rootfs", {}).get("diff_ids") or []
        for layer, diff_id in zip(layers, ids, strict=False):
            if layer.get("digest") == digest:
                return str(diff_id)
    return None


def _layer_call(ctx: Context, a: argparse.Namespace, call: Any) -> Any:
    """*call(diff_id)*; a manifest layer digest is taken for the diff_id of its layer."""
    try:
        return call(a.diff_id)
    except CallError as e:
        if e.short not in ("NoSuchLayer", "NoSuchRef"):
            raise
        diff_id = _diff_id_of(ctx, a.diff_id)
        if diff_id is None or diff_id == a.diff_id:
            raise CommandError(f"no such layer: {a.diff_id}",
                               "give a diff_id, as listed by cfsctl oci inspect --config "
                               "IMAGE, or a layer digest of a tagged image's manifest") from None
        return call(diff_id)


def cmd_layer(ctx: Context, a: argparse.Namespace) -> int:
    """The exact layer tar to stdout (or its entries as a dumpfile, or facts as JSON)."""
    if a.dumpfile and ctx.json:
        raise UsageError("--dumpfile and --json exclude each other")
    if ctx.json:
        info = _layer_call(ctx, a, lambda d: ctx.call(OCI + "LayerInfo", handle=ctx.handle,
                                                      diff_id=d))
        split = info["splitstream"]
        print_result(ctx, {"diffId": info["diff_id"], "verity": info["verity"],
                           "size": info["size"], "entryCount": info["entry_count"],
                           "splitstream": {"externalObjects": split["external_objects"],
                                           "externalSize": split["external_size"],
                                           "inlineSize": split["inline_size"]}})
        return 0
    if a.dumpfile:
        sys.stdout.flush()
        _layer_call(ctx, a, lambda d: ctx.client.call(
            OCI + "LayerDump", {"handle": ctx.handle, "diff_id": d}, fds=[1]))
        return 0
    if os.isatty(1):
        raise CommandError("oci layer: refusing to write tar data to a terminal",
                           "redirect stdout, or use --dumpfile or --json")
    sys.stdout.flush()
    _layer_call(ctx, a, lambda d: ctx.client.call(
        REPO + "Cat", {"handle": ctx.handle, "name": f"oci-layer-{d}"}, fds=[1]))
    return 0


XATTRS = {None: None, "allowlist-only": "AllowlistOnly", "keep-user-xattrs": "KeepUserXattrs"}


def cmd_compute_id(ctx: Context, a: argparse.Namespace) -> int:
    """Print the composefs image id (hex) of an image's root filesystem."""
    refuse_bootable(a)
    ctx.subject = a.image
    reply = ctx.call(OCI + "ComputeId", handle=ctx.handle, image=a.image,
                     verity=a.config_verity, bootable=False, xattrs=XATTRS[a.xattrs])
    emit(ctx, reply, reply["image_id"])
    return 0


def cmd_dump(ctx: Context, a: argparse.Namespace) -> int:
    """An image's root filesystem as a dumpfile (with --json: its lines as a JSON list)."""
    refuse_bootable(a)
    ctx.subject = a.image
    capture = Capture() if ctx.json else None
    try:
        sys.stdout.flush()
        ctx.client.call(OCI + "Dump", {"handle": ctx.handle, "image": a.image,
                                       "xattrs": XATTRS[a.xattrs]},
                        fds=[capture.write_fd if capture else 1])
        if capture:
            print_result(ctx, {"lines": capture.lines()})
    finally:
        if capture:
            capture.close()
    return 0


def cmd_mount(ctx: Context, a: argparse.Namespace) -> int:
    """Mount an image's composefs at a directory."""
    from cfsctl.mounting import attach
    refuse_bootable(a)
    ctx.subject = a.image
    target = os.path.abspath(a.mountpoint)
    for reply, fds in ctx.client.stream(OCI + "OciMount", {
            "handle": ctx.handle, "image": a.image, "bootable": False, "options": {}},
            more=False):
        try:
            attach(fds[reply["fd_index"]], target)
        finally:
            for fd in fds:
                os.close(fd)
    emit(ctx, {"image": a.image, "mountpoint": target}, None)
    return 0


def cmd_checkout(ctx: Context, a: argparse.Namespace) -> int:
    """Write an image's files into a directory."""
    ctx.subject = a.image
    with Passed() as passed:
        index = passed.directory(a.directory, create=True, what="checkout directory")
        with busy(ctx, f"checkout {a.image}"):
            reply = ctx.client.call(OCI + "Checkout", {
                "handle": ctx.handle, "image": a.image, "directory": a.directory,
                "directory_fd": index}, fds=passed.fds)
    if ctx.json:
        print_result(ctx, {"image": a.image, "directory": os.path.abspath(a.directory),
                           "entries": reply["entries"], "skipped": reply["skipped"]})
        return 0
    for s in reply["skipped"]:
        print(f"skipped {s}", file=sys.stderr)
    print(f"Checked out {reply['entries']} entries to {a.directory}")
    return 0


def cmd_fsck(ctx: Context, a: argparse.Namespace) -> int:
    """OCI-aware integrity check."""
    ctx.subject = a.image
    with busy(ctx, "oci fsck"):
        reply = ctx.call(OCI + "Check", handle=ctx.handle, image=a.image)
    if ctx.json:
        print_result(ctx, reply)
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


TRANSPORTS = "oci:DIR[:TAG|@DIGEST], oci-archive:FILE[:TAG|@DIGEST] or docker://REF"


def add_registry_options(p: argparse.ArgumentParser,
                         concurrency: str = "layers fetched at once (default: up to 4)") -> None:
    """skopeo's options for registries (pull, apply-delta)."""
    p.add_argument("--tls-verify", type=boolean, default=None, metavar="BOOL",
                   help="verify the registry's TLS certificate (default true; false for a "
                        "plain-HTTP or self-signed registry)")
    p.add_argument("--creds", metavar="USER:PASSWORD", help="registry credentials")
    p.add_argument("--authfile", metavar="PATH",
                   help="registry auth file (default: $REGISTRY_AUTH_FILE, the containers "
                        "and docker auth files)")
    p.add_argument("--concurrency", type=positive, metavar="N", help=concurrency)


def _image_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="tag or @manifest-digest")


def register(sub: argparse._SubParsersAction, rec: Recorder) -> None:  # type: ignore[type-arg]
    """Add ``oci`` and its subcommands."""
    oci = command(sub, rec, "oci", "OCI images: pull, list, inspect, check out, mount, "
                  "deltas")
    osub = oci.add_subparsers(dest="oci_command", required=True, metavar="COMMAND")

    p = command(osub, rec, "import-layer", "import an uncompressed layer tar from stdin")
    p.add_argument("digest", metavar="DIFF_ID", help="sha256:... of the tar (its diff_id)")
    p.add_argument("name", nargs="?", metavar="NAME", help="also name it streams/refs/NAME")
    p.set_defaults(func=cmd_import_layer)

    p = command(osub, rec, "pull", "pull an image from oci:, oci-archive: or docker://",
                description=f"Pull IMAGE ({TRANSPORTS}) and tag it NAME.  Every digest and "
                            "diff_id is verified; oci-delta artifacts are applied to the "
                            "image they were made from.")
    p.add_argument("image", metavar="IMAGE", help=TRANSPORTS)
    p.add_argument("name", nargs="?", metavar="NAME", help="tag (default: IMAGE itself)")
    p.add_argument("--platform", type=platform, metavar="OS/ARCH[/VARIANT]",
                   help="the image to take from a multi-platform index (default: this "
                        "machine's, e.g. linux/amd64)")
    add_registry_options(p)
    hidden(p, "--bootable", action="store_true")
    hidden(p, "--expected-digest")
    hidden(p, "--local-fetch", default=None)
    p.set_defaults(func=cmd_pull)

    p = command(osub, rec, "images", "table of tagged images")
    p.add_argument("--filter", metavar="TEXT", help="only tags containing TEXT")
    p.set_defaults(func=cmd_images)

    p = command(osub, rec, "inspect", "manifest and config of an image",
                description="Print the image's manifest, config, referrers and composefs "
                            "image id as JSON (upstream's shape), or only the manifest or "
                            "the config as stored.")
    _image_arg(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--manifest", action="store_true", help="only the manifest, as stored")
    g.add_argument("--config", action="store_true", help="only the config, as stored")
    p.set_defaults(func=cmd_inspect)

    p = command(osub, rec, "copy", "copy an image and its layers from another repository")
    p.add_argument("image", metavar="IMAGE",
                   help="tag or @manifest-digest in the source repository")
    p.add_argument("--from", dest="source", required=True, metavar="PATH",
                   help="the source repository")
    p.add_argument("--name", help="tag in this repository (default: the source tag)")
    p.add_argument("--zerocopy", action="store_true",
                   help="ask for reflinks or hardlinks instead of copies")
    p.set_defaults(func=cmd_copy)

    p = command(osub, rec, "tag", "tag a manifest digest")
    p.add_argument("digest", metavar="DIGEST", help="sha256:... of a stored manifest")
    p.add_argument("name", metavar="NAME", help="the tag")
    p.set_defaults(func=cmd_tag)

    p = command(osub, rec, "untag", "remove a tag")
    p.add_argument("name", metavar="NAME", help="the tag")
    p.set_defaults(func=cmd_untag)

    p = command(osub, rec, "layer", "write a stored layer's tar to stdout",
                description="Write the layer's exact tar to stdout, its entries as dumpfile "
                            "lines (--dumpfile) or facts about it (--json).")
    p.add_argument("diff_id", metavar="LAYER",
                   help="the layer's diff_id, or its blob digest in a tagged image's manifest")
    p.add_argument("--dumpfile", action="store_true", help="entries as dumpfile lines")
    p.set_defaults(func=cmd_layer)

    xattrs = ("which xattrs to keep: allowlist-only (default) or keep-user-xattrs (also "
              "user.*)")
    p = command(osub, rec, "compute-id", "composefs image id of an image's rootfs")
    _image_arg(p)
    p.add_argument("config_verity", nargs="?", metavar="CONFIG_VERITY",
                   help="the config's fs-verity digest it must have")
    hidden(p, "--bootable", action="store_true")
    p.add_argument("--xattrs", choices=("allowlist-only", "keep-user-xattrs"), help=xattrs)
    p.set_defaults(func=cmd_compute_id)

    p = command(osub, rec, "dump", "an image's rootfs as a composefs dumpfile")
    _image_arg(p)
    p.add_argument("config_verity", nargs="?", metavar="CONFIG_VERITY",
                   help="accepted for upstream compatibility (not checked)")
    hidden(p, "--bootable", action="store_true")
    p.add_argument("--xattrs", choices=("allowlist-only", "keep-user-xattrs"), help=xattrs)
    p.set_defaults(func=cmd_dump)

    p = command(osub, rec, "mount", "mount an image (root only)")
    _image_arg(p)
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="where to attach it")
    hidden(p, "--bootable", action="store_true")
    p.set_defaults(func=cmd_mount)

    p = command(osub, rec, "checkout", "materialize an image into a directory")
    _image_arg(p)
    p.add_argument("directory", metavar="DIR", help="an empty (or new) directory")
    p.set_defaults(func=cmd_checkout)

    p = command(osub, rec, "fsck", "OCI-aware integrity check")
    p.add_argument("image", nargs="?", metavar="IMAGE",
                   help="check only this image (default: every tagged image)")
    p.set_defaults(func=cmd_fsck)

    delta.register(osub, rec)

"""org.composefs.Oci methods about an image's filesystem: compute-id, dump, layers, mount,
checkout (a mixin of OciAPI)."""

from __future__ import annotations

import os
from typing import Any

from cfsd.core import fsverity, tree
from cfsd.core.checkout import checkout
from cfsd.core.dumpfile import directory_line, hardlink_line, leaf_line, write_dumpfile
from cfsd.core.erofs import write_image_to
from cfsd.core.errors import NotFound
from cfsd.core.mount import composefs_mount
from cfsd.core.repository import Repository
from cfsd.core.sink import write_all
from cfsd.core.splitstream import TAR_LAYER
from cfsd.core.tar import layer_entries
from cfsd.oci import image as oci_image
from cfsd.oci.digest import Digest
from cfsd.oci.finalize import image_ref_key
from cfsd.oci.rootfs import create_filesystem, entry_item, entry_stat, make_absolute_path
from cfsd.service import auth, identity
from cfsd.service.binding import Call, VarlinkError
from cfsd.service.errors import OCI
from cfsd.service.state import State

XATTR_MODES = {None: "allowlist-only", "AllowlistOnly": "allowlist-only",
               "KeepUserXattrs": "keep-user-xattrs"}


def _err(name: str, **params: object) -> VarlinkError:
    return VarlinkError(f"{OCI}.{name}", params)



def _open(repo: Repository, image: str, verity: str | None = None) -> oci_image.OciImage:
    try:
        if verity is not None and image.startswith("@"):
            return oci_image.OciImage.open(repo, image[1:], bytes.fromhex(verity))
        return oci_image.open_image(repo, image)
    except (NotFound, ValueError):
        raise _err("NoSuchImage", image=image) from None


def layer_verity(repo: Repository, diff_id: str) -> bytes:
    """Verity of the stored layer *diff_id* (NoSuchLayer when absent)."""
    Digest.parse(diff_id)
    verity = repo.has_stream(oci_image.layer_id(diff_id))
    if verity is None:
        raise _err("NoSuchLayer", diff_id=diff_id)
    return verity


def _one_fd(call: Call, method: str) -> int:
    if len(call.fds) != 1:
        raise _err("InvalidRequest", message=f"{method} expects 1 fd (the output), got "
                                             f"{len(call.fds)}")
    return call.fds[0]


class OciImageMethods:
    """Mixin of OciAPI."""

    state: State

    def ComputeId(self, call: Call, handle: int, image: str, bootable: bool,  # noqa: N802
                  verity: str | None = None, xattrs: str | None = None) -> dict[str, Any]:
        """The composefs image id (hex) of the image's root filesystem; nothing is stored."""
        if bootable:
            raise _err("InvalidRequest", message="bootable images are not supported by cfsd")
        with self.state.use(call, handle, OCI) as h:
            repo = h.repo
            with repo.lock.shared():
                img = _open(repo, image, verity)
                fs = create_filesystem(repo, img, xattrs=XATTR_MODES[xattrs])
                hasher = fsverity.FsVerityHasher(repo.alg)
                write_image_to(fs, repo.meta.format_versions()[0], hasher.update)
            return {"image_id": hasher.digest().hex()}

    def Dump(self, call: Call, handle: int, image: str,  # noqa: N802
             xattrs: str | None = None) -> dict[str, Any]:
        """The image's root filesystem as a dumpfile, into the passed fd."""
        with self.state.use(call, handle, OCI) as h:
            out = _one_fd(call, "Dump")
            repo = h.repo
            with repo.lock.shared():
                fs = create_filesystem(repo, _open(repo, image), xattrs=XATTR_MODES[xattrs])
            data = write_dumpfile(fs)
            write_all(out, data)
            return {"size": len(data)}

    def LayerInfo(self, call: Call, handle: int, diff_id: str) -> dict[str, Any]:  # noqa: N802
        """Size, entry count and splitstream composition of a stored layer."""
        with self.state.use(call, handle, OCI) as h:
            repo = h.repo
            verity = layer_verity(repo, diff_id)
            ext_n = ext_size = inline = entries = 0
            with repo.open_stream(verity=verity, content_type=TAR_LAYER) as r:
                size = r.stream_size
                for external, data in r.chunks():
                    if external:
                        ext_n += 1
                    else:
                        inline += len(data)
            with repo.open_stream(verity=verity, content_type=TAR_LAYER) as r:
                for _entry, content in layer_entries(r.chunks()):
                    entries += 1
                    if isinstance(content, tuple):
                        ext_size += content[1]
            return {"diff_id": diff_id, "verity": verity.hex(), "size": size,
                    "entry_count": entries,
                    "splitstream": {"external_objects": ext_n, "external_size": ext_size,
                                    "inline_size": inline}}

    def LayerDump(self, call: Call, handle: int, diff_id: str) -> dict[str, Any]:  # noqa: N802
        """A layer's entries as dumpfile lines, into the passed fd."""
        with self.state.use(call, handle, OCI) as h:
            out = _one_fd(call, "LayerDump")
            repo = h.repo
            n = 0
            with repo.open_stream(verity=layer_verity(repo, diff_id),
                                  content_type=TAR_LAYER) as r:
                for entry, content in layer_entries(r.chunks()):
                    path = make_absolute_path(entry.path)
                    st = entry_stat(entry)
                    item = entry_item(entry, content)
                    if isinstance(item, tree.DirectoryItem):
                        line = directory_line(path, st, 1)
                    elif isinstance(item, tree.Hardlink):
                        line = hardlink_line(path, item.target)
                    else:
                        line = leaf_line(path, st, item, 1)
                    write_all(out, line)
                    n += 1
            return {"entries": n}

    def OciMount(self, call: Call, handle: int, image: str, bootable: bool,  # noqa: N802
                 options: dict[str, Any]) -> dict[str, Any]:
        """A detached composefs mount of the image (fd out)."""
        if bootable:
            raise _err("InternalError", message="No boot EROFS image linked")
        if call.creds.uid != 0:
            raise _err("PermissionDenied", message="mounting needs root")
        with self.state.use(call, handle, OCI) as h:
            repo = h.repo
            name = image if image.startswith("@") or not image.startswith(
                ("sha256:", "sha512:")) else "@" + image
            img = _open(repo, name)
            key = image_ref_key(repo.meta.format_versions()[0])
            erofs = img.image_refs.get(key)
            if erofs is None:
                raise _err("InternalError",
                           message="No composefs EROFS image linked — try re-pulling the image")
            call.reply_fds.append(mount_fds(repo, erofs, options, call.fds,
                                            f"{OCI}.InvalidRequest"))
            return {"fd_index": 0}

    def Checkout(self, call: Call, handle: int, image: str,  # noqa: N802
                 directory: str, directory_fd: int | None = None) -> dict[str, Any]:
        """Materialize the image's root filesystem into a directory, as the caller."""
        with self.state.use(call, handle, OCI) as h:
            repo = h.repo
            with repo.lock.shared():
                fs = create_filesystem(repo, _open(repo, image))
                dfd = auth.CallerFiles(call).directory(directory, directory_fd,
                                                       what="directory", create=True)

                try:
                    with auth.as_caller(call.creds):
                        res = checkout(repo, fs, dfd, privileged=call.creds.uid == 0,
                                       as_repository=identity.as_daemon)
                finally:
                    os.close(dfd)
            return {"entries": res.entries, "skipped": res.skipped}


def mount_fds(repo: Repository, image_id: bytes, options: dict[str, Any],
              fds: list[int], count_error: str) -> int:
    """A detached mount of a stored image (overlay upper/work fds from the request)."""
    overlay = bool(options.get("overlay"))
    expected = 2 if overlay else 0
    if len(fds) != expected:
        raise VarlinkError(count_error,
                           {"message": f"Mount expects {expected} fds for the requested "
                                       f"options, got {len(fds)}"})
    image_fd = repo.open_object(image_id)
    try:
        return composefs_mount(image_fd, repo.objects_fd, verity=repo.secure,
                               upper_fd=fds[0] if overlay else None,
                               work_fd=fds[1] if overlay else None,
                               read_write=bool(options.get("read_write")))
    finally:
        os.close(image_fd)


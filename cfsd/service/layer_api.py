"""org.composefs.Oci layer transfer between repositories: GetLayer, PutLayer and
FinalizeImage (``splitdirfdstream-v0``, a mixin of OciAPI; docs/splitstream.md).

GetLayer answers with ``[pipe, objects dir]``: a producer thread writes the layer as a
splitdirfdstream into the pipe, naming every external object beneath the objects
directory, whose fd the client holds.  PutLayer reads such a stream from the first fd it is
given, opens file-backed chunks beneath the directory fds that follow (``openat2`` beneath,
with the caller's own rights), rebuilds the tar, and imports it exactly as ImportLayer
does: nothing is visible unless the rebuilt tar hashes to the diff_id.  FinalizeImage
stores the manifest and config bytes it is given, links the layers and builds the EROFS.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Any

from cfsd.core import fsverity
from cfsd.core.errors import FormatError, NotFound
from cfsd.core.sink import write_all
from cfsd.core.splitdirfdstream import Decoder, encode_layer, open_beneath
from cfsd.core.splitstream import TAR_LAYER
from cfsd.oci import documents, mediatypes
from cfsd.oci import image as oci_image
from cfsd.oci.digest import Digest
from cfsd.oci.finalize import finalize_image
from cfsd.oci.layers import import_layer
from cfsd.service import auth, identity
from cfsd.service.binding import Call, VarlinkError
from cfsd.service.errors import OCI
from cfsd.service.repository_api import require_writer
from cfsd.service.state import State

log = logging.getLogger(__name__)

MAX_PRODUCERS = 16              # GetLayer streams being written at once, service-wide
_producers = threading.BoundedSemaphore(MAX_PRODUCERS)


def _err(name: str, **params: object) -> VarlinkError:
    return VarlinkError(f"{OCI}.{name}", params)


def _produce(reader: Any, objects_fd: int, out: int) -> None:
    """Write one layer's splitdirfdstream into *out* (then close everything).  A reader
    that goes away or stops reading ends the stream (EPIPE, or the write stall limit)."""
    def size(digest: bytes) -> int:
        return os.stat(fsverity.object_path(digest), dir_fd=objects_fd).st_size
    try:
        os.set_blocking(out, False)
        for chunk in encode_layer(reader.chunks(), size):
            write_all(out, chunk)
    except Exception as e:  # noqa: BLE001 - the consumer sees a truncated stream
        log.info("GetLayer stream ended early: %s", e)
    finally:
        reader.close()
        os.close(objects_fd)
        os.close(out)
        _producers.release()


class _PipeReader:
    """Reads of the PutLayer pipe that stop when the call is cancelled."""

    def __init__(self, fd: int, call: Call) -> None:
        self.fd = fd
        self.call = call

    def __call__(self, n: int) -> bytes:
        self.call.check_cancelled()
        return os.read(self.fd, n)


class LayerTransferMethods:
    """Mixin of OciAPI."""

    state: State

    def GetLayer(self, call: Call, handle: int,  # noqa: N802
                 params: dict[str, Any]) -> dict[str, Any]:
        """A stored layer as ``[pipe, objects dir]``; the pipe carries its
        splitdirfdstream (fd index 1 is directory index 0 of the stream)."""
        diff_id = params.get("diff_id")
        if params.get("storage") is not None:
            raise _err("InvalidRequest", message="cfsd has no containers-storage: "
                                                 "give params.diff_id")
        if diff_id is None:
            raise _err("InvalidRequest", message="GetLayer needs params.diff_id")
        Digest.parse(diff_id)
        with self.state.use(call, handle, OCI) as h:
            repo = h.repo
            verity = repo.has_stream(oci_image.layer_id(diff_id))
            if verity is None:
                raise _err("NoSuchLayer", diff_id=diff_id)
            if not _producers.acquire(blocking=False):
                raise _err("InternalError", message="too many layer transfers in progress; "
                                                    "try again later")
            fds: list[int] = []
            try:
                reader = repo.open_stream(verity=verity, content_type=TAR_LAYER)
                try:
                    objects = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                                      dir_fd=repo.objects_fd)
                    fds.append(objects)
                    r, w = os.pipe2(os.O_CLOEXEC)
                    fds += [r, w]
                    producer_objects = os.dup(objects)
                    fds.append(producer_objects)
                except BaseException:
                    reader.close()
                    raise
                threading.Thread(target=_produce, args=(reader, producer_objects, w),
                                 name="GetLayer", daemon=True).start()
            except BaseException:
                for fd in fds:
                    os.close(fd)
                _producers.release()
                raise
            call.reply_fds += [r, objects]
            return {"dir_count": 1}

    def PutLayer(self, call: Call, handle: int, diff_id: str,  # noqa: N802
                 zerocopy: bool) -> dict[str, Any]:
        """Import the layer streamed as a splitdirfdstream through fd 0, with file-backed
        chunks beneath the directory fds 1..n (opened with the caller's rights)."""
        digest = Digest.parse(diff_id)
        if digest.algorithm != "sha256":
            raise _err("InternalError", message=f"PutLayer needs a sha256 diff_id, got "
                                                f"{digest.algorithm}")
        with self.state.use(call, handle, OCI) as h:
            if len(call.fds) < 2:
                raise _err("InvalidRequest", message="PutLayer expects at least 2 fds "
                           f"(the stream and a directory), got {len(call.fds)}")
            require_writer(call, h, "import layers")
            repo = h.repo
            dirs = call.fds[1:]
            caller = auth.caller(call.creds)

            def open_file(index: int, name: bytes) -> int:
                if index >= len(dirs):
                    raise FormatError(f"splitdirfdstream: directory index {index} of "
                                      f"{len(dirs)}")
                try:
                    with identity.acting_as(caller):
                        return open_beneath(dirs[index], name)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.EXDEV):
                        raise FormatError(f"splitdirfdstream: {name!r} escapes its "
                                          "directory or is a symlink") from None
                    raise auth.CallerPathError(e.errno or errno.EIO,
                                               name.decode(errors="replace")) from None

            decoder = Decoder(_PipeReader(call.fds[0], call), open_file)
            with repo.lock.shared(), auth.as_owner(repo.fd, call.creds):
                res = import_layer(repo, decoder, diff_id)
            if res.already_present:             # always drain, as upstream does
                read = _PipeReader(call.fds[0], call)
                while read(1 << 20):
                    pass
            stats = res.stats
            return {"layer_verity": res.verity.hex(), "already_present": res.already_present,
                    "objects_reflinked": 0, "objects_hardlinked": 0,
                    "objects_copied": stats.objects_copied,
                    "objects_already_present": stats.objects_already_present}

    def FinalizeImage(self, call: Call, handle: int, manifest_json: str,  # noqa: N802
                      config_json: str, layers: list[dict[str, Any]],
                      name: str | None = None) -> dict[str, Any]:
        """Store a manifest and its config from their exact bytes, link the given layers in
        order, build the composefs image and tag it."""
        mbytes = manifest_json.encode()
        cbytes = config_json.encode()
        ordered: list[tuple[str, bytes]] = []
        for ref in layers:
            Digest.parse(ref["diff_id"])
            try:
                verity = bytes.fromhex(ref["layer_verity"])
            except ValueError:
                raise _err("InvalidDigest", message=f"layer_verity {ref['layer_verity']!r} "
                                                    "is not hex") from None
            ordered.append((ref["diff_id"], verity))
        if name is not None:
            oci_image.validate_tag(name)
        manifest = documents.parse_manifest(mbytes)
        mdigest = oci_image.sha256_digest(mbytes)
        cdigest = manifest.config.digest
        if oci_image.sha256_digest(cbytes) != cdigest:
            raise _err("InvalidRequest", message=f"config_json does not hash to the "
                                                 f"manifest's config digest {cdigest}")
        if mediatypes.is_container_config(manifest.config.media_type):
            ids = list(documents.parse_config(cbytes).rootfs.diff_ids)
        else:
            ids = [d.digest for d in manifest.layers]
        if ids != [d for d, _ in ordered]:
            raise _err("InvalidRequest", message="layers do not match the image's layer "
                                                 "list (config rootfs.diff_ids, in order)")
        with self.state.use(call, handle, OCI) as h:
            require_writer(call, h, "store images")
            repo = h.repo
            with repo.lock.shared(), auth.as_owner(repo.fd, call.creds):
                for diff_id, verity in ordered:
                    if repo.has_stream(oci_image.layer_id(diff_id)) != verity:
                        raise _err("NoSuchLayer", diff_id=diff_id)
                try:
                    config_verity = oci_image.write_config(repo, cbytes, cdigest, ordered,
                                                           publish=False)
                    manifest_verity = oci_image.write_manifest(
                        repo, mbytes, mdigest, cdigest, config_verity, ordered, publish=False)
                    oci_image.publish_streams(
                        repo, [(oci_image.CONFIG_PREFIX + cdigest, config_verity),
                               (oci_image.MANIFEST_PREFIX + mdigest, manifest_verity)])
                    done = finalize_image(repo, mdigest)
                    if name is not None:
                        oci_image.tag(repo, mdigest, name)
                except NotFound as e:
                    raise _err("InternalError", message=str(e)) from None
            return {"manifest_digest": mdigest, "manifest_verity": done.manifest_verity.hex(),
                    "config_digest": cdigest, "config_verity": done.config_verity.hex()}


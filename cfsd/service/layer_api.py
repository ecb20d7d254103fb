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
import stat
import threading
from collections import OrderedDict
from typing import Any

from cfsd.core import fsverity
from cfsd.core.errors import FormatError, NotFound
from cfsd.core.objects import ObjectResult, Staging
from cfsd.core.sink import write_all
from cfsd.core.splitdirfdstream import Decoder, encode_layer, open_beneath
from cfsd.core.splitstream import TAR_LAYER
from cfsd.oci import documents, mediatypes
from cfsd.oci import image as oci_image
from cfsd.oci.digest import Digest
from cfsd.oci.finalize import finalize_image
from cfsd.oci.layers import import_layer
from cfsd.service import auth, identity
from cfsd.service.binding import Call, FdReader, VarlinkError
from cfsd.service.errors import OCI
from cfsd.service.oci_image_api import layer_verity
from cfsd.service.repository_api import require_writer
from cfsd.service.state import State

log = logging.getLogger(__name__)

MAX_PRODUCERS = 16              # GetLayer streams being written at once, service-wide
MAX_PUT_FDS = 9                 # PutLayer: the stream and at most 8 directories
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


LINK_WINDOW = 32                # file-backed chunks remembered for zero-copy (read-ahead)


class _ZeroCopy:
    """PutLayer with ``zerocopy``: content that is a whole file beneath the caller's
    directory is hardlinked in (through the staging area) instead of copied, when the file
    is on the repository's filesystem, owned by the repository's owner and mode 0644 (so
    nobody but the owner can ever change an object that way).  Anything else is copied."""

    def __init__(self, repo: Any, owner_uid: int) -> None:
        self.owner_uid = owner_uid
        self.dev = os.fstat(repo.writable_objects_fd).st_dev
        self.files: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self.hardlinked = 0

    def remember(self, offset: int, length: int, fd: int) -> None:
        """Decoder callback: the tar bytes at *offset* are the whole file *fd*."""
        st = os.fstat(fd)
        if st.st_dev != self.dev or st.st_uid != self.owner_uid \
                or stat.S_IMODE(st.st_mode) != 0o644:
            return
        self.files[offset] = (length, os.dup(fd))
        while len(self.files) > LINK_WINDOW:
            os.close(self.files.popitem(last=False)[1][1])

    def store(self, staging: Staging) -> _LinkingStore:
        """The object store split_tar writes through."""
        return _LinkingStore(staging, self)

    def close(self) -> None:
        """Close every remembered fd."""
        while self.files:
            os.close(self.files.popitem()[1][1])


class _LinkingStore:
    """A staging area that links remembered whole files instead of copying them."""

    def __init__(self, staging: Staging, zc: _ZeroCopy) -> None:
        self.staging = staging
        self.zc = zc

    def object_writer(self) -> Any:
        """A copying writer."""
        return self.staging.object_writer()

    def store_object(self, data: bytes | memoryview) -> ObjectResult:
        """Stage an in-memory object."""
        return self.staging.store_object(data)

    def object_writer_at(self, offset: int, size: int) -> Any:
        """A writer for the *size* content bytes at tar *offset*: it links when they turn
        out to be a remembered file (known once they arrive), else it copies."""
        return _LinkingWriter(self.staging, self.zc, offset, size)


class _LinkingWriter:
    """Hashes content that is a whole remembered file as it streams by, then hardlinks
    that file in; any other content goes to an ordinary (copying) writer."""

    def __init__(self, staging: Staging, zc: _ZeroCopy, offset: int, size: int) -> None:
        self.staging = staging
        self.zc = zc
        self.offset = offset
        self.expected_size = size
        self.fd = -1
        self.copy: Any = None
        self.hasher = fsverity.FsVerityHasher(staging.repo.alg)

    def _decide(self) -> None:
        hit = self.zc.files.pop(self.offset, None)
        if hit is not None and hit[0] == self.expected_size:
            self.fd = hit[1]
        else:
            if hit is not None:
                os.close(hit[1])
            self.copy = self.staging.object_writer()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hash (linking: the bytes are the file's) or write (copying)."""
        if self.fd < 0 and self.copy is None:
            self._decide()
        if self.copy is not None:
            self.copy.write(data)
        else:
            self.hasher.update(data)

    @property
    def size(self) -> int:
        """Bytes seen."""
        return self.copy.size if self.copy is not None else self.hasher.size

    def finish(self, expected: bytes | None = None) -> ObjectResult:
        """Link the file into the staging area under its digest (or copy it when the
        kernel refuses the link or cannot vouch for its verity)."""
        if self.copy is not None or self.fd < 0:
            if self.copy is None:
                self.copy = self.staging.object_writer()
            return self.copy.finish(expected)
        staging = self.staging
        repo = staging.repo
        digest = self.hasher.digest()
        size = self.hasher.size
        if repo.object_ok(digest) or digest in staging.staged:
            return ObjectResult(digest, size, False)
        if repo.secure and fsverity.measure_verity(self.fd, repo.alg) != digest:
            return self._copy(digest)       # a verity repository links only sealed files
        name = digest.hex()
        try:
            os.link(f"/proc/self/fd/{self.fd}", name, dst_dir_fd=staging.fd,
                    follow_symlinks=True)
        except OSError:
            return self._copy(digest)
        staging.staged[digest] = name
        self.zc.hardlinked += 1
        return ObjectResult(digest, size, True)

    def _copy(self, digest: bytes) -> ObjectResult:
        self.copy = self.staging.object_writer()
        off = 0
        while piece := os.pread(self.fd, 1 << 20, off):
            self.copy.write(piece)
            off += len(piece)
        return self.copy.finish(expected=digest)

    def abort(self) -> None:
        """Close the file and drop any copy in progress."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.copy is not None:
            self.copy.abort()


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
            verity = layer_verity(repo, diff_id)
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
            if len(call.fds) > MAX_PUT_FDS:
                raise _err("FdLimitExceeded", fd_count=len(call.fds),
                           max_per_frame=MAX_PUT_FDS)
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

            zc = _ZeroCopy(repo, auth.owner_identity(repo.fd, call.creds).uid) \
                if zerocopy else None
            stream = FdReader(call.fds[0], call)
            decoder = Decoder(stream.read, open_file,
                              zc.remember if zc is not None else None)
            try:
                with repo.lock.shared(), auth.as_owner(repo.fd, call.creds):
                    res = import_layer(repo, decoder, diff_id,
                                       store=zc.store if zc is not None else None)
            finally:
                if zc is not None:
                    zc.close()
            linked = zc.hardlinked if zc is not None else 0
            if res.already_present:             # always drain, as upstream does
                while stream.read(1 << 20):
                    pass
            stats = res.stats
            return {"layer_verity": res.verity.hex(), "already_present": res.already_present,
                    "objects_reflinked": 0, "objects_hardlinked": linked,
                    "objects_copied": stats.objects_copied - linked,
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


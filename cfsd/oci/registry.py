"""A registry client over httpx: manifests and streaming blobs (docs/pull.md).

Anonymous, bearer-token and basic authentication; credentials passed in or read from
containers auth files; retries with backoff on transient failures; blob downloads follow
redirects, stream in chunks and resume with Range requests after a dropped connection.
TLS verification is on unless asked otherwise (then plain HTTP is tried as well, as skopeo
does with ``--tls-verify=false``).
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import httpx

from cfsd.core.errors import FormatError, NotFound, RepositoryError
from cfsd.oci import mediatypes
from cfsd.oci.documents import MAX_MANIFEST
from cfsd.oci.reference import DOCKER_HUB, ImageReference

RETRIES = 4
CHUNK = 1 << 16
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
MAX_TOKEN_BODY = 1 << 20        # a token service's answer, decompressed
_tls: ssl.SSLContext | None = None
_tls_lock = threading.Lock()


def read_capped(r: httpx.Response, limit: int, what: str) -> bytes:
    """The body of a streaming response, at most *limit* bytes after decoding.

    Content-Encoding is undone here, with the output bounded at every step, so a small
    compressed body cannot expand into gigabytes (httpx decodes whole chunks unbounded).
    """
    declared = r.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise FormatError(f"{what} too large ({declared} bytes)")
    encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        dec = None
    elif encoding in ("gzip", "x-gzip", "deflate"):
        dec = zlib.decompressobj(47 if "gzip" in encoding else 15)
    else:
        raise RegistryError(f"{what}: unsupported Content-Encoding {encoding!r}")
    out = bytearray()
    for chunk in r.iter_raw(1 << 16):
        data = chunk
        while data:
            if dec is None:
                out += data
                data = b""
            else:
                out += dec.decompress(data, limit + 1 - len(out))
                data = dec.unconsumed_tail
            if len(out) > limit:
                raise FormatError(f"{what} larger than {limit} bytes")
    return bytes(out)


def _tls_hint(e: Exception) -> str:
    """A hint when TLS failed against what may be a plain-HTTP (or self-signed) registry."""
    if "SSL" in str(e) or isinstance(e.__context__, ssl.SSLError):
        return (" (TLS failed: for a plain-HTTP or self-signed registry use "
                "--tls-verify=false)")
    return ""


def tls_context() -> ssl.SSLContext:
    """The verifying TLS context (CA bundle loaded once, by the daemon itself)."""
    global _tls
    with _tls_lock:
        if _tls is None:
            _tls = httpx.create_ssl_context()
        return _tls
_TRANSIENT = {408, 425, 429, 500, 502, 503, 504}
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(RepositoryError):
    """The registry refused or failed a request."""


class AuthenticationError(RegistryError):
    """Credentials were missing or rejected."""


@dataclass(frozen=True)
class Credentials:
    """A username/password pair for one registry."""

    username: str
    password: str

    @classmethod
    def parse(cls, text: str) -> Credentials:
        """``user:password`` (as skopeo's --creds) or a base64 auth.json ``auth`` value."""
        if ":" not in text:
            try:
                text = base64.b64decode(text, validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise AuthenticationError("credentials must be USER:PASSWORD") from None
        user, sep, password = text.partition(":")
        if not sep:
            raise AuthenticationError("credentials must be USER:PASSWORD")
        return cls(user, password)


def _auth_keys(registry: str, repository: str) -> list[str]:
    parts = repository.split("/")
    keys = [f"{registry}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)]
    keys += [registry, f"https://{registry}", f"http://{registry}"]
    if registry == DOCKER_HUB:
        keys += ["docker.io", "index.docker.io", "https://index.docker.io/v1/"]
    return keys


def credentials_from_auth_json(configs: Sequence[bytes], registry: str,
                               repository: str) -> Credentials | None:
    """Look the registry up in containers/docker auth files' contents (first match wins)."""
    for raw in configs:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        auths = data.get("auths") if isinstance(data, dict) else None
        if not isinstance(auths, dict):
            continue
        for key in _auth_keys(registry, repository):
            entry = auths.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
                return Credentials.parse(entry["auth"])
    return None


class RegistryClient:
    """HTTP access to one repository of one registry."""

    def __init__(self, registry: str, repository: str, *, tls_verify: bool = True,
                 credentials: Credentials | None = None) -> None:
        self.registry = registry
        self.repository = repository
        self.credentials = credentials
        self.tls_verify = tls_verify
        self._token: tuple[str, float] | None = None
        self._basic = False
        self._lock = threading.Lock()
        self.client = httpx.Client(verify=tls_context() if tls_verify else False,
                                   timeout=TIMEOUT, follow_redirects=False)
        self.base = f"https://{registry}"
        if not tls_verify:
            self.base = self._probe_scheme()

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()

    def _probe_scheme(self) -> str:
        """With TLS verification off, fall back to plain HTTP when HTTPS does not answer."""
        for base in (f"https://{self.registry}", f"http://{self.registry}"):
            try:
                with self.client.stream("GET", f"{base}/v2/"):
                    return base             # the body is never read
            except httpx.TransportError:
                continue
        raise RegistryError(f"cannot reach registry {self.registry}")

    def _auth_header(self) -> dict[str, str]:
        with self._lock:
            if self._token and self._token[1] > time.monotonic():
                return {"Authorization": f"Bearer {self._token[0]}"}
            if self._basic and self.credentials:
                raw = f"{self.credentials.username}:{self.credentials.password}".encode()
                return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {}

    def _authenticate(self, challenge: str) -> None:
        scheme, _, params = challenge.partition(" ")
        fields = dict(_CHALLENGE.findall(params))
        if scheme.lower() == "basic":
            if not self.credentials:
                raise AuthenticationError(f"registry {self.registry} requires credentials")
            with self._lock:
                self._basic = True
            return
        if scheme.lower() != "bearer" or "realm" not in fields:
            raise AuthenticationError(f"unsupported authentication challenge: {challenge}")
        query: dict[str, str | list[str]] = {}
        if "service" in fields:
            query["service"] = fields["service"]
        scope = fields.get("scope") or f"repository:{self.repository}:pull"
        query["scope"] = scope.split(" ")
        auth = None
        if self.credentials:
            auth = httpx.BasicAuth(self.credentials.username, self.credentials.password)
        try:
            with self.client.stream("GET", fields["realm"], params=query, auth=auth,
                                    follow_redirects=True) as r:
                if r.status_code in (401, 403):
                    raise AuthenticationError(
                        f"registry {self.registry} rejected the credentials")
                if r.status_code != 200:
                    raise RegistryError(f"token service answered {r.status_code}")
                raw = read_capped(r, MAX_TOKEN_BODY, "token response")
        except httpx.HTTPError as e:
            raise RegistryError(f"token service {fields['realm']}: {e}") from None
        try:
            body = json.loads(raw)
            token = body.get("token") or body.get("access_token")
            expires = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError, UnicodeDecodeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError("token service returned no token")
        with self._lock:
            self._token = (token, time.monotonic() + max(expires - 5, 5))

    def request(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """GET *path* (below /v2/<repository>/) with auth, redirects and retries; the
        response is streaming (the caller reads it, with a bound, and closes it)."""
        url = f"{self.base}/v2/{self.repository}/{path}"
        delay = 0.2
        authed = False
        for attempt in range(RETRIES + 1):
            h = {**(headers or {}), **self._auth_header()}
            try:
                req = self.client.build_request("GET", url, headers=h)
                r = self.client.send(req, stream=True, follow_redirects=True)
            except httpx.TransportError as e:
                if attempt == RETRIES:
                    raise RegistryError(f"{self.registry}: {type(e).__name__}: {e}"
                                        + _tls_hint(e)) from None
                time.sleep(delay)
                delay *= 2.5
                continue
            if r.status_code == 401 and not authed:
                challenge = r.headers.get("WWW-Authenticate", "")
                r.close()
                self._authenticate(challenge)
                authed = True
                continue
            if r.status_code in _TRANSIENT and attempt < RETRIES:
                r.close()
                time.sleep(delay)
                delay *= 2.5
                continue
            if r.status_code == 404:
                r.close()
                raise NotFound(f"{self.registry}/{self.repository}: {path} not found")
            if r.status_code in (401, 403):
                r.close()
                raise AuthenticationError(f"{self.registry}: access to {self.repository} "
                                          f"denied ({r.status_code})")
            if r.status_code not in (200, 206):
                r.close()
                raise RegistryError(f"{self.registry}: GET {path} answered {r.status_code}")
            return r
        raise RegistryError(f"{self.registry}: GET {path} failed")

    def manifest(self, reference: str) -> tuple[bytes, str | None, str | None]:
        """(bytes, Content-Type, Docker-Content-Digest) of a manifest or index."""
        r = self.request(f"manifests/{reference}", {"Accept": mediatypes.ACCEPT})
        try:
            body = read_capped(r, MAX_MANIFEST, "manifest")
        except httpx.HTTPError as e:
            raise RegistryError(f"{self.registry}: reading manifest: {e}") from None
        finally:
            r.close()
        ctype = r.headers.get("Content-Type", "").split(";")[0].strip() or None
        return bytes(body), ctype, r.headers.get("Docker-Content-Digest")


class RegistryBlob:
    """A blob download that resumes with a Range request when the connection drops."""

    def __init__(self, client: RegistryClient, digest: str, size: int) -> None:
        self.client = client
        self.digest = digest
        self.size = size
        self.received = 0
        self._resp: httpx.Response | None = None
        self._iter: Iterator[bytes] | None = None
        self._pending = b""
        self._resumes = 0

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.received}-"} if self.received else {}
        r = self.client.request(f"blobs/{self.digest}", headers)
        if self.received and r.status_code != 206:
            r.close()
            raise RegistryError("registry cannot resume the blob download")
        self._resp = r
        self._iter = r.iter_raw(CHUNK)

    def read(self, n: int = -1, /) -> bytes:
        """Up to *n* bytes (b"" at the end)."""
        while not self._pending:
            if self._iter is None:
                if self.received >= self.size:
                    return b""
                self._open()
            assert self._iter is not None
            try:
                data = next(self._iter, b"")
            except httpx.HTTPError as e:
                self.close()
                self._resumes += 1
                if self._resumes > RETRIES:
                    raise RegistryError(f"blob {self.digest}: {e}") from None
                continue
            if not data:
                self.close()
                if self.received < self.size and self._resumes < RETRIES:
                    self._resumes += 1
                    continue
                return b""
            self.received += len(data)
            self._pending = data
        if n < 0 or n >= len(self._pending):
            out, self._pending = self._pending, b""
        else:
            out, self._pending = self._pending[:n], self._pending[n:]
        return out

    def close(self) -> None:
        """Drop the HTTP response."""
        if self._resp is not None:
            self._resp.close()
        self._resp = None
        self._iter = None


class RegistrySource:
    """A ``docker://`` reference as a pull source."""

    def __init__(self, ref: ImageReference, tls_verify: bool = True,
                 credentials: Credentials | None = None,
                 auth_configs: Sequence[bytes] = ()) -> None:
        self.ref = ref
        self.description = str(ref)
        if credentials is None:
            credentials = credentials_from_auth_json(auth_configs, ref.registry, ref.repository)
        self.client = RegistryClient(ref.registry, ref.repository, tls_verify=tls_verify,
                                     credentials=credentials)

    def top(self) -> tuple[bytes, str | None, str | None]:
        """The manifest or index for the tag/digest; its digest is checked by the caller."""
        reference = self.ref.digest or self.ref.tag or "latest"
        body, ctype, header_digest = self.client.manifest(reference)
        if header_digest and not header_digest.startswith(("sha256:", "sha512:")):
            header_digest = None
        from cfsd.oci.digest import Digest
        if header_digest and not Digest.parse(header_digest).matches(body):
            raise FormatError(f"manifest does not match Docker-Content-Digest {header_digest}")
        return body, ctype, self.ref.digest

    def manifest(self, digest: str, size: int | None) -> bytes:
        """A manifest by digest."""
        body, _, _ = self.client.manifest(digest)
        return body

    def blob(self, digest: str, size: int) -> RegistryBlob:
        """A streaming, resuming blob reader."""
        return RegistryBlob(self.client, digest, size)

    def close(self) -> None:
        """Close the HTTP client."""
        self.client.close()

"""A real docker-registry configured for bearer-token auth, with a small token service, and a
fault-injecting HTTP proxy (503s, redirects to another origin, dropped connections) in front
of a real registry.  Test scaffolding around the real registry, not a replacement for it."""

from __future__ import annotations

import base64
import datetime
import http.client
import http.server
import json
import secrets
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.ocitools import Registry


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """Issues registry JWTs (RS256, x5c) to clients with the right basic credentials."""

    def __init__(self, user: str, password: str, service: str = "cfsd-test") -> None:
        self.user, self.password, self.service = user, password, service
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cfsd-test-token")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(1)
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .sign(self.key, hashes.SHA256()))
        self.requests: list[dict[str, Any]] = []
        svc = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                auth = self.headers.get("Authorization", "")
                ok = auth == "Basic " + base64.b64encode(
                    f"{svc.user}:{svc.password}".encode()).decode()
                svc.requests.append({"scope": q.get("scope", []), "authenticated": ok})
                if auth and not ok:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"token": svc.token(q.get("scope", []), ok),
                                   "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, scopes: list[str], authenticated: bool) -> str:
        access = []
        for scope in scopes:
            for part in scope.split(" "):
                kind, name, actions = part.split(":")
                access.append({"type": kind, "name": name,
                               "actions": actions.split(",") if authenticated else []})
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(
            self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        now = int(time.time())
        claims = {"iss": "cfsd-test-issuer", "sub": self.user if authenticated else "",
                  "aud": self.service, "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": secrets.token_hex(8), "access": access}
        signing = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{_b64url(sig)}"

    def write_bundle(self, path: Path) -> None:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def stop(self) -> None:
        self.server.shutdown()


class TokenRegistry(Registry):
    """docker-registry requiring bearer tokens from a TokenService."""

    def __init__(self, tokens: TokenService) -> None:
        self.tokens = tokens
        super().__init__()
        self.creds = f"{tokens.user}:{tokens.password}"

    def auth_config(self) -> str:
        bundle = self.dir / "token-root.pem"
        self.tokens.write_bundle(bundle)
        return (f"auth: {{token: {{realm: {self.tokens.url}, service: {self.tokens.service}, "
                f"issuer: cfsd-test-issuer, rootcertbundle: {bundle}}}}}\n")


class FaultProxy:
    """HTTP proxy to a registry that fails the first request of each kind with 503,
    redirects blob downloads to another origin (localhost instead of 127.0.0.1) and cuts
    the first blob download after some bytes, so clients must retry, follow and resume."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.seen: set[str] = set()
        self.log: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = self.path
                kind = "blob" if "/blobs/" in path else "manifest" if "/manifests/" in path \
                    else "other"
                proxy.log.append(f"{kind} {path} {self.headers.get('Range', '')}")
                if kind in ("manifest", "blob") and kind + "503" not in proxy.seen:
                    proxy.seen.add(kind + "503")
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if kind == "blob" and not path.startswith("/direct/"):
                    self.send_response(307)
                    self.send_header("Location", f"http://localhost:{proxy.port}/direct{path}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                real = path.removeprefix("/direct")
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("accept", "range", "authorization")}
                conn.request("GET", real, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                cut = kind == "blob" and "cut" not in proxy.seen and len(body) > 4096
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.end_headers()
                if cut:
                    proxy.seen.add("cut")
                    self.wfile.write(body[:len(body) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()

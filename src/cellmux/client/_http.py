"""Blocking REST calls to a cellmux server, with nothing but urllib."""

from __future__ import annotations

import json
import logging
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from cellmux.protocol import boundedjson

from ._results import CellmuxError, HTTPError, KernelModel

__all__ = [
    "CAFILE_VARIABLE",
    "DEFAULT_URL",
    "RestAPI",
    "auth_headers",
    "error_from_body",
    "tls_context",
    "websocket_url",
]

log = logging.getLogger(__name__)

#: Where a cellmux server listens unless told otherwise.
DEFAULT_URL = "http://127.0.0.1:8800"

#: The environment variable naming extra CA certificates to trust, for a
#: server with a self-signed or private-CA certificate.
CAFILE_VARIABLE = "CELLMUX_CAFILE"

_WS_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


def auth_headers(token: str | None) -> dict[str, str]:
    """The headers that authenticate a request with C{token} (none without one)."""
    return {"Authorization": "token " + token} if token else {}


def tls_context(cafile: str | None = None) -> ssl.SSLContext:
    """The TLS context for https and wss: the system's CAs, plus C{cafile}
    (or C{$CELLMUX_CAFILE}) if given. Certificates and host names are
    always verified.

    @raise CellmuxError: if the CA file cannot be read.
    """
    cafile = cafile or os.environ.get(CAFILE_VARIABLE) or None
    context = ssl.create_default_context()
    if cafile:
        try:
            context.load_verify_locations(cafile=cafile)
        except (OSError, ssl.SSLError) as e:
            raise CellmuxError(f"cannot load CA certificates from {cafile}: {e}") from None
    return context


def websocket_url(base_url: str, kernel_id: str | None = None) -> str:
    """The websocket endpoint of the server at C{base_url} (http→ws, https→wss).

    @param kernel_id: the kernel the hello will name: it goes in the URL too
        (``?kernel=ID``), so a proxy in front of several servers can route
        by it (docs/scaling.md, Several fronts).
    @raise ValueError: for a URL that is not http(s) or ws(s).
    """
    parts = urllib.parse.urlsplit(base_url)
    scheme = _WS_SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {base_url!r}")
    query = "" if kernel_id is None else urllib.parse.urlencode({"kernel": kernel_id})
    return urllib.parse.urlunsplit(
        (scheme, parts.netloc, parts.path.rstrip("/") + "/ws", query, "")
    )


def error_from_body(status: int, phrase: str, body: bytes) -> HTTPError:
    """An L{HTTPError} from an error response, using its JSON fields if it has them."""
    reason, message = phrase, ""
    try:
        data = boundedjson.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        reason = str(data.get("reason") or phrase or "")
        message = str(data.get("message") or "")
    elif body:
        message = body[:500].decode("utf-8", "replace").strip()
    return HTTPError(status, reason, message)


class RestAPI:
    """The server's REST API as blocking methods.

    @param url: the server's base URL, e.g. C{"http://127.0.0.1:8800"}.
    @param token: the authentication token, or None.
    @param timeout: seconds to wait for each response.
    @param tls: the TLS context for https URLs (default: L{tls_context}()).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float = 60.0,
        tls: ssl.SSLContext | None = None,
    ):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.tls = tls

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Send one request and return its decoded JSON body (None if empty).

        @raise HTTPError: for an error status.
        @raise CellmuxError: if the server cannot be reached or answers garbage.
        """
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", **auth_headers(self.token)}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        log.debug("%s %s", method, url)
        if self.tls is None and url.lower().startswith("https:"):
            self.tls = tls_context()
        try:
            with urllib.request.urlopen(
                request, timeout=self.timeout, context=self.tls
            ) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            with e:
                raise error_from_body(e.code, str(e.reason or ""), e.read()) from None
        except urllib.error.URLError as e:
            raise CellmuxError(f"cannot reach cellmux server at {url}: {e.reason}") from e
        except TimeoutError as e:
            raise CellmuxError(f"{method} {url} timed out after {self.timeout} seconds") from e
        except OSError as e:
            raise CellmuxError(f"{method} {url} failed: {e}") from e
        if not payload:
            return None
        try:
            return boundedjson.loads(payload)
        except ValueError:
            raise CellmuxError(f"{method} {url}: response is not JSON") from None

    @staticmethod
    def _kernel_path(kernel_id: str, action: str = "") -> str:
        return "/api/kernels/" + urllib.parse.quote(kernel_id, safe="") + action

    def version(self) -> str:
        """The server's version string."""
        data = self.call("GET", "/api")
        if not isinstance(data, dict) or not isinstance(data.get("version"), str):
            raise CellmuxError(f"GET /api: unexpected response {data!r}")
        return data["version"]

    def get_status(self) -> dict[str, Any]:
        """The server's status: kernels, connections, warm pool."""
        data = self.call("GET", "/api/status")
        if not isinstance(data, dict):
            raise CellmuxError(f"GET /api/status: unexpected response {data!r}")
        return data

    def list_kernels(self) -> list[KernelModel]:
        """Every running kernel."""
        data = self.call("GET", "/api/kernels")
        if not isinstance(data, list):
            raise CellmuxError(f"GET /api/kernels: expected a list, got {data!r}")
        return [KernelModel.from_json(item) for item in data]

    def kernel_specs(self) -> dict[str, dict[str, Any]]:
        """The kernel specs the server offers, by name (Jupyter's spec models)."""
        data = self.call("GET", "/api/kernelspecs")
        specs = data.get("kernelspecs") if isinstance(data, dict) else None
        if not isinstance(specs, dict):
            raise CellmuxError(f"GET /api/kernelspecs: unexpected response {data!r}")
        return specs

    def create_kernel(self, name: str | None = None) -> KernelModel:
        """Start a kernel (of kernel spec C{name}, or the server's default)."""
        body = {} if name is None else {"name": name}
        return KernelModel.from_json(self.call("POST", "/api/kernels", body))

    def get_kernel(self, kernel_id: str) -> KernelModel:
        """One kernel's model; L{HTTPError} 404 if there is no such kernel."""
        return KernelModel.from_json(self.call("GET", self._kernel_path(kernel_id)))

    def delete_kernel(self, kernel_id: str) -> None:
        """Shut a kernel down and forget it."""
        self.call("DELETE", self._kernel_path(kernel_id))

    def interrupt_kernel(self, kernel_id: str) -> None:
        """Send the kernel an interrupt (SIGINT or interrupt_request)."""
        self.call("POST", self._kernel_path(kernel_id, "/interrupt"), {})

    def share_kernel(self, kernel_id: str, role: str) -> dict[str, Any]:
        """A new share token for one kernel: C{{"id", "role", "token", …}}."""
        return self.call("POST", self._kernel_path(kernel_id, "/shares"), {"role": role})

    def list_shares(self, kernel_id: str) -> list[dict[str, Any]]:
        """The kernel's shares (without their tokens)."""
        return self.call("GET", self._kernel_path(kernel_id, "/shares"))

    def revoke_share(self, kernel_id: str, share_id: str) -> None:
        """Revoke a share; connections that used it are closed."""
        self.call("DELETE", self._kernel_path(kernel_id, f"/shares/{share_id}"))

    def restart_kernel(self, kernel_id: str) -> KernelModel:
        """Restart a kernel; returns its model once the server answers."""
        return KernelModel.from_json(
            self.call("POST", self._kernel_path(kernel_id, "/restart"), {})
        )

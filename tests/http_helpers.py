"""One HTTP request, the way the REST tests make them: a fresh connection
each time (so no keep-alive hides a front or a proxy that closed), the
body sent as JSON and the answer's decoded when it is JSON."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from typing import Any


def request(
    url: str,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: Any = None,
    timeout: float = 30,
) -> tuple[int, http.client.HTTPMessage, Any]:
    """C{(status, headers, body)} of C{method target} at the server of C{url}."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, target, body=data, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = raw
        return response.status, response.headers, decoded
    finally:
        conn.close()


def token(value: str) -> dict[str, str]:
    """The header that presents C{value} as a token."""
    return {"Authorization": f"token {value}"}

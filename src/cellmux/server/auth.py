# -*- test-case-name: tests.test_auth -*-
"""Token authentication shared by the REST API and the websocket."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping, Sequence

import attrs

__all__ = ["TokenAuth", "generate_token"]


def generate_token() -> str:
    """A fresh random token (48 hex digits, like Jupyter's)."""
    return secrets.token_hex(24)


@attrs.frozen(repr=False)
class TokenAuth:
    """Accepts ``Authorization: token T`` (or ``Bearer T``) or ``?token=T``.

    The comparison takes the same time whatever the guess; the token never
    appears in a repr or a log line.
    """

    token: str

    def __repr__(self) -> str:
        return "TokenAuth(<redacted>)"

    def _matches(self, candidate: str | bytes | None) -> bool:
        if candidate is None:
            return False
        if isinstance(candidate, str):
            candidate = candidate.encode("utf-8", "replace")
        return hmac.compare_digest(candidate, self.token.encode())

    def check(
        self, authorization: str | bytes | None, query_tokens: Sequence[str | bytes] = ()
    ) -> bool:
        """Whether the header or a query parameter carries the token."""
        if authorization:
            if isinstance(authorization, bytes):
                authorization = authorization.decode("latin-1")
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() in ("token", "bearer") and self._matches(value.strip()):
                return True
        return any(self._matches(t) for t in query_tokens)

    def check_web_request(self, request) -> bool:
        return self.check(request.getHeader(b"authorization"), request.args.get(b"token", ()))

    def check_upgrade(self, headers: Mapping[str, str], params: Mapping[str, list[str]]) -> bool:
        """For Autobahn's ConnectionRequest (lower-cased headers)."""
        return self.check(headers.get("authorization"), params.get("token", ()))

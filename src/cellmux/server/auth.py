# -*- test-case-name: tests.test_auth -*-
"""Who may do what: the server token, per-kernel share tokens, roles, origins.

* The server token (printed at start) is the owner of every kernel.
* A share token is a capability for ONE kernel with a role, made by an
  owner and revocable by an owner. Share links carry it.
* Browsers log in once with a token and get an HttpOnly, SameSite=Strict
  cookie that stands for the same grant.
* A websocket upgrade that carries an ``Origin`` header (every browser's
  does) must come from the server's own host or match one of the
  configured origin patterns, matched whole: ``https://trusted.example``
  never admits ``https://trusted.example.evil.com``.

Tokens are compared in constant time (share tokens are looked up by their
SHA-256, which leaks nothing about the token) and never logged. The query
string is read by one parser (L{query_pairs}) both to find a token and to
blank it out of the access log, so ``?%74oken=T`` is a token to both.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import unquote_to_bytes, urlsplit

import attrs

__all__ = [
    "COOKIE_NAME",
    "Grant",
    "OriginPolicy",
    "Role",
    "Share",
    "TokenAuth",
    "generate_token",
    "query_pairs",
    "query_tokens",
    "redact_tokens",
]

#: The login cookie's name.
COOKIE_NAME = "cellmux-login"
#: Login cookies the server remembers; the oldest is forgotten first (its
#: browser logs in again). Each costs about 200 bytes.
MAX_LOGINS = 10_000


def _query_items(target: bytes | str) -> tuple[bytes, list[bytes]]:
    """(what precedes the query, the query split into items and separators)
    of a request target or URL. Like twisted.web, everything after the
    first "?" is the query (a "#" too: request targets have no fragment)."""
    if isinstance(target, str):
        target = target.encode("utf-8", "surrogateescape")
    head, question, query = target.partition(b"?")
    # twisted.web separates parameters with "&" and with ";"
    return head + question, re.split(rb"([&;])", query) if question else []


def _decode(part: bytes) -> bytes:
    return unquote_to_bytes(part.replace(b"+", b" "))


def query_pairs(target: bytes | str) -> list[tuple[bytes, bytes]]:
    """The (name, value) of each query parameter of a request target or URL,
    both decoded exactly as twisted.web decodes ``request.args``.

    Parameters are separated by ``&`` or ``;``; one without ``=`` is
    skipped; ``+`` is a space and ``%xx`` escapes are decoded, in names too.
    Every token in a query is found by this function, for authentication
    (L{query_tokens}) and for the access log (L{redact_tokens}) alike.
    """
    _, items = _query_items(target)
    pairs = []
    for item in items[::2]:
        name, equals, value = item.partition(b"=")
        if equals:
            pairs.append((_decode(name), _decode(value)))
    return pairs


def query_tokens(target: bytes | str) -> list[bytes]:
    """The values of the ``token`` parameters of a request target."""
    return [value for name, value in query_pairs(target) if name == b"token"]


def redact_tokens(target: bytes) -> bytes:
    """A request target or URL with every token value blanked out, for logs.

    Blanks every parameter whose decoded name is ``token`` in any case: all
    that L{query_tokens} accepts, and more.
    """
    head, items = _query_items(target)
    if not items:
        return target
    for i in range(0, len(items), 2):
        name, equals, _ = items[i].partition(b"=")
        if equals and _decode(name).lower() == b"token":
            items[i] = name + b"=<redacted>"
    return head + b"".join(items)


def generate_token() -> str:
    """A fresh random token (48 hex digits, like Jupyter's)."""
    return secrets.token_hex(24)


class Role(enum.Enum):
    #: Everything: execute, stdin, interrupt, restart, shut down, share.
    OWNER = "owner"
    #: Execute, answer stdin, interrupt.
    COLLABORATOR = "collaborator"
    #: Read-only: receives output, never stdin prompts; sends nothing.
    OBSERVER = "observer"

    @property
    def may_execute(self) -> bool:
        return self is not Role.OBSERVER

    @property
    def may_manage(self) -> bool:
        """Restart, shut down, share, revoke."""
        return self is Role.OWNER


_RANK = {Role.OBSERVER: 0, Role.COLLABORATOR: 1, Role.OWNER: 2}


@attrs.frozen
class Grant:
    """What one credential allows.

    @ivar kernel_id: the one kernel it is for, or None for all (server token).
    @ivar share_id: the share it came from (None for the server token), so
        revoking the share can cut off connections that used it.
    """

    role: Role
    kernel_id: str | None = None
    share_id: str | None = None

    def covers(self, kernel_id: str) -> bool:
        return self.kernel_id is None or self.kernel_id == kernel_id

    def includes(self, other: Grant) -> bool:
        """Whether this grant allows everything C{other} allows."""
        if self.kernel_id is None:
            return self.role is Role.OWNER or other.kernel_id is not None
        return self.kernel_id == other.kernel_id and _RANK[self.role] >= _RANK[other.role]


@attrs.frozen
class Share:
    """A share token's public description (the token itself is shown once)."""

    id: str
    kernel_id: str
    role: Role

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "kernel_id": self.kernel_id, "role": self.role.value}


def _digest(token: str | bytes) -> bytes:
    if isinstance(token, str):
        token = token.encode("utf-8", "replace")
    return hashlib.sha256(token).digest()


def _as_str(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


class TokenAuth:
    """Turns the credentials of a request into a L{Grant}, or None."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._owner = Grant(Role.OWNER)
        self._shares: dict[bytes, tuple[Share, Grant]] = {}
        # login cookie digest -> grant, oldest first (bounded: MAX_LOGINS)
        self._logins: OrderedDict[bytes, Grant] = OrderedDict()

    def __repr__(self) -> str:
        return "TokenAuth(<redacted>)"

    # -- credentials ----------------------------------------------------------

    def grant_for_token(self, candidate: str | bytes | None) -> Grant | None:
        if not candidate:
            return None
        raw = candidate.encode("utf-8", "replace") if isinstance(candidate, str) else candidate
        if hmac.compare_digest(raw, self._token):
            return self._owner
        share = self._shares.get(_digest(raw))
        return share[1] if share else None

    def grant(
        self,
        authorization: str | bytes | None,
        query_tokens: Sequence[str | bytes] = (),
        cookie: str | bytes | None = None,
    ) -> Grant | None:
        """The grant of a request's header, query token or login cookie."""
        if authorization:
            scheme, _, value = _as_str(authorization).strip().partition(" ")
            if scheme.lower() in ("token", "bearer"):
                found = self.grant_for_token(value.strip())
                if found is not None:
                    return found
        for candidate in query_tokens:
            found = self.grant_for_token(candidate)
            if found is not None:
                return found
        if cookie:
            return self._logins.get(_digest(cookie))
        return None

    def check(
        self, authorization: str | bytes | None, query_tokens: Sequence[str | bytes] = ()
    ) -> bool:
        """Whether the credentials are the server token (owner of everything)."""
        return self.grant(authorization, query_tokens) == self._owner

    def web_grant(self, request) -> Grant | None:
        return self.grant(
            request.getHeader(b"authorization"),
            query_tokens(request.uri),
            request.getCookie(COOKIE_NAME.encode()),
        )

    def check_web_request(self, request) -> bool:
        """Whether a web request is the server token's (owner of everything)."""
        return self.web_grant(request) == self._owner

    def upgrade_grant(self, headers: Mapping[str, str], target: str | bytes) -> Grant | None:
        """The grant of a websocket upgrade: Autobahn's request headers and the
        request target (``http_request_uri``), whose query is read by
        L{query_pairs} like every other request's (not by Autobahn's own
        parser, which reads it differently)."""
        return self.grant(headers.get("authorization"), query_tokens(target), _cookie(headers))

    def check_upgrade(self, headers: Mapping[str, str], target: str | bytes) -> bool:
        return self.upgrade_grant(headers, target) == self._owner

    # -- login cookies --------------------------------------------------------

    def login(self, grant: Grant) -> str:
        """A new login cookie value standing for C{grant}."""
        value = secrets.token_urlsafe(32)
        self._logins[_digest(value)] = grant
        while len(self._logins) > MAX_LOGINS:
            self._logins.popitem(last=False)
        return value

    def login_grant(self, cookie: str | bytes | None) -> Grant | None:
        """The grant a login cookie stands for, if it is a live one."""
        return self._logins.get(_digest(cookie)) if cookie else None

    def logout(self, cookie: str | bytes | None) -> None:
        """Forget a login cookie (it was replaced by another)."""
        if cookie:
            self._logins.pop(_digest(cookie), None)

    # -- shares ---------------------------------------------------------------

    def share(self, kernel_id: str, role: Role) -> tuple[Share, str]:
        """Make a share token for one kernel; returns it once, with its record."""
        token = secrets.token_urlsafe(24)
        share = Share(secrets.token_hex(8), kernel_id, role)
        self._shares[_digest(token)] = (share, Grant(role, kernel_id, share.id))
        return share, token

    def shares(self, kernel_id: str) -> list[Share]:
        return [s for s, _ in self._shares.values() if s.kernel_id == kernel_id]

    def revoke(self, kernel_id: str, share_id: str) -> Share | None:
        """Revoke one share (and the logins made with it); None if unknown."""
        for key, (share, _grant) in list(self._shares.items()):
            if share.id == share_id and share.kernel_id == kernel_id:
                del self._shares[key]
                for login, grant in list(self._logins.items()):
                    if grant.share_id == share_id:
                        del self._logins[login]
                return share
        return None

    def forget_kernel(self, kernel_id: str) -> None:
        """Drop every share of a kernel that is gone."""
        for share in self.shares(kernel_id):
            self.revoke(kernel_id, share.id)


def _cookie(headers: Mapping[str, str]) -> str | None:
    raw = headers.get("cookie")
    if not raw:
        return None
    for part in raw.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE_NAME:
            return value
    return None


@attrs.frozen
class OriginPolicy:
    """Which browser origins may open websockets.

    @ivar patterns: regular expressions matched against the WHOLE origin
        (``scheme://host[:port]``), e.g. ``https://([a-z]+\\.)?example\\.org``.
    """

    patterns: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def from_strings(cls, patterns: Iterable[str]) -> OriginPolicy:
        return cls(tuple(re.compile(p) for p in patterns))

    def allows(self, origin: str | None, host: str | None, secure: bool = False) -> bool:
        """Whether a request with this Origin (and Host) header may proceed.

        No Origin header (not a browser) passes; so does the server's own
        origin; anything else must fully match a configured pattern.

        @param secure: the request came over TLS (directly or from a trusted
            proxy): then a plain-http page of the same host is not the
            server's own origin (anybody on the network path could serve it).
        """
        if not origin:
            return True
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        same_host = bool(host and parts.netloc and parts.netloc.lower() == host.lower())
        if same_host and not (secure and parts.scheme.lower() == "http"):
            return True
        return any(p.fullmatch(origin) for p in self.patterns)

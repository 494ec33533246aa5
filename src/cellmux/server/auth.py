# -*- test-case-name: tests.test_origin,tests.security.test_query_tokens -*-
"""Who may do what: the server token, per-kernel share tokens, roles, origins.

* The server token (printed at start) is the owner of every kernel.
* A share token is a capability for ONE kernel with a role, made by an
  owner and revocable by an owner. Share links carry it.
* A named token (``[tokens.NAME]`` in the config) owns the kernels it
  creates, up to its own quota, and sees no others.
* In public mode an anonymous visitor gets a capability: a share token
  for the one kernel minted for them.
* Browsers log in once with a token and get an HttpOnly, SameSite=Strict
  cookie that stands for the same grant.
* Shares, logins and capabilities are kept in the database (only SHA-256
  digests of them) so that a restart keeps them; revoking one ends it in
  memory at once, then in the database.
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
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import attrs
from twisted.logger import Logger

from cellmux.interfaces import ICredentialStore

from .store import Credential, StoreError

__all__ = [
    "COOKIE_NAME",
    "CredentialsUnavailable",
    "Grant",
    "NamedToken",
    "OriginPolicy",
    "Role",
    "Share",
    "TokenAuth",
    "TooManyShares",
    "generate_token",
    "query_pairs",
    "query_tokens",
    "redact_tokens",
    "token_hash",
]

#: The login cookie's name.
COOKIE_NAME = "cellmux-login"
#: Login cookies the server remembers; the oldest is forgotten first (its
#: browser logs in again). Each costs about 200 bytes.
MAX_LOGINS = 10_000
#: Share tokens (and capabilities) one kernel may have at once.
MAX_SHARES_PER_KERNEL = 100
#: Seconds a login cookie lasts by default (30 days).
DEFAULT_LOGIN_LIFETIME = 30 * 24 * 3600.0


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


def token_hash(token: str) -> str:
    """What a config's ``token_hash`` holds for C{token}: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


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

    @ivar kernel_id: the one kernel it is for, or None for all the kernels
        its holder may see (every kernel for the server token; a named
        token's own).
    @ivar share_id: the share (or capability) it came from, so revoking it
        can cut off connections that used it.
    @ivar user: the named token's name (None: the server token, a share or
        a capability).
    @ivar anonymous: a public-mode visitor's capability.
    """

    role: Role
    kernel_id: str | None = None
    share_id: str | None = None
    user: str | None = None
    anonymous: bool = False
    #: kernel id -> owning user, shared with L{TokenAuth} (not part of equality).
    _owners: Mapping[str, str] | None = attrs.field(
        default=None, eq=False, repr=False, alias="owners"
    )

    @property
    def sees_all(self) -> bool:
        """The server token's grant: every kernel, every endpoint."""
        return self.kernel_id is None and self.user is None and self.role is Role.OWNER

    def covers(self, kernel_id: str) -> bool:
        if self.kernel_id is not None:
            return self.kernel_id == kernel_id
        if self.user is not None:
            return self._owners is not None and self._owners.get(kernel_id) == self.user
        return True

    def includes(self, other: Grant) -> bool:
        """Whether this grant allows everything C{other} allows."""
        if self.sees_all:
            return True
        if self.user is not None:
            if other.user is not None or other.kernel_id is None:
                return other.user == self.user
            return self.covers(other.kernel_id)
        if self.kernel_id is None:
            return other.kernel_id is not None
        return self.kernel_id == other.kernel_id and _RANK[self.role] >= _RANK[other.role]


@attrs.frozen
class Share:
    """A share token's public description (the token itself is shown once).

    @ivar kind: C{"share"}, or C{"capability"} for a public-mode visitor's.
    """

    id: str
    kernel_id: str
    role: Role
    kind: str = "share"
    expires: float | None = None

    def to_json(self) -> dict[str, Any]:
        model: dict[str, Any] = {
            "id": self.id,
            "kernel_id": self.kernel_id,
            "role": self.role.value,
        }
        if self.kind != "share":
            model["kind"] = self.kind
        if self.expires is not None:
            model["expires"] = self.expires
        return model


@attrs.frozen
class NamedToken:
    """A user's token from the config (``[tokens.NAME]``): only its digest.

    @ivar max_kernels: most kernels the user may have at once.
    """

    name: str
    digest: bytes
    max_kernels: int


@attrs.frozen
class _Login:
    grant: Grant
    expires: float | None
    #: the stored record's digest (hex), to delete it
    key: str


def _digest(token: str | bytes) -> bytes:
    if isinstance(token, str):
        token = token.encode("utf-8", "replace")
    return hashlib.sha256(token).digest()


def _principal(token_digest: bytes) -> str:
    """What a login of a token records of it: a digest of its digest, so
    that a changed token (or a named token's new hash) ends its logins."""
    return hashlib.sha256(b"cellmux-login-principal\0" + token_digest).hexdigest()


def _as_str(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


class CredentialsUnavailable(Exception):
    """The credential database could not record (or has not yet loaded) a credential."""


class TokenAuth:
    """Turns the credentials of a request into a L{Grant}, or None.

    Lookups are synchronous and answered from memory. With a store that
    provides L{ICredentialStore}, share tokens, login cookies and
    capabilities are also written there before they are handed out, loaded
    from it at start (L{load}), and deleted from it when revoked: memory
    first, so that a revocation takes effect at once even when the database
    is down.

    @param users: the named tokens of the config.
    @param login_lifetime: seconds a login cookie lasts.
    """

    log = Logger()

    def __init__(
        self,
        token: str,
        users: Iterable[NamedToken] = (),
        *,
        clock: Any = None,
        login_lifetime: float = DEFAULT_LOGIN_LIFETIME,
    ) -> None:
        self._token = token.encode()
        self._owner_principal = _principal(_digest(token))
        self._owner = Grant(Role.OWNER)
        self._clock = clock
        self.login_lifetime = login_lifetime
        #: kernel id -> the named token that created it
        self.kernel_owners: dict[str, str] = {}
        self._users: dict[bytes, tuple[NamedToken, Grant]] = {}
        self._users_by_name: dict[str, NamedToken] = {}
        self._set_users(users)
        self._shares: dict[bytes, tuple[Share, Grant]] = {}
        # login cookie digest -> login, oldest first (bounded: MAX_LOGINS)
        self._logins: OrderedDict[bytes, _Login] = OrderedDict()
        self._store: Any = None
        #: Whether the stored credentials are in memory (True without a store).
        self.loaded = True
        # Shares revoked while a read of the store was under way: it may
        # have read them.
        self._revoked_while_loading: set[str] = set()
        # Credentials this server made while a read was under way: it may
        # not have seen them, and a refresh must not drop them. (None: no
        # read is under way.)
        self._made_while_reading: set[bytes] | None = None
        # Logins forgotten while a read was under way: it may have read them.
        self._dropped_while_reading: set[bytes] = set()
        # Logins the database could not record: only this server has them.
        self._memory_only: set[bytes] = set()

    def __repr__(self) -> str:
        return "TokenAuth(<redacted>)"

    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    # -- credentials ----------------------------------------------------------

    def grant_for_token(self, candidate: str | bytes | None) -> Grant | None:
        if not candidate:
            return None
        raw = candidate.encode("utf-8", "replace") if isinstance(candidate, str) else candidate
        if hmac.compare_digest(raw, self._token):
            return self._owner
        digest = _digest(raw)
        user = self._users.get(digest)
        if user is not None:
            return user[1]
        share = self._shares.get(digest)
        if share is None:
            return None
        if share[0].expires is not None and share[0].expires <= self._now():
            return None
        return share[1]

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
        return self.login_grant(cookie)

    def web_grant(self, request) -> Grant | None:
        return self.grant(
            request.getHeader(b"authorization"),
            query_tokens(request.uri),
            request.getCookie(COOKIE_NAME.encode()),
        )

    def check_web_request(self, request) -> bool:
        """Whether a web request is the server token's (owner of everything)."""
        return self.web_grant(request) == self._owner

    def refusal(self, request) -> tuple[int, str]:
        """The status and message for a request whose credentials gave no
        grant: 503 while the stored credentials could not be loaded (the
        request may carry one of them), else 403."""
        carries = (
            request.getHeader(b"authorization")
            or query_tokens(request.uri)
            or request.getCookie(COOKIE_NAME.encode())
        )
        if carries and not self.loaded:
            return 503, (
                "the credential database is unavailable, so share links, logins and "
                "capabilities cannot be checked yet; try again shortly"
            )
        return 403, "a valid token is required"

    def upgrade_grant(self, headers: Mapping[str, str], target: str | bytes) -> Grant | None:
        """The grant of a websocket upgrade: Autobahn's request headers and the
        request target (``http_request_uri``), whose query is read by
        L{query_pairs} like every other request's (not by Autobahn's own
        parser, which reads it differently)."""
        return self.grant(headers.get("authorization"), query_tokens(target), _cookie(headers))

    # -- named tokens -----------------------------------------------------------

    def _set_users(self, users: Iterable[NamedToken]) -> None:
        self._users = {
            u.digest: (u, Grant(Role.OWNER, user=u.name, owners=self.kernel_owners)) for u in users
        }
        self._users_by_name = {u.name: u for u, _ in self._users.values()}

    def replace_users(self, users: Iterable[NamedToken]) -> bool:
        """Take a new set of named tokens (the config file was re-read);
        whether anything changed. A token that is gone or has a new hash
        stops working at once, and so do the logins made with it; the
        kernels a user owns stay theirs."""
        users = list(users)
        before = {u.name: (u.digest, u.max_kernels) for u in self._users_by_name.values()}
        after = {u.name: (u.digest, u.max_kernels) for u in users}
        if before == after:
            return False
        self._set_users(users)
        for key, login in list(self._logins.items()):
            name = login.grant.user
            if name is None:
                continue
            user = self._users_by_name.get(name)
            if user is None or before.get(name, (None,))[0] != user.digest:
                self.logout_digest(key)
            else:  # the same token: its grant now carries the new quota's user
                self._logins[key] = attrs.evolve(login, grant=self._users[user.digest][1])
        return True

    def user(self, name: str) -> NamedToken | None:
        return self._users_by_name.get(name)

    def user_kernels(self, name: str, alive: Callable[[str], bool]) -> list[str]:
        """The ids of a user's kernels that still exist (forgets the others)."""
        for kernel_id in [k for k, u in self.kernel_owners.items() if not alive(k)]:
            del self.kernel_owners[kernel_id]
        return [k for k, u in self.kernel_owners.items() if u == name]

    # -- the store ----------------------------------------------------------------

    @property
    def keeps_credentials(self) -> bool:
        """Whether a store keeps the credentials (L{attach_store})."""
        return self._store is not None

    def attach_store(self, store: Any) -> bool:
        """Keep credentials in C{store} from now on, if it can; whether it can."""
        if not ICredentialStore.providedBy(store):
            return False
        self._store = store
        self.loaded = False
        return True

    async def load(self) -> int:
        """Bring the stored credentials into memory; how many were loaded.

        Logins whose token changed since (the server token, a named token's
        hash) or whose share is gone are deleted instead.
        @raise StoreError: the database failed (nothing changes).
        """
        return await self._read(replace=False)

    async def refresh(self) -> int:
        """Replace the stored credentials in memory with what the store holds
        now: shares, logins and capabilities made or revoked by the other
        fronts sharing the database (docs/scaling.md). What this server made
        since the read began, and logins only memory has, stay.

        @raise StoreError: the database failed (nothing changes).
        """
        return await self._read(replace=self.loaded)

    async def _read(self, *, replace: bool) -> int:
        if self._store is None:
            self.loaded = True
            return 0
        self._made_while_reading = set()
        self._dropped_while_reading = set()
        if self.loaded:
            self._revoked_while_loading = set()
        try:
            records = await self._store.load_credentials(self._now())
        except BaseException:
            self._made_while_reading = None
            raise
        made, self._made_while_reading = self._made_while_reading, None
        stale: list[str] = []
        shares: dict[bytes, tuple[Share, Grant]] = {}
        revoked, self._revoked_while_loading = self._revoked_while_loading, set()
        for r in records:
            if r.kind not in ("share", "capability") or r.kernel_id is None:
                continue
            if r.id in revoked:  # read before its deletion reached the database
                continue
            share = Share(r.id, r.kernel_id, Role(r.role), r.kind, r.expires)
            grant = Grant(share.role, r.kernel_id, r.id, anonymous=r.kind == "capability")
            shares[bytes.fromhex(r.digest)] = (share, grant)
        share_ids = {s.id for s, _ in shares.values()}
        logins: list[tuple[bytes, _Login]] = []
        for r in records:
            if r.kind != "login":
                continue
            login_grant = self._login_record_grant(r, share_ids)
            if login_grant is None:
                stale.append(r.digest)
                continue
            if bytes.fromhex(r.digest) in self._dropped_while_reading:
                continue  # logged out here after the read saw it
            logins.append((bytes.fromhex(r.digest), _Login(login_grant, r.expires, r.digest)))
        # What was made while loading stays; what was loaded comes first.
        # A refresh keeps only that of what memory had (the rest is what the
        # database held before: it may have been revoked since).
        keep_share = (lambda d: d in made) if replace else (lambda d: True)
        shares.update((d, v) for d, v in self._shares.items() if keep_share(d))
        self._shares = shares
        self._memory_only &= self._logins.keys()
        kept = self._memory_only | made
        merged = OrderedDict(logins[-MAX_LOGINS:])
        merged.update((d, v) for d, v in self._logins.items() if not replace or d in kept)
        self._logins = merged
        self._trim_logins()
        self.loaded = True
        for digest in stale:
            self._background(self._store.delete_credentials(digest=digest), "a stale login")
        return len(shares) + len(logins)

    def _login_record_grant(self, r: Any, share_ids: set[str]) -> Grant | None:
        role = Role(r.role)
        if r.share_id is not None:
            if r.share_id not in share_ids or r.kernel_id is None:
                return None
            return Grant(role, r.kernel_id, r.share_id)
        if r.user_name is not None:
            user = self._users_by_name.get(r.user_name)
            if user is None or r.principal != _principal(user.digest):
                return None
            return self._users[user.digest][1]
        if r.principal != self._owner_principal or role is not Role.OWNER:
            return None
        return self._owner

    def _made(self, digest: bytes) -> None:
        if self._made_while_reading is not None:
            self._made_while_reading.add(digest)

    def _background(self, d: Any, what: str) -> None:
        def failed(failure) -> None:
            self.log.warn(
                "could not delete {what} from the credential database: {error}",
                what=what,
                error=failure.value,
            )

        d.addErrback(failed)

    async def _record(self, credential: Credential) -> None:
        if self._store is None:
            return
        try:
            await self._store.insert_credential(credential)
        except StoreError as e:
            raise CredentialsUnavailable(
                f"the credential database is unavailable, so nothing was made: {e}"
            ) from e

    # -- login cookies --------------------------------------------------------

    async def login(self, grant: Grant) -> tuple[str, bool]:
        """A new login cookie value standing for C{grant}, and whether it
        was stored (it lasts across restarts). A database that fails makes
        a login that lasts until this server stops (logged)."""
        value = secrets.token_urlsafe(32)
        digest = _digest(value)
        now = self._now()
        expires = now + self.login_lifetime if self.login_lifetime else None
        principal = None
        if grant.sees_all:
            principal = self._owner_principal
        elif grant.user is not None:
            principal = _principal(self._users_by_name[grant.user].digest)
        lasting = True
        try:
            await self._record(
                Credential(
                    digest.hex(),
                    "login",
                    secrets.token_hex(8),
                    grant.role.value,
                    grant.kernel_id,
                    grant.share_id,
                    grant.user,
                    principal,
                    now,
                    expires,
                )
            )
        except CredentialsUnavailable as e:
            self.log.warn("a login is kept in memory only: {error}", error=e)
            lasting = False
        self._logins[digest] = _Login(grant, expires, digest.hex())
        self._made(digest)
        if not lasting:
            self._memory_only.add(digest)
        self._trim_logins()
        return value, lasting and self._store is not None

    def _trim_logins(self) -> None:
        while len(self._logins) > MAX_LOGINS:
            _, old = self._logins.popitem(last=False)
            if self._store is not None:
                self._background(self._store.delete_credentials(digest=old.key), "an old login")

    def login_grant(self, cookie: str | bytes | None) -> Grant | None:
        """The grant a login cookie stands for, if it is a live one."""
        if not cookie:
            return None
        digest = _digest(cookie)
        login = self._logins.get(digest)
        if login is None:
            return None
        if login.expires is not None and login.expires <= self._now():
            self.logout(cookie)
            return None
        return login.grant

    def logout(self, cookie: str | bytes | None) -> None:
        """Forget a login cookie (it was replaced by another, or expired)."""
        if not cookie:
            return
        self.logout_digest(_digest(cookie))

    def logout_digest(self, digest: bytes) -> None:
        """Forget the login whose cookie has this digest."""
        if self._made_while_reading is not None:
            self._dropped_while_reading.add(digest)
        login = self._logins.pop(digest, None)
        if login is not None and self._store is not None:
            self._background(self._store.delete_credentials(digest=login.key), "a login")

    # -- shares ---------------------------------------------------------------

    async def share(
        self,
        kernel_id: str,
        role: Role,
        *,
        kind: str = "share",
        expires_in: float | None = None,
    ) -> tuple[Share, str]:
        """Make a share token (or an anonymous capability) for one kernel;
        returns it once, with its record.

        @raise CredentialsUnavailable: the database could not store it.
        """
        now = self._now()
        for old in self.shares(kernel_id):
            if old.expires is not None and old.expires <= now:  # expired: make room
                self._forget_share(kernel_id, old.id)
                if self._store is not None:
                    self._background(
                        self._store.delete_credentials(kernel_id=kernel_id, share_id=old.id),
                        "an expired share",
                    )
        if len(self.shares(kernel_id)) >= MAX_SHARES_PER_KERNEL:
            raise TooManyShares(
                f"this kernel has {MAX_SHARES_PER_KERNEL} shares, the most it may have; "
                "revoke some first"
            )
        token = secrets.token_urlsafe(24)
        expires = now + expires_in if expires_in else None
        share = Share(secrets.token_hex(8), kernel_id, role, kind, expires)
        digest = _digest(token)
        await self._record(
            Credential(
                digest.hex(),
                kind,
                share.id,
                role.value,
                kernel_id,
                share.id,
                None,
                None,
                now,
                expires,
            )
        )
        grant = Grant(role, kernel_id, share.id, anonymous=kind == "capability")
        self._shares[digest] = (share, grant)
        self._made(digest)
        return share, token

    def shares(self, kernel_id: str) -> list[Share]:
        return [s for s, _ in self._shares.values() if s.kernel_id == kernel_id]

    def _forget_share(self, kernel_id: str, share_id: str) -> Share | None:
        """Memory only: the share and the logins made with it."""
        if not self.loaded or self._made_while_reading is not None:
            self._revoked_while_loading.add(share_id)
        found = None
        for key, (share, _grant) in list(self._shares.items()):
            if share.id == share_id and share.kernel_id == kernel_id:
                del self._shares[key]
                found = share
        for login, entry in list(self._logins.items()):
            if entry.grant.share_id == share_id and entry.grant.kernel_id == kernel_id:
                del self._logins[login]
        return found

    async def revoke(self, kernel_id: str, share_id: str) -> Share | None:
        """Revoke one share (and the logins made with it); None if unknown.

        It stops working at once, in memory; then it is deleted from the
        database. @raise CredentialsUnavailable: that deletion failed (the
        share no longer works here, but a restart would bring it back).
        """
        share = self._forget_share(kernel_id, share_id)
        if self._store is None:
            return share
        try:
            deleted = await self._store.delete_credentials(kernel_id=kernel_id, share_id=share_id)
        except StoreError as e:
            raise CredentialsUnavailable(
                "the share no longer works on this server, but the credential database "
                f"could not delete it ({e}); a restart would bring it back: revoke it again"
            ) from e
        if share is None and deleted:
            share = Share(share_id, kernel_id, Role.OBSERVER)
        return share

    def forget_kernel(self, kernel_id: str) -> None:
        """Drop every share, capability and login of a kernel that is gone."""
        for share in self.shares(kernel_id):
            self._forget_share(kernel_id, share.id)
        self.kernel_owners.pop(kernel_id, None)
        if self._store is not None:
            self._background(
                self._store.delete_credentials(kernel_id=kernel_id), f"kernel {kernel_id}'s shares"
            )


class TooManyShares(Exception):
    """A kernel has as many shares as it may have."""


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

"""Sans-IO parts of several fronts: ids tagged by front and the proxy's rule
(hypothesis), the committed HAProxy config agreeing with that rule, and how
a front re-reads the credentials other fronts store (docs/scaling.md)."""

from __future__ import annotations

import hashlib
import os
import re
import uuid

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.python.failure import Failure
from zope.interface import implementer

from cellmux.config import ConfigError, ServerConfig
from cellmux.interfaces import ICredentialStore
from cellmux.server.auth import Role, TokenAuth
from cellmux.server.fronts import (
    PATH_PATTERN,
    ROUTED_PARAMETER,
    front_tag,
    mint_kernel_id,
    mint_token,
    route,
    tag_of,
    validate_front_id,
)
from cellmux.server.store import StoreUnavailable

front_ids = st.from_regex(r"[0-9a-f]{1,8}", fullmatch=True)
randoms = st.binary(min_size=16, max_size=16)


@given(front_ids, randoms)
def test_a_tagged_kernel_id_is_a_version_4_uuid_that_names_its_front(front_id, random):
    tag = front_tag(front_id)
    kernel_id = mint_kernel_id(tag, random)
    parsed = uuid.UUID(kernel_id)
    assert str(parsed) == kernel_id  # canonical: lowercase, dashes
    assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert tag_of(kernel_id) == tag and int(tag, 16) == int(front_id, 16)


@given(randoms)
def test_without_a_front_id_ids_are_plain_random_uuids(random):
    assert front_tag(None) is None
    assert mint_kernel_id(None, random) == str(uuid.UUID(bytes=random, version=4))


@given(st.text(max_size=12))
def test_a_front_id_is_one_to_eight_lowercase_hex_digits(text):
    valid = re.fullmatch(r"[0-9a-f]{1,8}", text) is not None
    if valid:
        assert validate_front_id(text) == text
        assert ServerConfig(front_id=text).front_id == text
    else:
        with pytest.raises(ValueError):
            validate_front_id(text)
        with pytest.raises(ConfigError):
            ServerConfig(front_id=text)


#: Every way a request names an id a front minted (docs/scaling.md).
TARGETS = [
    "/api/kernels/{k}",
    "/api/kernels/{k}/",
    "/api/kernels/{k}/interrupt",
    "/api/kernels/{k}/shares/{s}",
    "/api/kernels/{k}/channels?session_id={s}&token={t}",
    "/files/{k}/",
    "/files/{k}/some%20dir/data.csv",
    "/ws?kernel={k}",
    "/ws?kernel={k}&token={t}",
    "/ws?token={t}&kernel={k}",
    "/poll?kernel={k}",
    "/poll/{c}?seq=3&ctl=1",
    "/api/sessions/{j}",
    "/login?kernel={k}&token={t}&next=/%3Fkernel%3D{k}",
]


@given(
    st.lists(front_ids, min_size=1, max_size=6, unique_by=lambda f: int(f, 16)),
    st.data(),
    st.sampled_from(TARGETS),
    randoms,
)
def test_the_proxy_rule_sends_every_request_that_names_an_id_to_its_front(
    ids, data, template, random
):
    tags = [front_tag(f) for f in ids]
    holder = data.draw(st.sampled_from(tags))
    target = template.format(
        k=mint_kernel_id(holder, random),
        j=mint_kernel_id(holder),
        c=mint_token(holder),
        s=random.hex()[:16],
        t=data.draw(st.from_regex(r"[0-9a-f]{48}", fullmatch=True)),
    )
    assert route(target, tags) == holder


@pytest.mark.parametrize(
    "target",
    ["/", "/?kernel=", "/api/kernels", "/api/kernelspecs", "/login", "/static/app.js", "/poll"],
)
def test_requests_that_name_no_id_go_to_any_front(target):
    assert route(target, [front_tag("f1"), front_tag("f2")]) is None


def test_the_committed_haproxy_config_uses_the_same_rule():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "haproxy.cfg")
    with open(path) as f:
        acls = re.findall(r"^\s*acl names_(\w+) (.+)$", f.read(), re.MULTILINE)
    expected = []
    for front in ("f1", "f2"):
        tag = front_tag(front)
        expected.append((front, "path_reg " + PATH_PATTERN.format(tag=tag)))
        expected.append((front, f"url_param({ROUTED_PARAMETER}) -m beg {tag}-"))
    assert acls == expected


@given(st.from_regex(r"[A-Za-z0-9_-]{32}", fullmatch=True), randoms)
def test_no_token_passes_for_a_tag(share_token, random):
    # Even a token made to look like another front's tag routes nowhere.
    for value in (share_token, front_tag("f2") + "-" + share_token):
        for target in (f"/ws?token={value}", f"/login?token={value}&next=/", "/?x=" + value):
            assert route(target, [front_tag("f1"), front_tag("f2")]) is None
    kernel_id = mint_kernel_id(front_tag("f1"), random)
    forged = f"/ws?kernel={kernel_id}&token={front_tag('f2')}-{share_token}"
    assert route(forged, [front_tag("f2"), front_tag("f1")]) == front_tag("f1")


# -- re-reading the credentials other fronts store ------------------------------


@implementer(ICredentialStore)
@attrs.define
class SharedRows:
    """The rows of one shared credential table, as each front's store reads
    them (the real database is tests/test_fronts.py's); C{hold} makes the
    next read wait until the test fires it, C{down} makes calls fail."""

    rows: dict = attrs.Factory(dict)
    hold: defer.Deferred | None = None
    down: bool = False

    def insert_credential(self, credential):
        if self.down:
            return defer.fail(StoreUnavailable("down"))
        self.rows[credential.digest] = credential
        return defer.succeed(None)

    def load_credentials(self, now):
        if self.down:
            return defer.fail(StoreUnavailable("down"))
        snapshot = list(self.rows.values())
        if self.hold is not None:
            held, self.hold = self.hold, None
            return held.addCallback(lambda _: snapshot)
        return defer.succeed(snapshot)

    def delete_credentials(self, digest=None, kernel_id=None, share_id=None):
        if self.down:
            return defer.fail(StoreUnavailable("down"))
        doomed = [
            d
            for d, r in self.rows.items()
            if (digest is None or d == digest)
            and (kernel_id is None or r.kernel_id == kernel_id)
            and (share_id is None or r.share_id == share_id)
        ]
        for d in doomed:
            del self.rows[d]
        return defer.succeed(len(doomed))


def two_fronts():
    rows, clock = SharedRows(), task.Clock()
    clock.advance(1000)
    fronts = []
    for _ in range(2):
        auth = TokenAuth("owner-token", clock=clock)
        auth.attach_store(rows)
        assert defer.ensureDeferred(auth.load()).called
        fronts.append(auth)
    return rows, fronts


def run(coroutine):
    """The result of a coroutine that finishes at once (or its exception)."""
    outcome: list = []
    d = defer.ensureDeferred(coroutine)
    d.addBoth(outcome.append)
    assert outcome, "it waited"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def test_a_refresh_brings_in_what_another_front_made_and_drops_what_it_revoked():
    _, (a, b) = two_fronts()
    share, share_token = run(a.share("000000f1-k", Role.OBSERVER))
    cookie, lasting = run(a.login(a.grant_for_token("owner-token")))
    assert lasting
    assert b.grant_for_token(share_token) is None and b.login_grant(cookie) is None
    run(b.refresh())
    assert b.grant_for_token(share_token).kernel_id == "000000f1-k"
    assert b.login_grant(cookie).sees_all
    run(a.revoke("000000f1-k", share.id))
    assert b.grant_for_token(share_token) is not None  # until the next refresh
    run(b.refresh())
    assert b.grant_for_token(share_token) is None


def test_what_a_front_makes_or_revokes_while_it_reads_is_not_undone_by_the_read():
    rows, (_, b) = two_fronts()
    old, old_token = run(b.share("000000f2-k", Role.OBSERVER))
    cookie, _ = run(b.login(b.grant_for_token("owner-token")))
    hold = rows.hold = defer.Deferred()
    reading = defer.ensureDeferred(b.refresh())  # its rows: the old share, the login
    _, made_token = run(b.share("000000f2-k", Role.OBSERVER))
    run(b.revoke("000000f2-k", old.id))
    b.logout(cookie)
    hold.callback(None)  # the read ends with what it read before all three
    assert reading.called
    assert b.grant_for_token(made_token) is not None
    assert b.grant_for_token(old_token) is None
    assert b.login_grant(cookie) is None
    run(b.refresh())
    assert b.grant_for_token(made_token) is not None
    assert b.grant_for_token(old_token) is None
    assert b.login_grant(cookie) is None


def test_a_database_that_is_down_changes_nothing_and_memory_only_logins_stay():
    rows, (a, b) = two_fronts()
    _, share_token = run(a.share("000000f1-k", Role.OBSERVER))
    run(b.refresh())
    rows.down = True
    kept_cookie, lasting = run(b.login(b.grant_for_token("owner-token")))
    assert not lasting
    with pytest.raises(StoreUnavailable):
        run(b.refresh())
    assert b.grant_for_token(share_token) is not None
    rows.down = False
    run(b.refresh())
    assert b.grant_for_token(share_token) is not None
    assert b.login_grant(kept_cookie) is not None  # only memory has it: kept


def test_a_front_re_reads_every_credential_refresh_seconds_and_says_once_when_it_cannot():
    from twisted.logger import capturedLogs

    from cellmux.server.service import CellmuxService

    rows, (a, _) = two_fronts()
    clock = task.Clock()
    service = CellmuxService(ServerConfig(front_id="f2", credential_refresh=5.0), "t", clock)
    service.auth.attach_store(rows)
    run(service.auth.load())
    service._start_credentials_refresh()
    _, share_token = run(a.share("000000f1-k", Role.OBSERVER))
    clock.advance(4.9)
    assert service.auth.grant_for_token(share_token) is None
    clock.advance(0.1)
    assert service.auth.grant_for_token(share_token) is not None
    rows.down = True
    with capturedLogs() as logged:
        for _ in range(5):
            clock.advance(5.0)
    assert [e["log_format"][:31] for e in logged] == ["cannot re-read stored credentia"]
    assert service.auth.grant_for_token(share_token) is not None  # kept
    rows.down = False
    with capturedLogs() as logged:
        clock.advance(5.0)
    assert [e["log_format"] for e in logged] == ["re-reading stored credentials works again"]
    service._credentials_refresh.stop()


def _user(name: str, token: str, max_kernels: int = 10):
    from cellmux.server.auth import NamedToken

    return NamedToken(name, hashlib.sha256(token.encode()).digest(), max_kernels)


def test_named_tokens_replaced_from_a_re_read_config_take_effect_at_once():
    auth = TokenAuth("owner-token", [_user("alice", "a-token")])
    alice_cookie, _ = run(auth.login(auth.grant_for_token("a-token")))
    assert not auth.replace_users([_user("alice", "a-token")])  # nothing changed
    # bob is added, alice's quota changes: her login keeps working.
    assert auth.replace_users([_user("alice", "a-token", 3), _user("bob", "b-token")])
    assert auth.grant_for_token("b-token").user == "bob"
    assert auth.user("alice").max_kernels == 3
    assert auth.login_grant(alice_cookie).user == "alice"
    # alice gets a new token: the old one and its login stop.
    assert auth.replace_users([_user("alice", "a-new"), _user("bob", "b-token")])
    assert auth.grant_for_token("a-token") is None
    assert auth.login_grant(alice_cookie) is None
    assert auth.grant_for_token("a-new").user == "alice"
    # bob is removed.
    assert auth.replace_users([_user("alice", "a-new")])
    assert auth.grant_for_token("b-token") is None

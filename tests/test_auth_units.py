"""TokenAuth's time and scope rules and public mode's per-address limits,
on a fake clock; the credentials table's migration on a real SQLite file."""

from __future__ import annotations

import contextlib
import sqlite3

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.python.failure import Failure

from cellmux.server.auth import Grant, NamedToken, Role, TokenAuth, _digest
from cellmux.server.public import MAX_ADDRESSES, AddressLimits, LimitExceeded
from cellmux.server.store import MIGRATIONS, Credential, SQLiteStore
from db_fixtures import reactor_thread


def result(coroutine):
    """The result of a coroutine that does not wait (no store)."""
    found = []
    defer.ensureDeferred(coroutine).addBoth(found.append)
    (value,) = found
    if isinstance(value, Failure):
        value.raiseException()
    return value


def test_logins_and_shares_end_when_they_expire():
    clock = task.Clock()
    auth = TokenAuth("owner-token", clock=clock, login_lifetime=100)
    cookie, lasting = result(auth.login(auth.grant_for_token("owner-token")))
    assert lasting is False  # no store: it lasts until the server stops
    share, share_token = result(auth.share("k1", Role.OBSERVER, expires_in=50))
    assert auth.login_grant(cookie).sees_all
    assert auth.grant_for_token(share_token) == Grant(Role.OBSERVER, "k1", share.id)
    clock.advance(50)
    assert auth.grant_for_token(share_token) is None
    assert auth.login_grant(cookie) is not None
    clock.advance(50)
    assert auth.login_grant(cookie) is None
    assert auth.grant(None, (), cookie) is None


def test_a_named_token_covers_the_kernels_it_created_only():
    alice = NamedToken("alice", _digest("a-token"), 2)
    auth = TokenAuth("owner-token", [alice])
    grant = auth.grant_for_token("a-token")
    assert grant.user == "alice" and not grant.sees_all
    assert not grant.covers("k1")
    auth.kernel_owners["k1"] = "alice"
    auth.kernel_owners["k2"] = "bob"
    assert grant.covers("k1") and not grant.covers("k2")
    assert grant.includes(Grant(Role.COLLABORATOR, "k1", "s"))
    assert not grant.includes(Grant(Role.COLLABORATOR, "k2", "s"))
    assert auth.grant_for_token("owner-token").includes(grant)
    assert not grant.includes(auth.grant_for_token("owner-token"))
    assert auth.user_kernels("alice", lambda k: k != "k1") == []
    assert "k1" not in auth.kernel_owners  # a kernel that is gone is forgotten


def test_revoking_ends_a_share_and_its_logins_at_once():
    auth = TokenAuth("owner-token")
    share, share_token = result(auth.share("k1", Role.COLLABORATOR))
    _other, other_token = result(auth.share("k1", Role.OBSERVER))
    cookie, _ = result(auth.login(auth.grant_for_token(share_token)))
    assert result(auth.revoke("k1", share.id)) == share
    assert auth.grant_for_token(share_token) is None
    assert auth.login_grant(cookie) is None
    assert auth.grant_for_token(other_token) is not None
    assert result(auth.revoke("k1", share.id)) is None


def test_the_requests_limit_is_per_address_and_per_minute():
    clock = task.Clock()
    limits = AddressLimits(kernels=2, requests=3, clock=clock)
    for _ in range(3):
        limits.request("10.0.0.1")
    with pytest.raises(LimitExceeded, match="at most 3 a minute") as caught:
        limits.request("10.0.0.1")
    assert caught.value.retry_after == 60
    limits.request("10.0.0.2")  # another address has its own budget
    clock.advance(59)
    with pytest.raises(LimitExceeded):
        limits.request("10.0.0.1")
    clock.advance(1)
    limits.request("10.0.0.1")


def test_the_kernels_limit_counts_live_kernels_and_creations_under_way():
    limits = AddressLimits(kernels=2, requests=100, clock=task.Clock())
    alive = {"k1"}
    first = limits.reserve_kernel("a", alive.__contains__)
    limits.settle_kernel("a", first, "k1")
    second = limits.reserve_kernel("a", alive.__contains__)  # under way
    with pytest.raises(LimitExceeded, match="already has 2 kernel"):
        limits.reserve_kernel("a", alive.__contains__)
    limits.settle_kernel("a", second, None)  # that creation failed
    third = limits.reserve_kernel("a", alive.__contains__)
    limits.settle_kernel("a", third, "k3")  # k3 never became alive: it ended
    alive.discard("k1")
    limits.reserve_kernel("a", alive.__contains__)


@given(st.lists(st.integers(min_value=0, max_value=MAX_ADDRESSES * 2), max_size=50))
def test_the_address_tables_stay_bounded(addresses):
    limits = AddressLimits(kernels=1, requests=1, clock=task.Clock())
    for number in addresses:
        with contextlib.suppress(LimitExceeded):
            limits.request(str(number))
    assert len(limits._windows) <= MAX_ADDRESSES


def test_a_version_1_database_gains_the_credentials_table_and_keeps_its_permalinks(tmp_path):
    path = str(tmp_path / "old.sqlite3")
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE cellmux_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO cellmux_schema (version) VALUES (1)")
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO permalinks VALUES ('abc', 'print(1)', 'python', '{}', 1.0)")
    rt = reactor_thread()
    store = SQLiteStore(rt.reactor, path, timeout=5.0)
    try:
        assert rt.call(store.schema_version) == 2
        assert rt.call(store.get, "abc").code == "print(1)"
        live = Credential("aa" * 32, "share", "s1", "observer", "k1", "s1", None, None, 1.0, None)
        gone = Credential("bb" * 32, "login", "l1", "owner", None, None, None, "p", 1.0, 5.0)
        rt.call(store.insert_credential, live)
        rt.call(store.insert_credential, gone)
        assert rt.call(store.load_credentials, 10.0) == [live]  # the expired one is deleted
        assert rt.call(store.delete_credentials, kernel_id="k1") == 1
        assert rt.call(store.load_credentials, 0.0) == []
    finally:
        rt.call(store.close)


def test_idle_visitors_kernels_are_those_left_alone_long_enough():
    from types import SimpleNamespace

    from cellmux.server.public import idle_kernels

    def kernel(state: str, last: float, clients: int = 0):
        return SimpleNamespace(
            state=SimpleNamespace(value=state), last_activity=last, clients=set(range(clients))
        )

    left = kernel("idle", 0.0)
    dead = kernel("dead", 0.0)
    watched = kernel("idle", 0.0, clients=1)
    busy = kernel("busy", 0.0)
    recent = kernel("idle", 95.0)
    assert idle_kernels([left, dead, watched, busy, recent], now=100.0, timeout=10) == [left, dead]


def test_with_the_database_gone_a_revocation_still_takes_effect_at_once(tmp_path):
    from cellmux.server.auth import CredentialsUnavailable

    rt = reactor_thread()
    store = SQLiteStore(rt.reactor, str(tmp_path / "c.sqlite3"), timeout=5.0)
    auth = TokenAuth("owner-token", clock=rt.reactor)
    assert auth.attach_store(store) and not auth.loaded
    assert rt.call(auth.load) == 0 and auth.loaded
    share, share_token = rt.call(auth.share, "k1", Role.COLLABORATOR)
    cookie, lasting = rt.call(auth.login, auth.grant_for_token(share_token))
    assert lasting
    rt.call(store.close)  # from now on every call fails: StoreUnavailable
    with pytest.raises(CredentialsUnavailable, match="revoke it again"):
        rt.call(auth.revoke, "k1", share.id)
    assert auth.grant_for_token(share_token) is None and auth.login_grant(cookie) is None
    with pytest.raises(CredentialsUnavailable, match="nothing was made"):
        rt.call(auth.share, "k1", Role.OBSERVER)
    # A login still works, in memory only.
    _, lasting = rt.call(auth.login, auth.grant_for_token("owner-token"))
    assert lasting is False


def test_a_share_revoked_while_the_load_reads_it_stays_revoked(tmp_path):
    rt = reactor_thread()
    store = SQLiteStore(rt.reactor, str(tmp_path / "c.sqlite3"), timeout=5.0)
    try:
        record = Credential(
            _digest("share-token").hex(),
            "share",
            "s1",
            "observer",
            "k1",
            "s1",
            None,
            None,
            1.0,
            None,
        )
        rt.call(store.insert_credential, record)
        auth = TokenAuth("owner-token", clock=rt.reactor)
        auth.attach_store(store)
        # The revocation's memory step lands between the load's read and its
        # end (its database delete comes after the read).
        auth._forget_share("k1", "s1")
        rt.call(auth.load)
        assert auth.grant_for_token("share-token") is None
    finally:
        rt.call(store.close)


def test_a_kernel_has_at_most_100_live_shares_and_expired_ones_make_room():
    from cellmux.server.auth import MAX_SHARES_PER_KERNEL, TooManyShares

    clock = task.Clock()
    auth = TokenAuth("owner-token", clock=clock)
    for _ in range(MAX_SHARES_PER_KERNEL - 1):
        result(auth.share("k1", Role.OBSERVER))
    result(auth.share("k1", Role.OBSERVER, expires_in=10))
    with pytest.raises(TooManyShares, match="revoke some first"):
        result(auth.share("k1", Role.OBSERVER))
    result(auth.share("k2", Role.OBSERVER))  # another kernel has its own
    clock.advance(10)
    result(auth.share("k1", Role.OBSERVER))
    assert len(auth.shares("k1")) == MAX_SHARES_PER_KERNEL

"""The front's registry of kernel hosts, driven by a Clock: timeouts,
placement by free capacity and label, epochs, keys, and the two steps of
taking a host (back): its hello, then its beat for that hello."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from cellmux.protocol.hostlink import HOSTLINK_VERSION, Beat, Hello
from cellmux.server.hosts import HOST_LOST, HostRegistry, HostUnavailable


class Lost(list):
    def __call__(self, name: str, cause: str) -> None:
        self.append((name, cause))


def registry(
    timeout: float = 3.0, ready: list[str] | None = None
) -> tuple[Clock, HostRegistry, Lost]:
    clock, lost = Clock(), Lost()
    on_ready = (lambda host: ready.append(host.name)) if ready is not None else (lambda host: None)
    return clock, HostRegistry(clock, timeout, lost, on_ready), lost


def hello(name="a", labels=(), max_kernels=4, epoch=1) -> Hello:
    return Hello(name, labels, max_kernels, epoch)


def join(hosts: HostRegistry, identity: bytes, key: bytes, said: Hello) -> None:
    """A host's hello, and its first beat once welcomed (what makes it ready)."""
    assert hosts.hello(identity, key, said).host is not None
    hosts.beat(identity, Beat(0, said.max_kernels, seq=said.seq))


def nobody(name: str) -> int:
    return 0


def test_a_silent_host_is_lost_after_the_timeout_and_only_then() -> None:
    clock, hosts, lost = registry(timeout=3.0)
    hosts.hello(b"id-a", b"key-a", hello("a"))
    hosts.hello(b"id-b", b"key-b", hello("b"))
    for _ in range(5):  # b beats every second; a says nothing
        clock.advance(1.0)
        hosts.beat(b"id-b", Beat(0, 4))
        hosts.check()
        if lost:
            break
    assert lost == [("a", HOST_LOST)]
    assert clock.seconds() == 4.0  # > 3 s of silence, checked each second
    assert [h.name for h in hosts.live()] == ["b"]
    assert hosts.by_identity(b"id-a") is None
    # Traffic from a lost host's connection proves nothing: it must say hello.
    assert hosts.seen(b"id-a") is None
    assert hosts.beat(b"id-a", Beat(0, 4)) is None
    hosts.check()
    assert lost == [("a", HOST_LOST)]  # reported once


def test_a_returning_host_is_taken_back_fresh() -> None:
    clock, hosts, lost = registry()
    hosts.hello(b"id-1", b"key", hello("a", epoch=7))
    hosts.beat(b"id-1", Beat(running=4, max_kernels=4))
    clock.advance(5)
    hosts.check()
    assert lost == [("a", HOST_LOST)]
    # The same process on a new connection after it was lost: its kernels
    # were reported dead, so it starts fresh (and kills them).
    admission = hosts.hello(b"id-2", b"key", hello("a", epoch=7))
    assert admission.refused is None and admission.fresh
    assert hosts.by_identity(b"id-2").live
    hosts.beat(b"id-2", Beat(running=0, max_kernels=4))
    # What it reported before was its dead kernels: it has room again.
    assert hosts.place(None, None, nobody) == "a"


def test_a_hello_again_on_the_same_connection_keeps_the_kernels() -> None:
    clock, hosts, lost = registry()
    hosts.hello(b"id-1", b"key", hello("a", epoch=7))
    clock.advance(1)
    admission = hosts.hello(b"id-1", b"key", hello("a", epoch=7))  # its welcome was lost
    assert not admission.fresh
    assert lost == []


def test_a_new_connection_of_the_same_process_ends_its_kernels() -> None:
    # The host ends a front's kernels when it loses that front's connection
    # (and says hello anew): the front reports them dead, not alive forever.
    clock, hosts, lost = registry()
    hosts.hello(b"id-1", b"key", hello("a", epoch=7))
    clock.advance(1)
    admission = hosts.hello(b"id-2", b"key", hello("a", epoch=7))
    assert admission.fresh
    assert lost == [("a", HOST_LOST)]
    assert hosts.by_identity(b"id-1") is None  # the old connection speaks no more
    assert hosts.by_identity(b"id-2").live


def test_a_new_epoch_means_the_old_process_and_its_kernels_are_gone() -> None:
    clock, hosts, lost = registry()
    hosts.hello(b"id-1", b"key", hello("a", epoch=1))
    clock.advance(1)
    admission = hosts.hello(b"id-2", b"key", hello("a", epoch=2))
    assert admission.fresh
    assert lost == [("a", HOST_LOST)]
    assert hosts.hosts["a"].live


def test_a_live_name_cannot_be_taken_by_another_key() -> None:
    clock, hosts, lost = registry()
    hosts.hello(b"id-1", b"key-1", hello("a"))
    refused = hosts.hello(b"id-2", b"key-2", hello("a", epoch=2))
    assert refused.host is None and "another key" in refused.refused
    assert lost == []
    # Once the first is lost (key rotation: restarted with a new key), it may.
    clock.advance(4)
    hosts.check()
    assert hosts.hello(b"id-2", b"key-2", hello("a", epoch=2)).refused is None


def test_placement_prefers_the_most_free_capacity() -> None:
    _clock, hosts, _lost = registry()
    join(hosts, b"id-a", b"ka", hello("a", max_kernels=4))
    join(hosts, b"id-b", b"kb", hello("b", max_kernels=8))
    assert hosts.place(None, None, nobody) == "b"
    hosts.beat(b"id-b", Beat(running=6, max_kernels=8))
    assert hosts.place(None, None, nobody) == "a"
    # The front's own count counts when the host's report lags behind.
    assert hosts.place(None, None, lambda name: 4 if name == "a" else 0) == "b"
    # The front itself on a tie or better; not when it has no room.
    assert hosts.place(None, 4, nobody) is None
    assert hosts.place(None, 0, nobody) == "a"


def test_placement_by_label() -> None:
    clock, hosts, _lost = registry()
    join(hosts, b"id-a", b"ka", hello("a", labels=("gpu",), max_kernels=2))
    join(hosts, b"id-b", b"kb", hello("b", max_kernels=50))
    assert hosts.place("gpu", None, nobody) == "a"
    with pytest.raises(HostUnavailable, match="tpu"):
        hosts.place("tpu", None, nobody)
    hosts.beat(b"id-a", Beat(running=2, max_kernels=2))
    with pytest.raises(HostUnavailable, match="full"):
        hosts.place("gpu", None, nobody)
    clock.advance(4)
    hosts.beat(b"id-b", Beat(0, 50))
    hosts.check()  # a is lost: no gpu host at all
    with pytest.raises(HostUnavailable, match="no live kernel host has the label"):
        hosts.place("gpu", None, nobody)


def test_nothing_to_place_on() -> None:
    _clock, hosts, _lost = registry()
    with pytest.raises(HostUnavailable):
        hosts.place(None, None, nobody)
    assert hosts.place(None, 1, nobody) is None


def test_an_older_hello_delivered_late_changes_nothing() -> None:
    # Hellos queued while a link was down arrive after the newer one that
    # got the host back: acting on one would end the kernels placed since.
    clock, hosts, lost = registry()
    first = Hello("a", (), 4, 7, seq=3)
    assert hosts.hello(b"id-old", b"key", first).host is not None
    clock.advance(5)
    hosts.check()
    assert lost == [("a", HOST_LOST)]
    newer = hosts.hello(b"id-new", b"key", Hello("a", (), 4, 7, seq=5))
    assert newer.host is not None and newer.fresh
    for seq, identity in ((4, b"id-old"), (4, b"id-new"), (3, b"id-old")):
        late = hosts.hello(identity, b"key", Hello("a", (), 4, 7, seq=seq))
        assert late.stale and late.host is None and late.refused is None
    assert lost == [("a", HOST_LOST)]  # not lost again
    assert hosts.by_identity(b"id-new") is newer.host
    # A beat of an older session proves the connection alive, changes
    # nothing it reports.
    hosts.beat(b"id-new", Beat(running=3, max_kernels=9, seq=3))
    assert (newer.host.running, newer.host.max_kernels) == (0, 4)
    hosts.beat(b"id-new", Beat(running=3, max_kernels=9, seq=5))
    assert (newer.host.running, newer.host.max_kernels) == (3, 9)
    # A new process (another epoch) counts its hellos from 1 again.
    restarted = hosts.hello(b"id-3", b"key", Hello("a", (), 4, 8, seq=1))
    assert restarted.host is not None and not restarted.stale


def test_a_host_takes_kernels_only_after_its_beat_for_the_hello() -> None:
    ready: list[str] = []
    _clock, hosts, lost = registry(ready=ready)
    admission = hosts.hello(b"id-1", b"key", Hello("a", (), 4, 7, seq=2))
    assert admission.host is not None and admission.fresh
    assert not admission.host.ready and admission.host.model()["live"] is False
    with pytest.raises(HostUnavailable):
        hosts.place(None, None, nobody)
    assert hosts.place(None, 1, nobody) is None  # the front itself, meanwhile
    # A beat of an older session (queued before this hello) proves nothing.
    hosts.beat(b"id-1", Beat(0, 4, seq=1))
    assert ready == [] and hosts.live() == []
    hosts.beat(b"id-1", Beat(1, 4, seq=2))
    assert ready == ["a"] and hosts.place(None, None, nobody) == "a"
    assert admission.host.model()["live"] is True
    hosts.beat(b"id-1", Beat(1, 4, seq=2))
    assert ready == ["a"]  # told once
    # A hello again on the same connection (its welcome was lost) keeps it
    # ready: the connection works, and its kernels are kept.
    again = hosts.hello(b"id-1", b"key", Hello("a", (), 4, 7, seq=3))
    assert not again.fresh and again.host is not None and again.host.ready
    assert lost == [] and ready == ["a"]


def test_a_late_hello_from_a_connection_that_is_gone_takes_no_kernels() -> None:
    # The race left in issue 17: the link is cut; the host's hellos queued
    # in the old TCP connection arrive when it comes back, before the new
    # connection's. The welcome to that old connection goes nowhere, so no
    # beat for it ever comes: nothing is placed there, and the new
    # connection's hello takes the host back.
    ready: list[str] = []
    clock, hosts, lost = registry(timeout=2.0, ready=ready)
    join(hosts, b"id-old", b"key", Hello("a", (), 4, 7, seq=1))
    assert ready == ["a"]
    clock.advance(3)
    hosts.check()
    assert lost == [("a", HOST_LOST)]
    late = hosts.hello(b"id-old", b"key", Hello("a", (), 4, 7, seq=3))
    assert late.host is not None and late.fresh and not late.stale
    hosts.beat(b"id-old", Beat(2, 4, seq=1))  # the old session's beat, late too
    with pytest.raises(HostUnavailable):
        hosts.place(None, None, nobody)
    assert ready == ["a"]
    clock.advance(0.5)
    newer = hosts.hello(b"id-new", b"key", Hello("a", (), 4, 7, seq=4))
    assert newer.host is not None and newer.fresh
    assert hosts.by_identity(b"id-old") is None
    with pytest.raises(HostUnavailable):
        hosts.place(None, None, nobody)
    hosts.beat(b"id-new", Beat(0, 4, seq=4))
    assert ready == ["a", "a"] and hosts.place(None, None, nobody) == "a"
    assert hosts.hosts["a"].identity == b"id-new"
    # If no newer hello came at all, the unconfirmed one is lost in time.
    clock.advance(3)
    hosts.check()
    late = hosts.hello(b"id-gone", b"key", Hello("a", (), 4, 7, seq=9))
    assert late.host is not None
    clock.advance(3)
    hosts.check()
    assert hosts.live() == [] and not hosts.hosts["a"].live


def test_a_host_newer_than_the_front_is_refused_and_older_ones_are_taken() -> None:
    # A newer host may send link traffic this front cannot read (version 2
    # brought bundles): refused at its hello, with what to do.
    _, hosts, _ = registry()
    newer = Hello("a", (), 4, 1, version=HOSTLINK_VERSION + 1)
    admission = hosts.hello(b"id-a", b"key", newer)
    assert admission.host is None
    assert admission.refused == (
        f"it speaks host link version {HOSTLINK_VERSION + 1}, this front"
        f" {HOSTLINK_VERSION}: upgrade the fronts first"
    )
    assert hosts.live() == []
    join(hosts, b"id-b", b"key-b", Hello("b", (), 4, 1, version=1))
    join(hosts, b"id-c", b"key-c", hello("c"))
    assert sorted(h.name for h in hosts.live()) == ["b", "c"]

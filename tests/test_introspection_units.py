"""The server's bookkeeping of unanswered introspection requests, on a fake clock."""

from __future__ import annotations

import json
import time

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from cellmux.kernel.introspection import MAX_NAMES, describe_namespace
from cellmux.server.introspection import (
    MAX_ANSWERED,
    MAX_PENDING,
    UnansweredIntrospection,
)


def header(msg_id: str, msg_type: str = "complete_request") -> bytes:
    return json.dumps({"msg_id": msg_id, "msg_type": msg_type, "session": "s"}).encode()


def parent(msg_id: str) -> bytes:
    return json.dumps({"msg_id": msg_id}).encode()


class Tracker:
    def __init__(self, timeout: float = 2.0) -> None:
        self.clock = Clock()
        self.answers: list[tuple[str, dict]] = []
        self.unanswered = UnansweredIntrospection(
            self.clock,
            lambda: timeout,
            lambda request, content: self.answers.append((request["msg_id"], content)),
        )


def test_a_reply_within_the_bound_is_relayed_and_nothing_else_happens():
    t = Tracker()
    t.unanswered.sent(header("a"))
    t.clock.advance(1.9)
    assert t.unanswered.replied(parent("a"))
    t.clock.advance(10)
    assert t.answers == [] and len(t.unanswered) == 0


def test_no_reply_within_the_bound_is_answered_unresponsive_and_the_late_reply_dropped():
    t = Tracker()
    t.unanswered.sent(header("a", "inspect_request"))
    t.clock.advance(1.99)
    assert t.answers == []
    t.clock.advance(0.02)
    [(msg_id, content)] = t.answers
    assert msg_id == "a"
    assert content["status"] == "unresponsive" and content["ename"] == "KernelUnresponsive"
    assert "2 s" in content["evalue"]
    assert not t.unanswered.replied(parent("a"))  # the kernel's late reply
    assert t.unanswered.replied(parent("a"))  # forgotten after that: not ours


def test_going_unresponsive_answers_everything_waiting_at_once():
    t = Tracker()
    for msg_id in "abc":
        t.unanswered.sent(header(msg_id))
    t.clock.advance(0.5)
    t.unanswered.unresponsive()
    assert [a for a, _ in t.answers] == ["a", "b", "c"]
    t.clock.advance(10)
    assert len(t.answers) == 3  # the timers were cancelled


def test_a_request_to_an_unresponsive_kernel_is_answered_at_once():
    t = Tracker()
    assert t.unanswered.refuse(header("a"))
    assert t.answers[0][0] == "a" and "unresponsive" in t.answers[0][1]["evalue"]
    assert not t.unanswered.replied(parent("a"))
    assert not t.unanswered.refuse(b"not json")
    assert not t.unanswered.refuse(json.dumps({"msg_id": "x", "msg_type": "stream"}).encode())


def test_a_process_that_ends_owes_nothing():
    t = Tracker()
    t.unanswered.sent(header("a"))
    t.unanswered.clear()
    t.clock.advance(10)
    assert t.answers == [] and len(t.unanswered) == 0


def test_pending_and_remembered_requests_are_bounded():
    t = Tracker()
    for n in range(MAX_PENDING + 10):
        t.unanswered.sent(header(str(n)))
    assert len(t.unanswered) == MAX_PENDING
    assert [a for a, _ in t.answers] == [str(n) for n in range(10)]  # oldest first
    t.unanswered.unresponsive()
    assert len(t.unanswered._answered) == MAX_ANSWERED


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["send", "reply", "advance", "silent"]),
            st.integers(0, 5),
            st.floats(0, 3),
        ),
        max_size=40,
    )
)
def test_every_request_gets_exactly_one_reply(events):
    """Whatever the order of requests, replies, time and silence: one reply
    reaches the client per request that was answered at all."""
    t = Tracker()
    relayed: list[str] = []
    sent: set[str] = set()
    replied: set[str] = set()
    for n, (kind, number, seconds) in enumerate(events):
        msg_id = f"{number}-{n // 8}"
        if kind == "send" and msg_id not in sent:
            sent.add(msg_id)
            t.unanswered.sent(header(msg_id))
        elif kind == "reply" and msg_id in sent - replied:
            replied.add(msg_id)  # a kernel replies once to each request
            if t.unanswered.replied(parent(msg_id)):
                relayed.append(msg_id)
        elif kind == "advance":
            t.clock.advance(seconds)
        elif kind == "silent":
            t.unanswered.unresponsive()
    replies = relayed + [a for a, _ in t.answers]
    assert len(replies) == len(set(replies))


def test_a_namespace_listing_is_bounded_and_leaves_out_what_the_user_did_not_make():
    import os

    class Loud:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    namespace = {
        "x": 1,
        "text": "a" * 10_000,
        "items": list(range(100_000)),
        "_private": 2,
        "os": os,
        "In": [],
        "bad": Loud(),
    }

    class Slow:
        def __repr__(self) -> str:
            while True:
                pass

    namespace["slow"] = Slow()
    started = time.monotonic()
    listing = describe_namespace(namespace, hidden={"In": namespace["In"]})
    assert time.monotonic() - started < 2
    by_name = {v["name"]: v for v in listing["variables"]}
    assert sorted(by_name) == ["bad", "items", "slow", "text", "x"]
    assert by_name["slow"]["repr"] == "<repr took too long>"
    assert by_name["items"]["size"] == "100000" and by_name["items"]["type"] == "list"
    assert len(by_name["text"]["repr"]) <= 120
    assert by_name["bad"]["repr"].startswith("<Loud instance")  # a repr that raises
    assert "size" not in by_name["x"] and listing["truncated"] is False
    many = describe_namespace({f"v{n:05}": n for n in range(MAX_NAMES + 5)})
    assert len(many["variables"]) == MAX_NAMES and many["truncated"] is True


def test_completions_start_after_what_every_match_repeats():
    from cellmux.kernel.introspection import _shared_head

    assert _shared_head(".pa", [".path", ".pardir"]) == 1
    assert _shared_head("os.pa", ["os.path"]) == 3
    assert _shared_head("needle_v", ["needle_value"]) == 0
    assert _shared_head("a.b.c", ["a.b.cd", "a.x"]) == 2
    assert _shared_head("", []) == 0

"""The bounded buffers' cores, driven by a fake clock: prompts, session owners, history."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from cellmux.server.history import HISTORY_CHARS, HISTORY_ENTRY_CHARS, HISTORY_LENGTH, InputHistory
from cellmux.server.stdin import (
    MAX_PENDING_PROMPTS,
    MAX_PROMPT_BYTES,
    PendingInput,
    PendingPrompts,
    SessionOwners,
    cut_prompt,
)


def prompts(clock: Clock, timeout: float = 10.0):
    ended: list[tuple[str, str, bool]] = []

    def expired(pending: PendingInput, why: str, answer: bool) -> None:
        ended.append((pending.session, why, answer))

    held = PendingPrompts(clock, lambda: timeout, expired)
    return held, ended


def prompt(session: str, size: int = 10) -> PendingInput:
    return PendingInput(session, b"f" * size, b"{}", b"{}")


def test_prompts_beyond_the_bound_push_out_the_oldest_without_answering_the_kernel():
    clock = Clock()
    held, ended = prompts(clock)
    for i in range(MAX_PENDING_PROMPTS + 5):
        held.hold(prompt(f"s{i}", 1000))
    assert len(held) == MAX_PENDING_PROMPTS
    assert [s for s, _, _ in ended] == [f"s{i}" for i in range(5)]
    # no end-of-file: ipykernel would take it as the answer to its real input()
    assert all("were waiting" in why and not answer for _, why, answer in ended)
    assert held.nbytes == MAX_PENDING_PROMPTS * 1004
    assert held.get("s0") is None and held.get(f"s{MAX_PENDING_PROMPTS + 4}") is not None


def test_a_prompt_waits_for_its_client_then_times_out_once():
    clock = Clock()
    held, ended = prompts(clock, timeout=10)
    held.hold(prompt("a"))
    held.wait("a")
    held.wait("a")  # a second detach does not start a second timer
    clock.advance(5)
    assert held.client_back("a") is not None  # the client came back: no timeout
    clock.advance(20)
    assert ended == []
    held.wait("a")
    clock.advance(10)
    assert ended == [("a", "no client answered this input request in 10 s", True)]
    assert len(held) == 0 and clock.getDelayedCalls() == []


def test_a_new_prompt_of_the_same_session_is_not_ended_by_the_old_ones_timer():
    clock = Clock()
    held, ended = prompts(clock, timeout=10)
    held.hold(prompt("a"))
    held.wait("a")
    clock.advance(9)
    held.hold(prompt("a", 20))
    clock.advance(2)
    assert ended == [] and held.get("a").frame == b"f" * 20


def test_answered_interrupted_and_dropped_prompts_leave_no_timers():
    clock = Clock()
    held, ended = prompts(clock)
    for s in "abc":
        held.hold(prompt(s))
        held.wait(s)
    held.answered("a")
    held.answered("unknown")
    assert len(clock.getDelayedCalls()) == 2
    held.drop_all()
    assert len(held) == 0 and clock.getDelayedCalls() == [] and ended == []


def test_a_session_belongs_to_the_first_grant_that_claims_it():
    owners = SessionOwners(limit=3)
    assert owners.claim("s", "owner")
    assert not owners.claim("s", "collaborator")
    assert owners.claim("s", "owner")
    for i in range(3):
        owners.claim(f"other{i}", "collaborator")
    assert len(owners) == 3  # bounded: the least recently used went
    assert owners.claim("s", "collaborator")
    assert not owners.claim("x" * 201, "owner")  # too long to keep
    assert len(owners) == 3


@given(st.lists(st.tuples(st.integers(0, 3 * HISTORY_ENTRY_CHARS), st.integers(1, 300))))
def test_history_stays_within_its_bounds_and_keeps_the_newest(inputs):
    history = InputHistory()
    for n, (size, session_len) in enumerate(inputs):
        entry = history.append("x" * size, "s" * session_len, str(n))
        assert len(entry.code) <= HISTORY_ENTRY_CHARS
        assert entry.length == (size if size > HISTORY_ENTRY_CHARS else None)
        assert len(history) <= HISTORY_LENGTH
        assert history.chars == sum(e.size for e in history) <= HISTORY_CHARS
        assert list(history)[-1] is entry  # the newest is always kept
    times = [int(e.time) for e in history]
    assert times == sorted(times) and (not inputs or times[-1] == len(inputs) - 1)


def test_history_reports_cut_entries():
    history = InputHistory(entry_chars=4)
    assert history.append("123456", "s", "t").to_json() == {
        "code": "1234",
        "session": "s",
        "time": "t",
        "truncated": True,
        "length": 6,
    }
    assert "truncated" not in history.append("12", "s", "t").to_json()


def test_a_too_large_prompt_is_cut_to_fit_or_refused():
    content = json.dumps({"prompt": "p" * (1 << 20), "password": False}).encode()
    cut = cut_prompt([b"{}", b"{}", b"{}", content, b"buffer"])
    assert cut is not None and sum(map(len, cut)) <= MAX_PROMPT_BYTES
    assert cut[4] == b"buffer"
    prompt = json.loads(cut[3])["prompt"]
    assert prompt.startswith("p" * 4096) and "cut from 1048576 characters" in prompt
    assert json.loads(cut[3])["password"] is False
    assert cut_prompt([b"h" * MAX_PROMPT_BYTES, b"{}", b"{}", content]) is None
    assert cut_prompt([b"{}", b"{}", b"{}", b"[" * 100_000]) is None
    assert cut_prompt([b"{}", b"{}", b"{}", b'{"prompt": 3}']) is None

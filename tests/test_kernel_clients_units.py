"""A kernel's attached clients by session (server/kernels.py): an attach or
detach looks at the clients of its own session only, so a thousand
observers coming and going cost O(N), not O(N^2); and a prompt's
reconnect timeout starts exactly when the last client of its session
leaves, as when every client was looked at."""

from __future__ import annotations

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmux.protocol import Channel
from cellmux.server.stdin import PendingInput
from test_lifecycle_units import Harness


@attrs.define(eq=False)
class CountingClient:
    """A client that counts how often anything asks for its session."""

    _session: str = "s1"
    answers: bool = True
    reads: list[int] = attrs.Factory(lambda: [0])
    frames: list = attrs.Factory(list)

    @property
    def session(self) -> str:
        self.reads[0] += 1
        return self._session

    @session.setter
    def session(self, value: str) -> None:
        self._session = value

    def wants(self, channel: int) -> bool:
        return self.answers or channel != Channel.STDIN

    def send_frame(self, data: bytes) -> None:
        self.frames.append(data)

    def kernel_gone(self, reason: str) -> None:
        pass


def _prompt(kernel, session: str) -> PendingInput:
    pending = PendingInput(session, b"frame", b"{}", b"{}")
    kernel.prompts.hold(pending)
    return pending


def test_a_thousand_observers_attach_and_detach_in_linear_time():
    h = Harness()
    kernel = h.create()
    reads = [0]
    clients = [CountingClient(f"s{i}", answers=False, reads=reads) for i in range(1000)]
    for c in clients:
        kernel.attach(c)
    attach_reads, reads[0] = reads[0], 0
    for c in clients:
        kernel.detach(c)
    # Each attach and detach reads its own client's session a few times;
    # looking at every attached client per detach read it ~500,000 times.
    assert attach_reads <= 4 * len(clients)
    assert reads[0] <= 4 * len(clients)
    assert not kernel.clients


def test_the_prompt_timeout_starts_when_the_last_client_of_its_session_leaves():
    h = Harness()
    kernel = h.create()
    a, b, other = CountingClient("s1"), CountingClient("s1"), CountingClient("s2")
    for c in (a, b, other):
        kernel.attach(c)
    pending = _prompt(kernel, "s1")
    kernel.detach(a)
    assert pending.timer is None  # b, of the same session, is still here
    kernel.detach(other)
    assert pending.timer is None
    kernel.detach(b)
    assert pending.timer is not None and pending.timer.active()
    kernel.attach(CountingClient("s1"))  # back: the timeout stops
    assert pending.timer is None


def test_a_client_that_moves_to_another_session_is_counted_there():
    h = Harness()
    kernel = h.create()
    mover, stayer = CountingClient("s1"), CountingClient("s2")
    kernel.attach(mover)
    kernel.attach(stayer)
    pending = _prompt(kernel, "s2")
    mover.session = "s2"
    kernel.session_moved(mover, "s1")
    kernel.detach(stayer)
    assert pending.timer is None  # mover is of s2 now
    kernel.detach(mover)
    assert pending.timer is not None


def _looking_at_everyone(attached: list[CountingClient], leaving: CountingClient) -> bool:
    """Whether a detach starts the timeout, by the rule before the index:
    no client left of the leaver's session."""
    return not any(c._session == leaving._session for c in attached if c is not leaving)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["attach", "detach", "move"]), st.integers(0, 5), st.integers(0, 2)
        ),
        max_size=40,
    )
)
def test_detach_starts_the_timeout_as_looking_at_every_client_did(actions):
    h = Harness()
    kernel = h.create()
    clients = [CountingClient("s0") for _ in range(6)]
    attached: list[CountingClient] = []
    for action, i, s in actions:
        client, session = clients[i], f"s{s}"
        if action == "attach" and client not in attached:
            client.session = session
            kernel.attach(client)
            attached.append(client)
        elif action == "move" and client in attached and client._session != session:
            before, client.session = client._session, session
            kernel.session_moved(client, before)
        elif action == "detach" and client in attached:
            pending = _prompt(kernel, client._session)
            expected = _looking_at_everyone(attached, client)
            kernel.detach(client)
            attached.remove(client)
            assert (pending.timer is not None) == expected
            pending.stop_timer()
    assert kernel.clients == set(attached)

"""Kernels as clients see them, the processes behind them, and the pool.

A L{Kernel} is what a client attaches to: a stable id, a state, attached
clients, a frame counter and a replay log. Behind it is an L{Incarnation}:
one forked process with its own link id and secret. A restart gives the
same Kernel a new Incarnation, so the id, the numbering and the clients'
websockets survive.

A kernel's state changes only through its L{Lifecycle} (the transition
table in L{cellmux.server.lifecycle}); the L{KernelManager} decides which
event happened and the Kernel publishes what the table says.

The manager keeps ``pool_size`` incarnations forked and ready, so creating
a kernel usually only takes one from the pool. Twice a second it pings
the link of every busy kernel (one that cannot answer holds the GIL), idle
ones only every C{idle_ping_interval} so that a thousand idle kernels cost
next to nothing, and ends kernels that outlived their idle timeout or
lifetime. A tick looks only at what is due (L{cellmux.server.liveness}):
busy kernels and pings waiting for an answer, the idle ones whose ping is
due, the kernels whose cull time may have come; not at every kernel. It restarts a lost nursery
with back-off, and backs off when kernels keep failing to start.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from cellmux.cleanup import remove_tree
from cellmux.protocol import (
    DEFAULT_LINK_CREDIT,
    Channel,
    JupyterSocket,
    boundedjson,
    encode_tag,
    frame_bytes,
)
from cellmux.protocol.jupyter import jupyter_parts

from . import fronts
from .counters import ServerCounters
from .history import HISTORY_LENGTH, HistoryEntry, InputHistory
from .introspection import UnansweredIntrospection
from .kernelspecs import KernelSpec, KernelSpecs
from .lifecycle import (
    RUNNING,
    Answered,
    Backoff,
    Bound,
    Ended,
    Event,
    Exited,
    KernelState,
    Lifecycle,
    RestartBegun,
    RestartBudget,
    RestartFailed,
    Said,
    Silent,
    Transition,
)
from .links import KernelUnreachable, LinkUnavailable
from .liveness import DueQueue, WatchSet
from .pooldemand import PoolDemand
from .replay import ReplayLog
from .runtimedir import disk_full
from .stdin import MAX_PROMPT_BYTES, PendingInput, PendingPrompts, SessionOwners, cut_prompt

if TYPE_CHECKING:
    from .hosts import HostRouter

__all__ = [
    "HISTORY_LENGTH",
    "ClientSink",
    "HistoryEntry",
    "Kernel",
    "KernelError",
    "KernelHost",
    "KernelLost",
    "KernelManager",
    "KernelNotFound",
    "KernelNotRunning",
    "KernelStartFailed",
    "KernelState",
    "NurseryUnavailable",
    "OutOfDescriptors",
    "TooManyKernels",
    "credit_window",
    "iso_timestamp",
]

#: States in which a kernel's link is pinged on every tick.
WATCHED = frozenset({KernelState.BUSY, KernelState.UNRESPONSIVE})
#: Seconds between link pings and culling checks.
TICK = 0.5
#: Automatic restarts allowed within RESTART_WINDOW seconds (no crash loops).
MAX_AUTO_RESTARTS = 3
RESTART_WINDOW = 60.0
#: Seconds to put off work that a request caused but need not wait for
#: (refilling the pool): long enough for the response to be sent first.
AFTER_RESPONSE = 0.005
#: Back-off between attempts to start a new nursery, and between pool
#: refills while kernels keep failing to start: 0.5 s doubling to 30 s.
#: A nursery that ran this long before it died starts the count afresh.
BACKOFF_FIRST = 0.5
#: Seconds before a kernel host whose pool kernel failed to start is tried again.
HOST_POOL_RETRY = 5.0
BACKOFF_CAP = 30.0
NURSERY_STABLE_AFTER = 30.0


class KernelError(Exception):
    """A request about a kernel that cannot be carried out.

    Each subclass carries what every front end answers with: C{code}, a
    short machine-readable reason (websocket errors), and C{status}, the
    HTTP status (REST). This is the one table of both.
    """

    code = "kernel_error"
    status = HTTPStatus.INTERNAL_SERVER_ERROR


class KernelNotFound(KernelError):
    code = "unknown_kernel"
    status = HTTPStatus.NOT_FOUND


class KernelLost(KernelError):
    """The kernel belonged to a server process that stopped or crashed.

    404 like an unknown id (Jupyter clients and gateways treat 404 as "this
    kernel is gone" and anything else as a server error); the code and the
    message say why.
    """

    code = "kernel_lost"
    status = HTTPStatus.NOT_FOUND


class KernelOnLostFront(KernelLost):
    """The id names a kernel of another front, and the proxy sent the request
    here: that front is down, and its kernels ended with it (scaling.md)."""

    code = "front_gone"


class KernelStartFailed(KernelError):
    code = "kernel_start_failed"
    status = HTTPStatus.INTERNAL_SERVER_ERROR


class TooManyKernels(KernelError):
    code = "too_many_kernels"
    status = HTTPStatus.SERVICE_UNAVAILABLE


class OutOfDescriptors(TooManyKernels):
    """The server is near its open files limit (limits.py): no new process."""

    code = "out_of_descriptors"


class RuntimeDiskFull(KernelError):
    """No new kernel: the runtime directory's disk is full (running ones go on)."""

    code = "disk_full"
    status = HTTPStatus.INSUFFICIENT_STORAGE


class KernelNotRunning(KernelError):
    code = "kernel_not_running"
    status = HTTPStatus.CONFLICT


class NurseryUnavailable(KernelError):
    """No nursery runs (it was lost and a new one is not ready yet)."""

    code = "nursery_unavailable"
    status = HTTPStatus.SERVICE_UNAVAILABLE


class NoKernelHost(KernelError):
    """No live kernel host (with the label asked for) can take a kernel."""

    code = "no_kernel_host"
    status = HTTPStatus.SERVICE_UNAVAILABLE


def credit_window(replay_bytes: int) -> int:
    """Link credit per kernel: at most half the replay log, so that what a
    kernel may send after its writer stopped reading still fits in it."""
    return max(1, min(DEFAULT_LINK_CREDIT, replay_bytes // 2))


class ClientSink(Protocol):
    """An attached client, as the kernel sees it (a websocket connection)."""

    session: str

    def wants(self, channel: int) -> bool: ...

    def send_frame(self, data: bytes) -> None: ...

    def kernel_gone(self, reason: str) -> None: ...


@attrs.define(eq=False)
class Incarnation:
    """One kernel process: its link, readiness, credit and liveness."""

    link_id: bytes
    secret: bytes
    ready: defer.Deferred = attrs.Factory(defer.Deferred)
    pid: int | None = None
    kernel: Kernel | None = None
    timeout: Any = None
    #: The process's private working directory (made by the nursery).
    workdir: str = ""
    #: Bytes the process may still send before it waits for credit.
    credit: int = DEFAULT_LINK_CREDIT
    #: The ping we wait for an answer to (number, time sent), if any.
    ping: tuple[int, float] | None = None
    pings_sent: int = 0
    #: When the last ping went out, if one did.
    last_ping: float | None = None
    #: A cell was sent that the kernel has not reported idle after: it may
    #: hold the GIL before its ``busy`` even leaves the process.
    awaiting: bool = False
    #: Why it failed to start, once it did.
    error: KernelError | None = None
    #: The kernel host it runs on (None: this server's own nursery).
    host: str | None = None
    #: When its next idle ping is due, while it is off the tick's watch
    #: (entries of the manager's queue with another time are stale).
    idle_ping_due: float | None = None

    @property
    def link(self) -> str:
        return self.link_id.hex()


@attrs.define
class _Timer:
    """A delayed call that may not have been started."""

    call: Any = None

    def active(self) -> bool:
        return self.call is not None and self.call.active()

    def cancel(self) -> None:
        if self.active():
            self.call.cancel()
        self.call = None


def iso_timestamp(ts: float) -> str:
    # Jupyter clients parse this with %Y-%m-%dT%H:%M:%S.%fZ.
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parent_session(parent_header: bytes) -> str | None:
    try:
        session = boundedjson.loads(parent_header).get("session")
    except (ValueError, AttributeError):
        return None
    return session if isinstance(session, str) else None


class KernelHost(Protocol):
    """What a L{Kernel} needs from whoever runs it (the kernel manager)."""

    clock: Any
    config: Any

    def send_to_process(self, inc: Incarnation, channel: int, socket: int, parts: list) -> None:
        """Relay a client message to the process. @raise KernelUnreachable"""

    def grant_credit(self, kernel: Kernel) -> None:
        """The kernel may be owed link credit again (a client caught up)."""

    def went_idle(self, kernel: Kernel) -> None:
        """The kernel finished a request (busy to idle)."""

    def watch(self, inc: Incarnation) -> None:
        """Look at C{inc}'s liveness on every tick again (it went busy)."""


class Kernel:
    """A kernel id with its clients; numbers, logs and relays frames."""

    log = Logger()

    def __init__(self, manager: KernelHost, kernel_id: str, name: str) -> None:
        self.id = kernel_id
        self.name = name
        # The host, not the whole manager: see KernelHost.
        self._manager = manager
        self._clock = manager.clock
        self.lifecycle = Lifecycle()
        self.incarnation: Incarnation | None = None
        self.clients: set[ClientSink] = set()
        #: The attached clients by the session they declared (each client
        #: in one set): an attach or detach looks at its own session's only,
        #: not at every client (a thousand observers came in O(N^2)).
        self._by_session: dict[str, set[ClientSink]] = {}
        self.seq = 0
        self.replay = ReplayLog(manager.config.replay_bytes, getattr(manager, "counters", None))
        self.created = self._clock.seconds()
        #: The last request from, or attach or detach of, a client, or
        #: output while a client was attached (what culling measures).
        self.last_activity = self.created
        #: Bytes of output since the last client left (none while attached).
        self.unwatched_bytes = 0
        self.history = InputHistory()
        #: Clients that slow the kernel down when they cannot keep up.
        self.writers: set[ClientSink] = set()
        self._congested: set[ClientSink] = set()
        # input_request frames waiting for their session's client to attach
        self.prompts = PendingPrompts(
            self._clock, lambda: manager.config.stdin_timeout, self._end_input
        )
        #: Which grant owns each session id here: only it gets its prompts.
        self.session_owners = SessionOwners()
        #: Introspection requests not answered yet: the server answers
        #: ``unresponsive`` for a kernel whose GIL is held by C code.
        self.unanswered = UnansweredIntrospection(
            self._clock, lambda: manager.config.unresponsive_after, self._answer_for_kernel
        )
        #: Automatic restarts left (no crash loops).
        self.restarts = RestartBudget(MAX_AUTO_RESTARTS, RESTART_WINDOW)
        #: Start a fresh process under this id when this one dies (the
        #: server's auto_restart, or set when a Jupyter client attaches).
        self.auto_restart: bool = manager.config.auto_restart
        #: The directory each of its processes starts in (None: a private
        #: one of its own; see cellmux.server.jupyter.workdirs).
        self.cwd: str | None = None
        #: The host label its creator asked for (restarts keep to it), and
        #: the host its last process ran on (None: this server).
        self.host_label: str | None = None
        self.host: str | None = None

    @property
    def state(self) -> KernelState:
        return self.lifecycle.state

    @property
    def cause(self) -> str | None:
        return self.lifecycle.cause

    def model(self) -> dict[str, Any]:
        """The Jupyter kernel model, plus cellmux's own fields."""
        state = self.state
        model = {
            "id": self.id,
            "name": self.name,
            "last_activity": iso_timestamp(self.last_activity),
            "started": iso_timestamp(self.created),
            "execution_state": "dead" if state is KernelState.ENDED else state.value,
            "connections": len(self.clients),
            "pid": self.incarnation.pid if self.incarnation else None,
            # The kernel host it runs on (None: the server itself).
            "host": self.incarnation.host if self.incarnation else self.host,
        }
        if self.cause is not None:
            model["reason"] = self.cause
        return model

    @property
    def workdir(self) -> str | None:
        """The current process's working directory (None while none runs)."""
        return self.incarnation.workdir if self.incarnation else None

    # -- the lifecycle ---------------------------------------------------------

    def handle(self, event: Event) -> Transition:
        """Apply a lifecycle event and publish the status it calls for.

        @raise IllegalTransition: if the kernel's state refuses C{event}.
        """
        transition = self.lifecycle.handle(event)
        if transition.publish is not None:
            self.publish(Channel.STATUS, "status", transition.publish)
        if transition.after is KernelState.UNRESPONSIVE:
            self.unanswered.unresponsive()
        if transition.after in WATCHED and self.incarnation is not None:
            self._manager.watch(self.incarnation)
        return transition

    def bind(self, incarnation: Incarnation) -> None:
        """Give the kernel a ready process (first start or restart)."""
        self.handle(Bound())
        incarnation.kernel = self
        self.incarnation = incarnation
        self.host = incarnation.host

    def unbind(self) -> Incarnation | None:
        old, self.incarnation = self.incarnation, None
        if old is not None:
            old.kernel = None
        self._drop_pending_input()
        self.unanswered.clear()
        return old

    # -- frames to the clients ----------------------------------------------

    def relay(self, channel: int, socket: int, parts: list) -> None:
        """Number a kernel frame, log it, pass it undecoded to the clients."""
        # Output nobody watches is not activity: a kernel printing to no one
        # is culled like an idle one (docs/operations.md, Culling).
        if self.clients:
            self.last_activity = self._clock.seconds()
        else:
            self.unwatched_bytes += sum(map(len, parts))
        if channel == Channel.STATUS:
            self._note_status(parts[3])
        if (
            channel == Channel.INTROSPECTION
            and len(parts) > 1
            and not self.unanswered.replied(parts[1])
        ):
            return  # the server answered it already (unresponsive)
        if channel == Channel.STDIN:
            self._route_input(socket, parts)
            return
        self._emit(channel, socket, parts, None)

    def _emit(
        self, channel: int, socket: int, parts: Sequence[bytes], session: str | None
    ) -> bytes:
        self.seq += 1
        data = frame_bytes(channel, socket, self.seq, parts)
        self.replay.add(self.seq, channel, data, session)
        for client in list(self.clients):
            if (session is None or client.session == session) and client.wants(channel):
                client.send_frame(data)
        return data

    def publish(
        self,
        channel: int,
        msg_type: str,
        content: dict[str, Any],
        *,
        parent: dict[str, Any] | None = None,
        session: str | None = None,
    ) -> None:
        """A server-made Jupyter message on C{channel}, numbered like kernel frames."""
        now = datetime.fromtimestamp(self._clock.seconds(), UTC)
        self._emit(
            channel,
            JupyterSocket.NONE,
            jupyter_parts(msg_type, content, now=now, parent=parent),
            session,
        )

    def _note_status(self, content: bytes) -> None:
        # A byte search, not a JSON decode: status content is tiny and
        # ipykernel writes exactly one execution_state.
        if self.state not in RUNNING:
            return
        if b'"cellmux_introspection"' in content:
            return  # a request answered beside a running cell, not the kernel's state
        if b'"busy"' in content:
            self.handle(Said(busy=True))
        elif b'"idle"' in content:
            if self.incarnation is not None:
                self.incarnation.awaiting = False
            was = self.handle(Said(busy=False)).before
            if was is KernelState.BUSY:
                self._manager.went_idle(self)

    # -- stdin ------------------------------------------------------------------

    def _answer_for_kernel(self, request: dict[str, Any], content: dict[str, Any]) -> None:
        """The server's reply to an introspection request, on the kernel's
        behalf: on the shell socket, like the reply it stands in for."""
        now = datetime.fromtimestamp(self._clock.seconds(), UTC)
        reply_type = request["msg_type"].removesuffix("_request") + "_reply"
        parts = jupyter_parts(reply_type, content, now=now, parent=request)
        self._emit(Channel.INTROSPECTION, JupyterSocket.SHELL, parts, None)

    def _route_input(self, socket: int, parts: list) -> None:
        """An input_request goes only to the client whose request asked.

        The kernel copies the request's header into the parent header, and
        its ``session`` is the one the client declared in its hello. If
        that client is gone, the request waits for it to come back, for
        ``stdin_timeout`` seconds. A request over MAX_PROMPT_BYTES has its
        prompt cut (or is dropped if that is not enough), with a notice.
        """
        if len(parts) < 4:
            return  # not a Jupyter message: nothing could answer it
        session = _parent_session(parts[1]) or ""
        size = sum(map(len, parts))
        if size > MAX_PROMPT_BYTES:
            cut = cut_prompt(parts)
            note = PendingInput(session, b"", parts[0], parts[1])
            if cut is None:
                self._end_input(note, f"dropped an input request of {size} bytes", False)
                return
            why = f"cut the prompt of an input request of {size} bytes"
            self._end_input(note, why, False)
            parts = cut
        data = self._emit(Channel.STDIN, socket, parts, session)
        self.prompts.hold(PendingInput(session, data, parts[0], parts[1]))
        self._wait_for_session(session)

    def _wait_for_session(self, session: str) -> None:
        """Start the reconnect timeout unless a client that may answer is attached."""
        same = self._by_session.get(session, ())
        if not any(c.wants(Channel.STDIN) for c in same):
            self.prompts.wait(session)

    def input_answered(self, session: str) -> None:
        """A client sent an input_reply: nothing waits any more."""
        self.prompts.answered(session)

    def _end_input(self, pending: PendingInput, why: str, answer: bool = True) -> None:
        """Nobody will answer C{pending}: say why; with C{answer}, give the
        kernel end-of-file (its input() raises EOFError)."""
        if self.incarnation is None:
            return
        try:
            request_header = boundedjson.loads(pending.header)
            parent = boundedjson.loads(pending.parent)
        except ValueError:
            return  # the kernel's own garbage: ipykernel never waits on it
        if not isinstance(request_header, dict) or not isinstance(parent, dict):
            return
        self.publish(
            Channel.STDERR, "stream", {"name": "stderr", "text": f"cellmux: {why}\n"}, parent=parent
        )
        if not answer:
            return
        # "\x04" is ipykernel's EOF: input() raises EOFError in the kernel.
        now = datetime.fromtimestamp(self._clock.seconds(), UTC)
        reply = jupyter_parts(
            "input_reply",
            {"status": "ok", "value": "\x04"},
            now=now,
            session=pending.session,
            parent=request_header,
        )
        with contextlib.suppress(KernelError):  # the kernel just died: nothing waits
            self.send(Channel.STDIN, JupyterSocket.STDIN, reply)

    def input_interrupted(self) -> None:
        """An interrupt ends any input() with KeyboardInterrupt: stop waiting."""
        self._drop_pending_input()

    def _drop_pending_input(self) -> None:
        self.prompts.drop_all()

    # -- clients ------------------------------------------------------------------

    def attach(self, client: ClientSink, cursor: int | None = None) -> None:
        """Attach a client; with a cursor, first send what it missed.

        Replay and attach happen in one reactor turn, so the client gets
        every frame after C{cursor} exactly once, in order.
        """
        oldest_logged = self.replay.first_seq
        if cursor is not None:
            self.replay_to(client, cursor)
        self.clients.add(client)
        self._by_session.setdefault(client.session, set()).add(client)
        self._watched()
        # Only a client that may answer (its role, and its grant owns the
        # session) stops the prompt's timeout or is shown the prompt.
        if client.wants(Channel.STDIN):
            pending = self.prompts.client_back(client.session)
            if pending is not None:
                seq = int.from_bytes(pending.frame[4:12], "big")
                replayed = cursor is not None and cursor < seq and seq >= oldest_logged
                if not replayed:
                    # A fresh attach, or one resuming after the prompt (a
                    # reloaded page) or from before what the log still
                    # holds: it has not this prompt in front of it.
                    client.send_frame(pending.frame)

    def _watched(self) -> None:
        # Someone watches again: a kernel held for lack of readers resumes.
        self.last_activity = self._clock.seconds()
        self.unwatched_bytes = 0
        self._manager.grant_credit(self)

    def replay_to(self, client: ClientSink, cursor: int) -> None:
        """Send C{client} the logged frames after C{cursor} (or a gap notice)."""
        gap, entries = self.replay.after(cursor)
        if gap is not None:
            notice = getattr(client, "gap", None)
            if notice is not None:
                notice(gap.first, gap.last)
        for entry in entries:
            if (entry.session is None or entry.session == client.session) and client.wants(
                entry.channel
            ):
                client.send_frame(entry.data)

    def detach(self, client: ClientSink) -> None:
        self.clients.discard(client)
        self.writers.discard(client)
        self.uncongested(client)
        if not self.clients:
            self.last_activity = self._clock.seconds()  # the idle clock starts now
        same = self._by_session.get(client.session)
        if same is not None:
            same.discard(client)
            if same:
                return  # another client of the session is still here
            del self._by_session[client.session]
        self.prompts.wait(client.session)

    def session_moved(self, client: ClientSink, before: str) -> None:
        """C{client} declared another session (it was C{before})."""
        same = self._by_session.get(before)
        if same is not None:
            same.discard(client)
            if not same:
                del self._by_session[before]
        if client in self.clients:
            self._by_session.setdefault(client.session, set()).add(client)

    def forget_clients(self) -> None:
        """The kernel ended: nobody is attached any more."""
        self.clients.clear()
        self._by_session.clear()

    def revoke(self, share_id: str) -> None:
        """Cut off the clients that came in with a revoked share."""
        for client in list(self.clients):
            grant = getattr(client, "grant", None)
            if grant is not None and grant.share_id == share_id:
                client.revoked()

    def congested(self, client: ClientSink) -> None:
        """A client's connection is full; a congested writer holds credit."""
        self._congested.add(client)

    def uncongested(self, client: ClientSink) -> None:
        self._congested.discard(client)
        self._manager.grant_credit(self)

    @property
    def writer_congested(self) -> bool:
        return not self._congested.isdisjoint(self.writers)

    def holds_credit(self, window: int) -> bool:
        """Whether the kernel must wait before it may send more output.

        It waits while a writer cannot keep up, and, with no client
        attached, once more output than the replay log holds could pile
        up (C{window}: the credit it may still spend).
        """
        if self.writer_congested:
            return True
        return not self.clients and self.unwatched_bytes + window > self.replay.max_bytes

    # -- frames from clients --------------------------------------------------

    def send(self, channel: int, socket: int, parts: Iterable[bytes]) -> None:
        """Relay a client's Jupyter message to the kernel process.

        @raise KernelNotRunning: if no process is ready to take it.
        """
        inc = self.incarnation
        if inc is None or self.state not in RUNNING:
            raise KernelNotRunning(f"kernel is {self.state.value}")
        self.last_activity = self._clock.seconds()
        parts = list(parts)
        introspection = channel == Channel.INTROSPECTION and socket == JupyterSocket.SHELL
        if (
            introspection
            and self.state is KernelState.UNRESPONSIVE
            and self.unanswered.refuse(parts[0])
        ):
            return  # nothing in the kernel can answer now: say so at once
        try:
            self._manager.send_to_process(inc, channel, socket, parts)
        except KernelUnreachable as e:
            raise KernelNotRunning(str(e)) from None
        if introspection:
            self.unanswered.sent(parts[0])

    def remember_input(self, session: str, header: bytes, content: bytes) -> None:
        """Keep the code of an execute_request, for clients that re-run it."""
        if b'"execute_request"' not in header:
            return
        try:
            code = boundedjson.loads(content).get("code")
        except (ValueError, AttributeError):
            return
        if isinstance(code, str) and code.strip():
            self.history.append(code, session, iso_timestamp(self._clock.seconds()))


class KernelManager:
    """Creates, restarts and ends kernels; keeps the warm pool full and a
    nursery running.

    Implements the nursery's L{NurseryOwner}, the router's L{LinkSink}, and
    L{KernelHost} for its kernels.
    """

    log = Logger()

    def __init__(self, clock, config) -> None:
        self.clock = clock
        self.config = config
        self.kernels: dict[str, Kernel] = {}
        self.started_at = clock.seconds()
        self.nursery = None
        self.router = None
        #: The kernel hosts' router (server/hosts.py); None: no remote hosts.
        self.hosts: HostRouter | None = None
        #: Bytes of link credit a kernel may hold (docs/protocol.md).
        self.credit_window = credit_window(config.replay_bytes)
        #: Running totals for /metrics (plain ints; server/counters.py).
        self.counters = ServerCounters()
        self._incarnations: dict[bytes, Incarnation] = {}
        self._pool: deque[Incarnation] = deque()
        # Creates waiting for a pool kernel that is still starting, when those
        # are what holds the max_kernels limit (never more than are warming).
        self._pool_waiters: deque[defer.Deferred[Incarnation]] = deque()
        self._warming = 0
        #: Ready kernels waiting on each kernel host (pool_size per live
        #: host), the ones warming there, and when a host whose pool kernels
        #: failed to start may be tried again.
        self._host_pools: dict[str, deque[Incarnation]] = {}
        self._host_warming: Counter[str] = Counter()
        self._host_retry: dict[str, float] = {}
        #: How many ready kernels to keep: pool_size, more while creates come fast.
        self.demand = PoolDemand(
            config.pool_size, config.pool_max, idle_after=config.pool_idle_shrink
        )
        self._stopping = False
        self._tags: dict[tuple[int, int], bytes] = {}
        self._ticker: task.LoopingCall | None = None
        #: Ready processes each tick looks at: new ones (pinged at once),
        #: those with a cell or a ping out, busy or unresponsive ones; the
        #: others wait in _idle_pings for their next ping (one entry each,
        #: plus stale ones: at most one per idle_ping_interval / TICK).
        self._link_watch: WatchSet[Incarnation] = WatchSet()
        self._idle_pings: DueQueue[Incarnation] = DueQueue()
        #: When each kernel may next be culled (one entry per kernel).
        self._cull_checks: DueQueue[Kernel] = DueQueue()
        #: Pending refill while kernel starts keep failing.
        self._refill_retry = _Timer()
        self._start_backoff = Backoff(BACKOFF_FIRST, BACKOFF_CAP)
        #: Why pool kernels fail to start (None once one started).
        self.start_error: str | None = None
        #: Pool kernels that failed to start since the last one that did.
        self.failed_starts = 0
        #: Makes a new nursery process (None: a lost nursery stays lost).
        self._start_nursery: Callable[[], Any] | None = None
        self._nursery_backoff = Backoff(BACKOFF_FIRST, BACKOFF_CAP, NURSERY_STABLE_AFTER)
        self._nursery_retry = _Timer()
        self._nursery_timeout = _Timer()
        self._nursery_since = clock.seconds()
        #: Why the server cannot start kernels now (None: it can).
        self.degraded: str | None = None
        #: Kernels whose automatic restart waits for a new nursery.
        self._awaiting_nursery: dict[str, Kernel] = {}
        #: Called with a Kernel each time it goes from busy to idle (an
        #: execution or request finished); e.g. the new-files notices.
        self.idle_listeners: list[Callable[[Kernel], None]] = []
        #: Called with the kernel model whenever kernels come or go.
        self.change_listeners: list[Callable[[], None]] = []
        #: Grows when a kernel process is forked or runs as its own uid: the
        #: changes the server record must not put off (server/orphans.py).
        self.processes_changed = 0
        #: Where the nursery makes each kernel's working directory.
        self.workdir_root: str = ""
        #: Ids of kernels an earlier server process left behind.
        self.lost: set[str] = set()
        #: The kernels on offer: python3 (forked) and installed kernelspecs.
        self.specs = KernelSpecs(clock)

    def bind(self, nursery, router, start_nursery: Callable[[], Any] | None = None) -> None:
        """Use C{nursery} and C{router}; C{start_nursery()} makes a new
        nursery (a L{NurseryProcess}) when this one is lost."""
        self.nursery = nursery
        self.router = router
        self._start_nursery = start_nursery

    def start(self) -> None:
        """Start the pool and the once-a-tick liveness and culling check."""
        self._nursery_since = self.clock.seconds()
        self._ticker = task.LoopingCall(self.tick)
        self._ticker.clock = self.clock
        self._ticker.start(TICK, now=False)
        self.refill()

    def tag(self, channel: int, socket: int) -> bytes:
        key = (channel, socket)
        tag = self._tags.get(key)
        if tag is None:
            tag = self._tags[key] = encode_tag(channel, socket)
        return tag

    # -- KernelHost -------------------------------------------------------------

    def send_to_process(self, inc: Incarnation, channel: int, socket: int, parts: list) -> None:
        self._links_of(inc).send_to_kernel(inc.link_id, [self.tag(channel, socket), *parts])
        if channel == Channel.EXECUTE:
            inc.awaiting = True
            self.watch(inc)
        counters = self.counters
        counters.frames_to_kernels += 1
        counters.bytes_to_kernels += sum(map(len, parts))

    def went_idle(self, kernel: Kernel) -> None:
        for listener in self.idle_listeners:
            try:
                listener(kernel)
            except Exception:
                self.log.failure("idle listener {listener!r} failed", listener=listener)

    def watch(self, inc: Incarnation) -> None:
        if inc.ready.called and self._incarnations.get(inc.link_id) is inc:
            self._link_watch.add(inc)

    def grant_credit(self, kernel: Kernel) -> None:
        inc = kernel.incarnation
        if (
            inc is not None
            and inc.credit < self.credit_window
            and not kernel.holds_credit(self.credit_window)
        ):
            self._grant(inc)

    def _changed(self) -> None:
        for listener in self.change_listeners:
            try:
                listener()
            except Exception:
                self.log.failure("change listener {listener!r} failed", listener=listener)

    # -- the pool -------------------------------------------------------------

    @property
    def pooled(self) -> int:
        return len(self._pool)

    @property
    def warming(self) -> int:
        """Pool kernels of this server still starting."""
        return self._warming

    def _nursery_running(self) -> bool:
        return self.nursery is not None and getattr(self.nursery, "running", True)

    def refill(self) -> None:
        """Fork kernels in the background until the pool is full.

        Does nothing while a back-off after failed starts runs (however
        often it is called: a kernel that exits at start calls it too).
        """
        self._refill_hosts()
        if self._stopping or not self._nursery_running() or self._refill_retry.active():
            return
        if not self.config.local_kernels:
            return  # the pool is this server's own kernels
        now = self.clock.seconds()
        wanted = self.demand.wanted(now) - len(self._pool) - self._warming
        if self._start_backoff.failures:
            wanted = min(wanted, 1 - self._warming)  # while starts fail, one probe at a time
        room = self.config.max_kernels - self._local_count()
        for _ in range(max(0, min(wanted, room))):
            self._warming += 1
            d = defer.ensureDeferred(self._spawn())
            d.addCallbacks(self._pooled, self._pool_failed, callbackArgs=(now,))

    def _fail_extra_waiters(self) -> None:
        """Creates waiting for more pool kernels than are still starting
        are refused as a create at the limit is."""
        while len(self._pool_waiters) > self._warming:
            waiter = self._pool_waiters.pop()
            waiter.errback(TooManyKernels(f"at most {self.config.max_kernels} kernels"))

    def _pooled(self, inc: Incarnation, forked_at: float | None = None) -> None:
        self._warming -= 1
        if forked_at is not None:
            self.demand.started(self.clock.seconds() - forked_at)
        if self.start_error is not None:
            self.log.info("kernels start again (after {n} failed starts)", n=self.failed_starts)
        self._start_backoff.succeeded()
        self.start_error = None
        self.failed_starts = 0
        if inc.link_id in self._incarnations:
            if self._pool_waiters:
                self._pool_waiters.popleft().callback(inc)
            else:
                self._pool.append(inc)
        self._fail_extra_waiters()
        self.refill()  # after a probe that worked, fork the rest

    def _pool_failed(self, failure) -> None:
        self._warming -= 1
        self._fail_extra_waiters()
        if self._stopping or not self._nursery_running():
            return  # a lost nursery is reported (and retried) on its own
        message = str(failure.value)
        self.failed_starts += 1
        if self._refill_retry.active():
            return  # one back-off step per round of refills, not per kernel
        delay = self._start_backoff.failed()
        # One line per change, not per failure: a start that always fails
        # must not fill the log (nor fork in a loop).
        if message != self.start_error:
            self.start_error = message
            self.log.error(
                "warming a pool kernel failed: {message}; retrying with back-off "
                "({delay:g} s, doubling up to {cap:g} s)",
                message=message,
                delay=delay,
                cap=BACKOFF_CAP,
            )
        self._refill_retry.cancel()
        self._refill_retry.call = self.clock.callLater(delay, self._retry_refill)

    def _refill_hosts(self) -> None:
        """Keep pool_size ready kernels on each live kernel host."""
        hosts = self.hosts
        if self._stopping or hosts is None:
            return
        now = self.clock.seconds()
        for host in hosts.registry.live():
            name = host.name
            if self._host_retry.get(name, 0.0) > now:
                continue
            pool = self._host_pools.setdefault(name, deque())
            wanted = self.config.pool_size - len(pool) - self._host_warming[name]
            room = host.max_kernels - max(host.running, hosts.placed(name))
            for _ in range(max(0, min(wanted, room))):
                self._host_warming[name] += 1
                d = defer.ensureDeferred(self._spawn(host=name))
                d.addCallbacks(
                    self._host_pooled,
                    self._host_pool_failed,
                    callbackArgs=(name,),
                    errbackArgs=(name,),
                )

    def _host_pooled(self, inc: Incarnation, name: str) -> None:
        self._host_warming[name] -= 1
        if inc.link_id in self._incarnations:
            self._host_pools.setdefault(name, deque()).append(inc)

    def _host_pool_failed(self, failure, name: str) -> None:
        self._host_warming[name] -= 1
        if self._stopping:
            return
        # Tried again by a later refill (each tick) once this has passed.
        self._host_retry[name] = self.clock.seconds() + HOST_POOL_RETRY
        self.log.warn(
            "warming a pool kernel on host {name} failed: {why}", name=name, why=failure.value
        )

    def _retry_refill(self) -> None:
        self._refill_retry.call = None
        self.refill()

    async def _spawn(
        self, cwd: str | None = None, spec: KernelSpec | None = None, host: str | None = None
    ) -> Incarnation:
        """Fork a kernel (C{spec}: of another kernelspec, through the adaptor;
        C{host}: on that kernel host, not here) and wait until its link is
        authenticated and ready."""
        if host is not None:
            return await self._spawn_remote(host)
        if not self._nursery_running():
            raise NurseryUnavailable(self.degraded or "the nursery is not running")
        if self._local_count() >= self.config.max_kernels:
            self.counters.limits_hit["max_kernels"] += 1
            raise TooManyKernels(f"at most {self.config.max_kernels} kernels")
        full = disk_full(self.workdir_root) if self.workdir_root else None
        if full is not None:
            # It would die writing its first files: say why instead.
            raise RuntimeDiskFull(f"cannot start a kernel: {full}; try again later")
        inc = Incarnation(secrets.token_bytes(16), secrets.token_bytes(32))
        inc.credit = self.credit_window
        try:
            endpoint = self.router.expect(inc.link_id, inc.secret)
        except LinkUnavailable as e:  # short of descriptors: 503, not a crash
            if e.busy:
                self.counters.limits_hit["open_files"] += 1
            raise (OutOfDescriptors if e.busy else KernelStartFailed)(str(e)) from None
        inc.workdir = os.path.join(self.workdir_root, inc.link)
        return await self._started(inc, endpoint, cwd, spec)

    async def _spawn_remote(self, host: str) -> Incarnation:
        """Fork a Python kernel on kernel host C{host}; its link comes
        through that host's relay (server/hosts.py)."""
        inc = Incarnation(secrets.token_bytes(16), secrets.token_bytes(32), host=host)
        inc.credit = self.credit_window
        self.hosts.expect(host, inc.link_id, inc.secret)
        return await self._started(inc, None, None, None)

    async def _started(
        self, inc: Incarnation, endpoint: str | None, cwd: str | None, spec: KernelSpec | None
    ) -> Incarnation:
        forked_at = self.clock.seconds()
        self._incarnations[inc.link_id] = inc
        inc.timeout = self.clock.callLater(
            self.config.kernel_start_timeout, self._start_timed_out, inc
        )
        # cwd only when there is one: nurseries (and test doubles) that know
        # no working directories keep working.
        where: dict[str, Any] = {"cwd": cwd} if cwd is not None else {}
        launch = spec.launch() if spec is not None else None
        if launch is not None:
            where["kernel"] = launch
        spawned = self._nursery_of(inc).spawn(inc.link, inc.secret.hex(), endpoint, **where)

        def stop_waiting_for_fork(failure):
            # The start timed out before the nursery even answered.
            if not spawned.called:
                spawned.cancel()
            return failure

        inc.ready.addErrback(stop_waiting_for_fork)
        try:
            inc.pid = await spawned
        except Exception as e:
            self._discard(inc)
            inc.ready.addErrback(lambda _: None)  # reported through the raise below
            if inc.error is not None:  # it timed out first: that is the reason
                raise inc.error from None
            if inc.host is None and not self._nursery_running():
                raise NurseryUnavailable(self.degraded or "the nursery is not running") from None
            raise KernelStartFailed(f"could not fork a kernel: {e}") from None
        self.processes_changed += 1
        self._changed()  # a new process: the server record names it
        try:
            ready = await inc.ready
        except Exception:
            self.counters.process_start_failures += 1
            raise
        self.counters.process_starts += 1
        self.counters.process_start_seconds.observe(self.clock.seconds() - forked_at)
        return ready

    def _start_timed_out(self, inc: Incarnation) -> None:
        inc.timeout = None
        if not inc.ready.called:
            self.log.error("kernel {link} did not start in time; killing it", link=inc.link)
            self._nursery_of(inc).kill(inc.link)
            self._discard(inc)
            inc.error = KernelStartFailed("the kernel did not start in time")
            inc.ready.errback(inc.error)

    def _discard(self, inc: Incarnation) -> None:
        self._incarnations.pop(inc.link_id, None)
        self._link_watch.discard(inc)  # its idle ping entry is skipped when due
        self._links_of(inc).forget(inc.link_id)
        if inc.timeout is not None and inc.timeout.active():
            inc.timeout.cancel()
        inc.timeout = None
        with contextlib.suppress(ValueError):  # not in the pool
            if inc.host is None:
                self._pool.remove(inc)
            else:
                self._host_pools.get(inc.host, deque()).remove(inc)

    async def _take(
        self, cwd: str | None = None, spec: KernelSpec | None = None, host: str | None = None
    ) -> Incarnation:
        if host is not None:
            pool = self._host_pools.get(host)
            if not pool:
                return await self._spawn(host=host)
            inc = pool.popleft()
            self.clock.callLater(AFTER_RESPONSE, self.refill)  # its replacement, after the answer
            return inc
        if self.degraded is not None:
            raise NurseryUnavailable(self.degraded)
        if spec is not None and not spec.forked:
            # Another kernelspec starts cold, for this kernel: no pool.
            return await self._spawn(cwd, spec)
        if cwd is not None:
            # Pooled kernels started in their private directory: a kernel for
            # a notebook's folder is forked for it, and leaves the pool alone.
            return await self._spawn(cwd)
        self.demand.took(self.clock.seconds())
        if self._pool:
            inc = self._pool.popleft()
        elif self._local_count() >= self.config.max_kernels and self._warming > len(
            self._pool_waiters
        ):
            # Only pool kernels still starting fill the limit: one of them is
            # this client's, not a refusal.
            waiter: defer.Deferred[Incarnation] = defer.Deferred(self._pool_waiters.remove)
            self._pool_waiters.append(waiter)
            inc = await waiter
        else:
            inc = await self._spawn()
        # Fork the replacement once the caller's response is out (Twisted
        # sends it on the reactor's next poll, which a callLater(0) precedes)
        # and, while the pool still has kernels, after the new kernel's
        # first cells: on a small machine the fork would compete with them.
        delay = self.config.pool_refill_delay if self._pool else 0.0
        self.clock.callLater(max(delay, AFTER_RESPONSE), self.refill)
        return inc

    def _kill(self, inc: Incarnation) -> None:
        # Best effort: a nursery that is gone took its kernels with it.
        with contextlib.suppress(Exception):
            self._nursery_of(inc).kill(inc.link)

    # -- where each process runs: here, or on a kernel host ---------------------

    def _nursery_of(self, inc: Incarnation):
        return self.nursery if inc.host is None else self.hosts.nursery(inc.host)

    def _links_of(self, inc: Incarnation):
        return self.router if inc.host is None else self.hosts

    def _local_count(self) -> int:
        return sum(1 for inc in self._incarnations.values() if inc.host is None)

    def _place(self, spec: KernelSpec, cwd: str | None, label: str | None) -> str | None:
        """Where a new process of a kernel runs: a kernel host's name, or
        None for this server (docs/scaling.md, placement).

        @raise NoKernelHost: if nothing can take it.
        """
        local = self.config.local_kernels
        if self.hosts is None or not spec.forked or cwd is not None:
            # Hosts run only forked Python kernels in their own directories.
            if label is not None:
                raise NoKernelHost(
                    "no kernel host can take it (this server has none)"
                    if self.hosts is None
                    else "kernel hosts run only python3 kernels in their own directory"
                )
            if not local:
                raise NoKernelHost("this server runs no kernels itself, and hosts cannot")
            return None
        local_free = None
        if local and label is None:
            local_free = self.config.max_kernels - self._local_count() + len(self._pool)
            if self.degraded is not None:
                local_free = None
        from .hosts import HostUnavailable

        try:
            return self.hosts.place(
                label, local_free, pooled=lambda name: len(self._host_pools.get(name, ()))
            )
        except HostUnavailable as e:
            if local and label is None and self.degraded is None:
                return None  # full everywhere: say so the usual way (too_many_kernels)
            raise NoKernelHost(str(e)) from None

    def host_lost(self, name: str, cause: str) -> None:
        """A kernel host was lost: its kernels died (cause C{cause})."""
        for inc in [i for i in self._incarnations.values() if i.host == name]:
            self.kernel_exited(inc.link, inc.pid or 0, {"cause": cause})

    def host_models(self) -> list[dict[str, Any]] | None:
        """The kernel hosts for /api/status (None: this server has none)."""
        if self.hosts is None:
            return None
        return [
            {**model, "pool": len(self._host_pools.get(model["name"], ()))}
            for model in self.hosts.models()
        ]

    def host_admitted(self, name: str) -> None:
        self._host_retry.pop(name, None)
        self._changed()
        self.refill()

    # -- NurseryOwner and LinkSink ------------------------------------------------

    def link_ready(self, link_id: bytes, pid: int) -> None:
        inc = self._incarnations.get(link_id)
        if inc is None or inc.ready.called:
            return
        if inc.timeout is not None and inc.timeout.active():
            inc.timeout.cancel()
        inc.timeout = None
        self.processes_changed += 1
        self._changed()  # it runs as its own uid now: recorded with it
        self._link_watch.add(inc)  # pinged on the next tick
        inc.ready.callback(inc)

    def kernel_message(self, link_id: bytes, channel: int, socket: int, parts: list) -> None:
        inc = self._incarnations.get(link_id)
        if inc is None:
            return
        size = sum(map(len, parts))
        inc.credit -= size
        counters = self.counters
        counters.frames_from_kernels += 1
        counters.bytes_from_kernels += size
        kernel = inc.kernel
        if kernel is not None:
            kernel.relay(channel, socket, parts)
        window = self.credit_window
        if inc.credit < window // 2 and not (kernel is not None and kernel.holds_credit(window)):
            self._grant(inc)

    def link_pong(self, link_id: bytes, n: int) -> None:
        inc = self._incarnations.get(link_id)
        if inc is None or inc.ping is None or inc.ping[0] != n:
            return
        inc.ping = None
        kernel = inc.kernel
        if kernel is not None and kernel.state is KernelState.UNRESPONSIVE:
            kernel.handle(Answered())

    def link_violation(self, link_id: bytes, code: str, message: str) -> None:
        inc = self._incarnations.get(link_id)
        if inc is not None and inc.kernel is not None:
            inc.kernel.publish(
                Channel.STDERR,
                "stream",
                {"name": "stderr", "text": f"cellmux: dropped a kernel message: {message}\n"},
            )

    def _grant(self, inc: Incarnation) -> None:
        grant = self.credit_window - inc.credit
        inc.credit = self.credit_window
        self._links_of(inc).send_control(inc.link_id, "credit", bytes=grant)

    def kernel_exited(self, link: str, pid: int, info: dict[str, Any]) -> None:
        inc = self._incarnations.get(bytes.fromhex(link))
        if inc is None:
            return
        self._discard(inc)
        self._changed()
        cause = info.get("cause", "unknown")
        if not inc.ready.called:
            inc.ready.errback(KernelStartFailed(f"the kernel ended while starting: {cause}"))
        kernel = inc.kernel
        if kernel is not None:
            self._process_died(kernel, cause, info.get("limit"))
        self.refill()

    def _process_died(self, kernel: Kernel, cause: str, limit: str | None) -> None:
        """A kernel's process ended: dead, and restarted if configured."""
        auto = kernel.auto_restart and kernel.restarts.take(self.clock.seconds())
        if limit:
            self.counters.limits_hit[limit] += 1
        kernel.unbind()
        kernel.handle(Exited(cause, limit, auto))
        self.log.info("kernel {id} died: {cause}", id=kernel.id, cause=cause)
        if not auto:
            return
        if self.degraded is not None:
            self._awaiting_nursery[kernel.id] = kernel
        else:
            self._auto_restart(kernel)

    def _auto_restart(self, kernel: Kernel) -> None:
        def failed(failure) -> None:
            failure.trap(KernelError)
            self.log.warn("automatic restart of {id} failed: {e}", id=kernel.id, e=failure.value)

        d = defer.ensureDeferred(self.restart(kernel))
        d.addErrback(failed)
        d.addErrback(lambda f: self.log.failure("automatic restart failed", f))

    def processes(self) -> dict[str, int]:
        """Link id -> pid of every kernel process, pooled and starting ones too
        (this server's own: a kernel host's pids are that machine's)."""
        return {
            inc.link: inc.pid for inc in self._incarnations.values() if inc.pid and inc.host is None
        }

    # -- the nursery ---------------------------------------------------------------

    def nursery_lost(self, reason: str) -> None:
        """The nursery died: its kernels died with it; start a new one."""
        if self._stopping:
            return
        self._nursery_timeout.cancel()
        ran_for = self.clock.seconds() - self._nursery_since
        delay = self._nursery_backoff.failed(ran_for)
        # Before start() the server is still starting and gives up instead.
        can_restart = self._start_nursery is not None and self._ticker is not None
        self.degraded = f"the nursery was lost ({reason})" + (
            "; a new one is starting" if can_restart else ""
        )
        self.log.error(
            "the nursery was lost ({reason}); its kernels died with it; "
            + ("starting a new nursery in {delay:g} s" if can_restart else "no new nursery"),
            reason=reason,
            delay=delay,
        )
        self._pool.clear()
        lost = [inc for inc in self._incarnations.values() if inc.host is None]
        for inc in lost:
            self.kernel_exited(inc.link, inc.pid or 0, {"cause": "nursery lost"})
        # The nursery removes a kernel's directories when it reaps it; this
        # one reaps no more. "<workdir>.tmp" is the kernel's /tmp.
        leftovers = [p for inc in lost if inc.workdir for p in (inc.workdir, inc.workdir + ".tmp")]
        if leftovers:
            self.remove_leftovers(leftovers)
        if can_restart:
            self._nursery_retry.cancel()
            self._nursery_retry.call = self.clock.callLater(delay, self._new_nursery)

    def _new_nursery(self) -> None:
        self._nursery_retry.call = None
        if self._stopping:
            return
        self._nursery_since = self.clock.seconds()
        try:
            nursery = self._start_nursery()
        except Exception as e:
            # e.g. no descriptors or processes left: try again later.
            self.nursery_lost(f"could not start a nursery: {e}")
            return
        self.nursery = nursery
        self._nursery_since = self.clock.seconds()
        # A nursery that ends before it is ready calls nursery_lost itself.
        nursery.ready.addCallbacks(self._nursery_ready, lambda _: None)
        self._nursery_timeout.call = self.clock.callLater(
            self.config.kernel_start_timeout, self._nursery_start_timed_out, nursery
        )

    def _nursery_start_timed_out(self, nursery) -> None:
        self._nursery_timeout.call = None
        if nursery is self.nursery and not nursery.ready.called:
            self.log.error("the new nursery did not start in time; killing it")
            with contextlib.suppress(Exception):
                nursery.transport.signalProcess("KILL")

    def _nursery_ready(self, pid: int | None) -> None:
        self._nursery_timeout.cancel()
        if self._stopping:
            return
        self._nursery_since = self.clock.seconds()
        self.degraded = None
        self.log.info("a new nursery is running (pid {pid}); kernels can start again", pid=pid)
        # Start failures before the loss said nothing about this nursery.
        self._refill_retry.cancel()
        self._start_backoff.succeeded()
        self.start_error = None
        self.failed_starts = 0
        self._changed()
        self.refill()
        waiting, self._awaiting_nursery = self._awaiting_nursery, {}
        for kernel in waiting.values():
            if kernel.id in self.kernels and kernel.state is KernelState.DEAD:
                self._auto_restart(kernel)

    def remove_leftovers(self, paths: list[str]) -> None:
        """Remove directories lost kernels left behind, in a thread (they
        may be large); never raises. Tests replace it."""

        def remove_all() -> list[str]:
            return [f"{path}: {r.reason}" for path in paths if not (r := remove_tree(path))]

        def report(failed: list[str]) -> None:
            if failed:
                self.log.warn("could not remove {failed}", failed="; ".join(failed))

        d = threads.deferToThread(remove_all)
        d.addCallback(report)
        d.addErrback(lambda f: self.log.failure("removing what lost kernels left failed", f))

    def health(self) -> dict[str, Any]:
        """``state`` ok or degraded (with ``reason``), for /api/status."""
        if self.degraded is None:
            return {"state": "ok"}
        return {"state": "degraded", "reason": self.degraded}

    # -- liveness and culling ----------------------------------------------------

    def tick(self) -> None:
        now = self.clock.seconds()
        self._check_links(now)
        self._shrink_pool(now)
        self._refill_hosts()
        self._cull(now)

    def _check_links(self, now: float) -> None:
        """Ping the watched links whose ping is due, mark silent ones; an
        idle link whose ping was answered leaves the watch until its next."""
        watch = self._link_watch
        for due, inc in self._idle_pings.pop_due(now):
            if inc.idle_ping_due == due:  # else stale: it was watched since
                inc.idle_ping_due = None
                self.watch(inc)
        unresponsive_after = self.config.unresponsive_after
        for inc in watch.snapshot():
            if self._incarnations.get(inc.link_id) is not inc:
                watch.discard(inc)
            elif inc.ping is None:
                interval = self._ping_interval(inc)
                if inc.last_ping is None or now - inc.last_ping >= interval:
                    inc.pings_sent += 1
                    inc.ping = (inc.pings_sent, now)
                    inc.last_ping = now
                    self._links_of(inc).send_control(inc.link_id, "ping", n=inc.pings_sent)
                elif interval > TICK:
                    watch.discard(inc)
                    inc.idle_ping_due = inc.last_ping + interval
                    self._idle_pings.push(inc.idle_ping_due, inc)
            elif now - inc.ping[1] > unresponsive_after:
                kernel = inc.kernel
                if kernel is not None and kernel.state in (KernelState.IDLE, KernelState.BUSY):
                    kernel.handle(Silent())

    def _cull(self, now: float) -> None:
        """End the kernels past their lifetime or idle timeout."""
        config = self.config
        again: list[Kernel] = []
        for _, kernel in self._cull_checks.pop_due(now):
            if self.kernels.get(kernel.id) is not kernel:
                continue  # ended meanwhile
            if config.max_lifetime and now - kernel.created > config.max_lifetime:
                self.delete(kernel, f"lifetime limit ({config.max_lifetime:g} s)")
            elif (
                config.idle_timeout
                and not kernel.clients
                and kernel.state in (KernelState.IDLE, KernelState.DEAD)
                and now - kernel.last_activity > config.idle_timeout
            ):
                self.delete(kernel, f"idle timeout ({config.idle_timeout:g} s)")
            else:
                again.append(kernel)
        for kernel in again:  # after the loop: one due now is looked at next tick
            self._schedule_cull(kernel, now)

    def _schedule_cull(self, kernel: Kernel, now: float) -> None:
        """Queue C{kernel}'s next cull check, never later than it may be due.

        A client attached now cannot leave before C{now}, and its leaving
        restarts the idle clock: so not before C{now + idle_timeout}. A
        kernel busy with nobody attached may go idle on any tick, with an
        idle clock that ran meanwhile: looked at on the next tick.
        """
        config = self.config
        due = kernel.created + config.max_lifetime if config.max_lifetime else None
        if config.idle_timeout:
            if kernel.clients:
                idle_due = now + config.idle_timeout
            elif kernel.state not in (KernelState.IDLE, KernelState.DEAD):
                idle_due = now
            else:
                idle_due = kernel.last_activity + config.idle_timeout
            due = idle_due if due is None else min(due, idle_due)
        if due is not None:
            self._cull_checks.push(due, kernel)

    def _shrink_pool(self, now: float) -> None:
        """Demand has gone: end one extra ready kernel per tick, down to pool_size."""
        demand = self.demand
        if len(self._pool) > demand.wanted(now) and demand.may_shrink(now):
            inc = self._pool.pop()  # the newest: the oldest have warmed longest
            self._discard(inc)
            self._kill(inc)
            self._changed()

    def _ping_interval(self, inc: Incarnation) -> float:
        """Seconds between pings: every tick while a cell runs, rarely when idle.

        Only a running cell can hold the GIL for long, and only then does a
        client wait on the kernel; each ping wakes the kernel's pump, so idle
        kernels are pinged seldom. A cell counts as running from the moment
        it is sent: C code can take the GIL before the kernel's ``busy``
        leaves the process.
        """
        kernel = inc.kernel
        if inc.awaiting or (
            kernel is not None and kernel.state in (KernelState.BUSY, KernelState.UNRESPONSIVE)
        ):
            return TICK
        return self.config.idle_ping_interval

    # -- what the API asks for ------------------------------------------------

    def get(self, kernel_id: str) -> Kernel:
        kernel = self.kernels.get(kernel_id)
        if kernel is None:
            if kernel_id in self.lost:
                raise KernelLost(f"kernel {kernel_id} was lost when its server stopped")
            holder = fronts.tag_of(kernel_id)
            own = fronts.front_tag(self.config.front_id)
            if own is not None and holder is not None and holder != own:
                raise KernelOnLostFront(
                    f"kernel {kernel_id} was held by front {holder.lstrip('0') or '0'}, "
                    "which is gone or unreachable; its kernels ended with it"
                )
            raise KernelNotFound(f"no kernel {kernel_id}")
        return kernel

    def _spec(self, name: str) -> KernelSpec:
        spec = self.specs.get(name)
        if spec is None:
            raise KernelNotFound(f"no kernel spec named {name!r}")
        return spec

    async def create(
        self, name: str = "python3", cwd: str | None = None, host_label: str | None = None
    ) -> Kernel:
        """A kernel of spec C{name}; C{cwd}: the directory it starts in (not
        from the pool); C{host_label}: run it on a kernel host with that label.

        @raise KernelNotFound: if no spec is called C{name}.
        @raise NoKernelHost: if no live host (with that label) can take it.
        """
        started = time.perf_counter()
        spec = self._spec(name)
        host = self._place(spec, cwd, host_label)
        if host is None:
            from_pool = bool(self._pool) and cwd is None and spec.forked
        else:
            from_pool = bool(self._host_pools.get(host))
        inc = await self._take(cwd, spec, host)
        kernel = Kernel(self, fronts.mint_kernel_id(fronts.front_tag(self.config.front_id)), name)
        kernel.cwd = cwd
        kernel.host_label = host_label
        kernel.bind(inc)
        self.kernels[kernel.id] = kernel
        self._schedule_cull(kernel, self.clock.seconds())
        took = time.perf_counter() - started
        source = "pool" if from_pool else ("forked" if spec.forked else "cold")
        where = f" on host {host}" if host is not None else ""
        self.counters.created(source, took)
        self.log.info(
            "kernel {id} started ({source}){where} in {ms:.2f} ms",
            id=kernel.id,
            where=where,
            source="from the pool"
            if from_pool
            else ("forked on demand" if spec.forked else f"{name}, started cold"),
            ms=took * 1000,
        )
        self._changed()
        return kernel

    def interrupt(self, kernel: Kernel) -> None:
        inc = kernel.incarnation
        if inc is None:
            raise KernelNotRunning(f"kernel is {kernel.state.value}")
        nursery = self._nursery_of(inc)
        if not getattr(nursery, "running", True):
            raise NurseryUnavailable(self.degraded or "the kernel's nursery is not running")
        nursery.signal(inc.link, "SIGINT")
        kernel.input_interrupted()

    async def restart(self, kernel: Kernel) -> Kernel:
        spec = self.specs.get(kernel.name)  # None: uninstalled; the restart fails below
        host = self._place(spec, kernel.cwd, kernel.host_label) if spec is not None else None
        if host is None and self.degraded is not None:
            raise NurseryUnavailable(self.degraded)
        if not kernel.lifecycle.accepts(RestartBegun()):
            raise KernelNotRunning(f"kernel is {kernel.state.value}")
        old = kernel.unbind()
        kernel.handle(RestartBegun())
        if old is not None:
            self._kill(old)
        try:
            # The spec may have been uninstalled since: then the restart fails.
            inc = await self._take(kernel.cwd, self._spec(kernel.name), host)
        except KernelError as e:
            if kernel.state is KernelState.RESTARTING:
                lost = isinstance(e, NurseryUnavailable) or not self._nursery_running()
                kernel.handle(RestartFailed("nursery lost" if lost else f"restart failed: {e}"))
                if lost and kernel.auto_restart and kernel.id in self.kernels:
                    self._awaiting_nursery[kernel.id] = kernel
            raise
        if kernel.id not in self.kernels:  # deleted while restarting
            self._kill(inc)
            raise KernelNotFound(f"kernel {kernel.id} was shut down")
        kernel.bind(inc)
        self.log.info("kernel {id} restarted", id=kernel.id)
        self._changed()
        return kernel

    def delete(self, kernel: Kernel, reason: str = "shut down") -> None:
        if kernel.state is KernelState.ENDED:
            return
        self.kernels.pop(kernel.id, None)
        self._awaiting_nursery.pop(kernel.id, None)
        old = kernel.unbind()
        kernel.handle(Ended(reason))
        if old is not None:
            self._kill(old)
        for client in list(kernel.clients):
            client.kernel_gone(reason)
        kernel.forget_clients()
        self.log.info("kernel {id} ended: {reason}", id=kernel.id, reason=reason)
        self._changed()

    def stop(self) -> None:
        """End every kernel (the nursery does the killing)."""
        self._stopping = True
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._refill_retry.cancel()
        self._nursery_retry.cancel()
        self._nursery_timeout.cancel()
        for kernel in list(self.kernels.values()):
            self.delete(kernel, "server shutting down")
        for pool in self._host_pools.values():
            for inc in pool:
                self._kill(inc)  # a host would end them only once it misses us

"""Kernels as clients see them, the processes behind them, and the pool.

A L{Kernel} is what a client attaches to: a stable id, a state, a set of
attached clients and a frame counter. Behind it is an L{Incarnation}: one
forked process with its own link id and secret. A restart gives the same
Kernel a new Incarnation, so the id and the clients' websockets survive.

The L{KernelManager} keeps ``pool_size`` incarnations forked and ready, so
creating a kernel usually only takes one from the pool.

Kernel states (L{KernelState})::

    STARTING --ready--> IDLE <--status--> BUSY
    IDLE/BUSY --restart--> RESTARTING --ready--> IDLE
    any --process exit--> DEAD --restart--> RESTARTING
    any --delete--> (gone)
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from cellmux.protocol import Channel, JupyterSocket, frame_bytes
from cellmux.protocol.jupyter import jupyter_parts

from .links import KernelUnreachable

__all__ = [
    "ClientSink",
    "Kernel",
    "KernelError",
    "KernelManager",
    "KernelNotFound",
    "KernelStartFailed",
    "KernelState",
    "TooManyKernels",
]


class KernelError(Exception):
    """A request about a kernel that cannot be carried out.

    @ivar code: a short machine-readable reason for clients.
    """

    code = "kernel_error"


class KernelNotFound(KernelError):
    code = "unknown_kernel"


class KernelStartFailed(KernelError):
    code = "kernel_start_failed"


class TooManyKernels(KernelError):
    code = "too_many_kernels"


class KernelNotRunning(KernelError):
    code = "kernel_not_running"


class KernelState(enum.Enum):
    #: Waiting for a process to be ready.
    STARTING = "starting"
    #: Ready, not executing.
    IDLE = "idle"
    #: The kernel said it is busy.
    BUSY = "busy"
    #: The old process is being replaced by a new one.
    RESTARTING = "restarting"
    #: The process ended; the cause is kept. A restart brings it back.
    DEAD = "dead"


class ClientSink(Protocol):
    """An attached client, as the kernel sees it (a websocket connection)."""

    session: str

    def wants(self, channel: int) -> bool: ...

    def send_frame(self, data: bytes) -> None: ...

    def kernel_gone(self, reason: str) -> None: ...


@attrs.define(eq=False)
class Incarnation:
    """One kernel process: its link id, secret, pid and readiness."""

    link_id: bytes
    secret: bytes
    ready: defer.Deferred = attrs.Factory(defer.Deferred)
    pid: int | None = None
    kernel: Kernel | None = None
    timeout: Any = None
    #: The process's private working directory (made by the nursery).
    workdir: str = ""

    @property
    def link(self) -> str:
        return self.link_id.hex()


def iso_timestamp(ts: float) -> str:
    # Jupyter clients parse this with %Y-%m-%dT%H:%M:%S.%fZ.
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Kernel:
    """A kernel id with its clients; relays frames both ways."""

    log = Logger()

    def __init__(self, manager: KernelManager, kernel_id: str, name: str) -> None:
        self.id = kernel_id
        self.name = name
        self._manager = manager
        self._clock = manager.clock
        self.state = KernelState.STARTING
        self.cause: str | None = None
        self.incarnation: Incarnation | None = None
        self.clients: set[ClientSink] = set()
        self.seq = 0
        self.last_activity = self._clock.seconds()
        # input_request frames waiting for their session's client
        self._pending_input: dict[str, bytes] = {}

    def model(self) -> dict[str, Any]:
        """The Jupyter kernel model, plus cellmux's own fields."""
        model = {
            "id": self.id,
            "name": self.name,
            "last_activity": iso_timestamp(self.last_activity),
            "execution_state": self.state.value,
            "connections": len(self.clients),
            "pid": self.incarnation.pid if self.incarnation else None,
        }
        if self.cause is not None:
            model["reason"] = self.cause
        return model

    # -- the process behind it ----------------------------------------------

    def bind(self, incarnation: Incarnation) -> None:
        incarnation.kernel = self
        self.incarnation = incarnation
        self.state = KernelState.IDLE
        self.cause = None

    def unbind(self) -> Incarnation | None:
        old, self.incarnation = self.incarnation, None
        if old is not None:
            old.kernel = None
        return old

    def died(self, cause: str) -> None:
        self.log.info("kernel {id} died: {cause}", id=self.id, cause=cause)
        self.unbind()
        self.state = KernelState.DEAD
        self.cause = cause
        self.publish_status("dead", cause=cause)

    # -- frames from the kernel -------------------------------------------

    def relay(self, channel: int, socket: int, parts: list) -> None:
        """Number a kernel frame and pass it, undecoded, to the clients."""
        self.last_activity = self._clock.seconds()
        if channel == Channel.STATUS:
            self._note_status(parts[3])
        self.seq += 1
        data = frame_bytes(channel, socket, self.seq, parts)
        if channel == Channel.STDIN:
            self._route_input(parts, data)
            return
        for client in self.clients:
            if client.wants(channel):
                client.send_frame(data)

    @property
    def workdir(self) -> str | None:
        """The current process's working directory (None while none runs)."""
        return self.incarnation.workdir if self.incarnation else None

    def _note_status(self, content: bytes) -> None:
        # A byte search, not a JSON decode: status content is tiny and
        # ipykernel writes exactly one execution_state.
        if self.state not in (KernelState.IDLE, KernelState.BUSY):
            return
        if b'"busy"' in content:
            self.state = KernelState.BUSY
        elif b'"idle"' in content:
            was_busy = self.state is KernelState.BUSY
            self.state = KernelState.IDLE
            if was_busy:
                self._manager.went_idle(self)

    def _route_input(self, parts: list, data: bytes) -> None:
        """An input_request goes only to the client whose request asked.

        The kernel copies the request's header into the parent header, and
        its ``session`` is the one the client declared in its hello.
        """
        try:
            session = json.loads(parts[1]).get("session")
        except (ValueError, AttributeError):
            session = None
        targets = [c for c in self.clients if c.session == session]
        if not targets:
            self._pending_input[str(session)] = data
            return
        for client in targets:
            client.send_frame(data)

    def publish_status(self, state: str, **extra: Any) -> None:
        """A server-made status message, numbered like kernel frames."""
        self.publish(Channel.STATUS, "status", {"execution_state": state, **extra})

    def publish(self, channel: int, msg_type: str, content: dict[str, Any]) -> None:
        """A server-made Jupyter message on C{channel}, numbered like kernel frames."""
        now = datetime.fromtimestamp(self._clock.seconds(), UTC)
        self.seq += 1
        parts = jupyter_parts(msg_type, content, now=now)
        data = frame_bytes(channel, JupyterSocket.NONE, self.seq, parts)
        for client in self.clients:
            if client.wants(channel):
                client.send_frame(data)

    # -- frames from clients --------------------------------------------------

    def attach(self, client: ClientSink) -> None:
        self.clients.add(client)
        pending = self._pending_input.pop(client.session, None)
        if pending is not None:
            client.send_frame(pending)

    def detach(self, client: ClientSink) -> None:
        self.clients.discard(client)

    def send(self, channel: int, socket: int, parts: Iterable[bytes]) -> None:
        """Relay a client's Jupyter message to the kernel process.

        @raise KernelNotRunning: if no process is ready to take it.
        """
        inc = self.incarnation
        if inc is None or self.state in (KernelState.DEAD, KernelState.RESTARTING):
            raise KernelNotRunning(f"kernel is {self.state.value}")
        self.last_activity = self._clock.seconds()
        try:
            self._manager.router.send_to_kernel(
                inc.link_id, [self._manager.tag(channel, socket), *parts]
            )
        except KernelUnreachable as e:
            raise KernelNotRunning(str(e)) from None


class KernelManager:
    """Creates, restarts and ends kernels; keeps the warm pool full.

    Implements the nursery's L{NurseryOwner} and the router's L{LinkSink}.
    """

    log = Logger()

    def __init__(self, clock, config) -> None:
        self.clock = clock
        self.config = config
        self.kernels: dict[str, Kernel] = {}
        self.started_at = clock.seconds()
        self.nursery = None
        self.router = None
        self._incarnations: dict[bytes, Incarnation] = {}
        self._pool: deque[Incarnation] = deque()
        self._warming = 0
        self._stopping = False
        self._tags: dict[tuple[int, int], bytes] = {}
        #: Called with a Kernel each time it goes from busy to idle (an
        #: execution or request finished); e.g. the new-files notices.
        self.idle_listeners: list[Callable[[Kernel], None]] = []
        #: Where the nursery makes each kernel's working directory.
        self.workdir_root: str = ""

    def bind(self, nursery, router) -> None:
        self.nursery = nursery
        self.router = router

    def tag(self, channel: int, socket: int) -> bytes:
        from cellmux.protocol import encode_tag

        key = (channel, socket)
        tag = self._tags.get(key)
        if tag is None:
            tag = self._tags[key] = encode_tag(channel, socket)
        return tag

    # -- the pool -------------------------------------------------------------

    def went_idle(self, kernel: Kernel) -> None:
        for listener in self.idle_listeners:
            try:
                listener(kernel)
            except Exception:
                self.log.failure("idle listener {listener!r} failed", listener=listener)

    @property
    def pooled(self) -> int:
        return len(self._pool)

    def refill(self) -> None:
        """Fork kernels in the background until the pool is full."""
        while (
            not self._stopping
            and len(self._pool) + self._warming < self.config.pool_size
            and len(self._incarnations) < self.config.max_kernels
        ):
            self._warming += 1
            d = defer.ensureDeferred(self._spawn())
            d.addCallbacks(self._pooled, self._pool_failed)

    def _pooled(self, inc: Incarnation) -> None:
        self._warming -= 1
        if inc.link_id in self._incarnations:
            self._pool.append(inc)

    def _pool_failed(self, failure) -> None:
        self._warming -= 1
        if not self._stopping:
            self.log.failure("warming a pool kernel failed", failure)

    async def _spawn(self) -> Incarnation:
        """Fork a kernel and wait until its link is authenticated and ready."""
        if len(self._incarnations) >= self.config.max_kernels:
            raise TooManyKernels(f"at most {self.config.max_kernels} kernels")
        inc = Incarnation(secrets.token_bytes(16), secrets.token_bytes(32))
        inc.workdir = os.path.join(self.workdir_root, inc.link)
        self._incarnations[inc.link_id] = inc
        self.router.expect(inc.link_id, inc.secret)
        inc.timeout = self.clock.callLater(
            self.config.kernel_start_timeout, self._start_timed_out, inc
        )
        try:
            inc.pid = await self.nursery.spawn(inc.link, inc.secret.hex())
        except Exception as e:
            self._discard(inc)
            raise KernelStartFailed(f"could not fork a kernel: {e}") from None
        return await inc.ready

    def _start_timed_out(self, inc: Incarnation) -> None:
        inc.timeout = None
        if not inc.ready.called:
            self.log.error("kernel {link} did not start in time; killing it", link=inc.link)
            self.nursery.kill(inc.link)
            inc.ready.errback(KernelStartFailed("the kernel did not start in time"))

    def _discard(self, inc: Incarnation) -> None:
        self._incarnations.pop(inc.link_id, None)
        self.router.forget(inc.link_id)
        if inc.timeout is not None and inc.timeout.active():
            inc.timeout.cancel()
        inc.timeout = None
        with contextlib.suppress(ValueError):
            self._pool.remove(inc)

    async def _take(self) -> Incarnation:
        if self._pool:
            inc = self._pool.popleft()
        else:
            inc = await self._spawn()
        self.refill()
        return inc

    # -- NurseryOwner and LinkSink ------------------------------------------------

    def link_ready(self, link_id: bytes, pid: int) -> None:
        inc = self._incarnations.get(link_id)
        if inc is None or inc.ready.called:
            return
        if inc.timeout is not None and inc.timeout.active():
            inc.timeout.cancel()
        inc.timeout = None
        inc.ready.callback(inc)

    def kernel_message(self, link_id: bytes, channel: int, socket: int, parts: list) -> None:
        inc = self._incarnations.get(link_id)
        if inc is not None and inc.kernel is not None:
            inc.kernel.relay(channel, socket, parts)

    def kernel_exited(self, link: str, pid: int, info: dict[str, Any]) -> None:
        inc = self._incarnations.get(bytes.fromhex(link))
        if inc is None:
            return
        self._discard(inc)
        cause = info.get("cause", "unknown")
        if not inc.ready.called:
            inc.ready.errback(KernelStartFailed(f"the kernel ended while starting: {cause}"))
        if inc.kernel is not None:
            inc.kernel.died(cause)
        self.refill()

    def nursery_lost(self, reason: str) -> None:
        for inc in list(self._incarnations.values()):
            self.kernel_exited(inc.link, inc.pid or 0, {"cause": "nursery lost"})

    # -- what the API asks for ------------------------------------------------

    def get(self, kernel_id: str) -> Kernel:
        kernel = self.kernels.get(kernel_id)
        if kernel is None:
            raise KernelNotFound(f"no kernel {kernel_id}")
        return kernel

    async def create(self, name: str = "python3") -> Kernel:
        started = time.perf_counter()
        from_pool = bool(self._pool)
        inc = await self._take()
        kernel = Kernel(self, str(uuid.uuid4()), name)
        kernel.bind(inc)
        self.kernels[kernel.id] = kernel
        self.log.info(
            "kernel {id} started ({source}) in {ms:.2f} ms",
            id=kernel.id,
            source="from the pool" if from_pool else "forked on demand",
            ms=(time.perf_counter() - started) * 1000,
        )
        return kernel

    def interrupt(self, kernel: Kernel) -> None:
        inc = kernel.incarnation
        if inc is None:
            raise KernelNotRunning(f"kernel is {kernel.state.value}")
        self.nursery.signal(inc.link, "SIGINT")

    async def restart(self, kernel: Kernel) -> Kernel:
        if kernel.state is KernelState.RESTARTING:
            raise KernelNotRunning("kernel is already restarting")
        old = kernel.unbind()
        kernel.state = KernelState.RESTARTING
        kernel.publish_status("restarting")
        if old is not None:
            self.nursery.kill(old.link)
        try:
            inc = await self._take()
        except KernelError as e:
            kernel.state = KernelState.DEAD
            kernel.cause = f"restart failed: {e}"
            kernel.publish_status("dead", cause=kernel.cause)
            raise
        if kernel.id not in self.kernels:  # deleted while restarting
            self.nursery.kill(inc.link)
            raise KernelNotFound(f"kernel {kernel.id} was shut down")
        kernel.bind(inc)
        kernel.publish_status("idle", restarted=True)
        self.log.info("kernel {id} restarted", id=kernel.id)
        return kernel

    def delete(self, kernel: Kernel, reason: str = "shut down") -> None:
        self.kernels.pop(kernel.id, None)
        old = kernel.unbind()
        kernel.state = KernelState.DEAD
        kernel.cause = reason
        kernel.publish_status("dead", cause=reason)
        if old is not None:
            self.nursery.kill(old.link)
        for client in list(kernel.clients):
            client.kernel_gone(reason)
        kernel.clients.clear()

    def stop(self) -> None:
        """End every kernel (the nursery does the killing)."""
        self._stopping = True
        for kernel in list(self.kernels.values()):
            self.delete(kernel, "server shutting down")

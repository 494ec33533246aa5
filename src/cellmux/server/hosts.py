# -*- test-case-name: tests.test_hosts_registry -*-
"""The front's side of kernel hosts (docs/scaling.md, "Kernel hosts").

Three parts, one job each:

* L{HostRegistry}: which hosts are live, their capacity and labels, their
  epochs; placement; a host lost after C{timeout} seconds of silence. No
  I/O: driven by a clock and by what L{HostRouter} hears. A host is taken
  back in two steps: its hello admits it on that connection, and its first
  beat for that hello (which it sends once it has the front's welcome)
  makes it ready; only ready hosts take kernels. A hello delivered late
  from a connection that is gone (queued in TCP while the link was cut)
  is admitted, but never answered with such a beat, so nothing is placed
  on a connection that cannot carry it.
* L{HostRouter}: the one TCP ROUTER (CURVE server, keys checked by
  L{cellmux.server.zap}) all hosts connect to. Kernel traffic is checked by
  the same L{LinkChecks} as local links once the router has checked that the
  link id was spawned on the host that sent it (a host speaks only for its
  own kernels). Sends never block: a host whose queue is full (HWM) costs
  that kernel's message (L{KernelUnreachable}), never the reactor.
* L{RemoteNursery}: a host seen as a nursery (spawn, signal, kill), so the
  kernel manager drives remote kernels as it drives local ones.

Bounds: per host, L{HOST_HWM} messages queued towards it (then sends fail);
at most L{MAX_HOSTS} hosts known (a hello beyond that is refused).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import zmq
from twisted.internet import defer, task
from twisted.logger import Logger
from txzmq import ZmqFactory
from txzmq.router_dealer import ZmqRouterConnection

from ..protocol import DEFAULT_LINK_CREDIT, ProtocolError, hostlink, link_control
from ..protocol import nursery as wire
from .links import BoundedReads, KernelUnreachable, LinkChecks, LinkSink
from .nursery import NurseryGone
from .refusals import Line, RefusalLog, warn_line
from .remotefiles import RemoteFiles
from .zap import ZAP_DOMAIN

__all__ = [
    "HOST_LOST",
    "Admission",
    "HostRegistry",
    "HostRouter",
    "HostUnavailable",
    "RemoteHost",
    "RemoteNursery",
]

#: The cause a kernel on a lost host dies of.
HOST_LOST = "host lost"
#: Seconds between the front's heartbeats (and its checks for lost hosts).
BEAT_INTERVAL = 1.0
#: Messages queued towards one host before sends to it fail.
HOST_HWM = 50_000
MAX_HOSTS = 1000
UNKNOWN_HOSTS = "unknown kernel hosts"
HOST_SOURCE = "kernel host "


class HostUnavailable(Exception):
    """No live host can take a kernel (with the label asked for)."""


class HostsOwner(Protocol):
    """Who hears about hosts and their kernels (the kernel manager)."""

    def kernel_exited(self, link: str, pid: int, info: dict[str, Any]) -> None: ...

    def host_lost(self, name: str, cause: str) -> None: ...

    def host_admitted(self, name: str) -> None: ...


@attrs.define(eq=False)
class RemoteHost:
    """One host as the front knows it."""

    name: str
    #: Its connection's routing id on the ROUTER (changes on reconnection).
    identity: bytes
    #: Its CURVE public key (z85), as the ZAP handler admitted it.
    key: bytes
    labels: tuple[str, ...]
    max_kernels: int
    epoch: int
    last_seen: float
    #: The seq of the hello it was admitted by (its hellos count up).
    hello_seq: int = 0
    running: int = 0
    mem_available: int = 0
    live: bool = True
    #: It beat for the hello it was admitted by: the welcome reached it on
    #: this connection, and its beats come back on it. Only then is it
    #: placed on.
    ready: bool = False

    @property
    def usable(self) -> bool:
        return self.live and self.ready

    def model(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "labels": list(self.labels),
            "live": self.usable,
            "max_kernels": self.max_kernels,
            "running": self.running,
            "mem_available": self.mem_available,
        }


@attrs.frozen
class Admission:
    """What a hello led to."""

    host: RemoteHost | None
    #: Why it was refused (None: admitted).
    refused: str | None = None
    #: The host's kernels known before are gone (a new epoch, or it was lost).
    fresh: bool = True
    #: An old hello delivered late (queued while the link was down): it is
    #: ignored, and left unanswered.
    stale: bool = False


class HostRegistry:
    """Live hosts, their capacity, and when one is lost. No I/O.

    @param on_lost: called with (name, cause) when a live host is lost
        (silent too long, or replaced by a new process of it).
    @param on_ready: called with the host when an admitted host becomes
        ready (its first beat for the hello it was admitted by).
    """

    def __init__(
        self,
        clock,
        timeout: float,
        on_lost: Callable[[str, str], None],
        on_ready: Callable[[RemoteHost], None] = lambda host: None,
    ) -> None:
        self.clock = clock
        self.timeout = timeout
        self._on_lost = on_lost
        self._on_ready = on_ready
        self.hosts: dict[str, RemoteHost] = {}
        self._by_identity: dict[bytes, RemoteHost] = {}

    def by_identity(self, identity: bytes) -> RemoteHost | None:
        """The live host on this connection, if any."""
        host = self._by_identity.get(identity)
        return host if host is not None and host.live else None

    def hello(self, identity: bytes, key: bytes, hello: hostlink.Hello) -> Admission:
        if hello.version > hostlink.HOSTLINK_VERSION:
            # Newer hosts may send what this front cannot read.
            return Admission(
                None,
                f"it speaks host link version {hello.version}, this front"
                f" {hostlink.HOSTLINK_VERSION}: upgrade the fronts first",
            )
        now = self.clock.seconds()
        host = self.hosts.get(hello.name)
        if host is None:
            if len(self.hosts) >= MAX_HOSTS:
                return Admission(None, f"more than {MAX_HOSTS} hosts")
            host = RemoteHost(
                hello.name,
                identity,
                key,
                hello.labels,
                hello.max_kernels,
                hello.epoch,
                now,
                hello_seq=hello.seq,
            )
            self.hosts[hello.name] = host
            self._by_identity[identity] = host
            return Admission(host)
        if host.live and host.key != key:
            return Admission(None, f"host name {hello.name!r} is in use by another key")
        if host.epoch == hello.epoch and hello.seq < host.hello_seq:
            # The same process's older hello, delivered late: acting on it
            # would lose the kernels placed since the newer one.
            return Admission(None, stale=True)
        fresh = True
        if host.live and (host.epoch != hello.epoch or host.identity != identity):
            # A new process under the same name, or the same one on a new
            # connection (which it makes after losing the old one, and then
            # ends the kernels it ran for us): the old kernels are gone.
            self._lose(host, HOST_LOST)
        elif host.live:
            fresh = False  # a hello again on the same connection (a lost welcome)
        self._by_identity.pop(host.identity, None)
        host.identity, host.key = identity, key
        host.labels, host.max_kernels, host.epoch = hello.labels, hello.max_kernels, hello.epoch
        host.hello_seq = hello.seq
        host.last_seen, host.live = now, True
        if fresh:  # what it last reported was its kernels: gone
            host.running = host.mem_available = 0
            # Until it beats for this hello: a late hello from a connection
            # that is gone gets here too, and its welcome goes nowhere.
            host.ready = False
        self._by_identity[identity] = host
        return Admission(host, fresh=fresh)

    def beat(self, identity: bytes, beat: hostlink.Beat) -> RemoteHost | None:
        """A heartbeat; None if no live host is on that connection."""
        host = self.seen(identity)
        if host is not None and beat.seq == host.hello_seq:
            host.running, host.max_kernels = beat.running, beat.max_kernels
            host.mem_available = beat.mem_available
            if not host.ready:
                host.ready = True
                self._on_ready(host)
        return host

    def seen(self, identity: bytes) -> RemoteHost | None:
        """Anything from a connection proves its host alive."""
        host = self.by_identity(identity)
        if host is not None:
            host.last_seen = self.clock.seconds()
        return host

    def check(self) -> None:
        """Lose every live host silent for longer than the timeout."""
        now = self.clock.seconds()
        for host in list(self.hosts.values()):
            if host.live and now - host.last_seen > self.timeout:
                self._lose(host, HOST_LOST)

    def _lose(self, host: RemoteHost, cause: str) -> None:
        host.live = False
        self._by_identity.pop(host.identity, None)
        self._on_lost(host.name, cause)

    def live(self) -> list[RemoteHost]:
        """The hosts kernels may be placed on (live and ready)."""
        return [h for h in self.hosts.values() if h.usable]

    def connected(self) -> list[RemoteHost]:
        """The live hosts, ready or not (the front beats to each)."""
        return [h for h in self.hosts.values() if h.live]

    def place(
        self,
        label: str | None,
        local_free: int | None,
        placed: Callable[[str], int],
        pooled: Callable[[str], int] = lambda name: 0,
    ) -> str | None:
        """Where a new kernel goes: a live host's name, or None for the
        front itself; the one with the most free capacity (the front
        first on a tie: no network in between).

        @param local_free: free kernel slots on the front (None: the front
            runs no kernels, or C{label} rules it out).
        @param placed: kernels of this front on a host (counted along with
            what the host last reported, which may lag a second).
        @param pooled: of those, the ready pool kernels (free to take).
        @raise HostUnavailable: if nothing can take it.
        """
        best: tuple[int, str | None] | None = None
        if label is None and local_free is not None and local_free > 0:
            best = (local_free, None)
        for host in self.live():
            if label is not None and label not in host.labels:
                continue
            free = host.max_kernels - max(host.running, placed(host.name)) + pooled(host.name)
            if free > 0 and (best is None or free > best[0]):
                best = (free, host.name)
        if best is not None:
            return best[1]
        if label is not None:
            if not any(label in h.labels for h in self.live()):
                raise HostUnavailable(f"no live kernel host has the label {label!r}")
            raise HostUnavailable(f"every kernel host labelled {label!r} is full")
        raise HostUnavailable("no kernel host has room (and the front runs no more kernels)")


class RemoteNursery:
    """A host's nursery, seen from the front: spawn, signal, kill."""

    def __init__(self, router: HostRouter, name: str) -> None:
        self._router = router
        self.name = name
        self._spawning: dict[str, defer.Deferred[int]] = {}

    @property
    def running(self) -> bool:
        host = self._router.registry.hosts.get(self.name)
        return host is not None and host.live

    def spawn(
        self,
        link: str,
        secret: str,
        endpoint: str | None = None,
        cwd: str | None = None,
        kernel: dict[str, Any] | None = None,
    ) -> defer.Deferred[int]:
        """Ask the host to fork a kernel; fires with its pid (on the host)."""
        if cwd is not None or kernel is not None:
            return defer.fail(NurseryGone("a kernel host runs only forked Python kernels"))
        try:
            self._router.command(self.name, wire.Spawn(link, secret))
        except NurseryGone as e:
            return defer.fail(e)
        d: defer.Deferred[int] = defer.Deferred()
        self._spawning[link] = d
        return d

    def signal(self, link: str, name: str) -> None:
        self._router.command(self.name, wire.Signal(link, name))

    def kill(self, link: str) -> None:
        # Best effort: a host that is gone kills its kernels itself.
        with contextlib.suppress(NurseryGone):
            self._router.command(self.name, wire.Kill(link))

    def event(self, event: wire.Event) -> None:
        if isinstance(event, wire.Spawned):
            d = self._spawning.pop(event.link, None)
            if d is not None:
                d.callback(event.pid)
        elif isinstance(event, wire.Error) and event.link:
            d = self._spawning.pop(event.link, None)
            if d is not None:
                d.errback(NurseryGone(f"host {self.name}: {event.message}"))

    def lost(self, cause: str) -> None:
        spawning, self._spawning = self._spawning, {}
        for d in spawning.values():
            d.errback(NurseryGone(f"host {self.name}: {cause}"))


class HostRouter(BoundedReads, ZmqRouterConnection):
    """The front's one ROUTER for every kernel host (TCP, CURVE server).

    Called by the kernel manager: L{place}, L{expect}, L{forget},
    L{send_to_kernel}, L{send_control}, L{nursery}.
    """

    log = Logger()
    highWaterMark = HOST_HWM

    def __init__(
        self,
        factory: ZmqFactory,
        endpoint: str,
        secret_key: bytes,
        owner: HostsOwner,
        sink: LinkSink,
        max_size: int,
        timeout: float,
        credit: int = DEFAULT_LINK_CREDIT,
    ) -> None:
        clock = factory.reactor
        self._owner = owner
        self.refusals = RefusalLog(clock, self._refusal_line)
        self._checks = LinkChecks(sink, self.refusals, max_size, credit)
        self.registry = HostRegistry(clock, timeout, self._host_lost, self._host_ready)
        #: link id -> the name of the host it was spawned on
        self._placed: dict[bytes, str] = {}
        self._nurseries: dict[str, RemoteNursery] = {}
        #: /files of remote kernels, relayed to their hosts (server/remotefiles.py)
        self.files = RemoteFiles(self, clock)
        super().__init__(factory)
        sock = self.socket
        public = zmq.curve_public(secret_key)
        sock.curve_server = True
        sock.curve_secretkey = secret_key
        sock.curve_publickey = public
        # Without a ZAP handler answering, refuse: never CURVE without keys.
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A host's frame is at most a kernel's frame plus the link id, or a
        # file chunk (kernel frames are checked against max_size after).
        sock.setsockopt(zmq.MAXMSGSIZE, max(max_size, hostlink.MAX_FILE_CHUNK) + 64)
        sock.bind(endpoint)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._beats = task.LoopingCall(self._beat)
        self._beats.clock = clock
        self._beats.start(BEAT_INTERVAL, now=False)

    # -- placement and the kernel manager's calls -------------------------------

    def placed(self, name: str) -> int:
        return sum(1 for host in self._placed.values() if host == name)

    def place(
        self,
        label: str | None,
        local_free: int | None,
        pooled: Callable[[str], int] = lambda name: 0,
    ) -> str | None:
        """The host a new kernel goes to (None: the front itself).

        @param pooled: the ready pool kernels on a host (free to take).
        @raise HostUnavailable: if none can take it.
        """
        return self.registry.place(label, local_free, self.placed, pooled)

    def host_of(self, link_id: bytes) -> str | None:
        return self._placed.get(link_id)

    def nursery(self, name: str) -> RemoteNursery:
        nursery = self._nurseries.get(name)
        if nursery is None:
            nursery = self._nurseries[name] = RemoteNursery(self, name)
        return nursery

    def expect(self, name: str, link_id: bytes, secret: bytes) -> None:
        """A kernel is to start on host C{name}: admit its link from there."""
        self._placed[link_id] = name
        self._checks.admit(link_id, secret)

    def forget(self, link_id: bytes) -> None:
        self._placed.pop(link_id, None)
        self._checks.drop(link_id)

    def _identity(self, link_id: bytes) -> bytes | None:
        name = self._placed.get(link_id)
        host = self.registry.hosts.get(name) if name is not None else None
        return host.identity if host is not None and host.live else None

    def send_to_kernel(self, link_id: bytes, parts: list) -> None:
        """Send ``[tag, *jupyter parts]`` to a remote kernel, never waiting.

        @raise KernelUnreachable: if its host is gone or its queue is full.
        """
        identity = self._identity(link_id)
        if identity is None or not self._checks.ready(link_id):
            raise KernelUnreachable("kernel link is not ready (or its host is lost)")
        try:
            self.socket.send_multipart([identity, link_id, *parts], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            raise KernelUnreachable(f"kernel host link: {e.strerror}") from None
        finally:
            self._reschedule_read()

    def send_control(self, link_id: bytes, op: str, **fields: object) -> None:
        identity = self._identity(link_id)
        if identity is None:
            return
        try:
            self.socket.send_multipart(
                [identity, link_id, *link_control(op, **fields)], zmq.NOBLOCK
            )
        except zmq.ZMQError:
            return  # lost or full: the host's loss is reported on its own
        finally:
            self._reschedule_read()
        self._checks.granted(link_id, op, fields)

    def command(self, name: str, command: wire.Command) -> None:
        """A nursery command to host C{name}.

        @raise NurseryGone: if the host is not live or its queue is full.
        """
        host = self.registry.hosts.get(name)
        if host is None or not host.live:
            raise NurseryGone(f"kernel host {name} is not connected")
        self._send_control(host.identity, hostlink.NurseryCommand(command), name)

    def send_file_message(self, name: str, message: Any) -> None:
        """A file transfer's message to host C{name} (server/remotefiles.py).

        @raise NurseryGone: if the host is not live or its queue is full.
        """
        host = self.registry.hosts.get(name)
        if host is None or not host.live:
            raise NurseryGone(f"kernel host {name} is not connected")
        self._send_control(host.identity, message, name)

    def _send_control(self, identity: bytes, message: Any, name: str = "?") -> None:
        try:
            self.socket.send_multipart([identity, *hostlink.encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            raise NurseryGone(f"kernel host {name}: {e.strerror}") from None
        finally:
            self._reschedule_read()

    # -- what hosts send ------------------------------------------------------------

    def _receive(self, sock: zmq.Socket) -> list:
        # Frames, not bytes: a hello's first frame carries the key ZAP admitted.
        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        message = [f.bytes for f in frames]
        if len(message) > 1 and message[1] == b"" and len(message) > 2 and message[2] == b"hello":
            try:
                self._hello_key = str(frames[0].get("User-Id") or "").encode()
            except zmq.ZMQError:
                self._hello_key = b""
        return message

    def messageReceived(self, message: list[bytes]) -> None:
        if len(message) < 2:
            return
        identity, first = message[0], message[1]
        if first == b"":
            self._control(identity, message[1:])
            return
        host = self.registry.seen(identity)
        if host is None:
            self.refusals.note(UNKNOWN_HOSTS, "kernel traffic before hello")
            return
        if self._placed.get(first) != host.name:
            # Not a kernel this host was asked to start: it may not speak for it.
            self.refusals.note(
                HOST_SOURCE + host.name, f"unknown link {first[:16].hex()}", kind="kernel hosts"
            )
            return

        def reply(link_id: bytes, parts: list) -> None:
            with contextlib.suppress(zmq.ZMQError):
                self.socket.send_multipart([identity, link_id, *parts], zmq.NOBLOCK)

        self._checks.receive(first, message[2:], reply)

    def _control(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            message = hostlink.decode_from_host(frames)
        except ProtocolError as e:
            host = self.registry.by_identity(identity)
            source = HOST_SOURCE + host.name if host is not None else UNKNOWN_HOSTS
            self.refusals.note(source, f"{e.code}: {e.message}", kind="kernel hosts")
            return
        if isinstance(message, hostlink.Hello):
            key, self._hello_key = getattr(self, "_hello_key", b""), b""
            self._hello(identity, key, message)
            return
        seq = 0
        if isinstance(message, hostlink.Beat):
            host = self.registry.beat(identity, message)
            seq = message.seq
        else:
            host = self.registry.seen(identity)
        if host is None:
            with contextlib.suppress(NurseryGone):
                self._send_control(identity, hostlink.Who(seq))
            return
        if isinstance(message, hostlink.NurseryEvent):
            self._event(host, message.event)
        elif isinstance(message, hostlink.FileReply | hostlink.FileMessage):
            self.files.receive(host.name, message)

    def _hello(self, identity: bytes, key: bytes, hello: hostlink.Hello) -> None:
        admission = self.registry.hello(identity, key, hello)
        if admission.stale:
            return
        if admission.host is None:
            self.refusals.note(
                HOST_SOURCE + hello.name, f"hello refused: {admission.refused}", kind="kernel hosts"
            )
            return
        name = hello.name
        keep = (
            []
            if admission.fresh
            else [link.hex() for link, host in self._placed.items() if host == name]
        )
        with contextlib.suppress(NurseryGone):
            self._send_control(identity, hostlink.Welcome(tuple(keep), hello.seq), name)
        if admission.host.ready:  # a hello again on a connection that works
            self._announce(admission.host, "reconnected")

    def _host_ready(self, host: RemoteHost) -> None:
        # Its beat for the hello we welcomed: both ways work on this connection.
        self._announce(host, "admitted")

    def _announce(self, host: RemoteHost, how: str) -> None:
        self.log.info(
            "kernel host {name} {how} (key {key}, labels {labels}, {n} kernels at most)",
            name=host.name,
            how=how,
            key=host.key.decode(errors="replace"),
            labels=",".join(host.labels) or "none",
            n=host.max_kernels,
        )
        self._owner.host_admitted(host.name)

    def _event(self, host: RemoteHost, event: wire.Event) -> None:
        link = getattr(event, "link", None)
        if link is not None:
            try:
                link_id = bytes.fromhex(link)
            except ValueError:
                return
            if self._placed.get(link_id) != host.name:
                return  # not its kernel (or one already forgotten)
        if isinstance(event, wire.Exited):
            self._owner.kernel_exited(event.link, event.pid, dict(event.info))
        elif isinstance(event, wire.Spawned | wire.Error):
            self.nursery(host.name).event(event)

    # -- liveness -------------------------------------------------------------------

    def _beat(self) -> None:
        self.registry.check()
        for host in self.registry.connected():
            with contextlib.suppress(NurseryGone):
                self._send_control(host.identity, hostlink.FrontBeat(), host.name)

    def _host_lost(self, name: str, cause: str) -> None:
        host = self.registry.hosts.get(name)
        if host is not None and not host.ready:
            # Admitted by a hello but never beat for it (a late hello from a
            # connection that is gone): no kernel was placed there.
            self.log.info(
                "kernel host {name}: its hello was not confirmed ({cause})", name=name, cause=cause
            )
        else:
            self.log.warn(
                "kernel host {name} lost ({cause}); its kernels are dead", name=name, cause=cause
            )
        nursery = self._nurseries.get(name)
        if nursery is not None:
            nursery.lost(cause)
        self.files.host_lost(name, cause)
        self._owner.host_lost(name, cause)

    def _refusal_line(self, line: Line) -> None:
        now = self.factory.reactor.seconds() if self.factory else line.since
        seconds = warn_line(self.log, line, now)
        if line.count > 1:
            self._checks.refusal_line(line, seconds)

    def models(self) -> list[dict[str, Any]]:
        return [host.model() for host in self.registry.hosts.values()]

    def shutdown(self) -> None:
        if self._beats.running:
            self._beats.stop()
        self.refusals.stop()
        super().shutdown()

"""The ``cellmux host`` process: a nursery, its kernels' links, the fronts.

The host runs the usual nursery (L{cellmux.server.nursery.NurseryProcess},
the same sandbox, limits and uids as a single server), binds each kernel's
own ipc endpoint (L{KernelRelay}), and carries out what its fronts ask
(spawn, signal, kill), each over its own L{FrontLink}. A kernel belongs to
the front that asked for it; only that front may reach it.

Liveness: every second the host says hello (until welcomed) or beats (its
kernels, capacity and free memory) to each front, and it beats at once
when welcomed: the front places kernels on it only after that beat. A front heard from for
no longer than C{timeout} seconds is lost: the host kills the kernels it
ran for it (the front reported them dead already) and says hello again.

Crashes: like a server, the host keeps a record of its nursery and kernel
processes and its runtime directory in its state directory
(L{cellmux.server.orphans}). A host that was killed left what its kernels
started running and its runtime directory on disk; the next host (or
server) started with the same state directory ends and removes them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from ..config import ServerConfig
from ..protocol import hostlink
from ..protocol import nursery as wire
from ..server.links import LinkUnavailable
from ..server.nursery import NurseryGone, NurseryProcess, nursery_settings
from ..server.orphans import (
    RecordKeeper,
    ServerRecord,
    default_state_dir,
    end_leftovers_of,
    finish_removals,
    reap_orphans,
)
from ..server.runtimedir import make_private_runtime_dir, prepare_runtime_dir, remove_owned
from .files import HostFiles
from .relay import FrontLink, KernelRelay

__all__ = ["HostService", "HostSettings", "available_memory"]

#: Seconds between hellos or beats to each front, and liveness checks.
BEAT_INTERVAL = 1.0
#: Seconds without a welcome before a front is connected to afresh.
RECONNECT_AFTER = 5.0
#: Seconds before a lost nursery is started again.
NURSERY_RESTART_DELAY = 1.0
#: Seconds after a change before the record is written (changes coalesce).
RECORD_DELAY = 0.05


def available_memory() -> int:
    """Bytes of memory available (MemAvailable), 0 if unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@attrs.frozen
class HostSettings:
    """What ``cellmux host`` is told on its command line."""

    name: str
    labels: tuple[str, ...]
    fronts: tuple[str, ...]
    #: each front's public key (pinned), in the order of C{fronts}
    front_keys: tuple[bytes, ...]
    public_key: bytes
    secret_key: bytes
    max_kernels: int
    timeout: float = 3.0


class HostService(service.Service):
    """A kernel host: nursery, kernel relay, one link per front."""

    log = Logger()

    def __init__(self, config: ServerConfig, settings: HostSettings, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.config = config
        self.settings = settings
        #: Chosen at random per process: a front that sees a new epoch knows
        #: this process's predecessor (and its kernels) are gone.
        self.epoch = secrets.randbits(62)
        self.nursery: NurseryProcess | None = None
        self.relay: KernelRelay | None = None
        self.fronts: list[FrontLink] = []
        #: link id -> the front it belongs to (every kernel process we run)
        self._kernels: dict[bytes, FrontLink] = {}
        self._runtime_dir: str | None = None
        self._owns_runtime_dir = False
        self._record: RecordKeeper | None = None
        self._server_record: ServerRecord | None = None
        #: link id (hex) -> pid of every kernel process, for the record
        self._pids: dict[str, int] = {}
        self._ticker: task.LoopingCall | None = None
        self._nursery_restart = None
        self._stopping = False
        self.start_failed = False
        self._zmq = None
        self._nursery_args: tuple[dict[str, Any], dict[str, str]] | None = None
        #: /files of this host's kernels, for the front that owns each.
        self.files = HostFiles(reactor, self._workdir_of, config.kernel_quota)

    # -- start and stop -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        d = defer.ensureDeferred(self._start())
        d.addErrback(self._start_failed)

    def _start_failed(self, failure) -> None:
        self.log.failure("cellmux host could not start", failure)
        self.start_failed = True
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    async def _start(self) -> None:
        from txzmq import ZmqFactory

        config = self.config
        # Before anything else: end what a killed predecessor left.
        state_dir = config.state_dir or default_state_dir()
        sweep = await threads.deferToThread(
            reap_orphans, state_dir, uid_range=config.kernel_uid_range, remove_files=False
        )
        if sweep.pending:
            removing = threads.deferToThread(finish_removals, sweep.pending)
            removing.addErrback(lambda f: self.log.failure("removing leftovers failed", f))
        if config.runtime_dir:
            prepare_runtime_dir(config.runtime_dir, sweep.busy_runtime_dirs)
            self._runtime_dir = config.runtime_dir
        else:
            self._runtime_dir = make_private_runtime_dir()
            self._owns_runtime_dir = True
        record = ServerRecord(state_dir, self._runtime_dir, owns_runtime_dir=self._owns_runtime_dir)
        # Recorded before anything is made in it.
        try:
            await threads.deferToThread(record.write, {}, {})
        except OSError as e:  # a full state disk: run anyway, keep trying
            self.log.warn("cannot write the host record: {error}", error=e)
        self._server_record = record
        self._record = RecordKeeper(
            self.reactor, record, dict, RECORD_DELAY, lambda: dict(self._pids)
        )
        links_dir = os.path.join(self._runtime_dir, "links")
        self._zmq = ZmqFactory()
        self.relay = KernelRelay(self._zmq, links_dir, self, config.max_frame_size)
        if os.geteuid() == 0:
            # As on a server: kernels pass through to their own endpoint.
            os.chmod(self._runtime_dir, 0o711)
            os.chmod(links_dir, 0o711)
        else:
            self.log.warn(
                "cellmux host is not running as root: kernels run as its own user, "
                "with rlimits only (docs/security.md)"
            )
        env = config.kernel_environment()
        if "PYTHONPATH" in os.environ:  # a development tree
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        self._nursery_args = (nursery_settings(config, self._runtime_dir, []), env)
        self._start_nursery()
        assert self.nursery is not None
        await self.nursery.ready
        s = self.settings
        for endpoint, front_key in zip(s.fronts, s.front_keys, strict=True):
            self.fronts.append(
                FrontLink(
                    self._zmq,
                    endpoint,
                    front_key,
                    s.public_key,
                    s.secret_key,
                    self.relay,
                    self,
                    s.timeout,
                    config.max_frame_size,
                )
            )
        self._ticker = task.LoopingCall(self.tick)
        self._ticker.clock = self.reactor
        self._ticker.start(BEAT_INTERVAL, now=True)
        self.log.info(
            "cellmux host {name} runs up to {n} kernels for {fronts}",
            name=s.name,
            n=s.max_kernels,
            fronts=", ".join(s.fronts),
        )
        print(f"cellmux host {s.name} is running", file=sys.__stdout__, flush=True)

    def _start_nursery(self) -> None:
        assert self._nursery_args is not None
        settings, env = self._nursery_args
        self.nursery = NurseryProcess.start(
            self.reactor, self, settings, env, python=self.config.kernel_python
        )
        transport = self.nursery.transport
        if self._server_record is not None and self._record is not None and transport is not None:
            self._server_record.nursery_pid = transport.pid
            self._record.changed()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        if self._nursery_restart is not None and self._nursery_restart.active():
            self._nursery_restart.cancel()
        nursery_stopped = True
        if self.nursery is not None:
            ended = self.nursery.shutdown()
            timeout = self.reactor.callLater(self.config.kill_grace + 5, ended.cancel)
            try:
                await ended
            except defer.CancelledError:
                self.log.error("the nursery did not stop in time")
                nursery_stopped = False
            finally:
                if timeout.active():
                    timeout.cancel()
        self.files.shutdown()
        for front in self.fronts:
            front.shutdown()
        if self.relay is not None:
            self.relay.shutdown()
        removed = nursery_stopped
        if removed and self._owns_runtime_dir and self._runtime_dir:
            removed = bool(await threads.deferToThread(remove_owned, self._runtime_dir))
        if self._record is not None:
            # What could not be removed stays recorded for the next start.
            await self._record.close(remove=removed)

    # -- RelayOwner -----------------------------------------------------------------

    def front_of(self, link_id: bytes) -> FrontLink | None:
        return self._kernels.get(link_id)

    def front_control(self, front: FrontLink, message: hostlink.FrontMessage) -> None:
        if isinstance(message, hostlink.Welcome):
            if message.seq != front.hello_seq:
                return  # the answer to an older hello, delivered late
            if not front.welcomed:
                self.log.info("front {front} welcomed this host", front=front.address)
            front.welcomed = True
            front.session = message.seq
            keep = {bytes.fromhex(link) for link in message.keep}
            # What the front no longer knows must not linger.
            for link_id, owner in list(self._kernels.items()):
                if owner is front and link_id not in keep:
                    self._kill(link_id)
            # At once, not at the next tick: the front places nothing here
            # until it has a beat for this hello (it proves the welcome
            # came over a connection that works both ways).
            front.send_control(self._beat(front))
        elif isinstance(message, hostlink.Who):
            if not front.welcomed or message.seq != front.session:
                return  # saying hello already, or about an older session
            self.log.info("front {front} does not know this host: hello again", front=front.address)
            self._front_lost(front, "it asked who we are")
            front.send_control(self._hello(front))
        elif isinstance(message, hostlink.NurseryCommand):
            if not front.welcomed:
                return
            self._command(front, message.command)
        elif isinstance(message, hostlink.FileRequest | hostlink.FileMessage) and front.welcomed:
            self.files.receive(front, message)

    def _workdir_of(self, front: Any, link: str) -> str | None:
        """The directory of that front's kernel C{link} (None: not its own)."""
        if self._kernels.get(bytes.fromhex(link)) is not front or self._nursery_args is None:
            return None
        return os.path.join(self._nursery_args[0]["workdir_root"], link)

    def _command(self, front: FrontLink, command: wire.Command) -> None:
        if isinstance(command, wire.Spawn):
            self._spawn(front, command)
            return
        if isinstance(command, wire.Shutdown):
            return  # a front may not (hostlink refuses it on the wire)
        link_id = bytes.fromhex(command.link)
        if self._kernels.get(link_id) is not front:
            return  # not its kernel, or one that ended
        if isinstance(command, wire.Signal):
            if self.nursery is not None:
                with contextlib.suppress(NurseryGone):
                    self.nursery.signal(command.link, command.signal)
        elif isinstance(command, wire.Kill):
            self._kill(link_id)

    def _spawn(self, front: FrontLink, spawn: wire.Spawn) -> None:
        def refuse(message: str) -> None:
            front.send_control(hostlink.NurseryEvent(wire.Error(message, spawn.link)))

        link_id = bytes.fromhex(spawn.link)
        if len(link_id) != hostlink.LINK_ID_SIZE or link_id in self._kernels:
            return refuse("bad or duplicate link id")
        if spawn.cwd is not None or spawn.kernel is not None or spawn.endpoint is not None:
            return refuse("a kernel host runs only forked Python kernels in their own directory")
        if len(self._kernels) >= self.settings.max_kernels:
            return refuse(f"this host runs at most {self.settings.max_kernels} kernels")
        if self.nursery is None or not self.nursery.running:
            return refuse("this host's nursery is not running")
        assert self.relay is not None
        try:
            endpoint = self.relay.doors.open(link_id)
        except LinkUnavailable as e:
            return refuse(str(e))
        self._kernels[link_id] = front
        d = self.nursery.spawn(spawn.link, spawn.secret, endpoint)

        def spawned(pid: int) -> None:
            self._pids[spawn.link] = pid
            if self._record is not None:
                self._record.changed()
            front.send_control(hostlink.NurseryEvent(wire.Spawned(spawn.link, pid)))

        def failed(failure) -> None:
            if self._kernels.get(link_id) is front:
                del self._kernels[link_id]
                if self.relay is not None:
                    self.relay.doors.close(link_id)
            refuse(f"could not fork a kernel: {failure.value}")

        d.addCallbacks(spawned, failed)

    def _kill(self, link_id: bytes) -> None:
        if self.nursery is not None:
            with contextlib.suppress(NurseryGone):
                self.nursery.kill(link_id.hex())

    # -- NurseryOwner ---------------------------------------------------------------

    def kernel_exited(self, link: str, pid: int, info: dict[str, Any]) -> None:
        link_id = bytes.fromhex(link)
        if self._pids.pop(link, None) is not None and self._record is not None:
            self._record.changed()
        front = self._kernels.pop(link_id, None)
        if self.relay is not None:
            self.relay.doors.close(link_id)
        if front is not None and front.welcomed:
            front.send_control(hostlink.NurseryEvent(wire.Exited(link, pid or 1, info)))

    def nursery_lost(self, reason: str) -> None:
        if self._stopping:
            return
        self.log.error("the nursery was lost ({reason}); its kernels died with it", reason=reason)
        self._end_leftovers()
        for link_id in list(self._kernels):
            self.kernel_exited(link_id.hex(), 0, {"cause": "nursery lost"})
        self._nursery_restart = self.reactor.callLater(NURSERY_RESTART_DELAY, self._start_nursery)

    def _end_leftovers(self) -> None:
        """End what the lost nursery's kernels started, remove their directories."""
        if self._server_record is None or self._runtime_dir is None:
            return
        end_leftovers_of(self._server_record, self._runtime_dir, self.config.kernel_uid_range)

    # -- liveness -------------------------------------------------------------------

    def _hello(self, front: FrontLink) -> hostlink.Hello:
        s = self.settings
        front.hello_seq += 1
        return hostlink.Hello(s.name, s.labels, s.max_kernels, self.epoch, seq=front.hello_seq)

    def _beat(self, front: FrontLink, memory: int | None = None) -> hostlink.Beat:
        if memory is None:
            memory = available_memory()
        return hostlink.Beat(len(self._kernels), self.settings.max_kernels, memory, front.session)

    def tick(self) -> None:
        now = self.reactor.seconds()
        memory = available_memory()
        for front in self.fronts:
            beat = self._beat(front, memory)
            if front.welcomed and now - front.last_heard > self.settings.timeout:
                self._front_lost(front, f"nothing heard for {now - front.last_heard:.1f} s")
            if not front.welcomed and now - front.connected_at > RECONNECT_AFTER:
                front.reconnect()  # a refused handshake is never retried by libzmq
            front.send_control(beat if front.welcomed else self._hello(front))

    def _front_lost(self, front: FrontLink, why: str) -> None:
        """The front reported our kernels dead: end them, say hello again."""
        if front.welcomed:
            self.log.warn(
                "front {front} lost ({why}); ending its kernels", front=front.address, why=why
            )
        front.welcomed = False
        self.files.front_lost(front)
        for link_id, owner in list(self._kernels.items()):
            if owner is front:
                self._kill(link_id)

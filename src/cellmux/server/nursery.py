"""The server's side of the nursery: spawn it, talk to it, watch it.

The nursery is a separate process (``python -m cellmux.kernel.nursery``);
the server never forks its own reactor process. This adapter turns the
nursery's JSON-lines events into calls on a L{NurseryOwner}.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Protocol

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

__all__ = ["NurseryGone", "NurseryOwner", "NurseryProcess"]

#: A line from the nursery longer than this is a bug; refuse it.
MAX_EVENT_LINE = 64 * 1024


class NurseryGone(Exception):
    """The nursery process is not running."""


class NurseryOwner(Protocol):
    """Who hears about kernel processes (the kernel manager)."""

    def kernel_exited(self, link: str, pid: int, info: dict[str, Any]) -> None: ...

    def nursery_lost(self, reason: str) -> None: ...


class NurseryProcess(protocol.ProcessProtocol):
    """Talks to one nursery process over its stdin and stdout.

    Called from Twisted: connectionMade, outReceived, processEnded.
    Called by the server: L{spawn}, L{signal}, L{kill}, L{shutdown}.
    """

    log = Logger()

    def __init__(self, owner: NurseryOwner, config_line: bytes) -> None:
        self._owner = owner
        self._config_line = config_line
        self._buffer = b""
        self._spawning: dict[str, defer.Deferred[int]] = {}
        self.ready: defer.Deferred[int] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._running = False
        self._stopping = False

    @classmethod
    def start(cls, reactor, owner: NurseryOwner, config: dict[str, Any], env: dict[str, str]):
        proto = cls(owner, json.dumps(config).encode() + b"\n")
        argv = [sys.executable, "-m", "cellmux.kernel.nursery"]
        reactor.spawnProcess(proto, sys.executable, argv, env=env, childFDs={0: "w", 1: "r", 2: 2})
        return proto

    @property
    def running(self) -> bool:
        return self._running and not self._stopping

    # -- called from Twisted ------------------------------------------------

    def connectionMade(self) -> None:
        self._running = True
        self.transport.write(self._config_line)

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_EVENT_LINE:
            self.log.error("nursery sent an overlong line; dropping it")
            self._buffer = b""
        for line in lines:
            if line.strip():
                self._event(line)

    def processEnded(self, reason) -> None:
        self._running = False
        gone = NurseryGone(f"nursery ended: {reason.value}")
        for d in self._spawning.values():
            d.errback(gone)
        self._spawning.clear()
        if not self.ready.called:
            self.ready.errback(gone)
        if not self._stopping:
            self.log.error("the nursery ended unexpectedly: {reason}", reason=reason.value)
            self._owner.nursery_lost(str(reason.value))
        self.ended.callback(None)

    # -- events -----------------------------------------------------------

    def _event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            kind = event["event"]
        except (ValueError, KeyError, TypeError):
            self.log.error("unreadable nursery event {line!r}", line=line[:200])
            return
        if kind == "ready":
            self.ready.callback(event.get("pid"))
        elif kind == "spawned":
            d = self._spawning.pop(event.get("link"), None)
            if d is not None:
                d.callback(event["pid"])
        elif kind == "exited":
            info = {k: v for k, v in event.items() if k not in ("event", "link", "pid")}
            self._owner.kernel_exited(event["link"], event["pid"], info)
        elif kind == "error":
            d = self._spawning.pop(event.get("link"), None)
            if d is not None:
                d.errback(NurseryGone(event.get("message", "spawn failed")))
            else:
                self.log.warn("nursery: {message}", message=event.get("message"))

    # -- commands ---------------------------------------------------------

    def _send(self, **command: Any) -> None:
        if not self._running:
            raise NurseryGone("the nursery is not running")
        self.transport.write(json.dumps(command).encode() + b"\n")

    def spawn(self, link: str, secret: str, endpoint: str) -> defer.Deferred[int]:
        """Fork a kernel that connects to C{endpoint}, its own link endpoint;
        fires with its pid once forked (not yet ready)."""
        d: defer.Deferred[int] = defer.Deferred()
        try:
            self._send(cmd="spawn", link=link, secret=secret, endpoint=endpoint)
        except NurseryGone as e:
            return defer.fail(e)
        self._spawning[link] = d
        return d

    def signal(self, link: str, name: str) -> None:
        self._send(cmd="signal", link=link, signal=name)

    def kill(self, link: str) -> None:
        if self._running:
            self._send(cmd="kill", link=link)

    def shutdown(self) -> defer.Deferred[None]:
        """Ask the nursery to end every kernel and exit."""
        self._stopping = True
        if self._running:
            try:
                self._send(cmd="shutdown")
                self.transport.closeStdin()
            except (NurseryGone, error.ProcessExitedAlready):
                pass
        return self.ended

"""Which kernel hosts may connect: a ZeroMQ ZAP handler in the reactor.

libzmq asks the ZAP handler (a REP socket on ``inproc://zeromq.zap.01`` in
the same context) about every CURVE handshake on the front's host socket;
this one admits the public keys found in the authorised directory
(``hosts_authorized_dir``: ZeroMQ certificate files, ``*.key``). The
directory is read again every L{RELOAD_SECONDS}, so adding or removing a
key file takes effect without a restart (docs/scaling.md, key rotation).

Refusals are logged aggregated (L{cellmux.server.refusals}): one line per
key per 10 s with a count, not one per attempt.
"""

from __future__ import annotations

import glob
import os

import zmq
import zmq.auth
from twisted.internet import task
from twisted.logger import Logger
from txzmq import ZmqFactory
from txzmq.connection import ZmqConnection
from zmq.utils import z85

from .links import BoundedReads
from .refusals import Line, RefusalLog, warn_line

__all__ = ["ZAP_DOMAIN", "ZAP_ENDPOINT", "AuthorisedKeys", "ZapHandler"]

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
#: The ZAP domain of the hosts' socket (enforced: without a handler, refuse).
ZAP_DOMAIN = b"cellmux-hosts"
RELOAD_SECONDS = 5.0
REFUSED_HOSTS = "kernel hosts"


class AuthorisedKeys:
    """The public keys in a directory of ZeroMQ certificates (``*.key``)."""

    log = Logger()

    def __init__(self, directory: str) -> None:
        self.directory = directory
        #: z85 public key -> the file it came from (its name says whose)
        self.keys: dict[bytes, str] = {}
        self._broken: set[str] = set()
        self.reload()

    def reload(self) -> None:
        keys: dict[bytes, str] = {}
        broken: set[str] = set()
        for path in sorted(glob.glob(os.path.join(glob.escape(self.directory), "*.key"))):
            try:
                public, _ = zmq.auth.load_certificate(path)
            except (OSError, ValueError) as e:
                broken.add(path)
                if path not in self._broken:  # once per file, not per reload
                    self.log.warn("host key {path} cannot be read: {e}", path=path, e=e)
                continue
            if public:
                keys[public] = os.path.basename(path)
        added = set(keys) - set(self.keys)
        removed = set(self.keys) - set(keys)
        if added or removed:
            self.log.info(
                "authorised host keys: {n} ({added} added, {removed} removed)",
                n=len(keys),
                added=len(added),
                removed=len(removed),
            )
        self.keys, self._broken = keys, broken

    def __contains__(self, z85_key: bytes) -> bool:
        return z85_key in self.keys


class ZapHandler(BoundedReads, ZmqConnection):
    """Answers libzmq's ZAP requests from the reactor (a REP socket)."""

    socketType = zmq.REP
    log = Logger()

    def __init__(self, factory: ZmqFactory, keys: AuthorisedKeys) -> None:
        self.keys = keys
        self.refusals = RefusalLog(factory.reactor, self._refusal_line)
        super().__init__(factory)
        self.socket.bind(ZAP_ENDPOINT)
        self._reload = task.LoopingCall(keys.reload)
        self._reload.clock = factory.reactor
        self._reload.start(RELOAD_SECONDS, now=False)

    def messageReceived(self, message: list[bytes]) -> None:
        # A REP socket must answer every request, or it answers none again.
        try:
            reply = self.answer(message)
        except Exception:
            self.log.failure("ZAP request handling failed")
            reply = [b"1.0", message[1] if len(message) > 1 else b"", b"500", b"error", b"", b""]
        try:
            self.socket.send_multipart(reply, zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self.log.warn("ZAP reply failed: {e}", e=e)
        self._reschedule_read()

    def answer(self, message: list[bytes]) -> list[bytes]:
        """The reply to one ZAP request: 200 with the key as user id, or 400."""
        if len(message) < 6:
            return [
                b"1.0",
                message[1] if len(message) > 1 else b"",
                b"500",
                b"bad request",
                b"",
                b"",
            ]
        version, request_id, domain, address, _routing, mechanism, *credentials = message
        if version != b"1.0":
            return [b"1.0", request_id, b"500", b"bad version", b"", b""]
        peer = address.decode(errors="replace")
        if domain != ZAP_DOMAIN or mechanism != b"CURVE" or len(credentials) != 1:
            self.refusals.note(REFUSED_HOSTS, f"{peer}: not CURVE")
            return [b"1.0", request_id, b"400", b"CURVE only", b"", b""]
        key = z85.encode(credentials[0])
        if key not in self.keys:
            self.refusals.note(
                f"kernel host key {key.decode()}",
                f"not authorised, from {peer}",
                kind=REFUSED_HOSTS,
            )
            return [b"1.0", request_id, b"400", b"key not authorised", b"", b""]
        return [b"1.0", request_id, b"200", b"OK", key, b""]

    def _refusal_line(self, line: Line) -> None:
        warn_line(self.log, line, self.factory.reactor.seconds() if self.factory else line.since)

    def shutdown(self) -> None:
        if self._reload.running:
            self._reload.stop()
        self.refusals.stop()
        super().shutdown()

# -*- test-case-name: tests.test_other_kernels -*-
"""The adaptor: a kernel of any kernelspec, joined to the server by the one link.

Python kernels are forked from the nursery with ipykernel already loaded
(L{cellmux.kernel.child}). Every other kernelspec (bash_kernel, IRkernel, …)
is started cold: the nursery forks a child that resets itself and enters the
sandbox exactly as a Python kernel does, and then becomes this adaptor. It

* writes a connection file (five TCP ports on 127.0.0.1, a fresh HMAC key)
  in the kernel's private directory, and starts the kernelspec's ``argv``
  with it, in its own process group (so the nursery's signals reach both);
* connects to the kernel's five sockets and signs what it sends with the key;
* speaks the kernel link to the server exactly as the pump of a Python
  kernel does (handshake, channel tags, credit, pings), so the server,
  replay, roles, flow control and clients see no difference.

Liveness: the adaptor pings the kernel's heartbeat socket every
L{HEARTBEAT_INTERVAL} seconds and answers the server's link pings only while
the kernel echoes, so a kernel that stops answering shows ``unresponsive``.
Interrupts: the nursery's SIGINT reaches the kernel's process group; a
kernelspec with ``interrupt_mode: message`` gets an ``interrupt_request`` on
its control socket instead. Death: when the kernel process ends, the adaptor
ends the same way (same exit code, or same signal), so the nursery reports
the kernel's own cause.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import string
import subprocess
import time
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import zmq

from cellmux.protocol import Channel, JupyterSocket, ProtocolError, decode_tag
from cellmux.protocol.jupyter import jupyter_parts
from cellmux.protocol.link import link_control

from .pump import DELIMITER, PUMP_ROUTING_ID, Pump

__all__ = [
    "CONNECTION_FILE",
    "HEARTBEAT_INTERVAL",
    "Heartbeat",
    "Launch",
    "StderrTail",
    "kernel_argv",
    "kernel_env",
    "run_adaptor",
    "sign",
]

#: Seconds between two pings of the kernel's heartbeat socket.
HEARTBEAT_INTERVAL = 0.5
#: A kernel whose heartbeat has not echoed for this long is not answering:
#: the server's link pings go unanswered until it echoes again.
HEARTBEAT_STALE = 1.5
#: How often to repeat kernel_info_request while the kernel starts.
NUDGE_INTERVAL = 0.25
#: Bytes of the kernel's stderr kept, for the log if it fails to start.
STDERR_TAIL = 8192
#: The connection file's name in the kernel's private directory.
CONNECTION_FILE = ".cellmux-kernel.json"
#: Exit code when the kernel could not be started at all (as child.py's).
EXIT_START_FAILED = 70
#: Seconds the adaptor keeps relaying what a dead kernel left in its sockets.
DRAIN_TIME = 0.2

_CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
INTERRUPT_MODES = ("signal", "message")


@attrs.frozen
class Launch:
    """How to start one kernel of a kernelspec (sent in the nursery's spawn)."""

    name: str
    argv: tuple[str, ...] = attrs.field(converter=tuple)
    env: Mapping[str, str] = attrs.Factory(dict)
    interrupt_mode: str = "signal"
    resource_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "argv": list(self.argv),
            "env": dict(self.env),
            "interrupt_mode": self.interrupt_mode,
            "resource_dir": self.resource_dir,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Launch:
        return cls(
            name=data["name"],
            argv=data["argv"],
            env=dict(data.get("env") or {}),
            interrupt_mode=data.get("interrupt_mode") or "signal",
            resource_dir=data.get("resource_dir") or "",
        )


def kernel_argv(launch: Launch, connection_file: str) -> list[str]:
    """The kernelspec's argv with Jupyter's two placeholders filled in."""
    return [
        arg.replace("{connection_file}", connection_file).replace(
            "{resource_dir}", launch.resource_dir
        )
        for arg in launch.argv
    ]


def kernel_env(base: Mapping[str, str], launch: Launch) -> dict[str, str]:
    """The kernel's environment: the scrubbed one plus the kernelspec's own,
    whose values may name others as ``${VAR}`` (as jupyter_client allows)."""
    env = dict(base)
    for key, value in launch.env.items():
        env[key] = string.Template(value).safe_substitute(env)
    return env


def sign(key: bytes, parts: list) -> bytes:
    """Jupyter's message signature: HMAC-SHA256 of the four JSON parts, hex."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts[:4]:
        mac.update(part if isinstance(part, bytes | bytearray | memoryview) else part.buffer)
    return mac.hexdigest().encode()


@attrs.define
class Heartbeat:
    """Whether the kernel answers its heartbeat; which link pong to hold (no I/O).

    The adaptor answers a server's link ping at once while the kernel's
    heartbeat echoed within C{stale} seconds or the kernel is busy, and
    otherwise holds the pong until the next echo. The server shows a kernel
    whose pong is late ``unresponsive`` (docs/protocol.md, section 9).

    Silence counts only while the kernel is idle: some kernels answer their
    heartbeat from their main loop (IRkernel), so they cannot while they
    run code, and that is no fault; an idle kernel must always answer.
    """

    stale: float = HEARTBEAT_STALE
    interval: float = HEARTBEAT_INTERVAL
    last_echo: float = 0.0
    next_ping: float = 0.0
    #: The link ping waiting for an echo (only the latest counts).
    held: int | None = None
    #: Whether the kernel's last status said busy.
    busy: bool = False

    def started(self, now: float) -> None:
        """The kernel answered its first request: count it alive from now."""
        self.last_echo = now
        self.next_ping = now

    def due(self, now: float) -> bool:
        """Whether to send a heartbeat ping now (and count it sent)."""
        if now < self.next_ping:
            return False
        self.next_ping = now + self.interval
        return True

    def alive(self, now: float) -> bool:
        return self.busy or now - self.last_echo <= self.stale

    def status(self, busy: bool, now: float) -> int | None:
        """The kernel said busy or idle: the held ping to answer, if any
        (busy needs no heartbeat; idle starts the count afresh)."""
        was, self.busy = self.busy, busy
        if was and not busy:
            self.last_echo = max(self.last_echo, now)
        if busy and self.held is not None:
            held, self.held = self.held, None
            return held
        return None

    def link_ping(self, n: int, now: float) -> int | None:
        """The server pinged: the number to answer now, or None (held)."""
        if self.alive(now):
            self.held = None
            return n
        self.held = n
        return None

    def echoed(self, now: float) -> int | None:
        """The kernel's heartbeat echoed: the held ping to answer, if any."""
        self.last_echo = now
        held, self.held = self.held, None
        return held

    def timeout(self, now: float) -> float:
        """Seconds until the next heartbeat ping is due."""
        return max(0.0, self.next_ping - now)


@attrs.define
class StderrTail:
    """The last C{limit} bytes a kernel wrote to stderr (bounded)."""

    limit: int = STDERR_TAIL
    data: bytearray = attrs.Factory(bytearray)

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.limit:
            del self.data[: len(self.data) - self.limit]

    def text(self) -> str:
        return self.data.decode(errors="replace").strip()


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (in the kernel's own network namespace
    under root, where nothing else runs; as in jupyter_client otherwise)."""
    held = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _write_connection_file(path: str, ports: dict[str, int], key: str, name: str) -> None:
    info: dict[str, Any] = {f"{c}_port": ports[c] for c in _CHANNELS}
    info.update(
        ip="127.0.0.1",
        transport="tcp",
        key=key,
        signature_scheme="hmac-sha256",
        kernel_name=name,
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)


def _in_kernel_child(own_group: bool) -> None:
    """In the kernel between fork and exec: default SIGINT (the adaptor
    handles it), die with the adaptor, and with C{own_group}, leave the
    adaptor's process group."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if own_group:
        # Interrupted by message: the nursery's SIGINT must reach the
        # adaptor alone (ipykernel answers interrupt_request by signalling
        # its own process group, which must not be the adaptor's).
        os.setpgid(0, 0)
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def _exit_like(status: int) -> None:
    """End this process the way the kernel ended (for the nursery's cause)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
            os.kill(os.getpid(), sig)
            time.sleep(1)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else EXIT_START_FAILED)


class KernelEnded(Exception):
    """The kernel process ended (C{status}: its wait status)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Adaptor(Pump):
    """Relays between one kernelspec kernel's five sockets and the link.

    Runs on the adaptor process's main thread (it is all the process does).
    """

    def __init__(
        self,
        context: zmq.Context,
        endpoint: str,
        link_id: bytes,
        secret: bytes,
        kernel: subprocess.Popen,
        ports: dict[str, int],
        key: bytes,
        launch: Launch,
        wake_fd: int,
    ) -> None:
        super().__init__(context, endpoint, link_id, secret, os.getpid())
        self._kernel = kernel
        self._ports = ports
        self._key = key
        self._launch = launch
        self._wake_fd = wake_fd
        self._pidfd = os.pidfd_open(kernel.pid)
        self._stderr_fd = kernel.stderr.fileno() if kernel.stderr else -1
        if self._stderr_fd >= 0:
            os.set_blocking(self._stderr_fd, False)
        self.stderr = StderrTail()
        self.heartbeat = Heartbeat()
        self._own_session = self._session.encode()
        #: Whether the kernel answered and the server was told it is ready.
        self.is_ready = False

    # -- sockets -----------------------------------------------------------

    def _kernel_socket(self, kind: int, channel: str) -> zmq.Socket:
        s = self._context.socket(kind)
        s.linger = 0
        if kind == zmq.DEALER:
            # Kernels send input_request to the stdin peer whose identity
            # sent the request: one id on shell, control and stdin.
            s.routing_id = PUMP_ROUTING_ID
        s.connect(f"tcp://127.0.0.1:{self._ports[channel]}")
        return s

    def _signed(self, parts: list) -> list:
        return [DELIMITER, sign(self._key, parts), *parts]

    def run(self) -> None:
        ctx = self._context
        link = ctx.socket(zmq.DEALER)
        link.routing_id = self._link_id
        link.linger = 2000
        link.connect(self._endpoint)  # no ZMTP heartbeat, as the pump's
        shell = self._kernel_socket(zmq.DEALER, "shell")
        # Nudges must not pile up for a kernel that has not bound yet.
        shell.setsockopt(zmq.IMMEDIATE, 1)
        control = self._kernel_socket(zmq.DEALER, "control")
        stdin = self._kernel_socket(zmq.DEALER, "stdin")
        iopub = ctx.socket(zmq.SUB)
        iopub.linger = 0
        iopub.setsockopt(zmq.RCVHWM, 1000)
        iopub.subscribe(b"")
        iopub.connect(f"tcp://127.0.0.1:{self._ports['iopub']}")
        hb = self._kernel_socket(zmq.DEALER, "hb")
        self._control = control
        self._authenticate(link)
        self._wait_for(shell, iopub, hb)
        link.send_multipart(self._link.ready())
        self.is_ready = True
        self.heartbeat.started(time.monotonic())
        self._relay_all(link, shell, control, stdin, iopub, hb)

    # -- watching the process ---------------------------------------------

    def _watch(self, ready: list) -> None:
        """Handle the kernel's process, stderr and our signals, if readable.

        @raise KernelEnded: once the kernel has exited.
        """
        if self._stderr_fd in ready:
            self._read_stderr()
        if self._wake_fd in ready:
            self._woken()
        if self._pidfd in ready:
            _, status = os.waitpid(self._kernel.pid, 0)
            self._read_stderr()
            raise KernelEnded(status)

    def _read_stderr(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(self._stderr_fd, 65536):
                self.stderr.feed(chunk)

    def _woken(self) -> None:
        try:
            signals = os.read(self._wake_fd, 512)
        except OSError:
            return
        if signal.SIGINT in signals and self._launch.interrupt_mode == "message":
            self._interrupt_by_message()

    def _interrupt_by_message(self) -> None:
        parts = jupyter_parts("interrupt_request", {}, now=datetime.now(UTC), session=self._session)
        with contextlib.suppress(zmq.Again):
            self._control.send_multipart(self._signed(list(parts)), flags=zmq.NOBLOCK)

    def _poller(self, *sockets: zmq.Socket) -> zmq.Poller:
        poller = zmq.Poller()
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        for fd in (self._pidfd, self._wake_fd, self._stderr_fd):
            if fd >= 0:
                poller.register(fd, zmq.POLLIN)
        return poller

    # -- start-up ------------------------------------------------------------

    def _wait_for(self, shell: zmq.Socket, iopub: zmq.Socket, hb: zmq.Socket) -> None:
        """Nudge with kernel_info until both a reply and iopub arrive (as the pump)."""
        poller = self._poller(shell, iopub)
        replied = published = False
        next_nudge = 0.0
        while not (replied and published):
            if time.monotonic() >= next_nudge:
                parts = jupyter_parts(
                    "kernel_info_request", {}, now=datetime.now(UTC), session=self._session
                )
                with contextlib.suppress(zmq.Again):
                    shell.send_multipart(self._signed(list(parts)), flags=zmq.NOBLOCK)
                next_nudge = time.monotonic() + NUDGE_INTERVAL
            events = dict(poller.poll(int(NUDGE_INTERVAL * 1000)))
            self._watch(list(events))
            for sock in (shell, iopub):
                while sock in events and sock.poll(0):
                    sock.recv_multipart()
                    if sock is iopub:
                        published = True
                    else:
                        replied = True

    # -- relaying --------------------------------------------------------------

    def _relay_all(self, link, shell, control, stdin, iopub, hb) -> None:
        to_kernel = {
            JupyterSocket.SHELL: shell,
            JupyterSocket.CONTROL: control,
            JupyterSocket.STDIN: stdin,
        }
        from_kernel = {
            shell: JupyterSocket.SHELL,
            control: JupyterSocket.CONTROL,
            stdin: JupyterSocket.STDIN,
            iopub: JupyterSocket.IOPUB,
        }
        # iopub first: output flushed before a reply is forwarded before it.
        everything = self._poller(link, iopub, shell, control, stdin, hb)
        link_only = self._poller(link, hb)
        try:
            while True:
                now = time.monotonic()
                if self.heartbeat.due(now):
                    with contextlib.suppress(zmq.Again):
                        hb.send_multipart([b"", b"ping"], flags=zmq.NOBLOCK)
                poller = everything if self._link.credit > 0 else link_only
                timeout = self.heartbeat.timeout(time.monotonic())
                ready = dict(poller.poll(max(1, int(timeout * 1000))))
                self._watch(list(ready))
                for sock in ready:
                    if not isinstance(sock, zmq.Socket):
                        continue
                    while sock.poll(0) and (sock is link or sock is hb or self._link.credit > 0):
                        msg = sock.recv_multipart(copy=False)
                        if sock is link:
                            self._from_server(msg, link, to_kernel)
                        elif sock is hb:
                            held = self.heartbeat.echoed(time.monotonic())
                            if held is not None:
                                link.send_multipart(self._pong(held))
                        else:
                            self._to_server(msg, from_kernel[sock], link)
                # The pump's _to_server bundles what one pass read: send it.
                self._send_bundle(link)
        except KernelEnded:
            self._drain(link, from_kernel)
            raise

    def _pong(self, n: int) -> list[bytes]:
        return link_control("pong", n=n)

    def _from_server(self, msg: list, link: zmq.Socket, to_kernel: dict) -> None:
        parts = [bytes(m.buffer) if i < 5 else m for i, m in enumerate(msg)]
        try:
            channel, socket_ = decode_tag(parts[0])
            if channel == Channel.CONTROL:
                body = json.loads(parts[1]) if len(parts) == 2 else {}
                if isinstance(body, dict) and body.get("op") == "ping":
                    n = body.get("n")
                    if type(n) is int and self.heartbeat.link_ping(n, time.monotonic()) is None:
                        return  # held until the kernel's heartbeat echoes
                answer = self._link.receive(parts)
                if answer is not None:
                    link.send_multipart(answer)
                return
        except (ProtocolError, ValueError):
            return
        target = to_kernel.get(socket_)
        if target is not None and len(parts) >= 5:
            target.send_multipart(self._signed(parts[1:]), copy=False)

    def _to_server(self, msg: list, socket_: int, link: zmq.Socket) -> None:
        delimiter = next((i for i, f in enumerate(msg) if f.bytes == DELIMITER), None)
        if delimiter is None or len(msg) < delimiter + 6:
            return
        # Replies to the adaptor's own requests (start-up nudges, interrupts)
        # and the busy/idle around them are nobody's business: a late one
        # would show a fresh kernel busy.
        if self._own_session in msg[delimiter + 3].bytes:
            return
        if socket_ == JupyterSocket.IOPUB and b'"status"' in msg[delimiter + 2].bytes:
            # A byte search, as the server's: status content is tiny.
            content = msg[delimiter + 5].bytes
            if b'"busy"' in content or b'"idle"' in content:
                held = self.heartbeat.status(b'"busy"' in content, time.monotonic())
                if held is not None:
                    link.send_multipart(self._pong(held))
        super()._to_server(msg, socket_, link)

    def _drain(self, link: zmq.Socket, from_kernel: dict) -> None:
        """Forward what the ended kernel sent last (a shutdown_reply, its
        final output), within credit and L{DRAIN_TIME}."""
        self._send_bundle(link)  # what the last pass read
        deadline = time.monotonic() + DRAIN_TIME
        while time.monotonic() < deadline and self._link.credit > 0:
            moved = False
            for sock, which in from_kernel.items():
                while sock.poll(0) and self._link.credit > 0:
                    self._to_server(sock.recv_multipart(copy=False), which, link)
                    moved = True
            self._send_bundle(link)
            if not moved:
                time.sleep(0.02)


def _start_kernel(launch: Launch, workdir: str) -> tuple[subprocess.Popen, dict[str, int], bytes]:
    key = secrets.token_hex(32)
    ports = dict(zip(_CHANNELS, _free_ports(len(_CHANNELS)), strict=True))
    path = os.path.join(workdir, CONNECTION_FILE)
    _write_connection_file(path, ports, key, launch.name)
    argv = kernel_argv(launch, path)
    env = kernel_env(os.environ, launch)
    process = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=functools.partial(
            _in_kernel_child, launch.interrupt_mode == "message"
        ),  # safe: no thread runs in this process yet
        close_fds=True,
    )
    return process, ports, key.encode()


def run_adaptor(order: Any, launch: Launch) -> None:
    """Become the adaptor of one kernel. Never returns.

    @param order: the nursery's L{cellmux.kernel.child.KernelOrder}.
    """
    from .child import _reset_process

    err_fd = os.dup(2)  # start-up failures go to the nursery's log
    try:
        _reset_process(order, err_fd)
        # A Python handler (not SIG_IGN, which exec would pass on to the
        # kernel): the wake-up fd tells the loop, which interrupts by
        # message if the kernelspec asks for it.
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGINT, lambda *_: None)
        try:
            process, ports, key = _start_kernel(launch, order.workdir)
        except OSError as e:
            _say(err_fd, f"cannot start kernel {launch.name!r} ({launch.argv[0]}): {e}")
            os._exit(EXIT_START_FAILED)
        context = zmq.Context()
        adaptor = Adaptor(
            context,
            order.endpoint,
            order.link_id,
            order.secret,
            process,
            ports,
            key,
            launch,
            wake_r,
        )
        try:
            adaptor.run()
        except KernelEnded as ended:
            # What it said last on stderr says why (bounded: STDERR_TAIL).
            _report(err_fd, launch, ended.status, adaptor.stderr.text(), adaptor.is_ready)
            context.destroy(linger=1000)
            _exit_like(ended.status)
    except BaseException:
        with contextlib.suppress(OSError):
            os.write(err_fd, traceback.format_exc().encode(errors="replace"))
    os._exit(EXIT_START_FAILED)


def _say(err_fd: int, text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(err_fd, f"cellmux adaptor: {text}\n".encode(errors="replace"))


def _report(err_fd: int, launch: Launch, status: int, tail: str, started: bool) -> None:
    from .nursery import describe_status

    when = "ended" if started else "ended while starting"
    text = f"kernel {launch.name!r} {when} ({describe_status(status)['cause']})"
    if tail:
        text += ":\n" + tail
    _say(err_fd, text)

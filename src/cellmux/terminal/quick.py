# -*- test-case-name: tests.test_terminal_quick -*-
"""The quick path of ``cellmux run``: one blocking websocket, standard library only.

An editor runs the selection on a key press, so a new ``cellmux run``
process starts every time, and most of its wall time went to imports
(asyncio, websockets, attrs), not to the kernel. When the kernel is one the
state file already names (every run after the first), this module runs the
code with a small RFC 6455 client over a plain socket in the calling thread:
one upgrade, ``hello``, ``execute_request``, then frames until the reply and
``idle`` (docs/protocol.md, the same frames the full client sends).

It covers what an editor's run needs: streamed output, results, tracebacks,
``input()``/``getpass``/pdb prompts from the terminal, Ctrl-C, a kernel that
dies. Anything it cannot start with (an https URL, a name the state file does
not know, a dead kernel, an upgrade or hello the server refuses) raises
L{Unavailable} *before* any code was sent, and ``cellmux run`` takes the full
client, which creates, restarts and reports as before.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Unavailable", "WebSocket", "run_code"]

#: Seconds for connecting and the handshake (the full client's default).
HANDSHAKE_TIMEOUT = 30.0
#: Longest upgrade response head accepted.
MAX_RESPONSE_HEAD = 64 * 1024
#: Largest websocket message accepted (the full client's limit).
MAX_MESSAGE = 64 * 1024 * 1024
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_FRAME_HEAD = struct.Struct(">HBBQI")
# Channels and sockets (cellmux.protocol.channels; not imported: it costs more
# than this whole module).
_CONTROL, _STATUS, _EXECUTE, _STDIN = 0, 4, 6, 1
_SHELL, _STDIN_SOCKET = 1, 3
_PROTOCOL_VERSION = 1
#: How many times a request the kernel aborted is sent: ipykernel aborts
#: what reaches it while it is still ending a request that failed (after an
#: interrupt, or input that ended), and an aborted request's code never ran,
#: so sending it again is safe. The pause grows with each try.
ABORTED_TRIES = 3
ABORTED_PAUSE = 0.05
ABORTED_MESSAGE = (
    "the kernel aborted the request {tries} times (it was still ending"
    " an earlier request that failed); the code did not run"
)
_JUPYTER_VERSION = "5.3"


class Unavailable(Exception):
    """The quick path cannot take this run; nothing was sent to the kernel."""


class Closed(Exception):
    """The websocket closed while the code ran."""


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection; an address literal is used as is (getaddrinfo costs
    milliseconds even for 127.0.0.1)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection((host, port), timeout=timeout)


def _sha1(data: bytes) -> bytes:
    try:
        # CPython's own SHA-1: hashlib would load OpenSSL (~10 ms) for 20 bytes.
        from _sha1 import sha1  # type: ignore[import-not-found]  # private, no stub
    except ImportError:
        from hashlib import sha1
    return sha1(data).digest()


class WebSocket:
    """A blocking websocket client: binary messages, pings answered, masking done."""

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: float = HANDSHAKE_TIMEOUT,
        kernel_id: str | None = None,
    ) -> None:
        from urllib.parse import quote, urlsplit  # pathlib imported it already

        parts = urlsplit(url)
        if parts.scheme.lower() != "http" or not parts.hostname or parts.username:
            raise Unavailable(f"not a plain http URL: {url}")
        try:
            self.sock = _connect(parts.hostname, parts.port or 80, timeout)
        except (OSError, ValueError) as e:
            raise Unavailable(f"cannot connect: {e}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        try:
            # The kernel in the URL too: a proxy routes by it (scaling.md).
            query = "" if kernel_id is None else "?kernel=" + quote(kernel_id, safe="")
            self._upgrade(parts.netloc, parts.path.rstrip("/") + "/ws" + query, token)
        except BaseException:
            self.sock.close()
            raise

    def _upgrade(self, netloc: str, path: str, token: str | None) -> None:
        key = base64.b64encode(os.urandom(16))
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {netloc}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key.decode()}",
            "Sec-WebSocket-Version: 13",
        ]
        if token:
            lines.append(f"Authorization: token {token}")
        try:
            self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            while b"\r\n\r\n" not in self.buffer:
                if len(self.buffer) > MAX_RESPONSE_HEAD:
                    raise Unavailable("upgrade response too long")
                self._fill()
        except (OSError, Closed) as e:
            raise Unavailable(f"upgrade failed: {e}") from None
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        status, *headers = head.decode("latin-1").split("\r\n")
        if status.split(" ")[1:2] != ["101"]:
            raise Unavailable(f"upgrade refused: {status}")  # the full client says why
        accept = base64.b64encode(_sha1(key + _GUID)).decode()
        fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in headers)}
        if fields.get("sec-websocket-accept") != accept:
            raise Unavailable("the server's upgrade answer does not match the key")

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise Closed("the server closed the connection")
        self.buffer += data

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        # XOR as one big integer: fast in C, no per-byte Python loop.
        repeated = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
            n, "big"
        )
        self.sock.sendall(head + mask + masked)

    def send(self, payload: bytes) -> None:
        self._send_frame(0x2, payload)

    def receive(self) -> bytes:
        """The next binary message (text messages are dropped, as the full client does)."""
        message = bytearray()
        opcode_of_message = None
        while True:
            first, second = self._take(2)
            opcode, fin = first & 0x0F, first & 0x80
            n = second & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", self._take(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", self._take(8))
            if n > MAX_MESSAGE or len(message) + n > MAX_MESSAGE:
                raise Closed(f"a message of more than {MAX_MESSAGE} bytes")
            mask = self._take(4) if second & 0x80 else b""
            payload = self._take(n)
            if mask:
                repeated = (mask * (n // 4 + 1))[:n]
                payload = (
                    int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
                ).to_bytes(n, "big")
            if opcode == 0x8:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                reason = payload[2:].decode("utf-8", "replace")
                raise Closed(f"code {code}: {reason}" if code else "closed")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode in (0x1, 0x2):
                opcode_of_message = opcode
            message += payload
            if fin:
                if opcode_of_message == 0x2:
                    return bytes(message)
                message.clear()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send_frame(0x8, struct.pack(">H", 1000))
        self.sock.close()


def frame(channel: int, sock: int, parts: list[bytes]) -> bytes:
    n = len(parts)
    return b"".join(
        (_FRAME_HEAD.pack(channel, sock, 0, 0, n), struct.pack(f">{n}I", *map(len, parts)), *parts)
    )


def unframe(data: bytes) -> tuple[int, list[bytes]]:
    if len(data) < _FRAME_HEAD.size:
        return -1, []
    channel, _sock, _flags, _seq, n = _FRAME_HEAD.unpack_from(data)
    offset = _FRAME_HEAD.size + 4 * n
    if n > 1024 or len(data) < offset:
        return -1, []
    lengths = struct.unpack_from(f">{n}I", data, _FRAME_HEAD.size)
    parts = []
    for length in lengths:
        parts.append(data[offset : offset + length])
        offset += length
    return channel, parts


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _loads(part: bytes) -> dict[str, Any]:
    try:
        value = json.loads(part) if part else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class Output:
    """The fields of cellmux.client.Output that the renderer reads."""

    def __init__(self, kind: str, content: Any, raw: dict[str, Any]) -> None:
        self.kind, self.content, self.raw = kind, content, raw


class Error:
    """The fields of cellmux.client.ExecutionError that the renderer reads."""

    def __init__(self, content: dict[str, Any]) -> None:
        self.ename = str(content.get("ename", ""))
        self.evalue = str(content.get("evalue", ""))
        traceback = content.get("traceback")
        self.traceback = [str(t) for t in traceback] if isinstance(traceback, list) else []

    def __str__(self) -> str:
        return f"{self.ename}: {self.evalue}"


def _output(msg_type: str, content: dict[str, Any]) -> Output | None:
    if msg_type == "stream":
        name = "stderr" if content.get("name") == "stderr" else "stdout"
        return Output(name, str(content.get("text", "")), content)
    if msg_type in ("display_data", "update_display_data", "execute_result"):
        data = content.get("data")
        data = data if isinstance(data, dict) else {}
        kind = {"display_data": "display", "update_display_data": "update_display"}
        return Output(kind.get(msg_type, "result"), data, content)
    if msg_type == "error":
        return Output("error", Error(content), content)
    if msg_type == "clear_output":
        return Output("clear_output", content, content)
    return None


class KernelGone(Exception):
    """The kernel died or was restarted while the code ran (the full client's KernelDied)."""


class InputEnded(Exception):
    """The terminal's input ended while the code waited for it."""


def _username() -> str:
    # getpass.getuser()'s own order, without importing getpass (and pwd).
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        if os.environ.get(name):
            return os.environ[name]
    try:
        import getpass

        return getpass.getuser()
    except Exception:
        return "cellmux"


class _Run:
    def __init__(self, ws: WebSocket, session: str, renderer: Any, ask: Callable) -> None:
        self.ws = ws
        self.session = session
        self.renderer = renderer
        self.ask = ask
        self.msg_id = os.urandom(16).hex()
        self.status: str | None = None
        self.replied = self.idle = False
        self.count: int | None = None

    def header(self, msg_type: str, msg_id: str | None = None) -> dict[str, Any]:
        return {
            "msg_id": msg_id or os.urandom(16).hex(),
            "msg_type": msg_type,
            "session": self.session,
            "username": _username(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "version": _JUPYTER_VERSION,
        }

    def execute(self, code: str, metadata: dict[str, Any]) -> None:
        content = {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": True,
            "stop_on_error": True,
        }
        parts = [_dumps(self.header("execute_request", self.msg_id)), b"{}", _dumps(metadata)]
        self.ws.send(frame(_EXECUTE, _SHELL, [*parts, _dumps(content)]))

    def until_done(self) -> bool:
        """Show what the code produces until its reply and idle; whether it ran without error."""
        prompt: tuple[float, dict[str, Any], dict[str, Any]] | None = None
        while not (self.replied and self.idle):
            if prompt is not None:
                wait = prompt[0] - time.monotonic()
                if wait <= 0:
                    self.answer(prompt[1], prompt[2])
                    prompt = None
                    continue
                self.ws.sock.settimeout(wait)
            try:
                data = self.ws.receive()
            except TimeoutError:
                continue
            finally:
                self.ws.sock.settimeout(None)
            asked = self.handle(data)
            if asked is not None and prompt is None:
                # Output travels on iopub, the prompt on stdin: what the
                # code printed just before asking may still be on its way.
                from .render import PROMPT_GRACE

                prompt = (time.monotonic() + PROMPT_GRACE, *asked)
        return self.status == "ok"

    def handle(self, data: bytes) -> tuple[dict[str, Any], dict[str, Any]] | None:
        channel, parts = unframe(data)
        if channel == _CONTROL:
            body = _loads(parts[0]) if parts else {}
            if body.get("op") == "error" and body.get("fatal"):
                raise Closed(f"server error {body.get('code')}: {body.get('message', '')}")
            return None
        if len(parts) < 4:
            return None
        header, parent = _loads(parts[0]), _loads(parts[1])
        msg_type = header.get("msg_type")
        content = _loads(parts[3])
        if msg_type == "status" and not parent:
            state = content.get("execution_state")
            if state == "dead":
                raise KernelGone(str(content.get("cause") or "unknown cause"))
            if state == "restarting":
                raise KernelGone(str(content.get("cause") or "kernel restarted"))
        if parent.get("msg_id") != self.msg_id:
            return None
        if msg_type == "status":
            self.idle = self.idle or content.get("execution_state") == "idle"
        elif msg_type == "input_request":
            return header, content
        elif msg_type == "execute_reply":
            self.replied = True
            self.status = str(content.get("status", ""))
        else:
            output = _output(str(msg_type), content)
            if output is not None:
                self.renderer.output(output, self.count)
            elif msg_type == "execute_input":
                count = content.get("execution_count")
                self.count = count if isinstance(count, int) else None
        return None

    def answer(self, request: dict[str, Any], content: dict[str, Any]) -> None:
        try:
            value = self.ask(str(content.get("prompt", "")), bool(content.get("password")))
        except EOFError:
            raise InputEnded() from None
        parts = [
            _dumps(self.header("input_reply")),
            _dumps(request),
            b"{}",
            _dumps({"value": str(value)}),
        ]
        self.ws.send(frame(_STDIN, _STDIN_SOCKET, parts))

    def interrupt(self) -> None:
        """Interrupt the kernel (the control op) and wait, briefly, for the server's ok."""
        self.ws.send(frame(_CONTROL, 0, [_dumps({"op": "interrupt", "id": 1})]))
        self.ws.sock.settimeout(5)
        deadline = time.monotonic() + 5
        try:
            while time.monotonic() < deadline:
                channel, parts = unframe(self.ws.receive())
                if channel == _CONTROL and parts and _loads(parts[0]).get("id") == 1:
                    return
        except (OSError, Closed):
            return


def run_code(
    url: str,
    token: str | None,
    kernel_id: str,
    code: str,
    metadata: dict[str, Any],
    renderer: Any,
    ask: Callable[[str, bool], str],
    spec: str | None = None,
) -> int:
    """Run C{code} on the kernel; the exit status of ``cellmux run``.

    @param spec: the kernel spec the kernel must run (``--spec``), if any.
    @raise Unavailable: before anything was sent, if this path cannot run it.
    """
    ws = WebSocket(url, token, kernel_id=kernel_id)
    try:
        session = os.urandom(16).hex()
        hello = {
            "op": "hello",
            "version": _PROTOCOL_VERSION,
            "kernel": kernel_id,
            "session": session,
            "channels": None,
        }
        try:
            ws.send(frame(_CONTROL, 0, [_dumps(hello)]))
            channel, parts = unframe(ws.receive())
        except (OSError, Closed) as e:
            raise Unavailable(f"hello failed: {e}") from None
        welcome = _loads(parts[0]) if channel == _CONTROL and parts else {}
        model = welcome.get("kernel")
        if welcome.get("op") != "welcome" or not isinstance(model, dict):
            raise Unavailable(f"no welcome: {welcome.get('code')}")
        if model.get("execution_state") == "dead":
            raise Unavailable("the kernel is dead")  # the full client restarts it
        if spec is not None and model.get("name") != spec:
            raise Unavailable("another kernel spec")  # the full client says which
        ws.sock.settimeout(None)
        try:
            for tried in range(1, ABORTED_TRIES + 1):
                run = _Run(ws, session, renderer, ask)
                run.execute(code, metadata)
                if run.until_done():
                    return 0
                if run.status != "aborted":
                    return 1
                time.sleep(ABORTED_PAUSE * tried)
            print(f"cellmux: {ABORTED_MESSAGE.format(tries=ABORTED_TRIES)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            run.interrupt()
            renderer.line("cellmux: interrupted the kernel", sys.stderr)
            sys.stdout.flush()
            os._exit(130)
        except InputEnded:
            run.interrupt()
            print(
                "cellmux: input ended while the code waited for it; interrupted the kernel",
                file=sys.stderr,
            )
            return 1
        except KernelGone as e:
            print(f"cellmux: kernel died: {e}", file=sys.stderr)
            return 3
        except (OSError, Closed) as e:
            print(f"cellmux: connection to cellmux server closed: {e}", file=sys.stderr)
            return 3
    finally:
        ws.close()

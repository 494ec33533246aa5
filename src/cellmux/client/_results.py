"""Values the client hands back: kernel models, messages, execution results, errors."""

from __future__ import annotations

from typing import Any

import attrs

from cellmux.protocol import Frame, boundedjson

__all__ = [
    "CellmuxError",
    "ConnectionClosed",
    "ExecutionError",
    "ExecutionResult",
    "HTTPError",
    "KernelDied",
    "KernelModel",
    "Message",
    "Output",
    "ServerError",
]


class CellmuxError(Exception):
    """Base class of every error the cellmux client raises."""


class HTTPError(CellmuxError):
    """The server answered a REST call (or the websocket upgrade) with an error status.

    @ivar status: the HTTP status code, e.g. 404.
    @ivar reason: the server's short reason (the JSON ``reason``), else the HTTP phrase.
    @ivar message: the server's explanation (the JSON ``message``).
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        text = f"HTTP {status}"
        if reason:
            text += " " + reason
        if message and message != reason:
            text += ": " + message
        super().__init__(text)


class ServerError(CellmuxError):
    """The server refused something on the websocket (an ``error`` control message).

    @ivar code: the server's machine-readable code, e.g. ``"unknown_kernel"``.
    @ivar message: the server's explanation.
    @ivar fatal: whether the server closes the connection after it.
    """

    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        self.code = code
        self.message = message
        self.fatal = fatal
        super().__init__(f"{code}: {message}" if message else code)

    @classmethod
    def from_body(cls, body: dict[str, Any], fatal: bool = False) -> ServerError:
        """From an ``error`` control message; C{fatal} is the default if it says nothing."""
        return cls(
            str(body.get("code", "error")),
            str(body.get("message", "")),
            bool(body.get("fatal", fatal)),
        )


class KernelDied(CellmuxError):
    """The kernel died (or was restarted) while a request was waiting on it.

    @ivar cause: what the server said, e.g. ``"exit code 3"`` or ``"SIGSEGV"``.
    """

    def __init__(self, cause: str) -> None:
        self.cause = cause
        super().__init__(f"kernel died: {cause}")


class ConnectionClosed(CellmuxError):
    """The websocket to the server is closed (or closed while a request waited).

    @ivar code: the websocket close code, if one was received.
    @ivar reason: the close reason or a description of what happened.
    """

    def __init__(self, reason: str, code: int | None = None) -> None:
        self.code = code
        self.reason = reason
        text = "connection to cellmux server closed"
        if code is not None:
            text += f" (code {code})"
        if reason:
            text += ": " + reason
        super().__init__(text)


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@attrs.frozen
class KernelModel:
    """A kernel as the server describes it (``GET /api/kernels/{id}``).

    @ivar raw: the JSON object as received, including any fields not listed here.
    """

    id: str
    name: str | None = None
    last_activity: str | None = None
    execution_state: str | None = None
    connections: int = 0
    pid: int | None = None
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    @classmethod
    def from_json(cls, data: Any) -> KernelModel:
        """Build a model from the server's JSON object.

        @raise CellmuxError: if C{data} is not a kernel model.
        """
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise CellmuxError(f"server sent a malformed kernel model: {data!r}")
        return cls(
            id=data["id"],
            name=data.get("name"),
            last_activity=data.get("last_activity"),
            execution_state=data.get("execution_state"),
            connections=_opt_int(data.get("connections")) or 0,
            pid=_opt_int(data.get("pid")),
            raw=data,
        )


def _json_object(part: bytes) -> dict[str, Any]:
    value = boundedjson.loads(part) if part else {}
    return value if isinstance(value, dict) else {}


@attrs.frozen
class Message:
    """A decoded Jupyter message received on a data channel."""

    header: dict[str, Any]
    parent_header: dict[str, Any]
    metadata: dict[str, Any]
    content: dict[str, Any]
    buffers: tuple[bytes, ...] = ()
    channel: int = 0
    seq: int = 0

    @classmethod
    def from_frame(cls, frame: Frame) -> Message:
        """Decode a data frame's parts.

        @raise ValueError: if the frame does not hold a Jupyter message.
        """
        if len(frame.parts) < 4:
            raise ValueError("a Jupyter message has at least 4 parts")
        header, parent, metadata, content = (_json_object(p) for p in frame.parts[:4])
        return cls(header, parent, metadata, content, frame.parts[4:], frame.channel, frame.seq)

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type", ""))

    @property
    def msg_id(self) -> str:
        return str(self.header.get("msg_id", ""))

    @property
    def parent_id(self) -> str | None:
        """The msg_id of the request this message answers, if any."""
        value = self.parent_header.get("msg_id")
        return value if isinstance(value, str) else None


@attrs.frozen
class ExecutionError:
    """An exception raised by executed code (an ``error`` message)."""

    ename: str
    evalue: str
    traceback: list[str] = attrs.field(factory=list)

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> ExecutionError:
        traceback = content.get("traceback")
        return cls(
            str(content.get("ename", "")),
            str(content.get("evalue", "")),
            [str(line) for line in traceback] if isinstance(traceback, list) else [],
        )

    def __str__(self) -> str:
        return f"{self.ename}: {self.evalue}"


@attrs.frozen
class Output:
    """One output of an execution, in arrival order.

    kind and content are:
      - ``"stdout"`` / ``"stderr"``: the text (str);
      - ``"display"`` / ``"update_display"`` / ``"result"``: the mime bundle (dict);
      - ``"error"``: an L{ExecutionError};
      - ``"clear_output"``: the message content (dict with ``wait``).

    @ivar raw: the whole Jupyter message content (metadata, transient, …);
        not part of equality, so C{Output("stdout", "a\\n")} compares equal.
    """

    kind: str
    content: Any
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


@attrs.define
class ExecutionResult:
    """What one ``execute`` produced.

    @ivar status: the execute_reply status: ``"ok"``, ``"error"`` or ``"aborted"``.
    @ivar reply: the execute_reply content.
    @ivar result: the execute_result mime bundle, e.g. C{{"text/plain": "2"}}.
    @ivar displays: mime bundles of display_data and update_display_data, in order.
    @ivar outputs: every output in arrival order.
    """

    msg_id: str
    status: str | None = None
    reply: dict[str, Any] = attrs.field(factory=dict)
    execution_count: int | None = None
    result: dict[str, Any] | None = None
    displays: list[dict[str, Any]] = attrs.field(factory=list)
    error: ExecutionError | None = None
    outputs: list[Output] = attrs.field(factory=list)

    @property
    def stdout(self) -> str:
        """All text the code wrote to stdout."""
        return "".join(o.content for o in self.outputs if o.kind == "stdout")

    @property
    def stderr(self) -> str:
        """All text the code wrote to stderr."""
        return "".join(o.content for o in self.outputs if o.kind == "stderr")

    @property
    def result_text(self) -> str | None:
        """The text/plain form of the result, or None if there was none."""
        if self.result is None:
            return None
        text = self.result.get("text/plain")
        return text if isinstance(text, str) else None

    @property
    def ok(self) -> bool:
        """Whether the execution finished with status ``ok``."""
        return self.status == "ok"

    def add_message(self, msg: Message) -> Output | None:
        """Fold one message answering this execution in; return the output it made."""
        content, kind = msg.content, msg.msg_type
        output: Output | None = None
        if kind == "stream":
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            output = Output(name, str(content.get("text", "")), content)
        elif kind in ("display_data", "update_display_data", "execute_result"):
            data = content.get("data")
            data = data if isinstance(data, dict) else {}
            if kind == "execute_result":
                self.result = data
                self.execution_count = _opt_int(content.get("execution_count"))
                output = Output("result", data, content)
            else:
                self.displays.append(data)
                name = "display" if kind == "display_data" else "update_display"
                output = Output(name, data, content)
        elif kind == "error":
            self.error = ExecutionError.from_content(content)
            output = Output("error", self.error, content)
        elif kind == "clear_output":
            output = Output("clear_output", content, content)
        elif kind == "execute_input":
            self.execution_count = _opt_int(content.get("execution_count"))
        elif kind == "execute_reply":
            self.reply = content
            self.status = str(content.get("status", ""))
            count = _opt_int(content.get("execution_count"))
            if count is not None:
                self.execution_count = count
            if self.status == "error" and self.error is None and "ename" in content:
                self.error = ExecutionError.from_content(content)
        if output is not None:
            self.outputs.append(output)
        return output

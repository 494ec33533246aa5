# -*- test-case-name: tests.test_oneshot -*-
"""``POST /service``: run code once on a pool kernel and answer with JSON.

    POST /service  {"code": "...", "timeout"?: seconds}
    -> 200 {"status": "ok" | "error" | "timeout" | "dead",
            "stdout", "stderr", "result", "displays", "error", "files",
            "files_truncated", "output_truncated", "elapsed"}

The kernel comes from the warm pool and is deleted afterwards, whatever
happened. ``status`` says how the code ended: a Python exception is
``error`` with ``error`` filled in, like an ``execute_reply``; a run that
exceeds the wall-time limit (``service_timeout``, or the request's shorter
``timeout``) is ended and answered ``timeout``; a kernel that died is
``dead``. These are all 200: the service did its job. Bad requests get 4xx,
no free kernel 503.

Unlike the relay, this endpoint decodes the kernel's messages: it attaches
an in-process client to the kernel and collects what the request caused.
What it keeps is bounded: L{MAX_STREAM} characters of each stream and
L{MAX_OUTPUT} bytes of output of every kind in all; what does not fit is
dropped (an error keeps its name and value), ``output_truncated`` is true
and stderr ends with a note saying so.
"""

from __future__ import annotations

import base64
import os
import uuid
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web import server

from cellmux.protocol import Channel, JupyterSocket, ProtocolError, boundedjson, decode_frame
from cellmux.protocol.jupyter import SERVER_SESSION, jupyter_parts

from .files import open_inside, scan
from .kernels import Kernel, KernelManager
from .permalinks import MAX_CODE
from .webjson import HTTPError, JSONEndpoint, Route

__all__ = ["MAX_INLINE_FILES", "MAX_OUTPUT", "MAX_STREAM", "OneShotResource"]

#: Characters of stdout (and of stderr) kept; the rest is cut and flagged.
MAX_STREAM = 4 * 1024 * 1024
#: Bytes of output of every kind (streams, result, displays, error) one run
#: keeps, counted as the size of each message's JSON content plus
#: L{MESSAGE_OVERHEAD}; what does not fit is dropped and flagged, with a
#: note at the end of stderr.
MAX_OUTPUT = 16 * 1024 * 1024
#: What each kept message is charged besides its content (the Python objects
#: that hold it), so a million tiny displays cannot cost more than big ones.
MESSAGE_OVERHEAD = 512
#: Characters of an error's name and value kept when its traceback is dropped.
MAX_ERROR_TEXT = 1024
#: Bytes of written files returned inline (base64); larger sets are listed
#: with ``"content": null``: the kernel and its directory are gone after.
MAX_INLINE_FILES = 4 * 1024 * 1024
#: Request body limit: the code plus JSON escaping.
MAX_BODY = 2 * MAX_CODE + 1024


@attrs.define(eq=False)
class _Run:
    """An in-process client of one kernel that collects one execution.

    Implements the kernel's ClientSink. Finished (C{done} fires) once the
    execute_reply and the kernel's idle status for our request have both come,
    or the kernel died or went away.
    """

    msg_id: str
    max_frame: int
    session: str = attrs.field(factory=lambda: f"cellmux-service-{uuid.uuid4().hex}")
    done: defer.Deferred = attrs.field(factory=defer.Deferred)
    status: str = "ok"
    stdout: list[str] = attrs.Factory(list)
    stderr: list[str] = attrs.Factory(list)
    sizes: dict[str, int] = attrs.Factory(lambda: {"stdout": 0, "stderr": 0})
    truncated: bool = False
    #: bytes of output kept so far (at most MAX_OUTPUT) and dropped
    kept: int = 0
    dropped: int = 0
    result: dict[str, Any] | None = None
    displays: list[dict[str, Any]] = attrs.Factory(list)
    error: dict[str, Any] | None = None
    replied: bool = False
    idle: bool = False

    def wants(self, channel: int) -> bool:
        return channel != Channel.FILES

    def send_frame(self, data: bytes) -> None:
        if self.done.called:
            return
        try:
            frame = decode_frame(data, self.max_frame)
            if len(frame.parts) < 4:
                return
            header, parent = (boundedjson.loads(p) for p in frame.parts[:2])
            if not isinstance(header, dict) or not isinstance(parent, dict):
                return
            msg_type = header.get("msg_type")
            if msg_type == "status" and header.get("session") == SERVER_SESSION:
                self._server_status(boundedjson.loads(frame.parts[3]))
                return
            if parent.get("msg_id") != self.msg_id:
                return
            # Decoded only once it is known to be ours and to fit.
            raw = frame.parts[3]
            if msg_type in _KEPT and not self._charge(len(raw)):
                if msg_type not in ("error", "execute_reply"):
                    return
                content = self._error_without_traceback(boundedjson.loads(raw))
            else:
                content = boundedjson.loads(raw)
        except (ProtocolError, ValueError):
            return  # not a Jupyter message: nothing of ours
        if not isinstance(content, dict):
            return
        if msg_type == "stream":
            self._stream(content.get("name"), content.get("text"))
        elif msg_type == "execute_result":
            self.result = content.get("data")
        elif msg_type == "display_data":
            self.displays.append(content.get("data") or {})
        elif msg_type == "error":
            self.error = _error(content)
        elif msg_type == "execute_reply":
            self.replied = True
            if content.get("status") != "ok":
                self.status = "error"
                if self.error is None:
                    self.error = _error(content)
        elif msg_type == "status" and content.get("execution_state") == "idle":
            self.idle = True
        if self.replied and self.idle:
            self._finish(self.status, self.error)

    def _server_status(self, content: Any) -> None:
        state = content.get("execution_state") if isinstance(content, dict) else None
        if state in ("dead", "restarting"):
            cause = str(content.get("cause") or state)
            self._finish("dead", {"ename": "KernelDied", "evalue": cause, "traceback": []})

    def _charge(self, size: int) -> bool:
        """Count a message against the output budget; False if it does not fit."""
        size += MESSAGE_OVERHEAD
        if self.kept + size > MAX_OUTPUT:
            self.truncated = True
            self.dropped += size
            return False
        self.kept += size
        return True

    @staticmethod
    def _error_without_traceback(content: Any) -> Any:
        # The reply must still say how the run ended, in a few bytes.
        if not isinstance(content, dict):
            return content
        return {
            "status": content.get("status"),
            "ename": str(content.get("ename", ""))[:MAX_ERROR_TEXT],
            "evalue": str(content.get("evalue", ""))[:MAX_ERROR_TEXT],
            "traceback": ["cellmux: traceback dropped: the output limit was reached"],
        }

    def _stream(self, name: Any, text: Any) -> None:
        if name not in ("stdout", "stderr") or not isinstance(text, str):
            return
        room = MAX_STREAM - self.sizes[name]
        if len(text) > room:
            text, self.truncated = text[: max(room, 0)], True
        self.sizes[name] += len(text)
        (self.stdout if name == "stdout" else self.stderr).append(text)

    def truncation_note(self) -> str:
        """The line that ends stderr when output was dropped."""
        if not self.truncated:
            return ""
        return (
            f"\ncellmux: output truncated: /service keeps {MAX_STREAM} characters of each"
            f" stream and {MAX_OUTPUT} bytes of output in all"
            + (f"; {self.dropped} bytes were dropped" if self.dropped else "")
            + "\n"
        )

    def _finish(self, status: str, error: dict[str, Any] | None) -> None:
        self.status, self.error = status, error
        if not self.done.called:
            self.done.callback(None)

    def kernel_gone(self, reason: str) -> None:
        self._finish("dead", {"ename": "KernelDied", "evalue": reason, "traceback": []})


#: The message types whose content a run keeps (and is charged for).
_KEPT = frozenset({"stream", "execute_result", "display_data", "error", "execute_reply"})


def _error(content: dict[str, Any]) -> dict[str, Any]:
    return {
        "ename": content.get("ename", ""),
        "evalue": content.get("evalue", ""),
        "traceback": content.get("traceback", []),
    }


def _written_files(workdir: str) -> tuple[list[dict[str, Any]], bool]:
    """The files the run left, with their bytes while they fit (in a thread)."""
    snapshot, truncated = scan(workdir)
    budget = MAX_INLINE_FILES
    files = []
    for name, (size, _mtime) in sorted(snapshot.items()):
        entry: dict[str, Any] = {"name": name, "size": size, "content": None}
        if size <= budget:
            try:
                # The kernel may still run (a time-out): never follow its links.
                with os.fdopen(open_inside(workdir, name.split("/")), "rb") as f:
                    data = f.read(budget + 1)
            except (OSError, HTTPError):
                data = None
            if data is not None and len(data) <= budget:
                budget -= len(data)
                entry["content"] = base64.b64encode(data).decode("ascii")
        files.append(entry)
    return files, truncated


class OneShotResource(JSONEndpoint):
    """``/service``."""

    log = Logger()

    def __init__(self, manager: KernelManager, auth, reactor) -> None:
        self.manager = manager
        self.reactor = reactor
        # Not for named tokens: a run's kernel would count against no quota.
        super().__init__(auth, [Route(b"POST", r"/service/?", self.run, users=False)])

    def _limits(self, body: dict[str, Any]) -> tuple[str, float]:
        code = body.get("code")
        if not isinstance(code, str):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "'code' must be a string")
        if len(code) > MAX_CODE:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"code over {MAX_CODE} characters")
        limit = self.manager.config.service_timeout
        timeout = body.get("timeout", limit)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "'timeout' must be a positive number")
        return code, min(float(timeout), limit)

    async def run(self, request: server.Request) -> tuple[int, Any]:
        code, timeout = self._limits(self.json_body(request, MAX_BODY))
        started = self.reactor.seconds()
        kernel = await self.manager.create()
        workdir = kernel.workdir
        run = _Run(uuid.uuid4().hex, self.manager.config.max_frame_size)
        try:
            kernel.attach(run)
            self._execute(kernel, run, code)
            run.done.addTimeout(timeout, self.reactor)
            try:
                await run.done
            except defer.TimeoutError:
                run.status = "timeout"
                run.error = {
                    "ename": "TimeoutError",
                    "evalue": f"the run exceeded its wall-time limit of {timeout:g} s",
                    "traceback": [],
                }
            files, files_truncated = (
                await threads.deferToThread(_written_files, workdir) if workdir else ([], False)
            )
        finally:
            kernel.detach(run)
            self.manager.delete(kernel, "one-shot run ended")
        self.log.info(
            "service run on kernel {id}: {status} in {s:.3f} s",
            id=kernel.id,
            status=run.status,
            s=self.reactor.seconds() - started,
        )
        return HTTPStatus.OK, {
            "status": run.status,
            "stdout": "".join(run.stdout),
            "stderr": "".join(run.stderr) + run.truncation_note(),
            "result": run.result,
            "displays": run.displays,
            "error": run.error,
            "files": files,
            "files_truncated": files_truncated,
            "output_truncated": run.truncated,
            "elapsed": round(self.reactor.seconds() - started, 6),
        }

    def _execute(self, kernel: Kernel, run: _Run, code: str) -> None:
        content = {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }
        now = datetime.fromtimestamp(self.reactor.seconds(), UTC)
        parts = jupyter_parts(
            "execute_request", content, now=now, session=run.session, msg_id=run.msg_id
        )
        kernel.send(Channel.EXECUTE, JupyterSocket.SHELL, parts)

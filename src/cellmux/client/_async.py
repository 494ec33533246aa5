"""The asyncio client: REST calls and one websocket per attached kernel."""

from __future__ import annotations

import asyncio
import functools
import getpass
import inspect
import json
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Iterable
from datetime import UTC, datetime
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect

from cellmux.protocol import (
    PROTOCOL_VERSION,
    Channel,
    Frame,
    JupyterSocket,
    ProtocolError,
    channel_for,
    control_frame,
    decode_frame,
    encode_frame,
    parse_control,
)
from cellmux.protocol.jupyter import JUPYTER_PROTOCOL_VERSION

from ._comms import MAX_COMMS, AsyncComm, TargetHandler
from ._http import (
    DEFAULT_URL,
    RestAPI,
    auth_headers,
    error_from_body,
    tls_context,
    websocket_url,
)
from ._results import (
    CellmuxError,
    ConnectionClosed,
    ExecutionResult,
    KernelDied,
    KernelModel,
    Message,
    Output,
    ServerError,
)

__all__ = ["MAX_MESSAGE_SIZE", "AsyncClient", "AsyncKernel"]

log = logging.getLogger(__name__)

#: Largest websocket message accepted from the server.
MAX_MESSAGE_SIZE = 64 * 1024 * 1024

#: Requests that go to the kernel's control socket rather than its shell.
_CONTROL_SOCKET_REQUESTS = frozenset(
    {"shutdown_request", "debug_request", "interrupt_request", "cellmux_pause_request"}
)

StdinHandler = Callable[[str, bool], "str | Awaitable[str]"]
OutputHandler = Callable[[Output], object]
StatusHandler = Callable[[str], object]
FrameListener = Callable[[Frame], object]


@functools.cache
def _username() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "cellmux"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _socket_for(msg_type: str) -> JupyterSocket:
    if msg_type == "input_reply":
        return JupyterSocket.STDIN
    if msg_type in _CONTROL_SOCKET_REQUESTS:
        return JupyterSocket.CONTROL
    return JupyterSocket.SHELL


async def _wait(future: Awaitable[Any], timeout: float | None, what: str) -> Any:
    """Await C{future}, raising a TimeoutError that says what took too long."""
    try:
        async with asyncio.timeout(timeout):
            return await future
    except TimeoutError:
        raise TimeoutError(f"{what} did not finish within {timeout} seconds") from None


class AsyncClient:
    """A client of one cellmux server, for asyncio code.

    @param url: the server's base URL.
    @param token: the authentication token, sent as C{Authorization: token …}.
    @param http_timeout: seconds to wait for each REST response.
    @param cafile: a PEM file of CA certificates to trust besides the
        system's, for an https server with a self-signed certificate
        (default: C{$CELLMUX_CAFILE}).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        http_timeout: float = 60.0,
        cafile: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        secure = self.url.lower().startswith("https:")
        #: The TLS context of https and wss (None for plain http).
        self.tls = tls_context(cafile) if secure else None
        self.rest = RestAPI(self.url, token, http_timeout, tls=self.tls)

    async def version(self) -> str:
        """The server's version string."""
        return await asyncio.to_thread(self.rest.version)

    async def get_status(self) -> dict[str, Any]:
        """The server's status: kernels, connections, warm pool."""
        return await asyncio.to_thread(self.rest.get_status)

    async def list_kernels(self) -> list[KernelModel]:
        """Every kernel the server runs."""
        return await asyncio.to_thread(self.rest.list_kernels)

    async def kernel_specs(self) -> dict[str, dict[str, Any]]:
        """The kernel specs the server offers, by name (python3, bash, ir, …)."""
        return await asyncio.to_thread(self.rest.kernel_specs)

    async def create_kernel(self, name: str | None = None) -> KernelModel:
        """Start a kernel of spec C{name} (the server's default if None)."""
        return await asyncio.to_thread(self.rest.create_kernel, name)

    async def get_kernel(self, kernel_id: str) -> KernelModel:
        """One kernel's model (L{HTTPError} with status 404 if unknown)."""
        return await asyncio.to_thread(self.rest.get_kernel, kernel_id)

    async def delete_kernel(self, kernel_id: str) -> None:
        """Shut a kernel down and remove it."""
        await asyncio.to_thread(self.rest.delete_kernel, kernel_id)

    async def interrupt_kernel(self, kernel_id: str) -> None:
        """Interrupt whatever the kernel is running."""
        await asyncio.to_thread(self.rest.interrupt_kernel, kernel_id)

    async def share_kernel(self, kernel_id: str, role: str) -> dict[str, Any]:
        """A new share token for one kernel (role "collaborator" or "observer")."""
        return await asyncio.to_thread(self.rest.share_kernel, kernel_id, role)

    async def list_shares(self, kernel_id: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.rest.list_shares, kernel_id)

    async def revoke_share(self, kernel_id: str, share_id: str) -> None:
        await asyncio.to_thread(self.rest.revoke_share, kernel_id, share_id)

    async def restart_kernel(self, kernel_id: str) -> KernelModel:
        """Restart a kernel and return its new model."""
        return await asyncio.to_thread(self.rest.restart_kernel, kernel_id)

    def connect(
        self,
        kernel_id: str,
        channels: Iterable[int] | None = None,
        *,
        session: str | None = None,
        timeout: float | None = 30.0,
        cursor: int | None = None,
        listener: Callable[[Frame], object] | None = None,
    ) -> _Connecting:
        """Attach to a kernel over the websocket.

        Use as C{kernel = await client.connect(id)} or
        C{async with client.connect(id) as kernel:} (which closes it).

        @param channels: channel numbers to receive, or None for all.
        @param session: the session id to declare (a fresh uuid4 hex if None).
        @param timeout: seconds allowed for connecting and the handshake.
        @param cursor: resume after this seq (a previous connection's
            C{last_seq}): the server first sends every frame after it, or a
            gap notice (see L{AsyncKernel.gaps}) for those it no longer has.
        @param listener: called with every frame, from the very first one
            (registered before any frame is read, so none is missed).
        @raise ServerError: if the server refuses (e.g. code C{"unknown_kernel"}).
        @raise HTTPError: if the server refuses the websocket upgrade.
        """
        chans = None if channels is None else sorted({int(c) for c in channels})
        return _Connecting(
            lambda: AsyncKernel.open(
                websocket_url(self.url, kernel_id),
                kernel_id,
                token=self.token,
                tls=self.tls,
                channels=chans,
                session=session or uuid.uuid4().hex,
                timeout=timeout,
                cursor=cursor,
                listener=listener,
            )
        )

    def start(
        self,
        name: str | None = None,
        channels: Iterable[int] | None = None,
        *,
        session: str | None = None,
        timeout: float | None = 60.0,
        listener: Callable[[Frame], object] | None = None,
    ) -> _Connecting:
        """Start a kernel of spec C{name} and attach to it, in one round trip.

        The websocket's ``hello`` asks for the kernel (protocol version 2), so
        no REST call comes first; use like L{connect}. The kernel outlives
        the connection: delete it with L{delete_kernel} (its id is
        C{kernel.kernel_id}) or a C{shutdown}.
        """
        chans = None if channels is None else sorted({int(c) for c in channels})
        return _Connecting(
            lambda: AsyncKernel.open(
                websocket_url(self.url),
                None,
                token=self.token,
                channels=chans,
                session=session or uuid.uuid4().hex,
                timeout=timeout,
                listener=listener,
                create={} if name is None else {"name": name},
            )
        )


class _Connecting:
    """What L{AsyncClient.connect} returns: awaitable, and an async context manager."""

    def __init__(self, opener: Callable[[], Awaitable[AsyncKernel]]) -> None:
        self._opener = opener
        self._kernel: AsyncKernel | None = None

    def __await__(self) -> Generator[Any, None, AsyncKernel]:
        return self._opener().__await__()

    async def __aenter__(self) -> AsyncKernel:
        self._kernel = await self._opener()
        return self._kernel

    async def __aexit__(self, *exc_info: object) -> None:
        if self._kernel is not None:
            await self._kernel.close()


class _Pending:
    """A request waiting for the kernel's answer, fed the messages that name it as parent."""

    def __init__(self) -> None:
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def feed(self, msg: Message) -> None:
        raise NotImplementedError

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
            # Mark it retrieved: nobody may be awaiting any more.
            self.future.exception()

    def discard(self) -> None:
        """Forget the request (its caller gave up or finished)."""


class _ReplyWaiter(_Pending):
    def __init__(self, reply_type: str) -> None:
        super().__init__()
        self.reply_type = reply_type

    def feed(self, msg: Message) -> None:
        if msg.msg_type == self.reply_type and not self.future.done():
            self.future.set_result(msg)


class _Execution(_Pending):
    """Collects the outputs of one execute_request until its reply and idle arrived."""

    def __init__(
        self,
        kernel: AsyncKernel,
        msg_id: str,
        on_output: OutputHandler | None,
        on_stdin: StdinHandler | None,
        need_idle: bool,
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.result = ExecutionResult(msg_id)
        self.on_output = on_output
        self.on_stdin = on_stdin
        self.replied = False
        self.idle = not need_idle
        self.tasks: set[asyncio.Task[None]] = set()

    def feed(self, msg: Message) -> None:
        if self.future.done():
            return
        kind = msg.msg_type
        if kind == "status":
            if msg.content.get("execution_state") == "idle":
                self.idle = True
        elif kind == "input_request":
            if self.on_stdin is not None:
                task = asyncio.get_running_loop().create_task(self._answer(msg))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        else:
            output = self.result.add_message(msg)
            self.replied = self.replied or kind == "execute_reply"
            if output is not None and self.on_output is not None:
                self.kernel._invoke(self.on_output, output)
        if self.replied and self.idle and not self.future.done():
            self.future.set_result(self.result)

    async def _answer(self, request: Message) -> None:
        assert self.on_stdin is not None
        prompt = str(request.content.get("prompt", ""))
        password = bool(request.content.get("password", False))
        try:
            value = self.on_stdin(prompt, password)
            if inspect.isawaitable(value):
                value = await value
        except Exception as e:
            # The kernel waits for input forever: interrupt it so it does not hang,
            # and hand the handler's exception to the caller of execute().
            log.warning("stdin handler failed (%r); interrupting the kernel", e)
            self.fail(e)
            self.kernel._spawn(self.kernel._quiet_interrupt())
            return
        try:
            await self.kernel.send("input_reply", {"value": str(value)}, parent=request.header)
        except CellmuxError as e:
            self.fail(e)

    def discard(self) -> None:
        for task in self.tasks:
            task.cancel()


class AsyncKernel:
    """One attached kernel: a websocket and a reader task dispatching its frames.

    Get one from L{AsyncClient.connect}.

    @ivar kernel_id: the kernel's id.
    @ivar session: the session id declared in hello (the sender of our messages).
    @ivar model: the kernel model the server sent in welcome.
    @ivar last_seq: the highest seq seen (starting with welcome's).
    @ivar status: the latest execution_state (busy, idle, starting, restarting, dead…).
    @ivar dead_cause: the cause of the kernel's last death seen on this connection,
        or None; a restarted kernel keeps it, so check C{status == "dead"} for "dead now".
    @ivar channels: the channels subscribed to, or None for all.
    """

    def __init__(
        self,
        ws: ClientConnection,
        kernel_id: str,
        session: str,
        welcome: dict[str, Any],
        channels: list[int] | None,
    ) -> None:
        self._ws = ws
        self.kernel_id = kernel_id
        self.session = session
        self.channels: frozenset[int] | None = None if channels is None else frozenset(channels)
        self.model: KernelModel | None = None
        try:
            self.model = KernelModel.from_json(welcome.get("kernel"))
        except CellmuxError:
            log.warning("welcome carried no valid kernel model")
        seq = welcome.get("seq")
        self.last_seq: int = seq if isinstance(seq, int) else 0
        #: (first, last) seq ranges the server no longer had when we resumed
        self.gaps: list[tuple[int, int]] = []
        self.status: str | None = self.model.execution_state if self.model else None
        self.dead_cause: str | None = None
        self._on_status: StatusHandler | None = None
        self._listeners: list[FrameListener] = []
        self._pending: dict[str, _Pending] = {}
        self._comms: dict[str, AsyncComm] = {}
        self._comm_targets: dict[str, TargetHandler] = {}
        self._control_waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._tasks: set[asyncio.Future[Any]] = set()
        self._closing = False
        self._closed_error: ConnectionClosed | None = None
        self._fatal: ServerError | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    # -- opening and closing -------------------------------------------------

    @classmethod
    async def open(
        cls,
        ws_url: str,
        kernel_id: str | None,
        *,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
        channels: list[int] | None = None,
        session: str | None = None,
        timeout: float | None = 30.0,
        cursor: int | None = None,
        listener: Callable[[Frame], object] | None = None,
        create: dict[str, Any] | None = None,
    ) -> AsyncKernel:
        """Connect to C{ws_url}, say hello and wait for welcome.

        @param create: instead of C{kernel_id}, the new kernel to ask for
            (``hello.create``, protocol version 2).
        """
        session = session or uuid.uuid4().hex
        # Version 1 unless the hello needs 2: a plain attach works on older
        # servers too.
        version = 1 if create is None else PROTOCOL_VERSION
        target: dict[str, Any] = {"kernel": kernel_id} if create is None else {"create": create}
        tls_option: dict[str, Any] = {"ssl": tls} if tls is not None else {}
        try:
            ws = await connect(
                ws_url,
                additional_headers=auth_headers(token),
                max_size=MAX_MESSAGE_SIZE,
                compression=None,
                open_timeout=timeout,
                **tls_option,
            )
        except websockets.InvalidStatus as e:
            response = e.response
            raise error_from_body(
                response.status_code, response.reason_phrase, bytes(response.body or b"")
            ) from None
        except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI) as e:
            raise CellmuxError(f"cannot open websocket {ws_url}: {e}") from e
        try:
            hello = control_frame(
                "hello",
                version=version,
                session=session,
                channels=channels,
                **target,
                **({} if cursor is None else {"cursor": cursor}),
            )
            await ws.send(encode_frame(hello))
            welcome = await _wait(_read_welcome(ws, version), timeout, "the handshake")
        except BaseException:
            await ws.close()
            raise
        if kernel_id is None:
            model = welcome.get("kernel")
            kernel_id = model.get("id") if isinstance(model, dict) else None
            if not isinstance(kernel_id, str):
                await ws.close()
                raise CellmuxError("welcome named no kernel id for the new kernel")
        log.debug("attached to kernel %s as session %s", kernel_id, session)
        kernel = cls(ws, kernel_id, session, welcome, channels)
        if cursor is not None:  # the frames after it are on their way
            kernel.last_seq = cursor
        if listener is not None:  # before the reader task first runs
            kernel.add_listener(listener)
        return kernel

    async def close(self) -> None:
        """Close the websocket; requests still waiting raise L{ConnectionClosed}."""
        self._closing = True
        await self._ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)

    @property
    def closed(self) -> bool:
        """Whether the websocket is closed (by either side)."""
        return self._closed_error is not None

    @property
    def close_error(self) -> ConnectionClosed | None:
        """Why the websocket closed (its close C{code} and reason), or None while open."""
        return self._closed_error

    async def wait_closed(self) -> ConnectionClosed:
        """Wait until the websocket closes, by either side; returns L{close_error}."""
        await asyncio.gather(asyncio.shield(self._reader), return_exceptions=True)
        assert self._closed_error is not None
        return self._closed_error

    async def __aenter__(self) -> AsyncKernel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- callbacks -------------------------------------------------------------

    @property
    def on_status(self) -> StatusHandler | None:
        """Called with each new execution_state (after L{status} is updated)."""
        return self._on_status

    @on_status.setter
    def on_status(self, handler: StatusHandler | None) -> None:
        self._on_status = handler

    def add_listener(self, listener: FrameListener) -> Callable[[], None]:
        """Call C{listener(frame)} for every frame received; returns a remover."""
        self._listeners.append(listener)
        return lambda: self.remove_listener(listener)

    def remove_listener(self, listener: FrameListener) -> None:
        """Stop calling C{listener}; no error if it was not added."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    # -- Jupyter requests ------------------------------------------------------

    async def execute(
        self,
        code: str,
        *,
        on_output: OutputHandler | None = None,
        on_stdin: StdinHandler | None = None,
        silent: bool = False,
        timeout: float | None = None,
        store_history: bool = True,
        user_expressions: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ExecutionResult:
        """Run C{code} and collect what it produced.

        Returns once both the execute_reply and the kernel's idle status for this
        request arrived. A failing execution still returns (see C{result.error}).

        @param on_output: called with each L{Output} as it arrives.
        @param on_stdin: C{(prompt, password) -> str} (or an awaitable of str),
            answering the code's input() calls; without it input() fails in the kernel.
        @param metadata: the request's metadata, e.g. C{{"cellmux": {"filename": F,
            "first_line": A}}} to run the code as lines of F (docs/protocol.md).
        @raise KernelDied: if the kernel dies or is restarted meanwhile.
        @raise TimeoutError: after C{timeout} seconds; the kernel is left running.
        @raise ConnectionClosed: if the websocket closes meanwhile.
        """
        self._check_usable()
        content = {
            "code": code,
            "silent": silent,
            "store_history": store_history and not silent,
            "user_expressions": user_expressions or {},
            "allow_stdin": on_stdin is not None,
            "stop_on_error": True,
        }
        msg_id = uuid.uuid4().hex
        need_idle = self.channels is None or Channel.STATUS in self.channels
        pending = _Execution(self, msg_id, on_output, on_stdin, need_idle)
        self._pending[msg_id] = pending
        try:
            await self.send("execute_request", content, msg_id=msg_id, metadata=metadata)
            return await _wait(pending.future, timeout, "execution")
        finally:
            self._pending.pop(msg_id, None)
            pending.discard()

    # -- comms ---------------------------------------------------------------------

    @property
    def comms(self) -> dict[str, AsyncComm]:
        """The open comms this connection knows: those it opened, and those the
        kernel opened while it was attached (at most MAX_COMMS), by comm id."""
        return dict(self._comms)

    async def open_comm(
        self,
        target_name: str,
        data: dict[str, Any] | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        buffers: Iterable[bytes] = (),
        comm_id: str | None = None,
    ) -> AsyncComm:
        """Open a comm to the kernel-side target C{target_name} (comm_open).

        The kernel answers nothing when the target exists; when it does not,
        ipykernel closes the comm again (see L{AsyncComm.on_close}).
        """
        self._check_usable()
        comm = AsyncComm(self, comm_id or uuid.uuid4().hex, target_name)
        self._comms[comm.comm_id] = comm
        content = {"comm_id": comm.comm_id, "target_name": target_name, "data": data or {}}
        await self.send("comm_open", content, metadata=metadata, buffers=tuple(buffers))
        return comm

    def register_comm_target(self, target_name: str, handler: TargetHandler | None) -> None:
        """Call C{handler(comm, comm_open message)} when the kernel opens a comm
        for C{target_name} (None: stop). Comms of targets without a handler are
        still kept in L{comms}."""
        if handler is None:
            self._comm_targets.pop(target_name, None)
        else:
            self._comm_targets[target_name] = handler

    async def comm_info(
        self, target_name: str | None = None, *, timeout: float | None = None
    ) -> dict[str, dict[str, Any]]:
        """The kernel's open comms (comm_info_request): {comm_id: {"target_name": …}}."""
        content = {} if target_name is None else {"target_name": target_name}
        reply = await self.request("comm_info_request", content, timeout=timeout)
        comms = reply.content.get("comms")
        return comms if isinstance(comms, dict) else {}

    def _receive_comm(self, msg: Message) -> None:
        content = msg.content
        comm_id = content.get("comm_id")
        if not isinstance(comm_id, str):
            return
        kind = msg.msg_type
        if kind == "comm_open":
            target = content.get("target_name")
            if not isinstance(target, str) or comm_id in self._comms:
                return
            if len(self._comms) >= MAX_COMMS:
                log.warning("over %d comms open: not tracking comm %s", MAX_COMMS, comm_id)
                return
            opened = AsyncComm(self, comm_id, target, open_message=msg)
            self._comms[comm_id] = opened
            handler = self._comm_targets.get(target)
            if handler is not None:
                self._invoke(handler, opened, msg)
        elif kind == "comm_msg":
            comm = self._comms.get(comm_id)
            if comm is not None:
                comm._message(msg)
        elif kind == "comm_close":
            comm = self._comms.pop(comm_id, None)
            if comm is not None:
                comm._kernel_closed(msg)

    async def request(
        self, msg_type: str, content: dict[str, Any], *, timeout: float | None = None
    ) -> Message:
        """Send a C{*_request} and return the matching C{*_reply} message."""
        if not msg_type.endswith("_request"):
            raise ValueError(f"not a request type: {msg_type!r}")
        self._check_usable()
        msg_id = uuid.uuid4().hex
        pending = _ReplyWaiter(msg_type[: -len("_request")] + "_reply")
        self._pending[msg_id] = pending
        try:
            await self.send(msg_type, content, msg_id=msg_id)
            return await _wait(pending.future, timeout, msg_type)
        finally:
            self._pending.pop(msg_id, None)

    async def complete(
        self, code: str, cursor_pos: int | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """The complete_reply content (matches, cursor_start, cursor_end, …)."""
        pos = len(code) if cursor_pos is None else cursor_pos
        reply = await self.request(
            "complete_request", {"code": code, "cursor_pos": pos}, timeout=timeout
        )
        return reply.content

    async def inspect(
        self,
        code: str,
        cursor_pos: int | None = None,
        detail_level: int = 0,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """The inspect_reply content (status, found, data, metadata)."""
        pos = len(code) if cursor_pos is None else cursor_pos
        content = {"code": code, "cursor_pos": pos, "detail_level": detail_level}
        return (await self.request("inspect_request", content, timeout=timeout)).content

    async def is_complete(self, code: str, *, timeout: float | None = None) -> dict[str, Any]:
        """The is_complete_reply content (status: complete/incomplete/invalid/unknown)."""
        return (await self.request("is_complete_request", {"code": code}, timeout=timeout)).content

    async def namespace(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The cellmux_namespace_reply content: the user's variables (name,
        type, size, short repr), or a pdb session's frame, even while a cell
        runs. C{status} is C{"unresponsive"} when the server answered for a
        kernel whose GIL is held by C code (docs/protocol.md, section 16)."""
        return (await self.request("cellmux_namespace_request", {}, timeout=timeout)).content

    async def kernel_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The kernel_info_reply content."""
        return (await self.request("kernel_info_request", {}, timeout=timeout)).content

    async def pause(self, *, timeout: float | None = None) -> bool:
        """Stop the running cell in pdb at its current line (docs/protocol.md, Pause).

        The pdb prompt goes to the client that ran the cell, as C{input()} does.
        Returns whether a cell's code was running (if not, nothing happens).
        """
        reply = await self.request("cellmux_pause_request", {}, timeout=timeout)
        return bool(reply.content.get("running"))

    async def send(
        self,
        msg_type: str,
        content: dict[str, Any],
        *,
        parent: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        buffers: Iterable[bytes] = (),
        msg_id: str | None = None,
        socket: JupyterSocket | None = None,
    ) -> str:
        """Send one Jupyter message to the kernel without waiting; returns its msg_id.

        The channel comes from the message type and the socket from the type
        (stdin for input_reply, control for shutdown/debug requests, else shell).
        """
        msg_id = msg_id or uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "session": self.session,
            "username": _username(),
            "date": datetime.now(UTC).isoformat(),
            "version": JUPYTER_PROTOCOL_VERSION,
        }
        parts = (_dumps(header), _dumps(parent or {}), _dumps(metadata or {}), _dumps(content))
        frame = Frame(
            channel=channel_for(msg_type),
            parts=(*parts, *buffers),
            socket=socket if socket is not None else _socket_for(msg_type),
        )
        await self._send(frame)
        return msg_id

    async def send_frame(self, frame: Frame) -> None:
        """Send a data frame as it is (a relay's: its parts already made).

        @raise ConnectionClosed: if the websocket is closed.
        """
        await self._send(frame)

    # -- control requests ------------------------------------------------------

    async def interrupt(self, *, timeout: float | None = None) -> None:
        """Interrupt the kernel; returns once the server acknowledged."""
        await self._control("interrupt", timeout)

    async def restart(self, *, timeout: float | None = None) -> None:
        """Restart the kernel; returns once the new kernel is ready."""
        await self._control("restart", timeout)

    async def shutdown(self, *, timeout: float | None = None) -> None:
        """Shut the kernel down; returns once the server acknowledged."""
        await self._control("shutdown", timeout)

    async def subscribe(
        self, channels: Iterable[int] | None, *, timeout: float | None = None
    ) -> None:
        """Receive only C{channels} from now on (None: all channels)."""
        chans = None if channels is None else sorted({int(c) for c in channels})
        await self._control("subscribe", timeout, channels=chans)
        self.channels = None if chans is None else frozenset(chans)

    async def history(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """The code every client executed on this kernel, oldest first."""
        reply = await self._control("history", timeout)
        return list(reply.get("inputs", []))

    async def ping(self, *, timeout: float | None = None) -> float:
        """Round trip to the server; returns the seconds it took."""
        start = time.monotonic()
        await self._control("ping", timeout)
        return time.monotonic() - start

    async def _control(self, op: str, timeout: float | None, **fields: Any) -> dict[str, Any]:
        self._raise_if_closed()
        self._next_id += 1
        req_id = self._next_id
        future = asyncio.get_running_loop().create_future()
        self._control_waiters[req_id] = future
        try:
            await self._send(control_frame(op, id=req_id, **fields))
            return await _wait(future, timeout, op)
        finally:
            self._control_waiters.pop(req_id, None)

    async def _quiet_interrupt(self) -> None:
        try:
            await self.interrupt(timeout=30)
        except (CellmuxError, TimeoutError) as e:
            log.warning("interrupt failed: %s", e)

    # -- plumbing ----------------------------------------------------------------

    def _raise_if_closed(self) -> None:
        error = self._closed_error
        if error is not None:
            raise ConnectionClosed(error.reason, error.code)

    def _check_usable(self) -> None:
        self._raise_if_closed()
        if self.status == "dead":
            raise KernelDied(self.dead_cause or "unknown cause")

    async def _send(self, frame: Frame) -> None:
        self._raise_if_closed()
        try:
            await self._ws.send(encode_frame(frame))
        except websockets.ConnectionClosed as e:
            raise ConnectionClosed(self._close_reason(e), _close_code(e)) from None

    def _close_reason(self, exc: websockets.ConnectionClosed | None = None) -> str:
        if self._fatal is not None:
            return f"server error {self._fatal}"
        if self._closing:
            return "closed by client"
        if exc is not None and exc.rcvd is not None and exc.rcvd.reason:
            return exc.rcvd.reason
        return self._ws.close_reason or ""

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("callback task failed", exc_info=task.exception())

    def _invoke(self, callback: Callable[..., object], *args: Any) -> None:
        """Call a user callback; log its exceptions, schedule what it returns if awaitable."""
        try:
            value = callback(*args)
        except Exception:
            log.exception("callback %r failed", callback)
            return
        if inspect.isawaitable(value):
            self._spawn(value)

    async def _read_loop(self) -> None:
        exc: websockets.ConnectionClosed | None = None
        try:
            async for data in self._ws:
                self._receive(data)
        except websockets.ConnectionClosed as e:
            exc = e
        except Exception:
            log.exception("reader of kernel %s failed", self.kernel_id)
            await self._ws.close()
        finally:
            code = _close_code(exc) if exc is not None else self._ws.close_code
            self._closed_error = ConnectionClosed(self._close_reason(exc), code)
            self._fail_all(self._closed_error)
            log.debug("connection to kernel %s closed: %s", self.kernel_id, self._closed_error)

    def _receive(self, data: bytes | str) -> None:
        if isinstance(data, str):
            log.warning("ignoring a text message from the server")
            return
        try:
            frame = decode_frame(data, MAX_MESSAGE_SIZE)
        except ProtocolError as e:
            log.warning("ignoring a malformed frame: %s", e)
            return
        if frame.seq > self.last_seq:
            self.last_seq = frame.seq
        if frame.is_control:
            self._receive_control(frame)
        else:
            self._receive_data(frame)
        for listener in list(self._listeners):
            self._invoke(listener, frame)

    def _receive_control(self, frame: Frame) -> None:
        try:
            body = parse_control(frame)
        except ProtocolError as e:
            log.warning("ignoring a malformed control frame: %s", e)
            return
        op, req_id = body["op"], body.get("id")
        if op == "error":
            error = ServerError.from_body(body)
            if error.fatal:
                self._fatal = error
        if op == "gap":
            first, last = body.get("first"), body.get("last")
            if isinstance(first, int) and isinstance(last, int):
                self.gaps.append((first, last))
            log.warning("the server no longer had %s frame(s) for us", body.get("missed"))
        if op in ("ok", "pong", "error", "history") and req_id is not None:
            future = self._control_waiters.pop(req_id, None)
            if future is None or future.done():
                log.debug("reply to unknown control request %r", req_id)
            elif op == "error":
                future.set_exception(error)
            else:
                future.set_result(body)
        elif op == "error":
            log.warning("server refused a frame: %s", error)
        else:
            log.debug("ignoring control op %r", op)

    def _receive_data(self, frame: Frame) -> None:
        try:
            msg = Message.from_frame(frame)
        except ValueError as e:
            log.warning("ignoring an undecodable message on channel %d: %s", frame.channel, e)
            return
        if msg.msg_type == "status":
            self._receive_status(msg)
        elif msg.msg_type in ("comm_open", "comm_msg", "comm_close"):
            self._receive_comm(msg)
        parent = msg.parent_id
        pending = self._pending.get(parent) if parent else None
        if pending is not None:
            pending.feed(msg)

    def _receive_status(self, msg: Message) -> None:
        state = msg.content.get("execution_state")
        if not isinstance(state, str) or msg.content.get("cellmux_introspection"):
            return  # (an introspection request's status: not the kernel's state)
        self.status = state
        if state == "dead":
            self.dead_cause = str(msg.content.get("cause") or "unknown cause")
            self._fail_pending(KernelDied(self.dead_cause))
        elif state == "restarting":
            self._fail_pending(KernelDied(str(msg.content.get("cause") or "kernel restarted")))
        if self._on_status is not None:
            self._invoke(self._on_status, state)

    def _fail_pending(self, exc: BaseException) -> None:
        """Fail the Jupyter requests in flight (control requests keep waiting)."""
        for pending in list(self._pending.values()):
            pending.fail(exc)

    def _fail_all(self, exc: BaseException) -> None:
        self._fail_pending(exc)
        comms, self._comms = self._comms, {}
        for comm in comms.values():  # ours ended with the connection
            comm._kernel_closed(None)
        for future in list(self._control_waiters.values()):
            if not future.done():
                future.set_exception(exc)
                future.exception()


def _close_code(exc: websockets.ConnectionClosed | None) -> int | None:
    if exc is not None and exc.rcvd is not None:
        return exc.rcvd.code
    return None


async def _read_welcome(ws: ClientConnection, version: int) -> dict[str, Any]:
    """The server's welcome, or the error it sent instead."""
    try:
        data = await ws.recv()
    except websockets.ConnectionClosed as e:
        raise ConnectionClosed(
            "server closed the connection during the handshake"
            + (": " + e.rcvd.reason if e.rcvd is not None and e.rcvd.reason else ""),
            _close_code(e),
        ) from None
    if isinstance(data, str):
        raise CellmuxError("server sent a text message instead of welcome")
    try:
        frame = decode_frame(data, MAX_MESSAGE_SIZE)
        body = parse_control(frame) if frame.is_control else None
    except ProtocolError as e:
        raise CellmuxError(f"malformed handshake reply: {e}") from None
    if body is None:
        raise CellmuxError(f"server sent channel {frame.channel} before welcome")
    if body["op"] == "error":
        raise ServerError.from_body(body, fatal=True)
    if body["op"] != "welcome":
        raise CellmuxError(f"expected welcome, got {body['op']!r}")
    if body.get("version") != version:
        raise CellmuxError(
            f"server answered protocol version {body.get('version')!r} to a hello of version "
            f"{version}"
        )
    return body

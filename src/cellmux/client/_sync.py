"""The blocking client: the asyncio client driven from a private loop thread.

REST calls run directly in the caller's thread. Websocket work runs on an
event loop in a daemon thread; callbacks (on_output, on_status, listeners)
are invoked in that thread, and synchronous on_stdin functions run in a
worker thread so they may block.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Generic, TypeVar, overload

from cellmux.protocol import Frame, JupyterSocket

from ._async import AsyncClient, AsyncKernel, OutputHandler, StatusHandler, StdinHandler
from ._comms import AsyncComm
from ._http import DEFAULT_URL
from ._results import ExecutionResult, KernelModel, Message

__all__ = ["Client", "Comm", "Kernel"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class _LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        running = threading.Event()
        self.thread = threading.Thread(
            target=self._main, args=(running,), name="cellmux-client", daemon=True
        )
        self.thread.start()
        # Until the loop runs, run() would take it for closed (and stop()
        # would close it under the thread): a loaded machine got there first.
        while not running.wait(0.1) and self.thread.is_alive():
            pass

    def _main(self, running: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(running.set)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run C{coro} on the loop and block until it is done."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError(
                "blocking cellmux calls cannot be made from client callbacks; "
                "use the AsyncKernel (kernel.async_kernel) there"
            )
        if not self.loop.is_running() or self.loop.is_closed():
            coro.close()
            raise RuntimeError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: stop waiting on the loop too
            raise

    def stop(self) -> None:
        """Cancel what still runs on the loop, stop it and close it."""
        if self.loop.is_closed():
            return
        if self.loop.is_running() and threading.current_thread() is not self.thread:
            try:
                asyncio.run_coroutine_threadsafe(_cancel_tasks(), self.loop).result(10)
            except Exception:
                log.warning("could not cancel the client's tasks cleanly")
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


async def _cancel_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _threaded_stdin(handler: StdinHandler | None) -> StdinHandler | None:
    """Wrap a synchronous stdin handler so it runs in a worker thread."""
    if handler is None or inspect.iscoroutinefunction(handler):
        return handler
    sync_handler = handler

    async def in_thread(prompt: str, password: bool) -> str:
        value = await asyncio.to_thread(sync_handler, prompt, password)
        if inspect.isawaitable(value):
            value = await value
        return value

    return in_thread


class Client:
    """A blocking client of one cellmux server.

    @param url: the server's base URL.
    @param token: the authentication token, sent as C{Authorization: token …}.
    @param http_timeout: seconds to wait for each REST response.
    @param cafile: CA certificates to trust besides the system's, for an
        https server with a self-signed certificate (default: C{$CELLMUX_CAFILE}).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        http_timeout: float = 60.0,
        cafile: str | None = None,
    ) -> None:
        self.async_client = AsyncClient(url, token, http_timeout=http_timeout, cafile=cafile)
        self._rest = self.async_client.rest
        self._loop: _LoopThread | None = None
        self._lock = threading.Lock()
        self._kernels: set[Kernel] = set()

    @property
    def url(self) -> str:
        return self.async_client.url

    def version(self) -> str:
        """The server's version string."""
        return self._rest.version()

    def get_status(self) -> dict[str, Any]:
        """The server's status: kernels, connections, warm pool."""
        return self._rest.get_status()

    def list_kernels(self) -> list[KernelModel]:
        """Every kernel the server runs."""
        return self._rest.list_kernels()

    def kernel_specs(self) -> dict[str, dict[str, Any]]:
        """The kernel specs the server offers, by name (python3, bash, ir, …)."""
        return self._rest.kernel_specs()

    def create_kernel(self, name: str | None = None) -> KernelModel:
        """Start a kernel of spec C{name} (the server's default if None)."""
        return self._rest.create_kernel(name)

    def get_kernel(self, kernel_id: str) -> KernelModel:
        """One kernel's model (L{HTTPError} with status 404 if unknown)."""
        return self._rest.get_kernel(kernel_id)

    def delete_kernel(self, kernel_id: str) -> None:
        """Shut a kernel down and remove it."""
        self._rest.delete_kernel(kernel_id)

    def interrupt_kernel(self, kernel_id: str) -> None:
        """Interrupt whatever the kernel is running."""
        self._rest.interrupt_kernel(kernel_id)

    def share_kernel(self, kernel_id: str, role: str) -> dict[str, Any]:
        """A new share token for one kernel (role "collaborator" or "observer")."""
        return self._rest.share_kernel(kernel_id, role)

    def list_shares(self, kernel_id: str) -> list[dict[str, Any]]:
        return self._rest.list_shares(kernel_id)

    def revoke_share(self, kernel_id: str, share_id: str) -> None:
        self._rest.revoke_share(kernel_id, share_id)

    def restart_kernel(self, kernel_id: str) -> KernelModel:
        """Restart a kernel and return its new model."""
        return self._rest.restart_kernel(kernel_id)

    def connect(
        self,
        kernel_id: str,
        channels: Iterable[int] | None = None,
        *,
        session: str | None = None,
        timeout: float | None = 30.0,
        cursor: int | None = None,
        listener: Callable[[Frame], object] | None = None,
    ) -> Kernel:
        """Attach to a kernel over the websocket; see L{AsyncClient.connect}."""
        with self._lock:
            if self._loop is None:
                self._loop = _LoopThread()
            loop = self._loop

        async def open_kernel() -> AsyncKernel:
            return await self.async_client.connect(
                kernel_id,
                channels,
                session=session,
                timeout=timeout,
                cursor=cursor,
                listener=listener,
            )

        return self._adopt(loop, open_kernel())

    def start(
        self,
        name: str | None = None,
        channels: Iterable[int] | None = None,
        *,
        session: str | None = None,
        timeout: float | None = 60.0,
        listener: Callable[[Frame], object] | None = None,
    ) -> Kernel:
        """Start a kernel and attach to it in one round trip; see L{AsyncClient.start}."""
        with self._lock:
            if self._loop is None:
                self._loop = _LoopThread()
            loop = self._loop

        async def start_kernel() -> AsyncKernel:
            return await self.async_client.start(
                name, channels, session=session, timeout=timeout, listener=listener
            )

        return self._adopt(loop, start_kernel())

    def _adopt(self, loop: _LoopThread, opening: Any) -> Kernel:
        kernel = Kernel(loop.run(opening), loop, self._kernels.discard)
        self._kernels.add(kernel)
        return kernel

    def close(self) -> None:
        """Close every kernel connection this client opened and stop its loop thread."""
        for kernel in list(self._kernels):
            try:
                kernel.close()
            except Exception as e:
                log.warning("closing kernel %s: %s", kernel.kernel_id, e)
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _ReadThrough(Generic[T]):
    """A read-only attribute that is the wrapped async object's attribute of
    the same name (the object its class's C{_wrapped} names), read at each
    access: the loop thread keeps it current."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, instance: None, owner: type) -> _ReadThrough[T]: ...

    @overload
    def __get__(self, instance: object, owner: type) -> T: ...

    def __get__(self, instance: object, owner: type) -> T | _ReadThrough[T]:
        if instance is None:
            return self
        wrapped = getattr(instance, owner._wrapped)  # type: ignore[attr-defined]
        value: T = getattr(wrapped, self._name)
        return value

    def __set__(self, instance: object, value: object) -> None:
        # As a property without a setter: not an instance attribute that
        # would hide the live value.
        raise AttributeError(f"{self._name} is read-only")


class Kernel:
    """A blocking handle on one attached kernel (wraps an L{AsyncKernel}).

    Get one from L{Client.connect}; use it as a context manager to close it.
    """

    _wrapped = "async_kernel"

    def __init__(
        self, kernel: AsyncKernel, loop: _LoopThread, forget: Callable[[Kernel], None]
    ) -> None:
        self.async_kernel = kernel
        self._loop = loop
        self._forget = forget

    # -- state (read from the loop thread's latest view) ------------------------

    kernel_id = _ReadThrough[str]()
    session = _ReadThrough[str]()
    model = _ReadThrough[KernelModel | None]()
    last_seq = _ReadThrough[int]()
    status = _ReadThrough[str | None]()
    dead_cause = _ReadThrough[str | None]()
    channels = _ReadThrough[frozenset[int] | None]()
    closed = _ReadThrough[bool]()

    @property
    def on_status(self) -> StatusHandler | None:
        """Called (in the loop thread) with each new execution_state."""
        return self.async_kernel.on_status

    @on_status.setter
    def on_status(self, handler: StatusHandler | None) -> None:
        self.async_kernel.on_status = handler

    def add_listener(self, listener: Callable[[Frame], object]) -> Callable[[], None]:
        """Call C{listener(frame)} (in the loop thread) for every frame; returns a remover."""
        return self.async_kernel.add_listener(listener)

    def remove_listener(self, listener: Callable[[Frame], object]) -> None:
        self.async_kernel.remove_listener(listener)

    # -- comms ---------------------------------------------------------------------

    def open_comm(
        self,
        target_name: str,
        data: dict[str, Any] | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        buffers: Iterable[bytes] = (),
        comm_id: str | None = None,
    ) -> Comm:
        """Open a comm to a kernel-side target; see L{AsyncKernel.open_comm}."""
        comm = self._loop.run(
            self.async_kernel.open_comm(
                target_name, data, metadata=metadata, buffers=tuple(buffers), comm_id=comm_id
            )
        )
        return Comm(comm, self._loop)

    @property
    def comms(self) -> dict[str, Comm]:
        """The open comms this connection knows, by id; see L{AsyncKernel.comms}."""
        return {i: Comm(c, self._loop) for i, c in self.async_kernel.comms.items()}

    def register_comm_target(
        self, target_name: str, handler: Callable[[Comm, Message], object] | None
    ) -> None:
        """Call C{handler(comm, message)} (in the loop thread) when the kernel
        opens a comm for C{target_name}; see L{AsyncKernel.register_comm_target}."""
        if handler is None:
            self.async_kernel.register_comm_target(target_name, None)
            return
        loop = self._loop
        self.async_kernel.register_comm_target(
            target_name, lambda comm, msg: handler(Comm(comm, loop), msg)
        )

    def comm_info(
        self, target_name: str | None = None, *, timeout: float | None = None
    ) -> dict[str, dict[str, Any]]:
        """The kernel's open comms; see L{AsyncKernel.comm_info}."""
        return self._loop.run(self.async_kernel.comm_info(target_name, timeout=timeout))

    # -- requests ------------------------------------------------------------------

    def execute(
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
        """Run C{code}; see L{AsyncKernel.execute}. A sync C{on_stdin} may block."""
        return self._loop.run(
            self.async_kernel.execute(
                code,
                on_output=on_output,
                on_stdin=_threaded_stdin(on_stdin),
                silent=silent,
                timeout=timeout,
                store_history=store_history,
                user_expressions=user_expressions,
                metadata=metadata,
            )
        )

    def complete(
        self, code: str, cursor_pos: int | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """The complete_reply content."""
        return self._loop.run(self.async_kernel.complete(code, cursor_pos, timeout=timeout))

    def inspect(
        self,
        code: str,
        cursor_pos: int | None = None,
        detail_level: int = 0,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """The inspect_reply content."""
        return self._loop.run(
            self.async_kernel.inspect(code, cursor_pos, detail_level, timeout=timeout)
        )

    def is_complete(self, code: str, *, timeout: float | None = None) -> dict[str, Any]:
        """The is_complete_reply content."""
        return self._loop.run(self.async_kernel.is_complete(code, timeout=timeout))

    def namespace(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The cellmux_namespace_reply content (see L{AsyncKernel.namespace})."""
        return self._loop.run(self.async_kernel.namespace(timeout=timeout))

    def kernel_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The kernel_info_reply content."""
        return self._loop.run(self.async_kernel.kernel_info(timeout=timeout))

    def pause(self, *, timeout: float | None = None) -> bool:
        """Stop the running cell in pdb; see L{AsyncKernel.pause}."""
        return self._loop.run(self.async_kernel.pause(timeout=timeout))

    def request(
        self, msg_type: str, content: dict[str, Any], *, timeout: float | None = None
    ) -> Message:
        """Send a C{*_request} and return the matching reply message."""
        return self._loop.run(self.async_kernel.request(msg_type, content, timeout=timeout))

    def send(
        self,
        msg_type: str,
        content: dict[str, Any],
        *,
        parent: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        buffers: Iterable[bytes] = (),
        socket: JupyterSocket | None = None,
    ) -> str:
        """Send one Jupyter message without waiting for an answer; returns its msg_id."""
        return self._loop.run(
            self.async_kernel.send(
                msg_type,
                content,
                parent=parent,
                metadata=metadata,
                buffers=tuple(buffers),
                socket=socket,
            )
        )

    def interrupt(self, *, timeout: float | None = None) -> None:
        """Interrupt the kernel; returns once the server acknowledged."""
        self._loop.run(self.async_kernel.interrupt(timeout=timeout))

    def restart(self, *, timeout: float | None = None) -> None:
        """Restart the kernel; returns once the new kernel is ready."""
        self._loop.run(self.async_kernel.restart(timeout=timeout))

    def shutdown(self, *, timeout: float | None = None) -> None:
        """Shut the kernel down; returns once the server acknowledged."""
        self._loop.run(self.async_kernel.shutdown(timeout=timeout))

    def subscribe(self, channels: Iterable[int] | None, *, timeout: float | None = None) -> None:
        """Receive only C{channels} from now on (None: all)."""
        self._loop.run(self.async_kernel.subscribe(channels, timeout=timeout))

    @property
    def gaps(self) -> list[tuple[int, int]]:
        """Seq ranges the server no longer had when this connection resumed."""
        return self.async_kernel.gaps

    def history(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """The code every client executed on this kernel, oldest first."""
        return self._loop.run(self.async_kernel.history(timeout=timeout))

    def ping(self, *, timeout: float | None = None) -> float:
        """Round trip to the server in seconds."""
        return self._loop.run(self.async_kernel.ping(timeout=timeout))

    def close(self) -> None:
        """Close the websocket (idempotent)."""
        self._forget(self)
        if not self._loop.loop.is_closed():
            self._loop.run(self.async_kernel.close())

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Comm:
    """A blocking handle on an L{AsyncComm}: the same comm, driven from any
    thread; handlers run in the client's loop thread."""

    _wrapped = "async_comm"

    def __init__(self, comm: AsyncComm, loop: _LoopThread) -> None:
        self.async_comm = comm
        self._loop = loop

    def __repr__(self) -> str:
        return repr(self.async_comm).replace("AsyncComm", "Comm", 1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Comm) and other.async_comm is self.async_comm

    def __hash__(self) -> int:
        return hash(self.async_comm)

    comm_id = _ReadThrough[str]()
    target_name = _ReadThrough[str]()
    open_message = _ReadThrough[Message | None]()
    closed = _ReadThrough[bool]()

    def send(
        self,
        data: dict[str, Any] | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        buffers: Iterable[bytes] = (),
    ) -> str:
        """Send a comm_msg; returns its msg_id."""
        return self._loop.run(self.async_comm.send(data, metadata=metadata, buffers=tuple(buffers)))

    def close(
        self, data: dict[str, Any] | None = None, *, metadata: dict[str, Any] | None = None
    ) -> None:
        """Close the comm on both sides."""
        self._loop.run(self.async_comm.close(data, metadata=metadata))

    def on_msg(self, handler: Callable[[Message], object] | None) -> None:
        """Call C{handler(message)} (in the loop thread) for each comm_msg."""
        self._loop.run(_call(self.async_comm.on_msg, handler))

    def on_close(self, handler: Callable[[Message], object] | None) -> None:
        """Call C{handler(message)} (in the loop thread) when the kernel closes it."""
        self.async_comm.on_close(handler)

    def recv(self, timeout: float | None = None) -> Message:
        """The next comm_msg no handler took; see L{AsyncComm.recv}."""
        return self._loop.run(self.async_comm.recv(timeout))


async def _call(function: Callable[..., object], *args: Any) -> None:
    # Runs C{function} in the loop thread, where the comm's state lives.
    function(*args)

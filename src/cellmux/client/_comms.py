"""Jupyter comms for the Python client: open, send, receive, close.

A comm is a channel between an object in the kernel and one in a client
(ipywidgets' models are comms with the target ``jupyter.widget``). Comm
messages travel on cellmux channel 8 (docs/protocol.md, section 3); the
kernel's go to every attached client, as all iopub messages do.

Bounds: an L{AsyncKernel} remembers at most L{MAX_COMMS} comms the kernel
opened; each comm keeps at most L{MAX_UNREAD} messages no handler took,
for L{AsyncComm.recv} (older ones are dropped, with a warning).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._results import CellmuxError, Message

if TYPE_CHECKING:
    from ._async import AsyncKernel

__all__ = ["MAX_COMMS", "MAX_UNREAD", "AsyncComm", "CommClosed"]

log = logging.getLogger(__name__)

#: Comms opened by the kernel that one connection keeps track of.
MAX_COMMS = 10_000
#: Messages a comm keeps for recv() while no on_msg handler is set.
MAX_UNREAD = 1000

CommHandler = Callable[[Message], object]
#: A comm target: called with the new comm and its comm_open message.
TargetHandler = Callable[["AsyncComm", Message], object]


class CommClosed(CellmuxError):
    """The comm was closed (by the kernel, by us, or with the connection)."""


class AsyncComm:
    """One comm, opened by this client (L{AsyncKernel.open_comm}) or by the
    kernel (L{AsyncKernel.register_comm_target}, L{AsyncKernel.comms}).

    @ivar comm_id: the comm's id.
    @ivar target_name: the target it was opened for.
    @ivar open_message: the kernel's comm_open message, for comms the kernel
        opened (its C{content["data"]} holds e.g. a widget's initial state);
        None for comms this client opened.
    @ivar closed: whether the comm is closed.
    """

    def __init__(
        self,
        kernel: AsyncKernel,
        comm_id: str,
        target_name: str,
        open_message: Message | None = None,
    ) -> None:
        self._kernel = kernel
        self.comm_id = comm_id
        self.target_name = target_name
        self.open_message = open_message
        self.closed = False
        self._on_msg: CommHandler | None = None
        self._on_close: CommHandler | None = None
        self._unread: deque[Message] = deque()
        self._waiters: deque[asyncio.Future[Message]] = deque()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<AsyncComm {self.comm_id} target={self.target_name!r} {state}>"

    async def send(
        self,
        data: dict[str, Any] | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        buffers: Iterable[bytes] = (),
    ) -> str:
        """Send a comm_msg with C{data} to the kernel's side; returns its msg_id."""
        if self.closed:
            raise CommClosed(f"comm {self.comm_id} is closed")
        content = {"comm_id": self.comm_id, "data": data or {}}
        return await self._kernel.send(
            "comm_msg", content, metadata=metadata, buffers=tuple(buffers)
        )

    async def close(
        self, data: dict[str, Any] | None = None, *, metadata: dict[str, Any] | None = None
    ) -> None:
        """Close the comm on both sides (no error if it is closed already)."""
        if self.closed:
            return
        self._closed()
        self._kernel._comms.pop(self.comm_id, None)
        content = {"comm_id": self.comm_id, "data": data or {}}
        await self._kernel.send("comm_close", content, metadata=metadata)

    def on_msg(self, handler: CommHandler | None) -> None:
        """Call C{handler(message)} for each comm_msg from the kernel (None: stop).

        While no handler is set, messages wait for L{recv}.
        """
        self._on_msg = handler
        if handler is not None:
            while self._unread:
                self._kernel._invoke(handler, self._unread.popleft())

    def on_close(self, handler: CommHandler | None) -> None:
        """Call C{handler(message)} when the kernel closes the comm."""
        self._on_close = handler

    async def recv(self, timeout: float | None = None) -> Message:
        """The next comm_msg from the kernel that no handler took.

        @raise CommClosed: if the comm is or gets closed first.
        @raise TimeoutError: after C{timeout} seconds.
        """
        if self._unread:
            return self._unread.popleft()
        if self.closed:
            raise CommClosed(f"comm {self.comm_id} is closed")
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    # -- called by the kernel's reader -------------------------------------------

    def _message(self, msg: Message) -> None:
        if self._on_msg is not None:
            self._kernel._invoke(self._on_msg, msg)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(msg)
                return
        if len(self._unread) >= MAX_UNREAD:
            self._unread.popleft()
            log.warning(
                "comm %s: over %d unread messages, dropped the oldest", self.comm_id, MAX_UNREAD
            )
        self._unread.append(msg)

    def _kernel_closed(self, msg: Message | None) -> None:
        if self.closed:
            return
        self._closed()
        if msg is not None and self._on_close is not None:
            self._kernel._invoke(self._on_close, msg)

    def _closed(self) -> None:
        self.closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(CommClosed(f"comm {self.comm_id} is closed"))

"""Python client of a cellmux server.

L{AsyncClient}/L{AsyncKernel} for asyncio code, L{Client}/L{Kernel} for
blocking code::

    with Client("http://127.0.0.1:8800", token="…") as client:
        model = client.create_kernel()
        with client.connect(model.id) as kernel:
            result = kernel.execute("print('a'); 1 + 1")
            assert result.stdout == "a\\n" and result.result_text == "2"
"""

from ._async import MAX_MESSAGE_SIZE, AsyncClient, AsyncKernel
from ._comms import AsyncComm, CommClosed
from ._http import DEFAULT_URL, websocket_url
from ._results import (
    CellmuxError,
    ConnectionClosed,
    ExecutionError,
    ExecutionResult,
    HTTPError,
    KernelDied,
    KernelModel,
    Message,
    Output,
    ServerError,
)
from ._sync import Client, Comm, Kernel

__all__ = [
    "DEFAULT_URL",
    "MAX_MESSAGE_SIZE",
    "AsyncClient",
    "AsyncComm",
    "AsyncKernel",
    "CellmuxError",
    "Client",
    "Comm",
    "CommClosed",
    "ConnectionClosed",
    "ExecutionError",
    "ExecutionResult",
    "HTTPError",
    "Kernel",
    "KernelDied",
    "KernelModel",
    "Message",
    "Output",
    "ServerError",
    "websocket_url",
]

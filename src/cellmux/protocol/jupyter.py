# -*- test-case-name: tests.test_protocol_jupyter -*-
"""Building the few Jupyter messages the server itself sends.

The server relays kernel messages as opaque bytes; it only *makes* a few:
status messages (starting, restarting, dead with a cause) so clients learn
of lifecycle events in the same format as busy and idle, notices on stderr,
and error replies to requests it refuses.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

__all__ = ["JUPYTER_PROTOCOL_VERSION", "SERVER_SESSION", "jupyter_parts"]

#: Jupyter messaging protocol version of the messages the server makes.
JUPYTER_PROTOCOL_VERSION = "5.3"
#: The ``session`` of server-made messages.
SERVER_SESSION = "cellmux-server"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def jupyter_parts(
    msg_type: str,
    content: dict[str, Any],
    *,
    now: datetime,
    session: str = SERVER_SESSION,
    parent: dict[str, Any] | None = None,
    msg_id: str | None = None,
) -> tuple[bytes, bytes, bytes, bytes]:
    """The four JSON parts of a Jupyter message.

    @param now: the message time (the caller owns the clock).
    """
    header = {
        "msg_id": msg_id or uuid.uuid4().hex,
        "msg_type": msg_type,
        "session": session,
        "username": "cellmux",
        "date": now.isoformat(),
        "version": JUPYTER_PROTOCOL_VERSION,
    }
    return (_dumps(header), _dumps(parent or {}), b"{}", _dumps(content))

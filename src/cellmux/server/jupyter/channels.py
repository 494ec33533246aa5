# -*- test-case-name: tests.test_jupyter_ws -*-
"""``/api/kernels/{id}/channels``: Jupyter clients on cellmux kernels.

Called from Autobahn: onConnect (admission, format choice), onOpen,
onMessage, onClose.
Called by its L{Attachment} (the L{Transport}): deliver, gap, gone, revoked.

Credentials are those of the native endpoint: the server token, or a share
token (or its login cookie) for this one kernel; an observer's share
receives output but sends nothing and never sees stdin prompts.

The format (legacy JSON or v1) is chosen once, in onConnect, as a codec;
everything after that goes through it. Translating and checking messages is
the sans-IO L{codec} module's job; this class only wires it to Autobahn and
to the L{Kernel}.

Flow control, roles and the client's place in the kernel's numbering are
the native endpoint's, shared through L{Attachment}: a slow Jupyter client
costs the server no growing buffer and catches up from the replay log; one
that sends requests also holds back its kernel's link credit.
"""

from __future__ import annotations

import re
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from autobahn.twisted.websocket import (
    ConnectionDeny,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.logger import Logger

from cellmux.protocol import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED_DATA,
    Channel,
    JupyterSocket,
    ProtocolError,
    decode_frame,
)
from cellmux.protocol.jupyter import jupyter_parts

from ..attachment import Attachment
from ..auth import OriginPolicy
from ..autobahn_compat import close, request_target, take_over_producer
from ..kernels import Kernel, KernelError, KernelManager, KernelState
from ..proxy import upgrade_secure
from ..websocket import CLOSE_FORBIDDEN, CLOSE_KERNEL_GONE, client_protocol_options
from .codec import (
    Codec,
    JupyterCodecError,
    JupyterMessage,
    KernelBound,
    channel_name,
    codec_for,
    parse_json_object,
    to_kernel,
)
from .status import StatusTranslator

__all__ = [
    "CLOSE_KERNEL_GONE",
    "JupyterChannels",
    "JupyterChannelsFactory",
    "channels_path_kernel",
]

#: After this many refused messages a client is cut off.
MAX_REFUSED = 100
#: Refusals logged one by one per connection; the rest are summed at close.
LOGGED_REFUSALS = 10
#: The parts of a request's header an error reply echoes, and how much of
#: each: enough for a client to match the reply, however big the header.
_ECHOED_HEADER_FIELDS = ("msg_id", "msg_type", "session", "username", "date", "version")
_ECHOED_FIELD_CHARS = 256
#: Longest session_id accepted (Jupyter's are uuids).
MAX_SESSION_ID = 200
#: Distinct header.session values one client may use (JupyterLab uses one).
MAX_CLIENT_SESSIONS = 16
#: Sessions whose last delivered seq is remembered, per kernel, for replay.
MAX_REMEMBERED_SESSIONS = 256
#: Messages, and their bytes, one client may send while its kernel restarts:
#: they wait for the new process (as a stock server's ZeroMQ sockets hold
#: them); more are refused as for a dead kernel.
MAX_HELD = 64
MAX_HELD_BYTES = 4 * 1024 * 1024

_PATH = re.compile(r"/api/kernels/(?P<kernel_id>[^/]+)/channels/?")

#: What a Jupyter client receives: every Jupyter channel, but not the
#: server's file notices or plugin channels, which Jupyter clients don't know.
_JUPYTER_CHANNELS = frozenset(
    {
        Channel.STDIN,
        Channel.STDOUT,
        Channel.STDERR,
        Channel.STATUS,
        Channel.INTROSPECTION,
        Channel.EXECUTE,
        Channel.DISPLAY,
        Channel.COMM,
        Channel.KERNEL,
    }
)


_REPLY_SOCKETS = frozenset({JupyterSocket.SHELL, JupyterSocket.CONTROL})


def channels_path_kernel(path: str) -> str | None:
    """The kernel id in a ``/api/kernels/{id}/channels`` path, else None."""
    match = _PATH.fullmatch(path)
    return match["kernel_id"] if match else None


class JupyterChannels(WebSocketServerProtocol):
    """One Jupyter client's websocket on one kernel."""

    # Like the native endpoint: no twisted Logger on the protocol itself,
    # Autobahn's debug lines carry the upgrade headers (and the token).

    def __init__(self) -> None:
        super().__init__()
        self.codec: Codec | None = None
        self.attachment: Attachment | None = None
        self._kernel: Kernel | None = None  # found at admission, joined on open
        #: The query's session_id: the key of this client's replay cursor.
        self.session_id = ""
        #: Every header.session this client used: shell and control replies
        #: to other clients' requests are not its business (Jupyter routes
        #: them to the requesting socket only). The attachment's session, by
        #: which input_request is routed, follows the latest shell request's
        #: (JupyterLab and jupyter_server put the session_id there).
        self._own_sessions: set[str] = set()
        self._refused = 0
        self._refusals_seen = 0
        #: Server-made status in native terms -> as a stock server says it.
        self._statuses = StatusTranslator()
        #: The header of this client's latest execute_request: the server's
        #: notices (why the kernel died) are parented to it, so that
        #: JupyterLab shows them in the output of the cell that was running.
        self._last_execute: dict[str, Any] | None = None
        #: What this client sent while its kernel was restarting.
        self._held: list[tuple[KernelBound, str | None]] = []
        self._held_bytes = 0

    @property
    def manager(self) -> KernelManager:
        return self.factory.manager

    # What onConnect found: every callback after it may rely on these.

    @property
    def _joined(self) -> Attachment:
        assert self.attachment is not None, "onConnect admitted this client"
        return self.attachment

    @property
    def _codec(self) -> Codec:
        assert self.codec is not None, "onConnect chose the codec"
        return self.codec

    @property
    def _the_kernel(self) -> Kernel:
        assert self._kernel is not None, "onConnect found the kernel"
        return self._kernel

    # -- called from Autobahn ---------------------------------------------

    def onConnect(self, request) -> str | None:
        grant = self.factory.auth.upgrade_grant(request.headers, request_target(self))
        if grant is None:
            raise ConnectionDeny(403, "a valid token is required")
        headers = request.headers
        secure = upgrade_secure(headers, self.transport)
        if not self.factory.origins.allows(headers.get("origin"), headers.get("host"), secure):
            raise ConnectionDeny(403, "this origin may not connect")
        kernel_id = channels_path_kernel(request.path)
        if kernel_id is None:
            raise ConnectionDeny(404, "use /api/kernels/{id}/channels")
        if not grant.covers(kernel_id):
            raise ConnectionDeny(403, "this token is for another kernel")
        try:
            self._kernel = self.manager.get(kernel_id)
        except KernelError as e:
            raise ConnectionDeny(404, str(e)) from None
        session_id = (request.params.get("session_id") or [""])[0]
        if len(session_id) > MAX_SESSION_ID:
            raise ConnectionDeny(400, f"session_id is longer than {MAX_SESSION_ID} characters")
        self.session_id = session_id
        self.attachment = Attachment(self.manager, grant, self, channels=_JUPYTER_CHANNELS)
        self.codec = codec_for(request.protocols)
        return self.codec.subprotocol

    def onOpen(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        attachment, kernel = self._joined, self._the_kernel
        take_over_producer(self, attachment)
        if kernel.id not in self.manager.kernels:  # shut down during the handshake
            self.gone("shut down")
            return
        session = self.session_id or uuid.uuid4().hex
        # The same session again resumes after what it was last sent.
        cursor = self.factory.cursor(kernel.id, self.session_id)
        if self.factory.auto_restart and attachment.grant.role.may_execute:
            # Jupyter clients give a dead kernel up; a stock server restarts
            # it. (An observer only watching changes nothing.)
            kernel.auto_restart = True
        attachment.attach(kernel, session, cursor=cursor)
        if attachment.owns_session:  # not another credential's session
            self._own_sessions.add(session)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            message = self._codec.decode(payload, isBinary)
            bound = to_kernel(message)
        except JupyterCodecError as e:
            self._refuse(e, close_code=CLOSE_UNSUPPORTED_DATA if e.code == "text_frame" else None)
            return
        # A session is this client's only if no other credential owns it
        # (an observer never owns one), and only once the kernel took a
        # message with it: else an observer (all its messages refused) or a
        # collaborator naming the owner's session would receive the replies
        # to the owner's requests.
        session = bound.header.get("session")
        claimed = (
            isinstance(session, str)
            and bool(session)
            and (
                session in self._own_sessions
                or (
                    len(self._own_sessions) < MAX_CLIENT_SESSIONS
                    and self._joined.claim_session(session)
                )
            )
        )
        if claimed and bound.socket is JupyterSocket.SHELL:
            # before sending: the input history records the request's session
            self._joined.adopt_session(session)  # type: ignore[arg-type]
        if bound.header.get("msg_type") == "execute_request":
            self._last_execute = bound.header
        claimed_session = session if claimed else None
        self._release_held()
        restarting = self._held or self._the_kernel.state is KernelState.RESTARTING
        if restarting and self._joined.grant.role.may_execute:
            # JupyterLab asks for kernel_info as soon as it reconnects after
            # a restart: the new kernel answers it, as on a stock server.
            size = sum(map(len, bound.parts))
            if len(self._held) < MAX_HELD and self._held_bytes + size <= MAX_HELD_BYTES:
                self._held.append((bound, claimed_session))
                self._held_bytes += size
                return
        self._send_to_kernel(bound, claimed_session)

    def _send_to_kernel(self, bound: KernelBound, claimed_session: str | None) -> None:
        """Relay, or refuse with the reason; a claimed session becomes this
        client's once the kernel took a message with it."""
        try:
            self._joined.send(bound.channel, bound.socket, bound.parts)
        except KernelError as e:
            self._refuse(JupyterCodecError(e.code, str(e), bound.header), count=False)
            return
        if claimed_session is not None:
            self._own_sessions.add(claimed_session)

    def _release_held(self) -> None:
        """Once the restart is over, send what waited for it (or refuse it,
        if the kernel did not come back)."""
        if not self._held or self._the_kernel.state is KernelState.RESTARTING:
            return
        if self._joined.kernel is None:  # the client left, or the kernel did
            self._held, self._held_bytes = [], 0
            return
        held, self._held, self._held_bytes = self._held, [], 0
        for bound, claimed_session in held:
            self._send_to_kernel(bound, claimed_session)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._refusals_seen > LOGGED_REFUSALS:
            self.factory.log.info(
                "refused {n} Jupyter messages in all on kernel {kernel} (the first "
                "{logged} logged)",
                n=self._refusals_seen,
                kernel=self._kernel.id if self._kernel else None,
                logged=LOGGED_REFUSALS,
            )
        attachment = self.attachment
        if attachment is not None and attachment.kernel is not None:
            self.factory.delivered(attachment.kernel.id, self.session_id, attachment.cursor)
            attachment.detach()

    # -- called by the Attachment (Transport) ------------------------------

    def deliver(self, data: bytes) -> None:
        """Translate one cellmux frame and write it, if it is this client's."""
        try:
            frame = decode_frame(data, self.manager.config.max_frame_size)
        except ProtocolError as e:
            self.factory.log.warn("dropped an undecodable frame: {error}", error=e)
            return
        if frame.socket in _REPLY_SOCKETS and not self._asked(frame.parts):
            return
        if frame.socket is JupyterSocket.NONE and frame.channel == Channel.STATUS:
            self._deliver_status(frame.parts)
            return
        try:
            message = JupyterMessage(channel_name(frame.socket), frame.parts)
            payload, binary = self._codec.encode(message)
        except (JupyterCodecError, ValueError) as e:
            # Only a kernel makes such a message; its other output still flows.
            self.factory.log.warn(
                "dropped a kernel message Jupyter clients cannot read: {error}", error=e
            )
            return
        self.sendMessage(payload, isBinary=binary)

    def _deliver_status(self, parts: tuple[bytes, ...]) -> None:
        """A server-made status, in the words a stock Jupyter Server uses."""
        try:
            content = parse_json_object(parts[3], "content")
        except (JupyterCodecError, IndexError) as e:
            self.factory.log.warn("dropped an unreadable server status: {error}", error=e)
            return
        translation = self._statuses.translate(content)
        now = datetime.fromtimestamp(self.manager.clock.seconds(), UTC)
        # A kernel shut down on purpose needs no explanation in a cell.
        if translation.notice is not None and self._the_kernel.id in self.manager.kernels:
            parts = jupyter_parts(
                "stream",
                {"name": "stderr", "text": translation.notice},
                now=now,
                parent=self._last_execute,
            )
            self.send_frame_unnumbered(JupyterSocket.IOPUB, parts)
        if translation.status is not None:
            parts = jupyter_parts("status", translation.status, now=now)
            self.send_frame_unnumbered(JupyterSocket.IOPUB, parts)
        if self._held:
            # On the next turn: the status that ends a restart is published
            # before the kernel takes messages again.
            self.manager.clock.callLater(0, self._release_held)

    def gap(self, first: int, last: int) -> None:
        """Replay could not reach back far enough: say what was lost, in the notebook."""
        missed = last - first + 1
        now = datetime.fromtimestamp(self.manager.clock.seconds(), UTC)
        text = (
            f"cellmux: {missed} kernel message(s) (#{first}-#{last}) sent while this client "
            "was away are no longer kept and cannot be replayed\n"
        )
        parts = jupyter_parts("stream", {"name": "stderr", "text": text}, now=now)
        self.send_frame_unnumbered(JupyterSocket.IOPUB, parts)

    def _asked(self, parts: tuple[bytes, ...]) -> bool:
        """Whether this client made the request a shell or control reply answers."""
        try:
            parent = parse_json_object(parts[1], "parent_header") if len(parts) > 1 else {}
        except JupyterCodecError:
            return False
        return parent.get("session") in self._own_sessions

    def gone(self, reason: str) -> None:
        close(self, CLOSE_KERNEL_GONE, f"kernel {reason}")

    def revoked(self) -> None:
        close(self, CLOSE_FORBIDDEN, "access revoked")

    # -- helpers ------------------------------------------------------------

    def _refuse(
        self, error: JupyterCodecError, close_code: int | None = None, count: bool = True
    ) -> None:
        """Tell the client why its message was not relayed.

        A message whose header could be read is answered in Jupyter's own
        terms (an error reply to a request, else a stderr stream), so the
        notebook shows it; a frame too broken for that closes the socket
        with the reason.
        """
        self._refusals_seen += 1
        if self._refusals_seen <= LOGGED_REFUSALS:
            self.factory.log.info(
                "refused a Jupyter message on kernel {kernel}: {code}: {message}",
                kernel=self._kernel.id if self._kernel else None,
                code=error.code,
                message=error.message,
            )
        # A client that does not read its answers gets no more of them (they
        # would pile up in its connection), and each such refusal counts.
        not_reading = self.attachment is not None and self.attachment.paused
        if count or not_reading:
            self._refused += 1
        if error.header is None or close_code is not None or self._refused > MAX_REFUSED:
            code = close_code or CLOSE_PROTOCOL_ERROR
            close(self, code, error.message)
            return
        if not not_reading:
            self._answer_error(error, error.header)

    def _answer_error(self, error: JupyterCodecError, header: dict[str, Any]) -> None:
        msg_type = str(header.get("msg_type", ""))[:_ECHOED_FIELD_CHARS]
        now = datetime.fromtimestamp(self.manager.clock.seconds(), UTC)
        text = f"cellmux refused {msg_type or 'a message'}: {error.message}"
        parent = {
            key: value[:_ECHOED_FIELD_CHARS]
            for key in _ECHOED_HEADER_FIELDS
            if isinstance(value := header.get(key), str)
        }
        if msg_type.endswith("_request"):
            socket = self._socket_of(header)
            content = {"status": "error", "ename": "CellmuxError", "evalue": text, "traceback": []}
            parts = jupyter_parts(
                msg_type[: -len("request")] + "reply", content, now=now, parent=parent
            )
        else:
            socket = JupyterSocket.IOPUB
            parts = jupyter_parts(
                "stream", {"name": "stderr", "text": text + "\n"}, now=now, parent=parent
            )
        self.send_frame_unnumbered(socket, parts)

    @staticmethod
    def _socket_of(header: dict[str, Any]) -> JupyterSocket:
        # Control requests are answered on control, everything else on shell.
        control = {"interrupt_request", "shutdown_request", "debug_request"}
        return JupyterSocket.CONTROL if header.get("msg_type") in control else JupyterSocket.SHELL

    def send_frame_unnumbered(self, socket: JupyterSocket, parts: tuple[bytes, ...]) -> None:
        """A server-made message for this client only (seq 0: not in the replay log)."""
        payload, binary = self._codec.encode(JupyterMessage(channel_name(socket), parts))
        self.sendMessage(payload, isBinary=binary)


class JupyterChannelsFactory(WebSocketServerFactory):
    """Builds L{JupyterChannels}; remembers each session's replay cursor."""

    protocol = JupyterChannels
    log = Logger()

    def __init__(self, manager: KernelManager, auth, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.manager = manager
        self.auth = auth
        self.origins = OriginPolicy.from_strings(manager.config.allow_origins)
        #: Kernels a Jupyter client attaches to restart when they die.
        self.auto_restart: bool = manager.config.jupyter_auto_restart
        # kernel id -> session_id -> last seq delivered (LRU per kernel)
        self._cursors: dict[str, OrderedDict[str, int]] = {}
        self.setProtocolOptions(**client_protocol_options(manager.config.max_frame_size))

    def delivered(self, kernel_id: str, session_id: str, seq: int) -> None:
        if not session_id:
            return  # no session_id, no way to come back to it
        sessions = self._cursors.get(kernel_id)
        if sessions is None:
            self._cursors = {k: v for k, v in self._cursors.items() if k in self.manager.kernels}
            sessions = self._cursors[kernel_id] = OrderedDict()
        sessions[session_id] = seq
        sessions.move_to_end(session_id)
        if len(sessions) > MAX_REMEMBERED_SESSIONS:
            sessions.popitem(last=False)

    def cursor(self, kernel_id: str, session_id: str) -> int | None:
        """The last seq sent to this session of this kernel, if it was here before."""
        if not session_id:
            return None
        sessions = self._cursors.get(kernel_id)
        return None if sessions is None else sessions.get(session_id)

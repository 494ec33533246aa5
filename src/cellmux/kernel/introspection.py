"""Answer introspection requests while a cell runs.

Stock ipykernel answers ``complete_request`` and its kin on the thread that
runs cells, so a client asking while a cell runs waits for the cell to end.
Here every introspection request (channel 5: ``complete``, ``inspect``,
``is_complete``, ``history`` and cellmux's ``cellmux_namespace``) goes from
the pump to a thread of its own, which answers from the kernel's state as it
is now: the user namespace, or, while the main thread sits in a pdb prompt
(``breakpoint()``, ``%debug``, ``pdb.set_trace()``), the frame pdb shows.

The thread takes the GIL like any other: it answers while a cell runs
Python code (the interpreter switches threads every few milliseconds), not
while C code holds the GIL. The server notices that case and answers for
the kernel (docs/protocol.md, Introspection while busy).

The requests are answered in the order they arrive, one at a time. Each
publishes ``busy`` and ``idle`` with the request as parent, as Jupyter
clients expect (JupyterLab's requests are done only at their ``idle``),
marked ``"cellmux_introspection": true``: the server and cellmux's clients
do not take them for the kernel's state (an ``idle`` in the middle of a
running cell is not the cell's end).
"""

from __future__ import annotations

import builtins
import json
import pdb
import reprlib
import sys
import threading
import time
import types
from collections.abc import Callable, Mapping
from typing import Any

import zmq

__all__ = [
    "INTROSPECTION_TYPES",
    "MAX_NAMES",
    "MAX_REPR",
    "STATUS_MARK",
    "IntrospectionThread",
    "debugged_frame",
    "describe_namespace",
]

#: Marks the status messages of introspection requests (see above).
STATUS_MARK = "cellmux_introspection"
#: The request types the introspection thread answers (the rest of a
#: client's messages go to ipykernel's shell, as before).
INTROSPECTION_TYPES = frozenset(
    {
        "complete_request",
        "inspect_request",
        "is_complete_request",
        "history_request",
        "cellmux_namespace_request",
    }
)
#: A namespace listing names at most this many variables (the first by
#: name) and says ``truncated`` when there were more.
MAX_NAMES = 1000
#: Characters of each value's short repr in a namespace listing.
MAX_REPR = 120
#: Seconds one value's repr may take, and all of a listing's reprs: a
#: user's __repr__ may loop or crawl, and the one introspection thread
#: must not hang on it. Past the bound, the entry says so instead.
REPR_TIMEOUT = 0.2
LISTING_BUDGET = 1.0

_EXPERIMENTAL_TYPES_KEY = "_jupyter_types_experimental"


def debugged_frame(main_ident: int) -> tuple[types.FrameType, Mapping[str, Any]] | None:
    """The frame a pdb session on thread C{main_ident} shows, with its locals.

    pdb runs its prompt loop inside ``Pdb.interaction``; its instance keeps
    the frame the user moved to (``up``/``down`` included) in ``curframe``
    and that frame's locals, as pdb's own commands see them, in
    ``curframe_locals``.
    """
    frame = sys._current_frames().get(main_ident)
    while frame is not None:
        if frame.f_code.co_name == "interaction":
            debugger = frame.f_locals.get("self")
            if isinstance(debugger, pdb.Pdb) and debugger.curframe is not None:
                current = debugger.curframe
                namespace = getattr(debugger, "curframe_locals", None)
                if namespace is None:
                    namespace = current.f_locals
                return current, namespace
        frame = frame.f_back
    return None


_short = reprlib.Repr()
_short.maxstring = MAX_REPR
_short.maxother = MAX_REPR
_short.maxlist = _short.maxtuple = _short.maxset = _short.maxdict = 10


def _size(value: Any) -> str | None:
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and all(isinstance(n, int) for n in shape):
        return "x".join(map(str, shape)) or "()"
    if isinstance(value, (str, bytes, bytearray, list, tuple, dict, set, frozenset)):
        return str(len(value))
    return None


class _OutOfTime(BaseException):
    """Raised into a repr that ran out of time (a BaseException, so that
    reprlib's ``except Exception`` does not swallow it)."""


def _short_repr(value: Any, deadline: float) -> str:
    """reprlib's short repr, stopped at C{deadline} if it runs Python code."""

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _OutOfTime
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        return _short.repr(value)
    except _OutOfTime:
        return "<repr took too long>"
    except Exception as e:  # a user's __repr__ may raise anything
        return f"<repr failed: {type(e).__name__}>"
    finally:
        sys.settrace(previous)


def _describe(name: str, value: Any, deadline: float) -> dict[str, Any]:
    kind = type(value)
    entry: dict[str, Any] = {
        "name": name,
        "type": kind.__name__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}",
    }
    size = _size(value)
    if size is not None:
        entry["size"] = size
    now = time.monotonic()
    if now > deadline:
        text = "<not shown: the listing's reprs took too long>"
    else:
        text = _short_repr(value, min(deadline, now + REPR_TIMEOUT))
    if len(text) > MAX_REPR:
        text = text[: MAX_REPR - 1] + "…"
    entry["repr"] = text
    return entry


def describe_namespace(
    namespace: Mapping[str, Any], hidden: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What a variable explorer shows: each user variable's name, type,
    size (length or shape, when it has one) and a short repr.

    Leaves out names starting with ``_``, modules, and what IPython put
    there itself (C{hidden}) unless the user rebound the name.
    """
    hidden = hidden or {}
    names = []
    for name, value in list(namespace.items()):
        if not isinstance(name, str) or name.startswith("_"):
            continue
        if isinstance(value, types.ModuleType):
            continue
        if name in hidden and hidden[name] is value:
            continue
        names.append(name)
    names.sort()
    shown = names[:MAX_NAMES]
    deadline = time.monotonic() + LISTING_BUDGET
    return {
        "status": "ok",
        "variables": [
            _describe(name, namespace[name], deadline) for name in shown if name in namespace
        ],
        "truncated": len(names) > len(shown),
    }


def _shared_head(typed: str, matches: list[str]) -> int:
    """How much of what was typed every match repeats, up to its last
    delimiter: IPython's matchers without jedi answer ``os.pa`` with
    ``.path`` from the dot, where a client (and jedi) expects ``path``."""
    head = 0
    for n, char in enumerate(typed, 1):
        if not all(m[:n] == typed[:n] for m in matches):
            break
        if not (char.isalnum() or char == "_"):
            head = n
    return head


class IntrospectionThread(threading.Thread):
    """Answers the introspection requests the pump hands it, one by one.

    @param kernel: ipykernel's kernel object (its shell and session).
    @param context: the kernel's ZeroMQ context.
    @param endpoint: the pump's inproc PAIR endpoint for introspection.
    @param wrap_socket: applied to the thread's socket before it sends
        (the kernel's one emission order: cellmux.kernel.ordering).
    """

    def __init__(
        self,
        kernel: Any,
        context: zmq.Context,
        endpoint: str,
        wrap_socket: Callable[[zmq.Socket], None] | None = None,
    ) -> None:
        super().__init__(name="cellmux-introspection", daemon=True)
        self._kernel = kernel
        self._context = context
        self._endpoint = endpoint
        self._wrap_socket = wrap_socket
        self._main = threading.main_thread().ident or 0
        self._session: Any = None
        #: the completer for the user namespace, made on first use
        self._completers: dict[int, Any] = {}

    def run(self) -> None:
        socket = self._context.socket(zmq.PAIR)
        socket.linger = 0
        socket.connect(self._endpoint)
        if self._wrap_socket is not None:
            self._wrap_socket(socket)
        while True:
            parts = socket.recv_multipart()
            header = self._status("busy", parts)
            try:
                reply = self.answer(parts)
                if reply is not None:
                    socket.send_multipart(reply)
            except Exception:  # never let one request end the thread
                pass
            if header is not None:
                self._status("idle", parts, header)

    def _status(
        self, state: str, parts: list[bytes], header: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Publish busy or idle for a request (returns its header)."""
        if header is None:
            try:
                header = json.loads(parts[0]) if parts else None
            except ValueError:
                return None
            if not isinstance(header, dict):
                return None
        iopub = getattr(self._kernel, "iopub_socket", None)
        if iopub is None:
            return header
        session = self._own_session()
        # Scheduled on the IOPub thread (thread-safe); the reply waits for
        # it to be sent, so busy comes first (cellmux.kernel.ordering).
        session.send(
            iopub,
            "status",
            {"execution_state": state, STATUS_MARK: True},
            parent=header,
            ident=b"kernel.%s.status" % session.session.encode(),
        )
        return header

    def _own_session(self) -> Any:
        if self._session is None:
            from jupyter_client.session import Session

            # A session of its own: Session numbers its msg_ids with a
            # counter that is not safe to share between threads.
            self._session = Session(key=b"", username=self._kernel.session.username)
        return self._session

    def answer(self, parts: list[bytes]) -> list[bytes] | None:
        """The serialised reply (delimiter first) to one request's parts."""
        if len(parts) < 4:
            return None
        try:
            header = json.loads(parts[0])
            content = json.loads(parts[3])
        except ValueError:
            return None
        if not isinstance(header, dict) or not isinstance(content, dict):
            return None
        msg_type = header.get("msg_type", "")
        reply_type = msg_type.removesuffix("_request") + "_reply"
        try:
            reply_content = self._handle(msg_type, content)
        except Exception as e:
            reply_content = {
                "status": "error",
                "ename": type(e).__name__,
                "evalue": str(e),
                "traceback": [],
            }
        from ipykernel.jsonutil import json_clean

        session = self._own_session()
        parent = {"header": header}
        msg = session.msg(reply_type, json_clean(reply_content), parent=parent)
        return session.serialize(msg)

    # -- the handlers ---------------------------------------------------------------

    def _handle(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
        kernel = self._kernel
        debugged = debugged_frame(self._main)
        if msg_type == "complete_request":
            code = str(content.get("code", ""))
            cursor = content.get("cursor_pos")
            cursor = len(code) if not isinstance(cursor, int) else cursor
            return self._complete(debugged, code, cursor)
        if msg_type == "inspect_request":
            return self._inspect(content, debugged)
        if msg_type == "is_complete_request":
            return kernel.do_is_complete(str(content.get("code", "")))
        if msg_type == "history_request":
            return self._history(content)
        if msg_type == "cellmux_namespace_request":
            return self._namespace(debugged)
        raise ValueError(f"not an introspection request: {msg_type}")

    def _completer(self, namespace: Mapping[str, Any], global_namespace: dict[str, Any]) -> Any:
        """IPython's completer, on the live objects and without jedi.

        jedi analyses source as well as objects: a tenth of a second per
        completion while a cell holds the GIL half the time, and seconds
        for its first use. The live namespace is what the user means
        mid-run, and IPython's own matchers complete it in milliseconds;
        jedi (ipykernel's stock completion) answers only when they find
        nothing.
        """
        from IPython.core.completer import IPCompleter

        shell = self._kernel.shell
        completer = self._completers.get(id(global_namespace))
        if completer is None:
            completer = IPCompleter(
                shell=shell,
                namespace=namespace,
                global_namespace=global_namespace,
                config=shell.config,
                parent=shell,
            )
            completer.use_jedi = False
            if global_namespace is shell.user_global_ns:
                self._completers[id(global_namespace)] = completer
        completer.namespace = namespace
        completer.global_namespace = global_namespace
        return completer

    def _complete(
        self,
        debugged: tuple[types.FrameType, Mapping[str, Any]] | None,
        code: str,
        cursor: int,
    ) -> dict[str, Any]:
        from IPython.core.completer import provisionalcompleter, rectify_completions

        shell = self._kernel.shell
        if debugged is None:
            completer = self._completer(shell.user_ns, shell.user_global_ns)
        else:
            frame, local_ns = debugged
            completer = self._completer(dict(local_ns), frame.f_globals)
        with provisionalcompleter():
            found = list(rectify_completions(code, completer.completions(code, cursor)))
        if not found and debugged is None:
            # Nothing live matches: what only the code's text tells (a
            # module it imports but has not run) needs jedi, as stock does.
            return self._kernel.do_complete(code, cursor)
        start = found[0].start if found else cursor
        end = found[0].end if found else cursor
        texts = [c.text for c in found]
        skip = _shared_head(code[start:cursor], texts)
        start += skip
        return {
            "status": "ok",
            "matches": [text[skip:] for text in texts],
            "cursor_start": start,
            "cursor_end": end,
            "metadata": {
                _EXPERIMENTAL_TYPES_KEY: [
                    {
                        "start": start,
                        "end": c.end,
                        "text": c.text[skip:],
                        "type": c.type,
                        "signature": c.signature,
                    }
                    for c in found
                ]
            },
        }

    def _inspect(
        self,
        content: dict[str, Any],
        debugged: tuple[types.FrameType, Mapping[str, Any]] | None,
    ) -> dict[str, Any]:
        from IPython.utils.tokenutil import token_at_cursor

        shell = self._kernel.shell
        code = str(content.get("code", ""))
        cursor = content.get("cursor_pos")
        cursor = len(code) if not isinstance(cursor, int) else cursor
        detail = content.get("detail_level", 0)
        omit = set(content.get("omit_sections", []) or [])
        name = token_at_cursor(code, cursor)
        # Look the name up without IPython's builtin trap: the trap swaps
        # builtins in and out, which the running cell must not see.
        if debugged is None:
            namespaces = [
                ("Interactive", shell.user_ns),
                ("Interactive (global)", shell.user_global_ns),
                ("Python builtin", builtins.__dict__),
            ]
        else:
            frame, local_ns = debugged
            namespaces = [
                ("Locals", dict(local_ns)),
                ("Globals", frame.f_globals),
                ("Python builtin", builtins.__dict__),
            ]
        info = shell._ofind(name, namespaces)
        reply: dict[str, Any] = {"status": "ok", "data": {}, "metadata": {}, "found": False}
        if not info.found:
            return reply
        bundle = shell.inspector._get_info(
            info.obj, name, info=info, detail_level=detail, omit_sections=omit
        )
        reply["data"].update(bundle)
        if not shell.enable_html_pager:
            reply["data"].pop("text/html", None)
        reply["found"] = True
        return reply

    def _history(self, content: dict[str, Any]) -> dict[str, Any]:
        known = ("hist_access_type", "output", "raw", "session", "start", "stop", "n")
        args = {k: content[k] for k in (*known, "pattern", "unique") if k in content}
        args.setdefault("hist_access_type", "tail")
        args.setdefault("output", False)
        args.setdefault("raw", True)
        return self._kernel.do_history(**args)

    def _namespace(
        self, debugged: tuple[types.FrameType, Mapping[str, Any]] | None
    ) -> dict[str, Any]:
        shell = self._kernel.shell
        if debugged is None:
            return describe_namespace(shell.user_ns, shell.user_ns_hidden)
        frame, local_ns = debugged
        listing = describe_namespace(local_ns)
        listing["frame"] = {
            "function": frame.f_code.co_name,
            "filename": frame.f_code.co_filename,
            "line": frame.f_lineno,
        }
        return listing

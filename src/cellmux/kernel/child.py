"""What runs in a freshly forked kernel: stock ipykernel plus the pump.

The app below is ipykernel's own ``IPKernelApp`` with three things taken
out: the connection file (nobody connects from outside), the heartbeat
socket (ZeroMQ's own heartbeat on the link replaces it) and TCP ports (its
sockets bind on ``inproc`` endpoints that only the pump can reach).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import traceback
from datetime import UTC, datetime

import attrs
import ipykernel.ipkernel
from ipykernel.kernelapp import IPKernelApp
from traitlets.config import Config

from . import memory, sandbox
from .flowcontrol import prepare_iopub_socket
from .pump import INPROC_PORTS, Pump, inproc_endpoint

__all__ = ["CellmuxKernelApp", "KernelOrder", "rehearse_start", "run_kernel"]

_SITE_DIRS = frozenset({"site-packages", "dist-packages"})

#: Exit code of a kernel that failed to start (see docs/operations.md).
EXIT_START_FAILED = 70


@attrs.frozen
class KernelOrder:
    """What the nursery hands a child at fork time."""

    link_id: bytes
    secret: bytes
    endpoint: str
    workdir: str
    env: dict[str, str]
    #: Where the kernel starts, if not its own directory (a notebook's
    #: folder in the shared root).
    cwd: str | None = None
    #: The identity, namespaces and limits to enter (None: none at all).
    sandbox: sandbox.KernelSandbox | None = None
    #: Offer the kernel's pages to KSM (the operator's ``kernel_page_merging``).
    merge_pages: bool = False


class CellmuxKernelApp(IPKernelApp):
    """ipykernel on inproc sockets, with no connection file or heartbeat."""

    def parse_command_line(self, argv: list[str] | None = None) -> None:
        if argv:
            super().parse_command_line(argv)
            return
        # Nothing to parse: building traitlets' parser for every configurable
        # class would only touch shared pages (0.4 MB per kernel).
        self.argv = []
        self.extra_args = []
        self.cli_config = Config()

    def init_kernel(self) -> None:
        # ipykernel lists every loaded module's file for its debugger; the
        # nursery did that before the fork (see cellmux.kernel.memory).
        with memory.modules_listed_at_fork(ipykernel.ipkernel):
            super().init_kernel()

    def init_connection_file(self) -> None:
        pass

    def write_connection_file(self, **kwargs: object) -> None:
        pass

    def log_connection_info(self) -> None:
        pass

    def init_poller(self) -> None:
        # The nursery watches the parent; PR_SET_PDEATHSIG ends us with it.
        self.poller = None

    def init_heartbeat(self) -> None:
        self.heartbeat = None

    def _try_bind_socket(self, s, port):
        if port == INPROC_PORTS["iopub"]:
            # The pipe's size is fixed when the socket binds (not later).
            prepare_iopub_socket(s)
        s.bind(inproc_endpoint(port))
        return port


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the nursery dies (PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 == PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _enter_working_dir(order: KernelOrder) -> None:
    os.chdir(order.workdir)
    if order.cwd:
        # HOME is the kernel's own directory, given as "." (relative to it):
        # it stays there, not in the notebook's folder.
        home = os.environ.get("HOME")
        if home and not os.path.isabs(home):
            os.environ["HOME"] = os.path.abspath(home)
        os.chdir(order.cwd)
    # A notebook imports modules from its folder, as with a stock kernel:
    # IPython puts "" on sys.path, but not under ``python -I`` (safe_path),
    # which the nursery runs with. Where IPython would: before site-packages.
    if "" not in sys.path:
        index = next(
            (i for i, p in enumerate(sys.path) if os.path.basename(p) in _SITE_DIRS),
            len(sys.path),
        )
        sys.path.insert(index, "")


def _reset_process(order: KernelOrder, keep_fd: int) -> str:
    """Detach from the nursery: session, signals, fds, environment, cwd;
    how the kernel's pages were offered for merging ("": not)."""
    # Signal handlers were reset before anything else ran in this process
    # (see sandbox.fork_with_signals_reset).
    os.setsid()
    _die_with_parent()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    # Inherit nothing but stdio: the nursery's command pipes stay with it.
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, 65536)
    # While a root nursery's child may still offer all its memory at once.
    merging = memory.offer_pages_for_merging() if order.merge_pages else ""
    if order.sandbox is not None:  # last thing done as the nursery's user
        sandbox.enter(order.sandbox)
    os.environ.clear()
    os.environ.update(order.env)
    # tempfile remembers the nursery's temporary directory (its warm-up made
    # one); the kernel's own comes from its environment (TMPDIR, see nursery).
    tempfile.tempdir = None
    _enter_working_dir(order)
    sys.argv = ["cellmux-kernel"]
    return merging


def _start_app() -> CellmuxKernelApp:
    """ipykernel's app, initialised and tuned, its warm-up cell run: what
    every kernel does before it meets the server."""
    app = CellmuxKernelApp.instance(
        shell_port=INPROC_PORTS["shell"],
        stdin_port=INPROC_PORTS["stdin"],
        control_port=INPROC_PORTS["control"],
        iopub_port=INPROC_PORTS["iopub"],
        ip="cellmux",
    )
    # Each kernel keeps its history in memory: no shared SQLite file
    # between kernels (the server keeps each session's inputs).
    app.config.HistoryManager.hist_file = ":memory:"
    # Unsigned session: the inproc sockets are reachable only from this
    # process, and the link itself is authenticated by the handshake.
    app.config.Session.key = b""
    # Latency changes (docs/benchmarks.md); before initialize, which
    # creates the output streams they patch.
    from .tuning import install as install_tuning

    install_tuning(app)
    app.initialize(argv=[])
    from .flowcontrol import install as install_flowcontrol

    install_flowcontrol(app)
    # Code sent as lines of a file keeps that file's name and line numbers.
    from .sourcemap import install as install_sourcemap

    install_sourcemap(app.kernel)
    # Ctrl-C between execute_input and the cell's code still gets a reply.
    from .interrupts import install as install_interrupts

    install_interrupts(app.kernel)
    # Breakpoints by file and line, and pause, for editors (after the
    # interrupt gate, which tells when a cell's code runs).
    from .debugging import install as install_debugging

    install_debugging(app.kernel)
    # debugpy (imported by ipykernel) replaces breakpoint() with a hook
    # that does nothing unless a debug adapter is attached; clients of
    # cellmux expect breakpoint() to open pdb over stdin instead.
    sys.breakpointhook = sys.__breakpointhook__
    # Last, before the pump subscribes to IOPub: its output goes nowhere.
    from .tuning import warm_up

    warm_up(app)
    return app


#: The cells a rehearsal runs (see L{rehearse_start}): what a new kernel's
#: first user is likely to run, a value and some output.
REHEARSAL_CELLS = ("0", "print(1)")
#: Longest a rehearsal waits for one message from its kernel.
REHEARSAL_WAIT_MS = 20_000
#: Kernel environment variables a rehearsal goes without (see there).
_REHEARSAL_UNSET = ("PYTHONSTARTUP", "IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_CONFIG_PATH")


def rehearse_start(scratch: str, env: dict[str, str]) -> None:
    """Be a kernel for a moment: start as L{run_kernel} does, meet a stand-in
    server (in this process), run L{REHEARSAL_CELLS}, stop. Runs in a
    child the nursery forks for the purpose (L{memory.code_run_by}): what
    it runs tells the nursery which code every kernel runs. Everything it
    writes goes to C{scratch}; it talks to nothing outside this process.
    """
    import zmq

    from ..protocol import Channel, JupyterSocket, encode_tag, link_control
    from ..protocol.jupyter import jupyter_parts
    from .introspection import IntrospectionThread
    from .ordering import install as install_ordering

    _die_with_parent()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    sys.stdout = sys.__stdout__
    os.environ.clear()
    os.environ.update(env)
    os.environ["TMPDIR"] = scratch
    # Not sandboxed (as root: root), so it runs no file that settings of
    # the kernels' environment point at: IPython and Jupyter would run
    # these (configuration files are Python) at their start.
    for name in _REHEARSAL_UNSET:
        os.environ.pop(name, None)
    tempfile.tempdir = None
    os.chdir(scratch)
    sys.argv = ["cellmux-kernel"]
    app = _start_app()
    context = app.context
    if context is None:
        raise RuntimeError("ipykernel started without a zmq context")
    emission, backlog = install_ordering(app)
    IntrospectionThread(
        app.kernel,
        context,
        inproc_endpoint(INPROC_PORTS["introspection"]),
        lambda socket: emission.stamp(socket, after=backlog),
    ).start()
    server = context.socket(zmq.ROUTER)
    server.linger = 0
    server.rcvtimeo = REHEARSAL_WAIT_MS
    endpoint = "inproc://cellmux-rehearsal-link"
    server.bind(endpoint)
    link_id = os.urandom(16)
    Pump(context, endpoint, link_id, b"", os.getpid(), made_room=emission.made_room).start()
    failed: list[BaseException] = []

    def stand_in_server() -> None:
        # The server's side, the least of it: accept, one ping, the cells.
        try:
            server.recv_multipart()  # hello
            server.send_multipart([link_id, *link_control("accepted", credit=1 << 30)])
            server.recv_multipart()  # ready
            server.send_multipart([link_id, *link_control("ping", n=1)])
            server.recv_multipart()  # pong
            for code in REHEARSAL_CELLS:
                content = {"code": code, "silent": False, "store_history": True}
                content.update(user_expressions={}, allow_stdin=False, stop_on_error=True)
                parts = jupyter_parts("execute_request", content, now=datetime.now(UTC))
                tag = encode_tag(Channel.EXECUTE, JupyterSocket.SHELL)
                server.send_multipart([link_id, tag, *parts])
                replied = idle = False
                while not (replied and idle):
                    for msg_type in _message_types(server.recv_multipart()[1:]):
                        replied = replied or msg_type == "execute_reply"
                        idle = replied and msg_type == "status"
        except BaseException as e:
            failed.append(e)
        finally:
            app.io_loop.add_callback(app.io_loop.stop)

    threading.Thread(target=stand_in_server, name="cellmux-rehearsal", daemon=True).start()
    app.start()
    if failed:
        raise RuntimeError(f"the rehearsal's stand-in server failed: {failed[0]!r}")


def _message_types(parts: list[bytes]) -> list[str]:
    """The msg_type of each Jupyter message in a link message from the
    pump: one message, or a bundle of several."""
    from ..protocol import BUNDLE_TAG, split_bundle

    messages = split_bundle(parts[1]) if parts[0] == BUNDLE_TAG else [(0, 0, parts[1:])]
    return [json.loads(message[0]).get("msg_type", "") for _, _, message in messages]


def run_kernel(order: KernelOrder) -> None:
    """Become a kernel. Never returns: the process exits at the end."""
    err_fd = os.dup(2)  # where start-up failures are reported (nursery log)
    code = 0
    try:
        merging = _reset_process(order, err_fd)
        app = _start_app()
        if merging == "mappings":  # offered one by one: those made since too
            memory.offer_pages_for_merging(whole_process=False)
        if app.context is None:
            raise RuntimeError("ipykernel started without a zmq context")
        # One emission order across the kernel's sockets, kept by the pump.
        from .introspection import IntrospectionThread
        from .ordering import install as install_ordering

        emission, backlog = install_ordering(app)
        # complete, inspect, … answered while a cell runs; a reply waits for
        # its busy status to be sent.
        IntrospectionThread(
            app.kernel,
            app.context,
            inproc_endpoint(INPROC_PORTS["introspection"]),
            lambda socket: emission.stamp(socket, after=backlog),
        ).start()
        Pump(
            app.context,
            order.endpoint,
            order.link_id,
            order.secret,
            os.getpid(),
            made_room=emission.made_room,
        ).start()
        os.close(err_fd)
        err_fd = -1
        app.start()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    except BaseException:
        code = EXIT_START_FAILED
        if err_fd >= 0:
            os.write(err_fd, traceback.format_exc().encode(errors="replace"))
    os._exit(code)

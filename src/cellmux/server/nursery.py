"""The server's side of the nursery: spawn it, talk to it, watch it.

The nursery is a separate process (``python -I -m cellmux.kernel.nursery``,
run in ``/``); the server never forks its own reactor process. This adapter
turns the nursery's events (L{cellmux.protocol.nursery}) into calls on a
L{NurseryOwner}.

The nursery runs isolated (``-I``): neither the server's working directory
nor PYTHONPATH is on its import path, so nothing a local user planted there
is imported by it (as root) or exposed to kernels. A server run from a
source tree (cellmux not installed in the interpreter) passes the directory
holding the cellmux package, and the PYTHONPATH directories that no one but
root or the server's user can write to, explicitly (L{nursery_command}).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Protocol

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

import cellmux

from ..kernel.sandbox import trusted_dir
from ..protocol import nursery as wire
from ..protocol.errors import ProtocolError

__all__ = [
    "NurseryGone",
    "NurseryOwner",
    "NurseryProcess",
    "UntrustedSourceTree",
    "nursery_command",
    "nursery_settings",
]

#: Runs the nursery with extra import directories (given as arguments)
#: ahead of the interpreter's own; still isolated (``-I``).
_BOOTSTRAP = (
    f"import sys; sys.path[:0] = sys.argv[1:]; from {wire.NURSERY_MODULE} import main; main()"
)


class NurseryGone(Exception):
    """The nursery process is not running."""


class UntrustedSourceTree(Exception):
    """The server runs cellmux from a tree others may write to.

    The nursery (root's, when the server is root's) will not import from
    it; it would then run whatever other cellmux the interpreter has
    installed, a different version from the server's, silently.
    """


class NurseryOwner(Protocol):
    """Who hears about kernel processes (the kernel manager)."""

    def kernel_exited(self, link: str, pid: int, info: dict[str, Any]) -> None: ...

    def nursery_lost(self, reason: str) -> None: ...


class NurseryProcess(protocol.ProcessProtocol):
    """Talks to one nursery process over its stdin and stdout.

    Called from Twisted: connectionMade, outReceived, processEnded.
    Called by the server: L{spawn}, L{signal}, L{kill}, L{shutdown}.
    """

    log = Logger()

    def __init__(self, owner: NurseryOwner, config_line: bytes) -> None:
        self._owner = owner
        self._config_line = config_line
        self._lines = wire.LineBuffer()
        self._spawning: dict[str, defer.Deferred[int]] = {}
        self.ready: defer.Deferred[int] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._running = False
        self._stopping = False

    @classmethod
    def start(
        cls,
        reactor,
        owner: NurseryOwner,
        config: dict[str, Any],
        env: dict[str, str],
        python: str | None = None,
    ) -> NurseryProcess:
        """Start a nursery process (again, after one was lost) in C{/}.

        A new nursery removes every kernel directory it finds under its
        C{workdir_root} (what a lost nursery left): start one again only
        once the previous one has ended.

        @param env: its environment; PYTHONPATH in it is not used as such
            (see L{nursery_command}).
        @param python: the interpreter it runs on (None: the server's; see
            the kernel_python setting).
        """
        env = dict(env)
        argv = nursery_command(env.pop("PYTHONPATH", ""), python)
        proto = cls(owner, json.dumps(config).encode() + b"\n")
        reactor.spawnProcess(
            proto, argv[0], argv, env=env, path="/", childFDs={0: "w", 1: "r", 2: 2}
        )
        return proto

    @property
    def running(self) -> bool:
        return self._running and not self._stopping

    # -- called from Twisted ------------------------------------------------

    def connectionMade(self) -> None:
        self._running = True
        assert self.transport is not None  # connected
        self.transport.write(self._config_line)

    def outReceived(self, data: bytes) -> None:
        for line in self._lines.feed(data):
            self._event(line)
        if self._lines.dropped:
            self.log.error("nursery sent an overlong line; dropped it")
            self._lines.dropped = 0

    def processEnded(self, reason) -> None:
        self._running = False
        gone = NurseryGone(f"nursery ended: {reason.value}")
        for d in self._spawning.values():
            d.errback(gone)
        self._spawning.clear()
        if not self.ready.called:
            self.ready.errback(gone)
        if not self._stopping:
            self.log.error("the nursery ended unexpectedly: {reason}", reason=reason.value)
            self._owner.nursery_lost(str(reason.value))
        self.ended.callback(None)

    # -- events -----------------------------------------------------------

    def _event(self, line: bytes) -> None:
        try:
            event = wire.decode_event(line)
        except ProtocolError as e:
            self.log.error(
                "unreadable nursery event {line!r}: {why}", line=line[:200], why=e.message
            )
            return
        if isinstance(event, wire.Ready):
            if not self.ready.called:
                self.ready.callback(event.pid)
        elif isinstance(event, wire.Spawned):
            d = self._spawning.pop(event.link, None)
            if d is not None:
                d.callback(event.pid)
        elif isinstance(event, wire.Exited):
            self._owner.kernel_exited(event.link, event.pid, dict(event.info))
        elif isinstance(event, wire.Error):
            d = self._spawning.pop(event.link, None) if event.link else None
            if d is not None:
                d.errback(NurseryGone(event.message))
            else:
                self.log.warn("nursery: {message}", message=event.message)

    # -- commands ---------------------------------------------------------

    def _send(self, command: wire.Command) -> None:
        if not self._running:
            raise NurseryGone("the nursery is not running")
        assert self.transport is not None  # running
        self.transport.write(wire.encode(command))

    def spawn(
        self,
        link: str,
        secret: str,
        endpoint: str,
        cwd: str | None = None,
        kernel: dict[str, Any] | None = None,
    ) -> defer.Deferred[int]:
        """Fork a kernel that connects to C{endpoint}, its own link endpoint,
        and starts in C{cwd} (None: its private directory); fires with its
        pid once forked (not yet ready). C{kernel}: a kernelspec to start
        through the adaptor (L{cellmux.kernel.adaptor.Launch}), None for
        a forked Python kernel."""
        d: defer.Deferred[int] = defer.Deferred()
        try:
            self._send(wire.Spawn(link, secret, endpoint, cwd, kernel))
        except NurseryGone as e:
            return defer.fail(e)
        self._spawning[link] = d
        return d

    def signal(self, link: str, name: str) -> None:
        self._send(wire.Signal(link, name))

    def kill(self, link: str) -> None:
        if self._running:
            self._send(wire.Kill(link))

    def shutdown(self) -> defer.Deferred[None]:
        """Ask the nursery to end every kernel and exit."""
        self._stopping = True
        if self._running:
            try:
                self._send(wire.Shutdown())
                assert self.transport is not None  # running
                self.transport.closeStdin()
            except (NurseryGone, error.ProcessExitedAlready):
                pass
        return self.ended


def _default_import_path() -> list[str]:
    """Where ``python -I`` looks for modules: the interpreter's own directories."""
    import site

    found = list(site.getsitepackages())
    stdlib = os.path.dirname(os.__file__)
    return [stdlib, *found]


def nursery_command(pythonpath: str = "", python: str | None = None) -> list[str]:
    """The nursery's argv: ``python -I -m cellmux.kernel.nursery``, plus the
    directories it must import from when cellmux is not installed in this
    interpreter (a source tree on PYTHONPATH).

    Only directories that root or the server's user alone can change are
    passed (L{trusted_dir}); others are left out with a warning in the log,
    and so is anything relative (such as the server's working directory).
    The server's own source tree is the exception: left out, the nursery
    would run another cellmux, so L{UntrustedSourceTree} is raised instead.

    On another interpreter (C{python}, the kernel_python setting) only
    C{pythonpath} is added: the server's own tree stays out of it.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(cellmux.__file__)))
    extra = []
    installed = python is not None or any(
        os.path.realpath(package_root) == os.path.realpath(p) for p in _default_import_path()
    )
    candidates = ([] if installed else [package_root]) + pythonpath.split(os.pathsep)
    for path in candidates:
        if not path or path in extra or not os.path.isdir(path):
            continue
        if trusted_dir(path):
            extra.append(path)
        elif path == package_root:
            raise UntrustedSourceTree(
                f"cellmux is imported from {path}, which others may write to: the"
                " nursery will not import from it (nor run another cellmux than"
                " the server's). Make it writable by its owner only"
                " (chmod -R go-w), or install cellmux"
            )
        else:
            NurseryProcess.log.warn(
                "not importing from {path} in the nursery: others may write to it", path=path
            )
    python = python or sys.executable
    if not extra:
        return [python, "-I", "-m", wire.NURSERY_MODULE]
    return [python, "-I", "-c", _BOOTSTRAP, *extra]


def nursery_settings(config: Any, runtime_dir: str, kernel_paths: list[str]) -> dict[str, Any]:
    """The nursery's configuration line for a server (or a kernel host)
    whose runtime directory is C{runtime_dir}; C{config} a ServerConfig.

    Kernel link endpoints are made in ``RUNTIME_DIR/links``, working
    directories in ``RUNTIME_DIR/kernels``.
    """
    return {
        # Each spawn names its kernel's own endpoint; this one is never
        # bound: its directory, the runtime directory, is what kernels
        # must reach (bound back whole into a private /tmp).
        "endpoint": "ipc://" + os.path.join(runtime_dir, "links"),
        "workdir_root": os.path.join(runtime_dir, "kernels"),
        "preload": list(config.preload),
        "kernel_env": config.kernel_environment(),
        "kill_grace": config.kill_grace,
        "sandbox": config.sandbox_settings(),
        "kernel_paths": kernel_paths,
        "merge_pages": config.kernel_page_merging,
    }

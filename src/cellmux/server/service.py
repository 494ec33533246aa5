"""The cellmux server as one Twisted service.

Starting it creates the private runtime directory, binds the kernel-link
ROUTER, starts the nursery, fills the warm pool, and listens for HTTP and
websocket clients on one twisted.web Site. Stopping it ends every kernel.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

from autobahn.twisted.resource import WebSocketResource
from twisted.application import service
from twisted.internet import defer, endpoints, task, threads
from twisted.logger import Logger
from twisted.web import resource, server

import cellmux
from cellmux.config import ConfigError, ServerConfig, load_config_file, named_tokens

from . import heap
from .api import ApiResource
from .auth import NamedToken, TokenAuth, redact_tokens
from .creation import KernelCreator, forget_ended_kernels
from .files import FileNotices, FilesResource
from .jupyter.channels import JupyterChannelsFactory
from .jupyter.kernelspecs import KernelspecFiles
from .kernelpython import KernelPythonError, check_kernel_python, kernel_library
from .kernels import KernelManager, credit_window
from .limits import DescriptorGuard, GuardedFactory, raise_open_files_limit
from .links import LinkRouter
from .login import LoginResource
from .longpoll import PollResource
from .metrics import MetricsResource, ServerCollector
from .nursery import NurseryProcess, UntrustedSourceTree, nursery_settings
from .oneshot import OneShotResource
from .orphans import (
    RECORD_DELAY,
    RecordKeeper,
    ServerRecord,
    default_state_dir,
    end_leftovers_of,
    finish_removals,
    reap_orphans,
)
from .pages import EmbedKernels, FaviconResource, PageResource, StaticResource, load_assets
from .permalinks import PermalinkResource
from .priority import raise_priority
from .proxy import TrustedProxies, client_address, forwarding_request_factory
from .refusals import Line, RefusalLog
from .runtimedir import make_private_runtime_dir, prepare_runtime_dir, remove_owned
from .stalls import IterationClock, ReactorStalls
from .store import DEFAULT_DATABASE, StoreError, adopt_old_default_database, open_store
from .tls import TLSFactory, certificate_options, hsts_header
from .webjson import bounded_request_factory
from .websocket import ClientFactory

#: Seconds between tries to load stored credentials while the database fails.
CREDENTIALS_RETRY = 5.0
#: Longest the server waits at start for the stored credentials before it
#: listens anyway (a database that is down must not keep it from serving).
CREDENTIALS_FIRST_WAIT = 5.0

__all__ = ["CellmuxService", "build_site"]


class _JSONResource(resource.Resource):
    isLeaf = True

    def __init__(self, status: int, body: dict) -> None:
        super().__init__()
        self._status = status
        self._body = json.dumps(body).encode()

    def render(self, request: server.Request) -> bytes:
        request.setResponseCode(self._status)
        request.setHeader(b"content-type", b"application/json")
        return self._body


class _Root(resource.Resource):
    """``/`` describes the server; unknown paths get a JSON 404."""

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        if path == b"":
            return _JSONResource(200, {"name": "cellmux", "version": cellmux.__version__})
        return _JSONResource(404, {"message": "not found", "reason": "Not Found"})


def redacted_log_formatter(timestamp: str, request: server.Request) -> str:
    """An access-log line in combined format, with any token blanked out."""
    # The query parser that finds tokens finds what to blank (auth.py).
    uri = redact_tokens(request.uri)
    referer = redact_tokens(request.getHeader(b"referer") or b"-")
    fields = [
        client_address(request) or "-",
        timestamp,
        f"{request.method.decode(errors='replace')} {uri.decode(errors='replace')} "
        f"{request.clientproto.decode(errors='replace')}",
        request.code,
        request.sentLength or "-",
        referer.decode(errors="replace"),
        (request.getHeader(b"user-agent") or b"-").decode(errors="replace"),
    ]
    return '"{}" - - {} "{}" {} {} "{}" "{}"'.format(*fields)


def build_site(
    manager: KernelManager,
    auth: TokenAuth,
    store=None,
    refusal_logs: Callable[[], dict[str, RefusalLog | None]] = dict,
    reactor_busy: IterationClock | None = None,
) -> server.Site:
    config = manager.config
    root = _Root()
    collector = ServerCollector(manager, refusal_logs, reactor_busy=reactor_busy)
    root.putChild(b"metrics", MetricsResource(collector, auth, config.metrics_token))
    jupyter_channels = WebSocketResource(JupyterChannelsFactory(manager, auth))
    # One creator: a named token's quota counts its kernels from every door.
    creator = KernelCreator(manager, auth)
    root.putChild(b"api", ApiResource(manager, auth, channels=jupyter_channels, creator=creator))
    root.putChild(b"kernelspecs", KernelspecFiles(auth, manager.specs))
    root.putChild(b"login", LoginResource(auth))
    root.putChild(b"ws", WebSocketResource(ClientFactory(manager, auth, create=creator.create)))
    # Permalinks, kernel files and one-shot runs (docs/storage.md).
    notices = FileNotices(manager)
    manager.idle_listeners.append(notices)
    root.putChild(b"permalink", PermalinkResource(store, auth, manager.clock))
    root.putChild(b"files", FilesResource(manager, auth, notices))
    root.putChild(b"service", OneShotResource(manager, auth, manager.clock))
    # The browser console and its bundle; long polling for blocked websockets.
    assets = load_assets()
    root.putChild(b"", PageResource(assets))
    root.putChild(b"static", StaticResource(assets))
    root.putChild(b"favicon.ico", FaviconResource(assets))
    root.putChild(b"poll", PollResource(manager, auth, create=creator.create))
    root.putChild(b"embed", EmbedKernels(manager, auth, creator))
    # Forwarding headers are applied (or ignored) before any resource runs.
    request_factory = forwarding_request_factory(
        bounded_request_factory(config.max_upload_size),
        TrustedProxies.from_strings(config.trusted_proxies),
        hsts_header(config.hsts_max_age),
    )
    site = server.Site(
        root,
        logFormatter=redacted_log_formatter,
        requestFactory=request_factory,
        parsePOSTFormSubmission=False,
    )
    site.displayTracebacks = False
    return site


def private_ipython_dir(runtime_dir: str) -> str | None:
    """Where IPython keeps its files in this process (C{IPYTHONDIR}), if the
    default will not do; None to leave it be.

    IPython (imported to read the installed kernelspecs) uses
    C{~/.ipython}; if that cannot be made or written (a service user whose
    HOME is not its own) it makes a C{tempfile.mkdtemp()} directory each
    time it looks, and never removes it. Then it gets one in the runtime
    directory, removed with it. A C{IPYTHONDIR} the user set is kept, and
    so is a usable C{~/.ipython} (kernelspecs may be installed in it).
    Kernels never see this: their environment is scrubbed, and their HOME
    is their own directory.
    """
    if os.environ.get("IPYTHONDIR"):
        return None
    default = os.path.join(os.path.expanduser("~"), ".ipython")
    if os.path.isdir(default):
        if os.access(default, os.W_OK):
            return None
    elif os.access(os.path.dirname(default), os.W_OK):
        return None
    return os.path.join(runtime_dir, "ipython")


class CellmuxService(service.Service):
    """The whole server. Its public URL is printed once it listens."""

    log = Logger()

    def __init__(
        self, config: ServerConfig, token: str, reactor=None, config_path: str | None = None
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.config = config
        self.auth = TokenAuth(
            token,
            [NamedToken(t.name, t.digest, t.max_kernels) for t in named_tokens(config.tokens)],
            clock=reactor,
            login_lifetime=config.login_lifetime,
        )
        self._credentials_retry = None
        # With a front_id: re-read the stored credentials (docs/scaling.md).
        self._credentials_refresh: task.LoopingCall | None = None
        self._refresh_failing = False
        # The config file, whose [tokens] a front re-reads with the credentials.
        self._config_path = config_path
        self._tokens_failing = False
        self._forget_ended = None
        self._token = token
        self.manager = KernelManager(reactor, config)
        #: The reactor's busy times between polls (/metrics; CELLMUX_STALL_LOG).
        self.stalls = ReactorStalls.from_environment(reactor)
        self.store = None
        self._runtime_dir: str | None = None
        self._owns_runtime_dir = False
        self._listening = None
        self._router = None
        #: Kernel hosts' router and its ZAP handler (None: no hosts_listen).
        self._hosts = None
        self._zap = None
        self._zmq = None
        self._guard: DescriptorGuard | None = None
        self._refusals: RefusalLog | None = None
        self.nursery: NurseryProcess | None = None
        self._record: RecordKeeper | None = None
        #: Set when start-up failed (the command line then exits non-zero).
        self.start_failed = False
        self.url: str | None = None

    def startService(self) -> None:
        super().startService()
        d = defer.ensureDeferred(self._start())
        d.addErrback(self._start_failed)

    def _start_failed(self, failure) -> None:
        if failure.check(KernelPythonError, UntrustedSourceTree):  # to fix, not a bug
            self.log.error("cellmux could not start: {error}", error=failure.value)
        else:
            self.log.failure("cellmux could not start", failure)
        self.start_failed = True
        # twistd starts services before its reactor runs: a failure that
        # comes at once must wait for it, or stop() raises and twistd hangs.
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    async def _start(self) -> None:
        from txzmq import ZmqFactory

        config = self.config
        self._guard_descriptors()
        priority = raise_priority(config.server_nice)
        self.log.info("server priority: {reason}", reason=priority.reason)
        # Before anything else: end what a crashed predecessor left running
        # (in a thread: it reads /proc and may remove large trees).
        state_dir = config.state_dir or default_state_dir()
        sweep = await threads.deferToThread(
            reap_orphans, state_dir, uid_range=config.kernel_uid_range, remove_files=False
        )
        self.manager.lost = set(sweep.lost)
        if sweep.pending:
            # Their files go while this server starts and serves: a deep tree
            # costs seconds of rmdir on a slow disk.
            removing = threads.deferToThread(finish_removals, sweep.pending)
            removing.addErrback(lambda f: self.log.failure("removing leftovers failed", f))
        if config.runtime_dir:
            prepare_runtime_dir(config.runtime_dir, sweep.busy_runtime_dirs)
            self._runtime_dir = config.runtime_dir
        else:
            self._runtime_dir = make_private_runtime_dir()
            self._owns_runtime_dir = True
        ipython_dir = private_ipython_dir(self._runtime_dir)
        if ipython_dir is not None:
            os.environ["IPYTHONDIR"] = ipython_dir
        record = ServerRecord(state_dir, self._runtime_dir, owns_runtime_dir=self._owns_runtime_dir)
        # Recorded before anything is made in it, so a crash from here on
        # leaves nothing the next start does not know of.
        try:
            await threads.deferToThread(record.write, {}, {})
        except OSError as e:  # a full state disk: serve anyway, keep trying
            self.log.warn("cannot write the server record: {error}", error=e)
        # One endpoint per kernel process in here (see LinkRouter); no
        # socket is shared by kernels.
        links_dir = os.path.join(self._runtime_dir, "links")
        self._zmq = ZmqFactory()
        self._router = LinkRouter(
            self._zmq,
            links_dir,
            self.manager,
            config.max_frame_size,
            credit=credit_window(config.replay_bytes),
            guard=self._guard,
        )
        if os.geteuid() == 0:
            # Kernels run under their own uids: they may pass through the
            # runtime directory and links/ (not list them) to their own
            # endpoint's directory, which only their gid may enter.
            os.chmod(self._runtime_dir, 0o711)
            os.chmod(links_dir, 0o711)
        else:
            self.log.warn(
                "cellmux is not running as root: kernels run as its own user, "
                "with rlimits only; they are NOT isolated from each other or "
                "from the server, and can reach the network (docs/security.md)"
            )
        nursery_env = config.kernel_environment()
        if config.kernel_python:
            # Another environment: only cellmux's kernel side comes along.
            nursery_env["PYTHONPATH"] = kernel_library(self._runtime_dir)
            await check_kernel_python(config.kernel_python, nursery_env)
        elif "PYTHONPATH" in os.environ:  # so the nursery finds cellmux in a dev tree
            nursery_env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        nursery_config = nursery_settings(
            config,
            self._runtime_dir,
            # Where the installed kernelspecs' programs live, to be reachable
            # inside the sandbox (a 0700 home, a private /tmp).
            self.manager.specs.paths(nursery_env.get("PATH")),
        )

        def start_nursery() -> NurseryProcess:
            # Also how the manager replaces a nursery that was lost.
            nursery = NurseryProcess.start(
                self.reactor, self.manager, nursery_config, nursery_env, python=config.kernel_python
            )
            self.nursery = nursery
            record.nursery_pid = nursery.transport.pid
            nursery.ended.addCallback(self._nursery_ended, record)
            if self._record is not None:
                self._record.changed()
            return nursery

        start_nursery()
        self.manager.bind(self.nursery, self._router, start_nursery)
        if config.hosts_listen:
            self._listen_for_hosts()
        self.manager.workdir_root = os.path.join(self._runtime_dir, "kernels")
        self._record = RecordKeeper(
            self.reactor,
            record,
            self._kernel_pids,
            RECORD_DELAY,
            self.manager.processes,
            new_processes=lambda: self.manager.processes_changed,
        )
        self.manager.change_listeners.append(self._record.changed)
        self._record.changed()
        await self.nursery.ready
        self.manager.start()
        # Read again (not only when the options were parsed): a renewed
        # certificate is picked up by a restart.
        tls = certificate_options(config.tls_cert, config.tls_key) if config.tls else None
        listen = endpoints.serverFromString(
            self.reactor, f"tcp:{config.port}:interface={config.host.replace(':', chr(92) + ':')}"
        )
        # Opening does no database I/O: a database that is down costs 503s, not the server.
        database = config.database
        if not database and config.runtime_dir:  # older versions kept it there
            database = await threads.deferToThread(
                adopt_old_default_database,
                os.path.join(config.runtime_dir, DEFAULT_DATABASE),
                os.path.join(state_dir, DEFAULT_DATABASE),
            )
        self.store = open_store(self.reactor, database, state_dir, config.database_timeout)
        if self.auth.attach_store(self.store):
            # Awaited for a moment only: a database that is down or slow must
            # not keep the server from serving (requests with stored
            # credentials get 503 until it answers), but a healthy one is
            # read before the first request, which then never sees that 503.
            first = self._load_credentials()
            timer = task.deferLater(self.reactor, CREDENTIALS_FIRST_WAIT, lambda: None)
            await defer.DeferredList([first, timer], fireOnOneCallback=True, consumeErrors=True)
            if not timer.called:
                timer.cancel()
        else:
            self.log.warn(
                "the permalink store keeps no credentials: share links, logins and "
                "capabilities last until the server stops"
            )
        if config.front_id is not None:
            self._start_credentials_refresh()
        self.stalls.install()
        site = build_site(
            self.manager, self.auth, self.store, self._refusal_logs, self.stalls.clock
        )
        self._forget_ended = forget_ended_kernels(self.manager, self.auth)
        factory = GuardedFactory(site, self._guard, self.reactor, self._refused_connection)
        if tls is not None:
            factory = TLSFactory(tls, False, factory)
        self._listening = await listen.listen(factory)
        heap.settle()  # start-up is over: its objects leave the collector's passes
        port = self._listening.getHost().port
        host = f"[{config.host}]" if ":" in config.host else config.host
        base = f"{'https' if tls is not None else 'http'}://{host}:{port}/"
        self.url = base
        self.log.info(
            "cellmux {version} is serving at {url}", version=cellmux.__version__, url=base
        )
        # The token goes to the terminal, never into the log (under twistd,
        # sys.stdout is the log, so use the process's real stdout).
        print(f"cellmux is serving at {base}?token={self._token}", file=sys.__stdout__, flush=True)

    def _listen_for_hosts(self) -> None:
        """Kernel hosts' TCP ROUTER, CURVE with keys from the authorised
        directory (docs/scaling.md)."""
        import zmq.auth

        from .hosts import HostRouter
        from .zap import AuthorisedKeys, ZapHandler

        config = self.config
        assert config.hosts_secret_key and config.hosts_authorized_dir  # config checks
        try:
            _public, secret = zmq.auth.load_certificate(config.hosts_secret_key)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read hosts_secret_key: {e}") from None
        if not secret:
            raise ConfigError(
                f"hosts_secret_key {config.hosts_secret_key} holds no secret key "
                "(give the NAME.key_secret file)"
            )
        # The ZAP handler first: the ROUTER refuses every host until it answers.
        self._zap = ZapHandler(self._zmq, AuthorisedKeys(config.hosts_authorized_dir))
        self._hosts = HostRouter(
            self._zmq,
            config.hosts_listen,
            secret,
            self.manager,
            self.manager,
            config.max_frame_size,
            config.host_timeout,
            credit=credit_window(config.replay_bytes),
        )
        self.manager.hosts = self._hosts
        self.log.info("kernel hosts may connect at {endpoint}", endpoint=self._hosts.endpoint)

    def _load_credentials(self) -> defer.Deferred:
        """Load stored shares, logins and capabilities; retry every
        L{CREDENTIALS_RETRY} seconds while the database fails. Fires (never
        fails) when this attempt is over."""
        self._credentials_retry = None

        def loaded(count: int) -> None:
            self.log.info("loaded {count} stored credential(s)", count=count)

        def failed(failure) -> None:
            failure.trap(StoreError)
            self.log.warn(
                "cannot load stored credentials ({error}); retrying in {s:g} s",
                error=failure.value,
                s=CREDENTIALS_RETRY,
            )
            if self.running:
                self._credentials_retry = self.reactor.callLater(
                    CREDENTIALS_RETRY, self._load_credentials
                )

        d = defer.ensureDeferred(self.auth.load())
        d.addCallbacks(loaded, failed)
        d.addErrback(lambda f: self.log.failure("loading stored credentials failed", f))
        return d

    def _start_credentials_refresh(self) -> None:
        """Re-read the shared credentials every C{credential_refresh} seconds:
        other fronts make and revoke them in the same database."""
        loop = task.LoopingCall(lambda: defer.ensureDeferred(self._refresh_credentials()))
        loop.clock = self.reactor
        self._credentials_refresh = loop
        done = loop.start(self.config.credential_refresh, now=False)
        done.addErrback(lambda f: self.log.failure("re-reading credentials stopped", f))

    async def _refresh_credentials(self) -> None:
        if self._config_path is not None:
            await self._reload_named_tokens(self._config_path)
        if not self.auth.keeps_credentials or not self.auth.loaded:
            return  # no store, or the first load (and its retries) is under way
        try:
            await self.auth.refresh()
        except StoreError as e:
            # Keep what memory has; say so once, not every few seconds.
            if not self._refresh_failing:
                self.log.warn(
                    "cannot re-read stored credentials ({error}); keeping those in memory, "
                    "retrying every {s:g} s",
                    error=e,
                    s=self.config.credential_refresh,
                )
            self._refresh_failing = True
            return
        if self._refresh_failing:
            self.log.info("re-reading stored credentials works again")
        self._refresh_failing = False

    async def _reload_named_tokens(self, path: str) -> None:
        """Take the config file's [tokens] again: a named token added,
        removed or changed there works (or stops) without a restart."""
        try:
            settings = await threads.deferToThread(load_config_file, path)
            users = named_tokens(settings.get("tokens", {}))
        except ConfigError as e:
            if not self._tokens_failing:
                self.log.warn(
                    "cannot re-read named tokens ({error}); keeping those in memory",
                    error=e,
                )
            self._tokens_failing = True
            return
        if self._tokens_failing:
            self.log.info("re-reading named tokens works again")
        self._tokens_failing = False
        if self.auth.replace_users(NamedToken(t.name, t.digest, t.max_kernels) for t in users):
            self.log.info(
                "named tokens re-read from {path}: {names}",
                path=path,
                names=", ".join(t.name for t in users) or "none",
            )

    def _guard_descriptors(self) -> None:
        """Raise the open files limit; refuse work before it runs out (limits.py)."""
        before, limit = raise_open_files_limit()
        self._guard = DescriptorGuard(limit, self._kernels_allowed)
        self._refusals = RefusalLog(self.reactor, self._log_refusals)
        if limit != before:
            self.log.info(
                "open files limit raised from {before} to {limit}", before=before, limit=limit
            )
        if self._guard.too_low_for(self.config.max_kernels):
            self.log.warn(
                "the open files limit ({limit}) is low for max_kernels = {kernels}: clients "
                "will be refused early; raise the hard limit (ulimit -Hn, LimitNOFILE=)",
                limit=limit,
                kernels=self.config.max_kernels,
            )

    def _refusal_logs(self) -> dict[str, RefusalLog | None]:
        router = self._router
        return {"http": self._refusals, "links": router.refusals if router is not None else None}

    def _kernels_allowed(self) -> int:
        started = self._router.link_count if self._router is not None else 0
        return self.config.max_kernels - started

    def _refused_connection(self, reason: str) -> None:
        self._refusals.note("HTTP connections", reason)

    def _log_refusals(self, line: Line) -> None:
        if line.count == 1:
            self.log.warn("{source}: refused ({detail})", source=line.source, detail=line.detail)
        else:
            self.log.warn(
                "{source}: refused {count} more in {seconds:.0f} s (last: {detail})",
                source=line.source,
                count=line.count,
                seconds=self.reactor.seconds() - line.since,
                detail=line.detail,
            )

    def _nursery_ended(self, _: object, record: ServerRecord) -> None:
        """A nursery that died took its kernels along, not what they started."""
        if not self.running:
            return  # a stop: the nursery cleaned up after its kernels
        assert self._runtime_dir is not None
        end_leftovers_of(record, self._runtime_dir, self.config.kernel_uid_range)

    def _kernel_pids(self) -> dict[str, int]:
        return {
            k.id: k.incarnation.pid
            for k in self.manager.kernels.values()
            if k.incarnation is not None and k.incarnation.pid and k.incarnation.host is None
        }

    async def _stop(self) -> None:
        if self._forget_ended in self.manager.change_listeners:
            # Stopping ends every kernel: their shares outlive the server.
            self.manager.change_listeners.remove(self._forget_ended)
        if self._credentials_retry is not None and self._credentials_retry.active():
            self._credentials_retry.cancel()
        if self._credentials_refresh is not None and self._credentials_refresh.running:
            self._credentials_refresh.stop()
        if self._listening is not None:
            await self._listening.stopListening()
        self.manager.stop()
        if self.store is not None:
            await self.store.close()
        nursery_stopped = True
        if self.nursery is not None:
            ended = self.nursery.shutdown()
            timeout = self.reactor.callLater(self.config.kill_grace + 5, ended.cancel)
            try:
                await ended
            except defer.CancelledError:
                self.log.error("the nursery did not stop in time")
                # Its kernels die with this process; the next start removes
                # what they leave (the record stays for it).
                nursery_stopped = False
            finally:
                if timeout.active():
                    timeout.cancel()
        if self._hosts is not None:
            self._hosts.shutdown()
        if self._zap is not None:
            self._zap.shutdown()
        if self._router is not None:
            self._router.shutdown()
        if self._refusals is not None:
            self._refusals.stop()
        removed = nursery_stopped
        if removed and self._owns_runtime_dir and self._runtime_dir:
            removed = bool(await threads.deferToThread(remove_owned, self._runtime_dir))
        if self._record is not None:
            # A directory that could not be removed stays recorded: the next
            # start's sweep removes it.
            await self._record.close(remove=removed)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self.stalls.uninstall()
        return defer.ensureDeferred(self._stop())

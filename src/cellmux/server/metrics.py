# -*- test-case-name: tests.test_metrics -*-
"""``/metrics``: the server's state in Prometheus' text format.

A private C{CollectorRegistry} holds one collector that reads the live
state at scrape time: the kernels and their clients, the warm pool, the
running totals the relay path keeps as plain integers
(L{cellmux.server.counters}), the refusal logs. Nothing is done for metrics
between scrapes beyond those integer increments. Memory per kernel (PSS of
the kernel's session, as the nursery's memory watch reads it) comes from
/proc, read in a thread so that a scrape never stalls the reactor.

Access: the server token (header, ``?token=`` or login cookie), or
``metrics_token`` (for a Prometheus that must not hold the owner's token).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web import resource, server

import cellmux

from .auth import TokenAuth, query_tokens
from .counters import Latencies
from .kernels import KernelManager, KernelState
from .stalls import IterationClock
from .webjson import error_body

__all__ = ["LIMIT_KINDS", "MetricsResource", "ServerCollector", "kernel_memory"]

#: Prometheus' classic text format, which every Prometheus version reads
#: (the names here are plain, so the newer 1.0.0 text would be the same bytes).
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: The limits counted in ``cellmux_limits_hit``: the sandbox's, which end a
#: kernel, and the server's, which refuse one.
LIMIT_KINDS = ("cpu", "memory", "disk", "file_size", "max_kernels", "open_files")


def kernel_memory(pids: dict[str, int]) -> dict[str, int]:
    """Bytes of memory (PSS) per kernel id, for the given kernel pids.

    Runs in a thread: it walks /proc. A kernel leads its own session, so
    the figure includes every process it started.
    """
    from cellmux.kernel.sandbox import session_memory

    by_session = session_memory(set(pids.values()))
    return {kernel: by_session[pid] for kernel, pid in pids.items() if pid in by_session}


def _histogram(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def _add(family: HistogramMetricFamily, values: list[str], latencies: Latencies) -> None:
    family.add_metric(values, latencies.cumulative(), sum_value=latencies.total)


def _kind(name: str) -> str:
    return name.lower().replace(" ", "_")


class ServerCollector:
    """Yields the server's metrics from its live state (one reactor-thread read).

    @param refusal_logs: the L{RefusalLog}s whose totals to report, by where
        they count (``"http"``, ``"links"``); a callable, as the router is
        made after the site.
    """

    def __init__(
        self,
        manager: KernelManager,
        refusal_logs: Callable[[], dict[str, Any]] = dict,
        started: float | None = None,
        reactor_busy: IterationClock | None = None,
    ) -> None:
        self.manager = manager
        #: The reactor's busy time per iteration (None: not measured).
        self.reactor_busy = reactor_busy
        self.refusal_logs = refusal_logs
        self.started = time.time() if started is None else started
        #: Memory per kernel id from the last /proc read (set before each scrape).
        self.memory: dict[str, int] = {}

    def describe(self) -> list[Metric]:
        return []  # names are fixed; nothing to check them against

    def collect(self) -> Iterator[Metric]:
        manager = self.manager
        config = manager.config
        counters = manager.counters
        kernels = list(manager.kernels.values())

        info = GaugeMetricFamily(
            "cellmux_build_info", "The cellmux version serving.", labels=["version"]
        )
        info.add_metric([cellmux.__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "cellmux_start_time_seconds", "When the server started (Unix time).", self.started
        )
        yield GaugeMetricFamily(
            "cellmux_healthy",
            "1 while the server can start kernels, 0 while degraded (no nursery).",
            0 if manager.degraded else 1,
        )

        by_state = GaugeMetricFamily(
            "cellmux_kernels", "Kernels clients can see, by state.", labels=["state"]
        )
        states = dict.fromkeys((s.value for s in KernelState), 0)
        for kernel in kernels:
            states[kernel.state.value] = states.get(kernel.state.value, 0) + 1
        for state, n in states.items():
            by_state.add_metric([state], n)
        yield by_state

        yield GaugeMetricFamily(
            "cellmux_pool_ready", "Kernel processes ready in the warm pool.", manager.pooled
        )
        yield GaugeMetricFamily(
            "cellmux_pool_target",
            "Kernel processes the warm pool aims for now (pool_size, more while creates "
            "come fast, up to pool_max).",
            manager.demand.wanted(manager.clock.seconds()),
        )
        yield GaugeMetricFamily("cellmux_pool_size", "The configured pool_size.", config.pool_size)
        yield GaugeMetricFamily("cellmux_pool_max", "The configured pool_max.", config.pool_max)
        yield GaugeMetricFamily(
            "cellmux_kernel_processes",
            "Kernel processes alive or starting, pooled ones included.",
            len(manager.processes()),
        )
        yield GaugeMetricFamily(
            "cellmux_max_kernels", "Most kernel processes allowed at once.", config.max_kernels
        )

        starts = CounterMetricFamily(
            "cellmux_kernel_process_starts",
            "Kernel processes forked, by whether they became ready.",
            labels=["outcome"],
        )
        starts.add_metric(["ready"], counters.process_starts)
        starts.add_metric(["failed"], counters.process_start_failures)
        yield starts
        fork = _histogram(
            "cellmux_kernel_process_start_seconds", "Time from fork to a ready kernel.", []
        )
        _add(fork, [], counters.process_start_seconds)
        yield fork
        created = CounterMetricFamily(
            "cellmux_kernels_created",
            "Kernels handed to clients, by source (warm pool, forked on demand, or another "
            "kernelspec started cold).",
            labels=["source"],
        )
        create_time = _histogram(
            "cellmux_kernel_create_seconds",
            "Time the server took to create a kernel for a client, by source.",
            ["source"],
        )
        for source in ("pool", "forked", "cold"):
            created.add_metric([source], counters.kernels_created[source])
            latencies = counters.create_seconds.get(source) or Latencies()
            _add(create_time, [source], latencies)
        yield created
        yield create_time

        frames = CounterMetricFamily(
            "cellmux_frames_relayed",
            "Messages relayed over kernel links, by direction.",
            labels=["direction"],
        )
        frames.add_metric(["from_kernels"], counters.frames_from_kernels)
        frames.add_metric(["to_kernels"], counters.frames_to_kernels)
        yield frames
        relayed = CounterMetricFamily(
            "cellmux_bytes_relayed",
            "Payload bytes relayed over kernel links, by direction.",
            labels=["direction"],
        )
        relayed.add_metric(["from_kernels"], counters.bytes_from_kernels)
        relayed.add_metric(["to_kernels"], counters.bytes_to_kernels)
        yield relayed
        yield CounterMetricFamily(
            "cellmux_replay_gaps",
            "Gap notices: a client asked for frames the replay log had dropped.",
            counters.gaps,
        )
        yield CounterMetricFamily(
            "cellmux_replay_missed_frames",
            "Frames the gap notices reported lost.",
            counters.missed_frames,
        )

        clients = GaugeMetricFamily(
            "cellmux_clients", "Clients attached to kernels, by role.", labels=["role"]
        )
        roles = {"owner": 0, "collaborator": 0, "observer": 0}
        for kernel in kernels:
            for client in kernel.clients:
                grant = getattr(client, "grant", None)
                role = grant.role.value if grant is not None else "unknown"
                roles[role] = roles.get(role, 0) + 1
        for role, n in roles.items():
            clients.add_metric([role], n)
        yield clients

        memory = GaugeMetricFamily(
            "cellmux_kernel_memory_bytes",
            "Proportional memory (PSS) of each kernel's processes.",
            labels=["kernel"],
        )
        for kernel_id, size in sorted(self.memory.items()):
            if kernel_id in manager.kernels:
                memory.add_metric([kernel_id], size)
        yield memory

        limits = CounterMetricFamily(
            "cellmux_limits_hit",
            "Limits that ended a kernel (cpu, memory, disk, file_size) or refused "
            "one (max_kernels, open_files).",
            labels=["limit"],
        )
        for kind in LIMIT_KINDS:  # every kind, 0 until hit: rates need a start
            limits.add_metric([kind], counters.limits_hit[kind])
        for kind, n in sorted(counters.limits_hit.items()):
            if kind not in LIMIT_KINDS:
                limits.add_metric([kind], n)
        yield limits

        refusals = CounterMetricFamily(
            "cellmux_refusals",
            "Refused traffic: HTTP connections and kernel starts while descriptors "
            "were short, junk on kernel links.",
            labels=["what"],
        )
        for log in self.refusal_logs().values():
            if log is None:
                continue
            for kind, n in sorted(log.totals.items()):
                refusals.add_metric([_kind(kind)], n)
        yield refusals

        if self.reactor_busy is not None:
            busy = HistogramMetricFamily(
                "cellmux_reactor_busy_seconds",
                "Time the reactor thread ran between two polls: every client and kernel "
                "waits that long when it arrives at the wrong moment.",
            )
            _add(busy, [], self.reactor_busy.busy)
            yield busy


class MetricsResource(resource.Resource):
    """``GET /metrics`` for the owner's token or C{metrics_token}."""

    isLeaf = True
    log = Logger()

    def __init__(
        self, collector: ServerCollector, auth: TokenAuth, metrics_token: str | None
    ) -> None:
        super().__init__()
        self._collector = collector
        self._auth = auth
        self._token = metrics_token.encode() if metrics_token else None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)

    def _allowed(self, request: server.Request) -> bool:
        if self._auth.check_web_request(request):
            return True
        if self._token is None:
            return False
        candidates = list(query_tokens(request.uri))
        scheme, _, value = (request.getHeader(b"authorization") or b"").strip().partition(b" ")
        if scheme.lower() in (b"token", b"bearer"):
            candidates.append(value.strip())
        return any(hmac.compare_digest(c, self._token) for c in candidates)

    def render_GET(self, request: server.Request) -> bytes | int:
        request.setHeader(b"cache-control", b"no-store")
        if not self._allowed(request):
            request.setResponseCode(HTTPStatus.FORBIDDEN)
            request.setHeader(b"content-type", b"application/json")
            message = "a valid token (the server's or metrics_token) is required"
            return json.dumps(error_body(HTTPStatus.FORBIDDEN, message)).encode()
        d = defer.ensureDeferred(self._scrape(request))
        d.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    async def _scrape(self, request: server.Request) -> None:
        manager = self._collector.manager
        pids = {
            k.id: pid
            for k in manager.kernels.values()
            # A kernel host's pids are that machine's: not read here.
            if k.incarnation is not None
            and k.incarnation.host is None
            and (pid := k.incarnation.pid)
        }
        try:
            self._collector.memory = await threads.deferToThread(kernel_memory, pids)
        except Exception:  # the rest of the figures are still worth having
            self.log.failure("reading kernels' memory for /metrics failed")
            self._collector.memory = {}
        body = generate_latest(self.registry)  # in the reactor thread: live state
        if request.finished or request._disconnected:
            return
        request.setHeader(b"content-type", CONTENT_TYPE)
        request.write(body)
        request.finish()

    def _failed(self, failure: Any, request: server.Request) -> None:
        self.log.failure("scraping /metrics failed", failure)
        if not (request.finished or request._disconnected):
            request.setResponseCode(HTTPStatus.INTERNAL_SERVER_ERROR)
            request.finish()

"""Run the benchmark suite: cellmux beside jupyter_server, in one run.

    python bench/run.py [--quick] [--only rtt,stream] [--json bench/results.json]

Writes the JSON results, docs/benchmarks.md (the table between the markers)
and docs/benchmarks.png. See docs/benchmarks.md for the method. Exits 1
when a gated figure is worse than in the committed results beyond noise
(bench/gate.py; --no-gate to only report it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import glob
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import attrs
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import editor  # noqa: E402
from drivers import CellmuxConnection, FloorConnection, JupyterConnection, lean_start  # noqa: E402
from gate import regressions  # noqa: E402
from report import write_report  # noqa: E402
from servers import FloorKernel, Server, start_cellmux, start_jupyter, wakeups  # noqa: E402

#: Repetitions, chosen so that a full run stays under ~10 minutes on a
#: shared 2-core machine. --quick divides them (for trying the harness).
REPS = {
    "start_warm": 40,
    # A fork on demand costs ~60 ms, the median of 12 swung by half that
    # from one minute to the next on the same code (issue 20, round six).
    "start_empty": 40,
    "start_jupyter": 10,
    "start_load_seconds": 20,
    "rtt_rounds": 5,
    "rtt_per_round": 40,
    "stream": 3,
    "messages": 2,
    "fanout_lines": 2000,
    "fanout_extra_kernels": 20,
    # Runs of the 20-observer cases, pooled: one run's CPU time is a few
    # 10 ms clock ticks, too coarse to compare 20 against 20 + 20 kernels.
    "fanout_runs": 3,
    # Lines of the cell the observers in processes of their own watch (1,000
    # of them get a frame per line each).
    "fanout_spread_lines": 500,
    "concurrency_kernels": 20,
    "concurrency_sessions": 200,
    "concurrency_cells": 5,
    "memory_kernels": 10,
    "idle_kernels": 20,
    "idle_many": 300,
    "idle_seconds": 30,
    "thousand_kernels": 1000,
    "thousand_active": 100,
    "thousand_seconds": 20,
    "editor_runs": 20,
    "other_start": 8,
    "other_rtt_rounds": 3,
    "other_rtt_per_round": 20,
    "hosts_start": 30,
    "hosts_rtt_rounds": 5,
    "hosts_rtt_per_round": 40,
}
#: The kernelspec of the "other" stage (a kernel that is not Python, started
#: cold on both servers), and the code its round trips run.
OTHER_KERNEL = "bash"
OTHER_CODE = "echo 2"
STREAM_LINES = 200_000
MESSAGE_LINES = 20_000
FANOUT_OBSERVERS = (1, 20, 100)
#: More observer counts, cellmux only; from FANOUT_SPREAD_FROM on, the
#: observers are bench/observers.py processes (FANOUT_PROCESSES of them), so
#: that the bench's own client loop is not what limits the delivery.
FANOUT_CELLMUX_ONLY = (10, 1000)
FANOUT_SPREAD_FROM = 1000
FANOUT_PROCESSES = 4
FLOOD_CHUNKS = 64  # MiB the kernel writes at a client that does not read
BUDGET_BYTES = 24 * 1024**3
#: Seconds an output cell may take before the run records it as hung.
OUTPUT_TIMEOUT = 60


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


class Suite:
    def __init__(self, reps: dict[str, int], other_kernel: str = OTHER_KERNEL) -> None:
        self.reps = reps
        self.other_kernel = other_kernel
        self.servers: dict[str, Server] = {}
        self.floor: FloorKernel | None = None
        self.results: dict[str, Any] = {}

    # -- targets -------------------------------------------------------------

    def start(self) -> None:
        self.servers["cellmux"] = start_cellmux("--pool-size", "4", "--max-kernels", "250")
        self.servers["jupyter"] = start_jupyter(rate_limits=True)
        self.servers["jupyter-nolimit"] = start_jupyter(rate_limits=False)
        self.floor = FloorKernel.start()
        self.servers["cellmux"].wait_pool(4)

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        if self.floor is not None:
            self.floor.stop()

    async def connect(
        self, name: str, kernel_id: str, server: Server | None = None, max_queue: int | None = None
    ):
        server = server or self.servers[name]
        cls = CellmuxConnection if server.kind == "cellmux" else JupyterConnection
        return await cls.open(server.url, server.token, kernel_id, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def kernel_conn(self, name: str, jupyter_api: bool = False):
        """A fresh kernel on target C{name}, attached, warmed by one cell.

        @param jupyter_api: attach through the Jupyter websocket
            (``/api/kernels/ID/channels``) whatever the server."""
        if name == "floor":
            conn = FloorConnection(self.floor.info)
            await conn.start()
            try:
                yield conn
            finally:
                await conn.close()
            return
        server = self.servers[name]
        model = server.create_kernel()
        if jupyter_api:
            conn = await JupyterConnection.open(server.url, server.token, model["id"])
        else:
            conn = await self.connect(name, model["id"])
        conn.kernel_id = model["id"]
        try:
            await conn.execute("0")
            yield conn
        finally:
            await conn.close()
            server.delete_kernel(model["id"])

    # -- 1. start --------------------------------------------------------------

    async def bench_start(self) -> None:
        out: dict[str, Any] = {}

        async def one(
            server: Server, jupyter_api: bool = False, kernel_cpu: list[float] | None = None
        ) -> float:
            t0 = time.perf_counter()
            model = server.create_kernel()
            if jupyter_api:  # the Jupyter websocket, whatever the server
                conn = await JupyterConnection.open(server.url, server.token, model["id"])
            else:
                conn = await self.connect(server.kind, model["id"], server)
            result = await conn.execute("1+1")
            elapsed = time.perf_counter() - t0
            if kernel_cpu is not None:
                kernel_cpu.append(_thread_cpu_seconds(model["pid"]))
            assert result.status == "ok", result
            await conn.close()
            server.delete_kernel(model["id"])
            return elapsed

        async def one_round_trip(server: Server) -> float:
            conn, kernel_id, result = await CellmuxConnection.start(server.url, server.token, "1+1")
            assert result.status == "ok", result
            await conn.close()
            server.delete_kernel(kernel_id)
            return max(result.reply, result.idle)  # as one() does: both

        async def lean_round_trip(server: Server) -> float:
            # The same frames from a client that does no more than it must:
            # the difference to one_round_trip is this client's own cost.
            kernel_id, result = lean_start(server.url, server.token, "1+1")
            assert result.status == "ok", result
            server.delete_kernel(kernel_id)
            return max(result.reply, result.idle)

        # The four ways alternate, each from a full pool: the pool follows
        # demand, so whichever ran last after a burst of starts would share
        # the machine with the nursery's refilling.
        cellmux = self.servers["cellmux"]
        ways = {
            "cellmux (warm pool)": one,
            "cellmux (Jupyter API)": functools.partial(one, jupyter_api=True),
            "cellmux (one round trip)": one_round_trip,
            "cellmux (one round trip, lean client)": lean_round_trip,
        }
        samples_of: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(self.reps["start_warm"]):
            for way, start in ways.items():
                cellmux.wait_pool(4)
                samples_of[way].append(await start(cellmux))
        for way, samples in samples_of.items():
            out[way] = summary(samples)

        # Each of these forks a kernel; beside the wall time (which the
        # machine's load moves by half a start), the CPU the new kernel
        # used until its first reply, which load does not move.
        empty = start_cellmux("--pool-size", "0")
        cpus: list[float] = []
        try:
            await asyncio.sleep(1)
            samples = [await one(empty, kernel_cpu=cpus) for _ in range(self.reps["start_empty"])]
        finally:
            empty.stop()
        out["cellmux (empty pool)"] = summary(samples)
        out["cellmux (empty pool)"]["kernel_cpu_p50"] = pct(cpus, 50)

        out["cellmux (5 creates/s)"] = await self._start_under_load(cellmux)

        samples = []
        for _ in range(self.reps["start_jupyter"]):
            samples.append(await one(self.servers["jupyter"]))
            await asyncio.sleep(0.3)  # let the deleted kernel go away
        out["jupyter"] = summary(samples)
        self.results["start"] = out

    async def _start_under_load(self, server: Server) -> dict[str, float]:
        """Start to first result while creates arrive at a steady 5 a second
        (open loop: a slow start does not slow the arrivals)."""
        rate, seconds = 5.0, self.reps["start_load_seconds"]
        samples: list[float] = []

        async def one() -> None:
            conn, kernel_id, result = await CellmuxConnection.start(server.url, server.token, "1+1")
            samples.append(max(result.reply, result.idle))
            await conn.close()
            await asyncio.to_thread(server.delete_kernel, kernel_id)

        tasks = []
        t0 = time.perf_counter()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        return summary(samples)

    # -- 2. rtt ----------------------------------------------------------------

    async def bench_rtt(self) -> None:
        # cellmux twice: its own protocol, and the Jupyter websocket that
        # Jupyter clients use (the same server, another kernel).
        jupyter_ws = "cellmux (Jupyter websocket)"
        names = ["cellmux", jupyter_ws, "jupyter", "jupyter-nolimit", "floor"]
        replies: dict[str, list[float]] = {n: [] for n in names}
        idles: dict[str, list[float]] = {n: [] for n in names}
        async with contextlib.AsyncExitStack() as stack:
            conns = {
                n: await stack.enter_async_context(
                    self.kernel_conn("cellmux", jupyter_api=True)
                    if n == jupyter_ws
                    else self.kernel_conn(n)
                )
                for n in names
            }
            for conn in conns.values():
                for _ in range(10):  # warm up
                    await conn.execute("1+1")
            # Rounds alternate the targets, so drift in the machine's load
            # falls on all of them alike.
            for _ in range(self.reps["rtt_rounds"]):
                for name, conn in conns.items():
                    for _ in range(self.reps["rtt_per_round"]):
                        r = await conn.execute("1+1")
                        replies[name].append(r.reply)
                        idles[name].append(r.idle)
        self.results["rtt"] = {
            n: {"reply": summary(replies[n]), "idle": summary(idles[n])} for n in names
        }

    # -- 3 and 4. stream and messages ------------------------------------------

    async def _output(self, key: str, code: str, lines: int, reps: int) -> None:
        out = {}
        expected = [str(i) for i in range(lines)]
        for name in ["cellmux", "jupyter", "jupyter-nolimit", "floor"]:
            runs = []
            async with self.kernel_conn(name) as conn:
                for _ in range(reps):
                    r = await conn.execute(code, timeout=OUTPUT_TIMEOUT)
                    if r.timed_out:
                        # A lost idle is a result too: record what came.
                        print(f"  {key}: {name} never went idle", flush=True)
                        runs.append(
                            {
                                "timed_out": True,
                                "lines": len(r.lines()),
                                "messages_per_s": r.stream_messages / r.last,
                                "mb_per_s": r.stream_bytes / r.last / 1e6,
                            }
                        )
                        break
                    print(f"  {key}: {name} {r.idle:.2f} s", flush=True)
                    got = r.lines()
                    runs.append(
                        {
                            "seconds": r.idle,
                            "mb_per_s": r.stream_bytes / r.idle / 1e6,
                            "messages": r.stream_messages,
                            "messages_per_s": r.stream_messages / r.idle,
                            "lines": len(got),
                            "complete_in_order": got == expected,
                        }
                    )
            ok = [x for x in runs if not x.get("timed_out")]
            out[name] = {
                "runs": runs,
                "timed_out": len(runs) - len(ok),
                "seconds": statistics.median(x["seconds"] for x in ok) if ok else None,
                # Rates count what arrived, until the last message that did.
                "mb_per_s": statistics.median(x["mb_per_s"] for x in runs),
                "messages_per_s": statistics.median(x["messages_per_s"] for x in runs),
                "lines_min": min(x["lines"] for x in runs),
                "all_complete": bool(ok)
                and len(ok) == len(runs)
                and all(x["complete_in_order"] for x in ok),
            }
        self.results[key] = out

    async def bench_stream(self) -> None:
        code = f"for i in range({STREAM_LINES}): print(i)"
        await self._output("stream", code, STREAM_LINES, self.reps["stream"])

    async def bench_messages(self) -> None:
        code = f"for i in range({MESSAGE_LINES}): print(i, flush=True)"
        await self._output("messages", code, MESSAGE_LINES, self.reps["messages"])

    # -- 5. fan-out ------------------------------------------------------------

    async def bench_fanout(self) -> None:
        out: dict[str, Any] = {}
        extra = self.reps["fanout_extra_kernels"]
        for name in ["cellmux", "jupyter", "jupyter-nolimit"]:
            counts = sorted(
                {*FANOUT_OBSERVERS, *(FANOUT_CELLMUX_ONLY if name == "cellmux" else ())}
            )
            out[name] = {
                str(n): await (
                    self._fanout_spread(name, n)
                    if n >= FANOUT_SPREAD_FROM
                    else self._fanout(name, n)
                )
                for n in counts
            }
            if name == "jupyter-nolimit":
                continue
            # The same 20 observers while other kernels, each with a client,
            # are alive: the cost per frame should not depend on them.
            server = self.servers[name]
            models = [server.create_kernel() for _ in range(extra)]
            others = [await self.connect(name, m["id"]) for m in models]
            for c in others:
                await c.execute("0")
            out[name][f"20, {extra} more kernels"] = await self._fanout(name, 20)
            for c in others:
                await c.close()
            for m in models:
                server.delete_kernel(m["id"])
        self.results["fanout"] = out

    async def _fanout(self, name: str, n: int) -> dict[str, Any]:
        """C{n} observers, in several runs up to 20 of them (100 make frames
        enough in one): CPU time and frames summed over the runs, the median
        time, the worst delivery."""
        count = self.reps["fanout_runs"] if n <= 20 else 1
        runs = [await self._fanout_once(name, n) for _ in range(count)]
        cpu = sum(r["server_cpu_s"] for r in runs)
        frames = sum(r["frames"] for r in runs)
        lasts = [r["seconds_to_last"] for r in runs if r["seconds_to_last"] is not None]
        return {
            "runs": len(runs),
            "seconds_to_last": statistics.median(lasts) if lasts else None,
            "frames": frames,
            "server_cpu_s": cpu,
            "server_us_per_frame": cpu / frames * 1e6,
            "timed_out": sum(r["timed_out"] for r in runs),
            "observers_complete": min(r["observers_complete"] for r in runs),
            "lines_min": min(r["lines_min"] for r in runs),
        }

    async def _fanout_once(self, name: str, n: int) -> dict[str, Any]:
        lines = self.reps["fanout_lines"]
        code = f"for i in range({lines}): print(i, flush=True)"
        expected = [str(i) for i in range(lines)]
        proc = psutil.Process(self.servers[name].process.pid)
        async with self.kernel_conn(name) as conn:
            observers = [await self.connect(name, conn.kernel_id) for _ in range(n)]
            await asyncio.sleep(0.5)
            cpu0 = sum(proc.cpu_times()[:2])
            msg_id = os.urandom(8).hex()
            start = time.perf_counter()
            watch = [
                asyncio.ensure_future(o.observe(msg_id, start, OUTPUT_TIMEOUT)) for o in observers
            ]
            mine = await conn.execute(code, msg_id, OUTPUT_TIMEOUT)
            seen = await asyncio.gather(*watch)
            timed_out = sum(s.timed_out for s in seen) + mine.timed_out
            last = max(s.idle for s in seen) if not timed_out else None
            cpu = sum(proc.cpu_times()[:2]) - cpu0
            frames = mine.messages + sum(s.messages for s in seen)
            for o in observers:
                await o.close()
        return {
            "seconds_to_last": last,
            "frames": frames,
            "server_cpu_s": cpu,
            "server_us_per_frame": cpu / frames * 1e6,
            "timed_out": timed_out,
            "observers_complete": sum(s.lines() == expected for s in seen),
            "lines_min": min(len(s.lines()) for s in seen),
        }

    async def _fanout_spread(self, name: str, n: int) -> dict[str, Any]:
        """C{n} observers in FANOUT_PROCESSES processes of bench/observers.py
        (raw websocket clients that decode almost nothing), one run."""
        lines = self.reps["fanout_spread_lines"]
        code = f"for i in range({lines}): print(i, flush=True)"
        server = self.servers[name]
        proc = psutil.Process(server.process.pid)
        script = os.path.join(HERE, "observers.py")
        shares = [
            n // FANOUT_PROCESSES + (i < n % FANOUT_PROCESSES) for i in range(FANOUT_PROCESSES)
        ]
        async with self.kernel_conn(name) as conn:
            msg_id = os.urandom(8).hex()
            args = [server.url, server.token, conn.kernel_id]
            workers = [
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    script,
                    *args,
                    str(k),
                    msg_id,
                    str(lines),
                    stdout=asyncio.subprocess.PIPE,
                )
                for k in shares
                if k
            ]
            try:
                for w in workers:
                    assert w.stdout is not None
                    ready = await asyncio.wait_for(w.stdout.readline(), OUTPUT_TIMEOUT)
                    if ready.strip() != b"ready":
                        raise RuntimeError("an observer process could not attach its observers")
                await asyncio.sleep(0.5)
                cpu0 = sum(proc.cpu_times()[:2])
                start = time.time()
                mine = await conn.execute(code, msg_id, OUTPUT_TIMEOUT)
                reports = []
                for w in workers:
                    assert w.stdout is not None
                    line = await asyncio.wait_for(w.stdout.readline(), OUTPUT_TIMEOUT)
                    reports.append(json.loads(line))
                cpu = sum(proc.cpu_times()[:2]) - cpu0
            finally:
                for w in workers:
                    if w.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            w.kill()
                    await w.wait()
        frames = mine.messages + sum(r["frames"] for r in reports)
        return {
            "runs": 1,
            "seconds_to_last": max(r["last_idle"] for r in reports) - start,
            "frames": frames,
            "server_cpu_s": cpu,
            "server_us_per_frame": cpu / frames * 1e6,
            "timed_out": int(mine.timed_out),
            "observers_complete": sum(r["complete"] for r in reports),
            "lines_min": lines if sum(r["complete"] for r in reports) == n else 0,
            "lines": lines,
            "processes": len(workers),
        }

    # -- 6. concurrency --------------------------------------------------------

    async def bench_concurrency(self) -> None:
        nk = self.reps["concurrency_kernels"]
        ns = self.reps["concurrency_sessions"]
        cells = self.reps["concurrency_cells"]
        out = {}
        for name in ["cellmux", "jupyter"]:
            server = self.servers[name]
            t_setup = time.perf_counter()
            models = [server.create_kernel() for _ in range(nk)]
            conns = [await self.connect(name, models[i % nk]["id"]) for i in range(ns)]
            print(
                f"  {name}: {nk} kernels, {ns} sessions set up in "
                f"{time.perf_counter() - t_setup:.1f} s",
                flush=True,
            )
            for c in conns[:nk]:
                await c.execute("0")
            latencies: list[float] = []

            async def session(conn, i: int, latencies: list[float] = latencies) -> None:
                for j in range(cells):
                    r = await conn.execute(f"{i} * {j}")
                    latencies.append(r.idle)

            t0 = time.perf_counter()
            await asyncio.gather(*(session(c, i) for i, c in enumerate(conns)))
            wall = time.perf_counter() - t0
            t_down = time.perf_counter()
            await asyncio.gather(*(c.close() for c in conns))
            t_closed = time.perf_counter()
            for m in models:
                server.delete_kernel(m["id"])
            print(
                f"  {name}: closed in {t_closed - t_down:.1f} s, deleted in "
                f"{time.perf_counter() - t_closed:.1f} s",
                flush=True,
            )
            out[name] = {
                "kernels": nk,
                "sessions": ns,
                "cells": len(latencies),
                "cells_per_s": len(latencies) / wall,
                "latency": summary(latencies),
            }
            await asyncio.sleep(2)
        self.results["concurrency"] = out

    # -- 7. memory -------------------------------------------------------------

    async def bench_memory(self) -> None:
        out: dict[str, Any] = {}
        for name in ["cellmux", "jupyter"]:
            server = self.servers[name]
            before = {p.pid for p in psutil.Process(server.process.pid).children(recursive=True)}
            models = [server.create_kernel() for _ in range(self.reps["memory_kernels"])]
            for m in models:  # every kernel has run one cell
                conn = await self.connect(name, m["id"])
                await conn.execute("0")
                await conn.close()
            await asyncio.sleep(3)
            if name == "cellmux":
                pids = [server.request("GET", f"/api/kernels/{m['id']}")[1]["pid"] for m in models]
            else:
                after = psutil.Process(server.process.pid).children(recursive=True)
                pids = [p.pid for p in after if p.pid not in before]
            infos = [psutil.Process(pid).memory_full_info() for pid in pids]
            uss = statistics.fmean(i.uss for i in infos)
            pss = statistics.fmean(i.pss for i in infos)
            rss = statistics.fmean(i.rss for i in infos)
            for m in models:
                server.delete_kernel(m["id"])
            out[name] = {
                "kernels": len(pids),
                "uss_mb": uss / 2**20,
                "pss_mb": pss / 2**20,
                "rss_mb": rss / 2**20,
                "fit_in_24gb": int(BUDGET_BYTES // uss),
            }
            await asyncio.sleep(2)
        for name in ["cellmux", "jupyter", "jupyter-nolimit"]:
            out.setdefault(name, {})["flood"] = await self._flood(name)
        self.results["memory"] = out

        # Beside the default figure, never instead of it: the same kernels
        # with the operator's opt-in page merging (kernel_page_merging,
        # operations.md), after ksmd's full scans; ksmd's settings are
        # machine-wide, so they are put back whatever happens.
        ksm = "/sys/kernel/mm/ksm"

        def ksm_read(name: str) -> str:
            with open(os.path.join(ksm, name)) as f:
                return f.read().strip()

        def ksm_write(name: str, value: str) -> None:
            with open(os.path.join(ksm, name), "w") as f:
                f.write(value)

        def ksmd_cpu() -> float:
            for comm in glob.glob("/proc/[0-9]*/comm"):
                with contextlib.suppress(OSError), open(comm) as f:
                    if f.read().strip() == "ksmd":
                        return sum(psutil.Process(int(comm.split("/")[2])).cpu_times()[:2])
            return 0.0

        if os.geteuid() != 0 or not os.path.exists(os.path.join(ksm, "run")):
            return
        directory = tempfile.mkdtemp(prefix="cellmux-bench-ksm-")
        config = os.path.join(directory, "cellmux.toml")
        with open(config, "w") as f:
            f.write("kernel_page_merging = true\n")
        saved = {name: ksm_read(name) for name in ("run", "pages_to_scan", "sleep_millisecs")}
        server = None
        try:  # its failure costs this figure only, never the default ones
            # The default figures' pool: as many processes share the nursery's
            # pages, so the PSS figures compare.
            server = start_cellmux("--pool-size", "4", "--config", config)
            server.wait_pool(4)
            models = [server.create_kernel() for _ in range(self.reps["memory_kernels"])]
            for m in models:
                conn = await self.connect("cellmux", m["id"], server=server)
                await conn.execute("0")
                await conn.close()
            await asyncio.sleep(3)
            pids = [server.request("GET", f"/api/kernels/{m['id']}")[1]["pid"] for m in models]
            ksm_write("pages_to_scan", "2000")
            ksm_write("sleep_millisecs", "20")
            ksm_write("run", "1")
            # A page is merged at the second scan that finds it alike; the
            # third is the cost of scanning kernels that stay idle.
            first = int(ksm_read("full_scans"))
            deadline = time.monotonic() + 600

            async def scanned(scans: int) -> None:
                while int(ksm_read("full_scans")) < first + scans:
                    if time.monotonic() > deadline:
                        raise RuntimeError("ksmd made no full scan in 600 s")
                    await asyncio.sleep(0.5)

            await scanned(2)
            cpu, start = ksmd_cpu(), time.monotonic()
            await scanned(3)
            scan_cpu, scan_seconds = ksmd_cpu() - cpu, time.monotonic() - start
            infos = [psutil.Process(pid).memory_full_info() for pid in pids]
            uss = statistics.fmean(i.uss for i in infos)
            out["cellmux (page merging)"] = {
                "kernels": len(pids),
                "uss_mb": uss / 2**20,
                "pss_mb": statistics.fmean(i.pss for i in infos) / 2**20,
                "rss_mb": statistics.fmean(i.rss for i in infos) / 2**20,
                "fit_in_24gb": int(BUDGET_BYTES // uss),
                "ksmd_cpu_s_per_full_scan": scan_cpu,
                "full_scan_s": scan_seconds,
            }
        except Exception as e:
            out["cellmux (page merging)"] = {"error": repr(e)}
        finally:
            for name in ("pages_to_scan", "sleep_millisecs", "run"):
                ksm_write(name, saved[name])
            if server is not None:
                server.stop()
            shutil.rmtree(directory, ignore_errors=True)

    # -- 8. an editor's run -------------------------------------------------------

    async def bench_editor(self) -> None:
        """cellmux run --lines of a one-liner as a new process, beside python -c pass."""
        server = self.servers["cellmux"]
        runs = self.reps["editor_runs"]
        self.results["editor"] = await asyncio.to_thread(editor.measure, server, runs)

    async def _flood(self, name: str) -> dict[str, float]:
        """Server RSS while a kernel writes FLOOD_CHUNKS MiB at a stalled client."""
        server = self.servers[name]
        proc = psutil.Process(server.process.pid)
        model = server.create_kernel()
        conn = await self.connect(name, model["id"], max_queue=1)
        await conn.execute("0")
        base = proc.memory_info().rss
        code = (
            "import sys\nchunk = ('x' * 1023 + '\\n') * 1024\n"
            f"for i in range({FLOOD_CHUNKS}):\n    sys.stdout.write(chunk); sys.stdout.flush()"
        )
        msg_id = os.urandom(8).hex()
        await conn.ws.send(conn._encode_execute(code, msg_id))
        peak = base
        t_end = time.perf_counter() + 8
        while time.perf_counter() < t_end:  # the client reads nothing
            peak = max(peak, proc.memory_info().rss)
            await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        r = await conn.observe(msg_id, t0, OUTPUT_TIMEOUT)
        await conn.close()
        server.delete_kernel(model["id"])
        return {
            "base_rss_mb": base / 2**20,
            "peak_growth_mb": (peak - base) / 2**20,
            "received_mb": r.stream_bytes / 2**20,
        }

    # -- 9. another kernel -------------------------------------------------------

    async def bench_other(self) -> None:
        """Start and round trip of a cold kernel that is not Python, on both
        servers (cellmux starts it behind its adaptor, without a pool)."""
        name = self.other_kernel

        async def run(label: str, conn) -> Any:
            # A stage must fail, not hang, when a kernel stops answering.
            result = await conn.execute(OTHER_CODE, timeout=OUTPUT_TIMEOUT)
            if result.timed_out:
                raise RuntimeError(f"{label}: no answer to {OTHER_CODE!r} in {OUTPUT_TIMEOUT} s")
            return result

        with _kernelspec_path(name):
            servers = {"cellmux": start_cellmux("--pool-size", "0"), "jupyter": start_jupyter()}
        try:
            start: dict[str, list[float]] = {n: [] for n in servers}
            for _ in range(self.reps["other_start"]):
                for label, server in servers.items():
                    t0 = time.perf_counter()
                    model = server.create_kernel(name)
                    conn = await self.connect(label, model["id"], server)
                    result = await run(label, conn)
                    start[label].append(time.perf_counter() - t0)
                    assert result.status == "ok", result
                    await conn.close()
                    server.delete_kernel(model["id"])
                    await asyncio.sleep(0.3)  # let the deleted kernel go away
            replies: dict[str, list[float]] = {n: [] for n in servers}
            idles: dict[str, list[float]] = {n: [] for n in servers}
            async with contextlib.AsyncExitStack() as stack:
                conns = {}
                for label, server in servers.items():
                    model = server.create_kernel(name)
                    conns[label] = await stack.enter_async_context(
                        _closing(await self.connect(label, model["id"], server))
                    )
                    stack.callback(server.delete_kernel, model["id"])
                    for _ in range(5):  # warm up
                        await run(label, conns[label])
                for _ in range(self.reps["other_rtt_rounds"]):
                    for label, conn in conns.items():
                        for _ in range(self.reps["other_rtt_per_round"]):
                            r = await run(label, conn)
                            replies[label].append(r.reply)
                            idles[label].append(r.idle)
        finally:
            for server in servers.values():
                server.stop()
        self.results["other"] = {
            "kernel": name,
            "code": OTHER_CODE,
            "start": {n: summary(v) for n, v in start.items()},
            "rtt": {n: {"reply": summary(replies[n]), "idle": summary(idles[n])} for n in servers},
        }


@contextlib.asynccontextmanager
async def _closing(conn):
    try:
        yield conn
    finally:
        await conn.close()


@contextlib.contextmanager
def _kernelspec_path(name: str):
    """JUPYTER_PATH for the servers started inside: bash_kernel's spec is
    installed into a temporary directory when no kernelspec C{name} is."""
    from jupyter_client.kernelspec import KernelSpecManager

    if name != "bash" or name in KernelSpecManager().find_kernel_specs():
        yield
        return
    import shutil
    import subprocess
    import tempfile

    directory = tempfile.mkdtemp(prefix="bench-kernelspecs-")
    before = os.environ.get("JUPYTER_PATH")
    try:
        subprocess.run(
            [sys.executable, "-m", "bash_kernel.install", "--prefix", directory],
            check=True,
            capture_output=True,
        )
        os.environ["JUPYTER_PATH"] = os.path.join(directory, "share", "jupyter")
        yield
    finally:
        if before is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = before
        # The servers read the spec at start and when they start a kernel:
        # it must outlive them (removed at exit).
        import atexit

        atexit.register(shutil.rmtree, directory, True)


def _thread_cpu_seconds(pid: int) -> float:
    """CPU seconds every thread of C{pid} has run so far, to the nanosecond
    (``/proc/PID/task/*/schedstat``; psutil's times move in 10 ms ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (gone ones: 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


async def _idle_cost(server_pid: int, kernel_pids: list[int], seconds: float) -> dict[str, float]:
    """Percent of one core the server and each idle kernel use over
    C{seconds}, and how often they wake (a load-insensitive figure: psutil's
    CPU times move in 10 ms ticks)."""
    await asyncio.sleep(3)  # let start-up work settle
    server0, kernels0 = _cpu_seconds([server_pid]), _cpu_seconds(kernel_pids)
    wakes0, kernel_wakes0 = wakeups([server_pid]), wakeups(kernel_pids)
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - t0
    server1, kernels1 = _cpu_seconds([server_pid]), _cpu_seconds(kernel_pids)
    wakes1, kernel_wakes1 = wakeups([server_pid]), wakeups(kernel_pids)
    per = max(1, len(kernel_pids))
    return {
        "kernels": len(kernel_pids),
        "seconds": elapsed,
        "server_pct": 100 * (server1 - server0) / elapsed,
        "per_kernel_pct": 100 * (kernels1 - kernels0) / elapsed / per,
        "server_wakeups_per_s": (wakes1 - wakes0) / elapsed,
        "kernel_wakeups_per_s": (kernel_wakes1 - kernel_wakes0) / elapsed / per,
    }


async def _idle_kernels(suite: Suite, name: str, n: int) -> tuple[list[dict], list[int]]:
    server = suite.servers[name]
    before = {p.pid for p in psutil.Process(server.process.pid).children(recursive=True)}
    models = [server.create_kernel() for _ in range(n)]
    for m in models:  # every kernel has run one cell, then nobody is attached
        conn = await suite.connect(name, m["id"])
        await conn.execute("0")
        await conn.close()
    if server.kind == "cellmux":
        pids = [server.request("GET", f"/api/kernels/{m['id']}")[1]["pid"] for m in models]
    else:
        after = psutil.Process(server.process.pid).children(recursive=True)
        pids = [p.pid for p in after if p.pid not in before]
    return models, pids


async def bench_idle(suite: Suite) -> None:
    """What idle kernels cost: each kernel's CPU, and the server's as they grow."""
    out: dict[str, Any] = {}
    seconds = suite.reps["idle_seconds"]
    for name in ["cellmux", "jupyter"]:
        server = suite.servers[name]
        models, pids = await _idle_kernels(suite, name, suite.reps["idle_kernels"])
        out[name] = await _idle_cost(server.process.pid, pids, seconds)
        print(f"  idle {name}: {out[name]}", flush=True)
        for m in models:
            server.delete_kernel(m["id"])
        await asyncio.sleep(2)
    # The server's own cost with many idle kernels (cellmux only: the peer
    # needs a second per kernel to start them).
    many = start_cellmux("--pool-size", "4", "--max-kernels", str(suite.reps["idle_many"] + 10))
    try:
        suite.servers["cellmux-many"] = many
        empty = await _idle_cost(many.process.pid, [], seconds)
        models, pids = await _idle_kernels(suite, "cellmux-many", suite.reps["idle_many"])
        loaded = await _idle_cost(many.process.pid, pids, seconds)
        loaded["server_pct_empty"] = empty["server_pct"]
        out["cellmux_many"] = loaded
        print(f"  idle cellmux x{len(pids)}: {loaded}", flush=True)
    finally:
        suite.servers.pop("cellmux-many", None)
        many.stop()
    suite.results["idle"] = out


async def _rtt_loop(
    conn, seconds: float, out: list[float], period: float = 0.0, phase: float = 0.0
) -> None:
    """Run ``1+1`` on one connection for C{seconds}: back to back, or one
    cell every C{period} seconds (a user at work, not a load generator),
    the first after C{phase} seconds."""
    await asyncio.sleep(phase)
    start = time.perf_counter()
    end = start + seconds
    n = 0
    while time.perf_counter() < end:
        r = await conn.execute("1+1", timeout=OUTPUT_TIMEOUT)
        if r.timed_out:
            raise RuntimeError("a cell timed out")
        out.append(max(r.reply, r.idle))
        n += 1
        if period:
            await asyncio.sleep(max(0.0, start + n * period - time.perf_counter()))


async def bench_thousand(suite: Suite) -> None:
    """A thousand live kernels, a tenth of them running cells: their round
    trip beside a lone kernel's, start time, memory per kernel, and the
    server's cost while all of them are idle.

    Like with like: ``lone_rtt`` is a lone kernel paced as the active ones
    are, a cell a second (a kernel that sat idle for a second pays cold
    caches and wake-ups a kernel run back to back does not);
    ``lone_rtt_back_to_back`` is the same kernel back to back. Both are
    measured in the same server before the others exist, and once more
    (``lone_rtt_among``, paced) with all of them alive and idle: what the
    idle ones cost an active kernel, without the other active ones.
    """
    n, active, seconds = (
        suite.reps["thousand_kernels"],
        suite.reps["thousand_active"],
        suite.reps["thousand_seconds"],
    )
    # Its own session, as under systemd (server_nice, off by default, would
    # apply only to a server that leads its session).
    server = start_cellmux("--pool-size", "4", "--max-kernels", str(n + 20), own_session=True)
    suite.servers["cellmux-1000"] = server
    out: dict[str, Any] = {"kernels": n, "active": active}
    models: list[dict] = []
    try:
        available0 = psutil.virtual_memory().available
        lone: list[float] = []
        lone_b2b: list[float] = []
        async with suite.kernel_conn("cellmux-1000") as conn:
            await _rtt_loop(conn, 5, lone_b2b)
            await _rtt_loop(conn, seconds, lone, period=1.0)
        out["lone_rtt"] = summary(lone)
        out["lone_rtt_back_to_back"] = summary(lone_b2b)
        t0 = time.perf_counter()
        for _ in range(n):
            models.append(server.create_kernel())
        out["create_all_seconds"] = time.perf_counter() - t0
        conns = []
        for m in models:  # every kernel runs one cell; the active ones stay attached
            conn = await suite.connect("cellmux-1000", m["id"])
            await conn.execute("0", timeout=OUTPUT_TIMEOUT)
            if len(conns) < active:
                conns.append(conn)
            else:
                await conn.close()
        await asyncio.sleep(5)
        out["memory_per_kernel_mb"] = (available0 - psutil.virtual_memory().available) / n / 2**20
        sample = [server.request("GET", f"/api/kernels/{m['id']}")[1]["pid"] for m in models[::50]]
        out["uss_mb"] = statistics.fmean(
            psutil.Process(pid).memory_full_info().uss / 2**20 for pid in sample
        )
        # All of them idle (the active ones attached): the server's cost,
        # then one kernel paced among them.
        out["idle"] = await _idle_cost(server.process.pid, sample, seconds)
        out["idle"]["kernels"] = n  # per-kernel figures: of the sampled ones
        among: list[float] = []
        await _rtt_loop(conns[0], seconds, among, period=1.0)
        out["lone_rtt_among"] = summary(among)
        # Each active kernel runs a cell a second (100 cells/s in all: about
        # half of what two cores can run), their users not in step (phases
        # spread over the second: 100 cells sent at the same instant measure
        # the queue behind them), and once back to back (saturated).
        busy: list[float] = []
        await asyncio.gather(
            *(
                _rtt_loop(c, seconds, busy, period=1.0, phase=i / len(conns))
                for i, c in enumerate(conns)
            )
        )
        out["active_rtt"] = summary(busy)
        saturated: list[float] = []
        await asyncio.gather(*(_rtt_loop(c, seconds / 2, saturated) for c in conns))
        out["saturated_rtt"] = summary(saturated)
        for c in conns:
            await c.close()
        starts = []
        for _ in range(10):
            server.wait_pool(4)
            t0 = time.perf_counter()
            m = server.create_kernel()
            conn = await suite.connect("cellmux-1000", m["id"])
            await conn.execute("1+1")
            starts.append(time.perf_counter() - t0)
            await conn.close()
            server.delete_kernel(m["id"])
        out["start"] = summary(starts)
        print(f"  thousand: {out}", flush=True)
    finally:
        suite.servers.pop("cellmux-1000", None)
        server.stop()
    suite.results["thousand"] = out


@contextlib.contextmanager
def _front_with_host(pool: int):
    """A front with no kernels of its own and one ``cellmux host`` on
    loopback (CURVE, keys made here), its pool warm, and HAProxy running
    the committed docs/haproxy.cfg in front of it: (front, the front as
    reached through HAProxy, host process)."""
    import subprocess
    import tempfile

    import zmq.auth
    from servers import _free_port

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
    from haproxy_fixtures import HAProxy  # installs Debian's haproxy if missing

    keys = tempfile.mkdtemp(prefix="cellmux-bench-keys-")
    front = host = proxy = None
    try:
        for name in ("front", "host1"):
            zmq.auth.create_certificates(keys, name)
        authorised = os.path.join(keys, "authorised")
        os.mkdir(authorised)
        os.link(os.path.join(keys, "host1.key"), os.path.join(authorised, "host1.key"))
        endpoint = f"tcp://127.0.0.1:{_free_port()}"
        front = start_cellmux(
            *("--pool-size", str(pool), "--no-local-kernels", "--hosts-listen", endpoint),
            *("--front-id", "f1"),
            *("--hosts-secret-key", os.path.join(keys, "front.key_secret")),
            *("--hosts-authorized-dir", authorised),
        )
        host = subprocess.Popen(
            [
                *(sys.executable, "-m", "cellmux", "host", "--front", endpoint, "--name", "host1"),
                *("--front-key", os.path.join(keys, "front.key")),
                *("--key", os.path.join(keys, "host1.key_secret")),
                *("--runtime-dir", os.path.join(keys, "rt"), "--max-kernels", "100"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(keys, "host.log"), "wb"),  # noqa: SIM115 - the child's
        )
        _wait_host_pool(front, pool)
        address = front.url.split("//", 1)[1].rstrip("/")
        # The config routes two fronts: both are this one here.
        proxy = HAProxy.start(_free_port(), {"F1": address, "F2": address})
        yield front, attrs.evolve(front, url=proxy.url), host
    finally:
        if proxy is not None:
            proxy.stop()
        if host is not None:
            host.terminate()
            host.wait(30)
        if front is not None:
            front.stop()
        import shutil

        shutil.rmtree(keys, ignore_errors=True)


def _wait_host_pool(front: Server, ready: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        hosts = front.request("GET", "/api/status")[1].get("hosts") or []
        if hosts and hosts[0]["pool"] >= ready:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the kernel host's pool did not fill: {hosts}")
        time.sleep(0.05)


async def bench_hosts(suite: Suite) -> None:
    """Kernel hosts: warm start and 1+1 round trips through a ``cellmux
    host`` on loopback (TCP + CURVE, one relay hop), next to a local kernel
    of the suite's cellmux (docs/scaling.md)."""
    local = suite.servers["cellmux"]
    out: dict[str, Any] = {}
    with _front_with_host(pool=4) as (front, proxied, _host):

        async def start(server: Server, wait) -> float:
            wait()
            t0 = time.perf_counter()
            model = server.create_kernel()
            conn = await suite.connect("cellmux", model["id"], server)
            result = await conn.execute("1+1", timeout=OUTPUT_TIMEOUT)
            elapsed = time.perf_counter() - t0
            assert result.status == "ok", result
            await conn.close()
            server.delete_kernel(model["id"])
            return elapsed

        starts: dict[str, list[float]] = {"local": [], "remote": [], "remote via HAProxy": []}
        for _ in range(suite.reps["hosts_start"]):  # alternating: same load on all
            starts["local"].append(await start(local, lambda: local.wait_pool(4)))
            starts["remote"].append(await start(front, lambda: _wait_host_pool(front, 4)))
            starts["remote via HAProxy"].append(
                await start(proxied, lambda: _wait_host_pool(front, 4))
            )
        out["start (warm pool)"] = {k: summary(v) for k, v in starts.items()}

        servers = {"local": local, "remote": front, "remote via HAProxy": proxied}
        replies: dict[str, list[float]] = {name: [] for name in servers}
        models = {name: server.create_kernel() for name, server in servers.items()}
        conns = {k: await suite.connect("cellmux", m["id"], servers[k]) for k, m in models.items()}
        try:
            for conn in conns.values():
                for _ in range(10):  # warm up
                    await conn.execute("1+1", timeout=OUTPUT_TIMEOUT)
            for _ in range(suite.reps["hosts_rtt_rounds"]):
                for name, conn in conns.items():
                    for _ in range(suite.reps["hosts_rtt_per_round"]):
                        r = await conn.execute("1+1", timeout=OUTPUT_TIMEOUT)
                        if r.timed_out:
                            raise RuntimeError(f"{name}: 1+1 got no reply")
                        replies[name].append(r.reply)
        finally:
            for name, conn in conns.items():
                await conn.close()
                servers[name].delete_kernel(models[name]["id"])
        out["rtt 1+1 (reply)"] = {k: summary(v) for k, v in replies.items()}
    suite.results["hosts"] = out


STAGES: dict[str, Callable[[Suite], Awaitable[None]]] = {
    "start": Suite.bench_start,
    "rtt": Suite.bench_rtt,
    "stream": Suite.bench_stream,
    "messages": Suite.bench_messages,
    "fanout": Suite.bench_fanout,
    "concurrency": Suite.bench_concurrency,
    "memory": Suite.bench_memory,
    "idle": bench_idle,
    "thousand": bench_thousand,
    "editor": Suite.bench_editor,
    "other": Suite.bench_other,
    "hosts": bench_hosts,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    parser.add_argument("--only", default="", help="comma-separated stages")
    parser.add_argument("--json", default=os.path.join(HERE, "results.json"))
    parser.add_argument("--markdown", default=os.path.join(HERE, "..", "docs", "benchmarks.md"))
    parser.add_argument("--chart", default=os.path.join(HERE, "..", "docs", "benchmarks.png"))
    parser.add_argument("--label", default="", help="a note stored with the results")
    parser.add_argument(
        "--baseline",
        default=os.path.join(HERE, "results.json"),
        help="results to compare against (default: the committed ones)",
    )
    parser.add_argument("--tolerance", type=float, default=0.25, help="noise allowed (0.25: 25 %%)")
    parser.add_argument("--no-gate", action="store_true", help="report regressions, exit 0")
    parser.add_argument(
        "--keep-others",
        action="store_true",
        help="with --only: keep the baseline's results of the stages not run (each stage"
        " records when it was measured)",
    )
    parser.add_argument(
        "--other-kernel",
        default=OTHER_KERNEL,
        help=f"the kernelspec of the 'other' stage (default {OTHER_KERNEL}; runs {OTHER_CODE!r})",
    )
    args = parser.parse_args()
    baseline: dict[str, Any] = {}
    baseline_doc: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError), open(args.baseline) as f:
        baseline_doc = json.load(f)  # read before --json overwrites it
        baseline = baseline_doc.get("results", {})
    reps = dict(REPS)
    if args.quick:
        reps = {k: max(1, v // 4) for k, v in reps.items()}
        reps["concurrency_sessions"] = 40
        reps["concurrency_kernels"] = 4
    stages = [s for s in args.only.split(",") if s] or list(STAGES)
    suite = Suite(reps, args.other_kernel)
    began = time.monotonic()
    try:
        suite.start()
        for stage in stages:
            t0 = time.monotonic()
            try:
                asyncio.run(STAGES[stage](suite))
            except Exception as e:  # one broken stage must not lose the others
                suite.results.setdefault("errors", {})[stage] = repr(e)
                print(f"{stage} failed: {e!r}", flush=True)
                traceback.print_exc()
            print(f"{stage}: {time.monotonic() - t0:.1f} s", flush=True)
    finally:
        suite.stop()
    import ipykernel
    import jupyter_server

    now = datetime.now(UTC).isoformat(timespec="seconds")
    results = suite.results
    measured = dict.fromkeys(results, now)
    if args.keep_others:
        old_when = baseline_doc.get("measured") or dict.fromkeys(
            baseline, baseline_doc.get("when", "?")
        )
        kept = {k: v for k, v in baseline.items() if k not in results and k != "errors"}
        results = {**kept, **results}
        measured = {**{k: old_when.get(k, "?") for k in kept}, **measured}
    doc = {
        "when": now,
        "measured": measured,
        "label": args.label,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_before": os.getloadavg(),
        },
        "versions": {
            "ipykernel": ipykernel.__version__,
            "jupyter_server": jupyter_server.__version__,
        },
        "reps": reps,
        "seconds": time.monotonic() - began,
        "results": results,
    }
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    write_report(doc, args.markdown, args.chart)
    print(json.dumps(suite.results, indent=1))
    worse = regressions(baseline, suite.results, args.tolerance)
    for r in worse:
        print(f"REGRESSION {r}", file=sys.stderr, flush=True)
    if worse and not args.quick and not args.no_gate:
        print(f"{len(worse)} figure(s) regressed beyond {args.tolerance:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

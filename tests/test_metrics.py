"""/metrics: scraped over real HTTP from a real server, parsed with
prometheus_client's own parser; the values move as the server works.
The running totals and the histogram are unit-tested without a server."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from cellmux.server.counters import LATENCY_BUCKETS, Latencies, ServerCounters
from cellmux.server.refusals import RefusalLog
from cellmux.server.replay import Entry, ReplayLog
from conftest import config_file, start_server, wait_for

METRICS_TOKEN = "scrape-me-7f3a"

# -- units -------------------------------------------------------------------------


@given(st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), max_size=50))
def test_a_histogram_is_cumulative_and_ends_with_every_observation(samples):
    latencies = Latencies()
    for sample in samples:
        latencies.observe(sample)
    buckets = latencies.cumulative()
    assert [bound for bound, _ in buckets] == [*map(repr, LATENCY_BUCKETS), "+Inf"]
    counts = [n for _, n in buckets]
    assert counts == sorted(counts) and counts[-1] == len(samples) == latencies.count
    for bound, n in buckets[:-1]:
        assert n == sum(1 for s in samples if s <= float(bound))
    assert latencies.total == pytest.approx(sum(samples))


def test_gaps_are_counted_where_the_log_reports_them():
    counters = ServerCounters()
    log = ReplayLog(10, counters)
    for seq in range(1, 6):
        log.append(Entry(seq, 2, b"12345"))
    assert log.after(5)[0] is None and counters.gaps == 0
    gap, _ = log.after(1)
    assert gap is not None
    assert (counters.gaps, counters.missed_frames) == (1, gap.missed)


def test_refusals_are_totalled_by_kind_not_by_peer():
    log = RefusalLog(Clock(), lambda line: None)
    for link in ("aa", "bb", "cc"):
        log.note("kernel link " + link, "bad tag", kind="kernel link")
    log.note("HTTP connections", "503")
    assert dict(log.totals) == {"kernel link": 3, "HTTP connections": 1}
    log.stop()


# -- a real server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    path = config_file(
        f'metrics_token = "{METRICS_TOKEN}"\n'
        "replay_bytes = 4096\nmax_kernels = 3\nlimit_cpu_seconds = 1\n"
    )
    running = start_server("--pool-size", "1", "--config", path)
    yield running
    running.stop()


def fetch(server, path: str, token: str | None, scheme: str = "token"):
    request = urllib.request.Request(server.url.rstrip("/") + path)
    if token is not None:
        request.add_header("Authorization", f"{scheme} {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read().decode()


def scrape(server, token: str | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample, by (name, sorted labels)."""
    status, headers, body = fetch(server, "/metrics", token or server.token)
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def test_metrics_need_the_owner_or_the_metrics_token(server):
    assert fetch(server, "/metrics", None)[0] == 403
    assert fetch(server, "/metrics", "wrong")[0] == 403
    assert fetch(server, "/metrics", server.token)[0] == 200
    assert fetch(server, "/metrics", METRICS_TOKEN, scheme="Bearer")[0] == 200
    assert fetch(server, f"/metrics?token={METRICS_TOKEN}", None)[0] == 200
    # The metrics token reads metrics and nothing else.
    status, _, body = fetch(server, "/api/kernels", METRICS_TOKEN)
    assert status == 403, body


def test_the_metrics_token_may_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CELLMUX_METRICS_TOKEN", "from-the-environment")
    running = start_server("--pool-size", "0")
    try:
        assert fetch(running, "/metrics", "from-the-environment", scheme="Bearer")[0] == 200
        assert fetch(running, "/metrics", METRICS_TOKEN)[0] == 403
    finally:
        running.stop()


def test_the_pool_and_starts_are_reported(server):
    samples = wait_for(lambda: (s := scrape(server)) and value(s, "cellmux_pool_ready") and s)
    assert value(samples, "cellmux_pool_size") == 1
    assert 1 <= value(samples, "cellmux_pool_target") <= value(samples, "cellmux_pool_max")
    assert value(samples, "cellmux_max_kernels") == 3
    assert value(samples, "cellmux_healthy") == 1
    assert value(samples, "cellmux_kernel_process_starts_total", outcome="ready") >= 1
    count = value(samples, "cellmux_kernel_process_start_seconds_count")
    assert count >= 1
    assert value(samples, "cellmux_kernel_process_start_seconds_bucket", le="+Inf") == count
    assert value(samples, "cellmux_kernel_process_start_seconds_sum") > 0


def test_values_move_as_code_runs(server):
    before = scrape(server)
    with server.client() as client:
        model = client.create_kernel()
        try:
            with client.connect(model.id) as kernel:
                assert kernel.execute("print('x' * 1000); 1+1").result_text == "2"
                share = client.share_kernel(model.id, "observer")
                with (
                    server.client(share["token"]) as observer_client,
                    observer_client.connect(model.id),
                ):
                    during = scrape(server)
                after = scrape(server)
        finally:
            client.delete_kernel(model.id)
    gone = scrape(server)

    def moved(name: str, **labels: str) -> float:
        return value(during, name, **labels) - value(before, name, **labels)

    assert moved("cellmux_kernels_created_total", source="pool") == 1
    assert value(during, "cellmux_kernel_create_seconds_count", source="pool") >= 1
    assert value(during, "cellmux_kernels", state="idle") == 1
    assert value(during, "cellmux_clients", role="owner") == 1
    assert value(during, "cellmux_clients", role="observer") == 1
    assert value(after, "cellmux_clients", role="observer") == 0
    # The request went to the kernel; its output (1000+ bytes) came back.
    assert moved("cellmux_frames_relayed_total", direction="to_kernels") >= 1
    assert moved("cellmux_bytes_relayed_total", direction="to_kernels") > 0
    assert moved("cellmux_frames_relayed_total", direction="from_kernels") >= 4
    assert moved("cellmux_bytes_relayed_total", direction="from_kernels") > 1000
    assert value(during, "cellmux_kernel_memory_bytes", kernel=model.id) > 10 * 2**20
    assert ("cellmux_kernel_memory_bytes", (("kernel", model.id),)) not in gone


def test_a_gap_is_counted(server):
    before = value(scrape(server), "cellmux_replay_gaps_total")
    with server.client() as client:
        model = client.create_kernel()
        try:
            with client.connect(model.id) as kernel:
                # Far more than the 4 KiB replay log holds.
                kernel.execute("for i in range(300): print('y' * 100, flush=True)")
            with client.connect(model.id, cursor=1) as again:
                wait_for(lambda: again.gaps)
        finally:
            client.delete_kernel(model.id)
    samples = scrape(server)
    assert value(samples, "cellmux_replay_gaps_total") == before + 1
    assert value(samples, "cellmux_replay_missed_frames_total") >= 1


def test_limits_hit_are_counted(server):
    with server.client() as client:
        # max_kernels = 3: the fourth process (pool refills count) is refused.
        models = []
        try:
            for _ in range(4):
                try:
                    models.append(client.create_kernel())
                except Exception as e:
                    assert "at most 3 kernels" in str(e) or "503" in str(e), e
            samples = scrape(server)
            assert value(samples, "cellmux_limits_hit_total", limit="max_kernels") >= 1
            # limit_cpu_seconds = 1: a busy loop ends its kernel.
            with (
                client.connect(models[0].id) as kernel,
                contextlib.suppress(Exception),  # the kernel dies under it
            ):
                kernel.execute("while True: pass", timeout=60)
            wait_for(
                lambda: value(scrape(server), "cellmux_limits_hit_total", limit="cpu") == 1,
                timeout=60,
                interval=0.5,
            )
            samples = scrape(server)
            assert value(samples, "cellmux_kernels", state="dead") == 1
            assert value(samples, "cellmux_limits_hit_total", limit="memory") == 0
        finally:
            for model in models:
                client.delete_kernel(model.id)


def test_the_exposition_is_well_formed(server):
    _, _, body = fetch(server, "/metrics", server.token)
    names = [f.name for f in text_string_to_metric_families(body)]
    assert len(names) == len(set(names))
    assert all(name.startswith("cellmux_") for name in names)
    assert json.dumps(names)  # plain strings
    assert time.time() - value(scrape(server), "cellmux_start_time_seconds") < 3600

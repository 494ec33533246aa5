"""A flood on the kernel link costs its sender, not the neighbours.

Two floods, each against a server of its own, while a bystander kernel runs
``1 + 1`` over and over: junk from a peer with a made-up link id (connected
to a starting kernel's endpoint before its pump, from outside any sandbox),
and junk a kernel sends on its own authenticated link (its code takes over
its pump thread). The bystander's round trips stay short, the log stays
small, and the server lives.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import start_server

#: The bound the brief sets for a bystander's p99 on two loaded cores.
P99_BOUND = 0.5
FLOOD_SECONDS = 8.0


@pytest.fixture
def own_server():
    running = start_server("--pool-size", "1", "--max-kernels", "10")
    yield running
    running.stop()
    shutil.rmtree(running.runtime_dir, ignore_errors=True)


def _round_trips(kernel, seconds: float) -> list[float]:
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        assert kernel.execute("1 + 1", timeout=30).result_text == "2"
        times.append(time.perf_counter() - started)
    return times


def _p99(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _report(name: str, times: list[float], log_growth: int, extra: str = "") -> None:
    ordered = sorted(times)
    print(
        f"\n{name}: {len(times)} round trips, median {ordered[len(ordered) // 2] * 1000:.1f} ms, "
        f"p99 {_p99(times) * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms; "
        f"log grew {log_growth} bytes{extra}"
    )


def test_junk_from_a_made_up_link_id_does_not_starve_a_bystander(own_server):
    server = own_server
    links_dir = os.path.join(server.runtime_dir, "rt", "links")
    with server.client() as client:
        bystander_id = client.create_kernel().id
        with client.connect(bystander_id) as bystander:
            quiet = _round_trips(bystander, 1.0)
            flooder = subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(os.path.dirname(__file__), "link_intruder.py"),
                    links_dir,
                    str(FLOOD_SECONDS),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert flooder.stdout.readline().strip() == "watching"
                # Handing out the pooled kernel forks its replacement: the
                # flooder connects to that one's endpoint before its pump.
                other = client.create_kernel().id
                assert flooder.stdout.readline().strip() == "connected"
                log_before = os.path.getsize(server.log_path)
                loaded = _round_trips(bystander, FLOOD_SECONDS - 2.0)
                sent = int(flooder.stdout.readline())
                flooder.wait(30)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    flooder.kill()
                flooder.wait()
            log_growth = os.path.getsize(server.log_path) - log_before
            _report("made-up link id", loaded, log_growth, f"; {sent} junk messages sent")
            assert server.alive()
            assert sent > 10_000  # a real flood
            assert _p99(loaded) < P99_BOUND, (_p99(quiet), _p99(loaded))
            assert log_growth < 20_000
            # The kernel whose endpoint the flooder used runs too.
            with client.connect(other) as k:
                assert k.execute("'fine'", timeout=30).result_text == "'fine'"


HIJACK = """
import threading, time
import cellmux.kernel.pump as pump
real = pump.Pump._from_server
junk = [b"\\x00\\x00\\x00\\x00", b"not a control message"]

def flood(self, msg, link, to_kernel):
    pump.Pump._from_server = real
    end = time.monotonic() + {seconds}
    sent = 0
    while time.monotonic() < end:
        link.send_multipart(junk)
        sent += 1
    open("flood.count", "w").write(str(sent))
    return real(self, msg, link, to_kernel)

pump.Pump._from_server = flood
"""


def test_a_kernel_flooding_its_own_link_does_not_starve_a_bystander(own_server):
    server = own_server
    with server.client() as client:
        bystander_id = client.create_kernel().id
        hostile_id = client.create_kernel().id
        with client.connect(bystander_id) as bystander, client.connect(hostile_id) as hostile:
            notes = []
            lock = threading.Lock()

            def watch(frame) -> None:
                if any(b"dropped a kernel message" in bytes(p) for p in frame.parts):
                    with lock:
                        notes.append(frame)

            hostile.add_listener(watch)
            log_before = os.path.getsize(server.log_path)
            # The pump thread floods from the next message the server sends
            # it (a ping, at most half a second away).
            result = hostile.execute(HIJACK.format(seconds=FLOOD_SECONDS - 2.0), timeout=30)
            assert result.error is None, result.error
            time.sleep(0.6)
            loaded = _round_trips(bystander, FLOOD_SECONDS - 3.0)
            time.sleep(2.0)
            sent = int(hostile.execute("print(open('flood.count').read())", timeout=60).stdout)
            log_growth = os.path.getsize(server.log_path) - log_before
            _report("own link", loaded, log_growth, f"; {sent} junk messages sent")
            assert server.alive()
            assert sent > 10_000
            assert _p99(loaded) < P99_BOUND
            assert log_growth < 20_000
            # Its clients were told, once and then in sums, not per message.
            time.sleep(10.5)
            with lock:
                assert 1 <= len(notes) <= 4, len(notes)
            assert hostile.execute("6 * 7", timeout=30).result_text == "42"

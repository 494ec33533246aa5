"""Sessions that survive: many clients, replay, backpressure, liveness."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from cellmux.client import AsyncClient
from cellmux.protocol import Channel
from conftest import rss, run_async, start_server, wait_for

OUTPUT_CHANNELS = {Channel.STDOUT, Channel.STDERR, Channel.DISPLAY, Channel.STATUS}


def is_idle_for(frame, msg_id: str) -> bool:
    """Whether a frame is the idle status that ends request C{msg_id}."""
    return (
        frame.channel == Channel.STATUS
        and b'"idle"' in frame.parts[3]
        and json.loads(frame.parts[1]).get("msg_id") == msg_id
    )


def stdout_text(frames) -> str:
    return "".join(json.loads(f.parts[3])["text"] for f in frames if f.channel == Channel.STDOUT)


def test_two_writers_three_observers_see_the_same_stream(client):
    model = client.create_kernel()
    seen: dict[str, list] = {name: [] for name in ("w1", "w2", "o1", "o2", "o3")}
    conns = {name: client.connect(model.id, listener=seen[name].append) for name in seen}
    try:
        # compare what was numbered once everyone was attached
        start = max(conn.last_seq for conn in conns.values())
        w1, w2 = conns["w1"], conns["w2"]
        r1 = w1.execute("for i in range(300): print('one', i)")
        r2 = w2.execute("import sys\nfor i in range(300): print('two', i, file=sys.stderr)")
        prompts = {}
        answer = w2.execute(
            "print(input('who? '))", on_stdin=lambda p, pw: prompts.setdefault("w2", p) and "w2"
        )
        assert r1.ok and r2.ok and answer.stdout == "w2\n"
        assert prompts == {"w2": "who? "}
        for conn in conns.values():
            conn.ping()  # the server sent everything before this pong
        streams = {
            name: [
                (f.seq, f.channel, f.parts)
                for f in frames
                if f.channel in OUTPUT_CHANNELS and f.seq > start
            ]
            for name, frames in seen.items()
        }
        reference = streams["o1"]
        assert stdout_text(seen["o1"]).splitlines()[-2] == "one 299"
        assert "two 299" in _stderr(seen["o1"])
        assert all(stream == reference for stream in streams.values())
        # stdin went to the writer that asked, and to nobody else
        stdin_seen = {name for name, frames in seen.items() if any(f.channel == 1 for f in frames)}
        assert stdin_seen == {"w2"}
    finally:
        for conn in conns.values():
            conn.close()
        client.delete_kernel(model.id)


def test_reconnect_with_cursor_gets_every_line_exactly_once(server):
    async def run() -> tuple[str, list]:
        client = AsyncClient(server.url, token=server.token)
        model = await client.create_kernel()
        first: list = []
        k1 = await client.connect(model.id, listener=first.append)
        msg_id = await k1.send(
            "execute_request",
            {"code": "for i in range(100000): print(i)", "silent": False, "allow_stdin": False},
        )
        while stdout_text(first).count("\n") < 5000:  # well into the stream...
            await asyncio.sleep(0.01)
        cursor = k1.last_seq
        await k1.close()  # ...the connection drops
        await asyncio.sleep(0.5)
        second: list = []
        done = asyncio.Event()

        def collect(frame) -> None:
            second.append(frame)
            if is_idle_for(frame, msg_id):
                done.set()

        k2 = await client.connect(model.id, cursor=cursor, listener=collect)
        await asyncio.wait_for(done.wait(), 60)
        await k2.close()
        await client.delete_kernel(model.id)
        kept = [f for f in first if f.seq <= cursor]
        return stdout_text(kept) + stdout_text(second), k2.gaps

    text, gaps = run_async(run())
    assert gaps == []
    assert text == "".join(f"{i}\n" for i in range(100000))


def test_reconnect_past_the_log_gets_a_gap_notice():
    server = start_server("--pool-size", "1", "--config", _config("replay_bytes = 20000"))
    try:
        with server.client() as client:
            model = client.create_kernel()
            with client.connect(model.id) as k:
                start = k.last_seq
                k.execute("for i in range(20): print('x' * 5000, flush=True)")
            frames: list = []
            with client.connect(model.id, cursor=start, listener=frames.append) as again:
                again.ping()
                assert len(again.gaps) == 1
                first, last = again.gaps[0]
                assert first == start + 1
                # after the gap, the frames that were kept, in order, no holes
                seqs = [f.seq for f in frames if f.seq]
                assert seqs == list(range(last + 1, last + 1 + len(seqs)))
    finally:
        server.stop()


def _config(text: str) -> str:
    from conftest import config_file

    return config_file(text)


def test_slow_writer_slows_the_kernel_not_the_server_memory():
    """A million lines to a client that reads slowly: all arrive, memory bounded."""
    replay = 2 * 1024 * 1024
    server = start_server("--pool-size", "1", "--config", _config(f"replay_bytes = {replay}"))
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss(server.process.pid))
            time.sleep(0.05)

    async def run() -> tuple[str, list]:
        client = AsyncClient(server.url, token=server.token)
        model = await client.create_kernel()
        frames: list = []
        done = asyncio.Event()
        msg_ids = []

        async def slow(frame) -> None:
            frames.append(frame)
            if frame.channel == Channel.STDOUT:
                await asyncio.sleep(0.002)  # a slow reader: the TCP window fills
            if msg_ids and is_idle_for(frame, msg_ids[0]):
                done.set()

        k = await client.connect(model.id, listener=slow)
        msg_ids.append(
            await k.send(
                "execute_request",
                {"code": "for i in range(1000000): print(i)", "silent": False},
            )
        )
        await asyncio.wait_for(done.wait(), 600)
        await k.close()
        await client.delete_kernel(model.id)
        return stdout_text(frames), k.gaps

    baseline = rss(server.process.pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        text, gaps = run_async(run())
    finally:
        stop.set()
        sampler.join()
        server.stop()
    assert gaps == []
    assert text == "".join(f"{i}\n" for i in range(1000000))
    # The server holds at most the replay log plus one credit window in
    # flight (both a few MiB), never the 6.9 MB of output.
    growth = peak[0] - baseline
    assert growth < replay + 4 * 1024 * 1024 + 8 * 1024 * 1024, f"grew {growth} bytes"


def test_slow_observer_does_not_slow_the_writer(client):
    """The writer finishes while a stalled observer is still far behind."""
    model = client.create_kernel()

    async def run() -> tuple[int, int, list]:
        ac = AsyncClient(client.url, token=client.async_client.token)
        release = asyncio.Event()
        observed: list = []

        async def stalled(frame) -> None:
            observed.append(frame)
            if len(observed) == 3:
                await release.wait()  # stop reading entirely

        observer = await ac.connect(model.id, listener=stalled)
        writer = await ac.connect(model.id)
        result = await writer.execute("for i in range(300000): print(i)", timeout=300)
        assert result.stdout == "".join(f"{i}\n" for i in range(300000))
        behind = len(observed)
        release.set()
        await observer.ping(timeout=120)  # it catches up (or is told of a gap)
        await observer.close()
        await writer.close()
        return behind, len(observed), observer.gaps

    behind, caught_up, gaps = run_async(run())
    client.delete_kernel(model.id)
    assert behind < 50  # it was stalled while the writer went on to the end
    assert caught_up > behind
    assert gaps or caught_up >= 10


def test_gil_holding_code_shows_unresponsive_then_recovers(kernel):
    states: list[str] = []
    kernel.on_status = states.append
    result = kernel.execute("import ctypes; ctypes.PyDLL(None).sleep(5)", timeout=60)
    assert result.ok
    assert "unresponsive" in states
    after = states[states.index("unresponsive") + 1 :]
    assert "idle" in after
    assert kernel.execute("1 + 1").result_text == "2"


def test_interrupt_works_while_unresponsive(kernel):
    states: list[str] = []
    kernel.on_status = states.append

    def interrupt_when_unresponsive() -> None:
        wait_for(lambda: "unresponsive" in states, timeout=20)
        kernel.interrupt()

    threading.Thread(target=interrupt_when_unresponsive, daemon=True).start()
    result = kernel.execute("import ctypes; ctypes.PyDLL(None).sleep(30)", timeout=60)
    assert result.error is not None and result.error.ename == "KeyboardInterrupt"


def test_auto_restart_brings_the_session_back():
    server = start_server("--pool-size", "1", "--config", _config("auto_restart = true"))
    try:
        with server.client() as client:
            model = client.create_kernel()
            states: list[str] = []
            with client.connect(model.id) as k:
                k.on_status = states.append
                with pytest.raises(Exception, match="exit code 1"):
                    k.execute("import os; os._exit(1)", timeout=20)
                wait_for(lambda: client.get_kernel(model.id).execution_state == "idle", 30)
                assert "dead" in states and "restarting" in states
                assert k.execute("'back'").result_text == "'back'"
            assert client.get_kernel(model.id).id == model.id
    finally:
        server.stop()


def test_input_waits_for_its_client_to_come_back(server):
    async def run() -> str:
        client = AsyncClient(server.url, token=server.token)
        model = await client.create_kernel()

        async def connect_and_wait_for_prompt():
            prompts: asyncio.Queue = asyncio.Queue()
            k = await client.connect(
                model.id,
                session="same-session",
                listener=lambda f: f.channel == Channel.STDIN and prompts.put_nowait(f),
            )
            return k, prompts

        first, prompts = await connect_and_wait_for_prompt()
        await first.send(
            "execute_request", {"code": "x = input('q? ')", "silent": False, "allow_stdin": True}
        )
        await asyncio.wait_for(prompts.get(), 30)
        await first.close()  # gone before answering
        await asyncio.sleep(0.5)
        # The same session comes back (a page reload): the prompt is still there.
        again, prompts = await connect_and_wait_for_prompt()
        prompt = await asyncio.wait_for(prompts.get(), 10)
        await again.send("input_reply", {"value": "later"}, parent=json.loads(prompt.parts[0]))
        value = await again.execute("x", timeout=30)
        await again.close()
        await client.delete_kernel(model.id)
        return value.result_text

    assert run_async(run()) == "'later'"


def test_unanswered_input_ends_in_eoferror_after_the_timeout():
    server = start_server("--pool-size", "1", "--config", _config("stdin_timeout = 1.5"))
    try:
        with server.client() as client:
            model = client.create_kernel()
            frames: list = []
            asked: list = []
            with client.connect(model.id, listener=frames.append) as observer:
                with client.connect(model.id, listener=asked.append) as asker:
                    asker.send(
                        "execute_request",
                        {"code": "input('q? ')", "silent": False, "allow_stdin": True},
                    )
                    wait_for(lambda: any(f.channel == Channel.STDIN for f in asked), 30)
                # the asker left without answering; the observer sees the end
                wait_for(lambda: "EOFError" in _errors(frames), timeout=30)
                assert "no client answered this input request" in _stderr(frames)
                # ipykernel aborts requests that arrive right after an error
                # (stop_on_error); the kernel itself is fine.
                wait_for(lambda: observer.execute("1 + 1").result_text == "2", 20, 0.2)
    finally:
        server.stop()


def _errors(frames) -> str:
    return " ".join(
        json.loads(f.parts[3]).get("ename", "") for f in frames if f.channel == Channel.DISPLAY
    )


def _stderr(frames) -> str:
    return "".join(
        json.loads(f.parts[3]).get("text", "") for f in frames if f.channel == Channel.STDERR
    )


def test_history_keeps_what_clients_executed(kernel):
    kernel.execute("a = 1")
    kernel.execute("b = a + 1")
    codes = [h["code"] for h in kernel.history()]
    assert codes[-2:] == ["a = 1", "b = a + 1"]


def test_idle_kernels_without_clients_are_culled_with_a_reason():
    server = start_server(
        "--pool-size", "1", "--config", _config("idle_timeout = 2.0\nmax_lifetime = 30.0")
    )
    try:
        with server.client() as client:
            idle = client.create_kernel()
            watched = client.create_kernel()
            with client.connect(watched.id) as k:
                wait_for(lambda: idle.id not in [m.id for m in client.list_kernels()], 20)
                # the kernel with a client attached is kept alive
                assert k.execute("'alive'").result_text == "'alive'"
            assert "idle timeout" in server.log()
    finally:
        server.stop()


def test_lifetime_limit_ends_a_kernel_and_tells_its_client():
    server = start_server("--pool-size", "1", "--config", _config("max_lifetime = 3.0"))
    try:
        with server.client() as client:
            model = client.create_kernel()
            states: list[str] = []
            with client.connect(model.id) as k:
                k.on_status = states.append
                wait_for(lambda: k.dead_cause is not None, 20)
                assert k.dead_cause == "lifetime limit (3 s)"
    finally:
        server.stop()

"""The server record is kept current off the reactor thread (RecordKeeper).

A real reactor, its real thread pool and real files; a record whose writes
can be held back stands in for a slow disk.
"""

from __future__ import annotations

import json
import threading
import time

from twisted.internet import defer, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from cellmux.server.orphans import RecordKeeper, ServerRecord
from db_fixtures import reactor_thread


class SlowRecord(ServerRecord):
    """Writes wait for C{release}; each write's thread and kernels are kept."""

    def __init__(self, state_dir: str, runtime_dir: str) -> None:
        super().__init__(state_dir, runtime_dir)
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Semaphore(0)
        self.writes: list[tuple[str, dict[str, int]]] = []

    def write(self, kernels: dict[str, int], processes: dict[str, int] | None = None) -> None:
        self.writes.append((threading.current_thread().name, dict(kernels)))
        self.started.release()
        if not self.release.wait(10):
            raise TimeoutError("the test never released the write")
        super().write(kernels, processes)


def _contents(record: ServerRecord) -> list[str]:
    """The kernel ids the record names."""
    return json.loads(record.path.read_text())["kernels"]


def _keeper(tmp_path, kernels: dict[str, int]):
    record = SlowRecord(str(tmp_path / "state"), str(tmp_path / "runtime"))
    rt = reactor_thread()
    keeper = rt.call(lambda: RecordKeeper(rt.reactor, record, lambda: dict(kernels), 0.005))
    return rt, record, keeper


def _settle(rt, seconds: float = 0.1) -> None:
    rt.call(lambda: task.deferLater(rt.reactor, seconds, lambda: None))


def test_a_burst_of_changes_is_one_write_in_another_thread(tmp_path):
    kernels = {"a": 1}
    rt, record, keeper = _keeper(tmp_path, kernels)
    rt.call(lambda: [keeper.changed() for _ in range(10)])
    _settle(rt)
    assert len(record.writes) == 1
    thread, written = record.writes[0]
    assert thread != rt._thread.name and written == {"a": 1}
    assert _contents(record) == ["a"]
    rt.call(keeper.close)
    assert not record.path.exists()


def test_a_change_during_a_slow_write_is_written_after_it(tmp_path):
    kernels = {"a": 1}
    rt, record, keeper = _keeper(tmp_path, kernels)
    record.release.clear()
    rt.call(keeper.changed)
    assert record.started.acquire(timeout=5)
    # The reactor goes on while the disk is slow.
    t0 = time.monotonic()
    _settle(rt, 0.01)
    assert time.monotonic() - t0 < 1
    kernels["b"] = 2
    rt.call(keeper.changed)
    rt.call(keeper.changed)
    _settle(rt, 0.05)
    assert len(record.writes) == 1  # never two at once
    record.release.set()
    _settle(rt)
    assert [w for _, w in record.writes] == [{"a": 1}, {"a": 1, "b": 2}]
    assert _contents(record) == ["a", "b"]
    rt.call(keeper.close)


def test_close_waits_for_the_write_then_removes_the_record(tmp_path):
    rt, record, keeper = _keeper(tmp_path, {"a": 1})
    record.release.clear()
    rt.call(keeper.changed)
    assert record.started.acquire(timeout=5)
    closed = []

    def close():
        d = defer.ensureDeferred(keeper.close())
        d.addCallback(closed.append)

    rt.call(close)
    _settle(rt, 0.05)
    assert closed == []  # still writing
    record.release.set()
    _settle(rt)
    assert closed == [None]
    assert not record.path.exists()
    rt.call(keeper.changed)  # too late: nothing more is written
    _settle(rt)
    assert len(record.writes) == 1 and not record.path.exists()


def test_a_failed_write_is_logged_and_the_next_one_works(tmp_path):
    kernels = {"a": 1}
    rt, record, keeper = _keeper(tmp_path, kernels)
    warnings = []

    def observe(event):
        if event.get("log_level") == LogLevel.warn:
            warnings.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    state = record.path.parent
    state.rename(tmp_path / "elsewhere")  # the write fails with an OSError
    try:
        rt.call(keeper.changed)
        _settle(rt)
    finally:
        (tmp_path / "elsewhere").rename(state)
        globalLogPublisher.removeObserver(observe)
    assert not record.path.exists()
    assert any("cannot write the server record" in w for w in warnings), warnings
    kernels["b"] = 2
    rt.call(keeper.changed)
    _settle(rt)
    assert _contents(record) == ["a", "b"]
    rt.call(keeper.close)


def test_a_failed_write_is_retried_without_another_change(tmp_path, monkeypatch):
    monkeypatch.setattr("cellmux.server.orphans.RETRY_SECONDS", 0.05)
    rt, record, keeper = _keeper(tmp_path, {"a": 1})
    state = record.path.parent
    state.rename(tmp_path / "elsewhere")  # the write fails with an OSError
    try:
        rt.call(keeper.changed)
        _settle(rt)
        assert not record.path.exists() and len(record.writes) >= 1
    finally:
        (tmp_path / "elsewhere").rename(state)
    _settle(rt, 0.2)
    assert _contents(record) == ["a"]
    # Nothing but the record in the directory: no temporary files.
    assert [p.name for p in state.iterdir()] == [record.path.name]
    rt.call(keeper.close)

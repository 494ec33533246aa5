"""FileNotices scans a kernel's directory after it went idle, but not in the
reactor turn that relays the idle: the reply and the idle are written to
the clients on the next poll, and a scan's thread started in that turn took
the GIL and a core from them. Clock-driven; the scan itself is stood in for."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer, task

from cellmux.server import files
from cellmux.server.kernels import AFTER_RESPONSE


def _setup(tmp_path, monkeypatch):
    clock = task.Clock()
    kernel = SimpleNamespace(id="k1", incarnation=SimpleNamespace(host=None, workdir=str(tmp_path)))
    manager = SimpleNamespace(clock=clock, kernels={"k1": kernel}, hosts=None)
    scans: list[defer.Deferred] = []

    def scan_of(_manager, scanned):
        assert scanned is kernel
        d: defer.Deferred = defer.Deferred()
        scans.append(d)
        return d

    monkeypatch.setattr(files, "_scan_of", scan_of)
    return clock, kernel, manager, scans, files.FileNotices(manager)


def test_the_scan_starts_after_the_turn_that_relayed_the_idle(tmp_path, monkeypatch):
    clock, kernel, _manager, scans, notices = _setup(tmp_path, monkeypatch)
    notices(kernel)
    assert scans == [], "was: a thread started in the idle's own turn"
    clock.advance(AFTER_RESPONSE)
    assert len(scans) == 1
    scans[0].callback(({}, False))  # nothing new: no notice
    clock.advance(1)
    assert len(scans) == 1


def test_idles_while_a_scan_waits_or_runs_make_one_more_scan(tmp_path, monkeypatch):
    clock, kernel, _manager, scans, notices = _setup(tmp_path, monkeypatch)
    notices(kernel)
    notices(kernel)  # while the scan waits to start
    clock.advance(AFTER_RESPONSE)
    notices(kernel)  # while it runs
    assert len(scans) == 1
    scans[0].callback(({}, False))
    clock.advance(AFTER_RESPONSE)
    assert len(scans) == 2
    scans[1].callback(({}, False))
    clock.advance(1)
    assert len(scans) == 2


def test_a_kernel_deleted_before_its_scan_is_not_scanned(tmp_path, monkeypatch):
    clock, kernel, manager, scans, notices = _setup(tmp_path, monkeypatch)
    notices(kernel)
    del manager.kernels["k1"]
    clock.advance(AFTER_RESPONSE)
    assert scans == []
    manager.kernels["k1"] = kernel  # (a later idle of a kernel with that id scans again)
    notices(kernel)
    clock.advance(AFTER_RESPONSE)
    assert len(scans) == 1

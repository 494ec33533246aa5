"""The server record is rewritten on every change: with a thousand kernels,
only what changed is encoded again, and the file says what it said before
(real files in tmp_path; the processes' identities are given, not read)."""

from __future__ import annotations

import json

from cellmux.server import orphans
from cellmux.server.orphans import ProcessIdentity, ServerRecord


def _written_record(tmp_path) -> tuple[ServerRecord, dict[str, int], dict[str, int]]:
    """A record of 1,000 processes, half of them kernels (the others
    pooled), written once: the record, its kernels and its processes."""
    record = ServerRecord(str(tmp_path / "state"), str(tmp_path / "rt"))
    n = 1000
    processes = {f"{i:032x}": 100_000 + i for i in range(n)}
    kernels = {f"k{i}": 100_000 + i for i in range(0, n, 2)}
    for link, pid in processes.items():
        record._identities[link] = ProcessIdentity(pid, 12_345, "boot", 2_000 + pid)
    record.write(kernels, processes)
    return record, kernels, processes


def test_a_rewrite_encodes_only_the_changed_entries_and_reads_back_whole(tmp_path, monkeypatch):
    record, kernels, processes = _written_record(tmp_path)
    encoded: list[int] = []
    real = ProcessIdentity.to_json
    monkeypatch.setattr(
        ProcessIdentity, "to_json", lambda self: encoded.append(self.pid) or real(self)
    )
    kernels["k1"] = 100_001  # a pooled process is taken by a kernel
    del processes[f"{998:032x}"]  # a kernel ended
    record.write(kernels, processes)
    kernel_processes = [pid for pid in encoded if pid >= 100_000]  # not the server's own
    assert kernel_processes == [100_001], "was: every entry, on every write"
    data = json.loads(record.path.read_text())
    assert data["kernels"] == sorted(kernels)
    by_link = {e["link"]: e for e in data["processes"]}
    assert set(by_link) == set(processes)
    assert by_link[f"{1:032x}"] == {
        "link": f"{1:032x}",
        "kernel": "k1",
        **ProcessIdentity(100_001, 12_345, "boot", 102_001).to_json(),
    }
    assert by_link[f"{2:032x}"]["kernel"] == "k2" and by_link[f"{3:032x}"]["kernel"] is None
    assert data["version"] == orphans.RECORD_VERSION


def test_a_rewrite_reads_only_the_processes_that_changed(tmp_path, monkeypatch):
    """The writer thread holds the GIL for any Python work per process: a
    rewrite after one create looks at that one process, not the thousand."""
    record, kernels, processes = _written_record(tmp_path)
    looked_at: list[str] = []
    real = ServerRecord._identity
    monkeypatch.setattr(
        ServerRecord,
        "_identity",
        lambda self, link, pid: looked_at.append(link) or real(self, link, pid),
    )
    kernels["k1"] = 100_001  # a pooled process is taken by a kernel
    record.write(dict(kernels), dict(processes))
    assert looked_at == [f"{1:032x}"], f"was: every process ({len(looked_at)})"
    looked_at.clear()
    record.write(dict(kernels), dict(processes))  # nothing changed
    assert looked_at == []
    # A link whose process was replaced (a restart), one gone, one new.
    processes[f"{4:032x}"] = 200_004
    record._identities[f"{4:032x}"] = ProcessIdentity(200_004, 54_321, "boot", 9_004)
    kernels["k4"] = 200_004
    del processes[f"{6:032x}"], kernels["k6"]
    processes["f" * 32] = 300_000
    record._identities["f" * 32] = ProcessIdentity(300_000, 1, "boot", 9_999)
    record.write(dict(kernels), dict(processes))
    assert sorted(looked_at) == sorted([f"{4:032x}", "f" * 32])
    data = json.loads(record.path.read_text())
    by_link = {e["link"]: e for e in data["processes"]}
    assert set(by_link) == set(processes)
    assert by_link[f"{4:032x}"]["pid"] == 200_004 and by_link[f"{4:032x}"]["kernel"] == "k4"
    assert by_link["f" * 32]["kernel"] is None
    assert by_link[f"{1:032x}"]["kernel"] == "k1"
    assert data["kernels"] == sorted(kernels)
    assert set(record.kernel_identities()) == set(processes)

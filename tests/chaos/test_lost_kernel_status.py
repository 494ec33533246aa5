"""A kernel id lost with a crashed server answers 404 on REST, saying why."""

from __future__ import annotations

import signal
from pathlib import Path

from conftest import wait_for

from .helpers import http, running_server


def test_rest_answers_404_with_a_reason_for_a_kernel_of_a_crashed_server(tmp_path):
    state_dir = str(tmp_path / "state")
    with running_server("--pool-size", "1", "--state-dir", state_dir) as first:
        with first.client() as client:
            kept = client.create_kernel()
        records = Path(state_dir, "servers")
        # the server writes its record of kernels in the background
        wait_for(lambda: any(kept.id in p.read_text() for p in records.glob("*")), 10)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
    with running_server("--pool-size", "1", "--state-dir", state_dir) as second:
        for method, path in [
            ("GET", f"/api/kernels/{kept.id}"),
            ("POST", f"/api/kernels/{kept.id}/restart"),
            ("DELETE", f"/api/kernels/{kept.id}"),
        ]:
            status, body = http(second, method, path)
            # was 400: KernelLost was missing from the API's own status table
            assert status == 404, (method, path, status, body)
            assert "was lost when its server stopped" in body["message"]
        status, body = http(second, "GET", f"/api/kernels/{'0' * 8}")
        assert (status, body["message"]) == (404, f"no kernel {'0' * 8}")

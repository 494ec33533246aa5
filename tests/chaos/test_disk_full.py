"""Full disks: the runtime directory's, the database's, the state directory's.

Each is a small tmpfs the test mounts (we run as root) and fills with a
ballast file. The server keeps serving what it can, answers what it cannot
with a clear JSON error (507 for kernel files, 503 for the database), keeps
everything it acknowledged, leaves no partial file, and recovers by itself
once the ballast is gone.
"""

from __future__ import annotations

import json
import os
import time

from .records_support import fill, http, serving, small_disk, wait_until


def _partial_uploads(root) -> list[str]:
    return [
        os.path.join(d, f)
        for d, _dirs, files in os.walk(root)
        for f in files
        if f.startswith(".cellmux-upload-")
    ]


def test_a_full_runtime_disk_refuses_new_kernels_and_uploads_and_recovers(tmp_path):
    with small_disk(tmp_path / "rt", "64m") as disk:
        with serving(tmp_path, "--pool-size", "1") as server, server.client() as client:
            running = client.create_kernel()
            with client.connect(running.id) as kernel:
                kernel.execute("x = 41")
                ballast = fill(disk)
                # A kernel already waiting in the pool is handed out; the
                # next needs a fresh process, and a disk to write on.
                statuses = [http(server, "POST", "/api/kernels", {}) for _ in range(3)]
                refused = [body for status, body in statuses if status == 507]
                assert refused, statuses
                assert all(s in (201, 507) for s, _ in statuses), statuses
                assert "full" in refused[0]["message"]
                status, body = http(
                    server, "PUT", f"/files/{running.id}/upload.bin", raw=b"u" * 200_000
                )
                assert status == 507 and "not stored" in body["message"], (status, body)
                assert _partial_uploads(disk) == []
                # What runs goes on: its state, its answers.
                assert kernel.execute("x + 1").result_text == "42"
                status, files = http(server, "GET", f"/files/{running.id}/")
                assert status == 200 and files["files"] == []

                ballast.unlink()
                assert wait_until(lambda: http(server, "POST", "/api/kernels", {})[0] == 201, 30)
                status, body = http(
                    server, "PUT", f"/files/{running.id}/upload.bin", raw=b"u" * 200_000
                )
                assert status == 201 and body["size"] == 200_000
                assert kernel.execute("len(open('upload.bin','rb').read())").result_text == (
                    "200000"
                )
            assert "Traceback" not in server.log()  # refusals are answers, not crashes
        # Stopped: every kernel's directory went with it.
        assert os.listdir(disk / "kernels") == []


def test_a_full_database_disk_answers_503_keeps_what_it_stored_and_recovers(tmp_path):
    database = tmp_path / "db" / "permalinks.sqlite3"
    stored: dict[str, str] = {}
    with small_disk(tmp_path / "db", "4m") as disk:
        with serving(tmp_path, "--pool-size", "0", database=str(database)) as server:
            for i in range(3):
                status, body = http(server, "POST", "/permalink", {"code": f"print({i})"})
                assert status == 201
                stored[body["id"]] = f"print({i})"
            ballast = fill(disk)
            refused = None
            for i in range(20):  # pages SQLite already holds may take a few
                code = f"# {i}\n" + "x" * 200_000
                status, body = http(server, "POST", "/permalink", {"code": code})
                if status == 201:
                    stored[body["id"]] = code
                    continue
                refused = (status, body)
                break
            assert refused is not None and refused[0] == 503, refused
            assert "full" in refused[1]["message"]
            for pid, code in stored.items():  # everything acknowledged is there
                status, body = http(server, "GET", f"/permalink/{pid}")
                assert status == 200 and body["code"] == code
            # Kernels do not need that disk.
            with server.client() as client, client.connect(client.create_kernel().id) as kernel:
                assert kernel.execute("1 + 2").result_text == "3"
            ballast.unlink()
            status, body = http(server, "POST", "/permalink", {"code": "print('after')"})
            assert status == 201
            stored[body["id"]] = "print('after')"
        # And after a restart.
        with serving(tmp_path, "--pool-size", "0", database=str(database)) as server:
            for pid, code in stored.items():
                status, body = http(server, "GET", f"/permalink/{pid}")
                assert status == 200 and body["code"] == code


def test_a_full_state_disk_leaves_no_temporary_record_and_recovers(tmp_path):
    state = tmp_path / "state"
    with small_disk(state, "4m") as disk:
        with serving(tmp_path, "--pool-size", "0") as server:
            status, made = http(server, "POST", "/permalink", {"code": "print('first')"})
            assert status == 201
            servers = state / "servers"
            (record,) = servers.glob("*.json")
            ballast = fill(disk)
            with server.client() as client:
                first = client.create_kernel()
                assert wait_until(lambda: "cannot write the server record" in server.log())
                time.sleep(0.3)
                assert [p.name for p in servers.iterdir()] == [record.name]
                # The default database shares the disk: reads go on.
                status, body = http(server, "GET", f"/permalink/{made['id']}")
                assert status == 200 and body["code"] == "print('first')"
                ballast.unlink()
                second = client.create_kernel()

                def recorded() -> bool:
                    return set(json.loads(record.read_text())["kernels"]) == {first.id, second.id}

                assert wait_until(recorded)
                assert [p.name for p in servers.iterdir()] == [record.name]
        assert list(servers.iterdir()) == []

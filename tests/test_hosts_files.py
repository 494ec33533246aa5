"""``/files`` of kernels on kernel hosts: relayed by the front to the host,
which does the file system work with the single server's own checks.
Real ``cellmux serve`` and ``cellmux host`` processes on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import time
import urllib.parse
from collections.abc import Iterator

import pytest

from conftest import wait_for
from test_files import _file_notices, request
from test_hosts import Cluster, running_cluster, server_status

MiB = 1024 * 1024


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with running_cluster() as running:
        yield running


def on_host(cluster: Cluster, name: str = "a"):
    host = cluster.host(name)
    wait_for(lambda: cluster.admitted(name), timeout=60)
    wait_for(lambda: [h["pool"] for h in server_status(cluster.front)["hosts"]] == [1], timeout=60)
    return host


def test_upload_download_list_and_escapes_on_a_remote_kernel(cluster: Cluster) -> None:
    on_host(cluster)
    front = cluster.front
    with front.client() as client:
        model = client.create_kernel()
        assert client.get_kernel(model.id).raw["host"] == "a"
        path = f"/files/{model.id}/"
        with client.connect(model.id) as kernel:
            notices = _file_notices(kernel)
            # Upload, and the kernel sees it; download and list it.
            status, answer, _ = request(front, "PUT", path + "sub/up.txt", b"hello host")
            assert (status, answer) == (201, {"name": "sub/up.txt", "size": 10})
            result = kernel.execute("print(open('sub/up.txt').read())", timeout=20)
            assert result.stdout == "hello host\n"
            assert request(front, "GET", path + "sub/up.txt")[1] == b"hello host"
            status, listing, _ = request(front, "GET", path)
            assert status == 200 and not listing["truncated"]
            assert [(f["name"], f["size"]) for f in listing["files"]] == [("sub/up.txt", 10)]
            status, _, headers = request(front, "HEAD", path + "sub/up.txt")
            assert status == 200 and headers["content-length"] == "10"
            assert request(front, "PUT", path + "empty", b"")[0] == 201
            assert request(front, "GET", path + "empty")[1] == b""

            # A file the kernel wrote (a few MB, not a multiple of a chunk)
            # comes back byte-exact, and is announced after its cell.
            kernel.execute(
                "import os, hashlib\ndata = os.urandom(5 * 1024 * 1024 + 123)\n"
                "open('made.bin', 'wb').write(data)\nprint(hashlib.sha256(data).hexdigest())",
                timeout=30,
            )
            digest = kernel.execute("print(hashlib.sha256(data).hexdigest())").stdout.strip()
            received = hashlib.sha256()
            status, _, headers = request(front, "GET", path + "made.bin", stream_to=received.update)
            assert status == 200 and headers["content-length"] == str(5 * MiB + 123)
            assert received.hexdigest() == digest
            wait_for(lambda: any(n["name"] == "made.bin" for _, c in notices for n in c["new"]))
            # the upload was not news: only what the kernel's code wrote
            announced = {n["name"] for _, c in notices for n in c["new"]}
            assert announced == {"made.bin"}, notices

            # The single server's refusals, made on the host.
            for name in ["../x", "%2e%2e/x", "a/../../x", "/etc/passwd", "%2Fetc%2Fpasswd"]:
                for method, body in [("GET", None), ("PUT", b"evil")]:
                    status, answer, _ = request(front, method, path + name, body)
                    assert status == 400 and "refused" in answer["message"], (method, name)
            kernel.execute(
                "os.symlink('/etc', 'etc_link'); os.symlink('/etc/passwd', 'passwd')", timeout=20
            )
            for method, name, body in [
                ("GET", "etc_link/passwd", None),
                ("GET", "passwd", None),
                ("PUT", "etc_link/planted.txt", b"evil"),
                ("PUT", "etc_link/new/planted.txt", b"evil"),
            ]:
                status, answer, _ = request(front, method, path + name, body)
                assert status == 403, (method, name, answer)
                assert "outside the kernel's directory" in answer["message"]
            status, answer, _ = request(front, "GET", path + "missing.txt")
            assert status == 404 and "missing.txt" in answer["message"]
            assert request(front, "PUT", path + "sub", b"x")[0] == 409  # a directory


def test_a_host_killed_mid_download_cuts_it_short(cluster: Cluster) -> None:
    host = on_host(cluster)
    front = cluster.front
    with front.client() as client:
        model = client.create_kernel()
        with client.connect(model.id) as kernel:
            kernel.execute(
                "import os\nwith open('big.bin', 'wb') as f:\n"
                "    for _ in range(64): f.write(os.urandom(1024 * 1024))",
                timeout=60,
            )
        parts = urllib.parse.urlsplit(front.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            conn.request(
                "GET",
                f"/files/{model.id}/big.bin",
                headers={"Authorization": "token " + front.token},
            )
            response = conn.getresponse()
            assert response.status == 200
            assert len(response.read(MiB)) == MiB
            # The front holds a window of the file, not the file.
            host.signal(signal.SIGKILL)
            started = time.monotonic()
            got = MiB
            failed = None
            try:
                while chunk := response.read(256 * 1024):
                    got += len(chunk)
            except (http.client.IncompleteRead, ConnectionError) as e:
                failed = e
            assert failed is not None and got < 64 * MiB, got
            assert time.monotonic() - started < 20
        finally:
            conn.close()
        wait_for(lambda: "cut short: kernel host a lost" in front.log(), timeout=10)
        # The kernel is gone with its host: a clear answer, not a hang.
        status, answer, _ = request(front, "GET", f"/files/{model.id}/big.bin")
        assert status == 409 and "dead" in answer["message"], answer


def _memory(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


QUOTA = 48 * MiB


@pytest.fixture
def quota_cluster() -> Iterator[Cluster]:
    with running_cluster("--kernel-quota", str(QUOTA), "--max-upload-size", str(64 * MiB)) as c:
        yield c


def test_big_files_stream_through_and_the_quota_holds(quota_cluster: Cluster, tmp_path) -> None:
    host = on_host(quota_cluster)
    front = quota_cluster.front
    source = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(source, "wb") as f:
        for _ in range(40):
            block = os.urandom(MiB)
            digest.update(block)
            f.write(block)
    assert host.process is not None
    pids = {"front": front.process.pid, "host": host.process.pid}
    before = {who: _memory(pid) for who, pid in pids.items()}
    with front.client() as client:
        model = client.create_kernel()
        path = f"/files/{model.id}/"
        with open(source, "rb") as f:
            status, body, _ = request(front, "PUT", path + "big.bin", f)
        assert (status, body["size"]) == (201, 40 * MiB), body
        with client.connect(model.id) as kernel:
            result = kernel.execute(
                "import hashlib; hashlib.sha256(open('big.bin', 'rb').read()).hexdigest()",
                timeout=60,
            )
            assert result.result_text == repr(digest.hexdigest())
        received = hashlib.sha256()
        status, _, _ = request(front, "GET", path + "big.bin", stream_to=received.update)
        assert status == 200 and received.hexdigest() == digest.hexdigest()
        after = {who: _memory(pid) for who, pid in pids.items()}
        grown = {who: after[who]["VmHWM"] - before[who]["VmHWM"] for who in pids}
        print(f"peak memory grown by {grown} for 40 MiB each way")
        # Neither ever held the file whole (the peak counts every moment).
        assert all(value < 20 * MiB for value in grown.values()), grown

        # The quota, as for a local kernel: 40 MiB used, 10 more refused.
        status, answer, _ = request(front, "PUT", path + "more.bin", b"x" * (10 * MiB))
        assert status == 413 and "quota" in answer["message"], answer
        status, listing, _ = request(front, "GET", path)
        assert [f["name"] for f in listing["files"]] == ["big.bin"]

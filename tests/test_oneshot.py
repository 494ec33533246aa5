"""``POST /service``: one-shot runs on real pool kernels."""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.error
import urllib.request

import pytest

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def service(server, body, *, token=True, timeout=90):
    req = urllib.request.Request(
        server.url.rstrip("/") + "/service", data=json.dumps(body).encode(), method="POST"
    )
    if token:
        req.add_header("Authorization", "token " + server.token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def test_success_gives_outputs_result_displays_and_files(server, client):
    before = {k.id for k in client.list_kernels()}
    code = (
        "import sys\n"
        "from IPython.display import display, HTML\n"
        "print('out')\n"
        "sys.stderr.write('err\\n')\n"
        "display(HTML('<i>x</i>'))\n"
        "with open('result.csv', 'w') as f: f.write('a,b\\n1,2\\n')\n"
        "import os; os.makedirs('sub'); open('sub/raw.bin', 'wb').write(bytes(range(256)))\n"
        "21 * 2"
    )
    status, body = service(server, {"code": code})
    assert status == 200
    assert body["status"] == "ok"
    assert body["stdout"] == "out\n"
    assert body["stderr"] == "err\n"
    assert body["result"] == {"text/plain": "42"}
    assert body["displays"][0]["text/html"] == "<i>x</i>"
    assert body["error"] is None
    files = {f["name"]: f for f in body["files"]}
    assert set(files) == {"result.csv", "sub/raw.bin"}
    assert base64.b64decode(files["result.csv"]["content"]) == b"a,b\n1,2\n"
    assert base64.b64decode(files["sub/raw.bin"]["content"]) == bytes(range(256))
    assert files["sub/raw.bin"]["size"] == 256
    # the kernel was discarded
    assert {k.id for k in client.list_kernels()} <= before


def test_exception_gives_the_error(server):
    status, body = service(server, {"code": "print('before')\ndef f():\n    1/0\nf()"})
    assert status == 200
    assert body["status"] == "error"
    assert body["stdout"] == "before\n"
    assert body["error"]["ename"] == "ZeroDivisionError"
    assert body["error"]["evalue"] == "division by zero"
    assert "1/0" in ANSI.sub("", "\n".join(body["error"]["traceback"]))
    assert body["result"] is None


def test_wall_time_limit_ends_the_run(server, client):
    before = {k.id for k in client.list_kernels()}
    started = time.monotonic()
    status, body = service(
        server, {"code": "print('started', flush=True)\nwhile True: pass", "timeout": 2}
    )
    elapsed = time.monotonic() - started
    assert status == 200
    assert body["status"] == "timeout"
    assert body["error"]["ename"] == "TimeoutError"
    assert "wall-time limit of 2 s" in body["error"]["evalue"]
    assert body["stdout"] == "started\n"
    assert 2 <= elapsed < 15
    assert {k.id for k in client.list_kernels()} <= before


def test_a_dying_kernel_is_reported(server):
    status, body = service(server, {"code": "import os; os._exit(7)"})
    assert status == 200
    assert body["status"] == "dead"
    assert body["error"]["ename"] == "KernelDied"
    assert "exit code 7" in body["error"]["evalue"]


def test_input_is_refused_not_hung(server):
    status, body = service(server, {"code": "input('name? ')", "timeout": 20})
    assert status == 200
    assert body["status"] == "error"
    assert body["error"]["ename"] == "StdinNotImplementedError"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 400),
        ({"code": None}, 400),
        ({"code": "1", "timeout": -1}, 400),
        ({"code": "1", "timeout": "soon"}, 400),
        ({"code": "1", "timeout": True}, 400),
    ],
)
def test_bad_requests(server, body, status):
    got, answer = service(server, body)
    assert got == status
    assert answer["message"]


def test_needs_the_token(server):
    status, _ = service(server, {"code": "1"}, token=False)
    assert status == 403

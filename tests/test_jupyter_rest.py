"""The REST API in the shapes and status codes Jupyter clients expect."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from datetime import datetime

import pytest

KERNEL_ID = re.compile(r"\w+-\w+-\w+-\w+-\w+")


def http(server, method: str, path: str, body=None, token: str | None = ""):
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"token {token or server.token}"
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(server.url.rstrip("/") + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def as_json(raw: bytes):
    return json.loads(raw) if raw else None


def assert_error(status, headers, raw, expected: int) -> dict:
    assert status == expected
    assert headers.get("content-type") == "application/json"
    body = json.loads(raw)
    assert set(body) >= {"message", "reason"}
    assert body["message"]
    return body


def test_kernelspecs_list_and_one(server):
    status, _, raw = http(server, "GET", "/api/kernelspecs")
    assert status == 200
    specs = json.loads(raw)
    assert specs["default"] == "python3"
    one = specs["kernelspecs"]["python3"]
    assert one["name"] == "python3"
    assert one["spec"]["language"] == "python"
    assert one["spec"]["display_name"]
    assert one["resources"]["logo-64x64"] == "/kernelspecs/python3/logo-64x64.png"
    status, _, raw = http(server, "GET", "/api/kernelspecs/python3")
    assert status == 200
    assert json.loads(raw) == one


def test_kernelspec_resource_files(server):
    status, headers, raw = http(server, "GET", "/kernelspecs/python3/logo-64x64.png")
    assert status == 200
    assert headers.get("content-type") == "image/png"
    assert raw.startswith(b"\x89PNG")
    status, headers, raw = http(server, "GET", "/kernelspecs/python3/logo-64x64.png", token=None)
    assert_error(status, headers, raw, 403)


@pytest.mark.parametrize(
    "path",
    [
        "/kernelspecs/python3/kernel.py",
        "/kernelspecs/python3/..%2F..%2Fsetup.py",
        "/kernelspecs/python3/../../etc/passwd",
        "/kernelspecs/nope/logo-64x64.png",
        "/kernelspecs/python3",
    ],
)
def test_kernelspec_files_outside_the_list_are_404(server, path):
    assert_error(*http(server, "GET", path), 404)


def test_unknown_kernelspec_is_404(server):
    assert_error(*http(server, "GET", "/api/kernelspecs/julia-9"), 404)


def test_kernel_model_and_lifecycle_status_codes(server):
    # what a Jupyter Server with --gateway-url sends
    env = {"KERNEL_USERNAME": "ada", "KERNEL_WORKING_DIR": "/tmp", "KERNEL_LAUNCH_TIMEOUT": "40"}
    status, headers, raw = http(server, "POST", "/api/kernels", {"name": "python3", "env": env})
    assert status == 201
    model = json.loads(raw)
    assert KERNEL_ID.fullmatch(model["id"])
    assert headers.get("location") == f"/api/kernels/{model['id']}"
    assert model["name"] == "python3"
    assert isinstance(model["connections"], int)
    assert model["execution_state"] in ("idle", "starting", "busy")
    # parsed exactly as jupyter_server's gateway client parses it
    datetime.strptime(model["last_activity"], "%Y-%m-%dT%H:%M:%S.%fZ")
    kid = model["id"]
    status, _, raw = http(server, "GET", f"/api/kernels/{kid}")
    assert status == 200
    assert json.loads(raw)["id"] == kid
    status, _, raw = http(server, "GET", "/api/kernels")
    assert kid in [k["id"] for k in json.loads(raw)]
    assert http(server, "POST", f"/api/kernels/{kid}/interrupt", {})[0] == 204
    status, _, raw = http(server, "POST", f"/api/kernels/{kid}/restart", {})
    assert status == 200
    assert json.loads(raw)["id"] == kid
    assert http(server, "DELETE", f"/api/kernels/{kid}")[0] == 204
    assert_error(*http(server, "GET", f"/api/kernels/{kid}"), 404)
    assert_error(*http(server, "DELETE", f"/api/kernels/{kid}"), 404)


def test_status_model(server):
    status, _, raw = http(server, "GET", "/api/status")
    assert status == 200
    body = json.loads(raw)
    assert {"started", "last_activity", "connections", "kernels"} <= set(body)
    datetime.strptime(body["started"], "%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"name": "julia-9"}, 404),
        ({"name": 3}, 404),
        ({"name": "python3", "env": ["KERNEL_X"]}, 400),
        ({"name": "python3", "env": {"KERNEL_X": 1}}, 400),
        ({"name": "python3", "kernel_id": "0000-1111-2222-3333-4444"}, 400),
        (b"{not json", 400),
        (b"[1, 2]", 400),
    ],
)
def test_bad_kernel_requests_get_json_errors(server, body, status):
    assert_error(*http(server, "POST", "/api/kernels", body), status)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/kernels/no-such-kernel", 404),
        ("POST", "/api/kernels/no-such-kernel/interrupt", 404),
        ("POST", "/api/kernels/no-such-kernel/restart", 404),
        ("PUT", "/api/kernelspecs", 405),
        ("GET", "/api/kernels/some-kernel/channels", 400),  # no Upgrade: websocket
        ("GET", "/api/nothing-here", 404),
    ],
)
def test_bad_paths_get_json_errors(server, method, path, status):
    assert_error(*http(server, method, path), status)


@pytest.mark.parametrize("token", [None, "wrong"])
def test_missing_or_wrong_token_is_403(server, token):
    assert_error(*http(server, "GET", "/api/kernelspecs", token=token), 403)


# -- sessions ----------------------------------------------------------------


def test_session_lifecycle(server):
    status, headers, raw = http(
        server,
        "POST",
        "/api/sessions",
        {"path": "work/a.ipynb", "name": "a", "type": "notebook", "kernel": {"name": "python3"}},
    )
    assert status == 201
    session = json.loads(raw)
    assert headers.get("location") == f"/api/sessions/{session['id']}"
    assert (session["path"], session["name"], session["type"]) == ("work/a.ipynb", "a", "notebook")
    kernel_id = session["kernel"]["id"]
    assert KERNEL_ID.fullmatch(kernel_id)
    # the same path again is the same session
    status, _, raw = http(
        server, "POST", "/api/sessions", {"path": "work/a.ipynb", "type": "notebook"}
    )
    assert (status, json.loads(raw)["id"]) == (201, session["id"])
    status, _, raw = http(server, "GET", "/api/sessions")
    assert session["id"] in [s["id"] for s in json.loads(raw)]
    # rename, then switch to a new kernel: the old one is shut down
    status, _, raw = http(server, "PATCH", f"/api/sessions/{session['id']}", {"path": "b.ipynb"})
    assert (status, json.loads(raw)["path"]) == (200, "b.ipynb")
    status, _, raw = http(
        server, "PATCH", f"/api/sessions/{session['id']}", {"kernel": {"name": "python3"}}
    )
    new_kernel = json.loads(raw)["kernel"]["id"]
    assert status == 200 and new_kernel != kernel_id
    assert http(server, "GET", f"/api/kernels/{kernel_id}")[0] == 404
    # deleting the session shuts its kernel down
    assert http(server, "DELETE", f"/api/sessions/{session['id']}")[0] == 204
    assert http(server, "GET", f"/api/kernels/{new_kernel}")[0] == 404
    assert_error(*http(server, "GET", f"/api/sessions/{session['id']}"), 404)


def test_session_on_an_existing_kernel_ends_with_it(server):
    status, _, raw = http(server, "POST", "/api/kernels", {})
    kernel_id = json.loads(raw)["id"]
    status, _, raw = http(
        server,
        "POST",
        "/api/sessions",
        {"path": "c.py", "type": "console", "kernel": {"id": kernel_id}},
    )
    assert status == 201
    session = json.loads(raw)
    assert session["kernel"]["id"] == kernel_id
    assert http(server, "DELETE", f"/api/kernels/{kernel_id}")[0] == 204
    assert_error(*http(server, "GET", f"/api/sessions/{session['id']}"), 404)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"type": "notebook"}, 400),
        ({"path": 3}, 400),
        ({"path": "x.ipynb", "kernel": "python3"}, 400),
        ({"path": "x.ipynb", "kernel": {"id": "no-such-kernel"}}, 404),
        ({"path": "x.ipynb", "kernel": {"name": "julia-9"}}, 501),
    ],
)
def test_bad_session_requests(server, body, status):
    error = assert_error(*http(server, "POST", "/api/sessions", body), status)
    if status == 501:
        assert "julia-9" in error["short_message"]


def test_unknown_session_is_404(server):
    assert_error(*http(server, "PATCH", "/api/sessions/nope", {"path": "x"}), 404)
    assert_error(*http(server, "DELETE", "/api/sessions/nope"), 404)

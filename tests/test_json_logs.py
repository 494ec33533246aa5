"""--log-format json: one JSON object per line, read back from a real
server's log; the observer's edge cases without a server."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure

from cellmux.logs import json_observer
from conftest import config_file, start_server, wait_for


def test_a_server_logs_json_lines():
    server = start_server("--pool-size", "1", "--log-format", "json")
    try:
        # A token in the query: the access log line must blank it.
        with urllib.request.urlopen(f"{server.url}api?token={server.token}", timeout=30):
            pass
        wait_for(lambda: "/api?" in server.log())
    finally:
        assert server.stop() == 0
    log = server.log()
    assert server.token not in log
    records = [json.loads(line) for line in log.splitlines()]
    for record in records:
        assert {"time", "level", "namespace", "message"} <= record.keys(), record
        assert record["time"].endswith("Z") and record["level"] in ("info", "warn", "error")
    [serving] = [r for r in records if "is serving at" in r["message"]]
    assert serving["namespace"] == "cellmux.server.service.CellmuxService"
    assert serving["url"] == server.url  # a field the message names, kept as a field
    [access] = [r for r in records if "/api?" in r["message"]]
    assert "token=<redacted>" in access["message"]


def test_a_bad_log_format_in_the_config_file_is_exit_2():
    path = config_file('log_format = "yaml"')
    result = subprocess.run(
        [sys.executable, "-m", "cellmux", "serve", "--config", path],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "log_format must be one of text, json, not 'yaml'" in result.stderr


def test_twistd_logs_json_with_the_logger_option(tmp_path):
    twistd = Path(sys.executable).with_name("twistd")
    process = subprocess.Popen(
        [
            *(str(twistd), "-n", "--pidfile=", "--logger", "cellmux.logs.json_observer"),
            *("cellmux", "--port", "0", "--pool-size", "0"),
            *("--runtime-dir", str(tmp_path / "rt"), "--state-dir", str(tmp_path / "state")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
    )
    records = []
    try:
        for line in process.stdout:
            if line.startswith("cellmux is serving at"):
                continue  # the URL line with the token, for the terminal
            records.append(json.loads(line))
            if "is serving at" in records[-1]["message"]:
                break
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert records[-1]["namespace"] == "cellmux.server.service.CellmuxService"
    assert all({"time", "level", "namespace", "message"} <= r.keys() for r in records)


def test_twistd_says_how_to_get_json_when_the_setting_asks_for_it(tmp_path):
    twistd = Path(sys.executable).with_name("twistd")
    with socket.socket() as taken:  # the server fails to listen and twistd ends
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run(
            [
                *(str(twistd), "-n", "--pidfile=", "cellmux", "--log-format", "json"),
                *("--port", str(taken.getsockname()[1]), "--pool-size", "0"),
                *("--runtime-dir", str(tmp_path / "rt"), "--state-dir", str(tmp_path / "st")),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pass --logger cellmux.logs.json_observer" in result.stderr


def observe(emit) -> list[dict]:
    stream = io.StringIO()
    publisher = LogPublisher(json_observer(stream))
    emit(Logger(namespace="test.ns", observer=publisher))
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_failures_carry_their_traceback():
    def emit(log: Logger) -> None:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.failure("kernel {id} broke", Failure(), id="k1")

    [record] = observe(emit)
    assert record["level"] == "critical" and record["namespace"] == "test.ns"
    assert record["message"] == "kernel k1 broke" and record["id"] == "k1"
    assert "ZeroDivisionError" in record["traceback"]


def test_only_plain_fields_the_message_names_are_kept():
    def emit(log: Logger) -> None:
        log.warn(
            "{n} of {what}; {obj} {message}",
            n=3,
            what="kernels",
            obj=object(),  # named, but not a plain value: only in the message
            secret="not named",  # never in the text log either
            message="(named, but the record's own key wins)",
        )

    [record] = observe(emit)
    assert record["n"] == 3 and record["what"] == "kernels"
    assert "obj" not in record and "secret" not in record
    assert record["level"] == "warn" and record["message"].startswith("3 of kernels; <object")
    assert record["message"].endswith("(named, but the record's own key wins)")

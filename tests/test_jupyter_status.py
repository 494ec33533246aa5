"""Kernel status as Jupyter clients expect it: unit tests of the translator,
then the same sequences on real kernels, in both websocket formats."""

from __future__ import annotations

import contextlib
import os
import tempfile
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmux.server.jupyter.status import StatusTranslator
from conftest import start_server, wait_for
from test_jupyter_ws import FORMATS, JupyterClient

JUPYTER_STATES = {"starting", "idle", "busy", "restarting", "dead"}

# -- the translator, no I/O --------------------------------------------------


def _run(*contents: dict) -> list:
    translator = StatusTranslator()
    return [translator.translate(c) for c in contents]


def test_a_death_repaired_by_an_automatic_restart_is_announced_as_restarting():
    died, restarting, idle = _run(
        {"execution_state": "dead", "cause": "exit code 1", "auto_restart": True},
        {"execution_state": "restarting"},
        {"execution_state": "idle", "restarted": True},
    )
    assert died.status is None  # JupyterLab gives a dead kernel up for good
    assert died.notice == "cellmux: the kernel died (exit code 1); restarting it\n"
    assert restarting.status == {"execution_state": "restarting"}
    assert idle.status == {"execution_state": "idle"}
    assert idle.notice is None


def test_a_restart_the_user_asked_for_shows_a_starting_kernel():
    restarting, idle = _run(
        {"execution_state": "restarting"}, {"execution_state": "idle", "restarted": True}
    )
    assert restarting.status == {"execution_state": "starting"}
    assert restarting.notice is None
    assert idle.status == {"execution_state": "idle"}


def test_giving_up_is_dead_with_the_cause_in_the_notice():
    (died,) = _run({"execution_state": "dead", "cause": "memory limit", "limit": "memory"})
    assert died.status == {"execution_state": "dead"}
    assert died.notice == "cellmux: the kernel died (memory limit; it went over its memory limit)\n"


def test_a_failed_automatic_restart_ends_dead():
    results = _run(
        {"execution_state": "dead", "cause": "SIGKILL", "auto_restart": True},
        {"execution_state": "restarting"},
        {"execution_state": "dead", "cause": "restart failed: at most 2 kernels"},
        # a later user restart is a user restart again
        {"execution_state": "restarting"},
    )
    assert [r.status for r in results] == [
        None,
        {"execution_state": "restarting"},
        {"execution_state": "dead"},
        {"execution_state": "starting"},
    ]
    assert "restart failed: at most 2 kernels" in results[2].notice


def test_unresponsive_is_not_a_jupyter_state():
    unresponsive, back = _run(
        {"execution_state": "unresponsive"}, {"execution_state": "busy", "responsive": True}
    )
    assert unresponsive.status is None and unresponsive.notice is None
    assert back.status == {"execution_state": "busy"}


NATIVE = st.one_of(
    st.fixed_dictionaries(
        {"execution_state": st.sampled_from(["starting", "idle", "busy", "restarting"])},
        optional={"restarted": st.just(True), "responsive": st.just(True)},
    ),
    st.just({"execution_state": "unresponsive"}),
    st.fixed_dictionaries(
        {"execution_state": st.just("dead"), "cause": st.text(max_size=20)},
        optional={"auto_restart": st.booleans(), "limit": st.sampled_from(["memory", "disk"])},
    ),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
)


@given(st.lists(NATIVE, max_size=30))
def test_jupyter_clients_get_only_stock_states_and_dead_only_when_given_up(contents):
    translator = StatusTranslator()
    auto_restart_pending = False
    for content in contents:
        out = translator.translate(content)
        state = content.get("execution_state")
        if out.status is not None:
            # only Jupyter's words, and nothing cellmux-only in the content
            assert set(out.status) == {"execution_state"}
            assert out.status["execution_state"] in JUPYTER_STATES
        gives_up = state == "dead" and content.get("auto_restart") is not True
        assert (out.status == {"execution_state": "dead"}) == gives_up
        if out.status == {"execution_state": "restarting"}:
            assert auto_restart_pending  # only after a death that is being repaired
        if state == "dead":
            assert out.notice is not None
            auto_restart_pending = content.get("auto_restart") is True
        elif state == "idle":
            auto_restart_pending = False


# -- on real kernels ------------------------------------------------------------


def _server_states(messages: list[dict]) -> list[str]:
    """The execution states of the status messages that no request caused."""
    return [
        m["content"]["execution_state"]
        for m in messages
        if m["msg_type"] == "status" and not m["parent_header"]
    ]


def _back_idle(m: dict) -> bool:
    return (
        m["msg_type"] == "status"
        and m["content"]["execution_state"] == "idle"
        and not m["parent_header"]
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_kernel_that_dies_comes_back_as_on_a_stock_server(server, client, fmt):
    model = client.create_kernel()
    jupyter = JupyterClient(server, model.id, fmt)
    native_states: list[str] = []
    try:
        with client.connect(model.id) as native:
            native.on_status = native_states.append
            jupyter.execute("x = 1")
            msg_id = jupyter.send(
                "shell", "execute_request", {"code": "import os; os._exit(1)", "silent": False}
            )
            seen = jupyter.until(_back_idle)
            # the Jupyter client: restarting, then idle; never dead
            assert _server_states(seen) == ["restarting", "idle"]
            notice = next(
                m for m in seen if m["msg_type"] == "stream" and "died" in m["content"]["text"]
            )
            assert notice["channel"] == "iopub"
            assert notice["content"]["name"] == "stderr"
            assert "exit code 1" in notice["content"]["text"]
            # parented to the cell that was running, so JupyterLab shows it there
            assert notice["parent_header"]["msg_id"] == msg_id
            assert seen.index(notice) < seen.index(
                next(m for m in seen if m["msg_type"] == "status" and not m["parent_header"])
            )
            # the next cell runs, on a fresh kernel under the same id
            stdout, _ = jupyter.execute("print('x' in dir())")
            assert stdout == "False\n"
            # a native client of the same kernel keeps the rich states
            wait_for(lambda: "idle" in native_states[native_states.index("restarting") :], 10)
            assert native_states.index("dead") < native_states.index("restarting")
    finally:
        jupyter.close()
        with contextlib.suppress(Exception):
            client.delete_kernel(model.id)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_user_restart_looks_like_a_stock_restart(server, client, fmt):
    model = client.create_kernel()
    jupyter = JupyterClient(server, model.id, fmt)
    try:
        jupyter.execute("1")
        client.restart_kernel(model.id)
        seen = jupyter.until(_back_idle)
        assert _server_states(seen) == ["starting", "idle"]
        assert not [m for m in seen if m["msg_type"] == "stream"]
        assert all(m["channel"] == "iopub" for m in seen if m["msg_type"] == "status")
        assert jupyter.execute("print('after restart')")[0] == "after restart\n"
    finally:
        jupyter.close()
        with contextlib.suppress(Exception):
            client.delete_kernel(model.id)


@pytest.fixture
def no_jupyter_restarts():
    fd, path = tempfile.mkstemp(suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write("jupyter_auto_restart = false\n")
    running = start_server("--pool-size", "1", "--config", path)
    os.unlink(path)
    yield running
    running.stop()


@pytest.mark.parametrize("fmt", FORMATS)
def test_dead_is_sent_when_cellmux_gives_up_with_the_cause(no_jupyter_restarts, fmt):
    server = no_jupyter_restarts
    with server.client() as client:
        model = client.create_kernel()
        jupyter = JupyterClient(server, model.id, fmt)
        try:
            msg_id = jupyter.send(
                "shell", "execute_request", {"code": "import os; os._exit(3)", "silent": False}
            )
            seen = jupyter.until(
                lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == "dead"
            )
            assert "restarting" not in _server_states(seen)
            notice = next(m for m in seen if m["msg_type"] == "stream")
            assert notice["content"]["text"] == "cellmux: the kernel died (exit code 3)\n"
            assert notice["parent_header"]["msg_id"] == msg_id
            assert client.get_kernel(model.id).execution_state == "dead"
        finally:
            jupyter.close()


@pytest.fixture(scope="module")
def cold_server():
    """No warm pool: a restart takes a fork's time, long enough to send into."""
    running = start_server("--pool-size", "0")
    yield running
    running.stop()


@pytest.mark.parametrize("fmt", FORMATS)
def test_requests_sent_during_a_restart_wait_for_the_new_kernel(cold_server, fmt):
    # JupyterLab asks for kernel_info as soon as it sees 'restarting'.
    with cold_server.client() as client:
        model = client.create_kernel()
        jupyter = JupyterClient(cold_server, model.id, fmt)
        try:
            jupyter.send("shell", "execute_request", {"code": "import os; os._exit(1)"})
            jupyter.until(
                lambda m: (
                    m["msg_type"] == "status" and m["content"]["execution_state"] == "restarting"
                )
            )
            assert client.get_kernel(model.id).execution_state == "restarting"
            info = jupyter.send("shell", "kernel_info_request", {})
            run = jupyter.send("shell", "execute_request", {"code": "print('waited')"})
            seen = jupyter.until(
                lambda m: m["msg_type"] == "execute_reply" and m["parent_header"]["msg_id"] == run
            )
            replies = {m["parent_header"]["msg_id"]: m for m in seen if m["channel"] == "shell"}
            assert replies[info]["content"]["status"] == "ok", replies[info]["content"]
            assert replies[run]["content"]["status"] == "ok"
            assert any(
                m["msg_type"] == "stream" and m["content"]["text"] == "waited\n" for m in seen
            )
        finally:
            jupyter.close()
            with contextlib.suppress(Exception):
                client.delete_kernel(model.id)


def test_a_kernel_that_keeps_dying_ends_dead_after_three_restarts(server, client):
    model = client.create_kernel()
    jupyter = JupyterClient(server, model.id, "v1")
    try:
        states: list[str] = []
        for _ in range(4):
            jupyter.send("shell", "execute_request", {"code": "import os; os._exit(1)"})
            seen = jupyter.until(
                lambda m: (
                    m["msg_type"] == "status"
                    and not m["parent_header"]
                    and m["content"]["execution_state"] in ("idle", "dead")
                )
            )
            states += _server_states(seen)
        # three automatic restarts a minute, then cellmux gives up: dead
        assert states == ["restarting", "idle"] * 3 + ["dead"]
        assert client.get_kernel(model.id).execution_state == "dead"
    finally:
        jupyter.close()
        with contextlib.suppress(Exception):
            client.delete_kernel(model.id)


def test_an_observer_alone_does_not_turn_automatic_restarts_on(server, client):
    model = client.create_kernel()
    share = client.share_kernel(model.id, "observer")
    as_observer = SimpleNamespace(url=server.url, token=share["token"])
    watcher = JupyterClient(as_observer, model.id, "legacy")
    try:
        with client.connect(model.id) as native, pytest.raises(Exception, match="exit code 1"):
            native.execute("import os; os._exit(1)", timeout=20)
        seen = watcher.until(lambda m: m["msg_type"] == "status" and not m["parent_header"])
        assert _server_states(seen) == ["dead"]
        assert client.get_kernel(model.id).execution_state == "dead"
    finally:
        watcher.close()
        with contextlib.suppress(Exception):
            client.delete_kernel(model.id)

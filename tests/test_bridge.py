"""``cellmux bridge``: jupyter_client's blocking client on a cellmux kernel, through
real ZeroMQ sockets, a real bridge process and a real server."""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import stat
import sys
import threading
import time

import pytest
import zmq
from jupyter_client.session import Session

from bridge_helpers import BridgeProcess, TcpProxy, bridge_env, collect_execution
from cellmux.terminal.bridge import reconnect_delays
from conftest import start_server, wait_for
from terminal_helpers import cellmux, delete_named_kernels


def test_reconnection_attempts_back_off_to_five_seconds():
    delays = reconnect_delays()
    assert [next(delays) for _ in range(9)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]


def stream_text(messages: list[dict]) -> str:
    return "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")


@pytest.fixture
def bridge(server, tmp_path):
    state = tmp_path / "state"
    process = BridgeProcess(bridge_env(server, state), "b", tmp_path / "kernel.json")
    try:
        process.wait_ready()
        yield process
    finally:
        process.finish()
        delete_named_kernels(server, state)


@pytest.fixture
def kc(bridge):
    client = bridge.client()
    yield client
    client.stop_channels()


def test_connection_file_is_private_with_a_fresh_key(server, tmp_path):
    state = tmp_path / "state"
    keys = []
    for n in range(2):
        path = tmp_path / f"k{n}.json"
        process = BridgeProcess(bridge_env(server, state), "same", path)
        try:
            info = process.wait_ready()
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert info["ip"] == "127.0.0.1" and info["transport"] == "tcp"
            assert info["signature_scheme"] == "hmac-sha256"
            assert len(info["key"]) == 64
            assert (
                len({info[f"{name}_port"] for name in ("shell", "control", "stdin", "iopub", "hb")})
                == 5
            )
            keys.append(info["key"])
            assert "is bridged" in process.stdout_line()
        finally:
            assert process.finish() == 0  # SIGTERM: a clean exit
        assert not path.exists()  # removed when the bridge ended
    assert keys[0] != keys[1]
    delete_named_kernels(server, state)


def test_execute_input_completion_and_inspection(kc):
    outputs = []
    reply = kc.execute_interactive(
        "print('hello from', 'cellmux'); 6 * 7", timeout=60, output_hook=outputs.append
    )
    assert reply["content"]["status"] == "ok"
    assert any(
        m["msg_type"] == "stream" and m["content"]["text"] == "hello from cellmux\n"
        for m in outputs
    )
    result = next(m for m in outputs if m["msg_type"] == "execute_result")
    assert result["content"]["data"]["text/plain"] == "42"

    prompts = []

    def answer(msg):
        prompts.append(msg["content"]["prompt"])
        kc.input("Ada")

    outputs.clear()
    reply = kc.execute_interactive(
        "name = input('who? ')\nprint('hi', name)",
        timeout=60,
        allow_stdin=True,
        stdin_hook=answer,
        output_hook=outputs.append,
    )
    assert reply["content"]["status"] == "ok"
    assert prompts == ["who? "]
    assert stream_text(outputs) == "hi Ada\n"

    msg_id = kc.complete("import os; os.pa", 16)
    reply = kc.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert "path" in reply["content"]["matches"]

    msg_id = kc.is_complete("for i in range(3):")
    assert kc.get_shell_msg(timeout=30)["content"]["status"] == "incomplete"

    kc.inspect("len", 3)
    reply = kc.get_shell_msg(timeout=30)
    assert reply["content"]["found"] is True


def test_messages_not_signed_with_the_key_are_dropped(bridge, kc):
    info = json.loads(bridge.path.read_text())
    context = zmq.Context()
    shell = context.socket(zmq.DEALER)
    shell.linger = 0
    shell.connect(f"tcp://127.0.0.1:{info['shell_port']}")
    try:
        # not Jupyter messages at all: dropped, and the socket goes on
        shell.send_multipart([b"garbage"])
        shell.send_multipart([b"<IDS|MSG>", b"sig", b"{", b"{}", b"{}", b"{}"])
        for key, answered in ((b"not the key", False), (info["key"].encode(), True)):
            session = Session(key=key)
            msg = session.send(shell, "kernel_info_request", {})
            if answered:
                assert shell.poll(30_000), "no reply to a signed request"
                _idents, reply = Session(key=info["key"].encode()).feed_identities(
                    shell.recv_multipart()
                )
                reply = Session(key=info["key"].encode()).deserialize(reply)
                assert reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]
            else:
                assert not shell.poll(2_000), "a badly signed request was answered"
    finally:
        shell.close()
        context.term()
    bridge.finish()
    assert "bad signature" in bridge.stderr
    assert "no <IDS|MSG> delimiter" in bridge.stderr


def test_interrupt_request_on_control_interrupts(kc):
    msg_id = kc.execute("import time; time.sleep(120)")
    # wait until it runs
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if msg["msg_type"] == "execute_input" and msg["parent_header"]["msg_id"] == msg_id:
            break
    started = time.monotonic()
    request = kc.session.msg("interrupt_request", {})
    kc.control_channel.send(request)
    reply = kc.control_channel.get_msg(timeout=30)
    assert reply["msg_type"] == "interrupt_reply"
    assert reply["parent_header"]["msg_id"] == request["header"]["msg_id"]
    assert reply["content"]["status"] == "ok"
    execute_reply = kc.get_shell_msg(timeout=30)
    assert execute_reply["parent_header"]["msg_id"] == msg_id
    assert execute_reply["content"]["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - started < 20


def test_shutdown_with_restart_restarts_and_the_bridge_goes_on(kc):
    kc.execute_interactive("x = 1", timeout=60)
    request = kc.session.msg("shutdown_request", {"restart": True})
    kc.control_channel.send(request)
    reply = kc.control_channel.get_msg(timeout=60)
    assert reply["msg_type"] == "shutdown_reply"
    assert reply["content"] == {"status": "ok", "restart": True}
    outputs = []
    reply = kc.execute_interactive("print('x' in dir())", timeout=60, output_hook=outputs.append)
    assert reply["content"]["status"] == "ok"
    assert stream_text(outputs) == "False\n"
    # older clients send it on shell: answered there
    kc.execute_interactive("y = 1", timeout=60)
    request = kc.session.msg("shutdown_request", {"restart": True})
    kc.shell_channel.send(request)
    reply = kc.get_shell_msg(timeout=60)
    assert reply["msg_type"] == "shutdown_reply"
    assert reply["parent_header"]["msg_id"] == request["header"]["msg_id"]
    outputs.clear()
    kc.execute_interactive("print('y' in dir())", timeout=60, output_hook=outputs.append)
    assert stream_text(outputs) == "False\n"


def test_shutdown_request_removes_the_kernel_and_ends_the_bridge(server, bridge, kc):
    kernel_id = bridge.kernel_id()
    request = kc.session.msg("shutdown_request", {"restart": False})
    kc.control_channel.send(request)
    assert kc.control_channel.get_msg(timeout=60)["content"]["status"] == "ok"
    wait_for(lambda: bridge.process.poll() is not None, 30)
    assert bridge.finish() == 0
    assert not bridge.path.exists()
    with server.client() as client:
        assert kernel_id not in {k.id for k in client.list_kernels()}


def test_a_kernel_removed_elsewhere_ends_the_bridge(server, bridge, kc):
    with server.client() as client:
        client.delete_kernel(bridge.kernel_id())
    wait_for(lambda: bridge.process.poll() is not None, 30)
    assert bridge.finish() == 0
    assert "the kernel was shut down" in bridge.stderr
    assert not bridge.path.exists()


def test_nothing_is_lost_when_the_connection_drops_mid_output(server, tmp_path):
    """Reset the bridge's websocket three times while the kernel prints: the
    client still gets every line once, in order (the bridge resumes from the
    last seq it received; what was in flight is replayed)."""
    port = int(server.url.rstrip("/").rsplit(":", 1)[1])
    proxy = TcpProxy(port)
    state = tmp_path / "state"
    env = bridge_env(server, state, CELLMUX_URL=proxy.url)
    bridge = BridgeProcess(env, "drop", tmp_path / "kernel.json")
    kc = None
    try:
        bridge.wait_ready()
        kc = bridge.client()
        lines = 4000
        code = f"import time\nfor i in range({lines}):\n    print(i)\n    time.sleep(0.001)\n"
        msg_id = kc.execute(code)
        stdout = ""
        cuts = 0
        deadline = time.monotonic() + 120
        messages = []
        while True:
            assert time.monotonic() < deadline
            msg = kc.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            messages.append(msg)
            if msg["msg_type"] == "stream":
                stdout += msg["content"]["text"]
                seen = stdout.count("\n")
                if cuts < 3 and seen > (cuts + 1) * lines // 5:
                    # down long enough for the kernel to print while no one listens
                    assert proxy.cut(down_for=0.5) >= 1
                    cuts += 1
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert cuts == 3
        assert proxy.connections >= 4  # it reconnected after each cut
        assert stdout == "".join(f"{i}\n" for i in range(lines))
        reply = kc.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "ok"
    finally:
        if kc is not None:
            kc.stop_channels()
        bridge.finish()
        proxy.close()
        delete_named_kernels(server, state)
    assert bridge.stderr.count("reconnecting") == 3
    assert bridge.stderr.count("reconnected") == 3


def test_everyday_mistakes_are_one_line(server, tmp_path):
    state = tmp_path / "state"
    env = bridge_env(server, state)
    result = cellmux(env, "bridge", "x", timeout=60)
    assert result.returncode == 2  # argparse: the file option is required
    # a server that is not there
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        unused = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = cellmux(
        {**env, "CELLMUX_URL": unused}, "bridge", "x", "-f", str(tmp_path / "k.json"), timeout=60
    )
    assert result.returncode == 3
    assert result.stderr.startswith("cellmux: ") and result.stderr.count("\n") == 1
    # a wrong token
    result = cellmux(
        {**env, "CELLMUX_TOKEN": "wrong"}, "bridge", "x", "-f", str(tmp_path / "k.json"), timeout=60
    )
    assert result.returncode == 3
    assert result.stderr.startswith("cellmux: ") and result.stderr.count("\n") == 1
    # a connection file that is not one
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    result = cellmux(env, "bridge", "x", "--use-connection-file", str(bad), timeout=60)
    assert result.returncode == 2
    assert result.stderr == f"cellmux: {bad} is not a connection file\n"
    assert not (tmp_path / "k.json").exists()


def test_a_dead_kernel_stops_the_heartbeat_and_answers_with_an_error(kc):
    outputs = []
    msg_id = kc.execute("import os; os._exit(3)")
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline
        msg = kc.get_iopub_msg(timeout=60)
        outputs.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "dead":
            break
    notices = [m["content"]["text"] for m in outputs if m["msg_type"] == "stream"]
    assert "cellmux: the kernel died (exit code 3)\n" in notices
    # the notice is parented to the execution that was running, for the client
    # that sent it (its session, not the bridge's)
    notice = next(m for m in outputs if m["msg_type"] == "stream")
    assert notice["parent_header"]["msg_id"] == msg_id
    assert notice["parent_header"]["session"] == kc.session.session
    wait_for(lambda: not kc.is_alive(), 10)  # jupyter_client: hb stopped
    # a request is answered at once, not left waiting
    msg_id = kc.execute("1")
    reply = kc.get_shell_msg(timeout=10)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error"
    assert "the kernel is dead (exit code 3)" in reply["content"]["evalue"]
    # a restart brings it back, heartbeat included
    request = kc.session.msg("shutdown_request", {"restart": True})
    kc.control_channel.send(request)
    assert kc.control_channel.get_msg(timeout=60)["content"]["status"] == "ok"
    wait_for(kc.is_alive, 10)
    reply = kc.execute_interactive("40 + 2", timeout=60)
    assert reply["content"]["status"] == "ok"


def test_only_jupyter_messages_reach_iopub(kc):
    """The server's file notices (cellmux_files, after code made a file) are
    for cellmux clients: a Jupyter client would not know the message type."""
    kc.execute("open('made.txt', 'w').write('x')")
    seen = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            seen.append(kc.get_iopub_msg(timeout=0.5)["msg_type"])
    assert "execute_result" in seen
    assert "cellmux_files" not in seen


def test_requests_sent_during_a_restart_wait_for_the_new_kernel(tmp_path):
    """As a stock kernel's sockets would: what a client sends while the kernel
    is replaced reaches the new process (the server refuses data frames
    meanwhile, so the bridge holds them). No warm pool: the restart forks a
    new process, which leaves time to send into it."""
    server = start_server("--pool-size", "0")
    state = tmp_path / "state"
    bridge = BridgeProcess(bridge_env(server, state), "held", tmp_path / "kernel.json")
    kc = None
    try:
        bridge.wait_ready()
        kc = bridge.client()
        kc.execute_interactive("x = 1", timeout=60)
        restart = threading.Thread(
            target=lambda: server.client().restart_kernel(bridge.kernel_id()), daemon=True
        )
        restart.start()
        while True:  # the server's "restarting", in a stock server's words
            msg = kc.get_iopub_msg(timeout=60)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "starting":
                break
        msg_id = kc.execute("print('x' in dir())")
        stdout, _messages, reply = collect_execution(kc, msg_id, timeout=60)
        assert reply["content"]["status"] == "ok"
        assert stdout == "False\n"  # the new process ran it
        restart.join(60)
    finally:
        if kc is not None:
            kc.stop_channels()
        bridge.finish()
        delete_named_kernels(server, state)
        server.stop()
    assert "refused" not in bridge.stderr


def test_a_kernel_id_bridges_the_kernel_other_clients_use(server, tmp_path):
    with server.client() as client:
        model = client.create_kernel()
        try:
            with client.connect(model.id) as kernel:
                kernel.execute("shared = 'from a cellmux client'")
                bridge = BridgeProcess(
                    bridge_env(server, tmp_path / "state"), model.id, tmp_path / "k.json"
                )
                kc = None
                try:
                    bridge.wait_ready()
                    assert bridge.kernel_id() == model.id
                    kc = bridge.client()
                    outputs = []
                    kc.execute_interactive("print(shared)", timeout=60, output_hook=outputs.append)
                    assert stream_text(outputs) == "from a cellmux client\n"
                    # and the cellmux client sees what the Jupyter client defined
                    kc.execute_interactive("back = 'from jupyter_client'", timeout=60)
                    assert kernel.execute("print(back)").stdout == "from jupyter_client\n"
                finally:
                    if kc is not None:
                        kc.stop_channels()
                    bridge.finish()
            assert "started kernel" not in bridge.stderr  # found, not made
        finally:
            client.delete_kernel(model.id)


def test_launched_by_jupyter_clients_kernel_manager(server, tmp_path, monkeypatch):
    """What Spyder, molten and emacs-jupyter do with a kernel spec: jupyter_client's
    KernelManager writes the connection file, starts the bridge on it, interrupts
    with SIGINT, restarts (the process ends and is started again) and shuts down."""
    from jupyter_client.manager import KernelManager

    state = tmp_path / "state"
    spec_dir = tmp_path / "jupyter" / "kernels" / "cellmux-km"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "cellmux", "bridge", "km", "--use-connection-file"]
    spec = {
        "argv": [*argv, "{connection_file}"],
        "display_name": "Python 3 (cellmux)",
        "language": "python",
        "interrupt_mode": "signal",
        "env": {
            "CELLMUX_URL": server.url,
            "CELLMUX_TOKEN": server.token,
            "XDG_STATE_HOME": str(state),
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    km = KernelManager(kernel_name="cellmux-km", shutdown_wait_time=20)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        kc.execute_interactive("x = 1", timeout=60)
        # interrupt: SIGINT to the bridge
        msg_id = kc.execute("import time; time.sleep(120)")
        time.sleep(1)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        # restart: the bridge restarts the kernel and ends; the manager starts
        # it again (at once: it does not wait for a process that stays)
        first = km.provisioner.process.pid
        started = time.monotonic()
        km.restart_kernel()
        # the manager would SIGTERM a process still there after 10 s
        assert time.monotonic() - started < 8
        assert km.provisioner.process.pid != first
        kc.wait_for_ready(timeout=60)
        outputs = []
        kc.execute_interactive("print('x' in dir())", timeout=60, output_hook=outputs.append)
        assert stream_text(outputs) == "False\n"
        names = json.loads((state / "cellmux" / "kernels.json").read_text())
        kernel_id = names[server.url.rstrip("/")]["km"]
        kc.stop_channels()
        km.shutdown_kernel()
        assert not km.is_alive()
        with server.client() as client:
            wait_for(lambda: kernel_id not in {k.id for k in client.list_kernels()}, 30)
    finally:
        kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        delete_named_kernels(server, state)

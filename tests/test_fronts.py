"""Two fronts behind a real HAProxy running docs/haproxy.cfg, sharing one
real PostgreSQL, with real kernels, on loopback (docs/scaling.md, Several
fronts).

The tests share one fleet and run in file order: the last one kills a front.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import signal
import threading
import time
import types
import uuid

import pytest
from websockets.exceptions import InvalidStatus

from cellmux.client import CellmuxError, Client, ServerError
from cellmux.protocol import Channel, control_frame, encode_frame
from cellmux.server.auth import COOKIE_NAME
from cellmux.server.fronts import front_tag, tag_of
from conftest import RunningServer, config_file, start_server, wait_for
from db_fixtures import PostgresCluster
from haproxy_fixtures import HAProxy
from http_helpers import request, token
from ports import free_port
from terminal_helpers import cellmux_env
from test_jupyter_ws import JupyterClient
from test_longpoll import Poller, _pack, _request, control, jmsg, replied
from test_terminal_quick import _heavy, _imported

TAGS = {"F1": front_tag("f1"), "F2": front_tag("f2")}
#: The first kernel uid of each front.
UID_RANGES = {"F1": 410000, "F2": 420000}
#: The documented bound (credential_refresh's default) and room for load.
REFRESH_BOUND = 5.0 + 5.0


class Fleet:
    """PostgreSQL, fronts f1 and f2 on fixed ports, and HAProxy before them."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self.postgres = PostgresCluster.create()
        self.ports = {name: free_port() for name in TAGS}
        self.fronts: dict[str, RunningServer] = {}
        self.configs: dict[str, str] = {}
        self.proxy: HAProxy | None = None
        try:
            for name in TAGS:
                self.start_front(name)
            self.proxy = HAProxy.start(
                free_port(), {name: f"127.0.0.1:{port}" for name, port in self.ports.items()}
            )
            self.wait_until_up()
        except BaseException:
            self.stop()
            raise

    def start_front(self, name: str) -> RunningServer:
        # Fronts on one machine need uid ranges of their own (as root, a
        # front that ends its kernels ends every process of their uids),
        # away from the default range other servers use.
        first = UID_RANGES[name]
        config = config_file(f"kernel_uid_range = [{first}, {first + 9999}]")
        self.configs[name] = config
        self.fronts[name] = start_server(
            *("--front-id", name.lower(), "--database", self.postgres.url, "--config", config),
            *("--token", self.token, "--port", str(self.ports[name]), "--pool-size", "1"),
            *("--trusted-proxies", "127.0.0.1"),
        )
        return self.fronts[name]

    def url(self, name: str | None = None) -> str:
        if name is None:
            assert self.proxy is not None
            return self.proxy.url
        return f"http://127.0.0.1:{self.ports[name]}"

    def client(self, name: str | None = None) -> Client:
        return Client(self.url(name), token=self.token)

    def wait_until_up(self) -> None:
        """Until HAProxy has seen both fronts healthy: creates reach both."""

        def both() -> bool:
            seen = set()
            with self.client() as client:
                for _ in range(4):
                    kernel = client.create_kernel()
                    seen.add(tag_of(kernel.id))
                    client.delete_kernel(kernel.id)
            return seen == set(TAGS.values())

        wait_for(both, timeout=30, interval=0.5)

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for front in self.fronts.values():
            front.stop()
        self.postgres.destroy()


@pytest.fixture(scope="module")
def fleet():
    running = Fleet()
    yield running
    running.stop()


def front_of(kernel_id: str) -> str:
    return {tag: name for name, tag in TAGS.items()}[tag_of(kernel_id)]


def test_kernels_land_on_both_fronts_and_every_request_reaches_its_own(fleet):
    with fleet.client() as client:
        kernels = [client.create_kernel().id for _ in range(4)]
        try:
            # Round robin: two on each front; ids are UUIDs tagged by front.
            assert sorted(front_of(k) for k in kernels) == ["F1", "F1", "F2", "F2"]
            for name in TAGS:
                with fleet.client(name) as direct:
                    held = {k.id for k in direct.list_kernels()}
                assert held == {k for k in kernels if front_of(k) == name}
            for kernel_id in kernels:
                # REST through the proxy reaches the kernel's front.
                assert client.get_kernel(kernel_id).id == kernel_id
                # The native websocket (?kernel=ID in its URL) too: run code.
                with client.connect(kernel_id) as kernel:
                    result = kernel.execute(
                        f"open('probe.txt', 'w').write({kernel_id!r}); print('ran')"
                    )
                    assert result.stdout == "ran\n"
                # /files/ID/... reaches the front whose kernel wrote the file.
                status, _, body = request(
                    fleet.url(), "GET", f"/files/{kernel_id}/probe.txt", token(fleet.token)
                )
                assert (status, body) == (200, kernel_id.encode())
                # The Jupyter websocket, by /api/kernels/ID/channels.
                proxy = types.SimpleNamespace(url=fleet.url(), token=fleet.token)
                jupyter = JupyterClient(proxy, kernel_id, "v1")
                try:
                    stdout, _ = jupyter.execute("print(open('probe.txt').read())")
                finally:
                    jupyter.close()
                assert stdout == kernel_id + "\n"
        finally:
            for kernel_id in kernels:
                with contextlib.suppress(CellmuxError):
                    client.delete_kernel(kernel_id)


def test_a_native_session_resumes_through_the_proxy(fleet):
    with fleet.client() as client:
        kernel_ids = [client.create_kernel().id for _ in range(2)]
        try:
            for kernel_id in kernel_ids:
                with client.connect(kernel_id) as kernel:
                    kernel.execute("x = 41")
                    cursor = kernel.last_seq
                # Output made while nobody is attached, then a resume.
                with client.connect(kernel_id) as other:
                    other.execute("print('while away')")
                seen: list[bytes] = []
                keep = seen.append
                with client.connect(
                    kernel_id, cursor=cursor, listener=lambda f, keep=keep: keep(f.parts[-1])
                ) as kernel:
                    assert kernel.execute("print(x + 1)").stdout == "42\n"
                # The resumed connection caught up with what it missed.
                assert any(b"while away" in part for part in seen)
        finally:
            for kernel_id in kernel_ids:
                client.delete_kernel(kernel_id)


class RoutedPoller(Poller):
    """test_longpoll's poller, opening with ``POST /poll?kernel=ID`` as the
    browser does, so that the proxy routes the open too."""

    def __init__(self, server, kernel_id: str) -> None:
        self.server = server
        self.session = uuid.uuid4().hex
        hello = {"op": "hello", "version": 1, "kernel": kernel_id, "session": self.session}
        status, _, data = _request(
            server, "POST", f"/poll?kernel={kernel_id}", _pack(encode_frame(control_frame(**hello)))
        )
        assert status == 201, data
        self.id = json.loads(data)["connection"]
        self.seq = None
        self.ctl = 0


def test_long_polling_reaches_the_kernels_front_through_the_proxy(fleet):
    proxy = types.SimpleNamespace(url=fleet.url(), token=fleet.token)
    with fleet.client() as client:
        kernel_ids = [client.create_kernel().id for _ in range(2)]
        try:
            assert {front_of(k) for k in kernel_ids} == set(TAGS)
            for kernel_id in kernel_ids:
                poller = RoutedPoller(proxy, kernel_id)
                # Its connection id carries the front's tag: polls follow it.
                assert tag_of(poller.id) == tag_of(kernel_id)
                assert control(poller.poll()[0])["kernel"]["id"] == kernel_id
                msg_id = poller.execute("print('polled')")
                frames = poller.until(replied(msg_id))
                out = [jmsg(f)[2]["text"] for f in frames if f.channel == Channel.STDOUT]
                assert out == ["polled\n"]
                assert _request(proxy, "DELETE", f"/poll/{poller.id}")[0] == 204
        finally:
            for kernel_id in kernel_ids:
                client.delete_kernel(kernel_id)


def test_cellmux_run_reaches_kernels_of_both_fronts_through_the_proxy(fleet, tmp_path):
    proxy = types.SimpleNamespace(url=fleet.url(), token=fleet.token)
    env = cellmux_env(proxy, tmp_path / "state")
    source = tmp_path / "lines.py"
    source.write_text("print('ran here')\n")
    with fleet.client() as client:
        kernel_ids = [client.create_kernel().id for _ in range(2)]
        try:
            assert {front_of(k) for k in kernel_ids} == set(TAGS)
            for kernel_id in kernel_ids:
                for _ in range(2):  # twice: round robin would miss one
                    done, modules = _imported(env, "run", str(source), "--kernel", kernel_id)
                    assert (done.returncode, done.stdout) == (0, "ran here\n"), done.stderr
                    # by the quick path, not a fallback to the full client
                    assert not _heavy(modules), sorted(_heavy(modules))
        finally:
            for kernel_id in kernel_ids:
                client.delete_kernel(kernel_id)


def test_a_hello_for_another_kernel_than_the_url_names_is_refused(fleet):
    with fleet.client("F1") as client:
        kernel = client.create_kernel()
        try:
            from cellmux.client import AsyncKernel, websocket_url
            from conftest import run_async

            async def mismatched():
                url = websocket_url(fleet.url("F1"), kernel.id.replace(kernel.id[-4:], "0000"))
                await AsyncKernel.open(url, kernel.id, token=fleet.token, timeout=20)

            with pytest.raises(ServerError) as refused:
                run_async(mismatched())
            assert refused.value.code == "kernel_mismatch"
        finally:
            client.delete_kernel(kernel.id)


def _share_works(fleet, name: str, share_token: str, kernel_id: str) -> bool:
    """Whether front C{name} knows the share token (it answers for the
    share's kernel, held elsewhere: 404, not 403)."""
    status, _, body = request(
        fleet.url(name), "GET", f"/api/kernels/{kernel_id}", token(share_token)
    )
    return status == 404 and body["message"].startswith(f"kernel {kernel_id} was held by front")


def test_permalinks_shares_and_logins_work_on_any_front_and_after_restarts(fleet):
    with fleet.client("F1") as client:
        kernel = client.create_kernel()
        kept = client.share_kernel(kernel.id, "collaborator")
        revoked = client.share_kernel(kernel.id, "observer")
    # The share's link names its kernel: through the proxy it logs in at
    # once (on the kernel's front), before any other front knows the share.
    for _ in range(4):
        status, headers, body = request(fleet.url(), "GET", kept["url"])
        assert status == 302 and COOKIE_NAME in headers["set-cookie"], body
    # A permalink made through f1 opens through f2.
    status, _, made = request(
        fleet.url("F1"), "POST", "/permalink", token(fleet.token), {"code": "print('kept')"}
    )
    assert status == 201, made
    status, _, got = request(fleet.url("F2"), "GET", f"/permalink/{made['id']}")
    assert (status, got["code"]) == (200, "print('kept')")
    # A login cookie made on f1.
    status, headers, _ = request(fleet.url("F1"), "POST", "/login", token(fleet.token))
    assert status == 200
    owner_cookie = re.match(rf"{COOKIE_NAME}=([^;]+)", headers["set-cookie"]).group(1)
    cookie = {"Cookie": f"{COOKIE_NAME}={owner_cookie}"}

    # Within the bound, f2 knows the shares and the login.
    started = time.monotonic()
    wait_for(lambda: _share_works(fleet, "F2", kept["token"], kernel.id), REFRESH_BOUND, 0.2)
    wait_for(lambda: request(fleet.url("F2"), "GET", "/api/kernels", cookie)[0] == 200, 2, 0.2)
    assert _share_works(fleet, "F2", revoked["token"], kernel.id)
    print(f"a share made on f1 worked on f2 after {time.monotonic() - started:.1f} s")

    # Revoked through the proxy (on the kernel's front): f2 forgets it too.
    with fleet.client() as client:
        client.revoke_share(kernel.id, revoked["id"])
    assert request(fleet.url("F1"), "GET", "/api/", token(revoked["token"]))[0] == 403
    wait_for(lambda: not _share_works(fleet, "F2", revoked["token"], kernel.id), REFRESH_BOUND)
    assert (
        request(fleet.url("F2"), "GET", f"/api/kernels/{kernel.id}", token(revoked["token"]))[0]
        == 403
    )

    # Both fronts restart: the permalink, the share and the login last.
    for name in TAGS:
        fleet.fronts[name].stop()
        fleet.start_front(name)
    fleet.wait_until_up()
    for name in (None, "F1", "F2"):
        status, _, got = request(fleet.url(name), "GET", f"/permalink/{made['id']}")
        assert (status, got["code"]) == (200, "print('kept')")
        status, _, body = request(fleet.url(name), "GET", "/api/kernels", cookie)
        assert status == 200, body
    for name in TAGS:
        status, _, body = request(
            fleet.url(name), "GET", f"/api/kernels/{kernel.id}", token(kept["token"])
        )
        # Known (404: its kernel ended with the restart), not refused (403).
        assert status == 404, body
        assert (
            request(fleet.url(name), "GET", f"/api/kernels/{kernel.id}", token(revoked["token"]))[0]
            == 403
        )


def test_a_named_token_added_to_the_fronts_configs_works_on_both_within_the_bound(fleet):
    alice = secrets.token_hex(16)
    table = (
        "\n[tokens.alice]\n"
        f'token_hash = "sha256:{hashlib.sha256(alice.encode()).hexdigest()}"\nmax_kernels = 2\n'
    )
    originals = {}
    for name, path in fleet.configs.items():
        with open(path) as f:
            originals[name] = f.read()
    assert request(fleet.url(), "GET", "/api/kernels", token(alice))[0] == 403

    def answers(status: int) -> bool:
        return all(
            request(fleet.url(name), "GET", "/api/kernels", token(alice))[0] == status
            for name in TAGS
        )

    try:
        for path in fleet.configs.values():  # as config management would
            with open(path, "a") as f:
                f.write(table)
        started = time.monotonic()
        wait_for(lambda: answers(200), REFRESH_BOUND, 0.2)
        print(f"a named token worked on both fronts after {time.monotonic() - started:.1f} s")
        with Client(fleet.url(), token=alice) as client:
            made = client.create_kernel().id
            assert [k.id for k in client.list_kernels()] in ([made], [])  # per front
            with client.connect(made) as kernel:
                assert kernel.execute("print('alice')").stdout == "alice\n"
            client.delete_kernel(made)
    finally:
        for name, path in fleet.configs.items():
            with open(path, "w") as f:
                f.write(originals[name])
    # Removed from the configs: it stops on both within the bound.
    wait_for(lambda: answers(403), REFRESH_BOUND, 0.2)


def sleeping_client(fleet, kernel_id: str, seconds: float) -> tuple[threading.Thread, dict]:
    """A client of C{kernel_id}, in a thread, running a cell that sleeps.

    Its outcome: C{"end"}, "finished" or the CellmuxError that ended the
    cell; C{"at"}, when (monotonic).
    """
    outcome: dict[str, object] = {}

    def waits() -> None:
        with fleet.client() as own, own.connect(kernel_id) as kernel:
            try:
                kernel.execute(f"import time; time.sleep({seconds})", timeout=seconds)
                outcome["end"] = "finished"
            except CellmuxError as e:
                outcome["end"] = e
            outcome["at"] = time.monotonic()

    thread = threading.Thread(target=waits)
    thread.start()
    return thread, outcome


def test_the_clients_of_a_front_that_stopped_answering_are_disconnected(fleet):
    # A front that hangs (stopped, or cut off by the network) closes
    # nothing: without on-marked-down shutdown-sessions its clients' tunnels
    # stayed open, silent, for HAProxy's tunnel timeout (an hour).
    with fleet.client() as client:
        kernel_id = client.create_kernel().id
        while front_of(kernel_id) != "F2":
            client.delete_kernel(kernel_id)
            kernel_id = client.create_kernel().id
        thread, outcome = sleeping_client(fleet, kernel_id, 90)
        front = fleet.fronts["F2"].process
        time.sleep(1.5)
        stopped = time.monotonic()
        front.send_signal(signal.SIGSTOP)
        try:
            thread.join(30)
        finally:
            front.send_signal(signal.SIGCONT)
        assert not thread.is_alive(), "the client was still connected 30 s later"
        assert isinstance(outcome["end"], CellmuxError), outcome
        print(f"f2 stopped: its client was disconnected after {outcome['at'] - stopped:.1f} s")
        # Answering again, it is marked up and serves its kernel.
        fleet.wait_until_up()
        with client.connect(kernel_id, timeout=30) as kernel:
            kernel.interrupt()
            # The kernel aborts what reaches it while it ends the
            # interrupted cell; the code of an aborted request never ran.
            for _ in range(3):
                result = kernel.execute("print('back')", timeout=60)
                if result.status != "aborted":
                    break
                time.sleep(0.1)
            assert (result.status, result.stdout) == ("ok", "back\n")
        client.delete_kernel(kernel_id)


def test_a_killed_front_takes_only_its_own_kernels_and_is_named_on_reconnect(fleet):
    with fleet.client() as client:
        by_front: dict[str, str] = {}
        while len(by_front) < 2:
            kernel_id = client.create_kernel().id
            if front_of(kernel_id) in by_front:
                client.delete_kernel(kernel_id)
            else:
                by_front[front_of(kernel_id)] = kernel_id
        doomed, survivor = by_front["F1"], by_front["F2"]
        nursery = fleet.fronts["F1"].nursery_pid()
        assert nursery is not None

        outcome: dict[str, object] = {}

        def survivor_counts() -> None:
            with fleet.client() as own, own.connect(survivor) as kernel:
                code = "import time\nfor i in range(40):\n    print(i)\n    time.sleep(0.1)"
                outcome["survivor"] = kernel.execute(code, timeout=60).stdout

        counting = threading.Thread(target=survivor_counts)
        counting.start()
        sleeping, doomed_outcome = sleeping_client(fleet, doomed, 60)
        time.sleep(1.5)
        killed = time.monotonic()
        fleet.fronts["F1"].process.kill()  # SIGKILL
        sleeping.join(60)
        told_client = time.monotonic() - killed
        counting.join(60)
        # The dead front's client was told; the other's saw every line.
        assert isinstance(doomed_outcome["end"], CellmuxError), doomed_outcome
        assert outcome["survivor"] == "".join(f"{i}\n" for i in range(40))
        # Its nursery (and so its kernels) ended with it.
        wait_for(lambda: not _alive(nursery), timeout=15)

        # Once HAProxy's checks mark it down, a reconnect is told why.
        def told() -> dict | None:
            status, _, body = request(
                fleet.url(), "GET", f"/api/kernels/{doomed}", token(fleet.token)
            )
            return body if status == 404 else None

        body = wait_for(told, timeout=15, interval=0.2)
        print(
            f"f1 killed: its client was told after {told_client:.1f} s, "
            f"a reconnect got front_gone after {time.monotonic() - killed:.1f} s"
        )
        assert body["message"] == (
            f"kernel {doomed} was held by front f1, which is gone or unreachable; "
            "its kernels ended with it"
        )
        with pytest.raises(ServerError) as refused, client.connect(doomed, timeout=20):
            pass
        assert refused.value.code == "front_gone"
        assert "held by front f1" in str(refused.value)
        # The Jupyter websocket of that kernel is refused with the reason too.
        proxy = types.SimpleNamespace(url=fleet.url(), token=fleet.token)
        with pytest.raises(InvalidStatus) as denied:
            JupyterClient(proxy, doomed, "v1")
        assert denied.value.response.status_code == 404
        assert "held by front f1" in denied.value.response.reason_phrase
        # New kernels go to the front that remains; its kernel still runs.
        for _ in range(3):
            made = client.create_kernel().id
            assert front_of(made) == "F2"
            client.delete_kernel(made)
        with client.connect(survivor) as kernel:
            assert kernel.execute("print('still here')").stdout == "still here\n"
        client.delete_kernel(survivor)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

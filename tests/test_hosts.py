"""Kernel hosts (docs/scaling.md): a front ``cellmux serve`` and ``cellmux
host`` processes on 127.0.0.1, linked over TCP with ZeroMQ CURVE, keys made
by ``cellmux keys``. Real processes, real kernels, real sockets.

As root the hosts' kernels run under their own uids, as on a single server;
without root they run as the test's user (the same test covers both).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import attrs
import pytest
import zmq
import zmq.auth

from cellmux.client import HTTPError
from cellmux.protocol.channels import Channel, JupyterSocket
from cellmux.protocol.framing import encode_tag
from cellmux.protocol.hostlink import Beat, Hello, encode
from conftest import RunningServer, start_server, wait_for
from ports import free_port

HOST_TIMEOUT = "2"


def make_keys(directory: str, name: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "cellmux", "keys", "new", name, "--dir", directory],
        check=True,
        capture_output=True,
    )


@attrs.define
class Host:
    """A ``cellmux host`` process started by a test."""

    name: str
    argv: list[str]
    workdir: str
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "host.log")

    @property
    def state_dir(self) -> str:
        return os.path.join(self.workdir, "state")

    def start(self, *, private_runtime_dir: bool = False) -> Host:
        # Its own runtime directory, which the next start takes over, or one
        # it makes itself in the system's temporary directory.
        runtime = [] if private_runtime_dir else ["--runtime-dir", os.path.join(self.workdir, "rt")]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.argv, *runtime, "--state-dir", self.state_dir],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        return self

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@attrs.define
class Cluster:
    front: RunningServer
    keys: str
    authorised: str
    endpoint: str
    base: str
    hosts: dict[str, Host] = attrs.Factory(dict)

    def host(
        self,
        name: str,
        labels: tuple[str, ...] = (),
        max_kernels: int = 4,
        key: str | None = None,
        private_runtime_dir: bool = False,
        config: str | None = None,
    ) -> Host:
        workdir = tempfile.mkdtemp(prefix="h", dir=self.base)
        argv = [sys.executable, "-m", "cellmux", "host", "--front", self.endpoint]
        argv += ["--front-key", os.path.join(self.keys, "front.key")]
        argv += ["--key", os.path.join(self.keys, f"{key or name}.key_secret")]
        argv += ["--name", name, "--max-kernels", str(max_kernels), "--host-timeout", HOST_TIMEOUT]
        for label in labels:
            argv += ["--label", label]
        if config is not None:
            argv += ["--config", config]
        host = Host(name, argv, workdir).start(private_runtime_dir=private_runtime_dir)
        self.hosts[name] = host
        return host

    def admitted(self, name: str, times: int = 1) -> bool:
        return self.front.log().count(f"kernel host {name} admitted") >= times


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with running_cluster() as running:
        yield running


@contextlib.contextmanager
def running_cluster(*front_args: str) -> Iterator[Cluster]:
    """A front and its keys (test_hosts_files uses it too); hosts added by
    L{Cluster.host} are stopped with it."""
    # Short paths: kernel link sockets live under each host's runtime dir.
    base = tempfile.mkdtemp(prefix="hosts")
    keys = os.path.join(base, "keys")
    authorised = os.path.join(base, "authorised")
    os.makedirs(authorised)
    for name in ("front", "a", "b", "stranger"):
        make_keys(keys, name)
    for name in ("a", "b"):
        shutil.copy(os.path.join(keys, f"{name}.key"), authorised)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    front = start_front(keys, authorised, endpoint, *front_args)
    running = Cluster(front, keys, authorised, endpoint, base)
    try:
        yield running
    finally:
        for host in running.hosts.values():
            host.stop()
        running.front.stop()
        shutil.rmtree(base, ignore_errors=True)


def start_front(keys: str, authorised: str, endpoint: str, *more: str) -> RunningServer:
    return start_server(
        *more,
        *("--pool-size", "1", "--no-local-kernels", "--hosts-listen", endpoint),
        *("--hosts-secret-key", os.path.join(keys, "front.key_secret")),
        *("--hosts-authorized-dir", authorised, "--host-timeout", HOST_TIMEOUT),
    )


def create_on(front: RunningServer, label: str) -> tuple[int, dict]:
    """POST /api/kernels with a host label: (status, body)."""
    request = urllib.request.Request(
        front.url + "api/kernels",
        data=json.dumps({"name": "python3", "host_label": label}).encode(),
        headers={"Authorization": f"token {front.token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get_json(front: RunningServer, path: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        front.url + path, headers={"Authorization": f"token {front.token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def server_status(front: RunningServer) -> dict:
    return get_json(front, "api/status")[1]


def round_trip(kernel, code: str = "1+1") -> float:
    started = time.perf_counter()
    assert kernel.execute(code, timeout=10).result_text == "2"
    return time.perf_counter() - started


def test_remote_kernels_placement_loss_and_return(cluster: Cluster) -> None:
    a = cluster.host("a", labels=("gpu",))
    b = cluster.host("b")
    wait_for(lambda: cluster.admitted("a") and cluster.admitted("b"), timeout=60)
    # Each is known by the key the ZAP handler admitted (no name without its key).
    a_key = zmq.auth.load_certificate(os.path.join(cluster.keys, "a.key"))[0].decode()
    assert f"kernel host a admitted (key {a_key}," in cluster.front.log()
    wait_for(
        lambda: [h["pool"] for h in server_status(cluster.front)["hosts"]] == [1, 1], timeout=60
    )
    with cluster.front.client() as client:
        # Placement by free capacity: two kernels, one on each host.
        first, second = client.create_kernel(), client.create_kernel()
        hosts = {client.get_kernel(k.id).raw["host"] for k in (first, second)}
        assert hosts == {"a", "b"}
        # Each host keeps pool_size kernels warm: both came from its pool.
        assert cluster.front.log().count("started (from the pool) on host") == 2
        # A label picks the labelled host, however full it is compared to b.
        labelled = [create_on(cluster.front, "gpu") for _ in range(2)]
        assert [(status, body["host"]) for status, body in labelled] == [(201, "a")] * 2
        status, body = create_on(cluster.front, "tpu")
        assert status == 503 and "tpu" in body["message"], body

        on_a = first.id if client.get_kernel(first.id).raw["host"] == "a" else second.id
        on_b = second.id if on_a == first.id else first.id
        with client.connect(on_a) as ka, client.connect(on_b) as kb:
            # Code, input() and interrupt on a remote kernel.
            result = ka.execute("import os; print(os.getuid())", timeout=20)
            if os.geteuid() == 0:  # as on one machine: a uid of its own, not root
                assert int(result.stdout) >= 200000, result.stdout
            asked = ka.execute("print(input('q? ') * 2)", on_stdin=lambda p, pw: "ab", timeout=20)
            assert asked.stdout == "abab\n"
            interrupted = threading.Timer(1.0, ka.interrupt)
            interrupted.start()
            result = ka.execute("import time; time.sleep(30)", timeout=20)
            interrupted.join()
            assert result.error is not None and result.error.ename == "KeyboardInterrupt"
            assert round_trip(kb) < 2
            # Its files are on its host, served through the front
            # (more in test_hosts_files).
            status, body = get_json(cluster.front, f"files/{on_a}/")
            assert status == 200 and body["truncated"] is False, body

            # A stopped host never stalls the other host's kernels.
            b_pid = client.get_kernel(on_b).pid
            b.signal(signal.SIGSTOP)
            try:
                slowest = max(round_trip(ka) for _ in range(20))
                assert slowest < 1.0, slowest
                wait_for(lambda: kb.status == "dead", timeout=15)
                assert kb.dead_cause == "host lost"
                assert max(round_trip(ka) for _ in range(5)) < 1.0
            finally:
                b.signal(signal.SIGCONT)
            # Woken, b hears it is unknown, says hello again and is back;
            # the kernel the front reported dead does not linger there.
            wait_for(lambda: cluster.admitted("b", 2), timeout=20)
            wait_for(lambda: not os.path.exists(f"/proc/{b_pid}"), timeout=20)

            # A killed host: its kernels' clients are told within seconds;
            # a kernel on the other host answers all along.
            on_b2 = client.create_kernel().id
            assert client.get_kernel(on_b2).raw["host"] == "b"
            with client.connect(on_b2) as kb2:
                assert round_trip(kb2) < 2
                a.signal(signal.SIGKILL)
                killed = time.monotonic()
                while ka.status != "dead":
                    assert round_trip(kb2) < 1.0
                    assert time.monotonic() - killed < 15, "the lost host went unnoticed"
                assert ka.dead_cause == "host lost"
                assert time.monotonic() - killed < 2 * float(HOST_TIMEOUT) + 2
                assert round_trip(kb2) < 1.0
        assert client.get_kernel(on_a).raw["execution_state"] == "dead"

        # Nothing can take a gpu kernel now; b takes the rest.
        status, body = create_on(cluster.front, "gpu")
        assert status == 503 and "gpu" in body["message"], body
        fresh = client.create_kernel()
        assert client.get_kernel(fresh.id).raw["host"] == "b"
        with client.connect(fresh.id) as kernel:
            assert round_trip(kernel) < 2

        # The killed host comes back (a new process: a new epoch) and is used.
        a.start()
        wait_for(lambda: cluster.admitted("a", 2), timeout=60)
        status, back = create_on(cluster.front, "gpu")
        assert (status, back.get("host")) == (201, "a"), back
        with client.connect(back["id"]) as kernel:
            assert round_trip(kernel) < 2


def _pids_with_argument(argument: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if argument.encode() in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def _own_uids(cluster: Cluster) -> str:
    """A config with kernel uids no other server on this machine uses: a
    nursery that takes a uid first ends whatever still runs under it."""
    path = os.path.join(cluster.base, "own-uids.toml")
    with open(path, "w") as f:
        f.write("kernel_uid_range = [430000, 439999]\n")
    return path


def _escapee_on(cluster: Cluster) -> str:
    """A kernel that started a process in a session of its own and then
    ended: returns the argument that finds it (L{_pids_with_argument})."""
    marker = f"1000.{secrets.randbelow(10**9)}"
    with cluster.front.client() as client:
        kernel = client.create_kernel()
        with client.connect(kernel.id) as k:
            started = k.execute(
                "import subprocess\n"
                f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)",
                timeout=20,
            )
            assert started.status == "ok", started.error
    wait_for(lambda: _pids_with_argument(marker), timeout=30)
    return marker


def _record_of(host: Host) -> tuple[str, dict]:
    """The name and contents of the host's one record in its state directory."""
    (name,) = os.listdir(os.path.join(host.state_dir, "servers"))
    with open(os.path.join(host.state_dir, "servers", name)) as f:
        return name, json.load(f)


def test_the_next_start_ends_what_a_killed_host_left(cluster: Cluster) -> None:
    # A killed host (SIGKILL, the OOM killer) cleans up nothing: what its
    # kernels started runs on, and its own runtime directory stays in the
    # temporary directory. The next host with its state directory ends and
    # removes them, as a server's next start does after a crash.
    a = cluster.host("a", private_runtime_dir=True, config=_own_uids(cluster))
    wait_for(lambda: cluster.admitted("a"), timeout=60)
    marker = _escapee_on(cluster)
    escapees = _pids_with_argument(marker)
    record, written = _record_of(a)
    runtime, nursery = written["runtime_dir"], written["nursery"]["pid"]
    assert runtime.startswith(tempfile.gettempdir()) and os.path.isdir(runtime)

    # All of it killed at once, as the OOM killer or a kill of the whole
    # group does (a nursery that outlives its host for a moment ends its
    # kernels' processes itself): stopped, it cannot.
    os.kill(nursery, signal.SIGSTOP)
    a.signal(signal.SIGKILL)
    assert a.process is not None
    a.process.wait(10)
    os.kill(nursery, signal.SIGKILL)
    time.sleep(1)  # the kernel dies with its nursery; the escapee does not
    assert _pids_with_argument(marker) == escapees
    assert os.path.isdir(runtime)

    a.start(private_runtime_dir=True)
    wait_for(lambda: not _pids_with_argument(marker), timeout=30)
    wait_for(lambda: not os.path.exists(runtime), timeout=30)
    wait_for(lambda: cluster.admitted("a", 2), timeout=60)
    newer, written = _record_of(a)
    assert newer != record
    # Stopped cleanly, it leaves no record and no directory.
    runtime = written["runtime_dir"]
    a.stop()
    assert os.listdir(os.path.join(a.state_dir, "servers")) == []
    assert not os.path.exists(runtime)


def test_a_lost_nursery_s_leftovers_are_ended_at_once(cluster: Cluster) -> None:
    # The kernels die with their nursery; what they started does not.
    a = cluster.host("a", config=_own_uids(cluster))
    wait_for(lambda: cluster.admitted("a"), timeout=60)
    marker = _escapee_on(cluster)
    os.kill(_record_of(a)[1]["nursery"]["pid"], signal.SIGKILL)
    wait_for(lambda: not _pids_with_argument(marker), timeout=30)
    wait_for(lambda: "process(es) its kernels left" in a.log(), 30)


def test_fronts_with_keys_of_their_own(cluster: Cluster) -> None:
    # Each front its own key pair, each pinned by the host for its front:
    # a front's stolen secret key then speaks for that front only.
    make_keys(cluster.keys, "front2")
    endpoint2 = f"tcp://127.0.0.1:{free_port()}"
    front2 = start_server(
        *("--pool-size", "1", "--no-local-kernels", "--hosts-listen", endpoint2),
        *("--hosts-secret-key", os.path.join(cluster.keys, "front2.key_secret")),
        *("--hosts-authorized-dir", cluster.authorised, "--host-timeout", HOST_TIMEOUT),
    )
    try:
        keys = {name: os.path.join(cluster.keys, f"{name}.key") for name in ("front", "front2")}

        def host(name: str, first_key: str, second_key: str) -> Host:
            workdir = tempfile.mkdtemp(prefix="h", dir=cluster.base)
            argv = [sys.executable, "-m", "cellmux", "host", "--name", name]
            argv += ["--front", cluster.endpoint, "--front-key", keys[first_key]]
            argv += ["--front", endpoint2, "--front-key", keys[second_key]]
            argv += ["--key", os.path.join(cluster.keys, f"{name}.key_secret")]
            argv += ["--host-timeout", HOST_TIMEOUT]
            cluster.hosts[name] = Host(name, argv, workdir).start()
            return cluster.hosts[name]

        host("a", "front", "front2")
        wait_for(lambda: cluster.admitted("a"), timeout=60)
        wait_for(lambda: "kernel host a admitted" in front2.log(), timeout=60)
        with front2.client() as client:
            kernel = client.create_kernel()
            with client.connect(kernel.id) as k:
                assert round_trip(k) < 2
        # Keys swapped: the host talks to neither front.
        b = host("b", "front2", "front")
        time.sleep(5)
        assert not cluster.admitted("b") and "kernel host b admitted" not in front2.log()
        assert "welcomed" not in b.log()
    finally:
        front2.stop()


def test_unlisted_key_is_refused(cluster: Cluster) -> None:
    stranger = cluster.host("stranger")
    wait_for(lambda: "kernel host key" in cluster.front.log(), timeout=60)
    log = cluster.front.log()
    assert "not authorised" in log
    assert "kernel host stranger admitted" not in log
    time.sleep(3)  # it keeps trying: one line per 10 s, not one per attempt
    assert cluster.front.log().count("not authorised") <= 2
    assert "welcomed" not in stranger.log()
    with cluster.front.client() as client, pytest.raises(HTTPError) as refused:
        client.create_kernel()
    assert refused.value.status == 503
    # Its key authorised (key rotation's first step), it gets in on its own.
    shutil.copy(os.path.join(cluster.keys, "stranger.key"), cluster.authorised)
    wait_for(lambda: cluster.admitted("stranger"), timeout=30)


def rogue_dealer(cluster: Cluster, key_name: str) -> zmq.Socket:
    """A raw CURVE DEALER with an authorised key, speaking for itself."""
    public, secret = zmq.auth.load_certificate(os.path.join(cluster.keys, f"{key_name}.key_secret"))
    front_key, _ = zmq.auth.load_certificate(os.path.join(cluster.keys, "front.key"))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = front_key, public, secret
    sock.connect(cluster.endpoint)
    return sock


def test_a_host_speaks_only_for_its_own_kernels(cluster: Cluster) -> None:
    a = cluster.host("a")
    wait_for(lambda: cluster.admitted("a"), timeout=60)
    # "rogue" holds an authorised key: it may connect, never speak for a.
    shutil.copy(os.path.join(cluster.keys, "stranger.key"), cluster.authorised)
    rogue = rogue_dealer(cluster, "stranger")
    try:
        with cluster.front.client() as client:
            kernel_id = client.create_kernel().id
            kernels_dir = os.path.join(a.workdir, "rt", "kernels")
            links = [n for n in os.listdir(kernels_dir) if len(n) == 32 and "." not in n]
            with client.connect(kernel_id) as kernel:
                seen: list[bytes] = []
                kernel.add_listener(lambda frame: seen.append(b"".join(frame.parts)))
                assert round_trip(kernel) < 2

                def hello(name: str) -> None:
                    # Never blocking: until its key is admitted it has no peer.
                    with contextlib.suppress(zmq.Again):
                        rogue.send_multipart(encode(Hello(name, (), 4, 99)), zmq.NOBLOCK)

                # Its name is a's while a lives: refused (the key does not match).
                wait_for(lambda: "stranger.key" in str(os.listdir(cluster.authorised)))
                deadline = time.monotonic() + 30
                while "is in use by another key" not in cluster.front.log():
                    # Until the front re-read its authorised keys; libzmq
                    # does not retry a refused handshake by itself.
                    rogue.disconnect(cluster.endpoint)
                    rogue.connect(cluster.endpoint)
                    for _ in range(4):
                        hello("a")
                        time.sleep(0.25)
                    assert time.monotonic() < deadline, cluster.front.log()[-2000:]
                # Under a name of its own it is admitted, then forges a's
                # kernel's output with every link id on a: all dropped. (A
                # host is admitted once it beats for its hello: no welcome
                # is read here, the beat just follows.)
                hello("rogue")
                rogue.send_multipart(encode(Beat(0, 4)), zmq.NOBLOCK)
                wait_for(lambda: cluster.admitted("rogue"), timeout=20)
                stream = [
                    json.dumps({"msg_type": "stream", "msg_id": "x"}).encode(),
                    b"{}",
                    b"{}",
                    json.dumps({"name": "stdout", "text": "FORGED"}).encode(),
                ]
                tag = encode_tag(Channel.STDOUT, JupyterSocket.IOPUB)
                for link in links:
                    rogue.send_multipart([bytes.fromhex(link), tag, *stream], zmq.NOBLOCK)
                wait_for(lambda: "kernel host rogue: refused" in cluster.front.log(), timeout=20)
                assert round_trip(kernel) < 2
                assert not any(b"FORGED" in parts for parts in seen)
                assert "kernel host a lost" not in cluster.front.log()
    finally:
        rogue.close()


def test_hosts_follow_a_restarted_front(cluster: Cluster) -> None:
    a = cluster.host("a")
    wait_for(lambda: cluster.admitted("a"), timeout=60)
    with cluster.front.client() as client:
        old = client.create_kernel()
        pid = client.get_kernel(old.id).pid
    cluster.front.stop()
    # A new front on the same endpoint: the host's beats reach a stranger,
    # which asks who it is; it ends the old front's kernels and says hello.
    cluster.front = start_front(cluster.keys, cluster.authorised, cluster.endpoint)
    wait_for(lambda: cluster.admitted("a"), timeout=30)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=20)
    with cluster.front.client() as client:
        kernel_id = client.create_kernel().id
        assert client.get_kernel(kernel_id).raw["host"] == "a"
        with client.connect(kernel_id) as kernel:
            assert round_trip(kernel) < 2
    assert a.process.poll() is None

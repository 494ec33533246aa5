"""The kernel link: each kernel reaches only its own endpoint, and only
until its pump has said hello; a peer that cannot prove its secret gets
nothing.

The server runs as root here (kernels have their own uids and gids).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile

import zmq
from link_intruder import JUNK, connect_early
from test_sandbox_unprivileged import unprivileged  # noqa: F401 - a fixture

from cellmux.kernel import sandbox
from cellmux.kernel.nursery import _share_link_endpoint
from cellmux.protocol import link_control, link_mac
from conftest import wait_for


def _links_dir(server) -> str:
    return os.path.join(server.runtime_dir, "rt", "links")


def _sockets_left(server) -> list[str]:
    links = _links_dir(server)
    return [
        name for name in os.listdir(links) if os.path.exists(os.path.join(links, name, "link.sock"))
    ]


def test_no_shared_link_socket_and_none_left_once_kernels_run(server, kernel):
    assert not os.path.exists(os.path.join(server.runtime_dir, "rt", "link.sock"))
    # Pool kernels may still be starting; once they all run, nothing is left.
    wait_for(lambda: not _sockets_left(server), timeout=30)
    # From inside: no endpoint of its own, none of others', nothing to list.
    found = kernel.execute(
        """
import json, os
runtime = os.path.dirname(os.path.dirname(os.getcwd()))
links = os.path.join(runtime, "links")
try:
    listed = os.listdir(links)
except PermissionError:
    listed = None
print(json.dumps({
    "listed": listed,
    "own": os.path.exists(os.path.join(links, os.path.basename(os.getcwd()))),
    "shared": os.path.exists(os.path.join(runtime, "link.sock")),
}))
""",
        timeout=30,
    )
    assert found.error is None, found.error
    assert json.loads(found.stdout) == {"listed": None, "own": False, "shared": False}
    assert kernel.execute("1 + 1").result_text == "2"


def _try_connect(path: str, uid: int, gid: int) -> str:
    """Connect to a unix socket as uid/gid in a child process; errno name or 'ok'."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        result = b"ok"
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
        except OSError as e:
            result = (e.__class__.__name__).encode()
        os.write(write, result)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        result = f.read().decode()
    os.waitpid(pid, 0)
    return result


def test_only_the_kernels_gid_may_enter_its_endpoint():
    # Needs root (as the server has when kernels get their own uids).
    top = tempfile.mkdtemp(prefix="cellmux-w6-")
    try:
        os.chmod(top, 0o711)
        door = os.path.join(top, "door")
        os.mkdir(door, 0o700)
        path = os.path.join(door, "link.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(8)
        kernel = sandbox.Identity(200777, 200777)
        _share_link_endpoint("ipc://" + path, kernel)
        assert _try_connect(path, kernel.uid, kernel.gid) == "ok"
        assert _try_connect(path, 200778, 200778) == "PermissionError"  # another kernel
        assert _try_connect(path, 65534, 65534) == "PermissionError"  # another local user
        listener.close()
    finally:
        shutil.rmtree(top)


def test_an_intruder_at_a_starting_kernels_endpoint_gets_nothing(server, client):
    ctx = zmq.Context()
    created = []
    try:
        # A new kernel is forked to refill the pool: catch its endpoint.
        intruder = None
        for _ in range(5):
            created.append(client.create_kernel().id)
            intruder = connect_early(ctx, _links_dir(server), timeout=10)
            if intruder is not None:
                break
        assert intruder is not None, "never reached an endpoint before its kernel"
        # A made-up link id: no challenge, nothing relayed.
        intruder.send_multipart(link_control("hello", version=1, pid=os.getpid()))
        for _ in range(10_000):
            intruder.send_multipart(JUNK)
        assert intruder.poll(1000) == 0
        # Guessing a proof without the secret does not get in either.
        fake_mac = link_mac(b"guess", intruder.routing_id, b"nonce")
        intruder.send_multipart([b"\x00\x00\x00\x00", json.dumps({"mac": fake_mac}).encode()])
        assert intruder.poll(500) == 0
        intruder.close(0)
        # The kernel whose endpoint it reached started all the same.
        wait_for(lambda: not _sockets_left(server), timeout=30)
        model = client.create_kernel()
        created.append(model.id)
        with client.connect(model.id) as k:
            assert k.execute("'fine'").result_text == "'fine'"
    finally:
        ctx.term()
        for kernel_id in created:
            with contextlib.suppress(Exception):
                client.delete_kernel(kernel_id)
    # Logged once, then as one line with a count: not ten thousand lines.
    log = server.log()
    assert "unknown kernel links: refused" in log
    assert log.count("unknown kernel links: refused") < 10


def test_without_root_no_endpoint_is_left_either(unprivileged):  # noqa: F811
    # Kernels run as the server's user: they may list links/ (docs/security.md
    # says what that allows), but once they run there is nothing to connect to.
    server, _uid = unprivileged
    with server.client() as client:
        model = client.create_kernel()
        try:
            with client.connect(model.id) as kernel:
                found = kernel.execute(
                    """
import json, os
links = os.path.join(os.path.dirname(os.path.dirname(os.getcwd())), "links")
print(json.dumps([n for n in os.listdir(links)
                  if os.path.exists(os.path.join(links, n, "link.sock"))]))
""",
                    timeout=30,
                )
                assert found.error is None, found.error
                # Only pool kernels still starting may have one; none is this one's.
                cwd = kernel.execute("import os; print(os.getcwd())").stdout.strip()
                own = os.path.basename(cwd)
                assert own not in json.loads(found.stdout)
                wait_for(lambda: not _sockets_left(server), timeout=30)
        finally:
            client.delete_kernel(model.id)

"""Two single-machine servers behind HAProxy, each on a simulated machine of
its own (tests/netns.py): clients that reach their kernels through the proxy
keep their output when the other machine's link is cut, the cut machine's
clients are disconnected by the proxy, and new kernels go to the machine
that remains.

The servers here are plain ``cellmux serve``, each with its own kernels; a
client creates and attaches in one websocket (``hello`` with ``create``), so
the proxy needs no routing by kernel id: a connection stays on the server it
was balanced to.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time

import attrs

import netns
from cellmux.client import AsyncClient, AsyncKernel, CellmuxError

PORT = 8800
#: HAProxy's health check: every 300 ms, down after 2 failures.
CHECK_INTERVAL = 0.3
#: Lines each streaming cell prints, one every 20 ms (about 6 s).
LINES = 300
STREAM = (
    "import time\n"
    f"for i in range({LINES}):\n"
    "    print(f'line {i}', flush=True)\n"
    "    time.sleep(0.02)\n"
)


def haproxy_config(address: str, token: str, servers: dict[str, str]) -> str:
    lines = "\n".join(f"    server {name} {addr}:{PORT} check" for name, addr in servers.items())
    return f"""\
global
    maxconn 200

defaults
    mode http
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout check {int(CHECK_INTERVAL * 1000)}ms

frontend cellmux
    bind {address}:{PORT}
    default_backend servers

backend servers
    balance roundrobin
    option httpchk
    http-check send meth GET uri /api/status hdr Authorization "token {token}"
    default-server inter {int(CHECK_INTERVAL * 1000)}ms fall 2 rise 2
    default-server on-marked-down shutdown-sessions
{lines}
"""


@attrs.define
class Stream:
    """One client's numbered output while a cell runs."""

    kernel: AsyncKernel
    numbers: list[int] = attrs.Factory(list)
    ended_at: float | None = None
    error: BaseException | None = None
    status: str | None = None

    kinds: set[str] = attrs.Factory(set)

    def take(self, output) -> None:
        self.kinds.add(output.kind)
        if output.kind == "stdout":
            self.numbers += [int(n) for n in re.findall(r"line (\d+)", output.content)]

    async def run(self) -> None:
        try:
            result = await self.kernel.execute(STREAM, on_output=self.take, timeout=120)
            self.status = result.status
        except CellmuxError as e:
            self.error = e
        self.ended_at = time.monotonic()


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)


def test_cutting_one_servers_link_leaves_the_other_servers_clients_untouched() -> None:
    token = secrets.token_hex(16)
    with netns.topology() as topo:
        proxy = topo.add_machine("haproxy")
        fronts = {role: topo.add_machine(role) for role in ("front1", "front2")}
        topo.add_machine("client")
        for n, (role, machine) in enumerate(fronts.items()):
            config = topo.path(f"{role}.toml")
            first = 310000 + 1000 * n  # each server its own kernel uids
            with open(config, "w") as f:
                f.write(f"kernel_uid_range = [{first}, {first + 999}]\n")
            netns.start_cellmux(
                topo,
                role,
                ["--host", machine.address, "--port", str(PORT), "--token", token,
                 "--pool-size", "2", "--max-kernels", "10", "-c", config,
                 "--trusted-proxies", proxy.address],
            )  # fmt: skip
        netns.start_haproxy(
            topo,
            "haproxy",
            haproxy_config(proxy.address, token, {r: m.address for r, m in fronts.items()}),
        )
        url = f"http://{proxy.address}:{PORT}"

        async def where(kernel_ids: list[str], roles=tuple(fronts)) -> dict[str, str]:
            """Which server runs each kernel (asked of each of C{roles} directly)."""
            found = {}
            for role in roles:
                machine = fronts[role]
                direct = AsyncClient(f"http://{machine.address}:{PORT}", token)
                for model in await direct.list_kernels():
                    found[model.id] = role
            return {k: found.get(k, "?") for k in kernel_ids}

        async def scenario() -> None:
            client = AsyncClient(url, token)
            # Both servers pass their health check before the proxy balances.
            await _until_ok(client)
            kernels = [await client.start(timeout=60) for _ in range(4)]
            on = await where([k.kernel_id for k in kernels])
            assert sorted(on.values()) == ["front1", "front1", "front2", "front2"], on
            for k in kernels:
                assert (await k.execute("print('hello')", timeout=30)).stdout == "hello\n"

            streams = [Stream(k) for k in kernels]
            tasks = [asyncio.create_task(s.run()) for s in streams]
            await _until(lambda: all(len(s.numbers) >= 5 for s in streams), 30, "first lines")
            cut_at = time.monotonic()
            topo.cut("front2")

            lost = [s for s in streams if on[s.kernel.kernel_id] == "front2"]
            kept = [s for s in streams if on[s.kernel.kernel_id] == "front1"]
            # The proxy's checks fail, it marks front2 down and ends its
            # sessions: those clients learn at once that the connection is gone.
            await _until(lambda: all(s.kernel.closed for s in lost), 10, "front2's clients told")
            told_at = time.monotonic()
            for s in lost:
                assert s.error is not None or s.kernel.closed
            assert all(s.ended_at is None for s in kept), "the cells ended before the cut mattered"

            await asyncio.gather(*tasks)
            for s in kept:
                assert s.error is None, s.error
                assert s.status == "ok"
                assert s.numbers == list(range(LINES)), "lost or reordered output"
                assert s.kinds == {"stdout"} and s.kernel.gaps == []
                assert not s.kernel.closed and s.kernel.dead_cause is None
                assert s.ended_at > told_at
            for s in lost:
                assert isinstance(s.error, CellmuxError), s.error
                assert s.numbers == list(range(len(s.numbers)))

            # New kernels go to the server that remains.
            fresh = [await client.start(timeout=60) for _ in range(2)]
            on_fresh = await where([k.kernel_id for k in fresh], roles=["front1"])
            assert set(on_fresh.values()) == {"front1"}, on_fresh
            for k in fresh:
                assert (await k.execute("print(6 * 7)", timeout=30)).stdout == "42\n"
            print(f"\nfront2's clients told {told_at - cut_at:.2f} s after the cut")

            topo.restore("front2")
            for k in [*kernels, *fresh]:
                await asyncio.wait_for(k.close(), 15)

        topo.call_in("client", lambda: asyncio.run(scenario()))


async def _until_ok(client: AsyncClient) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            await client.get_status()
            return
        except (CellmuxError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(CHECK_INTERVAL)

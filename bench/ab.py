"""Paired before/after runs of the kernel-side tuning (cellmux.kernel.tuning).

    python bench/ab.py none flush sleep,flush all [--rounds 8]

Starts one cellmux server per variant (each variant is a value of
CELLMUX_KERNEL_TUNING in its kernels' environment) and a stock ipykernel
over zmq, then alternates the same measurements between them round by
round, so the machine's drifting load falls on every variant alike.
Prints a JSON document and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from drivers import CellmuxConnection, FloorConnection  # noqa: E402
from servers import FloorKernel, start_cellmux  # noqa: E402

CELLS = {
    "1+1": "1+1",
    "print": "print('hi')",
    "os.write": "import os; os.write(1, b'fd\\n')",
    "subprocess": "import subprocess; subprocess.run(['echo', 'sub'])",
}


async def measure(variants: list[str], rounds: int, per_round: int) -> dict:
    servers = {}
    conns = {}
    floor = FloorKernel.start()
    configs = tempfile.mkdtemp(prefix="cellmux-ab-")
    try:
        for i, v in enumerate(variants):
            path = os.path.join(configs, f"{i}.toml")
            with open(path, "w") as f:
                f.write(f'[cellmux]\nkernel_env = {{CELLMUX_KERNEL_TUNING = "{v}"}}\n')
            servers[v] = start_cellmux("--pool-size", "1", "--config", path)
        for v, server in servers.items():
            server.wait_pool(1)
            model = server.create_kernel()
            conns[v] = await CellmuxConnection.open(server.url, server.token, model["id"])
        conns["floor (stock, zmq)"] = FloorConnection(floor.info)
        await conns["floor (stock, zmq)"].start()
        names = list(conns)
        data = {
            n: {c: {"reply": [], "idle": [], "overtook": 0, "stray": 0} for c in CELLS}
            for n in names
        }
        for conn in conns.values():
            for _ in range(10):
                await conn.execute("1+1")
        for _ in range(rounds):
            for name in names:
                conn = conns[name]
                for cell, code in CELLS.items():
                    for _ in range(per_round):
                        r = await conn.execute(code)
                        d = data[name][cell]
                        d["reply"].append(r.reply * 1000)
                        d["idle"].append(r.idle * 1000)
                        d["overtook"] += r.reply_overtook
                        d["stray"] += r.stray
        # Throughput: one run each of the stream and messages cells.
        flows = {}
        for name in names:
            conn = conns[name]
            r = await conn.execute("for i in range(20000): print(i, flush=True)")
            s = await conn.execute("for i in range(200000): print(i)")
            flows[name] = {
                "messages_per_s": r.stream_messages / r.idle,
                "messages_lines": len(r.lines()),
                "stream_s": s.idle,
                "stream_lines": len(s.lines()),
            }
        for conn in conns.values():
            await conn.close()
    finally:
        for server in servers.values():
            server.stop()
        floor.stop()
        shutil.rmtree(configs, ignore_errors=True)
    out = {}
    for name in names:
        out[name] = {
            cell: {
                "reply_p50": statistics.median(d["reply"]),
                "idle_p50": statistics.median(d["idle"]),
                "n": len(d["reply"]),
                "reply_overtook": d["overtook"],
                "stray_after_idle": d["stray"],
            }
            for cell, d in data[name].items()
        }
        out[name]["flow"] = flows[name]
    return out


def table(out: dict) -> str:
    lines = [
        "| variant | "
        + " | ".join(f"{c} reply / idle ms" for c in CELLS)
        + " | overtook / stray | msgs/s (20k flushed) | 200k lines s |",
        "|---" * (len(CELLS) + 4) + "|",
    ]
    for name, cells in out.items():
        row = [name]
        overtook = stray = 0
        for c in CELLS:
            row.append(f"{cells[c]['reply_p50']:.2f} / {cells[c]['idle_p50']:.2f}")
            overtook += cells[c]["reply_overtook"]
            stray += cells[c]["stray_after_idle"]
        n = sum(cells[c]["n"] for c in CELLS)
        row.append(f"{overtook} / {stray} of {n}")
        flow = cells["flow"]
        row.append(f"{flow['messages_per_s']:,.0f} ({flow['messages_lines']} lines)")
        row.append(f"{flow['stream_s']:.2f} ({flow['stream_lines']} lines)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args()
    out = asyncio.run(measure(args.variants, args.rounds, args.per_round))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

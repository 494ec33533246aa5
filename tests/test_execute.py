"""Executing code on real kernels through a real server."""

from __future__ import annotations

import asyncio
import re

from cellmux.client import AsyncClient
from conftest import run_async

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_stdout_then_result_in_order(kernel):
    result = kernel.execute("print('a'); 1+1")
    assert result.ok
    assert [(o.kind, o.content) for o in result.outputs] == [
        ("stdout", "a\n"),
        ("result", {"text/plain": "2"}),
    ]
    assert result.stdout == "a\n"
    assert result.result_text == "2"


def test_exception_gives_error_with_traceback(kernel):
    result = kernel.execute("def f():\n    return 1/0\nf()")
    assert not result.ok
    assert result.status == "error"
    assert result.error.ename == "ZeroDivisionError"
    tb = ANSI.sub("", "\n".join(result.error.traceback))
    assert "return 1/0" in tb
    assert "f()" in tb


def test_syntax_error(kernel):
    result = kernel.execute("def broken(:\n    pass")
    assert result.status == "error"
    assert result.error.ename == "SyntaxError"
    assert result.error.traceback


def test_stderr_and_display_channels(kernel):
    result = kernel.execute(
        "import sys\nfrom IPython.display import display, HTML\n"
        "sys.stderr.write('oops\\n')\ndisplay(HTML('<b>hi</b>'))"
    )
    assert result.stderr == "oops\n"
    assert result.displays[0]["text/html"] == "<b>hi</b>"


def test_namespace_persists_between_executions(kernel):
    kernel.execute("x = 41")
    assert kernel.execute("x + 1").result_text == "42"


def test_complete_and_inspect(kernel):
    kernel.execute("import os")
    reply = kernel.complete("os.pa")
    assert "path" in reply["matches"]
    assert (reply["cursor_start"], reply["cursor_end"]) == (3, 5)
    info = kernel.inspect("len", 3)
    assert info["found"]
    assert "Return the number of items" in info["data"]["text/plain"]


def test_fifty_kernels_execute_concurrently(server):
    """50 kernels, each computing its own number, all correct."""

    async def run() -> list[str]:
        client = AsyncClient(server.url, token=server.token)
        models = await asyncio.gather(*(client.create_kernel() for _ in range(50)))

        async def compute(i: int, kernel_id: str) -> str:
            async with await client.connect(kernel_id) as k:
                result = await k.execute(f"n = {i}\nsum(range(n + 1))", timeout=120)
            await client.delete_kernel(kernel_id)
            return result.result_text

        return await asyncio.gather(*(compute(i, m.id) for i, m in enumerate(models)))

    results = run_async(run())
    assert results == [str(sum(range(i + 1))) for i in range(50)]

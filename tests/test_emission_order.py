"""One arrival order: what a kernel emits reaches clients in emission order.

Each cell below prints, displays, asks for input, enters pdb and ends with
a value; every step carries a marker ``#N`` whose numbers grow with the
order the kernel emits them in. A client must see the markers in that
order, across stdout, displays, stdin prompts (input, getpass, pdb), the
execute_result and the execute_reply, after the ``busy`` and before the
``idle``.
The same cells run on the native websocket, the Jupyter websocket (both
formats) and long polling, against real kernels.
"""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmux.protocol import Channel, JupyterSocket
from test_jupyter_ws import JupyterClient
from test_longpoll import Poller

MARKER = re.compile(r"#(\d+)")
STEPS = ("print", "input", "getpass", "display", "pdb")
#: How many cells the property tests ran, per transport (for the report).
RUNS: dict[str, int] = {}


def is_pdb(prompt: str) -> bool:
    return "(Pdb)" in prompt or "ipdb>" in prompt


def cell(steps: list[str], final: bool) -> tuple[str, list[str]]:
    """The code of a cell doing C{steps}, and the tokens a client must see.

    Markers are computed (``'#%d' % 3``): pdb lists the cell's source, and
    that listing must show none.
    """
    lines = ["import getpass as _gp", "from IPython.display import display as _display"]
    expected: list[str] = []
    for n, step in enumerate(steps):
        if step == "print":
            lines.append(f"print('#%d' % {n})")
            expected.append(str(n))
        elif step == "input":
            lines.append(f"_ = input('#%d' % {n})")
            expected.append(f"prompt {n}")
        elif step == "getpass":
            lines.append(f"_ = _gp.getpass('#%d' % {n})")
            expected.append(f"prompt {n}")
        elif step == "display":
            lines.append(f"_display('#%d' % {n})")
            expected.append(str(n))
        else:  # pdb: the answer prints the marker, then continues
            lines.append("breakpoint()")
            expected += ["pdb", str(n), "pdb"]
    if final:
        lines.append(f"'#%d' % {len(steps)}")
        expected.append(str(len(steps)))
    return "\n".join(lines) + "\n", ["busy", *expected, "reply", "idle"]


class Answers:
    """Answers prompts: pdb gets ``p '#N'`` then ``c``; others a word."""

    def __init__(self, steps: list[str]) -> None:
        self._pdb = [n for n, step in enumerate(steps) if step == "pdb"]
        self._next_is_continue = False

    def __call__(self, prompt: str) -> str:
        if not is_pdb(prompt):
            return "ok"
        if self._next_is_continue:
            self._next_is_continue = False
            return "c"
        self._next_is_continue = True
        return f"p '#{self._pdb.pop(0)}'"


def tokens(msg_type: str, content: dict) -> list[str]:
    """What one message of the cell contributes to the observed order."""
    if msg_type == "stream" and content.get("name") == "stdout":
        return MARKER.findall(content["text"])
    if msg_type in ("display_data", "execute_result"):
        return MARKER.findall(content["data"].get("text/plain", ""))
    if msg_type == "input_request":
        if is_pdb(content["prompt"]):
            return ["pdb"]
        return [f"prompt {n}" for n in MARKER.findall(content["prompt"])]
    if msg_type == "execute_reply":
        return ["reply"]
    if msg_type == "status" and content.get("execution_state") in ("busy", "idle"):
        return [content["execution_state"]]
    return []


# -- one driver per transport: run a cell, return its messages in arrival order --


def run_native(kernel, code: str, answer) -> list[tuple[str, dict, dict]]:
    seen: list[tuple[str, dict, dict]] = []

    def listener(frame) -> None:
        if frame.channel != Channel.CONTROL and len(frame.parts) >= 4:
            header = json.loads(frame.parts[0])
            seen.append(
                (header["msg_type"], json.loads(frame.parts[1]), json.loads(frame.parts[3]))
            )

    remove = kernel.add_listener(listener)
    try:
        result = kernel.execute(code, on_stdin=lambda prompt, password: answer(prompt), timeout=20)
    finally:
        remove()
    return [m for m in seen if m[1].get("msg_id") == result.msg_id]


def run_jupyter(client: JupyterClient, code: str, answer) -> list[tuple[str, dict, dict]]:
    _, seen = client.execute(code, on_input=answer)
    execute = next(m for m in seen if m["msg_type"] == "execute_input")
    msg_id = execute["parent_header"]["msg_id"]
    return [
        (m["msg_type"], m["parent_header"], m["content"])
        for m in seen
        if m["parent_header"].get("msg_id") == msg_id
    ]


def run_longpoll(poller: Poller, code: str, answer) -> list[tuple[str, dict, dict]]:
    msg_id = poller.execute(code)
    seen: list[tuple[str, dict, dict]] = []
    replied = idle = False
    deadline = time.monotonic() + 20
    while not (replied and idle):
        assert time.monotonic() < deadline, seen
        for frame in poller.poll():
            if frame.channel == Channel.CONTROL:
                continue
            header = json.loads(frame.parts[0])
            parent = json.loads(frame.parts[1])
            content = json.loads(frame.parts[3])
            if parent.get("msg_id") != msg_id:
                continue
            seen.append((header["msg_type"], parent, content))
            if header["msg_type"] == "input_request":
                poller.request(
                    Channel.STDIN,
                    JupyterSocket.STDIN,
                    "input_reply",
                    {"status": "ok", "value": answer(content["prompt"])},
                    parent=header,
                )
            replied |= header["msg_type"] == "execute_reply"
            idle |= header["msg_type"] == "status" and content["execution_state"] == "idle"
    return seen


def observed(messages: list[tuple[str, dict, dict]]) -> list[str]:
    return [token for msg_type, _, content in messages for token in tokens(msg_type, content)]


@pytest.fixture(scope="module")
def order_server(server):
    """The run's shared server: one kernel of its own is all these tests need."""
    return server


@pytest.fixture(scope="module")
def order_kernel(order_server):
    with order_server.client() as client:
        model = client.create_kernel()
        yield model.id
        client.delete_kernel(model.id)


@pytest.fixture(scope="module", params=["native", "jupyter-v1", "jupyter-legacy", "longpoll"])
def transport(request, order_server, order_kernel):
    """(name, run(code, answer) -> messages) for one transport."""
    name = request.param
    if name == "native":
        with order_server.client() as client, client.connect(order_kernel) as kernel:
            yield name, lambda code, answer: run_native(kernel, code, answer)
    elif name.startswith("jupyter"):
        fmt = "v1" if name.endswith("v1") else "legacy"
        jupyter = JupyterClient(order_server, order_kernel, fmt)
        try:
            yield name, lambda code, answer: run_jupyter(jupyter, code, answer)
        finally:
            jupyter.close()
    else:
        poller = Poller(order_server, order_kernel, session=uuid.uuid4().hex)
        poller.poll()
        yield name, lambda code, answer: run_longpoll(poller, code, answer)


def test_output_printed_before_a_prompt_arrives_before_it(transport):
    """The issue's case: ``print`` then ``input()``/``getpass()``, 40 times each."""
    name, run = transport
    for n in range(80):
        ask = "input" if n % 2 else "getpass"
        code, expected = cell(["print", ask, "print"], final=False)
        assert observed(run(code, Answers([]))) == expected, (name, n)
    RUNS[name + " (print then prompt)"] = 80


def test_a_flood_of_small_and_large_outputs_keeps_its_order(transport):
    """The pump sends what it read in one pass as one bundle, but a message
    over 16 KiB alone, after the bundle of what came before it: lines and
    large outputs mixed, flushed one by one, arrive in the order printed,
    every one of them."""
    name, run = transport
    code = (
        "for i in range(600):\n"
        "    print('#%d' % i + ('x' * 40000 if i % 47 == 0 else ''), flush=True)\n"
    )
    expected = ["busy", *map(str, range(600)), "reply", "idle"]
    assert observed(run(code, Answers([]))) == expected, name


@settings(max_examples=150)
@given(steps=st.lists(st.sampled_from(STEPS), min_size=1, max_size=6), final=st.booleans())
def test_every_kind_of_output_arrives_in_emission_order(transport, steps, final):
    name, run = transport
    code, expected = cell(steps, final)
    assert observed(run(code, Answers(steps))) == expected, (name, code)
    RUNS[name] = RUNS.get(name, 0) + 1


def test_replies_to_other_requests_come_between_their_busy_and_idle(order_server, order_kernel):
    """kernel_info, comm_info and complete: busy, reply, idle, 50 times each.

    ipykernel publishes busy by handing it to its IOPub thread, and sends
    the reply itself: the reply used to overtake the busy."""
    with order_server.client() as client, client.connect(order_kernel) as kernel:
        for msg_type, content in (
            ("kernel_info_request", {}),
            ("comm_info_request", {}),
            ("complete_request", {"code": "pri", "cursor_pos": 3}),
        ):
            for n in range(50):
                seen: list[tuple[str, dict, dict]] = []

                def listener(frame, seen=seen) -> None:
                    if frame.channel != Channel.CONTROL and len(frame.parts) >= 4:
                        header = json.loads(frame.parts[0])
                        parent = json.loads(frame.parts[1])
                        seen.append((header["msg_type"], parent, json.loads(frame.parts[3])))

                remove = kernel.add_listener(listener)
                try:
                    reply = kernel.request(msg_type, content, timeout=20)
                    deadline = time.monotonic() + 20
                    while not any(
                        m[0] == "status"
                        and m[1].get("msg_id") == reply.parent_id
                        and m[2]["execution_state"] == "idle"
                        for m in seen
                    ):
                        assert time.monotonic() < deadline, seen
                        time.sleep(0.005)
                finally:
                    remove()
                order = [
                    m[2]["execution_state"] if m[0] == "status" else "reply"
                    for m in seen
                    if m[1].get("msg_id") == reply.parent_id
                    and (m[0] == "status" or m[0].endswith("_reply"))
                ]
                assert order == ["busy", "reply", "idle"], (msg_type, n, order)

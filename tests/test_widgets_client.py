"""The Python client's comm API against a real kernel with ipywidgets.

Comms opened by the client to a kernel-side target, and widget comms the
kernel opens (ipywidgets models), driven from the blocking and the asyncio
client alike.
"""

from __future__ import annotations

import pytest

from cellmux.client import AsyncClient, CommClosed
from conftest import run_async, wait_for

KERNEL_TARGET = """
received = []
closed = []
def _target(comm, msg):
    received.append(('open', msg['content']['data']))
    def on_msg(m):
        received.append(('msg', m['content']['data']))
        comm.send({'echo': m['content']['data'], 'n': len(received)})
    comm.on_msg(on_msg)
    comm.on_close(lambda m: closed.append(m['content']['data']))
get_ipython().kernel.comm_manager.register_target('cellmux.test', _target)
"""


def _value(kernel, expression: str) -> str:
    result = kernel.execute(f"print({expression})")
    return result.stdout.strip()


def test_a_client_opens_a_comm_to_a_kernel_target_and_talks_both_ways(kernel):
    kernel.execute(KERNEL_TARGET)
    comm = kernel.open_comm("cellmux.test", {"hello": 1})
    assert comm.comm_id in kernel.comms
    comm.send({"x": 2})
    answer = comm.recv(timeout=10)
    assert answer.msg_type == "comm_msg"
    assert answer.content["data"] == {"echo": {"x": 2}, "n": 2}
    # on_msg takes over from recv.
    got = []
    comm.on_msg(got.append)
    comm.send({"x": 3})
    wait_for(lambda: got)
    assert got[0].content["data"]["echo"] == {"x": 3}
    assert kernel.comm_info("cellmux.test") == {comm.comm_id: {"target_name": "cellmux.test"}}
    comm.close({"bye": True})
    assert comm.closed and comm.comm_id not in kernel.comms
    expected = "[('open', {'hello': 1}), ('msg', {'x': 2}), ('msg', {'x': 3})]"
    assert _value(kernel, "received") == expected
    assert _value(kernel, "closed") == "[{'bye': True}]"
    with pytest.raises(CommClosed):
        comm.send({"late": 1})


def test_a_comm_to_a_missing_target_is_closed_by_the_kernel(kernel):
    comm = kernel.open_comm("no.such.target")
    with pytest.raises(CommClosed):
        comm.recv(timeout=10)
    assert comm.closed


def test_kernel_opened_widget_comms_can_be_read_and_driven(kernel):
    opened = []
    kernel.register_comm_target("jupyter.widget", lambda comm, msg: opened.append(comm))
    kernel.execute("import ipywidgets as w\ns = w.IntSlider(value=3, max=10)")
    sliders = [
        c
        for c in kernel.comms.values()
        if c.open_message.content["data"]["state"].get("_model_name") == "IntSliderModel"
    ]
    assert len(sliders) == 1
    slider = sliders[0]
    assert slider in opened
    assert slider.target_name == "jupyter.widget"
    assert slider.open_message.content["data"]["state"]["value"] == 3
    # A frontend's update, as a widget view sends it.
    slider.send({"method": "update", "state": {"value": 7}, "buffer_paths": []})
    assert _value(kernel, "s.value") == "7"
    # The kernel's change reaches the client as an update of that comm.
    kernel.execute("s.value = 8")
    while True:
        msg = slider.recv(timeout=10)
        state = msg.content["data"].get("state", {})
        if state.get("value") == 8:
            break
    # Closing the widget in the kernel closes the comm here.
    closed = []
    slider.on_close(closed.append)
    kernel.execute("s.close()")
    with pytest.raises(CommClosed):
        slider.recv(timeout=10)
    assert closed and slider.comm_id not in kernel.comms


def test_the_async_client_has_the_same_comm_api(server):
    async def main() -> None:
        client = AsyncClient(server.url, token=server.token)
        model = await client.create_kernel()
        try:
            async with client.connect(model.id) as kernel:
                await kernel.execute(KERNEL_TARGET)
                comm = await kernel.open_comm("cellmux.test", {"a": 1})
                await comm.send({"b": 2})
                answer = await comm.recv(timeout=10)
                assert answer.content["data"]["echo"] == {"b": 2}
                await comm.close()
                assert comm.closed
        finally:
            await client.delete_kernel(model.id)

    run_async(main())

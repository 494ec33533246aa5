"""Write the seed corpus, fuzz/corpus/<target>/seed-*: one valid input (or
a few) per target, so that mutations start inside each parser's happy path.

Run from the repository root: ``python fuzz/seeds.py``. The output is
committed; rerun it when a format changes.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from targets import LINK_NONCE, join_messages, valid_proof

from cellmux.protocol import Channel, JupyterSocket
from cellmux.protocol.control import control_frame
from cellmux.protocol.framing import Frame, encode_frame, encode_tag
from cellmux.protocol.link import link_control
from cellmux.server.jupyter.codec import JupyterMessage, LegacyCodec, V1Codec
from cellmux.server.longpoll import pack_frames
from cellmux.server.permalinks import encode_inline

CORPUS = Path(__file__).resolve().parent / "corpus"

HEADER = json.dumps(
    {"msg_id": "m1", "msg_type": "execute_request", "session": "s1", "username": "u"}
).encode()
JUPYTER_PARTS = (HEADER, b"{}", b"{}", json.dumps({"code": "1 + 1"}).encode())


def _data_frame() -> bytes:
    return encode_frame(
        Frame(channel=Channel.EXECUTE, parts=JUPYTER_PARTS, seq=0, socket=JupyterSocket.SHELL)
    )


def seeds() -> dict[str, list[bytes]]:
    hello = encode_frame(control_frame("hello", version=1, kernel="k1", session="s1"))
    kernel_tag = encode_tag(Channel.EXECUTE, JupyterSocket.IOPUB)
    legacy = LegacyCodec()
    v1 = V1Codec()
    message = JupyterMessage("shell", JUPYTER_PARTS)
    with_buffer = JupyterMessage("shell", (*JUPYTER_PARTS, b"\x00\x01buffer"))
    return {
        "framing": [hello, _data_frame(), struct.pack(">HBBQI", 0, 0, 0, 0, 0)],
        "link": [
            join_messages(
                [
                    link_control("hello", version=1, pid=42),
                    link_control("proof", mac=valid_proof().decode()),
                    link_control("ready"),
                    [kernel_tag, *JUPYTER_PARTS],
                    link_control("pong", n=1),
                ]
            ),
            join_messages(
                [
                    link_control("challenge", nonce=LINK_NONCE.hex()),
                    link_control("accepted", credit=4096, max_size=65536),
                    link_control("ping", n=3),
                    link_control("credit", bytes=100),
                ]
            ),
        ],
        "control": [
            join_messages(
                [
                    [hello],
                    [encode_frame(control_frame("subscribe", id=1, channels=[1, 2]))],
                    [_data_frame()],
                    [encode_frame(control_frame("interrupt", id=2))],
                ]
            )
        ],
        "longpoll_body": [pack_frames([hello, _data_frame()])],
        "jupyter_decode": [
            b"\x00" + legacy.encode(message)[0],
            b"\x02" + legacy.encode(with_buffer)[0],
            b"\x03" + v1.encode(with_buffer)[0],
        ],
        "jupyter_encode": [join_messages([list(JUPYTER_PARTS), list(with_buffer.parts)])],
        "permalink": [
            encode_inline("print('hi')", "python", '{"a":1}').encode(),
            json.dumps({"c": "1 + 1", "l": "python", "o": {"x": [1, 2]}}).encode(),
        ],
        "rest_body": [
            b'{"code": "1 + 1", "language": "python", "options": {"a": [1, 2.5, null, true]}}',
            b'{"name": "python3", "path": "nb.ipynb", "kernel": {"id": "k"}}',
        ],
        "bounded_json": [
            HEADER,
            b'[[1, {"a": [2, "]]]"]}], "\\"[", {}]',
            b'{"a": {"b": {"c": {"d": [1]}}}}',
        ],
        "input_request_parent": [HEADER, b'{"session": 5}', b"[]"],
    }


def main() -> None:
    for target, inputs in seeds().items():
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for number, data in enumerate(inputs):
            (directory / f"seed-{number}").write_bytes(data)


if __name__ == "__main__":
    main()

"""The fuzz targets (fuzz/targets.py) on every committed input, without atheris.

The seed corpus (fuzz/corpus/<target>) must pass; every input that once
crashed a target (fuzz/crashes/<target>) is a regression test. The named
tests below pin down each crash the fuzzer found, at the parser itself
(all of them deep JSON, refused since by cellmux.protocol.boundedjson).
"""

from __future__ import annotations

import base64
import json
import sys
import zlib
from pathlib import Path

import pytest

from cellmux.server.jupyter.codec import JupyterCodecError, JupyterMessage, LegacyCodec
from cellmux.server.kernels import _parent_session
from cellmux.server.permalinks import decode_inline
from cellmux.server.webjson import HTTPError

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))

from targets import TARGETS, expand  # noqa: E402

INPUTS = sorted(
    (kind, target.name, path.name)
    for kind in ("corpus", "crashes")
    for target in (FUZZ / kind).iterdir()
    if target.is_dir()
    for path in target.iterdir()
)


def test_every_target_has_seeds():
    seeded = {target for kind, target, _ in INPUTS if kind == "corpus"}
    assert seeded == set(TARGETS)


@pytest.mark.parametrize(("kind", "target", "name"), INPUTS)
def test_committed_input(kind, target, name):
    TARGETS[target]((FUZZ / kind / target / name).read_bytes())


def test_expand_repeats_a_chunk():
    assert expand(b"\xffR\x02\x01[rest") == b"[" * 32 + b"rest"
    assert expand(b"plain") == b"plain"


# -- the crashes, one by one --------------------------------------------------

DEEP = b"[" * 5000


def test_a_deeply_nested_parent_header_routes_like_a_malformed_one():
    """fuzz/crashes/input_request_parent: an input_request whose parent
    header nests 4080 deep raised RecursionError in the link's receive
    path, so the request was lost and the kernel waited forever."""
    assert _parent_session(DEEP) is None
    assert _parent_session(b'{"session": "s1"}') == "s1"


def test_a_deeply_nested_inline_permalink_is_a_400():
    """A blob that inflates to deep JSON raised RecursionError (a 500)."""
    blob = base64.urlsafe_b64encode(zlib.compress(DEEP)).decode().rstrip("=")
    with pytest.raises(HTTPError) as caught:
        decode_inline(blob)
    assert caught.value.status == 400


@pytest.mark.parametrize("depth", range(900, 1001))
def test_permalink_options_nested_at_the_recursion_limit_are_a_400(depth):
    """json.loads can manage a depth that json.dumps, a few frames deeper,
    cannot: options at that depth raised RecursionError."""
    nested = "[" * depth + "]" * depth
    doc = f'{{"c": "x", "o": {{"a": {nested}}}}}'.encode()
    blob = base64.urlsafe_b64encode(zlib.compress(doc)).decode().rstrip("=")
    try:
        decode_inline(blob)
    except HTTPError as e:
        assert e.status == 400


@pytest.mark.parametrize("depth", range(900, 1001))
def test_a_kernel_message_nested_at_the_recursion_limit_is_dropped_not_raised(depth):
    """The JSON format re-encodes a kernel's header: at depths json.loads
    just managed, json.dumps raised RecursionError out of the relay."""
    header = f'{{"msg_type": "stream", "a": {"[" * depth + "]" * depth}}}'.encode()
    message = JupyterMessage("iopub", (header, b"{}", b"{}", b"{}"))
    try:
        LegacyCodec().encode(message)
    except JupyterCodecError as e:
        assert e.code == "bad_json"


def test_a_deeply_nested_rest_body_is_a_400():
    from targets import _Body

    from cellmux.server.webjson import read_json_body

    with pytest.raises(HTTPError) as caught:
        read_json_body(_Body(DEEP), limit=64 * 1024)
    assert caught.value.status == 400
    assert read_json_body(_Body(json.dumps({"a": 1}).encode()), limit=100) == {"a": 1}

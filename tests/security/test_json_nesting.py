"""Deeply nested JSON: refused in linear time with a clear error, never a crash or a hang."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmux.protocol.boundedjson import MAX_JSON_DEPTH, JSONTooDeep, loads, nesting_exceeds

# Strings full of what could confuse a bracket counter.
_tricky_text = st.text(alphabet='[]{}"\\ ,:ab\u00e9\U0001f600', max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | _tricky_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_tricky_text, children, max_size=4)
    ),
    max_leaves=40,
)


def depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


def nest(value, levels: int):
    for i in range(levels):
        value = [value] if i % 2 else {"k": value}
    return value


@given(json_values, st.integers(0, 70), st.integers(0, 8), st.booleans())
def test_nesting_check_agrees_with_the_parsed_depth(value, extra, limit, ascii_only):
    value = nest(value, extra)
    text = json.dumps(value, ensure_ascii=ascii_only)
    for data in (text, text.encode("utf-8", "surrogatepass")):
        for bound in (limit, MAX_JSON_DEPTH, depth(value), max(depth(value) - 1, 0)):
            assert nesting_exceeds(data, bound) == (depth(value) > bound)


@given(json_values)
def test_loads_is_json_loads_within_the_bound(value):
    text = json.dumps(value)
    assert loads(text) == json.loads(text)
    assert loads(text.encode()) == json.loads(text)


def test_too_deep_is_a_value_error_in_linear_time():
    for n in (MAX_JSON_DEPTH + 1, 100_000, 10_000_000):
        with pytest.raises(JSONTooDeep):
            loads(b"[" * n + b"]" * n)
    assert loads(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None
    # Brackets inside strings do not count, escaped quotes do not end them.
    assert loads(json.dumps(['\\"[[[' * 1000])) == ['\\"[[[' * 1000]
    # The worst cases for the check cost less than parsing the same size.
    block = b"[" * 63 + b"]" * 63
    worst = b"[" + b",".join([block] * 80_000) + b"]"
    started = time.perf_counter()
    assert not nesting_exceeds(worst)
    checking = time.perf_counter() - started
    started = time.perf_counter()
    json.loads(worst)
    assert checking < time.perf_counter() - started


def _inline_blob(doc: bytes) -> str:
    return base64.urlsafe_b64encode(zlib.compress(doc, 9)).rstrip(b"=").decode()


def test_a_deeply_nested_inline_permalink_is_a_clear_400_without_a_traceback(server):
    before = len(server.log())
    for doc in (b'{"c": "x", "o": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"[" * 5000):
        url = f"{server.url}permalink/z/{_inline_blob(doc)}"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url, timeout=10)
        assert info.value.code == 400
        assert json.loads(info.value.read())["message"] == "not a valid inline permalink"
    log = server.log()[before:]
    assert "Traceback" not in log and "RecursionError" not in log
    # the same for a JSON request body
    request = urllib.request.Request(
        f"{server.url}api/kernels",
        data=b"[" * 30_000,
        headers={"Authorization": f"token {server.token}"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code in (400, 413)
    assert "Traceback" not in server.log()[before:]


# A kernel writing a display_data whose content nests 200,000 levels deep,
# already serialised (Session.send passes bytes content through).
DEEP_DISPLAY = """
k = get_ipython().kernel
deep = b'{"data": {"application/json": ' + b'[' * 200_000 + b']' * 200_000 + b'}, "metadata": {}}'
k.session.send(k.iopub_socket, "display_data", content=deep, parent=k.get_parent())
print("after the deep message")
"""


def test_the_client_skips_a_deeply_nested_kernel_message_and_goes_on(kernel):
    result = kernel.execute(DEEP_DISPLAY, timeout=60)
    assert result.stdout == "after the deep message\n"
    assert result.displays == []
    assert kernel.execute("6 * 7", timeout=30).result_text == "42"

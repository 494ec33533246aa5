"""One query parser decides what is a token and what the access log blanks."""

from __future__ import annotations

import urllib.request

from hypothesis import given
from hypothesis import strategies as st
from twisted.web.http import parse_qs
from websockets.sync.client import connect

from cellmux.server.auth import query_pairs, query_tokens, redact_tokens

_names = st.sampled_from(["token", "TOKEN", "%74oken", "tok%65n", "t+oken", "next", "a", ""])
_values = st.text(alphabet="abc%2F+=?#&;", max_size=8)
queries = st.lists(st.tuples(_names, _values), max_size=6).map(
    lambda pairs: "&".join(f"{n}={v}" for n, v in pairs)
)


@given(queries)
def test_tokens_are_what_twisted_web_reads_and_none_reach_the_log(query):
    target = f"/api/kernels?{query}".encode()
    # twisted.web's request.args, as Request.requestReceived computes it
    args = parse_qs(target.partition(b"?")[2], 1)
    assert query_tokens(target) == args.get(b"token", [])
    redacted = redact_tokens(target)
    assert [v for n, v in query_pairs(redacted) if n.lower() == b"token"] == [
        b"<redacted>" for n, _ in query_pairs(target) if n.lower() == b"token"
    ]
    assert [(n, v) for n, v in query_pairs(redacted) if n.lower() != b"token"] == [
        (n, v) for n, v in query_pairs(target) if n.lower() != b"token"
    ]


def test_an_encoded_token_name_authenticates_and_is_blanked_in_the_log(server):
    for name in ("%74oken", "tok%65n", "token"):
        with urllib.request.urlopen(
            f"{server.url}api/kernels?{name}={server.token}", timeout=10
        ) as response:
            assert response.status == 200
        ws_url = server.url.replace("http://", "ws://") + f"ws?{name}={server.token}"
        with connect(ws_url, open_timeout=15):
            pass
    log = server.log()
    assert server.token not in log
    assert "%74oken=<redacted>" in log and "tok%65n=<redacted>" in log

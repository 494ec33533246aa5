# -*- test-case-name: tests.test_permalinks -*-
"""``/permalink``: share code by a short id, or by a self-contained link.

    POST /permalink           {"code", "language"?, "options"?} -> 201 {"id", ...}
    GET  /permalink/<id>      -> {"id", "code", "language", "options", "created"}
    POST /permalink/inline    {"code", ...} -> {"inline": "<blob>", ...} (no database)
    GET  /permalink/z/<blob>  -> the same fields as by id (no database)

Creating needs the token; fetching does not: a link is made to be shared,
and its id carries 72 random bits (docs/storage.md).
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from twisted.web import server

from cellmux.protocol import boundedjson

from .store import Permalink, create_permalink
from .webjson import HTTPError, JSONEndpoint, Route

__all__ = ["MAX_CODE", "PermalinkResource", "decode_inline", "encode_inline"]

#: Largest code a permalink holds, in UTF-8 bytes: far more than any cell,
#: small enough that a flood of them is cheap to refuse.
MAX_CODE = 256 * 1024
#: Largest encoded options object.
MAX_OPTIONS = 16 * 1024
#: Longest language name.
MAX_LANGUAGE = 64
#: Longest self-contained blob accepted. twisted.web refuses request lines
#: over 16 kB (and proxies are often stricter); code that does not fit
#: belongs in the database.
MAX_INLINE = 15 * 1024
#: Request body limit: the code plus JSON escaping and options.
MAX_BODY = 2 * MAX_CODE + MAX_OPTIONS


def _fields(body: dict[str, Any]) -> tuple[str, str, str]:
    """Validated (code, language, options_json) from a request or a blob."""
    code = body.get("code")
    if not isinstance(code, str):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "'code' must be a string")
    if len(code.encode("utf-8", "surrogatepass")) > MAX_CODE:
        raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"code over {MAX_CODE} bytes")
    language = body.get("language", "python")
    if not isinstance(language, str) or not 0 < len(language) <= MAX_LANGUAGE:
        raise HTTPError(
            HTTPStatus.BAD_REQUEST, f"'language' must be a string of 1-{MAX_LANGUAGE} characters"
        )
    options = body.get("options", {})
    if not isinstance(options, dict):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "'options' must be a JSON object")
    options_json = json.dumps(options, separators=(",", ":"), sort_keys=True)
    if len(options_json) > MAX_OPTIONS:
        raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"options over {MAX_OPTIONS} bytes")
    try:
        code.encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "'code' is not valid Unicode") from None
    return code, language, options_json


def encode_inline(code: str, language: str, options_json: str) -> str:
    """The self-contained blob: zlib-compressed JSON in unpadded URL-safe base64."""
    doc = {"c": code, "l": language, "o": json.loads(options_json)}
    packed = zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 9)
    return base64.urlsafe_b64encode(packed).rstrip(b"=").decode("ascii")


def decode_inline(blob: str) -> tuple[str, str, str]:
    """(code, language, options_json) from a blob.

    @raise HTTPError: 400 for anything that is not a valid blob, 413 for one
        that is, or inflates to, more than the limits allow.
    """
    if len(blob) > MAX_INLINE:
        raise HTTPError(HTTPStatus.REQUEST_URI_TOO_LONG, f"inline link over {MAX_INLINE} chars")
    try:
        blob = blob.rstrip("=")
        packed = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
        inflater = zlib.decompressobj()
        # Bounded: a small blob must not inflate into gigabytes.
        raw = inflater.decompress(packed, MAX_BODY + 1)
        if len(raw) > MAX_BODY or inflater.unconsumed_tail:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "inline link inflates too far")
        if not inflater.eof:
            raise ValueError("truncated")
        doc = boundedjson.loads(raw)
    except (binascii.Error, zlib.error, ValueError, UnicodeDecodeError):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "not a valid inline permalink") from None
    if not isinstance(doc, dict):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "not a valid inline permalink")
    return _fields({"code": doc.get("c"), "language": doc.get("l"), "options": doc.get("o")})


def _model(code: str, language: str, options_json: str, **extra: Any) -> dict[str, Any]:
    return {"code": code, "language": language, "options": json.loads(options_json), **extra}


class PermalinkResource(JSONEndpoint):
    """Everything under ``/permalink``."""

    def __init__(self, store, auth, clock) -> None:
        self.store = store
        self.clock = clock
        pid = r"(?P<permalink_id>[A-Za-z0-9_-]{1,64})"
        super().__init__(
            auth,
            [
                Route(b"POST", r"/permalink/?", self.create),
                Route(b"POST", r"/permalink/inline/?", self.create_inline),
                Route(
                    b"GET", r"/permalink/z/(?P<blob>[A-Za-z0-9_=-]*)", self.get_inline, public=True
                ),
                Route(b"GET", rf"/permalink/{pid}/?", self.get, public=True),
            ],
        )

    async def create(self, request: server.Request) -> tuple[int, Any]:
        code, language, options_json = _fields(self.json_body(request, MAX_BODY))
        if self.store is None:
            raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, "no permalink database configured")
        permalink: Permalink = await create_permalink(
            self.store,
            code=code,
            language=language,
            options_json=options_json,
            now=self.clock.seconds(),
        )
        request.setHeader(b"location", f"/permalink/{permalink.id}".encode())
        return HTTPStatus.CREATED, self._stored_model(permalink)

    async def get(self, request: server.Request, permalink_id: str) -> tuple[int, Any]:
        if self.store is None:
            raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, "no permalink database configured")
        permalink = await self.store.get(permalink_id)
        return HTTPStatus.OK, self._stored_model(permalink)

    async def create_inline(self, request: server.Request) -> tuple[int, Any]:
        code, language, options_json = _fields(self.json_body(request, MAX_BODY))
        blob = encode_inline(code, language, options_json)
        if len(blob) > MAX_INLINE:
            raise HTTPError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "code too long for an inline link; store it with POST /permalink",
            )
        return HTTPStatus.OK, _model(
            code, language, options_json, inline=blob, url=f"/permalink/z/{blob}"
        )

    async def get_inline(self, request: server.Request, blob: str) -> tuple[int, Any]:
        code, language, options_json = decode_inline(blob)
        return HTTPStatus.OK, _model(code, language, options_json, inline=blob)

    def _stored_model(self, permalink: Permalink) -> dict[str, Any]:
        created = datetime.fromtimestamp(permalink.created, UTC).isoformat()
        return _model(
            permalink.code,
            permalink.language,
            permalink.options_json,
            id=permalink.id,
            url=f"/permalink/{permalink.id}",
            created=created,
        )

# -*- test-case-name: tests.test_fronts_units -*-
"""Several fronts behind one proxy: the front's tag in every id it mints.

A front (one ``cellmux serve``) holds the link of each kernel it made, so
every request that names a kernel must reach that front. Instead of a
lookup table, each front mints its ids with its tag in a fixed place, and
the proxy routes by the tag with a plain pattern (docs/scaling.md, Several
fronts; docs/haproxy.cfg):

* a kernel id stays a valid version-4 UUID (Jupyter clients expect one)
  whose first group, the 8 hex digits before the first ``-``, is the tag:
  ``000000a1-9c1e-4b7a-8d2f-0e8b2b0c6d11`` is a kernel of front ``a1``;
* other ids a later request names (a Jupyter session, a long-poll
  connection) start with the same ``TAG-``.

The tag is the ``front_id`` setting (1 to 8 hex digits) padded to 8 with
leading zeros. Without a ``front_id`` (one server alone) ids are plain
random UUIDs, as before.

The proxy's rule (L{route}, and docs/haproxy.cfg's ACLs): a request goes
to front F when its path is ``/api/kernels/``, ``/api/sessions/``,
``/files/`` or ``/poll/`` followed by ``TAG-`` (L{PATH_PATTERN}), or its
first ``kernel`` query parameter starts with ``TAG-``. Nothing else is
looked at, so no token or cookie can pass for a tag. No I/O here.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Iterable

__all__ = [
    "FRONT_ID_PATTERN",
    "PATH_PATTERN",
    "ROUTED_PARAMETER",
    "TAG_LENGTH",
    "front_tag",
    "mint_kernel_id",
    "mint_token",
    "route",
    "tag_of",
    "validate_front_id",
]

#: What a ``front_id`` may be: 1 to 8 lowercase hex digits.
FRONT_ID_PATTERN = re.compile(r"[0-9a-f]{1,8}")
#: Hex digits of a tag (the first group of a UUID).
TAG_LENGTH = 8
#: The proxy's path rule for one front, with ``{tag}`` to fill in: the
#: paths whose next segment is an id a front minted.
PATH_PATTERN = "^/(api/kernels|api/sessions|files|poll)/{tag}-"
#: The query parameter that names a kernel (``/ws``, ``/poll``, ``/login``).
ROUTED_PARAMETER = "kernel"

_TAGGED = re.compile(r"([0-9a-f]{8})-")


def validate_front_id(front_id: str) -> str:
    """C{front_id} itself, or ValueError saying what a front id must be."""
    if not isinstance(front_id, str) or not FRONT_ID_PATTERN.fullmatch(front_id):
        raise ValueError(
            f"front_id must be 1 to 8 lowercase hex digits (e.g. a1), not {front_id!r}"
        )
    return front_id


def front_tag(front_id: str | None) -> str | None:
    """The 8-digit tag of a front (None: an untagged server)."""
    if front_id is None:
        return None
    return validate_front_id(front_id).rjust(TAG_LENGTH, "0")


def mint_kernel_id(tag: str | None, random: bytes | None = None) -> str:
    """A new random version-4 UUID whose first group is C{tag} (if any).

    @param random: 16 bytes to use instead of fresh ones (tests).
    """
    made = uuid.UUID(bytes=random if random is not None else secrets.token_bytes(16), version=4)
    text = str(made)
    return text if tag is None else tag + text[TAG_LENGTH:]


def mint_token(tag: str | None, nbytes: int = 16) -> str:
    """A random URL-safe token for an id (a long-poll connection), tagged."""
    token = secrets.token_urlsafe(nbytes)
    return token if tag is None else f"{tag}-{token}"


def tag_of(identifier: str) -> str | None:
    """The tag an id minted by a tagged front starts with, else None."""
    found = _TAGGED.match(identifier)
    return found.group(1) if found else None


def route(target: str, tags: Iterable[str]) -> str | None:
    """The tag whose front the proxy sends C{target} (a raw request target)
    to, the first that matches in the order of C{tags}, or None: any front
    (round robin). As HAProxy reads it: the path undecoded, and the first
    ``kernel`` parameter of the query."""
    path, _, query = target.partition("?")
    named = None
    for item in query.split("&"):
        name, equals, value = item.partition("=")
        if equals and name == ROUTED_PARAMETER:
            named = value
            break
    for tag in tags:
        if re.search(PATH_PATTERN.format(tag=re.escape(tag)), path):
            return tag
        if named is not None and named.startswith(tag + "-"):
            return tag
    return None

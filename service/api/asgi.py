"""Raw ASGI helpers written once: which route a request is, reading a body, sending JSON."""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import orjson

from service.registry.spec import is_valid_name

_PREFIX = "/v1/policies/"
ACT_ROUTE = "/v1/policies/{name}/act"


class RouteKind(str, Enum):
    act = "act"  # POST /v1/policies/{name}/act: answered by the fast path
    rollout = "rollout"  # its own ROLLOUT_TIMEOUT_S, not the request timeout
    upload = "upload"  # MAX_UPLOAD_BYTES, not MAX_BODY_BYTES; no request timeout
    other = "other"


class Route(NamedTuple):
    kind: RouteKind
    policy: str | None = None


_OTHER = Route(RouteKind.other)
_TAILS = {"act": RouteKind.act, "rollout": RouteKind.rollout, "versions": RouteKind.upload}


def route_of(scope) -> Route:
    """``classify`` for an HTTP scope, computed once per request and kept in the scope."""
    route = scope.get(_SCOPE_KEY)
    if route is None:
        route = scope[_SCOPE_KEY] = classify(scope["method"], scope["path"])
    return route


_SCOPE_KEY = "policy_server.route"


def classify(method: str, path: str) -> Route:
    """The one route classifier the middlewares and the fast path share."""
    if method != "POST" or not path.startswith(_PREFIX):
        return _OTHER
    name, _, tail = path[len(_PREFIX) :].partition("/")
    kind = _TAILS.get(tail)
    if kind is None or not is_valid_name(name):
        return _OTHER
    return Route(kind, name)


def header(scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


def is_json(scope) -> bool:
    """No content-type, or ``application/json`` (with any parameters)."""
    v = header(scope, b"content-type")
    return v is None or v.split(b";")[0].strip().lower() == b"application/json"


async def read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def dumps(payload: object) -> bytes:
    """JSON as every answer of the service renders it (orjson; NaN/inf become null)."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


async def send_json(send, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
    """The one ASGI JSON sender."""
    body = dumps(payload)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if headers:
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})

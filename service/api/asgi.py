"""Raw ASGI helpers written once: which route a request is, reading a body, sending JSON."""

from __future__ import annotations

from enum import Enum
from functools import lru_cache
from typing import NamedTuple

import orjson

from service.registry.spec import is_valid_name

_PREFIX = "/v1/policies/"
_SESSIONS = "/v1/sessions/"
_MODELS = "/v2/models/"
ACT_ROUTE = "/v1/policies/{name}/act"
SESSION_ACT_ROUTE = "/v1/sessions/{session_id}/act"
INFER_ROUTE = "/v2/models/{name}/infer"
INFER_VERSION_ROUTE = "/v2/models/{name}/versions/{version}/infer"


class RouteKind(str, Enum):
    act = "act"  # POST /v1/policies/{name}/act: answered by service.api.hot
    session_act = "session_act"  # POST /v1/sessions/{session_id}/act: answered by service.api.hot
    infer = "infer"  # POST /v2/models/{name}[/versions/{version}]/infer: answered by service.api.oip
    rollout = "rollout"  # its own ROLLOUT_TIMEOUT_S, not the request timeout
    upload = "upload"  # MAX_UPLOAD_BYTES, not MAX_BODY_BYTES; no request timeout
    evaluate = "evaluate"  # off-policy evaluation (fits a Q-network): no request timeout, one at a time
    other = "other"


class Route(NamedTuple):
    kind: RouteKind
    policy: str | None = None
    session_id: str | None = None
    version: str | None = None  # /v2 infer: the path's version, unchecked


_OTHER = Route(RouteKind.other)
_TAILS = {
    "act": RouteKind.act,
    "rollout": RouteKind.rollout,
    "versions": RouteKind.upload,
    "evaluate": RouteKind.evaluate,
}


@lru_cache(maxsize=4096)  # bounded: paths are client-made; a hit costs ~0.2 µs, a miss ~2.5 µs
def classify(method: str, path: str) -> Route:
    """The one route classifier of the edge: limits, timeouts and the hot routes."""
    if method != "POST":
        return _OTHER
    if path.startswith(_SESSIONS):
        session_id, _, tail = path[len(_SESSIONS) :].partition("/")
        if tail == "act" and session_id:
            return Route(RouteKind.session_act, None, session_id)
        return _OTHER
    if path.startswith(_MODELS):
        name, _, tail = path[len(_MODELS) :].partition("/")
        if tail == "infer" and name:
            return Route(RouteKind.infer, name)
        versions, _, rest = tail.partition("/")
        version, _, last = rest.partition("/")
        if versions == "versions" and last == "infer" and name and version:
            return Route(RouteKind.infer, name, None, version)
        return _OTHER
    if not path.startswith(_PREFIX):
        return _OTHER
    name, _, tail = path[len(_PREFIX) :].partition("/")
    kind = _TAILS.get(tail)
    if kind is None or not is_valid_name(name):
        return _OTHER
    return Route(kind, name)


def stream_session_id(path: str) -> str | None:
    """The session of ``/v1/sessions/{session_id}/stream`` (a WebSocket), else None."""
    if not path.startswith(_SESSIONS):
        return None
    session_id, _, tail = path[len(_SESSIONS) :].partition("/")
    return session_id if tail == "stream" and session_id else None


def header(scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


def dumps(payload: object) -> bytes:
    """JSON as every answer of the service renders it (orjson; NaN/inf become null)."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


async def send_json(send, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
    """The one ASGI JSON sender."""
    await send_bytes(send, status, dumps(payload), b"application/json", headers)


async def send_bytes(
    send, status: int, body: bytes, content_type: bytes, headers: dict[str, str] | None = None
) -> None:
    """The one ASGI sender of a whole body."""
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if headers:
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})

"""The act route served ahead of FastAPI's router.

``POST /v1/policies/{name}/act`` is the hot path (simulators call it thousands of times a
second). FastAPI's routing and dependency solving cost several times the forward pass of a small
policy, so this ASGI layer answers it directly with the same schema (``ActRequest``), the same
handler (``act_on_policy``), the same errors and the same JSON; everything else, and any request
it does not recognise, goes on to the application. The route stays declared in FastAPI for the
OpenAPI schema.
"""

from __future__ import annotations

import hmac
import logging
import re
from types import SimpleNamespace

import orjson
from pydantic import ValidationError

from service.api.policies import act_on_policy
from service.errors import ServiceError
from service.registry.spec import NAME_RE
from service.schemas import ActRequest

log = logging.getLogger(__name__)
ACT_PATH = re.compile(r"^/v1/policies/([^/]+)/act$")
ACT_ROUTE = "/v1/policies/{name}/act"


def validation_detail(exc: ValidationError, prefix: tuple = ("body",)) -> list[dict]:
    return [{"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


class FastActMiddleware:
    def __init__(self, app, fastapi_app) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        # what the metrics middleware reads as the route template
        self._route = SimpleNamespace(path=ACT_ROUTE)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            m = ACT_PATH.match(scope["path"])
            if m and NAME_RE.match(m.group(1)) and ".." not in m.group(1) and _json(scope):
                await self._act(scope, receive, send, m.group(1))
                return
        await self.app(scope, receive, send)

    async def _act(self, scope, receive, send, name: str) -> None:
        state = self.fastapi_app.state
        scope["route"] = self._route
        scope["path_params"] = {"name": name}
        status, headers = 200, []
        try:
            settings = state.settings
            if settings.api_key and settings.protect_inference:
                _check_bearer(scope, settings.api_key)
            body = await _read_body(receive)
            try:
                request = ActRequest.model_validate_json(body)
            except ValidationError as exc:
                status, payload = 422, {"detail": validation_detail(exc)}
            else:
                payload = await act_on_policy(
                    state.registry, state.batcher, settings.max_batch_size, name, request
                )
        except ServiceError as exc:
            status, payload = exc.status_code, {"detail": exc.detail}
            headers = [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
        except _Unauthorized as exc:
            status, payload, headers = exc.status, {"detail": exc.detail}, exc.headers
        out = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(out)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": out})


def _json(scope) -> bool:
    for k, v in scope["headers"]:
        if k == b"content-type":
            return v.split(b";")[0].strip().lower() == b"application/json"
    return True


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


class _Unauthorized(Exception):
    def __init__(self, status: int, detail: str, headers: list) -> None:
        self.status, self.detail, self.headers = status, detail, headers


def _check_bearer(scope, key: str) -> None:
    header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise _Unauthorized(
            401,
            "missing credentials: send 'Authorization: Bearer <POLICY_SERVER_API_KEY>'",
            [(b"www-authenticate", b"Bearer")],
        )
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise _Unauthorized(403, "invalid API key", [])

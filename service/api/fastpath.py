"""The act route served ahead of FastAPI's router.

``POST /v1/policies/{name}/act`` is the hot path (simulators call it thousands of times a
second). FastAPI's routing and dependency solving cost several times the forward pass of a small
policy, so this ASGI layer answers it directly: the same schema (``ActRequest``), the same
service (``ActService.act``), the same auth check, errors and JSON. Everything else goes on to
the application, where the route stays declared for the OpenAPI schema.
"""

from __future__ import annotations

from types import SimpleNamespace

from pydantic import ValidationError

from service.api.asgi import ACT_ROUTE, RouteKind, header, is_json, read_body, route_of, send_json
from service.api.auth import check_bearer
from service.api.errors import error_answer, invalid_body
from service.errors import ServiceError
from service.schemas import ActRequest


class FastActMiddleware:
    def __init__(self, app, fastapi_app) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        # what the metrics middleware reads as the route template
        self._route = SimpleNamespace(path=ACT_ROUTE)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            route = route_of(scope)
            if route.kind is RouteKind.act and is_json(scope):
                await self._act(scope, receive, send, route.policy)
                return
        await self.app(scope, receive, send)

    async def _act(self, scope, receive, send, name: str) -> None:
        state = self.fastapi_app.state
        scope["route"] = self._route
        scope["path_params"] = {"name": name}
        status, headers = 200, None
        try:
            settings = state.settings
            if settings.api_key and settings.protect_inference:
                auth = header(scope, b"authorization")
                check_bearer(auth.decode("latin-1") if auth is not None else None, settings.api_key)
            body = await read_body(receive)
            try:
                request = ActRequest.model_validate_json(body)
            except ValidationError as exc:
                status, payload = 422, invalid_body(exc)
            else:
                payload = await state.act_service.act(request.params(name))
        except ServiceError as exc:
            status, payload, headers = error_answer(exc)
        await send_json(send, status, payload, headers)

"""The hot routes: ``POST /v1/policies/{name}/act``, ``POST /v1/sessions/{session_id}/act`` and
each message of the WebSocket ``/v1/sessions/{session_id}/stream`` — one implementation each.

The edge (``api/edge.ServiceApp``) answers them ahead of FastAPI, whatever the body's
content-type (the body is read as bytes and parsed as JSON). FastAPI's router never sees them:
``DOCUMENTED`` declares them for the OpenAPI schema only (``ServiceApp.openapi`` adds them); its
declarations are never mounted. Why: on these routes, which simulators call thousands of times a
second, Starlette's middleware chain, routing and dependency solving cost several times the
forward pass of a small policy.
"""

from __future__ import annotations

from fastapi import APIRouter, Header
from pydantic import ValidationError

from service.api.asgi import Route, RouteKind
from service.api.deps import PolicyName
from service.api.errors import error_answer, invalid_body
from service.errors import ServiceError
from service.schemas import ActRequest, ActResponse, SessionActRequest, SessionActResponse

Answer = tuple[int, dict, dict[str, str] | None]


async def answer(state, route: Route, body: bytes, routing_key: bytes | None = None) -> Answer:
    """``(status, payload, headers)`` of a hot HTTP route: schema → params → service;
    ``routing_key``: the act call's ``X-Routing-Key`` header."""
    try:
        if route.kind is RouteKind.act:
            params = ActRequest.model_validate_json(body).params(route.policy)
            if routing_key is not None:
                params.routing_key = routing_key.decode("latin-1")
        else:
            params = SessionActRequest.model_validate_json(body).params(route.session_id)
    except ValidationError as exc:
        return 422, invalid_body(exc), None
    try:
        if route.kind is RouteKind.act:
            return 200, await state.act_service.act(params), None
        return 200, await state.session_service.step(params), None
    except ServiceError as exc:
        return error_answer(exc)


def stream_route(session_id: str) -> Route:
    """The route each message of ``/v1/sessions/{session_id}/stream`` is answered as."""
    return Route(RouteKind.session_act, None, session_id)


async def stream_reply(state, route: Route, message: str | bytes) -> dict:
    """The reply to one message of a session's stream: the step's answer, or ``{"status",
    "detail"}`` with the status the HTTP route would have answered."""
    status, payload, _ = await answer(state, route, message)
    return payload if status == 200 else {"status": status, **payload}


DOCUMENTED = APIRouter()


@DOCUMENTED.post("/v1/policies/{name}/act", response_model=ActResponse, tags=["policies"])
async def act(
    name: PolicyName,
    body: ActRequest,
    x_routing_key: str | None = Header(
        None,
        description="Without 'version', calls with the same key land on the same version of the "
        "policy's split (PUT /v1/policies/{name}/routing)",
    ),
) -> None:
    """Act on one observation or a batch (answered by ``service.api.hot.answer``)."""


@DOCUMENTED.post("/v1/sessions/{session_id}/act", response_model=SessionActResponse, tags=["sessions"])
async def act_session(session_id: str, body: SessionActRequest) -> None:
    """One step of a session (answered by ``service.api.hot.answer``)."""

"""Sessions: recurrent state kept by the server, over HTTP and a WebSocket stream.

The hot two, ``POST /{session_id}/act`` and the WebSocket ``/{session_id}/stream`` (each message
an act body, each reply an act response or ``{"status", "detail"}``), are answered by
``service.api.edge`` ahead of the router; the act route stays declared here for OpenAPI.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import Inference, SessionsDep
from service.api.responses import FastJSONResponse
from service.schemas import (
    SessionActRequest,
    SessionActResponse,
    SessionCreate,
    SessionPublic,
    SessionSummary,
)

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=[Inference])


@router.get("", response_model=SessionSummary)
async def session_summary(sessions: SessionsDep) -> dict:
    return await sessions.summary()


@router.post("", status_code=201, response_model=SessionPublic)
async def create_session(body: SessionCreate, sessions: SessionsDep) -> dict:
    return await sessions.create(body.params())


@router.get("/{session_id}", response_model=SessionPublic)
async def get_session(session_id: str, sessions: SessionsDep) -> dict:
    return await sessions.get(session_id)


@router.delete("/{session_id}", status_code=204)
async def delete_session(session_id: str, sessions: SessionsDep) -> Response:
    await sessions.delete(session_id)
    return Response(status_code=204)


@router.post("/{session_id}/reset", response_model=SessionPublic)
async def reset_session(session_id: str, sessions: SessionsDep) -> dict:
    return await sessions.reset(session_id)


@router.post("/{session_id}/act", response_model=SessionActResponse)
async def act_session(session_id: str, body: SessionActRequest, sessions: SessionsDep) -> Response:
    """Documented here; answered by ``service.api.edge`` ahead of the router (same schema and service)."""
    return FastJSONResponse(await sessions.step(body.params(session_id)))

"""Sessions: recurrent state kept by the server, over HTTP and a WebSocket stream.

The hot two, ``POST /{session_id}/act`` and the WebSocket ``/{session_id}/stream`` (each message
an act body, each reply an act response or ``{"status", "detail"}``), are ``service.api.hot``'s.
"""

from __future__ import annotations

from fastapi import APIRouter, Header, Response

from service.api.deps import Inference, SessionsDep
from service.schemas import (
    SessionCreate,
    SessionPublic,
    SessionSummary,
)

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=[Inference])


@router.get("", response_model=SessionSummary)
async def session_summary(sessions: SessionsDep) -> dict:
    return await sessions.summary()


@router.post("", status_code=201, response_model=SessionPublic)
async def create_session(
    body: SessionCreate,
    sessions: SessionsDep,
    x_routing_key: str | None = Header(
        None, description="Lands the session on the same version of a split as other calls with this key"
    ),
) -> dict:
    params = body.params()
    params.routing_key = x_routing_key
    return await sessions.create(params)


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

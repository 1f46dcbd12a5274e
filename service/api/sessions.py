"""Sessions: recurrent state kept by the server, over HTTP and a WebSocket stream."""

from __future__ import annotations

from fastapi import APIRouter, Response, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from service.api.asgi import dumps
from service.api.deps import Inference, SessionsDep
from service.api.errors import error_answer, invalid_body
from service.api.responses import FastJSONResponse
from service.errors import ServiceError
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


@router.websocket("/{session_id}/stream")
async def stream_session(websocket: WebSocket, session_id: str, sessions: SessionsDep) -> None:
    """Each text message an act body, each reply an act response (or ``{"status", "detail"}``)."""
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            try:
                body = SessionActRequest.model_validate_json(text)
                reply = await sessions.step(body.params(session_id))
            except ValidationError as exc:
                reply = {"status": 422, **invalid_body(exc)}
            except ServiceError as exc:
                status, payload, _ = error_answer(exc)
                reply = {"status": status, **payload}
            await websocket.send_text(dumps(reply).decode())
    except WebSocketDisconnect:
        return

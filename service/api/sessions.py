"""Sessions: recurrent state kept by the server, over HTTP and a WebSocket stream."""

from __future__ import annotations

from typing import Annotated

import orjson
import torch
from fastapi import APIRouter, Depends, Request, Response, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from service.api.deps import BatcherDep, Inference, RegistryDep, SettingsDep
from service.api.policies import check_batch
from service.api.responses import FastJSONResponse
from service.errors import NotFound, ServiceError, Unprocessable
from service.registry.registry import Registry
from service.runtime.batching import MicroBatcher
from service.runtime.policy import Exploration
from service.runtime.sessions import Session, SessionStore
from service.schemas import SessionActRequest, SessionActResponse, SessionCreate, SessionPublic

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=[Inference])


async def get_session_store(request: Request) -> SessionStore:
    return request.app.state.sessions


SessionStoreDep = Annotated[SessionStore, Depends(get_session_store)]


async def _load(store: SessionStore, session_id: str) -> Session:
    session = await store.get(session_id)
    if session is None:
        raise NotFound(f"session {session_id[:64]!r} not found (never created, deleted or expired)")
    return session


@router.post("", status_code=201, response_model=SessionPublic)
async def create_session(
    body: SessionCreate, registry: RegistryDep, store: SessionStoreDep, settings: SettingsDep
) -> dict:
    loaded = registry.resolve(body.policy, body.version)
    if body.num_envs > settings.max_session_envs:
        raise Unprocessable(f"num_envs={body.num_envs} exceeds the limit of {settings.max_session_envs}")
    ttl = body.ttl_s or settings.session_ttl_s
    if ttl > settings.max_session_ttl_s:
        raise Unprocessable(f"ttl_s={ttl:g} exceeds the limit of {settings.max_session_ttl_s:g}")
    session = Session(
        policy=loaded.name,
        version=loaded.version,
        num_envs=body.num_envs,
        ttl_s=ttl,
        exploration=body.exploration,
        epsilon=body.epsilon,
        noise_std=body.noise_std,
    )
    await store.create(session, settings.max_sessions)
    return session.public()


@router.get("/{session_id}", response_model=SessionPublic)
async def get_session(session_id: str, store: SessionStoreDep) -> dict:
    return (await _load(store, session_id)).public()


@router.delete("/{session_id}", status_code=204)
async def delete_session(session_id: str, store: SessionStoreDep) -> Response:
    async with store.lock(session_id):
        if not await store.delete(session_id):
            raise NotFound(f"session {session_id[:64]!r} not found")
    return Response(status_code=204)


@router.post("/{session_id}/reset", response_model=SessionPublic)
async def reset_session(session_id: str, store: SessionStoreDep) -> dict:
    async with store.lock(session_id):
        session = await _load(store, session_id)
        session.reset()
        await store.save(session)
    return session.public()


def _reset_mask(reset: bool | list[bool] | None, num_envs: int) -> torch.Tensor:
    if reset is None or reset is False:
        return torch.zeros(num_envs, dtype=torch.bool)
    if reset is True:
        return torch.ones(num_envs, dtype=torch.bool)
    if len(reset) != num_envs:
        raise Unprocessable(f"reset has {len(reset)} values; the session has num_envs={num_envs}")
    return torch.tensor(reset, dtype=torch.bool)


async def step_session(
    session_id: str,
    body: SessionActRequest,
    *,
    store: SessionStore,
    registry: Registry,
    batcher: MicroBatcher,
    max_batch: int,
) -> dict:
    """One step of a session: in order with other calls on it; state unchanged on any error."""
    async with store.lock(session_id):
        session = await _load(store, session_id)
        try:
            loaded = registry.resolve(session.policy, session.version)
        except NotFound:
            await store.delete(session_id)
            raise NotFound(
                f"session {session_id!r} was closed: policy {session.policy} "
                f"version {session.version} is no longer served"
            ) from None
        rows = body.rows
        check_batch(len(rows), max_batch)
        if len(rows) != session.num_envs:
            raise Unprocessable(
                f"the session has num_envs={session.num_envs}: send {session.num_envs} "
                f"observation(s) in 'observations' (or one 'observation' when num_envs=1), "
                f"got {len(rows)}"
            )
        runtime = loaded.runtime
        obs = runtime.observation_batch(
            rows, "observation" if body.single else "observations", session.policy
        )
        is_init = session.needs_init | _reset_mask(body.reset, session.num_envs)
        state = None
        if runtime.recurrent:
            state = (session.h, session.c) if session.h is not None else runtime.zero_state(session.num_envs)
        result = await batcher.act(
            runtime,
            obs,
            exploration=body.exploration or session.exploration or Exploration.deterministic,
            epsilon=body.epsilon if body.epsilon is not None else session.epsilon,
            noise_std=body.noise_std if body.noise_std is not None else session.noise_std,
            return_info=body.return_info,
            state=state,
            is_init=is_init,
        )
        if result.state is not None:
            session.h, session.c = result.state
        session.needs_init = torch.zeros(session.num_envs, dtype=torch.bool)
        session.steps += 1
        await store.save(session)
    payload = result.payload(body.single)
    payload.update(step=session.steps, policy=session.policy, version=session.version)
    return payload


@router.post("/{session_id}/act", response_model=SessionActResponse)
async def act_session(
    session_id: str,
    body: SessionActRequest,
    store: SessionStoreDep,
    registry: RegistryDep,
    batcher: BatcherDep,
    settings: SettingsDep,
) -> Response:
    payload = await step_session(
        session_id, body, store=store, registry=registry, batcher=batcher, max_batch=settings.max_batch_size
    )
    return FastJSONResponse(payload)


@router.websocket("/{session_id}/stream")
async def stream_session(websocket: WebSocket, session_id: str) -> None:
    """Each text message an act body, each reply an act response (or ``{"status", "detail"}``)."""
    app = websocket.app
    settings = app.state.settings
    await websocket.accept()
    store: SessionStore = app.state.sessions
    try:
        while True:
            text = await websocket.receive_text()
            try:
                body = SessionActRequest.model_validate_json(text)
                reply = await step_session(
                    session_id,
                    body,
                    store=store,
                    registry=app.state.registry,
                    batcher=app.state.batcher,
                    max_batch=settings.max_batch_size,
                )
            except ValidationError as exc:
                reply = {
                    "status": 422,
                    "detail": [
                        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()
                    ],
                }
            except ServiceError as exc:
                reply = {"status": exc.status_code, "detail": exc.detail}
            await websocket.send_text(orjson.dumps(reply).decode())
    except WebSocketDisconnect:
        return

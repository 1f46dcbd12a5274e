"""RLlib ``PolicyClient`` compatibility: ``POST /rllib/{policy}``, the address a simulator
written against ``PolicyClient(address, inference_mode="remote")`` posts its pickled commands
to. Off unless ``POLICY_SERVER_RLLIB_COMPAT`` is on (404 otherwise), behind the inference key.
Bodies are read by ``api/rllib_wire``'s allow-list unpickler on a worker thread (within the
body limit); answers are pickled dicts; errors are ``{"detail"}`` JSON with the /v1 status,
which the client logs and raises as ``HTTPError``.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from service.api import rllib_wire
from service.api.deps import Inference
from service.errors import NotFound

router = APIRouter(prefix="/rllib", tags=["rllib"], dependencies=[Inference])


@router.post("/{policy}")
async def rllib_command(policy: str, request: Request) -> Response:
    if not request.app.state.settings.rllib_compat:
        raise NotFound("RLlib PolicyClient compatibility is off: set POLICY_SERVER_RLLIB_COMPAT=true")
    body = await request.body()  # read within MAX_BODY_BYTES by the edge
    message = await asyncio.to_thread(rllib_wire.loads, body)
    command = message.pop("command").name
    answer = await request.app.state.rllib_service.handle(policy, command, message)
    return Response(rllib_wire.dumps(answer), media_type="application/octet-stream")

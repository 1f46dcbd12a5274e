"""Baseline servers for the throughput benchmark.

``naive``: the FastAPI endpoint people write themselves (``async def``, a TensorDict and the
same TorchRL policy per request). ``empty``: the same stack doing no work at all. ``bare``: the
limit, a raw ASGI app on the same uvicorn answering a constant ``{"action": 0}`` to every request
(it reads the body, parses nothing); on a WebSocket it echoes a constant per message. ``floor``:
the least a server running this policy does, on the same uvicorn: a raw ASGI app that parses the
JSON body, gathers the observations that arrive together into one forward pass of the policy's
network (no checks, no metrics, no log, no TensorDict) and answers the argmax; a GET answers
``{"passes", "rows"}``, the forward passes so far and their observations.

    python -m benchmarks.baselines naive|empty|bare|floor MODEL_DIR NAME PORT

On another ASGI server (granian): ``BASELINE="floor MODEL_DIR NAME"`` in the environment and
``granian --interface asgi --factory benchmarks.baselines:make_app``.
"""

import os
import sys

import torch
import uvicorn
from fastapi import FastAPI
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from service.process import configure_process
from service.registry.build import build_policy
from service.registry.registry import Registry
from service.registry.store import ModelStore
from service.runtime.policy import PolicyRuntime


def make_app(kind: str | None = None, model_dir: str | None = None, name: str | None = None):
    """The baseline ``kind`` (default: from ``$BASELINE``, "kind model_dir name")."""
    if kind is None:
        kind, model_dir, name = os.environ["BASELINE"].split()
    # The same process-wide settings as our server (one torch thread, tensordict's pandas probe
    # short-circuited), so that the comparison is of the serving code alone.
    configure_process(torch_threads=1)
    return _build(kind, model_dir, name)


def _build(kind: str, model_dir: str, name: str):
    app = FastAPI()
    if kind == "naive":
        registry = Registry(ModelStore(model_dir), prepare=PolicyRuntime)
        registry.load_all()
        runtime = registry.resolve(name).runtime
        # the plain TorchRL policy a user writes (the served one also reads action masks)
        policy = build_policy(runtime.spec, torch.device("cpu")).core.eval()
        policy.load_state_dict(runtime.core.state_dict())

        @app.post("/v1/policies/{name}/act")
        async def act(name: str, body: dict) -> dict:
            td = TensorDict({"observation": torch.tensor([body["observation"]])}, batch_size=[1])
            with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
                out = policy(td)
            return {"action": out["action"][0].item()}
    elif kind == "empty":

        @app.post("/v1/policies/{name}/act")
        async def act(name: str, body: dict) -> dict:
            return {"action": 0}
    elif kind == "floor":
        import asyncio

        import orjson

        registry = Registry(ModelStore(model_dir), prepare=PolicyRuntime)
        registry.load_all()
        net = registry.resolve(name).runtime.fast.head  # the policy's MLP, without the argmax module
        pending: list[tuple[list, asyncio.Future]] = []
        _JSON = [(b"content-type", b"application/json")]
        passes = [0, 0]  # forward passes, rows: GET answers them (the batches a load formed)

        def forward() -> None:
            batch = pending[:]
            pending.clear()
            passes[0] += 1
            passes[1] += len(batch)
            with torch.inference_mode():
                actions = net(torch.tensor([obs for obs, _ in batch])).argmax(-1).tolist()
            for (_, fut), a in zip(batch, actions, strict=True):
                fut.set_result(a)

        async def app(scope, receive, send) -> None:  # noqa: F811 - the least a policy server does
            if scope["type"] == "http" and scope["method"] == "GET":
                body = orjson.dumps({"passes": passes[0], "rows": passes[1]})
                await send({"type": "http.response.start", "status": 200, "headers": _JSON})
                await send({"type": "http.response.body", "body": body})
            elif scope["type"] == "http":
                chunks, more = [], True
                while more:
                    message = await receive()
                    chunks.append(message.get("body", b""))
                    more = message.get("more_body", False)
                fut = asyncio.get_running_loop().create_future()
                if not pending:
                    asyncio.get_running_loop().call_soon(forward)
                pending.append((orjson.loads(b"".join(chunks))["observation"], fut))
                body = orjson.dumps({"action": await fut})
                headers = [*_JSON, (b"content-length", b"%d" % len(body))]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
            elif scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
    else:
        _ANSWER = b'{"action":0}'
        _HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_ANSWER))]

        async def app(scope, receive, send) -> None:  # noqa: F811 - the bare ASGI limit
            if scope["type"] == "http":
                more = True
                while more:
                    more = (await receive()).get("more_body", False)
                await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
                await send({"type": "http.response.body", "body": _ANSWER})
            elif scope["type"] == "websocket":
                await receive()  # connect
                await send({"type": "websocket.accept"})
                while (await receive())["type"] == "websocket.receive":
                    await send({"type": "websocket.send", "text": '{"action":0}'})
            elif scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})

    return app


if __name__ == "__main__":
    uvicorn.run(  # as service.cli serve runs uvicorn (no per-message deflate on WebSockets)
        make_app(sys.argv[1], sys.argv[2], sys.argv[3]),
        host="127.0.0.1",
        port=int(sys.argv[4]),
        loop="uvloop",
        http="httptools",
        ws_per_message_deflate=False,
        log_level="warning",
        access_log=False,
    )

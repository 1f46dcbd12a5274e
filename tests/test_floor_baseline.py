"""The floor server of ``benchmarks.http_servers`` (``benchmarks.baselines``): it answers the
policy's greedy actions, calls that arrive together share one forward pass, and its GET counts
the passes and their observations — what the benchmark reads as the batches a load formed."""

import asyncio
import json
from pathlib import Path

import orjson
import torch

from benchmarks.baselines import make_app
from benchmarks.peers.run import observations
from service.exploration import Exploration
from service.registry.registry import Registry
from service.registry.store import ModelStore
from service.runtime.policy import PolicyRuntime

ROOT = Path(__file__).resolve().parents[1]
POLICY = "cartpole-dqn"


async def call(app, method: str, body: bytes = b"") -> tuple[int, object]:
    scope = {"type": "http", "method": method, "path": f"/v1/policies/{POLICY}/act", "headers": []}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], orjson.loads(sent[1]["body"])


def test_the_floor_batches_what_arrives_together_and_counts_it():
    app = make_app("floor", str(ROOT / "models"), POLICY)
    registry = Registry(ModelStore(ROOT / "models"), prepare=PolicyRuntime)
    registry.load_all()
    runtime = registry.resolve(POLICY).runtime
    obs = observations(12)
    greedy = runtime.act(torch.tensor(obs), exploration=Exploration.deterministic).action.tolist()
    assert 0 < sum(greedy) < len(greedy)  # both actions: a wrong answer would show

    async def scenario():
        bodies = [json.dumps({"observation": o}).encode() for o in obs]
        first = await asyncio.gather(*(call(app, "POST", body) for body in bodies))
        counted = await call(app, "GET")
        lone = await call(app, "POST", bodies[0])
        return first, counted, lone, await call(app, "GET")

    first, counted, lone, after = asyncio.run(scenario())
    assert [payload["action"] for _, payload in first] == greedy
    assert counted == (200, {"passes": 1, "rows": 12})  # twelve calls together, one pass
    assert lone == (200, {"action": greedy[0]})
    assert after == (200, {"passes": 2, "rows": 13})

"""Exported-program act throughput next to the declarative form of the same network, same run.

The shipped ``cartpole-dqn`` (declarative: ``policy.json`` + safetensors, served by its fast
path) and the very same module written by ``export_policy(form="program")`` (a PT2 archive,
served by ``ProgramRuntime``) are published side by side in one in-process app; both are driven
through the whole ASGI stack as in ``benchmarks.act_path_cpu`` (no sockets), in alternating
rounds, one request at a time and with 16 in flight (micro-batched). Also the bare forward pass
of each runtime on batches of 1 and 64.

    python -m benchmarks.programs [--requests 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.act_path_cpu import OBS, http_scope

ROOT = Path(__file__).resolve().parents[1]
DECLARATIVE = "cartpole-dqn"
PROGRAM = "cartpole-dqn-program"


def publish_program(model_dir: Path) -> None:
    """The shipped declarative version's module, exported as a program policy next to it."""
    import torch
    from torchrl.data import Categorical, Unbounded

    from service.registry.registry import Registry
    from service.registry.store import ModelStore
    from service.sdk import export_policy

    registry = Registry(ModelStore(model_dir))
    registry.load_all()
    core = registry.resolve(DECLARATIVE).runtime.core
    out = Path(tempfile.mkdtemp()) / "program"
    export_policy(
        core, out, observation_spec=Unbounded(shape=(4,)), action_spec=Categorical(2), form="program"
    )
    spec = json.loads((out / "policy.json").read_text())
    files = {f: (out / f).read_bytes() for f in spec["program"]["files"].values()}
    registry.publish(PROGRAM, spec, files)
    del torch


async def measure(model_dir: Path, requests: int, rounds: int) -> dict:
    from service.config import Settings
    from service.main import create_app
    from service.runtime.call import ActCall

    settings = Settings(
        model_dir=model_dir, data_dir=Path(tempfile.mkdtemp()), registry_poll_s=0, embedded_worker=False
    )
    app = create_app(settings)
    last: list[bytes] = []
    body = json.dumps({"observation": OBS}).encode()

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            last[:] = [message["body"]]

    results: dict[str, dict[str, list[float]]] = {}
    async with app.router.lifespan_context(app):
        registry = app.state.registry
        answers = {}
        for name in (DECLARATIVE, PROGRAM):
            scope = http_scope(f"/v1/policies/{name}/act", body)
            for _ in range(1000):  # warm-up
                await app(dict(scope), receive, send)
            answers[name] = json.loads(last[0])["action"]
        assert answers[DECLARATIVE] == answers[PROGRAM], answers
        for concurrency in (1, 16):
            per_task = requests // concurrency
            for _ in range(rounds):
                for name in (DECLARATIVE, PROGRAM):
                    scope = http_scope(f"/v1/policies/{name}/act", body)

                    async def client(scope: dict = scope, n: int = per_task) -> None:
                        for _ in range(n):
                            await app(dict(scope), receive, send)

                    t = time.perf_counter()
                    await asyncio.gather(*(client() for _ in range(concurrency)))
                    us = (time.perf_counter() - t) / (per_task * concurrency) * 1e6
                    results.setdefault(f"act c={concurrency}", {}).setdefault(name, []).append(us)
        import torch

        for batch in (1, 64):
            obs = torch.randn(batch, 4)
            for name in (DECLARATIVE, PROGRAM):
                runtime = registry.resolve(name).runtime
                for _ in range(200):
                    runtime.forward(ActCall(obs))
                for _ in range(rounds):
                    t = time.perf_counter()
                    for _ in range(1000):
                        runtime.forward(ActCall(obs))
                    us = (time.perf_counter() - t) / 1000 * 1e6
                    results.setdefault(f"forward batch={batch}", {}).setdefault(name, []).append(us)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from service.process import configure_process

    configure_process(torch_threads=1)
    model_dir = Path(tempfile.mkdtemp()) / "models"
    model_dir.mkdir()
    shutil.copytree(ROOT / "models" / DECLARATIVE, model_dir / DECLARATIVE)
    publish_program(model_dir)
    import uvloop

    results = uvloop.run(measure(model_dir, args.requests, args.rounds))
    print("best round, µs per request (lower is faster); program / declarative")
    for what, by_name in results.items():
        d, p = min(by_name[DECLARATIVE]), min(by_name[PROGRAM])
        print(f"{what:18} declarative {d:8.1f}  program {p:8.1f}  ratio {p / d:5.2f}x")
    print(json.dumps({k: {n: round(min(v), 1) for n, v in by.items()} for k, by in results.items()}))


if __name__ == "__main__":
    main()

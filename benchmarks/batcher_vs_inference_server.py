"""Micro-batcher choice, measured: our ``MicroBatcher`` vs TorchRL 0.14's ``InferenceServer``.

Both serve the same policy (models/cartpole-dqn) to 32 concurrent callers, single observation
each, in one process, as the API does: asyncio tasks for ours; for TorchRL's server, asyncio
tasks that hand each request to a thread (its client call blocks), the way an async endpoint
would have to use it.

    python -m benchmarks.batcher_vs_inference_server
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from tensordict import TensorDict

from service.process import configure_process
from service.registry.registry import Registry
from service.registry.store import ModelStore
from service.runtime.batching import InferenceExecutor, MicroBatcher
from service.runtime.call import ActCall
from service.runtime.policy import PolicyRuntime

CALLERS, PER_CALLER = 32, 300


def policy():
    registry = Registry(ModelStore("models"), prepare=PolicyRuntime)
    registry.load_all()
    return registry.resolve("cartpole-dqn").runtime


async def ours(runtime) -> float:
    batcher = MicroBatcher(InferenceExecutor(), 1024, loop=asyncio.get_running_loop())
    obs = torch.tensor([[0.01, 0.02, 0.03, 0.04]])

    async def caller():
        for _ in range(PER_CALLER):
            await batcher.submit(runtime, ActCall(obs))

    t = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return CALLERS * PER_CALLER / (time.perf_counter() - t)


async def torchrl_server(runtime) -> float:
    from torchrl.modules.inference_server import InferenceServer, ThreadingTransport

    server = InferenceServer(runtime.core, transport=ThreadingTransport(), max_batch_size=64, timeout=0.0005)
    server.start()
    clients = [server.client() for _ in range(CALLERS)]
    pool = ThreadPoolExecutor(CALLERS)
    loop = asyncio.get_running_loop()
    td = TensorDict({"observation": torch.tensor([0.01, 0.02, 0.03, 0.04])}, [])

    async def caller(client):
        for _ in range(PER_CALLER):
            await loop.run_in_executor(pool, client, td)

    t = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in clients))
    rate = CALLERS * PER_CALLER / (time.perf_counter() - t)
    server.shutdown()
    pool.shutdown()
    return rate


def main() -> None:
    configure_process(torch_threads=1)
    runtime = policy()
    a = asyncio.run(ours(runtime))
    b = asyncio.run(torchrl_server(runtime))
    print(f"MicroBatcher: {a:,.0f} calls/s; torchrl InferenceServer: {b:,.0f} calls/s; ratio {a / b:.1f}x")


if __name__ == "__main__":
    main()

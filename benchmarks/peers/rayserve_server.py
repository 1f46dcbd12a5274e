"""Ray Serve: the policy's MLP in one replica behind ``@serve.batch``.

python rayserve_server.py VERSION_DIR PORT
"""

import sys
import time

import ray
import torch
from policy import greedy, load_mlp
from ray import serve
from starlette.requests import Request

version_dir, port = sys.argv[1], int(sys.argv[2])


# max_ongoing_requests defaults to 5 a replica: at 32 connections the proxy would queue the rest
# and batches could not pass 5; Ray's docs raise it with the batch size for throughput
@serve.deployment(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
class Policy:
    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.net = load_mlp(version_dir)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.001)
    async def act(self, requests: list) -> list:
        actions = greedy(self.net, [o for obs in requests for o in obs])
        out, i = [], 0
        for obs in requests:
            out.append(actions[i : i + len(obs)])
            i += len(obs)
        return out

    async def __call__(self, request: Request) -> dict:
        body = await request.json()
        if "observations" in body:
            return {"actions": await self.act(body["observations"])}
        return {"action": (await self.act([body["observation"]]))[0]}


if __name__ == "__main__":
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Policy.bind(), route_prefix="/", name="cartpole")
    while True:
        time.sleep(3600)

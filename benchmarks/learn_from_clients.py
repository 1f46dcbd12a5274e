"""Learning from simulators over HTTP, measured: a DQN job with ``source: sessions`` learns
CartPole-v1 from 8 concurrent client sessions that step their own gymnasium envs (the server
runs no env) and report rewards through the Python client; then the published version plays 20
held-out episodes (seeds 20000-20019, the server's rollout endpoint). Per seed: wall time, the
learner's updates/s, the staleness of the acting weights, and the held-out return.

    python -m benchmarks.learn_from_clients --seeds 0 1 2 3 4 --frames 50000
    python -m benchmarks.learn_from_clients --recurrent --seeds 0 --frames 100000

``--recurrent``: a ``recurrent: true`` job (the env-backed recurrent DQN's defaults: LSTM 128,
MLP 128) learns CartPoleNoVel-v1 (cart position and pole angle only) from the clients, and the
held-out episodes run in CartPoleNoVel-v1 with the server carrying the LSTM state.

The server is ``policy-server serve`` with its embedded worker, on a free port, with a fresh
data directory per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import gymnasium as gym
import httpx

from service.envs import register_envs
from service.sdk import PolicyClient, PolicyServerError

ROOT = Path(__file__).resolve().parents[1]
# per task: the clients' env, the job's specs and hyperparameters (None: the job's defaults)
TASKS = {
    # the env-backed CartPole job's network (models/cartpole-dqn)
    "mlp": ("CartPole-v1", {"shape": [4]}, {"num_cells": [256, 256]}),
    # the recurrent defaults (RECURRENT_DEFAULTS, as models/cartpole-lstm-dqn was trained)
    "recurrent": ("CartPoleNoVel-v1", {"shape": [2]}, None),
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "POLICY_SERVER_MODEL_DIR": str(root / "models"),
        "POLICY_SERVER_GRPC_PORT": "0",  # no gRPC service: it would claim port 8001
        "POLICY_SERVER_DATA_DIR": str(root / "var"),
        "POLICY_SERVER_EMBEDDED_WORKER": "true",
        "POLICY_SERVER_REGISTRY_POLL_S": "1",
    }
    log = open(root / "server.log", "w")  # noqa: SIM115
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def client_loop(
    url: str, job_id: str, env_id: str, env_seed: int, stop: threading.Event, stats: dict
) -> None:
    """One simulator: its own CartPole, stepping a session bound to the job."""
    register_envs()  # CartPoleNoVel-v1 for the clients
    env = gym.make(env_id)
    obs, _ = env.reset(seed=env_seed)
    with PolicyClient(url, timeout=60, retries=50) as client, client.session(job=job_id) as s:
        report: dict = {}
        reset = True
        while not stop.is_set():
            try:
                answer = s.step(obs, reset=reset, **report)
            except PolicyServerError as exc:
                if exc.status == 404:  # the session closed with the job
                    break
                raise
            stats["calls"] += 1
            stats["staleness"].append(stats["reported"] - (answer.raw.get("policy_frames") or 0))
            if report.get("terminated") or report.get("truncated"):
                obs, _ = env.reset()
                report, reset = {}, True
                continue
            obs, reward, terminated, truncated, _ = env.step(answer.action)
            stats["reported"] += 1
            report, reset = {"reward": float(reward), "terminated": terminated, "truncated": truncated}, False
    env.close()


def one_seed(seed: int, frames: int, clients: int, task: str) -> dict:
    env_id, observation, hp = TASKS[task]
    root = Path(tempfile.mkdtemp(prefix="learn-from-clients-"))
    (root / "models").mkdir()
    proc, url = serve(root)
    try:
        with PolicyClient(url) as c:
            job = c.submit_job(
                algorithm="dqn",
                source="sessions",
                policy_name="from-clients",
                total_frames=frames,
                seed=seed,
                device="cpu",
                hyperparameters=hp,
                observation=observation,
                action={"type": "discrete", "n": 2},
                recurrent=task == "recurrent",
            )
            stop = threading.Event()
            stats = {"calls": 0, "reported": 0, "staleness": []}
            start = time.perf_counter()
            threads = [
                threading.Thread(
                    target=client_loop, args=(url, job.job_id, env_id, 1000 * seed + i, stop, stats)
                )
                for i in range(clients)
            ]
            for t in threads:
                t.start()
            done = c.wait_job(job.job_id, poll_s=1.0, progress=False)
            wall = time.perf_counter() - start
            stop.set()
            for t in threads:
                t.join(60)
            if done.status != "succeeded":
                return {"seed": seed, "status": done.status, "error": done.error}
            points = c.job_metrics(job.job_id)
            heldout = c.rollout("from-clients", env_id=env_id, episodes=20, seed=20_000)
            provenance = c.policy("from-clients")["version_details"][0]["provenance"]
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    staleness = stats["staleness"][len(stats["staleness"]) // 10 :]  # past the start
    return {
        "task": task,
        "seed": seed,
        "heldout_mean_return": heldout["mean_return"],
        "wall_s": round(wall, 1),
        "frames": points[-1]["frames"],
        "updates": provenance["updates"],
        "updates_per_s": round(provenance["updates"] / wall, 1),
        "client_steps_per_s": round(stats["calls"] / wall, 1),
        "staleness_frames_median": statistics.median(staleness) if staleness else None,
        "client_reported_return": done.result["eval_mean_return"],
        "weights": provenance["weights"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--frames", type=int, default=50_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--recurrent", action="store_true", help="CartPoleNoVel-v1 with an LSTM Q-network")
    args = ap.parse_args()
    task = "recurrent" if args.recurrent else "mlp"
    results = []
    for seed in args.seeds:
        results.append(one_seed(seed, args.frames, args.clients, task))
        print(json.dumps(results[-1]), flush=True)
    target = 400 if args.recurrent else 475
    solved = sum(1 for r in results if r.get("heldout_mean_return", 0) >= target)
    print(
        json.dumps(
            {
                "task": task,
                "seeds": len(results),
                f"solved_>={target}": solved,
                "frames": args.frames,
                "clients": args.clients,
            }
        )
    )


if __name__ == "__main__":
    main()

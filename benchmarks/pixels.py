"""Pixel policies, in one run on this machine (part of ``make bench``):

- act throughput over HTTP with base64 400x600x3 frames vs the same TorchRL module and
  transforms called in-process, one frame and a batch of 32;
- ``/v2`` (Open Inference Protocol) infer with the frames as binary tensors, batch of 32;
- decoding cost per frame, the ``{b64, dtype, shape}`` form vs a nested JSON list (request
  parsing + checks + the array the policy reads);
- session steps/s over the WebSocket with raw frames (recurrent policy, server-held state);
- pixel DQN training frames/s (the shipped model's configuration, CPU; CUDA when present).

    python -m benchmarks.pixels [--seconds 10] [--train-frames 600]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from tensordict import TensorDict

from benchmarks.run import free_port, start
from service.registry.build import build_policy, weights_bytes
from service.registry.preprocess import make_preprocess
from service.registry.spec import PolicySpec
from service.registry.store import ModelStore

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "cartpole-pixels-dqn"
POLICY = "pixels"
SHAPE = (400, 600, 3)
# the shipped model's architecture (used with random weights when it is not in models/)
SPEC = {
    "kind": "qvalue",
    "observation": {"shape": list(SHAPE), "dtype": "uint8"},
    "preprocess": [
        {"type": "to_tensor_image", "from_int": False, "dtype": "uint8"},
        {"type": "grayscale"},
        {"type": "resize", "w": 64, "h": 64},
        {"type": "observation_norm", "loc": [[[240.0]]], "scale": [[[40.0]]]},
    ],
    "action": {"type": "discrete", "n": 2},
    "network": {
        "num_cells": [128],
        "conv": {
            "num_cells": [16, 32, 32],
            "kernel_sizes": [8, 4, 3],
            "strides": [4, 2, 1],
            "activation": "relu",
        },
    },
    "recurrent": {"type": "lstm", "hidden_size": 128},
}


def policy_files() -> tuple[dict, bytes, str]:
    if SHIPPED.exists():
        store = ModelStore(ROOT / "models")
        version = max(store.versions("cartpole-pixels-dqn"))
        folder = SHIPPED / str(version)
        return (
            json.loads((folder / "policy.json").read_text()),
            (folder / "weights.safetensors").read_bytes(),
            (f"cartpole-pixels-dqn v{version}"),
        )
    torch.manual_seed(0)
    return (
        SPEC,
        weights_bytes(build_policy(PolicySpec.model_validate(SPEC))),
        "random weights, shipped architecture",
    )


def frames(n: int) -> np.ndarray:
    """Real CartPole renders (what a client sends), cycled."""
    import gymnasium as gym

    env = gym.make("CartPole-v1", render_mode="rgb_array")
    env.reset(seed=0)
    out = []
    for _ in range(n):
        out.append(env.render())
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    env.close()
    return np.stack(out)


def b64(frame: np.ndarray) -> dict:
    return {"b64": base64.b64encode(frame.tobytes()).decode(), "dtype": "uint8", "shape": list(frame.shape)}


def v2_binary(batch: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """An Open Inference Protocol infer body for ``batch``: the JSON header, then the raw frames
    (Triton's binary tensor extension), and its headers."""
    raw = batch.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "observation",
                    "shape": list(batch.shape),
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "action", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return head + raw, {"inference-header-content-length": str(len(head))}


def http_rate(
    base: str,
    body: bytes,
    per_request: int,
    seconds: float,
    connections: int,
    path: str = f"/v1/policies/{POLICY}/act",
    headers: dict[str, str] | None = None,
) -> float:
    """Frames/s answered by the server, ``connections`` clients posting ``body`` back to back."""

    async def run() -> int:
        sent = headers or {"content-type": "application/json"}
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:

            async def worker(stop: float) -> int:
                n = 0
                while time.monotonic() < stop:
                    r = await c.post(path, content=body, headers=sent)
                    assert r.status_code == 200, r.text
                    n += per_request
                return n

            await worker(time.monotonic() + 1)  # warm-up
            stop = time.monotonic() + seconds
            return sum(await asyncio.gather(*(worker(stop) for _ in range(connections))))

    return asyncio.run(run()) / seconds


def inprocess_rate(spec: dict, weights: bytes, batch: np.ndarray, seconds: float) -> float:
    """Frames/s of the TorchRL module and its transforms called directly (no server)."""
    from service.registry.build import load_weights

    parsed = PolicySpec.model_validate(spec)
    built = build_policy(parsed)
    load_weights(built, weights)
    transforms = make_preprocess(parsed.preprocess)
    obs = torch.from_numpy(batch)

    rec = parsed.recurrent

    def once() -> None:
        td = TensorDict({"observation": obs}, batch_size=[len(obs)])
        if rec is not None:  # a step with state, as a session's
            zeros = torch.zeros(len(obs), rec.num_layers, rec.hidden_size)
            td.update({"recurrent_state_h": zeros, "recurrent_state_c": zeros.clone()})
            td["is_init"] = torch.zeros(len(obs), 1, dtype=torch.bool)
        with torch.inference_mode():
            built.core(transforms(td))

    once()
    n, stop = 0, time.monotonic() + seconds
    while time.monotonic() < stop:
        once()
        n += len(obs)
    return n / seconds


def decode_cost(spec: dict, frame: np.ndarray, repeats: int = 20) -> dict:
    """Milliseconds per frame from request bytes to the checked tensor the policy reads."""
    from service.runtime.policy import PolicyRuntime
    from service.schemas import ActRequest

    parsed = PolicySpec.model_validate(spec)
    runtime = PolicyRuntime(parsed, build_policy(parsed), torch.device("cpu"))
    out = {}
    for name, obs in (("b64", b64(frame)), ("json_list", frame.tolist())):
        body = json.dumps({"observation": obs}).encode()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            request = ActRequest.model_validate_json(body)
            runtime.codec.observation_batch(request.params(POLICY).rows, "observation", POLICY)
            times.append(time.perf_counter() - t)
        out[f"{name}_ms"] = statistics.median(times) * 1000
        out[f"{name}_body_bytes"] = len(body)
    return out


async def ws_steps(base: str, frame: np.ndarray, sessions: int, seconds: float) -> float:
    import websockets

    async with httpx.AsyncClient(base_url=base) as c:
        sids = [
            (await c.post("/v1/sessions", json={"policy": POLICY})).json()["session_id"]
            for _ in range(sessions)
        ]
    msg = json.dumps({"observation": b64(frame)})

    async def worker(sid: str, stop: float) -> int:
        n = 0
        async with websockets.connect(
            f"{base.replace('http', 'ws')}/v1/sessions/{sid}/stream", max_size=None
        ) as ws:
            while time.monotonic() < stop:
                await ws.send(msg)
                reply = json.loads(await ws.recv())
                assert "action" in reply, reply
                n += 1
        return n

    stop = time.monotonic() + seconds
    return sum(await asyncio.gather(*(worker(s, stop) for s in sids))) / seconds


def training_fps(frames_total: int, device: str) -> dict:
    """Frames/s of the shipped model's training configuration once updates run."""
    from service.training.dqn import DQNConfig, train

    hp = {
        "resize": 64,
        "conv_cells": [16, 32, 32],
        "conv_kernels": [8, 4, 3],
        "conv_strides": [4, 2, 1],
        "batch_size": 16,
        "updates_per_batch": 10,
        "init_random_frames": 200,
        "norm_init_frames": 100,
        "eval_episodes": 1,
        "eval_every_frames": 0,
    }
    config = DQNConfig.with_defaults(
        hp, env_id="CartPolePixels-v1", total_frames=frames_total, recurrent=True, device=device
    )
    points: list[dict] = []
    train(config, on_progress=points.append)
    learning = [p for p in points if p["frames"] > hp["init_random_frames"]]  # updating
    first, last = learning[0], learning[-1]
    return {
        "device": device,
        "frames": last["frames"],
        "fps_while_learning": (last["frames"] - first["frames"]) / (last["time_s"] - first["time_s"]),
    }


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def replay_rss(frames_total: int, size: int, dtype: str) -> float:
    """MB of resident memory a replay buffer of ``frames_total`` transitions takes once full:
    ``observation`` and ``("next", "observation")`` frames of ``[1, size, size]``, as the pixel
    DQN stores them (run in a fresh process per dtype)."""
    from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

    before = rss_mb()
    buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(frames_total))
    chunk = 1000
    frame = torch.zeros(chunk, 1, size, size, dtype=getattr(torch, dtype)) + 1
    for _ in range(frames_total // chunk):
        buffer.extend(
            TensorDict(
                {
                    "observation": frame,
                    "next": {"observation": frame},
                    "action": torch.zeros(chunk, dtype=torch.long),
                },
                batch_size=[chunk],
            )
        )
    return rss_mb() - before


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--train-frames", type=int, default=1000)
    ap.add_argument("--replay", nargs=3, metavar=("FRAMES", "SIZE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.replay:  # the child process of the replay-memory measurement
        print(json.dumps(replay_rss(int(args.replay[0]), int(args.replay[1]), args.replay[2])))
        return
    torch.set_num_threads(1)
    spec, weights, label = policy_files()
    batch = frames(32)
    root = Path(tempfile.mkdtemp())
    ModelStore(root / "models").write_version(POLICY, spec, weights)
    env = {
        "POLICY_SERVER_MODEL_DIR": str(root / "models"),
        "POLICY_SERVER_GRPC_PORT": "0",  # no gRPC service: it would claim port 8001
        "POLICY_SERVER_EMBEDDED_WORKER": "false",
        "POLICY_SERVER_DATA_DIR": str(root / "var"),
        "POLICY_SERVER_REGISTRY_POLL_S": "0",
        "POLICY_SERVER_TORCH_THREADS": "1",
    }
    port = free_port()
    probe = {"observation": b64(batch[0])}
    proc = start(
        [sys.executable, "-m", "service.cli", "serve", "--log-level", "warning", "--port", str(port)],
        env,
        port,
        policy=POLICY,
        body=probe,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        single = json.dumps({"observation": b64(batch[0])}).encode()
        batch32 = json.dumps({"observations": [b64(f) for f in batch]}).encode()
        http_1 = http_rate(base, single, 1, args.seconds, args.connections)
        http_32 = http_rate(base, batch32, 32, args.seconds, 1)
        v2_body, v2_headers = v2_binary(batch)
        v2_32 = http_rate(base, v2_body, 32, args.seconds, 1, f"/v2/models/{POLICY}/infer", v2_headers)
        ws = asyncio.run(ws_steps(base, batch[0], args.connections, args.seconds))
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    local_1 = inprocess_rate(spec, weights, batch[:1], args.seconds)
    local_32 = inprocess_rate(spec, weights, batch, args.seconds)
    decoding = decode_cost(spec, batch[0])
    train_cpu = training_fps(args.train_frames, "cpu")
    replay = {}
    for dtype in ("uint8", "float32"):
        cmd = [sys.executable, "-m", "benchmarks.pixels", "--replay", "100000", "84", dtype]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
        replay[dtype] = float(out.strip().splitlines()[-1])
    results = {
        "policy": label,
        "http_frames_per_s": {"single": http_1, "batch_32": http_32, "v2_binary_batch_32": v2_32},
        "inprocess_frames_per_s": {"single": local_1, "batch_32": local_32},
        "decode_per_frame": decoding,
        "ws_session_steps_per_s": ws,
        "replay_100k_84x84_rss_mb": replay,
        "training": [train_cpu]
        + ([training_fps(args.train_frames, "cuda")] if torch.cuda.is_available() else []),
    }
    print(json.dumps(results, indent=1))
    ratios = {
        f"pixel act http/in-process, single frame ({args.connections} clients)": http_1 / local_1,
        "pixel act http/in-process, batch of 32 (target >= 0.5)": http_32 / local_32,
        "pixel /v2 binary infer/in-process, batch of 32 (target >= 0.6)": v2_32 / local_32,
        "decode per frame json_list/b64 (b64 is x faster)": decoding["json_list_ms"] / decoding["b64_ms"],
    }
    for k, v in ratios.items():
        print(f"{k:62} {v:7.2f}")


if __name__ == "__main__":
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    main()

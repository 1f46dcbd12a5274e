"""TorchRL ``Collector`` frames/s with ``service.sdk.RemotePolicy`` against the same weights in
process, one run, one server (ours as ``make serve`` runs it): the stateless ``cartpole-dqn``
(``/v2`` binary infer per env batch) and the recurrent ``cartpole-lstm-dqn`` (a server session
stepped over the WebSocket and over HTTP). The env steps are the same in every row, so the
ratios say what going through the server costs a collector.

    python -m benchmarks.collector [--envs 8] [--frames 4000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
from torchrl.collectors import Collector
from torchrl.envs import GymEnv, InitTracker, SerialEnv, TransformedEnv
from torchrl.envs.utils import ExplorationType

from benchmarks.run import ROOT, free_port, start
from service.envs import register_envs
from service.registry.build import build_policy, load_weights
from service.registry.spec import PolicySpec
from service.sdk import RemotePolicy


def local(name: str):
    root = ROOT / "models" / name / str(max(int(p.name) for p in (ROOT / "models" / name).iterdir()))
    built = build_policy(PolicySpec.model_validate(json.loads((root / "policy.json").read_text())))
    load_weights(built, (root / "weights.safetensors").read_bytes())
    return built.core


def rate(env, policy, frames: int) -> float:
    collector = Collector(
        env,
        policy,
        frames_per_batch=frames // 4,
        total_frames=frames,
        exploration_type=ExplorationType.DETERMINISTIC,
        auto_register_policy_transforms=False,
    )
    start_t = time.perf_counter()
    n = sum(batch.numel() for batch in collector)
    elapsed = time.perf_counter() - start_t
    collector.shutdown()
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--envs", type=int, default=8)
    ap.add_argument("--frames", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    register_envs()
    port = free_port()
    env_vars = {
        "POLICY_SERVER_MODEL_DIR": str(ROOT / "models"),
        "POLICY_SERVER_EMBEDDED_WORKER": "false",
        "POLICY_SERVER_DATA_DIR": tempfile.mkdtemp(),
        "POLICY_SERVER_GRPC_PORT": "0",
    }
    proc = start([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env_vars, port)
    url = f"http://127.0.0.1:{port}"

    def make_recurrent():
        return TransformedEnv(GymEnv("CartPoleNoVel-v1"), InitTracker())

    flat = SerialEnv(args.envs, lambda: GymEnv("CartPole-v1"))
    recurrent = SerialEnv(args.envs, make_recurrent)
    lstm_local = local("cartpole-lstm-dqn")
    lstm = next(m for m in lstm_local.modules() if type(m).__name__ == "LSTMModule")
    # in process the LSTM state rides in the tensordict: TorchRL's primer puts it there
    primed = TransformedEnv(SerialEnv(args.envs, make_recurrent), lstm.make_tensordict_primer())
    spec = flat.action_spec
    rspec = recurrent.action_spec
    cases = [
        ("cartpole-dqn in process", flat, lambda: local("cartpole-dqn")),
        (
            "cartpole-dqn RemotePolicy (/v2 binary)",
            flat,
            lambda: RemotePolicy(url, "cartpole-dqn", action_spec=spec),
        ),
        ("cartpole-lstm-dqn in process", primed, lambda: lstm_local),
        (
            "cartpole-lstm-dqn RemotePolicy (WebSocket)",
            recurrent,
            lambda: RemotePolicy(url, "cartpole-lstm-dqn", action_spec=rspec, transport="ws"),
        ),
        (
            "cartpole-lstm-dqn RemotePolicy (HTTP)",
            recurrent,
            lambda: RemotePolicy(url, "cartpole-lstm-dqn", action_spec=rspec, transport="http"),
        ),
    ]
    rows: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            for name, env, make in cases:
                policy = make()
                rows.setdefault(name, []).append(rate(env, policy, args.frames))
                if isinstance(policy, RemotePolicy):
                    policy.close()
    finally:
        proc.terminate()
        proc.wait(30)
    print(
        f"Collector frames/s, {args.envs} envs (SerialEnv), {args.frames} frames a run, best of {args.rounds}"
    )
    best = {k: max(v) for k, v in rows.items()}
    for name, value in best.items():
        runs = " / ".join(f"{x:.0f}" for x in rows[name])
        print(f"{name:48} {value:8.0f}   ({runs})")
    flat_local, flat_remote = "cartpole-dqn in process", "cartpole-dqn RemotePolicy (/v2 binary)"
    lstm_local, ws, http = (
        "cartpole-lstm-dqn in process",
        "cartpole-lstm-dqn RemotePolicy (WebSocket)",
        "cartpole-lstm-dqn RemotePolicy (HTTP)",
    )
    for label, num, den in (
        ("stateless: RemotePolicy / in process", flat_remote, flat_local),
        ("recurrent: WebSocket / in process", ws, lstm_local),
        ("recurrent: HTTP / in process", http, lstm_local),
        ("recurrent: WebSocket / HTTP", ws, http),
    ):
        print(f"{label:48} {best[num] / best[den]:8.2f}")


if __name__ == "__main__":
    main()

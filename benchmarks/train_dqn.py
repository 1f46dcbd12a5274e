"""DQN targets of issue 3, measured (not a test): success over seeds, and speed against SB3.

    python -m benchmarks.train_dqn --seeds 5 --frames 50000            # CartPole-v1 success
    python -m benchmarks.train_dqn --seeds 5 --hp '{"eval_every_frames": 5000}'  # + keep-best
    python -m benchmarks.train_dqn --speed --frames 20000              # fps vs SB3, same run
    python -m benchmarks.train_dqn --recurrent --seeds 3 --frames 100000  # CartPoleNoVel-v1, LSTM vs MLP

SB3 (``pip install stable-baselines3``) is run with the same network, batch size, buffer,
learning starts, train frequency and gradient steps (rl-baselines3-zoo's CartPole settings).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from service.process import configure_process
from service.training.dqn import DQNConfig, train


def ours(env_id: str, frames: int, seed: int, recurrent: bool = False, hp: dict | None = None):
    cfg = DQNConfig.with_defaults(
        hp or {}, env_id=env_id, recurrent=recurrent, total_frames=frames, seed=seed
    )
    points: list[dict] = []
    r = train(cfg, on_progress=points.append)
    # Training-loop time (collection + updates, and periodic evaluations if enabled): the time
    # to the last progress point, without the final evaluation -- what SB3's learn() measures.
    loop_s = points[-1]["time_s"]
    return {
        "eval": r.eval_mean_return,
        "wall_s": r.wall_time_s,
        "loop_s": loop_s,
        "fps": r.frames / loop_s,
    }


def sb3(frames: int, seed: int):
    import gymnasium as gym
    from stable_baselines3 import DQN
    from stable_baselines3.common.evaluation import evaluate_policy

    env = gym.make("CartPole-v1")
    model = DQN(
        "MlpPolicy",
        env,
        learning_rate=2.3e-3,
        batch_size=64,
        buffer_size=100_000,
        learning_starts=1000,
        gamma=0.99,
        target_update_interval=10,
        train_freq=256,
        gradient_steps=128,
        exploration_fraction=0.16,
        exploration_final_eps=0.04,
        policy_kwargs={"net_arch": [256, 256]},
        seed=seed,
        device="cpu",
        verbose=0,
    )
    t = time.perf_counter()
    model.learn(total_timesteps=frames)
    wall = time.perf_counter() - t
    mean, _ = evaluate_policy(model, gym.make("CartPole-v1"), n_eval_episodes=20, deterministic=True)
    return {"eval": float(mean), "wall_s": wall, "fps": frames / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--frames", type=int, default=50_000)
    ap.add_argument("--speed", action="store_true", help="fps against SB3, one seed each")
    ap.add_argument("--recurrent", action="store_true")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--hp", default="{}", help="hyperparameter overrides as JSON")
    args = ap.parse_args()
    configure_process(torch_threads=args.threads)  # as `policy-server train` does
    if args.speed:
        # No periodic evaluation on either side: SB3's learn() runs none without a callback.
        a = ours("CartPole-v1", args.frames, 0, hp={"eval_every_frames": 0, **json.loads(args.hp)})
        # Our trainer flushes denormal floats to zero while it trains (flushed_denormals in
        # service/training/common.py). SB3 is timed as it ships (flag off) and with the flag.
        torch.set_flush_denormal(False)
        b = sb3(args.frames, 0)
        torch.set_flush_denormal(True)
        c = sb3(args.frames, 0)
        print(
            json.dumps(
                {
                    "ours": a,
                    "sb3": b,
                    "sb3_flush_denormal": c,
                    "fps_ratio_ours_over_sb3": a["fps"] / b["fps"],
                    "fps_ratio_ours_over_sb3_flush_denormal": a["fps"] / c["fps"],
                }
            )
        )
        return
    if args.recurrent:
        hp = json.loads(args.hp)
        for seed in range(args.seeds):
            lstm = ours("CartPoleNoVel-v1", args.frames, seed, recurrent=True, hp=hp)
            print(json.dumps({"lstm_dqn": lstm, "seed": seed}), flush=True)
        mlp = ours("CartPoleNoVel-v1", min(args.frames, 50_000), 0)
        print(json.dumps({"mlp_dqn": mlp, "seed": 0}))
        return
    runs = []
    hp = json.loads(args.hp)
    for seed in range(args.seeds):
        r = ours("CartPole-v1", args.frames, seed, hp=hp)
        runs.append(r)
        print(json.dumps({"seed": seed, **r}), flush=True)
    solved = sum(r["eval"] >= 475 for r in runs)
    print(
        json.dumps(
            {"solved": f"{solved}/{len(runs)}", "mean_wall_s": statistics.mean(r["wall_s"] for r in runs)}
        )
    )


if __name__ == "__main__":
    main()

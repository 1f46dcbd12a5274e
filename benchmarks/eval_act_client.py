"""Evaluate a served discrete policy as a simulator client does (not a test).

The environment runs here, in the client; every step is one ``POST /v1/policies/{name}/act``
with the observation and the env's own ``action_mask``. Episodes reset with held-out seeds
(20000 onward, ``service.training.common.HELDOUT_SEED``), which no training run chooses on.
Counts answered actions the mask did not allow (must be 0).

    policy-server serve --port 8011 &
    python -m benchmarks.eval_act_client --url http://127.0.0.1:8011 --policy taxi-dqn \\
        --env Taxi-v4 --episodes 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import gymnasium as gym
import httpx
import numpy as np

from service.envs import register_envs

HELDOUT_SEED = 20_000  # = service.training.common.HELDOUT_SEED (kept import-free: a client)


def _jsonable(obs):
    """What the env yields, as a client sends it: a list, an integer, or an object of those."""
    if isinstance(obs, dict):
        return {k: _jsonable(v) for k, v in obs.items()}
    return obs.tolist() if isinstance(obs, np.ndarray) else int(obs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--policy", default="taxi-dqn")
    ap.add_argument("--env", default="Taxi-v4")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--first-seed", type=int, default=HELDOUT_SEED)
    args = ap.parse_args()
    register_envs()
    env = gym.make(args.env)
    returns, masked_answers, steps = [], 0, 0
    start = time.perf_counter()
    with httpx.Client(base_url=args.url, timeout=30) as c:
        for i in range(args.episodes):
            obs, info = env.reset(seed=args.first_seed + i)
            total, done = 0.0, False
            while not done:
                body = {"observation": _jsonable(obs)}
                mask = info.get("action_mask")
                if mask is not None:
                    body["action_mask"] = [bool(m) for m in mask]
                r = c.post(f"/v1/policies/{args.policy}/act", json=body)
                r.raise_for_status()
                action = r.json()["action"]
                if mask is not None and not mask[action]:
                    masked_answers += 1
                obs, reward, terminated, truncated, info = env.step(action)
                total += float(reward)
                steps += 1
                done = terminated or truncated
            returns.append(total)
    print(
        json.dumps(
            {
                "policy": args.policy,
                "env": args.env,
                "episodes": args.episodes,
                "seeds": [args.first_seed, args.first_seed + args.episodes - 1],
                "mean_return": statistics.mean(returns),
                "std_return": statistics.pstdev(returns),
                "min_return": min(returns),
                "masked_actions_answered": masked_answers,
                "act_calls": steps,
                "wall_s": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

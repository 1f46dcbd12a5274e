"""Held-out episodes played by a client, through the Python client (``service.sdk``).

    policy-server serve --port 8011 &
    python -m benchmarks.eval_act_client --url http://127.0.0.1:8011 \
        --policy taxi-dqn --env Taxi-v4 --episodes 100
    python -m benchmarks.eval_act_client --url http://127.0.0.1:8011 \
        --policy cartpole-pixels-dqn --env CartPolePixels-v1 --episodes 20 --session

Each step sends the observation exactly as the gymnasium env yields it (numpy frames go as raw
bytes, see ``PolicyClient``) with the env's own ``action_mask`` when it gives one, through
stateless ``act`` or, with ``--session``, through a session (``reset`` at each episode's first
observation: recurrent and frame-stacking state lives on the server). Episodes reset with
held-out seeds (``HELDOUT_SEED`` + i), which no training run chose weights on. Counts how often
the answered action was one the mask forbade.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import gymnasium as gym

from service.envs import register_envs
from service.sdk import PolicyClient

HELDOUT_SEED = 20_000  # = service.training.common.HELDOUT_SEED


def play(
    client: PolicyClient, policy: str, env_id: str, episodes: int, first_seed: int, session: bool
) -> dict:
    register_envs()
    env = gym.make(env_id)
    returns, masked_answers, steps = [], 0, 0
    start = time.perf_counter()
    with client.session(policy) if session else _nothing() as s:
        for i in range(episodes):
            obs, info = env.reset(seed=first_seed + i)
            total, done, first = 0.0, False, True
            while not done:
                mask = info.get("action_mask")
                options = {"action_mask": [bool(m) for m in mask]} if mask is not None else {}
                if s is not None:
                    action = s.step(obs, reset=first, **options).action
                else:
                    action = client.act(policy, obs, **options).action
                if mask is not None and not mask[action]:
                    masked_answers += 1
                obs, reward, terminated, truncated, info = env.step(action)
                total, steps, first = total + float(reward), steps + 1, False
                done = terminated or truncated
            returns.append(total)
    env.close()
    return {
        "policy": policy,
        "env": env_id,
        "through": "session" if session else "act",
        "episodes": episodes,
        "seeds": [first_seed, first_seed + episodes - 1],
        "mean_return": statistics.mean(returns),
        "std_return": statistics.pstdev(returns),
        "min_return": min(returns),
        "masked_actions_answered": masked_answers,
        "calls": steps,
        "wall_s": round(time.perf_counter() - start, 1),
    }


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--policy", default="taxi-dqn")
    ap.add_argument("--env", default="Taxi-v4")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--first-seed", type=int, default=HELDOUT_SEED)
    ap.add_argument("--session", action="store_true", help="step through a session (recurrent policies)")
    args = ap.parse_args()
    with PolicyClient(args.url, timeout=60) as client:
        print(json.dumps(play(client, args.policy, args.env, args.episodes, args.first_seed, args.session)))


if __name__ == "__main__":
    main()

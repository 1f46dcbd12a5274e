"""Evaluate a served policy the way a simulator client uses it: state carried by a session.

    policy-server serve &                      # or: make serve
    python -m benchmarks.eval_sessions --policy cartpole-lstm-dqn --episodes 20

The client steps a local gymnasium env; every step is one ``POST /v1/sessions/{id}/act`` with
``reset: true`` at an episode's first observation, so the LSTM state lives on the server between
calls. Also asks the server's own rollout endpoint for the same number of episodes.
"""

from __future__ import annotations

import argparse
import json
import statistics

import gymnasium as gym
import httpx

import service.envs  # noqa: F401  (registers CartPoleNoVel-v1)


def session_episodes(client: httpx.Client, policy: str, env_id: str, episodes: int, seed: int) -> list[float]:
    sid = client.post("/v1/sessions", json={"policy": policy}).raise_for_status().json()["session_id"]
    env = gym.make(env_id)
    returns = []
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            total, reset, done = 0.0, True, False
            while not done:
                body = {"observation": obs.tolist(), "reset": reset}
                action = client.post(f"/v1/sessions/{sid}/act", json=body).raise_for_status().json()["action"]
                obs, reward, terminated, truncated, _ = env.step(action)
                total, reset, done = total + float(reward), False, terminated or truncated
            returns.append(total)
    finally:
        env.close()
        client.delete(f"/v1/sessions/{sid}")
    return returns


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--policy", default="cartpole-lstm-dqn")
    ap.add_argument("--env", default="CartPoleNoVel-v1")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=100)
    args = ap.parse_args()
    with httpx.Client(base_url=args.url, timeout=60) as client:
        returns = session_episodes(client, args.policy, args.env, args.episodes, args.seed)
        rollout = (
            client.post(
                f"/v1/policies/{args.policy}/rollout",
                json={"env_id": args.env, "episodes": args.episodes, "seed": args.seed},
            )
            .raise_for_status()
            .json()
        )
    print(
        json.dumps(
            {
                "policy": args.policy,
                "env": args.env,
                "sessions_mean_return": statistics.mean(returns),
                "sessions_min_return": min(returns),
                "rollout_mean_return": rollout["mean_return"],
                "episodes": args.episodes,
            }
        )
    )


if __name__ == "__main__":
    main()

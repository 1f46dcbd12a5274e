"""Evaluate a served recurrent policy the way a simulator client uses it: state carried by a
session, through the Python client; and the server's own rollout endpoint on the same seeds.

    policy-server serve &                      # or: make serve
    python -m benchmarks.eval_sessions --policy cartpole-lstm-dqn --episodes 20
"""

from __future__ import annotations

import argparse
import json

from benchmarks.eval_act_client import play
from service.sdk import PolicyClient


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--policy", default="cartpole-lstm-dqn")
    ap.add_argument("--env", default="CartPoleNoVel-v1")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=100)
    args = ap.parse_args()
    with PolicyClient(args.url, timeout=60) as client:
        sessions = play(client, args.policy, args.env, args.episodes, args.seed, session=True)
        rollout = client.rollout(args.policy, env_id=args.env, episodes=args.episodes, seed=args.seed)
    print(
        json.dumps(
            {
                "policy": args.policy,
                "env": args.env,
                "sessions_mean_return": sessions["mean_return"],
                "sessions_min_return": sessions["min_return"],
                "rollout_mean_return": rollout["mean_return"],
                "episodes": args.episodes,
            }
        )
    )


if __name__ == "__main__":
    main()

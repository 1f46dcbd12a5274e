"""SAC and TD3 targets of issue 8, measured (not a test): Pendulum-v1 within 20,000 frames.

python -m benchmarks.train_actor_critic --seeds 3 --frames 20000
"""

from __future__ import annotations

import argparse
import json

import torch

from service.process import configure_process
from service.training.actor_critic import ActorCriticConfig, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--frames", type=int, default=20_000)
    ap.add_argument("--algorithms", default="sac,td3")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    configure_process(torch_threads=args.threads)  # as `policy-server train` does
    for algorithm in args.algorithms.split(","):
        evals = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            cfg = ActorCriticConfig.with_defaults(
                None, algorithm=algorithm, env_id="Pendulum-v1", total_frames=args.frames, seed=seed
            )
            r = train(cfg)
            evals.append(r.eval_mean_return)
            print(
                json.dumps(
                    {
                        "algorithm": algorithm,
                        "seed": seed,
                        "eval": r.eval_mean_return,
                        "wall_s": round(r.wall_time_s, 1),
                    }
                ),
                flush=True,
            )
        ok = sum(e >= -200 for e in evals)
        print(json.dumps({"algorithm": algorithm, "reached_-200": f"{ok}/{len(evals)}"}), flush=True)


if __name__ == "__main__":
    main()

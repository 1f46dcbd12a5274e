"""PPO targets of issue 28, measured (not a test): CartPole-v1 success over seeds on held-out
seeds, the seed's CorrelatedActions with autoregressive against independent heads, Taxi with its
action masks, and training-loop speed against Stable-Baselines3's PPO in the same run.

    python -m benchmarks.train_ppo --seeds 5 --frames 100000     # >= 475 in >= 4 of 5 seeds?
    python -m benchmarks.train_ppo --correlated --seeds 3         # >= 190 within 30,000 frames?
    python -m benchmarks.train_ppo --env Taxi-v4 --frames 300000 --hp '{"entropy_coef": 0.01}'
    python -m benchmarks.train_ppo --speed --frames 20480        # frames/s vs SB3, 3 alternating rounds

Returns are the published policy's on held-out seeds (deterministic: each part's mode in
order); for CorrelatedActions also ``sampled``: the served ``random`` program's mean return on
the same held-out seeds, where independent heads cannot correlate a2 with a sampled a1.

SB3 (``pip install stable-baselines3``, the ``bench`` extra) runs with the same settings: 8 env
copies, 256 steps each per rollout (2048 frames), 10 epochs of minibatches of 64, gamma 0.99,
GAE lambda 0.95, clip 0.2, no entropy bonus, value coefficient 0.5, gradient norm 0.5, Adam
3e-4, separate 64x64 tanh policy and value MLPs. Both are timed over the training loop only
(collection + updates; no periodic evaluation), as ``benchmarks.train_dqn`` does.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from service.process import configure_process
from service.training.ppo import PPOConfig, train


def ours(frames: int, seed: int, hp: dict | None = None, env_id: str = "CartPole-v1") -> dict:
    cfg = PPOConfig.with_defaults(hp or {}, env_id=env_id, total_frames=frames, seed=seed)
    points: list[dict] = []
    r = train(cfg, on_progress=points.append)
    loop_s = points[-1]["time_s"]
    out = {
        "heldout_eval": r.eval_mean_return,
        "weights": r.spec.provenance["weights"],
        "frames": r.frames,
        "loop_s": round(loop_s, 1),
        "fps": round(r.frames / loop_s, 1),
    }
    evals = [(p["frames"], p["eval_mean_return"]) for p in points if p.get("eval_mean_return") is not None]
    if evals:
        out["periodic_eval"] = evals
    if isinstance(r.weights, dict) and "random.pt2" in r.weights:
        out["sampled_heldout"] = sampled_return(r.spec, r.weights, env_id)
    return out


def sampled_return(spec, files: dict, env_id: str, episodes: int = 10) -> float:
    """The served random program's mean return on the held-out seeds (a gymnasium env stepped
    with its composite answers)."""
    import gymnasium as gym

    from service.envs import register_envs
    from service.registry.program import read_programs
    from service.training.common import HELDOUT_SEED

    register_envs()
    module = read_programs(spec, files).modes["random"].module
    leaves = list(spec.action.entries)
    env = gym.make(env_id)
    torch.manual_seed(0)
    total = 0.0
    for i in range(episodes):
        obs, _ = env.reset(seed=HELDOUT_SEED + i)
        done = False
        while not done:
            with torch.no_grad():
                out = module(torch.as_tensor(obs).unsqueeze(0))
            action = tuple(int(out[j][0]) for j in range(len(leaves)))
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
    return total / episodes


def sb3(frames: int, seed: int) -> dict:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=256,
        batch_size=64,
        n_epochs=10,
        learning_rate=3e-4,
        gamma=0.99,
        gae_lambda=0.95,
        clip_range=0.2,
        ent_coef=0.0,
        vf_coef=0.5,
        max_grad_norm=0.5,
        policy_kwargs={"net_arch": [64, 64], "activation_fn": torch.nn.Tanh},
        seed=seed,
        device="cpu",
        verbose=0,
    )
    t = time.perf_counter()
    model.learn(total_timesteps=frames)
    wall = time.perf_counter() - t
    return {"frames": frames, "loop_s": round(wall, 1), "fps": round(frames / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--speed", action="store_true", help="frames/s against SB3, one seed each")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=3, help="--speed: alternating rounds of both")
    ap.add_argument("--env", default="CartPole-v1")
    ap.add_argument("--hp", default="{}", help="hyperparameters (JSON) over the defaults")
    ap.add_argument(
        "--correlated",
        action="store_true",
        help="CorrelatedActions-v0, 30,000 frames: autoregressive against independent heads",
    )
    args = ap.parse_args()
    configure_process(torch_threads=args.threads)
    extra = json.loads(args.hp)
    if args.correlated:
        for autoregressive in (True, False):
            for seed in range(args.seeds):
                hp = {
                    "autoregressive": autoregressive,
                    "frames_per_batch": 2000,
                    "eval_every_frames": 2000,
                    **extra,
                }
                r = ours(30_000, seed, hp, "CorrelatedActions-v0")
                first = next((f for f, v in r.pop("periodic_eval") if v >= 190), None)
                print(
                    json.dumps(
                        {"autoregressive": autoregressive, "seed": seed, "first_eval_190_at": first, **r}
                    )
                )
        return
    if args.env != "CartPole-v1":
        for seed in range(args.seeds):
            print(
                json.dumps({"env": args.env, "seed": seed, **ours(args.frames, seed, extra, args.env)}),
                flush=True,
            )
        return
    if args.speed:  # alternating, so that a slow stretch of the machine hits both
        ratios = []
        for round_ in range(args.rounds):
            a = ours(args.frames, 0, {"eval_every_frames": 0, "eval_episodes": 1})
            b = sb3(args.frames, 0)
            ratios.append(round(a["fps"] / b["fps"], 2))
            print(json.dumps({"round": round_, "ours": a, "sb3": b, "fps_ratio_ours_over_sb3": ratios[-1]}))
        print(json.dumps({"fps_ratio_ours_over_sb3": ratios, "median": sorted(ratios)[len(ratios) // 2]}))
        return
    runs = []
    for seed in range(args.seeds):
        r = ours(args.frames, seed)
        runs.append(r)
        print(json.dumps({"seed": seed, **r}), flush=True)
    solved = sum(r["heldout_eval"] >= 475 for r in runs)
    print(json.dumps({"solved_475_heldout": f"{solved}/{len(runs)}", "frames": args.frames}))


if __name__ == "__main__":
    main()

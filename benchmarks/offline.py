"""Offline-data targets of issue 30, measured (not a test):

- BC on 30 expert CartPole episodes (recorded from ``cartpole-dqn`` with epsilon 0.1): held-out
  return (target >= 475);
- discrete CQL against BC on a mixed dataset (the 30 expert episodes + 30 uniform-random ones),
  same seeds (target: CQL >= BC);
- DQN + imitation (10 expert episodes) against plain DQN: the frames at which the periodic
  evaluation (5 validation episodes every ``--eval-every`` frames) first reaches 475, per seed,
  and the medians (target: fewer with imitation);
- WIS: the estimate for epsilon-greedy policies from a dataset logged at epsilon 0.3, next to
  their return measured by rollouts on held-out seeds (target: the logging policy's own within
  5%; the others reported).

    python -m benchmarks.offline                     # everything, 3 seeds
    python -m benchmarks.offline --only bc,cql --seeds 5

The datasets are recorded through the server's own recording sessions (a real app in process,
real gymnasium episodes); the trainers run as the worker runs them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import gymnasium as gym
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from service.process import configure_process
from service.training.dqn import DQNConfig
from service.training.dqn import train as train_dqn
from service.training.offline import OfflineConfig, space_specs
from service.training.offline import train as train_offline

ROOT = Path(__file__).resolve().parents[1]


def record(client, dataset: str, episodes: int, epsilon: float, seed: int, num_envs: int = 10) -> list[float]:
    """``episodes`` CartPole episodes of cartpole-dqn (epsilon-greedy) recorded into ``dataset``."""
    sid = client.post(
        "/v1/sessions",
        json={
            "policy": "cartpole-dqn",
            "record": dataset,
            "exploration": "random",
            "epsilon": epsilon,
            "num_envs": num_envs,
        },
    ).json()["session_id"]
    envs = [gym.make("CartPole-v1") for _ in range(num_envs)]
    returns = []
    for start in range(seed, seed + episodes, num_envs):
        obs = [e.reset(seed=start + i)[0].tolist() for i, e in enumerate(envs)]
        done, total = [False] * num_envs, [0.0] * num_envs
        body = {"observations": obs, "reset": True}
        while True:
            answer = client.post(f"/v1/sessions/{sid}/act", json=body).json()
            if all(done):
                break
            reward, term, trunc = [], [], []
            for i, (env, action) in enumerate(zip(envs, answer["actions"], strict=True)):
                if done[i]:
                    reward.append(None), term.append(False), trunc.append(False)
                    continue
                o, r, te, tr, _ = env.step(action)
                obs[i], total[i] = o.tolist(), total[i] + r
                reward.append(float(r)), term.append(bool(te)), trunc.append(bool(tr))
                done[i] = bool(te or tr)
            body = {"observations": obs, "reward": reward, "terminated": term, "truncated": trunc}
        returns += total
    client.delete(f"/v1/sessions/{sid}")
    return returns


def offline(root: Path, dataset: str, algorithm: str, seed: int, frames: int) -> float:
    from minari import MinariDataset

    ds = MinariDataset(root / dataset / "data")
    observation, action = space_specs(ds.observation_space, ds.action_space)
    cfg = OfflineConfig.with_defaults(
        {"eval_every_frames": 0, "eval_episodes": 20},
        algorithm=algorithm,
        dataset=dataset,
        dataset_dir=str(root / dataset),
        observation=observation,
        action=action,
        env_id="CartPole-v1",
        total_frames=frames,
        seed=seed,
    )
    return train_offline(cfg).eval_mean_return


def frames_to_475(seed: int, frames: int, every: int, imitation: tuple[str, float] | None) -> int | None:
    extra = {}
    if imitation is not None:
        extra = {
            "imitation_dataset": "expert10",
            "imitation_dir": imitation[0],
            "imitation_weight": imitation[1],
        }
    cfg = DQNConfig.with_defaults(
        {"eval_every_frames": every}, env_id="CartPole-v1", total_frames=frames, seed=seed, **extra
    )
    points: list[dict] = []
    train_dqn(cfg, on_progress=points.append)
    for p in points:
        if p.get("eval_mean_return") is not None and p["eval_mean_return"] >= 475:
            return p["frames"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--frames", type=int, default=256 * 2000, help="bc: transitions drawn")
    ap.add_argument("--cql-frames", type=int, default=256 * 20_000, help="discrete_cql: transitions drawn")
    ap.add_argument("--dqn-frames", type=int, default=40_000)
    ap.add_argument("--eval-every", type=int, default=2_000)
    ap.add_argument("--only", default="bc,cql,imitation,wis")
    args = ap.parse_args()
    only = set(args.only.split(","))
    configure_process()
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(ROOT / "models" / "cartpole-dqn", tmp / "models" / "cartpole-dqn")
    settings = Settings(
        model_dir=tmp / "models", data_dir=tmp / "var", registry_poll_s=0, embedded_worker=False
    )
    root = settings.data_dir / "datasets"
    out: dict = {}
    with TestClient(create_app(settings)) as c:
        expert = record(c, "expert30-v0", 30, 0.1, seed=10_000)
        record(c, "mixed-v0", 30, 0.1, seed=10_000)
        randoms = record(c, "mixed-v0", 30, 1.0, seed=20_000)
        record(c, "expert10-v0", 10, 0.1, seed=30_000)
        out["datasets"] = {
            "expert30 mean return": statistics.mean(expert),
            "random mean return": statistics.mean(randoms),
        }
        if "wis" in only:
            logged = record(c, "ope-v0", 40, 0.3, seed=40_000)
            wis = {}
            for eps in (0.3, 0.2, 0.1):
                est = c.post(
                    "/v1/policies/cartpole-dqn/evaluate",
                    json={"dataset": "ope-v0", "exploration": "random", "epsilon": eps},
                ).json()
                truth = c.post(
                    "/v1/policies/cartpole-dqn/rollout",
                    json={
                        "env_id": "CartPole-v1",
                        "episodes": 50,
                        "exploration": "random",
                        "epsilon": eps,
                        "seed": 50_000,
                    },
                ).json()["mean_return"]
                wis[f"epsilon {eps}"] = {
                    "wis": round(est["estimate"], 1),
                    "ci95": [round(x, 1) for x in est["ci95"]],
                    "ess": round(est["effective_sample_size"], 1),
                    "measured (50 rollouts)": truth,
                    "wis / measured": round(est["estimate"] / truth, 3),
                }
            out[f"wis (dataset logged at epsilon 0.3, mean {statistics.mean(logged):.1f})"] = wis
    print(json.dumps(out, indent=2), flush=True)
    seeds = range(args.seeds)
    if "bc" in only:
        bc = [offline(root, "expert30-v0", "bc", s, args.frames) for s in seeds]
        out["bc on 30 expert episodes (held-out)"] = bc
        print("bc expert30", bc, flush=True)
    if "cql" in only:
        bc_mixed = [offline(root, "mixed-v0", "bc", s, args.frames) for s in seeds]
        cql_mixed = [offline(root, "mixed-v0", "discrete_cql", s, args.cql_frames) for s in seeds]
        out["mixed dataset (held-out)"] = {"bc": bc_mixed, "discrete_cql": cql_mixed}
        print("mixed", bc_mixed, cql_mixed, flush=True)
    if "imitation" in only:
        plain = [frames_to_475(s, args.dqn_frames, args.eval_every, None) for s in seeds]
        imit = [
            frames_to_475(s, args.dqn_frames, args.eval_every, (str(root / "expert10-v0"), 1.0))
            for s in seeds
        ]
        never = args.dqn_frames * 10  # a seed that never reached 475 counts past the end

        def median(xs):
            return statistics.median(x if x is not None else never for x in xs)

        out["frames to 475 (periodic eval, validation seeds)"] = {
            "dqn": plain,
            "dqn + imitation": imit,
            "median dqn": median(plain),
            "median dqn + imitation": median(imit),
        }
        print("imitation", plain, imit, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

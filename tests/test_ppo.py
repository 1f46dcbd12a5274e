"""PPO jobs: a REST job that learns CartPole measurably on held-out seeds, published as a
categorical ``probabilistic`` version whose served log-probs are the TorchRL distribution's; a
box job publishes a TanhNormal policy; multi-part actions (Tuple, Dict of discrete, box and
multi-discrete parts) trained with independent or autoregressive heads and served as programs
(each part's log-prob and the joint equal the training distribution's; deterministic = each
part's mode in order); the seed's CorrelatedActions learned with autoregressive heads; Taxi's
action masks never violated, in training or serving; what PPO cannot train refused at submit."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from service import envs
from service.registry.build import build_policy, load_weights
from service.registry.spec import PolicySpec
from service.training.common import EnvSource, state_of
from service.training.parts import flat
from service.training.ppo import PPO, PPOConfig
from tests.helpers import job_body, wait_for

RANDOM_CARTPOLE = 25  # a uniform-random CartPole policy's mean return (~22)


@pytest.mark.slow
def test_a_ppo_job_learns_cartpole_and_serves_the_distributions_log_probs(jclient, model_dir):
    body = job_body(
        algorithm="ppo",
        policy_name="ppo-cp",
        total_frames=10_240,
        seed=0,
        hyperparameters={"frames_per_batch": 1024, "eval_every_frames": 0, "eval_episodes": 5},
    )
    r = jclient.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = wait_for(jclient, r.json()["job_id"], {"succeeded", "failed"}, timeout=600)
    assert job["status"] == "succeeded", job
    detail = jclient.get("/v1/policies/ppo-cp").json()
    spec = detail["version_details"][-1]["spec"]
    assert spec["kind"] == "probabilistic" and spec["distribution"] == "categorical"
    provenance = spec["provenance"]
    assert provenance["algorithm"] == "ppo"
    assert provenance["eval_mean_return"] > 4 * RANDOM_CARTPOLE, provenance  # held-out seeds

    # the served log-prob of each answered action is the TorchRL distribution's
    version = detail["default_version"]
    built = build_policy(PolicySpec.model_validate(spec))
    load_weights(built, (model_dir / "ppo-cp" / str(version) / "weights.safetensors").read_bytes())
    obs = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)) * 0.5
    answer = jclient.post(
        "/v1/policies/ppo-cp/act",
        json={"observations": obs.tolist(), "exploration": "random", "seed": 3, "return_info": True},
    ).json()
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        dist = built.core.module[0].get_dist(TensorDict({"observation": obs}, [16]))
    actions = torch.tensor(answer["actions"])
    want = dist.log_prob(actions)
    got = torch.tensor([i["log_prob"] for i in answer["info"]])
    assert torch.allclose(got, want, atol=1e-5)


def test_a_ppo_box_job_publishes_a_tanh_normal_policy(jclient):
    body = job_body(
        algorithm="ppo",
        env_id="Pendulum-v1",
        policy_name="ppo-pend",
        total_frames=512,
        hyperparameters={
            "frames_per_batch": 256,
            "num_envs": 2,
            "epochs": 2,
            "eval_every_frames": 0,
            "eval_episodes": 1,
            "num_cells": [16],
        },
    )
    r = jclient.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = wait_for(jclient, r.json()["job_id"], {"succeeded", "failed"}, timeout=300)
    assert job["status"] == "succeeded", job
    spec = jclient.get("/v1/policies/ppo-pend").json()["version_details"][-1]["spec"]
    assert spec["distribution"] == "tanh_normal" and spec["action"]["type"] == "box"
    act = jclient.post(
        "/v1/policies/ppo-pend/act", json={"observation": [1.0, 0.0, 0.0], "exploration": "random"}
    )
    assert act.status_code == 200 and -2.0 <= act.json()["action"][0] <= 2.0


class DictActions(gym.Env):
    """A test env acting with a Dict of a discrete, a box and a multi-discrete part: reward for
    choosing the observation's largest entry, pushing toward its first two values, and keying
    its sign."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        self.action_space = gym.spaces.Dict(
            {
                "choice": gym.spaces.Discrete(3),
                "force": gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
                "keys": gym.spaces.MultiDiscrete([2, 3]),
            }
        )
        self.t = 0

    def _observe(self):
        self.obs = self.np_random.uniform(-1, 1, 3).astype(np.float32)
        return self.obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._observe(), {}

    def step(self, action):
        assert set(action) == {"choice", "force", "keys"} and action["keys"].shape == (2,)
        reward = float(action["choice"] == int(np.argmax(self.obs)))
        reward += 1.0 - float(np.abs(np.asarray(action["force"]) - self.obs[:2]).mean())
        reward += float(int(action["keys"][0]) == int(self.obs[0] > 0))
        self.t += 1
        return self._observe(), reward, False, self.t >= 10, {}


@pytest.fixture()
def dict_actions(monkeypatch):
    if "DictActions-v0" not in gym.registry:
        gym.register(id="DictActions-v0", entry_point=DictActions)
    entry = envs.EnvEntry("DictActions-v0", "a test env with Dict actions")
    monkeypatch.setitem(envs.ALLOWED, "DictActions-v0", entry)
    return "DictActions-v0"


def _publish_untrained(client, env_id: str, name: str, **hp):
    """A PPO run's policy before any update, published through the trainer's export: the
    PPO object (its training distribution) and the version."""
    config = PPOConfig.with_defaults({"num_cells": [32, 32], **hp}, env_id=env_id, total_frames=1, seed=0)
    algo = PPO(config)
    spec, files = algo.export(state_of(algo.built))
    version = client.app.state.registry.publish(name, spec, files)
    return algo, version


@pytest.mark.parametrize(
    ("env_id", "autoregressive"), [("CorrelatedActions-v0", True), ("DictActions-v0", False)]
)
def test_multi_part_actions_serve_each_parts_log_prob_as_the_training_distribution(
    client, dict_actions, env_id, autoregressive
):
    algo, version = _publish_untrained(client, env_id, "parts", autoregressive=autoregressive)
    spec = client.get("/v1/policies/parts").json()["version_details"][-1]["spec"]
    assert spec["action"]["type"] == "composite" and spec["program"]["outputs"][-1] == "log_prob"
    dim = spec["observation"]["shape"][0]
    obs = torch.rand(32, dim, generator=torch.Generator().manual_seed(0))
    actor = algo.built.core.module[0]
    dist = actor.get_dist(TensorDict({"observation": obs}, [32]))
    leaves = list(spec["action"]["entries"])
    for exploration in ("random", "deterministic"):
        r = client.post(
            "/v1/policies/parts/act",
            json={"observations": obs.tolist(), "exploration": exploration, "seed": 5, "return_info": True},
        )
        assert r.status_code == 200, r.text
        answers = r.json()
        assert answers["version"] == version and all(set(a) == set(leaves) for a in answers["actions"])
        values = []  # the answered parts, in the flat vector's order
        for leaf in leaves:
            column = torch.tensor([a[leaf] for a in answers["actions"]])
            values += list(column.T) if column.dim() > 1 and column.dtype == torch.int64 else [column]
        action = flat(algo.built.core.module[0].module[0].module.parts, values)
        _, per_part, _ = dist.heads.run(dist.context, given=action)
        got_joint = torch.tensor([i["joint_log_prob"] for i in answers["info"]])
        assert torch.allclose(got_joint, dist.log_prob(action), atol=1e-4), exploration
        at = 0
        for leaf in leaves:  # each leaf's log-prob: its parts' summed
            mine = [i for i, p in enumerate(dist.heads.parts) if p.leaf == leaf]
            want = torch.stack([per_part[i] for i in mine], -1).sum(-1)
            got = torch.tensor([i["log_prob"][leaf] for i in answers["info"]])
            assert torch.allclose(got, want, atol=1e-4), (exploration, leaf)
            at += len(mine)
        if exploration == "deterministic":  # each part's mode in order
            assert torch.allclose(action, dist.deterministic_sample, atol=1e-5)
    # a server-side episode in the env takes the composite answers
    r = client.post(
        "/v1/policies/parts/rollout", json={"env_id": env_id, "episodes": 1, "return_trajectory": True}
    )
    assert r.status_code == 200, r.text
    assert set(r.json()["episodes"][0]["trajectory"]["action"][0]) == set(leaves)


def test_a_dict_action_ppo_job_publishes_a_program_that_acts_in_its_env(jclient, dict_actions):
    body = job_body(
        algorithm="ppo",
        env_id=dict_actions,
        policy_name="ppo-dict",
        total_frames=512,
        hyperparameters={
            "frames_per_batch": 256,
            "num_envs": 2,
            "epochs": 2,
            "eval_every_frames": 0,
            "eval_episodes": 1,
        },
    )
    r = jclient.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = wait_for(jclient, r.json()["job_id"], {"succeeded", "failed"}, timeout=300)
    assert job["status"] == "succeeded", job
    spec = jclient.get("/v1/policies/ppo-dict").json()["version_details"][-1]["spec"]
    assert spec["provenance"]["algorithm"] == "ppo" and "program" in spec
    act = jclient.post(
        "/v1/policies/ppo-dict/act", json={"observation": [0.5, -0.2, 0.1], "exploration": "random"}
    )
    a = act.json()["action"]
    assert 0 <= a["choice"] < 3 and len(a["force"]) == 2 and all(-1 <= f <= 1 for f in a["force"])
    assert len(a["keys"]) == 2 and 0 <= a["keys"][0] < 2 and 0 <= a["keys"][1] < 3


@pytest.mark.slow
def test_autoregressive_ppo_learns_the_seeds_correlated_actions(jclient):
    """The seed's example: +5 when a1 is the observed bit, +5 when a2 equals a1. A random policy
    averages 100; the trained one's sampled (random-mode) answers must correlate a2 with a1."""
    body = job_body(
        algorithm="ppo",
        env_id="CorrelatedActions-v0",
        policy_name="correlated",
        total_frames=30_000,
        seed=0,
        hyperparameters={
            "autoregressive": True,
            "frames_per_batch": 2000,
            "eval_every_frames": 0,
            "eval_episodes": 5,
        },
    )
    r = jclient.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = wait_for(jclient, r.json()["job_id"], {"succeeded", "failed"}, timeout=600)
    assert job["status"] == "succeeded", job
    spec = jclient.get("/v1/policies/correlated").json()["version_details"][-1]["spec"]
    assert spec["provenance"]["eval_mean_return"] >= 190, spec["provenance"]  # held-out seeds
    rows = [[0.0]] * 32 + [[1.0]] * 32
    answers, bits = [], []
    for seed in range(3):  # 192 sampled answers
        r = jclient.post(
            "/v1/policies/correlated/act", json={"observations": rows, "exploration": "random", "seed": seed}
        )
        answers += r.json()["actions"]
        bits += [int(r[0]) for r in rows]
    assert sum(a["a1"] == b for a, b in zip(answers, bits, strict=True)) >= 163  # 85%
    assert sum(a["a2"] == a["a1"] for a in answers) >= 173  # 90%
    r = jclient.post(
        "/v1/policies/correlated/rollout",
        json={"env_id": "CorrelatedActions-v0", "episodes": 3, "seed": 100, "exploration": "random"},
    )
    assert r.status_code == 200 and r.json()["mean_return"] >= 170, r.text


def _first_batch(hp: dict, env_id: str):
    """A PPO run's parts and the first batch its collector gives (advantages computed)."""
    config = PPOConfig.with_defaults(hp, env_id=env_id, total_frames=hp["frames_per_batch"], seed=0)
    algo = PPO(config)
    source = EnvSource(algo, config)
    try:
        return algo, next(iter(source.batches(lambda: False))).store[0]
    finally:
        source.close()


def test_taxi_masks_are_never_violated_in_training_or_serving(client):
    algo, batch = _first_batch({"frames_per_batch": 512}, "Taxi-v4")
    allowed = batch["action_mask"].gather(-1, batch["action"].unsqueeze(-1))
    assert bool(allowed.all()) and not bool(batch["action_mask"].all())  # masks that bite, all kept
    client.app.state.registry.publish("ppo-taxi", *algo.export(state_of(algo.built)))
    g = torch.Generator().manual_seed(0)
    obs = torch.randint(500, (64,), generator=g)
    masks = torch.rand(64, 6, generator=g) < 0.4
    masks[:, 0] |= ~masks.any(-1)
    for exploration in ("random", "deterministic"):
        for seed in range(4):
            r = client.post(
                "/v1/policies/ppo-taxi/act",
                json={
                    "observations": obs.tolist(),
                    "action_masks": masks.tolist(),
                    "exploration": exploration,
                    "seed": seed,
                },
            )
            assert r.status_code == 200, r.text
            chosen = torch.tensor(r.json()["actions"])
            assert bool(masks[torch.arange(64), chosen].all()), exploration


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"env_id": "CartPoleDict-v1"}, "vector or discrete observations"),
        ({"hyperparameters": {"autoregressive": True}}, "several parts"),
        ({"env_id": "Taxi-v4", "hyperparameters": {"num_envs": 4}}, "num_envs=1"),
        ({"hyperparameters": {"minibatch_size": 4096, "frames_per_batch": 1024}}, "minibatch_size"),
        ({"hyperparameters": {"frames_per_batch": 1001}}, "multiple of num_envs"),
    ],
)
def test_what_ppo_cannot_train_is_refused_at_submit(client, body, expected):
    r = client.post("/v1/jobs", json=job_body(algorithm="ppo", **{"hyperparameters": {}, **body}))
    assert r.status_code == 422 and expected in r.text, r.text


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_the_lean_loss_equals_torchrls_clip_ppo_loss(entropy_coef):
    """LeanClipPPOLoss drops ClipPPOLoss's diagnostics only: the same losses and gradients."""
    from torchrl.objectives import ClipPPOLoss

    algo, batch = _first_batch({"frames_per_batch": 256, "entropy_coef": entropy_coef}, "CartPole-v1")
    mb = batch.select(*algo.loss_keys)[:64]
    lean = algo.loss_fn
    reference = ClipPPOLoss(
        lean.actor_network,
        lean.critic_network,
        clip_epsilon=0.2,
        entropy_bonus=entropy_coef > 0,
        entropy_coeff=entropy_coef if entropy_coef > 0 else None,
        critic_coeff=0.5,
        loss_critic_type="l2",
        functional=False,
    )
    got, want = lean(mb.clone()), reference(mb.clone())
    keys = ["loss_objective", "loss_critic"] + (["loss_entropy"] if entropy_coef else [])
    assert set(got) == set(keys)
    for key in keys:
        assert torch.allclose(got[key], want[key], atol=1e-6), key
    grads = []
    for out in (got, want):
        algo.optim.zero_grad()
        sum(out[k] for k in keys).backward()
        grads.append([p.grad.clone() for p in algo.params])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_episode_returns_carry_across_batches():
    from service.training.common import EpisodeReturns

    returns = EpisodeReturns()
    reward = torch.ones(2, 5, 1)
    done = torch.zeros(2, 5, 1, dtype=torch.bool)
    done[0, 1] = done[0, 4] = done[1, 3] = True
    batch = TensorDict({"next": {"reward": reward, "done": done}}, [2, 5])
    assert returns.finished(batch) == [2.0, 3.0, 4.0]  # env 0's episodes, then env 1's
    assert returns.finished(batch) == [2.0, 3.0, 5.0]  # env 1's second: 1 carried + 4

"""PPO jobs (issue 28, first part: discrete and box action spaces): a REST job that learns
CartPole measurably on held-out seeds, published as a categorical ``probabilistic`` version
whose served log-probs are the TorchRL distribution's; a box job publishes a TanhNormal policy;
what PPO cannot train is refused at submit."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from service.registry.build import build_policy, load_weights
from service.registry.spec import PolicySpec
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


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"env_id": "Taxi-v4"}, "vector observations"),
        ({"hyperparameters": {"minibatch_size": 4096, "frames_per_batch": 1024}}, "minibatch_size"),
        ({"hyperparameters": {"frames_per_batch": 1001}}, "multiple of num_envs"),
    ],
)
def test_what_ppo_cannot_train_is_refused_at_submit(client, body, expected):
    r = client.post("/v1/jobs", json=job_body(algorithm="ppo", **{"hyperparameters": {}, **body}))
    assert r.status_code == 422 and expected in r.text, r.text

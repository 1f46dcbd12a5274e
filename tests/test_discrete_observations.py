"""Discrete (integer) observations, one-hot encoded by the policy, and an environment with action
masks (Taxi): served, stepped in sessions, rolled out and trained with the env's own masks."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from service.envs import env_specs, make_env
from service.registry.build import build_policy, load_weights
from service.registry.spec import PolicySpec
from service.training.dqn import DQNConfig, train
from tests.helpers import new_session, random_weights, upload

GRID = {
    "kind": "qvalue",
    "observation": {"type": "discrete", "n": 5},
    "action": {"type": "discrete", "n": 3},
    "network": {"num_cells": [16], "activation": "tanh"},
}
GRID_LSTM = {**GRID, "recurrent": {"type": "lstm", "hidden_size": 8}}
TAXI = {
    "kind": "qvalue",
    "observation": {"type": "discrete", "n": 500},
    "action": {"type": "discrete", "n": 6},
    "env_id": "Taxi-v4",
    "network": {"num_cells": [16]},
}


def test_integer_observations_are_one_hot_encoded_like_the_module(client):
    assert upload(client, "grid", GRID, random_weights(GRID)).status_code == 201
    r = client.post("/v1/policies/grid/act", json={"observations": [0, 1, 2, 3, 4], "return_info": True})
    assert r.status_code == 200, r.text
    built = build_policy(PolicySpec.model_validate(GRID))
    load_weights(built, random_weights(GRID))
    td = built.core(TensorDict({"observation": torch.arange(5)}, batch_size=[5]))
    assert r.json()["actions"] == td["action"].tolist()
    values = torch.tensor([i["action_value"] for i in r.json()["info"]])
    assert torch.allclose(values, td["action_value"], atol=1e-5)
    one = client.post("/v1/policies/grid/act", json={"observation": 3, "exploration": "random", "seed": 1})
    assert one.status_code == 200 and one.json()["action"] in (0, 1, 2)


@pytest.mark.parametrize(
    ("observation", "expected"),
    [
        (5, "integer in [0, 5)"),
        (-1, "integer in [0, 5)"),
        (1.5, "valid"),
        ([1], "integer in [0, 5)"),
        (True, "valid"),
    ],
)
def test_observations_that_do_not_fit_a_discrete_spec_are_422(client, observation, expected):
    upload(client, "grid", GRID, random_weights(GRID))
    r = client.post("/v1/policies/grid/act", json={"observation": observation})
    assert r.status_code == 422 and expected in str(r.json()["detail"]), r.text
    r = client.post("/v1/policies/q/act", json={"observation": 3})  # a vector policy
    assert r.status_code == 422 and "single number" in r.json()["detail"]


def test_a_recurrent_policy_over_integer_observations_steps_in_a_session(client):
    upload(client, "grid-lstm", GRID_LSTM, random_weights(GRID_LSTM))
    sid = new_session(client, "grid-lstm", num_envs=2)
    steps = [
        client.post(f"/v1/sessions/{sid}/act", json={"observations": [t % 5, 4 - t % 5]}) for t in range(4)
    ]
    assert all(s.status_code == 200 for s in steps) and steps[-1].json()["step"] == 4


def test_taxi_gives_bool_masks_and_a_discrete_observation(client):
    assert env_specs("Taxi-v4")["observation"] == {"type": "discrete", "n": 500}
    env = make_env("Taxi-v4")
    td = env.reset()
    env.close()
    assert td["action_mask"].dtype == torch.bool and td["action_mask"].shape == (6,)
    assert td["observation"].dtype == torch.int64 and 0 <= int(td["observation"]) < 500
    listed = {e["env_id"]: e for e in client.get("/v1/envs").json()["envs"]}
    assert listed["Taxi-v4"]["action_mask"] is True and listed["CartPole-v1"]["action_mask"] is False


def test_rollouts_pass_the_environments_mask_to_the_policy(client):
    """Taxi's illegal pickups and drop-offs (reward -10) are masked: a masked policy never earns
    one, while the same random policy without masks does within a few episodes."""
    upload(client, "taxi", TAXI, random_weights(TAXI))
    body = {"episodes": 3, "max_steps": 200, "seed": 0, "return_trajectory": True, "exploration": "random"}
    r = client.post("/v1/policies/taxi/rollout", json={**body, "epsilon": 1.0})
    assert r.status_code == 200, r.text
    rewards = [x for e in r.json()["episodes"] for x in e["trajectory"]["reward"]]
    assert len(rewards) > 100 and set(rewards) <= {-1.0, 20.0}
    env = make_env("Taxi-v4")  # uniform actions that ignore the mask: illegal ones happen
    env.set_seed(0)
    g = torch.Generator().manual_seed(0)
    uniform = lambda td: td.set("action", torch.randint(6, (), generator=g))  # noqa: E731
    unmasked = env.rollout(600, uniform, break_when_any_done=False)
    env.close()
    assert (unmasked["next", "reward"] == -10).any()


def test_dqn_trains_on_taxi_with_its_masks():
    config = DQNConfig.with_defaults(
        {
            "num_envs": 1,
            "frames_per_batch": 100,
            "updates_per_batch": 5,
            "init_random_frames": 200,
            "eval_episodes": 1,
            "num_cells": [32],
        },
        env_id="Taxi-v4",
        total_frames=500,
    )
    points: list[dict] = []
    trained = train(config, on_progress=points.append)
    assert trained.spec.model_dump(mode="json")["observation"] == {"type": "discrete", "n": 500}
    assert trained.frames == 500 and points[-1]["loss"] is not None
    # masks keep every collected and evaluated step legal: returns are made of -1s (and +20s)
    assert trained.eval_mean_return >= -200 and all(
        p["mean_return"] is None or p["mean_return"] >= -200 for p in points
    )


def test_taxi_jobs_default_to_one_env_copy_and_refuse_more(client):
    body = {"algorithm": "dqn", "env_id": "Taxi-v4", "policy_name": "t", "total_frames": 1000}
    assert client.post("/v1/jobs", json=body).status_code == 202  # num_envs defaults to 1 here
    r = client.post("/v1/jobs", json={**body, "hyperparameters": {"num_envs": 4, "frames_per_batch": 256}})
    assert r.status_code == 422 and "num_envs=1" in r.json()["detail"]

"""Dict observations (RLlib's Dict spaces): named entries in the spec, JSON objects in requests,
each entry encoded (one-hot for a discrete one) and concatenated in the spec's order before the
head. Served like the TorchRL module, stepped in sessions, rolled out and trained."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.modules import set_recurrent_mode

from service.envs import env_specs
from service.registry.build import build_policy, load_weights
from service.registry.spec import PolicySpec
from service.training.dqn import DQNConfig, train
from tests.helpers import new_session, random_weights, upload, upload_files

MIXED = {
    "kind": "qvalue",
    "observation": {
        "type": "dict",
        "entries": {"position": {"shape": [3]}, "goal": {"type": "discrete", "n": 4}},
    },
    "action": {"type": "discrete", "n": 5},
    "network": {"num_cells": [16], "activation": "tanh"},
}
MIXED_LSTM = {**MIXED, "recurrent": {"type": "lstm", "hidden_size": 8}}
CATEGORICAL = {**MIXED, "kind": "probabilistic", "distribution": "categorical"}


def _rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"position": torch.randn(3, generator=g).tolist(), "goal": int(torch.randint(4, (), generator=g))}
        for _ in range(n)
    ]


def _module(spec: dict, weights: bytes):
    built = build_policy(PolicySpec.model_validate(spec))
    load_weights(built, weights)
    return built.core


def _td(rows: list[dict]) -> TensorDict:
    return TensorDict(
        {
            "position": torch.tensor([r["position"] for r in rows]),
            "goal": torch.tensor([r["goal"] for r in rows]),
        },
        batch_size=[len(rows)],
    )


def test_dict_observations_are_served_like_the_module(client):
    weights = random_weights(MIXED)
    assert upload(client, "mixed", MIXED, weights).status_code == 201
    rows = _rows(16)
    r = client.post("/v1/policies/mixed/act", json={"observations": rows, "return_info": True})
    assert r.status_code == 200, r.text
    td = _module(MIXED, weights)(_td(rows))
    assert r.json()["actions"] == td["action"].tolist()
    values = torch.tensor([i["action_value"] for i in r.json()["info"]])
    assert torch.allclose(values, td["action_value"], atol=1e-5)
    # entries concatenate in the spec's order (position, then goal's one-hot), not the request's
    assert td["observation_encoded"][0, 3:].tolist() == torch.eye(4)[rows[0]["goal"]].tolist()
    swapped = {"goal": rows[0]["goal"], "position": rows[0]["position"]}
    one = client.post("/v1/policies/mixed/act", json={"observation": swapped, "return_info": True})
    assert one.json()["action"] == r.json()["actions"][0]


def test_a_categorical_dict_policy_samples_and_takes_masks(client):
    upload(client, "mixed-cat", CATEGORICAL, random_weights(CATEGORICAL))
    rows = _rows(32, seed=1)
    masks = [[i == j % 5 for i in range(5)] for j in range(32)]  # one allowed action each
    r = client.post(
        "/v1/policies/mixed-cat/act",
        json={"observations": rows, "action_masks": masks, "exploration": "random", "seed": 3},
    )
    assert r.status_code == 200, r.text
    assert r.json()["actions"] == [j % 5 for j in range(32)]


@pytest.mark.parametrize(
    ("observation", "expected"),
    [
        ({"position": [0.0, 1.0, 2.0]}, "misses ['goal']"),
        ({"position": [0.0, 1.0, 2.0], "goal": 1, "speed": [1.0]}, "unexpected ['speed']"),
        ({"position": [0.0, 1.0], "goal": 1}, "observation['position'] has shape [2]"),
        ({"position": [0.0, 1.0, 2.0], "goal": 4}, "observation['goal'] is 4"),
        (
            {"position": [0.0, 1.0, 1e39], "goal": 0},
            "['position'] holds values that are not finite",
        ),
        ({"position": 3, "goal": 0}, "observation['position'] has a single number"),
        ([0.0, 1.0, 2.0, 3.0], "expects an object with entries ['position', 'goal']"),
        ({"position": ["a", 1.0, 2.0], "goal": 0}, "valid"),
    ],
)
def test_dict_observations_that_do_not_fit_are_422(client, observation, expected):
    upload(client, "mixed", MIXED, random_weights(MIXED))
    r = client.post("/v1/policies/mixed/act", json={"observation": observation})
    assert r.status_code == 422 and expected in str(r.json()["detail"]), r.text


def test_a_batch_names_the_observation_and_entry_that_does_not_fit(client):
    upload(client, "mixed", MIXED, random_weights(MIXED))
    rows = _rows(3)
    rows[2]["goal"] = -1
    r = client.post("/v1/policies/mixed/act", json={"observations": rows})
    assert r.status_code == 422 and "observations[2]['goal'] is -1" in r.json()["detail"], r.text
    # an object sent to a vector policy
    r = client.post("/v1/policies/q/act", json={"observation": {"position": [0.0]}})
    assert r.status_code == 422 and "observation has an object, policy q expects [4]" in r.json()["detail"], (
        r.text
    )


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ({"action": {"shape": [2]}}, "reserved"),
        ({"has space": {"shape": [2]}}, "entry name"),
        ({}, "at least 1"),
    ],
)
def test_specs_with_bad_entry_names_are_refused(client, entries, expected):
    spec = {**MIXED, "observation": {"type": "dict", "entries": entries}}
    r = client.post("/v1/policies/bad/versions", files=upload_files(spec, random_weights(MIXED)))
    assert r.status_code == 422 and expected in str(r.json()["detail"]), r.text
    assert client.get("/v1/policies/bad").status_code == 404


def test_a_recurrent_dict_policy_steps_like_the_whole_sequence(client):
    weights = random_weights(MIXED_LSTM)
    upload(client, "mixed-lstm", MIXED_LSTM, weights)
    seq = _rows(6, seed=2)
    sid = new_session(client, "mixed-lstm")
    answers = [
        client.post(f"/v1/sessions/{sid}/act", json={"observation": o, "return_info": True}).json()
        for o in seq
    ]
    module = _module(MIXED_LSTM, weights)
    td = _td(seq).unsqueeze(0)  # [1, T]: one episode, the LSTM over the whole sequence at once
    td["is_init"] = torch.zeros(1, 6, 1, dtype=torch.bool)
    td["is_init"][0, 0] = True
    with set_recurrent_mode(True):
        out = module(td)
    assert [a["action"] for a in answers] == out["action"][0].tolist()
    values = torch.tensor([a["info"]["action_value"] for a in answers])
    assert torch.allclose(values, out["action_value"][0], atol=1e-5)


def test_rollouts_on_a_dict_env_send_objects_and_refuse_a_vector_policy(client):
    spec = {"kind": "qvalue", **env_specs("CartPoleDict-v1"), "network": {"num_cells": [8]}}
    assert spec["observation"]["entries"].keys() == {"cart", "pole"}
    upload(client, "cp-dict", spec, random_weights(spec))
    r = client.post(
        "/v1/policies/cp-dict/rollout",
        json={"env_id": "CartPoleDict-v1", "episodes": 2, "seed": 0, "return_trajectory": True},
    )
    assert r.status_code == 200, r.text
    first = r.json()["episodes"][0]["trajectory"]["observation"][0]
    assert first.keys() == {"cart", "pole"} and len(first["cart"]) == 2
    # replaying the trajectory through act answers the same actions
    traj = r.json()["episodes"][0]["trajectory"]
    again = client.post("/v1/policies/cp-dict/act", json={"observations": traj["observation"]})
    assert again.json()["actions"] == traj["action"]
    r = client.post("/v1/policies/q/rollout", json={"env_id": "CartPoleDict-v1"})
    assert r.status_code == 422 and "does not fit policy q" in r.json()["detail"], r.text


def test_dqn_trains_on_a_dict_env_and_the_result_is_served(client):
    config = DQNConfig.with_defaults(
        {"frames_per_batch": 128, "updates_per_batch": 5, "init_random_frames": 256, "eval_episodes": 1},
        env_id="CartPoleDict-v1",
        total_frames=512,
    )
    points: list[dict] = []
    trained = train(config, on_progress=points.append)
    assert trained.spec.observation.type == "dict" and points[-1]["loss"] is not None
    r = client.post(
        "/v1/policies/trained-dict/versions",
        files=upload_files(trained.spec.model_dump(mode="json"), trained.weights),
    )
    assert r.status_code == 201, r.text
    obs = {"cart": [0.0, 0.1], "pole": [0.02, -0.1]}
    r = client.post("/v1/policies/trained-dict/act", json={"observation": obs, "return_info": True})
    assert r.status_code == 200 and r.json()["action"] in (0, 1), r.text
    module = _module(trained.spec.model_dump(mode="json"), trained.weights)
    td = module(TensorDict({k: torch.tensor([v]) for k, v in obs.items()}, batch_size=[1]))
    assert r.json()["action"] == int(td["action"][0])

"""Action masks when acting: no exploration mode ever answers a masked action."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MaskedCategorical, QValueModule

from service.exploration import Exploration
from service.runtime.batching import InferenceExecutor, MicroBatcher
from service.runtime.call import ActCall
from tests.helpers import SPECS, direct_module, new_session, obs_for, random_weights, upload

N = SPECS["q"]["action"]["n"]  # every discrete test policy has 3 actions
masks = st.lists(st.booleans(), min_size=N, max_size=N).filter(any)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(masks, min_size=1, max_size=8), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("name", ["q", "q-lstm", "cat"])
def test_no_mode_ever_answers_a_masked_action(client, name, rows, seed):
    obs = obs_for(name, len(rows), seed=seed)
    for exploration in ("deterministic", "mode", "mean", "random"):
        body = {"observations": obs, "action_masks": rows, "exploration": exploration, "epsilon": 1.0}
        r = client.post(f"/v1/policies/{name}/act", json=body)
        assert r.status_code == 200, r.text
        for action, mask in zip(r.json()["actions"], rows, strict=True):
            assert mask[action], (exploration, action, mask)


def test_masked_q_values_equal_torchrl_qvalue_module(client):
    rows = obs_for("q", 6, seed=2)
    mask = torch.tensor([[True, False, True], [False, True, False], [True, True, False]] * 2)
    body = {"observations": rows, "action_masks": mask.tolist(), "return_info": True}
    served = client.post("/v1/policies/q/act", json=body).json()
    _, core = direct_module("q")
    td = TensorDict({"observation": torch.tensor(rows)}, batch_size=[6])
    core.module[0](td)  # the Q-network: action_value
    QValueModule(action_space="categorical", action_mask_key="action_mask")(td.set("action_mask", mask))
    assert served["actions"] == td["action"].tolist()
    values = torch.tensor([i["action_value"] for i in served["info"]])
    assert torch.allclose(values, td["action_value"], atol=1e-5)  # masked: float32's lowest, as TorchRL
    chosen = torch.tensor([i["chosen_action_value"] for i in served["info"]])
    assert torch.allclose(chosen, td["chosen_action_value"].squeeze(-1), atol=1e-5)


def test_categorical_is_renormalised_over_allowed_actions(client):
    rows = obs_for("cat", 4, seed=3)
    mask = torch.tensor([[True, False, True], [False, True, True], [True, False, False], [True, True, True]])
    body = {"observations": rows, "action_masks": mask.tolist(), "return_info": True, "exploration": "mode"}
    served = client.post("/v1/policies/cat/act", json=body).json()
    _, core = direct_module("cat")
    td = TensorDict({"observation": torch.tensor(rows)}, batch_size=[4])
    with set_exploration_type(ExplorationType.MODE):
        logits = core.module[0].module[0](td)["logits"]  # the ProbabilisticActor's logits module
    dist = MaskedCategorical(logits=logits, mask=mask)
    assert served["actions"] == dist.mode.tolist()
    log_prob = torch.tensor([i["log_prob"] for i in served["info"]])
    assert torch.allclose(log_prob, dist.log_prob(dist.mode), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "body", "expected"),
    [
        (
            "q",
            {"observation": [0, 0, 0, 0], "action_mask": [True, False]},
            "has 2 values, policy q has 3 actions",
        ),
        ("q", {"observation": [0, 0, 0, 0], "action_mask": [False, False, False]}, "allows no action"),
        ("q", {"observation": [0, 0, 0, 0], "action_mask": [1, 0, 1]}, "valid boolean"),
        ("q", {"observation": [0, 0, 0, 0], "action_mask": ["true", True, True]}, "valid boolean"),
        (
            "q",
            {"observations": [[0, 0, 0, 0]] * 2, "action_masks": [[True] * 3]},
            "1 masks for 2 observation",
        ),
        ("q", {"observations": [[0, 0, 0, 0]], "action_mask": [True] * 3}, "goes with 'observation'"),
        ("actor", {"observation": [0, 0, 0], "action_mask": [True, True]}, "discrete policies"),
    ],
)
def test_masks_that_do_not_fit_are_422(client, name, body, expected):
    r = client.post(f"/v1/policies/{name}/act", json=body)
    assert r.status_code == 422 and expected in str(r.json()["detail"]), r.text


def test_a_spec_can_require_masks(client):
    spec = {**SPECS["q"], "action": {**SPECS["q"]["action"], "mask_required": True}}
    assert upload(client, "strict", spec, random_weights(SPECS["q"])).status_code == 201
    r = client.post("/v1/policies/strict/act", json={"observation": [0, 0, 0, 0]})
    assert r.status_code == 422 and "requires an action mask" in r.json()["detail"]
    ok = client.post(
        "/v1/policies/strict/act", json={"observation": [0, 0, 0, 0], "action_mask": [False, True, False]}
    )
    assert ok.json()["action"] == 1


def test_sessions_and_the_stream_take_one_mask_per_env(client):
    sid = new_session(client, "q-lstm", num_envs=2)
    rows = obs_for("q-lstm", 2, seed=5)
    allowed = [[False, False, True], [True, False, False]]
    r = client.post(f"/v1/sessions/{sid}/act", json={"observations": rows, "action_masks": allowed})
    assert r.json()["actions"] == [2, 0]
    bad = client.post(f"/v1/sessions/{sid}/act", json={"observations": rows, "action_masks": allowed[:1]})
    assert bad.status_code == 422 and client.get(f"/v1/sessions/{sid}").json()["steps"] == 1
    with client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
        ws.send_json(
            {"observations": rows, "action_masks": [[False, True, False]] * 2, "exploration": "random"}
        )
        assert ws.receive_json()["actions"] == [1, 1]


def test_masked_and_unmasked_callers_share_a_pass_and_keep_their_own_masks(app):
    runtime = app.state.registry.resolve("q").runtime
    obs = torch.tensor(obs_for("q", 4, seed=9))
    mask = torch.tensor([[False, False, True], [False, True, False]])

    async def calls():
        batcher = MicroBatcher(InferenceExecutor())
        passes: list[int] = []
        batcher.on_batch = passes.append
        kw = {"exploration": Exploration.deterministic}
        results = await asyncio.gather(
            batcher.submit(runtime, ActCall(obs[:2], mask=mask, **kw)),
            batcher.submit(runtime, ActCall(obs[2:], **kw)),
        )
        return results, passes

    (masked, free), passes = asyncio.run(calls())
    assert passes == [4]
    assert masked.action.tolist() == [2, 1]
    assert torch.equal(free.action, runtime.act(obs[2:]).action)

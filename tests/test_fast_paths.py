"""The fast paths (``runtime/fast.py``) answer what the TorchRL modules they replace answer."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from service.registry.build import ACTION_MASK, build_policy
from service.registry.spec import PolicySpec
from service.runtime.policy import PolicyRuntime
from tests.helpers import SPECS

LSTM_SPEC = {"type": "lstm", "hidden_size": 16, "num_layers": 1}


@pytest.mark.parametrize("name", ["q", "q-discrete-obs", "actor"])
def test_the_plain_networks_equal_the_torchrl_module(name):
    """Feed-forward Q-value and actor policies: the masked argmax, Q-values and actor outputs
    of the fast path against ``QValueModule`` / ``Actor`` run under deterministic exploration."""
    spec = {
        "q-discrete-obs": {
            "kind": "qvalue",
            "observation": {"type": "discrete", "n": 7},
            "action": {"type": "discrete", "n": 3},
        },
    }.get(name) or SPECS[name]
    torch.manual_seed(1)
    spec = PolicySpec.model_validate(spec)
    runtime = PolicyRuntime(spec, build_policy(spec), torch.device("cpu"))
    assert runtime.fast is not None and runtime.fast.lstm is None
    B = 8
    if spec.observation.discrete:
        obs = torch.randint(0, spec.observation.n, (B,))
    else:
        obs = torch.randn(B, spec.observation.shape[0])
    td = TensorDict({"observation": obs}, [B])
    mask = None
    if runtime.discrete:
        mask = torch.ones(B, spec.action.n, dtype=torch.bool)
        mask[0, 0] = mask[3, 1] = mask[3, 2] = mask[5, :2] = False
        td[ACTION_MASK] = mask
    got = runtime.act(obs, mask=mask, return_info=True)
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        out = runtime.core(td)
    if runtime.discrete:
        assert torch.equal(
            got.action, out["action"].argmax(-1) if out["action"].dim() == 2 else out["action"]
        )
        assert torch.allclose(got.info["action_value"], out["action_value"], atol=1e-6)
        assert got.action[0] != 0 and got.action[3] == 0 and got.action[5] == 2  # the masks hold
    else:
        assert torch.allclose(got.action, out["action"], atol=1e-6)


@pytest.mark.parametrize(
    "spec",
    [
        {**SPECS["q-lstm"], "recurrent": {"type": "lstm", "hidden_size": 16, "num_layers": 2}},
        SPECS["actor-lstm"],
        {
            "kind": "qvalue",
            "observation": {"type": "discrete", "n": 5},
            "action": {"type": "discrete", "n": 3},
            "recurrent": LSTM_SPEC,
        },
    ],
    ids=["q-lstm-2-layers", "actor-lstm", "one-hot-lstm"],
)
def test_the_plain_lstm_step_equals_the_torchrl_module(spec):
    """The deterministic fast path of a recurrent policy (nn.LSTM called directly) answers what
    the TorchRL module answers: actions, Q-values and next state, with is_init and masks."""
    torch.manual_seed(0)
    spec = PolicySpec.model_validate(spec)
    runtime = PolicyRuntime(spec, build_policy(spec), torch.device("cpu"))
    assert runtime.fast is not None and runtime.fast.lstm is not None
    B, L, H = 6, spec.recurrent.num_layers, spec.recurrent.hidden_size
    obs = (
        torch.randint(0, 5, (B,)) if spec.observation.discrete else torch.randn(B, spec.observation.shape[0])
    )
    h, c = torch.randn(B, L, H), torch.randn(B, L, H)
    is_init = torch.tensor([True, False, True, False, False, False])
    td = TensorDict(
        {"observation": obs, "recurrent_state_h": h, "recurrent_state_c": c, "is_init": is_init[:, None]}, [B]
    )
    mask = None
    if runtime.discrete:
        mask = torch.ones(B, 3, dtype=torch.bool)
        mask[1, 0] = mask[4, 1] = mask[4, 2] = False
        td[ACTION_MASK] = mask
    got = runtime.act(obs, state=(h, c), is_init=is_init, mask=mask, return_info=True)
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        out = runtime.core(td)
    assert torch.allclose(got.action.float(), out["action"].float(), atol=1e-5)
    assert torch.allclose(got.state[0], out["next", "recurrent_state_h"], atol=1e-6)
    assert torch.allclose(got.state[1], out["next", "recurrent_state_c"], atol=1e-6)
    if runtime.discrete:
        assert torch.allclose(got.info["action_value"], out["action_value"], atol=1e-5)
        assert got.action[4] == 0 and got.action[1] != 0  # the masks hold

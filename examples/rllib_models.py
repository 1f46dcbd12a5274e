"""The RLlib seed's custom models, built in TorchRL, as ``export_policy`` takes them.

Each builder returns ``(policy, observation_spec, action_spec, state_spec)``; none of them is
something the declarative spec describes, so ``export_policy`` writes exported programs:

- ``autoregressive``: RLlib's autoregressive action distribution, ``P(a1, a2) = P(a1) ·
  P(a2 | a1)``: a shared context, a head for ``a1``, a head for ``a2`` that reads the context and
  the sampled ``a1``; a composite action ``{"a1", "a2"}`` with per-head log-probs and the joint.
- ``parametric``: RLlib's parametric-actions model: a dict observation with ``cart`` and
  ``avail_actions`` (one embedding per action), ``action_mask``; logits = the intent vector ·
  each action's embedding, masked (``MaskedCategorical``: never a masked action).
- ``gru``: a recurrent Q-value policy on ``nn.GRU``; its step zeroes the state where ``is_init``
  with ``torch.where`` (TorchRL's ``GRUModule`` branches on ``is_init.any()``, which
  ``torch.export`` cannot capture).
- ``multi_discrete``: a head choosing several discrete values at once (``MultiCategorical``).

Run ``python -m examples.rllib_models DIR`` to write all four under ``DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tensordict.nn import (
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    TensorDictSequential,
)
from torch import nn
from torchrl.data import Categorical, Composite, MultiCategorical, Unbounded
from torchrl.modules import MLP, MaskedCategorical, ProbabilisticActor, QValueModule


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


class A2Logits(nn.Module):
    """``a2``'s logits from the context and the one-hot of the sampled ``a1``."""

    def __init__(self, context: int) -> None:
        super().__init__()
        self.net = MLP(in_features=context + 2, out_features=2, num_cells=[16])

    def forward(self, context: torch.Tensor, a1: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([context, nn.functional.one_hot(a1, 2).to(context.dtype)], -1))


class Total(nn.Module):
    def forward(self, lp1: torch.Tensor, lp2: torch.Tensor) -> torch.Tensor:
        return lp1 + lp2


def autoregressive(seed: int = 0):
    _seeded(seed)
    context = TensorDictModule(
        MLP(in_features=4, out_features=16, num_cells=[32]), in_keys=["observation"], out_keys=["context"]
    )
    head1 = TensorDictModule(nn.Linear(16, 2), in_keys=["context"], out_keys=["a1_logits"])
    a1 = ProbabilisticTensorDictModule(
        in_keys={"logits": "a1_logits"},
        out_keys=[("action", "a1")],
        distribution_class=torch.distributions.Categorical,
        return_log_prob=True,
        log_prob_key=("action", "a1_log_prob"),
    )
    head2 = TensorDictModule(A2Logits(16), in_keys=["context", ("action", "a1")], out_keys=["a2_logits"])
    a2 = ProbabilisticTensorDictModule(
        in_keys={"logits": "a2_logits"},
        out_keys=[("action", "a2")],
        distribution_class=torch.distributions.Categorical,
        return_log_prob=True,
        log_prob_key=("action", "a2_log_prob"),
    )
    joint = TensorDictModule(
        Total(), in_keys=[("action", "a1_log_prob"), ("action", "a2_log_prob")], out_keys=["action_log_prob"]
    )
    policy = TensorDictSequential(context, head1, a1, head2, a2, joint)
    action = Composite(a1=Categorical(2), a2=Categorical(2))
    return policy, Composite(observation=Unbounded(shape=(4,))), action, None


def joint_distribution(policy, observation: torch.Tensor) -> torch.Tensor:
    """The module's exact ``P(a1, a2)`` for one observation, ``[2, 2]``."""
    modules = policy.module
    with torch.no_grad():
        ctx = modules[0].module(observation)
        p1 = torch.softmax(modules[1].module(ctx), -1)
        out = torch.zeros(2, 2)
        for a1 in (0, 1):
            p2 = torch.softmax(modules[3].module(ctx, torch.tensor(a1)), -1)
            out[a1] = p1[a1] * p2
    return out


class ParametricLogits(nn.Module):
    """RLlib's ParametricActionsModel: an intent vector from ``cart``, one logit per available
    action = intent · that action's embedding."""

    def __init__(self, obs: int, embedding: int) -> None:
        super().__init__()
        self.intent = MLP(in_features=obs, out_features=embedding, num_cells=[32])

    def forward(self, cart: torch.Tensor, avail_actions: torch.Tensor) -> torch.Tensor:
        return (avail_actions * self.intent(cart).unsqueeze(-2)).sum(-1)


def parametric(seed: int = 0, n: int = 5, embedding: int = 3):
    _seeded(seed)
    logits = TensorDictModule(
        ParametricLogits(4, embedding), in_keys=["cart", "avail_actions"], out_keys=["logits"]
    )
    policy = ProbabilisticActor(
        logits,
        in_keys={"logits": "logits", "mask": "action_mask"},
        distribution_class=MaskedCategorical,
        return_log_prob=True,
        spec=Categorical(n),
    )
    obs = Composite(cart=Unbounded(shape=(4,)), avail_actions=Unbounded(shape=(n, embedding)))
    return policy, obs, Categorical(n), None


class GRUStep(nn.Module):
    """One GRU step, as TorchRL's ``GRUModule`` takes it outside recurrent mode: the state
    ``[B, layers, hidden]`` zeroed where ``is_init``, one step through ``nn.GRU``."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(inputs, hidden, batch_first=True)

    def forward(self, x: torch.Tensor, h: torch.Tensor, is_init: torch.Tensor):
        h = torch.where(is_init.reshape(-1, 1, 1), torch.zeros_like(h), h)
        y, h = self.gru(x.unsqueeze(1), h.transpose(0, 1).contiguous())
        return y.squeeze(1), h.transpose(0, 1)


def gru(seed: int = 0, hidden: int = 16):
    _seeded(seed)
    step = TensorDictModule(
        GRUStep(4, hidden),
        in_keys=["observation", "recurrent_state", "is_init"],
        out_keys=["features", ("next", "recurrent_state")],
    )
    head = TensorDictModule(
        MLP(in_features=hidden, out_features=2, num_cells=[16]),
        in_keys=["features"],
        out_keys=["action_value"],
    )
    policy = TensorDictSequential(step, head, QValueModule(spec=Categorical(2)))
    state = {"recurrent_state": Unbounded(shape=(1, hidden))}
    return policy, Composite(observation=Unbounded(shape=(4,))), Categorical(2), state


class MultiLogits(nn.Module):
    def __init__(self, nvec: list[int]) -> None:
        super().__init__()
        self.nvec = list(nvec)
        self.net = MLP(in_features=4, out_features=len(nvec) * max(nvec), num_cells=[32])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(*x.shape[:-1], len(self.nvec), max(self.nvec))


def _independent(logits: torch.Tensor):
    return torch.distributions.Independent(torch.distributions.Categorical(logits=logits), 1)


def multi_discrete(seed: int = 0, nvec: tuple[int, ...] = (3, 3, 3)):
    _seeded(seed)
    logits = TensorDictModule(MultiLogits(list(nvec)), in_keys=["observation"], out_keys=["logits"])
    sample = ProbabilisticTensorDictModule(
        in_keys=["logits"],
        out_keys=["action"],
        distribution_class=_independent,
        return_log_prob=True,
        log_prob_key="action_log_prob",
    )
    policy = ProbabilisticTensorDictSequential(logits, sample)
    return policy, Composite(observation=Unbounded(shape=(4,))), MultiCategorical(list(nvec)), None


EXAMPLES = {
    "autoregressive": autoregressive,
    "parametric": parametric,
    "gru": gru,
    "multi_discrete": multi_discrete,
}


def main(out: str) -> None:
    from service.sdk import export_policy

    for name, build in EXAMPLES.items():
        policy, obs, action, state = build()
        path = export_policy(
            policy, Path(out) / name, observation_spec=obs, action_spec=action, state_spec=state
        )
        print(f"{name}: {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "exported")

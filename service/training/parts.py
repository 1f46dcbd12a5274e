"""Multi-part actions for PPO: a ``MultiDiscrete``, ``Tuple`` or ``Dict`` action's heads — one
per part, independent or **autoregressive** (the RLlib seed's ``P(a2 | a1, obs)``: each head
reads the parts chosen before it) — in two forms built on the same modules:

- for training, ``PartsDistribution``: one torch distribution over the flat action vector the
  env takes (``envs.FlatActions``), so the ``Collector``, ``GAE`` and ``ClipPPOLoss`` see one
  ``"action"`` and one ``action_log_prob`` (the parts' log-probs summed);
- for serving, ``ServedParts``: the policy as the server's programs take it — each leaf of the
  action (``("action", leaf)``), each leaf's log-prob and the joint one — traced by
  ``registry.tracing`` under each exploration type: ``random`` samples every part in order,
  ``deterministic`` takes each part's mode in order.

A discrete part is a ``Categorical`` over logits; a box part TorchRL's ``TanhNormal`` within its
bounds. A head reads the shared trunk's features, and when autoregressive the one-hot of each
earlier discrete part and each earlier box part's value scaled to [-1, 1].
"""

from __future__ import annotations

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded
from torchrl.envs.utils import ExplorationType, exploration_type
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal

from service.envs import ActionPart, flat_action_space

CONTEXT = "parts_context"


class PartHeads(nn.Module):
    """The trunk (observation -> features) and one head per part; ``forward`` is the trunk."""

    def __init__(
        self,
        parts: list[ActionPart],
        in_features: int,
        num_cells: list[int],
        activation: type[nn.Module],
        autoregressive: bool,
    ) -> None:
        super().__init__()
        self.parts, self.autoregressive = parts, autoregressive
        width = num_cells[-1]
        self.trunk = MLP(
            in_features=in_features,
            out_features=width,
            num_cells=num_cells[:-1],
            activation_class=activation,
            activate_last_layer=True,
        )
        heads, before = [], 0
        for part in parts:
            out = part.n if part.discrete else 2 * part.width
            if autoregressive and before:
                heads.append(MLP(in_features=width + before, out_features=out, num_cells=[width]))
            else:
                heads.append(nn.Linear(width, out))
            before += part.n if part.discrete else part.width
        self.heads = nn.ModuleList(heads)
        self.scale = NormalParamExtractor()
        for i, part in enumerate(parts):
            if not part.discrete:
                self.register_buffer(f"low_{i}", torch.tensor(part.low, dtype=torch.float32))
                self.register_buffer(f"high_{i}", torch.tensor(part.high, dtype=torch.float32))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.trunk(observation)

    def dist(self, i: int, context: torch.Tensor, earlier: list[torch.Tensor]):
        """Part ``i``'s distribution given the features and the earlier parts' values."""
        part = self.parts[i]
        x = context
        if self.autoregressive and earlier:
            x = torch.cat([context, *(self._encode(j, v) for j, v in enumerate(earlier))], -1)
        params = self.heads[i](x)
        if part.discrete:
            return torch.distributions.Categorical(logits=params)
        loc, scale = self.scale(params)
        return TanhNormal(loc, scale, low=getattr(self, f"low_{i}"), high=getattr(self, f"high_{i}"))

    def _encode(self, j: int, value: torch.Tensor) -> torch.Tensor:
        part = self.parts[j]
        if part.discrete:
            return nn.functional.one_hot(value, part.n).to(torch.float32)
        low, high = getattr(self, f"low_{j}"), getattr(self, f"high_{j}")
        return 2 * (value - low) / (high - low) - 1

    def run(self, context: torch.Tensor, given: torch.Tensor | None = None, sample: bool = True):
        """Every part in order: the values (``given``'s, read from the flat vector, or sampled /
        each mode) and their log-probs. Returns ``(values, log_probs, dists)``."""
        values, log_probs, dists, at = [], [], [], 0
        for i, part in enumerate(self.parts):
            d = self.dist(i, context, values)
            if given is not None:
                chunk = given[..., at : at + part.width]
                v = chunk.squeeze(-1).round().to(torch.int64) if part.discrete else chunk
            elif part.discrete:
                v = d.sample() if sample else d.logits.argmax(-1)
            else:  # rsample: sample() runs under no_grad, which torch.export cannot take inline
                v = d.rsample() if sample else d.deterministic_sample
            values.append(v)
            log_probs.append(d.log_prob(v))
            dists.append(d)
            at += part.width
        return values, log_probs, dists


def flat(parts: list[ActionPart], values: list[torch.Tensor]) -> torch.Tensor:
    """The parts' values as the env's flat float vector ``[..., width]``."""
    pairs = zip(parts, values, strict=True)
    return torch.cat([v.to(torch.float32).unsqueeze(-1) if p.discrete else v for p, v in pairs], -1)


class PartsDistribution(torch.distributions.Distribution):
    """``P(a) = prod_i P(a_i | a_<i, obs)`` (independent heads: ``P(a_i | obs)``) over the flat
    action vector: what TorchRL's ``ProbabilisticActor`` samples from and ``ClipPPOLoss`` scores."""

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, context: torch.Tensor, heads: PartHeads) -> None:
        self.context, self.heads = context, heads
        super().__init__(batch_shape=context.shape[:-1], validate_args=False)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        if sample_shape:
            raise NotImplementedError("one sample per row")
        values, _, _ = self.heads.run(self.context)
        return flat(self.heads.parts, values)

    @property
    def deterministic_sample(self) -> torch.Tensor:
        """Each part's mode in order (an autoregressive head reads the earlier modes)."""
        values, _, _ = self.heads.run(self.context, sample=False)
        return flat(self.heads.parts, values)

    @property
    def mode(self) -> torch.Tensor:
        return self.deterministic_sample

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        _, log_probs, _ = self.heads.run(self.context, given=value)
        return torch.stack(log_probs, -1).sum(-1)

    def entropy(self) -> torch.Tensor:
        """The categorical parts' entropies given a sample of the earlier parts (exact for
        independent heads; a one-sample estimate of the chain's otherwise), a box part's the
        negative log-prob of its sample."""
        values, log_probs, dists = self.heads.run(self.context)
        terms = [
            d.entropy() if part.discrete else -lp
            for part, d, lp in zip(self.heads.parts, dists, log_probs, strict=True)
        ]
        return torch.stack(terms, -1).sum(-1)


def parts_actor(heads: PartHeads, observation_key: str = "observation") -> ProbabilisticActor:
    """The training policy: the trunk, then ``PartsDistribution`` writing the flat ``"action"``
    and its ``action_log_prob``."""
    space = flat_action_space(heads.parts)
    spec = Bounded(torch.as_tensor(space.low), torch.as_tensor(space.high))
    return ProbabilisticActor(
        TensorDictModule(heads, in_keys=[observation_key], out_keys=[CONTEXT]),
        in_keys={"context": CONTEXT},
        distribution_class=PartsDistribution,
        distribution_kwargs={"heads": heads},
        return_log_prob=True,
        spec=spec,
    )


class ServedParts(nn.Module):
    """The policy as served: ``observation -> (each leaf's action, each leaf's log-prob, the
    joint log-prob)``; a multi-discrete action (no leaves) ``-> (action, joint)``. Samples under
    ``RANDOM`` exploration, each part's mode otherwise (decided when traced)."""

    def __init__(self, heads: PartHeads) -> None:
        super().__init__()
        self.heads = heads
        self.leaves = list(dict.fromkeys(p.leaf for p in heads.parts))

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sample = exploration_type() == ExplorationType.RANDOM
        values, log_probs, _ = self.heads.run(self.heads(observation), sample=sample)
        actions, leaf_log_probs = [], []
        for leaf in self.leaves:
            mine = [i for i, p in enumerate(self.heads.parts) if p.leaf == leaf]
            multi = self.heads.parts[mine[0]].multi
            actions.append(torch.stack([values[i] for i in mine], -1) if multi else values[mine[0]])
            leaf_log_probs.append(torch.stack([log_probs[i] for i in mine], -1).sum(-1))
        joint = torch.stack(log_probs, -1).sum(-1)
        if self.leaves == [None]:
            return actions[0], joint
        return (*actions, *leaf_log_probs, joint)

    def out_keys(self) -> list:
        if self.leaves == [None]:
            return ["action", "action_log_prob"]
        return [
            *(("action", leaf) for leaf in self.leaves),
            *(("action", f"{leaf}_log_prob") for leaf in self.leaves),
            "action_log_prob",
        ]


def served_module(heads: PartHeads) -> TensorDictModule:
    """``ServedParts`` as the TensorDict module ``registry.tracing`` reads keys from."""
    served = ServedParts(heads)
    return TensorDictModule(served, in_keys=["observation"], out_keys=served.out_keys())

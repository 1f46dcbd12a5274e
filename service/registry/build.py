"""Turn a :class:`PolicySpec` into the TorchRL module it describes.

The built ``core`` module's ``state_dict`` is exactly what ``weights.safetensors`` holds.
Exploration modules (``EGreedyModule``, ``AdditiveGaussianModule``) are built next to it and
never persisted: their parameters come from each request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict.nn import TensorDictModule, TensorDictModuleBase, TensorDictSequential
from torch import nn
from torchrl.data import Bounded, Categorical
from torchrl.modules import (
    MLP,
    Actor,
    AdditiveGaussianModule,
    EGreedyModule,
    IndependentNormal,
    LSTMModule,
    MaskedCategorical,
    NormalParamExtractor,
    ProbabilisticActor,
    QValueModule,
    TanhNormal,
)

from service.registry.spec import Activation, PolicySpec

OBSERVATION = "observation"
FEATURES = "features"
ENCODED = "observation_encoded"
ACTION_MASK = "action_mask"

ACTIVATIONS: dict[Activation, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
}


class ScaledTanh(nn.Module):
    """Squash to ``[low, high]``: ``low + (tanh(x) + 1) / 2 * (high - low)``."""

    def __init__(self, low: torch.Tensor, high: torch.Tensor) -> None:
        super().__init__()
        # Not persistent: the bounds come from the spec, the weights file holds only weights.
        self.register_buffer("low", low.clone(), persistent=False)
        self.register_buffer("high", high.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low + (torch.tanh(x) + 1.0) * 0.5 * (self.high - self.low)


class OneHot(nn.Module):
    """An integer observation as a one-hot float vector (RLlib's preprocessor for Discrete)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x.long(), self.n).float()  # [...] -> [..., n]


@dataclass
class BuiltPolicy:
    """The modules of one policy.

    Attributes:
        core: the policy (deterministic given the exploration type); its state_dict is the weights.
        explore: the exploration module applied after ``core`` in ``random`` mode, if any.
        lstm: the recurrent module in front of the head, if the spec is recurrent.
        action_spec: the TorchRL spec of the action space.
    """

    core: TensorDictSequential
    explore: TensorDictModuleBase | None
    lstm: LSTMModule | None
    action_spec: Bounded | Categorical


def action_spec_of(spec: PolicySpec, device: torch.device | str = "cpu") -> Bounded | Categorical:
    if spec.action.type == "discrete":
        return Categorical(spec.action.n, device=device)
    low = torch.tensor(spec.action.low, dtype=torch.float32, device=device)
    high = torch.tensor(spec.action.high, dtype=torch.float32, device=device)
    return Bounded(low, high, device=device)


def _mlp(spec: PolicySpec, in_features: int, out_features: int) -> MLP:
    return MLP(
        in_features=in_features,
        out_features=out_features,
        num_cells=list(spec.network.num_cells),
        activation_class=ACTIVATIONS[spec.network.activation],
    )


def build_policy(
    spec: PolicySpec, device: torch.device | str = "cpu", action_mask: bool = False
) -> BuiltPolicy:
    """Build the TorchRL policy described by ``spec``.

    With ``action_mask`` (discrete policies), the modules read a ``[..., n]`` bool
    ``"action_mask"`` and never pick a masked action: ``QValueModule`` and ``EGreedyModule`` with
    ``action_mask_key``, a ``MaskedCategorical`` for categorical policies. The parameters (and so
    the ``state_dict``) are the same either way.

    Examples:
        >>> from service.registry.spec import PolicySpec
        >>> spec = PolicySpec.model_validate({"kind": "qvalue", "observation": {"shape": [4]},
        ...     "action": {"type": "discrete", "n": 2}})
        >>> built = build_policy(spec)
        >>> sorted(built.core.state_dict())[:2]
        ['module.0.module.0.bias', 'module.0.module.0.weight']
    """
    a_spec = action_spec_of(spec, device)
    modules: list[TensorDictModuleBase] = []
    lstm = None
    in_key, in_features = OBSERVATION, spec.observation.dim
    if spec.observation.discrete:
        modules.append(
            TensorDictModule(OneHot(spec.observation.n), in_keys=[OBSERVATION], out_keys=[ENCODED])
        )
        in_key = ENCODED
    if spec.recurrent is not None:
        lstm = LSTMModule(
            input_size=in_features,
            hidden_size=spec.recurrent.hidden_size,
            num_layers=spec.recurrent.num_layers,
            in_key=in_key,
            out_key=FEATURES,
            device=device,
        )
        modules.append(lstm)
        in_key, in_features = FEATURES, spec.recurrent.hidden_size

    explore: TensorDictModuleBase | None = None
    if spec.kind == "qvalue":
        net = _mlp(spec, in_features, spec.action.n)
        modules.append(TensorDictModule(net, in_keys=[in_key], out_keys=["action_value"]))
        mask_key = ACTION_MASK if action_mask else None
        modules.append(QValueModule(action_space="categorical", spec=a_spec, action_mask_key=mask_key))
        explore = EGreedyModule(
            a_spec,
            eps_init=spec.exploration.epsilon,
            eps_end=spec.exploration.epsilon,
            action_mask_key=mask_key,
        )
    elif spec.kind == "actor":
        net = nn.Sequential(
            _mlp(spec, in_features, spec.action.shape[0]),
            ScaledTanh(a_spec.space.low, a_spec.space.high),
        )
        modules.append(Actor(net, in_keys=[in_key], spec=a_spec))
        explore = AdditiveGaussianModule(
            spec=a_spec,
            sigma_init=spec.exploration.noise_std,
            sigma_end=spec.exploration.noise_std,
            device=device,
        )
    else:
        modules.append(_probabilistic_head(spec, in_key, in_features, a_spec, action_mask))

    core = TensorDictSequential(*modules).to(device)
    if explore is not None:
        explore = explore.to(device)
    return BuiltPolicy(core=core, explore=explore, lstm=lstm, action_spec=a_spec)


def _probabilistic_head(
    spec: PolicySpec, in_key: str, in_features: int, a_spec: Bounded | Categorical, action_mask: bool
) -> ProbabilisticActor:
    if spec.distribution == "categorical":
        net = _mlp(spec, in_features, spec.action.n)
        params = TensorDictModule(net, in_keys=[in_key], out_keys=["logits"])
        if action_mask:  # renormalised over the allowed actions, in every exploration mode
            return ProbabilisticActor(
                params,
                in_keys={"logits": "logits", "mask": ACTION_MASK},
                distribution_class=MaskedCategorical,
                return_log_prob=True,
                spec=a_spec,
            )
        return ProbabilisticActor(
            params,
            in_keys=["logits"],
            distribution_class=torch.distributions.Categorical,
            return_log_prob=True,
            spec=a_spec,
        )
    dim = spec.action.shape[0]
    net = nn.Sequential(_mlp(spec, in_features, 2 * dim), NormalParamExtractor())
    params = TensorDictModule(net, in_keys=[in_key], out_keys=["loc", "scale"])
    if spec.distribution == "tanh_normal":
        return ProbabilisticActor(
            params,
            in_keys=["loc", "scale"],
            distribution_class=TanhNormal,
            distribution_kwargs={"low": a_spec.space.low, "high": a_spec.space.high},
            return_log_prob=True,
            spec=a_spec,
        )
    # normal: unbounded samples are projected into the box (safe=True); log_prob is of the sample.
    return ProbabilisticActor(
        params,
        in_keys=["loc", "scale"],
        distribution_class=IndependentNormal,
        return_log_prob=True,
        spec=a_spec,
        safe=True,
    )


class WeightsMismatch(ValueError):
    """The weights file does not fit the module its spec describes."""


def load_weights(built: BuiltPolicy, data: bytes) -> None:
    """Load safetensors ``data`` into ``built.core`` after checking every key, shape and value.

    Raises:
        WeightsMismatch: with a message naming the missing, unexpected or misshaped tensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise WeightsMismatch(f"weights are not a valid safetensors file: {exc}") from None
    expected = built.core.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}")
    for key in sorted(set(expected) & set(tensors)):
        want, got = expected[key], tensors[key]
        if tuple(want.shape) != tuple(got.shape):
            problems.append(f"{key} has shape {list(got.shape)}, the spec needs {list(want.shape)}")
        elif got.dtype != want.dtype:
            problems.append(f"{key} has dtype {got.dtype}, the spec needs {want.dtype}")
        elif got.is_floating_point() and not torch.isfinite(got).all():
            problems.append(f"{key} holds non-finite values")
    if problems:
        raise WeightsMismatch("weights do not match the spec: " + "; ".join(problems[:8]))
    built.core.load_state_dict(tensors, strict=True)


def weights_bytes(built: BuiltPolicy) -> bytes:
    """Serialize ``built.core``'s state_dict as safetensors."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in built.core.state_dict().items()}
    return save(state)

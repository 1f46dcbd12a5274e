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
    ConvNet,
    EGreedyModule,
    IndependentNormal,
    LSTMModule,
    MaskedCategorical,
    NormalParamExtractor,
    ProbabilisticActor,
    QValueModule,
    TanhNormal,
)

from service.registry.preprocess import preprocessed_shape
from service.registry.spec import Activation, DictObservationSpec, PolicySpec

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


class _Box(nn.Module):
    """A module that knows the action box ``[low, high]``. Not persistent: the bounds come from
    the spec, the weights file holds only weights."""

    def __init__(self, low: torch.Tensor, high: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("low", low.clone(), persistent=False)
        self.register_buffer("high", high.clone(), persistent=False)


class ScaledTanh(_Box):
    """Squash to ``[low, high]``: ``low + (tanh(x) + 1) / 2 * (high - low)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low + (torch.tanh(x) + 1.0) * 0.5 * (self.high - self.low)


class Clip(_Box):
    """Clamp into ``[low, high]`` (an actor exported without a squashing head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(x, self.high), self.low)


class OneHot(nn.Module):
    """An integer observation as a one-hot float vector (RLlib's preprocessor for Discrete)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x.long(), self.n).float()  # [...] -> [..., n]


class ConcatEntries(nn.Module):
    """The entries of a dict observation as one float vector: each encoded (one-hot for a
    discrete entry, as is for a vector) and concatenated in the spec's order, as RLlib's
    preprocessor flattens a Dict space. No parameters."""

    def __init__(self, encoders: list[nn.Module]) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)

    def forward(self, *entries: torch.Tensor) -> torch.Tensor:
        return torch.cat([enc(x).float() for enc, x in zip(self.encoders, entries, strict=True)], -1)


_AGGREGATORS = {
    "flatten": {},  # ConvNet's default SquashDims
    "adaptive_avg_pool": {
        "aggregator_class": nn.AdaptiveAvgPool2d,
        "aggregator_kwargs": {"output_size": (1, 1)},
        "squeeze_output": True,
    },
}


def observation_encoder(spec: PolicySpec, key: str = OBSERVATION) -> tuple[TensorDictModule | None, int]:
    """The module turning the (preprocessed) observation into the vector the network reads
    (writing ``"observation_encoded"``), or None when it already is that vector; and the
    vector's size.

    Raises:
        ValueError: when the preprocessed observation does not fit the network (a ConvNet reads
            ``[C, H, W]``, an MLP a vector).
    """
    obs = spec.observation
    if obs.discrete:
        return TensorDictModule(OneHot(obs.n), in_keys=[OBSERVATION], out_keys=[ENCODED]), obs.n
    if isinstance(obs, DictObservationSpec):
        encoders = [OneHot(e.n) if e.discrete else nn.Identity() for e in obs.entries.values()]
        module = TensorDictModule(ConcatEntries(encoders), in_keys=list(obs.entries), out_keys=[ENCODED])
        return module, obs.dim
    shape, dtype = preprocessed_shape(obs, spec.preprocess)
    conv = spec.network.conv
    if conv is None:
        if len(shape) != 1 or dtype != "float32":
            raise ValueError(
                f"the network reads a float32 vector, the preprocessed observation is {dtype} {shape}: "
                "add network.conv for images, or preprocess to a float vector"
            )
        return None, shape[0]
    if len(shape) != 3 or dtype != "float32":
        raise ValueError(
            f"network.conv reads a float32 [C, H, W] image, the preprocessed observation is {dtype} "
            f"{shape}: preprocess with to_tensor_image (HWC -> CHW float) first"
        )
    net = ConvNet(
        in_features=shape[0],
        num_cells=list(conv.num_cells),
        kernel_sizes=conv.kernel_sizes,
        strides=conv.strides,
        paddings=conv.paddings,
        activation_class=ACTIVATIONS[conv.activation],
        **_AGGREGATORS[conv.aggregator],
    )
    with torch.no_grad():
        try:
            features = net(torch.zeros(1, *shape)).shape[-1]
        except RuntimeError as exc:  # e.g. kernels larger than the image
            raise ValueError(f"network.conv does not fit a {shape} image: {exc}") from None
    return TensorDictModule(net, in_keys=[key], out_keys=[ENCODED]), features


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
    spec: PolicySpec,
    device: torch.device | str = "cpu",
    action_mask: bool = False,
    observation_key: str = OBSERVATION,
) -> BuiltPolicy:
    """Build the TorchRL policy described by ``spec``.

    With ``action_mask`` (discrete policies), the modules read a ``[..., n]`` bool
    ``"action_mask"`` and never pick a masked action: ``QValueModule`` and ``EGreedyModule`` with
    ``action_mask_key``, a ``MaskedCategorical`` for categorical policies. The parameters (and so
    the ``state_dict``) are the same either way. ``observation_key`` is where a tensor
    observation is read once preprocessed (training keeps the stored frame under
    ``"observation"`` and preprocesses into another key); the state_dict does not depend on it.

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
    in_key = observation_key  # the network reads it when there is no encoder
    encoder, in_features = observation_encoder(spec, observation_key)
    if encoder is not None:
        modules.append(encoder)
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
        low, high = a_spec.space.low, a_spec.space.high
        head = {
            "scaled_tanh": [ScaledTanh(low, high)],
            "tanh": [nn.Tanh(), Clip(low, high)],
            "clip": [Clip(low, high)],
        }[spec.squash]
        net = nn.Sequential(_mlp(spec, in_features, spec.action.shape[0]), *head)
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
    return state_bytes(built.core.state_dict())


def state_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A state_dict as safetensors (CPU, contiguous copies)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})

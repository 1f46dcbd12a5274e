"""``export_policy``: any TorchRL policy as a version the server serves — the declarative
``policy.json`` + ``weights.safetensors`` when the module is built from the library's standard
blocks (below), else ``policy.json`` + exported programs (``sdk/program_export``).

The module is read, not assumed: its parts in order (an optional ``ConvNet``, an optional
``LSTMModule``, then a head: ``MLP`` + ``QValueModule``, an ``Actor`` over an ``MLP``, or a
``ProbabilisticActor``), each part's sizes, activation classes and settings. From them a
:class:`PolicySpec` is written, the server's own module is built from it, and the user's
tensors are copied into it layer by layer. Then both modules are run on the same random inputs
(two steps, carrying the recurrent state): if the server's module would answer anything
differently, nothing is written and ``ValueError`` says so. Exploration modules are dropped,
their parameters kept as the spec's exploration defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, TensorDictModuleBase, TensorDictSequential
from torch import nn
from torchrl.data import Binary, Bounded, Categorical, MultiCategorical, OneHot, TensorSpec
from torchrl.envs import (
    CatFrames,
    Compose,
    DoubleToFloat,
    InitTracker,
    ObservationNorm,
    RewardScaling,
    RewardSum,
    StepCounter,
    TensorDictPrimer,
    ToTensorImage,
)
from torchrl.envs import GrayScale as TorchRLGrayScale
from torchrl.envs import Resize as TorchRLResize
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import (
    MLP,
    AdditiveGaussianModule,
    ConvNet,
    EGreedyModule,
    IndependentNormal,
    LSTMModule,
    MaskedCategorical,
    NormalParamExtractor,
    QValueModule,
    TanhNormal,
    set_recurrent_mode,
)
from torchrl.modules.models.utils import SquashDims

from service.registry.build import ACTIVATIONS, Clip, ScaledTanh, build_policy, weights_bytes
from service.registry.spec import ObservationSpec, PolicySpec

SUPPORTED = (
    "a TensorDictSequential of: an optional TensorDictModule(ConvNet), an optional LSTMModule, "
    "then a head: TensorDictModule(MLP) + QValueModule (or QValueActor); Actor(MLP) or "
    "Actor(Sequential(MLP, Tanh)); ProbabilisticActor over TensorDictModule(Sequential(MLP, "
    "NormalParamExtractor)) with Normal / IndependentNormal / TanhNormal, or over "
    "TensorDictModule(MLP) logits with Categorical / MaskedCategorical. Exploration modules "
    "(EGreedyModule, AdditiveGaussianModule) are dropped. MLP activations: "
    + ", ".join(c.__name__ for c in ACTIVATIONS.values())
)
_ACTIVATION_NAMES = {cls: name for name, cls in ACTIVATIONS.items()}
# env transforms that do not touch the observation a policy reads
_NOT_OBSERVATION = (StepCounter, InitTracker, RewardScaling, RewardSum, TensorDictPrimer, DoubleToFloat)


def _refuse(what: str, why: str) -> ValueError:
    return ValueError(f"cannot export {what}: {why}. Supported: {SUPPORTED}")


# -- reading the module ----------------------------------------------------------------------
def _leaves(module: nn.Module) -> list[nn.Module]:
    """The TensorDict modules of a policy in call order (sequences flattened)."""
    if isinstance(module, TensorDictSequential):
        return [leaf for m in module.module for leaf in _leaves(m)]
    return [module]


def _read_mlp(net: nn.Module, where: str) -> dict[str, Any]:
    if not isinstance(net, nn.Sequential):
        raise _refuse(where, f"expected an MLP, found {type(net).__name__}")
    linears = [m for m in net if isinstance(m, nn.Linear)]
    others = [m for m in net if not isinstance(m, nn.Linear)]
    if not linears or not isinstance(list(net)[-1], nn.Linear):
        raise _refuse(where, "an MLP must end with a Linear layer (no activation or norm after it)")
    if any(isinstance(m, nn.LazyLinear) for m in linears):
        raise _refuse(where, "the MLP has lazy layers: run one forward pass first to materialise them")
    if any(m.bias is None for m in linears):
        raise _refuse(where, "Linear layers must have a bias")
    kinds = {type(m) for m in others}
    if (
        len(others) != len(linears) - 1
        or len(kinds) > 1
        or (kinds and next(iter(kinds)) not in _ACTIVATION_NAMES)
    ):
        found = sorted({type(m).__name__ for m in others})
        raise _refuse(where, f"an MLP alternates Linear and one activation class; found {found}")
    layers = list(net)  # (slicing an MLP would construct a new MLP)
    for a, b in zip(layers[:-1:2], layers[1::2], strict=True):
        if not isinstance(a, nn.Linear) or isinstance(b, nn.Linear):
            raise _refuse(where, "an MLP alternates Linear and activation layers")
    activation = _ACTIVATION_NAMES[next(iter(kinds))] if kinds else "relu"
    if activation == "leaky_relu" and others and others[0].negative_slope != 0.01:
        raise _refuse(where, "LeakyReLU with a non-default slope")
    if activation == "elu" and others and others[0].alpha != 1.0:
        raise _refuse(where, "ELU with a non-default alpha")
    return {
        "in": linears[0].in_features,
        "out": linears[-1].out_features,
        "num_cells": [m.out_features for m in linears[:-1]],
        "activation": activation,
        "layers": linears,
    }


def _read_conv(net: nn.Module, where: str) -> dict[str, Any]:
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    if any(isinstance(m, nn.LazyConv2d) for m in net) or any(
        isinstance(p, nn.parameter.UninitializedParameter) for p in net.parameters()
    ):
        raise _refuse(where, "the ConvNet has lazy layers: run one forward pass first to materialise them")
    tail = [m for m in net if not isinstance(m, nn.Conv2d)]
    if isinstance(net[-1], SquashDims):
        aggregator, tail = "flatten", tail[:-1]
    elif (
        len(net) >= 2
        and type(net[-1]).__name__ == "Squeeze2dLayer"
        and isinstance(net[-2], nn.AdaptiveAvgPool2d)
        and tuple(torch.nn.modules.utils._pair(net[-2].output_size)) == (1, 1)
    ):
        aggregator, tail = "adaptive_avg_pool", tail[:-2]
    else:
        raise _refuse(where, "a ConvNet ends with SquashDims or AdaptiveAvgPool2d((1, 1)) + squeeze_output")
    kinds = {type(m) for m in tail}
    if len(tail) != len(convs) or len(kinds) != 1 or next(iter(kinds)) not in _ACTIVATION_NAMES:
        raise _refuse(
            where,
            f"a ConvNet alternates Conv2d and one activation; found {sorted(k.__name__ for k in kinds)}",
        )
    for c in convs:
        square = len(set(c.kernel_size)) == 1 and len(set(c.stride)) == 1 and len(set(c.padding)) == 1
        if not square or c.dilation != (1, 1) or c.groups != 1 or c.bias is None or c.padding_mode != "zeros":
            raise _refuse(
                where, f"{c} (square kernels, strides and paddings, no dilation or groups, with bias)"
            )
    return {
        "in_channels": convs[0].in_channels,
        "spec": {
            "num_cells": [c.out_channels for c in convs],
            "kernel_sizes": [c.kernel_size[0] for c in convs],
            "strides": [c.stride[0] for c in convs],
            "paddings": [c.padding[0] for c in convs],
            "activation": _ACTIVATION_NAMES[next(iter(kinds))],
            "aggregator": aggregator,
        },
        "layers": convs,
    }


def _read_lstm(module: LSTMModule) -> dict[str, Any]:
    lstm = module.lstm
    if lstm.bidirectional or lstm.proj_size or not lstm.bias or lstm.dropout:
        raise _refuse("the LSTMModule", "bidirectional, projected, bias-free or dropout LSTMs")
    return {"input_size": lstm.input_size, "hidden_size": lstm.hidden_size, "num_layers": lstm.num_layers}


def _read_head(parts: list[nn.Module], action: TensorSpec) -> dict[str, Any]:
    """The head's kind, MLP and distribution (and what the spec needs of them)."""
    names = [type(p).__name__ for p in parts]
    if len(parts) == 2 and isinstance(parts[1], QValueModule):
        mlp = _read_mlp(parts[0].module, "the Q-value network")
        return {"kind": "qvalue", "mlp": mlp}
    if len(parts) == 2 and hasattr(parts[1], "distribution_class"):
        dist = parts[1].distribution_class
        kwargs = dict(parts[1].distribution_kwargs or {})
        net = parts[0].module
        if dist in (MaskedCategorical, torch.distributions.Categorical):
            return {
                "kind": "probabilistic",
                "distribution": "categorical",
                "mlp": _read_mlp(net, "the logits network"),
            }
        if not (
            isinstance(net, nn.Sequential) and len(net) == 2 and isinstance(net[1], NormalParamExtractor)
        ):
            raise _refuse(
                "the ProbabilisticActor", "a Normal-family head reads Sequential(MLP, NormalParamExtractor)"
            )
        mlp = _read_mlp(net[0], "the ProbabilisticActor's MLP")
        if dist in (torch.distributions.Normal, IndependentNormal):
            return {"kind": "probabilistic", "distribution": "normal", "mlp": mlp}
        if dist is TanhNormal:
            low = torch.as_tensor(kwargs.get("low", -1.0), dtype=torch.float32)
            high = torch.as_tensor(kwargs.get("high", 1.0), dtype=torch.float32)
            if not isinstance(action, Bounded) or not (
                torch.allclose(low.expand_as(action.space.low), action.space.low)
                and torch.allclose(high.expand_as(action.space.high), action.space.high)
            ):
                raise _refuse("the TanhNormal", "its low/high must be the action spec's bounds")
            return {"kind": "probabilistic", "distribution": "tanh_normal", "mlp": mlp}
        raise _refuse("the ProbabilisticActor", f"distribution {dist.__name__}")
    if len(parts) == 1 and isinstance(parts[0], TensorDictModule):
        net = parts[0].module
        if isinstance(net, nn.Sequential) and len(net) >= 2 and isinstance(net[0], MLP):
            mlp, tail = _read_mlp(net[0], "the actor's MLP"), list(net[1:])
        else:
            mlp, tail = _read_mlp(net, "the actor's MLP"), []
        if not tail:
            squash = "clip"
        elif len(tail) == 1 and isinstance(tail[0], nn.Tanh):
            squash = "tanh"
        elif len(tail) == 1 and isinstance(tail[0], ScaledTanh):
            squash = "scaled_tanh"
        elif len(tail) == 1 and isinstance(tail[0], Clip):
            squash = "clip"
        else:
            raise _refuse("the Actor", f"an output layer {[type(t).__name__ for t in tail]}")
        return {"kind": "actor", "mlp": mlp, "squash": squash}
    raise _refuse(f"a head made of {names}", "unrecognised head")


# -- observation, action, preprocessing ------------------------------------------------------
def _spec_json_of(spec: TensorSpec | dict, what: str) -> dict[str, Any]:
    if isinstance(spec, dict):
        return spec
    if isinstance(spec, MultiCategorical):
        raise _refuse(f"{what} spec MultiCategorical", "one discrete value (or a vector)")
    if what == "action":
        if isinstance(spec, (Categorical, OneHot)):
            return {"type": "discrete", "n": int(spec.space.n)}
        if isinstance(spec, Bounded):
            return {
                "type": "box",
                "shape": list(spec.shape),
                "low": spec.space.low.reshape(-1).tolist(),
                "high": spec.space.high.reshape(-1).tolist(),
            }
        raise _refuse(f"action spec {type(spec).__name__}", "actions are Categorical/OneHot or Bounded")
    if isinstance(spec, Categorical):
        return {"type": "discrete", "n": int(spec.space.n)}
    dtype = {torch.uint8: "uint8", torch.float32: "float32", torch.float64: "float32"}.get(spec.dtype)
    if dtype is None or isinstance(spec, (Binary, OneHot)):
        raise _refuse(
            f"observation spec {type(spec).__name__} ({spec.dtype})",
            "observations are float or uint8 tensors",
        )
    return {"shape": list(spec.shape), "dtype": dtype}


def _preprocess_of(env: Any, key: Any) -> list[dict[str, Any]]:
    transforms = getattr(env, "transform", None)
    if transforms is None:
        return []
    items = list(transforms) if isinstance(transforms, Compose) else [transforms]
    out: list[dict[str, Any]] = []
    known = (ToTensorImage, TorchRLGrayScale, TorchRLResize, ObservationNorm, CatFrames)
    for t in items:
        if isinstance(t, _NOT_OBSERVATION):
            continue
        if not isinstance(t, known):
            if key in t.in_keys or key in t.out_keys:
                raise _refuse(
                    f"transform {type(t).__name__}",
                    "observation transforms: ToTensorImage, GrayScale, Resize, ObservationNorm, CatFrames",
                )
            continue  # e.g. ActionMask: not the observation
        if list(t.in_keys) != [key] or list(t.out_keys) != [key]:
            raise _refuse(
                f"transform {type(t).__name__} on {list(t.in_keys)} -> {list(t.out_keys)}",
                f"preprocessing transforms read and write the policy's key {key!r} only",
            )
        if isinstance(t, ToTensorImage):
            if t.unsqueeze or t.shape_tolerant or t.dtype not in (torch.float32, torch.uint8):
                raise _refuse("ToTensorImage", "unsqueeze=False, shape_tolerant=False, float32 or uint8")
            dtype = str(t.dtype).removeprefix("torch.")
            out.append({"type": "to_tensor_image", "from_int": t.from_int, "dtype": dtype})
        elif isinstance(t, TorchRLGrayScale):
            out.append({"type": "grayscale"})
        elif isinstance(t, TorchRLResize):
            interpolation = str(getattr(t.interpolation, "value", t.interpolation))
            out.append({"type": "resize", "w": int(t.w), "h": int(t.h), "interpolation": interpolation})
        elif isinstance(t, ObservationNorm):
            if not t.initialized:
                raise _refuse("ObservationNorm", "its loc and scale are not initialised (call init_stats)")
            out.append(
                {
                    "type": "observation_norm",
                    "loc": t.loc.tolist(),
                    "scale": t.scale.tolist(),
                    "standard_normal": bool(t.standard_normal),
                }
            )
        else:  # CatFrames
            if t.padding != "same":
                raise _refuse("CatFrames", "padding='same'")
            out.append({"type": "cat_frames", "N": int(t.N), "dim": int(t.dim)})
    return out


# -- export ----------------------------------------------------------------------------------
FORMS = ("auto", "declarative", "program")


def export_policy(
    policy: TensorDictModuleBase,
    path: str | os.PathLike,
    *,
    env: Any = None,
    observation_spec: TensorSpec | dict | None = None,
    action_spec: TensorSpec | dict | None = None,
    env_id: str | None = None,
    state_spec: dict | None = None,
    form: str = "auto",
) -> Path:
    """Write ``policy`` as a servable version into the directory ``path``: ``policy.json`` and
    ``weights.safetensors`` when the declarative spec describes it (``SUPPORTED``), else
    ``policy.json`` and one PT2 archive per exploration mode (``sdk/program_export``).

    Args:
        policy: a TorchRL policy; exploration modules are dropped from the declarative form.
        env: a TorchRL env the policy acts in: its observation and action specs (and, for the
            declarative form, its observation transforms as ``preprocess``; a program reads the
            observation as the env's transforms leave it, recurrent state primers included).
        observation_spec, action_spec: TorchRL specs or policy.json dicts, instead of ``env``'s.
        env_id: the allow-listed env id the policy plays (rollouts), if any.
        state_spec: a program's recurrent state shapes by key, where no env primer gives them.
        form: ``auto`` (declarative when it can), ``declarative`` or ``program``.

    Raises:
        ValueError: naming what cannot be represented in either form, or saying how the served
            version would differ from the module; nothing is written then.
    """
    if form not in FORMS:
        raise ValueError(f"form {form!r}: one of {list(FORMS)}")
    reason = None
    if form != "program":
        try:
            return _export_declarative(
                policy,
                path,
                env=env,
                observation_spec=observation_spec,
                action_spec=action_spec,
                env_id=env_id,
            )
        except ValueError as exc:
            if form == "declarative":
                raise
            reason = str(exc)
    from service.sdk.program_export import export_programs, write_program_policy

    obs = observation_spec if observation_spec is not None else getattr(env, "observation_spec", None)
    act = action_spec if action_spec is not None else getattr(env, "action_spec", None)
    if obs is None or act is None:
        raise ValueError("no observation or action spec: pass env= or observation_spec= and action_spec=")
    try:
        spec_json, files = export_programs(policy, obs, act, state_spec=state_spec, env_id=env_id)
    except ValueError as exc:
        if reason is None:
            raise
        raise ValueError(f"{reason}\n... and as an exported program: {exc}") from None
    return write_program_policy(path, spec_json, files)


def _export_declarative(
    policy: TensorDictModuleBase,
    path: str | os.PathLike,
    *,
    env: Any = None,
    observation_spec: TensorSpec | dict | None = None,
    action_spec: TensorSpec | dict | None = None,
    env_id: str | None = None,
) -> Path:
    """The declarative form (``SUPPORTED``), or ``ValueError``."""
    leaves = _leaves(policy)
    exploration: dict[str, float] = {}
    kept = []
    for m in leaves:
        if isinstance(m, EGreedyModule):
            exploration["epsilon"] = float(m.eps)
        elif isinstance(m, AdditiveGaussianModule):
            exploration["noise_std"] = float(m.sigma)
        else:
            kept.append(m)
    if not kept:
        raise _refuse("an empty policy", "no modules")
    conv = lstm = None
    i = 0
    if isinstance(kept[0], TensorDictModule) and isinstance(kept[0].module, ConvNet):
        conv, i = kept[0], 1
    if i < len(kept) and isinstance(kept[i], LSTMModule):
        lstm, i = kept[i], i + 1
    first = kept[0]
    obs_key = first.in_keys[0]

    if action_spec is None:
        action_spec = getattr(env, "action_spec", None) if env is not None else None
        if action_spec is None:
            action_spec = getattr(kept[-1], "spec", None)
    if action_spec is None:
        raise ValueError("no action spec: pass env= or action_spec=")
    if isinstance(action_spec, TensorSpec) and not isinstance(action_spec, (Categorical, OneHot, Bounded)):
        action_spec = getattr(action_spec, "get", lambda k: action_spec)("action")
    head = _read_head(kept[i:], action_spec if isinstance(action_spec, TensorSpec) else Bounded(0, 1, (1,)))
    preprocess: list[dict[str, Any]] = []
    if observation_spec is None:
        if env is None:
            raise ValueError("no observation spec: pass env= or observation_spec=")
        base = getattr(env, "base_env", env)
        observation_spec = base.observation_spec[obs_key]
        preprocess = _preprocess_of(env, obs_key)

    mlp = head["mlp"]
    network: dict[str, Any] = {"num_cells": mlp["num_cells"], "activation": mlp["activation"]}
    conv_read = None
    if conv is not None:
        conv_read = _read_conv(conv.module, "the ConvNet")
        network["conv"] = conv_read["spec"]
    spec_json: dict[str, Any] = {
        "kind": head["kind"],
        "observation": _spec_json_of(observation_spec, "observation"),
        "action": _spec_json_of(action_spec, "action"),
        "preprocess": preprocess,
        "network": network,
        "env_id": env_id,
    }
    if lstm is not None:
        read = _read_lstm(lstm)
        spec_json["recurrent"] = {
            "type": "lstm",
            "hidden_size": read["hidden_size"],
            "num_layers": read["num_layers"],
        }
    if "distribution" in head:
        spec_json["distribution"] = head["distribution"]
    if "squash" in head:
        spec_json["squash"] = head["squash"]
    if exploration:
        spec_json["exploration"] = exploration
    try:
        spec = PolicySpec.model_validate(spec_json)
        built = build_policy(spec)
    except ValueError as exc:
        raise ValueError(f"the policy's parts do not make a servable spec: {exc}") from None

    _copy_weights(built, conv_read, lstm, mlp)
    _check_same_answers(policy, kept, built, spec, obs_key, lstm)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=1))
    (out / "weights.safetensors").write_bytes(weights_bytes(built))
    return out


def _copy_weights(built, conv_read, lstm, mlp) -> None:
    """The user's tensors into the server's module, layer by layer (shapes checked)."""
    ours = [m for m in built.core.modules()]
    our_convs = [m for m in ours if isinstance(m, nn.Conv2d)]
    our_linears = [m for m in ours if isinstance(m, nn.Linear)]
    pairs: list[tuple[nn.Module, nn.Module]] = []
    if conv_read is not None:
        pairs += list(zip(our_convs, conv_read["layers"], strict=True))
    pairs += list(zip(our_linears, mlp["layers"], strict=True))
    with torch.no_grad():
        for mine, theirs in pairs:
            if mine.weight.shape != theirs.weight.shape:
                raise ValueError(
                    f"layer {theirs} does not fit the spec's {mine}: the parts' sizes do not chain "
                    "(e.g. the MLP's input is not the ConvNet's or the LSTM's output)"
                )
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
        if lstm is not None:
            if built.lstm.lstm.input_size != lstm.lstm.input_size:
                raise ValueError(
                    f"the LSTM reads {lstm.lstm.input_size} features, the spec's feeds it "
                    f"{built.lstm.lstm.input_size}"
                )
            built.lstm.lstm.load_state_dict(lstm.lstm.state_dict())


def _check_same_answers(policy, kept, built, spec: PolicySpec, obs_key, lstm) -> None:
    """Run the user's modules and the server's on the same random (preprocessed) inputs, two
    steps carrying the recurrent state; refuse when any answer differs."""
    from service.registry.preprocess import preprocessed_shape

    if not isinstance(spec.observation, ObservationSpec):
        raise ValueError("export reads tensor observations only (not discrete or dict)")
    # the network's input after the spec's preprocessing (cat_frames included)
    shape, _ = preprocessed_shape(spec.observation, spec.preprocess)
    g = torch.Generator().manual_seed(0)
    batch = 5
    theirs = TensorDictSequential(*kept) if len(kept) > 1 else kept[0]
    state_theirs = state_ours = None
    for step in range(2):
        x = torch.randn(batch, *shape, generator=g)
        td_t = TensorDict({obs_key: x}, batch_size=[batch])
        td_o = TensorDict({"observation": x}, batch_size=[batch])
        if lstm is not None:
            init = torch.full((batch, 1), step == 0, dtype=torch.bool)
            h_key, c_key = lstm.in_keys[1], lstm.in_keys[2]
            z = torch.zeros(batch, spec.recurrent.num_layers, spec.recurrent.hidden_size)
            th, tc = state_theirs or (z, z)
            oh, oc = state_ours or (z, z)
            td_t.update({h_key: th, c_key: tc, lstm.in_keys[3]: init})
            td_o.update({"recurrent_state_h": oh, "recurrent_state_c": oc, "is_init": init})
        for key in theirs.in_keys:  # e.g. a MaskedCategorical's mask: every action allowed
            if key not in td_t.keys(include_nested=True) and spec.action.type == "discrete":
                td_t.set(key, torch.ones(batch, spec.action.n, dtype=torch.bool))
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC), set_recurrent_mode(False):
            out_t = theirs(td_t)
            out_o = built.core(td_o)
        if lstm is not None:
            state_theirs = (out_t.get(lstm.out_keys[1]), out_t.get(lstm.out_keys[2]))
            state_ours = (out_o.get(("next", "recurrent_state_h")), out_o.get(("next", "recurrent_state_c")))
        _compare(out_t, out_o, spec, kept)


def _compare(out_t: TensorDict, out_o: TensorDict, spec: PolicySpec, kept) -> None:
    a_t, a_o = out_t.get(kept[-1].out_keys[0]), out_o.get("action")
    if spec.kind == "qvalue":
        values_t = out_t.get(kept[-1].in_keys[0])
        same = torch.allclose(values_t, out_o.get("action_value"), atol=1e-5)
        if same and a_t.shape != a_o.shape:  # one-hot actions: the server answers indices
            a_t = a_t.argmax(-1)
        same = same and torch.equal(a_t.reshape(a_o.shape), a_o)
    elif spec.action.type == "box":
        low, high = torch.tensor(spec.action.low), torch.tensor(spec.action.high)
        same = torch.allclose(a_t.clamp(low, high), a_o, atol=1e-5)
    else:
        same = torch.equal(a_t.reshape(a_o.shape), a_o)
    if same and spec.kind == "probabilistic" and spec.distribution != "categorical":
        loc_key, scale_key = kept[-1].in_keys[0], kept[-1].in_keys[1]
        same = torch.allclose(out_t.get(loc_key), out_o.get("loc"), atol=1e-5) and torch.allclose(
            out_t.get(scale_key), out_o.get("scale"), atol=1e-5
        )
    if not same:
        raise ValueError(
            "the server's module would answer differently from this policy (checked on random "
            "inputs); a part is configured in a way the spec does not record (e.g. a custom "
            f"scale mapping or key wiring). Supported: {SUPPORTED}"
        )

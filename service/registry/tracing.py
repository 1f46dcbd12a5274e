"""A TorchRL policy traced into exported programs: ``policy.json``'s ``program`` form and one
PT2 archive per exploration mode (what ``sdk.export_policy`` writes when the declarative spec
cannot describe a module, and what trainers publish for multi-part actions).

The policy's keys say what each tensor is (TorchRL's conventions):

- inputs: ``action_mask``; ``is_init``; a recurrent state ``k`` (the policy writes
  ``("next", k)``; its shape from ``state_spec`` or the env's observation spec, where a
  ``TensorDictPrimer`` puts it); every other in-key is an observation entry (``observation``
  alone, or a dict observation's entries, any shape);
- outputs: ``action`` or ``("action", leaf)`` per leaf of a composite action; ``action_value``;
  ``action_log_prob`` / ``sample_log_prob`` (the whole action's log-prob) and
  ``(<action>, f"{leaf}_log_prob")`` / ``f"{leaf}_log_prob"`` per head; ``("next", k)`` per state.

A plain wrapper takes the inputs as positional tensors (batch first, dynamic), builds the
TensorDict, calls the policy and returns the outputs in order; ``torch.export`` traces it under
``ExplorationType.DETERMINISTIC`` and, for a policy with log-probs, ``RANDOM``.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase
from torch import nn
from torchrl.data import Binary, Bounded, Categorical, Composite, MultiCategorical, TensorSpec
from torchrl.envs.utils import ExplorationType, set_exploration_type

from service.registry.spec import IS_INIT, PolicySpec

JOINT_LOG_PROB = ("action_log_prob", "sample_log_prob")
MODES = {"deterministic": ExplorationType.DETERMINISTIC, "random": ExplorationType.RANDOM}
# policy.json fields of the declarative form (their defaults), left out of a program's
DECLARATIVE_ONLY = {"preprocess", "network", "recurrent", "distribution", "squash"}


class Positional(nn.Module):
    """``policy`` as ``forward(*tensors) -> tuple``: inputs and outputs by TensorDict key."""

    def __init__(self, policy: nn.Module, in_keys: list, out_keys: list) -> None:
        super().__init__()
        self.policy = policy
        self.in_keys = in_keys
        self.out_keys = out_keys

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = inputs[0].shape[:1]
        td = TensorDict({}, batch_size=batch)
        for key, x in zip(self.in_keys, inputs, strict=True):
            td.set(key, x.unsqueeze(-1) if key == IS_INIT else x)  # TorchRL's is_init is [B, 1]
        out = self.policy(td)
        return tuple(out.get(k) for k in self.out_keys)


def _leaf_json(spec: TensorSpec | dict, what: str) -> dict[str, Any]:
    if isinstance(spec, dict):
        return spec
    if what == "action" and isinstance(spec, MultiCategorical):  # (a Categorical subclass)
        return {"type": "multi_discrete", "nvec": [int(n) for n in spec.nvec.reshape(-1).tolist()]}
    if isinstance(spec, Categorical) and not isinstance(spec, MultiCategorical):
        return {"type": "discrete", "n": int(spec.space.n)}
    if what == "action":
        if isinstance(spec, Bounded):
            return {
                "type": "box",
                "shape": list(spec.shape),
                "low": spec.space.low.reshape(-1).tolist(),
                "high": spec.space.high.reshape(-1).tolist(),
            }
        raise ValueError(
            f"action spec {type(spec).__name__}: Categorical, MultiCategorical, Bounded "
            "or a Composite of them"
        )
    dtype = {torch.uint8: "uint8", torch.float32: "float32", torch.float64: "float32"}.get(spec.dtype)
    if dtype is None or isinstance(spec, Binary):
        raise ValueError(f"observation {what}: {type(spec).__name__} of {spec.dtype}; float or uint8 tensors")
    return {"shape": list(spec.shape), "dtype": dtype}


def _action_json(action_spec: TensorSpec | dict) -> dict[str, Any]:
    if isinstance(action_spec, Composite):
        inner = action_spec.get("action") if "action" in action_spec.keys() else action_spec
        if isinstance(inner, Composite):
            return {"type": "composite", "entries": {k: _leaf_json(inner[k], "action") for k in inner.keys()}}
        return _leaf_json(inner, "action")
    return _leaf_json(action_spec, "action")


def _lookup(spec: Any, key: Any) -> Any:
    if spec is None:
        return None
    if isinstance(spec, dict):
        return spec.get(key if isinstance(key, str) else key[-1])
    if not isinstance(spec, Composite):  # one leaf spec: the observation itself
        return None
    try:
        return spec[key]
    except KeyError:
        return None


def describe(
    policy: TensorDictModuleBase,
    observation_spec: Any,
    action_spec: TensorSpec | dict,
    state_spec: dict | None = None,
) -> tuple[dict[str, Any], list, list]:
    """policy.json for ``policy`` as programs, and the TensorDict keys of the inputs and outputs
    in the programs' order."""
    in_keys, out_keys = list(policy.in_keys), list(policy.out_keys)
    action = _action_json(action_spec)
    nexts = {k[1:] if len(k) > 2 else k[1] for k in out_keys if isinstance(k, tuple) and k[0] == "next"}
    obs_keys, states, inputs, keys_in = [], {}, [], []
    for key in in_keys:
        name = key if isinstance(key, str) else "_".join(key)
        if key == "action_mask" or key == IS_INIT:
            pass
        elif key in nexts:
            found = _lookup(state_spec, key)
            if found is None:
                found = _lookup(observation_spec, key)
            if found is None:
                raise ValueError(f"recurrent state {key!r}: no shape; pass state_spec={{{name!r}: spec}}")
            shape = list(found["shape"]) if isinstance(found, dict) else list(found.shape)
            states[name] = {"shape": shape, "dtype": "float32"}
        else:
            obs_keys.append(key)
        inputs.append(name)
        keys_in.append(key)
    if not obs_keys:
        raise ValueError(f"the policy reads no observation (in_keys {in_keys})")
    if len(obs_keys) == 1 and obs_keys[0] == "observation":
        found = _lookup(observation_spec, "observation")
        observation = _leaf_json(found if found is not None else observation_spec, "observation")
    else:
        entries = {}
        for key in obs_keys:
            if not isinstance(key, str):
                raise ValueError(f"observation key {key!r}: dict observations have flat string keys")
            found = _lookup(observation_spec, key)
            if found is None:
                raise ValueError(f"observation entry {key!r}: not in the observation spec")
            entries[key] = _leaf_json(found, key)
        observation = {"type": "dict", "entries": entries}
    if IS_INIT not in in_keys and states:
        raise ValueError("a recurrent policy reads 'is_init' (an InitTracker's key)")

    outputs, keys_out = [], []
    leaves = list(action["entries"]) if action["type"] == "composite" else None
    for leaf in leaves or [None]:
        key = "action" if leaf is None else ("action", leaf)
        if key not in out_keys:
            raise ValueError(f"the policy writes no {key!r} (out_keys {out_keys})")
        outputs.append("action" if leaf is None else f"action.{leaf}")
        keys_out.append(key)
    if "action_value" in out_keys and action["type"] == "discrete":
        outputs.append("action_value")
        keys_out.append("action_value")
    for leaf in leaves or []:
        for key in (("action", f"{leaf}_log_prob"), f"{leaf}_log_prob"):
            if key in out_keys:
                outputs.append(f"log_prob.{leaf}")
                keys_out.append(key)
                break
    joint = next((k for k in JOINT_LOG_PROB if k in out_keys), None)
    if joint is not None:
        outputs.append("log_prob")
        keys_out.append(joint)
    for name, key in zip(inputs, keys_in, strict=True):
        if name in states:
            outputs.append(f"next_{name}")
            keys_out.append(("next", *key) if isinstance(key, tuple) else ("next", key))
    logprobs = any(o.startswith("log_prob") for o in outputs)
    kind = "qvalue" if "action_value" in outputs else "probabilistic" if logprobs else "actor"
    files = {"deterministic": "deterministic.pt2"}
    if logprobs:
        files["random"] = "random.pt2"
    spec_json = {
        "kind": kind,
        "observation": observation,
        "action": action,
        "program": {"files": files, "inputs": inputs, "outputs": outputs, "state": states},
    }
    return spec_json, keys_in, keys_out


def sample_inputs(spec: PolicySpec, batch: int, generator: torch.Generator, step: int) -> list[torch.Tensor]:
    """Random inputs in the programs' order (step 0 starts every episode)."""
    from service.registry.spec import DictObservationSpec

    obs = spec.observation
    leaves = obs.entries if isinstance(obs, DictObservationSpec) else {"observation": obs}
    out = []
    for name in spec.program.inputs:
        if name in leaves:
            leaf = leaves[name]
            if leaf.discrete:
                out.append(torch.randint(leaf.n, (batch,), generator=generator))
            elif leaf.dtype == "uint8":
                out.append(torch.randint(256, (batch, *leaf.shape), generator=generator, dtype=torch.uint8))
            else:
                out.append(torch.randn(batch, *leaf.shape, generator=generator))
        elif name == "action_mask":
            mask = torch.rand(batch, spec.action.n, generator=generator) < 0.7
            mask[:, 0] |= ~mask.any(-1)
            out.append(mask)
        elif name == IS_INIT:
            out.append(torch.full((batch,), step == 0, dtype=torch.bool))
        else:
            out.append(torch.zeros(batch, *spec.program.state[name].shape))
    return out


def trace_programs(
    policy: TensorDictModuleBase,
    observation_spec: Any,
    action_spec: TensorSpec | dict,
    *,
    state_spec: dict | None = None,
    env_id: str | None = None,
) -> tuple[PolicySpec, dict[str, bytes], Positional]:
    """The program spec of ``policy``, its archives (file name -> bytes) and the positional
    wrapper they were traced from.

    Raises:
        ValueError: the keys do not say what a tensor is, or ``torch.export`` cannot trace it.
    """
    spec_json, keys_in, keys_out = describe(policy, observation_spec, action_spec, state_spec)
    spec_json["env_id"] = env_id
    try:
        spec = PolicySpec.model_validate(spec_json)
    except ValueError as exc:
        raise ValueError(f"the policy's keys do not make a program spec: {exc}") from None
    wrapper = Positional(policy, keys_in, keys_out).eval()
    example = sample_inputs(spec, 2, torch.Generator().manual_seed(0), 0)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic = (tuple({0: batch} for _ in example),)
    files: dict[str, bytes] = {}
    for mode, name in spec.program.files.items():
        try:
            # no torch.no_grad() here: it would be captured as a higher-order op around the graph
            with set_exploration_type(MODES[mode]), warnings.catch_warnings():
                # nn.LSTM / nn.GRU rebind ``_flat_weights`` on every call and torch.export says
                # so; they are the module's parameters, which the program holds as such
                warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights")
                program = torch.export.export(wrapper, tuple(example), dynamic_shapes=dynamic)
        except Exception as exc:  # torch.export's own reasons, shortened
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise ValueError(
                f"torch.export cannot trace the policy under {mode} exploration: "
                f"{type(exc).__name__}: {first}"
            ) from None
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        files[name] = buffer.getvalue()
    return spec, files, wrapper


def check_loaded(spec: PolicySpec, files: dict[str, bytes], wrapper: Positional, batch: int = 5) -> None:
    """The archives, read back through the server's loader (``registry.program``), answer what
    ``wrapper`` answers in-process on random inputs (``random`` seeded alike). A trainer's check:
    ``sdk.program_export`` goes further, through the serving runtime.

    Raises:
        ValueError: the loader refuses an archive, or an output differs.
    """
    from service.registry.program import ProgramRefused, read_programs

    try:
        programs = read_programs(spec, files)
    except ProgramRefused as exc:
        raise ValueError(f"the server would refuse the traced program: {exc}") from None
    inputs = sample_inputs(spec, batch, torch.Generator().manual_seed(1), 0)
    for mode, program in programs.modes.items():
        answers = []
        for module in (wrapper, program.module):
            with torch.no_grad(), set_exploration_type(MODES[mode]), torch.random.fork_rng():
                torch.manual_seed(7)
                out = module(*inputs)
            answers.append((out,) if isinstance(out, torch.Tensor) else tuple(out))
        for name, want, have in zip(spec.program.outputs, *answers, strict=True):
            same = (
                torch.equal(have, want)
                if not want.is_floating_point()
                else torch.allclose(have, want, atol=1e-5)
            )
            if not same:
                raise ValueError(f"the loaded program answers {name!r} differently from the module ({mode})")

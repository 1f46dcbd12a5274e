"""The Open Inference Protocol's codec: named, typed tensors <-> a checked batch and a result.

``/v1`` sends rows of JSON (``runtime.codec``); the Open Inference Protocol (KServe v2, Triton)
sends whole tensors: ``observation`` ``[B, *shape]`` (or one tensor per entry of a dict
observation, ``[B]`` INT64 for a discrete one), ``action_mask`` ``[B, n]`` BOOL. ``decode``
checks each against the version's spec (datatype, shape, finiteness) with the client-facing
wording and gives the same batch types as ``runtime.codec``; ``encode`` turns an ``ActResult``
into the named outputs (``action``, ``action_value``, ``chosen_action_value``, ``log_prob``,
``loc``, ``scale``) the version's metadata lists. Framing (JSON, binary) is the API's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tensordict import TensorDict

from service.errors import InvalidInput
from service.registry.spec import DictObservationSpec, PolicySpec
from service.runtime.call import ActResult, Observations

# Triton's datatype names <-> numpy
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NAMES = {v: k for k, v in DATATYPES.items()}
ACTION_MASK = "action_mask"


def dtype_of(name: str, datatype: str) -> np.dtype:
    """The numpy dtype of an input's Triton datatype (422 for one it is not)."""
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(
            f"input {name[:64]!r} has datatype {datatype[:16]!r}; one of {sorted(DATATYPES)} is expected"
        )
    return dtype


def from_bytes(name: str, raw: bytes | memoryview, datatype: str, shape: list[int]) -> np.ndarray:
    """An input sent as raw little-endian bytes (REST's binary extension, gRPC's
    ``raw_input_contents``): exactly ``prod(shape)`` elements, read in place."""
    dtype = dtype_of(name, datatype)
    count = math.prod(shape)
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {name[:64]!r}: {len(raw)} bytes do not fit shape {shape} of {datatype} "
            f"({count * dtype.itemsize} bytes)"
        )
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def from_values(name: str, data, datatype: str, shape: list[int]) -> np.ndarray:
    """An input sent as values (REST's JSON ``data``, flat or nested; gRPC's typed
    ``contents``): ``prod(shape)`` numbers of the datatype's kind."""
    dtype = dtype_of(name, datatype)
    count = math.prod(shape)
    try:
        array = np.asarray(data)
    except ValueError:
        raise InvalidInput(f"input {name[:64]!r}: 'data' is not a regular array of numbers") from None
    if array.size != count:
        raise InvalidInput(
            f"input {name[:64]!r}: 'data' holds {array.size} values; shape {shape} needs {count}"
        )
    if count == 0:
        return np.zeros(shape, dtype)
    kind = array.dtype.kind
    if dtype.kind == "b" and kind != "b":
        raise InvalidInput(f"input {name[:64]!r}: BOOL data must be true/false")
    if dtype.kind in "iu" and kind not in "iu":
        raise InvalidInput(f"input {name[:64]!r}: {datatype} data must be integers")
    if dtype.kind == "f" and kind not in "iuf":
        raise InvalidInput(f"input {name[:64]!r}: {datatype} data must be numbers")
    with np.errstate(over="ignore"):
        return array.astype(dtype).reshape(shape)


class TensorSpec:
    """One input or output of a version: name, datatype and shape (-1: the batch)."""

    __slots__ = ("name", "datatype", "shape")

    def __init__(self, name: str, datatype: str, shape: list[int]) -> None:
        self.name, self.datatype, self.shape = name, datatype, shape

    def public(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


class TensorCodec:
    """The Open Inference Protocol codec of one policy version (its spec)."""

    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec
        obs = spec.observation
        self.dict_obs = isinstance(obs, DictObservationSpec)
        leaves = obs.entries if self.dict_obs else {"observation": obs}
        self.inputs = [_leaf(name, leaf) for name, leaf in leaves.items()]
        self.discrete = spec.action.type == "discrete"
        if self.discrete:
            self.inputs.append(TensorSpec(ACTION_MASK, "BOOL", [-1, spec.action.n]))
        self.outputs = _program_outputs(spec) if spec.program is not None else _outputs(spec)
        self._inputs = {t.name: t for t in self.inputs}
        self._outputs = {t.name: t for t in self.outputs}
        self.output_names = [t.name for t in self.outputs]

    def decode(
        self, tensors: dict[str, np.ndarray], policy: str
    ) -> tuple[Observations, torch.Tensor | None, int]:
        """The observations, the action mask (or None) and the batch size of one request.

        Raises:
            InvalidInput: an unknown, missing or ill-shaped input, a datatype the version does
                not take, non-finite numbers, out-of-range discrete values, an all-false mask.
        """
        unknown = sorted(set(tensors) - set(self._inputs))
        if unknown:
            raise InvalidInput(
                f"input {unknown[0][:64]!r} is not one of policy {policy}'s inputs {list(self._inputs)}"
            )
        leaves = [t for t in self.inputs if t.name != ACTION_MASK]
        missing = [t.name for t in leaves if t.name not in tensors]
        if missing:
            raise InvalidInput(f"policy {policy} needs the input(s) {missing}; got {sorted(tensors)}")
        batch = None
        parts: dict[str, torch.Tensor] = {}
        for t in leaves:
            array = self._checked(t, tensors[t.name], policy)
            if batch is None:
                batch = array.shape[0]
            elif array.shape[0] != batch:
                raise InvalidInput(
                    f"input {t.name!r} has {array.shape[0]} rows; the other inputs have {batch}"
                )
            parts[t.name] = torch.from_numpy(np.array(array, copy=True))
        mask = None
        if ACTION_MASK in tensors:
            array = self._checked(self._inputs[ACTION_MASK], tensors[ACTION_MASK], policy)
            if array.shape[0] != batch:
                raise InvalidInput(
                    f"input 'action_mask' has {array.shape[0]} rows for {batch} observation(s)"
                )
            empty = np.flatnonzero(~array.any(axis=1))
            if empty.size:
                raise InvalidInput(
                    f"action_mask[{int(empty[0])}] allows no action: at least one must be true"
                )
            mask = torch.from_numpy(np.array(array, copy=True))
        elif self.discrete and self.spec.action.mask_required:
            raise InvalidInput(f"policy {policy} requires an action mask: send the input 'action_mask'")
        if batch == 0:
            raise InvalidInput("the inputs hold no observation: send at least one row")
        obs = TensorDict(parts, batch_size=[batch]) if self.dict_obs else parts["observation"]
        return obs, mask, batch

    def _checked(self, t: TensorSpec, array: np.ndarray, policy: str) -> np.ndarray:
        datatype = NAMES.get(array.dtype)
        if datatype != t.datatype:
            raise InvalidInput(
                f"input {t.name!r} has datatype {datatype or array.dtype}; policy {policy} takes {t.datatype}"
            )
        expected = t.shape[1:]
        if array.ndim != len(t.shape) or list(array.shape[1:]) != expected:
            raise InvalidInput(
                f"input {t.name!r} has shape {list(array.shape)}; policy {policy} expects "
                f"{['B', *expected]} (B observations)"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidInput(f"input {t.name!r} holds values that are not finite")
        n = self._discrete_n(t.name)
        if n is not None and array.size and (array.min() < 0 or array.max() >= n):
            raise InvalidInput(f"input {t.name!r} holds values outside [0, {n}) for policy {policy}")
        return array

    def _discrete_n(self, name: str) -> int | None:
        obs = self.spec.observation
        leaf = obs.entries.get(name) if self.dict_obs else obs
        return leaf.n if leaf is not None and leaf.discrete else None

    def encode(self, result: ActResult, wanted: list[str] | None) -> dict[str, np.ndarray]:
        """The outputs asked for (all when ``wanted`` is None), as arrays."""
        names = self.output_names if wanted is None else wanted
        out: dict[str, np.ndarray] = {}
        for name in names:
            head, _, leaf = name.partition(".")
            tensor = result.action if head == "action" else result.info[head]
            if leaf:  # a composite action's leaf, a head's log-prob
                tensor = tensor.get(leaf)
            array = tensor.detach().cpu().numpy()
            out[name] = array.astype(DATATYPES[self._outputs[name].datatype], copy=False)
        return out

    def check_outputs(self, wanted: list[str], policy: str) -> None:
        unknown = [w for w in wanted if w not in self._outputs]
        if unknown:
            raise InvalidInput(
                f"output {unknown[0][:64]!r} is not one of policy {policy}'s outputs {self.output_names}"
            )


def _outputs(spec: PolicySpec) -> list[TensorSpec]:
    """A declarative version's outputs (what its kind and distribution give)."""
    if spec.action.type == "discrete":
        outputs = [TensorSpec("action", "INT64", [-1])]
    else:
        outputs = [TensorSpec("action", "FP32", [-1, *spec.action.shape])]
    if spec.kind == "qvalue":
        outputs += [
            TensorSpec("action_value", "FP32", [-1, spec.action.n]),
            TensorSpec("chosen_action_value", "FP32", [-1]),
        ]
    elif spec.kind == "probabilistic":
        outputs.append(TensorSpec("log_prob", "FP32", [-1]))
        if spec.action.type != "discrete":
            d = list(spec.action.shape)
            outputs += [TensorSpec("loc", "FP32", [-1, *d]), TensorSpec("scale", "FP32", [-1, *d])]
    return outputs


def _action_tensor(name: str, action) -> TensorSpec:
    if action.type == "discrete":
        return TensorSpec(name, "INT64", [-1])
    if action.type == "multi_discrete":
        return TensorSpec(name, "INT64", [-1, len(action.nvec)])
    return TensorSpec(name, "FP32", [-1, *action.shape])


def _program_outputs(spec: PolicySpec) -> list[TensorSpec]:
    """A program version's outputs: the action (a tensor per leaf of a composite one, named
    ``action.<leaf>``), ``action_value`` and ``chosen_action_value``, the log-probs it gives
    (``log_prob.<leaf>`` per head; ``joint_log_prob`` for the whole action beside them)."""
    declared = spec.program.outputs
    action = spec.action
    if action.type == "composite":
        outputs = [_action_tensor(f"action.{leaf}", a) for leaf, a in action.entries.items()]
    else:
        outputs = [_action_tensor("action", action)]
    if "action_value" in declared:
        outputs += [
            TensorSpec("action_value", "FP32", [-1, action.n]),
            TensorSpec("chosen_action_value", "FP32", [-1]),
        ]
    heads = [n for n in declared if n.startswith("log_prob.")]
    outputs += [TensorSpec(n, "FP32", [-1]) for n in heads]
    if "log_prob" in declared:
        outputs.append(TensorSpec("joint_log_prob" if heads else "log_prob", "FP32", [-1]))
    return outputs


def _leaf(name: str, leaf) -> TensorSpec:
    if leaf.discrete:
        return TensorSpec(name, "INT64", [-1])
    return TensorSpec(name, NAMES[np.dtype(leaf.dtype)], [-1, *leaf.shape])

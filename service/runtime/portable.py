"""A servable version as one plain module of positional tensors, and that module exported:
a PT2 archive (``torch.export``) or an ONNX model, for runtimes without this server.

The module is the deterministic policy with everything the server does around it inside:
preprocessing (``preprocess``, ``cat_frames`` with its history as an explicit input), the
one-hot of a discrete observation, the action mask, the recurrent state. Names (DESIGN.md,
"Policies out"):

- inputs: ``observation`` (or the dict observation's entry names, in the spec's order),
  ``action_mask`` (discrete policies; all true = no mask), ``recurrent_state_h`` and
  ``recurrent_state_c`` (LSTM, ``[B, num_layers, hidden]``), ``frame_history`` (``cat_frames``,
  ``[B, N-1, *frame]``), ``is_init`` (``[B]`` bool: the row starts an episode) — each with the
  batch as its first, dynamic, dimension;
- outputs: ``action``, ``action_value`` (Q-value policies), then the next state as ``next_`` +
  the state input's name.

A stateless Q-value or actor policy and any recurrent one are their plain networks
(``runtime/fast.FastPath``: the same weights and arithmetic as the TorchRL modules, tested
against them; TorchRL's ``LSTMModule`` step branches on ``is_init.any()``, which
``torch.export`` cannot capture). The other stateless policies (probabilistic heads, dict
observations) run their TorchRL module on a TensorDict built inside the module, under
``ExplorationType.DETERMINISTIC``.
"""

from __future__ import annotations

import copy
import io
import warnings

import torch
from tensordict import TensorDict
from torchrl.envs.transforms import ObservationNorm
from torchrl.envs.utils import ExplorationType, set_exploration_type

from service.errors import InvalidInput
from service.registry.build import ACTION_MASK
from service.registry.preprocess import ApplyTransforms
from service.registry.spec import DictObservationSpec
from service.runtime.policy import PolicyRuntime
from service.runtime.program import ProgramRuntime

FORMATS = ("onnx", "pt2")
EXAMPLE_BATCH = 2


class Portable(torch.nn.Module):
    """The deterministic policy of ``runtime`` as ``forward(*inputs) -> tuple(outputs)``."""

    def __init__(self, runtime: PolicyRuntime) -> None:
        super().__init__()
        spec = runtime.spec
        self.spec = spec
        self.dict_obs = isinstance(spec.observation, DictObservationSpec)
        if runtime.recurrent and runtime.fast is None:
            raise InvalidInput(
                f"a recurrent {spec.kind} policy cannot be exported yet (Q-value and actor ones can)"
            )
        self.entries = list(spec.observation.entries) if self.dict_obs else ["observation"]
        self.discrete = runtime.discrete
        self.recurrent = runtime.recurrent
        self.frames = runtime.frames
        self.stateful = runtime.stateful
        self.pre, self.post = _exportable(runtime.pre_frames), _exportable(runtime.post_frames)
        self.fast = runtime.fast
        if self.fast is not None:  # its networks, as submodules of this one
            self.head = self.fast.head
            self.encoder = self.fast.encoder
            self.lstm = self.fast.lstm
        self.core = runtime.core if self.fast is None else None  # only what the graph uses
        self.qvalue = spec.kind == "qvalue"
        self.input_names = [*self.entries]
        if self.discrete:
            self.input_names.append(ACTION_MASK)
        if self.recurrent:
            self.input_names += ["recurrent_state_h", "recurrent_state_c"]
        if self.frames is not None:
            self.input_names.append("frame_history")
        if self.stateful:
            self.input_names.append("is_init")
        self.output_names = ["action"] + (["action_value"] if self.qvalue else [])
        self.output_names += [f"next_{n}" for n in self.input_names if n.startswith(("recurrent_", "frame_"))]
        state = runtime.zero_state(1)  # each state input's per-row shape and dtype
        self._state = [(tuple(t.shape[1:]), t.dtype) for t in state] if state is not None else []

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        given = dict(zip(self.input_names, inputs, strict=True))
        mask = given.get(ACTION_MASK)
        is_init = given.get("is_init")
        nexts: list[torch.Tensor] = []
        if self.dict_obs:
            x = TensorDict({n: given[n] for n in self.entries}, batch_size=given[self.entries[0]].shape[:1])
        else:
            x = given["observation"]
            if self.pre is not None:
                x = self.pre(x)
            if self.frames is not None:
                x, history = self.frames.step(x, given["frame_history"], is_init)
            if self.post is not None:
                x = self.post(x)
        if self.fast is not None:
            if self.recurrent:
                x, (h, c) = self.fast.lstm_step(
                    x, (given["recurrent_state_h"], given["recurrent_state_c"]), is_init
                )
                nexts += [h, c]
            out = self.head(x)
            if mask is not None:
                out = torch.where(mask, out, torch.finfo(out.dtype).min)
            outputs = (out.argmax(-1), out) if self.qvalue else (out,)
        else:
            outputs = self._torchrl(x, mask)
        if self.frames is not None:
            nexts.append(history)
        return (*outputs, *nexts)

    def _torchrl(self, x, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if isinstance(x, TensorDict):
            td = x.copy()
        else:
            td = TensorDict({"observation": x}, batch_size=x.shape[:1])
        if mask is not None:
            td.set(ACTION_MASK, mask)
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            out = self.core(td)
        return (out.get("action"), out.get("action_value")) if self.qvalue else (out.get("action"),)

    def example(self, batch: int = EXAMPLE_BATCH) -> tuple[torch.Tensor, ...]:
        """Inputs of ``batch`` rows (zeros, no mask, every row starting an episode)."""
        spec = self.spec
        obs = spec.observation
        leaves = obs.entries if self.dict_obs else {"observation": obs}
        out: list[torch.Tensor] = []
        for leaf in leaves.values():
            if leaf.discrete:
                out.append(torch.zeros(batch, dtype=torch.int64))
            else:
                out.append(torch.zeros(batch, *leaf.shape, dtype=getattr(torch, leaf.dtype)))
        if self.discrete:
            out.append(torch.ones(batch, spec.action.n, dtype=torch.bool))
        out += [torch.zeros(batch, *shape, dtype=dtype) for shape, dtype in self._state]
        if self.stateful:
            out.append(torch.ones(batch, dtype=torch.bool))
        return tuple(out)


class _Affine(torch.nn.Module):
    """TorchRL's ``ObservationNorm`` with its mode read once: its ``_apply_transform`` branches on
    ``standard_normal``, a tensor, which ``torch.export`` cannot trace (a data-dependent guard).
    The one workaround of TorchRL in this module."""

    def __init__(self, norm: ObservationNorm) -> None:
        super().__init__()
        self.register_buffer("loc", norm.loc.detach().clone())
        self.register_buffer("scale", norm.scale.detach().clone())
        self.standard_normal = bool(norm.standard_normal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.loc) / self.scale if self.standard_normal else x * self.scale + self.loc


class _Transform(torch.nn.Module):
    """One TorchRL transform's tensor function (what ``ApplyTransforms`` calls)."""

    def __init__(self, transform) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform._apply_transform(x)


def _exportable(apply: ApplyTransforms | None) -> torch.nn.Module | None:
    """The preprocessing ``apply`` runs, each step as ``torch.export`` can trace it."""
    if apply is None:
        return None
    steps = [_Affine(t) if isinstance(t, ObservationNorm) else _Transform(t) for t in apply.transforms]
    return torch.nn.Sequential(*steps)


def _dynamic(module: Portable) -> tuple:
    """Every input's first dimension is the one dynamic batch (``forward``'s ``*inputs``)."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    return (tuple({0: batch} for _ in module.input_names),)


def export_program(runtime: PolicyRuntime) -> tuple[torch.export.ExportedProgram, Portable]:
    if runtime.device.type != "cpu":
        raise InvalidInput("export runs on a CPU server")
    # a copy: tracing swaps a module's parameters for fake tensors while it runs, and the
    # served modules keep answering meanwhile
    module = copy.deepcopy(Portable(runtime)).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # nn.LSTM rebinds its ``_flat_weights`` list on every call and torch.export says so;
        # they are the LSTM's parameters, which the program holds as such
        warnings.filterwarnings("ignore", message=r"The tensor attributes self\.lstm\._flat_weights")
        program = torch.export.export(module, module.example(), dynamic_shapes=_dynamic(module))
    return program, module


def export_bytes(runtime: PolicyRuntime, fmt: str) -> bytes:
    """The version as a PT2 archive (``torch.export.load``) or an ONNX model (onnxruntime)."""
    if fmt not in FORMATS:
        raise InvalidInput(f"format {fmt[:16]!r}: one of {list(FORMATS)} is expected")
    if isinstance(runtime, ProgramRuntime):
        return _program_bytes(runtime, fmt)
    program, module = export_program(runtime)
    buffer = io.BytesIO()
    if fmt == "pt2":
        torch.export.save(program, buffer)
        return buffer.getvalue()
    return _onnx(program, module.example(), module.input_names, module.output_names)


def _onnx(
    program: torch.export.ExportedProgram, example: tuple, inputs: list[str], outputs: list[str]
) -> bytes:
    """``program`` as an ONNX model (torch's dynamo exporter), inputs and outputs named."""
    onnx_program = torch.onnx.export(
        program, example, input_names=inputs, output_names=outputs, dynamo=True, verbose=False
    )
    return onnx_program.model_proto.SerializeToString()


def _program_bytes(runtime: ProgramRuntime, fmt: str) -> bytes:
    """A program policy's deterministic program: its archive as uploaded (``pt2``), or that
    program through the ONNX exporter, inputs and outputs named as in policy.json."""
    deterministic = runtime.programs.modes["deterministic"]
    if fmt == "pt2":
        return deterministic.data
    return _onnx(deterministic.module.program, runtime.example(), runtime.inputs, runtime.outputs)

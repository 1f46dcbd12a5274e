"""A program policy ready to act: its exported programs (``registry.program``) behind the same
interface as ``runtime.policy.PolicyRuntime``, so the codecs, the micro-batcher, sessions, the
WebSocket and rollouts serve it unchanged.

``forward(call)`` lays the call out as the program's positional inputs (policy.json's
``program.inputs``: observation entries, ``action_mask`` — all true when the call sends none —,
the recurrent state, ``is_init``), runs the program of the call's exploration mode (the
``random`` one under ``seeded``, which is what makes a seeded answer reproducible) and reads the
outputs back by name: the action (a TensorDict of leaves for a composite action), ``info``
(``action_value``, ``log_prob`` or per-head ``log_prob``) and the next state.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from service.errors import InvalidInput
from service.exploration import Exploration
from service.registry.program import Programs
from service.registry.spec import IS_INIT, CompositeActionSpec, DictObservationSpec, PolicySpec
from service.runtime.call import ActCall, ActResult, State, as_tensor, episode_state
from service.runtime.codec import Codec
from service.runtime.policy import PolicyRuntime, seeded
from service.runtime.tensors import TensorCodec

CPU = torch.device("cpu")


class ProgramRuntime:
    """The exported programs of one version, acting (on the CPU: a program's graph may hold
    device-specific constants)."""

    def __init__(self, spec: PolicySpec, programs: Programs, device: torch.device = CPU) -> None:
        self.spec = spec
        self.device = CPU
        self.programs = programs
        self.modules = {mode: p.module for mode, p in programs.modes.items()}
        program = spec.program
        self.inputs = list(program.inputs)
        self.outputs = list(program.outputs)
        self.codec = Codec(spec)
        self.tensors = TensorCodec(spec)
        self.discrete = spec.action.type == "discrete"
        self.n_actions = spec.action.n if self.discrete else None
        self.composite = isinstance(spec.action, CompositeActionSpec)
        self.dict_obs = isinstance(spec.observation, DictObservationSpec)
        # small observations (what a declarative vector policy reads): run on the event loop when
        # the batch is small, as declarative vector policies do; images go to the executor
        leaves = spec.observation.entries.values() if self.dict_obs else [spec.observation]
        self.light = sum(1 if leaf.discrete else _numel(tuple(leaf.shape)) for leaf in leaves) <= 1024
        self.state_names = list(program.state)
        self.recurrent = bool(self.state_names)
        self.stateful = self.recurrent
        self.state_shape = None  # (LSTM layout; a program's state is program.state)
        self.frames = None
        self.fast = None
        self._state_shapes = [tuple(program.state[n].shape) for n in self.state_names]
        self.state_bytes_per_env = sum(4 * _numel(s) for s in self._state_shapes)

    def zero_state(self, batch: int) -> State | None:
        """Each state entry of ``batch`` envs before their first step (zeros), in program.state order."""
        if not self.state_names:
            return None
        return tuple(torch.zeros(batch, *shape) for shape in self._state_shapes)

    def example(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        """Inputs of ``batch`` rows in the programs' order (zeros, every action allowed, every
        row starting an episode): what exporting the program onward (ONNX) traces with."""
        obs = self.spec.observation
        leaves = obs.entries if self.dict_obs else {"observation": obs}
        out = []
        for name in self.inputs:
            if name in leaves:
                leaf = leaves[name]
                shape, dtype = (
                    ((), torch.int64) if leaf.discrete else (leaf.shape, getattr(torch, leaf.dtype))
                )
                out.append(torch.zeros(batch, *shape, dtype=dtype))
            elif name == "action_mask":
                out.append(torch.ones(batch, self.n_actions, dtype=torch.bool))
            elif name == IS_INIT:
                out.append(torch.ones(batch, dtype=torch.bool))
            else:
                out.append(torch.zeros(batch, *self.spec.program.state[name].shape))
        return tuple(out)

    def effective(self, requested: Exploration) -> Exploration:
        """``random`` runs the random program (422 when the version has none); every other type
        the deterministic one."""
        if requested is Exploration.random:
            if "random" not in self.modules:
                raise InvalidInput(
                    "exploration 'random' needs the version's random program; this version has only "
                    "a deterministic one (export the policy with its random program)"
                )
            return Exploration.random
        return Exploration.deterministic

    def act(self, observation, **fields) -> ActResult:
        call = ActCall(observation, **fields)
        call.exploration = self.effective(call.exploration)
        return self.forward(call)

    def forward(self, call: ActCall) -> ActResult:
        observation = as_tensor(call.obs)
        batch = observation.shape[0]
        state, is_init = call.state, call.is_init
        if self.stateful:
            state, is_init = episode_state(call, batch, self.zero_state)
        given: dict[str, torch.Tensor] = {}
        if self.dict_obs:
            given.update({k: observation.get(k) for k in self.spec.observation.entries})
        else:
            given["observation"] = observation
        if self.discrete:
            given["action_mask"] = (
                call.mask if call.mask is not None else torch.ones(batch, self.n_actions, dtype=torch.bool)
            )
        if self.stateful:
            given.update(zip(self.state_names, state, strict=True))
            given[IS_INIT] = is_init.reshape(batch)
        used = call.exploration
        module = self.modules["random" if used is Exploration.random else "deterministic"]
        with torch.inference_mode(), seeded(call.seed if used is Exploration.random else None, self.device):
            outputs = module(*(given[n] for n in self.inputs))
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        named = dict(zip(self.outputs, outputs, strict=True))
        return ActResult(
            self._action(named, batch),
            self._info(named, batch) if call.return_info else None,
            used,
            tuple(named[f"next_{n}"] for n in self.state_names) or None,
        )

    def _action(self, named: dict[str, torch.Tensor], batch: int) -> torch.Tensor | TensorDict:
        if not self.composite:
            return named["action"]
        leaves = {leaf: named[f"action.{leaf}"] for leaf in self.spec.action.entries}
        return TensorDict(leaves, batch_size=[batch])

    def _info(self, named: dict[str, torch.Tensor], batch: int) -> dict:
        info: dict = {}
        if "action_value" in named:
            values = named["action_value"]
            info["action_value"] = values
            action = named["action"]
            info["chosen_action_value"] = values.gather(-1, action.long().reshape(batch, 1)).squeeze(-1)
        heads = {k.split(".", 1)[1]: v for k, v in named.items() if k.startswith("log_prob.")}
        if heads:
            info["log_prob"] = TensorDict(heads, batch_size=[batch])
            if "log_prob" in named:
                info["joint_log_prob"] = named["log_prob"]
        elif "log_prob" in named:
            info["log_prob"] = named["log_prob"]
        return info


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def serving_runtime(spec: PolicySpec, loaded, device: torch.device) -> PolicyRuntime | ProgramRuntime:
    """The registry's ``prepare`` for the API: a program policy's archives -> ``ProgramRuntime``,
    a built TorchRL module -> ``PolicyRuntime``."""
    if isinstance(loaded, Programs):
        return ProgramRuntime(spec, loaded, device)
    return PolicyRuntime(spec, loaded, device)

"""A loaded policy version ready to act, and its TorchRL forward pass.

``PolicyRuntime.forward(call)`` runs one ``ActCall`` (already decoded by ``runtime.codec``,
joined by ``runtime.batching``) under ``inference_mode`` with its exploration type set
explicitly (``set_exploration_type``) and, for ``random``, the exploration parameters of that
call; nothing depends on ambient state. Deterministic Q-value and actor policies take
``runtime.fast`` instead. Forward passes are meant to go through the ``MicroBatcher``, which
runs them one at a time: that is what makes per-call parameters and ``seed`` safe.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictSequential
from torchrl.envs.utils import ExplorationType, set_exploration_type

from service.exploration import Exploration, effective
from service.registry.build import ACTION_MASK, BuiltPolicy, build_policy
from service.registry.preprocess import (
    ApplyTransforms,
    FrameStack,
    as_module,
    preprocessed_shape,
    split_at_frames,
)
from service.registry.spec import PolicySpec
from service.runtime.call import ActCall, ActResult, State, as_tensor, episode_state
from service.runtime.codec import Codec
from service.runtime.fast import FastPath
from service.runtime.tensors import TensorCodec

_TYPES = {
    Exploration.deterministic: ExplorationType.DETERMINISTIC,
    Exploration.mode: ExplorationType.MODE,
    Exploration.mean: ExplorationType.MEAN,
    Exploration.random: ExplorationType.RANDOM,
}


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Make the random draws inside reproducible for ``seed``, leaving the global RNG as it was."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class PolicyRuntime:
    """A policy version ready to act: the built module, its spec and codec, and what can be
    decided once."""

    def __init__(self, spec: PolicySpec, built: BuiltPolicy, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        self.codec = Codec(spec)  # /v1 JSON rows
        self.tensors = TensorCodec(spec)  # Open Inference Protocol tensors
        self.discrete = spec.action.type == "discrete"
        if self.discrete:
            # The same weights in modules that read an action mask (all-true when a call sends
            # none): QValueModule/EGreedyModule with action_mask_key, or a MaskedCategorical.
            masked = build_policy(spec, device, action_mask=True)
            masked.core.load_state_dict(built.core.state_dict())
            built = masked
        self.core = built.core.eval()
        self.explore = built.explore
        self.explorer = TensorDictSequential(self.core, self.explore).eval() if self.explore else None
        # the spec's TorchRL transforms, applied to the raw observation before the network;
        # cat_frames splits them, its frame history being per-env state
        before, cat, after = split_at_frames(spec.preprocess)
        self.pre_frames = _apply(before, device)
        self.frames = FrameStack(cat) if cat is not None else None
        self.post_frames = _apply(after, device)
        if cat is not None:
            shape, dtype = preprocessed_shape(spec.observation, before)
            self.frame_shape, self.frame_dtype = shape, getattr(torch, dtype)
        # cheap enough to run on the event loop when the batch is small (vector MLPs); image
        # policies always run on the executor thread
        self.light = spec.network.conv is None and not spec.preprocess
        self.n_actions = spec.action.n if self.discrete else None
        self.recurrent = spec.recurrent is not None
        self.state_shape = (spec.recurrent.num_layers, spec.recurrent.hidden_size) if spec.recurrent else None
        # per-env state kept between steps (sessions, rollouts): LSTM (h, c), frame history
        self.stateful = self.recurrent or self.frames is not None
        state = self.zero_state(1)
        self.state_bytes_per_env = sum(t.nbytes for t in state) if state is not None else 0
        self.fast = FastPath(spec, self.core, device) if FastPath.supports(spec) else None

    def zero_state(self, batch: int) -> State | None:
        """The state of ``batch`` envs before their first step: ``(h, c)`` (LSTM, each
        ``[B, num_layers, hidden]``) then the frame history (cat_frames, ``[B, N-1, *frame]``),
        whichever the policy has; None when it has neither."""
        parts: list[torch.Tensor] = []
        if self.state_shape is not None:
            z = torch.zeros(batch, *self.state_shape, device=self.device)
            parts += [z, z.clone()]
        if self.frames is not None:
            parts.append(self.frames.initial(self.frame_shape, self.frame_dtype, batch))
        return tuple(parts) if parts else None

    def act(self, observation, **fields) -> ActResult:
        """``forward`` of a call made from keyword arguments (tests, scripts): the exploration
        given is the one asked for (made ``effective`` here)."""
        call = ActCall(observation, **fields)
        call.exploration = self.effective(call.exploration)
        return self.forward(call)

    def effective(self, requested: Exploration) -> Exploration:
        """The exploration this policy uses for ``requested`` (``exploration.effective``)."""
        return effective(requested, self.spec.distribution)

    def forward(self, call: ActCall) -> ActResult:
        """One forward pass of ``call`` (observations from the codec: already validated)."""
        used = call.exploration
        observation = as_tensor(call.obs)
        batch = observation.shape[0]
        state, is_init = call.state, call.is_init
        if self.stateful:
            state, is_init = episode_state(call, batch, self.zero_state)
        history = None
        if not self.light:
            with torch.inference_mode():
                observation, history = self._preprocessed(observation, state, is_init)
        if used is Exploration.deterministic and self.fast is not None:
            result = self.fast.act(observation, state, is_init, call.return_info, call.mask)
        else:
            result = self._torchrl(observation, call, used, state, is_init)
        if history is not None:
            result.state = (result.state or ()) + (history,)
        return result

    def _torchrl(
        self,
        observation: torch.Tensor | TensorDict,
        call: ActCall,
        used: Exploration,
        state: State | None,
        is_init: torch.Tensor | None,
    ) -> ActResult:
        batch = observation.shape[0]
        if isinstance(observation, TensorDict):  # a dict observation: its entries
            td = observation.to(self.device).copy()
        else:
            td = TensorDict({"observation": observation.to(self.device)}, batch_size=[batch])
        if self.discrete:
            mask = call.mask if call.mask is not None else torch.ones(batch, self.n_actions, dtype=torch.bool)
            td.set(ACTION_MASK, mask.to(self.device))
        if self.recurrent:
            td.set("recurrent_state_h", state[0].to(self.device))
            td.set("recurrent_state_c", state[1].to(self.device))
            td.set("is_init", is_init.to(self.device).reshape(batch, 1))
        module = self.core
        if used is Exploration.random and self.explorer is not None:
            module = self.explorer
            if self.spec.kind == "qvalue":
                eps = self.spec.exploration.epsilon if call.epsilon is None else call.epsilon
                self.explore.eps.fill_(eps)
            else:
                std = self.spec.exploration.noise_std if call.noise_std is None else call.noise_std
                self.explore.sigma.fill_(std)
        with torch.inference_mode(), set_exploration_type(_TYPES[used]), seeded(call.seed, self.device):
            out = module(td)
        parts: tuple[torch.Tensor, ...] = ()
        if self.recurrent:
            parts = (out.get(("next", "recurrent_state_h")), out.get(("next", "recurrent_state_c")))
        info = self._info(out) if call.return_info else None
        return ActResult(out.get("action"), info, used, parts or None)

    def _preprocessed(
        self, observation: torch.Tensor, state: State | None, is_init: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The spec's preprocessing of raw observations; with cat_frames, also the next frame
        history (the last element of ``state``)."""
        x = observation.to(self.device)
        if self.pre_frames is not None:
            x = self.pre_frames(x)
        history = None
        if self.frames is not None:
            x, history = self.frames.step(x, state[-1], is_init)
        if self.post_frames is not None:
            x = self.post_frames(x)
        return x, history

    def _info(self, out: TensorDict) -> dict[str, torch.Tensor]:
        if self.spec.kind == "qvalue":
            return {
                "action_value": out.get("action_value"),
                "chosen_action_value": out.get("chosen_action_value").squeeze(-1),
            }
        if self.spec.kind == "probabilistic":
            info = {"log_prob": out.get("action_log_prob")}
            if not self.discrete:
                info["loc"] = out.get("loc")
                info["scale"] = out.get("scale")
            return info
        return {}


def _apply(specs: list, device: torch.device) -> ApplyTransforms | None:
    module = as_module(specs)
    return None if module is None else module.to(device).eval()

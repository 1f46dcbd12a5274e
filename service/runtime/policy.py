"""Act on a batch of observations with one loaded policy version, under ``inference_mode``.

Every forward pass sets its exploration type explicitly (``set_exploration_type``) and, for
``random``, the exploration parameters of that request; nothing depends on ambient state.
Forward passes are meant to go through the ``MicroBatcher`` (``runtime.batching``), which runs
them one at a time: that is what makes per-request parameters and ``seed`` safe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictSequential
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import LSTMModule, QValueModule

from service.errors import InvalidInput
from service.registry.build import ACTION_MASK, BuiltPolicy, build_policy
from service.registry.preprocess import (
    ApplyTransforms,
    FrameStack,
    as_module,
    preprocessed_shape,
    split_at_frames,
)
from service.registry.spec import (
    DictObservationSpec,
    DiscreteObservationSpec,
    ObservationSpec,
    PolicySpec,
)
from service.runtime.arrays import decode

# Per-env state between steps: (h, c) for an LSTM, then the frame history for cat_frames.
State = tuple[torch.Tensor, ...]


class Exploration(str, Enum):
    deterministic = "deterministic"
    mode = "mode"
    mean = "mean"
    random = "random"


_TYPES = {
    Exploration.deterministic: ExplorationType.DETERMINISTIC,
    Exploration.mode: ExplorationType.MODE,
    Exploration.mean: ExplorationType.MEAN,
    Exploration.random: ExplorationType.RANDOM,
}


@dataclass
class ActResult:
    """What one forward pass produced for a batch of ``B`` observations.

    Attributes:
        action: ``[B]`` int64 (discrete) or ``[B, d]`` float32 (box).
        info: per-observation extras (``action_value``, ``log_prob``…) when asked for.
        exploration: the exploration type actually used (see ``PolicyRuntime.resolve``).
        state: the next per-env state (``PolicyRuntime.zero_state``'s layout), or None.
    """

    action: torch.Tensor
    info: dict[str, torch.Tensor] | None
    exploration: Exploration
    state: State | None
    actions: list | None = None  # ``action`` as Python numbers, when made already

    def rows(self, start: int, stop: int, with_info: bool, actions: list | None = None) -> ActResult:
        """The slice of a batched result that belongs to one caller (``actions``: the batch's
        ``action.tolist()``, made once for all its callers)."""
        info = None
        if with_info and self.info is not None:
            info = {k: v[start:stop] for k, v in self.info.items()}
        state = None
        if self.state is not None:  # copies: a view would keep the whole batch's state alive
            state = tuple(t[start:stop].clone() for t in self.state)
        part = None if actions is None else actions[start:stop]
        return ActResult(self.action[start:stop], info, self.exploration, state, part)

    def payload(self, single: bool) -> dict:
        """The JSON-ready body: ``action`` (single) or ``actions``, ``exploration``, ``info``."""
        actions = self.actions if self.actions is not None else self.action.tolist()
        out: dict = {"exploration": self.exploration.value}
        if single:
            out["action"] = actions[0]
        else:
            out["actions"] = actions
        if self.info is not None:
            columns = {k: v.tolist() for k, v in self.info.items()}
            rows = [{k: col[i] for k, col in columns.items()} for i in range(len(actions))]
            out["info"] = rows[0] if single else rows
        return out


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
    """A policy version ready to act: the built module, its spec and what can be decided once."""

    def __init__(self, spec: PolicySpec, built: BuiltPolicy, device: torch.device) -> None:
        self.spec = spec
        self.device = device
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
        # Fast path: a Q-value or actor policy acting deterministically is its plain networks
        # (+ argmax); the same weights without the TensorDict plumbing (~4x cheaper for small
        # MLPs, and for an LSTM step). The LSTM is stepped as LSTMModule steps it outside
        # recurrent mode: state zeroed at is_init, one time step. Tests check both against the
        # TorchRL module.
        self._plain = self._encoder = self._lstm = None
        dict_obs = isinstance(spec.observation, DictObservationSpec)
        if not dict_obs and spec.kind in ("qvalue", "actor"):
            # every TensorDictModule's network in order (a one-hot encoder, a ConvNet, the MLP),
            # split at the LSTM, without the QValueModule, whose argmax _act_plain does
            mods = [m for m in self.core.module if not isinstance(m, QValueModule)]
            cut = next((i for i, m in enumerate(mods) if isinstance(m, LSTMModule)), None)
            if cut is not None:
                self._lstm = mods[cut].lstm
                self._encoder = _sequence([m.module for m in mods[:cut]])
                mods = mods[cut + 1 :]
            self._plain = _sequence([m.module for m in mods])

    def resolve(self, requested: Exploration) -> Exploration:
        """The exploration actually used for ``requested``.

        ``mode``/``mean`` have no analytical value for TanhNormal: the deterministic action is
        used. Categorical has no mean: its mode is used. Q-value and actor policies are
        deterministic apart from ``random``, so ``mode``/``mean`` equal ``deterministic``.
        """
        dist = self.spec.distribution
        if requested in (Exploration.mode, Exploration.mean):
            if dist == "tanh_normal":
                return Exploration.deterministic
            if dist == "categorical" and requested is Exploration.mean:
                return Exploration.mode
            if dist is None:
                return Exploration.deterministic
        return requested

    def observation_batch(self, rows: list, what: str, policy: str) -> Observations:
        """Validate observations against the spec and stack them: ``[B, d]`` float32 rows of
        numbers (a few rows: ``VectorRows``, made a tensor with their micro-batch), ``[B]`` int64
        for a discrete observation (an integer in ``[0, n)`` each), or a ``[B]`` TensorDict of
        such entries for a dict observation (a JSON object each).

        Raises:
            InvalidInput: naming the offending observation (and entry) and what was expected.
        """
        single = len(rows) == 1 and what == "observation"

        def where(i: int) -> str:
            return what if single else f"{what}[{i}]"

        obs = self.spec.observation
        if isinstance(obs, DictObservationSpec):
            return _dict_batch(obs, rows, where, policy)
        return _leaf_batch(obs, rows, where, policy)

    def observation_of(self, td: TensorDict) -> torch.Tensor | TensorDict:
        """The observation in an environment's tensordict, as a batch of one."""
        obs = self.spec.observation
        if isinstance(obs, DictObservationSpec):
            return td.select(*obs.entries).unsqueeze(0)
        return td["observation"].unsqueeze(0)  # [1, d], or [1] for a discrete observation

    def mask_batch(
        self, masks: list[list[bool]] | None, rows: int, what: str, policy: str
    ) -> torch.Tensor | None:
        """Validate the action masks of a call and stack them into ``[B, n]`` bools.

        One mask per observation, one bool per action, at least one allowed action each.
        ``None`` when the call sends none (and the spec does not require them).

        Raises:
            InvalidInput: naming what does not fit and what was expected.
        """
        if masks is None:
            if self.discrete and self.spec.action.mask_required:
                raise InvalidInput(
                    f"policy {policy} requires an action mask: send '{what}' with the observations"
                )
            return None
        if not self.discrete:
            raise InvalidInput(f"{what} applies to discrete policies; policy {policy} has a box action space")
        if len(masks) != rows:
            raise InvalidInput(
                f"{what} has {len(masks)} masks for {rows} observation(s); send one per observation"
            )
        n = self.n_actions
        for i, row in enumerate(masks):
            where = what if rows == 1 and what == "action_mask" else f"{what}[{i}]"
            if len(row) != n:
                raise InvalidInput(f"{where} has {len(row)} values, policy {policy} has {n} actions")
            if not any(row):
                raise InvalidInput(f"{where} allows no action: at least one of the {n} must be true")
        return torch.tensor(masks, dtype=torch.bool)

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

    def act(
        self,
        observation: Observations,
        *,
        exploration: Exploration = Exploration.deterministic,
        epsilon: float | None = None,
        noise_std: float | None = None,
        seed: int | None = None,
        return_info: bool = False,
        state: State | None = None,
        is_init: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> ActResult:
        """Act on ``observation`` (from ``observation_batch``: already validated).

        For stateful policies ``state`` is the one before this step (``zero_state``'s layout)
        and ``is_init`` (``[B]`` bool) marks the first step of an episode (LSTM state zeroed as in
        TorchRL, frame history refilled); with no state, every observation starts an episode.
        ``mask`` (``[B, n]`` bool, discrete policies) marks the allowed actions; no exploration
        mode answers a masked one.
        """
        used = self.resolve(exploration)
        observation = as_tensor(observation)
        batch = observation.shape[0]
        if self.stateful:
            if state is None:
                state = self.zero_state(batch)
                is_init = torch.ones(batch, dtype=torch.bool)
            elif is_init is None:
                is_init = torch.zeros(batch, dtype=torch.bool)
        history = None
        if not self.light:
            with torch.inference_mode():
                observation, history = self._preprocessed(observation, state, is_init)
        if used is Exploration.deterministic and self._plain is not None:
            parts: tuple[torch.Tensor, ...] = ()
            if self._lstm is not None:
                observation, parts = self._lstm_step(observation, state, is_init)
            result = self._act_plain(observation, return_info, mask)
            parts += () if history is None else (history,)
            result.state = parts or None
            return result
        if isinstance(observation, TensorDict):  # a dict observation: its entries
            td = observation.to(self.device).copy()
        else:
            td = TensorDict({"observation": observation.to(self.device)}, batch_size=[batch])
        if self.discrete:
            if mask is None:
                mask = torch.ones(batch, self.n_actions, dtype=torch.bool)
            td.set(ACTION_MASK, mask.to(self.device))
        if self.recurrent:
            td.set("recurrent_state_h", state[0].to(self.device))
            td.set("recurrent_state_c", state[1].to(self.device))
            td.set("is_init", is_init.to(self.device).reshape(batch, 1))
        module = self.core
        if used is Exploration.random and self.explorer is not None:
            module = self.explorer
            if self.spec.kind == "qvalue":
                eps = self.spec.exploration.epsilon if epsilon is None else epsilon
                self.explore.eps.fill_(eps)
            else:
                std = self.spec.exploration.noise_std if noise_std is None else noise_std
                self.explore.sigma.fill_(std)
        with torch.inference_mode(), set_exploration_type(_TYPES[used]), seeded(seed, self.device):
            out = module(td)
        parts: list[torch.Tensor] = []
        if self.recurrent:
            parts += [out.get(("next", "recurrent_state_h")), out.get(("next", "recurrent_state_c"))]
        if history is not None:
            parts.append(history)
        info = self._info(out) if return_info else None
        return ActResult(out.get("action"), info, used, tuple(parts) if parts else None)

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

    def _lstm_step(
        self, observation: torch.Tensor, state: State, is_init: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One LSTM step as ``LSTMModule`` takes it outside recurrent mode: the encoders, then
        ``(h, c)`` (``[B, layers, hidden]``) zeroed where ``is_init``; the features and the next
        ``(h, c)``."""
        with torch.inference_mode():
            x = observation.to(self.device)
            if self._encoder is not None:
                x = self._encoder(x)
            keep = (~is_init.to(self.device)).reshape(-1, 1, 1)
            h, c = (torch.where(keep, t.to(self.device), 0.0).transpose(0, 1).contiguous() for t in state[:2])
            y, (h, c) = self._lstm(x.unsqueeze(1), (h, c))
            return y.squeeze(1), (h.transpose(0, 1), c.transpose(0, 1))

    def _act_plain(
        self, observation: torch.Tensor, return_info: bool, mask: torch.Tensor | None
    ) -> ActResult:
        with torch.inference_mode():
            out = self._plain(observation.to(self.device))
            if mask is not None:  # as QValueModule(action_mask_key=...) does
                out = torch.where(mask.to(self.device), out, torch.finfo(out.dtype).min)
        if self.spec.kind == "qvalue":
            best = out.max(-1)
            info = {"action_value": out, "chosen_action_value": best.values} if return_info else None
            return ActResult(best.indices, info, Exploration.deterministic, None)
        return ActResult(out, {} if return_info else None, Exploration.deterministic, None)

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


def _sequence(nets: list[torch.nn.Module]) -> torch.nn.Module | None:
    if not nets:
        return None
    return nets[0] if len(nets) == 1 else torch.nn.Sequential(*nets)


class VectorRows(list):
    """A few rows of a vector observation, checked, not yet a tensor: the micro-batcher makes
    one tensor of the rows of every call in a forward pass (``stack_observations``), where one
    tensor per call and a ``torch.cat`` cost ~5 µs more per call."""

    __slots__ = ()

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self, dtype=np.float32))


Observations = torch.Tensor | TensorDict | VectorRows


def as_tensor(observation: Observations) -> torch.Tensor | TensorDict:
    return observation.tensor() if type(observation) is VectorRows else observation


def stack_observations(parts: list[Observations]) -> torch.Tensor | TensorDict:
    """The observations of the calls in one forward pass, concatenated along the batch."""
    if all(type(p) is VectorRows for p in parts):
        return VectorRows(parts[0] if len(parts) == 1 else [r for p in parts for r in p]).tensor()
    tensors = [as_tensor(p) for p in parts]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _leaf_batch(
    spec: ObservationSpec | DiscreteObservationSpec, rows: list, where: Callable[[int], str], policy: str
) -> torch.Tensor:
    if spec.discrete:
        n = spec.n
        for i, x in enumerate(rows):
            if type(x) is not int or not 0 <= x < n:
                raise InvalidInput(
                    f"{where(i)} is {_short(x)}; policy {policy} expects an integer in [0, {n})"
                )
        return torch.tensor(rows, dtype=torch.int64)
    if not spec.vector:  # an image (or any tensor): nested lists or raw bytes
        arrays = [decode(row, spec, where(i), policy) for i, row in enumerate(rows)]
        return torch.from_numpy(np.stack(arrays))  # one copy, into a writable batch
    dim = spec.dim
    for i, row in enumerate(rows):
        if type(row) is not list or len(row) != dim:
            got = f"shape [{len(row)}]" if type(row) is list else _kind(row)
            raise InvalidInput(f"{where(i)} has {got}, policy {policy} expects [{dim}]")
    if len(rows) * dim <= _SMALL:
        # a few numbers (the act path of vector policies): checked in Python, ~3x cheaper than
        # numpy's errstate + isfinite; JSON numbers are finite, float32 bounds them further
        for i, row in enumerate(rows):
            if not all(-_F32_MAX <= x <= _F32_MAX for x in row):
                raise InvalidInput(f"{where(i)} holds values that are not finite as float32")
        return VectorRows(rows)  # made a tensor with the rest of its micro-batch
    with np.errstate(over="ignore"):  # a number past float32's range becomes inf: refused below
        array = np.asarray(rows, dtype=np.float32)
    # numpy's check: torch.isfinite(...).all() on a small tensor costs ~10x more (dispatch)
    finite = np.isfinite(array)
    if not finite.all():
        i = int(np.argmin(finite.all(axis=1)))
        raise InvalidInput(f"{where(i)} holds values that are not finite as float32")
    return torch.from_numpy(array)


_SMALL = 256  # numbers in a batch below which _leaf_batch checks them in Python
_F32_MAX = float(np.finfo(np.float32).max)


def _dict_batch(
    spec: DictObservationSpec, rows: list, where: Callable[[int], str], policy: str
) -> TensorDict:
    names = list(spec.entries)
    for i, row in enumerate(rows):
        if type(row) is not dict:
            raise InvalidInput(
                f"{where(i)} is {_short(row)}; policy {policy} expects an object with entries {names}"
            )
        if row.keys() != spec.entries.keys():
            missing = [n for n in names if n not in row]
            unexpected = sorted(k for k in row if k not in spec.entries)
            problems = ([f"misses {missing}"] if missing else []) + (
                [f"has unexpected {[u[:40] for u in unexpected[:5]]}"] if unexpected else []
            )
            raise InvalidInput(
                f"{where(i)} {' and '.join(problems)}; policy {policy} expects entries {names}"
            )
    entries = {
        name: _leaf_batch(entry, [row[name] for row in rows], lambda i, n=name: f"{where(i)}[{n!r}]", policy)
        for name, entry in spec.entries.items()
    }
    return TensorDict(entries, batch_size=[len(rows)])


def _kind(value: object) -> str:
    """What a client sent instead of a list, in words."""
    if isinstance(value, (int, float)):
        return "a single number"
    return "an object" if isinstance(value, dict) else f"a {type(value).__name__}"


def _short(value: object) -> str:
    """A client value for an error message: its type, or itself when short."""
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def _apply(specs: list, device: torch.device) -> ApplyTransforms | None:
    module = as_module(specs)
    return None if module is None else module.to(device).eval()

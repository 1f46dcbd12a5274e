"""One act call as it travels the act path, and what comes back.

``ActCall`` carries everything a forward pass needs from one caller — the checked observations,
the exploration asked for with its parameters and seed, the recurrent state and ``is_init``, the
action mask, whether to return info — so no layer threads them by hand. Calls with equal
``batch_key`` may share a forward pass: ``join`` concatenates them into one call and ``split``
hands each caller its rows of the ``ActResult``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tensordict import TensorDict

from service.exploration import Exploration

# Per-env state between steps: (h, c) for an LSTM, then the frame history for cat_frames.
State = tuple[torch.Tensor, ...]


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


def as_list(values: torch.Tensor | TensorDict) -> list:
    """A batch as Python values, a row each: numbers or lists, or for a TensorDict (a composite
    action, per-head log-probs) one ``{leaf: value}`` object per row."""
    if isinstance(values, TensorDict):
        columns = {key: as_list(values.get(key)) for key in values.keys()}
        return [{k: col[i] for k, col in columns.items()} for i in range(values.batch_size[0])]
    return values.tolist()


_tickets = itertools.count(1)


class BatchKey(NamedTuple):
    """Calls with equal keys may share a forward pass: same policy version, same exploration.

    ``ticket`` is 0 for every unseeded call and unique for each seeded one: a seeded call's
    random draws must not depend on who else is in the batch, so it always goes alone.
    """

    runtime: object  # the PolicyRuntime (hashed by identity)
    exploration: Exploration
    epsilon: float | None
    noise_std: float | None
    seed: int | None
    ticket: int = 0


@dataclass(slots=True)
class ActCall:
    """One caller's forward pass.

    ``exploration`` is the type the policy uses (``exploration.effective``); ``epsilon`` and
    ``noise_std`` ``None`` mean the spec's defaults. For stateful policies ``state`` is the one
    before this step (``PolicyRuntime.zero_state``'s layout) and ``is_init`` (``[B]`` bool) marks
    episode starts; ``state=None`` means every observation starts an episode. ``mask``
    (``[B, n]`` bool) marks the allowed actions of a discrete policy.
    """

    obs: Observations
    exploration: Exploration = Exploration.deterministic
    epsilon: float | None = None
    noise_std: float | None = None
    seed: int | None = None
    return_info: bool = False
    state: State | None = None
    is_init: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def batch_key(self, runtime: object) -> BatchKey:
        ticket = next(_tickets) if self.seed is not None else 0
        return BatchKey(runtime, self.exploration, self.epsilon, self.noise_std, self.seed, ticket)


def episode_state(
    call: ActCall, batch: int, zero_state: Callable[[int], State | None]
) -> tuple[State | None, torch.Tensor | None]:
    """A stateful policy's state and ``is_init`` for ``call``: without a state every row starts
    an episode (``zero_state``, all ``is_init``); without ``is_init`` none does."""
    if call.state is None:
        return zero_state(batch), torch.ones(batch, dtype=torch.bool)
    if call.is_init is None:
        return call.state, torch.zeros(batch, dtype=torch.bool)
    return call.state, call.is_init


def join(calls: list[ActCall], n_actions: int | None) -> ActCall:
    """The calls of one forward pass (equal batch keys) as one call over all their rows.

    A caller without a mask allows every action (``n_actions`` of them); a caller without
    ``is_init`` starts no episode.
    """
    if len(calls) == 1:
        return calls[0]
    first = calls[0]
    state = is_init = mask = None
    if first.state is not None:
        state = tuple(torch.cat(parts) for parts in zip(*(c.state for c in calls), strict=True))
        is_init = torch.cat(
            [c.is_init if c.is_init is not None else torch.zeros(len(c.obs), dtype=torch.bool) for c in calls]
        )
    if any(c.mask is not None for c in calls):
        mask = torch.cat(
            [
                c.mask if c.mask is not None else torch.ones(len(c.obs), n_actions, dtype=torch.bool)
                for c in calls
            ]
        )
    return ActCall(
        stack_observations([c.obs for c in calls]),
        first.exploration,
        first.epsilon,
        first.noise_std,
        first.seed,
        any(c.return_info for c in calls),
        state,
        is_init,
        mask,
    )


@dataclass
class ActResult:
    """What one forward pass produced for a batch of ``B`` observations.

    Attributes:
        action: ``[B]`` int64 (discrete), ``[B, d]`` float32 (box), ``[B, k]`` int64
            (multi-discrete) or a ``[B]`` TensorDict of leaves (composite).
        info: per-observation extras (``action_value``, ``log_prob``…) when asked for.
        exploration: the exploration type actually used.
        state: the next per-env state (``PolicyRuntime.zero_state``'s layout), or None.
        actions: ``action`` as Python numbers, when made already.
    """

    action: torch.Tensor
    info: dict[str, torch.Tensor] | None
    exploration: Exploration
    state: State | None
    actions: list | None = None

    def rows(
        self,
        start: int,
        stop: int,
        with_info: bool,
        actions: list,
        host_state: list[np.ndarray] | None,
    ) -> ActResult:
        """The slice of a batched result that belongs to one caller, its ``action`` tensor sliced
        when first read (``actions``: the batch's ``action.tolist()``, made once for all its
        callers; ``host_state``: ``state`` as numpy arrays, when it is on the CPU —
        ``host_arrays``)."""
        info = None
        if with_info and self.info is not None:
            info = {k: v[start:stop] for k, v in self.info.items()}
        state = None
        # copies: a view would keep the whole batch's state alive
        if host_state is not None:  # numpy's slice and copy: ~2.5x cheaper than torch's
            state = tuple(torch.from_numpy(a[start:stop].copy()) for a in host_state)
        elif self.state is not None:
            state = tuple(t[start:stop].clone() for t in self.state)
        return _CallerRows(self.action, start, stop, info, self.exploration, state, actions[start:stop])


class _CallerRows(ActResult):
    """A caller's rows of a batched result whose ``action`` tensor is sliced when first read.
    The act route answers from ``actions`` and never reads it; a torch slice per caller was
    most of ``split``'s cost (~2 µs a caller against ~0.5 µs for the rest of ``rows``)."""

    def __init__(self, batch_action, start, stop, info, exploration, state, actions) -> None:
        self._batch_action, self._span = batch_action, (start, stop)
        self.info, self.exploration, self.state, self.actions = info, exploration, state, actions

    @property
    def action(self):
        if self._span is not None:
            start, stop = self._span
            self._batch_action, self._span = self._batch_action[start:stop], None
        return self._batch_action

    @action.setter
    def action(self, value) -> None:
        self._batch_action, self._span = value, None


def host_arrays(state: State | None) -> list[np.ndarray] | None:
    """``state`` as numpy arrays sharing its memory, when every tensor is a CPU tensor numpy
    can view (``None`` otherwise: on a GPU, or a dtype numpy lacks)."""
    if state is None or any(
        t.device.type != "cpu" or t.dtype not in _NUMPY_DTYPES or t.requires_grad for t in state
    ):
        return None
    return [t.numpy() for t in state]


_NUMPY_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool})


def split(result: ActResult, calls: list[ActCall]) -> list[ActResult]:
    """Each caller's rows of a joined call's result, in the order of ``calls``."""
    if len(calls) == 1:
        return [result]
    out, start = [], 0
    actions = as_list(result.action)  # once for the batch: each caller's payload slices it
    host_state = host_arrays(result.state)
    for call in calls:
        stop = start + len(call.obs)
        out.append(result.rows(start, stop, call.return_info, actions, host_state))
        start = stop
    return out

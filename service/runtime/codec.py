"""The act path's codec: a client's rows -> a checked batch, and a result -> the JSON payload.

``decode`` validates observations and action masks against the version's spec with the
client-facing error wording (``InvalidInput`` naming the row, the entry and what was expected)
and stacks them: ``[B, d]`` float32 rows (a few rows stay ``VectorRows`` until the micro-batcher
makes one tensor of its whole pass), ``[B]`` int64 for a discrete observation, a ``[B]``
TensorDict for a dict observation, decoded arrays for images. ``encode`` turns an ``ActResult``
into the ``/v1`` answer. Another wire format (the Open Inference Protocol) is another codec over
the same batch and result types.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tensordict import TensorDict

from service.errors import InvalidInput
from service.registry.spec import (
    DictObservationSpec,
    DiscreteObservationSpec,
    ObservationSpec,
    PolicySpec,
)
from service.runtime.arrays import decode as decode_array
from service.runtime.call import ActResult, Observations, VectorRows, as_list


class Codec:
    """The ``/v1`` JSON codec of one policy version (its spec)."""

    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec
        self.discrete = spec.action.type == "discrete"
        self.n_actions = spec.action.n if self.discrete else None
        self.mask_required = self.discrete and spec.action.mask_required

    def decode(
        self, rows: list, masks: list[list[bool]] | None, single: bool, policy: str
    ) -> tuple[Observations, torch.Tensor | None]:
        """The observations and action masks of one call, checked and stacked."""
        if single:
            return (
                self.observation_batch(rows, "observation", policy),
                self.mask_batch(masks, len(rows), "action_mask", policy),
            )
        return (
            self.observation_batch(rows, "observations", policy),
            self.mask_batch(masks, len(rows), "action_masks", policy),
        )

    def observation_batch(self, rows: list, what: str, policy: str) -> Observations:
        """Validate observations against the spec and stack them.

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
            if self.mask_required:
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

    def from_env(self, td: TensorDict) -> tuple[torch.Tensor | TensorDict, torch.Tensor | None]:
        """The observation in an environment's tensordict as a batch of one, and the env's own
        action mask when it gives one (rollouts)."""
        obs = self.spec.observation
        if isinstance(obs, DictObservationSpec):
            observation = td.select(*obs.entries).unsqueeze(0)
        else:
            observation = td["observation"].unsqueeze(0)  # [1, d], or [1] for a discrete one
        mask = td["action_mask"].unsqueeze(0) if "action_mask" in td.keys() else None
        return observation, mask

    @staticmethod
    def encode(result: ActResult, single: bool) -> dict:
        """The JSON-ready body: ``action`` (single) or ``actions``, ``exploration``, ``info``."""
        actions = result.actions if result.actions is not None else as_list(result.action)
        out: dict = {"exploration": result.exploration.value}
        if single:
            out["action"] = actions[0]
        else:
            out["actions"] = actions
        if result.info is not None:
            columns = {k: as_list(v) for k, v in result.info.items()}
            rows = [{k: col[i] for k, col in columns.items()} for i in range(len(actions))]
            out["info"] = rows[0] if single else rows
        return out


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
        arrays = [decode_array(row, spec, where(i), policy) for i, row in enumerate(rows)]
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

"""Exploration types and the rules that pick one, in one torch-free module.

A request, a session and a job each may ask for an exploration type and its parameters; the
first that says one wins, else ``deterministic`` (``ExplorationParams.over`` + ``.type``). Which
type a policy actually uses for it is ``effective``: some distributions have no analytical mode
or mean. ``runtime.policy`` maps these onto TorchRL's ``ExplorationType``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Exploration(str, Enum):
    deterministic = "deterministic"
    mode = "mode"
    mean = "mean"
    random = "random"


@dataclass(slots=True)
class ExplorationParams:
    """Exploration asked for by a call (or a session, as its default); ``None`` fields fall back
    to the next one's (``over``), and in the end to the spec's parameters and ``deterministic``."""

    exploration: Exploration | None = None
    epsilon: float | None = None
    noise_std: float | None = None

    def over(self, base: ExplorationParams) -> ExplorationParams:
        """These fields where they are set, else ``base``'s."""
        return ExplorationParams(
            self.exploration if self.exploration is not None else base.exploration,
            self.epsilon if self.epsilon is not None else base.epsilon,
            self.noise_std if self.noise_std is not None else base.noise_std,
        )

    @property
    def type(self) -> Exploration:
        """The exploration asked for, ``deterministic`` when nobody asked."""
        return self.exploration or Exploration.deterministic


def effective(requested: Exploration, distribution: str | None) -> Exploration:
    """The exploration a policy uses for ``requested``.

    ``mode``/``mean`` have no analytical value for TanhNormal: the deterministic action is used.
    Categorical has no mean: its mode is used. Q-value and actor policies (no distribution) are
    deterministic apart from ``random``, so ``mode``/``mean`` equal ``deterministic``.
    """
    if requested is Exploration.mode or requested is Exploration.mean:
        if distribution == "tanh_normal" or distribution is None:
            return Exploration.deterministic
        if distribution == "categorical" and requested is Exploration.mean:
            return Exploration.mode
    return requested

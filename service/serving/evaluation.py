"""Off-policy evaluation: how a version would have done on a logged dataset, before it goes live
(``POST /v1/policies/{name}/evaluate``).

``wis``: weighted importance sampling. Each logged episode's weight is prod_t pi(a_t|s_t) /
mu(a_t|s_t), mu the propensity logged with the action (``infos.log_prob``), pi the version's
probability of the same action (``runtime.evaluation``); the estimate is sum(w G) / sum(w) of
the episodes' returns G, its 95% interval the 2.5 / 97.5 percentiles of the estimate over
bootstrap resamples of the episodes. Weights that are all zero (no logged episode is possible
under the version) are refused (422), not answered with a confident interval.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.datasets.store import PROPENSITY, DatasetStore, check_id
from service.errors import InvalidInput
from service.exploration import Exploration
from service.registry.registry import Registry
from service.runtime.evaluation import action_log_probs, check_evaluable


@dataclass(slots=True)
class EvaluateParams:
    dataset: str
    version: int | None = None
    method: str = "wis"
    exploration: Exploration = Exploration.deterministic
    epsilon: float | None = None
    gamma: float = 1.0
    bootstrap: int = 1000
    seed: int = 0


@dataclass
class Logged:
    """A dataset's episodes as arrays: per step the observation, action and log-propensity,
    per episode the (discounted) return and the steps it spans."""

    obs: torch.Tensor
    actions: torch.Tensor
    log_mu: np.ndarray
    returns: np.ndarray
    bounds: np.ndarray  # episode i is steps bounds[i]:bounds[i+1]


def read_logged(store: DatasetStore, dataset_id: str, gamma: float) -> Logged:
    obs, actions, log_mu, returns, bounds = [], [], [], [], [0]
    for ep in store.open(dataset_id).iterate_episodes():
        steps = len(ep.rewards)
        if steps == 0:
            continue
        obs.append(np.asarray(ep.observations)[:-1])
        actions.append(np.asarray(ep.actions))
        infos = ep.infos or {}
        logged_mu = infos.get(PROPENSITY)
        log_mu.append(
            np.full(steps, np.nan) if logged_mu is None else np.asarray(logged_mu, np.float64)[:steps]
        )
        returns.append(float(np.sum(np.asarray(ep.rewards, np.float64) * gamma ** np.arange(steps))))
        bounds.append(bounds[-1] + steps)
    if not returns:
        raise InvalidInput(f"dataset {dataset_id!r} holds no episodes")
    x = torch.from_numpy(np.concatenate(obs))
    a = torch.from_numpy(np.concatenate(actions))
    return Logged(
        x.float() if x.is_floating_point() else x.long(),
        a.float() if a.is_floating_point() else a.long(),
        np.concatenate(log_mu),
        np.asarray(returns),
        np.asarray(bounds),
    )


def wis(log_w: np.ndarray, returns: np.ndarray) -> float:
    w = np.exp(log_w - log_w.max())
    return float(np.sum(w * returns) / np.sum(w))


class EvaluationService:
    def __init__(self, registry: Registry, datasets: DatasetStore) -> None:
        self.registry = registry
        self.datasets = datasets

    async def evaluate(self, name: str, p: EvaluateParams) -> dict[str, Any]:
        loaded = self.registry.resolve(name, p.version)
        check_evaluable(loaded.runtime, name)
        check_id(p.dataset)
        if not self.datasets.exists(p.dataset):
            raise InvalidInput(f"dataset {p.dataset!r} not found (GET /v1/datasets lists them)")
        out = await asyncio.to_thread(self._wis, loaded, p)
        return {"policy": name, "version": loaded.version, "dataset": p.dataset, "method": p.method, **out}

    def _wis(self, loaded, p: EvaluateParams) -> dict[str, Any]:
        runtime, spec = loaded.runtime, loaded.spec
        logged = read_logged(self.datasets, p.dataset, p.gamma)
        self._check_fits(spec, logged, p.dataset, loaded.name)
        if np.isnan(logged.log_mu).any():
            raise InvalidInput(
                f"dataset {p.dataset!r} has no propensities (infos.log_prob) for every step: WIS needs "
                "the probability each logged action had (record sessions with 'record', or log them)"
            )
        log_pi = action_log_probs(runtime, logged.obs, logged.actions, p.exploration, p.epsilon).numpy()
        per_step = log_pi - logged.log_mu
        log_w = np.add.reduceat(per_step, logged.bounds[:-1])
        if not np.isfinite(log_w).any():
            raise InvalidInput(
                f"every logged episode has weight 0 under {loaded.name} v{loaded.version} "
                f"({p.exploration.value}): it would never take some logged action, so the data say "
                "nothing about its return; evaluate it with exploration 'random' or on other data"
            )
        estimate = wis(log_w, logged.returns)
        rng = np.random.default_rng(p.seed)
        n = len(log_w)
        boots = []
        for _ in range(p.bootstrap):
            idx = rng.integers(0, n, n)
            if np.isfinite(log_w[idx]).any():
                boots.append(wis(log_w[idx], logged.returns[idx]))
        w = np.exp(log_w - log_w[np.isfinite(log_w)].max())
        ess = float(w.sum() ** 2 / np.sum(w * w))
        lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (math.nan, math.nan)
        return {
            "estimate": estimate,
            "ci95": [float(lo), float(hi)],
            "episodes": n,
            "effective_sample_size": ess,
            "dataset_mean_return": float(np.mean(logged.returns)),
            "exploration": p.exploration.value,
            "gamma": p.gamma,
        }

    @staticmethod
    def _check_fits(spec, logged: Logged, dataset: str, policy: str) -> None:
        obs = spec.observation
        if obs.discrete:
            fits = logged.obs.ndim == 1
        else:
            fits = list(logged.obs.shape[1:]) == list(obs.shape)
        if spec.action.type == "discrete":
            fits = fits and logged.actions.ndim == 1 and not logged.actions.is_floating_point()
            fits = fits and int(logged.actions.max()) < spec.action.n and int(logged.actions.min()) >= 0
        else:
            fits = fits and list(logged.actions.shape[1:]) == list(spec.action.shape)
        if not fits:
            raise InvalidInput(
                f"dataset {dataset!r} (observations {list(logged.obs.shape[1:])}, actions "
                f"{list(logged.actions.shape[1:]) or 'discrete'}) does not fit policy {policy} "
                f"({spec.observation.model_dump(exclude_none=True)}, "
                f"{spec.action.model_dump(exclude_none=True)})"
            )

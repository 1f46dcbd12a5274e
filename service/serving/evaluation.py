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
from service.errors import Busy, InvalidInput
from service.exploration import Exploration
from service.registry.registry import Registry
from service.runtime.evaluation import action_log_probs, action_probs, check_evaluable


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
    next_obs: torch.Tensor
    rewards: torch.Tensor  # [N] float32
    terminated: torch.Tensor  # [N] bool


def read_logged(store: DatasetStore, dataset_id: str, gamma: float) -> Logged:
    obs, actions, log_mu, returns, bounds = [], [], [], [], [0]
    next_obs, rewards, terminated = [], [], []
    for ep in store.open(dataset_id).iterate_episodes():
        steps = len(ep.rewards)
        if steps == 0:
            continue
        obs.append(np.asarray(ep.observations)[:-1])
        next_obs.append(np.asarray(ep.observations)[1:])
        rewards.append(np.asarray(ep.rewards, np.float32))
        terminated.append(np.asarray(ep.terminations, bool))
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

    def typed(parts: list) -> torch.Tensor:
        x = torch.from_numpy(np.concatenate(parts))
        return x.float() if x.is_floating_point() else x.long()

    return Logged(
        typed(obs),
        typed(actions),
        np.concatenate(log_mu),
        np.asarray(returns),
        np.asarray(bounds),
        typed(next_obs),
        torch.from_numpy(np.concatenate(rewards)),
        torch.from_numpy(np.concatenate(terminated)),
    )


FQE_ROUNDS, FQE_STEPS, FQE_BATCH = 500, 20, 512  # target refreshes (gamma^500 < 1%), steps each, batch


def _features(obs: torch.Tensor, spec) -> torch.Tensor:
    """The Q-network's input: the observation (one-hot for a discrete one)."""
    if spec.observation.discrete:
        return torch.nn.functional.one_hot(obs.long(), spec.observation.n).float()
    return obs.float()


def fit_q(logged: Logged, pi_next: torch.Tensor, spec, gamma: float, seed: int) -> torch.nn.Module:
    """FQE's Q-network, fitted to the logged transitions (a 256x256 MLP, Adam, Huber loss)."""
    from torchrl.modules import MLP

    torch.manual_seed(seed)
    n = spec.action.n
    x, x_next = _features(logged.obs, spec), _features(logged.next_obs, spec)
    q = MLP(in_features=x.shape[-1], out_features=n, num_cells=[256, 256])
    target = MLP(in_features=x.shape[-1], out_features=n, num_cells=[256, 256])
    optim = torch.optim.Adam(q.parameters(), lr=1e-3)
    actions = logged.actions.long()
    keep = (~logged.terminated).float()
    size = x.shape[0]
    for _ in range(FQE_ROUNDS):
        target.load_state_dict(q.state_dict())
        with torch.no_grad():
            y = logged.rewards + gamma * keep * (target(x_next) * pi_next).sum(-1)
        for _ in range(FQE_STEPS):
            idx = torch.randint(0, size, (min(FQE_BATCH, size),))
            pred = q(x[idx]).gather(-1, actions[idx].unsqueeze(-1)).squeeze(-1)
            loss = torch.nn.functional.smooth_l1_loss(pred, y[idx])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
    return q.eval()


def wis(log_w: np.ndarray, returns: np.ndarray) -> float:
    w = np.exp(log_w - log_w.max())
    return float(np.sum(w * returns) / np.sum(w))


class EvaluationService:
    def __init__(self, registry: Registry, datasets: DatasetStore) -> None:
        self.registry = registry
        self.datasets = datasets
        self._running = False  # one evaluation at a time: each takes a core for seconds

    async def evaluate(self, name: str, p: EvaluateParams) -> dict[str, Any]:
        loaded = self.registry.resolve(name, p.version)
        check_evaluable(loaded.runtime, name)
        check_id(p.dataset)
        if not self.datasets.exists(p.dataset):
            raise InvalidInput(f"dataset {p.dataset!r} not found (GET /v1/datasets lists them)")
        method = self._wis if p.method == "wis" else self._fqe
        if self._running:
            raise Busy("an off-policy evaluation is running; retry when it is done", retry_after_s=10)
        self._running = True
        try:
            out = await asyncio.to_thread(method, loaded, p)
        finally:
            self._running = False
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

    def _fqe(self, loaded, p: EvaluateParams) -> dict[str, Any]:
        """Fitted Q evaluation: Q(s, a) of the version fitted to the logged transitions by
        repeated regression on r + gamma (1 - terminated) sum_a' pi(a'|s') Q_target(s', a')
        (a truncation bootstraps), then averaged over the logged episodes' first states under
        pi. Discrete actions; the interval resamples the first states (the fitted Q held fixed:
        it leaves out the fit's own error)."""
        runtime, spec = loaded.runtime, loaded.spec
        logged = read_logged(self.datasets, p.dataset, p.gamma)
        self._check_fits(spec, logged, p.dataset, loaded.name)
        if p.gamma >= 1:
            raise InvalidInput(
                "fqe needs gamma < 1 (e.g. 0.99): an undiscounted Q of a time-limited task is not Markov"
            )
        pi_next = action_probs(runtime, logged.next_obs, p.exploration, p.epsilon)
        first = logged.obs[torch.from_numpy(logged.bounds[:-1])]
        pi_first = action_probs(runtime, first, p.exploration, p.epsilon)
        q = fit_q(logged, pi_next, spec, p.gamma, p.seed)
        with torch.no_grad():
            values = (q(_features(first, spec)) * pi_first).sum(-1).numpy().astype(np.float64)
        rng = np.random.default_rng(p.seed)
        boots = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(p.bootstrap)]
        lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (math.nan, math.nan)
        return {
            "estimate": float(values.mean()),
            "ci95": [float(lo), float(hi)],
            "episodes": len(values),
            "effective_sample_size": float(len(values)),
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

"""What a served version would have done on logged data: log pi(a | s) of given actions, and its
own (deterministic) actions, over a whole dataset at once (off-policy evaluation's inputs).

Stateless vector or discrete policies only (a recurrent policy's probabilities depend on the
state its own episode would have carried); Q-value policies are greedy (``deterministic``) or
epsilon-greedy (``random``), probabilistic ones take their distribution's log-prob (``random``)
or their mode (``deterministic``).
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict

from service.errors import InvalidInput
from service.exploration import Exploration
from service.runtime.call import ActCall
from service.runtime.policy import PolicyRuntime

CHUNK = 4096  # observations per forward pass


def check_evaluable(runtime: PolicyRuntime, policy: str) -> None:
    spec = runtime.spec
    if not isinstance(runtime, PolicyRuntime) or runtime.stateful or not runtime.light:
        raise InvalidInput(
            f"policy {policy} cannot be evaluated off-policy here: only stateless policies over vector "
            "or discrete observations without preprocessing (not recurrent, pixel or program policies)"
        )
    if spec.kind == "actor":
        raise InvalidInput(
            f"policy {policy} is a deterministic actor: off-policy evaluation takes discrete policies"
        )


def greedy_actions(runtime: PolicyRuntime, obs: torch.Tensor) -> torch.Tensor:
    """The version's deterministic action for each observation."""
    out = []
    for i in range(0, obs.shape[0], CHUNK):
        result = runtime.forward(ActCall(obs[i : i + CHUNK], Exploration.deterministic))
        out.append(result.action)
    return torch.cat(out)


def action_log_probs(
    runtime: PolicyRuntime,
    obs: torch.Tensor,
    actions: torch.Tensor,
    exploration: Exploration,
    epsilon: float | None,
) -> torch.Tensor:
    """log pi(a | s) of each logged (s, a) under the version with ``exploration`` (float64)."""
    spec = runtime.spec
    used = runtime.effective(exploration)
    if spec.kind == "qvalue" or used is not Exploration.random:
        greedy = greedy_actions(runtime, obs)
        same = (greedy.reshape(actions.shape) == actions).reshape(actions.shape[0], -1).all(-1)
        if spec.kind == "qvalue" and used is Exploration.random:
            eps = spec.exploration.epsilon if epsilon is None else epsilon
            n = spec.action.n
            return torch.log(eps / n + (1 - eps) * same.to(torch.float64))
        if spec.action.type == "box":
            raise InvalidInput(
                "a deterministic box policy gives logged actions no probability: evaluate it with "
                "exploration 'random' (its distribution) or method 'fqe'"
            )
        return torch.where(same, 0.0, -math.inf).to(torch.float64)
    out = []
    (actor,) = list(runtime.core.module)[-1:]
    with torch.inference_mode():
        for i in range(0, obs.shape[0], CHUNK):
            td = TensorDict(
                {"observation": obs[i : i + CHUNK].to(runtime.device)},
                batch_size=[min(CHUNK, obs.shape[0] - i)],
            )
            for module in list(runtime.core.module)[:-1]:
                td = module(td)
            a = actions[i : i + CHUNK].to(runtime.device)
            if spec.action.type == "box":  # just inside the bounds (a TanhNormal is infinite on them)
                low = torch.tensor(spec.action.low, device=runtime.device)
                high = torch.tensor(spec.action.high, device=runtime.device)
                margin = 1e-4 * (high - low)
                a = a.clamp(low + margin, high - margin)
            out.append(actor.get_dist(td).log_prob(a).to(torch.float64).reshape(a.shape[0], -1).sum(-1))
    return torch.cat(out).cpu()


def action_probs(
    runtime: PolicyRuntime, obs: torch.Tensor, exploration: Exploration, epsilon: float | None
) -> torch.Tensor:
    """pi(. | s) of a discrete policy for each observation: ``[N, n]`` float32."""
    spec = runtime.spec
    if spec.action.type != "discrete":
        raise InvalidInput("fitted Q evaluation here takes discrete actions")
    n = spec.action.n
    used = runtime.effective(exploration)
    if spec.kind == "qvalue" or used is not Exploration.random:
        one_hot = torch.nn.functional.one_hot(greedy_actions(runtime, obs).reshape(-1).long(), n).float()
        if spec.kind == "qvalue" and used is Exploration.random:
            eps = spec.exploration.epsilon if epsilon is None else epsilon
            return eps / n + (1 - eps) * one_hot
        return one_hot
    out = []
    actor = list(runtime.core.module)[-1]
    with torch.inference_mode():
        for i in range(0, obs.shape[0], CHUNK):
            x = obs[i : i + CHUNK].to(runtime.device)
            td = TensorDict({"observation": x}, batch_size=[x.shape[0]])
            for module in list(runtime.core.module)[:-1]:
                td = module(td)
            out.append(actor.get_dist(td).probs.float().cpu())
    return torch.cat(out)

"""The shared training loop's choices: which weights are published, and what is reported."""

from __future__ import annotations

import torch

from service.training.common import (
    HELDOUT_SEED,
    VALIDATION_SEED,
    LoopResult,
    PeriodicEvaluation,
    evaluate,
    package,
    select_weights,
    state_of,
)
from service.training.dqn import DQN, DQNConfig

CFG = {"num_cells": [16], "eval_episodes": 3}


def _dqn(seed: int) -> DQN:
    torch.manual_seed(seed)
    return DQN(DQNConfig.with_defaults(CFG, env_id="CartPole-v1", total_frames=100, seed=seed))


def _candidates() -> dict[str, dict[str, torch.Tensor]]:
    return {f"weights-{s}": state_of(_dqn(s).built) for s in range(4)}


def test_weights_are_chosen_on_validation_seeds_and_reported_on_held_out_seeds():
    algo = _dqn(0)
    device = torch.device("cpu")
    candidates = _candidates()
    chosen = select_weights(algo.spec, "CartPole-v1", device, candidates, episodes=3)
    scorer = _dqn(0).built
    expected = {}
    for label, state in candidates.items():
        scorer.core.load_state_dict(state)
        expected[label] = evaluate("CartPole-v1", scorer, device, 3, VALIDATION_SEED)
    assert chosen.validation == expected
    assert chosen.label == max(expected, key=expected.get)
    scorer.core.load_state_dict(candidates[chosen.label])
    assert chosen.heldout_return == evaluate("CartPole-v1", scorer, device, 3, HELDOUT_SEED)


def test_packaging_leaves_the_trained_module_and_spec_as_they_are():
    """The periodic-evaluation choice between the final and the best weights, packaged: the
    trained module and its spec are left as they were."""
    algo = _dqn(0)
    before = state_of(algo.built)
    config = DQNConfig.with_defaults(CFG, env_id="CartPole-v1", total_frames=100, seed=0)
    choice = PeriodicEvaluation(algo, config)
    choice.best_state, choice.best_frames = state_of(_dqn(1).built), 50
    loop = LoopResult(100, 0, False, [])
    trained = package(algo, config, loop, choice.choose(loop), start=0.0)
    after = state_of(algo.built)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert algo.spec.provenance is None
    prov = trained.spec.provenance
    validation, held_out = prov["validation_seeds"], prov["eval_seeds"]
    assert validation == [VALIDATION_SEED, VALIDATION_SEED + 2] and held_out == [
        HELDOUT_SEED,
        HELDOUT_SEED + 2,
    ]
    assert validation[1] < held_out[0]  # disjoint ranges
    assert set(prov["validation_mean_return"]) == {"final", "best periodic evaluation at 50"}
    assert prov["weights"] == max(prov["validation_mean_return"], key=prov["validation_mean_return"].get)
    assert prov["eval_mean_return"] == trained.eval_mean_return

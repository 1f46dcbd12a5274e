"""The peers benchmark's yardstick (``benchmarks/peers``): the MLP every peer serves, rebuilt from
the version's files with torch alone, answers what this server's runtime answers, and the check
that keeps a peer out of the table catches a server that answers otherwise. The peers themselves
run in ``make bench-peers``, not here."""

from pathlib import Path

import torch

from benchmarks.peers.policy import greedy, load_mlp
from benchmarks.peers.run import VERSION_DIR, disagreements, observations
from service.exploration import Exploration
from service.registry.registry import Registry
from service.registry.store import ModelStore
from service.runtime.policy import PolicyRuntime

ROOT = Path(__file__).resolve().parents[1]


def test_the_peers_mlp_answers_what_the_server_answers():
    registry = Registry(ModelStore(ROOT / "models"), prepare=PolicyRuntime)
    registry.load_all()
    runtime = registry.resolve("cartpole-dqn").runtime
    obs = observations(200)
    served = runtime.act(torch.tensor(obs), exploration=Exploration.deterministic).action.tolist()
    mine = greedy(load_mlp(VERSION_DIR), obs)
    assert mine == served
    assert 0 < sum(mine) < len(mine)  # both actions occur: the check can tell servers apart


def test_a_server_answering_otherwise_is_caught():
    net = load_mlp(VERSION_DIR)
    obs = observations(50)
    reference = greedy(net, obs)
    assert disagreements(lambda o: greedy(net, o), obs, reference) == []

    def off_by_one(o: list) -> list[int]:  # flips the action of the 8th observation only
        return [1 - a if o[0] == obs[7] else a for a in greedy(net, o)]

    assert disagreements(off_by_one, obs, reference) == [7]

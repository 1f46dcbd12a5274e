"""``service.sdk.remote.RemotePolicy`` as the policy of TorchRL's ``Collector`` over batched
``GymEnv``s, against a real server of the shipped models: the collected actions are the ones the
same weights give in process (stateless), a recurrent policy keeps its state in a server session
reset by ``is_init``, the collector's exploration type reaches the server, and the collector
never probes the policy (its ``spec`` says what it writes)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.envs import GymEnv, InitTracker, SerialEnv, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type

from service.envs import register_envs
from service.registry.build import build_policy, load_weights
from service.registry.spec import PolicySpec
from service.sdk import RemotePolicy
from tests.helpers import LiveServer

SHIPPED = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer.serving(SHIPPED, tmp_path_factory.mktemp("remote"))
    yield live
    live.stop()


def in_process(name: str, version: int):
    """The same version's TorchRL module, built here from its files."""
    root = SHIPPED / name / str(version)
    built = build_policy(PolicySpec.model_validate(json.loads((root / "policy.json").read_text())))
    load_weights(built, (root / "weights.safetensors").read_bytes())
    return built.core


def _acts(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("policy_server_requests_total") and "/infer" in line
    )


def test_a_collector_collects_with_the_servers_actions(server):
    env = SerialEnv(2, lambda: GymEnv("CartPole-v1"))  # one-hot actions, a batch of 2
    env.set_seed(0)
    policy = RemotePolicy(server.url, "cartpole-dqn", action_spec=env.action_spec)
    before = _acts(server)
    collector = Collector(
        env,
        policy,
        frames_per_batch=40,
        total_frames=80,
        exploration_type=ExplorationType.DETERMINISTIC,
        auto_register_policy_transforms=False,  # a stateless policy needs none
    )
    assert _acts(server) == before  # the spec spared the collector its probing call
    local = in_process("cartpole-dqn", 1)
    batches = list(collector)
    collector.shutdown()
    assert len(batches) == 2 and batches[0].batch_size == torch.Size([2, 20])
    data = torch.cat([b.reshape(-1) for b in batches])
    assert data["action"].shape == (80, 2) and (data["action"].sum(-1) == 1).all()  # one-hot
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        expected = local(TensorDict({"observation": data["observation"]}, batch_size=[80]))["action"]
    assert torch.equal(data["action"].argmax(-1), expected)
    assert (data["policy_version"] == 1).all()
    assert _acts(server) - before == 40  # one request per env step: 80 frames of 2 envs
    policy.close()


def test_the_collectors_exploration_type_reaches_the_server(server):
    env = SerialEnv(4, lambda: GymEnv("Pendulum-v1"))
    env.set_seed(1)
    policy = RemotePolicy(server.url, "pendulum-sac", action_spec=env.action_spec)
    obs = env.reset()
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        mean = policy(obs.clone())["action"]
    with set_exploration_type(ExplorationType.RANDOM):
        sampled = policy(obs.clone())["action"]
    assert mean.shape == sampled.shape == (4, 1)
    assert not torch.allclose(mean, sampled)
    local = in_process("pendulum-sac", 1)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        expected = local(TensorDict({"observation": obs["observation"]}, batch_size=[4]))["action"]
    torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-5)
    policy.close()


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_a_recurrent_policy_keeps_its_state_in_a_session_reset_by_is_init(server, transport):
    register_envs()

    def make():
        return TransformedEnv(GymEnv("CartPoleNoVel-v1"), InitTracker())

    env = SerialEnv(2, make)
    env.set_seed(2)
    policy = RemotePolicy(server.url, "cartpole-lstm-dqn", action_spec=env.action_spec, transport=transport)
    assert policy.stateful and "is_init" in policy.in_keys and policy.transport == transport
    collector = Collector(
        env,
        policy,
        frames_per_batch=120,
        total_frames=120,
        max_frames_per_traj=25,  # the collector resets each env every 25 steps: is_init mid-batch
        exploration_type=ExplorationType.DETERMINISTIC,
        auto_register_policy_transforms=False,  # the env has its InitTracker
    )
    data = next(iter(collector))
    collector.shutdown()
    assert data["is_init"][:, 1:].any()  # episodes started inside the batch
    # the same observations and resets through a /v1 session give the same actions
    sid = httpx.post(f"{server.url}/v1/sessions", json={"policy": "cartpole-lstm-dqn", "num_envs": 2}).json()[
        "session_id"
    ]
    for t in range(data.shape[1]):
        step = data[:, t]
        r = httpx.post(
            f"{server.url}/v1/sessions/{sid}/act",
            json={
                "observations": step["observation"].tolist(),
                "reset": step["is_init"].reshape(2).tolist(),
                "exploration": "deterministic",
            },
        ).json()
        assert r["actions"] == step["action"].argmax(-1).tolist(), t
    policy.close()
    # the state was the server's: without is_init the policy refuses rather than guess
    bare = RemotePolicy(server.url, "cartpole-lstm-dqn", transport=transport)
    td = TensorDict({"observation": torch.zeros(2, 2)}, batch_size=[2])
    bare(td.clone())
    with pytest.raises(ValueError, match="InitTracker"):
        bare(td.clone())
    bare.close()

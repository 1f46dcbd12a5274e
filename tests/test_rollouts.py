"""Environments and server-side rollouts."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch
from torchrl.envs.utils import step_mdp

from service.envs import make_env
from tests.helpers import LiveServer, poll_until


def test_envs_lists_the_allow_list_with_specs(client):
    envs = {e["env_id"]: e for e in client.get("/v1/envs").json()["envs"]}
    assert set(envs) == {
        "CartPole-v1",
        "CartPoleNoVel-v1",
        "CartPoleDict-v1",
        "CartPolePixels-v1",
        "Acrobot-v1",
        "MountainCar-v0",
        "MountainCarContinuous-v0",
        "Pendulum-v1",
        "Taxi-v4",
        "CorrelatedActions-v0",
    }
    assert envs["CorrelatedActions-v0"]["action"] == {
        "type": "composite",
        "entries": {"a1": {"type": "discrete", "n": 2}, "a2": {"type": "discrete", "n": 2}},
    }
    assert envs["CartPoleNoVel-v1"]["observation"]["shape"] == [2]
    assert envs["Taxi-v4"]["observation"] == {"type": "discrete", "n": 500}
    assert envs["CartPolePixels-v1"]["observation"] == {"shape": [400, 600, 3], "dtype": "uint8"}
    assert envs["CartPoleDict-v1"]["observation"]["entries"]["pole"] == {"shape": [2], "dtype": "float32"}
    assert envs["Pendulum-v1"]["action"] == {"type": "box", "shape": [1], "low": [-2.0], "high": [2.0]}


def test_cartpole_novel_observes_only_the_two_positions():
    full, novel = make_env("CartPole-v1"), make_env("CartPoleNoVel-v1")
    full.set_seed(4)
    novel.set_seed(4)
    a, b = full.reset(), novel.reset()
    for _ in range(5):
        assert b["observation"].shape == (2,)
        assert torch.equal(b["observation"], a["observation"][[0, 2]])
        a["action"] = b["action"] = torch.tensor(1)
        a, b = step_mdp(full.step(a)), step_mdp(novel.step(b))


def test_rollout_equals_episode_stepped_by_hand_through_act(rclient):
    r = rclient.post("/v1/policies/cp/rollout", json={"seed": 5, "max_steps": 300, "return_trajectory": True})
    assert r.status_code == 200, r.text
    ep = r.json()["episodes"][0]
    env = make_env("CartPole-v1", max_steps=300)
    env.set_seed(5)
    td = env.reset()
    total, actions = 0.0, []
    while True:
        a = rclient.post("/v1/policies/cp/act", json={"observation": td["observation"].tolist()}).json()[
            "action"
        ]
        actions.append(a)
        td["action"] = torch.tensor(a)
        td = env.step(td)
        total += td["next", "reward"].item()
        if td["next", "done"].item():
            break
        td = step_mdp(td)
    assert ep["return"] == total and ep["length"] == len(actions)
    assert ep["trajectory"]["action"] == actions
    assert r.json()["mean_return"] == total


def test_seeded_rollouts_reproduce_and_episodes_end(rclient):
    body = {
        "seed": 11,
        "episodes": 3,
        "max_steps": 40,
        "exploration": "random",
        "epsilon": 0.5,
        "return_trajectory": True,
    }
    a = rclient.post("/v1/policies/cp/rollout", json=body).json()
    b = rclient.post("/v1/policies/cp/rollout", json=body).json()
    c = rclient.post("/v1/policies/cp/rollout", json={**body, "seed": 12}).json()
    assert a["episodes"] == b["episodes"]
    assert a["episodes"] != c["episodes"]
    for ep in a["episodes"]:
        assert ep["length"] <= 40
        assert ep["terminated"] or ep["truncated"]
        assert ep["truncated"] == (ep["length"] == 40 and not ep["terminated"])
        assert ep["trajectory"]["done"][-1] and not any(ep["trajectory"]["done"][:-1])


def test_recurrent_and_continuous_rollouts(rclient):
    r = rclient.post("/v1/policies/novel/rollout", json={"seed": 1, "episodes": 2})
    assert r.status_code == 200, r.text
    p = rclient.post("/v1/policies/pend/rollout", json={"seed": 1, "max_steps": 50, "exploration": "random"})
    assert p.status_code == 200 and p.json()["episodes"][0]["length"] == 50
    assert p.json()["mean_return"] < 0


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({"env_id": "Humanoid-v5"}, 422, "not allowed"),
        ({"env_id": "os:system"}, 422, "not allowed"),
        ({"env_id": "gymnasium.envs.classic_control:CartPoleEnv"}, 422, "not allowed"),
        ({"env_id": "Pendulum-v1"}, 422, "does not fit policy cp"),
        ({"env_id": "CartPoleNoVel-v1"}, 422, "observation [2]"),
        ({"episodes": 101}, 422, "limit of 100"),
        ({"max_steps": 10_001}, 422, "limit of 10000"),
        ({"episodes": 0}, 422, "greater than or equal to 1"),
    ],
)
def test_bad_rollouts_are_refused(rclient, body, status, expected):
    r = rclient.post("/v1/policies/cp/rollout", json=body)
    assert r.status_code == status
    assert expected in str(r.json()["detail"])


def test_policy_without_env_id_needs_one(rclient):
    r = rclient.post("/v1/policies/q/rollout", json={})
    assert r.status_code == 422 and "env_id" in r.json()["detail"]
    assert rclient.post("/v1/policies/q/rollout", json={"env_id": "CartPole-v1"}).status_code == 422


def _forward_passes(c: httpx.Client) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("policy_server_forward_batch_size_count"):
            return float(line.split()[-1])
    raise AssertionError("no forward-pass count in /metrics")


def test_act_keeps_answering_during_a_long_rollout(env_models, tmp_path):
    """Act calls are answered between a rollout's steps, not after the rollout: the rollout
    runs off the event loop and shares the micro-batcher. Ordered by events, not timed."""
    server = LiveServer.serving(env_models, tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            before = _forward_passes(c)
            result: dict = {}
            t = threading.Thread(
                target=lambda: result.update(
                    r=httpx.post(
                        server.url + "/v1/policies/pend/rollout",
                        json={"episodes": 40, "max_steps": 200},
                        timeout=120,
                    )
                )
            )
            t.start()
            poll_until(  # the rollout is stepping (no act calls yet)
                lambda: t.is_alive() and _forward_passes(c) >= before + 10,
                timeout=60,
                what="the rollout never started",
                every=0.02,
            )
            answered = [c.post("/v1/policies/cp/act", json={"observation": [0, 0, 0, 0]}) for _ in range(50)]
            still_running = t.is_alive()
            t.join()
        assert all(r.status_code == 200 for r in answered)
        assert still_running, "the act calls waited for the rollout to end"
        assert result["r"].status_code == 200 and len(result["r"].json()["episodes"]) == 40
    finally:
        server.stop()

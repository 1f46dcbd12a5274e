"""The model repository shipped in ``models/``: every version loads, and the policies are good.

Served from a copy of the repository (nothing is written to ``models/``), through the API a
client uses: the recurrent policy is stepped through a session whose LSTM state the server keeps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gymnasium as gym
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.envs import register_envs
from service.main import create_app

SHIPPED = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("shipped")
    shutil.copytree(SHIPPED, root / "models")
    settings = Settings(
        model_dir=root / "models", data_dir=root / "var", registry_poll_s=0, embedded_worker=False
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_every_shipped_version_loads(shipped):
    policies = shipped.get("/v1/policies").json()["policies"]
    names = {p["name"] for p in policies}
    expected = {"cartpole-dqn", "cartpole-lstm-dqn", "cartpole-dict-dqn", "taxi-dqn", "cartpole-pixels-dqn"}
    expected |= {"pendulum-sac", "pendulum-td3"}
    assert expected <= names
    for name in names:
        doc = shipped.get(f"/v1/policies/{name}").json()
        for detail in doc["version_details"]:
            assert detail.get("error") is None, (name, detail)
            assert detail["spec"]["provenance"]["command"].startswith("policy-server train")


def test_recurrent_cartpole_balances_through_a_session(shipped):
    sid = shipped.post("/v1/sessions", json={"policy": "cartpole-lstm-dqn"}).json()["session_id"]
    env = gym.make("CartPoleNoVel-v1")
    returns = []
    for episode in range(2):
        obs, _ = env.reset(seed=500 + episode)
        total, reset, done = 0.0, True, False
        while not done:
            r = shipped.post(f"/v1/sessions/{sid}/act", json={"observation": obs.tolist(), "reset": reset})
            obs, reward, terminated, truncated, _ = env.step(r.json()["action"])
            total, reset, done = total + float(reward), False, terminated or truncated
        returns.append(total)
    env.close()
    # velocities are not observed: an MLP policy stays under ~100 here (README)
    assert min(returns) >= 400, returns


def test_shipped_cartpole_dqn_solves_cartpole(shipped):
    r = shipped.post("/v1/policies/cartpole-dqn/rollout", json={"episodes": 3, "seed": 500})
    assert r.status_code == 200 and r.json()["mean_return"] >= 475, r.text


def test_shipped_dict_policy_balances_from_dict_observations_sent_by_a_client(shipped):
    register_envs()
    env = gym.make("CartPoleDict-v1")
    obs, _ = env.reset(seed=650)
    total, done = 0.0, False
    while not done:
        body = {"observation": {k: v.tolist() for k, v in obs.items()}}
        r = shipped.post("/v1/policies/cartpole-dict-dqn/act", json=body)
        obs, reward, terminated, truncated, _ = env.step(r.json()["action"])
        total, done = total + float(reward), terminated or truncated
    env.close()
    assert total >= 475, total


def test_shipped_taxi_dqn_drives_with_the_envs_masks(shipped):
    """A client plays Taxi with the env's own masks: every answer is an allowed action, and the
    episodes end with the passenger delivered (the README's 100-episode figure is measured by
    ``benchmarks/eval_act_client.py``)."""
    env = gym.make("Taxi-v4")
    returns = []
    for episode in range(10):
        obs, info = env.reset(seed=600 + episode)
        total, done = 0.0, False
        while not done:
            mask = [bool(m) for m in info["action_mask"]]
            r = shipped.post("/v1/policies/taxi-dqn/act", json={"observation": int(obs), "action_mask": mask})
            action = r.json()["action"]
            assert mask[action], (obs, mask, action)
            obs, reward, terminated, truncated, info = env.step(action)
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    env.close()
    assert sum(returns) / len(returns) >= 5.0 and min(returns) > 0, returns  # random play: ~ -200


def test_shipped_pixel_policy_steps_a_session_from_raw_render_frames(shipped):
    """The recurrent pixel DQN takes CartPole's raw 400x600x3 frames (as raw bytes) through a
    session; its 20-episode held-out figure is in the README (benchmarks/eval_act_client.py)."""
    import numpy as np

    from service.sdk.client import encode_observation

    register_envs()
    env = gym.make("CartPolePixels-v1")
    obs, _ = env.reset(seed=20_000)
    assert obs.shape == (400, 600, 3) and obs.dtype == np.uint8
    sid = shipped.post("/v1/sessions", json={"policy": "cartpole-pixels-dqn"}).json()["session_id"]
    total, reset, done, steps = 0.0, True, False, 0
    while not done and steps < 60:
        body = {"observation": encode_observation(obs), "reset": reset, "return_info": True}
        r = shipped.post(f"/v1/sessions/{sid}/act", json=body)
        assert r.status_code == 200, r.text
        assert len(r.json()["info"]["action_value"]) == 2
        obs, reward, terminated, truncated, _ = env.step(r.json()["action"])
        total, reset, done, steps = total + float(reward), False, terminated or truncated, steps + 1
    env.close()
    assert steps == 60 and total == 60.0  # balances past the ~20 steps of random play

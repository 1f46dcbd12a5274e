"""Offline data: Minari datasets in and out (read back by minari and TorchRL), sessions recorded
with their propensities, offline jobs (behaviour cloning, discrete CQL) and off-policy
evaluation (WIS) — against real CartPole episodes played through the server."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.datasets.store import DATASET_ID, DatasetStore
from service.main import create_app
from service.training.offline import read_transitions
from tests.helpers import poll_until

ROOT = Path(__file__).resolve().parents[1]
EPS = 0.3


@pytest.fixture()
def offline(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "cartpole-dqn", models / "cartpole-dqn")
    settings = Settings(model_dir=models, data_dir=tmp_path / "var", registry_poll_s=0, embedded_worker=True)
    with TestClient(create_app(settings)) as c:
        yield c


def play(client, dataset: str, episodes: int, num_envs: int = 4, epsilon: float = EPS, seed: int = 0):
    """Real CartPole episodes through a recording session of cartpole-dqn; returns the answers
    (with info) and the returns of the episodes played."""
    r = client.post(
        "/v1/sessions",
        json={
            "policy": "cartpole-dqn",
            "record": dataset,
            "exploration": "random",
            "epsilon": epsilon,
            "num_envs": num_envs,
        },
    )
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    envs = [gym.make("CartPole-v1") for _ in range(num_envs)]
    returns, answers = [], []
    for start in range(seed, seed + episodes, num_envs):
        obs = [e.reset(seed=start + i)[0].tolist() for i, e in enumerate(envs)]
        done, total = [False] * num_envs, [0.0] * num_envs
        body = {"observations": obs, "reset": True, "return_info": True}
        while True:
            answer = client.post(f"/v1/sessions/{sid}/act", json=body)
            assert answer.status_code == 200, answer.text
            if all(done):
                break
            answers.append((obs.copy(), answer.json()))
            reward, term, trunc = [], [], []
            for i, (env, action) in enumerate(zip(envs, answer.json()["actions"], strict=True)):
                if done[i]:
                    reward.append(None), term.append(False), trunc.append(False)
                    continue
                o, rew, te, tr, _ = env.step(action)
                obs[i] = o.tolist()
                total[i] += rew
                reward.append(float(rew)), term.append(bool(te)), trunc.append(bool(tr))
                done[i] = bool(te or tr)
            body = {
                "observations": obs,
                "reward": reward,
                "terminated": term,
                "truncated": trunc,
                "return_info": True,
            }
        returns += total
    return answers, returns


def test_dataset_ids_are_minaris_form_with_a_version():
    for good in ("cartpole/expert-v0", "expert-v12", "a/b/c/name_x-v3", "D4RL/door/human-v1"):
        assert DATASET_ID.match(good)
    for bad in ("expert", "../x-v0", "a/../b-v0", "/abs-v0", "a//b-v0", "name-v", "x.y-v0", "a b-v0"):
        assert not DATASET_ID.match(bad), bad


def test_a_recorded_session_is_a_minari_dataset_with_its_propensities(offline, tmp_path):
    answers, returns = play(offline, "cartpole/mixed-v0", episodes=4)
    d = offline.get("/v1/datasets/cartpole/mixed-v0").json()
    assert d["episodes"] == 4 and d["propensities"] and d["env_id"] == "CartPole-v1"
    assert d["action_space"] == "Discrete(2)" and d["steps"] == sum(int(r) for r in returns)
    assert [x["dataset_id"] for x in offline.get("/v1/datasets").json()["datasets"]] == ["cartpole/mixed-v0"]
    # minari reads it unchanged, from the server's data dir
    import minari

    os.environ["MINARI_DATASETS_PATH"] = str(offline.app.state.settings.data_dir / "datasets")
    try:
        ds = minari.load_dataset("cartpole/mixed-v0")
        assert ds.total_episodes == 4 and sorted(float(e.rewards.sum()) for e in ds) == sorted(returns)
        # the propensity: log of epsilon-greedy's probability of the answered action
        ep = ds[0]
        greedy = {}
        for obs, answer in answers:  # each observation and the greedy action behind it
            for o, info in zip(obs, answer["info"], strict=True):
                greedy[tuple(np.float32(o))] = int(np.argmax(info["action_value"]))
        expected = [
            math.log(EPS / 2 + (1 - EPS) * (int(a) == greedy[tuple(o)]))
            for o, a in zip(ep.observations[:-1], ep.actions, strict=True)
        ]
        assert np.allclose(ep.infos["log_prob"][:-1], expected)
        assert {round(float(x), 6) for x in ep.infos["log_prob"][:-1]} <= {
            round(math.log(EPS / 2), 6),
            round(math.log(1 - EPS / 2), 6),
        }
        # TorchRL's reader takes it too (its transitions, keys and episodes)
        from torchrl.data.datasets import MinariExperienceReplay

        rb = MinariExperienceReplay(
            "cartpole/mixed-v0", batch_size=8, root=tmp_path / "trl", load_from_local_minari=True
        )
        assert len(rb) == d["steps"] and set(rb.sample().keys()) >= {"observation", "action", "next"}
    finally:
        del os.environ["MINARI_DATASETS_PATH"]
    # the trainer's reader gives the same transitions as minari
    data = read_transitions(offline.app.state.settings.data_dir / "datasets" / "cartpole/mixed-v0")
    assert data.numel() == d["steps"] and float(data["next", "reward"].sum()) == sum(returns)
    assert int(data["next", "done"].sum()) == 4


def test_download_upload_and_delete_round_trip(offline):
    play(offline, "rt/data-v1", episodes=2, num_envs=2)
    blob = offline.get("/v1/datasets/rt/data-v1/download").content
    assert tarfile.open(fileobj=io.BytesIO(blob)).getnames() == [
        "data-v1/data/main_data.hdf5",
        "data-v1/data/metadata.json",
    ]
    before = offline.get("/v1/datasets/rt/data-v1").json()
    assert offline.post("/v1/datasets", files={"archive": ("d.tar.gz", blob)}).status_code == 409
    assert offline.delete("/v1/datasets/rt/data-v1").status_code == 204
    assert offline.get("/v1/datasets/rt/data-v1").status_code == 404
    r = offline.post("/v1/datasets", files={"archive": ("d.tar.gz", blob)})
    assert r.status_code == 201, r.text
    assert {k: v for k, v in r.json().items() if k != "size_bytes"} == {
        k: v for k, v in before.items() if k != "size_bytes"
    }
    assert offline.delete("/v1/datasets/nope-v0").status_code == 404
    assert offline.get("/v1/datasets/bad..id").status_code == 422


def _tar(members: dict[str, bytes | None], link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:  # a symlink
                info.type, info.linkname = tarfile.SYMTYPE, link or "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_hostile_or_malformed_archives_are_refused_and_write_nothing(offline):
    meta = json.dumps({"dataset_id": "evil-v0"}).encode()
    cases = [
        (_tar({"x/data/metadata.json": meta, "x/data/main_data.hdf5": None}), "not a regular file"),
        (_tar({"../data/metadata.json": meta, "x/data/main_data.hdf5": b"x"}), "outside"),
        (
            _tar({"x/data/metadata.json": meta, "x/data/main_data.hdf5": b"x", "x/run.py": b"1"}),
            "not a Minari",
        ),
        (_tar({"x/data/metadata.json": meta}), "no data/main_data.hdf5"),
        (_tar({"x/data/metadata.json": meta, "x/data/main_data.hdf5": b"not hdf5"}), "not a readable"),
        (
            _tar({"x/data/metadata.json": b'{"dataset_id": "../../x-v0"}', "x/data/main_data.hdf5": b"x"}),
            "Minari's form",
        ),
        (b"neither tar nor zip", "expected a .tar"),
    ]
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("/abs/data/metadata.json", meta)
    cases.append((zbuf.getvalue(), "outside"))
    datasets = offline.app.state.settings.data_dir / "datasets"
    for blob, why in cases:
        r = offline.post("/v1/datasets", files={"archive": ("a.tar.gz", blob)})
        assert r.status_code == 422 and why in r.json()["detail"], (why, r.text)
    assert offline.get("/v1/datasets").json()["datasets"] == []
    left = [p for p in datasets.rglob("*") if p.is_file()]
    assert left == [], left


def test_a_full_dataset_refuses_more_and_keeps_what_it_holds(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "cartpole-dqn", models / "cartpole-dqn")
    settings = Settings(
        model_dir=models,
        data_dir=tmp_path / "var",
        registry_poll_s=0,
        embedded_worker=False,
        max_dataset_bytes=120_000,
    )
    with TestClient(create_app(settings)) as c:
        with pytest.raises(AssertionError, match="is full"):
            play(c, "small/full-v0", episodes=40, num_envs=2)
        kept = c.get("/v1/datasets/small/full-v0").json()
        assert kept["episodes"] >= 1 and kept["size_bytes"] <= 120_000
        store = DatasetStore(settings.data_dir / "datasets", 10**9)
        assert len(store.open("small/full-v0")) == kept["episodes"]  # still readable, whole


def test_recording_refusals(offline):
    for body, why in [
        ({"policy": "cartpole-dqn", "record": "no-version"}, "Minari's form"),
        ({"policy": "cartpole-dqn", "record": "../x-v0"}, "Minari's form"),
    ]:
        r = offline.post("/v1/sessions", json=body)
        assert r.status_code == 422 and why in r.json()["detail"], r.text
    store = offline.app.state.dataset_store
    store.create("other/space-v0", gym.spaces.Box(-1, 1, (3,)), gym.spaces.Discrete(2))
    r = offline.post("/v1/sessions", json={"policy": "cartpole-dqn", "record": "other/space-v0"})
    assert r.status_code == 422 and "acts on" in r.json()["detail"]


def _wait(client, job_id: str) -> dict:
    return poll_until(
        lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and j,
        timeout=600,
        what=f"job {job_id} did not finish",
        every=0.5,
    )


@pytest.mark.slow
def test_behaviour_cloning_and_discrete_cql_learn_from_a_recorded_dataset(offline):
    play(offline, "cartpole/expert-v0", episodes=8, num_envs=4, epsilon=0.1)
    results = {}
    for algorithm in ("bc", "discrete_cql"):
        r = offline.post(
            "/v1/jobs",
            json={
                "algorithm": algorithm,
                "source": "dataset",
                "dataset": "cartpole/expert-v0",
                "env_id": "CartPole-v1",
                "policy_name": f"cp-{algorithm}",
                "total_frames": 256 * (600 if algorithm == "bc" else 4000),
                "seed": 0,
                "hyperparameters": {"eval_every_frames": 0, "eval_episodes": 5},
            },
        )
        assert r.status_code == 202, r.text
        job = _wait(offline, r.json()["job_id"])
        assert job["status"] == "succeeded", job["error"]
        results[algorithm] = job["result"]["eval_mean_return"]
        served = offline.get(f"/v1/policies/cp-{algorithm}").json()
        prov = served["version_details"][0]["provenance"]
        assert prov["dataset"] == "cartpole/expert-v0" and prov["algorithm"] == algorithm
        kind = "probabilistic" if algorithm == "bc" else "qvalue"
        assert served["kind"] == kind
    # a random policy scores ~20 on CartPole; both clone the expert far beyond it (held-out seeds)
    assert results["bc"] > 200 and results["discrete_cql"] > 200, results


def test_offline_job_refusals(offline):
    play(offline, "cartpole/tiny-v0", episodes=2, num_envs=2)
    base = {"source": "dataset", "policy_name": "x", "total_frames": 1000}
    for body, why in [
        ({**base, "algorithm": "bc", "dataset": "nope-v0"}, "not found"),
        ({**base, "algorithm": "sac", "dataset": "cartpole/tiny-v0"}, "source 'dataset' trains"),
        ({**base, "algorithm": "bc"}, "needs 'dataset'"),
        ({**base, "algorithm": "bc", "dataset": "cartpole/tiny-v0", "env_id": "Pendulum-v1"}, "does not fit"),
        ({**base, "algorithm": "bc", "dataset": "cartpole/tiny-v0", "recurrent": True}, "feed-forward"),
        (
            {"algorithm": "bc", "env_id": "CartPole-v1", "policy_name": "x", "total_frames": 10},
            "learn from a dataset",
        ),
        (
            {**base, "algorithm": "bc", "dataset": "cartpole/tiny-v0", "hyperparameters": {"cql_weight": -1}},
            "cql_weight",
        ),
    ]:
        r = offline.post("/v1/jobs", json=body)
        assert r.status_code == 422 and why in str(r.json()["detail"]), (body, r.text)
    dqn = {"algorithm": "dqn", "env_id": "CartPole-v1", "policy_name": "x", "total_frames": 1000}
    for body, why in [
        ({**dqn, "imitation": {"dataset": "nope-v0"}}, "not found"),
        ({**dqn, "env_id": "Acrobot-v1", "imitation": {"dataset": "cartpole/tiny-v0"}}, "does not fit"),
        ({**dqn, "recurrent": True, "imitation": {"dataset": "cartpole/tiny-v0"}}, "imitation goes with"),
        ({**dqn, "imitation": {"dataset": "cartpole/tiny-v0", "weight": 0}}, "greater than 0"),
        ({**dqn, "algorithm": "ppo", "imitation": {"dataset": "cartpole/tiny-v0"}}, "imitation goes with"),
        (
            {
                **dqn,
                "algorithm": "sac",
                "env_id": "Pendulum-v1",
                "imitation": {"dataset": "cartpole/tiny-v0"},
            },
            "does not fit",
        ),
    ]:
        r = offline.post("/v1/jobs", json=body)
        assert r.status_code == 422 and why in str(r.json()["detail"]), (body, r.text)
    store = offline.app.state.dataset_store
    store.create("box/data-v0", gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-2, 2, (1,)))
    r = offline.post("/v1/jobs", json={**base, "algorithm": "discrete_cql", "dataset": "box/data-v0"})
    assert r.status_code == 422 and "discrete action space" in r.json()["detail"]
    assert offline.get("/v1/jobs").json()["jobs"] == []


def test_wis_of_the_logging_policy_is_its_logged_return_and_refusals(offline):
    _, returns = play(offline, "cartpole/ope-v0", episodes=8, num_envs=4)
    url = "/v1/policies/cartpole-dqn/evaluate"
    same = offline.post(url, json={"dataset": "cartpole/ope-v0", "exploration": "random", "epsilon": EPS})
    assert same.status_code == 200, same.text
    e = same.json()
    # the logging policy's own weights are all 1: the estimate is the logged mean return
    assert e["estimate"] == pytest.approx(np.mean(returns)) == pytest.approx(e["dataset_mean_return"])
    assert e["episodes"] == 8 and e["effective_sample_size"] == pytest.approx(8)
    assert e["ci95"][0] <= e["estimate"] <= e["ci95"][1]
    other = offline.post(
        url, json={"dataset": "cartpole/ope-v0", "exploration": "random", "epsilon": 0.6}
    ).json()
    assert other["effective_sample_size"] < 8 and other["estimate"] != pytest.approx(e["estimate"])
    greedy = offline.post(url, json={"dataset": "cartpole/ope-v0"})
    assert greedy.status_code == 422 and "weight 0" in greedy.json()["detail"]
    # a dataset without propensities
    store = offline.app.state.dataset_store
    from minari.data_collector import EpisodeBuffer

    env = gym.make("CartPole-v1")
    store.create("plain/no-mu-v0", env.observation_space, env.action_space, env_id="CartPole-v1")
    o, _ = env.reset(seed=0)
    obs, acts = [o], []
    for _ in range(5):
        acts.append(0)
        obs.append(env.step(0)[0])
    store.append(
        "plain/no-mu-v0",
        [EpisodeBuffer(observations=np.stack(obs), actions=np.asarray(acts), rewards=[1.0] * 5,
                       terminations=[False] * 4 + [True], truncations=[False] * 5)],
    )  # fmt: skip
    r = offline.post(url, json={"dataset": "plain/no-mu-v0", "exploration": "random"})
    assert r.status_code == 422 and "no propensities" in r.json()["detail"]
    assert offline.post(url, json={"dataset": "missing-v0"}).status_code == 422
    assert offline.post(url, json={"dataset": "cartpole/ope-v0", "version": 9}).status_code == 404


@pytest.mark.slow
def test_the_imitation_term_makes_dqn_act_like_the_expert(offline):
    """With the supervised term and next to no RL (2,000 frames), DQN's greedy actions agree
    with the expert's on the expert's own states far more often than without it."""
    play(offline, "cartpole/expert-v0", episodes=4, num_envs=4, epsilon=0.0)
    data = read_transitions(offline.app.state.settings.data_dir / "datasets" / "cartpole/expert-v0")
    rows = data["observation"][::7]
    expert = data["action"][::7].tolist()
    agreement = {}
    for name, extra in (
        ("plain", {}),
        ("imitation", {"imitation": {"dataset": "cartpole/expert-v0", "weight": 5.0}}),
    ):
        r = offline.post(
            "/v1/jobs",
            json={
                "algorithm": "dqn",
                "env_id": "CartPole-v1",
                "policy_name": f"dqn-{name}",
                "total_frames": 2048,
                "seed": 0,
                "hyperparameters": {"eval_every_frames": 0, "eval_episodes": 1, "init_random_frames": 512},
                **extra,
            },
        )
        assert r.status_code == 202, r.text
        assert _wait(offline, r.json()["job_id"])["status"] == "succeeded"
        answer = offline.post(f"/v1/policies/dqn-{name}/act", json={"observations": rows.tolist()}).json()
        agreement[name] = sum(a == b for a, b in zip(answer["actions"], expert, strict=True)) / len(expert)
    assert agreement["imitation"] > 0.9 and agreement["imitation"] > agreement["plain"] + 0.15, agreement


def _pendulum_expert(obs: np.ndarray) -> np.ndarray:
    """A fixed controller of Pendulum's (cos, sin, angular velocity): not a good one, a smooth
    function of the state to imitate."""
    return np.clip(np.array([1.5 * obs[1] - 0.2 * obs[2]], dtype=np.float32), -2.0, 2.0)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["sac", "td3"])
def test_the_imitation_term_makes_sac_and_td3_act_like_the_expert(offline, algorithm):
    """SAC (negative log-likelihood) and TD3 (squared distance): with the supervised term and
    next to no RL, the served deterministic action is far closer to the expert's on its states."""
    from minari.data_collector import EpisodeBuffer

    store = offline.app.state.dataset_store
    env = gym.make("Pendulum-v1")
    store.create("pendulum/expert-v0", env.observation_space, env.action_space, env_id="Pendulum-v1")
    episodes = []
    for seed in range(4):
        obs, _ = env.reset(seed=seed)
        o, a, r = [obs], [], []
        for _ in range(200):
            a.append(_pendulum_expert(obs))
            obs, reward, terminated, truncated, _ = env.step(a[-1])
            o.append(obs)
            r.append(float(reward))
        flags = [False] * 199
        episodes.append(EpisodeBuffer(observations=np.stack(o), actions=np.stack(a), rewards=r,
                                      terminations=[*flags, False], truncations=[*flags, True]))  # fmt: skip
    store.append("pendulum/expert-v0", episodes)
    data = read_transitions(offline.app.state.settings.data_dir / "datasets" / "pendulum/expert-v0")
    rows = data["observation"][::5]
    expert = np.stack([_pendulum_expert(x) for x in rows.numpy()])
    error = {}
    for name, extra in (
        ("plain", {}),
        ("imitation", {"imitation": {"dataset": "pendulum/expert-v0", "weight": 5.0}}),
    ):
        r = offline.post(
            "/v1/jobs",
            json={
                "algorithm": algorithm,
                "env_id": "Pendulum-v1",
                "policy_name": f"{algorithm}-{name}",
                "total_frames": 800,
                "seed": 0,
                "hyperparameters": {"eval_every_frames": 0, "eval_episodes": 1, "init_random_frames": 200},
                **extra,
            },
        )
        assert r.status_code == 202, r.text
        assert _wait(offline, r.json()["job_id"])["status"] == "succeeded"
        answer = offline.post(
            f"/v1/policies/{algorithm}-{name}/act", json={"observations": rows.tolist()}
        ).json()
        error[name] = float(np.abs(np.asarray(answer["actions"], dtype=np.float32) - expert).mean())
    assert error["imitation"] < 0.25 and error["imitation"] < error["plain"] / 3, error


def test_fqe_refusals(offline):
    play(offline, "cartpole/fqe-small-v0", episodes=2, num_envs=2)
    url = "/v1/policies/cartpole-dqn/evaluate"
    r = offline.post(url, json={"dataset": "cartpole/fqe-small-v0", "method": "fqe"})
    assert r.status_code == 422 and "gamma < 1" in r.json()["detail"]
    r = offline.post(
        url, json={"dataset": "cartpole/fqe-small-v0", "method": "fqe", "gamma": 0.99, "extra": 1}
    )
    assert r.status_code == 422


@pytest.mark.slow
def test_fqe_of_the_greedy_policy_matches_its_measured_discounted_return(offline):
    """From epsilon-greedy (0.3) traffic, FQE values cartpole-dqn's greedy policy, which keeps
    CartPole up for all 500 steps: its discounted return is (1 - 0.99^500) / 0.01 = 99.3."""
    play(offline, "cartpole/fqe-v0", episodes=10, num_envs=10)
    r = offline.post(
        "/v1/policies/cartpole-dqn/evaluate",
        json={"dataset": "cartpole/fqe-v0", "method": "fqe", "gamma": 0.99},
    )
    assert r.status_code == 200, r.text
    truth = (1 - 0.99**500) / 0.01
    assert abs(r.json()["estimate"] - truth) < 0.1 * truth, r.json()
    assert r.json()["dataset_mean_return"] < truth  # the logging policy did worse than the greedy one


def test_offline_dqn_is_the_cql_setup_without_the_conservative_term(offline):
    play(offline, "cartpole/dqn-v0", episodes=2, num_envs=2)
    r = offline.post(
        "/v1/jobs",
        json={
            "algorithm": "dqn",
            "source": "dataset",
            "dataset": "cartpole/dqn-v0",
            "policy_name": "offline-dqn",
            "total_frames": 256 * 20,
            "hyperparameters": {"updates_per_batch": 10},
        },
    )
    assert r.status_code == 202, r.text
    job = _wait(offline, r.json()["job_id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["eval_mean_return"] is None  # no env_id: nothing to evaluate in
    served = offline.get("/v1/policies/offline-dqn").json()
    prov = served["version_details"][0]["provenance"]
    assert (
        served["kind"] == "qvalue"
        and prov["algorithm"] == "dqn"
        and prov["hyperparameters"]["cql_weight"] == 0
    )
    assert (
        offline.post("/v1/policies/offline-dqn/act", json={"observation": [0.0, 0.0, 0.0, 0.0]}).status_code
        == 200
    )


def test_dataset_changes_and_downloads_need_the_admin_key(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "cartpole-dqn", models / "cartpole-dqn")
    settings = Settings(
        model_dir=models, data_dir=tmp_path / "var", registry_poll_s=0, embedded_worker=False, api_key="k3y"
    )
    with TestClient(create_app(settings)) as c:
        play(c, "keyed/data-v0", episodes=2, num_envs=2)  # recording is an inference call
        admin = {"Authorization": "Bearer k3y"}
        assert c.get("/v1/datasets/keyed/data-v0").status_code == 200  # described to anyone
        assert c.get("/v1/datasets/keyed/data-v0/download").status_code == 401
        blob = c.get("/v1/datasets/keyed/data-v0/download", headers=admin).content
        assert c.delete("/v1/datasets/keyed/data-v0").status_code == 401
        assert c.delete("/v1/datasets/keyed/data-v0", headers=admin).status_code == 204
        assert c.post("/v1/datasets", files={"archive": ("d.tar.gz", blob)}).status_code == 401
        assert c.post("/v1/datasets", files={"archive": ("d.tar.gz", blob)}, headers=admin).status_code == 201

"""Learning from simulators over HTTP: a DQN job with ``source: sessions`` learns from the
transitions clients report through sessions bound to it; the gymnasium env runs on the client
side only. The contract's fields, the refusals (nothing recorded), the experience on disk, and a
short run that learns (the 50,000-frame, 8-client figure is ``benchmarks/learn_from_clients.py``)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.main import create_app
from service.training.experience import ExperienceDir
from service.training.from_sessions import Streams
from tests.helpers import wait_for

SPECS = {"observation": {"shape": [4]}, "action": {"type": "discrete", "n": 2}}


def client_job(client, **kw) -> str:
    body = {
        "algorithm": "dqn",
        "source": "sessions",
        "policy_name": "from-clients",
        "total_frames": 5000,
        **SPECS,
        **kw,
    }
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def play(client, sid: str, env, until, max_calls: int = 5000, seed: int = 0) -> int:
    """A simulator: steps ``env`` (its own) with the session's answers, reporting each outcome,
    until ``until()`` (checked every 100 calls), the session closes, or ``max_calls``."""
    obs, _ = env.reset(seed=seed)
    report: dict = {}
    reset = True
    for calls in range(1, max_calls + 1):
        r = client.post(
            f"/v1/sessions/{sid}/act", json={"observation": obs.tolist(), "reset": reset, **report}
        )
        if r.status_code == 404:  # the job finished: its sessions are closed
            break
        if r.status_code == 429:  # the learner is behind: the same report again
            continue
        assert r.status_code == 200, r.text
        if report.get("terminated") or report.get("truncated"):
            (obs, _), report, reset = env.reset(), {}, True
        else:
            obs, reward, terminated, truncated, _ = env.step(r.json()["action"])
            report, reset = {"reward": float(reward), "terminated": terminated, "truncated": truncated}, False
        if calls % 100 == 0 and until():
            break
    env.close()
    return calls


def _finished(client, job_id: str) -> bool:
    return client.get(f"/v1/jobs/{job_id}").json()["status"] in ("succeeded", "failed", "cancelled")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"env_id": "CartPole-v1"}, "no env_id"),
        ({"action": None}, "needs the observation and action"),
        ({"action": {"type": "box", "shape": [1], "low": [-1.0], "high": [1.0]}}, "discrete action space"),
        ({"algorithm": "sac"}, "dqn only"),
        ({"observation": {"type": "dict", "entries": {"a": {"shape": [2]}}}}, "dict observations"),
        ({"observation": {"shape": [0]}}, "observation"),
    ],
)
def test_bad_source_sessions_jobs_are_refused(client, body, expected):
    full = {
        "algorithm": "dqn",
        "source": "sessions",
        "policy_name": "x",
        "total_frames": 1000,
        **SPECS,
        **body,
    }
    full = {k: v for k, v in full.items() if v is not None}
    r = client.post("/v1/jobs", json=full)
    assert r.status_code == 422 and expected in str(r.json()["detail"]), r.text
    assert client.get("/v1/jobs").json()["jobs"] == []


def test_reports_are_checked_and_turned_into_transitions(client, settings):
    job_id = client_job(client)
    r = client.post("/v1/sessions", json={"job": job_id, "num_envs": 2})
    assert r.status_code == 201 and r.json()["job"] == job_id and r.json()["policy"] == "from-clients", r.text
    sid = r.json()["session_id"]
    for bad, expected in [
        ({"job": job_id, "policy": "q"}, "exactly one of"),
        ({"job": "nope"}, "not found"),
    ]:
        r = client.post("/v1/sessions", json=bad)
        assert r.status_code in (404, 422) and expected in str(r.json()["detail"]), r.text
    obs = [[0.0, 0.1, 0.2, 0.3], [0.3, 0.2, 0.1, 0.0]]

    def step(**kw):
        return client.post(f"/v1/sessions/{sid}/act", json={"observations": obs, **kw})

    r = step(reward=1.0)  # no previous action yet
    assert r.status_code == 422 and "no previous action" in r.json()["detail"]
    assert client.get(f"/v1/sessions/{sid}").json()["steps"] == 0  # nothing changed
    first = step()
    assert first.status_code == 200 and first.json()["policy_frames"] == 0
    for bad, expected in [
        ({"reward": [1.0]}, "reward has 1 values"),
        ({"reward": 1e39}, "not finite"),
        ({"terminated": True}, "send its reward too"),
        ({"reward": "1"}, "valid"),
        ({"reward": 1.0, "reset": [True, False]}, "env(s) [0]"),
        ({"reward": [None, 1.0], "terminated": [True, False]}, "needs its reward"),
    ]:
        r = step(**bad)
        assert r.status_code == 422 and expected in str(r.json()["detail"]), (bad, r.text)
    assert client.get(f"/v1/sessions/{sid}").json()["steps"] == 1
    answers = [first.json()["actions"]]
    for t in range(40):  # env 1 ends an episode at t = 9; its next call resets it
        ends = [False, t == 9]
        r = step(reward=[1.0, None if t == 10 else 2.0], terminated=ends, reset=[False, t == 10])
        assert r.status_code == 200, r.text
        answers.append(r.json()["actions"])
    # a served policy's session takes rewards too (its version's stats), and feeds no job
    policy = client.post("/v1/sessions", json={"policy": "q"}).json()["session_id"]
    r = client.post(f"/v1/sessions/{policy}/act", json={"observation": obs[0], "reward": 1.0})
    assert r.status_code == 200, r.text

    client.app.state.job_feeds.flush_all()
    channel = ExperienceDir(settings.data_dir / "experience" / job_id)
    data = torch.cat(channel.read_new())
    # env 0: 40 transitions; env 1: 40 less the one after its episode ended (t = 10 is a reset)
    assert data.numel() == 79
    assert set(data["next", "reward"].flatten().tolist()) == {1.0, 2.0}
    assert int(data["next", "terminated"].sum()) == 1
    finished = data["episode_return"][~torch.isnan(data["episode_return"])]
    assert finished.tolist() == [20.0]  # env 1's first episode: 10 rewards of 2
    env0 = data[data["next", "reward"].flatten() == 1.0]
    assert env0["action"].tolist() == [a[0] for a in answers[:40]]  # the actions answered, in order


@pytest.mark.slow
def test_a_job_learns_from_a_client_stepping_cartpole(jclient):
    """The env is the client's; a short run (5,000 reported frames) beats the untrained policy."""
    job_id = client_job(jclient, seed=0, hyperparameters={"num_cells": [64, 64]})
    sid = jclient.post("/v1/sessions", json={"job": job_id}).json()["session_id"]
    play(jclient, sid, gym.make("CartPole-v1"), until=lambda: _finished(jclient, job_id), max_calls=30_000)
    job = wait_for(jclient, job_id, ("succeeded", "failed"), timeout=600)
    assert job["status"] == "succeeded", job
    assert job["progress"]["frames"] >= 5000 and job["progress"]["episodes"] > 20
    version = job["result"]["version"]
    seeds = {"episodes": 10, "seed": 20_000, "env_id": "CartPole-v1"}
    trained = jclient.post("/v1/policies/from-clients/rollout", json={**seeds, "version": version}).json()
    jclient.post("/v1/policies/untrained/versions", files=_untrained_files())
    untrained = jclient.post("/v1/policies/untrained/rollout", json=seeds).json()
    assert untrained["mean_return"] < 50
    assert trained["mean_return"] > 2 * untrained["mean_return"] and trained["mean_return"] > 80, (
        trained,
        untrained,
    )


def _untrained_files() -> dict:
    from service.registry.build import build_policy, weights_bytes
    from service.registry.spec import PolicySpec
    from tests.helpers import upload_files

    spec = {"kind": "qvalue", **SPECS, "network": {"num_cells": [64, 64]}}
    torch.manual_seed(0)
    return upload_files(spec, weights_bytes(build_policy(PolicySpec.model_validate(spec))))


NOVEL = {"observation": {"shape": [2]}, "action": {"type": "discrete", "n": 2}}
SMALL_LSTM = {"hidden_size": 16, "num_cells": [16], "init_random_frames": 300}


def test_recurrent_reports_carry_each_steps_lstm_state(client, settings):
    """A recurrent job's transitions hold the LSTM state each step started from and the one after
    it (the next step's), zeros where an episode starts; the learner cuts each client env's stream
    into step-ordered segments."""
    job_id = client_job(client, recurrent=True, hyperparameters=SMALL_LSTM, **NOVEL)
    sid = client.post("/v1/sessions", json={"job": job_id, "num_envs": 2}).json()["session_id"]
    obs = [[0.1, 0.2], [0.3, -0.1]]
    r = client.post(f"/v1/sessions/{sid}/act", json={"observations": obs})
    assert r.status_code == 200, r.text
    for t in range(30):  # env 1 ends an episode at t = 9 and restarts at t = 10
        body = {"observations": [[0.1 + t / 50, 0.2], [0.3, -0.1 - t / 50]]}
        body.update(
            reward=[1.0, None if t == 10 else 1.0], terminated=[False, t == 9], reset=[False, t == 10]
        )
        r = client.post(f"/v1/sessions/{sid}/act", json=body)
        assert r.status_code == 200, r.text
    client.app.state.job_feeds.flush_all()
    data = torch.cat(ExperienceDir(settings.data_dir / "experience" / job_id).read_new())
    assert data.numel() == 59 and data["stream"].unique().numel() == 2
    for stream in data["stream"].unique():
        rows = data[data["stream"] == stream]
        rows = rows[rows["step"].argsort()]
        h, nxt, init = rows["recurrent_state_h"], rows["next", "recurrent_state_h"], rows["is_init"].flatten()
        assert init[0] and h[0].abs().sum() == 0 and nxt[0].abs().sum() > 0
        follows = rows["step"][1:] == rows["step"][:-1] + 1
        assert torch.equal(nxt[:-1][follows], h[1:][follows])  # the state after a step starts the next
        assert (h[~init].abs().sum(dim=(1, 2)) > 0).all() and (h[init].abs().sum() == 0)
    env1 = data[data["stream"] == data["stream"][data["next", "terminated"].flatten()]]
    assert env1["is_init"].sum() == 2  # its first step and the step after its reset

    segments = Streams(length=8).add(data)
    assert sum(seg.numel() for seg in segments) >= 59 - 2 * 7  # at most 7 rows wait per stream
    for seg in segments:
        assert seg["segment"].unique().numel() == 1 and seg["stream"].unique().numel() == 1
        steps, init = seg["step"], seg["is_init"].flatten()
        assert ((steps[1:] == steps[:-1] + 1) | init[1:]).all()  # no gap without an episode start
    assert len({int(seg["segment"][0]) for seg in segments}) == len(segments)


@pytest.mark.slow
def test_a_recurrent_job_learns_from_a_session_and_publishes_an_lstm_policy(jclient):
    job_id = client_job(
        jclient, recurrent=True, total_frames=600, seed=0, hyperparameters=SMALL_LSTM, **NOVEL
    )
    sid = jclient.post("/v1/sessions", json={"job": job_id}).json()["session_id"]
    play(jclient, sid, gym.make("CartPoleNoVel-v1"), until=lambda: _finished(jclient, job_id))
    job = wait_for(jclient, job_id, ("succeeded", "failed"), timeout=300)
    assert job["status"] == "succeeded", job
    details = jclient.get("/v1/policies/from-clients").json()["version_details"][0]
    assert details["spec"]["recurrent"]["hidden_size"] == 16
    assert details["provenance"]["source"] == "sessions" and details["provenance"]["updates"] > 0
    served = jclient.post("/v1/sessions", json={"policy": "from-clients"}).json()["session_id"]
    for step in (1, 2):
        r = jclient.post(f"/v1/sessions/{served}/act", json={"observation": [0.0, 0.1]})
        assert r.status_code == 200 and r.json()["step"] == step and r.json()["action"] in (0, 1), r.text


QUICK = {"num_cells": [16], "frames_per_batch": 256, "updates_per_batch": 4, "init_random_frames": 256}


@pytest.mark.slow
def test_a_job_interrupted_by_a_worker_restart_resumes_where_it_was(settings):
    """The worker shuts down mid-job: the job fails, its experience stays; resumed, the learner
    continues from its last published weights and position with the recorded transitions."""
    settings.embedded_worker = True
    with TestClient(create_app(settings)) as c:
        job_id = client_job(c, total_frames=2048, seed=0, hyperparameters=QUICK)
        sid = c.post("/v1/sessions", json={"job": job_id}).json()["session_id"]
        play(c, sid, gym.make("CartPole-v1"), until=lambda: _frames(c, job_id) >= 512)
        r = c.post(f"/v1/jobs/{job_id}/resume")
        assert r.status_code == 409 and "only a failed job" in r.json()["detail"], r.text
    with TestClient(create_app(settings)) as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "failed" and "resume it with POST" in job["error"], job
        channel = ExperienceDir(settings.data_dir / "experience" / job_id)
        learned = channel.learner_state()
        assert 512 <= learned["consumed"] < 2048 and learned["updates"] == 4 * (learned["consumed"] // 256)
        recorded = sum(td.numel() for td in channel.read_new())
        assert recorded >= learned["consumed"]
        r = c.post(f"/v1/jobs/{job_id}/resume")
        assert r.status_code == 202 and r.json()["status"] == "queued" and r.json()["error"] is None, r.text
        sid = c.post("/v1/sessions", json={"job": job_id}).json()["session_id"]
        play(c, sid, gym.make("CartPole-v1"), until=lambda: _finished(c, job_id), seed=1)
        job = wait_for(c, job_id, ("succeeded", "failed"), timeout=300)
        assert job["status"] == "succeeded", job
        provenance = c.get("/v1/policies/from-clients").json()["version_details"][0]["provenance"]
        assert provenance["resumed_at_frames"] == learned["consumed"]
        assert provenance["frames"] == 2048 and provenance["updates"] == 32  # 8 batches of 4, not more
        assert job["progress"]["episodes"] >= 1


def _frames(client, job_id: str) -> int:
    return (client.get(f"/v1/jobs/{job_id}").json()["progress"] or {}).get("frames") or 0


def test_recorded_experience_seeds_a_new_job(jclient, settings):
    """A job's recorded transitions fill a later job's buffer: it learns from its first batch
    (1,000+ seeded frames reach init_random_frames), where alone it would wait 1,000 frames."""
    first = client_job(jclient, total_frames=100_000, hyperparameters=QUICK)
    sid = jclient.post("/v1/sessions", json={"job": first, "num_envs": 8}).json()["session_id"]
    obs = torch.rand(8, 4).tolist()
    jclient.post(f"/v1/sessions/{sid}/act", json={"observations": obs})
    for t in range(130):
        r = jclient.post(
            f"/v1/sessions/{sid}/act", json={"observations": obs, "reward": 1.0, "terminated": t % 20 == 19}
        )
        assert r.status_code == 200, r.text
        if t % 20 == 19:
            jclient.post(f"/v1/sessions/{sid}/act", json={"observations": obs, "reset": True})
    jclient.app.state.job_feeds.flush_all()
    assert jclient.post(f"/v1/jobs/{first}/cancel").status_code == 202
    wait_for(jclient, first, ("cancelled",))
    recorded = sum(td.numel() for td in ExperienceDir(settings.data_dir / "experience" / first).read_new())
    assert recorded >= 1000

    hp = {**QUICK, "init_random_frames": 1000}
    for bad, expected in [
        ([first[::-1]], "not found"),
        (["x"], "pattern"),
    ]:
        r = jclient.post("/v1/jobs", json={**_job(hp), "experience_from": bad})
        assert r.status_code == 422 and expected in str(r.json()["detail"]), r.text
    r = jclient.post("/v1/jobs", json={**_job(hp), "experience_from": [first], "observation": {"shape": [3]}})
    assert r.status_code == 422 and "another observation" in r.json()["detail"], r.text
    r = jclient.post("/v1/jobs", json={**_job(hp), "experience_from": [first], "recurrent": True})
    assert r.status_code == 422 and "another recurrent" in r.json()["detail"], r.text

    second = client_job(jclient, total_frames=512, hyperparameters=hp, experience_from=[first])
    sid = jclient.post("/v1/sessions", json={"job": second}).json()["session_id"]
    play(jclient, sid, gym.make("CartPole-v1"), until=lambda: _finished(jclient, second))
    job = wait_for(jclient, second, ("succeeded", "failed"), timeout=300)
    assert job["status"] == "succeeded", job
    provenance = jclient.get("/v1/policies/from-clients").json()["version_details"][0]["provenance"]
    assert provenance["seeded_frames"] == recorded and provenance["experience_from"] == [first]
    assert provenance["updates"] == 8  # two batches of 4 updates; unseeded it would be 0
    r = jclient.post(f"/v1/jobs/{second}/resume")
    assert r.status_code == 409 and "only a failed job" in r.json()["detail"]


def _job(hp: dict) -> dict:
    return {
        "algorithm": "dqn",
        "source": "sessions",
        "policy_name": "p",
        "total_frames": 512,
        **SPECS,
        "hyperparameters": hp,
    }


def test_a_feed_follows_every_publish_of_its_learner(tmp_path):
    """The weights sessions act with follow ``learner.json`` (written after the weights at every
    publish), not file timestamps: two publishes within one clock tick are both seen."""
    import os

    from service.registry.build import build_policy
    from service.registry.spec import PolicySpec
    from service.runtime.policy import PolicyRuntime
    from service.serving.feeds import Feed

    cpu = torch.device("cpu")
    spec = PolicySpec.model_validate({"kind": "qvalue", **SPECS, "network": {"num_cells": [8]}})
    runtime = PolicyRuntime(spec, build_policy(spec), cpu)
    channel = ExperienceDir(tmp_path / "job")
    feed = Feed("job", "p", runtime, channel, total_frames=1024, lag_frames=256, device=cpu)
    assert feed.newer() is None  # nothing published yet
    weights = {k: v.clone() for k, v in runtime.core.state_dict().items()}
    channel.publish(weights, {"consumed": 256, "received": 300, "updates": 4, "epsilon": 0.5})
    feed.swap(feed.newer())
    assert (feed.consumed, feed.epsilon) == (256, 0.5) and feed.runtime is not runtime
    tick = (tmp_path / "job" / "policy.safetensors").stat()
    weights = {k: v + 1 for k, v in weights.items()}
    channel.publish(weights, {"consumed": 512, "received": 600, "updates": 8, "epsilon": 0.4})
    for name in ("policy.safetensors", "learner.json"):  # the same clock tick as the first publish
        os.utime(tmp_path / "job" / name, ns=(tick.st_atime_ns, tick.st_mtime_ns))
    feed.swap(feed.newer())
    assert (feed.consumed, feed.epsilon) == (512, 0.4)
    assert all(torch.equal(feed.runtime.core.state_dict()[k], weights[k]) for k in weights)
    assert feed.newer() is None


def test_a_jobs_reported_experience_exports_as_a_minari_dataset(client, settings):
    """Two clients step their own CartPole; episodes cut by a reset, by a step reported without
    a reward, or still open are left out; the whole ones come back as a Minari dataset that
    minari reads, step for step what the clients saw and were answered."""
    from minari import MinariDataset

    job_id = client_job(client)
    whole: list[dict] = []  # the episodes the dataset must hold, as the clients lived them

    def episode(sid: str, seed: int, steps: int | None = None, last: dict | None = None, gap: int = -1):
        """One episode: to its end (``steps`` None) or cut after ``steps`` steps, then ``last``
        (a reset, or a report) sent with the next call; at step ``gap`` no reward is reported
        (a gap: that episode is not whole)."""
        env = gym.make("CartPole-v1")
        obs, _ = env.reset(seed=seed)
        seen = {"observations": [obs], "actions": [], "rewards": []}
        report: dict = {"reset": True}
        while True:
            if len(seen["actions"]) == gap:
                report = {}
            r = client.post(f"/v1/sessions/{sid}/act", json={"observation": obs.tolist(), **report})
            assert r.status_code == 200, r.text
            if report.get("terminated") or report.get("truncated"):
                break
            if steps is not None and len(seen["actions"]) == steps:
                r = client.post(f"/v1/sessions/{sid}/act", json={"observation": obs.tolist(), **last})
                assert r.status_code == 200, r.text
                return
            action = r.json()["action"]
            obs, reward, terminated, truncated, _ = env.step(action)
            seen["observations"].append(obs)
            seen["actions"].append(action)
            seen["rewards"].append(reward)
            report = {"reward": float(reward), "terminated": terminated, "truncated": truncated}
        if gap < 0:
            whole.append(seen)

    a = client.post("/v1/sessions", json={"job": job_id}).json()["session_id"]
    b = client.post("/v1/sessions", json={"job": job_id}).json()["session_id"]
    episode(a, seed=1)
    episode(b, seed=2, steps=6, last={"reset": True})  # abandoned by a reset
    episode(a, seed=3, gap=4)  # ended, but one step reported no reward: not whole
    episode(b, seed=4)
    episode(a, seed=5)
    episode(b, seed=6, steps=3, last={"reward": 1.0})  # still open

    r = client.post(f"/v1/jobs/{job_id}/dataset", json={"dataset": "clients/cartpole-v0"})
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["episodes"] == 3 and d["steps"] == sum(len(e["actions"]) for e in whole)
    assert d["propensities"] is False and d["action_space"] == "Discrete(2)"
    ds = MinariDataset(settings.data_dir / "datasets" / "clients/cartpole-v0" / "data")
    got = sorted(ds, key=lambda e: len(e.actions))
    for ep, seen in zip(got, sorted(whole, key=lambda e: len(e["actions"])), strict=True):
        assert np.allclose(ep.observations, np.stack(seen["observations"]))
        assert ep.actions.tolist() == seen["actions"] and ep.rewards.tolist() == seen["rewards"]
        assert bool(ep.terminations[-1] or ep.truncations[-1]) and not ep.terminations[:-1].any()

    for body, job, status, expected in [
        ({"dataset": "clients/cartpole-v0"}, job_id, 409, "exists already"),
        ({"dataset": "no-version"}, job_id, 422, "Minari's form"),
        ({"dataset": "x-v0"}, "nope", 404, "not found"),
        ({"dataset": "x-v0", "extra": 1}, job_id, 422, "extra"),
    ]:
        r = client.post(f"/v1/jobs/{job}/dataset", json=body)
        assert r.status_code == status and expected in str(r.json()["detail"]), (body, r.text)
    empty = client_job(client, policy_name="nothing-yet")
    r = client.post(f"/v1/jobs/{empty}/dataset", json={"dataset": "x-v0"})
    assert r.status_code == 422 and "no whole episode" in r.json()["detail"], r.text
    env_job = client.post(
        "/v1/jobs",
        json={"algorithm": "dqn", "env_id": "CartPole-v1", "policy_name": "e", "total_frames": 1000},
    ).json()["job_id"]
    r = client.post(f"/v1/jobs/{env_job}/dataset", json={"dataset": "x-v0"})
    assert r.status_code == 422 and "source 'sessions'" in r.json()["detail"], r.text
    assert [x["dataset_id"] for x in client.get("/v1/datasets").json()["datasets"]] == ["clients/cartpole-v0"]

"""Training jobs through the REST API with a real consumer, and the trainer itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from fastapi.testclient import TestClient

from service.envs import make_env
from service.main import create_app
from service.training.common import HELDOUT_SEED, evaluate
from service.training.dqn import DQNConfig, policy_spec_for, segment_ids, train
from tests.helpers import FAST, job_body, poll_until, wait_for


def test_job_runs_to_success_and_is_served_at_once(jclient):
    r = jclient.post("/v1/jobs", json=job_body())
    assert r.status_code == 202 and r.json()["status"] == "queued"
    job_id = r.json()["job_id"]
    running = wait_for(jclient, job_id, {"running", "succeeded"})
    assert running["started_at"] is not None and running["device"] == "cpu"
    doc = wait_for(jclient, job_id, {"succeeded", "failed"})
    assert doc["status"] == "succeeded", doc["error"]
    assert doc["progress"]["frames"] == 600 and doc["progress"]["total_frames"] == 600
    points = jclient.get(f"/v1/jobs/{job_id}/metrics").json()["points"]
    frames = [p["frames"] for p in points]
    assert frames == sorted(frames) and len(frames) == 6
    result = doc["result"]
    assert result["policy"] == "trained" and result["version"] == 1
    act = jclient.post("/v1/policies/trained/act", json={"observation": [0, 0, 0.1, 0]})
    assert act.status_code == 200 and act.json()["version"] == 1
    info = jclient.get("/v1/policies/trained").json()
    prov = info["version_details"][0]["provenance"]
    assert prov["job_id"] == job_id and prov["frames"] == 600 and prov["device"] == "cpu"
    assert info["env_id"] == "CartPole-v1"
    assert any(j["job_id"] == job_id for j in jclient.get("/v1/jobs").json()["jobs"])


def test_cancel_stops_running_and_queued_jobs_without_publishing(jclient):
    long = job_body(total_frames=1_000_000, policy_name="never")
    a = jclient.post("/v1/jobs", json=long).json()["job_id"]
    b = jclient.post("/v1/jobs", json=long).json()["job_id"]
    wait_for(jclient, a, {"running"})
    poll_until(
        lambda: (jclient.get(f"/v1/jobs/{a}").json()["progress"] or {}).get("frames", 0) >= 200,
        timeout=30,
        what="the running job never reported 200 frames",
    )
    rb = jclient.post(f"/v1/jobs/{b}/cancel")
    assert rb.status_code == 202 and rb.json()["status"] == "cancelled"
    assert jclient.post(f"/v1/jobs/{a}/cancel").status_code == 202
    doc = wait_for(jclient, a, {"cancelled", "failed", "succeeded"}, timeout=30)
    assert doc["status"] == "cancelled" and doc["progress"]["frames"] < 1_000_000
    # the queue is FIFO: once a job submitted after b has run, the worker has taken b too
    c = jclient.post("/v1/jobs", json=job_body(policy_name="after")).json()["job_id"]
    assert wait_for(jclient, c, {"succeeded", "failed"})["status"] == "succeeded"
    bdoc = jclient.get(f"/v1/jobs/{b}").json()
    assert bdoc["status"] == "cancelled" and bdoc["started_at"] is None
    assert jclient.get("/v1/policies/never").status_code == 404
    assert jclient.post(f"/v1/jobs/{a}/cancel").status_code == 409


def test_failing_job_is_recorded_and_worker_goes_on(jclient):
    bad = jclient.post("/v1/jobs", json=job_body(device="cuda")).json()["job_id"]
    good = jclient.post("/v1/jobs", json=job_body()).json()["job_id"]
    doc = wait_for(jclient, bad, {"failed", "succeeded"})
    assert doc["status"] == "failed" and "CUDA" in doc["error"]
    assert wait_for(jclient, good, {"succeeded", "failed"})["status"] == "succeeded"


def test_job_records_survive_a_restart(settings):
    settings.embedded_worker = True
    with TestClient(create_app(settings)) as c:
        done = c.post("/v1/jobs", json=job_body()).json()["job_id"]
        wait_for(c, done, {"succeeded"})
        running = c.post("/v1/jobs", json=job_body(total_frames=1_000_000)).json()["job_id"]
        wait_for(c, running, {"running"})
    with TestClient(create_app(settings)) as c:
        assert c.get(f"/v1/jobs/{done}").json()["status"] == "succeeded"
        doc = c.get(f"/v1/jobs/{running}").json()
        assert doc["status"] == "failed" and "interrupted" in doc["error"]
        assert len(c.get(f"/v1/jobs/{done}/metrics").json()["points"]) == 6


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"algorithm": "a2c"}, "ppo"),  # not one of the algorithms, which the answer lists
        ({"env_id": "Nope-v0"}, "not allowed"),
        ({"env_id": "os:system"}, "not allowed"),
        ({"env_id": "Pendulum-v1"}, "discrete action space"),
        ({"policy_name": "../etc"}, "pattern"),
        ({"policy_name": "a/b"}, "pattern"),
        ({"total_frames": 0}, "greater than or equal to 1"),
        ({"total_frames": 10_000_000}, "exceeds the limit"),
        ({"hyperparameters": {"learning_rate_typo": 1}}, "learning_rate_typo"),
        ({"hyperparameters": {"lr": -1}}, "lr"),
        ({"device": "tpu"}, "auto"),
        ({"hyperparameters": {**FAST, "value_estimator": "td_lambda"}}, "recurrent=true"),
        ({"hyperparameters": {**FAST, "num_envs": 3}}, "multiple of num_envs"),
    ],
)
def test_bad_job_requests_are_422_and_create_nothing(client, patch, expected):
    before = len(client.get("/v1/jobs").json()["jobs"])
    r = client.post("/v1/jobs", json=job_body(**patch))
    assert r.status_code == 422 and expected in str(r.json()["detail"]), r.text
    assert len(client.get("/v1/jobs").json()["jobs"]) == before


def test_jobs_need_the_admin_key(settings):
    settings.api_key = "k"
    with TestClient(create_app(settings)) as c:
        assert c.post("/v1/jobs", json=job_body()).status_code == 401
        assert c.post("/v1/jobs/x/cancel").status_code == 401
        assert c.get("/v1/jobs/unknown").status_code == 404


def test_redis_queue_job_runs_in_a_separate_worker_process(settings, redis_url):
    settings.queue_url = redis_url
    settings.registry_poll_s = 0.2
    env = {
        **os.environ,
        "POLICY_SERVER_QUEUE_URL": redis_url,
        "POLICY_SERVER_MODEL_DIR": str(settings.model_dir),
        "POLICY_SERVER_DATA_DIR": str(settings.data_dir),
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with TestClient(create_app(settings)) as c:
            job_id = c.post("/v1/jobs", json=job_body(policy_name="remote")).json()["job_id"]
            doc = wait_for(c, job_id, {"succeeded", "failed"})
            assert doc["status"] == "succeeded", doc["error"]
            poll_until(
                lambda: c.get("/v1/policies/remote").status_code == 200,
                timeout=10,
                what="the API never saw the published version",
            )
            r = c.post("/v1/policies/remote/act", json={"observation": [0, 0, 0, 0]})
            assert r.status_code == 200
    finally:
        worker.terminate()
        worker.wait(30)


@pytest.mark.slow
def test_short_training_run_really_learns():
    config = DQNConfig.with_defaults(
        {"num_cells": [64, 64], "eval_episodes": 10}, env_id="CartPole-v1", total_frames=5000, seed=0
    )
    from service.registry.build import build_policy

    untrained = evaluate(
        "CartPole-v1", build_policy(policy_spec_for(config)), torch.device("cpu"), 10, HELDOUT_SEED
    )
    trained = train(config)
    assert untrained < 40
    assert trained.eval_mean_return > 100, (untrained, trained.eval_mean_return)


@pytest.mark.slow
@pytest.mark.parametrize("num_envs", [1, 4])
def test_recurrent_training_runs_and_publishes_a_recurrent_spec(num_envs):
    config = DQNConfig.with_defaults(
        {"eval_episodes": 2, "init_random_frames": 200, "num_envs": num_envs},
        env_id="CartPoleNoVel-v1",
        recurrent=True,
        total_frames=600,
    )
    points = []
    trained = train(config, on_progress=points.append)
    assert trained.spec.recurrent.type == "lstm"
    assert list(trained.spec.observation.shape) == [2]
    assert trained.frames == 600 and trained.eval_mean_return > 0
    assert points[-1]["loss"] is not None  # sequences were sampled and learned from
    # training flushes denormals in its thread and puts the caller's IEEE behaviour back
    assert (torch.tensor([1e-40]) * 1.0)[0] != 0


def test_segments_keep_each_env_copy_apart():
    ids = segment_ids(torch.Size([3, 4]), batch_index=2)
    assert ids.shape == (3, 4)
    assert all(len(set(row.tolist())) == 1 for row in ids)  # one id per copy's row
    assert len(set(ids[:, 0].tolist())) == 3  # copies differ
    earlier = set(segment_ids(torch.Size([3, 4]), batch_index=1).flatten().tolist())
    assert earlier.isdisjoint(ids.flatten().tolist())  # batches differ
    assert set(segment_ids(torch.Size([5]), batch_index=7).tolist()) == {7}  # one env: the batch


def test_vector_env_resets_each_finished_copy():
    env = make_env("CartPole-v1", num_envs=4)
    env.set_seed(0)
    td = env.rollout(300, break_when_any_done=False)
    env.close()
    assert td.batch_size == (4, 300)
    done = td["next", "done"].squeeze(-1)
    assert done.sum() > 20  # random play ends many short episodes in every copy
    after = done[:, :-1]
    # the step after an end starts a new episode of that copy only: fresh count, small state
    assert (td["step_count"][:, 1:].squeeze(-1)[after] == 0).all()
    assert (td["is_init"][:, 1:].squeeze(-1)[after]).all()
    assert (td["observation"][:, 1:][after].abs() <= 0.05).all()
    assert (td["step_count"][:, 1:].squeeze(-1)[~after] > 0).all()


def test_tensordict_modules_do_not_search_the_file_system():
    import importlib.machinery

    from tensordict import TensorDict
    from tensordict.nn import TensorDictModule

    module = TensorDictModule(torch.nn.Linear(4, 2), in_keys=["x"], out_keys=["y"])
    td = TensorDict(x=torch.zeros(1, 4), batch_size=[1])
    calls = []
    original = importlib.machinery.PathFinder.find_spec
    try:
        importlib.machinery.PathFinder.find_spec = classmethod(
            lambda cls, *a, **k: calls.append(a[0]) or original(*a, **k)
        )
        for _ in range(10):
            module(td)
    finally:
        importlib.machinery.PathFinder.find_spec = original
    assert calls == []


def test_stopping_the_server_records_the_running_job_as_interrupted(settings, tmp_path):
    import httpx

    from tests.helpers import LiveServer

    server = LiveServer(
        {
            "POLICY_SERVER_MODEL_DIR": str(settings.model_dir),
            "POLICY_SERVER_DATA_DIR": str(settings.data_dir),
        },
        tmp_path,
    )
    try:
        job_id = httpx.post(server.url + "/v1/jobs", json=job_body(total_frames=1_000_000)).json()["job_id"]
        poll_until(
            lambda: httpx.get(f"{server.url}/v1/jobs/{job_id}").json()["status"] == "running",
            timeout=60,
            what="the job never started",
        )
    finally:
        server.stop()  # SIGTERM: the server's graceful shutdown runs the lifespan's exit
    settings.embedded_worker = False  # read the record as the shutdown left it
    with TestClient(create_app(settings)) as c:
        doc = c.get(f"/v1/jobs/{job_id}").json()
        assert doc["status"] == "failed" and "interrupted" in doc["error"]
        assert doc["finished_at"] is not None


# -- workers that come and go ----------------------------------------------------------------
def _worker_process(settings) -> subprocess.Popen:
    env = {
        **os.environ,
        "POLICY_SERVER_MODEL_DIR": str(settings.model_dir),
        "POLICY_SERVER_DATA_DIR": str(settings.data_dir),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_restarting_serve_never_fails_the_job_of_a_live_worker(settings):
    """A standalone worker runs a job over the SQLite queue; ``serve`` (re)starts with its own
    embedded worker and sweep: the job stays running, its lease renewed, until its worker is
    killed; then the lease runs out and the sweep fails the job."""
    worker = _worker_process(settings)
    try:
        with TestClient(create_app(settings)) as c:  # no embedded worker: submit only
            job_id = c.post("/v1/jobs", json=job_body(total_frames=1_000_000)).json()["job_id"]
            wait_for(c, job_id, {"running"})
        settings.embedded_worker = True
        with TestClient(create_app(settings)) as c:
            store = c.app.state.job_service.store
            assert store.expire_leases() == []
            first = c.get(f"/v1/jobs/{job_id}").json()
            assert first["status"] == "running"
            poll_until(
                lambda: (
                    (c.get(f"/v1/jobs/{job_id}").json()["progress"] or {}).get("frames", 0)
                    > (first["progress"] or {}).get("frames", 0)
                ),
                timeout=60,
                what="the live worker stopped training",
            )
            worker.kill()
            worker.wait(30)
            assert store.expire_leases() == []  # its last renewal still holds
            assert store.expire_leases(now=time.time() + settings.job_lease_s) == [job_id]
            doc = c.get(f"/v1/jobs/{job_id}").json()
            assert doc["status"] == "failed" and "stopped renewing" in doc["error"]
    finally:
        worker.kill()
        worker.wait(30)


def test_reading_jobs_changes_nothing(settings):
    """GETs never sweep: a job whose lease expired stays as recorded until a sweep runs."""
    from service.training.job import Job, JobStatus, now_iso
    from service.training.job_store import SqliteJobStore

    settings.job_sweep_s = 0  # no background sweep in this app: only the explicit one below
    store = SqliteJobStore(settings.data_dir / "jobs.db")
    silent = Job(
        job_id="silent",
        status=JobStatus.running,
        created_at=now_iso(),
        request=job_body(),
        worker="another-host:1",
        lease_until=1.0,  # 1970: long expired
    )
    store.create(silent)
    with TestClient(create_app(settings)) as c:
        for _ in range(3):
            assert c.get("/v1/jobs/silent").json()["status"] == "running"
            assert c.get("/v1/jobs").json()["jobs"][0]["status"] == "running"
            assert c.get("/v1/jobs/silent/metrics").status_code == 200
        assert store.get("silent") == silent
        assert store.expire_leases() == ["silent"]
        doc = c.get("/v1/jobs/silent").json()
        assert doc["status"] == "failed" and "stopped renewing" in doc["error"]


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_expired_leases_fail_their_jobs_and_only_those(kind, tmp_path, request):
    """``expire_leases`` at an injected time: leases past it fail, leases ahead of it (and jobs
    not running) stay; the store counts statuses without reading records."""
    from service.training.job import Job, JobStatus, now_iso
    from service.training.job_store import RedisJobStore, SqliteJobStore

    if kind == "redis":
        store = RedisJobStore(request.getfixturevalue("redis_url"))
    else:
        store = SqliteJobStore(tmp_path / "jobs.db")
    now = 1_000_000.0
    leases = {"expired": now - 1, "just-expired": now, "held": now + 5, "never-leased": None}
    for job_id, lease in leases.items():
        store.create(
            Job(
                job_id=job_id,
                status=JobStatus.running,
                created_at=now_iso(),
                request=job_body(),
                worker="w:1",
            )
        )
        store.update(job_id, lease_until=lease)
    store.create(Job(job_id="queued", status=JobStatus.queued, created_at=now_iso(), request=job_body()))
    assert store.count(JobStatus.running) == 4 and store.count(JobStatus.queued) == 1
    assert sorted(store.expire_leases(now=now)) == ["expired", "just-expired", "never-leased"]
    assert store.get("held").status is JobStatus.running and store.get("queued").status is JobStatus.queued
    assert "stopped renewing" in store.get("expired").error
    assert store.count(JobStatus.running) == 1 and store.count(JobStatus.failed) == 3
    assert [j.job_id for j in store.running()] == ["held"]
    assert store.expire_leases(now=now) == []  # failed once, not again


def test_a_job_past_its_time_limit_is_stopped_and_failed(settings):
    """``JOB_TIMEOUT_S``: the trainer is asked to stop at its next batch once the (injected)
    clock passes the limit; the job fails saying so, and the worker takes the next job."""
    settings.embedded_worker = True
    settings.job_timeout_s = 60.0
    clock = [0.0]
    with TestClient(create_app(settings)) as c:
        c.app.state.job_worker.ctx.clock = lambda: clock[0]
        job_id = c.post("/v1/jobs", json=job_body(total_frames=1_000_000)).json()["job_id"]
        wait_for(c, job_id, {"running"})
        clock[0] = 61.0
        doc = wait_for(c, job_id, {"failed", "succeeded", "cancelled"})
        assert doc["status"] == "failed" and "time limit of 60 s" in doc["error"], doc
        clock[0] = 0.0
        quick = c.post("/v1/jobs", json=job_body()).json()["job_id"]
        assert wait_for(c, quick, {"succeeded", "failed"})["status"] == "succeeded"

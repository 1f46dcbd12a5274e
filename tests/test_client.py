"""The Python client (``service.sdk.PolicyClient`` / ``AsyncPolicyClient``) against a real
uvicorn server: acting, sessions (HTTP and WebSocket), rollouts, uploads, jobs, retries on 429
honouring ``Retry-After``, errors carrying the server's detail; importable without torch."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from service.sdk import AsyncPolicyClient, PolicyClient, PolicyServerError, export_policy
from tests.helpers import FAST, LiveServer

MODELS = Path(__file__).resolve().parent.parent / "models"
MAX_SESSIONS = 3


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("client")
    for name in ("cartpole-dqn", "cartpole-lstm-dqn", "taxi-dqn"):
        shutil.copytree(MODELS / name, root / "models" / name)
    server = LiveServer.serving(
        root / "models", root, embedded_worker="true", max_sessions=str(MAX_SESSIONS), registry_poll_s="0"
    )
    server.root = root
    yield server
    server.stop()


@pytest.fixture
def client(live):
    with PolicyClient(live.url) as c:
        yield c


def test_the_client_imports_without_torch():
    code = "import sys, service.sdk; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_act_single_batch_numpy_and_masks(client):
    obs = np.array([0.01, 0.02, 0.03, 0.04], dtype=np.float32)
    one = client.act("cartpole-dqn", obs, return_info=True)
    assert one.action in (0, 1) and one.policy == "cartpole-dqn" and len(one.info["action_value"]) == 2
    batch = client.act_batch("cartpole-dqn", [obs, obs * -5])
    assert batch.actions[0] == one.action and len(batch.actions) == 2
    masked = client.act("cartpole-dqn", obs, action_mask=[i != one.action for i in range(2)])
    assert masked.action == 1 - one.action
    assert client.policy_fn("cartpole-dqn")(obs) == one.action


def test_errors_carry_the_servers_detail(client):
    with pytest.raises(PolicyServerError) as err:
        client.act("cartpole-dqn", [0.0, 0.0])
    assert err.value.status == 422 and "expects [4]" in err.value.detail
    with pytest.raises(PolicyServerError) as err:
        client.act("no-such-policy", [0.0] * 4)
    assert err.value.status == 404


def test_sessions_over_http_and_the_websocket_step_alike(client):
    seq = [[0.01 * t, -0.02 * t] for t in range(6)]
    with client.session("cartpole-lstm-dqn") as s:
        http = [s.step(o, return_info=True) for o in seq]
        assert http[-1].step == 6 and s.info()["steps"] == 6
    with client.session("cartpole-lstm-dqn") as s, s.stream() as send:
        ws = [send(o, return_info=True) for o in seq]
    assert [a.action for a in ws] == [a.action for a in http]
    assert torch.allclose(
        torch.tensor([a.info["action_value"] for a in ws]),
        torch.tensor([a.info["action_value"] for a in http]),
        atol=1e-5,
    )
    with client.session("cartpole-lstm-dqn") as s:
        act = s.policy_fn()
        first = [act(o, reset=(t == 0)) for t, o in enumerate(seq)]
        s.reset()
        assert [act(o) for o in seq] == first == [a.action for a in http]


def test_a_full_server_is_retried_as_retry_after_says_then_refused(live):
    waits: list[float] = []
    with PolicyClient(live.url, retries=2, sleep=waits.append) as c:
        held = [
            c.request("POST", "/v1/sessions", json={"policy": "cartpole-dqn"}) for _ in range(MAX_SESSIONS)
        ]
        try:
            with pytest.raises(PolicyServerError) as err, c.session("cartpole-dqn"):
                pass
            assert err.value.status == 429 and "live sessions" in err.value.detail
            assert len(waits) == 2 and all(w >= 1 for w in waits)  # Retry-After is at least 1 s
        finally:
            for s in held:
                c.request("DELETE", f"/v1/sessions/{s['session_id']}")
        with c.session("cartpole-dqn") as s:  # room again
            assert s.step([0.0] * 4).action in (0, 1)


def test_rollouts_uploads_and_defaults(client, tmp_path):
    from tensordict.nn import TensorDictModule, TensorDictSequential
    from torchrl.data import Categorical, Unbounded
    from torchrl.modules import MLP, QValueModule

    r = client.rollout("cartpole-dqn", episodes=2, seed=7)
    assert len(r["episodes"]) == 2 and r["mean_return"] > 100
    policy = TensorDictSequential(
        TensorDictModule(
            MLP(in_features=4, out_features=2, num_cells=[8]),
            in_keys=["observation"],
            out_keys=["action_value"],
        ),
        QValueModule(spec=Categorical(2)),
    )
    folder = export_policy(
        policy,
        tmp_path / "mine",
        observation_spec=Unbounded(shape=(4,)),
        action_spec=Categorical(2),
        env_id="CartPole-v1",
    )
    v1 = client.upload("mine", folder)
    v2 = client.upload("mine", folder)
    assert v2 == v1 + 1
    client.set_default("mine", v1)
    assert client.policy("mine")["default_version"] == v1
    assert client.act("mine", [0.0] * 4).version == v1


def test_jobs_are_submitted_waited_for_and_their_curve_read(client, live):
    job = client.submit_job(
        algorithm="dqn",
        env_id="CartPole-v1",
        policy_name="from-client",
        total_frames=400,
        seed=1,
        device="cpu",
        hyperparameters=FAST,
    )
    assert job.status in ("queued", "running")
    done = client.wait_job(job.job_id, poll_s=0.2, timeout_s=300, progress=False)
    assert done.status == "succeeded", done.error
    points = client.job_metrics(job.job_id)
    assert points and points[-1]["frames"] >= 400
    assert client.act("from-client", [0.0] * 4).version == done.result["version"]
    with pytest.raises(PolicyServerError) as refused:  # resuming is for source-sessions jobs
        client.resume_job(job.job_id)
    assert refused.value.status == 409 and "trains in an env" in str(refused.value)
    # the job's scalars, written through torchrl.record.loggers (CSV: step = frames, value)
    loss_csv = live.root / "var" / "jobs" / job.job_id / "scalars" / "loss.csv"
    rows = [line.split(",") for line in loss_csv.read_text().splitlines()]
    assert [int(r[0]) for r in rows] == [p["frames"] for p in points if p["loss"] is not None]


def test_the_async_client(live):
    async def run():
        async with AsyncPolicyClient(live.url) as c:
            answers = await asyncio.gather(*(c.act("cartpole-dqn", [0.01 * i, 0, 0, 0]) for i in range(8)))
            sid = await c.create_session("cartpole-lstm-dqn")
            steps = [await c.step(sid, [0.0, 0.0]) for _ in range(3)]
            await c.delete_session(sid)
            with pytest.raises(PolicyServerError):
                await c.act("cartpole-dqn", [1.0])
            return answers, steps

    answers, steps = asyncio.run(run())
    assert all(a.action in (0, 1) for a in answers) and steps[-1].step == 3


def test_the_upload_command_publishes_an_exported_directory(live, tmp_path):
    from torchrl.data import Bounded, Unbounded
    from torchrl.modules import MLP, Actor

    box = Bounded(low=-torch.ones(1), high=torch.ones(1))
    actor = Actor(MLP(in_features=3, out_features=1, num_cells=[8]), in_keys=["observation"], spec=box)
    folder = export_policy(actor, tmp_path / "actor", observation_spec=Unbounded(shape=(3,)), action_spec=box)
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "upload",
        str(folder),
        "--name",
        "cli-actor",
        "--url",
        live.url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert '"version": 1' in out
    missing = subprocess.run([*cmd[:4], str(tmp_path / "nothing"), *cmd[5:]], capture_output=True, text=True)
    assert missing.returncode == 1 and "upload failed" in missing.stderr

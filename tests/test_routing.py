"""Safe rollout: a policy's traffic split between versions (sticky per X-Routing-Key, shared by
replicas through the model repository), a shadow version, and the returns each version earns
with clients (GET /v1/policies/{name}/stats, /metrics)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import gymnasium as gym
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.exploration import ExplorationParams
from service.main import create_app
from service.registry.routing import Routing, RoutingRefused, Split, key_point
from service.registry.store import ModelStore
from service.runtime.sessions import Session
from service.serving.params import ActParams
from service.serving.shadow import Shadows
from service.serving.stats import PolicyStats, t95
from tests.helpers import SPECS, poll_until, random_weights, write_policy

ROOT = Path(__file__).resolve().parents[1]
OBS = [0.1, -0.2, 0.3, 0.05]


def act(client, name="q", key=None, **body):
    headers = {"X-Routing-Key": key} if key is not None else {}
    r = client.post(f"/v1/policies/{name}/act", json={"observation": OBS, **body}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture()
def two_versions(model_dir):
    write_policy(model_dir, "q", SPECS["q"], seed=7)  # version 2 of "q", other weights
    return model_dir


@pytest.fixture()
def rclient(two_versions, settings):
    with TestClient(create_app(settings)) as c:
        yield c


# -- the routing document -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, why",
    [
        ({"weights": {"1": -0.5}}, ">= 0"),
        ({"weights": {"1": 0, "2": 0}}, "positive share"),
        ({"weights": {"1": True}}, "finite number"),
        ({"weights": {"one": 1}}, "version number"),
        ({"weights": {"0": 1}}, "positive integer"),
        ({"weights": {"1": float("inf")}}, "finite number"),
        ({"weights": {"1": 1}, "shadow": 1}, "cannot be the shadow"),
        ({"weights": {str(v): 1 for v in range(1, 18)}}, "at most 16"),
        ([1, 2], "expected"),
    ],
)
def test_a_routing_document_that_cannot_apply_is_refused_with_the_reason(raw, why):
    with pytest.raises(RoutingRefused, match=why):
        Routing.parse(raw)


def test_a_key_lands_on_the_same_version_and_raising_a_share_only_moves_keys_onto_it():
    keys = [f"client-{i}" for i in range(400)]
    small = Split.of({3: 0.9, 4: 0.1}, None)
    large = Split.of({3: 0.5, 4: 0.5}, None)
    before = {k: small.choose(k) for k in keys}
    after = {k: large.choose(k) for k in keys}
    assert before == {k: small.choose(k) for k in keys}  # sticky
    assert all(after[k] == 4 for k in keys if before[k] == 4)  # nobody on the canary leaves it
    on_canary = sum(v == 4 for v in after.values()) / len(keys)
    assert 0.4 < on_canary < 0.6 and 0.03 < sum(v == 4 for v in before.values()) / len(keys) < 0.2
    assert key_point("client-1") == key_point("client-1") and 0 <= key_point("x") < 1


# -- over the API ---------------------------------------------------------------------------------
def test_routed_calls_follow_the_weights_sticky_per_key_and_an_explicit_version_wins(rclient, two_versions):
    r = rclient.put("/v1/policies/q/routing", json={"weights": {"1": 1, "2": 1}})
    assert r.status_code == 200, r.text
    assert r.json()["split"] == {"2": 0.5, "1": 0.5}
    split = Split.of({1: 1.0, 2: 1.0}, None)
    keys = [f"k{i}" for i in range(30)]
    for key in keys:  # the version each key lands on is its hash's, on every call
        versions = {act(rclient, key=key)["version"] for _ in range(2)}
        assert versions == {split.choose(key)}
    assert {split.choose(k) for k in keys} == {1, 2}
    assert {act(rclient)["version"] for _ in range(60)} == {1, 2}  # without a key: at random
    assert act(rclient, key="k0", version=1)["version"] == 1
    assert act(rclient, key="k0", version=2)["version"] == 2
    assert rclient.get("/v1/policies/q").json()["routing"] == {"2": 0.5, "1": 0.5}
    on_disk = json.loads((two_versions / "q" / "routing.json").read_text())
    assert on_disk == {"weights": {"1": 1.0, "2": 1.0}, "shadow": None}


def test_a_new_session_lands_on_its_keys_version_and_keeps_it(rclient):
    rclient.put("/v1/policies/q/routing", json={"weights": {"1": 3, "2": 1}})
    split = Split.of({1: 3.0, 2: 1.0}, None)
    for key in ("alice", "bob", "carol", "dave", "erin", "frank"):
        r = rclient.post("/v1/sessions", json={"policy": "q"}, headers={"X-Routing-Key": key})
        assert r.status_code == 201 and r.json()["version"] == split.choose(key)
        sid = r.json()["session_id"]
        rclient.put("/v1/policies/q/routing", json={"weights": {"1": 1, "2": 3}})  # changed meanwhile
        step = rclient.post(f"/v1/sessions/{sid}/act", json={"observation": OBS})
        assert step.json()["version"] == split.choose(key)  # pinned for the session's life
        rclient.put("/v1/policies/q/routing", json={"weights": {"1": 3, "2": 1}})


def test_refused_routing_changes_nothing(rclient, two_versions):
    rclient.put("/v1/policies/q/routing", json={"weights": {"1": 1, "2": 1}})
    for body, status in [
        ({"weights": {"1": 1, "9": 1}}, 404),  # not a servable version
        ({"weights": {"1": -1}}, 422),
        ({"weights": {}}, 422),
        ({"weights": {"1": 1}, "shadow": 9}, 404),
        ({"weights": {"1": 1}, "extra": 1}, 422),
    ]:
        r = rclient.put("/v1/policies/q/routing", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["detail"]
    assert rclient.get("/v1/policies/q/routing").json()["split"] == {"2": 0.5, "1": 0.5}
    assert json.loads((two_versions / "q" / "routing.json").read_text())["weights"] == {"1": 1.0, "2": 1.0}
    assert rclient.put("/v1/policies/nope/routing", json={"weights": {"1": 1}}).status_code == 404


def test_setting_the_default_ends_the_split(rclient, two_versions):
    rclient.put("/v1/policies/q/routing", json={"weights": {"1": 1, "2": 1}})
    assert rclient.put("/v1/policies/q/default", json={"version": 1}).status_code == 200
    assert not (two_versions / "q" / "routing.json").exists()
    assert rclient.get("/v1/policies/q/routing").json()["split"] is None
    assert {act(rclient, key=f"k{i}")["version"] for i in range(20)} == {1}
    rclient.put("/v1/policies/q/routing", json={"weights": {"2": 1}})
    assert rclient.delete("/v1/policies/q/routing").status_code == 204
    assert {act(rclient)["version"] for _ in range(10)} == {1}


def test_a_deleted_version_drops_out_of_the_split_with_a_log_line(rclient, caplog):
    rclient.put("/v1/policies/q/routing", json={"weights": {"1": 1, "2": 1}})
    with caplog.at_level(logging.WARNING, logger="service.registry.registry"):
        assert rclient.delete("/v1/policies/q/versions/2").status_code == 204
    assert any("leaves out versions [2]" in r.getMessage() for r in caplog.records), caplog.text
    assert {act(rclient, key=f"k{i}")["version"] for i in range(20)} == {1}
    routing = rclient.get("/v1/policies/q/routing").json()
    assert routing["split"] == {"1": 1.0} and routing["left_out"] == [2]


def test_a_version_that_fails_to_load_is_left_out_of_the_split(model_dir, settings, caplog):
    write_policy(model_dir, "q", SPECS["q"], seed=7)
    store = ModelStore(model_dir)
    store.write_routing("q", {"weights": {"1": 1, "2": 1}, "shadow": None})
    (model_dir / "q" / "2" / "weights.safetensors").write_bytes(b"not safetensors")
    with caplog.at_level(logging.WARNING, logger="service.registry.registry"):
        with TestClient(create_app(settings)) as c:
            assert {act(c, key=f"k{i}")["version"] for i in range(20)} == {1}
    assert any("leaves out versions [2]" in r.getMessage() for r in caplog.records)


def test_replicas_on_one_repository_apply_the_same_split(two_versions, tmp_path):
    def replica(i):
        return Settings(
            model_dir=two_versions, data_dir=tmp_path / f"var{i}", registry_poll_s=0, embedded_worker=False
        )

    with TestClient(create_app(replica(0))) as a, TestClient(create_app(replica(1))) as b:
        a.put("/v1/policies/q/routing", json={"weights": {"1": 1, "2": 1}})
        assert {act(b)["version"] for _ in range(10)} == {b.app.state.registry.entry("q").default_version}
        b.app.state.registry.load_all()  # what b's poll of the repository runs
        keys = [f"user-{i}" for i in range(30)]
        assert [act(a, key=k)["version"] for k in keys] == [act(b, key=k)["version"] for k in keys]
        a.put("/v1/policies/q/default", json={"version": 2})
        b.app.state.registry.load_all()
        assert {act(b, key=k)["version"] for k in keys} == {2}


# -- per-version returns ------------------------------------------------------------------------
def play(client, sid: str, seeds: list[int], max_steps: int = 200) -> None:
    """Real CartPole episodes, one per env of the session, stepped through the server with the
    previous action's reward and end reported on each step (truncated at ``max_steps``)."""
    envs = [gym.make("CartPole-v1") for _ in seeds]
    obs = [e.reset(seed=s)[0].tolist() for e, s in zip(envs, seeds, strict=True)]
    done, steps = [False] * len(envs), [0] * len(envs)
    body = {"observations": obs, "reset": True}
    while True:
        r = client.post(f"/v1/sessions/{sid}/act", json=body)
        assert r.status_code == 200, r.text
        if all(done):
            return
        reward, term, trunc = [], [], []
        for i, (env, action) in enumerate(zip(envs, r.json()["actions"], strict=True)):
            if done[i]:  # its episode was reported: nothing more from this env
                reward.append(None), term.append(False), trunc.append(False)
                continue
            o, rew, te, tr, _ = env.step(action)
            steps[i] += 1
            obs[i] = o.tolist()
            tr = tr or steps[i] >= max_steps
            reward.append(float(rew)), term.append(bool(te)), trunc.append(bool(tr))
            done[i] = bool(te or tr)
        body = {"observations": obs, "reward": reward, "terminated": term, "truncated": trunc}


@pytest.mark.slow
def test_a_weak_and_a_strong_version_played_50_50_are_told_apart(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "cartpole-dqn", models / "cartpole-dqn")  # strong: version 1
    spec = json.loads((models / "cartpole-dqn" / "1" / "policy.json").read_text())
    ModelStore(models).write_version("cartpole-dqn", spec, random_weights(spec, seed=1))  # weak: 2
    settings = Settings(model_dir=models, data_dir=tmp_path / "var", registry_poll_s=0, embedded_worker=False)
    with TestClient(create_app(settings)) as c:
        c.put("/v1/policies/cartpole-dqn/routing", json={"weights": {"1": 0.5, "2": 0.5}})
        placed = {1: 0, 2: 0}
        for i in range(12):
            r = c.post(
                "/v1/sessions",
                json={"policy": "cartpole-dqn", "num_envs": 4},
                headers={"X-Routing-Key": f"sim-{i}"},
            )
            placed[r.json()["version"]] += 1
            play(c, r.json()["session_id"], seeds=[1000 + 4 * i + j for j in range(4)])
        stats = c.get("/v1/policies/cartpole-dqn/stats").json()
        metrics = c.get("/metrics").text
    by_version = {v["version"]: v for v in stats["versions"]}
    assert placed[1] >= 3 and placed[2] >= 3, placed
    for v in (1, 2):
        assert by_version[v]["sessions"] == placed[v]
        assert by_version[v]["episodes"] == 4 * placed[v]
    strong, weak = by_version[1]["return"], by_version[2]["return"]
    assert strong["mean"] > 150 and weak["mean"] < 100, (strong, weak)
    assert weak["ci95"][1] < strong["ci95"][0]  # the intervals separate them
    line = f'policy_server_episodes_total{{policy="cartpole-dqn",version="1"}} {4.0 * placed[1]}'
    assert line in metrics


def test_a_policy_sessions_reported_returns_and_refusals(client):
    sid = client.post("/v1/sessions", json={"policy": "q", "num_envs": 2}).json()["session_id"]
    step = lambda **kw: client.post(f"/v1/sessions/{sid}/act", json={"observations": [OBS, OBS], **kw})  # noqa: E731
    assert step(reset=True).status_code == 200
    assert step(reward=[1.0, 2.0]).status_code == 200
    for bad in (
        {"reward": [1.0]},  # one per env
        {"reward": [1.0, None], "terminated": [False, True]},  # an end needs its reward
        {"terminated": True},  # an end without the reward
        {"reward": [1.0, 2.0], "truncated": [True]},
    ):
        r = step(**bad)
        assert r.status_code == 422 and r.json()["detail"], (bad, r.text)
    assert client.get(f"/v1/sessions/{sid}").json()["steps"] == 2  # refused steps changed nothing
    assert step(reward=[1.0, 2.0], terminated=[True, False]).status_code == 200
    assert step(reward=[5.0, 1.0], truncated=[False, True], reset=[False, False]).status_code == 200
    assert step(reward=[3.0, 0.0], reset=[True, False]).status_code == 200  # env 0 abandoned
    assert step(reward=[1.0, 1.0], terminated=[True, True]).status_code == 200
    v = client.get("/v1/policies/q/stats").json()["versions"][0]
    # env 0: 1+1 ended; 5 then reset (not credited); 1 ended. env 1: 2+2+1 ended; 0+1 ended
    assert v["episodes"] == 4 and v["sessions"] == 1
    assert v["return"]["mean"] == pytest.approx((2 + 5 + 1 + 1) / 4)
    r = v["return"]
    assert r["ci95"][0] < r["mean"] < r["ci95"][1]


def test_returns_survive_the_sessions_byte_form():
    s = Session("q", 1, 3, 60.0, returns=[1.5, -2.0, 0.0])
    assert Session.from_bytes(s.to_bytes()).returns == [1.5, -2.0, 0.0]


def test_the_interval_of_the_mean_is_students_t():
    stats = PolicyStats()
    for ret in (10.0, 12.0, 14.0):
        stats.episode("p", 1, ret)
    r = stats.report("p", [1], None)["versions"][0]["return"]
    assert r["mean"] == 12 and r["std"] == pytest.approx(2.0)
    assert r["ci95"] == pytest.approx([12 - 4.303 * 2 / 3**0.5, 12 + 4.303 * 2 / 3**0.5])
    assert t95(200) == pytest.approx(1.972, abs=2e-3) and t95(31) == pytest.approx(2.040, abs=2e-3)


# -- the shadow ------------------------------------------------------------------------------------
def test_a_shadow_is_compared_never_answers_and_a_copy_of_the_weights_agrees(model_dir, settings):
    ModelStore(model_dir).write_version("q", *_version_files(model_dir / "q" / "1"))  # 2 = 1's weights
    write_policy(model_dir, "q", SPECS["q"], seed=9)  # 3: other weights
    rows = [[float(i), -float(i) / 2, 0.3 * i, 1.0] for i in range(-8, 8)]
    with TestClient(create_app(settings)) as c:
        c.put("/v1/policies/q/routing", json={"weights": {"1": 1}, "shadow": 2})
        for _ in range(5):
            assert c.post("/v1/policies/q/act", json={"observations": rows}).json()["version"] == 1
        shadow = poll_until(
            lambda: (s := c.get("/v1/policies/q/stats").json()["shadow"])["compared"] == 80 and s,
            timeout=30,
            what="the shadow did not answer the copies",
        )
        assert shadow["agreement"] == 1.0 and shadow["dropped"] == 0
        c.put("/v1/policies/q/routing", json={"weights": {"1": 1}, "shadow": 3})
        for _ in range(5):
            assert c.post("/v1/policies/q/act", json={"observations": rows}).json()["version"] == 1
        act(c, version=1)  # a call pinned to a version is not routed traffic: not copied
        other = poll_until(
            lambda: (s := c.get("/v1/policies/q/stats").json()["shadow"])["compared"] == 80 and s,
            timeout=30,
            what="the second shadow did not answer the copies",
        )
        assert other["agreement"] < 1.0
        assert 'policy_server_shadow_compared_total{policy="q",version="3"} 80.0' in c.get("/metrics").text


def _version_files(vdir: Path):
    return json.loads((vdir / "policy.json").read_text()), (vdir / "weights.safetensors").read_bytes()


def test_a_full_shadow_queue_drops_copies_and_counts_them():
    async def scenario():
        release = asyncio.Event()
        seen = []

        async def forward(runtime, obs, mask, explore, seed, info):
            seen.append(obs)
            await release.wait()  # the shadow's forward pass is slow: copies pile up
            raise RuntimeError("never compared")

        stats = PolicyStats()
        shadows = Shadows(forward, stats, capacity=2)

        class Codec:
            def decode(self, rows, masks, single, policy):
                return rows, None

        class Loaded:  # what the registry hands over: version, spec, runtime
            version = 2
            spec = type("S", (), {"action": None})()
            runtime = type("R", (), {"codec": Codec()})()

        p = ActParams("q", [OBS], True, ExplorationParams())
        shadows.offer(Loaded, p, {"action": 0})
        for _ in range(3):
            await asyncio.sleep(0)  # the consumer takes the copy, and waits in its forward pass
        for _ in range(5):
            shadows.offer(Loaded, p, {"action": 0})  # two wait in the queue, three are dropped
        dropped = stats.report("q", [], 2)["shadow"]["dropped"]
        release.set()
        await asyncio.sleep(0.01)
        await shadows.close()
        return dropped, len(seen), stats.report("q", [], 2)["shadow"]

    dropped, forwarded, shadow = asyncio.run(scenario())
    assert dropped == 3 and forwarded == 3
    assert shadow["compared"] == 3 and shadow["agreement"] == 0.0  # a failed copy never agrees


def test_changing_the_routing_needs_the_admin_key(two_versions, settings):
    settings.api_key = "k3y"
    with TestClient(create_app(settings)) as c:
        body = {"weights": {"1": 1, "2": 1}}
        assert c.put("/v1/policies/q/routing", json=body).status_code == 401
        assert c.delete("/v1/policies/q/routing").status_code == 401
        assert not (two_versions / "q" / "routing.json").exists()
        ok = c.put("/v1/policies/q/routing", json=body, headers={"Authorization": "Bearer k3y"})
        assert ok.status_code == 200 and c.get("/v1/policies/q/routing").json()["split"] == {
            "2": 0.5,
            "1": 0.5,
        }
        assert c.get("/v1/policies/q/stats").status_code == 200  # read by anyone

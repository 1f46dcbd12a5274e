"""Registry + act endpoint: every kind served equals the TorchRL module called directly."""

from __future__ import annotations

import json

import pytest
import torch
from torchrl.envs.utils import ExplorationType

from tests.helpers import SPECS, LiveServer, direct_call, obs_for, random_weights, upload, write_policy


@pytest.mark.parametrize("name", sorted(SPECS))
def test_served_action_equals_module_called_directly(client, name):
    rows = obs_for(name, 5)
    r = client.post(f"/v1/policies/{name}/act", json={"observations": rows, "return_info": True})
    assert r.status_code == 200, r.text
    body = r.json()
    out = direct_call(name, rows)
    assert torch.allclose(torch.tensor(body["actions"]).to(out["action"].dtype), out["action"], atol=1e-5)
    assert body["policy"] == name and body["version"] == 1
    kind = SPECS[name]["kind"]
    if kind == "qvalue":
        q = torch.tensor([i["action_value"] for i in body["info"]])
        assert torch.allclose(q, out["action_value"], atol=1e-5)
    if kind == "probabilistic":
        lp = torch.tensor([i["log_prob"] for i in body["info"]])
        assert torch.allclose(lp, out["action_log_prob"].reshape(-1), atol=1e-4)


@pytest.mark.parametrize("name", ["normal", "cat"])
def test_mode_equals_module_in_mode(client, name):
    rows = obs_for(name, 4)
    body = client.post(f"/v1/policies/{name}/act", json={"observations": rows, "exploration": "mode"}).json()
    out = direct_call(name, rows, ExplorationType.MODE)
    assert torch.allclose(torch.tensor(body["actions"]).to(out["action"].dtype), out["action"])
    assert body["exploration"] == "mode"


def test_tanh_normal_mode_falls_back_to_deterministic_and_says_so(client):
    rows = obs_for("tanh", 3)
    det = client.post("/v1/policies/tanh/act", json={"observations": rows}).json()
    for mode in ("mode", "mean"):
        body = client.post("/v1/policies/tanh/act", json={"observations": rows, "exploration": mode}).json()
        assert body["exploration"] == "deterministic"
        assert body["actions"] == det["actions"]


def test_deterministic_is_repeatable(client):
    rows = obs_for("tanh-lstm", 3)
    a = client.post("/v1/policies/tanh-lstm/act", json={"observations": rows}).json()
    b = client.post("/v1/policies/tanh-lstm/act", json={"observations": rows}).json()
    assert a["actions"] == b["actions"]


@pytest.mark.parametrize("name", ["q", "actor", "normal", "tanh", "cat", "q-lstm"])
def test_random_varies_and_seed_reproduces(client, name):
    rows = obs_for(name, 32)
    body = {"observations": rows, "exploration": "random", "epsilon": 1.0, "noise_std": 0.5}
    a = client.post(f"/v1/policies/{name}/act", json=body).json()["actions"]
    b = client.post(f"/v1/policies/{name}/act", json=body).json()["actions"]
    assert a != b
    s1 = client.post(f"/v1/policies/{name}/act", json={**body, "seed": 7}).json()["actions"]
    s2 = client.post(f"/v1/policies/{name}/act", json={**body, "seed": 7}).json()["actions"]
    s3 = client.post(f"/v1/policies/{name}/act", json={**body, "seed": 8}).json()["actions"]
    assert s1 == s2
    assert s1 != s3


def test_epsilon_zero_is_greedy_and_one_covers_every_action(client):
    client.app.state.settings.max_batch_size = 512
    rows = obs_for("q", 1) * 200
    greedy = client.post("/v1/policies/q/act", json={"observations": rows}).json()["actions"]
    eps0 = client.post(
        "/v1/policies/q/act", json={"observations": rows, "exploration": "random", "epsilon": 0.0}
    ).json()["actions"]
    assert eps0 == greedy
    eps1 = client.post(
        "/v1/policies/q/act", json={"observations": rows, "exploration": "random", "epsilon": 1.0}
    ).json()["actions"]
    assert set(eps1) == {0, 1, 2}


@pytest.mark.parametrize("name", ["actor", "normal", "tanh", "actor-lstm"])
def test_box_actions_stay_inside_bounds(client, name):
    rows = obs_for(name, 64, seed=3)
    for exploration in ("deterministic", "random"):
        acts = torch.tensor(
            client.post(
                f"/v1/policies/{name}/act",
                json={
                    "observations": rows,
                    "exploration": exploration,
                    "noise_std": 50.0,
                },
            ).json()["actions"]
        )
        low, high = torch.tensor(SPECS[name]["action"]["low"]), torch.tensor(SPECS[name]["action"]["high"])
        assert (acts >= low).all() and (acts <= high).all()


def test_actor_random_adds_noise(client):
    rows = obs_for("actor", 16, seed=5)
    det = torch.tensor(client.post("/v1/policies/actor/act", json={"observations": rows}).json()["actions"])
    noisy = torch.tensor(
        client.post(
            "/v1/policies/actor/act", json={"observations": rows, "exploration": "random", "noise_std": 0.05}
        ).json()["actions"]
    )
    diff = (noisy - det).abs()
    assert diff.max() > 0 and diff.max() < 0.5


@pytest.mark.parametrize("name", ["q", "q-lstm", "tanh", "cat"])
def test_batch_equals_single_calls(client, name):
    rows = obs_for(name, 6, seed=11)
    batch = client.post(f"/v1/policies/{name}/act", json={"observations": rows, "return_info": True}).json()
    for i, row in enumerate(rows):
        one = client.post(f"/v1/policies/{name}/act", json={"observation": row, "return_info": True}).json()
        assert one["action"] == pytest.approx(batch["actions"][i], abs=1e-5)
        for k, v in one["info"].items():
            assert v == pytest.approx(batch["info"][i][k], abs=1e-5)


# -- versions ---------------------------------------------------------------------------------
def test_upload_switch_default_and_delete(client):
    spec = SPECS["q"]
    r = upload(client, "q", spec, random_weights(spec, seed=42))
    assert r.status_code == 201, r.text
    assert r.json() == {"name": "q", "version": 2}
    rows = obs_for("q", 8)
    v2 = client.post("/v1/policies/q/act", json={"observations": rows, "return_info": True}).json()
    assert v2["version"] == 2
    assert client.get("/v1/policies/q").json()["default_version"] == 2

    r = client.put("/v1/policies/q/default", json={"version": 1})
    assert r.status_code == 200
    v1 = client.post("/v1/policies/q/act", json={"observations": rows, "return_info": True}).json()
    assert v1["version"] == 1
    assert v1["info"] != v2["info"]
    pinned = client.post("/v1/policies/q/act", json={"observations": rows, "version": 2}).json()
    assert pinned["version"] == 2

    assert client.delete("/v1/policies/q/versions/1").status_code == 204
    after = client.post("/v1/policies/q/act", json={"observations": rows}).json()
    assert after["version"] == 2
    r = client.post("/v1/policies/q/act", json={"observations": rows, "version": 1})
    assert r.status_code == 404 and "version 1" in r.json()["detail"]
    assert client.put("/v1/policies/q/default", json={"version": 1}).status_code == 404


def test_upload_refuses_weights_that_do_not_match_spec(client, settings):
    before = sorted(p.name for p in (settings.model_dir / "q").iterdir())
    wrong = random_weights({**SPECS["q"], "network": {"num_cells": [8]}})
    r = upload(client, "q", SPECS["q"], wrong)
    assert r.status_code == 422
    assert "weights do not match the spec" in r.json()["detail"]
    r = upload(client, "q", SPECS["q"], b"not safetensors at all")
    assert r.status_code == 422
    r = upload(client, "q", {"kind": "qvalue"}, random_weights(SPECS["q"]))
    assert r.status_code == 422 and "observation" in r.json()["detail"]
    r = upload(client, "bad..name", SPECS["q"], random_weights(SPECS["q"]))
    assert r.status_code in (404, 422)
    assert sorted(p.name for p in (settings.model_dir / "q").iterdir()) == before
    assert client.get("/v1/policies/q").json()["versions"] == [1]


def test_broken_version_is_reported_while_others_serve(tmp_path):
    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    root = tmp_path / "models"
    write_policy(root, "q", SPECS["q"])
    write_policy(root, "q", SPECS["q"], seed=1)
    (root / "q" / "2" / "weights.safetensors").write_bytes(b"garbage")
    write_policy(root, "cat", SPECS["cat"])
    (root / "cat" / "1" / "policy.json").write_text("{not json")
    settings = Settings(model_dir=root, data_dir=tmp_path / "var", registry_poll_s=0)
    with TestClient(create_app(settings)) as c:
        assert c.get("/readyz").status_code == 200
        q = c.get("/v1/policies/q").json()
        assert q["versions"] == [1] and q["default_version"] == 1
        errors = {d["version"]: d["error"] for d in q["version_details"]}
        assert errors[1] is None and "safetensors" in errors[2]
        assert c.post("/v1/policies/q/act", json={"observation": [0, 0, 0, 0]}).status_code == 200
        r = c.post("/v1/policies/q/act", json={"observation": [0, 0, 0, 0], "version": 2})
        assert r.status_code == 404 and "failed to load" in r.json()["detail"]
        cat = c.get("/v1/policies/cat").json()
        assert cat["versions"] == [] and cat["version_details"][0]["error"]


# -- bad input --------------------------------------------------------------------------------
BAD_BODIES = [
    ({"observation": [1.0, 2.0, 3.0]}, "expects [4]"),
    ({"observation": ["a", 1, 2, 3]}, "valid number"),
    ({"observation": [True, 1, 2, 3]}, "valid number"),
    ({"observation": [1e39, 0, 0, 0]}, "not finite"),
    ({"observations": []}, "empty"),
    ({"observations": [[0, 0, 0, 0], [0, 0, 0]]}, "observations[1] has shape [3]"),
    ({}, "exactly one"),
    ({"observation": [0, 0, 0, 0], "observations": [[0, 0, 0, 0]]}, "exactly one"),
    ({"observation": [0, 0, 0, 0], "exploration": "greedy"}, "deterministic"),
    ({"observation": [0, 0, 0, 0], "epsilon": 1.5}, "less than or equal to 1"),
    ({"observation": [0, 0, 0, 0], "version": 0}, "greater than or equal to 1"),
    ({"observation": [0, 0, 0, 0], "bogus": 1}, "Extra inputs"),
    ({"observations": [[0, 0, 0, 0]] * 65}, "exceeds the limit of 64"),
]


@pytest.mark.parametrize(("body", "expected"), BAD_BODIES)
def test_bad_input_gets_4xx_that_says_what_was_expected(client, body, expected):
    r = client.post("/v1/policies/q/act", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert expected in json.dumps(r.json()["detail"])
    assert client.post("/v1/policies/q/act", json={"observation": [0, 0, 0, 0]}).status_code == 200


def test_non_finite_json_numbers_refused(client):
    for token in ("NaN", "Infinity", "-Infinity"):
        r = client.post(
            "/v1/policies/q/act",
            content=f'{{"observation": [{token}, 0, 0, 0]}}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422 and "finite" in r.text


def test_unknown_policy_and_version_are_404(client):
    r = client.post("/v1/policies/nope/act", json={"observation": [0, 0, 0, 0]})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    r = client.post("/v1/policies/q/act", json={"observation": [0, 0, 0, 0], "version": 9})
    assert r.status_code == 404 and "servable: [1]" in r.json()["detail"]
    assert client.get("/v1/policies/nope").status_code == 404


def test_oversize_body_is_413(client):
    limit = client.app.state.settings.max_body_bytes
    big = {"observations": [[0.0, 0.0, 0.0, 0.0]] * (limit // 16)}  # 18 bytes a row
    r = client.post("/v1/policies/q/act", json=big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_admin_endpoints_need_the_key(settings):
    from fastapi.testclient import TestClient

    from service.main import create_app

    settings.api_key = "s3cret"
    with TestClient(create_app(settings)) as c:
        w = random_weights(SPECS["q"])
        assert upload(c, "q", SPECS["q"], w).status_code == 401
        assert upload(c, "q", SPECS["q"], w, {"Authorization": "Bearer nope"}).status_code == 403
        assert c.put("/v1/policies/q/default", json={"version": 1}).status_code == 401
        assert c.delete("/v1/policies/q/versions/1").status_code == 401
        ok = upload(c, "q", SPECS["q"], w, {"Authorization": "Bearer s3cret"})
        assert ok.status_code == 201
        # inference stays open unless protect_inference is set
        assert c.post("/v1/policies/q/act", json={"observation": [0, 0, 0, 0]}).status_code == 200


@pytest.mark.parametrize("http", ["granian", "uvicorn"])
def test_both_http_servers_serve_the_repository(model_dir, tmp_path, http):
    """``serve --http``: granian (the default) and uvicorn run the same app: a WebSocket session
    too, and SIGTERM ends the process cleanly with the access log flushed."""
    import asyncio
    import json
    import signal

    import httpx
    import websockets

    server = LiveServer.serving(model_dir, tmp_path, args=("--http", http, "--log-level", "info"))
    try:
        names = [p["name"] for p in httpx.get(server.url + "/v1/policies").json()["policies"]]
        assert names == sorted(SPECS)
        rows = obs_for("q-lstm", 4)
        r = httpx.post(server.url + "/v1/policies/q-lstm/act", json={"observations": rows})
        assert r.json()["actions"] == direct_call("q-lstm", rows)["action"].tolist()
        request_id = r.headers["x-request-id"]
        sid = httpx.post(server.url + "/v1/sessions", json={"policy": "q-lstm"}).json()["session_id"]

        async def step() -> dict:
            async with websockets.connect(
                f"{server.url.replace('http', 'ws')}/v1/sessions/{sid}/stream"
            ) as ws:
                await ws.send(json.dumps({"observation": rows[0]}))
                return json.loads(await ws.recv())

        assert asyncio.run(step())["step"] == 1
    finally:
        server.stop()
    # uvicorn re-raises the signal once its graceful shutdown is done; granian exits 0
    assert server.proc.returncode in (0, -signal.SIGTERM), server.proc.returncode
    log = (tmp_path / f"server-{server.port}.log").read_text()
    assert request_id in log

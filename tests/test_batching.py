"""Micro-batching under real concurrent load (a live uvicorn): right answers to the right callers."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from tests.helpers import LiveServer, assert_close, direct_call, obs_for


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from tests.helpers import SPECS, write_policy

    root = tmp_path_factory.mktemp("batching")
    for name in ("q", "q-lstm", "tanh"):
        write_policy(root / "models", name, SPECS[name])
    server = LiveServer.serving(root / "models", root)
    yield server
    server.stop()


def forward_passes(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics").text
    vals = {}
    for line in text.splitlines():
        for key in ("policy_server_forward_batch_size_count", "policy_server_forward_batch_size_sum"):
            if line.startswith(key):
                vals[key] = float(line.split()[-1])
    return vals["policy_server_forward_batch_size_count"], vals["policy_server_forward_batch_size_sum"]


async def _concurrently(url: str, bodies: list[tuple[str, dict]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as c:
        return await asyncio.gather(*(c.post(path, json=body) for path, body in bodies))


def test_concurrent_act_calls_are_batched_and_answer_their_own_caller(live):
    rows = obs_for("tanh", 300, seed=21)
    alone = [
        httpx.post(live.url + "/v1/policies/tanh/act", json={"observation": r, "return_info": True}).json()
        for r in rows[:40]
    ]
    passes0, obs0 = forward_passes(live.url)
    bodies = [("/v1/policies/tanh/act", {"observation": r, "return_info": True}) for r in rows]
    bad_at = {50, 150, 250}
    for i in bad_at:
        bodies[i] = ("/v1/policies/tanh/act", {"observation": [1.0, 2.0]})
    responses = asyncio.run(_concurrently(live.url, bodies))
    passes1, obs1 = forward_passes(live.url)
    for i, r in enumerate(responses):
        if i in bad_at:
            assert r.status_code == 422 and "expects [3]" in r.json()["detail"]
        else:
            assert r.status_code == 200, r.text
    for i in range(40):
        if i in bad_at:
            continue
        got = responses[i].json()
        assert_close(got["action"], alone[i]["action"])
        assert_close(got["info"], alone[i]["info"])
    # every good request is answered with the action for its own observation
    good = [i for i in range(300) if i not in bad_at]
    expected = direct_call("tanh", [rows[i] for i in good])
    got = torch.tensor([responses[i].json()["action"] for i in good])
    assert torch.allclose(got, expected["action"], atol=1e-5)
    assert obs1 - obs0 == 297
    assert passes1 - passes0 < 297, "no two requests were ever batched together"


def test_concurrent_session_steps_are_batched_without_sharing_state(live):
    n, steps = 24, 5
    seqs = [obs_for("q-lstm", steps, seed=300 + i) for i in range(n)]
    base = live.url
    sids = [
        httpx.post(base + "/v1/sessions", json={"policy": "q-lstm"}).json()["session_id"] for _ in range(n)
    ]
    batched = [[] for _ in range(n)]
    for t in range(steps):
        rs = asyncio.run(
            _concurrently(
                base,
                [
                    (f"/v1/sessions/{sid}/act", {"observation": seqs[i][t], "return_info": True})
                    for i, sid in enumerate(sids)
                ],
            )
        )
        for i, r in enumerate(rs):
            assert r.status_code == 200, r.text
            batched[i].append(r.json())
    for i in range(0, n, 6):
        sid = httpx.post(base + "/v1/sessions", json={"policy": "q-lstm"}).json()["session_id"]
        alone = [
            httpx.post(base + f"/v1/sessions/{sid}/act", json={"observation": o, "return_info": True}).json()
            for o in seqs[i]
        ]
        assert [b["action"] for b in batched[i]] == [a["action"] for a in alone]
        assert_close([b["info"] for b in batched[i]], [a["info"] for a in alone])


def test_seeded_random_calls_stay_reproducible_under_load(live):
    rows = obs_for("q", 1)[0]
    body = {"observations": [rows] * 16, "exploration": "random", "epsilon": 0.5, "seed": 3}
    ref = httpx.post(live.url + "/v1/policies/q/act", json=body).json()["actions"]
    rs = asyncio.run(
        _concurrently(
            live.url,
            [("/v1/policies/q/act", body)] * 20
            + [("/v1/policies/q/act", {"observation": rows, "exploration": "random", "epsilon": 0.5})] * 20,
        )
    )
    assert all(r.json()["actions"] == ref for r in rs[:20])
    assert all(r.status_code == 200 for r in rs[20:])

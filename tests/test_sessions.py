"""Sessions: server-held recurrent state, equal to running the LSTM over the whole sequence."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import set_recurrent_mode

from service.main import create_app
from tests.helpers import (
    SPECS,
    assert_close,
    direct_module,
    new_session,
    obs_for,
    random_weights,
    replay_alone,
    step,
    upload,
)


@pytest.mark.parametrize("name", ["q-lstm", "tanh-lstm"])
def test_stepping_equals_recurrent_mode_over_the_sequence(client, name):
    seq = obs_for(name, 12, seed=1)
    boundary = 7  # a new episode starts here
    stepped = replay_alone(client, name, seq, resets={boundary})

    spec, core = direct_module(name)
    T, L, H = len(seq), spec.recurrent.num_layers, spec.recurrent.hidden_size
    is_init = torch.zeros(1, T, 1, dtype=torch.bool)
    is_init[0, 0] = is_init[0, boundary] = True
    td = TensorDict(
        {
            "observation": torch.tensor([seq]),
            "is_init": is_init,
            "recurrent_state_h": torch.zeros(1, T, L, H),
            "recurrent_state_c": torch.zeros(1, T, L, H),
        },
        batch_size=[1, T],
    )
    with torch.no_grad(), set_recurrent_mode(True), set_exploration_type(ExplorationType.DETERMINISTIC):
        out = core(td)
    assert [s["step"] for s in stepped] == list(range(1, T + 1))
    got = torch.tensor([s["action"] for s in stepped], dtype=out["action"].dtype)
    assert torch.allclose(got, out["action"][0], atol=1e-5)
    if name == "q-lstm":
        q = torch.tensor([s["info"]["action_value"] for s in stepped])
        assert torch.allclose(q, out["action_value"][0], atol=1e-5)
    else:
        loc = torch.tensor([s["info"]["loc"] for s in stepped])
        assert torch.allclose(loc, out["loc"][0], atol=1e-5)
    # and state really matters: without resets, the step after the boundary differs
    plain = replay_alone(client, name, seq)
    assert plain[boundary]["info"] != stepped[boundary]["info"]


def test_concurrent_sessions_never_share_state(client):
    seqs = [obs_for("q-lstm", 8, seed=100 + i) for i in range(8)]
    sids = [new_session(client, "q-lstm") for _ in seqs]

    def run(i):
        return [step(client, sids[i], o) for o in seqs[i]]

    with ThreadPoolExecutor(8) as pool:
        interleaved = list(pool.map(run, range(8)))
    for i, seq in enumerate(seqs):
        alone = replay_alone(client, "q-lstm", seq)
        assert [s["action"] for s in interleaved[i]] == [s["action"] for s in alone]
        assert_close([s["info"] for s in interleaved[i]], [s["info"] for s in alone])


def test_reset_equals_fresh_session(client):
    seq = obs_for("q-lstm", 5, seed=2)
    sid = new_session(client, "q-lstm")
    for o in obs_for("q-lstm", 4, seed=9):
        step(client, sid, o)
    assert client.post(f"/v1/sessions/{sid}/reset").status_code == 200
    after = [step(client, sid, o) for o in seq]
    fresh = replay_alone(client, "q-lstm", seq)
    assert [s["info"] for s in after] == [s["info"] for s in fresh]


def test_num_envs_equals_separate_sessions(client):
    seqs = [obs_for("q-lstm", 6, seed=20 + i) for i in range(3)]
    sid = new_session(client, "q-lstm", num_envs=3)
    multi = []
    for t in range(6):
        reset = [t == 3, False, t == 2]
        r = client.post(
            f"/v1/sessions/{sid}/act",
            json={"observations": [s[t] for s in seqs], "reset": reset, "return_info": True},
        )
        assert r.status_code == 200, r.text
        multi.append(r.json())
    for i, seq in enumerate(seqs):
        resets = {3} if i == 0 else ({2} if i == 2 else set())
        single = replay_alone(client, "q-lstm", seq, resets=resets)
        assert_close([m["info"][i] for m in multi], [s["info"] for s in single])
        assert [m["actions"][i] for m in multi] == [s["action"] for s in single]


def test_session_stays_pinned_to_its_version(client):
    sid = new_session(client, "q-lstm")
    assert (
        upload(client, "q-lstm", SPECS["q-lstm"], random_weights(SPECS["q-lstm"], seed=5)).status_code == 201
    )
    o = obs_for("q-lstm", 1)[0]
    assert step(client, sid, o)["version"] == 1
    assert new_session(client, "q-lstm") != sid
    assert client.get(f"/v1/sessions/{new_session(client, 'q-lstm')}").json()["version"] == 2
    assert client.get(f"/v1/sessions/{sid}").json()["version"] == 1
    # deleting the pinned version closes the session
    assert client.delete("/v1/policies/q-lstm/versions/1").status_code == 204
    assert client.post(f"/v1/sessions/{sid}/act", json={"observation": o}).status_code == 404


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_deleting_a_version_closes_exactly_the_sessions_pinned_to_it(settings, store, request):
    """Closed at once (not at their next step): the version's sessions only; the others go on."""
    from fastapi.testclient import TestClient

    from service.main import create_app

    if store == "redis":
        settings.session_store = request.getfixturevalue("redis_url")
    with TestClient(create_app(settings)) as c:
        pinned = [new_session(c, "q-lstm") for _ in range(3)]
        assert (
            upload(c, "q-lstm", SPECS["q-lstm"], random_weights(SPECS["q-lstm"], seed=5)).status_code == 201
        )
        others = [new_session(c, "q-lstm"), new_session(c, "q")]  # version 2, another policy
        o = obs_for("q-lstm", 1)[0]
        step(c, pinned[0], o)
        assert c.delete(f"/v1/sessions/{pinned[2]}").status_code == 204  # gone before the version
        assert c.delete("/v1/policies/q-lstm/versions/1").status_code == 204
        assert [c.get(f"/v1/sessions/{sid}").status_code for sid in pinned] == [404, 404, 404]
        assert [c.get(f"/v1/sessions/{sid}").status_code for sid in others] == [200, 200]
        assert step(c, others[0], o)["version"] == 2
        assert c.get("/v1/sessions").json()["live"] == 2


def test_stateless_policies_work_through_sessions(client):
    sid = new_session(client, "actor", num_envs=2)
    rows = obs_for("actor", 2)
    s = client.post(f"/v1/sessions/{sid}/act", json={"observations": rows}).json()
    a = client.post("/v1/policies/actor/act", json={"observations": rows}).json()
    assert s["actions"] == a["actions"] and s["step"] == 1


def test_expired_session_is_404(client):
    now = [1_000_000.0]
    client.app.state.session_store.clock = lambda: now[0]  # the store's clock, moved by hand
    sid = new_session(client, "q-lstm", ttl_s=30)
    now[0] += 20
    step(client, sid, [0, 0, 0, 0])  # a call keeps the session alive for another ttl_s
    now[0] += 29.9
    assert client.get(f"/v1/sessions/{sid}").status_code == 200
    now[0] += 0.2
    assert client.get(f"/v1/sessions/{sid}").status_code == 404
    r = client.post(f"/v1/sessions/{sid}/act", json={"observation": [0, 0, 0, 0]})
    assert r.status_code == 404 and "expired" in r.json()["detail"]


def test_session_limit_is_429_with_retry_after(settings):
    settings.max_sessions = 2
    with TestClient(create_app(settings)) as c:
        a = new_session(c, "q")
        new_session(c, "q")
        r = c.post("/v1/sessions", json={"policy": "q"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert "limit of 2" in r.json()["detail"]
        assert c.get(f"/v1/sessions/{a}").status_code == 200  # nothing evicted
        assert c.delete(f"/v1/sessions/{a}").status_code == 204
        new_session(c, "q")


def test_bad_session_input_leaves_state_unchanged(client):
    seq = obs_for("q-lstm", 4, seed=3)
    sid = new_session(client, "q-lstm", num_envs=1)
    step(client, sid, seq[0])
    bad = [
        ({"observation": [0, 0, 0]}, 422, "expects [4]"),
        ({"observations": [seq[1], seq[1]]}, 422, "num_envs=1"),
        ({"observation": seq[1], "reset": [True, False]}, 422, "reset has 2 values"),
        ({"observation": [1e39] * 4}, 422, "finite"),
        ({"observation": seq[1], "exploration": "nope"}, 422, "deterministic"),
    ]
    for body, status, expected in bad:
        r = client.post(f"/v1/sessions/{sid}/act", json=body)
        assert r.status_code == status and expected in str(r.json()["detail"]), r.text
    rest = [step(client, sid, o) for o in seq[1:]]
    alone = replay_alone(client, "q-lstm", seq)
    assert [s["info"] for s in rest] == [s["info"] for s in alone[1:]]
    assert client.get(f"/v1/sessions/{sid}").json()["steps"] == 4
    r = client.post("/v1/sessions/unknown/act", json={"observation": [0, 0, 0, 0]})
    assert r.status_code == 404
    assert client.post("/v1/sessions", json={"policy": "nope"}).status_code == 404
    assert client.post("/v1/sessions", json={"policy": "q", "num_envs": 0}).status_code == 422


def test_websocket_stream_equals_http(client):
    seq = obs_for("q-lstm", 6, seed=4)
    http = replay_alone(client, "q-lstm", seq)
    sid = new_session(client, "q-lstm")
    with client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
        streamed = []
        for o in seq:
            ws.send_json({"observation": o, "return_info": True})
            streamed.append(ws.receive_json())
        ws.send_json({"observation": [1, 2]})
        err = ws.receive_json()
        assert err["status"] == 422 and "expects [4]" in err["detail"]
    assert [s["info"] for s in streamed] == [s["info"] for s in http]
    assert [s["step"] for s in streamed] == list(range(1, 7))


def test_redis_store_shares_sessions_between_app_instances(settings, redis_url):
    settings.session_store = redis_url
    seq = obs_for("q-lstm", 6, seed=8)
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        sid = new_session(a, "q-lstm", num_envs=1)
        # a, b, then a again: a's own copy of the session is stale and must not be used
        steps = [step(x, sid, o) for x, o in zip([a, a, b, b, a, a], seq, strict=True)]
        assert b.get(f"/v1/sessions/{sid}").json()["steps"] == 6
        alone = replay_alone(a, "q-lstm", seq)
        assert [s["info"] for s in steps] == [s["info"] for s in alone]
        assert b.delete(f"/v1/sessions/{sid}").status_code == 204
        assert a.get(f"/v1/sessions/{sid}").status_code == 404
        settings.max_sessions = 2
    with TestClient(create_app(settings)) as c:
        new_session(c, "q")  # the second: one is left from replay_alone
        r = c.post("/v1/sessions", json={"policy": "q"})
        assert r.status_code == 429 and "Retry-After" in r.headers


def test_protected_inference_needs_the_key_for_act_sessions_and_stream(settings):
    from starlette.testclient import WebSocketDenialResponse

    settings.api_key, settings.protect_inference = "k", True
    auth = {"Authorization": "Bearer k"}
    with TestClient(create_app(settings)) as c:
        assert c.post("/v1/policies/q/act", json={"observation": [0, 0, 0, 0]}).status_code == 401
        assert c.post("/v1/sessions", json={"policy": "q"}).status_code == 401
        sid = c.post("/v1/sessions", json={"policy": "q"}, headers=auth).json()["session_id"]
        with pytest.raises(WebSocketDenialResponse):
            with c.websocket_connect(f"/v1/sessions/{sid}/stream"):
                pass
        with c.websocket_connect(f"/v1/sessions/{sid}/stream", headers=auth) as ws:
            ws.send_json({"observation": [0, 0, 0, 0]})
            assert ws.receive_json()["step"] == 1


def test_live_session_state_is_budgeted_and_refused_with_429_beyond(settings):
    """q-lstm keeps h and c ([1, 16] float32 each) per env: 128 bytes. With a 1 KiB budget, an
    8-env session takes it all; the next stateful session is refused (429, Retry-After, a
    sentence), the server stays up and serves the live one, stateless sessions cost nothing,
    and deleting the session frees its share."""
    from fastapi.testclient import TestClient

    from service.main import create_app

    settings.max_session_state_bytes = 1024
    with TestClient(create_app(settings)) as c:
        full = c.post("/v1/sessions", json={"policy": "q-lstm", "num_envs": 8})
        assert full.status_code == 201, full.text
        sid = full.json()["session_id"]
        r = c.post("/v1/sessions", json={"policy": "q-lstm", "num_envs": 1})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "1024 bytes of state" in r.json()["detail"] and "128 more" in r.json()["detail"]
        steps = c.post(f"/v1/sessions/{sid}/act", json={"observations": [[0.1, 0.2, 0.3, 0.4]] * 8})
        assert steps.status_code == 200 and len(steps.json()["actions"]) == 8
        assert c.post("/v1/sessions", json={"policy": "q", "num_envs": 64}).status_code == 201  # stateless
        assert "policy_server_session_state_bytes 1024.0" in c.get("/metrics").text
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204
        assert c.post("/v1/sessions", json={"policy": "q-lstm", "num_envs": 8}).status_code == 201


def test_redis_sessions_apply_concurrent_steps_from_two_servers_once_each_in_order(tmp_path, redis_url):
    """Two real servers share a Redis store; 24 steps of one LSTM session sent at once, half to
    each: every step is applied exactly once (steps 1..24, no lost update), one at a time (the
    state each step used is the one the previous step left: the actions equal the sequence
    replayed in the order the server numbered the steps): each server's speculative steps
    are refused whenever the other wrote since, and run again under the lock."""
    import httpx

    from tests.helpers import LiveServer, write_policy

    write_policy(tmp_path / "models", "q-lstm", SPECS["q-lstm"])
    for i in range(2):
        (tmp_path / f"s{i}").mkdir()
    servers = [
        LiveServer.serving(
            tmp_path / "models", tmp_path / f"s{i}", session_store=redis_url, registry_poll_s="0"
        )
        for i in range(2)
    ]
    try:
        sid = httpx.post(servers[0].url + "/v1/sessions", json={"policy": "q-lstm"}).json()["session_id"]
        seq = obs_for("q-lstm", 24, seed=3)

        def send(i: int) -> dict:
            body = {"observation": seq[i], "return_info": True}
            r = httpx.post(f"{servers[i % 2].url}/v1/sessions/{sid}/act", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return {**r.json(), "i": i}

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(send, range(24)))
        assert sorted(a["step"] for a in answers) == list(range(1, 25))
        in_order = sorted(answers, key=lambda a: a["step"])
        with TestClient(create_app(_settings_for(tmp_path))) as c:
            alone = replay_alone(c, "q-lstm", [seq[a["i"]] for a in in_order])
        assert [a["info"] for a in in_order] == [s["info"] for s in alone]
        assert httpx.get(servers[1].url + f"/v1/sessions/{sid}").json()["steps"] == 24
    finally:
        for s in servers:
            s.stop()


def _settings_for(tmp_path):
    from service.config import Settings

    return Settings(
        model_dir=tmp_path / "models", data_dir=tmp_path / "alone", registry_poll_s=0, embedded_worker=False
    )


LSTM_SPEC = {"type": "lstm", "hidden_size": 16, "num_layers": 1}


def test_a_session_round_trips_through_its_bytes():
    """What the Redis store writes: metadata, needs_init, state and pending, in one value;
    read back into tensors of their own."""
    from service.exploration import Exploration
    from service.runtime.sessions import Session

    s = Session(policy="p", version=3, num_envs=3, ttl_s=60, exploration=Exploration.random, epsilon=0.2)
    s.needs_init = torch.tensor([True, False, True])
    s.state = (
        torch.randn(3, 2, 8),
        torch.randn(3, 2, 8),
        torch.randint(0, 255, (3, 2, 5), dtype=torch.uint8),
    )
    s.pending = (torch.randn(3, 4), torch.tensor([1, 0, 2]), torch.tensor([True, False, False]))
    s.steps, s.job = 7, "abc"
    back = Session.from_bytes(s.to_bytes())
    assert back.meta_json() == s.meta_json()
    ours, theirs = (back.needs_init, *back.state, *back.pending), (s.needs_init, *s.state, *s.pending)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    back.state[0].add_(1)  # writable, and not a view of anything shared
    assert not torch.equal(back.state[0], s.state[0])
    fresh = Session.from_bytes(Session(policy="p", version=1, num_envs=2, ttl_s=5).to_bytes())
    assert fresh.state is None and fresh.pending is None and fresh.needs_init.tolist() == [True, True]


@contextlib.asynccontextmanager
async def two_redis_stores(redis_url):
    """Two processes' Redis stores on one Redis, and a session the first created: (a, b, id)."""
    from service.runtime.sessions import RedisSessionStore, Session

    a, b = RedisSessionStore(redis_url), RedisSessionStore(redis_url)
    try:
        s = Session(policy="p", version=1, num_envs=1, ttl_s=60)
        await a.create(s, max_sessions=10)
        yield a, b, s.session_id
    finally:
        await a.close()
        await b.close()


def test_redis_sessions_are_parsed_again_unless_this_process_wrote_them_last(redis_url):
    """A store keeps the sessions it wrote last, parsed, and uses one only when Redis still holds
    the bytes it wrote: a step that failed (changed, not saved) or another process's write make
    it read Redis's; the copies are bounded in bytes, least recently written dropped first."""
    import asyncio

    from service.runtime.sessions import Session, WrittenCache

    async def step(store, sid, steps_before, saved=True):
        async with store.lock(sid):
            s = await store.get(sid)
            assert s.steps == steps_before
            s.steps += 1
            s.state = (torch.full((1, 1, 4), float(s.steps)),)
            if saved:
                await store.save(s)
            return s

    async def main():
        async with two_redis_stores(redis_url) as (a, b, sid):
            await step(a, sid, 0, saved=False)  # failed: its change is not seen
            await step(a, sid, 0)
            await step(b, sid, 1)  # another process wrote it
            again = await step(a, sid, 2)
            assert again.state[0].flatten().tolist() == [3.0] * 4
            async with a.lock(sid):
                assert await a.get(sid) is again  # what a wrote last: not parsed again

    asyncio.run(main())

    cache = WrittenCache(max_bytes=3 * 2 * 100)
    for i in range(5):
        cache.put(f"s{i}", bytes([i]) * 100, Session(policy="p", version=1, num_envs=1, ttl_s=60))
    assert cache.nbytes == 600
    assert cache.take("s0", bytes([0]) * 100) is None  # dropped: least recently written
    assert cache.take("s4", bytes([0]) * 100) is None  # other bytes than written: not used
    assert cache.take("s3", bytes([3]) * 100) is not None
    assert cache.nbytes == 200  # s4 and s3 taken out
    cache.put("big", b"x" * 400, Session(policy="p", version=1, num_envs=1, ttl_s=60))
    assert cache.take("big", b"x" * 400) is None and cache.nbytes == 200  # larger than the bound


def test_redis_steps_speculate_in_one_round_trip_and_fall_back_to_the_lock(redis_url):
    """A step of a session this process wrote last takes no lock: one round trip (the commit),
    kept only if Redis still holds the bytes it wrote and no call holds the lock. Refused — the
    other process wrote since, or holds the lock — nothing is written (``StaleSession``); the
    session is then stepped under the lock (two round trips) until a locked step finds this
    process's bytes again."""
    import asyncio

    from service.runtime.sessions import Session, StaleSession

    async def step(store, sid, speculative=True):
        """One step (steps + 1): the number of writes on the store's pipe it took."""
        writes = store._pipe.writes
        async with store.lock(sid, speculative):
            s = await store.get(sid)
            s.steps += 1
            s.state = (torch.full((1, 1, 4), float(s.steps)),)
            await store.save(s)
        return store._pipe.writes - writes

    async def steps_in_redis(store, sid) -> int:
        return Session.from_bytes(await store._redis.get(store._key(sid))).steps

    async def main():
        async with two_redis_stores(redis_url) as (a, b, sid):
            await step(a, sid, speculative=False)  # Redis learns the scripts (EVAL after NOSCRIPT)
            await step(a, sid)
            assert [await step(a, sid) for _ in range(3)] == [1, 1, 1]  # a wrote it last: speculates
            assert await step(a, sid, speculative=False) == 2  # asked for the lock: acquire, write
            assert await step(b, sid) == 2  # b never wrote it: under the lock
            with pytest.raises(StaleSession):  # b wrote since: a's commit is refused
                await step(a, sid)
            assert await steps_in_redis(a, sid) == 7  # b's step, not a's
            assert await step(a, sid) == 2  # contended: under the lock, on b's bytes
            assert await steps_in_redis(a, sid) == 8
            assert await step(a, sid) == 2  # under the lock again: it finds a's own bytes
            assert await step(a, sid) == 1  # so speculates again

            async with b.lock(sid):  # b holds the lock: a's commit is refused too
                with pytest.raises(StaleSession):
                    await step(a, sid)
                assert await steps_in_redis(a, sid) == 10

    asyncio.run(main())


def test_redis_pipe_answers_each_caller_in_one_write_and_recovers_from_a_lost_connection(redis_url):
    """RedisPipe: concurrent calls go out in one write and each caller gets its own answer or its
    own error; a server that forgot the scripts (SCRIPT FLUSH) still runs them; a connection
    killed under it fails the calls in flight with ConnectionError and the next call reconnects;
    a call with no reply fails with TimeoutError."""
    import asyncio

    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from service.runtime.redis_calls import RedisPipe

    async def main():
        r = aioredis.from_url(redis_url)
        echo = r.register_script("return {KEYS[1], ARGV[1]}")
        fail = r.register_script("return redis.error_reply('refused ' .. ARGV[1])")
        pipe = RedisPipe(r, timeout_s=10)
        try:
            assert await pipe.call("PING") == b"PONG"  # connected
            await r.script_load(echo.script)
            await r.script_load(fail.script)
            for flush in (False, True):
                if flush:
                    await r.script_flush()
                writes = pipe.writes
                jobs = [pipe.script(echo, [f"k{i}"], [i]) for i in range(20)]
                jobs.insert(7, pipe.script(fail, [], ["x"]))
                out = await asyncio.gather(*jobs, return_exceptions=True)
                assert isinstance(out[7], ResponseError) and "refused x" in str(out[7])
                del out[7]
                assert out == [[f"k{i}".encode(), str(i).encode()] for i in range(20)]
                # one write for the 21 (and, after the flush, one more for their EVALs)
                assert pipe.writes - writes == (2 if flush else 1)
            assert await pipe.call("GET", "missing") is None

            # the connection killed by the server while a call waits on it
            pending = asyncio.ensure_future(pipe.call("BLPOP", "never", 0))
            await asyncio.sleep(0)
            while not [c for c in (await r.client_list()) if "blpop" in c.get("cmd", "")]:
                await asyncio.sleep(0.01)
            assert await r.client_kill_filter(_type="normal", skipme=True) >= 1
            try:
                await pending
                raise AssertionError("a killed connection answered")
            except RedisConnectionError:
                pass
            assert await pipe.script(echo, ["again"], [1]) == [b"again", b"1"]  # reconnected

            # no reply within the timeout
            short = RedisPipe(r, timeout_s=0.05)
            try:
                await short.call("BLPOP", "never", 0)
                raise AssertionError("BLPOP with no list answered")
            except RedisTimeoutError:
                pass
            assert await short.call("PING") == b"PONG"  # a fresh connection
            await short.close()
        finally:
            await pipe.close()
            await r.aclose()

    asyncio.run(main())


def test_the_stream_on_a_real_server_refuses_without_the_key_and_answers_bad_messages(tmp_path):
    """The WebSocket stream under uvicorn: the handshake is denied (401) without the key; each
    message, text or bytes, gets its reply; a bad one a 4xx reply, and the connection goes on."""
    import asyncio
    import json

    import httpx
    import websockets

    from tests.helpers import LiveServer, write_policy

    write_policy(tmp_path / "models", "q-lstm", SPECS["q-lstm"])
    server = LiveServer.serving(
        tmp_path / "models", tmp_path, api_key="k", protect_inference="true", registry_poll_s="0"
    )
    try:
        auth = {"Authorization": "Bearer k"}
        sid = httpx.post(f"{server.url}/v1/sessions", json={"policy": "q-lstm"}, headers=auth).json()[
            "session_id"
        ]
        url = f"ws://127.0.0.1:{server.port}/v1/sessions/{sid}/stream"
        obs = obs_for("q-lstm")[0]

        async def main():
            with pytest.raises(websockets.InvalidStatus) as denied:
                async with websockets.connect(url):
                    pass
            assert denied.value.response.status_code == 401
            async with websockets.connect(url, additional_headers=auth) as ws:
                await ws.send(json.dumps({"observation": obs}))
                first = json.loads(await ws.recv())
                await ws.send(b"{not json")
                bad = json.loads(await ws.recv())
                await ws.send(json.dumps({"observation": [1.0]}))
                wrong = json.loads(await ws.recv())
                await ws.send(json.dumps({"observation": obs}).encode())  # bytes: a step too
                second = json.loads(await ws.recv())
            return first, bad, wrong, second

        first, bad, wrong, second = asyncio.run(main())
        assert first["step"] == 1 and "action" in first
        assert bad["status"] == 422 and wrong["status"] == 422 and "expects" in wrong["detail"]
        assert second["step"] == 2  # the bad messages changed nothing
    finally:
        server.stop()


def test_steps_to_unknown_session_ids_leave_nothing_behind(settings):
    """Tens of thousands of steps (and deletes) naming sessions that do not exist: each a 404,
    and neither the store's locks nor the process's memory grows (the edge's route cache is
    bounded, so it is filled first)."""
    import asyncio
    import gc
    import json
    import tracemalloc

    from benchmarks.act_path_cpu import http_scope

    app = create_app(settings)
    body = json.dumps({"observation": [0.0, 0.0, 0.0, 0.0]}).encode()
    statuses: dict[int, int] = {}

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses[message["status"]] = statuses.get(message["status"], 0) + 1

    async def steps(first: int, n: int) -> None:
        for i in range(first, first + n):
            await app(http_scope(f"/v1/sessions/{i:032x}/act", body), receive, send)

    async def main() -> tuple[int, int]:
        async with app.router.lifespan_context(app):
            store = app.state.session_store
            tracemalloc.start()  # before the warm-up: what the bounded caches evict is traced too
            await steps(0, 6000)  # past the route classifier's 4096 cached paths
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            await steps(10**6, 20_000)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            for i in range(2000):  # deletes take the lock too
                with pytest.raises(Exception, match="not found"):
                    await app.state.session_service.delete(f"{i:032x}")
            assert store._locks == {} and await store.count() == 0
            return grown

    grown = asyncio.run(main())
    assert statuses == {404: 26_000}
    assert grown < 256 * 1024, f"{grown} bytes more after 20,000 steps to unknown sessions"

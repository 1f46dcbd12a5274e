"""Operations: health, metrics, request ids, generated input never yields a 5xx."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.helpers import CARTPOLE_Q, LiveServer, write_policy


def test_metrics_counters_move(client):
    def value(text: str, prefix: str) -> float:
        for line in text.splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    label = (
        'policy_server_requests_total{method="POST",policy="q",route="/v1/policies/{name}/act",status="200"}'
    )
    before = value(client.get("/metrics").text, label)
    for _ in range(3):
        client.post("/v1/policies/q/act", json={"observations": [[0, 0, 0, 0]] * 5})
    client.post("/v1/sessions", json={"policy": "q"})
    text = client.get("/metrics").text
    assert value(text, label) == before + 3
    assert value(text, "policy_server_forward_batch_size_count") >= 3
    assert value(text, "policy_server_live_sessions") == 1


def test_request_id_is_echoed_or_made(client):
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    a, b = (client.get("/healthz").headers["x-request-id"] for _ in range(2))
    assert a != b and len(a) >= 12


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("schemathesis")
    write_policy(root / "models", "cp", CARTPOLE_Q)
    server = LiveServer.serving(root / "models", root, max_rollout_steps="200", max_rollout_episodes="3")
    yield server
    server.stop()


def test_generated_requests_never_get_a_5xx(live):
    """Schemathesis over our own OpenAPI schema: every operation, generated bodies and paths.

    (Driven by hypothesis directly: schemathesis' pytest plugin does not load under pytest 9.)
    """
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 15
    for op in operations:

        @given(op.as_strategy())
        @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(checks=[not_a_server_error], timeout=30)

        check()
    assert httpx.get(live.url + "/readyz").status_code == 200


def test_limits_answer_429_with_retry_after(settings):
    from fastapi.testclient import TestClient

    from service.main import create_app

    settings.max_queued_jobs = 1
    settings.max_concurrent_rollouts = 1
    with TestClient(create_app(settings)) as c:  # no worker: jobs stay queued
        body = {"algorithm": "dqn", "env_id": "CartPole-v1", "policy_name": "x", "total_frames": 100}
        assert c.post("/v1/jobs", json=body).status_code == 202
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
        assert "queued" in r.json()["detail"]
        assert len(c.get("/v1/jobs").json()["jobs"]) == 1
        # a rollout slot held elsewhere: the next rollout is refused, not queued
        with c.app.state.rollout_service.slots:
            write_policy(settings.model_dir, "cp", CARTPOLE_Q)
            c.app.state.registry.load_all()
            r = c.post("/v1/policies/cp/rollout", json={})
            assert r.status_code == 429 and "Retry-After" in r.headers
        assert c.post("/v1/policies/cp/rollout", json={"max_steps": 5}).status_code == 200


def test_slow_requests_get_504(settings):
    import asyncio

    from fastapi.testclient import TestClient

    from service.main import create_app

    settings.request_timeout_s = 0.2
    app = create_app(settings)

    @app.get("/slow")
    async def slow() -> dict:
        await asyncio.Event().wait()  # never set: only the timeout can end this request
        return {}

    with TestClient(app) as c:
        r = c.get("/slow")
        assert r.status_code == 504 and "0.2 s" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200


def test_metric_labels_never_take_names_clients_make_up(client):
    """Requests naming policies that do not exist (or odd methods) add no new metric series."""

    def series() -> list[str]:
        text = client.get("/metrics").text
        return [line for line in text.splitlines() if line.startswith("policy_server_request")]

    obs = {"observation": [0, 0, 0, 0]}
    for i in range(3):
        client.post(f"/v1/policies/made-up-{i}/act", json=obs)
        client.get(f"/v1/policies/made-up-{i}")
        client.request("BREW", f"/v1/policies/made-up-{i}")
    series()  # the scrape's own series exist from here on
    before = len(series())
    for i in range(3, 300):
        assert client.post(f"/v1/policies/made-up-{i}/act", json=obs).status_code == 404
        client.get(f"/v1/policies/made-up-{i}")
        client.request("BREW", f"/v1/policies/made-up-{i}")
    after = series()
    assert len(after) == before
    assert not any("made-up" in line or "BREW" in line for line in after)
    assert any('policy="unknown"' in line for line in after)
    client.post("/v1/policies/q/act", json=obs)
    assert any('policy="q"' in line for line in series())  # real names are kept


def test_a_redis_outage_answers_503_and_recovers_by_itself(settings, redis_server):
    """Sessions and jobs in a real redis-server that is stopped and started again: 503 with
    Retry-After while it is down, stateless act served throughout, normal service after."""
    from fastapi.testclient import TestClient

    from service.main import create_app

    settings.session_store = settings.queue_url = redis_server.url
    obs = {"observation": [0, 0, 0, 0]}
    job = {"algorithm": "dqn", "env_id": "CartPole-v1", "policy_name": "x", "total_frames": 100}
    with TestClient(create_app(settings)) as c:
        sid = c.post("/v1/sessions", json={"policy": "q-lstm"}).json()["session_id"]
        assert c.post(f"/v1/sessions/{sid}/act", json=obs).status_code == 200
        redis_server.stop()
        calls = [
            c.post(f"/v1/sessions/{sid}/act", json=obs),
            c.post("/v1/sessions", json={"policy": "q"}),
            c.get(f"/v1/sessions/{sid}"),
            c.post("/v1/jobs", json=job),
            c.get("/v1/jobs"),
        ]
        for r in calls:
            assert r.status_code == 503, r.text
            assert int(r.headers["Retry-After"]) >= 1 and "Redis" in r.json()["detail"]
        with c.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
            ws.send_json(obs)
            assert ws.receive_json()["status"] == 503
        assert c.post("/v1/policies/q/act", json=obs).status_code == 200
        assert c.get("/metrics").status_code == 200
        redis_server.start()  # an empty Redis (no persistence): the old session is gone
        assert c.get(f"/v1/sessions/{sid}").status_code == 404
        sid = c.post("/v1/sessions", json={"policy": "q-lstm"}).json()["session_id"]
        assert c.post(f"/v1/sessions/{sid}/act", json=obs).json()["step"] == 1
        assert c.post("/v1/jobs", json=job).status_code == 202


@pytest.mark.parametrize(
    ("method", "path", "kind", "policy"),
    [
        ("POST", "/v1/policies/cartpole-dqn/act", "act", "cartpole-dqn"),
        ("POST", "/v1/policies/p/rollout", "rollout", "p"),
        ("POST", "/v1/policies/p/versions", "upload", "p"),
        ("GET", "/v1/policies/p/act", "other", None),
        ("POST", "/v1/policies/../act", "other", None),
        ("POST", "/v1/policies/a/b/act", "other", None),
        ("POST", "/v1/policies//act", "other", None),
        ("POST", "/v1/policies/p/actx", "other", None),
        ("POST", "/v1/sessions/x/act", "session_act", None),
        ("POST", "/v1/sessions/x/act/y", "other", None),
        ("POST", "/v1/sessions//act", "other", None),
        ("GET", "/v1/sessions/x/act", "other", None),
    ],
)
def test_the_route_classifier_of_the_edge(method, path, kind, policy):
    from service.api.asgi import classify

    route = classify(method, path)
    assert (route.kind.value, route.policy) == (kind, policy)


@pytest.mark.parametrize("path", ["/v1/policies/q/act", "/v1/sessions/x/act", "/v1/policies/q/rollout"])
def test_a_streamed_body_over_the_limit_is_413(settings, path):
    """No Content-Length (chunked): the edge counts bytes as they arrive, hot routes or not."""
    from fastapi.testclient import TestClient

    from service.main import create_app

    settings.max_body_bytes = 2048
    with TestClient(create_app(settings)) as c:

        def chunks():
            yield b'{"observations": ['
            for _ in range(400):
                yield b"[0.0, 0.0, 0.0, 0.0],"
            yield b"[0.0, 0.0, 0.0, 0.0]]}"

        r = c.post(path, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "2048" in r.json()["detail"]
        assert r.headers["x-request-id"]
        assert c.post("/v1/policies/q/act", json={"observation": [0, 0, 0, 0]}).status_code == 200


def test_session_steps_carry_request_ids_and_metrics(client):
    sid = client.post("/v1/sessions", json={"policy": "q"}).json()["session_id"]
    r = client.post(
        f"/v1/sessions/{sid}/act", json={"observation": [0, 0, 0, 0]}, headers={"X-Request-ID": "s-1"}
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "s-1"
    r = client.post("/v1/sessions/nope/act", json={"observation": [0, 0, 0, 0]})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    text = client.get("/metrics").text
    assert 'route="/v1/sessions/{session_id}/act",status="200"' in text
    assert 'route="/v1/sessions/{session_id}/act",status="404"' in text


def test_an_unexpected_error_on_a_hot_route_is_a_500_and_the_server_goes_on(client, monkeypatch):
    service = client.app.state.act_service

    async def broken(params):
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "act", broken)
    r = client.post("/v1/policies/q/act", json={"observation": [0, 0, 0, 0]})
    assert r.status_code == 500 and r.json() == {"detail": "internal error"}
    assert r.headers["x-request-id"]
    monkeypatch.undo()
    assert client.post("/v1/policies/q/act", json={"observation": [0, 0, 0, 0]}).status_code == 200


def test_the_access_log_samples_successes_keeps_errors_and_writes_whole_lines_in_blocks(caplog):
    import io
    import json
    import logging

    from service.observability import AccessLog

    caplog.set_level(logging.INFO, logger="service.access")
    stream = io.StringIO()
    log = AccessLog(sample=0.25, stream=stream, clock=lambda: 100.0)
    firsts = [log.record(f"r{i}", "POST", "/v1/x", 200, 0.001) for i in range(40)]
    log.record("bad", "POST", "/v1/x" + "y" * 1000, 422, 0.002)
    assert not stream.getvalue()  # buffered: nothing written yet
    log.flush()
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [x["request_id"] for x in lines if x["status"] == 200] == [f"r{i}" for i in range(3, 40, 4)]
    assert lines[-1]["request_id"] == "bad" and len(lines[-1]["path"]) == 256
    assert lines[0] == {
        "ts": 100.0,
        "level": "INFO",
        "logger": "service.access",
        "msg": "request",
        "request_id": "r3",
        "method": "POST",
        "path": "/v1/x",
        "status": 200,
        "duration_ms": 1.0,
    }
    assert firsts.count(True) == 1  # one flush to schedule for the whole buffer

    class Writes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.blocks = []

        def write(self, s):
            self.blocks.append(s)
            return super().write(s)

    stream = Writes()
    log = AccessLog(sample=1.0, stream=stream)
    for i in range(200):
        log.record(f"r{i}", "GET", "/healthz", 200, 0.0)
    log.flush()
    assert len(stream.blocks) > 1
    assert all(len(b) <= AccessLog.BLOCK and b.endswith("\n") for b in stream.blocks)
    assert len(stream.getvalue().splitlines()) == 200

    caplog.set_level(logging.WARNING, logger="service.access")
    quiet = AccessLog(stream=io.StringIO())
    assert quiet.record("r", "GET", "/", 500, 0.0) is False


def test_every_process_of_serve_workers_writes_the_json_access_log(tmp_path, redis_url):
    """``serve --workers 2`` (sessions in Redis): the worker processes log as ``serve`` does."""
    import json

    write_policy(tmp_path / "models", "cp", CARTPOLE_Q)
    server = LiveServer.serving(
        tmp_path / "models", tmp_path, args=("--workers", "2", "--log-level", "info"), session_store=redis_url
    )
    try:
        ids = set()
        with httpx.Client(base_url=server.url) as c:
            for _ in range(20):
                r = c.post("/v1/policies/cp/act", json={"observation": [0.0, 0.1, 0.0, -0.1]})
                assert r.status_code == 200, r.text
                ids.add(r.headers["x-request-id"])
    finally:
        server.stop()  # flushes the buffered lines
    lines = [
        json.loads(x)
        for x in (tmp_path / f"server-{server.port}.log").read_text().splitlines()
        if x[:1] == "{"
    ]
    logged = {x["request_id"] for x in lines if x.get("logger") == "service.access" and x["status"] == 200}
    assert ids <= logged


def test_request_latency_buckets_are_inclusive_and_cumulative():
    """The edge's request metrics, rendered at scrape: Prometheus's ``le`` semantics."""
    from service.observability import LATENCY_BUCKETS, Metrics

    m = Metrics()
    act = "/v1/policies/{name}/act"
    for seconds in (0.0005, 0.0007, 0.003, 7.0):  # on a bound, between bounds, past the last
        m.observe_request(act, "POST", 200, "q", seconds)
    m.observe_request(act, "POST", 422, "q", 0.0001)
    lines = m.render().decode().splitlines()

    def sample(name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        (line,) = [x for x in lines if x.startswith(f"{name}{{{want}}}")]
        return float(line.rsplit(" ", 1)[1])

    bucket = "policy_server_request_seconds_bucket"
    assert len(LATENCY_BUCKETS) == 11
    assert sample(bucket, le="0.0005", policy="q", route=act) == 2  # 0.0001 and 0.0005
    assert sample(bucket, le="0.001", policy="q", route=act) == 3
    assert sample(bucket, le="0.005", policy="q", route=act) == 4
    assert sample(bucket, le="5.0", policy="q", route=act) == 4
    assert sample(bucket, le="+Inf", policy="q", route=act) == 5
    assert sample("policy_server_request_seconds_count", policy="q", route=act) == 5
    assert sample("policy_server_request_seconds_sum", policy="q", route=act) == pytest.approx(7.0043)
    requests = "policy_server_requests_total"
    assert sample(requests, method="POST", policy="q", route=act, status="200") == 4
    assert sample(requests, method="POST", policy="q", route=act, status="422") == 1


def test_the_hot_routes_have_one_implementation_whatever_the_content_type(client):
    """The act routes (``api/hot``) and /v2 infer (``api/oip.answer``) are answered by the edge
    for any content-type (tritonclient-like
    clients send none, some send text/plain): the same answers, errors included; they are in
    the OpenAPI schema and no FastAPI route is mounted for them."""
    sid = client.post("/v1/sessions", json={"policy": "q"}).json()["session_id"]
    cases = [
        ("/v1/policies/q/act", {"observation": [0.1, 0.2, 0.3, 0.4], "return_info": True}),
        ("/v1/policies/q/act", {"observation": [0.1, 0.2, 0.3]}),  # 422 from the codec
        ("/v1/policies/q/act", {"observations": []}),  # 422 from the schema
        ("/v1/policies/nope/act", {"observation": [0.1]}),  # 404
        (f"/v1/sessions/{sid}/act", {"observation": [0.1, 0.2, 0.3], "reset": True}),
        ("/v1/sessions/unknown/act", {"observation": [0.1, 0.2, 0.3, 0.4]}),
        (
            "/v2/models/q/infer",
            {"inputs": [{"name": "observation", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]},
        ),
        (
            "/v2/models/q/versions/1/infer",
            {"inputs": [{"name": "observation", "shape": [1, 3], "datatype": "FP32", "data": [0] * 3}]},
        ),
        ("/v2/models/q/versions/x/infer", {"inputs": []}),  # 422: not a version
    ]
    for path, body in cases:
        raw = json.dumps(body).encode()
        answers = []
        for content_type in ("application/json", "text/plain", None):
            headers = {"content-type": content_type} if content_type else {}
            r = client.post(path, content=raw, headers=headers)
            answers.append((r.status_code, r.json()))
        assert answers[0] == answers[1] == answers[2], (path, answers)
    statuses = [client.post(p, json=b).status_code for p, b in cases]
    assert statuses == [200, 422, 422, 404, 422, 404, 200, 422, 422]
    schema = client.get("/openapi.json").json()["paths"]
    for path, model in (
        ("/v1/policies/{name}/act", "ActRequest"),
        ("/v1/sessions/{session_id}/act", "SessionActRequest"),
        ("/v2/models/{name}/infer", "OipInferRequest"),
        ("/v2/models/{name}/versions/{version}/infer", "OipInferRequest"),
    ):
        ref = schema[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith(model)
    mounted = {getattr(r, "path", None) for r in client.app.routes}
    assert not mounted & {
        "/v1/policies/{name}/act",
        "/v1/sessions/{session_id}/act",
        "/v2/models/{name}/infer",
    }

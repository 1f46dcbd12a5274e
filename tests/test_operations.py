"""Operations: health, metrics, request ids, generated input never yields a 5xx."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.helpers import LiveServer, write_policy
from tests.test_rollouts import CARTPOLE_Q


def test_metrics_counters_move(client):
    def value(text: str, prefix: str) -> float:
        for line in text.splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    label = ('policy_server_requests_total{method="POST",policy="q",'
             'route="/v1/policies/{name}/act",status="200"}')
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
    server = LiveServer({"POLICY_SERVER_MODEL_DIR": str(root / "models"),
                         "POLICY_SERVER_DATA_DIR": str(root / "var"),
                         "POLICY_SERVER_EMBEDDED_WORKER": "false",
                         "POLICY_SERVER_MAX_ROLLOUT_STEPS": "200",
                         "POLICY_SERVER_MAX_ROLLOUT_EPISODES": "3"}, root)
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
        @settings(max_examples=15, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(checks=[not_a_server_error], timeout=30)

        check()
    assert httpx.get(live.url + "/readyz").status_code == 200

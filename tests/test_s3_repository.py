"""The model repository on S3-compatible storage, against a real server (SeaweedFS ``weed mini``):
the same layout as on disk, versions visible only when complete, claims that keep concurrent
publishers apart, a publisher killed mid-publish leaving nothing listed, and two servers on one
bucket seeing each other's versions and routing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from service.registry.registry import Registry
from service.registry.s3store import S3ModelStore, parse_s3_url
from tests.helpers import SPECS, LiveServer, S3Server, poll_until, random_weights, upload_files

ROOT = Path(__file__).resolve().parents[1]
OBS = [0.1, -0.2, 0.3, 0.05]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)  # what a deployment sets: the AWS variables and the endpoint
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture()
def url(s3):
    return f"s3://{s3.bucket}/{uuid.uuid4().hex[:12]}"


def store_at(s3, url) -> S3ModelStore:
    return S3ModelStore(url, s3.endpoint)


def test_s3_urls_are_parsed_and_anything_else_refused():
    assert parse_s3_url("s3://models") == ("models", "")
    assert parse_s3_url("s3://models/team/a/") == ("models", "team/a/")
    for bad in ("s3:/models", "http://x/y", "s3://A_B/x", "s3://"):
        with pytest.raises(ValueError, match="expected s3://bucket"):
            parse_s3_url(bad)


def test_versions_default_routing_and_delete_round_trip(s3, url):
    store = store_at(s3, url)
    assert store.names() == [] and store.versions("q") == []
    w1, w2 = random_weights(SPECS["q"], 1), random_weights(SPECS["q"], 2)
    assert store.write_version("q", SPECS["q"], w1) == 1
    assert store.write_version("q", SPECS["q"], {"weights.safetensors": w2}) == 2
    assert store.names() == ["q"] and store.versions("q") == [1, 2]
    assert store.read_weights("q", 2) == w2 and store.read_spec_json("q", 1)["kind"] == "qvalue"
    with pytest.raises(ValueError, match="larger than|limit|too large"):
        store.read_file("q", 1, "weights.safetensors", limit=10)
    with pytest.raises(ValueError, match="invalid file name"):
        store.read_file("q", 1, "../policy.json")
    store.write_default("q", 1)
    store.write_routing("q", {"weights": {"1": 1.0, "2": 1.0}, "shadow": None})
    assert store.read_default("q") == 1 and store.read_routing("q")["weights"] == {"1": 1.0, "2": 1.0}
    store.delete_version("q", 1)
    assert store.versions("q") == [2] and store.read_default("q") is None
    store.delete_version("q", 2)
    # the policy's files went with it (SeaweedFS may keep the empty "directory": no versions)
    assert store.versions("q") == [] and store.read_routing("q") is None
    assert [k for k, _ in store._keys(store._policy_key("q"))] == []


def test_concurrent_publishers_never_take_the_same_number(s3, url):
    def publish(i):
        store = store_at(s3, url)  # one client each, as separate processes would have
        for j in range(3):
            got.append(store.write_version("q", SPECS["q"], random_weights(SPECS["q"], 10 * i + j)))

    got: list[int] = []
    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 13))
    assert store_at(s3, url).versions("q") == list(range(1, 13))


KILLED = textwrap.dedent(
    """
    import sys, time
    from service.registry.s3store import S3ModelStore
    from tests.helpers import SPECS, random_weights

    store = S3ModelStore(sys.argv[1], sys.argv[2])
    put = store._put

    def paused_put(key, data, exclusive=False):
        if key.endswith("policy.json"):  # every other file of the version is written
            print("files written", flush=True)
            time.sleep(600)
        return put(key, data, exclusive)

    store._put = paused_put
    store.write_version("q", SPECS["q"], random_weights(SPECS["q"]))
    """
)


def test_a_publisher_killed_mid_publish_leaves_nothing_listed(s3, url, tmp_path):
    store = store_at(s3, url)
    store.write_version("q", SPECS["q"], random_weights(SPECS["q"]))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, url, s3.endpoint],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout.readline().strip() == "files written"
        proc.kill()
        proc.wait(10)
        keys = [k for k, _ in store._keys(store._policy_key("q") + "2/")]
        assert any(k.endswith("weights.safetensors") for k in keys)  # it got that far
        assert store.versions("q") == [1]  # and nothing is listed
        registry = Registry(store)
        registry.load_all()
        assert sorted(registry.entry("q").versions) == [1] and not registry.entry("q").errors
        assert store.write_version("q", SPECS["q"], random_weights(SPECS["q"], 3)) == 3  # 2 is skipped
        assert store.sweep(max_age_s=3600) == []  # too fresh to be a dead publisher's
        assert store.sweep(max_age_s=0) == ["q/2"]
        assert [k for k, _ in store._keys(store._policy_key("q") + "2/")] == []
        assert store.versions("q") == [1, 3]
    finally:
        if proc.poll() is None:
            proc.kill()


def _copy_tree(s3, url, tree: Path) -> None:
    bucket, prefix = parse_s3_url(url)
    client = s3.client()
    for f in tree.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, prefix + str(f.relative_to(tree)))


def test_a_plain_copy_of_the_model_directory_serves_as_it_does_on_disk(s3, url, tmp_path):
    _copy_tree(s3, url, ROOT / "models")
    on_s3 = Settings(model_dir=url, data_dir=tmp_path / "a", registry_poll_s=0, embedded_worker=False)
    on_disk = Settings(
        model_dir=ROOT / "models", data_dir=tmp_path / "b", registry_poll_s=0, embedded_worker=False
    )
    with TestClient(create_app(on_s3)) as a, TestClient(create_app(on_disk)) as b:
        listed = [p["name"] for p in a.get("/v1/policies").json()["policies"]]
        assert listed == [p["name"] for p in b.get("/v1/policies").json()["policies"]]
        assert "cartpole-dqn" in listed
        rows = [[0.01 * i, -0.02 * i, 0.03, 0.1] for i in range(16)]
        for client in (a, b):
            r = client.post("/v1/policies/cartpole-dqn/act", json={"observations": rows, "return_info": True})
            assert r.status_code == 200
        answers = [
            c.post("/v1/policies/cartpole-dqn/act", json={"observations": rows, "return_info": True}).json()
            for c in (a, b)
        ]
        assert answers[0]["actions"] == answers[1]["actions"] and answers[0]["info"] == answers[1]["info"]


def test_two_servers_on_one_bucket_see_each_others_versions_and_routing(s3, url, tmp_path):
    store = store_at(s3, url)
    store.write_version("q", SPECS["q"], random_weights(SPECS["q"], 1))
    servers = [
        LiveServer.serving(url, tmp_path / name, registry_poll_s="0.3", **{"s3_endpoint_url": s3.endpoint})
        for name in ("a", "b")
        if (tmp_path / name).mkdir() is None
    ]
    a, b = servers
    try:
        r = httpx.post(
            f"{a.url}/v1/policies/q/versions", files=upload_files(SPECS["q"], random_weights(SPECS["q"], 2))
        )
        assert r.status_code == 201 and r.json()["version"] == 2, r.text
        assert store.versions("q") == [1, 2]  # written to the bucket
        poll_until(
            lambda: httpx.get(f"{b.url}/v1/policies/q").json()["versions"] == [1, 2],
            timeout=30,
            what="server b never listed the version a published",
        )
        act = httpx.post(f"{b.url}/v1/policies/q/act", json={"observation": OBS, "version": 2})
        assert act.status_code == 200 and act.json()["version"] == 2
        httpx.put(f"{a.url}/v1/policies/q/routing", json={"weights": {"1": 1, "2": 1}}).raise_for_status()
        poll_until(
            lambda: httpx.get(f"{b.url}/v1/policies/q/routing").json()["split"] == {"2": 0.5, "1": 0.5},
            timeout=30,
            what="server b never applied a's routing",
        )
        keys = [f"user-{i}" for i in range(20)]
        on = {
            s.url: [
                httpx.post(
                    f"{s.url}/v1/policies/q/act", json={"observation": OBS}, headers={"X-Routing-Key": k}
                ).json()["version"]
                for k in keys
            ]
            for s in servers
        }
        assert on[a.url] == on[b.url] and set(on[a.url]) == {1, 2}
        assert httpx.delete(f"{a.url}/v1/policies/q/versions/2").status_code == 204
        poll_until(
            lambda: httpx.get(f"{b.url}/v1/policies/q").json()["versions"] == [1],
            timeout=30,
            what="server b still serves the deleted version",
        )
        assert json.loads(json.dumps(httpx.get(f"{b.url}/v1/policies/q/routing").json()))["split"] == {
            "1": 1.0
        }
    finally:
        for s in servers:
            s.stop()

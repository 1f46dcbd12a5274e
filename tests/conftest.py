from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from service.process import configure_process
from tests.helpers import CARTPOLE_Q, NOVEL_LSTM, PENDULUM, SPECS, RedisServer, write_policy

configure_process()  # what the CLI and create_app do; tests that train call trainers directly
# no gRPC service on the default port in tests (apps and the servers they start inherit this);
# the gRPC tests give their server a free port of its own
os.environ["POLICY_SERVER_GRPC_PORT"] = "0"


@pytest.fixture()
def model_dir(tmp_path):
    root = tmp_path / "models"
    for name, spec in SPECS.items():
        write_policy(root, name, spec)
    return root


@pytest.fixture()
def settings(model_dir, tmp_path) -> Settings:
    return Settings(
        model_dir=model_dir,
        data_dir=tmp_path / "var",
        registry_poll_s=0,
        max_batch_size=64,
        embedded_worker=False,
    )


@pytest.fixture()
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture()
def app(client):
    return client.app


@pytest.fixture()
def jclient(settings):
    """An app whose embedded worker consumes training jobs."""
    settings.embedded_worker = True
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture()
def env_models(model_dir):
    """The model directory plus policies bound to allow-listed environments."""
    write_policy(model_dir, "cp", CARTPOLE_Q, seed=3)
    write_policy(model_dir, "novel", NOVEL_LSTM)
    write_policy(model_dir, "pend", PENDULUM)
    return model_dir


@pytest.fixture()
def rclient(env_models, settings):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture()
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server):
    return redis_server.url

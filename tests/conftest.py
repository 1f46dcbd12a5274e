from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from tests.helpers import SPECS, write_policy


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

"""Dockerfile and docker-compose.yml agree with the settings the code reads."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {f"POLICY_SERVER_{name.upper()}" for name in Settings.model_fields}


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_commands_and_environment():
    services = compose()["services"]
    assert set(services) == {"api", "worker", "redis"}
    assert services["api"]["command"][:2] == ["policy-server", "serve"]
    assert services["worker"]["command"] == ["policy-server", "worker"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        unknown = {k for k in env if k.startswith("POLICY_SERVER_")} - FIELDS
        assert not unknown, f"{name} sets variables the code never reads: {unknown}"
        assert env["POLICY_SERVER_QUEUE_URL"].startswith("redis://redis:")
    api_env = services["api"]["environment"]
    assert api_env["POLICY_SERVER_EMBEDDED_WORKER"] == "false"
    assert api_env["POLICY_SERVER_SESSION_STORE"].startswith("redis://redis:")
    assert "POLICY_SERVER_API_KEY" in api_env
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert "gpu" in gpu["capabilities"]
    for name in services:
        assert services[name]["restart"] == "unless-stopped"
        assert "healthcheck" in services[name]


def test_compose_shares_one_volume_for_models_and_job_data():
    doc = compose()
    services = doc["services"]
    mounts = {}
    for name in ("api", "worker"):
        vols = [v.split(":") for v in services[name]["volumes"]]
        assert len(vols) == 1
        mounts[name] = vols[0]
        assert vols[0][0] in doc["volumes"]
        env = services[name]["environment"]
        for key in ("POLICY_SERVER_MODEL_DIR", "POLICY_SERVER_DATA_DIR"):
            assert env[key].startswith(vols[0][1] + "/"), (name, key)
    assert mounts["api"] == mounts["worker"]


def test_dockerfile_runs_serve_as_non_root_with_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert 'CMD ["policy-server", "serve"' in text
    assert "ARG BASE_IMAGE" in text  # GPU workers build on a CUDA torch image
    env_names = set(re.findall(r"(POLICY_SERVER_[A-Z_]+)=", text))
    assert env_names and env_names <= FIELDS
    assert "COPY models" in text
    assert Path(ROOT / "models").is_dir()

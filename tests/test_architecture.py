"""Layers import downward only: api -> schemas -> serving -> runtime / training -> envs ->
registry -> leaves.

Read from the source (every ``import``, also inside functions), so a new upward import fails here
before it tangles the code; every module of ``service`` must fall under a rule, so a new package
gets one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "service"
ROUTERS = {
    "service.api.policies",
    "service.api.sessions",
    "service.api.envs",
    "service.api.jobs",
    "service.api.health",
}
UP_FROM_LEAVES = ("service.",)
FORBIDDEN = {
    # leaves: what every layer may use
    "service.errors": UP_FROM_LEAVES,
    "service.config": UP_FROM_LEAVES,
    "service.exploration": UP_FROM_LEAVES,  # torch-free: schemas and sessions read it
    "service.observability": UP_FROM_LEAVES,
    "service.redis_outage": (
        "service.registry",
        "service.runtime",
        "service.serving",
        "service.api",
        "service.training",
        "service.envs",
        "service.main",
        "service.sdk",
        "service.schemas",
        "service.process",
        "service.cli",
    ),
    "service.process": (
        "service.registry",
        "service.runtime",
        "service.serving",
        "service.api",
        "service.training",
        "service.main",
        "service.sdk",
        "service.schemas",
        "service.cli",
    ),
    # the allow-listed environments sit on the registry's spec
    "service.envs": (
        "service.runtime",
        "service.serving",
        "service.api",
        "service.training",
        "service.main",
        "service.sdk",
        "service.schemas",
        "service.cli",
    ),
    "service.registry": (
        "service.runtime",
        "service.serving",
        "service.api",
        "service.training",
        "service.main",
        "service.sdk",
    ),
    "service.runtime": (
        "service.serving",
        "service.api",
        "service.training",
        "service.main",
        "service.sdk",
        "service.schemas",
        "service.cli",
    ),
    "service.training": (
        "service.serving",
        "service.api",
        "service.main",
        "service.runtime",
        "service.sdk",
        "service.schemas",
        "service.cli",
    ),
    "service.serving": ("service.api", "service.main", "service.sdk", "service.schemas", "service.cli"),
    # request/response models: read by the API, built from the service layer's parameter objects
    "service.schemas": ("service.api", "service.main", "service.sdk", "service.cli"),
    "service.api": ("service.sdk", "service.main", "service.cli"),
    "service.main": ("service.sdk", "service.cli"),  # the composition root
    "service.cli": (),  # the top: the processes
    # the SDK sits beside the server: export reads the registry's spec and builder, the client
    # nothing of the service at all (it runs where only httpx is installed)
    "service.sdk": ("service.runtime", "service.serving", "service.api", "service.training", "service.main"),
    "service.sdk.client": ("service.",),
}


def _modules() -> dict[str, set[str]]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
        out[name] = {m for m in imported if m.startswith("service")}
    return out


MODULES = _modules()


def _rule(module: str) -> str | None:
    """The most specific layer of FORBIDDEN that ``module`` belongs to."""
    layers = [layer for layer in FORBIDDEN if module == layer or module.startswith(layer + ".")]
    return max(layers, key=len, default=None)


def test_every_module_falls_under_a_layer():
    assert [m for m in MODULES if m != "service" and _rule(m) is None] == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_downward_only(layer):
    bad = [
        f"{mod} imports {imp}"
        for mod, imports in MODULES.items()
        if mod == layer or mod.startswith(layer + ".")
        for imp in imports
        if imp.startswith(FORBIDDEN[layer]) and not imp.startswith(layer)
    ]
    assert bad == []


def test_no_router_imports_another_router():
    bad = [f"{mod} imports {imp}" for mod in ROUTERS for imp in MODULES[mod] if imp in ROUTERS - {mod}]
    assert bad == []


def test_only_the_edge_knows_http_status_codes():
    """Domain code raises domain errors; ``service.api.errors`` alone maps them to statuses."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        if {"api", "sdk"} & set(path.relative_to(ROOT).parts):  # the server's edge and its client
            continue
        text = path.read_text()
        if "status_code" in text or "HTTPException" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []

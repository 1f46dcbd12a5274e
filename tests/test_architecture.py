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
    "service.api.oip",
    "service.api.rllib",
    "service.api.dashboard",
    "service.api.datasets",
}
# Top to bottom: a module imports from its own package and the layers below it, never from a
# layer above or from a sibling of its own row.
LAYERS = [
    ("service.cli",),  # the processes
    ("service.main",),  # the composition root
    ("service.api",),  # HTTP
    ("service.schemas",),  # request/response models, built into the service layer's parameters
    ("service.serving",),  # the service layer
    ("service.runtime", "service.training"),  # serving's runtime; jobs and trainers
    ("service.process",),  # process-wide settings (registers the envs)
    ("service.envs",),  # the allow-listed environments (read the registry's spec)
    ("service.registry", "service.datasets"),  # the model repository; offline datasets
    ("service.redis_outage",),
    # leaves: nothing of the service (exploration: torch-free, read by schemas and sessions)
    ("service.errors", "service.config", "service.exploration", "service.observability"),
]
ALL = tuple(name for row in LAYERS for name in row)
SDK = ("service.sdk",)  # beside the server: used by the CLI only


def _forbidden() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for i, row in enumerate(LAYERS):
        above = tuple(name for upper in LAYERS[:i] for name in upper)
        for layer in row:
            siblings = tuple(n for n in row if n != layer)
            leaf = i == len(LAYERS) - 1
            out[layer] = ("service.",) if leaf else above + siblings + (SDK if layer != "service.cli" else ())
    # the SDK: export reads the registry's spec and builder, the client nothing of the service at
    # all (it runs where only httpx is installed)
    out["service.sdk"] = tuple(n for n in ALL if n != "service.registry")
    out["service.sdk.client"] = ("service.",)
    # a program's export checks its archives as the server serves them: the registry's loader,
    # then the runtime that serves it
    served = ("service.registry", "service.runtime", "service.exploration", "service.errors")
    out["service.sdk.program_export"] = tuple(n for n in ALL if n not in served)
    return out


FORBIDDEN = _forbidden()


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
        if _rule(mod) == layer  # the most specific rule a module falls under
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

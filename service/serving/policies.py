"""The model repository as the API sees it: list, inspect, publish, choose the default, delete."""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from typing import Any

from service.errors import InvalidInput
from service.registry.registry import PolicyEntry, Registry
from service.runtime.portable import export_bytes
from service.serving.sessions import SessionService
from service.serving.stats import PolicyStats


def parse_spec_upload(raw: bytes) -> dict[str, Any]:
    """An uploaded ``policy.json`` as a JSON object (its content is checked by the registry)."""
    try:
        spec_json = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"spec is not valid JSON ({exc}); expected policy.json") from None
    if not isinstance(spec_json, dict):
        raise InvalidInput("spec must be a JSON object (policy.json)")
    return spec_json


def policy_detail(entry: PolicyEntry) -> dict[str, Any]:
    details = [
        {
            "version": v,
            "spec": lv.spec.model_dump(mode="json"),
            "provenance": lv.spec.provenance,
            "error": None,
        }
        for v, lv in entry.versions.items()
    ]
    details += [
        {"version": v, "spec": None, "provenance": None, "error": err} for v, err in entry.errors.items()
    ]
    details.sort(key=lambda d: d["version"])
    return {**entry.summary(), "version_details": details}


def routing_public(entry: PolicyEntry) -> dict[str, Any]:
    asked, split = entry.routing, entry.split
    return {
        "name": entry.name,
        "weights": None if asked is None else asked.to_json()["weights"],
        "shadow": None if asked is None else asked.shadow,
        "split": None if split is None else {str(v): w for v, w in split.shares().items()},
        "left_out": [] if asked is None else asked.servable(entry.versions)[1],
    }


EXPORT_CACHE = 8  # exported files kept (a version never changes: its export neither)


class PolicyService:
    def __init__(
        self, registry: Registry, sessions: SessionService, stats: PolicyStats | None = None
    ) -> None:
        self.registry = registry
        self.sessions = sessions
        self.stats = stats or PolicyStats()
        # (name, version, format) -> (the loaded version it was made from, the file): a number
        # deleted and published again is another version, exported afresh
        self._exports: OrderedDict[tuple[str, int, str], tuple[object, bytes]] = OrderedDict()
        self._exporting = asyncio.Lock()  # one export at a time: each takes a core for ~1 s

    async def export(self, name: str, version: int, fmt: str) -> tuple[bytes, str]:
        """The version as an ONNX model or a PT2 archive, and its file name."""
        loaded = self.registry.resolve(name, version)
        key = (name, loaded.version, fmt)
        async with self._exporting:
            cached = self._exports.get(key)
            if cached is not None and cached[0] is loaded:
                content = cached[1]
            else:
                content = await asyncio.to_thread(export_bytes, loaded.runtime, fmt)
                self._exports[key] = (loaded, content)
                while len(self._exports) > EXPORT_CACHE:
                    self._exports.popitem(last=False)
            self._exports.move_to_end(key)
        return content, f"{name}-v{loaded.version}.{fmt}"

    def list(self) -> list[dict[str, Any]]:
        return [e.summary() for e in self.registry.entries()]

    def detail(self, name: str) -> dict[str, Any]:
        return policy_detail(self.registry.entry(name))

    async def publish(self, name: str, spec_raw: bytes, files: bytes | dict[str, bytes]) -> dict[str, Any]:
        """An uploaded version: policy.json and its weights, or its PT2 archives by file name."""
        spec_json = parse_spec_upload(spec_raw)
        version = await asyncio.to_thread(self.registry.publish, name, spec_json, files)
        return {"name": name, "version": version}

    async def set_default(self, name: str, version: int) -> dict[str, Any]:
        await asyncio.to_thread(self.registry.set_default, name, version)
        return {"name": name, "default_version": version}

    def routing(self, name: str) -> dict[str, Any]:
        return routing_public(self.registry.entry(name))

    async def set_routing(self, name: str, routing: dict[str, Any] | None) -> dict[str, Any]:
        entry = await asyncio.to_thread(self.registry.set_routing, name, routing)
        return routing_public(entry)

    async def delete_version(self, name: str, version: int) -> None:
        """Delete a version; sessions pinned to it are closed."""
        await asyncio.to_thread(self.registry.delete_version, name, version)
        self.stats.forget(name, version)
        await self.sessions.close_version(name, version)

    def version_stats(self, name: str) -> dict[str, Any]:
        """Per servable version: calls, sessions, client-reported episode returns; the shadow's
        agreement with the primary (this process's figures: ``service.serving.stats``)."""
        entry = self.registry.entry(name)
        shadow = entry.split.shadow if entry.split is not None else None
        report = self.stats.report(name, sorted(entry.versions), shadow)
        report["routing"] = entry.summary()["routing"]
        return report

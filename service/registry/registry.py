"""Loaded policy versions, kept per name, published atomically.

The registry holds an immutable ``PolicyEntry`` per policy name; every change builds a new entry
and swaps the reference, so a request holding a ``LoadedVersion`` keeps a whole, working version
while a new one is published or an old one deleted.

The registry builds each version's TorchRL module and loads its checked weights; what the caller
wants to keep per version (the serving runtime, for the API) is made by the ``prepare`` callable
it passes in. That keeps this layer below the runtime: nothing here imports ``service.runtime``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Generic, TypeVar

import torch
from pydantic import ValidationError

from service.errors import InvalidInput, NotFound, validation_sentence
from service.registry.build import BuiltPolicy, build_policy, load_weights
from service.registry.program import MAX_ARCHIVE_BYTES, ProgramRefused, Programs, read_programs
from service.registry.routing import Routing, RoutingRefused, Split
from service.registry.spec import PolicySpec, is_valid_name
from service.registry.store import WEIGHTS_FILE, Repository

log = logging.getLogger(__name__)


class PolicyNotFound(NotFound):
    pass


class VersionNotFound(NotFound):
    pass


class InvalidPolicy(InvalidInput):
    """A spec or weights that cannot be served; the message says why."""


R = TypeVar("R")
# what a version's files load into: a built TorchRL module, or a program policy's archives
Loaded = BuiltPolicy | Programs
Prepare = Callable[[PolicySpec, Loaded, torch.device], Any]
# a version's files besides policy.json: the weights alone, or files by name
Files = bytes | dict[str, bytes]


def keep_built(spec: PolicySpec, built: Loaded, device: torch.device) -> Loaded:
    """The default ``prepare``: keep the built module itself (publishing-only processes)."""
    return built


@dataclass(frozen=True)
class LoadedVersion(Generic[R]):
    """One servable version: its spec and what ``prepare`` made of its loaded module."""

    name: str
    version: int
    spec: PolicySpec
    runtime: R


@dataclass(frozen=True)
class PolicyEntry:
    name: str
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    default_file: int | None = None
    routing: Routing | None = None  # what routing.json asks for
    split: Split | None = None  # what is served of it (``routed``): its servable versions

    def with_routing(self, routing: Routing | None, before: PolicyEntry | None = None) -> PolicyEntry:
        """This entry with ``routing`` applied to its servable versions; the versions it leaves
        out are logged when they change (not at every rescan)."""
        split, left_out = (None, []) if routing is None else routing.servable(self.versions)
        was = before.routing.servable(before.versions)[1] if before and before.routing else []
        if left_out and (left_out != was or before.routing != routing):
            log.warning(
                "routing of %s leaves out versions %s (not servable); split now %s",
                self.name,
                left_out,
                split.shares() if split else "none (the default version serves)",
            )
        return replace(self, routing=routing, split=split)

    @cached_property  # entries are replaced, never changed: computed once, not per act call
    def default_version(self) -> int | None:
        if self.default_file in self.versions:
            return self.default_file
        return max(self.versions, default=None)

    def summary(self) -> dict[str, Any]:
        d = self.default_version
        base = (
            self.versions[d].spec.summary()
            if d is not None
            else {"kind": None, "recurrent": None, "observation": None, "action": None, "env_id": None}
        )
        return {
            "name": self.name,
            "default_version": d,
            "routing": None if self.split is None else {str(v): w for v, w in self.split.shares().items()},
            "versions": sorted(self.versions),
            **base,
        }


def parse_spec(raw: Any) -> PolicySpec:
    try:
        return PolicySpec.model_validate(raw)
    except ValidationError as exc:
        raise InvalidPolicy(f"invalid policy spec: {validation_sentence(exc.errors())}") from None


def load_version(spec: PolicySpec, files: Files, device: torch.device) -> Loaded:
    """Build the module for ``spec`` and load its weights into it (checked), or read a program
    policy's archives (``registry.program``: never unpickled, checked against ``spec``)."""
    if spec.program is not None:
        if not isinstance(files, dict):
            raise InvalidPolicy(
                "policy.json describes exported programs: send its archives "
                f"{sorted(spec.program.files.values())}, not weights"
            )
        try:
            return read_programs(spec, files)
        except ProgramRefused as exc:
            raise InvalidPolicy(f"program refused: {exc}") from None
    if isinstance(files, dict):
        unexpected = sorted(set(files) - {WEIGHTS_FILE})
        if unexpected or WEIGHTS_FILE not in files:
            raise InvalidPolicy(
                f"a declarative policy (no 'program' in policy.json) has {WEIGHTS_FILE} only"
                + (f"; got {[u[:40] for u in unexpected[:5]]}" if unexpected else "")
            )
        files = files[WEIGHTS_FILE]
    try:
        built = build_policy(spec, device)  # a spec whose parts do not fit each other: ValueError
        load_weights(built, files)
    except ValueError as exc:
        raise InvalidPolicy(str(exc)) from None
    return built


def _files_of(spec: PolicySpec, files: Files) -> dict[str, bytes]:
    return files if isinstance(files, dict) else {WEIGHTS_FILE: files}


class Registry:
    """Every servable policy version in the model repository.

    Args:
        store: the model repository on disk.
        device: where modules are built.
        prepare: ``(spec, built, device) -> runtime`` kept per loaded version (default: the
            built module); the API passes ``PolicyRuntime``.
    """

    def __init__(
        self, store: Repository, device: torch.device | str = "cpu", prepare: Prepare = keep_built
    ) -> None:
        self.store = store
        self.device = torch.device(device)
        self.prepare = prepare
        self._entries: dict[str, PolicyEntry] = {}
        self._write_lock = threading.RLock()
        self.ready = False

    # -- reading ---------------------------------------------------------------------------
    def entries(self) -> list[PolicyEntry]:
        return [self._entries[n] for n in sorted(self._entries)]

    def has(self, name: str) -> bool:
        """Whether ``name`` is a policy the registry knows (cheap; for metric labels)."""
        return name in self._entries

    def entry(self, name: str) -> PolicyEntry:
        entry = self._entries.get(name)
        if entry is None or (not entry.versions and not entry.errors):
            raise PolicyNotFound(f"policy {name!r} not found")
        return entry

    def routed(self, name: str, version: int | None = None, key: str | None = None) -> LoadedVersion:
        """The version traffic goes to: ``version`` when asked for, else by the policy's split
        (sticky per ``key``), else the default."""
        if version is None:
            entry = self._entries.get(name)
            if entry is not None and entry.split is not None:
                version = entry.split.choose(key)
        return self.resolve(name, version)

    def shadow(self, name: str) -> LoadedVersion | None:
        """The servable shadow version of the policy's split, if it has one."""
        entry = self._entries.get(name)
        if entry is None or entry.split is None or entry.split.shadow is None:
            return None
        return entry.versions.get(entry.split.shadow)

    def resolve(self, name: str, version: int | None = None) -> LoadedVersion:
        entry = self.entry(name)
        if version is None:
            version = entry.default_version
            if version is None:
                raise VersionNotFound(f"policy {name!r} has no servable version")
        loaded = entry.versions.get(version)
        if loaded is None:
            why = entry.errors.get(version)
            avail = sorted(entry.versions)
            msg = f"policy {name!r} has no servable version {version}; servable: {avail}"
            raise VersionNotFound(msg + (f" (version {version} failed to load: {why})" if why else ""))
        return loaded

    # -- loading from disk ------------------------------------------------------------------
    def _load_from_disk(self, name: str, version: int) -> LoadedVersion:
        try:
            spec = parse_spec(self.store.read_spec_json(name, version))
            if spec.program is not None:
                files: Files = {
                    f: self.store.read_file(name, version, f, MAX_ARCHIVE_BYTES)
                    for f in spec.program.files.values()
                }
            else:
                files = self.store.read_weights(name, version)
            built = load_version(spec, files, self.device)
            runtime = self.prepare(spec, built, self.device)
        except InvalidPolicy:
            raise
        except Exception as exc:  # unreadable files, bad JSON: reported, never fatal
            raise InvalidPolicy(f"{type(exc).__name__}: {exc}") from None
        return LoadedVersion(name, version, spec, runtime)

    def load_all(self) -> None:
        """Scan the repository; load every version not loaded yet, forget versions gone from disk."""
        with self._write_lock:
            names = set(self.store.names())
            for name in names:
                self._sync_policy(name)
            for gone in set(self._entries) - names:
                self._drop(gone)
            self.ready = True

    def _sync_policy(self, name: str) -> None:
        old = self._entries.get(name, PolicyEntry(name))
        on_disk = set(self.store.versions(name))
        versions = {v: lv for v, lv in old.versions.items() if v in on_disk}
        errors = {v: e for v, e in old.errors.items() if v in on_disk}
        for v in sorted(on_disk - set(versions) - set(errors)):
            try:
                versions[v] = self._load_from_disk(name, v)
                log.info("loaded policy %s version %d", name, v)
            except InvalidPolicy as exc:
                errors[v] = str(exc)
                log.error("policy %s version %d failed to load: %s", name, v, exc)
        if not versions and not errors:  # a name left without versions (an object store's prefix)
            self._entries.pop(name, None)
            return
        entry = PolicyEntry(name, versions, errors, self.store.read_default(name))
        self._entries[name] = entry.with_routing(self._read_routing(name), old)

    def _read_routing(self, name: str) -> Routing | None:
        try:
            raw = self.store.read_routing(name)
            return None if raw is None else Routing.parse(raw)
        except (ValueError, OSError) as exc:  # a hand-edited file gone wrong: the default serves
            log.error("ignoring routing of %s: %s", name, exc)
            return None

    def _drop(self, name: str) -> None:
        self._entries.pop(name, None)

    # -- changes ----------------------------------------------------------------------------
    def publish(self, name: str, spec: PolicySpec | dict, files: Files) -> int:
        """Validate, build and load a new version, then write it and make it servable.

        ``spec``: a ``PolicySpec`` (a trainer's), or policy.json's content (an upload), parsed
        here. ``files``: the weights (bytes), or the version's files by name (a program policy's
        archives). Nothing is written or changed unless the whole version loads.
        """
        if not is_valid_name(name):
            raise InvalidPolicy(f"invalid policy name {name!r}: use 1-64 letters, digits, '_', '-', '.'")
        if not isinstance(spec, PolicySpec):
            spec = parse_spec(spec)
        runtime = self.prepare(spec, load_version(spec, files, self.device), self.device)
        with self._write_lock:
            version = self.store.write_version(name, spec.model_dump(mode="json"), _files_of(spec, files))
            old = self._entries.get(name, PolicyEntry(name))
            versions = {**old.versions, version: LoadedVersion(name, version, spec, runtime)}
            self._entries[name] = replace(old, versions=versions).with_routing(old.routing, old)
        log.info("published policy %s version %d", name, version)
        return version

    def set_default(self, name: str, version: int) -> None:
        with self._write_lock:
            entry = self.entry(name)
            if version not in entry.versions:
                raise VersionNotFound(
                    f"policy {name!r} has no servable version {version}; servable: {sorted(entry.versions)}"
                )
            self.store.write_default(name, version)
            if entry.routing is not None:  # a new default takes all the traffic
                self.store.write_routing(name, None)
                log.info("routing of %s cleared: version %d is the default", name, version)
            self._entries[name] = replace(entry, default_file=version, routing=None, split=None)

    def set_routing(self, name: str, routing: Routing | dict | None) -> PolicyEntry:
        """Split the policy's traffic (``None``: the default version takes it all again). Every
        version it names must be servable now."""
        with self._write_lock:
            entry = self.entry(name)
            if routing is not None and not isinstance(routing, Routing):
                try:
                    routing = Routing.parse(routing)
                except RoutingRefused as exc:
                    raise InvalidInput(str(exc)) from None
            if routing is not None:
                named = sorted({*routing.weights, *([routing.shadow] if routing.shadow else [])})
                missing = [v for v in named if v not in entry.versions]
                if missing:
                    raise VersionNotFound(
                        f"policy {name!r} has no servable version {missing[0]}; "
                        f"servable: {sorted(entry.versions)}"
                    )
            self.store.write_routing(name, None if routing is None else routing.to_json())
            self._entries[name] = entry = entry.with_routing(routing, entry)
            return entry

    def delete_version(self, name: str, version: int) -> None:
        with self._write_lock:
            entry = self.entry(name)
            if version not in entry.versions and version not in entry.errors:
                raise VersionNotFound(f"policy {name!r} has no version {version}")
            self.store.delete_version(name, version)
            versions = {v: lv for v, lv in entry.versions.items() if v != version}
            errors = {v: e for v, e in entry.errors.items() if v != version}
            default = entry.default_file if entry.default_file != version else None
            if versions or errors:
                after = PolicyEntry(name, versions, errors, default)
                self._entries[name] = after.with_routing(entry.routing, entry)
            else:
                self._entries.pop(name, None)

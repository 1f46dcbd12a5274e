"""The model repository on disk: ``<root>/<name>/<version>/{policy.json,weights.safetensors}``.

Writes are atomic: a version is assembled in ``<root>/.staging`` and renamed into place, so a
reader sees a whole version or none. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from service.registry.spec import is_valid_name

log = logging.getLogger(__name__)

SPEC_FILE = "policy.json"
WEIGHTS_FILE = "weights.safetensors"
DEFAULT_FILE = "default"
MAX_SPEC_BYTES = 1024 * 1024


class ModelStore:
    """File-system access to the model repository, confined to ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _policy_dir(self, name: str) -> Path:
        if not is_valid_name(name):
            raise ValueError(f"invalid policy name {name!r}")
        return self.root / name

    def _version_dir(self, name: str, version: int) -> Path:
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"invalid version {version!r}")
        return self._policy_dir(name) / str(version)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_valid_name(p.name))

    def versions(self, name: str) -> list[int]:
        d = self._policy_dir(name)
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            if p.is_dir() and p.name.isdigit() and not p.name.startswith("0"):
                out.append(int(p.name))
        return sorted(out)

    def read_default(self, name: str) -> int | None:
        f = self._policy_dir(name) / DEFAULT_FILE
        try:
            text = f.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not text.isdigit() or int(text) < 1:
            log.warning("ignoring default file of %s: %r is not a positive integer", name, text)
            return None
        return int(text)

    def read_spec_json(self, name: str, version: int) -> dict:
        f = self._version_dir(name, version) / SPEC_FILE
        if f.stat().st_size > MAX_SPEC_BYTES:
            raise ValueError(f"{SPEC_FILE} is larger than {MAX_SPEC_BYTES} bytes")
        return json.loads(f.read_text(encoding="utf-8"))

    def read_weights(self, name: str, version: int) -> bytes:
        return (self._version_dir(name, version) / WEIGHTS_FILE).read_bytes()

    def write_version(self, name: str, spec_json: dict, weights: bytes) -> int:
        """Write a new version (highest + 1) atomically and return its number."""
        staging = self.root / ".staging" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            (staging / SPEC_FILE).write_text(json.dumps(spec_json, indent=2), encoding="utf-8")
            (staging / WEIGHTS_FILE).write_bytes(weights)
            pdir = self._policy_dir(name)
            pdir.mkdir(exist_ok=True)
            version = max(self.versions(name), default=0) + 1
            while True:
                target = pdir / str(version)
                try:
                    target.mkdir()  # claims the number, also against other processes
                except FileExistsError:
                    version += 1
                    continue
                os.rename(staging, target)  # replaces the empty claimed directory
                return version
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def write_default(self, name: str, version: int | None) -> None:
        f = self._policy_dir(name) / DEFAULT_FILE
        if version is None:
            f.unlink(missing_ok=True)
            return
        tmp = f.with_name(f".{DEFAULT_FILE}.{uuid.uuid4().hex}")
        tmp.write_text(f"{version}\n", encoding="utf-8")
        os.replace(tmp, f)

    def delete_version(self, name: str, version: int) -> None:
        target = self._version_dir(name, version)
        trash = self.root / ".staging" / f"deleted-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(target, trash)  # atomic disappearance, then the slow part
        shutil.rmtree(trash, ignore_errors=True)
        pdir = self._policy_dir(name)
        if self.read_default(name) == version:
            self.write_default(name, None)
        if not self.versions(name):
            shutil.rmtree(pdir, ignore_errors=True)

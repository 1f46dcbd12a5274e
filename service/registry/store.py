"""The model repository on disk: ``<root>/<name>/<version>/policy.json`` and the version's
files: ``weights.safetensors`` (a declarative policy) or the PT2 archives it names (a program).

Writes are atomic: a version is assembled (and fsynced) in ``<root>/.staging`` and renamed into
place in one step, so a reader sees a whole version or none, also after a crash. Nothing here
unpickles anything.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Protocol

from service.errors import too_large
from service.registry.spec import is_valid_name

log = logging.getLogger(__name__)

SPEC_FILE = "policy.json"
WEIGHTS_FILE = "weights.safetensors"
DEFAULT_FILE = "default"
ROUTING_FILE = "routing.json"
MAX_SPEC_BYTES = 1024 * 1024
STAGING = ".staging"
# the files a version may hold besides policy.json (never a path)
FILE_RE = re.compile(r"^(weights\.safetensors|[a-z][a-z0-9_]{0,31}\.pt2)$")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Repository(Protocol):
    """What the registry needs of a model repository: ``ModelStore`` (a directory) or
    ``registry.s3store.S3ModelStore`` (a bucket)."""

    root: object

    def names(self) -> list[str]: ...
    def versions(self, name: str) -> list[int]: ...
    def read_default(self, name: str) -> int | None: ...
    def read_routing(self, name: str) -> dict | None: ...
    def read_spec_json(self, name: str, version: int) -> dict: ...
    def read_weights(self, name: str, version: int) -> bytes: ...
    def read_file(self, name: str, version: int, filename: str, limit: int | None = None) -> bytes: ...
    def write_version(self, name: str, spec_json: dict, files: bytes | dict[str, bytes]) -> int: ...
    def write_default(self, name: str, version: int | None) -> None: ...
    def write_routing(self, name: str, routing: dict | None) -> None: ...
    def delete_version(self, name: str, version: int) -> None: ...
    def sweep(self, max_age_s: float = 24 * 3600) -> list[str]: ...


def open_store(location: str | Path, s3_endpoint_url: str | None = None) -> Repository:
    """The repository at ``location``: ``s3://bucket/prefix``, else a directory."""
    if isinstance(location, str) and location.startswith("s3://"):
        from service.registry.s3store import S3ModelStore  # boto3 only where it is used

        return S3ModelStore(location, s3_endpoint_url)
    return ModelStore(Path(location))


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
            if p.is_dir() and p.name.isdecimal() and not p.name.startswith("0"):
                out.append(int(p.name))
        return sorted(out)

    def read_default(self, name: str) -> int | None:
        f = self._policy_dir(name) / DEFAULT_FILE
        try:
            text = f.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not text.isdecimal() or int(text) < 1:
            log.warning("ignoring default file of %s: %r is not a positive integer", name, text)
            return None
        return int(text)

    def read_routing(self, name: str) -> dict | None:
        """``routing.json``'s content (checked by the registry), or ``None`` without one."""
        f = self._policy_dir(name) / ROUTING_FILE
        try:
            if f.stat().st_size > MAX_SPEC_BYTES:
                raise ValueError(too_large(ROUTING_FILE, MAX_SPEC_BYTES))
            return json.loads(f.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def write_routing(self, name: str, routing: dict | None) -> None:
        """Replace (atomically) or remove the policy's ``routing.json``."""
        self._replace(self._policy_dir(name) / ROUTING_FILE, None if routing is None else json.dumps(routing))

    def read_spec_json(self, name: str, version: int) -> dict:
        f = self._version_dir(name, version) / SPEC_FILE
        if f.stat().st_size > MAX_SPEC_BYTES:
            raise ValueError(too_large(SPEC_FILE, MAX_SPEC_BYTES))
        return json.loads(f.read_text(encoding="utf-8"))

    def read_weights(self, name: str, version: int) -> bytes:
        return self.read_file(name, version, WEIGHTS_FILE)

    def read_file(self, name: str, version: int, filename: str, limit: int | None = None) -> bytes:
        """One of a version's files (``FILE_RE``), refused past ``limit`` bytes before reading."""
        if not FILE_RE.match(filename):
            raise ValueError(f"invalid file name {filename[:40]!r}")
        f = self._version_dir(name, version) / filename
        if limit is not None and f.stat().st_size > limit:
            raise ValueError(too_large(filename, limit))
        return f.read_bytes()

    def write_version(self, name: str, spec_json: dict, files: bytes | dict[str, bytes]) -> int:
        """Write a new version (highest + 1) and return its number; ``files`` are the version's
        files by name (bytes alone: ``weights.safetensors``).

        The version directory appears complete or not at all: every file is written and
        fsynced in a staging directory, which one ``rename`` turns into ``<name>/<version>``
        (a rename onto a version another process took fails, and the next number is tried).
        A crash at any point leaves at most a staging directory, swept at the next start.
        """
        staging = self._staging_dir()
        staging.mkdir(parents=True)
        try:
            if isinstance(files, bytes):
                files = {WEIGHTS_FILE: files}
            _write_synced(staging / SPEC_FILE, json.dumps(spec_json, indent=2).encode("utf-8"))
            for filename, data in files.items():
                if not FILE_RE.match(filename):
                    raise ValueError(f"invalid file name {filename[:40]!r}")
                _write_synced(staging / filename, data)
            _fsync_dir(staging)
            pdir = self._policy_dir(name)
            pdir.mkdir(exist_ok=True)
            version = max(self.versions(name), default=0) + 1
            while True:
                try:
                    os.rename(staging, pdir / str(version))
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    version += 1  # taken by another publisher meanwhile
                    continue
                _fsync_dir(pdir)
                return version
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _staging_dir(self) -> Path:
        # <host>-<pid>-<random>: a sweep can tell a dead publisher's leftovers from live ones.
        return self.root / STAGING / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"

    def sweep(self, max_age_s: float = 24 * 3600) -> list[str]:
        """Remove what a crashed publisher left: its staging directories (this host's dead
        processes', or anyone's older than ``max_age_s``) and empty version directories.

        Returns the paths removed, relative to the root.
        """
        removed = []
        staging = self.root / STAGING
        host = socket.gethostname()
        if staging.is_dir():
            for d in staging.iterdir():
                owner_host, _, rest = d.name.rpartition("-")[0].rpartition("-")
                pid = int(rest) if rest.isdecimal() else None
                dead = owner_host == host and pid is not None and not _pid_alive(pid)
                try:
                    old = time.time() - d.stat().st_mtime > max_age_s
                except FileNotFoundError:
                    continue
                if dead or old or d.name.startswith("deleted-"):
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(str(d.relative_to(self.root)))
        for name in self.names():
            for v in self.versions(name):
                vdir = self._version_dir(name, v)
                try:
                    vdir.rmdir()  # succeeds only when empty: never a published version
                except OSError:
                    continue
                removed.append(str(vdir.relative_to(self.root)))
        return removed

    def write_default(self, name: str, version: int | None) -> None:
        self._replace(self._policy_dir(name) / DEFAULT_FILE, None if version is None else f"{version}\n")

    @staticmethod
    def _replace(f: Path, text: str | None) -> None:
        """A small file replaced in one step (readers see the old or the new), or removed."""
        if text is None:
            f.unlink(missing_ok=True)
            return
        tmp = f.with_name(f".{f.name}.{uuid.uuid4().hex}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, f)

    def delete_version(self, name: str, version: int) -> None:
        target = self._version_dir(name, version)
        trash = self.root / STAGING / f"deleted-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(target, trash)  # atomic disappearance, then the slow part
        shutil.rmtree(trash, ignore_errors=True)
        pdir = self._policy_dir(name)
        if self.read_default(name) == version:
            self.write_default(name, None)
        if not self.versions(name):
            shutil.rmtree(pdir, ignore_errors=True)

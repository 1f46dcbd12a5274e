"""Offline datasets: Minari datasets in Minari's own layout under ``<data_dir>/datasets/<id>/``
(``data/main_data.hdf5`` + ``data/metadata.json``; ``namespace_metadata.json`` per namespace),
so ``minari.load_dataset`` and TorchRL's ``MinariExperienceReplay(load_from_local_minari=True)``
read them with ``MINARI_DATASETS_PATH`` pointing there.

Written and read through Minari's storage API (``MinariStorage``, ``MinariDataset``), always by
path: nothing here reads or sets ``MINARI_DATASETS_PATH`` (a process-wide variable). An uploaded
archive is checked member by member (regular files, within the dataset directory, Minari's two
files only, sizes bounded) and extracted into a staging directory, opened with Minari to check
it, then renamed into place: a dataset appears whole or not at all.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tarfile
import threading
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import Conflict, InvalidInput, NotFound, too_large

log = logging.getLogger(__name__)

# Minari's ``(namespace/)name-vN`` with the version suffix TorchRL's reader needs; letters,
# digits, '_' and '-' only in each part (never '.', so never a path outside the root)
_PART = r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}"
DATASET_ID = re.compile(rf"^(?:{_PART}/){{0,3}}{_PART}-v[0-9]{{1,6}}$")
DATA, MAIN, META = "data", "main_data.hdf5", "metadata.json"
NAMESPACE_META = "namespace_metadata.json"
STAGING = ".staging"
PROPENSITY = "log_prob"  # infos[PROPENSITY][t] = log mu(a_t | s_t) under the exploration used


class DatasetNotFound(NotFound):
    pass


def check_id(dataset_id: str) -> str:
    if not isinstance(dataset_id, str) or not DATASET_ID.match(dataset_id):
        raise InvalidInput(
            f"dataset id {str(dataset_id)[:80]!r} is not Minari's form: [namespace/]name-vN "
            "(letters, digits, '_' and '-', the version suffix included, e.g. cartpole/expert-v0)"
        )
    return dataset_id


class DatasetStore:
    """The datasets under ``root``; ``max_bytes`` bounds one dataset on disk."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def lock(self, dataset_id: str) -> threading.Lock:
        """Held around every write to one dataset (appends from several sessions)."""
        with self._locks_guard:
            return self._locks.setdefault(dataset_id, threading.Lock())

    def path(self, dataset_id: str) -> Path:
        return self.root / check_id(dataset_id)

    def data_path(self, dataset_id: str) -> Path:
        return self.path(dataset_id) / DATA

    def exists(self, dataset_id: str) -> bool:
        return (self.data_path(dataset_id) / META).is_file()

    def ids(self) -> list[str]:
        out = []
        for meta in self.root.glob(f"**/{DATA}/{META}"):
            rel = meta.parent.parent.relative_to(self.root).as_posix()
            if not rel.startswith(STAGING) and DATASET_ID.match(rel):
                out.append(rel)
        return sorted(out)

    def size(self, dataset_id: str) -> int:
        return sum(f.stat().st_size for f in self.data_path(dataset_id).iterdir() if f.is_file())

    def open(self, dataset_id: str):
        """The dataset as a ``minari.MinariDataset`` (404 when there is none)."""
        from minari import MinariDataset

        if not self.exists(dataset_id):
            raise DatasetNotFound(f"dataset {dataset_id!r} not found")
        return MinariDataset(self.data_path(dataset_id))

    def describe(self, dataset_id: str) -> dict[str, Any]:
        ds = self.open(dataset_id)
        meta = ds.storage.metadata
        env_spec = meta.get("env_spec")
        env_id = json.loads(env_spec).get("id") if isinstance(env_spec, str) else None
        first = next(iter(ds.storage.get_episodes([0])), None) if ds.total_episodes else None
        return {
            "dataset_id": dataset_id,
            "episodes": int(ds.total_episodes),
            "steps": int(ds.total_steps),
            "observation_space": str(ds.observation_space),
            "action_space": str(ds.action_space),
            "env_id": env_id,
            "algorithm_name": meta.get("algorithm_name"),
            "description": meta.get("description"),
            "minari_version": meta.get("minari_version"),
            "propensities": bool(first is not None and PROPENSITY in (first.get("infos") or {})),
            "size_bytes": self.size(dataset_id),
        }

    # -- writing ----------------------------------------------------------------------------------
    def create(
        self,
        dataset_id: str,
        observation_space,
        action_space,
        env_id: str | None = None,
        algorithm_name: str | None = None,
        description: str | None = None,
    ) -> None:
        """A new, empty dataset (409 when the id is taken)."""
        from minari import __version__ as minari_version
        from minari.dataset.minari_storage import MinariStorage

        path = self.path(dataset_id)
        if self.exists(dataset_id):
            raise Conflict(f"dataset {dataset_id!r} exists already")
        env_spec = None
        if env_id is not None:
            import gymnasium as gym

            env_spec = gym.spec(env_id)
        staging = self._staging()
        staging.mkdir(parents=True)
        try:
            storage = MinariStorage.new(
                staging / DATA,
                observation_space=observation_space,
                action_space=action_space,
                env_spec=env_spec,
                data_format="hdf5",
                jpeg_encoding=False,
            )
            meta = {
                "dataset_id": dataset_id,
                "minari_version": minari_version,
                "algorithm_name": algorithm_name,
                "description": description,
                "author": {"policy-server"},
            }
            storage.update_metadata({k: v for k, v in meta.items() if v is not None})
            self._move_into_place(staging, path, dataset_id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def append(self, dataset_id: str, episodes: list) -> int:
        """Add ``minari.data_collector.EpisodeBuffer``s; refused (nothing written) when the
        dataset would pass ``max_bytes``. Returns the dataset's size after."""
        from minari.dataset.minari_storage import MinariStorage

        with self.lock(dataset_id):
            if not self.exists(dataset_id):
                raise DatasetNotFound(f"dataset {dataset_id!r} not found")
            size, extra = self.size(dataset_id), sum(episode_bytes(e) for e in episodes)
            if size + extra > self.max_bytes:
                raise InvalidInput(
                    f"dataset {dataset_id!r} holds {size} bytes; these {len(episodes)} episode(s) "
                    f"would pass its limit of {self.max_bytes} bytes (MAX_DATASET_BYTES): nothing "
                    "more is recorded, what it holds is kept"
                )
            storage = MinariStorage.read(self.data_path(dataset_id))
            storage.update_episodes(episodes)
            return self.size(dataset_id)

    def delete(self, dataset_id: str) -> None:
        path = self.path(dataset_id)
        with self.lock(dataset_id):
            if not self.exists(dataset_id):
                raise DatasetNotFound(f"dataset {dataset_id!r} not found")
            trash = self.root / STAGING / f"deleted-{uuid.uuid4().hex}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    # -- archives ---------------------------------------------------------------------------------
    def archive(self, dataset_id: str) -> bytes:
        """The dataset directory as a ``.tar.gz`` (``<name>-vN/data/…``), as uploads take it."""
        if not self.exists(dataset_id):
            raise DatasetNotFound(f"dataset {dataset_id!r} not found")
        buf = io.BytesIO()
        base = dataset_id.rsplit("/", 1)[-1]
        with self.lock(dataset_id), tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name in (MAIN, META):
                tar.add(self.data_path(dataset_id) / name, arcname=f"{base}/{DATA}/{name}")
        return buf.getvalue()

    def import_archive(self, blob: bytes) -> str:
        """An uploaded dataset (``.tar``, ``.tar.gz`` or ``.zip`` of one dataset directory): its
        id is its ``metadata.json``'s ``dataset_id``. Returns the id."""
        members = _members(blob, self.max_bytes)
        staging = self._staging()
        try:
            (staging / DATA).mkdir(parents=True)
            for name, data in members.items():
                (staging / DATA / name).write_bytes(data)
            try:
                meta = json.loads(members[META])
                dataset_id = meta["dataset_id"]
            except (ValueError, KeyError, TypeError):
                raise InvalidInput("metadata.json is not a Minari dataset's (no dataset_id)") from None
            check_id(dataset_id)
            try:
                from minari import MinariDataset

                ds = MinariDataset(staging / DATA)
                ds.total_steps  # noqa: B018 — reads the episodes' index
                next(iter(ds.storage.get_episodes([0])), None) if ds.total_episodes else None
            except Exception as exc:  # whatever Minari or h5py refuse
                raise InvalidInput(f"not a readable Minari dataset: {type(exc).__name__}: {exc}") from None
            if self.exists(dataset_id):
                raise Conflict(f"dataset {dataset_id!r} exists already; delete it first")
            self._move_into_place(staging, self.path(dataset_id), dataset_id)
            return dataset_id
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _staging(self) -> Path:
        return self.root / STAGING / uuid.uuid4().hex

    def _move_into_place(self, staging: Path, path: Path, dataset_id: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        namespace = dataset_id.rpartition("/")[0]
        if namespace and not (self.root / namespace / NAMESPACE_META).exists():
            (self.root / namespace / NAMESPACE_META).write_text(json.dumps({}))
        try:
            staging.rename(path)
        except OSError:
            raise Conflict(f"dataset {dataset_id!r} exists already") from None


# what an episode costs in Minari's HDF5 file beyond its arrays (groups, dataset headers: measured
# ~19.5 KiB with h5py 3 for a CartPole episode of any length)
EPISODE_OVERHEAD = 24 * 1024


def episode_bytes(episode) -> int:
    """An upper bound of what appending ``episode`` adds to the dataset's file."""
    total = EPISODE_OVERHEAD
    parts = (
        episode.observations,
        episode.actions,
        episode.rewards,
        episode.terminations,
        episode.truncations,
    )
    for part in (*parts, *(episode.infos or {}).values()):
        total += (
            np.asarray(part, dtype=np.float64 if part is episode.rewards else None).nbytes
            if part is not None
            else 0
        )
    return total


def _members(blob: bytes, limit: int) -> dict[str, bytes]:
    """Minari's two files from an archive of one dataset directory, every member checked."""
    if len(blob) > limit:
        raise InvalidInput(too_large("the dataset archive", limit))
    entries: list[tuple[str, int, Any]] = []
    if zipfile.is_zipfile(io.BytesIO(blob)):
        zf = zipfile.ZipFile(io.BytesIO(blob))
        for info in zf.infolist():
            if info.is_dir():
                continue
            if (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):  # links and the like
                raise InvalidInput(f"archive member {info.filename[:80]!r} is not a regular file")
            entries.append((info.filename, info.file_size, lambda i=info: zf.read(i)))
    else:
        try:
            tf = tarfile.open(fileobj=io.BytesIO(blob), mode="r:*")
            infos = tf.getmembers()
        except tarfile.TarError:
            raise InvalidInput("expected a .tar, .tar.gz or .zip of a Minari dataset directory") from None
        for info in infos:
            if info.isdir():
                continue
            if not info.isreg():
                raise InvalidInput(f"archive member {info.name[:80]!r} is not a regular file (links refused)")
            entries.append((info.name, info.size, lambda i=info: tf.extractfile(i).read()))
    found: dict[str, bytes] = {}
    prefixes = set()
    total = 0
    for name, size, read in entries:
        parts = Path(name).parts
        if name.startswith("/") or ".." in parts or "\\" in name:
            raise InvalidInput(f"archive member {name[:80]!r} points outside the dataset directory")
        if len(parts) < 2 or parts[-2] != DATA or parts[-1] not in (MAIN, META):
            raise InvalidInput(
                f"archive member {name[:80]!r} is not a Minari dataset file: expected "
                f"[<dataset>/]{DATA}/{MAIN} and {DATA}/{META} only"
            )
        prefixes.add(parts[:-2])
        total += size
        if total > limit:
            raise InvalidInput(too_large("the dataset's files", limit))
        data = read()
        if len(data) != size:
            raise InvalidInput(f"archive member {name[:80]!r} is not the size its header says")
        if parts[-1] in found:
            raise InvalidInput(f"archive holds {parts[-1]} twice")
        found[parts[-1]] = data
    if len(prefixes) > 1:
        raise InvalidInput("the archive holds more than one dataset directory")
    missing = [n for n in (MAIN, META) if n not in found]
    if missing:
        raise InvalidInput(f"the archive has no {DATA}/{missing[0]}: not a Minari (HDF5) dataset directory")
    return found

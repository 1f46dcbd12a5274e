"""Offline datasets as the API sees them: upload, list, describe, download, delete. Every call
reads or writes files, so each runs on a thread (``service.datasets.store`` does the work)."""

from __future__ import annotations

import asyncio
from typing import Any

from service.datasets.store import DatasetStore, check_id


class DatasetService:
    def __init__(self, store: DatasetStore) -> None:
        self.store = store

    async def upload(self, blob: bytes) -> dict[str, Any]:
        dataset_id = await asyncio.to_thread(self.store.import_archive, blob)
        return await self.describe(dataset_id)

    async def list(self) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            return [self.store.describe(i) for i in self.store.ids()]

        return await asyncio.to_thread(read)

    async def describe(self, dataset_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.store.describe, check_id(dataset_id))

    async def download(self, dataset_id: str) -> tuple[bytes, str]:
        blob = await asyncio.to_thread(self.store.archive, check_id(dataset_id))
        return blob, dataset_id.replace("/", "_") + ".tar.gz"

    async def delete(self, dataset_id: str) -> None:
        await asyncio.to_thread(self.store.delete, check_id(dataset_id))

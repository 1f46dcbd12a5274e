"""Offline datasets (Minari): upload (admin), list, describe, download, delete (admin)."""

from __future__ import annotations

from fastapi import APIRouter, File, Path, Response, UploadFile

from service.api.deps import Admin, DatasetsDep, SettingsDep
from service.errors import InvalidInput, too_large
from service.schemas import DatasetList, DatasetPublic

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
DatasetId = Path(
    max_length=300, description="Minari's [namespace/]name-vN, e.g. cartpole/expert-v0 (slashes as they are)"
)


@router.post("", status_code=201, response_model=DatasetPublic, dependencies=[Admin])
async def upload_dataset(
    datasets: DatasetsDep,
    settings: SettingsDep,
    archive: UploadFile = File(
        description="A .tar, .tar.gz or .zip of one Minari dataset directory (data/main_data.hdf5 "
        "and data/metadata.json); its id is metadata.json's dataset_id"
    ),
) -> dict:
    limit = settings.max_upload_bytes
    blob = await archive.read(limit + 1)
    if len(blob) > limit:
        raise InvalidInput(too_large("archive", limit))
    return await datasets.upload(blob)


@router.get("", response_model=DatasetList)
async def list_datasets(datasets: DatasetsDep) -> dict:
    return {"datasets": await datasets.list()}


# before the catch-all: a dataset id may hold slashes
@router.get("/{dataset_id:path}/download", response_class=Response, dependencies=[Admin])
async def download_dataset(datasets: DatasetsDep, dataset_id: str = DatasetId) -> Response:
    """The dataset directory as a .tar.gz (what the upload takes); admin: it holds clients'
    recorded traffic."""
    blob, filename = await datasets.download(dataset_id)
    disposition = {"Content-Disposition": f'attachment; filename="{filename}"'}
    return Response(blob, media_type="application/gzip", headers=disposition)


@router.get("/{dataset_id:path}", response_model=DatasetPublic)
async def get_dataset(datasets: DatasetsDep, dataset_id: str = DatasetId) -> dict:
    return await datasets.describe(dataset_id)


@router.delete("/{dataset_id:path}", status_code=204, dependencies=[Admin])
async def delete_dataset(datasets: DatasetsDep, dataset_id: str = DatasetId) -> Response:
    await datasets.delete(dataset_id)
    return Response(status_code=204)

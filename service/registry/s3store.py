"""The model repository on S3-compatible object storage: ``s3://bucket/prefix``, the same layout
as on disk (a plain copy of a ``models/`` tree into the bucket is a valid repository), through
boto3.

Object stores have no rename, so a version becomes visible by its ``policy.json``, written last:
a version is listed once ``<name>/<version>/policy.json`` exists, and readers never see half of
one. Two publishers never write the same version: each first claims the number with a
conditional write (``If-None-Match: *``) of ``<name>/<version>/.claim`` and takes the next
number when another got there first. A publisher that dies leaves a claim and perhaps some files
but no ``policy.json``: nothing is listed, the number is skipped, and ``sweep`` removes such
leftovers once they are a day old. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from datetime import UTC, datetime

from service.errors import too_large
from service.registry.spec import is_valid_name
from service.registry.store import (
    DEFAULT_FILE,
    FILE_RE,
    MAX_SPEC_BYTES,
    ROUTING_FILE,
    SPEC_FILE,
    WEIGHTS_FILE,
)

log = logging.getLogger(__name__)

CLAIM_FILE = ".claim"
_URL = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?$")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, ``prefix/`` or ``""``)."""
    m = _URL.match(url)
    if m is None:
        raise ValueError(f"not an S3 location: {url!r}; expected s3://bucket or s3://bucket/prefix")
    prefix = (m["prefix"] or "").strip("/")
    return m["bucket"], f"{prefix}/" if prefix else ""


class S3ModelStore:
    """``ModelStore``'s interface over a bucket (and prefix). ``endpoint_url``: an S3-compatible
    server (MinIO, SeaweedFS, …); credentials and region come from the standard AWS variables."""

    def __init__(self, url: str, endpoint_url: str | None = None, client=None) -> None:
        import boto3
        from botocore.config import Config

        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.s3 = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30
            ),
        )
        self.root = url  # what logs and errors name

    # -- keys -----------------------------------------------------------------------------------
    def _policy_key(self, name: str) -> str:
        if not is_valid_name(name):
            raise ValueError(f"invalid policy name {name!r}")
        return f"{self.prefix}{name}/"

    def _version_key(self, name: str, version: int) -> str:
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"invalid version {version!r}")
        return f"{self._policy_key(name)}{version}/"

    def _keys(self, prefix: str, delimiter: str | None = None):
        """Every (key, object) under ``prefix``; with ``delimiter``: the common prefixes too."""
        kwargs = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        for page in self.s3.get_paginator("list_objects_v2").paginate(**kwargs):
            for p in page.get("CommonPrefixes", ()):
                yield p["Prefix"], None
            for obj in page.get("Contents", ()):
                yield obj["Key"], obj

    def _get(self, key: str, limit: int | None = None) -> bytes | None:
        """An object's bytes (``None`` when absent), refused past ``limit`` before reading."""
        try:
            res = self.s3.get_object(Bucket=self.bucket, Key=key)
        except self.s3.exceptions.NoSuchKey:
            return None
        body = res["Body"]
        try:
            if limit is not None and res["ContentLength"] > limit:
                raise ValueError(too_large(key.rsplit("/", 1)[-1], limit))
            return body.read()
        finally:
            body.close()

    def _put(self, key: str, data: bytes, exclusive: bool = False) -> bool:
        """Write an object; ``exclusive``: only if none exists (False when one did)."""
        kwargs = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, **kwargs)
        except self.s3.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if exclusive and code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[i : i + 1000]]
            if chunk:
                self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})

    # -- reading ----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        out = []
        for key, obj in self._keys(self.prefix, "/"):
            if obj is None:
                name = key[len(self.prefix) :].rstrip("/")
                if is_valid_name(name):
                    out.append(name)
        return sorted(out)

    def _numbers(self, name: str) -> tuple[set[int], set[int], dict[int, float]]:
        """(listed versions, every number in use, the newest write time of each unlisted one)."""
        base = self._policy_key(name)
        listed, used, unlisted = set(), set(), {}
        for key, obj in self._keys(base):
            head, _, rest = key[len(base) :].partition("/")
            if not rest or not head.isascii() or not head.isdecimal() or head.startswith("0"):
                continue
            v = int(head)
            used.add(v)
            if rest == SPEC_FILE:
                listed.add(v)
            else:
                unlisted[v] = max(unlisted.get(v, 0.0), obj["LastModified"].timestamp())
        return listed, used, {v: t for v, t in unlisted.items() if v not in listed}

    def versions(self, name: str) -> list[int]:
        return sorted(self._numbers(name)[0])

    def read_default(self, name: str) -> int | None:
        raw = self._get(self._policy_key(name) + DEFAULT_FILE, MAX_SPEC_BYTES)
        if raw is None:
            return None
        text = raw.decode("utf-8", "replace").strip()
        if not text.isascii() or not text.isdecimal() or int(text) < 1:
            log.warning("ignoring default file of %s: %r is not a positive integer", name, text[:40])
            return None
        return int(text)

    def read_routing(self, name: str) -> dict | None:
        raw = self._get(self._policy_key(name) + ROUTING_FILE, MAX_SPEC_BYTES)
        return None if raw is None else json.loads(raw)

    def read_spec_json(self, name: str, version: int) -> dict:
        raw = self._get(self._version_key(name, version) + SPEC_FILE, MAX_SPEC_BYTES)
        if raw is None:
            raise FileNotFoundError(f"{self.url}: {name}/{version}/{SPEC_FILE}")
        return json.loads(raw)

    def read_weights(self, name: str, version: int) -> bytes:
        return self.read_file(name, version, WEIGHTS_FILE)

    def read_file(self, name: str, version: int, filename: str, limit: int | None = None) -> bytes:
        if not FILE_RE.match(filename):
            raise ValueError(f"invalid file name {filename[:40]!r}")
        raw = self._get(self._version_key(name, version) + filename, limit)
        if raw is None:
            raise FileNotFoundError(f"{self.url}: {name}/{version}/{filename}")
        return raw

    # -- writing ----------------------------------------------------------------------------------
    def write_version(self, name: str, spec_json: dict, files: bytes | dict[str, bytes]) -> int:
        """Write a new version (the next free number) and return it: claim the number, write
        the files, then ``policy.json``, which lists it."""
        if isinstance(files, bytes):
            files = {WEIGHTS_FILE: files}
        for filename in files:
            if not FILE_RE.match(filename):
                raise ValueError(f"invalid file name {filename[:40]!r}")
        spec = json.dumps(spec_json, indent=2).encode("utf-8")
        claim = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}).encode()
        version = max(self._numbers(name)[1], default=0) + 1
        while not self._put(self._version_key(name, version) + CLAIM_FILE, claim, exclusive=True):
            version += 1  # another publisher holds this number
        vkey = self._version_key(name, version)
        for filename, data in files.items():
            self._put(vkey + filename, data)
        if not self._put(vkey + SPEC_FILE, spec, exclusive=True):
            raise RuntimeError(f"{self.url}: {name}/{version} was published by someone else meanwhile")
        return version

    def write_default(self, name: str, version: int | None) -> None:
        self._replace(self._policy_key(name) + DEFAULT_FILE, None if version is None else f"{version}\n")

    def write_routing(self, name: str, routing: dict | None) -> None:
        self._replace(self._policy_key(name) + ROUTING_FILE, None if routing is None else json.dumps(routing))

    def _replace(self, key: str, text: str | None) -> None:
        if text is None:
            self.s3.delete_object(Bucket=self.bucket, Key=key)
        else:
            self._put(key, text.encode("utf-8"))  # a PUT replaces the object whole

    def delete_version(self, name: str, version: int) -> None:
        """``policy.json`` first (the version is gone from listings at once), then the rest."""
        vkey = self._version_key(name, version)
        self.s3.delete_object(Bucket=self.bucket, Key=vkey + SPEC_FILE)
        self._delete([k for k, _ in self._keys(vkey)])
        if self.read_default(name) == version:
            self.write_default(name, None)
        if not self.versions(name):  # the policy's own files go with its last version
            self._delete([k for k, _ in self._keys(self._policy_key(name))])

    def sweep(self, max_age_s: float = 24 * 3600) -> list[str]:
        """Remove what publishers that died left (claimed numbers without ``policy.json``) once
        nothing was written to them for ``max_age_s``; returns the version prefixes removed."""
        removed = []
        now = datetime.now(UTC).timestamp()
        for name in self.names():
            for v, written in self._numbers(name)[2].items():
                if now - written > max_age_s:
                    vkey = self._version_key(name, v)
                    self._delete([k for k, _ in self._keys(vkey)])
                    removed.append(f"{name}/{v}")
        return removed

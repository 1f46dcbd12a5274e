"""A policy's traffic split: a share per version and an optional shadow version.

Stored as ``<name>/routing.json`` in the model repository (next to ``default``), so every replica
that reads the repository applies the same split. ``Routing`` is what was asked for; ``Split`` is
what is served: the asked versions that are servable now, with their cumulative shares.

A stateless call with a routing key (``X-Routing-Key``) always lands on the same version while
the split stands, on every replica: the key's hash (BLAKE2b, not Python's salted ``hash``) picks
a point in [0, 1). Versions take the interval from the newest down, so raising a new version's
share only moves keys onto it, never between the older ones. Without a key the point is random.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any

MAX_ROUTED_VERSIONS = 16
_SCALE = float(2**64)


class RoutingRefused(ValueError):
    """A routing document that cannot be applied; the message says why."""


@dataclass(frozen=True)
class Routing:
    """``weights``: version -> share (any non-negative numbers, at least one positive);
    ``shadow``: a version that gets a copy of the routed traffic, never answers it."""

    weights: dict[int, float]
    shadow: int | None = None

    @classmethod
    def parse(cls, raw: Any) -> Routing:
        """``routing.json``'s content (or a request's): ``{"weights": {"<version>": share},
        "shadow": <version> | null}``, checked."""
        if not isinstance(raw, dict) or not isinstance(raw.get("weights"), dict):
            raise RoutingRefused(
                'expected {"weights": {"<version>": share, ...}, "shadow": <version> | null}'
            )
        weights: dict[int, float] = {}
        for key, share in raw["weights"].items():
            version = _version(key, "a weights key")
            if isinstance(share, bool) or not isinstance(share, int | float) or not math.isfinite(share):
                raise RoutingRefused(f"the share of version {version} must be a finite number, got {share!r}")
            if share < 0:
                raise RoutingRefused(f"the share of version {version} must be >= 0, got {share}")
            weights[version] = float(share)
        if not weights or sum(weights.values()) <= 0:
            raise RoutingRefused("weights must give at least one version a positive share")
        if len(weights) > MAX_ROUTED_VERSIONS:
            raise RoutingRefused(f"at most {MAX_ROUTED_VERSIONS} versions in a split, got {len(weights)}")
        shadow = raw.get("shadow")
        if shadow is not None:
            shadow = _version(shadow, "shadow")
            if weights.get(shadow, 0) > 0:
                raise RoutingRefused(f"version {shadow} cannot be the shadow and take a share of the traffic")
        return cls(weights, shadow)

    def to_json(self) -> dict[str, Any]:
        return {"weights": {str(v): w for v, w in sorted(self.weights.items())}, "shadow": self.shadow}

    def servable(self, versions: set[int] | dict) -> tuple[Split | None, list[int]]:
        """The split over the versions that are servable now, and the asked versions left out
        (the shadow included). ``None`` when no asked version with a share is servable."""
        named = (*self.weights, *([self.shadow] if self.shadow else ()))
        left_out = sorted(v for v in named if v not in versions)
        live = {v: w for v, w in self.weights.items() if v in versions and w > 0}
        if not live:
            return None, left_out
        shadow = self.shadow if self.shadow in versions else None
        return Split.of(live, shadow), left_out


@dataclass(frozen=True)
class Split:
    """Servable versions (newest first) and the upper ends of their shares of [0, 1)."""

    versions: tuple[int, ...]
    bounds: tuple[float, ...]
    shadow: int | None

    @classmethod
    def of(cls, weights: dict[int, float], shadow: int | None) -> Split:
        order = sorted(weights, reverse=True)
        total = sum(weights[v] for v in order)
        bounds, acc = [], 0.0
        for v in order:
            acc += weights[v] / total
            bounds.append(acc)
        bounds[-1] = 1.0  # rounding never leaves a gap at the top
        return cls(tuple(order), tuple(bounds), shadow)

    def shares(self) -> dict[int, float]:
        lower = (0.0, *self.bounds[:-1])
        return {v: hi - lo for v, lo, hi in zip(self.versions, lower, self.bounds, strict=True)}

    def choose(self, key: str | None) -> int:
        """The version for one call (or one new session): by the key's hash, else at random."""
        if len(self.versions) == 1:
            return self.versions[0]
        point = random.random() if key is None else key_point(key)
        return self.versions[min(bisect.bisect_right(self.bounds, point), len(self.versions) - 1)]


def key_point(key: str) -> float:
    """A routing key's point in [0, 1): the same on every process and every run."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def _version(raw: Any, what: str) -> int:
    if isinstance(raw, bool):
        raise RoutingRefused(f"{what} must be a version number (a positive integer), got {raw!r}")
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and raw.isascii() and raw.isdecimal() and len(raw) <= 12:
        value = int(raw)
    else:
        raise RoutingRefused(f"{what} must be a version number (a positive integer), got {str(raw)[:40]!r}")
    if value < 1:
        raise RoutingRefused(f"{what} must be a positive integer, got {value}")
    return value

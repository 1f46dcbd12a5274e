"""A shadow version: a copy of a policy's routed act calls, answered off the response path and
compared with what the primary answered, never returned.

The act call hands its parameters and answer to ``offer`` after it has its answer, and returns:
the copy waits in a bounded queue (a full queue drops it, counted) for one consumer task, so at
most one shadow forward pass is in flight at a time, next to the primary traffic's. The shadow
decodes the observations with its own codec (its spec may preprocess differently); a copy that
it cannot serve counts as a disagreement of every observation in it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from service.errors import ServiceError
from service.registry.registry import LoadedVersion
from service.serving.params import ActParams
from service.serving.stats import PolicyStats

log = logging.getLogger(__name__)

BOX_TOLERANCE = 0.05  # box actions agree within this share of the action range, per dimension

Forward = Callable[..., Awaitable[Any]]


class Shadows:
    def __init__(self, forward: Forward, stats: PolicyStats, capacity: int) -> None:
        self.forward = forward
        self.stats = stats
        self.capacity = capacity
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def offer(self, shadow: LoadedVersion, p: ActParams, answered: dict) -> None:
        """Queue a copy of an answered call for ``shadow``, or drop it (counted) when full."""
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue(self.capacity)
            self._task = asyncio.get_running_loop().create_task(self._run(self._queue))
        try:
            self._queue.put_nowait((shadow, p, answered))
        except asyncio.QueueFull:
            self.stats.dropped(p.policy)

    async def _run(self, queue: asyncio.Queue) -> None:
        while True:
            shadow, p, answered = await queue.get()
            try:
                agreed = await self._compare(shadow, p, answered)
            except ServiceError as exc:  # spaces that do not fit, a refused exploration
                log.debug("shadow %s v%d could not answer: %s", p.policy, shadow.version, exc.detail)
                agreed = 0
            except Exception:
                log.exception("shadow %s v%d failed", p.policy, shadow.version)
                agreed = 0
            self.stats.shadowed(p.policy, shadow.version, len(p.rows), agreed)

    async def _compare(self, shadow: LoadedVersion, p: ActParams, answered: dict) -> int:
        runtime = shadow.runtime
        obs, mask = runtime.codec.decode(p.rows, p.masks, p.single, p.policy)
        result = await self.forward(runtime, obs, mask, p.explore, p.seed, False)
        mine = runtime.codec.encode(result, p.single)
        if p.single:
            return int(_agree(mine["action"], answered["action"], _span(shadow)))
        span = _span(shadow)
        return sum(_agree(a, b, span) for a, b in zip(mine["actions"], answered["actions"], strict=True))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _span(shadow: LoadedVersion) -> list[float] | None:
    action = shadow.spec.action
    if getattr(action, "type", None) != "box":
        return None
    return [BOX_TOLERANCE * (h - lo) for lo, h in zip(action.low, action.high, strict=True)]


def _agree(a: Any, b: Any, span: list[float] | None) -> bool:
    """Whether two answered actions are the same one (box: close, per dimension)."""
    if span is not None and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        flat_a, flat_b = _flat(a), _flat(b)
        if len(flat_a) != len(flat_b):
            return False
        pairs = enumerate(zip(flat_a, flat_b, strict=True))
        return all(abs(x - y) <= span[i % len(span)] for i, (x, y) in pairs)
    return a == b


def _flat(x: Any) -> list[float]:
    return [y for item in x for y in _flat(item)] if isinstance(x, list) else [x]

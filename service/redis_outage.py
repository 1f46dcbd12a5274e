"""A Redis outage as a domain error, written once for every Redis-backed store.

redis-py raises ``ConnectionError``/``TimeoutError`` while the server is down and reconnects by
itself on a later command, so turning those into ``Unavailable`` (503 + Retry-After at the edge)
is all it takes for the service to answer clearly during an outage and recover when Redis does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import Unavailable

# Fail fast when Redis is away instead of hanging a request (seconds).
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 10.0


@contextmanager
def redis_available(what: str) -> Iterator[None]:
    """Raise :class:`Unavailable` naming ``what`` when Redis cannot be reached inside."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise Unavailable(
            f"{what} (Redis) is unreachable ({type(exc).__name__}); nothing was changed, retry shortly"
        ) from None

"""Domain errors: what went wrong, in words, with no HTTP in them.

The runtime, the registry, the stores and the service layer raise these; the HTTP edge
(``service.api.errors``) is the one place that maps each to a status code. Every message says
what was wrong and what was expected.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors a client can cause or must wait out.

    Args:
        detail: the sentence sent back to the client.
        retry_after_s: for errors that pass (limits, outages), when to try again.
    """

    def __init__(self, detail: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


class NotFound(ServiceError, LookupError):
    """An unknown policy, version, session, job or environment."""


class InvalidInput(ServiceError, ValueError):
    """The request's content does not fit (shapes, values, limits on its content)."""


class Unreadable(ServiceError):
    """A body that is not in the wire format the endpoint reads, or holds what it refuses to
    read (a pickle naming anything outside its allow-list): nothing of it ran."""


class Conflict(ServiceError):
    """The request fits but the resource's state forbids it (e.g. cancelling a finished job)."""


class Busy(ServiceError):
    """A capacity limit is reached (sessions, rollouts, queued jobs); retry later."""

    def __init__(self, detail: str, retry_after_s: float = 1) -> None:
        super().__init__(detail, retry_after_s=retry_after_s)


class Unavailable(ServiceError):
    """A backing service (Redis) is unreachable; the call changed nothing, retry later."""

    def __init__(self, detail: str, retry_after_s: float = 2) -> None:
        super().__init__(detail, retry_after_s=retry_after_s)


class TimedOut(ServiceError):
    """The work ran past its time limit and was stopped."""


def too_large(what: str, limit: int) -> str:
    """The one wording of a body or file over its size limit."""
    return f"{what} is larger than the limit of {limit} bytes"


def validation_sentence(errors: list[dict], skip: tuple[str, ...] = ()) -> str:
    """pydantic errors as one sentence: ``field.path: message; …`` (``skip`` drops path parts)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'] if p not in skip) or 'value'}: {e['msg']}" for e in errors
    )


def _number(x: object) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def check_limit(what: str, value: float, limit: float) -> None:
    """The one check, and the one wording, of a request asking for more than a limit allows."""
    if value > limit:
        raise InvalidInput(f"{what}={_number(value)} exceeds the limit of {_number(limit)}")

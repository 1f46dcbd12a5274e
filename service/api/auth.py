"""The one bearer-key check, and which endpoints it guards: admin ones when a key is set,
inference ones too when ``PROTECT_INFERENCE`` is on. Used by the FastAPI dependencies
(``api/deps``) and the edge's hot routes and WebSocket (``api/edge``)."""

from __future__ import annotations

import hmac

from service.api.errors import HTTPAuthError
from service.config import Settings


def check_bearer(authorization: str | None, key: str) -> None:
    """Raise 401 without ``Bearer <token>``, 403 when the token is not ``key``."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPAuthError(401, "missing credentials: send 'Authorization: Bearer <POLICY_SERVER_API_KEY>'")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise HTTPAuthError(403, "invalid API key")


def _text(authorization: str | bytes | None) -> str | None:
    return authorization.decode("latin-1") if isinstance(authorization, bytes) else authorization


def check_admin(settings: Settings, authorization: str | bytes | None) -> None:
    """Admin endpoints: the key when one is set."""
    if settings.api_key:
        check_bearer(_text(authorization), settings.api_key)


def check_inference(settings: Settings, authorization: str | bytes | None) -> None:
    """Act, sessions and rollouts: the key when one is set and inference is protected."""
    if settings.api_key and settings.protect_inference:
        check_bearer(_text(authorization), settings.api_key)

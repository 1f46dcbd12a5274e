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


def admin_key(settings: Settings) -> str | None:
    """The key admin endpoints need: the API key, when one is set."""
    return settings.api_key or None


def inference_key(settings: Settings) -> str | None:
    """The key act, sessions, rollouts and /v2 need: the API key when inference is protected."""
    return settings.api_key if settings.api_key and settings.protect_inference else None


def check_admin(settings: Settings, authorization: str | bytes | None) -> None:
    key = admin_key(settings)
    if key:
        check_bearer(_text(authorization), key)


def check_inference(settings: Settings, authorization: str | bytes | None) -> None:
    key = inference_key(settings)
    if key:
        check_bearer(_text(authorization), key)

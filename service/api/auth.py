"""The one bearer-key check, shared by the FastAPI dependencies, the ASGI edge (api/edge.py) and the
WebSocket (through the same dependencies)."""

from __future__ import annotations

import hmac

from service.api.errors import HTTPAuthError


def check_bearer(authorization: str | None, key: str) -> None:
    """Raise 401 without ``Bearer <token>``, 403 when the token is not ``key``."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPAuthError(401, "missing credentials: send 'Authorization: Bearer <POLICY_SERVER_API_KEY>'")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise HTTPAuthError(403, "invalid API key")

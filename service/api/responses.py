"""A JSON response rendered like every other answer of the service (``asgi.dumps``)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from service.api.asgi import dumps


class FastJSONResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)

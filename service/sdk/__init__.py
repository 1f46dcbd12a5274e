"""The Python SDK: ``export_policy`` (needs torch and torchrl) and the HTTP clients (httpx only).

``import service.sdk`` imports neither torch nor torchrl: ``export_policy`` is loaded on first
use, so a simulator that only talks to the server installs httpx and nothing else.
"""

from __future__ import annotations

from typing import Any

from service.sdk.client import AsyncPolicyClient, PolicyClient, PolicyServerError

__all__ = ["AsyncPolicyClient", "PolicyClient", "PolicyServerError", "export_policy"]


def export_policy(*args: Any, **kwargs: Any):
    """See :func:`service.sdk.export.export_policy`."""
    from service.sdk.export import export_policy as export

    return export(*args, **kwargs)

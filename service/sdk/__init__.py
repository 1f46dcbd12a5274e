"""The Python SDK: the HTTP clients (httpx only), ``export_policy`` and ``RemotePolicy`` (a
served policy as a TorchRL module for a ``Collector``; both need torch and torchrl).

``import service.sdk`` imports neither torch nor torchrl: ``export_policy`` and ``RemotePolicy``
are loaded on first use, so a simulator that only talks to the server installs httpx and
nothing else.
"""

from __future__ import annotations

from typing import Any

from service.sdk.client import AsyncPolicyClient, PolicyClient, PolicyServerError

__all__ = ["AsyncPolicyClient", "PolicyClient", "PolicyServerError", "RemotePolicy", "export_policy"]


def export_policy(*args: Any, **kwargs: Any):
    """See :func:`service.sdk.export.export_policy`."""
    from service.sdk.export import export_policy as export

    return export(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "RemotePolicy":  # torch, tensordict and torchrl: imported when asked for
        from service.sdk.remote import RemotePolicy

        return RemotePolicy
    raise AttributeError(f"module 'service.sdk' has no attribute {name!r}")

"""Process-wide settings, made in one explicit place: ``configure_process`` (called by the CLI,
``create_app`` and the test suite's conftest) and ``freeze_loaded_objects`` (after loading).

Nothing here runs at import time. Each tweak says why it exists and how to tell it can go.
"""

from __future__ import annotations

import gc
import importlib.util
import sys

import torch


def skip_pandas_probe() -> None:
    """tensordict's ``TensorDict.from_any`` (run on every TensorDictModule output) calls
    ``importlib.util.find_spec("pandas")`` each time; without pandas installed that searches
    ``sys.path`` on disk (~50 µs a module call, 14% of a DQN collection step). Recording the
    absence once in ``sys.modules`` (the documented way to mark a module unimportable) makes the
    lookup a dict hit. Nothing changes when pandas is installed.

    Can go when ``tests/test_jobs.py::test_tensordict_modules_do_not_search_the_file_system``
    passes without it (tensordict caching the probe; checked against tensordict 0.14).
    """
    if "pandas" not in sys.modules and importlib.util.find_spec("pandas") is None:
        sys.modules["pandas"] = None  # type: ignore[assignment]


def configure_process(torch_threads: int | None = None) -> None:
    """Everything process-wide the service relies on; idempotent.

    - the pandas probe above;
    - ``torch_threads``: intra-op threads (serving: 1 by default, a forward pass of a small
      policy loses more to thread wake-ups than it gains); ``None`` leaves torch's choice;
    - this project's gymnasium ids (``CartPoleNoVel-v1``) registered, so that ``gym.make`` and
      TorchRL's ``GymEnv`` find them (can go if the ids ever ship in a package's entry points).
    """
    from service.envs import register_envs

    skip_pandas_probe()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    register_envs()


def freeze_loaded_objects() -> None:
    """Called once everything long-lived is loaded (policies, stores): keep it out of the cyclic
    GC's full collections, which otherwise show up as tens-of-milliseconds tail latencies.
    Can go if ``make bench``'s act p99 does not move without it."""
    gc.collect()
    gc.freeze()

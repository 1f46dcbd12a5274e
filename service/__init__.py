"""TorchRL policy server.

One process-wide fix lives here because it must run before any TensorDictModule is called:
tensordict's ``TensorDict.from_any`` (run on every module output) asks
``importlib.util.find_spec("pandas")`` each time, which, when pandas is not installed, searches
``sys.path`` on the file system: ~50 µs per module call, 14% of a DQN collection step. Recording
the absence once in ``sys.modules`` (the documented way to mark a module unimportable) makes that
lookup a dict hit. Nothing changes when pandas is installed.
"""

import importlib.util
import sys

if "pandas" not in sys.modules and importlib.util.find_spec("pandas") is None:
    sys.modules["pandas"] = None  # type: ignore[assignment]

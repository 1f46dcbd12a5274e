"""Re-measure the shipped models on held-out seeds (not a test).

The shipped versions were published before training separated validation from reporting: their
provenance ``eval_mean_return`` was measured on the episodes the published weights were chosen
on. This evaluates every shipped version deterministically on the held-out seeds
(``HELDOUT_SEED``, 20000 onward) that no training run selects on, the numbers the README quotes.

    python -m benchmarks.heldout_eval [--episodes 20]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from service.process import configure_process
from service.registry.registry import Registry
from service.registry.store import ModelStore
from service.training.common import HELDOUT_SEED, evaluate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--models", default=str(ROOT / "models"))
    args = ap.parse_args()
    configure_process(torch_threads=1)
    registry = Registry(ModelStore(Path(args.models)))
    registry.load_all()
    for entry in registry.entries():
        for version, loaded in sorted(entry.versions.items()):
            spec = loaded.spec
            ret = evaluate(spec.env_id, loaded.runtime, torch.device("cpu"), args.episodes, HELDOUT_SEED)
            print(
                json.dumps(
                    {
                        "policy": entry.name,
                        "version": version,
                        "env_id": spec.env_id,
                        "heldout_seeds": [HELDOUT_SEED, HELDOUT_SEED + args.episodes - 1],
                        "heldout_mean_return": round(ret, 1),
                        "provenance_eval_mean_return": (spec.provenance or {}).get("eval_mean_return"),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()

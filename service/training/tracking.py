"""Experiment tracking the way TorchRL users track: a job's scalars through
``torchrl.record.loggers`` into ``<DATA_DIR>/jobs/<job_id>/`` — CSV always
(``scalars/<name>.csv``: ``step,value`` with step = frames), TensorBoard event files too when
``tensorboard`` is installed (``pip install -e '.[tensorboard]'``), so
``tensorboard --logdir $DATA_DIR/jobs`` shows every run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torchrl.record.loggers import CSVLogger, Logger

log = logging.getLogger(__name__)
SCALARS = ("mean_return", "eval_mean_return", "loss", "epsilon", "fps", "episodes")


class JobLog:
    """The loggers of one job; ``log(point)`` writes a progress point's scalars at its frames."""

    def __init__(self, root: Path, job_id: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.loggers: list[Logger] = [CSVLogger(exp_name=job_id, log_dir=str(root))]
        try:
            import tensorboard  # noqa: F401  (an optional extra)
        except ImportError:
            pass
        else:
            from torchrl.record.loggers import TensorboardLogger

            self.loggers.append(TensorboardLogger(exp_name=job_id, log_dir=str(root)))

    def log(self, point: dict[str, Any]) -> None:
        step = int(point.get("frames") or 0)
        for name in SCALARS:
            value = point.get(name)
            if value is None:
                continue
            for logger in self.loggers:
                try:
                    logger.log_scalar(name, float(value), step=step)
                except OSError:  # a full disk must not fail the job; the record still has it
                    log.warning("could not log %s of a job", name, exc_info=True)

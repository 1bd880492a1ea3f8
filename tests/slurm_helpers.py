"""Callbacks that the SLURM tests inject with ``+callbacks.<name>._target_=slurm_helpers.<Class>``
(the tests put this folder on PYTHONPATH; sbatch passes the environment on to the job)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl


class Pace(pl.Callback):
    """Sleeps after every training step, so a test can act between two checkpoints."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class RecordStart(pl.Callback):
    """Writes ``<dir>/start-<job id>-rank<k>.json``: the step a (re)started run begins at and the
    SLURM variables it saw."""

    def __init__(self, dir: str):
        self.dir = Path(dir)

    def on_train_start(self, trainer, pl_module):
        self.dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k.startswith("SLURM_")}
        job = env.get("SLURM_JOB_ID", "nojob")
        out = {
            "global_step": trainer.global_step,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "env": env,
        }
        (self.dir / f"start-{job}-rank{trainer.global_rank}.json").write_text(json.dumps(out))

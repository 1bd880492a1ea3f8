"""Callbacks that CLI tests inject with ``+callbacks.<name>._target_=cli_helpers.<Class>``
(the tests put this folder on PYTHONPATH of the subprocess)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch


class WeightDump(pl.Callback):
    """Saves each rank's trainable weights at the end of training to ``<dir>/rank<k>.pt``."""

    def __init__(self, dir: str):
        self.dir = Path(dir)

    def on_train_end(self, trainer, pl_module):
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(
            {"step": trainer.global_step, "state": state},
            self.dir / f"rank{trainer.global_rank}.pt",
        )


class KillAt(pl.Callback):
    """Ends the process abruptly (no cleanup, as a pre-emption would) after training step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os._exit(17)


class SaveReturn:
    """A Hydra callback (``+hydra.callbacks.<name>._target_=cli_helpers.SaveReturn``) that writes
    each job's return value, what a sweeper such as Optuna receives, to ``<job dir>/return.json``."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        import json

        out = Path(job_return.hydra_cfg.hydra.runtime.output_dir) / "return.json"
        out.write_text(json.dumps(job_return.return_value))

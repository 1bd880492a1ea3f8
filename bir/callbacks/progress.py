"""The training progress bar: counts steps for step-bounded runs, epochs otherwise."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, labelled ``step 120/400`` when ``trainer.max_steps`` bounds
    the run.

    Lightning labels the bar ``Epoch {epoch}/{max_epochs - 1}``, which reads ``Epoch 30/-2`` for
    the usual step-bounded setting ``max_steps=400, max_epochs=-1``. Here a run with
    ``max_steps > 0`` shows the optimiser step out of ``max_steps``, updated every batch (with
    the epoch in front when ``max_epochs`` bounds it too); epoch-bounded runs keep Lightning's
    label.
    """

    def describe(self, trainer: pl.Trainer) -> str:
        """The label of the training bar for the trainer's current state."""
        max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
        epochs = f"Epoch {trainer.current_epoch}"
        if max_epochs is not None and max_epochs >= 0:
            epochs += f"/{max_epochs - 1}"
        if max_steps is None or max_steps <= 0:
            return epochs
        steps = f"step {trainer.global_step}/{max_steps}"
        return steps if max_epochs is None or max_epochs < 0 else f"{epochs} {steps}"

    def _get_train_description(self, current_epoch: int) -> str:
        description = self.describe(self.trainer)
        # as Lightning: pad to the validation label so the line does not flicker
        return f"{description:{len(self.validation_description)}}"

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, i)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(
                self.train_progress_bar_id, description=self._get_train_description(0)
            )
            self.refresh()

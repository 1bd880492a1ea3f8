"""The training progress bar counts steps for step-bounded runs (not "Epoch 30/-2")."""

from types import SimpleNamespace

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from bir.callbacks.progress import StepProgressBar


def _state(max_steps, max_epochs, step=120, epoch=3):
    return SimpleNamespace(
        max_steps=max_steps, max_epochs=max_epochs, global_step=step, current_epoch=epoch
    )


def test_label_names_steps_when_steps_bound_the_run():
    bar = StepProgressBar()
    assert bar.describe(_state(400, -1)) == "step 120/400"
    assert bar.describe(_state(400, None)) == "step 120/400"
    assert bar.describe(_state(-1, 10)) == "Epoch 3/9"
    assert bar.describe(_state(400, 10)) == "Epoch 3/9 step 120/400"


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, i):
        return ((batch[0] - self.w) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_bar_shows_the_step_count_during_a_step_bounded_fit(tmp_path):
    bar = StepProgressBar()
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(bar.progress.tasks[bar.train_progress_bar_id].description.strip())

    loader = DataLoader(TensorDataset(torch.arange(6.0)[:, None]), batch_size=2)  # 3 per epoch
    trainer = pl.Trainer(
        max_steps=7,
        max_epochs=-1,
        callbacks=[bar, Spy()],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_Tiny(), loader)
    assert seen == [f"step {k}/7" for k in range(1, 8)]
    assert all("-2" not in s for s in seen)

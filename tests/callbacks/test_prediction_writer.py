import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bir.callbacks import PredictionWriter
from bir.data.datasets import RestoreFolderDataset, collate
from bir.data.io import read_image, save_image


class HalfModule(pl.LightningModule):
    """Returns lq / 2, a 3x3 kernel and curves; NaN for names listed in ``nan_names``."""

    def __init__(self, nan_names=()):
        super().__init__()
        self.nan_names = set(nan_names)
        self.calls = []

    def predict_step(self, batch, batch_idx):
        out = batch["lq"] / 2
        for i, n in enumerate(batch["name"]):
            self.calls.append(n)
            if n in self.nan_names:
                out[i, 0, 0, 0] = float("nan")
        b = out.shape[0]
        return {
            "name": batch["name"],
            "restored": out,
            "kernel": torch.full((b, 1, 3, 3), 1 / 9),
            "loss_curve": torch.linspace(1, 0, 5).repeat(b, 1),
            "scale_trajectory": torch.arange(4.0).repeat(b, 1),
            "extras": {"seed": batch["index"]},
        }


def _inputs(tmp_path, n=3):
    for k in range(n):
        save_image(torch.full((3, 16, 16), 0.2 * (k + 1)), tmp_path / "in" / f"img{k}.png")
        save_image(torch.full((3, 16, 16), 0.1 * (k + 1)), tmp_path / "gt" / f"img{k}.png")


def _run(tmp_path, module, writer):
    ds = RestoreFolderDataset(tmp_path / "in", gt=tmp_path / "gt", exclude=writer.done_names())
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False
    )
    if len(ds):
        trainer.predict(
            module, DataLoader(ds, batch_size=2, collate_fn=collate), return_predictions=False
        )
    return ds


def test_writes_everything_and_summary(tmp_path):
    _inputs(tmp_path)
    w = PredictionWriter(tmp_path / "out")
    _run(tmp_path, HalfModule(), w)
    out = tmp_path / "out"
    assert torch.allclose(read_image(out / "img1.png"), torch.full((3, 16, 16), 0.2), atol=1 / 255)
    assert np.allclose(np.load(out / "kernels" / "img0.npy"), 1 / 9)
    assert (out / "curves" / "img2_scale.png").exists()
    rec = json.loads((out / "records" / "img0.json").read_text())
    assert rec["metrics"]["psnr"] > 40  # output 0.1 vs gt 0.1 up to 8-bit rounding
    assert rec["extras"]["seed"] == 0 and rec["final_loss"] == pytest.approx(0.0)
    summary = (out / "summary.md").read_text()
    assert "| psnr |" in summary and "3 images" in summary
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 4
    assert not list(out.rglob("*.tmp"))


def test_resume_skips_done_images(tmp_path):
    _inputs(tmp_path)
    w = PredictionWriter(tmp_path / "out", metrics=())
    _run(tmp_path, HalfModule(), w)
    m2 = HalfModule()
    ds = _run(tmp_path, m2, PredictionWriter(tmp_path / "out", metrics=()))
    assert len(ds) == 0 and m2.calls == []
    (tmp_path / "out" / "img1.png").unlink()
    m3 = HalfModule()
    _run(tmp_path, m3, PredictionWriter(tmp_path / "out", metrics=()))
    assert m3.calls == ["img1"]


def test_nan_output_is_not_written_but_others_are(tmp_path):
    _inputs(tmp_path)
    w = PredictionWriter(tmp_path / "out", metrics=())
    with pytest.raises(RuntimeError, match="img1"):
        _run(tmp_path, HalfModule(nan_names=["img1"]), w)
    out = tmp_path / "out"
    assert (out / "img0.png").exists() and (out / "img2.png").exists()
    assert not (out / "img1.png").exists()

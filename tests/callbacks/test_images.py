"""bir.callbacks.images: grids and the one function that hands them to every logger."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from bir.callbacks.images import comparison_grid, grid_uint8, image_loggers, log_grid
from bir.data.io import read_image


class WandbStyle:
    """Takes images like WandbLogger.log_image."""

    def __init__(self):
        self.calls = []

    def log_image(self, key, images, step=None, **kwargs):
        self.calls.append((key, images, step, kwargs))


class SummaryWriterStyle:
    def __init__(self):
        self.calls = []

    def add_image(self, tag, img, global_step=None):
        self.calls.append((tag, img, global_step))


class TensorBoardStyle:
    """Takes images like TensorBoardLogger (through its SummaryWriter)."""

    def __init__(self):
        self.experiment = SummaryWriterStyle()


class MetricsOnly:
    """A logger without images (CSV-like)."""

    experiment = object()


def test_comparison_grid_layout():
    lq, out, gt = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 8, 8), 0.5), torch.ones(2, 3, 8, 8)
    grid = comparison_grid(lq, out, gt)
    assert grid.shape == (3, 16, 24)
    assert (
        grid[:, :, :8].max() == 0
        and (grid[:, :, 8:16] == 0.5).all()
        and (grid[:, :, 16:] == 1).all()
    )
    # nearest resize to the last column's size: each LQ pixel becomes a 2x2 block
    lq = torch.arange(16.0).reshape(1, 1, 4, 4).expand(1, 3, 4, 4) / 16
    grid = comparison_grid(lq, torch.zeros(1, 3, 8, 8))
    torch.testing.assert_close(grid[:, ::2, :8:2], lq[0])
    torch.testing.assert_close(grid[:, 1::2, 1:8:2], lq[0])


def test_every_logger_gets_the_grid_in_its_format():
    grid = torch.tensor([0.0, 0.5, 1.0, 0.2, -0.3, 1.7]).reshape(1, 2, 3).expand(3, 2, 3)
    wandb, tb, csv = WandbStyle(), TensorBoardStyle(), MetricsOnly()
    assert log_grid([wandb, tb, csv], "train/images", grid, step=7, caption="a: LQ | output")

    ((key, images, step, kwargs),) = wandb.calls
    assert (key, step, kwargs) == ("train/images", 7, {"caption": ["a: LQ | output"]})
    (rgb8,) = images
    # H x W x 3 in 0..255: round(255 x) after clamping to [0, 1] (wandb casts arrays as they are)
    assert isinstance(rgb8, np.ndarray) and rgb8.dtype == np.uint8 and rgb8.shape == (2, 3, 3)
    assert rgb8[..., 0].tolist() == [[0, 128, 255], [51, 0, 255]]
    assert (rgb8[..., 0] == rgb8[..., 2]).all()

    ((tag, img, global_step),) = tb.experiment.calls
    assert (tag, global_step) == ("train/images", 7)
    assert img.shape == (3, 2, 3) and img.dtype == torch.float32
    torch.testing.assert_close(img, grid.clamp(0, 1))


def test_without_caption_wandb_gets_no_caption_and_nan_is_black():
    wandb = WandbStyle()
    grid = torch.full((3, 1, 2), float("nan"))
    log_grid([wandb], "val/images", grid, step=0)
    ((_, (rgb8,), _, kwargs),) = wandb.calls
    assert kwargs == {} and (rgb8 == 0).all()
    assert grid_uint8(torch.full((3, 1, 1), 0.998)).item(0) == 254  # round(254.49)


def test_no_image_logger_writes_the_png_fallback(tmp_path):
    grid = torch.rand(3, 4, 6)
    path = tmp_path / "samples" / "step0000002.png"
    assert log_grid([MetricsOnly()], "train/samples", grid, step=2, png_path=path)
    torch.testing.assert_close(read_image(path), grid, atol=0.5 / 255, rtol=0)
    assert not log_grid([], "train/samples", grid, step=2)  # no logger, no fallback: nothing


def test_trainer_loggers_and_rank_zero(tmp_path, monkeypatch):
    wandb, tb = WandbStyle(), TensorBoardStyle()
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    assert image_loggers(trainer) == [] and image_loggers(None) == []
    monkeypatch.setattr(pl.Trainer, "loggers", property(lambda self: [wandb, MetricsOnly(), tb]))
    assert image_loggers(trainer) == [wandb, tb]
    assert log_grid(trainer, "t", torch.zeros(3, 2, 2), step=1)
    assert len(wandb.calls) == len(tb.experiment.calls) == 1
    # off global rank zero nothing is sent, and no PNG is written
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
    path = tmp_path / "x.png"
    assert image_loggers(trainer) == []
    assert not log_grid(trainer, "t", torch.zeros(3, 2, 2), step=2, png_path=path)
    assert len(wandb.calls) == 1 and not path.exists()


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_uint8_extremes(value):
    assert (grid_uint8(torch.full((3, 2, 2), value)) == round(255 * value)).all()

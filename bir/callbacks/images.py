"""Image grids for the loggers: the one place that knows how each logger takes an image.

Training modules (stage 1, stage 2, the pixel prior) and the prediction writer build a grid
``[3, H, W]`` in [0, 1] (:func:`comparison_grid`: LQ | output | GT columns) and hand it to
:func:`log_grid`, which sends it to every attached logger that takes images:

* W&B-style loggers (``log_image(key, images, step, caption=...)``: W&B, Neptune, MLflow) get an
  ``H x W x 3`` uint8 array in 0..255 (``wandb.Image`` casts arrays to uint8 as they are, so 0..1
  floats would show black);
* TensorBoard-style loggers (``experiment.add_image(tag, img, step)``) get the ``[3, H, W]`` float
  grid in [0, 1];
* with neither, the grid can be written as a PNG instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F

from bir.data.io import save_image, to_uint8


def comparison_grid(*columns: torch.Tensor, max_rows: int = 4) -> torch.Tensor:
    """Side-by-side grid [3, rows*H, len(columns)*W] in [0, 1] of ``[B, 3, H, W]`` batches.

    Every column is resized (nearest) to the last column's size, e.g. (LQ | restored | GT).
    """
    size = columns[-1].shape[-2:]
    cols = [
        c[:max_rows].detach().float().clamp(0, 1)
        if c.shape[-2:] == size
        else F.interpolate(c[:max_rows].detach().float(), size=size, mode="nearest").clamp(0, 1)
        for c in columns
    ]
    rows = torch.cat(cols, dim=-1)  # B, 3, H, k*W
    return torch.cat(list(rows), dim=-2).cpu()  # 3, B*H, k*W


def grid_uint8(grid: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] -> ``H x W x 3`` uint8 (``round(255 x)``); NaN shows as black."""
    return to_uint8(grid.detach().float().nan_to_num(0.0, posinf=1.0, neginf=0.0))


def _takes_images(logger: Any) -> bool:
    return hasattr(logger, "log_image") or hasattr(getattr(logger, "experiment", None), "add_image")


def image_loggers(target: pl.Trainer | Iterable[Any] | None) -> list[Any]:
    """The loggers that take images: of a Trainer (none off global rank zero, so every grid is
    sent once under DDP), or of an iterable of loggers."""
    if target is None:
        return []
    if isinstance(target, pl.Trainer):
        if not target.is_global_zero:
            return []
        target = target.loggers
    return [logger for logger in target if _takes_images(logger)]


def log_grid(
    target: pl.Trainer | Iterable[Any] | None,
    tag: str,
    grid: torch.Tensor,
    step: int | None = None,
    caption: str | None = None,
    png_path: str | os.PathLike | None = None,
) -> bool:
    """Send ``grid`` (``[3, H, W]`` in [0, 1]) to every logger of ``target`` that takes images.

    Args:
        target: a Trainer (its loggers, on global rank zero only) or an iterable of loggers.
        tag: the image's key, e.g. ``train/images``.
        grid: ``[3, H, W]`` float in [0, 1] (clamped).
        step: the step to log it at (None: the logger's own).
        caption: a caption for W&B-style loggers.
        png_path: written when no logger takes images (on rank zero); None: nothing.

    Returns:
        True when a logger (or the PNG) took the grid.
    """
    if isinstance(target, pl.Trainer) and not target.is_global_zero:
        return False
    grid = grid.detach().float().cpu().clamp(0, 1)
    loggers = image_loggers(target)
    for logger in loggers:
        if hasattr(logger, "log_image"):
            extra = {"caption": [caption]} if caption is not None else {}
            logger.log_image(key=tag, images=[grid_uint8(grid)], step=step, **extra)
        else:
            logger.experiment.add_image(tag, grid, step)
    if not loggers and png_path is not None:
        save_image(grid.nan_to_num(0.0), png_path)
        return True
    return bool(loggers)

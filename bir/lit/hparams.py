"""Hyperparameters saved as plain Python containers.

Hydra hands modules ``DictConfig`` / ``ListConfig`` arguments; saved as they are, they pickle
omegaconf classes into the checkpoint, which ``torch.load(weights_only=True)`` (Lightning's
default when resuming) refuses. Modules call :func:`save_plain_hyperparameters` instead of
``self.save_hyperparameters`` so their checkpoints hold only dicts, lists and scalars.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import lightning.pytorch as pl
from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(value):
    """``value`` with every omegaconf container (at any depth) turned into a dict / list."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_plain(v) for v in value)
    return value


def save_plain_hyperparameters(module: pl.LightningModule, ignore: Sequence[str] = ()) -> None:
    """``module.save_hyperparameters(ignore=...)`` for the caller's ``__init__``, then plain."""
    frame = inspect.currentframe().f_back
    module.save_hyperparameters(ignore=list(ignore), frame=frame)
    for key, value in list(module.hparams.items()):
        module.hparams[key] = to_plain(value)
    initial = getattr(module, "_hparams_initial", None)
    if initial is not None:
        for key, value in list(initial.items()):
            initial[key] = to_plain(value)

"""Exponential moving average of network weights: the one update rule bir's trainers use.

After every optimiser step, for each parameter ``p`` of the trained network and its copy ``e``::

    d = min(decay, (1 + n) / (10 + n))   if warmup (ldm's LitEma; n = updates made so far)
    d = decay                            otherwise
    e <- d * e + (1 - d) * p

Buffers are copied, not averaged. Where the average lives depends on the trainer, and sets its
checkpoint layout (which the loaders read):

* :class:`~bir.lit.stage2.Stage2ControlLDM` keeps it as a submodule ``ema_controlnet.*`` and
  :class:`~bir.lit.pixel_ddpm.PixelDDPM` as ``ema_net.*`` (with the counter ``ema_updates``), next
  to the trained weights; both call :func:`update_ema`.
* :class:`EMACallback` (stage 1, ``callbacks.ema`` in ``experiment=diffbir_stage1``) averages the
  whole LightningModule outside it. The checkpoint's ``state_dict`` then holds the average under
  the module's own keys (``net.*``), so ``bir-restore`` restores it as it stands, and the live
  weights are kept beside it for resuming (Lightning's ``WeightAveraging`` layout; checkpoints of
  ``lightning.pytorch.callbacks.EMAWeightAveraging`` resume with it).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn

Tensor = torch.Tensor


def decay_at(decay: float, updates: int, warmup: bool = False) -> float:
    """The decay of the next update after ``updates`` earlier ones: ``decay``, or with
    ``warmup`` ``min(decay, (1 + updates) / (10 + updates))`` (0.1, 0.18, 0.25 ... -> decay), so
    a short run does not keep the random initialisation in the average."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


@torch.no_grad()
def lerp_towards(averages: Sequence[Tensor], values: Sequence[Tensor], decay: float) -> None:
    """``a <- decay * a + (1 - decay) * v`` in place for each pair (``v`` cast to ``a``'s dtype and
    device); the rule of the module docstring, on tensors. Integer tensors (step counters among
    averaged buffers) are copied."""
    for avg, value in zip(averages, values, strict=True):
        value = value.detach().to(avg.device, avg.dtype)
        if avg.is_floating_point() or avg.is_complex():
            avg.lerp_(value, 1.0 - decay)
        else:
            avg.copy_(value)


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """One EMA step of ``ema`` (a copy of ``net``): parameters averaged with :func:`lerp_towards`,
    buffers copied. Parameters and buffers are matched by name."""
    ema_params = dict(ema.named_parameters())
    pairs = [(ema_params[name], p) for name, p in net.named_parameters()]
    lerp_towards([e for e, _ in pairs], [p for _, p in pairs], decay)
    ema_buffers = dict(ema.named_buffers())
    for name, buf in net.named_buffers():
        ema_buffers[name].copy_(buf)


def ema_copy(net: nn.Module) -> nn.Module:
    """A frozen copy of ``net`` in eval mode (dropout off) to hold its average."""
    return copy.deepcopy(net).requires_grad_(False).eval()


class EMACallback(WeightAveraging):
    """EMA of a whole LightningModule's parameters, updated after every optimiser step with the
    rule of the module docstring (the first update copies the weights).

    Validation runs on the average, and training ends with the average in the module. Checkpoints
    hold the average in ``state_dict`` (so inference loads it directly), the live weights under
    ``current_model_state`` and the update count under ``averaging_state``.

    Args:
        decay: EMA decay (DiffBIR stage 1 in bir: 0.999).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` after n updates.
        use_buffers: average the buffers too (False: copy them from the module).
        device: where the average lives (default: the module's device; "cpu" saves GPU memory).
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = False,
        use_buffers: bool = False,
        device: torch.device | str | None = None,
    ):
        decay_at(decay, 0)  # validates decay
        super().__init__(device=device, use_buffers=use_buffers, multi_avg_fn=self._average)
        self.decay, self.warmup = float(decay), bool(warmup)

    def _average(self, averages: list[Tensor], values: list[Tensor], num_averaged: Any) -> None:
        # called by torch's AveragedModel from the second update on (the first copies)
        lerp_towards(averages, values, decay_at(self.decay, int(num_averaged), self.warmup))

"""DiffBIR stage 1: train SwinIR to remove degradations (MSE), validate, and restore folders.

Data flow (docs/design.md, "Train stage 1"): GT crops arrive on the device,
``on_after_batch_transfer`` degrades them with per-sample generators, the network restores, the
loss is ``MSE(net(lq), gt)`` with DiffBIR's ``reduction="sum"``. Mixed precision, gradient
clipping, checkpointing and EMA are the trainer's business (``trainer.precision``,
``trainer.gradient_clip_val``, the callback :class:`bir.lit.ema.EMACallback`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from bir.callbacks.images import comparison_grid, image_loggers, log_grid
from bir.lit.hparams import save_plain_hyperparameters
from bir.nets.checkpoints import load_net, missing_checkpoint_error
from bir.random import sample_generators
from bir.tiling import tiled_apply

#: generator streams (bir.random): independent draws for training and for fixed validation sets
TRAIN_DEGRADATION_STREAM = 11
VAL_DEGRADATION_STREAM = 12
#: training seeds use index + global_step * STEP_STRIDE: fresh per step, never colliding with a
#: neighbouring sample's seed for datasets below a billion (virtual) samples
STEP_STRIDE = 1_000_000_000


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int = 0,
    total_steps: int = 150_000,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``
    at ``total_steps`` (held there afterwards). Step it every optimiser step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Stage1Restoration(pl.LightningModule):
    """Trains and runs a stage-1 restoration network (DiffBIR's SwinIR).

    Args:
        net: image-to-image network, ``[B, 3, H, W]`` in [0, 1] -> same size (e.g.
            :class:`bir.nets.swinir.SwinIR`).
        degradation: pipeline ``(gt, generators) -> DegradationResult`` (docs/contracts.md) used
            for training batches and for validation batches without ``lq``; None for predict only.
        optimizer: partial optimiser, called with the trainable parameters.
        scheduler: partial LR scheduler (called with the optimiser, stepped every optimiser step)
            or None for a constant learning rate (DiffBIR).
        loss_reduction: reduction of the MSE loss ("sum" as DiffBIR, or "mean").
        seed: seed of the per-sample degradation generators.
        val_crop_border: border pixels ignored by validation PSNR/SSIM.
        log_images_every_n_steps: training image grids (LQ | restored | GT) every N steps (0: never).
        lpips_weights: torchvision AlexNet backbone file for validation LPIPS; None skips LPIPS.
        tile_size: predict images larger than this in overlapping tiles (input pixels).
        tile_overlap: overlap between predict tiles.
        tile_weight: tile blending weights, "gaussian" or "linear".
    """

    def __init__(
        self,
        net: nn.Module,
        degradation: nn.Module | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        loss_reduction: str = "sum",
        seed: int = 0,
        val_crop_border: int = 0,
        log_images_every_n_steps: int = 1000,
        lpips_weights: str | None = None,
        tile_size: int = 512,
        tile_overlap: int = 256,
        tile_weight: str = "gaussian",
    ):
        super().__init__()
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        save_plain_hyperparameters(self, ignore=["net", "degradation", "optimizer", "scheduler"])
        self.net = net
        self.degradation = degradation
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self._warned_lpips = False

    # ------------------------------------------------------------------------------------ setup
    @classmethod
    def for_inference(
        cls,
        net: nn.Module,
        ckpt_path: str | os.PathLike | None,
        tile_size: int = 512,
        tile_overlap: int = 256,
        tile_weight: str = "gaussian",
        config_key: str | None = "ckpt",
        net_key: str | None = "method.net",
    ) -> Stage1Restoration:
        """A predict-only module with ``net`` loaded strictly from ``ckpt_path``.

        The checkpoint may be one of ours (Lightning, network under ``net.``; with the EMA
        callback its ``state_dict`` already holds the averaged weights) or DiffBIR's released
        bare SwinIR state dict. ``net_key`` is the config node that builds ``net`` (named in the
        error, with the overrides that fit, when the checkpoint holds another network).
        """
        if ckpt_path is None:  # load_net keeps the weights for None: a restore needs a file
            raise missing_checkpoint_error(None, "stage-1 restoration", config_key=config_key)
        load_net(net, ckpt_path, config_key=config_key, net_key=net_key)
        module = cls(net, tile_size=tile_size, tile_overlap=tile_overlap, tile_weight=tile_weight)
        return module.eval()

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("Stage1Restoration needs an optimizer to train")
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ---------------------------------------------------------------------------- degradation
    def degrade(
        self, gt: torch.Tensor, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the degradation pipeline under no_grad; returns (lq, gt) (gt may be sharpened)."""
        if self.degradation is None:
            raise ValueError("batch has no 'lq' and no degradation is configured")
        with torch.no_grad():
            result = self.degradation(gt, generators)
        return result.lq.contiguous(), result.gt.contiguous()

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Make ``lq`` on the device: fresh per-step draws when training, fixed per index otherwise."""
        if not isinstance(batch, dict) or "gt" not in batch:
            return batch
        training = self._trainer is not None and self._trainer.training
        if training and self.degradation is not None:
            # the same sample at a later step gets new, reproducible degradation parameters
            seeds = batch["index"].long().cpu() + self.global_step * STEP_STRIDE
            gens = sample_generators(
                self.hparams.seed, seeds, gt_device(batch), TRAIN_DEGRADATION_STREAM
            )
            batch["lq"], batch["gt"] = self.degrade(batch["gt"], gens)
        elif "lq" not in batch:
            gens = sample_generators(
                self.hparams.seed, batch["index"], gt_device(batch), VAL_DEGRADATION_STREAM
            )
            batch["lq"], batch["gt"] = self.degrade(batch["gt"], gens)
        return batch

    # --------------------------------------------------------------------------------- train
    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> restored [B, 3, H, W] (unclamped)."""
        return self.net(lq)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lq, gt = batch["lq"], batch["gt"]
        pred = self.net(lq)
        loss = F.mse_loss(pred.float(), gt.float(), reduction=self.hparams.loss_reduction)
        self.log("train/loss", loss, prog_bar=True, batch_size=gt.shape[0])
        n = self.hparams.log_images_every_n_steps
        if n and self.global_step % n == 0:
            self.log_grid("train/images", lq, pred, gt)
        return loss

    # ------------------------------------------------------------------------------ evaluate
    @torch.no_grad()
    def restore(self, lq: torch.Tensor) -> torch.Tensor:
        """Restore [B, 3, H, W] in [0, 1] -> [B, 3, H, W] in [0, 1]; tiled above ``tile_size``."""
        tile = self.hparams.tile_size
        if max(lq.shape[-2:]) > tile:
            scale = getattr(self.net, "scale", 1)
            out = tiled_apply(
                self.net,
                lq,
                tile,
                self.hparams.tile_overlap,
                scale=scale,
                weight=self.hparams.tile_weight,
            )
        else:
            out = self.net(lq)
        return out.float().clamp(0, 1)

    def _evaluate(self, batch: dict, batch_idx: int, prefix: str) -> dict[str, torch.Tensor]:
        from bir import metrics

        lq, gt = batch["lq"], batch["gt"]
        out = self.restore(lq)
        border = self.hparams.val_crop_border
        values = {
            "psnr": metrics.psnr(out, gt, crop_border=border),
            "ssim": metrics.ssim(out, gt, crop_border=border),
            "psnr_y": metrics.psnr(out, gt, crop_border=border, y_channel=True),
            "ssim_y": metrics.ssim(out, gt, crop_border=border, y_channel=True),
        }
        if lq.shape == gt.shape:  # the degraded input's PSNR, the bar the restoration must beat
            values["lq_psnr"] = metrics.psnr(lq.float().clamp(0, 1), gt, crop_border=border)
        if self.hparams.lpips_weights:
            weights = {"lpips_alex": self.hparams.lpips_weights}
            lpips = metrics.per_image_metric("lpips", weights, config_key="model.lpips_weights")
            values["lpips"] = lpips(out, gt)
        elif not self._warned_lpips:
            rank_zero_warn("LPIPS skipped: set model.lpips_weights to the AlexNet backbone file")
            self._warned_lpips = True
        b = gt.shape[0]
        for name, value in values.items():
            # bir.metrics.summary's policy: the mean over finite values (an identical image's
            # PSNR is inf), weighted by their number, and the number left out beside it
            finite, nonfinite = metrics.split_finite(value.float())
            mean = finite.mean() if finite.numel() else finite.new_zeros(())  # weight 0
            self.log(f"{prefix}/{name}", mean, sync_dist=True, batch_size=finite.numel())
            self.log(
                f"{prefix}/{name}{metrics.NONFINITE_SUFFIX}",
                float(nonfinite),
                sync_dist=True,
                reduce_fx="sum",
                batch_size=b,
            )
        if batch_idx == 0:
            self.log_grid(f"{prefix}/images", lq, out, gt)
        return values

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, batch_idx, "test")

    def predict_step(self, batch: dict, batch_idx: int = 0) -> dict:
        """``{"name", "restored": [B, 3, H, W] in [0, 1]}`` (docs/contracts.md)."""
        return {"name": batch["name"], "restored": self.restore(batch["lq"])}

    # ------------------------------------------------------------------------------- logging
    def log_grid(self, tag: str, lq: torch.Tensor, out: torch.Tensor, gt: torch.Tensor) -> None:
        """Send an (LQ | restored | GT) grid to every attached logger that takes images."""
        if image_loggers(self._trainer):
            log_grid(self._trainer, tag, comparison_grid(lq, out, gt), self.global_step)


def gt_device(batch: dict) -> torch.device:
    """Device of the batch's ground truth."""
    return batch["gt"].device

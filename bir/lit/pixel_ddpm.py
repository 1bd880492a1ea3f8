"""Training an unconditional pixel-space diffusion prior (DDPM / IDDPM / ADM recipe).

Checkpoint layout (what :func:`load_pixel_prior`, the ``prior=...`` configs' target, loads): the
Lightning ``state_dict`` holds the trained network under ``net.*`` and its exponential moving
average under ``ema_net.*`` (plus the scalar buffer ``ema_updates``; the update rule is
:mod:`bir.lit.ema`). The loader prefers ``ema_net.``, so a ``last.ckpt`` of this module is a prior
checkpoint as it stands.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from bir.callbacks.images import log_grid
from bir.diffusion.parameterization import DiffusionModel, convert_output
from bir.diffusion.prior import PixelPrior
from bir.diffusion.samplers import sample_ddpm
from bir.diffusion.schedules import DiffusionSchedule, space_timesteps
from bir.lit.ema import decay_at, ema_copy, update_ema
from bir.lit.hparams import save_plain_hyperparameters
from bir.nets.checkpoints import load_net
from bir.random import rand, randn, sample_generators

log = logging.getLogger(__name__)
Tensor = torch.Tensor

# independent random streams (bir.random) for the draws of this module
_STREAM_T, _STREAM_NOISE, _STREAM_SAMPLE_X, _STREAM_SAMPLE_Z = 11, 12, 13, 14


def load_pixel_prior(
    net: nn.Module,
    ckpt_path: str | None = None,
    schedule: dict | None = None,
    learned_sigma: bool = True,
    image_size: int = 256,
    channels: int = 3,
    checkpoint_what: str = "diffusion prior",
    checkpoint_url: str | None = None,
    checkpoint_key: str = "prior.ckpt_path",
) -> PixelPrior:
    """A :class:`~bir.diffusion.prior.PixelPrior` of ``net`` loaded strictly from ``ckpt_path``
    (``None`` keeps the random initialisation: tests and smoke runs).

    The file may be a released prior (guided-diffusion, DDPM; bare or ``module.``), or a
    checkpoint of :class:`PixelDDPM`, whose EMA net is used. ``checkpoint_what`` /
    ``checkpoint_url`` / ``checkpoint_key`` word the error when the file is missing; the other
    arguments are the prior's.
    """
    load_net(
        net,
        ckpt_path,
        what=checkpoint_what,
        url=checkpoint_url,
        config_key=checkpoint_key,
        net_key="prior.net",
    )
    return PixelPrior(
        net,
        schedule=schedule,
        learned_sigma=learned_sigma,
        image_size=image_size,
        channels=channels,
    )


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension: ``[B, ...] -> [B]``."""
    return x.flatten(1).mean(1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Log-probability (nats) of 8-bit data ``x`` in [-1, 1] under N(mean, exp(log_scale)^2)
    integrated over each pixel's bin of width 2/255, the edge bins extending to +-inf (DDPM
    sec. 3.3, the L_0 decoder). Uses the exact normal CDF (ADM uses a tanh approximation)."""
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1.0 / 255.0)
    lower = inv_std * (x - mean - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X < x + 1/255)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X > x - 1/255)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))


def diffusion_loss_terms(
    raw: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    noise: Tensor,
    schedule: DiffusionSchedule,
    prediction: str = "eps",
    learn_sigma: bool = False,
) -> dict[str, Tensor]:
    """Per-sample loss terms of one denoising step (ADM ``training_losses``).

    Args:
        raw: net output ``[B, C or 2C, H, W]``.
        x0, x_t, noise: ``[B, C, H, W]``, x0 in [-1, 1], ``x_t = q_sample(x0, t, noise)``.
        t: LongTensor[B] timesteps (``schedule`` must be the full, unrespaced schedule).
        prediction: ``eps`` | ``x0`` | ``v`` target.
        learn_sigma: ``raw`` has IDDPM learned-range variance channels.

    Returns:
        ``mse`` [B] (L_simple, DDPM eq. 14 with the chosen target) and, when ``learn_sigma``,
        ``vb`` [B]: the variational bound term L_{t-1} in bits per dimension (KL of the true
        posterior to the model at t > 0, the discretised decoder NLL at t = 0). The mean channels
        are detached in ``vb`` so it only trains the variance (IDDPM sec. 3.1).
    """
    pred, var_values = raw.chunk(2, dim=1) if learn_sigma else (raw, None)
    if prediction == "eps":
        target = noise
    elif prediction == "x0":
        target = x0
    elif prediction == "v":
        target = schedule.v_from_x0_eps(x0, t, noise)
    else:
        raise ValueError(f"prediction must be eps, x0 or v, got {prediction!r}")
    terms = {"mse": mean_flat((target - pred) ** 2)}
    if learn_sigma:
        frozen = torch.cat([pred.detach(), var_values], dim=1)
        out = convert_output(frozen, x_t, t, schedule, prediction, "learned_range", True)
        model_mean = schedule.posterior_mean(out.x0, x_t, t)  # no clipping during training
        true_mean = schedule.posterior_mean(x0, x_t, t)
        true_log_var = schedule.posterior_log_variance(t, x_t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, out.log_variance)) / math.log(
            2.0
        )
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * out.log_variance)
        ) / math.log(2.0)
        terms["vb"] = torch.where(t == 0, nll, kl)
    return terms


class PixelDDPM(pl.LightningModule):
    """Trains an unconditional pixel prior ``net(x_t in [-1, 1], t) -> eps (, variance values)``.

    Batches are dicts with ``gt`` ``[B, C, H, W]`` in [0, 1] and ``index`` (LongTensor[B]); t is
    uniform over the T training steps. Timesteps and noise come from per-sample generators seeded
    by (seed, global step, sample index), so training does not depend on batch composition.

    Args:
        net: the network (ADM ``UNetModel``), outputs C channels, or 2C when ``learn_sigma``.
        schedule: ``kind``, ``T``, ``beta_start``, ``beta_end`` (optional ``zero_terminal_snr``).
        prediction: the target, ``eps`` (ADM), ``x0`` or ``v``.
        learn_sigma: IDDPM hybrid loss L_simple + lambda L_vlb with learned-range variance.
        vlb_weight: lambda of the hybrid loss (IDDPM: 0.001). L_vlb is the sum of T terms, so the
            per-step vb term is weighted by ``vlb_weight * T`` (= 1 for T = 1000, as ADM's
            ``RESCALED_MSE``).
        optimizer: partial ``params -> Optimizer`` (Hydra ``_partial_``); AdamW lr 1e-4 if None.
        ema_decay: EMA rate of the sampling copy (ADM: 0.9999).
        ema_warmup: use ``min(ema_decay, (1 + n) / (10 + n))`` after n updates (ldm's LitEma), so
            short runs do not keep the random initialisation in the EMA.
        sample_every_n_steps: log EMA samples every N optimiser steps (0 disables).
        num_samples: images per sample grid.
        sample_steps: respaced ancestral DDPM steps for the grid (IDDPM ``space_timesteps``).
        image_size: sample resolution.
        channels: image channels.
        seed: base seed of the per-sample generators.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: dict | None = None,
        prediction: str = "eps",
        learn_sigma: bool = False,
        vlb_weight: float = 0.001,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        sample_every_n_steps: int = 1000,
        num_samples: int = 8,
        sample_steps: int = 50,
        image_size: int = 64,
        channels: int = 3,
        seed: int = 0,
    ):
        super().__init__()
        save_plain_hyperparameters(self, ignore=["net", "optimizer"])
        self.net = net
        self.ema_net = ema_copy(net)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        sched = {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}
        sched.update(dict(schedule or {}))
        self.schedule = DiffusionSchedule.from_config(**sched)
        self.num_timesteps = len(self.schedule)
        self.prediction, self.learn_sigma, self.vlb_weight = prediction, learn_sigma, vlb_weight
        self.optimizer_factory = optimizer
        self.ema_decay, self.ema_warmup = ema_decay, ema_warmup
        self.sample_every_n_steps, self.num_samples = sample_every_n_steps, num_samples
        self.sample_steps, self.image_size, self.channels = sample_steps, image_size, channels
        self.seed = seed

    # --- training -----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> PixelDDPM:
        super().train(mode)
        self.ema_net.eval()  # the EMA copy never runs in training mode (dropout off)
        return self

    def draw_t_and_noise(
        self, index: Tensor, step: int, shape: tuple[int, ...]
    ) -> tuple[Tensor, Tensor]:
        """Uniform timesteps LongTensor[B] and noise ``[B, *shape]`` for the samples ``index`` at
        optimiser step ``step`` (a validation pass uses step -1: the same draws every time)."""
        seed = self.seed * 7_919_993 + step + 1
        gens_t = sample_generators(seed, index, self.device, _STREAM_T)
        gens_noise = sample_generators(seed, index, self.device, _STREAM_NOISE)
        u = rand((), gens_t, device=self.device, dtype=torch.float64)
        t = (u * self.num_timesteps).long().clamp(max=self.num_timesteps - 1)
        return t, randn(shape, gens_noise, device=self.device)

    def loss_terms(self, net: nn.Module, batch: dict, step: int) -> dict[str, Tensor]:
        """Batch-mean ``loss``, ``mse`` and (learn_sigma) ``vb`` of ``net`` on ``batch``."""
        x0 = batch["gt"] * 2 - 1
        t, noise = self.draw_t_and_noise(batch["index"], step, tuple(x0.shape[1:]))
        x_t = self.schedule.q_sample(x0, t, noise)
        terms = diffusion_loss_terms(
            net(x_t, t), x0, x_t, t, noise, self.schedule, self.prediction, self.learn_sigma
        )
        terms = {k: v.mean() for k, v in terms.items()}
        terms["loss"] = terms["mse"]
        if self.learn_sigma:
            terms["loss"] = terms["mse"] + self.vlb_weight * self.num_timesteps * terms["vb"]
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms = self.loss_terms(self.net, batch, self.global_step)
        bs = batch["gt"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, prog_bar=True, batch_size=bs)
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        terms = self.loss_terms(self.ema_net, batch, step=-1)
        bs = batch["gt"].shape[0]
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=bs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.net.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        return self.optimizer_factory(params)

    # --- EMA ----------------------------------------------------------------------------------
    @torch.no_grad()
    def update_ema(self) -> float:
        """One :func:`bir.lit.ema.update_ema` step of ``ema_net``; returns the decay d used."""
        decay = decay_at(self.ema_decay, int(self.ema_updates), self.ema_warmup)
        update_ema(self.ema_net, self.net, decay)
        self.ema_updates += 1
        return decay

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self.update_ema()
        n = self.sample_every_n_steps
        if n and self.global_step % n == 0 and self.trainer.is_global_zero:
            self.log_samples(self.sample(self.num_samples, self.sample_steps))

    # --- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, num_samples: int, steps: int | str = 50, use_ema: bool = True) -> Tensor:
        """Ancestral DDPM samples ``[N, C, H, W]`` in [0, 1] with ``steps`` respaced steps.

        Sample k always starts from the same x_T (seeded by k), so grids show progress."""
        net = self.ema_net if use_ema else self.net
        was_training = net.training
        net.eval()
        schedule = DiffusionSchedule(
            self.schedule.betas, space_timesteps(self.num_timesteps, steps)
        )
        model = DiffusionModel(net, schedule, self.prediction, self.learn_sigma)
        indices = list(range(num_samples))
        shape = (self.channels, self.image_size, self.image_size)
        x_T = randn(
            shape, sample_generators(self.seed, indices, self.device, _STREAM_SAMPLE_X), self.device
        )
        gens = sample_generators(self.seed, indices, self.device, _STREAM_SAMPLE_Z)
        x0 = sample_ddpm(model, x_T, schedule, gens)
        net.train(was_training)
        return ((x0 + 1) / 2).clamp(0, 1)

    def log_samples(self, images: Tensor) -> None:
        """Send a grid of ``images`` ([N, C, H, W] in [0, 1]) to every logger that takes images
        (:func:`bir.callbacks.images.log_grid`); with none, save a PNG under
        ``<default_root_dir>/samples/``."""
        from torchvision.utils import make_grid

        grid = make_grid(
            images.float().cpu(), nrow=int(math.ceil(math.sqrt(len(images)))), padding=2
        )
        if self._trainer is None:
            return
        png = Path(self.trainer.default_root_dir) / "samples" / f"step{self.global_step:07d}.png"
        log_grid(self.trainer, "train/samples", grid, self.global_step, png_path=png)

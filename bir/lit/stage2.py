"""DiffBIR stage 2: train LAControlNet on frozen Stable Diffusion (Lin et al. 2024, Sec. 3.2).

Data flow (docs/design.md, "Train stage 2"): GT crops in [0, 1] -> degradation (per-sample
generators) -> frozen stage-1 SwinIR -> VAE posterior mode x 0.18215 = condition latent ``c``;
``z_0`` = VAE(GT) sample x 0.18215; ``t ~ U{0..T-1}``, ``z_t = sqrt(abar_t) z_0 + sqrt(1-abar_t) eps``;
the ControlLDM predicts eps (or v) from ``(z_t, t, text, c)``; loss = MSE (mean). Only the
ControlNet is optimised (AdamW, lr 1e-4); an EMA copy of the ControlNet alone (:mod:`bir.lit.ema`)
is kept when ``ema_decay`` is set. Checkpoints hold the ControlNet (and its EMA) only: the frozen
SD and stage-1 weights come from their own files, so a 1.4 GB file instead of 5 GB.

Randomness: every draw (degradation, timestep, noise, VAE sample, prompt dropout, condition
noise augmentation) comes from per-sample generators seeded by (seed, sample index, step), so a
run does not depend on the batch split across devices.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from bir.callbacks.images import comparison_grid, image_loggers, log_grid
from bir.diffusion.schedules import DiffusionSchedule
from bir.lit.ema import ema_copy, update_ema
from bir.lit.hparams import save_plain_hyperparameters
from bir.lit.stage1 import STEP_STRIDE
from bir.nets.checkpoints import load_net
from bir.nets.controlldm import ControlLDM
from bir.random import rand, randn, sample_generators

Tensor = torch.Tensor

#: bir.random streams of the independent draws of a training step (evaluation: + EVAL_STREAM_OFFSET)
STREAMS = {"degradation": 21, "timestep": 22, "noise": 23, "vae": 24, "prompt": 25, "cond_aug": 26}
EVAL_STREAM_OFFSET = 10
#: state-dict prefixes of frozen parts, left out of our checkpoints
FROZEN_PREFIXES = ("model.unet.", "model.vae.", "model.clip.", "model.cond_encoder.", "stage1.")


def load_stage1(net: nn.Module, ckpt_path: str | None, config_key: str) -> nn.Module:
    """Load a stage-1 network strictly (bir stage-1 checkpoint, DiffBIR SwinIR or v1 full
    checkpoint, BSRNet, SCUNet: :func:`bir.nets.checkpoints.load_net`) and freeze it;
    ``ckpt_path=None`` keeps its weights (tests). ``config_key`` is the key of the path
    (``method.stage1_ckpt_path``); its node's ``stage1`` builds the net."""
    net_key = config_key.rpartition(".")[0] + ".stage1"
    load_net(net, ckpt_path, config_key=config_key, net_key=net_key)
    net.requires_grad_(False)
    return net.eval()


class Stage2ControlLDM(pl.LightningModule):
    """Trains the ControlNet of a :class:`~bir.nets.controlldm.ControlLDM`.

    Args:
        controlldm: the ControlLDM (frozen SD + ControlNet initialised from the UNet or loaded).
        stage1: frozen stage-1 network, ``[B, 3, H, W]`` in [0, 1] -> same size.
        degradation: pipeline ``(gt, generators) -> DegradationResult`` (docs/contracts.md).
        stage1_ckpt_path: weights of ``stage1`` (None keeps them: tests).
        optimizer: partial optimiser called with the ControlNet's parameters (AdamW lr 1e-4).
        schedule: training schedule: ``kind``, ``T``, ``beta_start``, ``beta_end``,
            ``zero_terminal_snr`` (SD 2.1: scaled_linear, 1000, 0.00085, 0.012, False).
        prediction: ``eps`` (SD 2.1-base) or ``v`` (SD 2.1-768 / zero-SNR variants).
        prompt: the training prompt when the batch has no ``prompt`` list (DiffBIR: "").
        prompt_dropout: probability of replacing a sample's prompt with "" (for CFG).
        cond_noise_aug: condition noise augmentation: ``c`` is diffused to a random timestep in
            ``[0, cond_noise_aug)`` (0 disables).
        ema_decay: EMA decay of the ControlNet (None: no EMA).
        gradient_checkpointing: checkpoint UNet/ControlNet blocks (less memory, ~30% slower).
        seed: base seed of the per-sample generators.
        log_images_every_n_steps: (LQ | stage 1 | decoded condition | GT) grids (0: never).
    """

    def __init__(
        self,
        controlldm: ControlLDM,
        stage1: nn.Module,
        degradation: nn.Module | None = None,
        stage1_ckpt_path: str | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        schedule: dict | None = None,
        prediction: str = "eps",
        prompt: str = "",
        prompt_dropout: float = 0.0,
        cond_noise_aug: int = 0,
        ema_decay: float | None = None,
        gradient_checkpointing: bool = False,
        seed: int = 0,
        log_images_every_n_steps: int = 0,
    ):
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be eps or v, got {prediction!r}")
        save_plain_hyperparameters(
            self, ignore=["controlldm", "stage1", "degradation", "optimizer"]
        )
        self.model = controlldm
        self.stage1 = load_stage1(stage1, stage1_ckpt_path, "model.stage1_ckpt_path")
        self.degradation = degradation
        self.optimizer_factory = optimizer
        sched = {"kind": "scaled_linear", "T": 1000, "beta_start": 0.00085, "beta_end": 0.012}
        sched.update(dict(schedule or {}))
        self.schedule = DiffusionSchedule.from_config(**sched)
        self.ema_controlnet: nn.Module | None = None
        if ema_decay is not None:
            self.ema_controlnet = ema_copy(self.model.controlnet)
        self.model.set_gradient_checkpointing(gradient_checkpointing)
        # frozen parts are not saved (see on_save_checkpoint), so loading is not strict
        self.strict_loading = False

    # ------------------------------------------------------------------------------- setup
    def train(self, mode: bool = True) -> Stage2ControlLDM:
        super().train(mode)
        self.stage1.eval()
        self.model.train(mode)  # keeps the frozen SD parts in eval
        if self.ema_controlnet is not None:
            self.ema_controlnet.eval()
        return self

    def configure_optimizers(self):
        params = [p for p in self.model.controlnet.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            return torch.optim.AdamW(params, lr=1e-4)
        return self.optimizer_factory(params)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # loading is non-strict because frozen weights are left out; the trained ones must be there
        state = checkpoint["state_dict"]
        own = [
            k for k in self.state_dict() if k.startswith(("model.controlnet.", "ema_controlnet."))
        ]
        missing = [k for k in own if k not in state]
        if missing:
            raise KeyError(f"checkpoint lacks trained ControlNet weights, e.g. {missing[:5]}")

    def control_state_dict(self, ema: bool = True) -> dict[str, Tensor]:
        """Control-only state dict in DiffBIR's release layout (``v2.pth``), EMA if available."""
        net = (
            self.ema_controlnet
            if ema and self.ema_controlnet is not None
            else self.model.controlnet
        )
        return {k: v.detach().clone() for k, v in net.state_dict().items()}

    # --------------------------------------------------------------------------- randomness
    def _generators(self, batch: dict, stream: str, training: bool) -> list[torch.Generator]:
        index = batch["index"].long().cpu()
        # training: fresh draws every step; evaluation: fixed per sample, from other streams
        if training:
            seeds, stream_id = index + self.global_step * STEP_STRIDE, STREAMS[stream]
        else:
            seeds, stream_id = index, STREAMS[stream] + EVAL_STREAM_OFFSET
        return sample_generators(self.hparams.seed, seeds, batch["gt"].device, stream_id)

    # ------------------------------------------------------------------------------ inputs
    @torch.no_grad()
    def prepare(self, batch: dict, training: bool) -> dict[str, Tensor]:
        """Condition, clean latent and text context of a batch (all frozen parts, no grad).

        Returns ``lq``, ``clean`` (stage-1 output in [0, 1]), ``gt``, ``cond`` and ``z0``
        (scaled latents ``[B, 4, H/8, W/8]``) and ``context`` ``[B, 77, C]``.
        """
        gt = batch["gt"]
        if "lq" in batch:
            lq = batch["lq"]
        else:
            if self.degradation is None:
                raise ValueError("batch has no 'lq' and no degradation is configured")
            result = self.degradation(gt, self._generators(batch, "degradation", training))
            lq, gt = result.lq, result.gt
        if lq.shape[-2:] != gt.shape[-2:]:  # the stage-1 SwinIR restores at the GT size
            lq = F.interpolate(lq, size=gt.shape[-2:], mode="bicubic").clamp(0, 1)
        clean = self.stage1(lq).clamp(0, 1)
        cond = self.model.encode_condition(clean)
        z0 = self.model.vae_encode(gt, generators=self._generators(batch, "vae", training))
        b = gt.shape[0]
        prompts = list(batch.get("prompt", [self.hparams.prompt] * b))
        p = self.hparams.prompt_dropout
        if p > 0:
            u = rand((), self._generators(batch, "prompt", training), device=gt.device)
            prompts = ["" if float(ui) < p else txt for ui, txt in zip(u, prompts)]
        context = self.model.encode_text(prompts)
        return {"lq": lq, "clean": clean, "gt": gt, "cond": cond, "z0": z0, "context": context}

    def diffusion_loss(self, batch: dict, training: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """MSE between the ControlLDM output and the eps (or v) target at random t."""
        inputs = self.prepare(batch, training)
        z0, cond = inputs["z0"], inputs["cond"]
        device = z0.device
        T = len(self.schedule)
        u = rand((), self._generators(batch, "timestep", training), device=device)
        i = (u * T).long().clamp(max=T - 1)
        noise = randn(z0.shape[1:], self._generators(batch, "noise", training), device=device)
        z_t = self.schedule.q_sample(z0, i, noise)
        if self.hparams.cond_noise_aug > 0:
            gens = self._generators(batch, "cond_aug", training)
            u_aug = rand((), gens, device=device)
            i_aug = (u_aug * self.hparams.cond_noise_aug).long()
            cond = self.schedule.q_sample(cond, i_aug, randn(cond.shape[1:], gens, device=device))
        pred = self.model(z_t, self.schedule.t(i), inputs["context"], cond)
        target = (
            noise if self.hparams.prediction == "eps" else self.schedule.v_from_x0_eps(z0, i, noise)
        )
        loss = F.mse_loss(pred.float(), target.float())
        inputs["t"] = self.schedule.t(i)
        return loss, inputs

    # ------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, inputs = self.diffusion_loss(batch, training=True)
        b = inputs["z0"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        n = self.hparams.log_images_every_n_steps
        if n and self.global_step % n == 0:
            self.log_grid("train/images", inputs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, inputs = self.diffusion_loss(batch, training=False)
        self.log("val/loss", loss, sync_dist=True, batch_size=inputs["z0"].shape[0])
        if batch_idx == 0:
            self.log_grid("val/images", inputs)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        # Lightning calls this once per optimiser step (after gradient accumulation): update the
        # EMA right after the weights change
        super().optimizer_step(*args, **kwargs)
        if self.ema_controlnet is not None:
            self.update_ema()

    def update_ema(self) -> None:
        """``ema <- decay * ema + (1 - decay) * controlnet`` (:func:`bir.lit.ema.update_ema`)."""
        update_ema(self.ema_controlnet, self.model.controlnet, float(self.hparams.ema_decay))

    # ----------------------------------------------------------------------------- logging
    def log_grid(self, tag: str, inputs: dict[str, Tensor]) -> None:
        """(LQ | stage 1 | decoded condition | GT) grid to loggers that take images."""
        if not image_loggers(self._trainer):
            return
        with torch.no_grad():
            decoded = (self.model.vae_decode(inputs["cond"][:4]) + 1) / 2
        grid = comparison_grid(inputs["lq"], inputs["clean"], decoded, inputs["gt"])
        log_grid(self._trainer, tag, grid, self.global_step)

"""DiffBIR two-stage inference (Lin et al. 2024): stage-1 restoration, then latent diffusion with
LAControlNet, restoration guidance and colour fix.

For each batch of degraded images ``lq`` in [0, 1]:

1. optional bicubic upscaling by ``upscale`` (super-resolution);
2. stage 1 (SwinIR) removes the degradation, in overlapping tiles above ``stage1_tile_size``;
3. the stage-1 result is padded (replicate) to a multiple of the UNet's latent grid and encoded:
   condition latent ``c`` (VAE posterior mode x 0.18215);
4. sampling from ``z_T ~ N(0, I)`` (per-sample generators) with spaced DDPM (default, 50 steps),
   DDIM or DPM-Solver++(2M); classifier-free guidance
   ``out = out(neg) + cfg_scale * (out(pos) - out(neg))``; ControlNet residuals scaled by
   ``control_strength``; optional latent image guidance (:mod:`bir.diffusion.guidance`); above
   ``diffusion_tile_size`` the denoiser runs on overlapping latent tiles blended with Gaussian
   weights at every step;
5. VAE decoding (tiled above ``vae_tile_size``), cropping, colour fix against the stage-1 result
   (wavelet default, AdaIN, none), clamping to [0, 1].

``predict_step`` returns ``name``, ``restored`` and ``extras`` (the parameters used per image);
with guidance, ``loss_curve`` holds the guidance loss at every guided step.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from bir.colorfix import color_fix
from bir.diffusion.guidance import LatentImageGuidance
from bir.diffusion.parameterization import ModelOutput, convert_output
from bir.diffusion.samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m
from bir.diffusion.schedules import (
    DiffusionSchedule,
    make_betas,
    rescale_zero_terminal_snr,
    space_timesteps,
)
from bir.lit.hparams import save_plain_hyperparameters
from bir.lit.stage2 import load_stage1
from bir.nets.controlldm import ControlLDM
from bir.random import randn, sample_generators
from bir.tiling import tiled_apply

Tensor = torch.Tensor

#: bir.random stream of the initial latents
NOISE_STREAM = 31
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
#: DiffBIR's default negative prompt
DEFAULT_NEGATIVE = "low quality, blurry, low-resolution, noisy, unsharp, weird textures"


class DiffBIR(pl.LightningModule):
    """Two-stage blind restoration (predict only).

    Args:
        controlldm: SD + ControlNet with weights loaded (:class:`~bir.nets.controlldm.ControlLDM`).
        stage1: stage-1 network ``[B, 3, H, W]`` in [0, 1] -> same size (SwinIR).
        stage1_ckpt_path: its weights (bir stage-1, DiffBIR SwinIR or v1 full checkpoint);
            None keeps the given weights (tests).
        schedule: SD training schedule (``kind``, ``T``, ``beta_start``, ``beta_end``,
            ``zero_terminal_snr``).
        prediction: what the UNet predicts: ``eps`` (SD 2.1-base) or ``v``.
        sampler: ``ddpm`` (spaced ancestral, as the paper), ``ddim`` or ``dpmpp_2m``.
        steps: sampling steps (respacing of the 1000 training steps).
        eta: DDIM stochasticity.
        pos_prompt / neg_prompt: prompts of the conditional / unconditional branch of CFG.
        cfg_scale: classifier-free guidance scale (1 = no CFG: only the positive branch runs).
        control_strength: multiplier of all 13 control residuals.
        guidance: latent image guidance settings (``scale``, ``t_start``, ``t_stop``, ``space``,
            ``loss``, ``repeats``; see :class:`~bir.diffusion.guidance.LatentImageGuidance`;
            ``scale`` is DiffBIR's ``g_scale``, x3000 internally) or None.
        color_fix: ``wavelet`` | ``adain`` | ``none``.
        upscale: bicubic upscaling of the input before stage 1 (SR factor; 1 = restoration).
        stage1_tile_size / stage1_tile_overlap: stage-1 tiles (pixels).
        diffusion_tile_size / diffusion_tile_overlap: latent tiles of the denoiser, in pixels
            (divided by 8); None disables.
        vae_tile_size / vae_tile_overlap: VAE encode/decode tiles in pixels; None disables.
        seed: base seed of the per-image initial latents.
    """

    def __init__(
        self,
        controlldm: ControlLDM,
        stage1: nn.Module,
        stage1_ckpt_path: str | None = None,
        schedule: dict | None = None,
        prediction: str = "eps",
        sampler: str = "ddpm",
        steps: int = 50,
        eta: float = 0.0,
        pos_prompt: str = "",
        neg_prompt: str = DEFAULT_NEGATIVE,
        cfg_scale: float = 1.0,
        control_strength: float = 1.0,
        guidance: dict | None = None,
        color_fix: str = "wavelet",
        upscale: float = 1.0,
        stage1_tile_size: int = 512,
        stage1_tile_overlap: int = 256,
        diffusion_tile_size: int | None = 512,
        diffusion_tile_overlap: int = 256,
        vae_tile_size: int | None = 1024,
        vae_tile_overlap: int = 128,
        seed: int = 0,
    ):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be eps or v, got {prediction!r}")
        if color_fix not in ("wavelet", "adain", "none"):
            raise ValueError(f"color_fix must be wavelet, adain or none, got {color_fix!r}")
        save_plain_hyperparameters(self, ignore=["controlldm", "stage1"])
        self.controlldm = controlldm.eval()
        self.controlldm.requires_grad_(False)
        self.stage1 = load_stage1(stage1, stage1_ckpt_path, "method.stage1_ckpt_path")
        sched = {"kind": "scaled_linear", "T": 1000, "beta_start": 0.00085, "beta_end": 0.012}
        sched.update(dict(schedule or {}))
        betas = make_betas(sched["kind"], sched["T"], sched["beta_start"], sched["beta_end"])
        if sched.get("zero_terminal_snr", False):
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.guidance_cfg = dict(guidance) if guidance else None

    def train(self, mode: bool = True) -> DiffBIR:
        return super().train(False)  # inference only

    # ------------------------------------------------------------------------------- parts
    def sampling_schedule(self) -> DiffusionSchedule:
        """The respaced schedule of the chosen sampler (DDIM: stride spacing; others: even)."""
        T, steps = len(self.betas), self.hparams.steps
        spec = f"ddim{steps}" if self.hparams.sampler == "ddim" else steps
        return DiffusionSchedule(self.betas, space_timesteps(T, spec) if steps < T else None)

    @property
    def pad_multiple(self) -> int:
        """Pixel multiple the stage-1 result is padded to: VAE factor x UNet downsampling."""
        levels = len(self.controlldm.unet.spec.channel_mult) - 1
        return self.latent_factor * 2**levels

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel of the VAE (8 for SD)."""
        return int(getattr(self.controlldm.vae, "downsample_factor", 8))

    @torch.no_grad()
    def run_stage1(self, lq: Tensor) -> Tensor:
        """Stage-1 restoration ``[B, 3, H, W]`` in [0, 1] (tiled above ``stage1_tile_size``)."""
        tile = self.hparams.stage1_tile_size
        if tile and max(lq.shape[-2:]) > tile:
            out = tiled_apply(self.stage1, lq, tile, self.hparams.stage1_tile_overlap)
        else:
            out = self.stage1(lq)
        return out.float().clamp(0, 1)

    def denoiser(self, context: Tensor, uncond_context: Tensor | None, cond: Tensor):
        """``(z_t, t) -> raw output`` with CFG and, for large latents, Gaussian-blended tiles."""
        cfg = self.hparams.cfg_scale
        net = self.controlldm

        def raw(z_t: Tensor, t: Tensor, c_img: Tensor) -> Tensor:
            b = z_t.shape[0]
            if uncond_context is None or cfg == 1.0:
                return net(z_t, t, context[:b], c_img)
            out = net(
                torch.cat([z_t, z_t]),
                torch.cat([t, t]),
                torch.cat([context, uncond_context]),
                torch.cat([c_img, c_img]),
            )
            pos, neg = out.chunk(2)
            return neg + cfg * (pos - neg)

        tile = self.hparams.diffusion_tile_size
        if tile is None or max(cond.shape[-2:]) * self.latent_factor <= tile:
            return lambda z_t, t: raw(z_t, t, cond)
        latent_tile = tile // self.latent_factor
        latent_overlap = self.hparams.diffusion_tile_overlap // self.latent_factor
        c = cond.shape[1]

        def tiled(z_t: Tensor, t: Tensor) -> Tensor:
            stacked = torch.cat([z_t, cond], dim=1)  # tile z_t and the condition together
            return tiled_apply(
                lambda s: raw(s[:, : z_t.shape[1]], t, s[:, z_t.shape[1] : z_t.shape[1] + c]),
                stacked,
                latent_tile,
                latent_overlap,
            )

        return tiled

    def vae_tiles(self) -> tuple[int | None, int, int | None, int]:
        """(encode tile px, overlap px, decode tile latent px, overlap latent px)."""
        tile, overlap = self.hparams.vae_tile_size, self.hparams.vae_tile_overlap
        if tile is None:
            return None, 0, None, 0
        f = self.latent_factor
        return tile, overlap, tile // f, overlap // f

    # ------------------------------------------------------------------------------ restore
    @torch.no_grad()
    def restore(self, lq: Tensor, index: Tensor) -> dict:
        """Full pipeline for ``lq`` ``[B, 3, h, w]`` in [0, 1] and global sample indices.

        Returns ``restored`` and ``stage1`` (``[B, 3, s*h, s*w]`` in [0, 1], s = upscale), the
        sampled and condition latents ``latent`` / ``cond`` (of the padded image) and, with
        guidance, ``loss_curve`` ``[B, guided steps]``.
        """
        hp = self.hparams
        if hp.upscale != 1:
            lq = F.interpolate(lq, scale_factor=hp.upscale, mode="bicubic").clamp(0, 1)
        clean = self.run_stage1(lq)
        h, w = clean.shape[-2:]
        m = self.pad_multiple
        padded = F.pad(clean, (0, (-w) % m, 0, (-h) % m), mode="replicate")
        enc_tile, enc_overlap, dec_tile, dec_overlap = self.vae_tiles()
        cond = self.controlldm.encode_condition(padded, enc_tile, enc_overlap)

        b = lq.shape[0]
        net = self.controlldm
        net.set_control_strength(hp.control_strength)
        context = net.encode_text([hp.pos_prompt] * b)
        uncond = net.encode_text([hp.neg_prompt] * b) if hp.cfg_scale != 1.0 else None
        schedule = self.sampling_schedule()
        denoise = self.denoiser(context, uncond, cond)

        def model(z_t: Tensor, i: Tensor) -> ModelOutput:
            raw = denoise(z_t, schedule.t(i))
            return convert_output(raw, z_t, i, schedule, hp.prediction, "fixed_small")

        guidance = None
        if self.guidance_cfg and float(self.guidance_cfg.get("scale", 0)) != 0:
            guidance = LatentImageGuidance(
                **self.guidance_cfg,
                schedule=schedule,
                decode=lambda z: net.vae_decode(z, dec_tile, dec_overlap),
            )
            # v1 checkpoints encode the condition with their own encoder; the target is the SD VAE's
            target = (
                cond
                if net.cond_encoder is None
                else net.vae_encode(padded, None, enc_tile, enc_overlap)
            )
            guidance.set_target(padded, target)

        gens = sample_generators(hp.seed, index, lq.device, NOISE_STREAM)
        z_T = randn(cond.shape[1:], gens, device=lq.device, dtype=cond.dtype)
        if hp.sampler == "ddpm":
            z_0 = sample_ddpm(model, z_T, schedule, gens, guidance=guidance, clip_x0=False)
        else:
            guided = guidance.wrap_model(model) if guidance is not None else model
            if hp.sampler == "ddim":
                z_0 = sample_ddim(guided, z_T, schedule, eta=hp.eta, generators=gens, clip_x0=False)
            else:
                z_0 = sample_dpmpp_2m(guided, z_T, schedule)

        image = (net.vae_decode(z_0, dec_tile, dec_overlap).float() + 1) / 2
        image = image[..., :h, :w]
        restored = color_fix(image, clean, hp.color_fix).clamp(0, 1)
        out = {"restored": restored, "stage1": clean, "latent": z_0, "cond": cond}
        if guidance is not None and guidance.losses:
            out["loss_curve"] = torch.stack(guidance.losses, dim=1).float()
        return out

    def extras(self, batch_size: int) -> dict:
        """The parameters used for every image (written to the per-image records)."""
        hp = self.hparams
        g = self.guidance_cfg or {}
        return {
            "sampler": hp.sampler,
            "steps": hp.steps,
            "cfg_scale": hp.cfg_scale,
            "pos_prompt": hp.pos_prompt,
            "neg_prompt": hp.neg_prompt if hp.cfg_scale != 1.0 else "",
            "control_strength": hp.control_strength,
            "guidance_scale": float(g.get("scale", 0.0)),
            "guidance_space": g.get("space", "latent"),
            "guidance_loss": g.get("loss", "mse"),
            "guidance_t_start": int(g.get("t_start", 1001)),
            "guidance_t_stop": int(g.get("t_stop", -1)),
            "guidance_repeats": int(g.get("repeats", 1)),
            "color_fix": hp.color_fix,
            "upscale": hp.upscale,
            "seed": hp.seed,
        }

    def predict_step(self, batch: dict, batch_idx: int = 0) -> dict:
        """``{"name", "restored" [B, 3, H, W] in [0, 1], "extras"[, "loss_curve"]}``."""
        lq = batch["lq"]
        index = batch.get("index", torch.arange(lq.shape[0]))
        # Lightning predicts under inference mode, whose tensors cannot enter autograd; latent
        # image guidance differentiates the loss w.r.t. x0, so leave it and work on a copy.
        with torch.inference_mode(False):
            result = self.restore(lq.clone(), index.clone())
        out = {
            "name": batch["name"],
            "restored": result["restored"],
            "extras": self.extras(lq.shape[0]),
        }
        if "loss_curve" in result:
            out["loss_curve"] = result["loss_curve"]
        return out

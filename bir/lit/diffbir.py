"""DiffBIR two-stage inference (Lin et al. 2024): stage-1 restoration, then latent diffusion with
LAControlNet, restoration guidance and colour fix.

For each batch of degraded images ``lq`` in [0, 1], with ``pipeline="bir"`` (the default):

1. optional bicubic upscaling by ``upscale`` (super-resolution);
2. stage 1 (a same-size network: SwinIR or SCUNet) removes the degradation, in overlapping
   tiles above ``stage1_tile_size``;
3. the stage-1 result is padded (replicate) to a multiple of the UNet's latent grid and encoded:
   condition latent ``c`` (VAE posterior mode x 0.18215), optionally noise-augmented
   (``noise_aug``: ``c <- q(c_t | c)`` at training timestep ``noise_aug``, DiffBIR v2.1);
4. sampling from ``z_T`` (``start``: ``N(0, I)``; ``cond``: the condition diffused to the last
   training step, v2.1's ``start_point_type=cond``; ``cond_low_freq``: v2.0's ``better_start``,
   the wavelet low frequencies of the stage-1 image encoded and diffused) with spaced DDPM
   (default, 50 steps), DDIM (bir's or ldm's timesteps), DPM-Solver++(2M) or the EDM-style
   DPM-Solver++(3M) SDE (v2.1's default); classifier-free guidance
   ``out = out(neg) + s * (out(pos) - out(neg))`` with ``s = cfg_scale`` or, with ``rescale_cfg``,
   v2.1's schedule of it; ControlNet residuals scaled by ``control_strength``; optional latent
   image guidance (:mod:`bir.diffusion.guidance`, v1 or v2 units); above ``diffusion_tile_size``
   the denoiser runs on overlapping latent tiles blended with Gaussian weights at every step;
5. VAE decoding (tiled above ``vae_tile_size``), cropping, colour fix against the stage-1 result
   (wavelet default, AdaIN, none), clamping to [0, 1] and, with ``output_rounding="truncate"``,
   truncation to 8-bit levels as the releases' ``.to(uint8)``.

The release pipelines (``pipeline``) reproduce the size handling of DiffBIR's ``inference.py``:

- ``v1`` (v1 release, Sept. 2023): the 8-bit input is upscaled by ``upscale`` with PIL bicubic
  (size rounded up), enlarged with PIL bicubic so its short side is at least ``min_side``
  (rounded up), zero-padded to a multiple of ``pad_to``; stage 1 runs on the padded image, whose
  result is the condition and the colour-fix reference; the output is cropped and *not* resized
  back (it keeps the enlarged size).
- ``v2_swinir`` (v2.0 / v2.1 face, v2.1 SR and denoising): PIL bicubic upscaling (size rounded
  down); torch bicubic (antialiased) enlargement to short side ``min_side``; zero padding to
  ``pad_to`` around stage 1; stage 2 as below; the result resized back to the upscaled input size.
- ``v2_bsrnet`` (v2.0 SR): stage 1 (a x4 BSRNet) runs on the input; its output is resized to
  the requested size ``upscale x input`` or, when that is smaller than ``min_side``, to short
  side ``min_side``; the result is resized to ``upscale x input``.
- ``v2_scunet`` (v2.0 denoising): PIL bicubic upscaling, stage 1, enlargement to short side
  ``min_side``; the result is resized back.

In the v2 pipelines the stage-1 result is zero-padded to ``pad_to`` for stage 2, the colour fix
uses the unpadded stage-1 image, and the bicubic resize back comes before clamping. Stage 1 is
not clamped in the release pipelines (the releases do not clamp it).

``predict_step`` returns ``name``, ``restored`` and ``extras`` (the parameters used per image);
with guidance, ``loss_curve`` holds the guidance loss at every guided step.
"""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from bir.colorfix import color_fix, wavelet_decomposition
from bir.diffusion.guidance import LatentImageGuidance, rescaled_cfg_scale
from bir.diffusion.k_samplers import DiscreteVPDenoiser, release_edm_sigmas, sample_dpmpp_3m_sde
from bir.diffusion.parameterization import ModelOutput, convert_output
from bir.diffusion.samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m
from bir.diffusion.schedules import (
    DiffusionSchedule,
    ldm_ddim_schedule,
    make_betas,
    rescale_zero_terminal_snr,
    space_timesteps,
)
from bir.errors import UsageError
from bir.lit.hparams import save_plain_hyperparameters
from bir.lit.stage2 import load_stage1
from bir.nets.controlldm import ControlLDM
from bir.random import randn, sample_generators
from bir.tiling import tiled_apply

Tensor = torch.Tensor
log = logging.getLogger(__name__)

#: bir.random stream of the initial latents (and every later draw of the sampling chain)
NOISE_STREAM = 31
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "edm_dpmpp_3m_sde")
PIPELINES = ("bir", "v1", "v2_swinir", "v2_bsrnet", "v2_scunet")
STARTS = ("noise", "cond", "cond_low_freq")
#: DiffBIR's default negative prompt
DEFAULT_NEGATIVE = "low quality, blurry, low-resolution, noisy, unsharp, weird textures"


def pil_bicubic_resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """PIL bicubic resize of 8-bit images, as the releases resize their inputs.

    Args:
        images: ``[B, 3, H, W]`` in [0, 1] holding 8-bit levels (``k / 255``, as loaded).
        size: ``(height, width)``.

    Returns:
        ``[B, 3, height, width]`` in [0, 1], 8-bit levels, same device and dtype.
    """
    out = []
    for img in images:
        arr = img.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
        pil = Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())
        res = np.asarray(pil.resize((size[1], size[0]), Image.BICUBIC))
        out.append(torch.from_numpy(res.copy()).permute(2, 0, 1))
    return (torch.stack(out).to(images.device, images.dtype)) / 255


def scaled_size(h: int, w: int, scale: float, rounding: str) -> tuple[int, int]:
    """``(h, w) x scale`` rounded ``down`` (int(), v2) or ``up`` (math.ceil, v1)."""
    if rounding == "up":
        return math.ceil(h * scale), math.ceil(w * scale)
    return int(h * scale), int(w * scale)


def short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Size with short side ``size`` and the long side scaled and rounded down (v2's
    ``resize_short_edge_to``)."""
    if h == w:
        return size, size
    if h < w:
        return size, int(w * (size / h))
    return int(h * (size / w)), size


def bicubic_antialias(images: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(bicubic, antialias=True)``: the releases' torch resize (Keys a = -0.5, as
    PIL, also when enlarging; plain ``bicubic`` uses a = -0.75)."""
    return F.interpolate(images, size=size, mode="bicubic", antialias=True)


def zero_pad_to(images: Tensor, multiple: int) -> Tensor:
    """Zero-pad bottom and right to a multiple of ``multiple`` (the releases' padding)."""
    h, w = images.shape[-2:]
    return F.pad(images, (0, (-w) % multiple, 0, (-h) % multiple), mode="constant", value=0.0)


class DiffBIR(pl.LightningModule):
    """Two-stage blind restoration (predict only).

    Args:
        controlldm: SD + ControlNet with weights loaded (:class:`~bir.nets.controlldm.ControlLDM`).
        stage1: stage-1 network ``[B, 3, H, W]`` in [0, 1] -> restored (SwinIR and SCUNet: same
            size; BSRNet: x4).
        stage1_ckpt_path: its weights (bir stage-1, DiffBIR SwinIR or v1 full checkpoint);
            None keeps the given weights (tests).
        schedule: SD training schedule (``kind``, ``T``, ``beta_start``, ``beta_end``,
            ``zero_terminal_snr``).
        prediction: what the UNet predicts: ``eps`` (SD 2.1-base) or ``v`` (v2.1's zero-SNR SD).
        sampler: ``ddpm`` (spaced ancestral, as the paper), ``ddim``, ``dpmpp_2m`` or
            ``edm_dpmpp_3m_sde`` (v2.1's default: :func:`~bir.diffusion.k_samplers.sample_dpmpp_3m_sde`
            on :func:`~bir.diffusion.k_samplers.release_edm_sigmas`).
        steps: sampling steps (respacing of the 1000 training steps).
        eta: DDIM stochasticity; for ``edm_dpmpp_3m_sde`` the SDE noise (release: 1).
        ddim_timesteps: ``bir`` (0, 20, 40, ...) or ``ldm`` (1, 21, 41, ..., final step to
            training step 0: the releases' DDIM, :func:`~bir.diffusion.schedules.ldm_ddim_schedule`).
        pos_prompt / neg_prompt: prompts of the conditional / unconditional branch of CFG.
        cfg_scale: classifier-free guidance scale (1 = no CFG: only the positive branch runs).
        rescale_cfg: v2.1's ``--rescale_cfg``: the scale grows from 1 to ``1 + cfg_scale`` over
            the timesteps (:func:`~bir.diffusion.guidance.rescaled_cfg_scale`).
        control_strength: multiplier of all 13 control residuals.
        start: initial latent: ``noise``, ``cond`` (condition diffused to the last training step)
            or ``cond_low_freq`` (v2.0 ``better_start``).
        noise_aug: diffuse the condition latent to this training timestep before sampling
            (v2.1 ``--noise_aug``; 0: off).
        guidance: latent image guidance settings (``scale``, ``t_start``, ``t_stop``, ``space``,
            ``loss``, ``repeats``, ``units``, ``resample_target``; see
            :class:`~bir.diffusion.guidance.LatentImageGuidance`) or None.
        apply_guidance: False sets the guidance target but never applies it, as DiffBIR v2.1's
            pipeline does with ``--guidance``.
        color_fix: ``wavelet`` | ``adain`` | ``none``.
        upscale: upscaling factor (SR); ``bir``: bicubic before stage 1; release pipelines: as
            the release (see the module docstring).
        pipeline: ``bir`` | ``v1`` | ``v2_swinir`` | ``v2_bsrnet`` | ``v2_scunet`` (module docstring).
        min_side: release pipelines: short side the stage-2 input is enlarged to (512).
        pad_to: release pipelines: zero padding multiple (64).
        output_rounding: ``round`` (the writer rounds to 8 bits) or ``truncate`` (floor to 8-bit
            levels, as the releases' ``.to(torch.uint8)``).
        stage1_tile_size / stage1_tile_overlap: stage-1 tiles (pixels); None disables.
        diffusion_tile_size / diffusion_tile_overlap: latent tiles of the denoiser, in pixels
            (divided by 8); None disables.
        vae_tile_size / vae_tile_overlap: VAE encode/decode tiles in pixels; None disables.
        seed: base seed of the per-image random draws.
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
        ddim_timesteps: str = "bir",
        pos_prompt: str = "",
        neg_prompt: str = DEFAULT_NEGATIVE,
        cfg_scale: float = 1.0,
        rescale_cfg: bool = False,
        control_strength: float = 1.0,
        start: str = "noise",
        noise_aug: int = 0,
        guidance: dict | None = None,
        apply_guidance: bool = True,
        color_fix: str = "wavelet",
        upscale: float = 1.0,
        pipeline: str = "bir",
        min_side: int = 512,
        pad_to: int = 64,
        output_rounding: str = "round",
        stage1_tile_size: int | None = 512,
        stage1_tile_overlap: int = 256,
        diffusion_tile_size: int | None = 512,
        diffusion_tile_overlap: int = 256,
        vae_tile_size: int | None = 1024,
        vae_tile_overlap: int = 128,
        seed: int = 0,
    ):
        super().__init__()
        choices = {
            "sampler": (sampler, SAMPLERS),
            "prediction": (prediction, ("eps", "v")),
            "color_fix": (color_fix, ("wavelet", "adain", "none")),
            "pipeline": (pipeline, PIPELINES),
            "start": (start, STARTS),
            "ddim_timesteps": (ddim_timesteps, ("bir", "ldm")),
            "output_rounding": (output_rounding, ("round", "truncate")),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise UsageError(f"method.{name} must be one of {allowed}, got {value!r}")
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
        if not 0 <= int(noise_aug) < len(betas):
            raise UsageError(f"method.noise_aug must lie in [0, {len(betas)}), got {noise_aug}")
        if pipeline != "bir" and pad_to % self.pad_multiple:
            raise UsageError(
                f"method.pad_to={pad_to} must be a multiple of {self.pad_multiple} (VAE factor x "
                f"UNet downsampling of this network)"
            )
        self.guidance_cfg = dict(guidance) if guidance else None

    def train(self, mode: bool = True) -> DiffBIR:
        return super().train(False)  # inference only

    # ------------------------------------------------------------------------------- parts
    def sampling_schedule(self) -> DiffusionSchedule:
        """The respaced schedule of the chosen sampler (DDIM: stride spacing, bir's or ldm's
        timesteps; others: even)."""
        T, steps = len(self.betas), self.hparams.steps
        if self.hparams.sampler == "ddim" and self.hparams.ddim_timesteps == "ldm":
            return ldm_ddim_schedule(self.betas, steps)
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
    def run_stage1(self, lq: Tensor, clamp: bool = True) -> Tensor:
        """Stage-1 restoration of ``[B, 3, H, W]`` in [0, 1] (tiled above ``stage1_tile_size``),
        clamped to [0, 1] unless ``clamp`` is False (the releases do not clamp)."""
        tile = self.hparams.stage1_tile_size
        if tile and max(lq.shape[-2:]) > tile:
            out = tiled_apply(self.stage1, lq, tile, self.hparams.stage1_tile_overlap)
        else:
            out = self.stage1(lq)
        return out.float().clamp(0, 1) if clamp else out.float()

    def cfg_at(self, t: Tensor) -> float:
        """CFG scale at original timesteps ``t`` (all equal within a batch)."""
        if self.hparams.rescale_cfg:
            return rescaled_cfg_scale(self.hparams.cfg_scale, int(t.flatten()[0]), len(self.betas))
        return float(self.hparams.cfg_scale)

    def denoiser(self, context: Tensor, uncond_context: Tensor | None, cond: Tensor):
        """``(z_t, t) -> raw output`` with CFG and, for large latents, Gaussian-blended tiles."""
        base_cfg = self.hparams.cfg_scale
        net = self.controlldm

        def raw(z_t: Tensor, t: Tensor, c_img: Tensor) -> Tensor:
            b = z_t.shape[0]
            if uncond_context is None or base_cfg == 1.0:
                return net(z_t, t, context[:b], c_img)
            out = net(
                torch.cat([z_t, z_t]),
                torch.cat([t, t]),
                torch.cat([context, uncond_context]),
                torch.cat([c_img, c_img]),
            )
            pos, neg = out.chunk(2)
            return neg + self.cfg_at(t) * (pos - neg)

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

    # ------------------------------------------------------------------- stage 1 and sizes
    def prepare(self, lq: Tensor) -> dict:
        """Stage 1 and the sizes of the chosen ``pipeline``.

        Returns ``clean`` (stage-1 result, the colour-fix reference), ``padded`` (what is
        encoded), ``crop`` (size of the decoded image to keep) and ``out_size`` (final size, None:
        keep ``crop``).
        """
        hp = self.hparams
        kind, m = hp.pipeline, hp.min_side
        h, w = lq.shape[-2:]
        if kind == "bir":
            if hp.upscale != 1:
                lq = F.interpolate(lq, scale_factor=hp.upscale, mode="bicubic").clamp(0, 1)
            clean = self.run_stage1(lq)
            if clean.shape[-2:] != lq.shape[-2:]:
                raise UsageError(
                    f"method.pipeline=bir needs a same-size stage-1 network, but it turned "
                    f"{tuple(lq.shape[-2:])} into {tuple(clean.shape[-2:])}; use "
                    "method.pipeline=v2_bsrnet for BSRNet (x4), as experiment=diffbir_v2"
                )
            hc, wc = clean.shape[-2:]
            pm = self.pad_multiple
            padded = F.pad(clean, (0, (-wc) % pm, 0, (-hc) % pm), mode="replicate")
            return {"clean": clean, "padded": padded, "crop": (hc, wc), "out_size": None}
        if kind == "v1":
            if hp.upscale != 1:
                lq = pil_bicubic_resize(lq, scaled_size(h, w, hp.upscale, "up"))
            h, w = lq.shape[-2:]
            if min(h, w) < m:
                lq = pil_bicubic_resize(lq, scaled_size(h, w, m / min(h, w), "up"))
            crop = tuple(lq.shape[-2:])
            control = self.run_stage1(zero_pad_to(lq, hp.pad_to), clamp=False)
            # v1 conditions on (and colour-fixes against) the whole padded stage-1 result
            return {"clean": control, "padded": control, "crop": crop, "out_size": None}
        if kind == "v2_bsrnet":
            out_size = scaled_size(h, w, hp.upscale, "down")
            clean = self.run_stage1(lq, clamp=False)
            if min(out_size) < m:
                clean = bicubic_antialias(clean, short_side_size(*clean.shape[-2:], m))
            else:
                clean = bicubic_antialias(clean, out_size)
        else:  # v2_swinir, v2_scunet: PIL upscaling of the 8-bit input first
            lq = pil_bicubic_resize(lq, scaled_size(h, w, hp.upscale, "down"))
            out_size = tuple(lq.shape[-2:])
            if kind == "v2_swinir":
                if min(out_size) < m:
                    lq = bicubic_antialias(lq, short_side_size(*out_size, m))
                hs, ws = lq.shape[-2:]
                clean = self.run_stage1(zero_pad_to(lq, hp.pad_to), clamp=False)[..., :hs, :ws]
            else:
                clean = self.run_stage1(lq, clamp=False)
                if min(clean.shape[-2:]) < m:
                    clean = bicubic_antialias(clean, short_side_size(*clean.shape[-2:], m))
        padded = zero_pad_to(clean, hp.pad_to)
        return {
            "clean": clean,
            "padded": padded,
            "crop": tuple(clean.shape[-2:]),
            "out_size": out_size,
        }

    def initial_latent(self, padded: Tensor, cond: Tensor, gens: list) -> Tensor:
        """``z_T`` for ``start``; draws from the per-sample generators."""
        hp = self.hparams
        shape = cond.shape[1:]
        if hp.start == "noise":
            return randn(shape, gens, device=cond.device, dtype=cond.dtype)
        if hp.start == "cond":
            x0 = cond
        else:
            # v2.0 better_start: the low frequencies of the padded stage-1 image, encoded with a
            # posterior sample. The release passes the [0, 1] image to an encoder expecting
            # [-1, 1]; vae_encode maps [0, 1] to [-1, 1], so give it (low + 1) / 2 to feed the
            # encoder the same values.
            _, low = wavelet_decomposition(padded)
            enc_tile, enc_overlap, _, _ = self.vae_tiles()
            x0 = self.controlldm.vae_encode((low + 1) / 2, gens, enc_tile, enc_overlap)
        last = torch.full((cond.shape[0],), len(self.betas) - 1, dtype=torch.long)
        noise = randn(shape, gens, device=cond.device, dtype=cond.dtype)
        return DiffusionSchedule(self.betas).q_sample(x0, last.to(cond.device), noise)

    # ------------------------------------------------------------------------------ restore
    @torch.no_grad()
    def restore(self, lq: Tensor, index: Tensor) -> dict:
        """Full pipeline for ``lq`` ``[B, 3, h, w]`` in [0, 1] and global sample indices.

        Returns ``restored`` ``[B, 3, H, W]`` in [0, 1] and ``stage1`` (the colour-fix
        reference), the sampled and condition latents ``latent`` / ``cond`` (of the padded
        image) and, with guidance, ``loss_curve`` ``[B, guided steps]``.
        """
        hp = self.hparams
        prep = self.prepare(lq)
        clean, padded = prep["clean"], prep["padded"]
        enc_tile, enc_overlap, dec_tile, dec_overlap = self.vae_tiles()
        net = self.controlldm
        cond = net.encode_condition(padded, enc_tile, enc_overlap)

        b = lq.shape[0]
        net.set_control_strength(hp.control_strength)
        context = net.encode_text([hp.pos_prompt] * b)
        uncond = net.encode_text([hp.neg_prompt] * b) if hp.cfg_scale != 1.0 else None
        schedule = self.sampling_schedule()
        gens = sample_generators(hp.seed, index, lq.device, NOISE_STREAM)
        z_T = self.initial_latent(padded, cond, gens)
        if hp.noise_aug > 0:
            t_aug = torch.full((b,), int(hp.noise_aug), dtype=torch.long, device=cond.device)
            noise = randn(cond.shape[1:], gens, device=cond.device, dtype=cond.dtype)
            cond = DiffusionSchedule(self.betas).q_sample(cond, t_aug, noise)
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
                encode=lambda img: net.vae_encode(img, gens, enc_tile, enc_overlap),
            )
            # v1 checkpoints encode the condition with their own encoder; the target is the SD VAE's
            target = (
                cond
                if net.cond_encoder is None and hp.noise_aug == 0
                else net.vae_encode(padded, None, enc_tile, enc_overlap)
            )
            guidance.set_target(padded, target)
            if not hp.apply_guidance:
                log.warning(
                    "method.apply_guidance=false: the guidance target is set but not applied, "
                    "as DiffBIR v2.1's pipeline (set it true to guide)"
                )
                guidance = None

        if hp.sampler == "ddpm":
            z_0 = sample_ddpm(model, z_T, schedule, gens, guidance=guidance, clip_x0=False)
        elif hp.sampler == "edm_dpmpp_3m_sde":
            if guidance is not None:
                raise UsageError(
                    "latent image guidance is not available with sampler=edm_dpmpp_3m_sde "
                    "(as in DiffBIR v2.1); use ddpm, ddim or dpmpp_2m"
                )
            z_0 = self.sample_edm(denoise, z_T, gens)
        else:
            guided = guidance.wrap_model(model) if guidance is not None else model
            if hp.sampler == "ddim":
                z_0 = sample_ddim(guided, z_T, schedule, eta=hp.eta, generators=gens, clip_x0=False)
            else:
                z_0 = sample_dpmpp_2m(guided, z_T, schedule)

        image = (net.vae_decode(z_0, dec_tile, dec_overlap).float() + 1) / 2
        if hp.pipeline == "v1":  # colour fix on the padded image, then crop
            image = color_fix(image, clean, hp.color_fix).clamp(0, 1)
            restored = image[..., : prep["crop"][0], : prep["crop"][1]]
        else:
            hc, wc = prep["crop"]
            restored = color_fix(image[..., :hc, :wc], clean, hp.color_fix)
            if prep["out_size"] is not None:
                restored = bicubic_antialias(restored, prep["out_size"])
            restored = restored.clamp(0, 1)
        if hp.output_rounding == "truncate":
            restored = torch.floor(restored * 255) / 255
        out = {"restored": restored, "stage1": clean, "latent": z_0, "cond": cond}
        if guidance is not None and guidance.losses:
            out["loss_curve"] = torch.stack(guidance.losses, dim=1).float()
        return out

    def sample_edm(self, denoise, z_T: Tensor, gens: list) -> Tensor:
        """DiffBIR v2.1's ``EDMSampler`` with DPM-Solver++(3M) SDE: ``release_edm_sigmas``,
        the unit-variance start scaled by ``sqrt(1 + sigma_0^2)``, CFG inside the denoiser."""
        hp = self.hparams
        abar = torch.cumprod(1 - self.betas, 0)
        sigmas, timesteps = release_edm_sigmas(abar, hp.steps)
        denoiser = DiscreteVPDenoiser(denoise, sigmas, timesteps, hp.prediction)
        x = z_T * math.sqrt(1.0 + float(sigmas[0]) ** 2)
        return sample_dpmpp_3m_sde(denoiser, x, sigmas, eta=hp.eta, generators=gens)

    def extras(self, batch_size: int) -> dict:
        """The parameters used for every image (written to the per-image records)."""
        hp = self.hparams
        g = self.guidance_cfg or {}
        return {
            "sampler": hp.sampler,
            "steps": hp.steps,
            "cfg_scale": hp.cfg_scale,
            "rescale_cfg": hp.rescale_cfg,
            "pos_prompt": hp.pos_prompt,
            "neg_prompt": hp.neg_prompt if hp.cfg_scale != 1.0 else "",
            "control_strength": hp.control_strength,
            "start": hp.start,
            "noise_aug": hp.noise_aug,
            "guidance_scale": float(g.get("scale", 0.0)) if hp.apply_guidance else 0.0,
            "guidance_space": g.get("space", "latent"),
            "guidance_loss": g.get("loss", "mse"),
            "guidance_units": g.get("units", "v2"),
            "guidance_t_start": int(g.get("t_start", 1001)),
            "guidance_t_stop": int(g.get("t_stop", -1)),
            "guidance_repeats": int(g.get("repeats", 1)),
            "color_fix": hp.color_fix,
            "upscale": hp.upscale,
            "pipeline": hp.pipeline,
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

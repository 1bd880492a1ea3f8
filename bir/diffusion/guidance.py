"""Latent image guidance (DiffBIR, Lin et al. 2024, Sec. 3.3 "restoration guidance", after GDP)
and the classifier-free guidance helpers shared by the samplers.

At each sampling step the predicted clean latent ``x0`` is pulled towards the stage-1 result by a
few gradient steps on a fidelity loss, then sampling continues from the corrected ``x0``. Two
unit conventions exist in DiffBIR's released code; ``units`` chooses:

- ``"v2"`` (DiffBIR v2.0, ``utils/cond_fn.py`` + ``utils/sampler.py``; bir's default)::

      x0 <- x0 - (scale * 3000 / c1_t) * grad_x0 L(x0, target),     repeated ``repeats`` times

  where ``c1_t`` is the posterior-mean coefficient of x0 (DDPM eq. 7), so the *posterior mean*
  recomputed from the corrected x0 moves by ``scale * 3000 * (-grad)`` as in GDP's mean shift.
- ``"v1"`` (DiffBIR v1, ``model/cond_fn.py`` + ``model/spaced_sampler.py``)::

      x0 <- x0 - scale * grad_x0 L(x0, target);  mean <- mean - 0.5 * scale * grad,  per repeat

  no x3000 and no ``1 / c1_t``; the mean is the one of the *unguided* x0 shifted by half of each
  x0 step (v1's comment: "equivalent to multiply delta_pred_x0 by a constant ... We set the
  constant to 0.5"), so x0 and the mean no longer agree. The same ``scale`` therefore means
  very different strengths in the two releases (v1's README scales are not v2's).

``L`` is, per sample, the mean over (C, H, W) of

- ``mse``: ``(x0 - target)^2``;
- ``weighted_mse``: ``w * (x0 - target)^2`` with ``w = 1 - tanh(sum of Sobel magnitude over 2x2
  blocks)`` of the stage-1 image in [0, 1] (flat regions get weight ~1, edges ~0, so textures are
  left to the prior).

The loss is taken in the latent space (``space="latent"``: target = stage-1 latent, the VAE
encoding of the stage-1 image) or in RGB (``space="rgb"``: the predicted latent is decoded with
gradients and compared with the stage-1 image in [-1, 1]). Guidance is active while the original
timestep ``t`` satisfies ``t_stop < t + 1 < t_start`` (DiffBIR's convention: defaults 1001 / -1
mean "every step"). As in the releases, the loss is a *mean* over (C, H, W), so the per-element
step is ``2 * scale * 3000 / (C H W c1_t)`` (v2): the same scale acts more weakly on larger
images. ``scale = 0`` is exactly no guidance.

**Latent target.** By default the target latent is given once (bir: the VAE posterior mode).
Both releases instead re-encode the stage-1 image with a *fresh posterior sample* for every
guided step and every repeat (``vae_encode(..., sample=True)`` in v2.0, ldm's
``get_first_stage_encoding`` in v1); ``resample_target=True`` with an ``encode`` function does
the same. DiffBIR v2.1's pipeline loads a guidance target but its samplers never apply it.

Deviation from the releases: for ``weighted_mse`` in latent space the releases build the weight
from a 3-channel tensor and cannot run on 4-channel latents; here the weight is computed from the
stage-1 RGB image and average-pooled to the latent resolution.

**Classifier-free guidance** (Ho & Salimans 2022): ``out = uncond + s (cond - uncond)``;
:func:`rescaled_cfg_scale` is DiffBIR v2.1's ``--rescale_cfg`` schedule of ``s`` over timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bir.diffusion.parameterization import ModelOutput
from bir.diffusion.schedules import DiffusionSchedule, _extract
from bir.errors import UsageError

Tensor = torch.Tensor

#: DiffBIR v2.0 multiplies the user's guidance scale by this constant (``utils/cond_fn.py``);
#: v1 does not (``units="v1"``).
REFERENCE_SCALE_FACTOR = 3000.0
UNITS = ("v2", "v1")
#: ITU-R BT.601 luma weights used for the edge map (as the reference).
_LUMA = (0.2989, 0.5870, 0.1140)


def edge_weight_map(image: Tensor, block_size: int = 2) -> Tensor:
    """Fidelity weight ``1 - tanh(block-summed Sobel magnitude)`` of an RGB image.

    Args:
        image: ``[B, 3, H, W]`` in [0, 1].
        block_size: the magnitude is summed over non-overlapping blocks of this size (edges of
            partial blocks at the border are handled by replicate padding).

    Returns:
        ``[B, 1, H, W]`` in (0, 1]: ~1 on flat regions, ~0 on strong edges.
    """
    luma = torch.tensor(_LUMA, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    gray = (image * luma).sum(dim=1, keepdim=True)
    sobel_x = torch.tensor(
        [[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=image.dtype, device=image.device
    )
    kernels = torch.stack([sobel_x, sobel_x.t()])[:, None]  # [2, 1, 3, 3]: d/dx and d/dy
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = grad.pow(2).sum(dim=1, keepdim=True).sqrt()
    h, w = magnitude.shape[-2:]
    pad_h, pad_w = (-h) % block_size, (-w) % block_size
    magnitude = F.pad(magnitude, (0, pad_w, 0, pad_h), mode="replicate")
    block_sum = F.avg_pool2d(magnitude, block_size) * block_size**2
    weight = 1 - block_sum.tanh()
    weight = weight.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)
    return weight[..., :h, :w]


def rescaled_cfg_scale(scale: float, t: int, T: int = 1000) -> float:
    """DiffBIR v2.1's ``--rescale_cfg``: the CFG scale at original timestep ``t`` grows from 1
    (t = T, pure noise) to ``1 + scale`` (t = 0) as ``1 + scale (1 - cos(pi ((T - t)/T)^5)) / 2``
    (``diffbir/sampler/sampler.py``, ``get_cfg_scale``); scales <= 1 are returned unchanged."""
    if scale <= 1:
        return float(scale)
    return 1.0 + scale * (1 - math.cos(math.pi * ((T - t) / T) ** 5)) / 2


def classifier_free_guidance(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """``uncond + scale * (cond - uncond)`` (Ho & Salimans 2022); linear, so it may be applied to
    raw eps / v outputs or to denoised estimates with the same result."""
    return uncond + scale * (cond - uncond)


class LatentImageGuidance:
    """Pulls the predicted clean latent towards the stage-1 result during sampling.

    Use :meth:`set_target` once per batch, then pass the object as ``guidance=`` to
    :func:`bir.diffusion.samplers.sample_ddpm` (called as a hook) or wrap a model with
    :meth:`wrap_model` for DDIM / DPM-Solver++ (the corrected x0 is turned back into eps).

    Args:
        scale: guidance strength ``s`` (DiffBIR ``g_scale``; 0 disables); see ``units``.
        t_start: guidance is active while ``t + 1 < t_start`` (original timesteps, 0-based t).
        t_stop: ... and ``t + 1 > t_stop``.
        space: ``latent`` or ``rgb`` (loss on decoded images; needs ``decode``).
        loss: ``mse`` or ``weighted_mse`` (edge-aware weight from the stage-1 image).
        repeats: gradient steps per sampling step (v1's default was 5, v2.0's 1).
        units: ``v2`` (x3000 and / c1_t, x0 moved and the mean recomputed) or ``v1`` (no factor,
            mean shifted by half of each x0 step); see the module docstring.
        resample_target: re-encode the stage-1 image with ``encode`` (a fresh posterior sample)
            at every guided step and repeat, as both releases do (latent space only).
        schedule: the (respaced) schedule the sampler walks (for ``c1_t`` and ``t``).
        decode: latent ``[B, 4, h, w]`` -> image ``[B, 3, H, W]`` in [-1, 1], differentiable
            (only for ``space="rgb"``).
        encode: image ``[B, 3, H, W]`` in [0, 1] -> scaled latent, drawing a new posterior sample
            per call (only for ``resample_target``).
    """

    def __init__(
        self,
        scale: float,
        t_start: int = 1001,
        t_stop: int = -1,
        space: str = "latent",
        loss: str = "mse",
        repeats: int = 1,
        units: str = "v2",
        resample_target: bool = False,
        schedule: DiffusionSchedule | None = None,
        decode: Callable[[Tensor], Tensor] | None = None,
        encode: Callable[[Tensor], Tensor] | None = None,
    ):
        if space not in ("latent", "rgb"):
            raise UsageError(f"guidance space must be latent or rgb, got {space!r}")
        if loss not in ("mse", "weighted_mse"):
            raise UsageError(f"guidance loss must be mse or weighted_mse, got {loss!r}")
        if units not in UNITS:
            raise UsageError(f"guidance units must be one of {UNITS}, got {units!r}")
        if space == "rgb" and decode is None:
            raise UsageError("rgb-space guidance needs a differentiable decode function")
        if resample_target and space == "latent" and encode is None:
            raise UsageError("resample_target needs an encode function (a VAE posterior sample)")
        self.scale, self.t_start, self.t_stop = float(scale), int(t_start), int(t_stop)
        self.space, self.loss, self.repeats = space, loss, int(repeats)
        self.units, self.resample_target = units, bool(resample_target)
        self.schedule, self.decode, self.encode = schedule, decode, encode
        self.target: Tensor | None = None
        self.image: Tensor | None = None
        self.weight: Tensor | None = None
        #: per-step mean loss before each step's first update (for logging), reset by set_target
        self.losses: list[Tensor] = []

    def set_target(self, image: Tensor, latent: Tensor | None = None) -> None:
        """Stage-1 result for this batch.

        Args:
            image: ``[B, 3, H, W]`` in [0, 1] (the RGB target, the source of the edge weight and,
                with ``resample_target``, what is re-encoded).
            latent: ``[B, 4, H/8, W/8]``, its scaled VAE latent (needed for ``space="latent"``
                unless ``resample_target``).
        """
        self.image = image.detach()
        if self.space == "latent":
            if latent is None and not self.resample_target:
                raise ValueError("latent-space guidance needs the stage-1 latent")
            self.target = latent.detach() if latent is not None else None
        else:
            self.target = (image * 2 - 1).detach()
        self.weight = None
        if self.loss == "weighted_mse":
            weight = edge_weight_map(image.detach())
            if self.space == "latent":
                if latent is None:
                    raise ValueError("weighted_mse in latent space needs the stage-1 latent")
                weight = F.adaptive_avg_pool2d(weight, latent.shape[-2:])
            self.weight = weight
        self.losses = []

    def active(self, t: int) -> bool:
        """Whether guidance applies at original timestep ``t`` (DiffBIR: ``t_stop < t+1 < t_start``)."""
        return self.scale != 0 and self.t_stop < t + 1 < self.t_start

    def current_target(self) -> Tensor:
        """The target of one gradient step: fixed, or a fresh posterior sample (latent space
        with ``resample_target``)."""
        if self.space == "latent" and self.resample_target:
            with torch.no_grad():
                return self.encode(self.image).detach()
        if self.target is None:
            raise ValueError("call set_target(...) before sampling with guidance")
        return self.target

    def _loss(self, x0: Tensor, target: Tensor | None = None) -> Tensor:
        """Per-sample fidelity loss ``[B]`` of a latent ``x0`` (graph kept for autograd)."""
        target = self.current_target() if target is None else target
        pred = self.decode(x0) if self.space == "rgb" else x0
        err = (pred - target.to(pred.dtype)).pow(2)
        if self.weight is not None:
            err = err * self.weight.to(err.dtype)
        return err.mean(dim=(1, 2, 3))

    def _gradient(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """``(grad_x0 sum_b L_b, L [B])`` at ``x0``; each sample's gradient is that of its own
        mean loss."""
        with torch.enable_grad():
            x0_var = x0.detach().requires_grad_(True)
            per_sample = self._loss(x0_var)
            (grad,) = torch.autograd.grad(per_sample.sum(), x0_var)
        return grad, per_sample.detach()

    def _check_ready(self) -> None:
        if self.schedule is None:
            raise ValueError("LatentImageGuidance needs the sampler's schedule")
        if self.image is None:
            raise ValueError("call set_target(...) before sampling with guidance")

    def guide_x0(self, x0: Tensor, i: Tensor) -> Tensor:
        """Corrected x0 ``[B, 4, h, w]`` for step indices ``i`` (LongTensor[B]); unchanged when
        inactive. (v1 units: the x0 steps only; the sampler hook also shifts the mean.)"""
        return self._guide(x0, i)[0]

    def _guide(self, x0: Tensor, i: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(x0', sum of the x0 steps or None when inactive)``."""
        self._check_ready()
        t = int(self.schedule.t(i)[0])
        if not self.active(t):
            return x0, None
        if self.units == "v2":
            # x0 shift that moves the posterior mean by scale * 3000 * (-grad): divide by c1_t
            c1 = _extract(self.schedule.posterior_mean_coef1, i, x0)
            step = self.scale * REFERENCE_SCALE_FACTOR / c1
        else:
            step = self.scale
        total = torch.zeros_like(x0)
        for r in range(self.repeats):
            grad, per_sample = self._gradient(x0)
            if r == 0:
                self.losses.append(per_sample)
            delta = -step * grad
            x0 = x0.detach() + delta
            total = total + delta
        return x0, total

    def __call__(
        self, x_t: Tensor, i: Tensor, out: ModelOutput, mean: Tensor, log_variance: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
        """``sample_ddpm`` guidance hook: v2 units return ``(None, x0')`` so the mean is
        recomputed from x0'; v1 units return ``(mean + 0.5 * sum of x0 steps, x0')``."""
        t = int(self.schedule.t(i)[0]) if self.schedule is not None else 0
        if not self.active(t):
            return None, None
        x0, total = self._guide(out.x0, i)
        if self.units == "v1":
            return mean + 0.5 * total, x0
        return None, x0

    def wrap_model(
        self, model: Callable[[Tensor, Tensor], ModelOutput]
    ) -> Callable[[Tensor, Tensor], ModelOutput]:
        """``model(x_t, i) -> ModelOutput`` whose x0 is guided and eps recomputed from it (for
        samplers without a hook: DDIM, DPM-Solver++; with v1 units only the x0 steps apply,
        as v1 had no such samplers)."""

        def guided(x_t: Tensor, i: Tensor) -> ModelOutput:
            out = model(x_t, i)
            if not self.active(int(self.schedule.t(i)[0])):
                return out
            x0 = self.guide_x0(out.x0, i)
            eps = self.schedule.eps_from_x0(x_t, i, x0)
            return ModelOutput(eps=eps, x0=x0, log_variance=out.log_variance)

        return guided

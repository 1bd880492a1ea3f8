"""Latent image guidance (DiffBIR, Lin et al. 2024, Sec. 3.3 "restoration guidance", after GDP).

At each sampling step the predicted clean latent ``x0`` is pulled towards the stage-1 result by a
few gradient steps on a fidelity loss, then sampling continues from the corrected ``x0``:

    x0 <- x0 - (scale * 3000 / c1_t) * grad_x0 L(x0, target),      repeated ``repeats`` times

where ``c1_t`` is the posterior-mean coefficient of x0 (DDPM eq. 7), so the *posterior mean*
moves by ``scale * 3000 * grad`` as in GDP's mean shift. ``L`` is, per sample, the mean over
(C, H, W) of

- ``mse``: ``(x0 - target)^2``;
- ``weighted_mse``: ``w * (x0 - target)^2`` with ``w = 1 - tanh(sum of Sobel magnitude over 2x2
  blocks)`` of the stage-1 image in [0, 1] (flat regions get weight ~1, edges ~0, so textures are
  left to the prior).

The loss is taken in the latent space (``space="latent"``: target = stage-1 latent, the VAE
encoding of the stage-1 image) or in RGB (``space="rgb"``: the predicted latent is decoded with
gradients and compared with the stage-1 image in [-1, 1]). Guidance is active while the original
timestep ``t`` satisfies ``t_stop < t + 1 < t_start`` (DiffBIR's convention: defaults 1001 / -1
mean "every step").

**Scale convention.** ``scale`` is DiffBIR's ``--g_scale`` (paper's ``s``); like the reference
v1 code we multiply it by ``REFERENCE_SCALE_FACTOR = 3000`` internally, so scales taken from the
DiffBIR README / paper transfer unchanged. ``scale = 0`` is exactly no guidance. As in the
reference, the loss is a *mean* over (C, H, W), so the per-element step is
``2 * scale * 3000 / (C H W c1_t)``: the same scale acts more weakly on larger images.

Deviation from the reference: for ``weighted_mse`` in latent space the reference builds the
weight from a 3-channel tensor and cannot run on 4-channel latents; here the weight is computed
from the stage-1 RGB image and average-pooled to the latent resolution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from bir.diffusion.parameterization import ModelOutput
from bir.diffusion.schedules import DiffusionSchedule, _extract

Tensor = torch.Tensor

#: DiffBIR v1 multiplies the user's guidance scale by this constant (``cond_fn.py``).
REFERENCE_SCALE_FACTOR = 3000.0
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


class LatentImageGuidance:
    """Pulls the predicted clean latent towards the stage-1 result during sampling.

    Use :meth:`set_target` once per batch, then pass the object as ``guidance=`` to
    :func:`bir.diffusion.samplers.sample_ddpm` (called as a hook) or wrap a model with
    :meth:`wrap_model` for DDIM / DPM-Solver++ (the corrected x0 is turned back into eps).

    Args:
        scale: guidance strength ``s`` (DiffBIR ``g_scale``; x3000 internally; 0 disables).
        t_start: guidance is active while ``t + 1 < t_start`` (original timesteps, 0-based t).
        t_stop: ... and ``t + 1 > t_stop``.
        space: ``latent`` or ``rgb`` (loss on decoded images; needs ``decode``).
        loss: ``mse`` or ``weighted_mse`` (edge-aware weight from the stage-1 image).
        repeats: gradient steps per sampling step.
        schedule: the (respaced) schedule the sampler walks (for ``c1_t`` and ``t``).
        decode: latent ``[B, 4, h, w]`` -> image ``[B, 3, H, W]`` in [-1, 1], differentiable
            (only for ``space="rgb"``).
    """

    def __init__(
        self,
        scale: float,
        t_start: int = 1001,
        t_stop: int = -1,
        space: str = "latent",
        loss: str = "mse",
        repeats: int = 1,
        schedule: DiffusionSchedule | None = None,
        decode: Callable[[Tensor], Tensor] | None = None,
    ):
        if space not in ("latent", "rgb"):
            raise ValueError(f"guidance space must be latent or rgb, got {space!r}")
        if loss not in ("mse", "weighted_mse"):
            raise ValueError(f"guidance loss must be mse or weighted_mse, got {loss!r}")
        if space == "rgb" and decode is None:
            raise ValueError("rgb-space guidance needs a differentiable decode function")
        self.scale, self.t_start, self.t_stop = float(scale), int(t_start), int(t_stop)
        self.space, self.loss, self.repeats = space, loss, int(repeats)
        self.schedule, self.decode = schedule, decode
        self.target: Tensor | None = None
        self.weight: Tensor | None = None
        #: per-step mean loss before each step's first update (for logging), reset by set_target
        self.losses: list[Tensor] = []

    def set_target(self, image: Tensor, latent: Tensor | None = None) -> None:
        """Stage-1 result for this batch.

        Args:
            image: ``[B, 3, H, W]`` in [0, 1] (the RGB target and the source of the edge weight).
            latent: ``[B, 4, H/8, W/8]``, its scaled VAE latent (needed for ``space="latent"``).
        """
        if self.space == "latent":
            if latent is None:
                raise ValueError("latent-space guidance needs the stage-1 latent")
            self.target = latent.detach()
        else:
            self.target = (image * 2 - 1).detach()
        self.weight = None
        if self.loss == "weighted_mse":
            weight = edge_weight_map(image.detach())
            if self.space == "latent":
                weight = F.adaptive_avg_pool2d(weight, self.target.shape[-2:])
            self.weight = weight
        self.losses = []

    def active(self, t: int) -> bool:
        """Whether guidance applies at original timestep ``t`` (DiffBIR: ``t_stop < t+1 < t_start``)."""
        return self.scale != 0 and self.t_stop < t + 1 < self.t_start

    def _loss(self, x0: Tensor) -> Tensor:
        """Per-sample fidelity loss ``[B]`` of a latent ``x0`` (graph kept for autograd)."""
        pred = self.decode(x0) if self.space == "rgb" else x0
        err = (pred - self.target.to(pred.dtype)).pow(2)
        if self.weight is not None:
            err = err * self.weight.to(err.dtype)
        return err.mean(dim=(1, 2, 3))

    def guide_x0(self, x0: Tensor, i: Tensor) -> Tensor:
        """Corrected x0 ``[B, 4, h, w]`` for step indices ``i`` (LongTensor[B]); unchanged when
        inactive."""
        if self.schedule is None:
            raise ValueError("LatentImageGuidance needs the sampler's schedule")
        if self.target is None:
            raise ValueError("call set_target(...) before sampling with guidance")
        t = int(self.schedule.t(i)[0])
        if not self.active(t):
            return x0
        # x0 shift that moves the posterior mean by scale * 3000 * (-grad): divide by c1_t
        step = (
            self.scale
            * REFERENCE_SCALE_FACTOR
            / _extract(self.schedule.posterior_mean_coef1, i, x0)
        )
        for r in range(self.repeats):
            with torch.enable_grad():
                x0_var = x0.detach().requires_grad_(True)
                per_sample = self._loss(x0_var)
                # sum over the batch: each sample's gradient is that of its own mean loss
                (grad,) = torch.autograd.grad(per_sample.sum(), x0_var)
            if r == 0:
                self.losses.append(per_sample.detach())
            x0 = x0.detach() - step * grad
        return x0

    def __call__(
        self, x_t: Tensor, i: Tensor, out: ModelOutput, mean: Tensor, log_variance: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
        """``sample_ddpm`` guidance hook: returns ``(None, x0')`` so the mean is recomputed."""
        t = int(self.schedule.t(i)[0]) if self.schedule is not None else 0
        if not self.active(t):
            return None, None
        return None, self.guide_x0(out.x0, i)

    def wrap_model(
        self, model: Callable[[Tensor, Tensor], ModelOutput]
    ) -> Callable[[Tensor, Tensor], ModelOutput]:
        """``model(x_t, i) -> ModelOutput`` whose x0 is guided and eps recomputed from it (for
        samplers without a hook: DDIM, DPM-Solver++)."""

        def guided(x_t: Tensor, i: Tensor) -> ModelOutput:
            out = model(x_t, i)
            if not self.active(int(self.schedule.t(i)[0])):
                return out
            x0 = self.guide_x0(out.x0, i)
            eps = self.schedule.eps_from_x0(x_t, i, x0)
            return ModelOutput(eps=eps, x0=x0, log_variance=out.log_variance)

        return guided

"""BIRD: Blind Image Restoration via fast Diffusion inversion (Chihaoui, Lemkhenter & Favaro,
2024). Zero-shot: a frozen pixel prior, a forward operator, and an optimisation per image.

Algorithm (paper Alg. 1, reference ``blind_deblurring.py`` / ``ddim_inversion_utils.py``)::

    x_T ~ N(0, I)                                 per image, from its own generator
    repeat `iterations` times:
        x_0 = DDIM_eta=0(x_T)  over t = T - delta_t, ..., delta_t, 0, x_0 clamped each step
        L   = sum_images reduce(w . (A(x_0) - y)^2)    w: the operator's loss mask (inpainting)
        Adam step on x_T (lr) and on the operator's parameters (lr_operator)
        x_T <- sqrt(D) x_T / ||x_T||                  projection on the sphere, D = C H W

Gradient modes (``network_grad``):

- ``False`` (the published code): every network call runs under ``no_grad``; eps is a
  constant, and the gradient reaches x_T only through the explicit x_t terms of each DDIM
  update. With x0 = (x_t - sqrt(1-a) eps)/sqrt(a), clamped, and eps re-derived from the clamped
  x0 (``use_clipped_model_output``), the update is element-wise linear in x_t with slope
  ``m sqrt(a'/a) + (1 - m) sqrt((1-a')/(1-a))`` (m: x0 inside [-1, 1], a' the previous
  alpha_bar). The gradient is cheap (no backward through the network, constant memory) but
  approximate.
- ``True``: full backpropagation through every network call: the exact gradient of the loss,
  at the cost of one network backward per step and the activations of all
  ``T / delta_t`` calls held in memory.

Deviations from the reference: the data term is computed on the [0, 1] scale (bir's operator
contract) rather than [-1, 1] (a constant factor 4 in the loss, which Adam all but ignores); the
loss is a *sum* over the images of a batch of per-image losses, so each image's optimisation is
independent of the batch it is in (the reference runs one image at a time).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

from bir.diffusion.prior import PixelPrior
from bir.diffusion.schedules import DiffusionSchedule
from bir.operators.base import Operator
from bir.random import randn, sample_generators

#: generator streams (bir.random): the initial latent and the operator's initial parameters
LATENT_STREAM, OPERATOR_STREAM = 0, 1


def ddim_step(
    schedule: DiffusionSchedule, x_t: torch.Tensor, i: int, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM update (eta 0) from used step ``i`` to ``i - 1``, DDIM eq. 12.

    x0 is clamped to [-1, 1] and eps re-derived from it (the reference's
    ``use_clipped_model_output=True``). After step 0 the previous alpha_bar is 1, so the result
    is the clamped x0.

    Args:
        x_t: ``[B, C, H, W]``; eps: the network's noise prediction, same shape.
    Returns:
        (x_{t-1}, clamped x0), both ``[B, C, H, W]``.
    """
    a = schedule.alphas_cumprod[i].item()
    a_prev = schedule.alphas_cumprod_prev[i].item()
    x0 = ((x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
    eps = (x_t - math.sqrt(a) * x0) / math.sqrt(1 - a)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps, x0


class BIRD(pl.LightningModule):
    """BIRD as a predict module (``bir-restore method=bird``).

    ``predict_step`` optimises, so the Trainer must run with ``inference_mode=False`` (the
    restore config sets it); the step enables gradients itself.

    Image sizes: x_T has the size of x implied by the observation (``operator.input_size`` for
    downsampling operators), padded at the bottom/right to a multiple of ``size_multiple`` (the
    net's total downsampling); the padding is cropped before the operator, so it costs compute
    but does not enter the data term. The prior runs fully convolutionally at that size; a net
    that cannot (``fully_convolutional: false``) only accepts x of the prior's
    ``image_size`` (a clear ``ValueError`` otherwise).

    Args:
        prior: the frozen pixel prior (eps prediction; extra variance channels are ignored).
        operator: the forward model; its learnable parameters are estimated jointly.
        delta_t: DDIM step size: timesteps T - delta_t, T - 2 delta_t, ..., 0 (BIRD: 100).
        iterations: Adam iterations per image.
        lr: Adam learning rate of x_T.
        lr_operator: Adam learning rate of the operator's parameters.
        network_grad: backpropagate through the network (module docstring).
        reduction: per-image data term: ``mean`` (as ``nn.MSELoss``, over all elements of A(x))
            or ``sum``.
        seed: run seed; each image's generators derive from it and ``batch["index"]``.
        size_multiple: pad x to a multiple of this (8 for DDPM-CelebA nets up to 32 for ADM).
        fully_convolutional: whether the prior accepts sizes other than its ``image_size``.
    """

    def __init__(
        self,
        prior: PixelPrior,
        operator: Operator,
        delta_t: int = 100,
        iterations: int = 100,
        lr: float = 3e-3,
        lr_operator: float = 2e-4,
        network_grad: bool = False,
        reduction: str = "mean",
        seed: int = 0,
        size_multiple: int = 32,
        fully_convolutional: bool = True,
    ):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        T = len(prior.betas)
        if not 0 < delta_t < T:
            raise ValueError(f"delta_t must lie in (0, {T}), got {delta_t}")
        self.prior, self.operator = prior, operator
        self.schedule = DiffusionSchedule(prior.betas, timesteps=range(0, T, delta_t))
        self.delta_t, self.iterations = delta_t, iterations
        self.lr, self.lr_operator = lr, lr_operator
        self.network_grad, self.reduction, self.seed = network_grad, reduction, seed
        self.size_multiple, self.fully_convolutional = size_multiple, fully_convolutional
        self._log_step = 0

    # --- the pieces of Algorithm 1 --------------------------------------------------------------
    def eps(self, x_t: torch.Tensor, i: int) -> torch.Tensor:
        """Noise prediction ``[B, C, H, W]`` at used step ``i`` (original timestep to the net)."""
        t = self.schedule.timesteps[i].to(x_t.device).expand(x_t.shape[0])
        with torch.set_grad_enabled(self.network_grad and torch.is_grad_enabled()):
            return self.prior(x_t, t)[:, : x_t.shape[1]]

    def decode(self, x_T: torch.Tensor) -> torch.Tensor:
        """DDIM (eta 0) from x_T to x0, ``[B, C, H, W]`` in [-1, 1]."""
        x = x_T
        for i in reversed(range(len(self.schedule))):
            x, _ = ddim_step(self.schedule, x, i, self.eps(x, i))
        return x

    def data_loss(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image data term ``[B]``: reduce(w . (A(x0) - y)^2), x0 and y in [0, 1]."""
        residual = (self.operator(x0) - y) ** 2
        mask = self.operator.loss_mask()
        if mask is not None:
            residual = residual * mask.to(residual)
        per_image = residual.flatten(1)
        return per_image.mean(1) if self.reduction == "mean" else per_image.sum(1)

    @staticmethod
    def project_to_sphere(x_T: torch.Tensor) -> None:
        """In place: every image's x_T rescaled to norm sqrt(D), D = C H W (paper sec. 4)."""
        d = x_T[0].numel()
        norm = (x_T.pow(2).flatten(1).sum(1) + 1e-9).sqrt().view(-1, 1, 1, 1)
        x_T.mul_(math.sqrt(d) / norm)

    def x_size(self, y: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
        """(size of x, padded size the prior runs at) for an observation ``y``."""
        hw = tuple(y.shape[-2:])
        if hasattr(self.operator, "input_size"):
            hw = tuple(self.operator.input_size(hw))
        m = self.size_multiple
        padded = (-(-hw[0] // m) * m, -(-hw[1] // m) * m)
        size = self.prior.image_size
        if not self.fully_convolutional and padded != (size, size):
            raise ValueError(
                f"this prior only runs at {size}x{size} (fully_convolutional=false), but the "
                f"image is {hw[0]}x{hw[1]}; resize or crop the input to {size}x{size}"
            )
        return hw, padded

    # --- the optimisation -----------------------------------------------------------------------
    def restore(self, y: torch.Tensor, index: torch.Tensor) -> dict:
        """Run BIRD on a batch of observations.

        Args:
            y: ``[B, 3, h, w]`` in [0, 1]. index: LongTensor[B], global sample indices (seeds).
        Returns:
            ``restored`` ([B, 3, H, W] in [0, 1], the x0 of the last iteration), ``loss_curve``
            ([B, iterations], per-image data term before each update), ``x_T`` (final latent),
            and the operator's estimates (e.g. ``kernel``).
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "BIRD optimises during predict: run the Trainer with inference_mode=False"
            )
        y = y.detach().clone()  # a normal tensor even if the loader made it under inference mode
        b, device = y.shape[0], y.device
        (h, w), (hp, wp) = self.x_size(y)
        self.operator.init_batch(b, sample_generators(self.seed, index, device, OPERATOR_STREAM))
        x_T = randn((self.prior.channels, hp, wp), sample_generators(self.seed, index, device, LATENT_STREAM),
                    device=device, dtype=y.dtype)  # fmt: skip
        x_T = torch.nn.Parameter(x_T)
        groups = [{"params": [x_T], "lr": self.lr, "name": "x_T"}]
        optimizer = torch.optim.Adam(groups + self.operator.param_groups(self.lr_operator))
        curve = torch.zeros(b, self.iterations, device=device)
        x0 = torch.zeros_like(x_T)
        with torch.enable_grad():
            for it in range(self.iterations):
                optimizer.zero_grad(set_to_none=True)
                x0 = self.decode(x_T)[..., :h, :w]
                losses = self.data_loss((x0 + 1) / 2, y)
                losses.sum().backward()  # a sum: image i's gradient ignores the others
                optimizer.step()
                with torch.no_grad():
                    self.project_to_sphere(x_T)
                curve[:, it] = losses.detach()
                self._log_loss(losses.detach())
        out = {"restored": ((x0.detach() + 1) / 2).clamp(0, 1), "loss_curve": curve,
               "x_T": x_T.detach()}  # fmt: skip
        out.update({k: v.detach() for k, v in self.operator.estimate().items()})
        return out

    def _log_loss(self, losses: torch.Tensor) -> None:
        logger = self.logger if self._trainer is not None else None
        if logger is not None:
            logger.log_metrics({"predict/loss": losses.mean().item()}, step=self._log_step)
        self._log_step += 1

    def predict_step(self, batch: dict, batch_idx: int = 0) -> dict:
        """``batch``: ``lq`` [B, 3, h, w] in [0, 1], ``name``, ``index``; returns the contract's
        ``name``, ``restored``, ``loss_curve``, ``kernel`` (when estimated) and ``extras``."""
        result = self.restore(batch["lq"], batch["index"])
        out = {"name": batch["name"], "restored": result["restored"], "loss_curve": result["loss_curve"],
               "extras": {"final_loss": result["loss_curve"][:, -1]}}  # fmt: skip
        if "kernel" in result:
            out["kernel"] = result["kernel"]
        return out

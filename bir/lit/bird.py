"""BIRD: Blind Image Restoration via fast Diffusion inversion (Chihaoui, Lemkhenter & Favaro,
2024, arXiv:2405.19572). Zero-shot: a frozen pixel prior, a forward operator H_eta, and an
optimisation per image of the initial noise x_T and the degradation's parameters eta.

The paper's algorithm (released code: ``blind_deblurring.py``, ``super_resolution.py``,
``inpainting.py``, ``blind_non_uniform_deblurring.py``, ``denoising.py`` with
``ddim_inversion_utils.py``), as :meth:`BIRD.restore` runs it::

    x_T ~ N(0, I); eta from the operator's init              (per image, own generators)
    repeat `iterations` times:
        x_0 = DDIM(x_T)      deterministic, a few large steps of about delta_t, x_0 clamped
        L   = reduce(w . (H_eta(x_0) - y)^2)                 w: the operator's loss mask
        Adam step on x_T (lr) and on eta (lr_operator)
        x_T <- sqrt(D) x_T / ||x_T||                         sphere of radius sqrt(D), D = C H W
    return the x_0 of the last iteration that is a multiple of `save_every`

The reverse process is :func:`bir.diffusion.samplers.sample_ddim`; the timesteps follow the
released ``DDIMScheduler.set_timesteps(T // delta_t)`` (stride ``T // (T // delta_t)``:
delta_t 100 -> 900, 800, ..., 0; delta_t 300 -> 666, 333, 0; delta_t 150 -> 830, 664, ..., 0),
see :func:`bir.diffusion.schedules.diffusers_ddim_timesteps`.

Gradient modes (``network_grad``, :func:`bir.diffusion.samplers.network_grad`):

- ``False`` (the released code): every network call runs under ``no_grad``; eps is a constant
  and the gradient reaches x_T only through the explicit x_t terms of each DDIM update. With
  x0 = (x_t - sqrt(1-a) eps)/sqrt(a), clamped, and eps re-derived from the clamped x0
  (``use_clipped_model_output``), each update is element-wise linear in x_t with slope
  ``m sqrt(a'/a) + (1 - m) sqrt((1-a')/(1-a))`` (m: x0 inside [-1, 1], a' the previous
  alpha_bar). Cheap (no backward through the network, constant memory) but approximate.
- ``True``: full backpropagation through every network call: the exact gradient of the loss,
  at the cost of one network backward per step and the activations of all steps in memory.

Released-code conventions and bir's choices (the ``bird_*`` experiments select the released
ones):

- ``loss_range``: the released loss is ``nn.MSELoss`` between A(x0) and y on the [-1, 1] scale
  (``signed``); bir's default measures the residual on its [0, 1] scale (``unit``), a factor 4
  in the loss that Adam all but ignores (it changes only the weight of Adam's epsilon).
- ``save_every``: the released scripts overwrite their result image every 10 iterations, from
  the x0 computed *before* that iteration's update, so the published image of a 100-iteration
  run is iteration 90 (after 90 updates), of 200 iterations iteration 190, of 25 iteration 20.
  ``save_every: 10`` reproduces that; 1 returns the last iteration's x0.
- The loss is a *sum* over the images of a batch of per-image losses, so each image's
  optimisation is independent of the batch it is in (the released code runs one image at a time).

What stays different from the released scripts, by design: x_T and the kernel MLP's weights and
code are drawn per image from bir's generators (the scripts draw them from the global stream
after building the network, the code under ``manual_seed(0)``), so the same seed does not give
the same numbers; the scripts make their own noisy observation from a 256-px resize of their
test image, bir restores the observation it is given; bir's alpha_bar is computed in float64
(the scripts' in float32). Given the same network weights, x_T, kernel MLP and y, the presets
follow the scripts to float32 round-off of the DDIM chain (measured against the released code
on a tiny random UNet, 32 px: the README's table of BIRD presets).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

from bir.diffusion.parameterization import DiffusionModel
from bir.diffusion.prior import PixelPrior
from bir.diffusion.samplers import network_grad, sample_ddim
from bir.diffusion.schedules import DiffusionSchedule, diffusers_ddim_timesteps
from bir.operators.base import Operator
from bir.random import randn, sample_generators

#: generator streams (bir.random): the initial latent and the operator's initial parameters
LATENT_STREAM, OPERATOR_STREAM = 0, 1
LOSS_RANGES = ("unit", "signed")


def bird_timesteps(T: int, delta_t: int) -> list[int]:
    """The DDIM timesteps of BIRD's step size ``delta_t`` (ascending): the released
    ``set_timesteps(T // delta_t)``, i.e. ``T // delta_t`` steps of stride ``T // (T // delta_t)``
    (:func:`~bir.diffusion.schedules.diffusers_ddim_timesteps`).

    Raises ValueError unless ``1 <= delta_t <= T // 2`` (at least two DDIM steps: with one the
    network would be asked to denoise pure noise as if it were at t = 0).
    """
    if isinstance(delta_t, bool) or not isinstance(delta_t, int) or not 1 <= delta_t <= T // 2:
        raise ValueError(
            f"delta_t (the DDIM step size) must be an integer in [1, {T // 2}] so that DDIM takes "
            f"at least two steps of the prior's {T}; got {delta_t!r} (BIRD's default is 100)"
        )
    return diffusers_ddim_timesteps(T, T // delta_t)


class BIRD(pl.LightningModule):
    """BIRD as a predict module (``bir-restore method=bird``).

    ``predict_step`` optimises: it leaves inference mode (Lightning predicts under it by default)
    and enables gradients itself; :meth:`restore` called directly refuses inference mode.

    Image sizes: x_T has the size of x implied by the observation (``operator.input_size``),
    padded at the bottom/right to a multiple of ``size_multiple`` (the net's total
    downsampling); the padding is cropped before the operator, so it costs compute but does not
    enter the data term. The prior runs fully convolutionally at that size; a net that cannot
    (``fully_convolutional: false``) only accepts x of the prior's ``image_size`` (a clear
    ``ValueError`` otherwise).

    Args:
        prior: the frozen pixel prior (eps prediction; extra variance channels are ignored).
        operator: the forward model; its learnable parameters are estimated jointly.
        delta_t: DDIM step size; the steps are the released ``set_timesteps(T // delta_t)``
            (:func:`bird_timesteps`; BIRD: 100 -> 900, 800, ..., 0).
        iterations: Adam iterations per image.
        lr: Adam learning rate of x_T.
        lr_operator: Adam learning rate of the operator's parameters.
        network_grad: backpropagate through the network (module docstring).
        reduction: per-image data term: ``mean`` (as ``nn.MSELoss``, over all elements of A(x))
            or ``sum``.
        loss_range: scale the residual is measured on: ``unit`` ([0, 1], bir) or ``signed``
            ([-1, 1], the released ``nn.MSELoss``: 4x the ``unit`` loss).
        save_every: return the x0 of the last iteration whose index is a multiple of this (the
            released scripts: 10, so iteration 90 of 100); 1 returns the last iteration's.
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
        loss_range: str = "unit",
        save_every: int = 1,
        seed: int = 0,
        size_multiple: int = 32,
        fully_convolutional: bool = True,
    ):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
        if loss_range not in LOSS_RANGES:
            raise ValueError(f"loss_range must be one of {LOSS_RANGES}, got {loss_range!r}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        betas = prior.betas.detach().cpu()
        self.prior, self.operator = prior, operator
        self.schedule = DiffusionSchedule(betas, bird_timesteps(len(betas), delta_t))
        self.delta_t, self.iterations = delta_t, iterations
        self.lr, self.lr_operator = lr, lr_operator
        self.network_grad, self.reduction, self.loss_range = network_grad, reduction, loss_range
        self.save_every, self.seed = save_every, seed
        self.size_multiple, self.fully_convolutional = size_multiple, fully_convolutional
        self._log_step = 0

    # --- the pieces of Algorithm 1 --------------------------------------------------------------
    def denoiser(self) -> DiffusionModel:
        """The prior as an eps model on BIRD's DDIM schedule, with or without gradients through
        the network (``network_grad``)."""
        net = network_grad(self.prior, self.network_grad)
        return DiffusionModel(net, self.schedule, "eps", self.prior.learned_sigma, "fixed_small")

    def decode(self, x_T: torch.Tensor, model: DiffusionModel | None = None) -> torch.Tensor:
        """x0 = DDIM(x_T): eta 0, x0 clamped to [-1, 1] every step; ``[B, C, H, W]`` in [-1, 1]."""
        return sample_ddim(model or self.denoiser(), x_T, self.schedule, eta=0.0, clip_x0=True)

    def data_loss(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image data term ``[B]``: reduce(w . r^2) with r = A(x0) - y for x0, y in [0, 1]
        (``unit``) or r = 2 (A(x0) - y), the same residual on the [-1, 1] scale (``signed``)."""
        residual = self.operator(x0) - y
        if self.loss_range == "signed":
            residual = 2 * residual
        residual = residual**2
        mask = self.operator.loss_mask()
        if mask is not None:
            residual = residual * mask.to(residual)
        per_image = residual.flatten(1)
        return per_image.mean(1) if self.reduction == "mean" else per_image.sum(1)

    @staticmethod
    def project_to_sphere(x_T: torch.Tensor) -> None:
        """In place: every image's x_T rescaled to norm sqrt(D), D = C H W (paper sec. 4; the
        released code divides by ``sqrt(sum x^2 + 1e-9)``, then multiplies by sqrt(D))."""
        norm = (x_T.pow(2).flatten(1).sum(1) + 1e-9).sqrt().view(-1, 1, 1, 1)
        x_T.div_(norm).mul_(math.sqrt(x_T[0].numel()))

    def x_size(self, y: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
        """(size of x, padded size the prior runs at) for an observation ``y``."""
        hw = tuple(self.operator.input_size(tuple(y.shape[-2:])))
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
    def restore(
        self, y: torch.Tensor, index: torch.Tensor, x_T: torch.Tensor | None = None
    ) -> dict:
        """Run BIRD (Algorithm 1) on a batch of observations.

        Args:
            y: ``[B, 3, h, w]`` in [0, 1]. index: LongTensor[B], global sample indices (seeds).
            x_T: optional starting latent ``[B, C, H', W']`` at the padded size (default: drawn
                from each image's generator).
        Returns:
            ``restored`` ([B, 3, H, W] in [0, 1], the x0 of iteration ``result_iteration``),
            ``loss_curve`` ([B, iterations], per-image data term of each iteration's x0, before
            its update), ``result_iteration`` (int), ``x_T`` (final latent), and the operator's
            estimates (e.g. ``kernel``).
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "BIRD optimises during predict: run the Trainer with inference_mode=False"
            )
        y = y.detach().clone()  # a normal tensor even if the loader made it under inference mode
        b, device = y.shape[0], y.device
        (h, w), (hp, wp) = self.x_size(y)
        channels = self.prior.channels
        if x_T is None:
            gens = sample_generators(self.seed, index, device, LATENT_STREAM)
            x_T = randn((channels, hp, wp), gens, device=device, dtype=y.dtype)
        elif tuple(x_T.shape) != (b, channels, hp, wp):
            raise ValueError(f"x_T must be {(b, channels, hp, wp)}, got {tuple(x_T.shape)}")
        x_T = torch.nn.Parameter(x_T.detach().clone().to(device=device, dtype=y.dtype))
        # every parameter of the degradation exists before the optimiser is built
        gens = sample_generators(self.seed, index, device, OPERATOR_STREAM)
        self.operator.init_batch(torch.Size((b, channels, h, w)), gens)
        groups = [{"params": [x_T], "lr": self.lr, "name": "x_T"}]
        optimizer = torch.optim.Adam(groups + self.operator.param_groups(self.lr_operator))
        model = self.denoiser()
        curve = torch.zeros(b, self.iterations, device=device)
        result, result_iteration = None, 0
        with torch.enable_grad():
            for it in range(self.iterations):
                optimizer.zero_grad(set_to_none=True)
                x0 = self.decode(x_T, model)[..., :h, :w]  # x_0 = DDIM(x_T)
                losses = self.data_loss((x0 + 1) / 2, y)  # ||A(x_0) - y||^2 per image
                losses.sum().backward()  # a sum: image i's gradient ignores the others
                optimizer.step()  # Adam on x_T and the degradation
                with torch.no_grad():
                    self.project_to_sphere(x_T)  # back onto the sphere of radius sqrt(D)
                curve[:, it] = losses.detach()
                if it % self.save_every == 0:
                    result, result_iteration = x0.detach(), it
                self._log_loss(losses.detach())
        out = {
            "restored": ((result + 1) / 2).clamp(0, 1),
            "loss_curve": curve,
            "result_iteration": result_iteration,
            "x_T": x_T.detach(),
        }
        out.update({k: v.detach() for k, v in self.operator.estimate().items()})
        return out

    def _log_loss(self, losses: torch.Tensor) -> None:
        logger = self.logger if self._trainer is not None else None
        if logger is not None:
            logger.log_metrics({"predict/loss": losses.mean().item()}, step=self._log_step)
        self._log_step += 1

    def predict_step(self, batch: dict, batch_idx: int = 0) -> dict:
        """``batch``: ``lq`` [B, 3, h, w] in [0, 1], ``name``, ``index``; returns the contract's
        ``name``, ``restored``, ``loss_curve``, ``kernel`` (when estimated) and ``extras``
        (``final_loss``: the data term of the returned image)."""
        # Lightning may predict under inference mode; the optimisation needs autograd.
        with torch.inference_mode(False):
            result = self.restore(batch["lq"].clone(), torch.as_tensor(batch["index"]).clone())
        final_loss = result["loss_curve"][:, result["result_iteration"]]
        out = {
            "name": batch["name"],
            "restored": result["restored"],
            "loss_curve": result["loss_curve"],
            "extras": {"final_loss": final_loss},
        }
        if "kernel" in result:
            out["kernel"] = result["kernel"]
        return out

"""BIR-D and GDP: guided ancestral DDPM on a pixel prior with a learnable degradation.

Papers:
- GDP: Fei et al., "Generative Diffusion Prior for Unified Image Restoration and Enhancement",
  CVPR 2023: the "x0" algorithm (guidance on the predicted clean image, fixed scale; its
  Algorithm 2), with the degradation's parameters learned alongside for low light.
- BIR-D: Tu, Yang & Fei, "Taming Generative Diffusion Prior for Universal Blind Image
  Restoration", 2024 (arXiv 2408.11287): the degradation ``y = K * x + M`` is optimised during
  sampling and the guidance scale follows an empirical formula (its Algorithm 1).

Both run on :func:`bir.diffusion.samplers.sample_ddpm`; everything method-specific is in
:class:`OperatorGuidance`, the sampler's guidance hook. One step, ``t = T-1 ... 0``, reads::

    sample_ddpm                 x0_hat = clamp(x0(x_t, eps), -1, 1); mu = posterior mean;
                                log_var = learned range (ADM)
    OperatorGuidance.__call__   L = || A_phi((x0_hat + 1) / 2) - y ||^2 (mean over pixels)
                                phi <- phi - lr * dL/dphi                     (dynamic_kernel)
                                mu <- mu - s * dL/dx0_hat                      (no Sigma factor)
    sample_ddpm                 x_{t-1} = mu + exp(log_var / 2) z              (z = 0 at t = 0)
    OperatorGuidance.after_step s <- adaptive scale(x_{t-1}, mu, ...)          (adaptive_scale)

GDP is ``adaptive_scale=False`` (and ``dynamic_kernel=False`` except for low light).

Sign convention: here the mean moves *down* the loss, ``mu - s g`` with ``s > 0``. The released
code writes ``mu + s' g`` and starts BIR-D at ``s' = +3000``: its first step climbs the loss
(our ``s = -3000``, what the BIR-D presets use); after that ``s' = -|...|``, i.e. ``s >= 0``.

Gradient: the released code differentiates w.r.t. the *detached* x0_hat (``guidance_grad="x0"``,
default). ``guidance_grad="x_t"`` back-propagates through x0_hat and the network to x_t (the
classifier-guidance form the papers' derivation starts from; it runs the network a second time
with gradients).

Images larger than the prior run on an overlapping patch grid, a model wrapper
(:class:`bir.lit.patches.PatchGridModel`): the network sees patches, the sampler and the guidance
see whole images. ``patch_loss="image"`` (default) takes one loss over the whole folded x0_hat, so
the operator's parameters see every pixel once. ``patch_loss="patch"`` is the released code: a
loss, a gradient and a parameter update per patch (each patch convolved with zero padding at its
own border), then averaged (mean shifts and masks over the patches covering each pixel, kernels
and factors over all patches). On an image the size of the prior both are the same.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from bir.diffusion.parameterization import DiffusionModel, ModelOutput
from bir.diffusion.prior import PixelPrior
from bir.diffusion.samplers import sample_ddpm
from bir.diffusion.schedules import DiffusionSchedule, space_timesteps
from bir.lit.patches import PatchedOutput, PatchGridModel
from bir.operators.base import Operator
from bir.random import randn, sample_generators
from bir.tiling import fold

log = logging.getLogger(__name__)

Tensor = torch.Tensor

# Independent random streams per image (bir.random): initial noise, per-step noise, noise added
# to the observation, the operator's initial parameters.
INIT_STREAM, STEP_NOISE_STREAM, OBSERVATION_STREAM, OPERATOR_STREAM = 0, 1, 2, 3
SCALE_FORMULAS = ("reference", "paper")


def gaussian_log_likelihood(
    target: Tensor, mean: Tensor, log_var: Tensor, formula: str = "paper"
) -> Tensor:
    """Per-image log-density of ``target`` under N(mean, diag(exp(log_var))): ``[B]``.

    ``paper``: ``-1/2 sum (target - mean)^2 / var - 1/2 sum log(2 pi var)``.
    ``reference``: the BIR-D code's ``cons_C`` / ``cons_K``, which put the *log*-variance where
    the standard deviation belongs and take the log of a summed determinant:
    ``-1/2 sum ((target - mean) / log_var)^2 - 1/2 log(2 pi sum log_var^2)``.
    Shapes broadcast (e.g. a 1-channel target against a 3-channel mean).
    """
    diff = (target - mean).expand(torch.broadcast_shapes(target.shape, mean.shape))
    log_var = log_var.expand_as(diff)
    if formula == "paper":
        quad = (diff.square() * torch.exp(-log_var)).flatten(1).sum(1)
        return -0.5 * quad - 0.5 * (math.log(2 * math.pi) + log_var).flatten(1).sum(1)
    if formula == "reference":
        quad = (diff / log_var).square().flatten(1).sum(1)
        return -0.5 * quad - 0.5 * torch.log(2 * math.pi * log_var.square().flatten(1).sum(1))
    raise ValueError(f"formula must be paper or reference, got {formula!r}")


def adaptive_guidance_scale(
    x_prev: Tensor,
    mean: Tensor,
    direction: Tensor,
    loss: Tensor,
    log_like_c: Tensor,
    log_like_k: Tensor,
    formula: str = "reference",
) -> Tensor:
    """BIR-D's empirical ("adaptive") guidance scale, per image ``[B]``.

    Matching the first-order expansion of the guided transition around its mean,
    ``log p(x_{t-1} | x_t, y) ~ (x_{t-1} - mu)^T g + C``, with ``log p(y | x_t) = log K - s L``
    gives the poster's ``s = -[(x_{t-1} - mu)^T g + C + log K] / L``.

    Args:
        x_prev: the sample x_{t-1}, ``[B, C, H, W]`` in [-1, 1].
        mean: the guided mean mu it was drawn around.
        direction: g: the guidance gradient dL/dx0 (``paper``) or the mean shift applied at this
            step (``reference``: the released ``cond_fn`` return, gradient times current s').
        loss: L, ``[B]``, positive (see :meth:`OperatorGuidance.scale_loss`).
        log_like_c, log_like_k: ``C`` and ``log K``, ``[B]`` (:func:`gaussian_log_likelihood`).
        formula: ``paper`` returns the expression above; ``reference`` the released code's
            ``s' = -|(...) / L|`` in our sign, ``|(x_{t-1} - mu)^T g + C + log K| / L``.
    Returns:
        ``[B]`` unbounded scale (may be non-finite; the caller guards).
    """
    inner = ((x_prev - mean) * direction).flatten(1).sum(1) + log_like_c + log_like_k
    if formula == "paper":
        return -inner / loss
    if formula == "reference":
        return (inner / loss).abs()
    raise ValueError(f"formula must be paper or reference, got {formula!r}")


def _pool_to(x: Tensor, like: Tensor) -> Tensor:
    """Average-pool x to like's spatial size (identity when they match)."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.adaptive_avg_pool2d(x, like.shape[-2:])


class OperatorGuidance:
    """The :func:`~bir.diffusion.samplers.sample_ddpm` guidance of GDP and BIR-D: owns the
    observation, the operator's update and the guidance scale.

    Args:
        operator: ``A_phi``, already :meth:`~bir.operators.base.Operator.init_batch`-ed.
        y: observations ``[B, C', h, w]`` in [0, 1].
        schedule: the schedule the sampler walks.
        scale: starting scale per image ``[B]`` (float64).
        model: the (patch-grid) model, needed for ``guidance_grad="x_t"``.
        adaptive_scale / dynamic_kernel / operator_lr / guidance_grad / scale_formula /
        scale_min / scale_max / loss / noisy_observation / patch_loss: see :class:`BIRD_D`.
        observation_generators: one per image, for ``noisy_observation``.
        names: image names for log messages.

    After sampling, ``scales`` and ``losses`` hold ``[B]`` float64 per step (sampling order):
    the scale used at the step and the data term at x0_hat.
    """

    def __init__(
        self,
        operator: Operator,
        y: Tensor,
        schedule: DiffusionSchedule,
        scale: Tensor,
        model: PatchGridModel | None = None,
        adaptive_scale: bool = True,
        dynamic_kernel: bool = True,
        operator_lr: float = 0.01,
        guidance_grad: str = "x0",
        scale_formula: str = "reference",
        scale_min: float | None = None,
        scale_max: float | None = None,
        loss: str = "mse",
        noisy_observation: bool = False,
        patch_loss: str = "image",
        observation_generators: Sequence[torch.Generator] | None = None,
        names: Sequence[str] | None = None,
    ):
        self.operator, self.y, self.schedule, self.model = operator, y, schedule, model
        self.scale = scale.to(torch.float64)
        self.adaptive_scale, self.dynamic_kernel = adaptive_scale, dynamic_kernel
        self.operator_lr, self.guidance_grad = operator_lr, guidance_grad
        self.scale_formula, self.scale_min, self.scale_max = scale_formula, scale_min, scale_max
        self.loss_kind, self.noisy_observation = loss, noisy_observation
        self.patch_loss, self.observation_generators = patch_loss, observation_generators
        self.names = list(names) if names is not None else [str(b) for b in range(y.shape[0])]
        self.scales: list[Tensor] = []
        self.losses: list[Tensor] = []
        self._target = y
        self._direction: Tensor | None = None
        self._shift: Tensor | None = None
        # Sigma_{t+1} for log K at the first step: the released code's torch.ones for the
        # reference formula (log-variance 1), unit variance (log-variance 0) for the paper's
        self._prev_log_var: Tensor | float = 1.0 if scale_formula == "reference" else 0.0

    # --- the data term ---------------------------------------------------------------------------
    def data_loss(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        """Per-image distance ``[B]``: mean over (C, H, W) of ``(pred - target)^2`` (or
        ``|pred - target|``), times the operator's loss mask when it has one."""
        diff = pred - target
        err = diff.square() if self.loss_kind == "mse" else diff.abs()
        if weight is not None:
            err = err * weight.to(err)
        return err.flatten(1).mean(1)

    def _observation(self, i: Tensor) -> Tensor:
        """y, or ``q(y_t | y)`` noised to this step's level (the released deblurring, blind and
        multi-degradation scripts), in [0, 1]."""
        if not self.noisy_observation:
            return self.y
        noise = randn(self.y.shape[1:], self.observation_generators, self.y.device)
        return (self.schedule.q_sample(2 * self.y - 1, i, noise) + 1) / 2

    def _losses_image(
        self, x_t: Tensor, i: Tensor, out: ModelOutput, target: Tensor, params: list[Tensor]
    ) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        """(loss [B], dL/dx0 or dL/dx_t, parameter gradients) with one loss per image."""
        with torch.enable_grad():
            if self.guidance_grad == "x0":
                wrt = out.x0.detach().requires_grad_(True)
                x0 = wrt
            else:  # through the network: run it again with gradients
                wrt = x_t.detach().requires_grad_(True)
                x0 = self.model(wrt, i).x0.clamp(-1, 1)
            loss = self.data_loss(self.operator((x0 + 1) / 2), target, self.operator.loss_mask())
            return (loss, *self._gradients(loss, wrt, params))

    def _losses_patch(
        self, out: PatchedOutput, target: Tensor, params: list[Tensor]
    ) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        """The released code's per-patch version: one loss per patch on the patch's own x0,
        the gradients folded back to the image (mean shifts averaged over covering patches) and
        the parameter gradients averaged as the code averages its per-patch updates."""
        tiles, positions = out.patches.x0, out.positions
        b, n = target.shape[0], len(positions)
        p = tiles.shape[-1]
        h, w = out.x0.shape[-2:]
        weight = self.operator.loss_mask()
        with torch.enable_grad():
            wrt = tiles.detach().requires_grad_(True)
            per_image = wrt.reshape(b, n, *wrt.shape[1:])
            losses = []
            for k, (top, left) in enumerate(positions):
                pred = self.operator.forward_window((per_image[:, k] + 1) / 2, top, left)
                win = (..., slice(top, top + p), slice(left, left + p))
                losses.append(
                    self.data_loss(pred, target[win], None if weight is None else weight[win])
                )
            loss_patches = torch.stack(losses, 1)  # [B, N]
            tile_grad, grads = self._gradients(loss_patches, wrt, params)
        grad = fold(tile_grad, positions, h, w)
        coverage = fold(tiles.new_ones(n, 1, p, p), positions, h, w, average=False)
        averaged = []
        for param, g in zip(params, grads):
            if g is None:
                averaged.append(None)
            elif param.shape[-2:] == (h, w):  # a per-pixel map: mean over the covering patches
                averaged.append(g / coverage.to(g))
            else:  # a kernel or a factor: mean over all patches
                averaged.append(g / n)
        return loss_patches.mean(1), grad, averaged

    def _gradients(
        self, loss: Tensor, wrt: Tensor, params: list[Tensor]
    ) -> tuple[Tensor, list[Tensor | None]]:
        """Gradients of the summed finite losses (``loss`` ``[B]`` or ``[B, N]``) w.r.t.
        ``wrt`` and the operator's parameters; images with a non-finite loss contribute none."""
        finite = torch.isfinite(loss)
        total = torch.where(finite, loss, torch.zeros_like(loss)).sum()
        if not total.requires_grad:  # no finite loss carries a graph: nothing to follow
            return torch.zeros_like(wrt), [None] * len(params)
        grads = torch.autograd.grad(total, [wrt, *params], allow_unused=True)
        first = torch.zeros_like(wrt) if grads[0] is None else torch.nan_to_num(grads[0])
        return first, list(grads[1:])

    # --- one step: the hook sample_ddpm calls ------------------------------------------------------
    def __call__(
        self, x_t: Tensor, i: Tensor, out: ModelOutput, mean: Tensor, log_variance: Tensor
    ) -> tuple[Tensor, None]:
        """Data term, operator update and guided mean (BIR-D Alg. 1 / GDP Alg. 2, the steps
        between the prior's prediction and the sample)."""
        t = int(self.schedule.t(i[:1])[0])
        # the observation this step compares with (noised to level t if asked)
        target = self._target = self._observation(i)
        groups = self.operator.param_groups(self.operator_lr) if self.dynamic_kernel else []
        params = [p for g in groups for p in g["params"]]
        lrs = [g["lr"] for g in groups for _ in g["params"]]

        # data term L(A(x0_hat), y) and its gradients (w.r.t. x0_hat, or x_t, and phi)
        if self.patch_loss == "patch":
            loss, grad, param_grads = self._losses_patch(out, target, params)
        else:
            loss, grad, param_grads = self._losses_image(x_t, i, out, target, params)
        finite = torch.isfinite(loss)
        for j in torch.nonzero(~finite).flatten().tolist():
            log.warning(
                "BIR-D: non-finite loss for %s at t=%d; guidance and the operator "
                "update skipped for it at this step",
                self.names[j],
                t,
            )
        keep = finite.reshape(-1, *([1] * (grad.ndim - 1))).to(grad)

        # degradation update phi <- phi - lr dL/dphi (the gradient above used the old phi)
        with torch.no_grad():
            for param, g, lr in zip(params, param_grads, lrs):
                if g is None:
                    continue
                g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
                if param.shape[0] == finite.shape[0]:
                    g = g * finite.reshape(-1, *([1] * (g.ndim - 1))).to(g)
                elif not bool(finite.all()):
                    continue
                param.sub_(lr * g)

        # guided mean mu - s g (GDP / BIR-D: no Sigma factor)
        self._direction = grad * keep
        s = self.scale.to(mean.dtype).reshape(-1, *([1] * (mean.ndim - 1)))
        self._shift = -s * self._direction
        self.scales.append(self.scale.detach().cpu().clone())
        self.losses.append(loss.detach().double().cpu())
        return mean + self._shift, None

    # --- after x_{t-1} is drawn: the adaptive scale -------------------------------------------------
    def scale_loss(self, x_prev: Tensor) -> Tensor:
        """L of the adaptive formula, ``[B]`` float64.

        ``reference``: the released sampler's ``2 C^2 mean_CHW((A(x_{t-1}) - y)^2)`` with the
        *current* operator applied to the [-1, 1] sample as it is (no (x + 1) / 2) and the clean
        y on [-1, 1] (``C`` = 3 channels: the factor 18). ``paper``: the data term at the new
        sample, ``L(A((x_{t-1} + 1) / 2), y_t)`` on [0, 1].
        """
        if self.scale_formula == "reference":
            d = self.operator(x_prev).double()
            y_pm = (2 * self.y - 1).double()
            return 2 * x_prev.shape[1] ** 2 * (d - y_pm).square().flatten(1).mean(1)
        pred = self.operator((x_prev + 1) / 2)
        return self.data_loss(pred, self._target, self.operator.loss_mask()).double()

    def after_step(
        self, x_t: Tensor, x_prev: Tensor, i: Tensor, mean: Tensor, log_variance: Tensor
    ) -> None:
        """BIR-D's adaptive scale for the next step from x_{t-1}, mu, g, C, log K and L."""
        log_variance = log_variance.expand_as(x_prev)
        if self.adaptive_scale and int(i[0]) > 0:
            with torch.no_grad():
                self.scale = self._next_scale(x_t, x_prev, i, mean, log_variance)
        self._prev_log_var = log_variance

    def _next_scale(
        self, x_t: Tensor, x_prev: Tensor, i: Tensor, mean: Tensor, log_variance: Tensor
    ) -> Tensor:
        # C = log N(y; mu, Sigma_t) and log K = log N(y; x_t, Sigma_{t+1}), y on [-1, 1] (pooled
        # images when the operator changes the size); reference: the clean y, as the code
        y = self.y if self.scale_formula == "reference" else self._target
        y_pm = (2 * y - 1).double()
        prev = self._prev_log_var
        prev = torch.full_like(x_t, prev) if isinstance(prev, float) else prev
        like_c = gaussian_log_likelihood(
            y_pm,
            _pool_to(mean, y_pm).double(),
            _pool_to(log_variance, y_pm).double(),
            self.scale_formula,
        )
        like_k = gaussian_log_likelihood(
            y_pm, _pool_to(x_t, y_pm).double(), _pool_to(prev, y_pm).double(), self.scale_formula
        )
        loss = self.scale_loss(x_prev)
        direction = self._direction if self.scale_formula == "paper" else self._shift
        new = adaptive_guidance_scale(
            x_prev.double(),
            mean.double(),
            direction.double(),
            loss,
            like_c,
            like_k,
            self.scale_formula,
        )
        new = torch.where(loss > 1e-12, new, torch.full_like(new, float("nan")))
        t = int(self.schedule.t(i[:1])[0])
        for j in torch.nonzero(~torch.isfinite(new)).flatten().tolist():
            log.warning(
                "BIR-D: the adaptive guidance scale for %s at t=%d is not finite (L=%g); "
                "keeping s=%g for the next step",
                self.names[j],
                t,
                float(loss[j]),
                float(self.scale[j]),
            )
        if self.scale_min is not None or self.scale_max is not None:
            new = new.clamp(self.scale_min, self.scale_max)
        return torch.where(torch.isfinite(new), new, self.scale)


class BIRD_D(pl.LightningModule):
    """BIR-D / GDP predict module (``predict_step`` per docs/contracts.md).

    Args:
        prior: frozen pixel prior with learned variance (ADM); its ``image_size`` is the patch size.
        operator: the forward model ``A_phi`` (``bir.operators``), e.g. ``KernelMaskOperator``.
        steps: respacing of the 1000 training steps (``space_timesteps`` spec), None = all.
        guidance_scale: the fixed scale (GDP, ``adaptive_scale=False``) or the starting scale
            (the released BIR-D code starts at ``-3000`` in bir's sign: a loss-increasing step).
        adaptive_scale: update s every step with :func:`adaptive_guidance_scale`.
        dynamic_kernel: update the operator's parameters every step (kernel, mask, factor).
        operator_lr: step size for operator parameter groups that do not set their own.
        guidance_grad: ``x0`` (gradient w.r.t. detached x0_hat, GDP / BIR-D code) or ``x_t``.
        scale_formula: ``reference`` (the released sampler, see :meth:`OperatorGuidance.scale_loss`
            and :func:`gaussian_log_likelihood`) or ``paper`` (bir's reading of the poster's
            formula with Gaussian log-densities; its whole-image log-densities over a mean loss
            grow with the pixel count, so it needs bounds, and at 256 px it sits at them).
        scale_min / scale_max: bounds on the adaptive s; None = unbounded (the released code).
        loss: ``mse`` | ``l1`` distance between ``A(x0_hat)`` and y (weighted by the operator's
            ``loss_mask`` when it has one).
        noisy_observation: compare against ``q_sample(y, t)`` rather than y (the released
            deblurring, blind and multi-degradation scripts).
        patch_stride: stride of the patch grid (None: half the prior's image size).
        patch_batch_size: patches per network call (None: all at once).
        patch_loss: ``image`` (one loss on the folded x0_hat) or ``patch`` (the released code's
            per-patch loss, gradient and update, averaged); the same on prior-sized images.
        seed: run seed; per-image generators derive from it and ``batch["index"]``.
    """

    def __init__(
        self,
        prior: PixelPrior,
        operator: Operator,
        steps: int | str | None = None,
        guidance_scale: float = -3000.0,
        adaptive_scale: bool = True,
        dynamic_kernel: bool = True,
        operator_lr: float = 0.01,
        guidance_grad: str = "x0",
        scale_formula: str = "reference",
        scale_min: float | None = None,
        scale_max: float | None = None,
        loss: str = "mse",
        noisy_observation: bool = False,
        patch_stride: int | None = None,
        patch_batch_size: int | None = None,
        patch_loss: str = "image",
        seed: int = 0,
    ):
        super().__init__()
        if guidance_grad not in ("x0", "x_t"):
            raise ValueError(f"guidance_grad must be x0 or x_t, got {guidance_grad!r}")
        if scale_formula not in SCALE_FORMULAS:
            raise ValueError(f"scale_formula must be reference or paper, got {scale_formula!r}")
        if loss not in ("mse", "l1"):
            raise ValueError(f"loss must be mse or l1, got {loss!r}")
        if patch_loss not in ("image", "patch"):
            raise ValueError(f"patch_loss must be image or patch, got {patch_loss!r}")
        if patch_loss == "patch" and guidance_grad != "x0":
            raise ValueError("patch_loss=patch works on the per-patch x0: set guidance_grad=x0")
        if scale_min is not None and scale_max is not None and scale_min > scale_max:
            raise ValueError(f"scale_min {scale_min} > scale_max {scale_max}")
        self.prior, self.operator = prior, operator
        self.guidance_scale, self.adaptive_scale = float(guidance_scale), adaptive_scale
        self.dynamic_kernel, self.operator_lr = dynamic_kernel, operator_lr
        self.guidance_grad, self.scale_formula = guidance_grad, scale_formula
        self.scale_min, self.scale_max = scale_min, scale_max
        self.loss_kind, self.noisy_observation = loss, noisy_observation
        self.patch_size = int(prior.image_size)
        self.patch_stride = patch_stride or max(self.patch_size // 2, 1)
        self.patch_batch_size, self.patch_loss, self.seed = patch_batch_size, patch_loss, seed
        T = len(prior.betas)
        timesteps = None if steps is None else space_timesteps(T, steps)
        self.schedule = DiffusionSchedule(prior.betas.detach().cpu(), timesteps)

    def sample(
        self, y: Tensor, indices: Tensor, names: list[str] | None = None
    ) -> dict[str, Tensor]:
        """Restore a batch of observations.

        Args:
            y: ``[B, C', h, w]`` in [0, 1].
            indices: ``LongTensor[B]`` global sample indices (seeds).
            names: image names for messages.
        Returns:
            dict with ``restored`` ``[B, C, H, W]`` in [0, 1], ``scale_trajectory`` and
            ``loss_curve`` ``[B, steps]`` (in sampling order, first = noisiest step) and the
            operator's estimates.
        """
        device, b = y.device, y.shape[0]
        names = names or [str(int(k)) for k in indices]
        hw = tuple(self.operator.input_size(tuple(y.shape[-2:])))  # SR: x is larger than y
        shape = (b, self.prior.channels, *hw)
        diffusion = DiffusionModel(
            self.prior, self.schedule, learned_sigma=self.prior.learned_sigma
        )
        model = PatchGridModel(diffusion, self.patch_size, self.patch_stride, self.patch_batch_size)
        model.positions(*hw)  # validates the size before any work
        if self.patch_loss == "patch" and tuple(self.operator.output_size(hw)) != hw:
            raise ValueError("patch_loss=patch needs an operator that keeps the image size")

        # every learnable parameter of the operator exists from here on
        self.operator.init_batch(
            shape, sample_generators(self.seed, indices, device, OPERATOR_STREAM)
        )
        guidance = OperatorGuidance(
            self.operator,
            y,
            self.schedule,
            torch.full((b,), self.guidance_scale, device=device, dtype=torch.float64),
            model=model,
            adaptive_scale=self.adaptive_scale,
            dynamic_kernel=self.dynamic_kernel,
            operator_lr=self.operator_lr,
            guidance_grad=self.guidance_grad,
            scale_formula=self.scale_formula,
            scale_min=self.scale_min,
            scale_max=self.scale_max,
            loss=self.loss_kind,
            noisy_observation=self.noisy_observation,
            patch_loss=self.patch_loss,
            observation_generators=sample_generators(
                self.seed, indices, device, OBSERVATION_STREAM
            ),
            names=names,
        )
        x_T = randn(shape[1:], sample_generators(self.seed, indices, device, INIT_STREAM), device)
        step_generators = sample_generators(self.seed, indices, device, STEP_NOISE_STREAM)
        with torch.no_grad():
            x = sample_ddpm(model, x_T, self.schedule, step_generators, guidance=guidance)

        bad = torch.nonzero(~torch.isfinite(x).flatten(1).all(1)).flatten().tolist()
        if bad:
            raise RuntimeError(f"BIR-D produced a non-finite image for {[names[j] for j in bad]}")
        out = {
            "restored": ((x + 1) / 2).clamp(0, 1),
            "scale_trajectory": torch.stack(guidance.scales, 1).float(),
            "loss_curve": torch.stack(guidance.losses, 1).float(),
        }
        out.update(self.operator.estimate())
        return out

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> dict:
        """``batch``: ``lq`` ``[B, C, h, w]`` in [0, 1], ``name``, ``index``. Returns ``name``,
        ``restored``, ``kernel`` (when the operator has one), ``scale_trajectory``,
        ``loss_curve`` and ``extras`` (the operator's other estimates)."""
        # Lightning may predict under inference mode; the guidance needs autograd.
        with torch.inference_mode(False), torch.enable_grad():
            y = batch["lq"].clone()
            indices = batch["index"]
            indices = indices.clone() if isinstance(indices, Tensor) else torch.as_tensor(indices)
            names = list(batch["name"])
            out = self.sample(y, indices, names)
        pred = {
            "name": names,
            "restored": out.pop("restored"),
            "scale_trajectory": out.pop("scale_trajectory"),
            "loss_curve": out.pop("loss_curve"),
        }
        if "kernel" in out:
            pred["kernel"] = out.pop("kernel")
        # per-image scalars and short vectors go to the records; image-sized estimates (masks) not
        b = pred["restored"].shape[0]
        pred["extras"] = {
            k: v for k, v in out.items() if v.shape[:1] == (b,) and v[0].numel() <= 64
        }
        return pred

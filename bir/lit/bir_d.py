"""BIR-D and GDP: guided ancestral DDPM sampling on a pixel prior with a learnable degradation.

Papers:
- GDP: Fei et al., "Generative Diffusion Prior for Unified Image Restoration and Enhancement",
  CVPR 2023 (the "x0" variant: guidance on the predicted clean image, fixed scale).
- BIR-D: Tu, Yang & Fei, "Taming Generative Diffusion Prior for Universal Blind Image
  Restoration", 2024 (arXiv 2408.11287): the degradation ``y = K * x + M`` is optimised during
  sampling and the guidance scale follows an empirical formula ("adaptive guidance scale").

One sampling step (``t = T-1 ... 0``; the prior predicts eps and the IDDPM learned-range variance)::

    1. x0_hat = clamp(x0_from_eps(x_t, eps), -1, 1);  log_var = learned range
    2. L = distance(A_phi((x0_hat + 1) / 2), y)              (MSE by default, in [0, 1])
    3. phi <- phi - lr * dL/dphi                             (dynamic_kernel)
    4. mu = posterior_mean(x0_hat, x_t) - s * g,  g = dL/dx0_hat (default) or dL/dx_t
    5. x_{t-1} = mu + exp(log_var / 2) z                     (no noise at the last step)
    6. s <- adaptive_guidance_scale(...)                     (adaptive_scale)

Gradient (step 4). GDP's and BIR-D's code take the gradient w.r.t. the *detached* x0_hat
(``x_in = pred_xstart.detach()``) and add it to the mean without the variance factor Sigma; this
is the default (``guidance_grad="x0"``). ``guidance_grad="x_t"`` back-propagates through x0_hat
and the network to x_t (the classifier-guidance form the papers' derivation starts from).

Sign convention: here the mean moves *down* the loss, ``mu - s g`` with ``s >= 0``. The BIR-D
code writes ``mu + g'`` with ``g' = d(s' L)/dx0_hat`` and ``s' = -|s|/9 < 0`` after the first step,
but starts from ``s' = +3000``, i.e. its first step climbs the loss (our ``s = -3000``).

Reference quirks, selectable (defaults follow the paper's text):
- ``scale_formula="reference"``: log-variance where the formula has the variance, ``|s| / 9``;
- ``guidance_scale=-3000`` with ``scale_min<0``: the code's first, loss-increasing step;
- ``KernelMaskOperator(use_mask=False)``: the deblurring code leaves M out of its loss;
- ``noisy_observation=True``: the deblurring code compares with y noised to level t.
The adaptive formula's C and K are taken from the code's (commented-out) implementation; the
paper's section and equation numbers could not be checked offline, so none are cited.

Images larger than the prior are sampled on an overlapping patch grid (patch = prior size,
stride = patch / 2; ``bir.lit.patches``): the network runs on every patch, x0_hat and the
log-variance are averaged over overlaps, and the loss, the operator and the guidance act on the
whole image, so the operator's parameters are shared by all patches of an image.
"""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from bir.diffusion.prior import PixelPrior
from bir.diffusion.schedules import DiffusionSchedule, space_timesteps
from bir.lit.patches import extract_patches, fold_patches, num_patches
from bir.operators.base import Operator
from bir.random import randn, sample_generators

log = logging.getLogger(__name__)

Tensor = torch.Tensor

# Independent random streams per image (bir.random): initial noise, per-step noise, noise added
# to the observation, the operator's initial parameters.
INIT_STREAM, STEP_NOISE_STREAM, OBSERVATION_STREAM, OPERATOR_STREAM = 0, 1, 2, 3


def gaussian_log_likelihood(
    target: Tensor, mean: Tensor, log_var: Tensor, formula: str = "paper"
) -> Tensor:
    """Per-image log-density of ``target`` under N(mean, diag(exp(log_var))): ``[B]``.

    ``paper``: ``-1/2 sum (target - mean)^2 / var - 1/2 sum log(2 pi var)``.
    ``reference``: the BIR-D code's version, which puts the *log*-variance where the standard
    deviation belongs and takes the log of a summed determinant:
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
    formula: str = "paper",
) -> Tensor:
    """BIR-D's empirical ("adaptive") guidance scale, per image ``[B]``.

    Matching the first-order expansion of the guided transition around its mean,
    ``log p(x_{t-1} | x_t, y) ~ (x_{t-1} - mu)^T g + C``, with ``log p(y | x_t) = log K - s L``
    gives ``s = -[(x_{t-1} - mu)^T g + C + log K] / L`` where
    ``C = log N(y; mu, Sigma_t)`` (the Gaussian's constant at the new mean) and
    ``log K = log N(y; x_t, Sigma_{t+1})`` (the previous state and variance), both from
    :func:`gaussian_log_likelihood`, and ``L`` is the data loss at the new sample.

    Args:
        x_prev: the sample x_{t-1}, ``[B, C, H, W]`` in [-1, 1].
        mean: the guided mean mu it was drawn around.
        direction: g, the guidance gradient (paper) or the applied mean shift (reference).
        loss: L, ``[B]``, positive.
        log_like_c, log_like_k: ``C`` and ``log K``, ``[B]``.
        formula: ``paper`` returns the expression above; ``reference`` follows the BIR-D code,
            ``|(x_{t-1} - mu)^T g + C + log K| / (9 L)`` (the code's ``-|s| / 9`` in our sign).
    Returns:
        ``[B]`` unclamped scale (may be non-finite; the caller guards).
    """
    inner = ((x_prev - mean) * direction).flatten(1).sum(1) + log_like_c + log_like_k
    if formula == "paper":
        return -inner / loss
    if formula == "reference":
        return (inner / loss).abs() / 9.0
    raise ValueError(f"formula must be paper or reference, got {formula!r}")


class BIRD_D(pl.LightningModule):
    """BIR-D / GDP predict module (``predict_step`` per docs/contracts.md).

    Args:
        prior: frozen pixel prior with learned variance (ADM); its ``image_size`` is the patch size.
        operator: the forward model ``A_phi`` (``bir.operators``), e.g. ``KernelMaskOperator``.
        steps: respacing of the 1000 training steps (``space_timesteps`` spec), None = all.
        guidance_scale: the fixed scale (GDP, ``adaptive_scale=False``) or the starting scale.
        adaptive_scale: update s every step with :func:`adaptive_guidance_scale`.
        dynamic_kernel: update the operator's parameters every step (kernel, mask, factor).
        operator_lr: step size for operator parameter groups that do not set their own.
        guidance_grad: ``x0`` (gradient w.r.t. detached x0_hat, GDP / BIR-D code) or ``x_t``.
        scale_formula: ``paper`` | ``reference`` (see :func:`adaptive_guidance_scale` and
            :func:`gaussian_log_likelihood`).
        scale_min / scale_max: bounds on the adaptive s.
        loss: ``mse`` | ``l1`` distance between ``A(x0_hat)`` and y (weighted by the operator's
            ``loss_mask`` when it has one).
        noisy_observation: compare against ``q_sample(y, t)`` rather than y (BIR-D deblur code).
        patch_stride: stride of the patch grid (None: half the prior's image size).
        patch_batch_size: patches per network call (None: all at once).
        seed: run seed; per-image generators derive from it and ``batch["index"]``.
    """

    def __init__(
        self,
        prior: PixelPrior,
        operator: Operator,
        steps: int | str | None = None,
        guidance_scale: float = 3000.0,
        adaptive_scale: bool = True,
        dynamic_kernel: bool = True,
        operator_lr: float = 0.01,
        guidance_grad: str = "x0",
        scale_formula: str = "paper",
        scale_min: float = 0.0,
        scale_max: float = 2e4,
        loss: str = "mse",
        noisy_observation: bool = False,
        patch_stride: int | None = None,
        patch_batch_size: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if guidance_grad not in ("x0", "x_t"):
            raise ValueError(f"guidance_grad must be x0 or x_t, got {guidance_grad!r}")
        if scale_formula not in ("paper", "reference"):
            raise ValueError(f"scale_formula must be paper or reference, got {scale_formula!r}")
        if loss not in ("mse", "l1"):
            raise ValueError(f"loss must be mse or l1, got {loss!r}")
        if scale_min > scale_max:
            raise ValueError(f"scale_min {scale_min} > scale_max {scale_max}")
        self.prior, self.operator = prior, operator
        self.guidance_scale, self.adaptive_scale = float(guidance_scale), adaptive_scale
        self.dynamic_kernel, self.operator_lr = dynamic_kernel, operator_lr
        self.guidance_grad, self.scale_formula = guidance_grad, scale_formula
        self.scale_min, self.scale_max = scale_min, scale_max
        self.loss_kind, self.noisy_observation = loss, noisy_observation
        self.patch_size = int(prior.image_size)
        self.patch_stride = patch_stride or max(self.patch_size // 2, 1)
        self.patch_batch_size, self.seed = patch_batch_size, seed
        T = len(prior.betas)
        timesteps = None if steps is None else space_timesteps(T, steps)
        self.schedule = DiffusionSchedule(prior.betas.detach().cpu(), timesteps)

    # --- pieces ----------------------------------------------------------------------------------
    def data_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-image distance ``[B]`` between ``A(x)`` and y (both in [0, 1] scale)."""
        diff = pred - target
        err = diff.square() if self.loss_kind == "mse" else diff.abs()
        weight = self.operator.loss_mask()
        if weight is not None:
            err = err * weight.to(err)
        return err.flatten(1).mean(1)

    def _predict(self, x_t: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """Prior on the patch grid: (x0_hat clamped to [-1, 1], log-variance), both ``[B, C, H, W]``."""
        b, _, h, w = x_t.shape
        patches = extract_patches(x_t, self.patch_size, self.patch_stride)
        n = patches.shape[0]
        idx = torch.full((n,), i, dtype=torch.long, device=x_t.device)
        t = self.schedule.t(idx.cpu()).to(x_t.device)
        chunk = self.patch_batch_size or n
        x0s, log_vars = [], []
        for lo in range(0, n, chunk):
            sl = slice(lo, lo + chunk)
            eps, var_values = self.prior.split_output(self.prior(patches[sl], t[sl]))
            x0s.append(self.schedule.x0_from_eps(patches[sl], idx[sl], eps).clamp(-1, 1))
            if var_values is None:  # a fixed-variance prior: "fixed small" posterior variance
                log_vars.append(
                    self.schedule.posterior_log_variance(idx[sl], patches[sl]).expand_as(eps)
                )
            else:
                log_vars.append(self.schedule.learned_range_log_variance(var_values, idx[sl]))
        x0 = fold_patches(torch.cat(x0s), h, w, self.patch_size, self.patch_stride)
        log_var = fold_patches(torch.cat(log_vars), h, w, self.patch_size, self.patch_stride)
        return x0, log_var

    def _update_operator(self, grads: list[Tensor | None], params: list[Tensor], lrs: list[float],
                         finite: Tensor) -> None:  # fmt: skip
        """Plain gradient descent ``p <- p - lr * grad`` (reference), skipping images whose loss
        was not finite."""
        with torch.no_grad():
            for p, g, lr in zip(params, grads, lrs):
                if g is None:
                    continue
                g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
                if p.shape[0] == finite.shape[0]:
                    g = g * finite.reshape(-1, *([1] * (g.ndim - 1))).to(g)
                elif not bool(finite.all()):
                    continue
                p.sub_(lr * g)

    @staticmethod
    def _to_observation_size(x: Tensor, like: Tensor) -> Tensor:
        """Average-pool x to like's spatial size (identity when they match)."""
        if x.shape[-2:] == like.shape[-2:]:
            return x
        return F.adaptive_avg_pool2d(x, like.shape[-2:])

    def _next_scale(self, x_t: Tensor, x_prev: Tensor, mean: Tensor, grad: Tensor, shift: Tensor,
                    log_var: Tensor, prev_log_var: Tensor, target: Tensor) -> Tensor:  # fmt: skip
        """The adaptive s for the next step, ``[B]`` float64 (NaN where it is not defined).

        ``C`` and ``log K`` compare y (mapped to [-1, 1]) with the guided mean / the previous
        state, pooled to y's size when the operator changes the size (SR). ``L`` is the data
        term at the new sample x_{t-1}; a loss below 1e-12 makes s undefined (NaN).
        """
        y_pm = 2 * target - 1
        size = self._to_observation_size
        like_c = gaussian_log_likelihood(
            y_pm, size(mean, y_pm), size(log_var, y_pm), self.scale_formula
        )
        like_k = gaussian_log_likelihood(
            y_pm, size(x_t, y_pm), size(prev_log_var, y_pm), self.scale_formula
        )
        loss = self.data_loss(self.operator((x_prev + 1) / 2), target).double()
        direction = grad if self.scale_formula == "paper" else shift
        new = adaptive_guidance_scale(x_prev.double(), mean.double(), direction.double(), loss,
                                      like_c.double(), like_k.double(), self.scale_formula)  # fmt: skip
        return torch.where(loss > 1e-12, new, torch.full_like(new, float("nan")))

    # --- the sampler -----------------------------------------------------------------------------
    def sample(
        self, y: Tensor, indices: Tensor, names: list[str] | None = None
    ) -> dict[str, Tensor]:
        """Restore a batch of observations.

        Args:
            y: ``[B, C', h, w]`` in [0, 1].
            indices: ``LongTensor[B]`` global sample indices (seeds).
            names: image names for error messages.
        Returns:
            dict with ``restored`` ``[B, C, H, W]`` in [0, 1], ``scale_trajectory`` and
            ``loss_curve`` ``[B, steps]`` (in sampling order, first = noisiest step) and the
            operator's estimates.
        """
        device, b = y.device, y.shape[0]
        names = names or [str(int(k)) for k in indices]
        hw = tuple(y.shape[-2:])
        if hasattr(self.operator, "input_size"):  # e.g. SR: x is larger than y
            hw = tuple(self.operator.input_size(hw))
        shape = (self.prior.channels, *hw)
        num_patches(hw[0], hw[1], self.patch_size, self.patch_stride)  # validates the size early

        self.operator.init_batch(b, sample_generators(self.seed, indices, device, OPERATOR_STREAM))
        step_gens = sample_generators(self.seed, indices, device, STEP_NOISE_STREAM)
        obs_gens = sample_generators(self.seed, indices, device, OBSERVATION_STREAM)
        x = randn(shape, sample_generators(self.seed, indices, device, INIT_STREAM), device)
        y_pm = 2 * y - 1
        scale = torch.full((b,), self.guidance_scale, device=device, dtype=torch.float64)
        # Sigma_{t+1} for log K at the first step: unit standard deviation (the code's ones)
        prev_log_var = torch.full_like(x, 0.0 if self.scale_formula == "paper" else 1.0)
        n_steps = len(self.schedule)
        scales = torch.zeros(b, n_steps, dtype=torch.float64)
        losses = torch.zeros(b, n_steps, dtype=torch.float64)

        for k, i in enumerate(range(n_steps - 1, -1, -1)):
            i_vec = torch.full((b,), i, dtype=torch.long, device=device)
            target = y
            if self.noisy_observation:
                noise = randn(y.shape[1:], obs_gens, device)
                target = (self.schedule.q_sample(y_pm, i_vec, noise) + 1) / 2

            # 1. prediction of x0 and the learned variance
            x_in = x.detach().requires_grad_(self.guidance_grad == "x_t")
            x0, log_var = self._predict(x_in, i)
            mean = self.schedule.posterior_mean(x0, x_in, i_vec)
            wrt = x0.detach().requires_grad_(True) if self.guidance_grad == "x0" else x_in

            # 2. data term on x0_hat in [0, 1]
            x0_for_loss = wrt if self.guidance_grad == "x0" else x0
            loss = self.data_loss(self.operator((x0_for_loss + 1) / 2), target)
            finite = torch.isfinite(loss)
            for j in torch.nonzero(~finite).flatten().tolist():
                log.warning("BIR-D: non-finite loss for %s at t=%d; guidance skipped this step",
                            names[j], int(self.schedule.timesteps[i]))  # fmt: skip
            groups = self.operator.param_groups(self.operator_lr) if self.dynamic_kernel else []
            params = [p for g in groups for p in g["params"]]
            lrs = [g["lr"] for g in groups for _ in g["params"]]
            total = torch.where(finite, loss, 0.0).sum()
            if total.requires_grad:
                grads = torch.autograd.grad(total, [wrt, *params], allow_unused=True)
            else:  # no finite loss carries a graph: nothing to follow this step
                grads = (None,) * (1 + len(params))
            grad = torch.zeros_like(x) if grads[0] is None else torch.nan_to_num(grads[0])
            grad = grad * finite.reshape(-1, 1, 1, 1).to(x)

            # 3. degradation update (same graph: the gradient above used the old parameters)
            self._update_operator(list(grads[1:]), params, lrs, finite)

            # 4.-5. guided mean and ancestral sample
            with torch.no_grad():
                s = scale.to(x.dtype).reshape(-1, 1, 1, 1)
                shift = -s * grad
                mean = mean.detach() + shift
                log_var = log_var.detach()
                x_next = mean
                if i > 0:
                    x_next = mean + torch.exp(0.5 * log_var) * randn(shape, step_gens, device)

            scales[:, k] = scale.cpu()
            losses[:, k] = loss.detach().double().cpu()

            # 6. adaptive guidance scale for the next step (none after the last step)
            if self.adaptive_scale and i > 0:
                with torch.no_grad():
                    new = self._next_scale(
                        x, x_next, mean, grad, shift, log_var, prev_log_var, target
                    )
                for j in torch.nonzero(~torch.isfinite(new)).flatten().tolist():
                    log.warning(
                        "BIR-D: non-finite guidance scale for %s at t=%d; keeping s=%g",
                        names[j], int(self.schedule.timesteps[i]), float(scale[j]),
                    )  # fmt: skip
                bounded = new.clamp(self.scale_min, self.scale_max)
                scale = torch.where(torch.isfinite(new), bounded, scale)
            prev_log_var = log_var
            x = x_next.detach()

        restored = ((x + 1) / 2).clamp(0, 1)
        bad = torch.nonzero(~torch.isfinite(x).flatten(1).all(1)).flatten().tolist()
        if bad:
            raise RuntimeError(f"BIR-D produced a non-finite image for {[names[j] for j in bad]}")
        out = {
            "restored": restored,
            "scale_trajectory": scales.float(),
            "loss_curve": losses.float(),
        }
        out.update(self.operator.estimate())
        return out

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> dict:
        """``batch``: ``lq`` ``[B, C, h, w]`` in [0, 1], ``name``, ``index``. Returns ``name``,
        ``restored``, ``kernel`` (when the operator has one), ``scale_trajectory``,
        ``loss_curve`` and ``extras`` (the operator's other estimates)."""
        # Lightning predicts under inference mode; the sampler needs autograd for the guidance.
        with torch.inference_mode(False), torch.enable_grad():
            y = batch["lq"].clone()
            indices = batch["index"]
            indices = indices.clone() if isinstance(indices, Tensor) else torch.as_tensor(indices)
            names = list(batch["name"])
            out = self.sample(y, indices, names)
        pred = {"name": names, "restored": out.pop("restored"),
                "scale_trajectory": out.pop("scale_trajectory"), "loss_curve": out.pop("loss_curve")}  # fmt: skip
        if "kernel" in out:
            pred["kernel"] = out.pop("kernel")
        # per-image scalars and short vectors go to the records; image-sized estimates (masks) not
        b = pred["restored"].shape[0]
        pred["extras"] = {
            k: v for k, v in out.items() if v.shape[:1] == (b,) and v[0].numel() <= 64
        }
        return pred

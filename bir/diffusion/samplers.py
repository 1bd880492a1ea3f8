"""Samplers for discrete-time diffusion models, as plain functions in the k-diffusion style.

Every sampler takes ``model(x_t, i) -> ModelOutput`` (see :mod:`bir.diffusion.parameterization`),
the starting noise ``x_T`` and the :class:`~bir.diffusion.schedules.DiffusionSchedule` whose used
steps it walks from the last (noisiest) index down to 0, and returns the final sample in the
model's range. ``callback`` (optional) is called once per step with a dict

    {"i": int step index, "t": int original timestep, "x": x_t at the start of the step,
     "x0": the x0 estimate the step used (after clipping and guidance)}.

Random draws come from per-sample generators (:func:`bir.random.randn_like`), so a sample does not
depend on the batch it was drawn in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from bir.diffusion.parameterization import ModelOutput
from bir.diffusion.schedules import DiffusionSchedule
from bir.random import randn_like

Tensor = torch.Tensor
Model = Callable[[Tensor, Tensor], ModelOutput]
Callback = Callable[[dict], None]
#: guidance(x_t, i, out, mean, log_variance) -> (new_mean or None, new_x0 or None)
Guidance = Callable[
    [Tensor, Tensor, ModelOutput, Tensor, Tensor], tuple[Tensor | None, Tensor | None]
]


def _step_index(i: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)


def sample_ddpm(
    model: Model,
    x_T: Tensor,
    schedule: DiffusionSchedule,
    generators: Sequence[torch.Generator],
    guidance: Guidance | None = None,
    callback: Callback | None = None,
    clip_x0: bool = True,
) -> Tensor:
    """Ancestral sampling (DDPM, Ho et al. 2020, Algorithm 2; respaced and with learned
    variance as IDDPM, Nichol & Dhariwal 2021).

    Each step: x0 = model's estimate (clipped to [-1, 1] if ``clip_x0``), mean = posterior mean
    of q(x_{t-1} | x_t, x0) (DDPM eq. 7), log-variance from the model (fixed small / large /
    learned range), then ``x_{t-1} = mean + exp(log_var / 2) z`` with ``z ~ N(0, I)`` from the
    per-sample generators; no noise on the last step (i = 0), as guided-diffusion.

    Args:
        model: ``(x_t, i) -> ModelOutput``; it must provide ``log_variance``, else the
            schedule's fixed-small variance is used.
        x_T: starting noise ``[B, C, H, W]``.
        schedule: the (respaced) schedule; steps ``len(schedule) - 1 .. 0`` are taken.
        generators: one ``torch.Generator`` per sample (``bir.random.sample_generators``).
        guidance: optional hook called every step *after* clipping, as
            ``guidance(x_t, i, out, mean, log_variance) -> (new_mean, new_x0)`` with ``x_t``
            ``[B, C, H, W]``, ``i`` LongTensor[B] (step indices; the original timestep is
            ``schedule.t(i)``), ``out`` the :class:`ModelOutput` whose ``x0`` is already clipped,
            ``mean`` the posterior mean and ``log_variance`` the step's log-variance (both
            broadcastable to ``x_t``). Return either element as None to keep it:
            ``(None, x0')`` recomputes the mean from ``x0'``
            (:class:`~bir.diffusion.guidance.LatentImageGuidance`, DiffBIR v2 units),
            ``(mean', None)`` replaces the mean (:class:`~bir.lit.bir_d.OperatorGuidance` of GDP
            and BIR-D: ``mean - s * dL/dx0``), ``(mean', x0')`` sets both, x0' only reported to
            the callback (``LatentImageGuidance`` in DiffBIR v1 units). The hook may use
            ``torch.enable_grad()`` inside even when the caller samples under ``no_grad``
            (``OperatorGuidance`` does). If the guidance object also has a method
            ``after_step(x_t, x_prev, i, mean, log_variance)``, it is called once x_{t-1} is
            drawn, with the mean and log-variance it was drawn from (``OperatorGuidance``
            computes BIR-D's adaptive scale there; with GDP's fixed scale it changes nothing).
        callback: see the module docstring.
        clip_x0: clamp x0 to [-1, 1] before the posterior mean (ADM ``clip_denoised``).

    Returns:
        ``x_0`` ``[B, C, H, W]``. The loop is not wrapped in ``no_grad``: call it under
        ``torch.no_grad()`` unless gradients through the chain are wanted.
    """
    x = x_T
    for step in reversed(range(len(schedule))):
        i = _step_index(step, x)
        out = model(x, i)
        x0 = out.x0.clamp(-1, 1) if clip_x0 else out.x0
        out = dataclasses.replace(out, x0=x0)  # keeps a subclass's extra fields (patch grids)
        mean = schedule.posterior_mean(x0, x, i)
        log_variance = out.log_variance
        if log_variance is None:
            log_variance = schedule.posterior_log_variance(i, x)
        if guidance is not None:
            new_mean, new_x0 = guidance(x, i, out, mean, log_variance)
            if new_x0 is not None:
                x0 = new_x0
                if new_mean is None:
                    new_mean = schedule.posterior_mean(x0, x, i)
            if new_mean is not None:
                mean = new_mean
        if callback is not None:
            callback({"i": step, "t": int(schedule.timesteps[step]), "x": x, "x0": x0})
        if step > 0:
            x_prev = mean + torch.exp(0.5 * log_variance) * randn_like(x, generators)
        else:
            x_prev = mean
        after_step = getattr(guidance, "after_step", None)
        if after_step is not None:
            after_step(x, x_prev, i, mean, log_variance)
        x = x_prev
    return x


class _NoGradNetwork(torch.nn.Module):
    """``net`` evaluated under ``torch.no_grad()``: to autograd its output is a constant."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.net(*args, **kwargs)


def network_grad(net: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """Decide whether gradients flow through a denoising network.

    ``enabled``: ``net`` itself (full backpropagation: one network backward per step and the
    activations of every call held in memory). Otherwise ``net`` wrapped to run under
    ``no_grad``. Wrap the *raw* network, below the parameterisation adapter, e.g.
    ``DiffusionModel(network_grad(prior, False), schedule)``: the adapter's arithmetic on
    ``x_t`` (``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)``, and in :func:`sample_ddim` eps
    re-derived from the clamped x0) stays differentiable, so a loss on the sample still reaches
    ``x_T`` through the explicit ``x_t`` terms of every update, with the network's output held
    constant. That is BIRD's released ``DDIM_efficient_feed_forward`` (the UNet under
    ``no_grad``, the scheduler step outside it): for an eps network and eta 0 each update is
    element-wise linear in ``x_t`` with slope ``m sqrt(abar'/abar) + (1 - m) sqrt((1 - abar') /
    (1 - abar))``, ``m`` = 1 where x0 lies inside [-1, 1] (unclamped).

    Args:
        net: the network (any ``nn.Module``; called with whatever the adapter passes).
        enabled: let gradients flow through it.
    """
    return net if enabled else _NoGradNetwork(net)


def sample_ddim(
    model: Model,
    x_T: Tensor,
    schedule: DiffusionSchedule,
    eta: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
    clip_x0: bool = True,
) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12).

    ``x_prev = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')`` (eq. 16); eta = 0 is
    the deterministic sampler (a first-order solver of the probability-flow ODE), eta = 1 is
    ancestral DDPM with fixed-small variance. When ``clip_x0``, eps is recomputed from the
    clipped x0 (as guided-diffusion's ``ddim_sample``). The last step (abar' = 1) returns x0.

    Differentiable end to end: no ``no_grad`` inside, so gradients flow to ``x_T``; whether they
    also flow through the network is the model's business (:func:`network_grad`). The clamp is
    ``torch.clamp``: zero gradient where x0 leaves [-1, 1], as the released code's. BIRD
    (:class:`bir.lit.bird.BIRD`) optimises ``x_T`` through this sampler with eta 0, a few large
    steps (:func:`bir.diffusion.schedules.diffusers_ddim_timesteps`) and ``clip_x0``: the
    released diffusers step with ``use_clipped_model_output=True``.

    Args:
        model: ``(x_t, i) -> ModelOutput``.
        x_T: starting noise ``[B, C, H, W]``.
        schedule: the (respaced) schedule; BIRD's ``delta_t = 100`` is ``timesteps = 0, 100 ... 900``.
        eta: stochasticity; > 0 needs ``generators``.
        generators: one per sample, for eta > 0.
        callback: see the module docstring.
        clip_x0: clamp x0 to [-1, 1] every step.
    """
    if eta > 0 and generators is None:
        raise ValueError("sample_ddim with eta > 0 needs per-sample generators")
    x = x_T
    for step in reversed(range(len(schedule))):
        i = _step_index(step, x)
        out = model(x, i)
        x0, eps = out.x0, out.eps
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = schedule.eps_from_x0(x, i, x0)
        if callback is not None:
            callback({"i": step, "t": int(schedule.timesteps[step]), "x": x, "x0": x0})
        abar = float(schedule.alphas_cumprod[step])
        abar_prev = float(schedule.alphas_cumprod_prev[step])
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn_like(x, generators)
    return x


def sample_dpmpp_2m(
    model: Model,
    x_T: Tensor,
    schedule: DiffusionSchedule,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models", Algorithm 2), the multistep second-order solver of the
    probability-flow ODE in data-prediction form, in VP coordinates.

    With ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``, ``lambda = log(alpha / sigma)`` and
    ``h = lambda_next - lambda_cur``:
    ``x_next = (sigma_next / sigma_cur) x - alpha_next (exp(-h) - 1) D`` where
    ``D = (1 + 1/(2r)) x0_cur - 1/(2r) x0_prev``, ``r = h_prev / h`` (first order, D = x0_cur,
    on the first step). The last step goes to abar = 1 (sigma = 0) and returns x0, as
    k-diffusion's ``sample_dpmpp_2m``. No clipping (as k-diffusion).

    Args:
        model: ``(x_t, i) -> ModelOutput``.
        x_T: starting noise ``[B, C, H, W]``.
        schedule: the (respaced) schedule (e.g. ``space_timesteps(1000, 20)``).
        callback: see the module docstring.
    """
    x = x_T
    x0_prev: Tensor | None = None
    h_prev: float | None = None
    for step in reversed(range(len(schedule))):
        i = _step_index(step, x)
        x0 = model(x, i).x0
        if callback is not None:
            callback({"i": step, "t": int(schedule.timesteps[step]), "x": x, "x0": x0})
        abar = float(schedule.alphas_cumprod[step])
        abar_next = float(schedule.alphas_cumprod_prev[step])
        if abar_next >= 1.0:  # final step to sigma = 0: the denoised estimate itself
            x = x0
            break
        alpha_next, sigma_cur, sigma_next = (
            math.sqrt(abar_next),
            math.sqrt(1 - abar),
            math.sqrt(1 - abar_next),
        )
        lam_cur = 0.5 * math.log(abar / (1 - abar)) if abar > 0 else -math.inf
        lam_next = 0.5 * math.log(abar_next / (1 - abar_next))
        h = lam_next - lam_cur
        denoised = x0
        if x0_prev is not None and h_prev is not None and math.isfinite(h_prev):
            r = h_prev / h
            denoised = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        # -(exp(-h) - 1) = -expm1(-h); sigma_cur may be 1 (zero-terminal SNR): ratio still finite
        x = (sigma_next / sigma_cur) * x - alpha_next * math.expm1(-h) * denoised
        x0_prev, h_prev = x0, h
    return x

"""Samplers in the continuous noise-level (sigma) form of Karras et al. 2022 ("Elucidating the
Design Space of Diffusion-Based Generative Models", EDM), with k-diffusion's signature.

A discrete VP model (eps- or v-prediction, trained on ``alpha_bar_t``) is seen as a denoiser of
the variance-exploding variable ``x = x_t / sqrt(alpha_bar_t)`` at noise level
``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``:

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, t(sigma))

with ``c_in = 1 / sqrt(sigma^2 + 1)`` (back to the VP input ``x_t``) and, for eps-prediction,
``c_skip = 1``, ``c_out = -sigma`` (EDM Table 1, "VP"); for v-prediction (Salimans & Ho 2022)
``c_skip = 1 / (sigma^2 + 1)``, ``c_out = -sigma / sqrt(sigma^2 + 1)``. The network's timestep
``t(sigma)`` is the schedule's timestep whose sigma is nearest (:class:`DiscreteVPDenoiser`).

Samplers are plain functions ``sample_x(model, x, sigmas, extra_args=None, callback=None, ...)``
where ``model(x, sigma_batch, **extra_args)`` returns the denoised estimate, ``x`` starts at noise
level ``sigmas[0]`` and ``sigmas`` decreases to 0. ``callback`` receives
``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per step. Random draws come from a
``noise_sampler(sigma, sigma_next)`` returning unit Gaussian noise shaped like ``x``; by default
per-sample generators (:func:`gaussian_noise_sampler`), so a sample does not depend on its batch.

:func:`release_edm_sigmas` is the noise-level schedule of DiffBIR v2.1's ``EDMSampler``
(``diffbir/sampler/edm_sampler.py``), whose default solver is :func:`sample_dpmpp_3m_sde`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from bir.random import randn_like

Tensor = torch.Tensor
Denoiser = Callable[..., Tensor]
NoiseSampler = Callable[[float, float], Tensor]


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """``sigma = sqrt((1 - abar) / abar)``: the VE noise level of a VP marginal (float64)."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1 - abar) / abar).sqrt()


def release_edm_sigmas(
    alphas_cumprod: Tensor, steps: int, first_alpha_cumprod: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """Noise levels and network timesteps of DiffBIR v2.1's EDM sampler.

    Timesteps ``floor(linspace(T - 1, 0, steps, endpoint=False))`` (999, 899, ..., 99 for 10 of
    1000), noise levels from their ``alpha_bar`` with the first (noisiest) one replaced by
    ``first_alpha_cumprod`` (1e-8: sigma = 1e4, finite even under zero-terminal SNR, where
    ``alpha_bar_999 = 0``), then a final sigma 0 (timestep 0) for the denoising step.

    Args:
        alphas_cumprod: ``alpha_bar`` of the full training schedule, ``[T]``.
        steps: sampling steps (network evaluations of a first-order solver).

    Returns:
        ``(sigmas [steps + 1] float64, timesteps [steps + 1] long)``, descending.
    """
    abar_full = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    T = len(abar_full)
    if not 0 < steps <= T:
        raise ValueError(f"steps must lie in [1, {T}], got {steps}")
    # numpy's linspace(T - 1, 0, steps, endpoint=False).astype(int): start + k * (-(T - 1) / steps)
    ts = [int((T - 1) + k * (-(T - 1) / steps)) for k in range(steps)]
    abar = abar_full[torch.tensor(ts)].clone()
    abar[0] = first_alpha_cumprod
    sigmas = torch.cat([sigmas_from_alphas_cumprod(abar), torch.zeros(1, dtype=torch.float64)])
    timesteps = torch.tensor([*ts, 0], dtype=torch.long)
    return sigmas, timesteps


class DiscreteVPDenoiser:
    """``D(x, sigma)`` of a discrete-time VP network (see the module docstring).

    Args:
        model: ``model(x_t, t) -> raw output`` (eps or v) for VP inputs ``x_t`` ``[B, C, H, W]``
            and LongTensor timesteps ``t`` ``[B]``.
        sigmas: the noise levels the sampler visits (float), paired with ``timesteps``: a sigma
            is mapped to the timestep of the nearest listed sigma (as DiffBIR v2.1; k-diffusion
            interpolates in log-sigma instead, which differs off the grid only).
        timesteps: network timesteps of ``sigmas``.
        prediction: ``eps`` or ``v``.
    """

    def __init__(
        self,
        model: Callable[[Tensor, Tensor], Tensor],
        sigmas: Tensor,
        timesteps: Tensor,
        prediction: str = "eps",
    ):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be eps or v, got {prediction!r}")
        if len(sigmas) != len(timesteps):
            raise ValueError(f"{len(sigmas)} sigmas but {len(timesteps)} timesteps")
        self.model, self.prediction = model, prediction
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.long)

    def timestep(self, sigma: Tensor) -> Tensor:
        """Network timesteps ``[B]`` of noise levels ``sigma`` ``[B]`` (nearest listed sigma)."""
        dist = (sigma.detach().double().cpu()[:, None] - self.sigmas[None, :]).abs()
        return self.timesteps[dist.argmin(dim=1)].to(sigma.device)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in)`` for ``sigma`` ``[B]``, each ``[B]``."""
        s2 = sigma**2 + 1
        c_in = s2.rsqrt()
        if self.prediction == "eps":
            return torch.ones_like(sigma), -sigma, c_in
        return 1 / s2, -sigma * c_in, c_in

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Denoised estimate ``[B, C, H, W]`` of ``x`` at noise levels ``sigma`` ``[B]``."""
        c_skip, c_out, c_in = (
            c.to(x.dtype).view(-1, *[1] * (x.ndim - 1)) for c in self.scalings(sigma)
        )
        raw = self.model(x * c_in, self.timestep(sigma))
        return c_skip * x + c_out * raw


def gaussian_noise_sampler(x: Tensor, generators: Sequence[torch.Generator]) -> NoiseSampler:
    """``(sigma, sigma_next) -> N(0, I)`` shaped like ``x``, row b from ``generators[b]``.

    The SDE samplers need one unit-Gaussian increment per step; k-diffusion's default is a
    Brownian tree (torchsde), whose increments are also unit Gaussian but drawn from a different
    stream, so the same seed gives different samples.
    """
    return lambda sigma, sigma_next: randn_like(x, generators)


def sample_dpmpp_3m_sde(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> Tensor:
    """DPM-Solver++(3M) SDE (Lu et al. 2022, "DPM-Solver++", third-order multistep in
    data-prediction form, with the SDE variant's noise injection as k-diffusion's
    ``sample_dpmpp_3m_sde``, the default sampler of DiffBIR v2.1).

    In half-log-SNR time ``lambda = -log sigma``, step ``h = lambda_next - lambda`` and
    ``h_eta = (1 + eta) h``; with the last denoised estimates ``D0, D1, D2`` (steps ``h, h1,
    h2``):

        x <- exp(-h_eta) x + (1 - exp(-h_eta)) D0                       (first order)
           + phi2 d1 - phi3 d2                                          (multistep corrections)
           + sigma_next sqrt(1 - exp(-2 eta h)) s_noise z,  z ~ N(0, I) (eta > 0)

    where ``r0 = h1/h``, ``r1 = h2/h``, ``d1_0 = (D0 - D1)/r0``, ``d1_1 = (D1 - D2)/r1``,
    ``d1 = d1_0 + (d1_0 - d1_1) r0/(r0 + r1)``, ``d2 = (d1_0 - d1_1)/(r0 + r1)``,
    ``phi2 = 1 - (1 - exp(-h_eta))/h_eta``, ``phi3 = phi2/h_eta - 1/2``; the second step uses
    only ``d1_0`` (second order), the first none. A step to sigma = 0 returns the denoised
    estimate.
    ``eta = 0`` is the deterministic DPM-Solver++(3M) ODE solver.

    Args:
        model: ``model(x, sigma [B], **extra_args) -> denoised``.
        x: start ``[B, C, H, W]`` at noise level ``sigmas[0]`` (``sigmas[0] * N(0, I)`` for pure
            noise; DiffBIR v2.1 scales a unit-variance VP start by ``sqrt(1 + sigmas[0]^2)``).
        sigmas: decreasing noise levels ending at 0, ``[N + 1]``.
        extra_args: keyword arguments for ``model``.
        callback: see the module docstring.
        eta: SDE noise (1: the SDE solver; 0: ODE).
        s_noise: multiplier of the injected noise.
        noise_sampler: ``(sigma, sigma_next) -> unit Gaussian`` like ``x``; default from
            ``generators``.
        generators: one per sample, for the default noise sampler (needed when ``eta > 0`` and no
            ``noise_sampler`` is given).
    """
    extra_args = extra_args or {}
    if eta > 0 and noise_sampler is None:
        if generators is None:
            raise ValueError("sample_dpmpp_3m_sde with eta > 0 needs generators or a noise_sampler")
        noise_sampler = gaussian_noise_sampler(x, generators)
    sig = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64)]
    ones = x.new_ones(x.shape[0])
    denoised_1: Tensor | None = None  # D at the previous step
    denoised_2: Tensor | None = None  # D two steps back
    h_1: float | None = None
    h_2: float | None = None
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = model(x, sigma * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:  # the final denoising step
            x = denoised
            h = None
        else:
            h = math.log(sigma) - math.log(sigma_next)  # lambda_next - lambda, lambda = -log sigma
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            # coefficients of the higher-order terms: phi2 = 1 - (1 - e^{-h_eta}) / h_eta
            phi2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None and denoised_2 is not None:  # third order
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi3 = phi2 / h_eta - 0.5
                x = x + phi2 * d1 - phi3 * d2
            elif h_1 is not None:  # second order
                x = x + phi2 * (denoised - denoised_1) / (h_1 / h)
            if eta > 0:
                scale = sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
                x = x + scale * noise_sampler(sigma, sigma_next)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


__all__ = [
    "DiscreteVPDenoiser",
    "gaussian_noise_sampler",
    "release_edm_sigmas",
    "sample_dpmpp_3m_sde",
    "sigmas_from_alphas_cumprod",
]

"""EDM-form samplers and the released DiffBIR timestep conventions, against closed forms:
Gaussian data (whose denoiser and probability-flow ODE are known exactly), hand-computed steps
and hand-listed timesteps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bir.diffusion.k_samplers import (
    DiscreteVPDenoiser,
    gaussian_noise_sampler,
    release_edm_sigmas,
    sample_dpmpp_3m_sde,
    sigmas_from_alphas_cumprod,
)
from bir.diffusion.parameterization import ModelOutput
from bir.diffusion.samplers import sample_ddim
from bir.diffusion.schedules import (
    ldm_ddim_schedule,
    ldm_ddim_timesteps,
    make_betas,
    rescale_zero_terminal_snr,
)
from bir.random import sample_generators

MU, S = 0.7, 0.5  # Gaussian data N(MU, S^2)


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for x = x0 + sigma n, x0 ~ N(MU, S^2): MU + S^2 / (S^2 + sigma^2) (x - MU)."""
    s2 = sigma.double().view(-1, *[1] * (x.ndim - 1)) ** 2
    return (MU + S**2 / (S**2 + s2) * (x.double() - MU)).to(x.dtype)


def ode_solution(x0: torch.Tensor, sigma0: float, sigma1: float) -> torch.Tensor:
    """Probability-flow ODE dx/dsigma = (x - D)/sigma for Gaussian data: the standardised
    variable (x - MU)/sqrt(S^2 + sigma^2) is constant."""
    return MU + (x0 - MU) * math.sqrt(S**2 + sigma1**2) / math.sqrt(S**2 + sigma0**2)


def log_sigmas(n: int, hi: float = 20.0, lo: float = 0.05) -> torch.Tensor:
    return torch.exp(torch.linspace(math.log(hi), math.log(lo), n + 1, dtype=torch.float64))


def test_dpmpp_3m_ode_converges_on_gaussian_data_far_faster_than_first_order():
    """Global error vs the exact ODE solution: ~h^2 (the multistep start-up's first-order step
    limits the global order) and far below the first-order exponential integrator (DDIM)."""
    x0 = torch.linspace(-30, 30, 7, dtype=torch.float64).view(1, 1, 1, 7)
    exact = ode_solution(x0, 2.0, 1.0)
    errors, first_order = [], []
    for n in (20, 40, 80):
        sig = torch.exp(torch.linspace(math.log(2.0), 0.0, n + 1, dtype=torch.float64))
        x = sample_dpmpp_3m_sde(gaussian_denoiser, x0.clone(), sig, eta=0.0)
        errors.append((x - exact).abs().max().item())
        y = x0.clone()  # first-order exponential integrator: y <- (s'/s) y + (1 - s'/s) D
        for a, b in zip(sig[:-1], sig[1:]):
            y = (b / a) * y + (1 - b / a) * gaussian_denoiser(y, a.view(1))
        first_order.append((y - exact).abs().max().item())
    assert errors[0] / errors[1] > 3.8 and errors[1] / errors[2] > 3.8
    assert first_order[1] / first_order[2] < 2.2  # first order
    assert errors[2] < 0.01 * first_order[2]


def test_three_ode_steps_by_hand():
    """Steps 1-3 with a denoiser that returns given values: first order, then the second- and
    third-order multistep corrections of DPM-Solver++(3M) (h = lambda_next - lambda)."""
    values = [torch.tensor(1.0), torch.tensor(-2.0), torch.tensor(0.5)]
    calls = []

    def model(x, sigma):
        calls.append(float(sigma[0]))
        return values[len(calls) - 1].expand_as(x).double()

    sig = torch.tensor([4.0, 2.0, 1.5, 0.5], dtype=torch.float64)
    x = torch.full((1, 1, 1, 1), 3.0, dtype=torch.float64)
    out = sample_dpmpp_3m_sde(model, x, sig, eta=0.0)
    d0, d1, d2 = 1.0, -2.0, 0.5
    h = [math.log(4 / 2), math.log(2 / 1.5), math.log(1.5 / 0.5)]
    phi2 = [math.expm1(-hh) / hh + 1 for hh in h]
    y = math.exp(-h[0]) * 3.0 - math.expm1(-h[0]) * d0  # step 1: first order
    y = math.exp(-h[1]) * y - math.expm1(-h[1]) * d1 + phi2[1] * (d1 - d0) / (h[0] / h[1])
    r0, r1 = h[1] / h[2], h[0] / h[2]  # step 3: third order
    e0, e1 = (d2 - d1) / r0, (d1 - d0) / r1
    dd1 = e0 + (e0 - e1) * r0 / (r0 + r1)
    dd2 = (e0 - e1) / (r0 + r1)
    phi3 = phi2[2] / h[2] - 0.5
    y = math.exp(-h[2]) * y - math.expm1(-h[2]) * d2 + phi2[2] * dd1 - phi3 * dd2
    assert calls == [4.0, 2.0, 1.5]
    assert math.isclose(out.item(), y, rel_tol=1e-12)


def test_first_sde_step_by_hand_and_the_final_step_returns_the_denoised():
    x = torch.full((1, 1, 2, 2), 3.0, dtype=torch.float64)
    z = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]]], dtype=torch.float64)
    sig = torch.tensor([2.0, 1.0], dtype=torch.float64)
    out = sample_dpmpp_3m_sde(
        gaussian_denoiser, x, sig, eta=1.0, s_noise=1.0, noise_sampler=lambda s, sn: z
    )
    h = math.log(2.0)  # lambda = -log sigma: 0 -> log 2
    d = MU + S**2 / (S**2 + 4) * (3.0 - MU)
    expect = (
        math.exp(-2 * h) * 3.0
        + (1 - math.exp(-2 * h)) * d
        + 1.0 * math.sqrt(1 - math.exp(-2 * h)) * z
    )
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    # a last sigma of 0 returns the denoiser's estimate at the previous level
    out0 = sample_dpmpp_3m_sde(
        gaussian_denoiser, x, torch.tensor([2.0, 0.0]), eta=1.0, noise_sampler=lambda s, sn: z
    )
    torch.testing.assert_close(out0, torch.full_like(x, d))


def test_dpmpp_3m_sde_samples_the_gaussian_data_distribution():
    n = 4000
    g = torch.Generator().manual_seed(3)
    sig = torch.cat([log_sigmas(40, 40.0, 0.02), torch.zeros(1, dtype=torch.float64)])
    start = torch.randn(n, 1, 1, 1, generator=g) * float(sig[0])

    def run(s_noise):
        g.manual_seed(4)
        noise = lambda a, b: torch.randn(n, 1, 1, 1, generator=g)  # noqa: E731
        return sample_dpmpp_3m_sde(
            gaussian_denoiser, start, sig, eta=1.0, s_noise=s_noise, noise_sampler=noise
        ).flatten()

    # the SDE's noise keeps the marginals: N(MU, S^2) at the end; a wrong noise scale does not
    out = run(1.0)
    assert abs(out.mean().item() - MU) < 0.03 and abs(out.std().item() - S) < 0.03
    assert abs(run(1.5).std().item() - S) > 0.05


def test_noise_sampler_is_per_sample_and_generators_are_required():
    x = torch.zeros(3, 2, 4, 4)
    rows = gaussian_noise_sampler(x, sample_generators(1, [4, 5, 6]))(1.0, 0.5)
    alone = gaussian_noise_sampler(x[1:2], sample_generators(1, [5]))(1.0, 0.5)
    assert torch.equal(rows[1:2], alone) and rows.shape == x.shape
    with pytest.raises(ValueError, match="generators"):
        sample_dpmpp_3m_sde(gaussian_denoiser, x, torch.tensor([1.0, 0.5]), eta=1.0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_discrete_vp_denoiser_recovers_x0_from_an_exact_network(prediction):
    """A net that returns the true eps (or v) of x_t makes D(x, sigma) = x0 exactly."""
    abar = torch.cumprod(1 - make_betas("scaled_linear", 1000, 0.00085, 0.012), 0)
    sigmas, timesteps = release_edm_sigmas(abar, 10)
    x0 = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    seen = []

    def net(x_t, t):
        seen.append(int(t[0]))
        a = abar[t].view(-1, 1, 1, 1)
        e = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return e if prediction == "eps" else a.sqrt() * e - (1 - a).sqrt() * x0

    den = DiscreteVPDenoiser(net, sigmas, timesteps, prediction)
    for k in (1, 4, 9):  # t = 899, 599, 99
        t = int(timesteps[k])
        x = x0 + float(sigmas[k]) * eps  # VE variable = x_t / sqrt(abar_t)
        torch.testing.assert_close(den(x, sigmas[k].repeat(2)), x0, rtol=0, atol=1e-10)
        assert seen[-1] == t


def test_release_edm_sigmas_match_the_release_schedule():
    betas = rescale_zero_terminal_snr(make_betas("scaled_linear", 1000, 0.00085, 0.012))
    abar = torch.cumprod(1 - betas, 0)
    sigmas, ts = release_edm_sigmas(abar, 10)
    assert ts.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99, 0]
    for n in (1, 3, 7, 10, 25, 50, 333, 999):  # numpy's linspace(..., endpoint=False).astype(int)
        expect = np.linspace(999, 0, n, endpoint=False).astype(int).tolist()
        assert release_edm_sigmas(abar, n)[1][:-1].tolist() == expect
    # first level from abar = 1e-8 (zero-SNR would make it infinite), a final 0
    assert math.isclose(sigmas[0].item(), math.sqrt((1 - 1e-8) / 1e-8), rel_tol=1e-12)
    assert sigmas[-1] == 0 and torch.all(sigmas[:-1] > sigmas[1:])
    torch.testing.assert_close(sigmas[1:-1], sigmas_from_alphas_cumprod(abar[ts[1:-1]]))
    assert release_edm_sigmas(abar, 7)[1][:-1].tolist() == [999, 856, 713, 570, 428, 285, 142]


def test_ldm_ddim_timesteps_hand_lists():
    assert ldm_ddim_timesteps(1000, 50)[:4] == [1, 21, 41, 61]
    assert ldm_ddim_timesteps(1000, 50)[-1] == 981 and len(ldm_ddim_timesteps(1000, 50)) == 50
    assert ldm_ddim_timesteps(1000, 10) == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
    # as ldm, a count that does not divide T gives more steps (stride 142: 0 ... 994, + 1)
    assert ldm_ddim_timesteps(1000, 7) == [1, 143, 285, 427, 569, 711, 853, 995]
    with pytest.raises(ValueError, match="cannot take 3 steps"):
        ldm_ddim_timesteps(1000, 3)  # 0, 333, 666, 999 + 1 -> 1000 is out of range


def test_ldm_ddim_last_step_goes_to_training_step_zero():
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    sched = ldm_ddim_schedule(betas, 10)
    assert sched.timesteps.tolist() == ldm_ddim_timesteps(1000, 10)
    abar0 = 1 - betas[0].item()
    assert math.isclose(sched.alphas_cumprod_prev[0].item(), abar0, rel_tol=1e-15)
    x0 = torch.full((1, 1, 2, 2), 0.25, dtype=torch.float64)
    e = torch.full_like(x0, -0.5)

    def model(x_t, i):  # constant x0 / eps predictions
        return ModelOutput(eps=e, x0=x0)

    out = sample_ddim(model, torch.zeros_like(x0), sched, clip_x0=False)
    # the final DDIM step: sqrt(abar_0) x0 + sqrt(1 - abar_0) eps, not x0
    torch.testing.assert_close(out, math.sqrt(abar0) * x0 + math.sqrt(1 - abar0) * e)

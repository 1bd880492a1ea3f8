"""Samplers against an analytic prior: data x0 ~ N(m, s^2 I) has a closed-form eps predictor and a
closed-form probability-flow ODE solution, so sampler outputs can be checked against formulas."""

from __future__ import annotations

import math

import pytest
import torch

from bir.diffusion.parameterization import DiffusionModel, ModelOutput
from bir.diffusion.samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m
from bir.diffusion.schedules import DiffusionSchedule, make_betas, space_timesteps
from bir.random import randn, sample_generators

MEAN, STD = 0.3, 0.5
BETAS = make_betas("linear", 1000, 1e-4, 0.02)
ABAR = torch.cumprod(1 - BETAS, 0)


class GaussianEps(torch.nn.Module):
    """Exact eps predictor E[eps | x_t] for x0 ~ N(m, s^2 I):
    eps*(x_t, t) = (x_t - sqrt(a_t) m) sqrt(1 - a_t) / (a_t s^2 + 1 - a_t)."""

    def __init__(self):
        super().__init__()
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(t.clone())
        a = ABAR[t].to(x.dtype).view(-1, 1, 1, 1)
        return (x - a.sqrt() * MEAN) * (1 - a).sqrt() / (a * STD**2 + 1 - a)


def ode_solution(x_T: torch.Tensor, schedule: DiffusionSchedule) -> torch.Tensor:
    """The probability-flow ODE maps each marginal N(sqrt(a) m, a s^2 + 1 - a) to the next by
    keeping the standardised value z fixed, so x0 = m + s z with
    z = (x_T - sqrt(a_T) m) / sqrt(a_T s^2 + 1 - a_T)."""
    a = float(schedule.alphas_cumprod[-1])
    return MEAN + STD * (x_T - math.sqrt(a) * MEAN) / math.sqrt(a * STD**2 + 1 - a)


def gaussian_model(steps: int | None = None) -> tuple[DiffusionModel, DiffusionSchedule]:
    timesteps = None if steps is None else space_timesteps(1000, steps)
    schedule = DiffusionSchedule(BETAS, timesteps)
    return DiffusionModel(GaussianEps(), schedule), schedule


def x_T(batch: int = 4, size: int = 8) -> torch.Tensor:
    return torch.randn(
        batch, 1, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )


def test_ddim_converges_to_ode_solution_first_order():
    x = x_T()
    errors = {}
    for steps in (100, 1000):
        model, schedule = gaussian_model(steps)
        out = sample_ddim(model, x, schedule, clip_x0=False)
        errors[steps] = (out - ode_solution(x, schedule)).abs().max().item()
    assert errors[1000] < 0.01
    # first-order solver: 10x more steps -> about 10x smaller error
    assert 7 < errors[100] / errors[1000] < 13


def test_dpmpp_2m_converges_second_order_to_ddim_limit():
    x = x_T()
    errors = {}
    for steps in (100, 1000):
        model, schedule = gaussian_model(steps)
        out = sample_dpmpp_2m(model, x, schedule)
        errors[steps] = (out - ode_solution(x, schedule)).abs().max().item()
    model, schedule = gaussian_model(100)
    ddim_error_100 = (
        (sample_ddim(model, x, schedule, clip_x0=False) - ode_solution(x, schedule)).abs().max()
    )
    assert errors[1000] < 1e-3
    assert errors[100] < 0.5 * ddim_error_100  # more accurate than DDIM at equal steps
    assert errors[100] / errors[1000] > 50  # second order: 10x steps -> ~100x smaller error


def test_ddim_is_differentiable_with_analytic_gradient():
    """For the linear Gaussian eps, each DDIM step is affine in x_t with slope
    (sqrt(a') sqrt(a) s^2 + sqrt(1 - a') sqrt(1 - a)) / (a s^2 + 1 - a); the gradient of the
    output w.r.t. x_T is the product of the slopes."""
    model, schedule = gaussian_model(10)
    x = x_T(2, 4).requires_grad_(True)
    sample_ddim(model, x, schedule, clip_x0=False).sum().backward()
    slope = 1.0
    for k in range(len(schedule)):
        a, a_prev = schedule.alphas_cumprod[k].item(), schedule.alphas_cumprod_prev[k].item()
        slope *= (math.sqrt(a_prev * a) * STD**2 + math.sqrt((1 - a_prev) * (1 - a))) / (
            a * STD**2 + 1 - a
        )
    torch.testing.assert_close(x.grad, torch.full_like(x, slope), rtol=1e-9, atol=0)


def test_ddpm_reproduces_data_mean_and_variance():
    model, schedule = gaussian_model(None)  # all 1000 steps
    batch = 64
    gens = sample_generators(0, range(batch), stream=3)
    x = randn((1, 16, 16), sample_generators(0, range(batch), stream=2), dtype=torch.float64)
    out = sample_ddpm(model, x, schedule, gens, clip_x0=False)
    n = out.numel()
    # independent N(m, s^2) values: mean error sd s / sqrt(n), std error sd ~ s / sqrt(2n)
    assert abs(out.mean().item() - MEAN) < 4 * STD / math.sqrt(n)
    assert abs(out.std().item() - STD) < 4 * STD / math.sqrt(2 * n)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta1"])
def test_samples_independent_of_batch_composition(sampler):
    model, schedule = gaussian_model(20)

    def run(indices: list[int]) -> torch.Tensor:
        x = randn((1, 8, 8), sample_generators(7, indices, stream=0), dtype=torch.float64)
        gens = sample_generators(7, indices, stream=1)
        if sampler == "ddpm":
            return sample_ddpm(model, x, schedule, gens)
        return sample_ddim(model, x, schedule, eta=1.0, generators=gens)

    full = run([0, 1, 2, 3])
    part = run([3, 1])
    torch.testing.assert_close(part, full[[3, 1]], rtol=0, atol=0)
    assert not torch.equal(full[0], full[1])


def test_ddim_eta_needs_generators_and_ddpm_one_generator_per_sample():
    model, schedule = gaussian_model(5)
    with pytest.raises(ValueError, match="generators"):
        sample_ddim(model, x_T(), schedule, eta=0.5)
    with pytest.raises(ValueError, match="one generator per sample"):
        sample_ddpm(model, x_T(4), schedule, sample_generators(0, [0, 1]))


def test_network_receives_original_timesteps_and_callback_reports_each_step():
    model, schedule = gaussian_model(10)
    seen: list[dict] = []
    sample_ddim(model, x_T(2), schedule, callback=seen.append)
    expected = list(reversed(space_timesteps(1000, 10)))
    assert [d["t"] for d in seen] == expected
    assert [d["i"] for d in seen] == list(range(9, -1, -1))
    assert [c.tolist() for c in model.net.calls] == [[t, t] for t in expected]
    assert set(seen[0]) == {"i", "t", "x", "x0"} and seen[0]["x0"].shape == (2, 1, 8, 8)


def test_guidance_hook_replacing_x0_or_mean():
    model, schedule = gaussian_model(10)
    calls = []

    def x0_guidance(x_t, i, out, mean, log_variance):
        calls.append((i.clone(), out.x0.abs().max().item(), log_variance.shape))
        return None, torch.full_like(out.x0, 0.25)

    gens = sample_generators(0, [0, 1])
    out = sample_ddpm(model, x_T(2), schedule, gens, guidance=x0_guidance)
    # last step: coef1 = beta_0 / (1 - abar_0) = 1 and coef2 = 0, so the output is the guided x0
    torch.testing.assert_close(out, torch.full_like(out, 0.25))
    assert len(calls) == 10 and calls[0][0].tolist() == [9, 9] and calls[-1][0].tolist() == [0, 0]
    assert all(c[1] <= 1.0 for c in calls)  # the hook sees the clipped x0

    # a one-step schedule ends with the mean; shifting the mean shifts the output exactly
    one = DiffusionSchedule(BETAS, [500])
    one_model = DiffusionModel(GaussianEps(), one)
    x = x_T(2)
    plain = sample_ddpm(one_model, x, one, gens)
    shifted = sample_ddpm(
        one_model, x, one, gens, guidance=lambda x_t, i, o, mean, lv: (mean + 0.1, None)
    )
    torch.testing.assert_close(shifted, plain + 0.1)


def test_clip_x0_keeps_estimates_in_range():
    class FarAway(torch.nn.Module):
        def forward(self, x, t):  # predicts x0 = 5 everywhere
            return torch.full_like(x, 5.0)

    schedule = DiffusionSchedule(BETAS, space_timesteps(1000, 5))
    model = DiffusionModel(FarAway(), schedule, prediction="x0")
    x = x_T(2)
    torch.testing.assert_close(sample_ddim(model, x, schedule), torch.ones_like(x))
    assert sample_ddim(model, x, schedule, clip_x0=False).min() > 4.9
    out = sample_ddpm(model, x, schedule, sample_generators(0, [0, 1]))
    torch.testing.assert_close(out, torch.ones_like(x))


def test_model_without_variance_falls_back_to_fixed_small():
    schedule = DiffusionSchedule(BETAS, [0, 400])

    def no_variance(x, i):
        eps = GaussianEps()(x, schedule.t(i))
        return ModelOutput(eps=eps, x0=schedule.x0_from_eps(x, i, eps), log_variance=None)

    fixed_small = DiffusionModel(GaussianEps(), schedule, variance="fixed_small")
    x, gens = x_T(2), lambda: sample_generators(0, [0, 1])
    torch.testing.assert_close(
        sample_ddpm(no_variance, x, schedule, gens()), sample_ddpm(fixed_small, x, schedule, gens())
    )


class ScaledGaussianEps(GaussianEps):
    """GaussianEps times a learnable scalar (1 at the start): a network with a parameter."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scale * super().forward(x, t)


@pytest.mark.parametrize("clip_x0", [False, True])
def test_network_grad_off_keeps_only_the_explicit_x_t_terms(clip_x0):
    """With the network's output held constant and x0 inside [-1, 1], each DDIM step (eta 0)
    is x' = sqrt(a') (x - sqrt(1 - a) eps) / sqrt(a) + sqrt(1 - a') eps with d eps / dx = 0 (eps
    re-derived from an unclamped x0 is eps itself): slope sqrt(a' / a), and the product over the
    chain telescopes to 1 / sqrt(abar of the top step) (BIRD's released gradient)."""
    from bir.diffusion.samplers import network_grad

    net = ScaledGaussianEps()
    schedule = DiffusionSchedule(BETAS, space_timesteps(1000, 10))
    x = (0.2 * x_T(2, 4)).requires_grad_(True)  # small: every x0 estimate stays inside [-1, 1]
    model = DiffusionModel(network_grad(net, False), schedule)
    seen: list[dict] = []
    out = sample_ddim(model, x, schedule, clip_x0=clip_x0, callback=seen.append)
    assert all(d["x0"].abs().max() < 1 for d in seen)
    out.sum().backward()
    top = schedule.alphas_cumprod[-1].item()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / math.sqrt(top)), rtol=1e-9, atol=0)
    assert net.scale.grad is None and not model.net(x, torch.tensor([5, 5])).requires_grad


def test_network_grad_on_is_the_network_itself():
    from bir.diffusion.samplers import network_grad

    net = ScaledGaussianEps()
    assert network_grad(net, True) is net
    schedule = DiffusionSchedule(BETAS, space_timesteps(1000, 10))
    x = x_T(2, 4).requires_grad_(True)
    model = DiffusionModel(network_grad(net, True), schedule)
    sample_ddim(model, x, schedule, clip_x0=False).sum().backward()
    assert net.scale.grad is not None and net.scale.grad.abs() > 0
    # the full gradient differs from the network-free one (the eps' dependence on x_t counts)
    top = schedule.alphas_cumprod[-1].item()
    assert not torch.allclose(x.grad, torch.full_like(x, 1 / math.sqrt(top)))

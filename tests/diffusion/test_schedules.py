import math

import pytest
import torch

from bir.diffusion.schedules import (
    DiffusionSchedule,
    make_betas,
    rescale_zero_terminal_snr,
    space_timesteps,
)


def test_betas_closed_forms():
    lin = make_betas("linear", 1000, 1e-4, 0.02)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    sl = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert sl[0] == pytest.approx(0.00085) and sl[-1] == pytest.approx(0.012)
    assert sl[500] == pytest.approx(
        (math.sqrt(0.00085) + 500 / 999 * (math.sqrt(0.012) - math.sqrt(0.00085))) ** 2
    )
    cos = make_betas("cosine", 1000)
    abar = torch.cumprod(1 - cos, 0)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abar[499].item() == pytest.approx(f(500) / f(0), rel=1e-6)


def test_zero_terminal_snr():
    b = rescale_zero_terminal_snr(make_betas("scaled_linear", 1000, 0.00085, 0.012))
    abar = torch.cumprod(1 - b, 0)
    orig = torch.cumprod(1 - make_betas("scaled_linear", 1000, 0.00085, 0.012), 0)
    assert abar[-1] == 0 and abar[0] == pytest.approx(orig[0].item())


def test_space_timesteps():
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    s = space_timesteps(1000, 50)
    assert len(s) == 50 and s[0] == 0 and s[-1] == 999
    assert space_timesteps(100, "5,5") == [0, 12, 24, 37, 49, 50, 62, 74, 87, 99]


def test_respacing_keeps_marginals_and_posterior():
    betas = make_betas("linear", 1000)
    full = DiffusionSchedule(betas)
    sub = DiffusionSchedule(betas, [0, 250, 500, 999])
    assert torch.allclose(sub.alphas_cumprod, full.alphas_cumprod[[0, 250, 500, 999]])
    assert sub.betas[1] == pytest.approx(1 - full.alphas_cumprod[250] / full.alphas_cumprod[0])
    # posterior mean/variance of q(x_{s}|x_t,x_0) for the jump 500 -> 250: Gaussian conditioning
    a_t, a_s = full.alphas_cumprod[500], full.alphas_cumprod[250]
    var = (1 - a_s) * (1 - a_t / a_s) / (1 - a_t)
    assert sub.posterior_variance[2] == pytest.approx(var.item())
    x0, xt = (
        torch.randn(1, 1, 2, 2, dtype=torch.float64),
        torch.randn(1, 1, 2, 2, dtype=torch.float64),
    )
    mean = (a_s.sqrt() * (1 - a_t / a_s) * x0 + (a_t / a_s).sqrt() * (1 - a_s) * xt) / (1 - a_t)
    assert torch.allclose(sub.posterior_mean(x0, xt, torch.tensor([2])), mean)
    assert sub.t(torch.tensor([3])).item() == 999


def test_parameterisations_round_trip():
    s = DiffusionSchedule.from_config("linear", steps=20)
    x0 = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    i = torch.tensor([0, 7, 19])
    xt = s.q_sample(x0, i, eps)
    assert torch.allclose(s.x0_from_eps(xt, i, eps), x0)
    assert torch.allclose(s.eps_from_x0(xt, i, x0), eps)
    v = s.v_from_x0_eps(x0, i, eps)
    assert torch.allclose(s.x0_from_v(xt, i, v), x0) and torch.allclose(s.eps_from_v(xt, i, v), eps)


def test_learned_range_endpoints():
    s = DiffusionSchedule(make_betas("linear", 1000))
    i = torch.tensor([10])
    like = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    lo = s.learned_range_log_variance(-torch.ones_like(like), i)
    hi = s.learned_range_log_variance(torch.ones_like(like), i)
    assert lo.item() == pytest.approx(s.posterior_log_variance_clipped[10].item())
    assert hi.item() == pytest.approx(math.log(s.betas[10].item()))


def test_diffusers_ddim_timesteps_hand_computed():
    from bir.diffusion.schedules import diffusers_ddim_timesteps

    # BIRD's set_timesteps(1000 // delta_t): delta_t 300 -> 3 steps of stride 333
    assert diffusers_ddim_timesteps(1000, 3) == [0, 333, 666]
    assert diffusers_ddim_timesteps(1000, 6) == [0, 166, 332, 498, 664, 830]
    assert diffusers_ddim_timesteps(1000, 10) == list(range(0, 1000, 100))
    assert diffusers_ddim_timesteps(1000, 1) == [0]
    assert diffusers_ddim_timesteps(1000, 1000) == list(range(1000))
    # the released formula, (arange(n) * (T // n)).round(), exactly n steps for every n
    for n in (7, 13, 333, 999):
        expected = (torch.arange(n) * (1000 // n)).tolist()
        assert diffusers_ddim_timesteps(1000, n) == expected and len(expected) == n
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError, match=r"DDIM steps must lie in \[1, 1000\]"):
            diffusers_ddim_timesteps(1000, bad)

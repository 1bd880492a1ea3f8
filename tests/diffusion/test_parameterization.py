"""eps / x0 / v adapters and the variance options against the closed forms of DDPM and IDDPM."""

from __future__ import annotations

import math

import pytest
import torch

from bir.diffusion.parameterization import DiffusionModel, convert_output
from bir.diffusion.prior import PixelPrior
from bir.diffusion.schedules import DiffusionSchedule, make_betas, space_timesteps

BETAS = make_betas("linear", 1000, 1e-4, 0.02)
ABAR = torch.cumprod(1 - BETAS, 0)


class Oracle(torch.nn.Module):
    """Returns a fixed tensor (what a perfect net would output) and records the timesteps."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output
        self.t: torch.Tensor | None = None

    def forward(self, x, t):
        self.t = t
        return self.output


def _problem():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    schedule = DiffusionSchedule(BETAS, space_timesteps(1000, 25))
    i = torch.tensor([0, 12, 24])
    a = ABAR[schedule.timesteps[i]].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return x0, eps, schedule, i, x_t, a


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_prediction_types_round_trip_to_eps_and_x0(prediction):
    x0, eps, schedule, i, x_t, a = _problem()
    target = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction]
    net = Oracle(target)
    out = DiffusionModel(net, schedule, prediction=prediction)(x_t, i)
    torch.testing.assert_close(out.eps, eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.x0, x0, rtol=1e-9, atol=1e-9)
    # the net sees the original timesteps of the respaced schedule
    assert net.t.tolist() == [0, 500, 999]
    # and the schedule's v conversion inverts the adapter's
    v = schedule.v_from_x0_eps(out.x0, i, out.eps)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0, rtol=1e-9, atol=1e-9)


def test_variance_options_against_closed_forms():
    x0, eps, schedule, i, x_t, _ = _problem()
    t = schedule.timesteps
    # respaced betas keep the marginals: beta_k = 1 - abar[t_k] / abar[t_{k-1}]
    abar = ABAR[t]
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    beta = 1 - abar / abar_prev
    beta_tilde = beta * (1 - abar_prev) / (1 - abar)
    k = 12
    assert schedule.alphas_cumprod[k].item() == pytest.approx(ABAR[500].item(), rel=1e-12)

    def log_var(variance, var_values=None):
        raw = eps if var_values is None else torch.cat([eps, var_values], 1)
        out = convert_output(raw, x_t, i, schedule, "eps", variance, var_values is not None)
        return out.log_variance.expand_as(x_t)[1, 0, 0, 0].item()  # sample 1 is step k = 12

    assert log_var("fixed_small") == pytest.approx(math.log(beta_tilde[k].item()), rel=1e-9)
    assert log_var("fixed_large") == pytest.approx(math.log(beta[k].item()), rel=1e-9)
    ones = torch.ones_like(eps)
    assert log_var("learned_range", -ones) == pytest.approx(math.log(beta_tilde[k]), rel=1e-9)
    assert log_var("learned_range", ones) == pytest.approx(math.log(beta[k]), rel=1e-9)
    mid = 0.5 * (math.log(beta[k]) + math.log(beta_tilde[k]))  # IDDPM eq. 15 with v = 1/2
    assert log_var("learned_range", 0 * ones) == pytest.approx(mid, rel=1e-9)
    assert log_var("learned", torch.full_like(eps, -3.0)) == -3.0


def test_learned_sigma_outputs_are_split_and_fixed_variance_ignores_them():
    x0, eps, schedule, i, x_t, _ = _problem()
    net = Oracle(torch.cat([eps, torch.zeros_like(eps)], 1))
    out = DiffusionModel(net, schedule, learned_sigma=True, variance="fixed_small")(x_t, i)
    assert out.eps.shape == x_t.shape
    torch.testing.assert_close(out.x0, x0, rtol=1e-9, atol=1e-9)
    assert DiffusionModel(net, schedule, learned_sigma=True).variance == "learned_range"


def test_invalid_combinations_raise():
    schedule = DiffusionSchedule(BETAS)
    with pytest.raises(ValueError):
        DiffusionModel(torch.nn.Identity(), schedule, variance="learned_range")
    with pytest.raises(ValueError):
        DiffusionModel(torch.nn.Identity(), schedule, prediction="score")


def test_from_prior_uses_prior_betas_and_learned_sigma():
    class TwoC(torch.nn.Module):
        def forward(self, x, t):
            return torch.cat([x, torch.zeros_like(x)], 1)

    prior = PixelPrior(
        TwoC(), schedule={"kind": "linear", "T": 100, "beta_start": 1e-4, "beta_end": 0.02}
    )
    model = DiffusionModel.from_prior(prior, timesteps=[0, 49, 99])
    assert model.variance == "learned_range" and len(model.schedule) == 3
    x = torch.randn(2, 3, 4, 4)
    i = torch.tensor([2, 0])
    out = model(x, i)
    # eps = x means x0 = (x - sqrt(1 - a) x) / sqrt(a)
    a = (
        torch.cumprod(1 - make_betas("linear", 100, 1e-4, 0.02), 0)[[99, 0]]
        .float()
        .view(-1, 1, 1, 1)
    )
    torch.testing.assert_close(out.x0, (1 - (1 - a).sqrt()) / a.sqrt() * x)

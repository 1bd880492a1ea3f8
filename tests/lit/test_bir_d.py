"""BIR-D / GDP on sample_ddpm: closed-form scale update against the released formula, reduction
to plain DDPM, toggles, guards, per-sample independence, patches, presets."""

import logging
import math

import hydra
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bir.diffusion.parameterization import ModelOutput
from bir.diffusion.prior import PixelPrior
from bir.diffusion.schedules import DiffusionSchedule, space_timesteps
from bir.lit.bir_d import (
    BIRD_D,
    INIT_STREAM,
    STEP_NOISE_STREAM,
    OperatorGuidance,
    adaptive_guidance_scale,
    gaussian_log_likelihood,
)
from bir.lit.pixel_ddpm import load_pixel_prior
from bir.operators.kernel_mask import KernelMaskOperator
from bir.operators.lowlight import LowLightOperator
from bir.random import randn, sample_generators
from tests.conftest import compose_config, net_config

STEPS = 12


class TinyEpsNet(nn.Module):
    """ADM-shaped toy: returns eps and learned-range values (tanh, in [-1, 1]): 6 channels."""

    def __init__(self, channels: int = 3, hidden: int = 16):
        super().__init__()
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time = nn.Linear(1, hidden)
        self.out = nn.Conv2d(hidden, 2 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x) + self.time(t.float()[:, None] / 1000)[:, :, None, None])
        eps, var = self.out(h).chunk(2, dim=1)
        return torch.cat([eps, torch.tanh(var)], dim=1)


@pytest.fixture(scope="module")
def prior(tmp_path_factory) -> PixelPrior:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("prior") / "tiny_adm.pt"
    torch.save(TinyEpsNet().state_dict(), path)  # saved and loaded through the real loader
    return load_pixel_prior(
        TinyEpsNet(), str(path), learned_sigma=True, image_size=16, checkpoint_what="tiny ADM"
    )


def observation(b: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def batch(y: torch.Tensor, indices: list[int]) -> dict:
    return {"lq": y, "name": [f"img{i}" for i in indices], "index": torch.tensor(indices)}


def method(prior, operator=None, **kwargs) -> BIRD_D:
    kwargs.setdefault("steps", STEPS)
    return BIRD_D(prior, operator or KernelMaskOperator(kernel_size=5), **kwargs)


def identity_operator() -> KernelMaskOperator:
    return KernelMaskOperator(kernel_size=5, init="delta", use_mask=False)


# --- closed forms ------------------------------------------------------------------------------
def test_gaussian_log_likelihood_closed_forms():
    y = torch.tensor([[0.5, -0.5]]).reshape(1, 2, 1, 1)
    mu = torch.tensor([[0.0, 0.0]]).reshape(1, 2, 1, 1)
    lv = torch.tensor([[0.0, math.log(0.25)]]).reshape(1, 2, 1, 1)
    # paper: -1/2 (0.25/1 + 0.25/0.25) - 1/2 (log(2 pi) + log(2 pi * 0.25))
    expected = -0.5 * (0.25 + 1.0) - 0.5 * (math.log(2 * math.pi) + math.log(2 * math.pi * 0.25))
    assert gaussian_log_likelihood(y, mu, lv).item() == pytest.approx(expected, rel=1e-6)
    # reference: log-variance in place of sigma, log of the summed squares
    lv_ref = torch.tensor([[2.0, -1.0]]).reshape(1, 2, 1, 1)
    expected = -0.5 * ((0.5 / 2.0) ** 2 + (-0.5 / -1.0) ** 2) - 0.5 * math.log(
        2 * math.pi * (4.0 + 1.0)
    )
    assert gaussian_log_likelihood(y, mu, lv_ref, "reference").item() == pytest.approx(
        expected, rel=1e-6
    )


def test_adaptive_scale_closed_form():
    x_prev = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(2, 2, 1, 1)
    mean = torch.tensor([0.5, 1.0, 1.0, 5.0]).reshape(2, 2, 1, 1)
    g = torch.tensor([2.0, -1.0, 0.5, 1.0]).reshape(2, 2, 1, 1)
    loss = torch.tensor([0.5, 2.0])
    c, k = torch.tensor([-3.0, 1.0]), torch.tensor([1.0, -4.0])
    # image 0: (0.5*2 + 1*(-1)) + (-3) + 1 = -2 -> s = 2 / 0.5 = 4
    # image 1: (2*0.5 + (-1)*1) + 1 - 4 = -3 -> s = 3 / 2 = 1.5
    assert torch.allclose(
        adaptive_guidance_scale(x_prev, mean, g, loss, c, k, "paper"), torch.tensor([4.0, 1.5])
    )
    # the released code: s' = -|inner / L|, i.e. s = |inner / L| in bir's sign
    assert torch.allclose(
        adaptive_guidance_scale(x_prev, mean, g, loss, c, k, "reference"), torch.tensor([4.0, 1.5])
    )
    c2 = torch.tensor([3.0, 9.0])  # inner > 0: the paper's s is negative, the code's |.| is not
    assert torch.allclose(
        adaptive_guidance_scale(x_prev, mean, g, loss, c2, k, "paper"), torch.tensor([-8.0, -2.5])
    )
    assert torch.allclose(
        adaptive_guidance_scale(x_prev, mean, g, loss, c2, k, "reference"), torch.tensor([8.0, 2.5])
    )


def released_step(x0, kernel, mask, y_pm, s_code, lr):
    """The released cond_fn (lowlight.py's form, conv + mask), written from the code: conv on
    (x0 + 1) / 2 with nn.Conv2d(3, 3, k, padding=k // 2, groups=3) plus the mask, MSE against
    (y + 1) / 2 (mean over CHW, summed over the batch); returns (mean shift = grad of s' mse,
    kernel - lr * grad of mse)."""
    k = kernel.shape[-1]
    x_in = x0.detach().double().requires_grad_(True)
    weight = kernel.detach().double().requires_grad_(True)
    pred = F.conv2d((x_in + 1) / 2, weight, padding=k // 2, groups=3) + mask.double()
    mse = ((pred - (y_pm.double() + 1) / 2) ** 2).mean(dim=(1, 2, 3)).sum()
    g_x, g_w = torch.autograd.grad(mse, [x_in, weight])
    return s_code * g_x, weight.detach() - lr * g_w


def released_scale(x_t, x_prev, mean, log_var, prev_log_var, shift, kernel, mask, y_pm):
    """gaussian_diffusion_x0.py after drawing the sample: d = conv(x_{t-1}) + M on [-1, 1] with
    zero padding, L = 2 C^2 sum_b mean_CHW((d - y)^2), cons_C / cons_K with the log-variance,
    s' = -|(sum(g (x_{t-1} - mu)) + cons_C + cons_K) / L|."""
    k = kernel.shape[-1]
    d = F.conv2d(x_prev.double(), kernel.double(), padding=k // 2, groups=3) + mask.double()
    mse = ((d - y_pm) ** 2).mean(dim=(1, 2, 3)).sum() * (2 * 3**2)
    cons_c = -0.5 * (((y_pm - mean) / log_var) ** 2).sum()
    cons_c = cons_c - 0.5 * torch.log(2 * math.pi * (log_var**2).sum())
    cons_k = -0.5 * (((y_pm - x_t) / prev_log_var) ** 2).sum()
    cons_k = cons_k - 0.5 * torch.log(2 * math.pi * (prev_log_var**2).sum())
    return -((shift * (x_prev - mean)).sum() + cons_c + cons_k).abs() / mse


def test_reference_scale_and_updates_are_the_released_code():
    g = torch.Generator().manual_seed(0)
    size = 16
    y = torch.rand(1, 3, size, size, generator=g, dtype=torch.float64)
    sched = DiffusionSchedule(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    op = KernelMaskOperator(kernel_size=9, use_mask=True, learn_mask=False).double()
    op.init_batch((1, 3, size, size), sample_generators(0, [0], "cpu", 3))
    guidance = OperatorGuidance(
        op,
        y,
        sched,
        torch.tensor([-3000.0], dtype=torch.float64),
        scale_formula="reference",
        operator_lr=0.01,
    )
    x_t = torch.randn(1, 3, size, size, generator=g, dtype=torch.float64)
    prev_log_var = torch.ones_like(x_t)  # the code's torch.ones at the first step
    s_code = 3000.0
    for step in (999, 998):
        i = torch.tensor([step])
        x0 = torch.rand(1, 3, size, size, generator=g, dtype=torch.float64) * 2 - 1
        mean = torch.randn(1, 3, size, size, generator=g, dtype=torch.float64)
        log_var = -1 - torch.rand(1, 3, size, size, generator=g, dtype=torch.float64)
        kernel_before = op.kernel.detach()[0][:, None].clone()
        shift, kernel_after = released_step(
            x0, kernel_before, op.mask.detach(), 2 * y - 1, s_code, 0.01
        )
        new_mean, _ = guidance(
            x_t, i, ModelOutput(eps=x0, x0=x0, log_variance=log_var), mean, log_var
        )
        assert torch.allclose(new_mean, mean + shift, atol=1e-9)
        assert torch.allclose(op.kernel.detach()[0][:, None], kernel_after, atol=1e-12)
        x_prev = new_mean + torch.exp(0.5 * log_var) * torch.randn(
            x_t.shape, generator=g, dtype=torch.float64
        )
        guidance.after_step(x_t, x_prev, i, new_mean, log_var)
        expected = released_scale(
            x_t,
            x_prev,
            new_mean,
            log_var,
            prev_log_var,
            shift,
            kernel_after,
            op.mask.detach(),
            2 * y - 1,
        )
        assert guidance.scale.item() == pytest.approx(-expected.item(), rel=1e-9)
        s_code, prev_log_var, x_t = -guidance.scale.item(), log_var, x_prev


# --- the sampler -------------------------------------------------------------------------------
def plain_ddpm(prior: PixelPrior, shape, seed: int, index: int, steps: int) -> torch.Tensor:
    """Ancestral DDPM with the learned-range variance, written out from IDDPM's formulas."""
    sched = DiffusionSchedule(prior.betas, space_timesteps(len(prior.betas), steps))
    x = randn(shape, sample_generators(seed, [index], "cpu", INIT_STREAM))
    gens = sample_generators(seed, [index], "cpu", STEP_NOISE_STREAM)
    with torch.no_grad():
        for i in reversed(range(steps)):
            abar = sched.alphas_cumprod[i].item()
            out = prior.net(x, sched.timesteps[i : i + 1])
            eps, v = out[:, :3], out[:, 3:]
            x0 = (x / math.sqrt(abar) - math.sqrt(1 / abar - 1) * eps).clamp(-1, 1)
            mean = (
                sched.posterior_mean_coef1[i].item() * x0 + sched.posterior_mean_coef2[i].item() * x
            )
            frac = (v + 1) / 2
            log_var = (
                frac * math.log(sched.betas[i].item())
                + (1 - frac) * sched.posterior_log_variance_clipped[i].item()
            )
            z = randn(shape[1:] if len(shape) == 4 else shape, gens)
            x = mean + (torch.exp(0.5 * log_var) * z if i > 0 else 0)
    return ((x + 1) / 2).clamp(0, 1)


def test_zero_scale_with_fixed_kernel_is_plain_ddpm(prior):
    m = method(prior, guidance_scale=0.0, adaptive_scale=False, dynamic_kernel=False, seed=3)
    out = m.predict_step(batch(observation(), [5]))
    ref = plain_ddpm(prior, (3, 16, 16), seed=3, index=5, steps=STEPS)
    assert torch.allclose(out["restored"], ref, atol=1e-5)
    assert torch.equal(out["scale_trajectory"], torch.zeros(1, STEPS))


def test_guidance_pulls_the_sample_towards_the_observation(prior):
    y = observation(seed=1)
    kw = dict(adaptive_scale=False, dynamic_kernel=False)
    free = method(prior, identity_operator(), guidance_scale=0.0, **kw)
    guided = method(prior, identity_operator(), guidance_scale=2000.0, **kw)
    err_free = (free.predict_step(batch(y, [0]))["restored"] - y).square().mean()
    err_guided = (guided.predict_step(batch(y, [0]))["restored"] - y).square().mean()
    assert err_guided < 0.1 * err_free


def test_toggles_change_exactly_what_they_name(prior):
    y = observation(seed=2)
    start = KernelMaskOperator(kernel_size=5).initial_kernel()[0]
    fixed = method(prior, dynamic_kernel=False, adaptive_scale=False, guidance_scale=100.0)
    out = fixed.predict_step(batch(y, [0]))
    assert torch.equal(fixed.operator.kernel.detach()[0, 0], start)  # kernel untouched
    assert torch.equal(out["scale_trajectory"], torch.full((1, STEPS), 100.0))  # s constant
    model_c = method(prior, dynamic_kernel=True, adaptive_scale=False, guidance_scale=100.0)
    out_c = model_c.predict_step(batch(y, [0]))
    assert not torch.equal(model_c.operator.kernel.detach()[0, 0], start)
    assert torch.equal(out_c["scale_trajectory"], torch.full((1, STEPS), 100.0))
    model_b = method(prior, dynamic_kernel=False, adaptive_scale=True, guidance_scale=100.0)
    out_b = model_b.predict_step(batch(y, [0]))
    assert torch.equal(model_b.operator.kernel.detach()[0, 0], start)
    assert out_b["scale_trajectory"][0, 0] == 100.0
    assert len(set(out_b["scale_trajectory"][0].tolist())) > 2  # s follows the formula
    assert (out_b["scale_trajectory"][0, 1:] >= 0).all()  # the reference |.|


def test_scale_bounds_clamp_the_adaptive_scale(prior):
    m = method(prior, adaptive_scale=True, guidance_scale=5.0, scale_min=1.0, scale_max=10.0)
    s = m.predict_step(batch(observation(), [0]))["scale_trajectory"][0]
    assert s[0] == 5.0 and s.min() >= 1.0 and s.max() <= 10.0
    assert ((s[1:] == 1.0) | (s[1:] == 10.0)).any()  # the raw formula left the bounds
    unbounded = method(prior, adaptive_scale=True, guidance_scale=5.0)
    s_free = unbounded.predict_step(batch(observation(), [0]))["scale_trajectory"][0]
    assert ((s_free[1:] < 1.0) | (s_free[1:] > 10.0)).any()


def test_nan_loss_falls_back_and_is_logged(prior, caplog, monkeypatch):
    calls = {"n": 0}
    original = OperatorGuidance.data_loss

    def flaky(self, pred, target, weight=None):
        calls["n"] += 1
        loss = original(self, pred, target, weight)
        return torch.full_like(loss, float("nan")) if calls["n"] in (3, 4) else loss

    monkeypatch.setattr(OperatorGuidance, "data_loss", flaky)
    m = method(prior, adaptive_scale=True, guidance_scale=50.0, scale_formula="paper")
    with caplog.at_level(logging.WARNING, logger="bir.lit.bir_d"):
        out = m.predict_step(batch(observation(), [0]))
    assert torch.isfinite(out["restored"]).all()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "non-finite loss for img0" in messages
    assert "adaptive guidance scale for img0" in messages and "keeping s=" in messages
    s = out["scale_trajectory"][0]
    # call 3 is step 2's loss (guidance skipped), call 4 its scale's L: s kept for step 3
    assert torch.isnan(out["loss_curve"][0, 1]) and s[2] == s[1]
    assert torch.isfinite(s).all()


def test_non_finite_image_raises_naming_it(prior):
    class NaNNet(nn.Module):
        def forward(self, x, t):
            return torch.full((x.shape[0], 6, *x.shape[2:]), float("nan"))

    bad = PixelPrior(NaNNet(), learned_sigma=True, image_size=16)
    m = method(bad, steps=3)
    with pytest.raises(RuntimeError, match="broken_image"):
        m.predict_step({"lq": observation(), "name": ["broken_image"], "index": torch.tensor([0])})


def test_batch_of_two_equals_two_runs_of_one(prior):
    y = observation(2, seed=4)
    # full BIR-D; s bounded so that float rounding of the batched convolution is not amplified
    full = dict(
        adaptive_scale=True, dynamic_kernel=True, guidance_scale=200.0, scale_max=2000.0, seed=1
    )
    scale_only = dict(adaptive_scale=True, dynamic_kernel=False, guidance_scale=200.0, seed=1)
    for kw in (full, scale_only):
        both = method(prior, **kw).predict_step(batch(y, [10, 11]))
        for j, idx in enumerate([10, 11]):
            one = method(prior, **kw).predict_step(batch(y[j : j + 1], [idx]))
            assert torch.allclose(both["restored"][j], one["restored"][0], atol=1e-5)
            assert torch.allclose(both["kernel"][j], one["kernel"][0], atol=1e-6)
            assert torch.allclose(
                both["scale_trajectory"][j], one["scale_trajectory"][0], rtol=1e-4
            )
            assert torch.allclose(both["loss_curve"][j], one["loss_curve"][0], rtol=1e-4, atol=1e-7)
    assert len(set(both["scale_trajectory"][0].tolist())) > 2
    assert not torch.allclose(both["restored"][0], both["restored"][1])


def test_large_image_runs_on_the_patch_grid(prior):
    m = method(prior, LowLightOperator(), guidance_scale=100.0, adaptive_scale=False)
    y = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(5))
    out = m.predict_step(batch(y, [0]))
    assert out["restored"].shape == (1, 3, 24, 40) and torch.isfinite(out["restored"]).all()
    assert out["loss_curve"].shape == out["scale_trajectory"].shape == (1, STEPS)
    assert "kernel" not in out and out["extras"]["factor"].shape == (1,)
    assert out["loss_curve"][0, -1] < out["loss_curve"][0, 0]  # the degradation fits better
    with pytest.raises(ValueError, match="smaller than the patch"):
        m.predict_step(batch(torch.rand(1, 3, 12, 40), [0]))


def test_patch_loss_is_the_image_loss_on_a_prior_sized_image(prior):
    y = observation(seed=8)
    kw = dict(guidance_scale=-300.0, adaptive_scale=True, dynamic_kernel=True)
    image = method(prior, **kw).predict_step(batch(y, [0]))
    patch = method(prior, patch_loss="patch", **kw).predict_step(batch(y, [0]))
    assert torch.allclose(image["restored"], patch["restored"], atol=1e-5)
    assert torch.allclose(image["kernel"], patch["kernel"], atol=1e-6)


def test_patch_loss_averages_per_patch_updates_as_the_released_code():
    """One step of patch_loss=patch on a 3-patch strip against a hand-written per-patch loop: each
    patch's loss with the patch zero-padded, kernels averaged over patches, mask updates and mean
    shifts averaged over the patches covering each pixel."""
    from bir.lit.patches import PatchGridModel

    g = torch.Generator().manual_seed(3)
    h, w, p = 8, 16, 8
    y = torch.rand(1, 3, h, w, generator=g, dtype=torch.float64)
    x_t = torch.randn(1, 3, h, w, generator=g, dtype=torch.float64)
    net_out = torch.randn(1, 3, h, w, generator=g, dtype=torch.float64)

    def model(x, i):  # x0 depends on the patch (not on the pixel alone): overlaps disagree
        x0 = torch.tanh(x + x.mean(dim=(1, 2, 3), keepdim=True) + net_out[..., :p, :p])
        return ModelOutput(eps=x, x0=x0, log_variance=torch.zeros_like(x))

    grid_model = PatchGridModel(model, p, 4)
    out = grid_model(x_t, torch.tensor([5]))
    op = KernelMaskOperator(kernel_size=3, mask_init_scale=0.1, kernel_lr=0.5, mask_lr=0.5).double()
    op.init_batch((1, 3, h, w), sample_generators(0, [0], "cpu", 3))
    k0, m0 = op.kernel.detach().clone(), op.mask.detach().clone()
    sched = DiffusionSchedule(torch.linspace(1e-4, 0.02, 10, dtype=torch.float64))
    guidance = OperatorGuidance(
        op,
        y,
        sched,
        torch.tensor([7.0], dtype=torch.float64),
        patch_loss="patch",
        adaptive_scale=False,
    )
    mean = torch.zeros_like(x_t)
    new_mean, _ = guidance(x_t, torch.tensor([5]), out, mean, torch.zeros_like(x_t))

    positions = out.positions
    assert positions == [(0, 0), (0, 4), (0, 8)]
    kernels, masks, shifts = [], torch.zeros_like(m0), torch.zeros_like(x_t)
    count = torch.zeros(1, 1, h, w, dtype=torch.float64)
    for k, (top, left) in enumerate(positions):
        x0 = out.patches.x0[k : k + 1].detach().requires_grad_(True)
        kern = k0.clone().requires_grad_(True)
        mask = m0.clone().requires_grad_(True)
        pred = F.conv2d((x0 + 1) / 2, kern[0][:, None], padding=1, groups=3)
        pred = pred + mask[..., top : top + p, left : left + p]
        mse = ((pred - y[..., top : top + p, left : left + p]) ** 2).mean()
        g_x, g_k, g_m = torch.autograd.grad(mse, [x0, kern, mask])
        kernels.append(k0 - 0.5 * g_k)
        masks[..., top : top + p, left : left + p] += (m0 - 0.5 * g_m)[
            ..., top : top + p, left : left + p
        ]
        shifts[..., top : top + p, left : left + p] += -7.0 * g_x
        count[..., top : top + p, left : left + p] += 1
    assert torch.allclose(op.kernel.detach(), torch.stack(kernels).mean(0), atol=1e-12)
    assert torch.allclose(op.mask.detach(), masks / count, atol=1e-12)
    assert torch.allclose(new_mean, shifts / count, atol=1e-12)


def test_gradient_through_x_t_differs_and_stays_finite(prior):
    y = observation(seed=6)
    kw = dict(guidance_scale=50.0, adaptive_scale=False, dynamic_kernel=False)
    via_x0 = method(prior, guidance_grad="x0", **kw).predict_step(batch(y, [0]))["restored"]
    via_xt = method(prior, guidance_grad="x_t", **kw).predict_step(batch(y, [0]))["restored"]
    assert torch.isfinite(via_xt).all() and not torch.allclose(via_x0, via_xt, atol=1e-4)


def test_noisy_observation_and_the_loss_increasing_first_step(prior):
    y = observation(seed=7)
    s = method(prior, guidance_scale=-100.0).predict_step(batch(y, [0]))["scale_trajectory"][0]
    assert s[0] == -100.0 and (s[1:] >= 0).all()  # the code's +3000 start, then -|.|
    kw = dict(adaptive_scale=False, dynamic_kernel=False, guidance_scale=500.0)
    clean = method(prior, **kw).predict_step(batch(y, [0]))
    noisy = method(prior, noisy_observation=True, **kw).predict_step(batch(y, [0]))
    assert torch.isfinite(noisy["restored"]).all()
    # the noisy target raises the data term at the noisiest step, where noise dominates
    assert noisy["loss_curve"][0, 0] > clean["loss_curve"][0, 0]


def test_outputs_follow_the_contract(prior):
    out = method(prior).predict_step(batch(observation(2), [0, 1]))
    assert out["name"] == ["img0", "img1"]
    assert out["restored"].shape == (2, 3, 16, 16)
    assert out["restored"].min() >= 0 and out["restored"].max() <= 1
    assert torch.allclose(out["kernel"].sum(dim=(-1, -2)), torch.ones(2, 3), atol=1e-5)
    assert out["scale_trajectory"].shape == out["loss_curve"].shape == (2, STEPS)
    assert set(out["extras"]) == {"kernel_gain", "mask_mean"}  # image-sized estimates left out


def test_bad_options_say_what_to_change(prior):
    with pytest.raises(ValueError, match="scale_formula must be reference or paper"):
        method(prior, scale_formula="code")
    with pytest.raises(ValueError, match="patch_loss=patch works on the per-patch x0"):
        method(prior, patch_loss="patch", guidance_grad="x_t")


# --- presets -----------------------------------------------------------------------------------
PRESETS = {
    # released numbers: (operator class, guidance_scale, adaptive, dynamic, noisy)
    "bir_d_deblur": ("KernelMaskOperator", -3000.0, True, True, True),
    "bir_d_blind": ("KernelMaskOperator", -3000.0, True, True, True),
    "bir_d_multi": ("Compose", 4500.0, False, True, True),
    "bir_d_lowlight": ("KernelMaskOperator", 62000.0, False, True, False),
    "bir_d_sr4": ("AvgPoolDownsample", -3000.0, True, False, False),
    "bir_d_inpaint": ("InpaintMask", -3000.0, True, False, False),
    "bir_d_colorize": ("Grayscale", -3000.0, True, False, False),
    "gdp_deblur": ("KernelMaskOperator", 6000.0, False, False, False),
    "gdp_sr4": ("AvgPoolDownsample", 2000.0, False, False, False),
    "gdp_inpaint": ("InpaintMask", 4000.0, False, False, False),
    "gdp_colorize": ("Grayscale", 6000.0, False, False, False),
    "gdp_lowlight": ("LowLightOperator", 160000.0, False, True, False),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_instantiate_with_the_released_numbers(prior, name):
    cfg = compose_config("restore", f"experiment={name}")
    cls, scale, adaptive, dynamic, noisy = PRESETS[name]
    assert (
        cfg.method.guidance_scale,
        cfg.method.adaptive_scale,
        cfg.method.dynamic_kernel,
        cfg.method.noisy_observation,
    ) == (scale, adaptive, dynamic, noisy)
    assert cfg.method.scale_formula == "reference" and cfg.method.scale_max is None
    operator = hydra.utils.instantiate(cfg.operator)
    assert type(operator).__name__ == cls
    m = hydra.utils.instantiate(cfg.method, prior=prior, operator=operator, steps=2)
    side = 16 // {"bir_d_sr4": 4, "gdp_sr4": 4}.get(name, 1) - (8 if name == "gdp_deblur" else 0)
    out = m.predict_step(batch(observation(size=side), [0]))
    assert torch.isfinite(out["restored"]).all() and out["restored"].shape == (1, 3, 16, 16)


def test_preset_kernels_are_the_scripts():
    from bir.operators.kernel_mask import gkern

    def operator(name):
        return hydra.utils.instantiate(compose_config("restore", f"experiment={name}").operator)

    deblur = operator("bir_d_deblur")
    deblur.init_batch((1, 3, 16, 16))
    assert torch.equal(deblur.kernel[0, 0], gkern(9, 2.0)) and deblur.padding == "zeros"
    blind = operator("bir_d_blind")
    blind.init_batch((1, 3, 16, 16))
    assert abs(blind.kernel[0, 0].sum().item() - 0.8752) < 1e-4  # the script's table
    multi = operator("bir_d_multi").ops[0]
    assert (multi.given - gkern(9, 2.0)).abs().max() < 5.1e-5  # gkern rounded to 4 decimals
    low = operator("bir_d_lowlight")
    low.init_batch((1, 3, 16, 16), sample_generators(0, [0]))
    assert low.kernel.shape == (1, 3, 3, 3) and low.kernel.max() < 0.01
    assert {g["name"]: g["lr"] for g in low.param_groups(0.01)} == {"kernel": 1.0, "mask": 1.0}


def test_gdp_inpaint_mask_is_the_scripts_quarter_of_random_pixels():
    # sample_x0_inp.py (deg="inp") removes the first 256^2 // 4 entries of a pixel permutation
    # (inp_masks/mask.np), all channels: 25% of the pixels missing at random, not a box
    cfg = compose_config("restore", "experiment=gdp_inpaint")
    op = hydra.utils.instantiate(cfg.operator)
    op.init_batch((2, 3, 64, 64), sample_generators(0, [0, 1]))
    mask = op.loss_mask()
    assert mask.shape == (2, 1, 64, 64) and set(mask.unique().tolist()) == {0.0, 1.0}
    missing = 1 - mask.flatten(1).mean(1)
    assert ((missing - 0.25).abs() < 0.04).all()  # 4096 pixels: std 0.007
    assert not torch.equal(mask[0], mask[1])  # drawn per image
    rows = (1 - mask[0, 0]).sum(1)  # a box hole would leave most rows whole
    assert (rows > 0).float().mean() > 0.9


def test_guidance_scale_sweep_config():
    cfg = compose_config("restore", "sweep=guidance_scale", "method=gdp", hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert "method.guidance_scale" in params and params["method.adaptive_scale"] == "false,true"


@pytest.mark.slow
def test_with_the_tiny_adm_unet(tmp_path):
    """The real ADM UNet (conf/net/unet_adm_tiny.yaml), saved and loaded through PixelPrior."""
    torch.manual_seed(0)
    net_cfg = net_config("unet_adm_tiny")
    torch.save(hydra.utils.instantiate(net_cfg).state_dict(), tmp_path / "adm.pt")
    adm = load_pixel_prior(
        hydra.utils.instantiate(net_cfg), str(tmp_path / "adm.pt"), image_size=16
    )
    zero = method(adm, steps=4, guidance_scale=0.0, adaptive_scale=False, dynamic_kernel=False)
    out = zero.predict_step(batch(observation(), [2]))
    assert torch.allclose(out["restored"], plain_ddpm(adm, (3, 16, 16), 0, 2, 4), atol=1e-5)
    full = method(adm, steps=4).predict_step(batch(observation(), [2]))
    assert torch.isfinite(full["restored"]).all() and full["scale_trajectory"].shape == (1, 4)


def test_runs_inside_a_trainer_in_inference_mode(prior):
    """Lightning predicts under torch.inference_mode by default; the guidance still gets gradients."""
    import lightning.pytorch as pl

    m = method(prior, steps=3, guidance_scale=500.0, adaptive_scale=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader([batch(observation(), [0])], batch_size=None)
    (out,) = trainer.predict(m, dataloaders=loader)
    start = KernelMaskOperator(kernel_size=5).initial_kernel()[0]
    assert not torch.allclose(out["kernel"][0, 0], start / start.sum())  # the kernel was updated
    assert out["loss_curve"].shape == (1, 3) and torch.isfinite(out["restored"]).all()

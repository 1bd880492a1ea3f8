"""BIR-D / GDP sampler: closed-form scale update, reduction to plain DDPM, toggles, guards,
per-sample independence, patches, configs."""

import logging
import math
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from bir.diffusion.prior import PixelPrior
from bir.diffusion.schedules import DiffusionSchedule, space_timesteps
from bir.lit.bir_d import (
    BIRD_D,
    INIT_STREAM,
    STEP_NOISE_STREAM,
    adaptive_guidance_scale,
    gaussian_log_likelihood,
)
from bir.operators.kernel_mask import KernelMaskOperator
from bir.operators.lowlight import LowLightOperator
from bir.random import randn, sample_generators

CONF = Path(__file__).resolve().parents[2] / "conf"
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
    return PixelPrior(TinyEpsNet(), str(path), learned_sigma=True, image_size=16,
                      checkpoint_what="tiny ADM")  # fmt: skip


def observation(b: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def batch(y: torch.Tensor, indices: list[int]) -> dict:
    return {"lq": y, "name": [f"img{i}" for i in indices], "index": torch.tensor(indices)}


def method(prior, operator=None, **kwargs) -> BIRD_D:
    kwargs.setdefault("steps", STEPS)
    return BIRD_D(prior, operator or KernelMaskOperator(kernel_size=5), **kwargs)


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
    s = adaptive_guidance_scale(x_prev, mean, g, loss, c, k)
    assert torch.allclose(s, torch.tensor([4.0, 1.5]))
    s_ref = adaptive_guidance_scale(x_prev, mean, g, loss, c, k, "reference")
    assert torch.allclose(s_ref, torch.tensor([4.0 / 9, 1.5 / 9]))


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
    op = KernelMaskOperator(kernel_size=5, init_sigma=None, use_mask=False)  # identity operator
    free = method(prior, op, guidance_scale=0.0, adaptive_scale=False, dynamic_kernel=False)
    guided = method(prior, op, guidance_scale=2000.0, adaptive_scale=False, dynamic_kernel=False)
    err_free = (free.predict_step(batch(y, [0]))["restored"] - y).square().mean()
    err_guided = (guided.predict_step(batch(y, [0]))["restored"] - y).square().mean()
    assert err_guided < 0.1 * err_free


def test_toggles_change_exactly_what_they_name(prior):
    y = observation(seed=2)
    start = KernelMaskOperator(kernel_size=5).initial_kernel()
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
    s = out_b["scale_trajectory"]
    assert (s >= model_b.scale_min).all() and (s <= model_b.scale_max).all()


def test_scale_bounds_clamp_the_adaptive_scale(prior):
    m = method(prior, adaptive_scale=True, guidance_scale=5.0, scale_min=1.0, scale_max=10.0)
    s = m.predict_step(batch(observation(), [0]))["scale_trajectory"][0]
    assert s[0] == 5.0 and s.min() >= 1.0 and s.max() <= 10.0
    assert ((s[1:] == 1.0) | (s[1:] == 10.0)).any()  # the raw formula left the bounds


def test_nan_loss_falls_back_and_is_logged(prior, caplog):
    m = method(prior, adaptive_scale=True, guidance_scale=50.0)
    calls = {"n": 0}
    original = m.data_loss

    def flaky(pred, target):
        calls["n"] += 1
        loss = original(pred, target)
        return torch.full_like(loss, float("nan")) if calls["n"] in (3, 4) else loss

    m.data_loss = flaky
    with caplog.at_level(logging.WARNING, logger="bir.lit.bir_d"):
        out = m.predict_step(batch(observation(), [0]))
    assert torch.isfinite(out["restored"]).all()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert (
        "non-finite loss for img0" in messages and "non-finite guidance scale for img0" in messages
    )
    s = out["scale_trajectory"][0]
    # call 3 is step 2's loss (guidance skipped), call 4 its scale update: s kept for step 3
    assert torch.isnan(out["loss_curve"][0, 1]) and s[2] == s[1]
    assert torch.isfinite(s).all()


def test_non_finite_image_raises_naming_it(prior):
    class NaNNet(nn.Module):
        def forward(self, x, t):
            return torch.full((x.shape[0], 6, *x.shape[2:]), float("nan"))

    bad = PixelPrior(NaNNet(), None, learned_sigma=True, image_size=16)
    m = method(bad, steps=3)
    with pytest.raises(RuntimeError, match="broken_image"):
        m.predict_step({"lq": observation(), "name": ["broken_image"], "index": torch.tensor([0])})


def test_batch_of_two_equals_two_runs_of_one(prior):
    y = observation(2, seed=4)
    # full BIR-D; s bounded so that float rounding of the batched convolution is not amplified
    full = dict(
        adaptive_scale=True, dynamic_kernel=True, guidance_scale=200.0, scale_max=2000.0, seed=1
    )
    # adaptive s alone, effectively unbounded (1e6): the per-image scale trajectories must match;
    # below that bound the chaotic s (it alternates between the bound and ~3e3) amplifies
    # float rounding of the batched convolution to ~3e-3 in the image
    scale_only = dict(
        adaptive_scale=True, dynamic_kernel=False, guidance_scale=200.0, scale_max=1e6, seed=1
    )
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


def test_gradient_through_x_t_differs_and_stays_finite(prior):
    y = observation(seed=6)
    kw = dict(guidance_scale=50.0, adaptive_scale=False, dynamic_kernel=False)
    via_x0 = method(prior, guidance_grad="x0", **kw).predict_step(batch(y, [0]))["restored"]
    via_xt = method(prior, guidance_grad="x_t", **kw).predict_step(batch(y, [0]))["restored"]
    assert torch.isfinite(via_xt).all() and not torch.allclose(via_x0, via_xt, atol=1e-4)


def test_reference_formula_and_noisy_observation_options(prior):
    y = observation(seed=7)
    base = method(prior, adaptive_scale=True, guidance_scale=-100.0, scale_min=-1e6)
    ref = method(
        prior, adaptive_scale=True, guidance_scale=-100.0, scale_min=-1e6, scale_formula="reference"
    )
    s_ref = ref.predict_step(batch(y, [0]))["scale_trajectory"][0]
    assert s_ref[0] == -100.0 and (s_ref[1:] >= 0).all()  # the code's +3000 start, then |s| / 9
    assert not torch.allclose(base.predict_step(batch(y, [0]))["scale_trajectory"][0], s_ref)
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


# --- configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["method=gdp"],
            {"adaptive_scale": False, "dynamic_kernel": False, "guidance_scale": 6000.0},
        ),
        (
            ["method=bir_d"],
            {"adaptive_scale": True, "dynamic_kernel": True, "guidance_scale": 3000.0},
        ),
        (["experiment=bir_d_lowlight"], {"adaptive_scale": True, "guidance_scale": 80000.0}),
        (["experiment=bir_d_deblur"], {"dynamic_kernel": True}),
        (["experiment=bir_d_sr4"], {"dynamic_kernel": False, "guidance_scale": 2000.0}),
        (["experiment=bir_d_inpaint"], {"dynamic_kernel": False}),
        (["experiment=bir_d_colorize"], {"dynamic_kernel": False}),
    ],
)
def test_configs_instantiate(prior, overrides, expected):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="restore", overrides=[*overrides, "input=x", "output=y"])
    for key, value in expected.items():
        assert cfg.method[key] == value
    operator = (
        hydra.utils.instantiate(cfg.operator) if cfg.get("operator") else KernelMaskOperator()
    )
    m = hydra.utils.instantiate(cfg.method, prior=prior, operator=operator, steps=3)
    assert isinstance(m, BIRD_D) and m.guidance_scale == expected.get(
        "guidance_scale", m.guidance_scale
    )
    out = m.predict_step(batch(observation(), [0]))
    assert torch.isfinite(out["restored"]).all()
    scale = 4 if "sr4" in overrides[0] else 1  # the SR operator makes x 4x the size of y
    assert out["restored"].shape == (1, 3, 16 * scale, 16 * scale)


def test_guidance_scale_sweep_config():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="restore", overrides=["sweep=guidance_scale", "method=gdp", "input=x",
                                                        "output=y"], return_hydra_config=True)  # fmt: skip
    params = cfg.hydra.sweeper.params
    assert "method.guidance_scale" in params and params["method.adaptive_scale"] == "false,true"


@pytest.mark.slow
def test_with_the_tiny_adm_unet(tmp_path):
    """The real ADM UNet (conf/net/unet_adm_tiny.yaml), saved and loaded through PixelPrior."""
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    net_cfg = OmegaConf.load(CONF / "net" / "unet_adm_tiny.yaml")
    torch.save(hydra.utils.instantiate(net_cfg).state_dict(), tmp_path / "adm.pt")
    adm = PixelPrior(hydra.utils.instantiate(net_cfg), str(tmp_path / "adm.pt"), image_size=16)
    zero = method(adm, steps=4, guidance_scale=0.0, adaptive_scale=False, dynamic_kernel=False)
    out = zero.predict_step(batch(observation(), [2]))
    assert torch.allclose(out["restored"], plain_ddpm(adm, (3, 16, 16), 0, 2, 4), atol=1e-5)
    full = method(adm, steps=4).predict_step(batch(observation(), [2]))
    assert torch.isfinite(full["restored"]).all() and full["scale_trajectory"].shape == (1, 4)


def test_runs_inside_a_trainer_in_inference_mode(prior):
    """Lightning predicts under torch.inference_mode by default; the guidance still gets gradients."""
    import lightning.pytorch as pl

    m = method(prior, steps=3, guidance_scale=500.0, adaptive_scale=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    loader = torch.utils.data.DataLoader([batch(observation(), [0])], batch_size=None)
    (out,) = trainer.predict(m, dataloaders=loader)
    start = KernelMaskOperator(kernel_size=5).initial_kernel()
    assert not torch.allclose(out["kernel"][0, 0], start / start.sum())  # the kernel was updated
    assert out["loss_curve"].shape == (1, 3) and torch.isfinite(out["restored"]).all()

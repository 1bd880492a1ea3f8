"""Latent image guidance: closed-form update (v2 and v1 units), time window, repeats, resampled
targets, edge weights, RGB space, per-sample independence and the scale-0 identity; the CFG
helpers."""

from __future__ import annotations

import math

import pytest
import torch

from bir.diffusion.guidance import (
    REFERENCE_SCALE_FACTOR,
    LatentImageGuidance,
    classifier_free_guidance,
    edge_weight_map,
    rescaled_cfg_scale,
)
from bir.diffusion.parameterization import ModelOutput, convert_output
from bir.diffusion.samplers import sample_ddim, sample_ddpm
from bir.diffusion.schedules import DiffusionSchedule, make_betas, space_timesteps
from bir.random import randn, sample_generators


def schedule(steps: int = 10) -> DiffusionSchedule:
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    return DiffusionSchedule(betas, space_timesteps(1000, steps))


def toy_model(sched: DiffusionSchedule):
    """eps-net that shrinks x_t (a fixed linear map), as a stand-in denoiser."""

    def model(x_t: torch.Tensor, i: torch.Tensor) -> ModelOutput:
        return convert_output(0.3 * x_t, x_t, i, sched, "eps", "fixed_small")

    return model


def latents(b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 6, 6, generator=g), torch.randn(b, 4, 6, 6, generator=g)


def step_index(k: int, b: int = 2) -> torch.Tensor:
    return torch.full((b,), k, dtype=torch.long)


def test_one_mse_step_matches_the_closed_form():
    sched = schedule()
    x0, target = latents()
    scale = 0.01
    g = LatentImageGuidance(scale, schedule=sched)
    g.set_target(torch.rand(2, 3, 48, 48), target)
    i = step_index(5)
    new = g.guide_x0(x0, i)
    n = x0[0].numel()
    c1 = float(sched.posterior_mean_coef1[5])
    # d/dx0 of mean((x0 - y)^2) = 2 (x0 - y) / N; step scale * 3000 / c1 (DiffBIR convention)
    expected = x0 - scale * REFERENCE_SCALE_FACTOR / c1 * 2 * (x0 - target) / n
    torch.testing.assert_close(new, expected)
    # so the posterior mean moves by exactly -scale * 3000 * grad
    x_t = torch.randn_like(x0)
    shift = sched.posterior_mean(new, x_t, i) - sched.posterior_mean(x0, x_t, i)
    torch.testing.assert_close(shift, -scale * 3000 * 2 * (x0 - target) / n, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(g.losses[0], (x0 - target).pow(2).mean(dim=(1, 2, 3)))


def test_repeats_apply_the_step_repeatedly_and_the_window_is_respected():
    sched = schedule()
    x0, target = latents()
    once = LatentImageGuidance(0.02, repeats=1, schedule=sched)
    twice = LatentImageGuidance(0.02, repeats=2, schedule=sched)
    for g in (once, twice):
        g.set_target(torch.rand(2, 3, 48, 48), target)
    i = step_index(3)
    torch.testing.assert_close(twice.guide_x0(x0, i), once.guide_x0(once.guide_x0(x0, i), i))
    # active only while t_stop < t + 1 < t_start (original timesteps)
    t = int(sched.timesteps[3])
    window = LatentImageGuidance(0.02, t_start=t + 1, t_stop=-1, schedule=sched)
    window.set_target(torch.rand(2, 3, 48, 48), target)
    assert torch.equal(window.guide_x0(x0, i), x0)  # t + 1 == t_start: outside
    assert not torch.equal(window.guide_x0(x0, step_index(2)), x0)  # smaller t: inside
    window.t_stop = int(sched.timesteps[2]) + 1
    assert torch.equal(window.guide_x0(x0, step_index(2)), x0)  # t + 1 == t_stop: outside


def test_scale_zero_is_exactly_no_guidance_for_ddpm_and_ddim():
    sched = schedule()
    model = toy_model(sched)
    _, target = latents()
    g = LatentImageGuidance(0.0, schedule=sched)
    g.set_target(torch.rand(2, 3, 48, 48), target)
    x_T = randn((4, 6, 6), sample_generators(0, [0, 1]))
    plain = sample_ddpm(model, x_T, sched, sample_generators(1, [0, 1]), clip_x0=False)
    guided = sample_ddpm(model, x_T, sched, sample_generators(1, [0, 1]), guidance=g, clip_x0=False)
    assert torch.equal(plain, guided)
    plain = sample_ddim(model, x_T, sched, clip_x0=False)
    assert torch.equal(plain, sample_ddim(g.wrap_model(model), x_T, sched, clip_x0=False))
    assert g.losses == []


def test_guidance_pulls_the_sample_towards_the_target_per_sample():
    sched = schedule()
    model = toy_model(sched)
    _, target = latents(b=2, seed=4)
    x_T = randn((4, 6, 6), sample_generators(0, [0, 1]))

    def run(scale, idx):
        g = LatentImageGuidance(scale, repeats=2, schedule=sched)
        g.set_target(torch.rand(len(idx), 3, 48, 48), target[idx])
        gens = sample_generators(1, idx)
        return sample_ddpm(model, x_T[idx], sched, gens, guidance=g, clip_x0=False), g

    free, _ = run(0.0, [0, 1])
    pulled, g = run(0.001, [0, 1])
    err = lambda x: (x - target).pow(2).mean(dim=(1, 2, 3))  # noqa: E731
    assert (err(pulled) < 0.5 * err(free)).all()
    # the loss curve has one entry per guided step, decreasing overall
    curve = torch.stack(g.losses, 1)
    assert curve.shape == (2, len(sched)) and (curve[:, -1] < curve[:, 0]).all()
    # guidance of a batch equals guidance of each sample alone (per-sample mean loss)
    alone, _ = run(0.001, [1])
    torch.testing.assert_close(pulled[1:], alone, atol=1e-5, rtol=1e-5)


def test_edge_weight_map_is_one_on_flat_regions_and_small_on_edges():
    flat = torch.full((1, 3, 8, 8), 0.4)
    torch.testing.assert_close(edge_weight_map(flat), torch.ones(1, 1, 8, 8))
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1.0
    w = edge_weight_map(step)
    # Sobel |gx| = 4 * luma next to the edge (columns 3, 4); the 2x2 block (cols 2-3 / 4-5) sums
    # two such columns: 1 - tanh(2 * 4 * 0.9999) per pixel; far columns see no gradient
    luma = 0.2989 + 0.5870 + 0.1140
    torch.testing.assert_close(
        w[0, 0, :, 2:6], torch.full((8, 4), 1 - torch.tanh(torch.tensor(16 * luma)).item())
    )
    torch.testing.assert_close(w[0, 0, :, :2], torch.ones(8, 2))
    torch.testing.assert_close(w[0, 0, :, 6:], torch.ones(8, 2))


def test_weighted_and_rgb_space_gradients_match_autograd_by_hand():
    sched = schedule()
    x0, _ = latents(b=1)
    image = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    i = step_index(4, b=1)
    c1 = float(sched.posterior_mean_coef1[4])
    # rgb space: decode = nearest x2 upsampling of the first three latent channels
    decode = lambda z: torch.nn.functional.interpolate(z[:, :3], scale_factor=2)  # noqa: E731
    g = LatentImageGuidance(0.01, space="rgb", loss="weighted_mse", schedule=sched, decode=decode)
    g.set_target(image)
    z = x0.clone().requires_grad_(True)
    w = edge_weight_map(image)
    loss = ((decode(z) - (image * 2 - 1)).pow(2) * w).mean()
    (grad,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(g.guide_x0(x0, i), x0 - 0.01 * 3000 / c1 * grad)
    assert grad[:, 3].abs().max() == 0  # the undecoded channel is untouched
    # latent space weighted: the weight map is pooled to the latent grid
    lat = LatentImageGuidance(0.01, loss="weighted_mse", schedule=sched)
    target = torch.zeros_like(x0)
    lat.set_target(image, target)
    assert lat.weight.shape == (1, 1, 6, 6)
    torch.testing.assert_close(lat.weight, torch.nn.functional.avg_pool2d(w, 2))
    expected = x0 - 0.01 * 3000 / c1 * 2 * lat.weight * x0 / x0.numel()
    torch.testing.assert_close(lat.guide_x0(x0, i), expected)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError):
        LatentImageGuidance(1.0, space="pixel")
    with pytest.raises(ValueError):
        LatentImageGuidance(1.0, loss="l1")
    with pytest.raises(ValueError):
        LatentImageGuidance(1.0, space="rgb")  # no decoder
    g = LatentImageGuidance(1.0, schedule=schedule())
    with pytest.raises(ValueError, match="set_target"):
        g.guide_x0(torch.zeros(1, 4, 2, 2), step_index(1, 1))
    with pytest.raises(ValueError, match="latent"):
        g.set_target(torch.zeros(1, 3, 16, 16))


def test_v1_units_step_x0_by_scale_and_the_mean_by_half_of_it():
    """DiffBIR v1: per repeat x0 <- x0 - s grad (no x3000, no 1/c1_t); the mean of the unguided
    x0 moves by 0.5 x (sum of the x0 steps)."""
    sched = schedule()
    x0, target = latents()
    s, n = 0.5, x0[0].numel()
    g = LatentImageGuidance(s, repeats=2, units="v1", schedule=sched)
    g.set_target(torch.rand(2, 3, 48, 48), target)
    i = step_index(4)
    x_t = torch.randn_like(x0)
    mean = sched.posterior_mean(x0, x_t, i)
    out = ModelOutput(eps=torch.zeros_like(x0), x0=x0)
    new_mean, new_x0 = g(x_t, i, out, mean, sched.posterior_log_variance(i, x0))
    step1 = -s * 2 * (x0 - target) / n
    x1 = x0 + step1
    step2 = -s * 2 * (x1 - target) / n
    torch.testing.assert_close(new_x0, x1 + step2)
    torch.testing.assert_close(new_mean, mean + 0.5 * (step1 + step2))
    # v2 units return only x0 (the sampler recomputes the mean from it)
    v2 = LatentImageGuidance(s, units="v2", schedule=sched)
    v2.set_target(torch.rand(2, 3, 48, 48), target)
    m2, x2 = v2(x_t, i, out, mean, sched.posterior_log_variance(i, x0))
    assert m2 is None and x2 is not None
    # inside sample_ddpm the v1 mean is used as returned
    gens = sample_generators(0, [0, 1])
    a = sample_ddpm(toy_model(sched), x_t, sched, gens, guidance=g, clip_x0=False)
    b = sample_ddpm(toy_model(sched), x_t, sched, sample_generators(0, [0, 1]), clip_x0=False)
    assert (a - b).abs().max() > 1e-4


def test_resampled_target_is_re_encoded_every_guided_step_and_repeat():
    sched = schedule()
    x0, target = latents()
    calls = []

    def encode(image):  # a posterior sample: a new draw on every call
        calls.append(image)
        return target + 0.1 * len(calls)

    g = LatentImageGuidance(0.01, repeats=3, resample_target=True, encode=encode, schedule=sched)
    image = torch.rand(2, 3, 48, 48)
    g.set_target(image, None)
    i = step_index(5)
    new = g.guide_x0(x0, i)
    assert len(calls) == 3 and all(c is g.image for c in calls)
    c1 = float(sched.posterior_mean_coef1[5])
    n, k = x0[0].numel(), 0.01 * REFERENCE_SCALE_FACTOR / c1
    expect = x0
    for r in range(3):  # each repeat against its own sample
        expect = expect - k * 2 * (expect - (target + 0.1 * (r + 1))) / n
    torch.testing.assert_close(new, expect)
    # outside the window nothing is encoded
    g.t_start = 0
    g.guide_x0(x0, i)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="encode"):
        LatentImageGuidance(0.01, resample_target=True, schedule=sched)
    with pytest.raises(ValueError, match="units"):
        LatentImageGuidance(0.01, units="v3")


def test_rescaled_cfg_scale_and_classifier_free_guidance():
    s = 6.0
    assert rescaled_cfg_scale(s, 1000) == 1.0  # pure noise: no guidance
    assert rescaled_cfg_scale(s, 0) == pytest.approx(1 + s)  # (1 - cos(pi)) / 2 = 1
    assert rescaled_cfg_scale(s, 500) == pytest.approx(1 + s * (1 - math.cos(math.pi / 32)) / 2)
    assert rescaled_cfg_scale(1.0, 0) == 1.0 and rescaled_cfg_scale(0.5, 10) == 0.5
    c, u = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(classifier_free_guidance(c, u, 4.0), torch.tensor([5.0, 1.0]))

"""Classical baselines that estimate what a task does not give them (kernel, noise level, gain)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bir.data.samples import holdout_image
from bir.lit.baselines import ClassicalBaseline, blind_richardson_lucy, estimate_noise_sigma
from bir.metrics import psnr
from bir.operators.blur import gaussian_kernel


def _photo(size=48):
    return F.interpolate(holdout_image("astronaut", 256)[None], size=size, mode="area")[0]


def _blur(x, k):
    p = k.shape[-1] // 2
    return F.conv2d(
        F.pad(x[None].double(), (p,) * 4, mode="reflect"),
        k.double().expand(3, 1, *k.shape),
        groups=3,
    )[0]


def _i_divergence(y, est):
    return float((y * torch.log(y / est) - y + est).sum())


def test_blind_richardson_lucy_is_an_em_descent_that_deblurs():
    x = _photo().double().clamp_min(1e-3)
    truth = gaussian_kernel(7, 1.6, dtype=torch.float64)
    y = _blur(x, truth)
    init = gaussian_kernel(7, 1.0, dtype=torch.float64)
    divergences, kernels = [], []
    for n in range(0, 7, 2):
        out, k = blind_richardson_lucy(y, init, num_iter=n)
        kernels.append(k)
        est = _blur(out.double().clamp_min(1e-12), k)
        divergences.append(_i_divergence(y.clamp_min(1e-12), est.clamp_min(1e-12)))
    # each RL step (image or kernel) is an EM step: the I-divergence to y never increases
    assert all(b <= a * (1 + 1e-6) for a, b in zip(divergences, divergences[1:])), divergences
    assert divergences[-1] < 0.5 * divergences[0]
    for k in kernels:  # a kernel estimate: non-negative, sums to one
        assert k.min() >= 0 and float(k.sum()) == pytest.approx(1.0, abs=1e-5)
    out, _ = blind_richardson_lucy(y.float(), init, num_iter=10)
    assert psnr(out[None], x[None].float()) > psnr(y[None].float(), x[None].float()) + 1.0
    with pytest.raises(ValueError, match="odd size"):
        blind_richardson_lucy(y, torch.ones(4, 4))


def test_noise_sigma_estimate_and_tv_that_uses_it():
    x = _photo(96)
    g = torch.Generator().manual_seed(0)
    # on a photograph its texture adds a little to the finest band
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    assert estimate_noise_sigma(noisy) == pytest.approx(0.1, rel=0.15)
    # on pure noise the finest Haar band is exactly noise: the MAD estimate is unbiased
    pure = 0.2 * torch.randn(3, 256, 256, generator=g)
    assert estimate_noise_sigma(pure) == pytest.approx(0.2, rel=0.02)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)[None]
    auto = ClassicalBaseline("tv", tv_weight=None).restore(y)
    fixed = ClassicalBaseline("tv", tv_weight=estimate_noise_sigma(y[0].double())).restore(y)
    torch.testing.assert_close(auto, fixed)
    assert psnr(auto, x[None]) > psnr(y, x[None]) + 3


def test_biharmonic_fills_only_the_missing_pixels_and_gain_maps_the_99th_percentile():
    x = _photo()[None]
    mask = (torch.rand(1, 1, 48, 48, generator=torch.Generator().manual_seed(2)) > 0.25).float()
    y = x * mask
    out = ClassicalBaseline("biharmonic").restore(y, mask=mask)
    observed = mask.expand_as(x).bool()
    torch.testing.assert_close(out[observed], x[observed], atol=1e-6, rtol=0)
    assert psnr(out, x) > psnr(y, x) + 10
    with pytest.raises(ValueError, match="needs the mask"):
        ClassicalBaseline("biharmonic").restore(y)
    dark = 0.25 * x
    lit = ClassicalBaseline("gain").restore(dark)
    q = torch.quantile(dark.flatten(), 0.99)
    torch.testing.assert_close(lit, (dark / q).clamp(0, 1))
    with pytest.raises(ValueError, match="choose one of"):
        ClassicalBaseline("bm3d")

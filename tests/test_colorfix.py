"""Colour fix: wavelet low/high split and AdaIN statistics transfer."""

from __future__ import annotations

import pytest
import torch

from bir.colorfix import (
    adain_color_fix,
    channel_mean_std,
    color_fix,
    wavelet_blur,
    wavelet_color_fix,
    wavelet_decomposition,
)


def _photo(size: int = 48) -> torch.Tensor:
    from skimage import data

    img = torch.from_numpy(data.astronaut()[::8, ::8].copy()).permute(2, 0, 1).float() / 255
    return img[None, :, :size, :size]


def test_wavelet_blur_is_the_dilated_binomial_filter():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 12, 12, generator=g)
    out = wavelet_blur(x, 2)
    # interior pixel by hand: taps at offsets {-2, 0, 2} with weights outer([1,2,1]/4)
    w = torch.tensor([0.25, 0.5, 0.25])
    y, z = 6, 5
    expected = sum(
        w[a] * w[b] * x[0, :, y + 2 * (a - 1), z + 2 * (b - 1)] for a in range(3) for b in range(3)
    )
    torch.testing.assert_close(out[0, :, y, z], expected)
    # the low-pass preserves constants (replicate padding, kernel sums to 1)
    torch.testing.assert_close(wavelet_blur(torch.full_like(x, 0.3), 4), torch.full_like(x, 0.3))


def test_wavelet_decomposition_sums_back_and_low_is_five_blurs():
    x = _photo()
    high, low = wavelet_decomposition(x, levels=5)
    torch.testing.assert_close(high + low, x)
    expected_low = x
    for k in range(5):
        expected_low = wavelet_blur(expected_low, 2**k)
    torch.testing.assert_close(low, expected_low)


def test_wavelet_color_fix_transfers_low_frequency_colour_exactly():
    content = _photo()
    shift = torch.tensor([0.1, -0.05, 0.2]).view(1, 3, 1, 1)
    # style = content + a per-channel colour cast: the low band differs by exactly the cast,
    # the high band is identical, so the fix must reproduce the style image exactly
    style = content + shift
    torch.testing.assert_close(wavelet_color_fix(content, style), style, atol=1e-6, rtol=0)
    # closed form on arbitrary inputs: high(content) + low(style)
    g = torch.Generator().manual_seed(1)
    other = torch.rand(content.shape, generator=g)
    out = wavelet_color_fix(content, other)
    c_high, _ = wavelet_decomposition(content)
    _, o_low = wavelet_decomposition(other)
    torch.testing.assert_close(out, c_high + o_low)
    # high band of the output is the content's (detail kept), up to the low-pass of the residual
    assert (out - content).abs().mean() > 0.01


def test_adain_matches_style_statistics_per_channel():
    g = torch.Generator().manual_seed(2)
    content = torch.rand(2, 3, 20, 24, generator=g)
    style = torch.rand(2, 3, 16, 16, generator=g) * 0.5 + 0.3
    out = adain_color_fix(content, style)
    o_mean, o_std = channel_mean_std(out, eps=0)
    s_mean, s_std = channel_mean_std(style, eps=0)
    torch.testing.assert_close(o_mean, s_mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(o_std, s_std, atol=1e-3, rtol=1e-3)
    # per-sample: sample 0 of the output follows style 0, not style 1
    assert not torch.allclose(o_mean[0], o_mean[1])


def test_color_fix_dispatch():
    x = _photo(32)
    y = x.flip(-1)
    assert color_fix(x, y, "none") is x
    torch.testing.assert_close(color_fix(x, y, "adain"), adain_color_fix(x, y))
    with pytest.raises(ValueError):
        color_fix(x, y, "histogram")
    with pytest.raises(ValueError):
        wavelet_color_fix(x, y[..., :16])

"""The released BIRD blur (``F.conv2d(padding="same")`` on [-1, 1] images, cross-correlation)
against bir's ``zeros_signed`` padding and ``correlate`` option, by explicit reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bir.operators import FixedKernelBlur, KernelMLPBlur, LearnableKernelBlur, convolve_per_image


def images(shape=(2, 3, 12, 10), seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def asymmetric_kernel(k: int = 5, seed: int = 1) -> torch.Tensor:
    kernel = torch.rand(k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return kernel / kernel.sum()


def released_blur(x01: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """blind_deblurring.py: ``conv2d(x.view(-1, 1, H, W), k, padding="same")`` on x in [-1, 1]
    (zero padding there), returned on the [0, 1] scale."""
    b, c, h, w = x01.shape
    weight = kernel.to(x01.dtype)[None, None]
    out = F.conv2d((2 * x01 - 1).reshape(b * c, 1, h, w), weight, padding="same")
    return (out.reshape(b, c, h, w) + 1) / 2


def test_zeros_signed_correlation_is_the_released_blur():
    x, kernel = images(), asymmetric_kernel()
    ours = convolve_per_image(x, kernel[None, None], "zeros_signed", correlate=True)
    torch.testing.assert_close(ours, released_blur(x, kernel), rtol=0, atol=1e-12)
    # for a kernel summing to 1 it is mid-grey padding of the [0, 1] image
    grey = F.conv2d(F.pad(x, (2, 2, 2, 2), value=0.5).reshape(6, 1, 16, 14), kernel[None, None])
    torch.testing.assert_close(ours, grey.reshape(x.shape), rtol=0, atol=1e-12)


def test_black_zero_padding_differs_from_the_released_border_only_near_the_edge():
    x, kernel = images(), asymmetric_kernel()
    black = convolve_per_image(x, kernel[None, None], "zeros", correlate=True)
    signed = convolve_per_image(x, kernel[None, None], "zeros_signed", correlate=True)
    inner = (..., slice(2, -2), slice(2, -2))
    torch.testing.assert_close(black[inner], signed[inner], rtol=0, atol=1e-12)
    assert (black - signed).abs().amax() > 0.05  # the border: black instead of mid-grey


def test_correlation_is_convolution_with_the_flipped_kernel():
    x, kernel = images(), asymmetric_kernel()
    for padding in ("zeros", "zeros_signed", "reflect", "circular"):
        correlated = convolve_per_image(x, kernel[None, None], padding, correlate=True)
        convolved = convolve_per_image(x, kernel.flip(-1, -2)[None, None], padding)
        torch.testing.assert_close(correlated, convolved, rtol=0, atol=1e-12)
    assert not torch.allclose(
        convolve_per_image(x, kernel[None, None], "zeros", correlate=True),
        convolve_per_image(x, kernel[None, None], "zeros"),
    )


def test_operators_apply_the_reference_blur_and_report_the_psf():
    x, kernel = images(), asymmetric_kernel()
    fixed = FixedKernelBlur(kernel, padding="zeros_signed", correlate=True).double()
    kernel = fixed.kernel[0, 0]  # as stored (float32 values)
    torch.testing.assert_close(fixed(x), released_blur(x, kernel), rtol=0, atol=1e-12)
    fixed.init_batch(x.shape)
    psf = fixed.estimate()["kernel"]
    assert psf.shape == (2, 1, 5, 5) and torch.equal(psf[0, 0], kernel.flip(-1, -2))
    # the PSF convolved (bir's default direction) gives the same observation
    as_convolution = FixedKernelBlur(psf[:1], padding="zeros_signed").double()
    torch.testing.assert_close(as_convolution(x), fixed(x), rtol=0, atol=1e-6)

    mlp = KernelMLPBlur(kernel_size=5, latent_dim=4, hidden=8)  # defaults: the released border
    mlp.init_batch(x.shape, [torch.Generator().manual_seed(i) for i in range(2)])
    k = mlp.kernel()
    expected = torch.cat([released_blur(x[i : i + 1], k[i, 0]) for i in range(2)])
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(mlp.estimate()["kernel"], k.flip(-1, -2).detach())

    learnable = LearnableKernelBlur(kernel_size=5, init="uniform", correlate=True)
    learnable.init_batch(x.shape)
    torch.testing.assert_close(
        learnable.estimate()["kernel"], learnable.kernel().flip(-1, -2).detach()
    )


def test_unknown_padding_is_refused():
    with pytest.raises(ValueError, match="padding must be one of"):
        FixedKernelBlur(kernel_size=3, padding="grey")
    with pytest.raises(ValueError, match="padding must be one of"):
        convolve_per_image(images(), asymmetric_kernel()[None, None], "same")

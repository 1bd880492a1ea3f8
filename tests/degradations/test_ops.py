"""filter2d, USM sharpening, resize and noise against independent references."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage

from bir.degradations import add_gaussian_noise, add_poisson_noise, filter2d, reflect_pad, usm_sharp
from bir.degradations.filters import crop_from_canvas, pad_to_canvas


@pytest.mark.parametrize("size", [(17, 23), (5, 6)])  # the second is smaller than the 9x9 pad
def test_filter2d_matches_scipy_correlate_with_reflect_padding(size):
    g = torch.Generator().manual_seed(1)
    img = torch.rand(3, 2, *size, generator=g)
    kernels = torch.rand(3, 9, 9, generator=g)
    kernels[1, :, :4] = 0  # asymmetric: catches a flipped (convolution) kernel
    out = filter2d(img, kernels)
    for b in range(3):
        for c in range(2):
            ref = ndimage.correlate(
                img[b, c].double().numpy(), kernels[b].double().numpy(), mode="mirror"
            )
            np.testing.assert_allclose(out[b, c].numpy(), ref, atol=1e-5)


def test_reflect_pad_matches_torch_when_it_can():
    img = torch.rand(2, 3, 8, 10)
    np.testing.assert_array_equal(
        reflect_pad(img, 3, 4, 2, 5).numpy(),
        torch.nn.functional.pad(img, (3, 4, 2, 5), mode="reflect").numpy(),
    )
    big = reflect_pad(img[:, :, :, :4], 9, 9, 0, 0)  # pad > width: repeated reflection
    np.testing.assert_array_equal(
        big[0, 0, 0].numpy(), np.pad(img[0, 0, 0, :4].numpy(), 9, mode="reflect")
    )


def test_ragged_canvas_filtering_equals_per_image():
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(1, 3, h, w, generator=g) for h, w in [(12, 20), (31, 9), (16, 16)]]
    kernels = torch.rand(3, 7, 7, generator=g)
    canvas, sizes = pad_to_canvas(images)
    batched = crop_from_canvas(filter2d(canvas, kernels), sizes)
    for x, k, y in zip(images, kernels, batched):
        torch.testing.assert_close(y, filter2d(x, k[None]), atol=1e-6, rtol=0)


def test_usm_sharp_matches_opencv_formula():
    from skimage import data

    img = data.astronaut()[200:264, 180:244].astype(np.float32) / 255.0
    blur = cv2.GaussianBlur(img, (51, 51), 0)
    residual = img - blur
    mask = (np.abs(residual) * 255 > 10).astype(np.float32)
    soft = cv2.GaussianBlur(mask, (51, 51), 0)
    ref = soft * np.clip(img + 0.5 * residual, 0, 1) + (1 - soft) * img
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    x_before = x.clone()
    out = usm_sharp(x, weight=0.5, radius=50, threshold=10)
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), ref, atol=2e-5)
    assert torch.equal(x, x_before)
    basicsr_usm = pytest.importorskip("basicsr.utils.img_process_util")
    np.testing.assert_allclose(
        out[0].permute(1, 2, 0).numpy(), basicsr_usm.usm_sharp(img), atol=2e-5
    )


def test_gaussian_noise_statistics_gray_and_color():
    img = torch.full((2, 3, 128, 128), 0.5)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    out = add_gaussian_noise(img, [0.05, 0.02], [False, True], gens)
    noise = out - img
    assert abs(float(noise[0].std()) - 0.05) < 0.05 * 0.03
    assert abs(float(noise[1].std()) - 0.02) < 0.02 * 0.03
    assert abs(float(noise.mean())) < 1e-3
    assert torch.equal(noise[1, 0], noise[1, 2]) and not torch.equal(noise[0, 0], noise[0, 2])
    assert torch.equal(img, torch.full_like(img, 0.5))


def test_poisson_noise_variance_is_intensity_over_levels():
    value = 128 / 255  # on the 8-bit grid, so the quantisation does not move it
    img = torch.full((2, 3, 128, 128), value)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    out = add_poisson_noise(img, [1.0, 2.0], [False, True], gens)
    noise = out - img
    std = (value / 256) ** 0.5  # Var[Poisson(xL)/L] = x / L, L = 256
    assert abs(float(noise[0].std()) - std) < std * 0.03
    assert abs(float(noise[1].std()) - 2 * std) < 2 * std * 0.03
    assert abs(float(noise[0].mean())) < 2e-3
    assert torch.equal(noise[1, 0], noise[1, 1])


def test_noise_is_per_sample_deterministic():
    img = torch.rand(3, 3, 16, 16)
    a = add_gaussian_noise(
        img, [0.1] * 3, [False] * 3, [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    )
    b = add_gaussian_noise(img[1:2], [0.1], [False], [torch.Generator().manual_seed(6)])
    torch.testing.assert_close(a[1:2], b, atol=0, rtol=0)


def test_poisson_unique_levels_equals_basicsr_math_with_the_same_draws(monkeypatch):
    """levels="unique" + torchvision luma = BasicSR's add_poisson_noise_pt, both sides given the
    same deterministic stand-in for ``torch.poisson`` (a function of the mean)."""
    basicsr_deg = pytest.importorskip("basicsr.data.degradations")
    from bir.degradations import TORCHVISION_LUMA, unique_levels

    def fake_poisson(lam, generator=None):
        return torch.floor(lam * 1.25 + 0.375)

    g = torch.Generator().manual_seed(5)
    img = torch.rand(3, 3, 24, 20, generator=g)
    img[1] = (img[1] * 40).round() / 255  # few distinct levels: a count of 64, not 256
    scale = torch.tensor([0.5, 2.0, 1.3])
    gray = torch.tensor([0.0, 1.0, 1.0])
    monkeypatch.setattr(torch, "poisson", fake_poisson)
    ref = basicsr_deg.add_poisson_noise_pt(img, scale=scale, gray_noise=gray, clip=True)
    ours = add_poisson_noise(
        img, scale, gray.bool(), [g] * 3, levels="unique", gray_weights=TORCHVISION_LUMA
    )
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    assert unique_levels(torch.arange(0, 41).long()) == 64.0
    assert unique_levels(torch.arange(256).long()) == 256.0
    # the fixed 256 levels are a different noise on the image with few levels
    fixed = add_poisson_noise(img, scale, gray.bool(), [g] * 3, gray_weights=TORCHVISION_LUMA)
    assert not torch.equal(fixed[1], ref[1])


def test_poisson_levels_validation():
    with pytest.raises(ValueError, match="levels"):
        add_poisson_noise(torch.rand(1, 3, 4, 4), [1.0], [False], [torch.Generator()], levels=0)


def test_fft_path_equals_direct_filtering_and_subnormals_are_flushed():
    """Kernels of >= FFT_MIN_SIZE go through the FFT: equal to the direct grouped convolution
    up to float32 round-off, and each sample's result does not depend on its batch."""
    from bir.degradations.filters import FFT_MIN_SIZE, filter2d_valid, flush_subnormal

    g = torch.Generator().manual_seed(0)
    k = FFT_MIN_SIZE + 4
    kernels = torch.rand(3, k, k, generator=g)
    kernels[0, :, : k // 2] = 0  # asymmetric: catches a flipped kernel
    kernels = kernels / kernels.sum(dim=(-2, -1), keepdim=True)
    img = torch.rand(3, 2, 40, 29, generator=g)
    direct = filter2d_valid(reflect_pad(img, k // 2, k // 2, k // 2, k // 2), kernels)
    fft = filter2d(img, kernels)
    torch.testing.assert_close(fft, direct, atol=2e-6, rtol=0)
    torch.testing.assert_close(filter2d(img[1:2], kernels[1:2]), fft[1:2], atol=0, rtol=0)
    tiny = torch.finfo(torch.float32).tiny
    flushed = flush_subnormal(torch.tensor([0.5, tiny, tiny / 4, -tiny / 8, 0.0]))
    assert flushed.tolist() == [0.5, tiny, 0.0, 0.0, 0.0]


def test_kernels_have_no_subnormal_entries():
    from bir.degradations import build_kernels

    kernels = build_kernels(
        ["iso", "generalized_iso"],
        [21, 21],
        pad_to=21,
        sigma_x=torch.tensor([0.2, 0.3]),
        sigma_y=torch.tensor([0.2, 0.3]),
        beta=torch.tensor([1.0, 4.0]),
    )
    nonzero = kernels[kernels != 0]
    assert nonzero.abs().min() >= torch.finfo(torch.float32).tiny
    assert (kernels == 0).any()  # the far tails underflow (they would be subnormal otherwise)

"""Forward operators: blur against scipy, downsampling by hand, masks, grayscale, composition,
the batched kernel MLP against a per-image loop, and synthetic observations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from bir.operators import (
    AvgPoolDownsample,
    BicubicDownsample,
    Compose,
    FixedKernelBlur,
    Grayscale,
    Identity,
    InpaintMask,
    KernelMLPBlur,
    LearnableKernelBlur,
    LowLightOperator,
    MotionBlur,
    convolve_per_image,
    gaussian_kernel,
)
from bir.operators.synthetic import motion_kernel, observe


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize(
    "padding,scipy_mode", [("reflect", "mirror"), ("circular", "wrap"), ("zeros", "constant")]
)
def test_blur_matches_scipy_convolution(padding, scipy_mode):
    x = torch.rand(2, 3, 12, 14, dtype=torch.float64)
    kernel = torch.rand(2, 1, 5, 5, dtype=torch.float64)  # asymmetric: catches a missing flip
    y = convolve_per_image(x, kernel, padding)
    for b in range(2):
        for c in range(3):
            ref = ndimage.convolve(x[b, c].numpy(), kernel[b, 0].numpy(), mode=scipy_mode)
            np.testing.assert_allclose(y[b, c].numpy(), ref, atol=1e-12)


def test_depthwise_blur_uses_one_kernel_per_channel():
    x = torch.rand(1, 3, 10, 10, dtype=torch.float64)
    kernel = torch.rand(1, 3, 3, 3, dtype=torch.float64)
    y = convolve_per_image(x, kernel, "circular")
    for c in range(3):
        ref = ndimage.convolve(x[0, c].numpy(), kernel[0, c].numpy(), mode="wrap")
        np.testing.assert_allclose(y[0, c].numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("size,sigma", [(7, 1.5), (11, 1.5), (9, 2.0), (51, 8.3)])
def test_gaussian_kernel_equals_its_former_copies_and_opencv(size, sigma):
    k = gaussian_kernel(size, sigma, dtype=torch.float64).numpy()
    # the 2-D formula the blur, kernel-mask and baseline copies used (normalised as a whole)
    r = np.arange(size) - size // 2
    two_d = np.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * sigma**2))
    np.testing.assert_allclose(k, two_d / two_d.sum(), rtol=1e-12, atol=0)
    # USM's and SSIM's: OpenCV's 1-D profile, squared
    cv2 = pytest.importorskip("cv2")
    profile = cv2.getGaussianKernel(size, sigma, ktype=cv2.CV_64F)
    np.testing.assert_allclose(k, profile @ profile.T, rtol=1e-12, atol=0)
    single = gaussian_kernel(size, sigma)
    assert single.dtype == torch.float32 and torch.equal(single, torch.from_numpy(k).float())


def test_fixed_gaussian_blur_kernel_and_estimate():
    op = FixedKernelBlur(kernel_size=7, sigma=1.5)
    op.init_batch((3, 3, 9, 9))
    k = op.estimate()["kernel"]
    assert k.shape == (3, 1, 7, 7)
    assert torch.allclose(k.sum((-1, -2)), torch.ones(3, 1))
    r = torch.arange(7.0) - 3
    expected = torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * 1.5**2))
    assert torch.allclose(k[0, 0], expected / expected.sum(), atol=1e-7)
    # a constant image is unchanged by a normalised kernel with reflect padding
    assert torch.allclose(
        op(torch.full((3, 3, 9, 9), 0.4)), torch.full((3, 3, 9, 9), 0.4), atol=1e-6
    )


@pytest.mark.parametrize("init", ["delta", "uniform", "gaussian"])
def test_learnable_kernel_is_a_distribution_and_trains(init):
    op = LearnableKernelBlur(kernel_size=5, channels=3, init=init, init_sigma=1.0)
    op.init_batch((2, 3, 8, 8))
    k = op.kernel()
    assert k.shape == (2, 3, 5, 5) and (k >= 0).all()
    assert torch.allclose(k.sum((-1, -2)), torch.ones(2, 3))
    if init == "delta":
        assert k[0, 0, 2, 2] > 0.9  # the floor keeps it near a delta, yet trainable
    x = torch.rand(2, 3, 8, 8)
    line = torch.zeros(1, 1, 5, 5)
    line[..., 2, :] = 0.2  # a horizontal motion blur: far from every start
    target = convolve_per_image(x, line, "reflect")
    opt = torch.optim.Adam(op.param_groups(0.1))
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((op(x) - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert torch.allclose(op.estimate()["kernel"].sum((-1, -2)), torch.ones(2, 3), atol=1e-6)


def test_kernel_mlp_batched_equals_per_image_loop():
    op = KernelMLPBlur(kernel_size=5, latent_dim=6, hidden=16)
    op.init_batch((3, 3, 8, 8), gens(0, 1, 2))
    batched = op.kernel()
    for b in range(3):  # the reference's fcn: Linear -> ReLU6 -> Linear -> Softmax
        h = F.relu6(op.w1[b] @ op.z[b] + op.b1[b])
        expected = torch.softmax(op.w2[b] @ h + op.b2[b], 0).view(1, 5, 5)
        assert torch.allclose(batched[b], expected, atol=1e-6)
    assert (batched >= 0).all() and torch.allclose(batched.sum((-1, -2)), torch.ones(3, 1))
    # image b's draws depend only on its own generator
    single = KernelMLPBlur(kernel_size=5, latent_dim=6, hidden=16)
    single.init_batch((1, 3, 8, 8), gens(1))
    assert torch.equal(single.w2[0], op.w2[1]) and torch.equal(single.z[0], op.z[1])
    assert 0 <= op.z.min() and op.z.max() < 0.1  # reference code: U[0, 1) x 0.1
    # gradients of image 0's loss do not reach image 1's weights
    op(torch.rand(3, 3, 8, 8))[0].sum().backward()
    assert op.w2.grad[1].abs().max() == 0 and op.w2.grad[0].abs().max() > 0


def test_avgpool_downsample_by_hand():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    y = AvgPoolDownsample(2)(x)
    assert y.shape == (2, 1, 2, 2)
    assert y[0, 0, 0, 0] == (0 + 1 + 4 + 5) / 4 and y[1, 0, 1, 1] == (26 + 27 + 30 + 31) / 4
    assert AvgPoolDownsample(8).input_size((4, 5)) == (32, 40)
    assert AvgPoolDownsample(8).output_size((32, 40)) == (4, 5)
    with pytest.raises(ValueError, match="multiple"):
        AvgPoolDownsample(3)(x)


def test_bicubic_downsample_shape_constant_and_linearity():
    op = BicubicDownsample(4)
    assert op(torch.rand(1, 3, 32, 16)).shape == (1, 3, 8, 4)
    assert torch.allclose(
        op(torch.full((1, 3, 16, 16), 0.3)), torch.full((1, 3, 4, 4), 0.3), atol=1e-6
    )
    a, b = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    assert torch.allclose(op(2 * a - b), 2 * op(a) - op(b), atol=1e-5)
    # antialiasing averages over the footprint: a checkerboard mostly cancels
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2
    y = op(checker.float().expand(1, 3, 16, 16))
    assert (y[..., 1:-1, 1:-1] - 0.5).abs().max() < 0.05


def test_box_mask_and_loss_mask():
    op = InpaintMask(kind="box", box_size=4)
    x = torch.rand(2, 3, 8, 8)
    y = op(x)
    mask = op.loss_mask()
    assert mask.shape == (1, 1, 8, 8) and mask.sum() == 64 - 16
    assert (y[..., 2:6, 2:6] == 0).all() and torch.equal(y[..., 0, :], x[..., 0, :])


def test_random_mask_is_per_image_and_batch_independent():
    op = InpaintMask(kind="random", keep_ratio=0.25)
    op.init_batch((2, 3, 64, 64), gens(5, 6))
    masks = op.mask_for(torch.zeros(2, 3, 64, 64))
    assert masks.shape == (2, 1, 64, 64) and not torch.equal(masks[0], masks[1])
    assert abs(masks.mean().item() - 0.25) < 0.03
    single = InpaintMask(kind="random", keep_ratio=0.25)
    single.init_batch((1, 3, 64, 64), gens(6))
    assert torch.equal(single.mask_for(torch.zeros(1, 3, 64, 64))[0], masks[1])


def test_init_batch_needs_the_full_shape():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        InpaintMask().init_batch(2)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        InpaintMask().init_batch((2, 3, 8, 8), gens(0, 1, 2))


def test_given_mask_checks_size():
    op = InpaintMask(mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="mask is"):
        op(torch.rand(1, 3, 5, 5))


def test_grayscale_bt601_weights():
    x = torch.zeros(3, 3, 2, 2)
    for c in range(3):
        x[c, c] = 1.0
    y = Grayscale()(x)
    assert y.shape == (3, 3, 2, 2)
    for c, wt in enumerate((0.299, 0.587, 0.114)):
        assert torch.allclose(y[c], torch.full((3, 2, 2), wt))


def test_identity_and_compose():
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(Identity()(x), x)
    blur_op = LearnableKernelBlur(kernel_size=3, init="uniform")
    composed = Compose([blur_op, AvgPoolDownsample(4), InpaintMask(kind="box", box_size=2)])
    composed.init_batch((2, 3, 16, 16), gens(0, 1))
    y = composed(x)
    expected = (
        F.avg_pool2d(convolve_per_image(x, blur_op.kernel(), "reflect"), 4) * composed.loss_mask()
    )
    assert torch.allclose(y, expected, atol=1e-6)
    assert composed.input_size((4, 4)) == (16, 16) and composed.output_size((16, 16)) == (4, 4)
    assert composed.ops[2].mask.shape[-2:] == (4, 4)  # drawn at the size that reaches it
    assert set(composed.estimate()) == {"kernel", "mask"}
    assert [g["name"] for g in composed.param_groups(0.1)] == ["kernel"]


def test_motion_kernel_is_a_distribution_from_its_generator():
    k = motion_kernel(15, 0.5, torch.Generator().manual_seed(3))
    assert k.shape == (15, 15) and (k >= 0).all() and abs(k.sum().item() - 1) < 1e-6
    assert torch.equal(k, motion_kernel(15, 0.5, torch.Generator().manual_seed(3)))
    assert not torch.equal(k, motion_kernel(15, 0.5, torch.Generator().manual_seed(4)))
    assert (k > 0).sum() > 15  # a path, not a point


def test_motion_blur_draws_each_images_kernel_from_its_generator():
    op = MotionBlur(kernel_size=9, intensity=0.3, steps=32, padding="zeros")
    op.init_batch((2, 3, 12, 12), gens(4, 5))
    want = torch.stack([motion_kernel(9, 0.3, g, 32) for g in gens(4, 5)])[:, None]
    assert torch.equal(op.estimate()["kernel"], want)
    x = torch.rand(2, 3, 12, 12)
    torch.testing.assert_close(op(x), convolve_per_image(x, want, "zeros"))
    op.init_batch((1, 3, 12, 12))  # no generators: seed b
    assert torch.equal(op.kernel, motion_kernel(9, 0.3, gens(0)[0], 32)[None, None])


OPERATORS = {
    "gaussian_blur": lambda: FixedKernelBlur(kernel_size=7, sigma=1.0),
    "motion_blur": lambda: MotionBlur(kernel_size=9),
    "avgpool": lambda: AvgPoolDownsample(4),
    "bicubic": lambda: BicubicDownsample(2),
    "inpaint": lambda: InpaintMask(kind="random"),
    "identity": Identity,
    "grayscale": Grayscale,
    "lowlight": lambda: LowLightOperator(factor_init_mean=0.3, factor_init_std=0.0, use_mask=False),
}


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_observe_returns_truth_that_reproduces_y(kind):
    x = torch.rand(2, 3, 16, 16)
    y, truth = observe(x, OPERATORS[kind](), 0.0, gens(0, 1))
    assert torch.allclose(y, truth["operator"](x).clamp(0, 1), atol=1e-6)
    if "blur" in kind:
        assert truth["kernel"].shape[0] == 2 and torch.allclose(
            truth["kernel"].sum((-1, -2)), torch.ones(2, 1)
        )
    # per-image generators: image 1 alone gives the same observation
    y1, _ = observe(x[1:], OPERATORS[kind](), 0.1, gens(1))
    y2, _ = observe(x, OPERATORS[kind](), 0.1, gens(0, 1))
    assert torch.allclose(y1[0], y2[1], atol=1e-6)


def test_observe_noise_level_and_no_noise_where_pixels_are_missing():
    x = torch.full((1, 3, 64, 64), 0.5)
    y, truth = observe(x, Identity(), 0.05, gens(0))
    assert abs((y - x).std().item() - 0.05) < 0.003 and truth["sigma"] == 0.05
    y, truth = observe(x, InpaintMask(kind="random", keep_ratio=0.5), 0.05, gens(0))
    missing = truth["mask"].expand_as(y) == 0
    assert missing.any() and (y[missing] == 0).all() and (y[~missing] != 0.5).all()

"""KernelMaskOperator: y = K * x + M against explicit convolutions, the released gkern, per-image
parameters created by init_batch, gradient descent reduces the loss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from bir.operators.blur import convolve_per_image, gaussian_kernel
from bir.operators.kernel_mask import KernelMaskOperator, gkern
from bir.random import sample_generators


def test_gkern_is_the_scripts_formula():
    # independent: scipy's normal CDF, as the released gkern(kernlen, nsig)
    for size, nsig in [(9, 2.0), (21, 3.0), (5, 1.0)]:
        h = (2 * nsig + 1.0) / size
        profile = np.diff(stats.norm.cdf(np.linspace(-nsig - h / 2, nsig + h / 2, size + 1)))
        raw = np.sqrt(np.outer(profile, profile))
        np.testing.assert_allclose(gkern(size, nsig).numpy(), raw / raw.sum(), atol=1e-7)
    assert abs(gkern(9, 2.0).max().item() - 0.0252) < 5e-5  # multi.py's table peak


def test_default_start_is_gkern_and_delta_without_mask_is_identity():
    op = KernelMaskOperator()
    op.init_batch((2, 3, 12, 10))
    assert torch.equal(op.kernel[1, 2], gkern(9, 2.0))
    ident = KernelMaskOperator(kernel_size=5, init="delta", use_mask=False)
    ident.init_batch((2, 3, 12, 10))
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ident(x), x)


@pytest.mark.parametrize("correlate", [True, False])
def test_forward_matches_explicit_filtering_plus_mask(correlate):
    g = torch.Generator().manual_seed(1)
    op = KernelMaskOperator(
        kernel_size=3, padding="zeros", mask_init_scale=0.5, correlate=correlate
    )
    op.init_batch((2, 3, 8, 8), sample_generators(0, [3, 4]))
    x = torch.rand(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        op.kernel.copy_(torch.rand(2, 3, 3, 3, generator=g))  # asymmetric: catches a flip
    y = op(x)
    for b in range(2):
        # nn.Conv2d(3, 3, 3, padding=1, groups=3) is the released operator (cross-correlation)
        conv = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False, groups=3)
        w = op.kernel[b][:, None]
        conv.weight = torch.nn.Parameter(w if correlate else w.flip(-1, -2))
        assert torch.allclose(y[b], conv(x[b : b + 1])[0] + op.mask[b, 0], atol=1e-6)
    # the mask starts in [0, mask_init_scale) and is shared by the channels
    assert op.mask.shape == (2, 1, 8, 8) and 0 <= op.mask.min() and op.mask.max() < 0.5
    # the estimate is the convolution PSF, whatever the orientation used
    psf = op.estimate()["kernel"] * op.estimate()["kernel_gain"][..., None, None]
    assert torch.allclose(
        psf, op.kernel.detach().flip(-1, -2) if correlate else op.kernel, atol=1e-6
    )


def test_valid_padding_shrinks_and_maps_sizes():
    op = KernelMaskOperator(kernel_size=9, padding="valid", use_mask=False)
    op.init_batch((1, 3, 32, 32))
    x = torch.rand(1, 3, 32, 32)
    y = op(x)
    assert y.shape == (1, 3, 24, 24) and op.output_size((32, 32)) == (24, 24)
    assert op.input_size((24, 24)) == (32, 32)
    ref = F.conv2d(x, gkern(9, 2.0).expand(3, 1, 9, 9), groups=3)  # GDP's GaussianBlur
    assert torch.allclose(y, ref, atol=1e-6)
    # a grey frame is not a zero frame for a kernel that need not sum to 1
    with pytest.raises(ValueError, match="padding must be one of"):
        KernelMaskOperator(padding="zeros_signed")


def test_rand_init_and_masks_do_not_depend_on_the_batch():
    both = KernelMaskOperator(kernel_size=3, init="rand", init_scale=0.01)
    both.init_batch((2, 3, 6, 6), sample_generators(7, [0, 1]))
    one = KernelMaskOperator(kernel_size=3, init="rand", init_scale=0.01)
    one.init_batch((1, 3, 6, 6), sample_generators(7, [1]))
    assert torch.equal(both.mask[1], one.mask[0]) and torch.equal(both.kernel[1], one.kernel[0])
    assert not torch.equal(both.mask[0], both.mask[1])
    assert 0 <= both.kernel.min() and both.kernel.max() < 0.01


def test_init_kernel_is_used_as_given():
    start = torch.arange(9.0).reshape(3, 3) / 36
    op = KernelMaskOperator(kernel_size=3, init_kernel=start.tolist())
    op.init_batch((2, 3, 4, 4))
    assert torch.equal(op.kernel, start.expand(2, 3, 3, 3))
    with pytest.raises(ValueError, match="init_kernel must be"):
        KernelMaskOperator(kernel_size=5, init_kernel=start.tolist())


def test_gradient_descent_on_the_kernel_reduces_the_loss():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 24, 24, generator=g)
    true_kernel = gaussian_kernel(9, 1.0).expand(1, 3, 9, 9)
    y = convolve_per_image(x, true_kernel, "zeros", correlate=True)
    op = KernelMaskOperator(kernel_size=9, use_mask=False, kernel_lr=0.03)
    op.init_batch((1, 3, 24, 24))
    losses = []
    for _ in range(100):
        loss = (op(x) - y).square().mean()
        losses.append(loss.item())
        (group,) = op.param_groups(0.01)
        (grad,) = torch.autograd.grad(loss, group["params"])
        with torch.no_grad():
            group["params"][0].sub_(group["lr"] * grad)
    assert losses[-1] < 0.75 * losses[0]
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))


def test_param_groups_exist_right_after_init_batch_and_estimate():
    op = KernelMaskOperator(kernel_size=5, kernel_lr=None, mask_lr=0.1)
    op.init_batch((2, 3, 7, 7))
    # every learnable parameter is there before the first forward call
    groups = {grp["name"]: grp["lr"] for grp in op.param_groups(0.3)}
    assert groups == {"kernel": 0.3, "mask": 0.1} and op.mask.shape == (2, 1, 7, 7)
    assert KernelMaskOperator(learn_kernel=False, use_mask=False).param_groups(1.0) == []
    with torch.no_grad():
        op.kernel.mul_(2.0)
    est = op.estimate()
    assert torch.allclose(est["kernel"].sum(dim=(-1, -2)), torch.ones(2, 3))
    assert torch.allclose(est["kernel_gain"], torch.full((2, 3), 2.0 * gkern(5, 2.0).sum()))
    assert est["mask_mean"].shape == (2,)


def test_forward_window_slices_the_mask():
    op = KernelMaskOperator(kernel_size=3, mask_init_scale=1.0)
    op.init_batch((1, 3, 8, 8), sample_generators(0, [0]))
    x = torch.rand(1, 3, 4, 4)
    expected = convolve_per_image(x, op.kernel, "zeros", correlate=True) + op.mask[..., 2:6, 4:8]
    assert torch.allclose(op.forward_window(x, 2, 4), expected)
    with pytest.raises(ValueError, match="init_batch"):
        op(torch.rand(1, 3, 6, 6))

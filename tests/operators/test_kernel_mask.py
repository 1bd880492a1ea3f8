"""KernelMaskOperator: y = K * x + M, per-image parameters, gradient descent reduces the loss."""

import torch
import torch.nn.functional as F

from bir.operators.kernel_mask import KernelMaskOperator, depthwise_convolve, gaussian_kernel
from bir.random import sample_generators


def test_delta_kernel_without_mask_is_identity():
    op = KernelMaskOperator(kernel_size=5, init_sigma=None, use_mask=False)
    op.init_batch(2)
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(op(x), x)


def test_forward_matches_explicit_convolution_plus_mask():
    g = torch.Generator().manual_seed(1)
    op = KernelMaskOperator(kernel_size=3, padding="zeros", mask_init_scale=0.5)
    op.init_batch(2, sample_generators(0, [3, 4]))
    x = torch.rand(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        op.kernel.copy_(torch.rand(2, 3, 3, 3, generator=g))
    y = op(x)
    for b in range(2):
        for c in range(3):
            # true convolution = correlation with the flipped kernel; zero padding
            ref = F.conv2d(
                x[b : b + 1, c : c + 1], op.kernel[b, c].flip(-1, -2)[None, None], padding=1
            )
            assert torch.allclose(y[b, c], ref[0, 0] + op.mask[b, 0], atol=1e-6)
    # the mask starts in [0, mask_init_scale) and is shared by the channels
    assert op.mask.shape == (2, 1, 8, 8) and 0 <= op.mask.min() and op.mask.max() < 0.5


def test_masks_do_not_depend_on_the_batch():
    both = KernelMaskOperator()
    both.init_batch(2, sample_generators(7, [0, 1]))
    both(torch.zeros(2, 3, 6, 6))
    one = KernelMaskOperator()
    one.init_batch(1, sample_generators(7, [1]))
    one(torch.zeros(1, 3, 6, 6))
    assert torch.equal(both.mask[1], one.mask[0])
    assert not torch.equal(both.mask[0], both.mask[1])


def test_gradient_descent_on_the_kernel_reduces_the_loss():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 24, 24, generator=g)
    true_kernel = gaussian_kernel(9, 1.0).expand(1, 3, 9, 9)
    y = depthwise_convolve(x, true_kernel)
    op = KernelMaskOperator(kernel_size=9, init_sigma=2.5, use_mask=False, kernel_lr=0.03)
    op.init_batch(1)
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


def test_param_groups_and_estimate():
    op = KernelMaskOperator(kernel_size=5, kernel_lr=None, mask_lr=0.1)
    op.init_batch(2)
    assert [grp["name"] for grp in op.param_groups(0.3)] == ["kernel"]  # mask not allocated yet
    op(torch.zeros(2, 3, 7, 7))
    groups = {grp["name"]: grp["lr"] for grp in op.param_groups(0.3)}
    assert groups == {"kernel": 0.3, "mask": 0.1}
    assert KernelMaskOperator(learn_kernel=False, use_mask=False).param_groups(1.0) == []
    with torch.no_grad():
        op.kernel.mul_(2.0)
    est = op.estimate()
    assert torch.allclose(est["kernel"].sum(dim=(-1, -2)), torch.ones(2, 3))
    assert torch.allclose(est["kernel_gain"], torch.full((2, 3), 2.0))
    assert est["mask_mean"].shape == (2,)

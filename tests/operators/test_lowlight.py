"""LowLightOperator: y = f x + M with a per-image factor and mask, updated with step 1."""

import torch

from bir.operators.lowlight import LowLightOperator
from bir.random import sample_generators


def test_forward_is_factor_times_x_plus_mask():
    op = LowLightOperator(mask_init_scale=0.2)
    op.init_batch((2, 3, 4, 5), sample_generators(0, [5, 6]))
    x = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    y = op(x)
    f = op.factor.detach().reshape(2, 1, 1, 1)
    assert torch.allclose(y, f * x + op.mask, atol=1e-7)
    assert op.mask.shape == (2, 1, 4, 5) and op.mask.max() < 0.2
    assert torch.allclose(op.forward_window(x[..., 1:3, 2:4], 1, 2), y[..., 1:3, 2:4])


def test_factor_init_uses_each_images_generator():
    op = LowLightOperator(factor_init_std=0.01, factor_init_mean=0.5)
    op.init_batch((2, 3, 4, 4), sample_generators(3, [10, 11]))
    expected = [
        0.5 + 0.01 * torch.randn((), generator=g).item() for g in sample_generators(3, [10, 11])
    ]
    assert torch.allclose(op.estimate()["factor"], torch.tensor(expected))


def test_a_known_factor_draws_nothing():
    op = LowLightOperator(factor_init_std=0.0, factor_init_mean=0.25, use_mask=False)
    g = torch.Generator().manual_seed(2)
    op.init_batch((1, 3, 4, 4), [g])
    assert op.estimate()["factor"].item() == 0.25
    assert torch.equal(
        torch.randn(3, generator=g), torch.randn(3, generator=torch.Generator().manual_seed(2))
    )


def test_gradient_steps_move_the_factor_to_the_exposure():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 16, 16, generator=g) * 0.8 + 0.1
    y = 0.3 * x
    op = LowLightOperator(use_mask=False)  # lr 1, as GDP
    op.init_batch((1, 3, 16, 16), sample_generators(0, [0]))
    start_loss = (op(x) - y).square().mean().item()
    for _ in range(200):
        loss = (op(x) - y).square().mean()
        (group,) = op.param_groups(0.01)
        assert group["lr"] == 1.0
        (grad,) = torch.autograd.grad(loss, group["params"])
        with torch.no_grad():
            group["params"][0].sub_(group["lr"] * grad)
    assert abs(op.factor.item() - 0.3) < 0.02
    assert (op(x) - y).square().mean().item() < 0.01 * start_loss


def test_mask_exists_after_init_batch_and_disabled_parts_are_not_offered():
    op = LowLightOperator(learn_factor=False)
    op.init_batch((1, 3, 4, 4))
    assert [grp["name"] for grp in op.param_groups(1.0)] == ["mask"]
    assert "mask_mean" not in LowLightOperator(use_mask=False).estimate()

"""bir.lit.ema: the EMA rule, checked number by number against its formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bir.lit.ema import EMACallback, decay_at, ema_copy, lerp_towards, update_ema


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_decay_warmup_follows_ldm_schedule_and_caps_at_decay():
    assert decay_at(0.999, 0) == 0.999
    assert decay_at(0.999, 12345) == 0.999
    # (1 + n) / (10 + n): 1/10, 2/11, 9/18 ... until it passes the decay
    assert decay_at(0.999, 0, warmup=True) == pytest.approx(0.1)
    assert decay_at(0.999, 1, warmup=True) == pytest.approx(2 / 11)
    assert decay_at(0.999, 8, warmup=True) == pytest.approx(0.5)
    assert decay_at(0.9, 80, warmup=True) == 0.9  # 81/90 = 0.9 exactly, and beyond: capped
    assert decay_at(0.9, 1000, warmup=True) == 0.9
    with pytest.raises(ValueError, match="decay must be in"):
        decay_at(1.5, 0)


def test_update_averages_parameters_by_hand_and_copies_buffers():
    net = small_net()
    ema = ema_copy(net)
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    e0 = {k: v.clone() for k, v in ema.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    net.train()(torch.randn(5, 3))  # moves BatchNorm's running stats and its step counter
    update_ema(ema, net, 0.9)
    for name, p in net.named_parameters():
        want = 0.9 * e0[name] + 0.1 * p.detach()  # e <- d e + (1 - d) p, element by element
        torch.testing.assert_close(dict(ema.named_parameters())[name], want)
    for name, buf in net.named_buffers():
        assert torch.equal(dict(ema.named_buffers())[name], buf), name
    assert int(dict(ema.named_buffers())["1.num_batches_tracked"]) == 1

    # k more updates towards fixed weights: e_k = d^k e + (1 - d^k) p
    e1 = {k: v.clone() for k, v in ema.named_parameters()}
    for _ in range(3):
        update_ema(ema, net, 0.9)
    for name, p in net.named_parameters():
        want = 0.9**3 * e1[name] + (1 - 0.9**3) * p.detach()
        torch.testing.assert_close(dict(ema.named_parameters())[name], want)


def test_update_matches_parameters_by_name_not_order():
    net = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    ema = nn.ModuleDict({"b": nn.Linear(2, 2), "a": nn.Linear(2, 2)})  # other registration order
    before = {k: v.clone() for k, v in ema.named_parameters()}
    update_ema(ema, net, 0.5)
    for name, p in net.named_parameters():
        want = 0.5 * before[name] + 0.5 * p.detach()
        torch.testing.assert_close(dict(ema.named_parameters())[name], want)


def test_lerp_towards_casts_and_copies_integer_tensors():
    avg = [torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([2, 5])]
    lerp_towards(avg, [torch.tensor([3.0, -1.0]), torch.tensor([7, 9])], decay=0.75)
    assert avg[0].dtype == torch.float64
    torch.testing.assert_close(avg[0], torch.tensor([1.5, 2.0], dtype=torch.float64))
    assert avg[1].tolist() == [7, 9]  # a counter is copied, not averaged


def test_callback_rejects_a_bad_decay():
    with pytest.raises(ValueError, match="decay must be in"):
        EMACallback(decay=-0.1)

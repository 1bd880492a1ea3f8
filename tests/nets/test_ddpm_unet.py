"""DDPM/DDIM pixel UNet (CelebA-HQ prior): release size and keys, block math, loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bir.lit.pixel_ddpm import load_pixel_prior
from bir.nets.attention import SpatialSelfAttention
from bir.nets.checkpoints import CheckpointMismatchError
from bir.nets.ddpm_unet import Downsample, ddpm_timestep_embedding
from tests.conftest import build_net as build


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def test_celebahq_config_matches_release():
    with torch.device("meta"):
        net = build("unet_ddpm_celebahq")
    # DDPM's 256 px models are "114M" (Ho et al. 2020, Table/App. B); exact count of this layout:
    assert sum(p.numel() for p in net.parameters()) == 113_673_219
    sd = net.state_dict()
    expected = {
        "temb.dense.0.weight": (512, 128),
        "temb.dense.1.weight": (512, 512),
        "conv_in.weight": (128, 3, 3, 3),
        "down.0.block.0.norm1.weight": (128,),
        "down.0.block.0.temb_proj.weight": (128, 512),
        "down.0.downsample.conv.weight": (128, 128, 3, 3),
        "down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "down.4.attn.1.q.weight": (512, 512, 1, 1),  # 16 px level (256 / 2**4)
        "mid.block_1.conv1.weight": (512, 512, 3, 3),
        "mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "up.5.block.0.conv1.weight": (512, 1024, 3, 3),
        "up.4.attn.2.k.weight": (512, 512, 1, 1),
        "up.0.block.2.nin_shortcut.weight": (128, 256, 1, 1),
        "up.1.upsample.conv.weight": (128, 128, 3, 3),
        "norm_out.weight": (128,),
        "conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    attn_levels = {k.split(".")[1] for k in sd if k.startswith("down.") and ".attn." in k}
    assert attn_levels == {"4"}
    assert "down.5.downsample.conv.weight" not in sd and "up.0.upsample.conv.weight" not in sd


def test_ddpm_timestep_embedding_closed_form():
    t = torch.tensor([0, 3, 999])
    emb = ddpm_timestep_embedding(t, 8)
    for b, tv in enumerate(t.tolist()):
        for j in range(4):
            f = math.exp(-math.log(10000) * j / 3)  # denominator half - 1
            assert emb[b, j].item() == pytest.approx(math.sin(tv * f), abs=1e-4)
            assert emb[b, 4 + j].item() == pytest.approx(math.cos(tv * f), abs=1e-4)


def test_downsample_pads_right_and_bottom_only():
    down = Downsample(2, with_conv=True)
    x = torch.randn(1, 2, 8, 8)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert down(x).shape == (1, 2, 4, 4)
    torch.testing.assert_close(down(x), ref)


def test_attn_block_matches_explicit_softmax():
    block = randomize(SpatialSelfAttention(32))
    x = torch.randn(2, 32, 3, 4)
    h = block.norm(x)
    q, k, v = (m(h).reshape(2, 32, 12) for m in (block.q, block.k, block.v))
    w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * 32**-0.5, dim=2)  # [B, query, key]
    out = torch.bmm(v, w.permute(0, 2, 1)).reshape(2, 32, 3, 4)
    torch.testing.assert_close(block(x), x + block.proj_out(out), atol=1e-5, rtol=1e-5)


def test_tiny_forward_and_prefixed_round_trip(tmp_path):
    src = randomize(build("unet_ddpm_tiny"), seed=4).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 900])
    out = src(x, t)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    assert not torch.allclose(out, src(x, torch.tensor([2, 900])))
    path = tmp_path / "celeba_hq.ckpt"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)  # DataParallel file
    # the path prior=ddpm_celebahq takes: the prior loader strips the DataParallel prefix
    prior = load_pixel_prior(build("unet_ddpm_tiny"), str(path), learned_sigma=False, image_size=16)
    torch.testing.assert_close(prior(x, t), out)
    bad = {k: v for k, v in src.state_dict().items() if "mid.attn_1" not in k}
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointMismatchError, match="missing keys") as err:
        load_pixel_prior(build("unet_ddpm_tiny"), str(tmp_path / "bad.ckpt"))
    assert "mid.attn_1.q.weight" in err.value.missing

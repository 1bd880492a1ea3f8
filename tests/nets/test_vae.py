"""ldm AutoencoderKL: release size and keys, posterior, loading, tiled encode/decode."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from bir.nets.checkpoints import CheckpointMismatchError, load_net
from bir.nets.vae import DiagonalGaussianDistribution
from bir.random import sample_generators
from bir.tiling import tiled_apply
from tests.conftest import build_net as build


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def test_sd_vae_config_matches_release():
    with torch.device("meta"):
        vae = build("vae_sd")
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # SD KL-f8 VAE (83.65M)
    assert vae.scale_factor == pytest.approx(0.18215) and vae.downsample_factor == 8
    sd = vae.state_dict()
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == 248 and not any(".temb_proj." in k for k in sd)


def test_posterior_moments_sampling_and_kl():
    params = torch.randn(3, 8, 2, 2)
    params[:, 4:] = params[:, 4:].clamp(-2, 2)
    params[0, 4, 0, 0] = 50.0  # clamped to 20
    post = DiagonalGaussianDistribution(params)
    assert post.logvar[0, 0, 0, 0] == 20.0
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))
    torch.testing.assert_close(post.mode(), params[:, :4])
    kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).flatten(1).sum(1)
    torch.testing.assert_close(post.kl(), kl)
    # per-sample generators: sample i does not depend on the rest of the batch
    gens = sample_generators(7, [10, 11, 12])
    full = post.sample(gens)
    single = DiagonalGaussianDistribution(params[1:2]).sample(sample_generators(7, [11]))
    torch.testing.assert_close(full[1:2], single)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(post.sample(g1), post.sample(g2))


def test_tiny_encode_decode_shapes():
    vae = randomize(build("vae_tiny")).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    post = vae.encode(x)
    assert post.mean.shape == (2, 4, 16, 16)
    assert vae.decode(post.mode()).shape == (2, 3, 32, 32)
    torch.testing.assert_close(vae(x), vae.decode(post.mean))


def test_full_sd_checkpoint_round_trip_and_mismatch(tmp_path):
    src = randomize(build("vae_tiny"), seed=5).eval()
    full = {f"first_stage_model.{k}": v for k, v in src.state_dict().items()}
    full["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 3, 3)
    full["cond_stage_model.model.ln_final.weight"] = torch.zeros(16)
    torch.save({"state_dict": full}, tmp_path / "sd.ckpt")
    dst = load_net(build("vae_tiny"), tmp_path / "sd.ckpt").eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(dst(x), src(x))
    # a stand-alone ldm VAE training checkpoint carries its loss modules: they are ignored
    own = dict(src.state_dict(), **{"loss.logvar": torch.zeros(())})
    torch.save(own, tmp_path / "vae.ckpt")
    torch.testing.assert_close(load_net(build("vae_tiny"), tmp_path / "vae.ckpt").eval()(x), src(x))
    del full["first_stage_model.post_quant_conv.bias"]
    torch.save(full, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointMismatchError, match="post_quant_conv.bias"):
        load_net(build("vae_tiny"), tmp_path / "broken.ckpt")


def test_vae_tiling_is_exact_for_local_functions():
    # A function whose output pixel depends only on its own input block (like an ideal
    # encoder/decoder) must be reproduced exactly by tiling with the VAE's ramp weights.
    x = torch.randn(2, 3, 40, 56)
    quarter = Fraction(1, 4)
    down = tiled_apply(lambda t: F.avg_pool2d(t, 4) * 2.0, x, 16, 8, quarter, weight="ramp")
    torch.testing.assert_close(down, F.avg_pool2d(x, 4) * 2.0)
    up = tiled_apply(lambda t: F.interpolate(t, scale_factor=4) - 1, x, 16, 4, 4, weight="ramp")
    torch.testing.assert_close(up, F.interpolate(x, scale_factor=4) - 1)
    with pytest.raises(ValueError, match="multiple of 4"):
        tiled_apply(lambda t: t, x, 18, 8, quarter, weight="ramp")


def test_vae_tiled_agrees_with_untiled():
    vae = randomize(build("vae_tiny"), seed=6).eval()
    from skimage import data

    img = torch.from_numpy(data.astronaut()[::8, ::8].copy()).permute(2, 0, 1).float() / 255
    x = (img[None, :, :32, :32] * 2 - 1).contiguous()
    with torch.no_grad():
        ref = vae.encode(x)
        # fits one tile: identical
        torch.testing.assert_close(vae.encode_tiled(x, tile_size=32, overlap=16).mean, ref.mean)
        # two overlapping tiles per side: close, not equal (GroupNorm statistics are per tile;
        # the exact blending arithmetic is checked in test_vae_tiling_is_exact_for_local_functions)
        tiled = vae.encode_tiled(x, tile_size=24, overlap=8).mean
        assert tiled.shape == ref.mean.shape
        rel = (tiled - ref.mean).norm() / ref.mean.norm()
        assert 0 < rel < 0.08, rel
        z = ref.mode()
        dec = vae.decode(z)
        torch.testing.assert_close(vae.decode_tiled(z, tile_size=16, overlap=8), dec)
        dec_tiled = vae.decode_tiled(z, tile_size=12, overlap=6)
        # wrongly normalised blending gives errors of order 1
        assert ((dec_tiled - dec).norm() / dec.norm()) < 0.15

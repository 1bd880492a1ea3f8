"""UNetModel (SD 2.1 and ADM flavours): released sizes and keys, math of the blocks, loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bir.nets.attention import CrossAttention, qkv_attention, qkv_attention_legacy
from bir.nets.checkpoints import CheckpointMismatchError, MissingCheckpointError, load_net
from bir.nets.unet import AttentionBlock, UNetModel, timestep_embedding
from tests.conftest import CONF
from tests.conftest import build_net as build


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the zero-initialised output layers (and everything else) by random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---- released configurations (meta device: no memory, no weights) --------------------------


def test_sd21_config_matches_release():
    with torch.device("meta"):
        net = build("unet_sd21")
    assert n_params(net) == 865_910_724  # SD 2.x UNet, as reported for v2-1 (865.9M)
    sd = net.state_dict()
    assert len(sd) == 686
    expected = {
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.weight": (1280, 1280),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (320,),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.1.norm.weight": (320,),
        "input_blocks.1.1.proj_in.weight": (320, 320),  # Linear in SD 2.x
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": (320,),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "input_blocks.1.1.transformer_blocks.0.norm3.weight": (320,),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "middle_block.1.proj_out.weight": (1280, 1280),
        "middle_block.2.emb_layers.1.weight": (1280, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "output_blocks.11.1.transformer_blocks.0.attn1.to_v.weight": (320, 320),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("input_blocks.10.1") for k in sd)  # no attention at ds 8
    assert net.num_control_residuals == 13


def test_adm256_config_matches_release():
    with torch.device("meta"):
        net = build("unet_adm256_uncond")
    assert n_params(net) == 552_814_086  # guided-diffusion 256x256 uncond (552.8M)
    sd = net.state_dict()
    expected = {
        "time_embed.0.weight": (1024, 256),
        "input_blocks.0.0.weight": (256, 3, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (512, 1024),  # scale and shift
        "input_blocks.3.0.in_layers.2.weight": (256, 256, 3, 3),  # resblock_updown
        "input_blocks.10.1.qkv.weight": (1536, 512, 1),  # attention at ds 8 (32 px)
        "input_blocks.10.1.proj_out.weight": (512, 512, 1),
        "middle_block.1.qkv.weight": (3072, 1024, 1),
        "middle_block.1.norm.weight": (1024,),
        "output_blocks.17.0.skip_connection.weight": (256, 512, 1, 1),
        "out.2.weight": (6, 256, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("input_blocks.7.1") for k in sd)  # ds 4 (64 px): no attention
    assert len(net.input_blocks) == 18 and len(net.output_blocks) == 18


# ---- block math ----------------------------------------------------------------------------


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 17, 999])
    dim = 10
    emb = timestep_embedding(t, dim)
    half = dim // 2
    for b, tv in enumerate(t.tolist()):
        for j in range(half):
            f = math.exp(-math.log(10000) * j / half)
            assert emb[b, j].item() == pytest.approx(math.cos(tv * f), abs=1e-5)
            assert emb[b, half + j].item() == pytest.approx(math.sin(tv * f), abs=1e-5)
    odd = timestep_embedding(t, 11)
    assert odd.shape == (4, 11) and torch.all(odd[:, -1] == 0)


def _explicit_attention(q, k, v):  # [N, C, L] each -> [N, C, L]
    w = torch.softmax(torch.einsum("ncl,ncm->nlm", q, k) / math.sqrt(q.shape[1]), dim=-1)
    return torch.einsum("nlm,ncm->ncl", w, v)


def test_qkv_legacy_order_matches_explicit_softmax():
    b, heads, ch, length = 2, 3, 4, 5
    qkv = torch.randn(b, 3 * heads * ch, length)
    out = qkv_attention_legacy(qkv, heads)
    # Legacy layout: per head h the channels [q_h | k_h | v_h] are contiguous.
    per_head = qkv.reshape(b, heads, 3, ch, length)
    for h in range(heads):
        q, k, v = per_head[:, h, 0], per_head[:, h, 1], per_head[:, h, 2]
        torch.testing.assert_close(out[:, h * ch : (h + 1) * ch], _explicit_attention(q, k, v))
    # New order: [q (all heads) | k | v]; a different split gives a different result.
    new = qkv_attention(qkv, heads)
    q, k, v = (t.reshape(b, heads, ch, length) for t in qkv.chunk(3, dim=1))
    for h in range(heads):
        torch.testing.assert_close(
            new[:, h * ch : (h + 1) * ch], _explicit_attention(q[:, h], k[:, h], v[:, h])
        )
    assert not torch.allclose(out, new)


def test_attention_block_heads_from_head_channels():
    block = randomize(AttentionBlock(64, num_heads=4, num_head_channels=16))
    assert block.num_heads == 4
    x = torch.randn(2, 64, 3, 5)
    y = block(x)
    xf = x.reshape(2, 64, -1)
    qkv = block.qkv(F.group_norm(xf, 32, block.norm.weight, block.norm.bias, 1e-5))
    ref = xf + block.proj_out(qkv_attention_legacy(qkv, 4))
    torch.testing.assert_close(y, ref.reshape(2, 64, 3, 5))


def test_cross_attention_sdpa_matches_explicit_softmax():
    attn = CrossAttention(8, context_dim=6, heads=2, dim_head=4)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 7, 6)
    q = attn.to_q(x).reshape(2, 5, 2, 4).permute(0, 2, 1, 3)
    k = attn.to_k(ctx).reshape(2, 7, 2, 4).permute(0, 2, 1, 3)
    v = attn.to_v(ctx).reshape(2, 7, 2, 4).permute(0, 2, 1, 3)
    w = torch.softmax(q @ k.transpose(-1, -2) * 4**-0.5, dim=-1)
    ref = attn.to_out((w @ v).permute(0, 2, 1, 3).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x, ctx), ref)
    # context None: self-attention needs context_dim == query_dim
    self_attn = CrossAttention(8, heads=2, dim_head=4)
    torch.testing.assert_close(self_attn(x), self_attn(x, x))


# ---- tiny networks -------------------------------------------------------------------------


def test_tiny_forward_shapes_and_dependence_on_inputs():
    sd = randomize(build("unet_sd_tiny")).eval()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 3, 16)
    out = sd(x, t, ctx)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()
    assert not torch.allclose(out, sd(x, t, torch.randn(2, 3, 16)))  # uses the context
    assert not torch.allclose(out, sd(x, torch.tensor([11, 500]), ctx))  # uses the timestep
    adm = randomize(build("unet_adm_tiny")).eval()
    y = adm(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 999]))
    assert y.shape == (3, 6, 32, 32)
    # batch independence: sample 1 alone gives the same result
    xb = torch.randn(3, 3, 16, 16)
    tb = torch.tensor([5, 6, 7])
    torch.testing.assert_close(adm(xb, tb)[1:2], adm(xb[1:2], tb[1:2]), atol=1e-5, rtol=1e-5)


def test_control_residuals():
    net = randomize(build("unet_sd_tiny")).eval()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([3, 400]), torch.randn(2, 3, 16)
    with torch.no_grad():
        base = net(x, t, ctx)
        skips = []
        hooks = [b.register_forward_hook(lambda m, i, o: skips.append(o)) for b in net.input_blocks]
        net(x, t, ctx)
        for h in hooks:
            h.remove()
        zeros = [torch.zeros_like(s) for s in skips] + [torch.zeros(2, 32, 8, 8)]
        assert len(zeros) == net.num_control_residuals == 5
        torch.testing.assert_close(net(x, t, ctx, control=zeros), base)
        # The last residual goes to the middle-block output: same as a hook adding it there.
        mid = torch.randn(2, 32, 8, 8)
        control = [*zeros[:-1], mid]
        with_control = net(x, t, ctx, control=control)
        assert len(control) == 5  # the caller's list is not consumed
        hook = net.middle_block.register_forward_hook(lambda m, i, o: o + mid)
        torch.testing.assert_close(with_control, net(x, t, ctx))
        hook.remove()
        # The first residual belongs to the first skip (input_blocks.0), which the last decoder
        # block receives as the trailing channels of its concatenated input.
        first = torch.randn_like(skips[0])

        def add_to_skip(module, args):
            h = args[0].clone()
            h[:, -first.shape[1] :] += first
            return (h, *args[1:])

        hook = net.output_blocks[-1].register_forward_pre_hook(add_to_skip)
        expected = net(x, t, ctx)
        hook.remove()
        torch.testing.assert_close(net(x, t, ctx, control=[first, *zeros[1:]]), expected)
        with pytest.raises(ValueError, match="expected 5"):
            net(x, t, ctx, control=zeros[:-1])


def test_gradient_checkpointing_gives_identical_gradients():
    for name in ("unet_sd_tiny", "unet_adm_tiny"):
        plain = randomize(build(name))
        ckpt = build(name, use_checkpoint=True)
        ckpt.load_state_dict(plain.state_dict())
        x = torch.randn(1, plain.in_channels, 8, 8)
        t = torch.tensor([700])
        ctx = torch.randn(1, 3, 16) if name == "unet_sd_tiny" else None
        grads = []
        for net in (plain, ckpt):
            xi = x.clone().requires_grad_(True)
            net.zero_grad()
            net(xi, t, ctx).square().mean().backward()
            grads.append([xi.grad] + [p.grad for p in net.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---- loading ---------------------------------------------------------------------------------


def test_sd_full_checkpoint_round_trip(tmp_path):
    """The UNet found in an ldm full checkpoint under its class's prefix (model.diffusion_model.)
    beside the other SD parts, strictly."""
    src = randomize(build("unet_sd_tiny"), seed=1)
    full = {f"model.diffusion_model.{k}": v for k, v in src.state_dict().items()}
    full["first_stage_model.encoder.conv_in.weight"] = torch.zeros(3)
    full["cond_stage_model.model.positional_embedding"] = torch.zeros(3)
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": full, "global_step": 5}, path)

    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([9]), torch.randn(1, 2, 16)
    dst = load_net(build("unet_sd_tiny"), path).eval()
    torch.testing.assert_close(dst(x, t, ctx), src.eval()(x, t, ctx))

    # strict: a missing and a mis-shaped key are both reported
    broken = {k: v for k, v in full.items() if k != "model.diffusion_model.out.2.bias"}
    broken["model.diffusion_model.out.0.weight"] = torch.zeros(7)
    torch.save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointMismatchError) as err:
        load_net(build("unet_sd_tiny"), tmp_path / "broken.ckpt")
    assert "out.2.bias" in str(err.value) and "out.0.weight" in str(err.value)
    with pytest.raises(MissingCheckpointError, match="net.sd_ckpt_path"):
        load_net(build("unet_sd_tiny"), tmp_path / "absent.ckpt", config_key="net.sd_ckpt_path")


def test_adm_bare_and_prefixed_round_trip(tmp_path):
    src = randomize(build("unet_adm_tiny"), seed=3).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    for prefix in ("", "module."):
        path = tmp_path / f"adm{prefix}.pt"
        torch.save({prefix + k: v for k, v in src.state_dict().items()}, path)
        dst = load_net(build("unet_adm_tiny"), path).eval()
        torch.testing.assert_close(dst(x, t), src(x, t))
    # a checkpoint of another architecture (new attention order does not change keys, but a
    # different width does) fails with the offending shapes listed
    other = UNetModel(
        3,
        64,
        6,
        1,
        [2],
        (1, 1),
        num_head_channels=16,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_net(build("unet_adm_tiny"), tmp_path / "other.pt")


def test_inspect_checkpoint_script(tmp_path, capsys):
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "inspect_checkpoint.py"
    spec = importlib.util.spec_from_file_location("inspect_checkpoint", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = build("unet_sd_tiny")
    path = tmp_path / "sd.ckpt"
    torch.save(
        {"state_dict": {f"model.diffusion_model.{k}": v for k, v in net.state_dict().items()}}, path
    )
    assert mod.main([str(path), "--net", str(CONF / "net" / "unet_sd_tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert "ldm full checkpoint" in out and "loads with strict=True: yes" in out
    assert mod.main([str(path), "--net", str(CONF / "net" / "unet_adm_tiny.yaml")]) == 1
    assert "shape mismatches" in capsys.readouterr().out

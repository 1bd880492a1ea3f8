"""LAControlNet: init from the UNet, zero control at start, release key layout, round trips;
OpenCLIP text encoder: penultimate tokens, caching, SD-checkpoint loading."""

from __future__ import annotations

import pytest
import torch

from bir.nets.checkpoints import CheckpointMismatchError, load_checkpoint, load_state_dict_checked
from bir.nets.clip import OpenCLIPTextEncoder
from bir.nets.controlnet import ControlNet, set_gradient_checkpointing
from bir.nets.unet import UNetModel

# tiny nets are overhead-bound: one thread is several times faster on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("single_thread")


TINY_UNET = dict(
    in_channels=4,
    model_channels=32,
    out_channels=4,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 2),
    num_head_channels=16,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=32,
    use_linear_in_transformer=True,
    legacy=False,
)


def tiny_unet(seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    unet = UNetModel(**TINY_UNET)
    # the released UNet's output conv is trained, not zero: randomise it so outputs are non-trivial
    torch.nn.init.normal_(unet.out[2].weight, std=0.02)
    return unet


def inputs(b: int = 2, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, size, size, generator=g)
    hint = torch.randn(b, 4, size, size, generator=g)
    t = torch.tensor([10, 900])[:b]
    ctx = torch.randn(b, 77, 32, generator=g)
    return x, hint, t, ctx


def test_from_unet_copies_encoder_and_zeroes_the_new_parts():
    unet = tiny_unet()
    net = ControlNet.from_unet(unet)
    u = unet.state_dict()
    for k, v in net.state_dict().items():
        if k == "input_blocks.0.0.weight":
            assert v.shape == (32, 8, 3, 3)
            torch.testing.assert_close(v[:, :4], u[k], rtol=0, atol=0)
            assert v[:, 4:].abs().max() == 0  # condition channels start at zero
        elif k.startswith(("zero_convs.", "middle_block_out.")):
            assert v.abs().max() == 0
        else:
            torch.testing.assert_close(v, u[k], rtol=0, atol=0)
    # the copy is independent of the UNet
    net.input_blocks[1][0].in_layers[2].weight.data.add_(1.0)
    assert not torch.equal(
        net.input_blocks[1][0].in_layers[2].weight, unet.input_blocks[1][0].in_layers[2].weight
    )


def test_zero_control_at_init_equals_plain_unet_and_only_zero_convs_get_gradient():
    unet = tiny_unet()
    net = ControlNet.from_unet(unet)
    x, hint, t, ctx = inputs()
    control = net(x, hint, t, ctx)
    assert len(control) == unet.num_control_residuals == net.num_outputs == 5
    assert all(c.abs().max() == 0 for c in control)
    with torch.no_grad():
        plain = unet(x, t, context=ctx)
    out = unet(x, t, context=ctx, control=control)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    # gradient flows into the zero convs (so training can start) but not yet behind them
    out.pow(2).mean().backward()
    assert net.zero_convs[0][0].weight.grad.abs().sum() > 0
    assert net.middle_block_out[0].weight.grad.abs().sum() > 0
    assert net.input_blocks[1][0].in_layers[2].weight.grad.abs().sum() == 0


def test_hint_changes_the_residuals_once_zero_convs_are_trained():
    net = ControlNet.from_unet(tiny_unet())
    for conv in [*net.zero_convs, net.middle_block_out]:
        torch.nn.init.normal_(conv[0].weight, std=0.1)
    x, hint, t, ctx = inputs()
    a = net(x, hint, t, ctx)
    b = net(x, hint * 0, t, ctx)
    # the stem's hint weights are still zero: the hint has no effect yet ...
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    torch.nn.init.normal_(net.input_blocks[0][0].weight, std=0.1)
    a, b = net(x, hint, t, ctx), net(x, hint * 0, t, ctx)
    # ... until they are trained: then every residual depends on it
    assert all(not torch.allclose(p, q) for p, q in zip(a, b))
    shapes = [tuple(c.shape) for c in a]
    # stem, level-0 ResBlock, downsample, level-1 ResBlock, middle block
    assert shapes == [(2, 32, 8, 8)] * 2 + [(2, 32, 4, 4)] + [(2, 64, 4, 4)] * 2


def test_sd21_layout_matches_the_released_control_weights():
    # DiffBIR v2.pth: control-only dict, 13 zero convs (12 + middle_block_out), 8 input channels
    with torch.device("meta"):
        net = ControlNet()  # SD 2.1 defaults
    state = net.state_dict()
    tops = {k.split(".")[0] for k in state}
    assert tops == {"time_embed", "input_blocks", "zero_convs", "middle_block", "middle_block_out"}
    assert net.num_outputs == 13 and len(net.input_blocks) == 12
    assert state["input_blocks.0.0.weight"].shape == (320, 8, 3, 3)
    assert state["zero_convs.0.0.weight"].shape == (320, 320, 1, 1)
    assert state["zero_convs.11.0.weight"].shape == (1280, 1280, 1, 1)
    assert state["middle_block_out.0.weight"].shape == (1280, 1280, 1, 1)
    assert state["input_blocks.1.1.proj_in.weight"].shape == (320, 320)  # linear proj (SD 2.x)
    assert state["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1024)
    assert state["time_embed.0.weight"].shape == (1280, 320)
    n_params = sum(v.numel() for v in state.values())
    assert 360e6 < n_params < 366e6  # ControlNet for SD 2.x: ~361M parameters


def test_control_state_dict_round_trip_is_strict(tmp_path):
    net = ControlNet.from_unet(tiny_unet())
    for conv in net.zero_convs:
        torch.nn.init.normal_(conv[0].weight, std=0.1)
    path = tmp_path / "control.pth"
    torch.save(net.state_dict(), path)
    torch.manual_seed(5)
    other = ControlNet(**{k: v for k, v in TINY_UNET.items() if k not in ("out_channels",)})
    load_state_dict_checked(other, load_checkpoint(path, what="control"), name="control")
    x, hint, t, ctx = inputs()
    for p, q in zip(net(x, hint, t, ctx), other(x, hint, t, ctx)):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # a UNet state dict is not a ControlNet one: strict loading names the missing keys
    with pytest.raises(CheckpointMismatchError, match="zero_convs"):
        load_state_dict_checked(other, tiny_unet().state_dict(), name="control")


def test_gradient_checkpointing_gives_the_same_gradients():
    net = ControlNet.from_unet(tiny_unet())
    for conv in [*net.zero_convs, net.middle_block_out]:
        torch.nn.init.normal_(conv[0].weight, std=0.1)
    x, hint, t, ctx = inputs()
    grads = []
    for enabled in (False, True):
        set_gradient_checkpointing(net, enabled)
        net.zero_grad()
        sum(c.pow(2).sum() for c in net(x, hint, t, ctx)).backward()
        grads.append(net.input_blocks[1][0].in_layers[2].weight.grad.clone())
    assert net.input_blocks[1][0].use_checkpoint and net.middle_block[0].use_checkpoint
    torch.testing.assert_close(grads[0], grads[1])


# ------------------------------------------------------------------------- text encoder
TINY_CLIP = dict(width=32, layers=3, heads=2, output_dim=32)


def test_clip_penultimate_tokens_and_cache():
    torch.manual_seed(0)
    enc = OpenCLIPTextEncoder(**TINY_CLIP)
    emb = enc.encode(["a photo of a cat", ""])
    assert emb.shape == (2, 77, 32)
    # "last" equals open_clip's own token output; penultimate stops one block earlier
    enc.layer = "last"
    enc._cache.clear()
    last = enc.encode(["a photo of a cat"])
    enc.model.output_tokens = True
    _, tokens = enc.model(enc.tokenize(["a photo of a cat"]))
    torch.testing.assert_close(last, tokens)
    assert not torch.allclose(last, emb[:1])
    # penultimate by hand: blocks[:-1], then ln_final
    x, mask = enc.model._embeds(enc.tokenize(["a photo of a cat"]))
    for block in enc.model.transformer.resblocks[:-1]:
        x = block(x, attn_mask=mask)
    torch.testing.assert_close(emb[:1], enc.model.ln_final(x))
    # cached per prompt: a second call returns the stored tensor values, batch order respected
    enc.layer = "penultimate"
    enc._cache.clear()
    first = enc.encode(["b", "a", "b"])
    assert set(enc._cache) == {"a", "b"}
    torch.testing.assert_close(first[0], first[2])
    assert not enc.model.token_embedding.weight.requires_grad


def test_clip_loads_from_sd_checkpoint_layout(tmp_path):
    torch.manual_seed(1)
    src = OpenCLIPTextEncoder(**TINY_CLIP)
    state = {f"cond_stage_model.model.{k}": v for k, v in src.model.state_dict().items()}
    state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)  # full-CLIP key, dropped
    state["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # other SD parts are ignored
    torch.save({"state_dict": state}, tmp_path / "sd.ckpt")
    torch.manual_seed(2)
    dst = OpenCLIPTextEncoder(**TINY_CLIP, ckpt_path=str(tmp_path / "sd.ckpt"))
    torch.testing.assert_close(dst.encode(["x"]), src.encode(["x"]))
    del state["cond_stage_model.model.ln_final.bias"]
    torch.save(state, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointMismatchError, match="ln_final.bias"):
        OpenCLIPTextEncoder(**TINY_CLIP, ckpt_path=str(tmp_path / "broken.ckpt"))


# ------------------------------------------------------------------------------ ControlLDM
def tiny_controlldm(seed: int = 0, **overrides):
    """The real ``net=controlnet_tiny`` config, instantiated with random weights."""
    import hydra

    from tests.conftest import compose_config

    cfg = compose_config("train", "net=controlnet_tiny")
    torch.manual_seed(seed)
    unet = hydra.utils.instantiate(cfg.net.unet)
    torch.nn.init.normal_(unet.out[2].weight, std=0.02)  # trained output conv is not zero
    return hydra.utils.instantiate(cfg.net, unet=unet, **overrides)


def ldm_inputs(model, b: int = 2, size: int = 8, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 4, size, size, generator=g)
    cond = torch.randn(b, 4, size, size, generator=g)
    ctx = model.encode_text(["", "a photo"][:b])
    return z, torch.tensor([999, 5])[:b], ctx, cond


def test_controlldm_at_init_equals_the_frozen_unet():
    model = tiny_controlldm()
    z, t, ctx, cond = ldm_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(
            model(z, t, ctx, cond), model.unet(z, t, context=ctx), rtol=0, atol=0
        )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("controlnet.") for n in trainable)
    model.train()
    assert model.controlnet.training and not model.unet.training and not model.vae.training


def test_control_scales_multiply_the_residuals():
    model = tiny_controlldm()
    for conv in [*model.controlnet.zero_convs, model.controlnet.middle_block_out]:
        torch.nn.init.normal_(conv[0].weight, std=0.05)
    z, t, ctx, cond = ldm_inputs(model)
    with torch.no_grad():
        plain = model.unet(z, t, context=ctx)
        model.set_control_strength(0.0)
        torch.testing.assert_close(model(z, t, ctx, cond), plain, rtol=0, atol=0)
        model.set_control_strength(1.0)
        full = model(z, t, ctx, cond)
        control = model.controlnet(z, cond, t, ctx)
        by_hand = model.unet(z, t, context=ctx, control=control)
    torch.testing.assert_close(full, by_hand)
    assert (full - plain).abs().max() > 1e-4
    with pytest.raises(ValueError):
        model.set_control_strength([1.0, 2.0])


def test_controlldm_loads_control_only_and_v1_full_checkpoints(tmp_path):
    src = tiny_controlldm(seed=1)
    for conv in [*src.controlnet.zero_convs, src.controlnet.middle_block_out]:
        torch.nn.init.normal_(conv[0].weight, std=0.05)
    z, t, ctx, cond = ldm_inputs(src)
    with torch.no_grad():
        expected = src(z, t, ctx, cond)
    # control-only (v2.pth layout) on top of the same SD weights
    torch.save(src.controlnet.state_dict(), tmp_path / "v2.pth")
    sd = {f"model.diffusion_model.{k}": v for k, v in src.unet.state_dict().items()}
    sd |= {f"first_stage_model.{k}": v for k, v in src.vae.state_dict().items()}
    sd |= {f"cond_stage_model.model.{k}": v for k, v in src.clip.model.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "sd21.ckpt")
    dst = tiny_controlldm(
        seed=2, sd_ckpt_path=str(tmp_path / "sd21.ckpt"), control_ckpt_path=str(tmp_path / "v2.pth")
    )
    with torch.no_grad():
        torch.testing.assert_close(dst(z, t, ctx, cond), expected, rtol=0, atol=0)
    assert dst.cond_encoder is None
    # DiffBIR v1 full checkpoint: everything plus its own condition encoder (and stage 1)
    full = dict(sd)
    full |= {f"control_model.{k}": v for k, v in src.controlnet.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    cond_enc = {
        f"cond_encoder.encoder.{k}": v + 0.01 * torch.randn(v.shape, generator=g)
        for k, v in src.vae.encoder.state_dict().items()
    }
    cond_enc |= {
        f"cond_encoder.quant_conv.{k}": v for k, v in src.vae.quant_conv.state_dict().items()
    }
    full |= cond_enc | {"preprocess_model.conv_first.1.weight": torch.zeros(1)}
    torch.save({"state_dict": full}, tmp_path / "general_full_v1.ckpt")
    v1 = tiny_controlldm(seed=3, control_ckpt_path=str(tmp_path / "general_full_v1.ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(v1(z, t, ctx, cond), expected, rtol=0, atol=0)
        image = torch.rand(1, 3, 16, 16, generator=g)
        c_v1 = v1.encode_condition(image)
        c_sd = v1.vae_encode(image)
        moments = v1.cond_encoder(image * 2 - 1)
    assert v1.cond_encoder is not None and not any(
        p.requires_grad for p in v1.cond_encoder.parameters()
    )
    torch.testing.assert_close(c_v1, moments[:, :4] * 0.18215)
    assert not torch.allclose(c_v1, c_sd)  # the v1 condition encoder is used, not the SD VAE's
    # a broken control file is rejected with the offending keys named
    bad = src.controlnet.state_dict()
    del bad["zero_convs.0.0.weight"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(
        Exception, match=r"missing keys \(1\).*zero_convs.0.0.weight"
    ):  # hydra wraps it
        tiny_controlldm(control_ckpt_path=str(tmp_path / "bad.pth"))


def test_vae_encode_sample_uses_the_per_sample_generators_and_mode_otherwise():
    from bir.random import sample_generators

    model = tiny_controlldm()
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mode = model.vae_encode(img)
        post = model.vae.encode(img * 2 - 1)
        torch.testing.assert_close(mode, post.mode() * 0.18215)
        a = model.vae_encode(img, sample_generators(0, [5, 6]))
        b = model.vae_encode(img[1:], sample_generators(0, [6]))
    torch.testing.assert_close(a[1:], b)  # sample 6 draws the same noise whatever its batch
    assert not torch.allclose(a, mode)


def test_missing_zero_snr_sd_points_to_the_diffbir_v2_release(tmp_path):
    from bir.nets.checkpoints import MissingCheckpointError
    from bir.nets.controlldm import DIFFBIR_V21_URL, ControlLDM

    with pytest.raises(MissingCheckpointError) as err:
        ControlLDM(None, None, None, sd_ckpt_path=tmp_path / "sd2.1-base-zsnr-laionaes5.ckpt")
    assert DIFFBIR_V21_URL in str(err.value)

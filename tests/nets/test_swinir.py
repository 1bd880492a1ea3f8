"""SwinIR (DiffBIR stage 1): shapes, DiffBIR state-dict layout, loading, attention maths."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from bir.nets.checkpoints import CheckpointMismatchError, MissingCheckpointError, load_net
from bir.nets.swinir import (
    MASK_VALUE,
    RGB_MEAN,
    SwinIR,
    SwinTransformerBlock,
    WindowAttention,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from tests.conftest import net_config

TINY = dict(
    img_size=8,
    embed_dim=12,
    depths=[2, 2],
    num_heads=[2, 3],
    window_size=4,
    sf=4,
    unshuffle=True,
    unshuffle_scale=4,
    num_feat=8,
    drop_path_rate=0.0,
)


def tiny(**overrides) -> SwinIR:
    torch.manual_seed(0)
    return SwinIR(**{**TINY, **overrides}).eval()


def diffbir_keys(depths: list[int], sf: int = 8) -> set[str]:
    """The parameter and persistent-buffer names of DiffBIR's SwinIR (diffbir/model/swinir.py)."""
    keys = {"conv_first.1.weight", "conv_first.1.bias", "patch_embed.norm.weight"}
    keys |= {"patch_embed.norm.bias", "norm.weight", "norm.bias"}
    for name in ["conv_after_body", "conv_before_upsample.0", "conv_hr", "conv_last"]:
        keys |= {f"{name}.weight", f"{name}.bias"}
    for i in range({2: 1, 4: 2, 8: 3}[sf]):
        keys |= {f"conv_up{i + 1}.weight", f"conv_up{i + 1}.bias"}
    for i, depth in enumerate(depths):
        keys |= {f"layers.{i}.conv.weight", f"layers.{i}.conv.bias"}
        for j in range(depth):
            p = f"layers.{i}.residual_group.blocks.{j}."
            keys |= {p + "attn.relative_position_bias_table", p + "attn.relative_position_index"}
            for m in ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]:
                keys |= {p + m + ".weight", p + m + ".bias"}
            if j % 2 == 1:  # shifted blocks store their mask
                keys.add(p + "attn_mask")
    return keys


@pytest.mark.parametrize("size", [(37, 53), (5, 7), (32, 32), (48, 16)])
def test_output_has_input_size(size):
    net = tiny()
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_padding_is_cropped_away_consistently():
    """Padding happens only at the bottom/right: the top-left of a padded input is unaffected
    by what the padding was, as long as the receptive field stays inside (here: same image)."""
    net = tiny()
    x = torch.rand(1, 3, 30, 30)
    with torch.no_grad():
        y = net(x)
        y_ref = net(net.pad_input(x))[..., :30, :30]
    torch.testing.assert_close(y, y_ref)


def test_zero_head_outputs_the_rgb_mean():
    """With a zero last conv the output is 0 / img_range + mean (the mean is added back)."""
    net = tiny(img_range=255.0)
    torch.nn.init.zeros_(net.conv_last.weight)
    torch.nn.init.zeros_(net.conv_last.bias)
    with torch.no_grad():
        y = net(torch.rand(1, 3, 16, 16))
    expected = torch.tensor(RGB_MEAN).view(1, 3, 1, 1).expand_as(y)
    torch.testing.assert_close(y, expected)


def test_state_dict_matches_diffbir_layout():
    cfg = net_config("swinir_diffbir")
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_target_"}
    net = SwinIR(**kwargs)
    state = net.state_dict()
    assert set(state) == diffbir_keys([6] * 8)
    # shapes fixed by the release: 3*8*8 unshuffled channels, 180 wide, 64 reconstruction width
    assert state["conv_first.1.weight"].shape == (180, 192, 3, 3)
    assert state["conv_before_upsample.0.weight"].shape == (64, 180, 3, 3)
    assert state["layers.0.residual_group.blocks.0.attn.relative_position_bias_table"].shape == (
        225,
        6,
    )
    assert state["layers.0.residual_group.blocks.0.attn.relative_position_index"].shape == (64, 64)
    # mask of the 64x64 feature grid (512 px crops): 64 windows of 64 tokens
    assert state["layers.7.residual_group.blocks.5.attn_mask"].shape == (64, 64, 64)
    assert "mean" not in state
    assert sum(p.numel() for p in net.parameters()) == 15_792_587


def test_tiny_config_is_small_and_loads_keys():
    cfg = net_config("swinir_tiny")
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_target_"}
    net = SwinIR(**kwargs)
    assert set(net.state_dict()) == diffbir_keys(kwargs["depths"], sf=kwargs["sf"])
    assert sum(p.numel() for p in net.parameters()) < 30_000


def test_relative_position_index_by_hand():
    # 2x2 window: tokens (0,0) (0,1) (1,0) (1,1); index = (dy + 1) * 3 + (dx + 1), d = q - k
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert torch.equal(relative_position_index((2, 2)), expected)


def test_shift_mask_regions():
    mask = shifted_window_mask(8, 8, window_size=4, shift_size=2)
    assert mask.shape == (4, 16, 16)
    # the top-left window holds a single region after the shift: no masking
    assert (mask[0] == 0).all()
    # the bottom-right window mixes 4 regions of 2x2 tokens: each token sees 4 of 16
    assert ((mask[3] == 0).sum(-1) == 4).all()
    assert set(mask.unique().tolist()) == {MASK_VALUE, 0.0}


def test_window_partition_round_trip():
    x = torch.randn(2, 8, 12, 5)
    w = window_partition(x, 4)
    assert w.shape == (2 * 2 * 3, 4, 4, 5)
    torch.testing.assert_close(w[1], x[0, 0:4, 4:8])
    torch.testing.assert_close(window_reverse(w, 4, 8, 12), x)


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_attention_equals_explicit_softmax(masked):
    torch.manual_seed(0)
    attn = WindowAttention(dim=8, window_size=(4, 4), num_heads=2).eval()
    torch.nn.init.normal_(attn.relative_position_bias_table, std=1.0)
    batch, nw, n, c = 3, 4, 16, 8
    x = torch.randn(batch * nw, n, c)
    mask = shifted_window_mask(8, 8, 4, 2) if masked else None
    out = attn(x, mask)

    # explicit softmax(Q K^T * scale + B + mask) V, per window, per head
    q, k, v = attn.qkv(x).view(batch * nw, n, 3, 2, 4).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * 4**-0.5
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)]
    logits = logits + bias.view(n, n, 2).permute(2, 0, 1)
    if masked:
        logits = logits + mask.repeat(batch, 1, 1).unsqueeze(1)  # window w of image b: row b*nw+w
    ref = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch * nw, n, c)
    torch.testing.assert_close(out, attn.proj(ref), atol=1e-5, rtol=1e-5)


def test_mask_computed_for_other_sizes_equals_formula():
    block = SwinTransformerBlock(8, (8, 8), num_heads=2, window_size=4, shift_size=2)
    torch.testing.assert_close(block.mask_for((8, 8), torch.device("cpu")), block.attn_mask)
    torch.testing.assert_close(
        block.mask_for((12, 16), torch.device("cpu")), shifted_window_mask(12, 16, 4, 2)
    )
    # a grid no larger than the window is one unshifted window (reference rule, no mask stored)
    small = SwinTransformerBlock(8, (4, 4), num_heads=2, window_size=8, shift_size=4)
    assert small.shift_size == 0 and small.window_size == 4 and small.attn_mask is None


def test_round_trip_bare_and_lightning_wrapped(tmp_path):
    net = tiny()
    x = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        ref = net(x)
    bare = tmp_path / "swinir.pth"
    torch.save(net.state_dict(), bare)
    wrapped = tmp_path / "stage1.ckpt"
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 7, "epoch": 0}, wrapped)
    for path in (bare, wrapped):
        loaded = load_net(SwinIR(**{**TINY, "drop_path_rate": 0.0}), path).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), ref)


def test_strict_loading_lists_missing_and_unexpected(tmp_path):
    state = tiny().state_dict()
    del state["layers.0.residual_group.blocks.1.attn_mask"]
    state["layers.0.extra.weight"] = torch.zeros(1)
    state["conv_last.bias"] = torch.zeros(5)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_net(SwinIR(**TINY), path)
    assert err.value.missing == ["layers.0.residual_group.blocks.1.attn_mask"]
    assert err.value.unexpected == ["layers.0.extra.weight"]
    assert any(k.startswith("conv_last.bias") for k in err.value.mismatched)


def test_missing_file_names_the_release(tmp_path):
    with pytest.raises(MissingCheckpointError, match="general_swinir_v1.ckpt"):
        load_net(SwinIR(**TINY), tmp_path / "nope.ckpt", config_key="ckpt")


def test_rejects_inconsistent_unshuffle():
    with pytest.raises(ValueError, match="unshuffle_scale"):
        SwinIR(**{**TINY, "unshuffle_scale": 8})


GRID_SIDES = [1, 7, 8, 13, 17, 64, 100, 130]  # around multiples of the 16-px padding


def test_any_shape_on_the_tiny_net_equals_the_explicitly_padded_reference():
    """Every (H, W) in a grid over 1..130 px, including feature grids one window tall and many
    wide (7x13, 8x16, 3x100 used to fail in a ``view``): the output has the input size and is
    the network run on the explicitly padded input, cropped."""
    net = tiny().eval()
    for h in GRID_SIDES:
        for w in GRID_SIDES:
            x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))
            with torch.no_grad():
                y = net(x)
                reference = net(net.pad_input(x))[..., :h, :w]
            assert y.shape == x.shape, (h, w)
            torch.testing.assert_close(y, reference, msg=lambda m, s=(h, w): f"{s}: {m}")


def test_default_diffbir_net_on_one_window_tall_grids():
    """The released DiffBIR configuration: 64 x 128 and 64 x 192 are one 8-token window tall
    after the x8 unshuffle (both crashed); 1 x 130 pads to 64 x 192 and must equal the network
    run on the explicitly padded input, cropped."""
    from hydra.utils import instantiate

    torch.manual_seed(0)
    net = instantiate(net_config("swinir_diffbir")).eval()
    with torch.no_grad():
        for size in [(64, 128), (64, 192)]:
            x = torch.rand(1, 3, *size)
            y = net(x)
            assert y.shape == x.shape and torch.isfinite(y).all()
        x = torch.rand(1, 3, 1, 130)
        torch.testing.assert_close(net(x), net(net.pad_input(x))[..., :1, :130])

"""SCUNet: window attention against an explicit reference, shift masks, padding, release key
names, which stages shift, strict loading."""

from __future__ import annotations

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from bir.nets.checkpoints import CheckpointMismatchError, MissingCheckpointError, load_net
from bir.nets.scunet import (
    SCUNET_URL,
    WMSA,
    SCUNet,
    relative_position_index,
    shifted_window_mask,
)
from tests.conftest import net_config

# tiny nets are overhead-bound: one thread is several times faster on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_config() -> dict:
    cfg = OmegaConf.to_container(net_config("scunet_tiny"))
    cfg.pop("_target_")
    return cfg


def tiny(seed: int = 0) -> SCUNet:
    """The real ``conf/net/scunet_tiny.yaml`` with random biases and a unit position bias."""
    torch.manual_seed(seed)
    net = hydra.utils.instantiate(net_config("scunet_tiny"))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("relative_position_params"):
                p.normal_()
            elif p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def region_labels(h: int, w: int, window: int) -> torch.Tensor:
    """Swin's construction of the shift regions on the rolled image (independent of the mask
    code): three row bands and three column bands; tokens attend only within their region."""
    shift = window // 2
    label = torch.zeros(h, w)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    n = 0
    for rows in bands:
        for cols in bands:
            label[rows, cols] = n
            n += 1
    return label


def explicit_wmsa(m: WMSA, x: torch.Tensor) -> torch.Tensor:
    """Window attention written out per window with an explicit softmax."""
    b, h, w, c = x.shape
    p, half = m.window_size, m.window_size // 2
    if m.shifted:
        x = torch.roll(x, (-half, -half), (1, 2))
        labels = region_labels(h, w, p)
    out = torch.zeros(b, h, w, m.linear.out_features)
    for i in range(0, h, p):
        for j in range(0, w, p):
            tokens = x[:, i : i + p, j : j + p].reshape(b, p * p, c)
            q, k, v = m.embedding_layer(tokens).chunk(3, dim=-1)
            heads = []
            for hd in range(m.n_heads):
                sl = slice(hd * m.head_dim, (hd + 1) * m.head_dim)
                logits = q[..., sl] @ k[..., sl].transpose(1, 2) / m.head_dim**0.5
                for a in range(p * p):
                    for bb in range(p * p):
                        da, db = divmod(a, p), divmod(bb, p)
                        dy, dx = da[0] - db[0] + p - 1, da[1] - db[1] + p - 1
                        logits[:, a, bb] += m.relative_position_params[hd, dy, dx]
                if m.shifted:
                    lab = labels[i : i + p, j : j + p].reshape(p * p)
                    logits = logits.masked_fill(lab[:, None] != lab[None, :], float("-inf"))
                heads.append(logits.softmax(-1) @ v[..., sl])
            out[:, i : i + p, j : j + p] = m.linear(torch.cat(heads, -1)).reshape(b, p, p, -1)
    if m.shifted:
        out = torch.roll(out, (half, half), (1, 2))
    return out


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_equals_the_explicit_formula(shifted):
    torch.manual_seed(0)
    m = WMSA(8, 8, head_dim=4, window_size=4, shifted=shifted)
    with torch.no_grad():
        m.relative_position_params.normal_()
        x = torch.randn(2, 8, 12, 8)
        torch.testing.assert_close(m(x), explicit_wmsa(m, x), rtol=1e-5, atol=1e-5)


def test_relative_position_index_by_hand():
    rows, cols = relative_position_index(2)
    # pixels (0,0) (0,1) (1,0) (1,1): index = offset + 1
    assert rows.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [2, 2, 1, 1], [2, 2, 1, 1]]
    assert cols.tolist() == [[1, 0, 1, 0], [2, 1, 2, 1], [1, 0, 1, 0], [2, 1, 2, 1]]


@pytest.mark.parametrize("hw", [(8, 8), (16, 24), (4, 4)])
def test_shift_mask_equals_swin_regions(hw):
    h, w, p = *hw, 4
    mask = shifted_window_mask(h // p, w // p, p)
    lab = region_labels(h, w, p).reshape(h // p, p, w // p, p).permute(0, 2, 1, 3)
    lab = lab.reshape(-1, p * p)
    assert torch.equal(mask, lab[:, :, None] != lab[:, None, :])
    assert mask[0].any() == (h == p or w == p)  # only the last window row / column is cut


@pytest.mark.parametrize("size", [(32, 32), (20, 27), (33, 64), (7, 9)])
def test_output_keeps_any_input_size_and_pads_by_replication(size):
    net = tiny()
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x)
        m = net.pad_multiple
        padded = torch.nn.functional.pad(x, (0, (-size[1]) % m, 0, (-size[0]) % m), "replicate")
        expected = net(padded)[..., : size[0], : size[1]]
    assert y.shape == x.shape and net.pad_multiple == 32
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_which_blocks_shift_follows_the_nominal_resolution():
    def shifted(net):
        return {
            n.rsplit(".trans_block", 1)[0]
            for n, m in net.named_modules()
            if isinstance(m, WMSA) and m.shifted
        }

    # tiny: input_resolution 16, window 4 -> levels 0 (16) and 1 (8) shift their odd blocks,
    # levels 2 (4) and 3 (2) never do
    assert shifted(tiny()) == {"m_down1.1", "m_down2.1", "m_up1.2"}
    # released config: 256 / 8 = 32 > 8 at every level, so every odd block shifts
    with torch.device("meta"):
        full = SCUNet()
    assert (
        len(shifted(full)) == 14 and "m_body.3" in shifted(full) and "m_body.2" not in shifted(full)
    )


def test_release_key_names():
    net = SCUNet(config=[1, 1, 1, 1, 1, 1, 1], dim=8, head_dim=4, window_size=4)
    keys = set(net.state_dict())
    block = {
        "conv1_1.weight",
        "conv1_1.bias",
        "conv1_2.weight",
        "conv1_2.bias",
        "conv_block.0.weight",
        "conv_block.2.weight",
        "trans_block.ln1.weight",
        "trans_block.ln1.bias",
        "trans_block.msa.embedding_layer.weight",
        "trans_block.msa.embedding_layer.bias",
        "trans_block.msa.relative_position_params",
        "trans_block.msa.linear.weight",
        "trans_block.msa.linear.bias",
        "trans_block.ln2.weight",
        "trans_block.ln2.bias",
        "trans_block.mlp.0.weight",
        "trans_block.mlp.0.bias",
        "trans_block.mlp.2.weight",
        "trans_block.mlp.2.bias",
    }
    expected = {
        "m_head.0.weight",
        "m_tail.0.weight",
        "m_down1.1.weight",
        "m_down2.1.weight",
        "m_down3.1.weight",
        "m_up3.0.weight",
        "m_up2.0.weight",
        "m_up1.0.weight",
    }
    for stage, idx in [
        ("m_down1", 0),
        ("m_down2", 0),
        ("m_down3", 0),
        ("m_body", 0),
        ("m_up3", 1),
        ("m_up2", 1),
        ("m_up1", 1),
    ]:
        expected |= {f"{stage}.{idx}.{k}" for k in block}
    assert keys == expected
    # heads = transformer half / head_dim: body 8 dim / 2 / 4 = 8 heads, window 4 -> 7 x 7 table
    assert net.state_dict()["m_body.0.trans_block.msa.relative_position_params"].shape == (8, 7, 7)


@pytest.mark.parametrize("wrap", ["bare", "lightning", "module"])
def test_strict_round_trip(tmp_path, wrap):
    src = tiny(seed=1)
    state = src.state_dict()
    obj = {
        "bare": state,
        "lightning": {"state_dict": {f"net.{k}": v for k, v in state.items()}, "epoch": 3},
        "module": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    torch.save(obj, tmp_path / "scunet_color_real_psnr.pth")
    dst = load_net(SCUNet(**tiny_config()), tmp_path / "scunet_color_real_psnr.pth")
    x = torch.rand(1, 3, 21, 17)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_mismatches_and_missing_file_are_named(tmp_path):
    state = tiny().state_dict()
    del state["m_tail.0.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\):\n    m_tail.0.weight"):
        load_net(SCUNet(**tiny_config()), tmp_path / "bad.pth")
    with pytest.raises(MissingCheckpointError) as err:
        load_net(
            SCUNet(**tiny_config()), tmp_path / "nope.pth", config_key="method.stage1_ckpt_path"
        )
    assert SCUNET_URL in str(err.value) and "method.stage1_ckpt_path" in str(err.value)


def test_rejects_bad_configs():
    with pytest.raises(ValueError, match="7 stage depths"):
        SCUNet(config=[1, 1, 1])
    with pytest.raises(ValueError, match="multiple of head_dim"):
        SCUNet(dim=8, head_dim=32)

"""RRDBNet / BSRNet: the ESRGAN formulas, any input size, release key names, strict loading."""

from __future__ import annotations

import hydra
import pytest
import torch
import torch.nn.functional as F

from bir.nets.checkpoints import CheckpointMismatchError, MissingCheckpointError, load_net
from bir.nets.rrdbnet import BSRNET_URL, RRDBNet
from tests.conftest import net_config

# tiny nets are overhead-bound: one thread is several times faster on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(seed: int = 0, **overrides) -> RRDBNet:
    """The real ``conf/net/bsrnet_tiny.yaml``, with random (not near-identity) weights."""
    torch.manual_seed(seed)
    net = hydra.utils.instantiate(net_config("bsrnet_tiny"), **overrides)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, sf: int) -> torch.Tensor:
    """ESRGAN / BSRGAN written out with F.conv2d from the state dict (the module docstring's math)."""

    def conv(name, t):
        return F.conv2d(t, state[f"{name}.weight"], state[f"{name}.bias"], padding=1)

    def lrelu(t):
        return F.leaky_relu(t, 0.2)

    def rdb(prefix, f):
        feats = [f]
        for k in range(1, 5):
            feats.append(lrelu(conv(f"{prefix}.conv{k}", torch.cat(feats, 1))))
        return f + 0.2 * conv(f"{prefix}.conv5", torch.cat(feats, 1))

    f0 = conv("conv_first", x)
    t = f0
    nb = len({k.split(".")[1] for k in state if k.startswith("RRDB_trunk.")})
    for i in range(nb):
        r = t
        for j in (1, 2, 3):
            r = rdb(f"RRDB_trunk.{i}.RDB{j}", r)
        t = t + 0.2 * r
    f = f0 + conv("trunk_conv", t)
    for k in range(1, {2: 1, 4: 2}[sf] + 1):
        f = lrelu(conv(f"upconv{k}", F.interpolate(f, scale_factor=2, mode="nearest")))
    return conv("conv_last", lrelu(conv("HRconv", f)))


@pytest.mark.parametrize("sf", [4, 2])
def test_forward_equals_the_esrgan_formulas_at_any_size(sf):
    net = tiny(sf=sf, nb=2)
    x = torch.rand(2, 3, 13, 22, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x)
        expected = reference_forward(net.state_dict(), x, sf)
    assert y.shape == (2, 3, 13 * sf, 22 * sf)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_fully_convolutional_crop_commutes_away_from_the_border():
    # every layer is a 3x3 conv or a nearest 2x: a centre crop of the input gives the centre of
    # the output once the receptive field no longer reaches the crop's border
    # (17 convs on the input grid and four more after upsampling: about 19 px of context)
    net = tiny(nb=1)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, crop = net(x), net(x[..., 8:56, 8:56])
    torch.testing.assert_close(crop[..., 80:112, 80:112], full[..., 112:144, 112:144])
    assert not torch.allclose(crop[..., :4, :4], full[..., 32:36, 32:36])  # the border differs


def test_dense_blocks_start_near_the_identity():
    torch.manual_seed(0)
    net = RRDBNet(nf=16, nb=2, gc=8)
    f = torch.randn(1, 16, 12, 12)
    with torch.no_grad():
        rdb, rrdb = net.RRDB_trunk[0].RDB1(f), net.RRDB_trunk[0](f)
    # Kaiming x 0.1 and the 0.2 residual scaling: a dense block is a small perturbation of the
    # identity, so an RRDB (f + 0.2 RDB(RDB(RDB(f)))) is close to 1.2 f
    assert (rdb - f).abs().mean() < 0.05 * f.abs().mean()
    assert (rrdb - 1.2 * f).abs().mean() < 0.05 * f.abs().mean()


def test_release_key_names():
    net = RRDBNet(nf=8, nb=2, gc=4, sf=4)
    expected = {
        f"{n}.{p}"
        for n in ("conv_first", "trunk_conv", "upconv1", "upconv2", "HRconv", "conv_last")
        for p in ("weight", "bias")
    }
    expected |= {
        f"RRDB_trunk.{i}.RDB{j}.conv{k}.{p}"
        for i in range(2)
        for j in (1, 2, 3)
        for k in range(1, 6)
        for p in ("weight", "bias")
    }
    assert set(net.state_dict()) == expected
    assert "upconv2.weight" not in RRDBNet(nf=8, nb=1, gc=4, sf=2).state_dict()


@pytest.mark.parametrize("wrap", ["bare", "lightning", "module"])
def test_strict_round_trip(tmp_path, wrap):
    src = tiny(seed=1)
    state = src.state_dict()
    obj = {
        "bare": state,
        "lightning": {"state_dict": {f"net.{k}": v for k, v in state.items()}, "epoch": 3},
        "module": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    torch.save(obj, tmp_path / "BSRNet.pth")
    cfg = net_config("bsrnet_tiny")
    dst = load_net(
        RRDBNet(**{k: v for k, v in cfg.items() if k != "_target_"}), tmp_path / "BSRNet.pth"
    )
    x = torch.rand(1, 3, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_mismatches_and_missing_file_are_named(tmp_path):
    state = tiny().state_dict()
    del state["HRconv.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(
        CheckpointMismatchError, match=r"(?s)missing keys \(1\).*HRconv.bias.*extra"
    ):
        load_net(RRDBNet(nf=8, nb=1, gc=4), tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches.*\n    HRconv.weight"):
        load_net(RRDBNet(nf=16, nb=1, gc=4), tmp_path / "bad.pth")  # wrong width: shapes
    with pytest.raises(MissingCheckpointError) as err:
        load_net(RRDBNet(nb=1), tmp_path / "BSRNet.pth", config_key="method.stage1_ckpt_path")
    assert BSRNET_URL in str(err.value) and "method.stage1_ckpt_path" in str(err.value)


def test_rejects_unsupported_scale():
    with pytest.raises(ValueError, match="sf must be 2 or 4"):
        RRDBNet(sf=3)

import pytest
import torch
from torch import nn

from bir.nets.checkpoints import (
    CheckpointMismatchError,
    MissingCheckpointError,
    load_checkpoint,
    load_state_dict_checked,
    select_prefix,
    strip_prefix,
)


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 1))


def test_missing_file_names_file_url_and_key(tmp_path):
    with pytest.raises(MissingCheckpointError) as err:
        load_checkpoint(tmp_path / "v2.pth", what="DiffBIR control", url="https://example.org/v2.pth",
                        config_key="method.control_ckpt")  # fmt: skip
    msg = str(err.value)
    assert "v2.pth" in msg and "https://example.org/v2.pth" in msg and "method.control_ckpt" in msg


@pytest.mark.parametrize("wrap", ["bare", "lightning", "params_ema", "safetensors"])
def test_unwrap_formats_round_trip(tmp_path, wrap):
    net = _net()
    sd = net.state_dict()
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.ckpt")
    if wrap == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        obj = {"bare": sd, "lightning": {"state_dict": sd, "epoch": 3},
               "params_ema": {"params_ema": sd}}[wrap]  # fmt: skip
        torch.save(obj, path)
    loaded = load_checkpoint(path)
    other = _net()
    load_state_dict_checked(other, loaded)
    for k in sd:
        assert torch.equal(other.state_dict()[k], sd[k])


def test_prefix_selection_prefers_most_matching():
    net = _net()
    sd = net.state_dict()
    full = {
        **{f"model.diffusion_model.{k}": v for k, v in sd.items()},
        "first_stage_model.x": torch.zeros(1),
    }
    assert set(strip_prefix(full, "first_stage_model.")) == {"x"}
    picked = select_prefix(full, ["", "model.", "model.diffusion_model."], sd.keys())
    assert set(picked) == set(sd)


def test_mismatch_error_lists_keys():
    net = _net()
    sd = dict(net.state_dict())
    sd.pop("0.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["2.weight"] = torch.zeros(3, 5, 1, 1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_dict_checked(net, sd, name="tiny")
    msg = str(err.value)
    assert "0.bias" in msg and "extra.weight" in msg and "2.weight" in msg and "tiny" in msg
    e = err.value
    assert e.missing == ["0.bias"] and e.unexpected == ["extra.weight"] and len(e.mismatched) == 1


def test_non_strict_reports_but_loads():
    net = _net()
    sd = {k: torch.ones_like(v) for k, v in net.state_dict().items() if k != "0.bias"}
    missing, unexpected = load_state_dict_checked(net, sd, strict=False)
    assert missing == ["0.bias"] and unexpected == []
    assert torch.all(net[0].weight == 1)

import os

import pytest
import torch
from torch import nn

from bir.nets import checkpoints
from bir.nets.checkpoints import (
    CheckpointMismatchError,
    MissingCheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    load_state_dict_checked,
    select_prefix,
    strip_prefix,
)


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 1))


def test_missing_file_names_file_url_and_key(tmp_path):
    with pytest.raises(MissingCheckpointError) as err:
        load_checkpoint(
            tmp_path / "v2.pth",
            what="DiffBIR control",
            url="https://example.org/v2.pth",
            config_key="method.control_ckpt",
        )
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
        obj = {
            "bare": sd,
            "lightning": {"state_dict": sd, "epoch": 3},
            "params_ema": {"params_ema": sd},
        }[wrap]
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


# ------------------------------------------------------------------ no code runs from a file
class _RunsCode:
    """Unpickling this calls ``os.mkdir(path)``: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickled_code_is_refused_and_named(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _net().state_dict(), "payload": _RunsCode(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(path)
    assert not marker.exists(), "loading a weights file ran code from it"
    msg = str(err.value)
    assert f"({os.mkdir.__module__}.mkdir)" in msg  # the refused global is named
    assert f"trust_pickle=[{path}]" in msg  # and the per-file opt-in


def test_trusted_file_loads_in_full(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    path = tmp_path / "mine.ckpt"
    sd = _net().state_dict()
    torch.save({"state_dict": sd, "payload": _RunsCode(marker)}, path)
    monkeypatch.setattr(checkpoints, "_TRUSTED", set())
    checkpoints.trust_pickle_files([str(tmp_path / "other.ckpt")])  # another file: still refused
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path)
    checkpoints.trust_pickle_files([str(path)])
    state = load_checkpoint(path)
    assert marker.exists() and set(state) == set(sd)


def test_text_and_corrupt_files_never_reach_the_unpickler(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    good = tmp_path / "good.ckpt"
    torch.save(_net().state_dict(), good)
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[:200])
    for name in ("text.ckpt", "cut.ckpt"):
        with pytest.raises(RuntimeError, match="could not be read as a weights file"):
            load_checkpoint(tmp_path / name)
    assert calls and all(c is True for c in calls)


def test_released_training_checkpoint_metadata_loads(tmp_path):
    """Lightning 1.x checkpoints (DiffBIR v1's full files) key callback states by the class and
    keep hyper-parameters in an AttributeDict; numpy scalars appear as metadata."""
    import numpy as np
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint
    from pytorch_lightning.utilities.parsing import AttributeDict

    sd = _net().state_dict()
    path = tmp_path / "general_full_v1.ckpt"
    obj = {
        "state_dict": sd,
        "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(1.5)}},
        "hyper_parameters": AttributeDict(lr=1e-4),
        "global_step": np.int64(3),
    }
    torch.save(obj, path)
    state = load_checkpoint(path)
    assert set(state) == set(sd) and all(torch.equal(state[k], sd[k]) for k in sd)


def test_missing_and_unset_are_worded_for_each_case(tmp_path):
    with pytest.raises(MissingCheckpointError) as err:
        load_checkpoint(None, what="stage-1 restoration", config_key="ckpt")
    msg = str(err.value)
    assert "not set" in msg and "ckpt=/path/to/" in msg and "<unset>" not in msg
    with pytest.raises(MissingCheckpointError) as err:
        load_checkpoint(tmp_path / "nope.ckpt", what="stage-1 restoration", config_key="ckpt")
    msg = str(err.value)
    assert f"not found at {tmp_path / 'nope.ckpt'} (no such file)" in msg
    assert "Set ckpt=/path/to/nope.ckpt" in msg and "Then" not in msg


def test_wrong_architecture_names_both_nets_and_the_fix(tmp_path):
    """A quickstart-like checkpoint (tiny SwinIR with overridden fields) restored with the
    default net: the error names the stored net, shows keys one a line and the overrides."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from bir.callbacks.net_config import StoreNetConfig, net_config_record
    from bir.cli import CONFIG_DIR
    from bir.lit.stage1 import Stage1Restoration

    trained = OmegaConf.load(f"{CONFIG_DIR}/net/swinir_tiny.yaml")
    trained.embed_dim, trained.num_feat = 8, 8  # as an experiment overriding fields
    net = instantiate(trained)
    ckpt = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}
    StoreNetConfig(net_config_record(trained, "swinir_tiny", CONFIG_DIR)).on_save_checkpoint(
        None, None, ckpt
    )
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)

    other = OmegaConf.load(f"{CONFIG_DIR}/net/swinir_tiny.yaml")
    other.depths, other.num_heads = [2], [2]
    with pytest.raises(CheckpointMismatchError) as err:
        Stage1Restoration.for_inference(instantiate(other), str(path))
    msg = str(err.value)
    assert len(msg) < 2000 and "\\n" not in msg
    lines = msg.splitlines()
    keys = [line for line in lines if line.startswith("    net.") or line.startswith("    layers")]
    assert 2 <= len(keys) <= 15  # a few keys, one a line
    assert "trained with net bir.nets.swinir.SwinIR" in msg and "embed_dim=8" in msg
    fix = next(line for line in lines if "fix:" in line)
    expected = ["net@method.net=swinir_tiny", "method.net.embed_dim=8", "method.net.num_feat=8"]
    assert fix.split("fix: add these overrides: ")[1].split() == expected
    # the suggested overrides do build a net the checkpoint loads into
    fixed = OmegaConf.load(f"{CONFIG_DIR}/net/swinir_tiny.yaml")
    fixed.embed_dim, fixed.num_feat = 8, 8
    Stage1Restoration.for_inference(instantiate(fixed), str(path))


def test_one_loader_finds_each_net_where_its_class_or_bir_puts_it(tmp_path):
    """load_net: the class's own prefix (SwinIR in a DiffBIR v1 full checkpoint), the EMA copy
    before the trained net when a bir checkpoint holds both, a DataParallel file, and keys the
    class declares foreign (an ldm VAE file's loss) left out."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from bir.cli import CONFIG_DIR
    from bir.nets.checkpoints import load_net, net_weights

    tiny = OmegaConf.load(f"{CONFIG_DIR}/net/swinir_tiny.yaml")
    src, ema = instantiate(tiny).eval(), instantiate(tiny).eval()
    x = torch.rand(1, 3, 16, 16)
    files = {
        "v1_full.ckpt": {
            "state_dict": {
                **{f"preprocess_model.{k}": v for k, v in src.state_dict().items()},
                "control_model.input_hint_block.0.weight": torch.zeros(2),
            }
        },
        "bir_ema.ckpt": {
            "state_dict": {
                **{f"net.{k}": v for k, v in src.state_dict().items()},
                **{f"ema_net.{k}": v for k, v in ema.state_dict().items()},
            }
        },
        "dp.pth": {f"module.{k}": v for k, v in src.state_dict().items()},
    }
    want = {"v1_full.ckpt": src, "bir_ema.ckpt": ema, "dp.pth": src}
    with torch.no_grad():
        for name, obj in files.items():
            torch.save(obj, tmp_path / name)
            loaded = load_net(instantiate(tiny), tmp_path / name).eval()
            torch.testing.assert_close(loaded(x), want[name](x), rtol=0, atol=0, msg=name)

    class WithLoss(nn.Module):
        checkpoint_prefixes = ("first_stage_model.",)
        checkpoint_ignored = ("loss.",)

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

    own = WithLoss()
    state = {f"first_stage_model.{k}": v for k, v in own.state_dict().items()}
    state["conv.weight"] = torch.zeros(1, 1, 1, 1)  # a bare copy: the class's prefix comes first
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    found = net_weights(WithLoss(), state)
    assert set(found) == {"conv.weight", "conv.bias"}
    assert torch.equal(found["conv.weight"], own.conv.weight)
    with pytest.raises(MissingCheckpointError, match="method.ckpt"):
        load_net(WithLoss(), tmp_path / "absent.ckpt", config_key="method.ckpt")
    kept = WithLoss()
    assert load_net(kept, None) is kept  # None keeps the weights (random smoke runs)


def _stored_checkpoint(path, choice: str, **fields):
    """A checkpoint as bir-train writes it: weights of the net built from ``conf/net/<choice>``
    with ``fields`` overridden, and the record the StoreNetConfig callback adds."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from bir.callbacks.net_config import StoreNetConfig, net_config_record
    from bir.cli import CONFIG_DIR

    trained = OmegaConf.merge(OmegaConf.load(f"{CONFIG_DIR}/net/{choice}.yaml"), fields)
    net = instantiate(trained)
    ckpt = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}
    StoreNetConfig(net_config_record(trained, choice, CONFIG_DIR)).on_save_checkpoint(
        None, None, ckpt
    )
    torch.save(ckpt, path)
    return net


def _restore_cfg(overrides):
    from hydra import compose, initialize_config_dir

    from bir.cli import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("restore", overrides=["input=x", "output=y", *overrides])


def test_stored_net_config_builds_the_net_unless_the_command_line_chooses_one(tmp_path):
    from hydra.utils import instantiate

    from bir.callbacks.net_config import use_stored_net_configs

    path = tmp_path / "last.ckpt"
    trained = _stored_checkpoint(path, "swinir_tiny", embed_dim=8, num_feat=8)
    args = ["method=swinir", f"ckpt={path}"]
    cfg = _restore_cfg(args)
    assert cfg.method.net.embed_dim != 8  # the default net would not fit
    lines = use_stored_net_configs(cfg, args)
    assert lines == [
        f"method.net: the network stored in {path} (swinir_tiny embed_dim=8 num_feat=8)"
    ]
    assert cfg.method.net.embed_dim == 8 and cfg.method.ckpt_path == str(path)
    module = instantiate(cfg.method)  # loads strictly: the stored net is the trained one
    for k, v in trained.state_dict().items():
        assert torch.equal(module.net.state_dict()[k], v), k

    # an explicit net override wins, and the log line says so
    explicit = [*args, "net@method.net=swinir_tiny", "method.net.embed_dim=8"]
    cfg = _restore_cfg(explicit)
    lines = use_stored_net_configs(cfg, explicit)
    assert len(lines) == 1 and "this run's config and overrides" in lines[0]
    assert "net@method.net=swinir_tiny method.net.embed_dim=8" in lines[0]
    assert cfg.method.net.num_feat != 8  # not replaced by the stored config
    # a file without a stored config (a released one) leaves the configured net alone
    torch.save({"state_dict": {}}, tmp_path / "released.ckpt")
    cfg = _restore_cfg(["method=swinir", f"ckpt={tmp_path / 'released.ckpt'}"])
    assert use_stored_net_configs(cfg, []) == [] and cfg.method.net.embed_dim != 8


def test_stored_net_config_of_a_prior_keeps_its_checkpoint_path(tmp_path):
    from bir.callbacks.net_config import use_stored_net_configs

    path = tmp_path / "prior.ckpt"
    _stored_checkpoint(path, "unet_adm_tiny", model_channels=64)
    cfg = _restore_cfg(["method=bird", "prior=tiny", f"prior.ckpt_path={path}"])
    use_stored_net_configs(cfg, ["prior.ckpt_path=x"])  # setting the path is no net override
    assert cfg.prior.net.model_channels == 64 and cfg.prior.ckpt_path == str(path)
    assert cfg.method.prior.net.model_channels == 64  # method=bird's prior follows


def test_stored_net_config_never_names_code_to_run(tmp_path):
    """A checkpoint whose stored config names anything but a bir network class is refused
    before anything is built (a weights file never runs code)."""
    from bir.callbacks.net_config import use_stored_net_configs
    from bir.nets.checkpoints import NET_CONFIG_KEY

    marker = tmp_path / "ran"
    for target in ("os.system", "bir.nets.checkpoints.load_checkpoint", "pathlib.Path"):
        config = {"_target_": "bir.nets.swinir.SwinIR", "sub": {"_target_": target}}
        if target == "os.system":
            config = {"_target_": target, "command": f"touch {marker}"}
        path = tmp_path / "evil.ckpt"
        torch.save({"state_dict": {}, NET_CONFIG_KEY: {"choice": None, "config": config}}, path)
        cfg = _restore_cfg(["method=swinir", f"ckpt={path}"])
        with pytest.raises(UnsafeCheckpointError, match=f"names '{target}'"):
            use_stored_net_configs(cfg, [])
    assert not marker.exists()

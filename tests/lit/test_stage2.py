"""Stage2ControlLDM: only the ControlNet learns, loss goes down, per-sample draws, EMA,
ControlNet-only checkpoints, and the tiny experiment through bir-train."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import hydra
import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bir.degradations import DegradationResult
from bir.lit.stage2 import FROZEN_PREFIXES, Stage2ControlLDM
from bir.nets.checkpoints import load_checkpoint
from bir.random import randn
from tests.conftest import compose_config

warnings.filterwarnings("ignore", ".*does not have many workers.*")


# tiny nets are overhead-bound: one thread is several times faster on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_parts(seed: int = 0):
    """(ControlLDM, SwinIR) from the real tiny configs, random weights."""
    cfg = compose_config("train", "experiment=diffbir_stage2_tiny")
    torch.manual_seed(seed)
    unet = hydra.utils.instantiate(cfg.net.unet)
    nn.init.normal_(unet.out[2].weight, std=0.02)  # a trained UNet's output conv is not zero
    return hydra.utils.instantiate(cfg.net, unet=unet), hydra.utils.instantiate(cfg.model.stage1)


class NoiseDegradation(nn.Module):
    """lq = gt + 0.1 N(0, 1), each sample with its own generator (the pipeline contract)."""

    def forward(self, gt, generators):
        noise = randn(gt.shape[1:], generators, gt.device)
        return DegradationResult(lq=(gt + 0.1 * noise).clamp(0, 1), gt=gt, params=[{}] * len(gt))


def make_module(lr: float = 1e-3, **kwargs) -> Stage2ControlLDM:
    controlldm, stage1 = tiny_parts()
    defaults = dict(
        degradation=NoiseDegradation(),
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
        seed=7,
    )
    return Stage2ControlLDM(controlldm, stage1, **{**defaults, **kwargs})


class Photos(Dataset):
    def __init__(self, n: int = 4, size: int = 16):
        g = torch.Generator().manual_seed(0)
        coarse = torch.rand(n, 3, 4, 4, generator=g)
        self.gt = nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)

    def __len__(self) -> int:
        return len(self.gt)

    def __getitem__(self, i: int) -> dict:
        return {"gt": self.gt[i], "index": i, "name": f"img{i}"}


def batch_of(indices: list[int]) -> dict:
    ds = Photos()
    return {
        "gt": ds.gt[indices],
        "index": torch.tensor(indices),
        "name": [f"img{i}" for i in indices],
    }


def frozen_vector(module: Stage2ControlLDM) -> torch.Tensor:
    parts = [module.model.unet, module.model.vae, module.model.clip, module.stage1]
    return (
        torch.cat([nn.utils.parameters_to_vector(p.parameters()) for p in parts]).detach().clone()
    )


def test_a_few_steps_reduce_the_loss_and_only_the_controlnet_changes():
    module = make_module(lr=2e-3)
    batch = batch_of([0, 1, 2, 3])
    opt = module.configure_optimizers()
    frozen_before = frozen_vector(module)
    control_before = (
        nn.utils.parameters_to_vector(module.model.controlnet.parameters()).detach().clone()
    )
    losses = []
    module.train()
    for _ in range(12):
        # training=False: the same t, noise and degradation every step (a fixed objective)
        loss, _ = module.diffusion_loss(batch, training=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0], losses
    assert torch.equal(frozen_vector(module), frozen_before)
    for part in (module.model.unet, module.model.vae, module.model.clip, module.stage1):
        assert all(p.grad is None and not p.requires_grad for p in part.parameters())
    control_after = nn.utils.parameters_to_vector(module.model.controlnet.parameters())
    assert (control_after - control_before).abs().max() > 0
    assert [g["params"] for g in opt.param_groups][0][0] is next(
        module.model.controlnet.parameters()
    )


def test_eps_and_v_targets_and_per_sample_draws():
    module = make_module()
    with torch.no_grad():
        _, both = module.diffusion_loss(batch_of([1, 2]), training=True)
        _, alone = module.diffusion_loss(batch_of([2]), training=True)
        _, val = module.diffusion_loss(batch_of([2]), training=False)
    # sample 2's timestep and latents do not depend on the batch it is in ...
    assert both["t"][1] == alone["t"][0]
    torch.testing.assert_close(both["z0"][1:], alone["z0"])
    torch.testing.assert_close(both["cond"][1:], alone["cond"], atol=1e-4, rtol=1e-3)
    # ... while evaluation draws come from another seed
    assert not torch.equal(val["z0"], alone["z0"])
    # the condition is the VAE mode of the clamped stage-1 output, z0 a posterior sample of gt
    with torch.no_grad():
        torch.testing.assert_close(
            both["cond"], module.model.vae_encode(both["clean"]), atol=1e-5, rtol=1e-5
        )
        assert not torch.allclose(both["z0"], module.model.vae_encode(both["gt"]))
    assert both["clean"].min() >= 0 and both["clean"].max() <= 1
    # v-prediction target: v = sqrt(abar) eps - sqrt(1 - abar) z0
    module.hparams.prediction = "v"
    with torch.no_grad():
        loss_v, inp = module.diffusion_loss(batch_of([1, 2]), training=True)
        i = torch.searchsorted(module.schedule.timesteps, inp["t"])
        pred = module.model(
            module.schedule.q_sample(inp["z0"], i, _noise(module, [1, 2])),
            inp["t"],
            inp["context"],
            inp["cond"],
        )
        v = module.schedule.v_from_x0_eps(inp["z0"], i, _noise(module, [1, 2]))
    torch.testing.assert_close(loss_v, nn.functional.mse_loss(pred, v))


def _noise(module: Stage2ControlLDM, indices: list[int]) -> torch.Tensor:
    gens = module._generators(batch_of(indices), "noise", training=True)
    return randn((4, 8, 8), gens)


def test_ema_update_formula():
    module = make_module(ema_decay=0.9)
    ema_before = nn.utils.parameters_to_vector(module.ema_controlnet.parameters()).clone()
    with torch.no_grad():
        for p in module.model.controlnet.parameters():
            p.add_(1.0)
    module.update_ema()
    new = nn.utils.parameters_to_vector(module.model.controlnet.parameters())
    torch.testing.assert_close(
        nn.utils.parameters_to_vector(module.ema_controlnet.parameters()),
        0.9 * ema_before + 0.1 * new,
    )
    assert not any(p.requires_grad for p in module.ema_controlnet.parameters())


@pytest.mark.filterwarnings("ignore:.*eval mode.*", "ignore:.*val_dataloader.*")
def test_ema_is_updated_after_every_optimizer_step_under_accumulation(tmp_path):
    module = make_module(ema_decay=0.0)  # decay 0: the EMA must equal the latest weights
    before = nn.utils.parameters_to_vector(module.model.controlnet.parameters()).detach().clone()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(Photos(), batch_size=1))
    after = nn.utils.parameters_to_vector(module.model.controlnet.parameters())
    ema = nn.utils.parameters_to_vector(module.ema_controlnet.parameters())
    assert trainer.global_step == 1 and (after - before).abs().max() > 0
    torch.testing.assert_close(ema, after, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:.*eval mode.*", "ignore:.*val_dataloader.*")
def test_fit_saves_only_the_controlnet_and_the_checkpoint_loads_into_controlldm(tmp_path):
    module = make_module(ema_decay=0.5)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(Photos(), batch_size=2))
    ckpt = tmp_path / "stage2.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(k.startswith(("model.controlnet.", "ema_controlnet.")) for k in state)
    assert not any(k.startswith(FROZEN_PREFIXES) for k in state)
    ema = module.control_state_dict(ema=True)
    raw = module.control_state_dict(ema=False)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the EMA lags the weights
    # a fresh ControlLDM picks the EMA ControlNet out of the Lightning checkpoint (strict)
    fresh, _ = tiny_parts(seed=1)
    fresh.load_control_weights(load_checkpoint(ckpt), use_ema=True)
    for k, v in fresh.controlnet.state_dict().items():
        assert torch.equal(v, ema[k])
    fresh.load_control_weights(load_checkpoint(ckpt), use_ema=False)
    for k, v in fresh.controlnet.state_dict().items():
        assert torch.equal(v, raw[k])
    # resuming restores the trained weights although frozen ones are not in the file
    resumed = make_module(ema_decay=0.5)
    resumed.load_state_dict(state, strict=False)
    resumed.on_load_checkpoint({"state_dict": state})
    with pytest.raises(KeyError, match="ControlNet"):
        resumed.on_load_checkpoint({"state_dict": {}})


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["cpu", pytest.param("ddp_cpu", marks=pytest.mark.ddp)])
def test_tiny_experiment_trains_through_bir_train(tmp_path, trainer):
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "BIR_ROOT": str(tmp_path),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        str(Path(sys.executable).parent / "bir-train"),
        "experiment=diffbir_stage2_tiny",
        "run_name=t",
        "callbacks.progress_bar=null",
        "logger=csv",
        f"trainer={trainer}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "outputs" / "diffbir_stage2_tiny" / "t"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("ema_controlnet.") for k in state)
    assert not any(k.startswith(FROZEN_PREFIXES) for k in state)
    assert all(torch.isfinite(v).all() for v in state.values())
    metrics = (next(run.rglob("metrics.csv"))).read_text()
    assert "train/loss" in metrics and "val/loss" in metrics


def test_missing_stage1_weights_name_the_network_and_its_release(tmp_path):
    from bir.lit.stage2 import load_stage1
    from bir.nets.checkpoints import MissingCheckpointError
    from bir.nets.rrdbnet import BSRNET_URL, RRDBNet

    with pytest.raises(MissingCheckpointError) as err:
        load_stage1(RRDBNet(nf=4, nb=1, gc=4), str(tmp_path / "BSRNet.pth"), "method.stage1_ckpt")
    msg = str(err.value)
    assert "BSRNet" in msg and BSRNET_URL in msg and "SwinIR" not in msg

"""Stage1Restoration: degradation seeding, training, resume, EMA, validation, predict."""

from __future__ import annotations

import math
import warnings
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bir import metrics
from bir.degradations import DegradationResult
from bir.lit.ema import EMACallback
from bir.lit.stage1 import (
    STEP_STRIDE,
    TRAIN_DEGRADATION_STREAM,
    VAL_DEGRADATION_STREAM,
    Stage1Restoration,
    cosine_with_warmup,
)
from bir.nets.swinir import SwinIR
from bir.random import randn, sample_generators

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")

TINY = dict(
    img_size=8,
    embed_dim=8,
    depths=[2],
    num_heads=[2],
    window_size=4,
    sf=4,
    unshuffle_scale=4,
    num_feat=8,
    drop_path_rate=0.0,
)
SEED = 3


class NoiseDegradation(nn.Module):
    """lq = gt + 0.1 * N(0, 1) with each sample's own generator (the pipeline contract)."""

    def forward(self, gt: torch.Tensor, generators) -> DegradationResult:
        noise = randn(gt.shape[1:], generators, gt.device)
        return DegradationResult(lq=(gt + 0.1 * noise).clamp(0, 1), gt=gt, params=[{}] * len(gt))


def expected_lq(gt: torch.Tensor, indices: list[int], stream: int) -> torch.Tensor:
    return NoiseDegradation()(gt, sample_generators(SEED, indices, "cpu", stream)).lq


class Photos(Dataset):
    """Fixed smooth 16x16 images (low-frequency, so denoising is learnable in a few steps)."""

    def __init__(self, n: int = 6, size: int = 16, with_lq: bool = False):
        g = torch.Generator().manual_seed(0)
        coarse = torch.rand(n, 3, 4, 4, generator=g)
        self.gt = nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        self.with_lq = with_lq

    def __len__(self) -> int:
        return len(self.gt)

    def __getitem__(self, i: int) -> dict:
        item = {"gt": self.gt[i], "index": i, "name": f"img{i}"}
        if self.with_lq:
            item["lq"] = self.gt[i] * 0.5
        return item


def make_module(lr: float = 1e-3, **kwargs) -> Stage1Restoration:
    torch.manual_seed(0)
    defaults = dict(
        degradation=NoiseDegradation(),
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
        loss_reduction="mean",
        seed=SEED,
        log_images_every_n_steps=0,
    )
    return Stage1Restoration(SwinIR(**TINY), **{**defaults, **kwargs})


def trainer(tmp_path, max_steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    args = dict(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    return pl.Trainer(callbacks=list(callbacks), **{**args, **kwargs})


class Recorder(Callback):
    """Records losses, batches and parameters after every optimiser step."""

    def __init__(self):
        self.losses, self.batches, self.params = [], [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.batches.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})
        self.params.append(nn.utils.parameters_to_vector(module.net.parameters()).detach().clone())


def loader(ds: Dataset, batch_size: int = 2) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def test_training_degradation_is_per_sample_and_per_step(tmp_path):
    rec = Recorder()
    trainer(tmp_path, 4, [rec]).fit(make_module(), loader(Photos(4)))
    gt = Photos(4).gt
    for step, batch in enumerate(rec.batches):
        idx = batch["index"].tolist()
        seeds = [i + step * STEP_STRIDE for i in idx]
        torch.testing.assert_close(
            batch["lq"], expected_lq(gt[idx], seeds, TRAIN_DEGRADATION_STREAM)
        )
    # step 2 revisits samples 0, 1 of step 0 with fresh draws
    assert rec.batches[2]["index"].tolist() == rec.batches[0]["index"].tolist()
    assert not torch.allclose(rec.batches[2]["lq"], rec.batches[0]["lq"])


def test_a_few_steps_reduce_the_loss(tmp_path):
    rec = Recorder()
    trainer(tmp_path, 24, [rec]).fit(make_module(lr=3e-3), loader(Photos(2)))
    first, last = sum(rec.losses[:4]) / 4, sum(rec.losses[-4:]) / 4
    assert last < 0.75 * first


def test_loss_reduction_sum_is_mean_times_numel():
    module = make_module(loss_reduction="sum")
    batch = {"gt": torch.rand(2, 3, 16, 16), "lq": torch.rand(2, 3, 16, 16)}
    module.log = lambda *a, **k: None  # not attached to a trainer
    loss = module.training_step(batch, 0)
    mse = nn.functional.mse_loss(module.net(batch["lq"]), batch["gt"])
    torch.testing.assert_close(loss, mse * batch["gt"].numel())


def test_resume_continues_at_saved_step_with_same_optimizer_state(tmp_path):
    data = loader(Photos(6))  # 3 batches per epoch
    straight = Recorder()
    trainer(tmp_path / "a", 6, [straight]).fit(make_module(), data)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    trainer(tmp_path / "b", 3, [ckpt], enable_checkpointing=True).fit(make_module(), data)
    path = next((tmp_path / "ck").glob("*.ckpt"))
    saved = torch.load(path, weights_only=False)
    assert saved["global_step"] == 3

    class CheckStart(Callback):
        def on_train_start(self, trainer, module):
            self.step = trainer.global_step
            self.exp_avg = trainer.optimizers[0].state_dict()["state"][0]["exp_avg"].clone()

    check, resumed = CheckStart(), Recorder()
    trainer(tmp_path / "c", 6, [check, resumed]).fit(make_module(), data, ckpt_path=path)
    assert check.step == 3
    torch.testing.assert_close(check.exp_avg, saved["optimizer_states"][0]["state"][0]["exp_avg"])
    # the resumed steps 4-6 are the uninterrupted run's steps 4-6 (same data, draws and state)
    assert len(resumed.params) == 3
    torch.testing.assert_close(resumed.params[-1], straight.params[-1])


def test_ema_callback_formula_and_checkpoint(tmp_path):
    decay = 0.8
    rec = Recorder()
    ema = EMACallback(decay=decay)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    module = make_module(lr=1e-2)
    trainer(tmp_path, 4, [rec, ema, ckpt], enable_checkpointing=True).fit(module, loader(Photos(4)))
    expected = rec.params[0]  # first update copies the weights
    for p in rec.params[1:]:
        expected = decay * expected + (1 - decay) * p
    final = nn.utils.parameters_to_vector(module.net.parameters())
    torch.testing.assert_close(final, expected)  # the averaged weights replace the live ones
    assert not torch.allclose(final, rec.params[-1])

    # the checkpoint's state_dict holds the average: for_inference restores it
    restored = Stage1Restoration.for_inference(SwinIR(**TINY), tmp_path / "ck" / "last.ckpt")
    torch.testing.assert_close(nn.utils.parameters_to_vector(restored.net.parameters()), expected)


def test_ema_callback_warmup(tmp_path):
    rec = Recorder()
    module = make_module(lr=1e-2)
    trainer(tmp_path, 4, [rec, EMACallback(decay=0.8, warmup=True)]).fit(module, loader(Photos(4)))
    expected = rec.params[0]  # the first update copies; update n then uses min(0.8, (1+n)/(10+n))
    for n, p in enumerate(rec.params[1:], start=1):
        d = min(0.8, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * p
    final = nn.utils.parameters_to_vector(module.net.parameters())
    torch.testing.assert_close(final, expected)


def test_checkpoints_of_lightnings_ema_callback_restore_and_resume(tmp_path):
    """Stage-1 checkpoints written before bir had its own EMA (Lightning's EMAWeightAveraging)
    restore the average and resume training with :class:`EMACallback` as if never stopped."""
    data = loader(Photos(6))  # 3 batches per epoch
    straight = make_module(lr=1e-2)
    trainer(tmp_path / "a", 6, [EMACallback(decay=0.8)]).fit(straight, data)

    old = EMAWeightAveraging(decay=0.8, use_buffers=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    trainer(tmp_path / "b", 3, [old, ckpt], enable_checkpointing=True).fit(
        make_module(lr=1e-2), data
    )
    path = next((tmp_path / "ck").glob("*.ckpt"))
    saved = torch.load(path, weights_only=True)
    restored = Stage1Restoration.for_inference(SwinIR(**TINY), path)
    for name, value in restored.net.state_dict().items():
        torch.testing.assert_close(value, saved["state_dict"][f"net.{name}"])  # the average
    assert not torch.equal(
        saved["state_dict"]["net.conv_last.weight"],
        saved["current_model_state"]["net.conv_last.weight"],
    )

    resumed = make_module(lr=1e-2)
    trainer(tmp_path / "c", 6, [EMACallback(decay=0.8)]).fit(resumed, data, ckpt_path=path)
    torch.testing.assert_close(
        nn.utils.parameters_to_vector(resumed.net.parameters()),
        nn.utils.parameters_to_vector(straight.net.parameters()),
    )


def test_validation_degrades_with_fixed_seed_and_logs_metrics(tmp_path):
    module = make_module()
    val = loader(Photos(4))
    t = trainer(tmp_path, 1, limit_val_batches=None)
    first = t.validate(module, val, verbose=False)[0]
    second = t.validate(module, val, verbose=False)[0]
    assert first == second
    gt = Photos(4).gt
    lq = expected_lq(gt, [0, 1, 2, 3], VAL_DEGRADATION_STREAM)
    with torch.no_grad():
        out = module.net(lq).clamp(0, 1)
    for key, fn, y in [("psnr", metrics.psnr, False), ("ssim_y", metrics.ssim, True)]:
        # two batches of two, each logged as its mean, averaged with equal weights
        per_image = fn(out, gt, y_channel=y).float()
        assert first[f"val/{key}"] == pytest.approx(per_image.mean().item(), rel=1e-4)
    assert first["val/lq_psnr"] == pytest.approx(
        metrics.psnr(lq, gt).float().mean().item(), rel=1e-4
    )
    assert set(first) >= {"val/psnr", "val/ssim", "val/psnr_y", "val/ssim_y"}


def test_paired_validation_uses_the_given_lq(tmp_path):
    module = make_module(degradation=None)
    result = trainer(tmp_path, 1, limit_val_batches=None).validate(
        module, loader(Photos(2, with_lq=True)), verbose=False
    )[0]
    gt = Photos(2).gt
    assert result["val/lq_psnr"] == pytest.approx(
        metrics.psnr(gt * 0.5, gt).float().mean().item(), rel=1e-4
    )


class PartlyExact(Photos):
    """Paired images whose LQ equals the GT for the first two (their LQ PSNR is inf)."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        item["lq"] = self.gt[i] if i < 2 else self.gt[i] * 0.5
        return item


def test_validation_leaves_infinite_psnr_out_of_the_mean_and_counts_it(tmp_path):
    """bir.metrics.summary's policy: the first batch has only identical pairs (weight 0)."""
    module = make_module(degradation=None)
    result = trainer(tmp_path, 1, limit_val_batches=None).validate(
        module, loader(PartlyExact(4)), verbose=False
    )[0]
    gt = Photos(4).gt
    finite = metrics.psnr(gt[2:] * 0.5, gt[2:]).float()
    assert result["val/lq_psnr"] == pytest.approx(finite.mean().item(), rel=1e-5)
    assert result["val/lq_psnr_nonfinite"] == 2.0
    assert result["val/psnr_nonfinite"] == 0.0 and math.isfinite(result["val/psnr"])


def test_validation_lpips_weights_that_are_missing_name_the_model_key(tmp_path):
    from bir.nets.checkpoints import MissingCheckpointError

    module = make_module(degradation=None, lpips_weights=str(tmp_path / "alex.pth"))
    with pytest.raises(MissingCheckpointError, match="model.lpips_weights"):
        trainer(tmp_path, 1, limit_val_batches=None).validate(
            module, loader(Photos(2, with_lq=True)), verbose=False
        )


class ImageLogger(Logger):
    """Minimal logger with a W&B-style ``log_image``."""

    def __init__(self):
        super().__init__()
        self.images = []

    name, version = "mem", 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_image(self, key, images, step=None):
        self.images.append((key, images[0].shape, step))


def test_image_grids_reach_loggers_with_log_image(tmp_path):
    logger = ImageLogger()
    module = make_module(log_images_every_n_steps=2)
    trainer(tmp_path, 3, logger=logger).fit(module, loader(Photos(2)))
    # steps 0 and 2; grid: 2 rows of 16 px, LQ | restored | GT columns, HWC
    assert logger.images == [("train/images", (32, 48, 3), 0), ("train/images", (32, 48, 3), 2)]


class ScaleBy(nn.Module):
    """Pointwise 'network' counting its calls (tiling must be exact for it)."""

    scale = 1

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.w + 0.7


def test_predict_is_tiled_above_tile_size_and_clamped():
    module = Stage1Restoration(ScaleBy(), tile_size=32, tile_overlap=16).eval()
    lq = torch.rand(2, 3, 48, 80)
    out = module.predict_step({"lq": lq, "name": ["a", "b"]})
    assert out["name"] == ["a", "b"]
    assert module.net.calls == 2 * 4  # rows at 0, 16; columns at 0, 16, 32, 48
    torch.testing.assert_close(out["restored"], (lq * 0.5 + 0.7).clamp(0, 1))
    assert out["restored"].max() == 1.0  # clamped
    module.net.calls = 0
    module.predict_step({"lq": lq[..., :32, :32], "name": ["a", "b"]})
    assert module.net.calls == 1


def test_for_inference_loads_a_bare_swinir_state_dict(tmp_path):
    torch.manual_seed(1)
    net = SwinIR(**TINY).eval()
    torch.save(net.state_dict(), tmp_path / "swinir.pth")
    module = Stage1Restoration.for_inference(SwinIR(**TINY), tmp_path / "swinir.pth")
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(module.restore(x), net(x).clamp(0, 1))


def test_cosine_with_warmup_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)

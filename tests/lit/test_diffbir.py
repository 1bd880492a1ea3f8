"""DiffBIR inference: shapes and ranges, per-image seeding, CFG, control strength, guidance,
samplers, tiling, SR upscaling, stage-1 checkpoint prefixes, bir-restore end to end, and the
release presets (composition, sizes, 8-bit truncation, v2.1 options)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from torch import nn

from bir.errors import UsageError
from bir.lit.diffbir import DiffBIR
from bir.tiling import num_tiles
from tests.conftest import compose_config

# tiny nets are overhead-bound: one thread is several times faster on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_method(seed: int = 0, **overrides) -> DiffBIR:
    """The real method=diffbir config with the tiny networks (random weights, trained-looking
    ControlNet: non-zero zero-convs and hint weights)."""
    cfg = compose_config(
        "restore",
        "method=diffbir",
        "net@method.controlldm=controlnet_tiny",
        "net@method.stage1=swinir_tiny",
    )
    torch.manual_seed(seed)
    unet = hydra.utils.instantiate(cfg.method.controlldm.unet)
    nn.init.normal_(unet.out[2].weight, std=0.02)
    controlldm = hydra.utils.instantiate(cfg.method.controlldm, unet=unet, control_ckpt_path=None)
    cn = controlldm.controlnet
    for conv in [*cn.zero_convs, cn.middle_block_out]:
        nn.init.normal_(conv[0].weight, std=0.05)
    nn.init.normal_(cn.input_blocks[0][0].weight, std=0.05)
    stage1 = hydra.utils.instantiate(cfg.method.stage1)
    args = dict(steps=3, seed=5, stage1_ckpt_path=None)
    args.update(overrides)
    return hydra.utils.instantiate(cfg.method, controlldm=controlldm, stage1=stage1, **args)


def lq_batch(indices=(0, 1), h: int = 20, w: int = 28) -> dict:
    g = torch.Generator().manual_seed(0)
    lq = torch.rand(len(indices), 3, h, w, generator=g)
    return {"lq": lq, "index": torch.tensor(list(indices)), "name": [f"im{i}" for i in indices]}


def test_predict_shapes_range_extras_and_per_image_seeds():
    method = tiny_method()
    batch = lq_batch((0, 1))
    out = method.predict_step(batch)
    r = out["restored"]
    assert r.shape == (2, 3, 20, 28) and torch.isfinite(r).all() and r.min() >= 0 and r.max() <= 1
    assert out["name"] == ["im0", "im1"] and "loss_curve" not in out
    ex = out["extras"]
    assert ex["sampler"] == "ddpm" and ex["steps"] == 3 and ex["color_fix"] == "wavelet"
    assert ex["guidance_scale"] == 0.0 and ex["seed"] == 5
    # the same image index gives the same result in any batch; other indices differ
    alone = method.predict_step({**lq_batch((1,)), "lq": batch["lq"][1:]})["restored"]
    torch.testing.assert_close(alone, r[1:], atol=2e-4, rtol=0)
    shifted = method.predict_step({**batch, "index": torch.tensor([7, 8])})["restored"]
    assert (shifted - r).abs().max() > 1e-3


def test_cfg_and_control_strength_in_the_denoiser():
    method = tiny_method(cfg_scale=3.0)
    net = method.controlldm
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])
    pos, neg = net.encode_text(["a photo"]), net.encode_text(["blurry"])
    with torch.no_grad():
        got = method.denoiser(pos, neg, cond)(z, t)
        p, n = net(z, t, pos, cond), net(z, t, neg, cond)
        torch.testing.assert_close(got, n + 3.0 * (p - n), atol=1e-5, rtol=1e-5)
        net.set_control_strength(0.0)
        torch.testing.assert_close(net(z, t, pos, cond), net.unet(z, t, context=pos))


def test_guidance_scale_zero_equals_no_guidance_and_positive_scale_pulls_to_stage1():
    batch = lq_batch((0,), 16, 16)
    off = tiny_method(guidance=None).predict_step(batch)["restored"]
    zero = tiny_method(guidance={"scale": 0.0, "repeats": 3}).predict_step(batch)["restored"]
    assert torch.equal(off, zero)
    on = tiny_method(guidance={"scale": 0.01, "repeats": 2})
    out = on.predict_step(batch)
    assert out["loss_curve"].shape == (1, 3) and out["extras"]["guidance_repeats"] == 2
    free = tiny_method().restore(batch["lq"], batch["index"])
    guided = on.restore(batch["lq"], batch["index"])
    # the guided latent ends much closer to the stage-1 latent (the guidance target)
    err = lambda r: (r["latent"] - r["cond"]).pow(2).mean()  # noqa: E731
    assert err(guided) < 0.5 * err(free)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_other_samplers_run_deterministically(sampler):
    batch = lq_batch((0,), 16, 16)
    a = tiny_method(sampler=sampler).predict_step(batch)["restored"]
    b = tiny_method(sampler=sampler).predict_step(batch)["restored"]
    ddpm = tiny_method().predict_step(batch)["restored"]
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert (a - ddpm).abs().max() > 1e-4
    method = tiny_method(sampler=sampler)
    assert len(method.sampling_schedule()) == 3


def test_latent_tiling_matches_untiled_when_one_tile_and_blends_otherwise(monkeypatch):
    batch = lq_batch((0,), 32, 32)  # 16 x 16 latents with the factor-2 tiny VAE
    untiled = tiny_method(diffusion_tile_size=None).predict_step(batch)["restored"]
    one_tile = tiny_method(diffusion_tile_size=32).predict_step(batch)["restored"]
    torch.testing.assert_close(one_tile, untiled, atol=1e-6, rtol=0)
    method = tiny_method(diffusion_tile_size=16, diffusion_tile_overlap=8)  # 8-px latent tiles
    calls = []
    forward = method.controlldm.forward
    monkeypatch.setattr(
        method.controlldm, "forward", lambda *a, **k: calls.append(a[0].shape) or forward(*a, **k)
    )
    tiled = method.predict_step(batch)["restored"]
    assert len(calls) == 3 * num_tiles(16, 16, 8, 4) and all(s[-2:] == (8, 8) for s in calls)
    assert torch.isfinite(tiled).all() and tiled.shape == untiled.shape
    assert (tiled - untiled).abs().mean() < 0.2  # same content, seams blended


def test_upscale_and_tiled_stage1():
    method = tiny_method(upscale=2.0, stage1_tile_size=16, stage1_tile_overlap=8)
    calls = []
    stage1_forward = method.stage1.forward
    method.stage1.forward = lambda x: calls.append(x.shape) or stage1_forward(x)
    out = method.predict_step(lq_batch((0,), 12, 14))
    assert out["restored"].shape == (1, 3, 24, 28) and out["extras"]["upscale"] == 2.0
    assert len(calls) == num_tiles(24, 28, 16, 8) and all(s[-2:] == (16, 16) for s in calls)


def test_stage1_weights_load_from_a_v1_full_checkpoint(tmp_path):
    ref = tiny_method(seed=1)
    state = {f"preprocess_model.{k}": v for k, v in ref.stage1.state_dict().items()}
    state["control_model.zero_convs.0.0.weight"] = torch.zeros(1)  # other parts of the file
    torch.save({"state_dict": state}, tmp_path / "general_full_v1.ckpt")
    loaded = tiny_method(seed=2, stage1_ckpt_path=str(tmp_path / "general_full_v1.ckpt"))
    for k, v in loaded.stage1.state_dict().items():
        assert torch.equal(v, ref.stage1.state_dict()[k])
    assert not any(p.requires_grad for p in loaded.stage1.parameters())
    with pytest.raises(Exception, match="not found"):
        tiny_method(stage1_ckpt_path=str(tmp_path / "missing.ckpt"))


def test_bad_settings_are_rejected():
    for bad in ({"sampler": "euler"}, {"prediction": "x0"}, {"color_fix": "hist"}):
        with pytest.raises(Exception, match="must be"):
            tiny_method(**bad)


@pytest.mark.slow
def test_bir_restore_method_diffbir_end_to_end(tmp_path):
    from bir.data.io import save_image

    save_image(torch.rand(3, 20, 24), tmp_path / "in" / "a.png")
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }
    args = [
        "method=diffbir",
        "net@method.controlldm=controlnet_tiny",
        "net@method.stage1=swinir_tiny",
        "method.stage1_ckpt_path=null",
        "method.controlldm.control_ckpt_path=null",
        "method.steps=2",
        "method.guidance.scale=0.1",
        f"input={tmp_path / 'in'}",
        f"output={tmp_path / 'out'}",
        "callbacks.progress_bar=null",
    ]
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "bir-restore"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "a.png").is_file()
    record = json.loads((tmp_path / "out" / "records" / "a.json").read_text())
    assert record["extras"]["guidance_scale"] == 0.1 and record["extras"]["sampler"] == "ddpm"


# ------------------------------------------------------------------ release presets and options
STAGE1_TINY = {"swinir": "swinir_tiny", "bsrnet": "bsrnet_tiny", "scunet": "scunet_tiny"}
#: preset -> (stage-1 net, pipeline, sampler, steps, cfg, prediction, zero-SNR, upscale)
PRESETS = {
    "diffbir_v1": ("swinir", "v1", "ddpm", 50, 1.0, "eps", False, 1.0),
    "diffbir_v1_face": ("swinir", "v1", "ddpm", 50, 1.0, "eps", False, 1.0),
    "diffbir_v2": ("bsrnet", "v2_bsrnet", "ddpm", 50, 4.0, "eps", False, 4.0),
    "diffbir_v2_face": ("swinir", "v2_swinir", "ddpm", 50, 4.0, "eps", False, 1.0),
    "diffbir_v2_denoise": ("scunet", "v2_scunet", "ddpm", 50, 4.0, "eps", False, 1.0),
    "diffbir_v2_1": ("swinir", "v2_swinir", "edm_dpmpp_3m_sde", 10, 6.0, "v", True, 4.0),
    "diffbir_v2_1_face": ("swinir", "v2_swinir", "edm_dpmpp_3m_sde", 10, 6.0, "v", True, 1.0),
    "diffbir_v2_1_denoise": ("swinir", "v2_swinir", "edm_dpmpp_3m_sde", 10, 6.0, "v", True, 1.0),
}


def compose_preset(experiment: str, overrides=()):
    return compose_config("restore", f"experiment={experiment}", *overrides)


def tiny_preset(experiment: str, seed: int = 0, **overrides) -> DiffBIR:
    """A release preset with tiny random networks, sizes scaled down (short side 32, padding 16)."""
    stage1 = PRESETS[experiment][0]
    cfg = compose_preset(
        experiment,
        ["net@method.controlldm=controlnet_tiny", f"net@method.stage1={STAGE1_TINY[stage1]}"],
    )
    torch.manual_seed(seed)
    unet = hydra.utils.instantiate(cfg.method.controlldm.unet)
    nn.init.normal_(unet.out[2].weight, std=0.02)
    controlldm = hydra.utils.instantiate(
        cfg.method.controlldm, unet=unet, sd_ckpt_path=None, control_ckpt_path=None
    )
    with torch.no_grad():  # zero-initialised layers (zero convs, proj_out): as if trained
        for p in controlldm.parameters():
            if p.dim() > 1 and p.abs().max() == 0:
                nn.init.normal_(p, std=0.05)
    stage1_net = hydra.utils.instantiate(cfg.method.stage1)
    args = dict(steps=2, seed=5, stage1_ckpt_path=None, min_side=32, pad_to=16)
    args.update(overrides)
    return hydra.utils.instantiate(cfg.method, controlldm=controlldm, stage1=stage1_net, **args)


def u8_lq(h: int, w: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lq = torch.randint(0, 256, (1, 3, h, w), generator=g).float() / 255  # 8-bit levels, as loaded
    return {"lq": lq, "index": torch.tensor([0]), "name": ["im0"]}


@pytest.mark.parametrize("experiment", sorted(PRESETS))
def test_release_presets_compose_with_the_release_defaults(experiment):
    stage1, pipeline, sampler, steps, cfg_scale, prediction, zsnr, upscale = PRESETS[experiment]
    m = compose_preset(experiment).method
    assert (
        m.stage1._target_.split(".")[-1]
        == {"swinir": "SwinIR", "bsrnet": "RRDBNet", "scunet": "SCUNet"}[stage1]
    )
    assert (m.pipeline, m.sampler, m.steps, m.cfg_scale) == (pipeline, sampler, steps, cfg_scale)
    assert (m.prediction, m.schedule.zero_terminal_snr, m.upscale) == (prediction, zsnr, upscale)
    assert (m.min_side, m.pad_to, m.output_rounding) == (512, 64, "truncate")
    assert m.stage1_tile_size is None and m.vae_tile_size is None  # the releases run untiled
    assert m.guidance.scale == 0.0 and m.guidance.resample_target
    version = experiment.split("_")[1]
    assert m.guidance.units == ("v1" if version == "v1" else "v2")
    assert m.apply_guidance == (experiment.startswith("diffbir_v2_1") is False)
    if version == "v1":
        assert m.guidance.repeats == 5 and m.pos_prompt == m.neg_prompt == ""
    elif experiment.startswith("diffbir_v2_1"):
        assert m.pos_prompt.startswith("Cinematic") and m.neg_prompt.startswith("painting")
        assert m.eta == 1.0 and m.ddim_timesteps == "ldm" and not m.rescale_cfg
    else:
        assert m.neg_prompt.startswith("low quality") and m.ddim_timesteps == "ldm"


def test_stage2_release_preset_is_the_released_recipe():
    ours = compose_config("train", "experiment=diffbir_stage2")
    release = compose_config("train", "experiment=diffbir_stage2_release")
    assert release.model.optimizer._target_ == "torch.optim.AdamW"
    assert release.model.optimizer.weight_decay == 0.01 and release.model.ema_decay is None
    assert release.trainer.precision == "32-true"
    assert ours.model.optimizer.weight_decay == 0.0 and ours.model.ema_decay == 0.999
    for key in ("max_steps", "accumulate_grad_batches"):
        assert release.trainer[key] == ours.trainer[key]
    assert release.data.batch_size == ours.data.batch_size


@pytest.mark.parametrize(
    "experiment, size, expected",
    [
        ("diffbir_v1", (20, 28), (32, 45)),  # short side -> 32, long side rounded up; kept
        ("diffbir_v2", (12, 14), (48, 56)),  # BSRNet x4 -> upscale 4
        ("diffbir_v2_denoise", (20, 28), (20, 28)),  # back to the input size
        ("diffbir_v2_1", (6, 7), (24, 28)),  # PIL x4, enlarged to 32, resized back
    ],
)
def test_release_presets_run_tiny_with_the_release_sizes_and_8bit_truncation(
    experiment, size, expected
):
    method = tiny_preset(experiment, steps=2 if "v2_1" not in experiment else 3)
    out = method.predict_step(u8_lq(*size))
    r = out["restored"]
    assert r.shape[-2:] == expected and torch.isfinite(r).all()
    levels = r * 255
    assert torch.equal(levels, levels.round())  # truncated to 8-bit levels
    assert out["extras"]["pipeline"] == PRESETS[experiment][1]


def test_output_truncation_floors_the_rounded_output():
    batch = u8_lq(20, 28)
    rounded = tiny_preset("diffbir_v2_face", output_rounding="round").predict_step(batch)
    truncated = tiny_preset("diffbir_v2_face").predict_step(batch)
    r, t = rounded["restored"], truncated["restored"]
    torch.testing.assert_close(t, torch.floor(r * 255) / 255, atol=1e-6, rtol=0)
    assert (r - t).abs().max() > 0


def test_release_size_helpers_by_hand():
    from PIL import Image

    from bir.lit.diffbir import (
        bicubic_antialias,
        pil_bicubic_resize,
        scaled_size,
        short_side_size,
        zero_pad_to,
    )

    assert short_side_size(20, 28, 512) == (512, 716) and short_side_size(30, 20, 32) == (48, 32)
    assert short_side_size(9, 9, 16) == (16, 16)
    assert scaled_size(15, 17, 1.5, "up") == (23, 26) and scaled_size(15, 17, 1.5, "down") == (
        22,
        25,
    )
    x = u8_lq(9, 11)["lq"]
    arr = (x[0] * 255).round().byte().permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(arr).resize((15, 13), Image.BICUBIC))
    got = pil_bicubic_resize(x, (13, 15))
    assert torch.equal(got[0], torch.from_numpy(pil.copy()).permute(2, 0, 1).float() / 255)
    padded = zero_pad_to(x, 8)
    assert padded.shape[-2:] == (16, 16) and torch.equal(padded[..., :9, :11], x)
    assert padded[..., 9:, :].abs().max() == 0 and padded[..., :, 11:].abs().max() == 0
    # the releases' antialiased bicubic (Keys a = -0.5, as PIL) differs from plain bicubic
    up = bicubic_antialias(x, (18, 22))
    assert (up - torch.nn.functional.interpolate(x, (18, 22), mode="bicubic")).abs().max() > 1e-3


def test_v2_1_options_start_noise_aug_rescale_and_unapplied_guidance():
    batch = u8_lq(8, 9)
    # eps and no zero-SNR (v2.1's code with v2 weights): with zero-SNR, q(z_999 | c) is pure
    # noise and start=cond changes nothing
    common = dict(
        steps=3, schedule={"zero_terminal_snr": False}, prediction="eps", output_rounding="round"
    )
    base = tiny_preset("diffbir_v2_1_face", **common)
    ref = base.predict_step(batch)["restored"]
    assert torch.equal(ref, base.predict_step(batch)["restored"])  # deterministic per seed
    for option in ({"start": "cond"}, {"noise_aug": 300}, {"rescale_cfg": True}):
        out = tiny_preset("diffbir_v2_1_face", **common, **option).predict_step(batch)["restored"]
        assert (out - ref).abs().max() > 1e-5, option
    # v2.1 sets a guidance target but never applies it; the preset does the same
    unapplied = tiny_preset("diffbir_v2_1_face", **common, guidance={"scale": 0.5, "loss": "mse"})
    assert torch.equal(unapplied.predict_step(batch)["restored"], ref)
    with pytest.raises(ValueError, match="edm_dpmpp_3m_sde"):
        tiny_preset(
            "diffbir_v2_1_face",
            steps=3,
            apply_guidance=True,
            guidance={"scale": 0.5, "loss": "mse"},
        ).predict_step(batch)


def test_ldm_ddim_timesteps_are_used_by_the_presets():
    method = tiny_preset("diffbir_v2_face", sampler="ddim", steps=10)
    assert method.sampling_schedule().timesteps.tolist() == list(range(1, 1000, 100))
    assert tiny_method(sampler="ddim", steps=10).sampling_schedule().timesteps.tolist() == list(
        range(0, 1000, 100)
    )


def test_bad_release_options_are_rejected():
    for bad in (
        {"pipeline": "v3"},
        {"start": "x"},
        {"ddim_timesteps": "k"},
        {"output_rounding": "ceil"},
    ):
        with pytest.raises(Exception, match="must be one of"):
            tiny_method(**bad)
    with pytest.raises(Exception, match="pad_to"):
        tiny_method(pipeline="v2_swinir", pad_to=6)
    with pytest.raises(Exception, match="noise_aug"):
        tiny_method(noise_aug=1000)


def test_bir_pipeline_rejects_an_upscaling_stage1_and_v2_bsrnet_takes_it():
    method = tiny_preset("diffbir_v2", pipeline="bir", upscale=1.0)
    with pytest.raises(UsageError, match="pipeline=v2_bsrnet"):
        method.restore(u8_lq(8, 8)["lq"], torch.tensor([0]))
